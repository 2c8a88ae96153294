#!/usr/bin/env bash
# The GPU check, for the day a CUDA GPU is lent: one command, at most ~8 minutes on an H200.
#
#   bash bench/gpu.sh            # figures into ./gpu-figures (or $OUT when it is set)
#
# 1. the CUDA tests (the fixed-shape and compiled decode steps, CUDA graphs, against eager);
# 2. decode tok/s of `small` and `seed` in bf16, batch 1 and 64, eager and compiled
#    (bench/decode.py; llama.cpp runs there only if its CUDA bindings are on PYTHONPATH);
# 3. served tok/s and TTFT at 1 / 16 / 64 / 256 streams, compiled (bench/serve.py, DEVICE=cuda);
# 4. bf16 training tokens/s and MFU of both presets (`slm train`'s own report) on stories this
#    script writes, since the machine may reach no network and hold no dataset.
# Each part has its own time limit, so one that hangs does not take the rest with it.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-figures}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
  | tee -a "$out/gpu.txt"

timeout 120 python -m pytest -q -p no:cacheprovider tests/test_decode_step.py -k cuda \
  2>&1 | tail -5 | tee "$out/tests.txt"

for preset in small seed; do
  timeout 100 python bench/decode.py --preset "$preset" --device cuda --dtype bfloat16 \
    --batch 64 --repeats 3 --skip-uncached --json "$out/decode-$preset.json" \
    2>&1 | tail -20 | tee "$out/decode-$preset.txt"
done

for preset in small seed; do
  DEVICE=cuda timeout 120 python bench/serve.py --preset "$preset" --clients 1 16 64 256 \
    --max-batch 256 --requests 1 --repeats 1 --modes sampled --json "$out/serve-$preset.json" \
    2>&1 | tail -20 | tee "$out/serve-$preset.txt"
done

stories="$out/stories.txt"
python - "$stories" <<'PY'
import random, sys
random.seed(0)
words = "once upon a time there was a little girl who loved to play with her dog in the park".split()
with open(sys.argv[1], "w") as f:
    for _ in range(20000):
        f.write(" ".join(random.choices(words, k=60)).capitalize() + ".\n\n")
PY
slm prepare --source "$stories" --out "$out/data" --quiet
for preset in small seed; do
  timeout 60 slm train --data "$out/data" --out "$out/train-$preset" --preset "$preset" \
    --device cuda --dtype bfloat16 --compile --batch-size 64 --max-steps 60 --log-interval 10 \
    --eval-interval 1000 2>&1 | grep -E "tokens/s|MFU" | tail -3 | tee "$out/train-$preset.txt"
done
rm -rf "$out/data" "$out"/train-*/ "$stories"
echo "figures in $out"

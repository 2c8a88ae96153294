"""Long stories: what a token costs once a story outgrows the context window, for GPT-2's
learned positions (the window is re-encoded every block_size/4 tokens) against rotary positions
(the cache drops its oldest quarter and decoding goes on), in one run, with ratios.

    python bench/window.py                       # the seed preset's shape, CPU, fp32
    python bench/window.py --preset story --batch 16

Each architecture writes --batch sampled stories (temperature 0.8, a distinct seed per story)
twice: a short one that stays inside the window (block_size/2 new tokens) and a long one of
4 × block_size new tokens; the figure is milliseconds per generated token, the median over
--repeats runs, the four contenders interleaved so machine noise hits them alike. The weights
are random: speed does not depend on them (a story that draws <|endoftext|>, about one in
50,000 tokens, ends early; the figure is per token produced).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from model import GPT, preset
from model.generate import BatchGenerator
from model.sampling import SamplingParams

ARCHITECTURES = {
    "learned (GPT-2)": dict(position="learned", norm="layernorm", activation="gelu"),
    "rotary (Llama)": dict(position="rotary", norm="rmsnorm", activation="swiglu"),
}


def ms_per_token(model: GPT, batch: int, new_tokens: int) -> float:
    generator = BatchGenerator(model, max_batch=batch)
    prompt = generator.encode_prompt("Once upon a time, there was a little girl named Lily.")
    for seed in range(batch):
        generator.add(prompt, SamplingParams(max_new_tokens=new_tokens, temperature=0.8, seed=seed))
    started = time.perf_counter()
    produced = 0
    while generator.rows:
        produced += len(generator.step())
    return 1000 * (time.perf_counter() - started) / produced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="seed", help="the shape both architectures take")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    models = {}
    for name, options in ARCHITECTURES.items():
        torch.manual_seed(0)
        models[name] = GPT(preset(args.preset, **options)).eval()
    block = next(iter(models.values())).config.block_size
    lengths = {"short": block // 2, "long": 4 * block}
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; preset {args.preset} (block {block}), batch {args.batch}, "
        f"sampled at temperature 0.8"
    )
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for name, model in models.items():
            for length, tokens in lengths.items():
                times.setdefault((name, length), []).append(ms_per_token(model, args.batch, tokens))
    print(f"{'architecture':<18} {'short ms/token':>15} {'long ms/token':>14} {'long/short':>11}")
    for name in models:
        short = statistics.median(times[(name, "short")])
        long = statistics.median(times[(name, "long")])
        print(f"{name:<18} {short:>15.2f} {long:>14.2f} {long / short:>10.2f}×")


if __name__ == "__main__":
    main()

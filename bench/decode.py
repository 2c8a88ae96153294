"""Decode speed: our KV-cached generation against our uncached model and Hugging Face's
``GPT2LMHeadModel.generate`` on identical weights, in one run, with ratios.

    python bench/decode.py                      # the seed preset at block 512, CPU, fp32
    python bench/decode.py --device cuda --dtype bfloat16
    python bench/decode.py --checkpoint checkpoints/run   # trained weights (int8 loss cost)

Greedy decoding of 200 new tokens after a 10-token prompt; medians over --repeats runs, the
contenders interleaved so machine noise hits them alike. Not a test: speed is measured here,
never asserted in the test suite.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from model import GPT, preset
from model.checkpoint import load_checkpoint
from model.export.hf import export_hf
from model.generate import BatchGenerator
from model.sampling import SamplingParams

VALID_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories-valid.txt"


def our_decode(generator: BatchGenerator, prompts: list[list[int]], new_tokens: int) -> int:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0)
    sequences = [generator.add(prompt, params)[0] for prompt in prompts]
    while generator.rows:
        generator.step()
    return sum(len(s.generated) for s in sequences)


def hf_decode(hf_model, prompts: list[list[int]], new_tokens: int) -> int:
    idx = torch.tensor(prompts, device=hf_model.device)
    out = hf_model.generate(
        idx,
        attention_mask=torch.ones_like(idx),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=50256,
        use_cache=True,
    )
    return (out.shape[1] - idx.shape[1]) * idx.shape[0]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(run: Callable[[], int], device: str) -> float:
    """Tokens per second of one run."""
    synchronize(device)
    started = time.perf_counter()
    tokens = run()
    synchronize(device)
    return tokens / (time.perf_counter() - started)


def validation_loss(model: torch.nn.Module, block: int, batches: int = 8) -> float | None:
    """Mean next-token loss on the first windows of the TinyStories validation excerpt."""
    if not VALID_FILE.exists():
        return None
    from model.tokenizer import get_tokenizer

    ids = get_tokenizer().encode(VALID_FILE.read_text(encoding="utf-8")[:400_000])
    data = torch.tensor(ids[: batches * 4 * (block + 1)]).view(batches, 4, block + 1)
    losses = []
    with torch.inference_mode():
        for batch in data:
            losses.append(model(batch[:, :-1], batch[:, 1:])[1].item())
    return statistics.mean(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="trained weights instead of random ones")
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16, help="the aggregate-throughput batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--skip-uncached", action="store_true", help="skip the slowest contender")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint)
    else:
        model = GPT(preset("seed", block_size=args.block_size)).eval()
    with tempfile.TemporaryDirectory() as folder:
        export_hf(model, Path(folder))
        hf_model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    dtype = getattr(torch, args.dtype)
    model = model.to(args.device, dtype)
    hf_model = hf_model.to(args.device, dtype)

    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(
        0, 50000, (args.batch, args.prompt_tokens), generator=generator
    ).tolist()
    one, many = prompts[:1], prompts
    new = args.new_tokens

    cached_1 = BatchGenerator(model, max_batch=1)
    cached_n = BatchGenerator(model, max_batch=args.batch)
    contenders: dict[str, Callable[[], int]] = {
        "ours, KV cache, batch 1": lambda: our_decode(cached_1, one, new),
        "HF generate, batch 1": lambda: hf_decode(hf_model, one, new),
        f"ours, KV cache, batch {args.batch}": lambda: our_decode(cached_n, many, new),
        f"HF generate, batch {args.batch}": lambda: hf_decode(hf_model, many, new),
    }
    if not args.skip_uncached:
        uncached = BatchGenerator(model, max_batch=1, use_cache=False)
        contenders["ours, no cache, batch 1"] = lambda: our_decode(uncached, one, new)
    int8_model = None
    if args.device == "cpu" and args.dtype == "float32":
        int8_1 = BatchGenerator(model, max_batch=1, quantization="int8")
        int8_n = BatchGenerator(model, max_batch=args.batch, quantization="int8")
        int8_model = int8_1.model
        contenders["ours int8, KV cache, batch 1"] = lambda: our_decode(int8_1, one, new)
        contenders[f"ours int8, KV cache, batch {args.batch}"] = lambda: our_decode(
            int8_n, many, new
        )

    for run in contenders.values():  # warm-up: allocator, kernels, caches
        run()
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, run in contenders.items():
            rates[name].append(timed(run, args.device))
    medians = {name: statistics.median(values) for name, values in rates.items()}

    hf_1 = medians["HF generate, batch 1"]
    hf_n = medians[f"HF generate, batch {args.batch}"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}")
    print(
        f"device {args.device}, {args.dtype}, block {model.config.block_size}, "
        f"{model.num_parameters() / 1e6:.1f}M parameters, prompt {args.prompt_tokens}, "
        f"{new} new tokens, greedy, median of {args.repeats}"
    )
    print(f"{'contender':40} {'tok/s':>9} {'vs HF':>7}")
    for name, rate in medians.items():
        peer = hf_n if name.endswith(f"batch {args.batch}") else hf_1
        print(f"{name:40} {rate:9.1f} {rate / peer:6.2f}x")
    figures: dict[str, object] = {"tokens_per_second": medians, "runs": rates}
    if int8_model is not None:
        fp32_loss = validation_loss(model, min(256, model.config.block_size))
        int8_loss = validation_loss(int8_model, min(256, model.config.block_size))
        if fp32_loss is not None and int8_loss is not None:
            print(
                f"validation loss: fp32 {fp32_loss:.4f}, int8 {int8_loss:.4f} "
                f"(cost {int8_loss - fp32_loss:+.4f})"
            )
            figures["validation_loss"] = {"fp32": fp32_loss, "int8": int8_loss}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

"""Long stories and decode speed per parameter: what a token costs once a story outgrows the
context window, for GPT-2's learned positions (the window is re-encoded every block_size/4
tokens) against rotary positions (the cache drops its oldest quarter and decoding goes on), for
each preset as it is and with the other kind of positions, in one run, with ratios.

    python bench/window.py                       # seed and small, CPU, fp32
    python bench/window.py --presets seed --batch 16

Each contender writes --batch sampled stories (temperature 0.8, a distinct seed per story)
twice: a short one that stays inside the window (block_size/2 new tokens) and a long one of
4 × block_size new tokens; the figures are milliseconds per generated token and microseconds per
token per million parameters, medians over --repeats runs, the contenders interleaved so
machine noise hits them alike. The weights
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

GPT2_STYLE = dict(position="learned", norm="layernorm", activation="gelu", qk_norm=False)
LLAMA_STYLE = dict(position="rotary", norm="rmsnorm", activation="swiglu")


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


def contenders(names: list[str]) -> dict[str, GPT]:
    """Each preset as it is, and with the other kind of positions (and its architecture)."""
    models = {}
    for name in names:
        config = preset(name)
        other = GPT2_STYLE if config.position == "rotary" else LLAMA_STYLE
        for label, options in ((config.position, {}), (other["position"], other)):
            torch.manual_seed(0)
            models[f"{name}, {label}{'' if options else ' (as is)'}"] = GPT(
                preset(name, **options)
            ).eval()
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="seed,small", help="comma-separated presets")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    models = contenders(args.presets.split(","))
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; batch {args.batch}, sampled at temperature 0.8"
    )
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for name, model in models.items():
            block = model.config.block_size
            for length, tokens in (("short", block // 2), ("long", 4 * block)):
                times.setdefault((name, length), []).append(ms_per_token(model, args.batch, tokens))
    print(
        f"{'contender':<26} {'params':>7} {'block':>6} {'short ms/tok':>13} "
        f"{'long ms/tok':>12} {'long/short':>11} {'µs/tok/M':>9}"
    )
    for name, model in models.items():
        short = statistics.median(times[(name, "short")])
        long = statistics.median(times[(name, "long")])
        millions = model.num_parameters() / 1e6
        print(
            f"{name:<26} {millions:>6.1f}M {model.config.block_size:>6} {short:>13.2f} "
            f"{long:>12.2f} {long / short:>10.2f}× {1000 * short / millions:>9.1f}"
        )


if __name__ == "__main__":
    main()

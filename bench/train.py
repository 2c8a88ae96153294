"""Training speed: our trainer against a bare loop on the same model, in one run, with the ratio.

    python bench/train.py                       # seed preset, batch 8 × 128 tokens, CPU
    python bench/train.py --device cuda --batch-size 32 --compile

The trainer (``worker.trainer.Trainer``) samples random windows from the memmapped token files,
sets the learning rate, accumulates, clips, steps AdamW and reports progress every step. The bare
loop is a plain nanoGPT-style loop: forward to the full logits, ``F.cross_entropy`` on them,
backward and AdamW, on one batch already in memory, nothing else. The ratio is what the model's
fused, chunked output layer and loss (``model.loss``) gain net of what the trainer's bookkeeping
costs. Step times are medians after --warmup steps, the contenders alternating for --repeats
rounds so machine noise hits both alike. Data: --data, else the
TinyStories excerpts in ../shared/data, prepared into a temporary folder. Not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from contract.train import TrainConfig
from model import GPT
from model.device import pick_device
from worker.data import prepare
from worker.trainer import Progress, Trainer, param_groups, resolve_dtype

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def trainer_step_seconds(
    config: TrainConfig, data_dir: Path, steps: int, warmup: int
) -> list[float]:
    marks: list[float] = []

    def mark(progress: Progress) -> None:
        marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        Trainer(
            config.model_copy(update={"max_steps": warmup + steps + 1}),
            data_dir,
            Path(run_dir),
            on_progress=mark,
        ).run()
    times = [b - a for a, b in zip([started, *marks], marks, strict=False)]
    return times[warmup:-1]  # the last step also evaluates and saves a checkpoint


def bare_step_seconds(config: TrainConfig, steps: int, warmup: int) -> list[float]:
    device = pick_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    torch.manual_seed(config.seed)
    model = GPT(config.model()).to(device).train()
    optimizer = torch.optim.AdamW(
        param_groups(model, config.weight_decay), lr=config.lr, fused=device.type == "cuda"
    )
    forward = torch.compile(model) if config.compile else model
    block = config.block_size or model.config.block_size
    x = torch.randint(0, model.config.vocab_size, (config.batch_size, block), device=device)
    y = torch.randint(0, model.config.vocab_size, (config.batch_size, block), device=device)
    autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    times = []
    for _ in range(warmup + steps):
        started = time.perf_counter()
        for _ in range(config.grad_accum):
            with autocast:
                logits, _ = forward(x)
                loss = F.cross_entropy(
                    logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), ignore_index=-1
                )
            (loss / config.grad_accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times[warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, help="a prepared data folder")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    config = TrainConfig(
        preset=args.preset,
        batch_size=args.batch_size,
        block_size=args.block_size,
        grad_accum=args.grad_accum,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        eval_iters=1,
        eval_interval=10**6,
        checkpoint_interval=0,
        warmup_steps=1,
    )
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data
        if data_dir is None:
            data_dir = Path(scratch)
            prepare(SHARED_DATA, data_dir, quiet=True)
        runs: dict[str, list[float]] = {"trainer": [], "bare loop": []}
        for _ in range(args.repeats):
            runs["trainer"] += trainer_step_seconds(config, data_dir, args.steps, args.warmup)
            runs["bare loop"] += bare_step_seconds(config, args.steps, args.warmup)

    block = config.block_size or config.model().block_size
    tokens = config.tokens_per_step(block)
    results = {
        name: {
            "median_step_s": statistics.median(times),
            "tokens_per_s": tokens / statistics.median(times),
        }
        for name, times in runs.items()
    }
    ratio = results["trainer"]["tokens_per_s"] / results["bare loop"]["tokens_per_s"]
    machine = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    if args.json:
        print(
            json.dumps(
                {
                    "config": config.model_dump(),
                    "machine": machine,
                    "results": results,
                    "runs": runs,
                },
                indent=2,
            )
        )
        return
    print(
        f"{args.preset}, {tokens:,} tokens per step "
        f"({config.batch_size} × {block} × {config.grad_accum}), {machine}"
    )
    for name, result in results.items():
        print(
            f"{name:>10}: {result['tokens_per_s']:>10,.0f} tokens/s "
            f"({result['median_step_s'] * 1000:.0f} ms/step)"
        )
    print(f"trainer / bare loop: {ratio:.2f}×")


if __name__ == "__main__":
    main()

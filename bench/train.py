"""Training speed: our trainer against nanoGPT's own ``model.py`` and training step, same model
shape, same batches, in one run, with the ratio.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT
    python bench/train.py --nanogpt /tmp/nanoGPT/model.py                 # seed, 16 × 128, CPU
    python bench/train.py --nanogpt /tmp/nanoGPT/model.py --device cuda --batch-size 64 --compile

The trainer (``worker.trainer.Trainer``) runs as ``slm train`` does: random windows from the
memmapped ``train.bin``, the LR schedule, clipping, AdamW with decay groups, a report every
--steps steps. The peer is nanoGPT's ``train.py`` step with its ``model.py`` loaded from
--nanogpt: its ``get_batch`` on the same ``train.bin`` (the next batch fetched between forward
and backward), its ``configure_optimizers``, the GradScaler, clipping at 1.0, and ``loss.item()``
every step (its default log_interval of 1). Its vocabulary is padded to 50,304, as nanoGPT does
for GPT-2 tokens. Both use the same dtype, --dtype: ``auto`` is float32 on the CPU (as nanoGPT's
train.py always is there) and bfloat16 (else float16) on a GPU; ``--dtype bfloat16`` autocasts
both on the CPU too.

Each round times --steps steps of each contender after a first window of --steps steps (warm-up,
compilation); the contenders alternate for --repeats rounds, so machine noise hits both alike,
and the figure is the median round. Data: --data, else the TinyStories excerpts in
../shared/data, prepared into a temporary folder. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import math
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from contract.train import TrainConfig, TrainProgress
from model.device import pick_device
from worker.callbacks import TrainCallback
from worker.data import load_split, prepare
from worker.trainer import Trainer, lr_at, resolve_dtype

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
NANOGPT_VOCAB = 50304  # GPT-2's 50,257 padded to a multiple of 64, nanoGPT's default


class ReportTimes(TrainCallback):
    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_progress(self, progress: TrainProgress) -> None:
        self.marks.append(time.perf_counter())


def trainer_step_seconds(config: TrainConfig, data_dir: Path, steps: int) -> float:
    """Seconds per step over the second window of ``steps`` steps (the first warms up; one more
    step at the end evaluates and saves, outside the window)."""
    times = ReportTimes()
    with tempfile.TemporaryDirectory() as run_dir:
        run = config.model_copy(update={"max_steps": 2 * steps + 1, "log_interval": steps})
        Trainer(run, data_dir, Path(run_dir), callbacks=[times]).run()
    return (times.marks[1] - times.marks[0]) / steps


def load_nanogpt(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--nanogpt {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nanogpt_step_seconds(
    nanogpt: ModuleType, config: TrainConfig, data_dir: Path, steps: int
) -> float:
    """nanoGPT's train.py loop, its defaults where this benchmark sets nothing."""
    device = pick_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    shape = config.model()
    block = config.block_size or shape.block_size
    torch.manual_seed(config.seed)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints parameter counts
        # nanoGPT's GPTConfig has our GPTConfig's fields; only the vocabulary is padded.
        fields = {**shape.to_dict(), "vocab_size": NANOGPT_VOCAB}
        model = nanogpt.GPT(nanogpt.GPTConfig(**fields)).to(device)
        optimizer = model.configure_optimizers(
            config.weight_decay, config.lr, (config.beta1, config.beta2), device.type
        )
    forward = torch.compile(model) if config.compile else model
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    autocast = (
        nullcontext()
        if dtype == torch.float32
        else torch.autocast(device_type=device.type, dtype=dtype)
    )
    data = load_split(data_dir, "train")

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(data) - block, (config.batch_size,))
        x = torch.stack([torch.from_numpy(data[i : i + block].astype(np.int64)) for i in ix])
        y = torch.stack(
            [torch.from_numpy(data[i + 1 : i + 1 + block].astype(np.int64)) for i in ix]
        )
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(
                device, non_blocking=True
            )
        return x.to(device), y.to(device)

    max_steps = 2 * steps
    x, y = get_batch()
    started = 0.0
    for step in range(max_steps):
        if step == steps:
            started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config, max_steps)
        for _ in range(config.grad_accum):
            with autocast:
                _, loss = forward(x, y)
                loss = loss / config.grad_accum
            x, y = get_batch()
            scaler.scale(loss).backward()
        if config.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        assert math.isfinite(loss.item() * config.grad_accum)
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="nanoGPT's model.py")
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, help="a prepared data folder")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    nanogpt = load_nanogpt(args.nanogpt)
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
        rounds: dict[str, list[float]] = {"trainer": [], "nanoGPT": []}
        for _ in range(args.repeats):
            rounds["trainer"].append(trainer_step_seconds(config, data_dir, args.steps))
            rounds["nanoGPT"].append(nanogpt_step_seconds(nanogpt, config, data_dir, args.steps))

    block = config.block_size or config.model().block_size
    tokens = config.tokens_per_step(block)
    results = {
        name: {
            "median_step_s": statistics.median(seconds),
            "tokens_per_s": tokens / statistics.median(seconds),
        }
        for name, seconds in rounds.items()
    }
    ratio = results["trainer"]["tokens_per_s"] / results["nanoGPT"]["tokens_per_s"]
    machine = {
        "cpu": platform.processor() or platform.machine(),
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
                    "rounds": rounds,
                    "ratio": ratio,
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
            f"{name:>8}: {result['tokens_per_s']:>10,.0f} tokens/s "
            f"({result['median_step_s'] * 1000:.0f} ms/step; rounds "
            + ", ".join(f"{1000 * s:.0f}" for s in rounds[name])
            + ")"
        )
    print(f"trainer / nanoGPT: {ratio:.2f}×")


if __name__ == "__main__":
    main()

"""The training loop: random windows of the token files → AdamW (or Muon) steps → evals and
checkpoints.

A run folder (``run_dir``) ends up holding::

    step-00001000.{safetensors,json}   the keep_checkpoints newest periodic checkpoints
    best.{safetensors,json}            the checkpoint with the lowest validation loss so far
    latest.json                        the manifest: the checkpoint written last
    train-state.json, state-*.safetensors   what exact resume needs (worker.state)
    history.json, loss.png             evaluations so far, and their curve (worker.history)

What the original notebook got wrong, and this loop does instead: the learning rate follows
warm-up then cosine decay per *optimizer* step (never per micro-batch), ``min_lr`` may not exceed
the peak, weight decay applies to ≥2-D weights only (not biases, LayerNorms), and stories are
separated by ``<|endoftext|>`` in the token files (``worker.data``). A run is as long as
``max_steps``, ``max_tokens`` or a wall-clock budget, ``max_minutes`` (see ``Trainer``).

Between reports (every ``log_interval`` steps, and at evaluations and checkpoints) the loop never
waits for the device: the loss stays a device tensor, and under torchrun the stop flag is
broadcast only then, so a GPU always has the next steps queued. Under ``torchrun`` every process
trains a slice of each batch with DistributedDataParallel; only rank 0 writes files and calls
the callbacks.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from contract.train import LENGTHS, SHAPE_FIELDS, TrainConfig, TrainProgress
from model.checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint
from model.device import pick_device
from model.evaluate import token_byte_lengths
from model.gpt import GPT
from worker.batches import Batches
from worker.callbacks import CallbackList, Evaluation, TrainCallback
from worker.data import load_split
from worker.history import RunHistory, read_history
from worker.optim import Optimizers, build_optimizers
from worker.state import TrainState, has_state, load_state, save_state

BEST = "best"
# Dense bf16/fp16 peak FLOP/s per GPU, for MFU; GPUs not listed get no MFU figure.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


@dataclass(frozen=True)
class TrainResult:
    status: Literal["finished", "stopped"]
    step: int
    max_steps: int
    tokens_seen: int
    best_val_loss: float | None
    last_checkpoint: Path | None
    run_dir: Path


class TrainError(ValueError):
    """Settings, data or a run folder the trainer cannot work with."""


class DiskFull(TrainError):
    """Less free space than the floor where the run writes: nothing more is written."""


def check_free_disk(folder: Path, floor: int, doing: str, writing: int = 0) -> None:
    """Refuse (DiskFull) to write ``writing`` bytes into ``folder`` when that would leave its
    file system fewer than ``floor`` bytes free: a checkpoint that filled the disk would be
    half-written, and the service, Redis and the system beside it would fail too."""
    if floor <= 0:
        return
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    free = shutil.disk_usage(existing).free
    if free - writing < floor:
        about = f" before {writing:,} more" if writing else ""
        raise DiskFull(
            f"{doing}: {free:,} bytes are free where checkpoints go (CHECKPOINT_DIR){about}, "
            f"below the floor of {floor:,} (MIN_FREE_DISK_BYTES); free some space, then resume"
        )


# --- pieces with no state of their own ----------------------------------------------------------


def lr_at(
    step: int,
    config: TrainConfig,
    max_steps: int | None,
    *,
    elapsed_s: float = 0.0,
    warmup_s: float | None = None,
) -> float:
    """The learning rate for optimizer step ``step`` (0-based): linear warm-up to ``lr`` over
    ``warmup_steps``, then cosine decay to ``min_lr`` at ``lr_decay_steps`` (default
    ``max_steps``), then ``min_lr``.

    When the schedule runs on the clock (``config.decay_seconds()``: max_minutes,
    lr_decay_minutes) the cosine instead spans the seconds from the end of the warm-up
    (``warmup_s``) to the decay's end, by the training time elapsed (``elapsed_s``)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_s = config.decay_seconds()
    if decay_s is not None:
        start = warmup_s or 0.0
        if elapsed_s >= decay_s:
            return config.min_lr
        progress = min(1.0, max(0.0, (elapsed_s - start) / max(1e-9, decay_s - start)))
        return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (
            config.lr - config.min_lr
        )
    decay_steps = config.lr_decay_steps or max_steps or 0
    if step >= decay_steps:
        return config.min_lr
    progress = (step - config.warmup_steps) / max(1, decay_steps - config.warmup_steps)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        if name == "float16":
            raise TrainError("dtype float16 needs a CUDA GPU (it trains with a GradScaler there)")
        return torch.bfloat16 if name == "bfloat16" else torch.float32
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, name)


# --- the trainer --------------------------------------------------------------------------------


class Trainer:
    """One training run. ``run()`` trains until ``max_steps``, or until a callback's
    ``should_stop()`` says so (asked after every step, at reports only under torchrun; the run
    then saves a checkpoint, reports, and returns ``stopped``). The run folder's history.json
    and loss.png are kept by a callback of the trainer's own (``worker.history.RunHistory``),
    called before ``callbacks``.

    With ``max_minutes`` the clock ends the run instead: it trains until that much wall time
    has passed since training started (set-up excluded, evaluations and checkpoints included),
    then evaluates and saves a checkpoint (after the budget: the last step is the one that ends
    past it). The warm-up stays ``warmup_steps`` steps; then the cosine runs on elapsed time,
    from the warm-up's end to the budget's (``lr_at``). Evaluations and checkpoints still come
    every ``eval_interval`` / ``checkpoint_interval`` steps. While it runs, progress reports
    estimate ``max_steps`` (steps done / time elapsed × budget) and give the budget's remaining
    time as ``eta_s``. Under torchrun every process follows rank 0's clock, heard at each stop
    check and extrapolated by steps in between, so all agree on the learning rate and the last
    step. The training time is part of the training state: a stopped run resumes with the rest
    of its budget, and ``--max-minutes`` extends it; but since the schedule and the last step
    depend on wall time, such a resume continues the run without being bitwise the run that
    was never stopped (step budgets are).

    A ``run_dir`` that already holds a training state is resumed exactly (model, optimizer,
    schedule, GradScaler, every RNG, data position), provided ``config`` is the one it was
    started with. ``init_from`` fine-tunes: the weights of that checkpoint, a fresh schedule.

    Set-up, in order: the processes and device, the model (resumed, fine-tuned or new), the
    optimizer, the data, the counters (restored on resume), the wrapped model (compile, DDP)."""

    def __init__(
        self,
        config: TrainConfig,
        data_dir: Path,
        run_dir: Path,
        *,
        init_from: Path | None = None,
        callbacks: Sequence[TrainCallback] = (),
        min_free_disk_bytes: int = 0,
    ) -> None:
        if importlib.util.find_spec("matplotlib") is None:  # needed at the first eval: fail now
            raise TrainError("training draws loss.png with matplotlib: pip install 'slm[worker]'")
        self.config, self.data_dir, self.run_dir = config, Path(data_dir), Path(run_dir)
        self.min_free_disk_bytes = min_free_disk_bytes
        self._setup_processes()
        self.callbacks = CallbackList([RunHistory(self.run_dir), *callbacks] if self.master else [])

        resumed = load_state(self.run_dir) if has_state(self.run_dir) else None
        self.model = self._restore_or_init(resumed, init_from).to(self.device)
        # None under max_minutes: the clock (``_budget_spent``) ends the run.
        self.max_steps = self.config.total_steps(self.block_size, self.world_size)
        self.budget_s = self.config.max_minutes * 60 if self.config.max_minutes else None
        self.tokens_per_step = config.tokens_per_step(self.block_size, self.world_size)
        self.optimizer, self.scaler = self._optimizer()

        # A prepared dataset holds GPT-2's ids; a vocabulary with fewer merges reads them remapped.
        vocab_size = self.model.config.vocab_size
        self.train_tokens = load_split(self.data_dir, "train", vocab_size=vocab_size)
        self.val_tokens = load_split(self.data_dir, "val", vocab_size=vocab_size)
        self.batches = self._batches(self.train_tokens, torch.Generator().manual_seed(config.seed))
        # Dropout masks must differ between processes, and follow on from the weights' seed.
        torch.manual_seed(config.seed + self.rank)

        self.step, self.tokens_seen = 0, 0
        self.best_val_loss: float | None = None
        self.last_checkpoint: Path | None = None
        self.history: list[Evaluation] = []
        self.elapsed_s, self.warmup_s = 0.0, None  # training time so far; when warm-up ended
        if resumed is not None:
            self._restore(resumed)
        self.forward_model, self.train_model = self._wrap(self.model)

    # --- set-up ---------------------------------------------------------------------------------

    def _setup_processes(self) -> None:
        """Rank, device and dtype; the process group under torchrun, unless one exists."""
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.master = self.rank == 0
        try:
            self.device = pick_device(self.config.device, int(os.environ.get("LOCAL_RANK", 0)))
        except ValueError as error:
            raise TrainError(str(error)) from None
        self.dtype = resolve_dtype(self.config.dtype, self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._owns_process_group = self.world_size > 1 and not dist.is_initialized()
        if self._owns_process_group:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def _restore_or_init(self, resumed: TrainState | None, init_from: Path | None) -> GPT:
        """The model to train: the resumed run's last checkpoint, the checkpoint to fine-tune,
        or new weights from the seed; also fixes the window length (``block_size``)."""
        weights = init_from
        if resumed is not None:
            extended = self._check_resumable(resumed)
            weights = self.run_dir / f"{resumed.checkpoint}.json"
            init_from = Path(resumed.init_from) if resumed.init_from else None
        self.init_from = init_from
        torch.manual_seed(self.config.seed)
        model = GPT(self.config.model()) if weights is None else self._loaded_model(weights)
        self.block_size = self.config.block_size or model.config.block_size
        if self.block_size > model.config.block_size:
            raise TrainError(
                f"block_size {self.block_size} exceeds the {model.config.block_size} "
                f"positions of the checkpoint {weights}"
            )
        if resumed is not None and extended:
            self._extend(resumed)
        return model

    def _extend(self, state: TrainState) -> None:
        """A resumed run given a new length (max_steps, max_tokens or max_minutes) keeps its
        learning-rate schedule: the cosine still ends where it was planned to (in steps, or in
        minutes for a run whose schedule ran on the clock), and what follows runs at min_lr; a
        later resume of the same run keeps that."""
        saved = TrainConfig.from_saved(state.config)
        decay_s = saved.decay_seconds()
        if decay_s is not None:
            self.config = self.config.model_copy(update={"lr_decay_minutes": decay_s / 60})
        else:
            planned = saved.lr_decay_steps or saved.total_steps(self.block_size, self.world_size)
            self.config = self.config.model_copy(update={"lr_decay_steps": planned})
        if self.config.max_minutes is not None:
            if self.config.max_minutes * 60 <= state.elapsed_s:
                raise TrainError(
                    f"{self.run_dir} has trained {state.elapsed_s / 60:.2f} minutes: to extend "
                    f"it, ask for more than that (now max_minutes {self.config.max_minutes})"
                )
            return
        total = self.config.total_steps(self.block_size, self.world_size)
        if total <= state.step:
            raise TrainError(
                f"{self.run_dir} is at step {state.step}: to extend it, ask for more steps "
                f"than that (now {total})"
            )

    def _loaded_model(self, path: Path) -> GPT:
        loaded, meta = load_checkpoint(path)
        wanted = self.config.model_block_size
        if wanted is not None and wanted != meta.config.block_size:
            raise TrainError(
                f"model_block_size {wanted} cannot change the {meta.config.block_size} "
                f"positions of the checkpoint {path}"
            )
        # The weights fix the network: an override may only repeat what the checkpoint has.
        changed = [
            f"{name} {getattr(self.config, name)} (it has {getattr(meta.config, name)})"
            for name in SHAPE_FIELDS
            if getattr(self.config, name) not in (None, getattr(meta.config, name))
        ]
        if changed:
            raise TrainError(
                f"fine-tuning cannot change the shape of the checkpoint {path}: "
                f"{', '.join(changed)}; leave these settings unset"
            )
        # A fresh module with this run's dropout, holding the checkpoint's (fp32) weights.
        model = GPT(meta.config.replace(dropout=self.config.dropout))
        model.load_state_dict(loaded.state_dict())
        return model

    def _optimizer(self) -> tuple[Optimizers, torch.amp.GradScaler]:
        """AdamW, or Muon beside it (``worker.optim``), and the float16 GradScaler."""
        optimizer = build_optimizers(self.model, self.config, self.device)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        return optimizer, scaler

    def _batches(self, tokens: np.ndarray, generator: torch.Generator) -> Batches:
        try:
            return Batches(
                tokens,
                self.config.batch_size,
                self.block_size,
                generator,
                self.device,
                self.rank,
                self.world_size,
            )
        except ValueError as error:
            raise TrainError(str(error)) from None

    def _wrap(self, model: GPT) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The model as evaluation calls it (compiled if asked) and as training calls it (also
        wrapped in DDP under torchrun)."""
        forward: torch.nn.Module = torch.compile(model) if self.config.compile else model
        if self.world_size == 1:
            return forward, forward
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return forward, DistributedDataParallel(forward, device_ids=device_ids)

    def _check_resumable(self, state: TrainState) -> bool:
        """Refuse a resume that would not continue the same run; True when it extends the run
        (only its length changed)."""
        saved = TrainConfig.from_saved(state.config).model_dump()
        if self.config.lr_decay_steps is None and saved["lr_decay_steps"] is not None:
            # A run extended before keeps the schedule it was given then (see _extend).
            self.config = self.config.model_copy(update={"lr_decay_steps": saved["lr_decay_steps"]})
        if self.config.lr_decay_minutes is None and saved.get("lr_decay_minutes") is not None:
            self.config = self.config.model_copy(
                update={"lr_decay_minutes": saved["lr_decay_minutes"]}
            )
        given = self.config.model_dump()
        changed = {k for k in given.keys() | saved.keys() if given.get(k) != saved.get(k)}
        # A resumed run may change how long it trains (its schedule stays, see _extend).
        extended = bool(changed) and changed <= set(LENGTHS)
        if changed and not extended:
            raise TrainError(
                f"{self.run_dir} holds a run started with other settings "
                f"({', '.join(sorted(changed))}); resume it with its own settings (`slm train "
                f"--resume {self.run_dir}`, which may raise --max-steps, --max-tokens or "
                f"--max-minutes) or "
                f"train into a new folder"
            )
        if state.world_size != self.world_size:
            raise TrainError(
                f"{self.run_dir} was trained by {state.world_size} processes; resume it with "
                f"the same number for an exact continuation (now {self.world_size})"
            )
        return extended

    def _restore(self, state: TrainState) -> None:
        self.optimizer.load_state_dict(state.optimizer)
        self.scaler.load_state_dict(state.scaler)
        self.batches.restore(state.rng["data"])
        torch.set_rng_state(state.rng[f"torch.{self.rank}"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state.rng[f"cuda.{self.rank}"], self.device)
        self.step, self.tokens_seen = state.step, state.tokens_seen
        self.elapsed_s, self.warmup_s = state.elapsed_s, state.warmup_s
        self.best_val_loss = state.best_val_loss
        self.last_checkpoint = self.run_dir / f"{state.checkpoint}.json"
        self.history = read_history(self.run_dir, self.step)

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # --- the loop -------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        try:
            return self._run()
        finally:
            if self._owns_process_group:
                dist.destroy_process_group()

    def _run(self) -> TrainResult:
        self.model.train()
        # The training clock: set-up excluded, a resumed run's earlier training included.
        self._started = time.perf_counter() - self.elapsed_s
        self._synced = (self.step, self.elapsed_s, 0.0)  # torchrun: step, seconds, s/step
        if self.budget_s is None:
            length = f"step {self.step} of {self.max_steps}"
        else:
            length = (
                f"step {self.step}, {self.elapsed_s / 60:.2f} of a {self.budget_s / 60:g}-minute "
                f"budget"
            )
        self.callbacks.log(
            f"training {self.model.num_parameters():,} parameters on {self.device} "
            f"({str(self.dtype).removeprefix('torch.')}, {self.world_size} process(es)): "
            f"{length}, {self.tokens_per_step:,} tokens per step"
        )
        latest = self.history[-1] if self.history else {}
        val_loss, val_bits_per_byte = latest.get("val_loss"), latest.get("val_bits_per_byte")
        self.callbacks.on_start(
            self._progress(val_loss=val_loss, val_bits_per_byte=val_bits_per_byte)
        )
        losses = torch.zeros((), device=self.device)  # summed on the device between reports
        since_report, reported_at = 0, time.perf_counter()
        done = self._budget_spent()
        while not done:
            lr = self._lr()
            losses += self._optimizer_step(lr)
            self.step += 1
            self.tokens_seen += self.tokens_per_step
            since_report += 1

            interval = self.config.checkpoint_interval
            periodic = bool(interval and self.step % interval == 0)
            logged = self.step % self.config.log_interval == 0
            due_eval = self.step % self.config.eval_interval == 0
            # Under torchrun this is also where every process hears rank 0's clock.
            stop = self._stop_requested(due_eval or periodic or logged)
            done = last = self._budget_spent()
            evaluate = due_eval or last
            checkpoint = periodic or last
            report = evaluate or checkpoint or logged
            if not (report or stop):
                continue

            # A report: the one place the loop waits for the device.
            train_loss = (losses / since_report).item()
            seconds_per_step = (time.perf_counter() - reported_at) / since_report
            tokens_per_s = self.tokens_per_step / seconds_per_step
            if logged:
                self.callbacks.log(
                    f"step {self._where()} | loss {train_loss:.4f} | lr {lr:.2e} | "
                    f"{tokens_per_s:,.0f} tokens/s{self._mfu(tokens_per_s)}"
                )
            evaluated = None
            if evaluate:
                evaluated = self._evaluate(lr)
                val_loss = evaluated["val_loss"]
                val_bits_per_byte = evaluated["val_bits_per_byte"]
            if checkpoint or stop:
                self._save(evaluated)
            if self.budget_s is None:
                eta_s = (self.max_steps - self.step) * seconds_per_step
            else:
                eta_s = 0.0 if last else max(0.0, self.budget_s - self._elapsed())
            self.callbacks.on_progress(
                self._progress(
                    final=last,
                    train_loss=train_loss,
                    val_loss=val_loss,
                    val_bits_per_byte=val_bits_per_byte,
                    lr=lr,
                    tokens_per_s=tokens_per_s,
                    eta_s=eta_s,
                )
            )
            if stop:
                self.callbacks.log(
                    f"stopped at step {self.step}; checkpoint {self.last_checkpoint}"
                )
                return self._result("stopped")
            losses.zero_()
            since_report, reported_at = 0, time.perf_counter()
        if self.budget_s is not None:
            self.max_steps = self.step  # a budget's last step is known only now
        return self._result("finished")

    # --- the clock (max_minutes) ----------------------------------------------------------------

    def _clock(self) -> float:
        """Seconds of training this process has seen, earlier sessions of the run included."""
        return time.perf_counter() - self._started

    def _elapsed(self) -> float:
        """The training time every process agrees on: this process's clock alone; under
        torchrun rank 0's, as heard at the last stop check, plus the steps since at the rate of
        the interval before it (so every process computes the same learning rate and ends at
        the same step, without a broadcast per step)."""
        if self.world_size == 1:
            return self._clock()
        step, seconds, rate = self._synced
        return seconds + (self.step - step) * rate

    def _budget_spent(self) -> bool:
        if self.budget_s is None:
            return self.step >= self.max_steps
        return self._elapsed() >= self.budget_s

    def _lr(self) -> float:
        elapsed = self._elapsed()
        if self.warmup_s is None and self.step >= self.config.warmup_steps:
            self.warmup_s = elapsed  # the clock's cosine starts here
        return lr_at(
            self.step, self.config, self.max_steps, elapsed_s=elapsed, warmup_s=self.warmup_s
        )

    def _where(self) -> str:
        if self.budget_s is None:
            return f"{self.step}/{self.max_steps}"
        return f"{self.step} ({self._elapsed() / 60:.2f}/{self.budget_s / 60:g} min)"

    def _progress(self, final: bool = False, **measured: float | None) -> TrainProgress:
        max_steps = self.max_steps
        if self.budget_s is not None:  # an estimate: steps so far at the pace so far
            elapsed = self._elapsed()
            if final:
                max_steps = self.step
            elif self.step and elapsed > 0:
                max_steps = max(self.step + 1, round(self.step * self.budget_s / elapsed))
        return TrainProgress(
            step=self.step,
            max_steps=max_steps,
            tokens_seen=self.tokens_seen,
            last_checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
            **measured,
        )

    def _optimizer_step(self, lr: float) -> Tensor:
        """One optimizer step; its loss (the mean over its micro-batches) stays on the device."""
        self.optimizer.set_lr(lr / self.config.lr)  # each optimizer from its own peak
        accum = self.config.grad_accum
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y = self.batches.next()
            # Gradients are all-reduced once per optimizer step, on the last micro-batch.
            last = micro == accum - 1
            sync = self.train_model.no_sync() if self.world_size > 1 and not last else nullcontext()
            with sync:
                with self._autocast():
                    _, loss = self.train_model(x, y)
                self.batches.prefetch()  # gathered while the device runs the forward pass
                total += loss.detach()
                # The mean over ``accum`` micro-batches, as if they were one large batch.
                self.scaler.scale(loss / accum).backward()
        if self.config.grad_clip:
            self.optimizer.unscale_(self.scaler)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step(self.scaler)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total / accum

    def _stop_requested(self, report: bool) -> bool:
        """Asked after every step of one process (no device sync: the callbacks answer from
        the host); under torchrun only at reports, since every process must hear rank 0's answer
        and leave the loop at the same step."""
        if self.world_size == 1:
            return self.callbacks.should_stop()
        if not report:
            return False
        stop = self.master and self.callbacks.should_stop()
        flag = torch.tensor([float(stop), self._clock()], dtype=torch.float64, device=self.device)
        dist.broadcast(flag, src=0)
        stop_flag, seconds = flag.tolist()
        step, before, rate = self._synced
        if self.step > step:
            rate = (seconds - before) / (self.step - step)
        self._synced = (self.step, seconds, rate)
        return bool(stop_flag)

    def _mfu(self, tokens_per_s: float) -> str:
        if self.device.type != "cuda":
            return ""
        name = torch.cuda.get_device_name(self.device)
        peak = next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)
        if peak is None:
            return ""
        config = self.model.config
        # PaLM's estimate: 6 FLOPs per parameter per token, plus attention over the window.
        per_token = 6 * self.model.num_parameters() + 12 * config.n_layer * config.n_embd * (
            self.block_size
        )
        return f" | MFU {100 * tokens_per_s * per_token / (peak * self.world_size):.1f}%"

    # --- evaluation -----------------------------------------------------------------------------

    @torch.no_grad()
    def _evaluate(self, lr: float) -> Evaluation:
        """Mean loss over ``eval_iters`` batches of each split, the same windows every time (a
        generator of their own, so evaluating never moves the training data position)."""
        self.model.eval()
        byte_lengths = token_byte_lengths(self.model.config.vocab_size).to(self.device)
        metrics: Evaluation = {"step": self.step, "tokens_seen": self.tokens_seen, "lr": lr}
        for split, tokens in (("train", self.train_tokens), ("val", self.val_tokens)):
            batches = self._batches(tokens, torch.Generator().manual_seed(self.config.seed + 1))
            totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # nats, bytes, count
            for _ in range(self.config.eval_iters):
                x, y = batches.next()
                with self._autocast():
                    _, loss = self.forward_model(x, y)
                totals[0] += loss.double() * y.numel()
                totals[1] += byte_lengths[y].sum()
                totals[2] += y.numel()
            if self.world_size > 1:
                dist.all_reduce(totals)
            nats, n_bytes, count = totals.tolist()
            metrics[f"{split}_loss"] = nats / count
            metrics[f"{split}_bits_per_byte"] = nats / (math.log(2) * n_bytes)
        metrics["val_perplexity"] = math.exp(metrics["val_loss"])
        self.model.train()
        self.history.append(metrics)
        self.callbacks.log(
            f"eval step {self.step}: train loss {metrics['train_loss']:.4f}, val loss "
            f"{metrics['val_loss']:.4f}, val perplexity {metrics['val_perplexity']:.2f}, "
            f"val {metrics['val_bits_per_byte']:.3f} bits/byte"
        )
        self.callbacks.on_evaluation(self.history)
        if self.best_val_loss is None or metrics["val_loss"] < self.best_val_loss:
            self.best_val_loss = metrics["val_loss"]
            if self.master:
                self._checkpoint(metrics, name=BEST, latest=False)
        return metrics

    # --- checkpoints and state ------------------------------------------------------------------

    def _checkpoint(
        self, metrics: Evaluation | None, name: str | None = None, latest: bool = True
    ) -> Path:
        """Save the model; ``latest=False`` for the best-so-far copy, which neither moves the
        run's manifest nor is announced: services follow the periodic checkpoints."""
        last = self.last_checkpoint.stem if self.last_checkpoint else "none"
        # What a checkpoint writes at most: its weights, and the training state beside them
        # (the weights again and the optimizer's two moments).
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        check_free_disk(
            self.run_dir,
            self.min_free_disk_bytes,
            f"the checkpoint of step {self.step} was not written (the last one, {last}, is whole)",
            writing=4 * weights,
        )
        metrics = metrics or (self.history[-1] if self.history else {})
        path = save_checkpoint(
            self.run_dir,
            self.model,
            step=self.step,
            tokens_seen=self.tokens_seen,
            train_loss=metrics.get("train_loss"),
            val_loss=metrics.get("val_loss"),
            name=name,
            manifest=latest,
            extra={
                "train_config": self.config.model_dump(),
                "eval": metrics,
                "init_from": str(self.init_from) if self.init_from else None,
            },
        )
        self.callbacks.log(f"saved {path}")
        if latest:
            self.callbacks.on_checkpoint(path)
        return path

    def _save(self, metrics: Evaluation | None) -> None:
        """A periodic checkpoint and, beside it, the training state that resumes from it."""
        rng = {"data": self.batches.position()}
        for kind, state in self._rng_states().items():
            for rank, tensor in enumerate(self._gather(state)):
                rng[f"{kind}.{rank}"] = tensor
        if not self.master:
            return
        self.last_checkpoint = self._checkpoint(metrics)
        save_state(
            self.run_dir,
            TrainState(
                step=self.step,
                tokens_seen=self.tokens_seen,
                best_val_loss=self.best_val_loss,
                checkpoint=self.last_checkpoint.stem,
                config=self.config.model_dump(),
                data_dir=str(self.data_dir),
                init_from=str(self.init_from) if self.init_from else None,
                world_size=self.world_size,
                optimizer=self.optimizer.state_dict(),
                scaler=self.scaler.state_dict(),
                rng=rng,
                elapsed_s=self._clock(),
                warmup_s=self.warmup_s,
            ),
        )
        # Only now: the training state names this checkpoint, so a resume never needs an older one.
        prune_checkpoints(self.run_dir, self.config.keep_checkpoints)

    def _rng_states(self) -> dict[str, Tensor]:
        states = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        return states

    def _gather(self, tensor: Tensor) -> list[Tensor]:
        """Every process's copy of ``tensor`` (same shape everywhere), on the CPU."""
        if self.world_size == 1:
            return [tensor]
        local = tensor.to(self.device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return [part.cpu() for part in parts]

    def _result(self, status: Literal["finished", "stopped"]) -> TrainResult:
        return TrainResult(
            status=status,
            step=self.step,
            max_steps=self.max_steps,
            tokens_seen=self.tokens_seen,
            best_val_loss=self.best_val_loss,
            last_checkpoint=self.last_checkpoint,
            run_dir=self.run_dir,
        )


def train(
    config: TrainConfig,
    data_dir: Path,
    run_dir: Path,
    *,
    init_from: Path | None = None,
    callbacks: Sequence[TrainCallback] = (),
    min_free_disk_bytes: int = 0,
) -> TrainResult:
    """Train (or resume, when ``run_dir`` holds a training state); see ``Trainer``. Below
    ``min_free_disk_bytes`` free beside ``run_dir`` no checkpoint is written: DiskFull."""
    trainer = Trainer(
        config,
        data_dir,
        run_dir,
        init_from=init_from,
        callbacks=callbacks,
        min_free_disk_bytes=min_free_disk_bytes,
    )
    return trainer.run()

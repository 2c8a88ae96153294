"""How a training run talks to the code around it: one callbacks object, as Hugging Face's and
Lightning's trainers take, instead of a keyword argument per hook.

The trainer calls its callbacks on rank 0 only (under torchrun rank 0 also decides for every
process when to stop), mostly at its reports: every ``log_interval`` steps and at each evaluation
and checkpoint. The CLI's progress bar and Ctrl-C, a job's progress in Redis and its stop key,
and the run folder's loss curve (``worker.history``) are all callbacks.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from contract.train import TrainProgress

# One evaluation as history.json keeps it: step, tokens_seen, lr, {train,val}_loss,
# {train,val}_bits_per_byte, val_perplexity.
Evaluation = dict[str, Any]


class TrainCallback:
    """Override what you need; every hook does nothing by default."""

    def log(self, message: str) -> None:
        """A line for a person: the start, every log_interval steps, evaluations, saves."""

    def on_start(self, progress: TrainProgress) -> None:
        """Before the first step: where the run starts (step 0, or the step a resumed run's
        checkpoint holds) and where it ends."""

    def on_progress(self, progress: TrainProgress) -> None:
        """At every report, after its evaluation and checkpoint if it has them."""

    def on_evaluation(self, history: Sequence[Evaluation]) -> None:
        """After each evaluation, with every evaluation of the run so far (resumed runs
        included), the newest last."""

    def on_checkpoint(self, path: Path) -> None:
        """A periodic checkpoint is complete on disk and the run's manifest names it (``path``
        is its metadata file); the best-so-far copy is not announced."""

    def should_stop(self) -> bool:
        """Asked after every step (under torchrun only at reports, where rank 0's answer is
        broadcast); True ends the run there, after a checkpoint. Answer from the host: it is
        asked often."""
        return False


class CallbackList(TrainCallback):
    """Several callbacks as one, called in order."""

    def __init__(self, callbacks: Iterable[TrainCallback]) -> None:
        self.callbacks = list(callbacks)

    def log(self, message: str) -> None:
        for callback in self.callbacks:
            callback.log(message)

    def on_start(self, progress: TrainProgress) -> None:
        for callback in self.callbacks:
            callback.on_start(progress)

    def on_progress(self, progress: TrainProgress) -> None:
        for callback in self.callbacks:
            callback.on_progress(progress)

    def on_evaluation(self, history: Sequence[Evaluation]) -> None:
        for callback in self.callbacks:
            callback.on_evaluation(history)

    def on_checkpoint(self, path: Path) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint(path)

    def should_stop(self) -> bool:
        # Every callback is asked: one that polls (a job's stop key) may also watch other things.
        return any([callback.should_stop() for callback in self.callbacks])


class ProgressBar(TrainCallback):
    """``slm train``'s terminal: a tqdm bar on stderr, log lines printed above it; ``quiet``
    shows neither. Use it as a context manager, so the bar closes however the run ends."""

    def __init__(self, quiet: bool = False) -> None:
        from tqdm import tqdm

        self.quiet = quiet
        self.bar = tqdm(desc="training", unit="step", file=sys.stderr, disable=quiet)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.bar.close()

    def log(self, message: str) -> None:
        if not self.quiet:
            self.bar.write(message, file=sys.stderr)

    def on_start(self, progress: TrainProgress) -> None:
        self.bar.reset(total=progress.max_steps)
        self.bar.update(progress.step)

    def on_progress(self, progress: TrainProgress) -> None:
        # Under max_minutes the total is an estimate that moves (None before the first report).
        if progress.max_steps != self.bar.total:
            self.bar.total = progress.max_steps
        loss, rate = progress.train_loss, progress.tokens_per_s
        self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
        self.bar.update(progress.step - self.bar.n)


class StopOnInterrupt(TrainCallback):
    """Ctrl-C as a stop request, as a job's Stop is: the run saves a checkpoint after the step in
    progress and returns ``stopped``; a second Ctrl-C aborts at once (KeyboardInterrupt). A
    context manager: SIGINT's handler is installed on entry and put back on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StopOnInterrupt:
        self._previous = signal.signal(signal.SIGINT, self._interrupted)
        return self

    def __exit__(self, *exc_info: object) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _interrupted(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nstopping: a checkpoint is saved after this step (Ctrl-C again aborts)",
            file=sys.stderr,
            flush=True,
        )

    def should_stop(self) -> bool:
        return self.requested

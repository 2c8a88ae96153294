"""A run's evaluations on disk: ``history.json`` (every evaluation so far) and ``loss.png`` (their
curve), rewritten atomically after each evaluation by the ``RunHistory`` callback, and read back
when a run resumes."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

from model.atomic import atomic_write_bytes
from worker.callbacks import Evaluation, TrainCallback

HISTORY = "history.json"
LOSS_PLOT = "loss.png"


class RunHistory(TrainCallback):
    """The run folder's history.json and loss.png, which the trainer always keeps."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def on_evaluation(self, history: Sequence[Evaluation]) -> None:
        document = json.dumps({"evals": list(history)}, indent=2)
        atomic_write_bytes(self.run_dir / HISTORY, document.encode())
        atomic_write_bytes(self.run_dir / LOSS_PLOT, loss_plot(history))


def read_history(run_dir: Path, up_to_step: int) -> list[Evaluation]:
    """The evaluations a resumed run keeps: those up to the step its checkpoint holds (a run
    that crashed after evaluating, before saving, evaluates those steps again)."""
    path = run_dir / HISTORY
    if not path.is_file():
        return []
    evals = json.loads(path.read_bytes())["evals"]
    return [entry for entry in evals if entry["step"] <= up_to_step]


def loss_plot(history: Sequence[Evaluation]) -> bytes:
    """A PNG of train and validation loss against step, with val loss also in bits per byte
    on the right (the val windows are the same at every evaluation, so the two scales differ by
    one factor; bits per byte compare across vocabularies, nats per token do not)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory
    from matplotlib import pyplot as plt

    steps = [entry["step"] for entry in history]
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    axes.plot(steps, [entry["train_loss"] for entry in history], marker=".", label="train")
    axes.plot(steps, [entry["val_loss"] for entry in history], marker=".", label="val")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats/token)")
    axes.grid(alpha=0.3)
    axes.legend()
    last = history[-1] if history else {}
    if last.get("val_bits_per_byte") and last.get("val_loss"):
        per_nat = last["val_bits_per_byte"] / last["val_loss"]
        right = axes.secondary_yaxis(
            "right", functions=(lambda nats: nats * per_nat, lambda bits: bits / per_nat)
        )
        right.set_ylabel("val bits per byte")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()

"""The training state that exact resume needs, saved without pickle.

Beside a run's model checkpoints the trainer keeps::

    state-00000100.safetensors  optimizer moments and step counters, every process's RNG states,
                                the batch sampler's torch.Generator state
    train-state.json            step, tokens seen, the optimizer's param_groups, the GradScaler,
                                the config, the model checkpoint that holds the weights, and the
                                sha256 of the tensors file; written last

Tensors go through safetensors and everything else through JSON, so resuming, like loading a
checkpoint, never unpickles anything. Each file is written atomically and the JSON last, pointing
at a tensors file named for its step: a crash between the writes leaves the previous state whole.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from model.atomic import atomic_write_bytes

STATE_JSON = "train-state.json"
FORMAT_VERSION = 1
_OPTIMIZER = "optimizer"
_TUPLES = {"betas", "ns_coefficients"}  # optimizer settings that are tuples


class StateError(ValueError):
    """A training state that is missing, damaged or does not fit the run being resumed."""


@dataclass(frozen=True)
class TrainState:
    step: int
    tokens_seen: int
    best_val_loss: float | None
    checkpoint: str  # the model checkpoint (in the same folder) holding the weights at ``step``
    config: dict[str, Any]  # TrainConfig.model_dump()
    data_dir: str
    init_from: str | None  # the checkpoint a fine-tuning run started from
    world_size: int
    optimizer: dict[str, Any]  # torch's optimizer state_dict
    scaler: dict[str, Any]
    rng: dict[str, torch.Tensor]  # name → uint8 state tensor
    # Seconds of training so far (set-up excluded), and when the warm-up ended: a max_minutes
    # run resumes with the rest of its budget and its schedule. States written before: 0, None.
    elapsed_s: float = 0.0
    warmup_s: float | None = None


def has_state(run_dir: Path) -> bool:
    return (Path(run_dir) / STATE_JSON).is_file()


def save_state(run_dir: Path, state: TrainState) -> None:
    run_dir = Path(run_dir)
    tensors = {f"rng.{name}": value.contiguous() for name, value in state.rng.items()}
    moments: dict[str, Any] = {}
    for index, values in state.optimizer["state"].items():
        for key, value in values.items():
            if not isinstance(value, torch.Tensor):
                raise StateError(f"optimizer state {index}.{key} is not a tensor: {value!r}")
            tensors[f"{_OPTIMIZER}.{index}.{key}"] = value.detach().to("cpu").contiguous()
        moments[str(index)] = sorted(values)
    data = safetensors.torch.save(tensors)
    tensors_file = f"state-{state.step:08d}.safetensors"
    previous = _read_json(run_dir) if has_state(run_dir) else None
    atomic_write_bytes(run_dir / tensors_file, data)
    meta = {
        "format_version": FORMAT_VERSION,
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "best_val_loss": state.best_val_loss,
        "checkpoint": state.checkpoint,
        "config": state.config,
        "data_dir": state.data_dir,
        "init_from": state.init_from,
        "world_size": state.world_size,
        "param_groups": state.optimizer["param_groups"],
        "moments": moments,
        "scaler": state.scaler,
        "elapsed_s": state.elapsed_s,
        "warmup_s": state.warmup_s,
        "tensors_file": tensors_file,
        "tensors_sha256": hashlib.sha256(data).hexdigest(),
    }
    atomic_write_bytes(run_dir / STATE_JSON, (json.dumps(meta, indent=2) + "\n").encode())
    if previous and previous["tensors_file"] != tensors_file:
        (run_dir / previous["tensors_file"]).unlink(missing_ok=True)


def _read_json(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_JSON
    try:
        meta = json.loads(path.read_bytes())
    except (OSError, ValueError) as error:
        raise StateError(f"cannot read the training state {path}: {error}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise StateError(f"{path} is not a training state this version of slm wrote")
    name = meta.get("tensors_file")
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
        raise StateError(f"{path}: tensors_file must be a plain .safetensors name, got {name!r}")
    return meta


def load_state(run_dir: Path) -> TrainState:
    run_dir = Path(run_dir)
    meta = _read_json(run_dir)
    path = run_dir / meta["tensors_file"]
    try:
        data = path.read_bytes()
    except OSError as error:
        raise StateError(f"cannot read {path}: {error}") from None
    if hashlib.sha256(data).hexdigest() != meta["tensors_sha256"]:
        raise StateError(f"{path} does not match the sha256 in {STATE_JSON}: it is damaged")
    try:
        tensors = safetensors.torch.load(data)
        rng = {
            key.removeprefix("rng."): value
            for key, value in tensors.items()
            if key.startswith("rng.")
        }
        optimizer_state = {
            int(index): {key: tensors[f"{_OPTIMIZER}.{index}.{key}"] for key in keys}
            for index, keys in meta["moments"].items()
        }
        # JSON turns AdamW's betas and Muon's ns_coefficients tuples into lists; give the
        # optimizer back what it made.
        groups = [
            {key: tuple(value) if key in _TUPLES else value for key, value in group.items()}
            for group in meta["param_groups"]
        ]
        return TrainState(
            step=meta["step"],
            tokens_seen=meta["tokens_seen"],
            best_val_loss=meta["best_val_loss"],
            checkpoint=meta["checkpoint"],
            config=meta["config"],
            data_dir=meta["data_dir"],
            init_from=meta["init_from"],
            world_size=meta["world_size"],
            optimizer={"state": optimizer_state, "param_groups": groups},
            scaler=meta["scaler"],
            rng=rng,
            elapsed_s=float(meta.get("elapsed_s", 0.0)),
            warmup_s=meta.get("warmup_s"),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise StateError(f"{run_dir / STATE_JSON} is incomplete: {error!r}") from None

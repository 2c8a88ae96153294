"""Checkpoints: weights in safetensors, metadata in JSON, and a ``latest.json`` manifest.

A run folder looks like this::

    step-00000100.safetensors   the weights (a tied lm_head.weight is stored once, as wte)
    step-00000100.json          CheckpointMeta: config, step, losses, sha256 of the weights...
    latest.json                 {"format_version": 1, "name": "step-00000100", "created_at": ...}

The trainer writes into the folder while the inference service reads from it, so every file is
written atomically and in that order: a reader that follows the manifest only ever finds complete
checkpoints. Everything in the folder is treated as untrusted input: names must be plain file
names, JSON is validated strictly, and weights are parsed by safetensors, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from model.atomic import atomic_write_bytes, remove_stale_temporaries
from model.config import GPTConfig
from model.gpt import GPT

FORMAT_VERSION = 1
MANIFEST = "latest.json"
WEIGHTS_SUFFIX = ".safetensors"
# A tied lm_head.weight is the token embedding: it is stored under the embedding's name only.
TIED_NAME, STORED_NAME = "lm_head.weight", "transformer.wte.weight"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# A plain file name: no folders, no "..", no hidden files, nothing a shell would trip on.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# The names save_checkpoint gives periodic checkpoints; anything else (``best``) is never pruned.
_PERIODIC = re.compile(r"step-(\d{8,})")
# Retention in the trainer may delete the checkpoint a reader is halfway through; the reader
# then follows the manifest to the newer one, at most this many times.
_LOAD_RETRIES = 2


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupted or not one we wrote."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckpointError(message)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _matches(pattern: re.Pattern[str], value: Any) -> bool:
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def _check_name(value: Any) -> None:
    _check(
        _matches(_PLAIN_NAME, value) and value != Path(MANIFEST).stem,
        f"checkpoint name must be a plain file name (letters, digits, '.', '_', '-') "
        f"other than {Path(MANIFEST).stem!r}, got {value!r}",
    )


def _check_version(value: Any) -> None:
    _check(
        type(value) is int and value == FORMAT_VERSION,
        f"format_version must be {FORMAT_VERSION}, got {value!r}",
    )


def _parse_time(value: Any) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"created_at must be an ISO-8601 time, got {value!r}") from None
    _check(moment.utcoffset() == timedelta(0), f"created_at must be UTC, got {value!r}")
    return moment


@dataclass(frozen=True)
class CheckpointMeta:
    name: str
    format_version: int
    config: GPTConfig
    step: int
    tokens_seen: int
    train_loss: float | None
    val_loss: float | None
    created_at: str
    weights_file: str
    weights_sha256: str
    dtype: str
    extra: dict[str, Any]

    def __post_init__(self) -> None:
        _check_name(self.name)
        _check_version(self.format_version)
        _check(isinstance(self.config, GPTConfig), f"config must be a GPTConfig: {self.config!r}")
        for field in ("step", "tokens_seen"):
            value = getattr(self, field)
            _check(_is_count(value), f"{field} must be a non-negative integer, got {value!r}")
        for field in ("train_loss", "val_loss"):
            value = getattr(self, field)
            _check(
                value is None or (isinstance(value, float) and math.isfinite(value)),
                f"{field} must be a finite float or null, got {value!r}",
            )
        _parse_time(self.created_at)
        _check(
            self.weights_file == self.name + WEIGHTS_SUFFIX,
            f"weights_file must be {self.name + WEIGHTS_SUFFIX!r}, got {self.weights_file!r}",
        )
        _check(
            _matches(_SHA256, self.weights_sha256),
            f"weights_sha256 must be 64 lowercase hex digits, got {self.weights_sha256!r}",
        )
        _check(
            isinstance(self.dtype, str) and self.dtype in DTYPES,
            f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}",
        )
        _check(
            isinstance(self.extra, dict) and all(isinstance(key, str) for key in self.extra),
            f"extra must be an object with string keys, got {self.extra!r}",
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> CheckpointMeta:
        """Build from parsed JSON, refusing unknown, missing or mistyped fields."""
        _check(isinstance(data, dict), f"metadata must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(data) - names), sorted(names - set(data))
        _check(not unknown and not missing, f"fields unknown {unknown}, missing {missing}")
        _check(isinstance(data["config"], dict), f"config must be an object: {data['config']!r}")
        try:
            config = GPTConfig.from_dict(data["config"])
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"invalid config: {error}") from None
        return cls(**{**data, "config": config})


def _reject_constant(constant: str) -> None:
    raise ValueError(f"{constant} is not valid JSON")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_bytes(path).decode(), parse_constant=_reject_constant)
    except ValueError as error:  # also covers UnicodeDecodeError and JSONDecodeError
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None


def _json_bytes(data: dict[str, Any]) -> bytes:
    try:
        return (json.dumps(data, indent=2, allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint metadata is not JSON-safe: {error}") from None


def save_checkpoint(
    run_dir: Path,
    model: GPT,
    *,
    step: int,
    tokens_seen: int = 0,
    train_loss: float | None = None,
    val_loss: float | None = None,
    extra: dict[str, Any] | None = None,
    name: str | None = None,
    manifest: bool = True,
) -> Path:
    """Write ``<name>.safetensors``, then ``<name>.json``, then point ``latest.json`` at them.

    Returns the metadata path. Each file is replaced atomically and the manifest goes last, so a
    reader following it never sees a checkpoint whose files are not all complete.
    ``manifest=False`` writes a side copy (the trainer's ``best``) that readers following the
    manifest never switch to: what they serve stays the run's latest, each under its own name."""
    run_dir = Path(run_dir)
    started = time.time()
    name = f"step-{step:08d}" if name is None else name
    tied = model.lm_head.weight is model.transformer.wte.weight
    _check(
        tied == model.config.tie_embeddings,
        f"lm_head.weight is {'' if tied else 'not '}tied to transformer.wte.weight, "
        f"but the config says tie_embeddings={model.config.tie_embeddings}",
    )
    tensors = {
        key: value.detach().to("cpu").contiguous()
        for key, value in model.state_dict().items()
        if not (tied and key == TIED_NAME)
    }
    dtypes = {str(tensor.dtype).removeprefix("torch.") for tensor in tensors.values()}
    _check(
        len(dtypes) == 1 and dtypes <= DTYPES.keys(),
        f"all tensors must share one dtype of {sorted(DTYPES)}, got {sorted(dtypes)}",
    )
    weights = safetensors.torch.save(tensors)
    meta = CheckpointMeta(
        name=name,
        format_version=FORMAT_VERSION,
        config=model.config,
        step=step,
        tokens_seen=tokens_seen,
        train_loss=train_loss,
        val_loss=val_loss,
        created_at=datetime.now(UTC).isoformat(),
        weights_file=name + WEIGHTS_SUFFIX,
        weights_sha256=hashlib.sha256(weights).hexdigest(),
        dtype=dtypes.pop(),
        extra=dict(extra or {}),
    )
    # Serialise everything before writing anything, so bad metadata leaves the folder untouched.
    meta_json = _json_bytes(meta.to_dict())
    manifest_json = _json_bytes(
        {"format_version": FORMAT_VERSION, "name": meta.name, "created_at": meta.created_at}
    )
    meta_path = run_dir / f"{meta.name}.json"
    # A writer killed mid-save leaves its temporary files behind, each as large as a checkpoint.
    remove_stale_temporaries(run_dir, older_than=started)
    atomic_write_bytes(run_dir / meta.weights_file, weights)
    atomic_write_bytes(meta_path, meta_json)
    if manifest:
        atomic_write_bytes(run_dir / MANIFEST, manifest_json)
    return meta_path


def prune_checkpoints(run_dir: Path, keep: int) -> list[str]:
    """Delete the periodic checkpoints (``step-NNNNNNNN``) but the ``keep`` newest by step, and
    return the names deleted, oldest first. Call it after the manifest has moved on.

    Other names (the trainer's ``best``) are side copies, never periodic, and stay; so does the
    checkpoint the manifest names, even when it is not among the newest (a service may be
    loading it). Weights left without metadata by a writer killed mid-save are periodic leftovers
    like any other and go too."""
    if type(keep) is not int or keep < 1:
        raise ValueError(f"keep must be an integer of at least 1, got {keep!r}")
    run_dir = Path(run_dir)
    current = latest_checkpoint(run_dir)
    steps: dict[str, int] = {}
    for path in run_dir.iterdir():
        if path.suffix in (".json", WEIGHTS_SUFFIX) and (found := _PERIODIC.fullmatch(path.stem)):
            steps[path.stem] = int(found[1])
    newest_first = sorted(steps, key=steps.__getitem__, reverse=True)
    doomed = [name for name in newest_first[keep:] if current is None or name != current.stem]
    for name in doomed:
        # Metadata first, weights second: the reverse of the order save_checkpoint writes them,
        # so a .json in the folder always has its weights beside it. A reader that resolved the
        # manifest just before it moved then finds the .json gone, or (if it got the .json in
        # time) the weights gone; either is a CheckpointError, and load_checkpoint's retry
        # follows the manifest, which no longer names this checkpoint, to the one that does.
        (run_dir / f"{name}.json").unlink(missing_ok=True)
        (run_dir / f"{name}{WEIGHTS_SUFFIX}").unlink(missing_ok=True)
    return doomed[::-1]


def _read_manifest(run_dir: Path) -> tuple[Path, datetime] | None:
    """The metadata path ``latest.json`` points at and when it was written; None without one."""
    path = run_dir / MANIFEST
    if not path.is_file():  # the trainer replaces the manifest but never deletes it
        return None
    data = _read_json(path)
    try:
        _check(isinstance(data, dict), "the manifest must be a JSON object")
        keys = {"format_version", "name", "created_at"}
        _check(set(data) == keys, f"the manifest must have exactly the fields {sorted(keys)}")
        _check_version(data["format_version"])
        _check_name(data["name"])
        created_at = _parse_time(data["created_at"])
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    return run_dir / f"{data['name']}.json", created_at


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The metadata path of the run's latest checkpoint, or None before its first save."""
    found = _read_manifest(Path(run_dir))
    return found[0] if found else None


def run_checkpoints(root: Path) -> dict[str, tuple[Path, datetime]]:
    """Every run folder directly under ``root`` with a checkpoint: its latest checkpoint's
    metadata path and when that was written, by run name.

    Folders without a valid manifest (other runs' leftovers, a run that has not saved yet) are
    skipped rather than refused: one bad run must not hide the good ones."""
    root = Path(root)
    runs: dict[str, tuple[Path, datetime]] = {}
    for run_dir in sorted(root.iterdir()) if root.is_dir() else []:
        if not run_dir.is_dir():
            continue
        try:
            found = _read_manifest(run_dir)
        except CheckpointError:
            continue
        if found:
            runs[run_dir.name] = found
    return runs


def newest_checkpoint(root: Path) -> Path | None:
    """Across the run folders directly under ``root``, the latest checkpoint written last."""
    runs = run_checkpoints(root).values()
    return max(runs, key=lambda found: found[1])[0] if runs else None


def resolve_checkpoint(path: Path) -> Path:
    """The metadata path for a run folder (its latest), a ``latest.json``, a ``<name>.json`` or
    a ``<name>.safetensors``."""
    path = Path(path)
    if path.name == MANIFEST:
        path = path.parent
    if path.is_dir():
        meta_path = latest_checkpoint(path)
        _check(meta_path is not None, f"no checkpoint yet: {path / MANIFEST} does not exist")
        return meta_path
    if path.suffix == WEIGHTS_SUFFIX:
        return path.with_suffix(".json")
    _check(
        path.suffix == ".json",
        f"{path} is neither a run folder nor a checkpoint's .json or {WEIGHTS_SUFFIX} file",
    )
    return path


def read_meta(path: Path) -> CheckpointMeta:
    """Read and validate a checkpoint's metadata without touching its weights."""
    path = resolve_checkpoint(path)
    try:
        meta = CheckpointMeta.from_dict(_read_json(path))
        _check(meta.name == path.stem, f"name {meta.name!r} does not match the file name")
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    return meta


def _load(meta_path: Path, device: str | torch.device) -> tuple[GPT, CheckpointMeta]:
    meta = read_meta(meta_path)
    weights_path = meta_path.parent / meta.weights_file
    # Hash and parse the same bytes: the file could be replaced between two separate reads.
    weights = _read_bytes(weights_path)
    digest = hashlib.sha256(weights).hexdigest()
    _check(
        digest == meta.weights_sha256,
        f"{weights_path} has sha256 {digest} but {meta_path.name} says {meta.weights_sha256}: "
        "the file is truncated, corrupted or not the one the metadata describes",
    )
    try:
        tensors = safetensors.torch.load(weights)
    except Exception as error:  # the parser raises several types on bad input; all mean the same
        raise CheckpointError(f"{weights_path} is not a valid safetensors file: {error}") from None

    # Check against a model on the meta device first: it allocates nothing however large the
    # config claims to be, so a bogus one is refused before it can exhaust memory.
    with torch.device("meta"):
        expected = GPT(meta.config).state_dict()
    if meta.config.tie_embeddings:
        del expected[TIED_NAME]
    missing, unexpected = sorted(expected.keys() - tensors), sorted(tensors.keys() - expected)
    _check(
        not missing and not unexpected,
        f"{weights_path} does not hold the tensors of its config: "
        f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
        f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}",
    )
    for key, want in expected.items():
        tensor = tensors[key]
        _check(
            tensor.shape == want.shape,
            f"{weights_path}: {key} has shape {tuple(tensor.shape)}, "
            f"the config needs {tuple(want.shape)}",
        )
        _check(
            tensor.dtype == DTYPES[meta.dtype],
            f"{weights_path}: {key} is {tensor.dtype}, the metadata says {meta.dtype}",
        )

    with torch.device(device):
        model = GPT(meta.config).to(DTYPES[meta.dtype])
    if meta.config.tie_embeddings:
        # Copying into the tied Parameter under both names keeps the tie GPT.__init__ made.
        tensors[TIED_NAME] = tensors[STORED_NAME]
    model.load_state_dict(tensors)
    return model.eval(), meta


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[GPT, CheckpointMeta]:
    """Load and validate a checkpoint (see ``resolve_checkpoint`` for what ``path`` may be).

    Anything that is not exactly a checkpoint we wrote raises CheckpointError."""
    meta_path = resolve_checkpoint(path)
    for _ in range(_LOAD_RETRIES):
        try:
            return _load(meta_path, device)
        except CheckpointError:
            # Only worth another try if the manifest moved on (and retention removed the files
            # we were reading); a fixed checkpoint that fails will fail again.
            latest = resolve_checkpoint(path)
            if latest == meta_path:
                raise
            meta_path = latest
    return _load(meta_path, device)

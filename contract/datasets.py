"""The prepared datasets under DATA_DIR, as the API sees them: for GET /datasets, and to refuse a
train job naming one that is not there before it waits in the queue only to fail.

A prepared dataset is a folder ``DATA_DIR/<name>`` holding a ``manifest.json``, which ``slm
prepare`` writes last (``worker.data.manifest`` defines the format and reads it for training).
This module reads only what a listing shows (the source, and tokens and stories per split); it
leaves checking the format and the token files to the worker, which refuses anything it cannot
train on. It must not import ``worker``, which the API never does.

The API may run where the workers' DATA_DIR is not (Docker mounts the data volume only into the
workers): a DATA_DIR with no prepared dataset in it tells nothing, so a job is refused only when
this DATA_DIR holds prepared datasets and not the one it names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from contract.jobs import NAME_PATTERN

MANIFEST = "manifest.json"  # as worker.data.manifest.MANIFEST
PREPARE_SOURCES = "hub:v2, hub:v1, a folder or file of stories, or an http(s) URL"
_NAMES_SHOWN = 20


@dataclass(frozen=True)
class PreparedDataset:
    name: str  # what a job's data.dataset names
    source: str  # what it was prepared from, as `slm prepare --source` was given it
    tokens: dict[str, int]  # per split: train, val
    stories: dict[str, int]
    created_at: str


def _read(folder: Path) -> PreparedDataset | None:
    """The dataset in ``folder``, or None when it is not one (no manifest: not a dataset, or one
    still being prepared; a manifest that does not parse)."""
    if not re.fullmatch(NAME_PATTERN, folder.name):
        return None  # no job could name it
    try:
        manifest = json.loads((folder / MANIFEST).read_bytes())
        splits = manifest["splits"]
        return PreparedDataset(
            name=folder.name,
            source=str(manifest["source"]),
            tokens={split: int(info["tokens"]) for split, info in splits.items()},
            stories={split: int(info["stories"]) for split, info in splits.items()},
            created_at=str(manifest["created_at"]),
        )
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def prepared_datasets(data_dir: Path) -> list[PreparedDataset]:
    """The prepared datasets under ``data_dir``, by name; none when it does not exist."""
    try:
        folders = sorted(path for path in Path(data_dir).iterdir() if path.is_dir())
    except OSError:  # no DATA_DIR (yet), or not a folder
        return []
    return [dataset for folder in folders if (dataset := _read(folder)) is not None]


def prepare_advice(data_dir: Path, name: str) -> str:
    """How to prepare dataset ``name``, as a command that works."""
    folder = Path(data_dir) / name
    return f"`slm prepare --source SOURCE --out {folder}` (SOURCE: {PREPARE_SOURCES})"


def missing_dataset(data_dir: Path, name: str) -> str | None:
    """Why a job naming dataset ``name`` cannot train, or None when it can or this process cannot
    tell (``data_dir`` holds no prepared dataset: it may not be the workers' DATA_DIR)."""
    datasets = prepared_datasets(data_dir)
    names = [dataset.name for dataset in datasets]
    if not datasets or name in names:
        return None
    shown = ", ".join(names[:_NAMES_SHOWN]) + (", …" if len(names) > _NAMES_SHOWN else "")
    return (
        f"data.dataset: no prepared dataset {name!r} under DATA_DIR ({data_dir}); prepared there: "
        f"{shown} (GET /datasets lists them). Name one of those, prepare {name!r} with "
        f"{prepare_advice(data_dir, name)}, or give data.source (hub:v2, hub:v1 or an http(s) "
        f"URL) instead, which the worker prepares first"
    )

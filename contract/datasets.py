"""The prepared datasets under DATA_DIR, as the API sees them: for GET /datasets, and to refuse a
train job naming one that is not there before it waits in the queue only to fail.

A prepared dataset is a folder ``DATA_DIR/<name>`` holding a ``manifest.json``, which ``slm
prepare`` writes last. Its fields (``Manifest``) are defined here, where the worker that writes it
and the API that lists it both find them; ``worker.data.manifest`` adds the token files' layout
and the checks training needs (format version, tokenizer, file sizes), and refuses anything it
cannot train on. The API reads only what a listing shows.

The API may run where the workers' DATA_DIR is not (a deployment that does not share the data
volume with it): a DATA_DIR with no prepared dataset in it tells nothing, so a job is refused only
when this DATA_DIR holds prepared datasets and not the one it names.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from contract.jobs import NAME_PATTERN, redact_url

MANIFEST = "manifest.json"
PREPARE_SOURCES = "hub:v2, hub:v1, a folder or file of stories, or an http(s) URL"
_NAMES_SHOWN = 20


@dataclass(frozen=True)
class SourceFile:
    """One input text file, and the split its stories went to ("train", "val" or "both")."""

    name: str
    split: str
    size: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    file: str
    tokens: int
    stories: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``: written last by ``slm prepare``, read by training and by the API."""

    format_version: int
    tokenizer: str
    eot_id: int
    dtype: str
    source: str  # as the user named it; identity lies in ``sources``
    val_fraction: float | None  # None unless a source file was split story by story
    sources: tuple[SourceFile, ...]
    splits: dict[str, SplitInfo]
    created_at: str

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return cls(
            **{
                **data,
                "sources": tuple(SourceFile(**item) for item in data["sources"]),
                "splits": {name: SplitInfo(**info) for name, info in data["splits"].items()},
            }
        )


class PreparedDataset(BaseModel):
    """A prepared dataset as GET /datasets lists it."""

    name: str = Field(description='what a train job names: `"data": {"dataset": NAME}`')
    source: str = Field(description="what `slm prepare --source` prepared it from")
    tokens: dict[str, int] = Field(description="tokens per split (train, val)")
    stories: dict[str, int] = Field(description="stories per split")
    created_at: str = Field(description="when its preparation finished (ISO 8601)")


def _read(folder: Path) -> PreparedDataset | None:
    """The dataset in ``folder``, or None when it is not one (no manifest: not a dataset, or one
    still being prepared; a manifest that does not parse)."""
    if not re.fullmatch(NAME_PATTERN, folder.name):
        return None  # no job could name it
    try:
        manifest = Manifest.from_dict(json.loads((folder / MANIFEST).read_bytes()))
        splits = manifest.splits.items()
        return PreparedDataset(
            name=folder.name,
            source=redact_url(manifest.source),  # one prepared before sources were redacted
            tokens={split: info.tokens for split, info in splits},
            stories={split: info.stories for split, info in splits},
            created_at=manifest.created_at,
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


def prepare_advice(name: str) -> str:
    """How to prepare dataset ``name``, as a command; its folder is named by its setting, since
    clients read this and the server's paths are none of theirs."""
    return f"`slm prepare --source SOURCE --out DATA_DIR/{name}` (SOURCE: {PREPARE_SOURCES})"


def missing_dataset(data_dir: Path, name: str) -> str | None:
    """Why a job naming dataset ``name`` cannot train, or None when it can or this process cannot
    tell (``data_dir`` holds no prepared dataset: it may not be the workers' DATA_DIR)."""
    datasets = prepared_datasets(data_dir)
    names = [dataset.name for dataset in datasets]
    if not datasets or name in names:
        return None
    shown = ", ".join(names[:_NAMES_SHOWN]) + (", …" if len(names) > _NAMES_SHOWN else "")
    return (
        f"data.dataset: no prepared dataset {name!r} under DATA_DIR; prepared there: "
        f"{shown} (GET /datasets lists them). Name one of those, prepare {name!r} with "
        f"{prepare_advice(name)}, or give data.source (hub:v2, hub:v1 or an http(s) "
        f"URL) instead, which the worker prepares first"
    )

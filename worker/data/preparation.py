"""``prepare``: a source's files, cut into chunks and encoded, written into a data folder.

Token files are written as ``<split>.bin.tmp`` and fsynced; only then is the old manifest
removed, the temporaries renamed and the new manifest written (why: ``worker.data.manifest``).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from contract.datasets import MANIFEST, Manifest, SplitInfo
from contract.jobs import redact_url
from model.atomic import atomic_write_bytes, fsync_directory
from model.tokenizer import ENCODING_NAME, get_tokenizer
from worker.data.encoding import DEFAULT_CHUNK_BYTES, Chunk, encode_in_order, read_chunks
from worker.data.manifest import (
    BOTH,
    EOT_ID,
    FORMAT_VERSION,
    SPLITS,
    DataError,
    finished_manifest,
)
from worker.data.sources import DownloadRules, Input, describe, resolve

DEFAULT_VAL_FRACTION = 0.01


class _SplitWriter:
    """Appends one split's tokens to ``<split>.bin.tmp``, counting and hashing as it goes."""

    def __init__(self, out_dir: Path, split: str) -> None:
        self.file = f"{split}.bin"
        self.temporary = out_dir / f"{self.file}.tmp"
        self._handle: BinaryIO = self.temporary.open("wb")
        self._sha256 = hashlib.sha256()
        self.tokens = 0
        self.stories = 0

    def write(self, tokens: np.ndarray) -> None:
        self._handle.write(tokens.data)
        self._sha256.update(tokens.data)
        self.tokens += len(tokens)
        # Story text never encodes to the <|endoftext|> id, so each one ends a story.
        self.stories += int(np.count_nonzero(tokens == EOT_ID))

    def finish(self) -> SplitInfo:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        return SplitInfo(self.file, self.tokens, self.stories, self._sha256.hexdigest())

    def discard(self) -> None:
        self._handle.close()
        self.temporary.unlink(missing_ok=True)


def _chunks(inputs: list[Input], chunk_bytes: int, val_fraction: float | None) -> Iterator[Chunk]:
    for item in inputs:
        for offset, data in read_chunks(item.path, chunk_bytes):
            yield Chunk(item.name, offset, data, item.split, val_fraction)


def _write_splits(
    inputs: list[Input],
    out_dir: Path,
    val_fraction: float | None,
    workers: int,
    chunk_bytes: int,
    total_bytes: int,
    quiet: bool,
) -> dict[str, SplitInfo]:
    """Tokenize every input into ``<split>.bin.tmp`` files, fsynced; nothing left on failure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    writers = {split: _SplitWriter(out_dir, split) for split in SPLITS}
    try:
        with tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            desc="tokenizing",
            file=sys.stderr,
            disable=quiet,
        ) as bar:
            for size, tokens in encode_in_order(
                _chunks(inputs, chunk_bytes, val_fraction), workers
            ):
                for split, ids in tokens.items():
                    writers[split].write(ids)
                bar.update(size)
        for split, writer in writers.items():
            if writer.stories == 0:
                hint = " (raise --val-fraction)" if val_fraction is not None else ""
                raise DataError(f"no stories for {split} in {[i.name for i in inputs]}{hint}")
        return {split: writer.finish() for split, writer in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise


def _commit(out_dir: Path, manifest: Manifest) -> None:
    # Drop the old manifest before replacing the files it describes: at no moment does a
    # manifest sit beside token files it does not match.
    (out_dir / MANIFEST).unlink(missing_ok=True)
    fsync_directory(out_dir)
    for info in manifest.splits.values():
        os.replace(out_dir / f"{info.file}.tmp", out_dir / info.file)
    fsync_directory(out_dir)
    atomic_write_bytes(out_dir / MANIFEST, manifest.to_json())


@dataclass(frozen=True)
class Prepared:
    manifest: Manifest
    skipped: bool  # the folder already held exactly this preparation
    seconds: float


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare(
    source: str | Path,
    out_dir: Path,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    workers: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    quiet: bool = False,
    rules: DownloadRules | None = None,
) -> Prepared:
    """Tokenize ``source`` into ``out_dir`` (see ``worker.data.sources`` for sources,
    ``worker.data.manifest`` for the format).

    Does nothing when ``out_dir`` already holds a finished preparation of the same source files
    (by sha256; a URL is downloaded again to be checked) with the same settings.
    ``val_fraction`` applies to single-file sources only; ``workers`` (default: every CPU) and
    ``chunk_bytes`` change the speed, never the output.
    ``quiet`` hides the progress bars (stderr). ``rules`` bound a URL's download (default:
    the environment's Settings).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    workers = default_workers() if workers is None else workers
    if workers < 1 or chunk_bytes < 1:
        raise ValueError(f"workers and chunk_bytes must be positive, got {workers}, {chunk_bytes}")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    get_tokenizer()  # a missing vocabulary fails here, before any download
    inputs = resolve(str(source), out_dir, quiet, rules)
    try:
        files = tuple(describe(item) for item in inputs)
        fraction = val_fraction if any(item.split == BOTH for item in inputs) else None
        previous = finished_manifest(out_dir)
        if previous and previous.sources == files and previous.val_fraction == fraction:
            return Prepared(previous, skipped=True, seconds=time.perf_counter() - started)
        splits = _write_splits(
            inputs, out_dir, fraction, workers, chunk_bytes, sum(f.size for f in files), quiet
        )
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            tokenizer=ENCODING_NAME,
            eot_id=EOT_ID,
            dtype="uint16",
            source=redact_url(str(source)),  # GET /datasets shows it
            val_fraction=fraction,
            sources=files,
            splits=splits,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        _commit(out_dir, manifest)
        return Prepared(manifest, skipped=False, seconds=time.perf_counter() - started)
    finally:
        for item in inputs:
            if item.temporary:
                item.path.unlink(missing_ok=True)

"""The prepared data folder's format, and the reader API (``read_manifest``, ``load_split``);
the manifest's own fields are in ``contract.datasets``, which the API reads too.

A prepared data folder looks like this::

    train.bin       uint16 (little-endian) token ids, each story followed by <|endoftext|> (50256)
    val.bin         the same for validation
    manifest.json   token and story counts, the sources' sha256, the tokenizer; written last

Readers trust ``manifest.json`` alone: token files are written as ``*.bin.tmp``, fsynced and
renamed, and the manifest comes last, so an interrupted run never leaves a folder that looks
finished. One ``prepare`` per folder at a time.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from contract.datasets import MANIFEST, Manifest, SplitInfo
from model.config import GPT2_VOCAB_SIZE
from model.tokenizer import ENCODING_NAME, get_tokenizer

FORMAT_VERSION = 1
SPLITS = ("train", "val")
BOTH = "both"  # a source file whose stories are divided between train and val
DTYPE = np.dtype("<u2")  # GPT-2's 50,257 ids fit in 16 bits
EOT_ID = 50256


class DataError(ValueError):
    """A source that cannot be prepared, or a data folder that is not (completely) prepared."""


def read_manifest(data_dir: Path) -> Manifest:
    """The manifest of a finished data folder; a ``DataError`` for anything else."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: {data_dir} is not a prepared data folder, or its "
            f"preparation did not finish; run `slm prepare --source SOURCE --out {data_dir}`"
        )
    try:
        manifest = Manifest.from_dict(json.loads(path.read_bytes()))
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise DataError(f"{path} is not a data manifest: {error!r}") from None
    expected = {
        "format_version": FORMAT_VERSION,
        "tokenizer": ENCODING_NAME,
        "eot_id": EOT_ID,
        "dtype": "uint16",
    }
    for field, wanted in expected.items():
        if getattr(manifest, field) != wanted:
            raise DataError(
                f"{path}: {field} is {getattr(manifest, field)!r}, this code reads {wanted!r}; "
                f"prepare the data again"
            )
    if sorted(manifest.splits) != sorted(SPLITS):
        raise DataError(f"{path}: splits are {sorted(manifest.splits)}, expected {list(SPLITS)}")
    for info in manifest.splits.values():
        if info.file != Path(info.file).name:
            raise DataError(f"{path} names {info.file!r}: token files must be plain file names")
    return manifest


def _check_split_file(data_dir: Path, info: SplitInfo, verify: bool) -> Path:
    path = Path(data_dir) / info.file
    if not path.is_file():
        raise DataError(f"{path} is missing, though its manifest names it; run `slm prepare`")
    size = path.stat().st_size
    if size != info.tokens * DTYPE.itemsize:
        raise DataError(
            f"{path} holds {size:,} bytes, its manifest says {info.tokens:,} tokens: the folder is "
            f"being rewritten or was damaged; run `slm prepare` again"
        )
    if verify and file_sha256(path) != info.sha256:
        raise DataError(f"{path} does not match the sha256 in its manifest; prepare it again")
    return path


def load_split(
    data_dir: Path, split: str, verify: bool = False, vocab_size: int = GPT2_VOCAB_SIZE
) -> np.ndarray:
    """The tokens of ``split`` ("train" or "val") of a finished data folder: GPT-2's ids
    memory-mapped read-only, or for a vocabulary with fewer merges its ids, remapped into
    memory (2 bytes a token; ~50 ms per million tokens here, so the data is prepared once for
    every vocabulary). The file's size is checked against the manifest; ``verify`` also
    checks its sha256 (reads the whole file)."""
    manifest = read_manifest(data_dir)
    if split not in manifest.splits:
        raise DataError(f"no split {split!r} in {data_dir}: there are {sorted(manifest.splits)}")
    path = _check_split_file(data_dir, manifest.splits[split], verify)
    return get_tokenizer(vocab_size).from_gpt2(np.memmap(path, dtype=DTYPE, mode="r"))


def finished_manifest(data_dir: Path) -> Manifest | None:
    """The folder's manifest if the folder is complete and consistent, else None."""
    try:
        manifest = read_manifest(data_dir)
        for info in manifest.splits.values():
            _check_split_file(data_dir, info, verify=False)
    except DataError:
        return None
    return manifest


def file_sha256(path: Path) -> str:
    """The sha256 that the manifest records for source and token files alike."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()

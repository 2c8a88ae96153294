"""TinyStories text → ``train.bin`` / ``val.bin`` of GPT-2 tokens, plus ``manifest.json``.

A prepared data folder looks like this::

    train.bin       uint16 (little-endian) token ids, each story followed by <|endoftext|> (50256)
    val.bin         the same for validation
    manifest.json   token and story counts, the sources' sha256, the tokenizer; written last

Sources (``prepare``'s ``source``, ``slm prepare --source``):

- ``hub:v2`` / ``hub:v1``: ``TinyStoriesV2-GPT4-{train,valid}.txt`` /
  ``TinyStories-{train,valid}.txt`` from the ``roneneldan/TinyStories`` dataset on the Hugging
  Face hub (downloaded once, resumably, and cached by huggingface_hub);
- a folder holding ``*train*.txt`` and ``*valid*.txt`` files, named as on the hub; train files are
  concatenated in name order, and so are valid files;
- one text file, or an ``http(s)://`` URL of one, split story by story: a story goes to val when
  the first 8 bytes of the BLAKE2b digest of its stripped UTF-8 text, read as a big-endian number,
  fall below ``val_fraction`` × 2**64 (``goes_to_val``). The rule looks at the story alone, so it
  does not depend on chunk size or worker count, and duplicate stories all land on one side.

Text format: each story is followed by a line holding only ``<|endoftext|>`` (spaces, tabs and
``\\r`` around it are allowed); text after the last such line counts as a story too. Stories are
stripped of surrounding whitespace and empty ones skipped. The file is streamed in chunks cut at
separator lines and tokenized in worker processes, so memory stays bounded on the 2.2 GB train file.

Readers trust ``manifest.json`` alone: token files are written as ``*.bin.tmp``, fsynced and
renamed, and the manifest comes last, so an interrupted run never leaves a folder that looks
finished. One ``prepare`` per folder at a time.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import json
import os
import re
import signal
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse

import numpy as np
from tqdm import tqdm

from model.atomic import atomic_write_bytes, fsync_directory
from model.tokenizer import ENCODING_NAME, END_OF_TEXT, get_tokenizer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
BOTH = "both"  # a source file whose stories are divided between train and val
DTYPE = np.dtype("<u2")  # GPT-2's 50,257 ids fit in 16 bits
EOT_ID = 50256
DEFAULT_VAL_FRACTION = 0.01
DEFAULT_CHUNK_BYTES = 1 << 20
# A story is about 1 KB; a file with no separator line in this many bytes is not TinyStories text,
# and refusing it keeps memory bounded.
MAX_STORY_BYTES = 64 << 20
HUB_REPO = "roneneldan/TinyStories"
HUB_FILES = {
    "v1": {"train": "TinyStories-train.txt", "val": "TinyStories-valid.txt"},
    "v2": {"train": "TinyStoriesV2-GPT4-train.txt", "val": "TinyStoriesV2-GPT4-valid.txt"},
}
_SEPARATOR = re.compile(r"^[ \t\r]*<\|endoftext\|>[ \t\r]*$", re.MULTILINE)
_SEPARATOR_BYTES = END_OF_TEXT.encode()
_LINE_SPACE = b" \t\r"
_DOWNLOAD_BLOCK = 1 << 20


class DataError(ValueError):
    """A source that cannot be prepared, or a data folder that is not (completely) prepared."""


# --- the manifest and the reader API ---------------------------------------------------------


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


def read_manifest(data_dir: Path) -> Manifest:
    """The manifest of a finished data folder; a ``DataError`` for anything else."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: {data_dir} is not a prepared data folder, or its "
            f"preparation did not finish; run `slm prepare --out {data_dir}`"
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
    if verify and _file_sha256(path) != info.sha256:
        raise DataError(f"{path} does not match the sha256 in its manifest; prepare it again")
    return path


def load_split(data_dir: Path, split: str, verify: bool = False) -> np.memmap:
    """The tokens of ``split`` ("train" or "val") of a finished data folder, memory-mapped
    read-only. The file's size is checked against the manifest; ``verify`` also checks its
    sha256 (reads the whole file)."""
    manifest = read_manifest(data_dir)
    if split not in manifest.splits:
        raise DataError(f"no split {split!r} in {data_dir}: there are {sorted(manifest.splits)}")
    path = _check_split_file(data_dir, manifest.splits[split], verify)
    return np.memmap(path, dtype=DTYPE, mode="r")


def _finished_manifest(data_dir: Path) -> Manifest | None:
    """The folder's manifest if the folder is complete and consistent, else None."""
    try:
        manifest = read_manifest(data_dir)
        for info in manifest.splits.values():
            _check_split_file(data_dir, info, verify=False)
    except DataError:
        return None
    return manifest


# --- sources: hub, URL, folder, file ---------------------------------------------------------


@dataclass(frozen=True)
class _Input:
    path: Path
    name: str  # the file's own name (a download's, a hub file's), not where it lies locally
    split: str  # "train", "val" or BOTH
    temporary: bool = False  # a download, deleted when preparation ends


def _resolve(source: str, out_dir: Path, quiet: bool) -> list[_Input]:
    if source.startswith("hub:"):
        return _from_hub(source)
    if source.startswith(("http://", "https://")):
        name = PurePosixPath(urlparse(source).path).name or "download.txt"
        return [_Input(download(source, out_dir / f"{name}.part", quiet), name, BOTH, True)]
    return _from_path(Path(source))


def _from_hub(source: str) -> list[_Input]:
    files = HUB_FILES.get(source.removeprefix("hub:"))
    if files is None:
        raise DataError(f"unknown hub source {source!r}: use {' or '.join(_hub_sources())}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DataError(
            "hub sources need huggingface_hub: pip install 'slm[worker]'; or pass --source "
            "a local file or folder, or an http(s) URL"
        ) from None
    inputs = []
    for split, name in files.items():
        try:
            path = hf_hub_download(HUB_REPO, name, repo_type="dataset")
        except Exception as error:  # huggingface_hub raises HTTP, network and cache errors alike
            raise DataError(
                f"cannot fetch {name} from the Hugging Face hub ({HUB_REPO}): {error} — "
                f"without the hub, pass --source a local file or folder, or an http(s) URL"
            ) from None
        inputs.append(_Input(Path(path), name, split))
    return inputs


def _hub_sources() -> list[str]:
    return [f"hub:{version}" for version in HUB_FILES]


def _from_path(path: Path) -> list[_Input]:
    if path.is_file():
        return [_Input(path, path.name, BOTH)]
    if not path.is_dir():
        raise DataError(
            f"{path}: no such file or folder (a source is a text file, a folder of "
            f"*train*.txt and *valid*.txt files, an http(s) URL, or "
            f"{' / '.join(_hub_sources())})"
        )
    val = sorted(p for p in path.glob("*valid*.txt") if p.is_file())
    train = sorted(p for p in path.glob("*train*.txt") if p.is_file() and p not in val)
    for files, pattern in ((train, "*train*.txt"), (val, "*valid*.txt")):
        if not files:
            raise DataError(
                f"{path} holds no {pattern} file: a folder source needs train and valid files "
                f"named as on the hub (TinyStoriesV2-GPT4-train.txt, "
                f"TinyStoriesV2-GPT4-valid.txt); to split a single file, pass the file itself"
            )
    return [_Input(p, p.name, "train") for p in train] + [_Input(p, p.name, "val") for p in val]


def download(url: str, part: Path, quiet: bool = True) -> Path:
    """Stream ``url`` into ``part`` and return it. A ``part`` left by a dropped connection is
    resumed with an HTTP range request where the server allows; a body shorter than its
    Content-Length is an error, never a silently short file."""
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.is_file() else 0
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {}),
            timeout=60,
        )
    except HTTPError as error:
        if error.code == 416 and have:  # the part is stale (the file changed): start over
            part.unlink()
            return download(url, part, quiet)
        raise DataError(f"{url}: HTTP {error.code} {error.reason}") from None
    except (URLError, OSError) as error:
        raise DataError(f"cannot download {url}: {getattr(error, 'reason', error)}") from None
    with response:
        if response.status != 206:  # a server that ignores ranges sends the whole file
            have = 0
        length = response.headers.get("Content-Length")
        expected = None if length is None else have + int(length)
        received = have
        with (
            part.open("ab" if have else "wb") as handle,
            tqdm(
                total=expected,
                initial=have,
                unit="B",
                unit_scale=True,
                desc=f"downloading {part.name.removesuffix('.part')}",
                file=sys.stderr,
                disable=quiet,
            ) as bar,
        ):
            for block in _response_blocks(response, url):
                handle.write(block)
                received += len(block)
                bar.update(len(block))
    if expected is not None and received != expected:
        raise DataError(
            f"{url}: the connection dropped mid-way ({received:,} of {expected:,} bytes); "
            f"run again to resume"
        )
    return part


def _response_blocks(response: http.client.HTTPResponse, url: str) -> Iterator[bytes]:
    try:
        while block := response.read(_DOWNLOAD_BLOCK):
            yield block
    except (http.client.HTTPException, OSError) as error:
        raise DataError(f"{url}: the connection dropped mid-way ({error!r})") from None


def _describe(item: _Input) -> SourceFile:
    size = item.path.stat().st_size
    if size == 0:
        raise DataError(f"{item.path} is empty")
    return SourceFile(item.name, item.split, size, _file_sha256(item.path))


def _file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# --- chunks: cut files at separator lines, encode them in worker processes --------------------


@dataclass(frozen=True)
class Chunk:
    """Whole stories from one file, starting at byte ``offset`` of it."""

    name: str
    offset: int
    data: bytes
    split: str  # "train", "val" or BOTH
    val_fraction: float | None


def read_chunks(path: Path, chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
    """``(offset, bytes)`` pieces of a file, about ``chunk_bytes`` each, every one ending just
    after a separator line (the last one at the end of the file), so no story is ever cut."""
    offset, carry = 0, b""
    with path.open("rb") as handle:
        while block := handle.read(chunk_bytes):
            buffer = carry + block
            cut = _end_of_last_separator(buffer)
            if cut == 0 and len(buffer) > MAX_STORY_BYTES:
                raise DataError(
                    f"{path}: no line holding only {END_OF_TEXT} in {len(buffer):,} bytes from "
                    f"byte offset {offset:,}; stories must each be followed by one"
                )
            if cut:
                yield offset, buffer[:cut]
                offset += cut
            carry = buffer[cut:]
    # At the end of the file a separator line needs no newline of its own.
    if offset == 0 and not _end_of_last_separator(carry + b"\n"):
        raise DataError(
            f"{path} holds no line with only {END_OF_TEXT}: TinyStories text follows each "
            f"story with one"
        )
    if carry:
        yield offset, carry


def _end_of_last_separator(buffer: bytes) -> int:
    """Where the last complete separator line in ``buffer`` ends (after its newline), or 0."""
    end = len(buffer)
    while (found := buffer.rfind(_SEPARATOR_BYTES, 0, end)) >= 0:
        line_start = buffer.rfind(b"\n", 0, found) + 1
        line_end = buffer.find(b"\n", found)
        if line_end >= 0 and buffer[line_start:line_end].strip(_LINE_SPACE) == _SEPARATOR_BYTES:
            return line_end + 1
        end = found  # "<|endoftext|>" inside a line of text, or a line not yet complete
    return 0


def goes_to_val(story: str, val_fraction: float) -> bool:
    """Whether a single file's (stripped) story goes to val: see the module docstring."""
    digest = hashlib.blake2b(story.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64


def encode_chunk(chunk: Chunk) -> dict[str, np.ndarray]:
    """The chunk's stories as token ids per split, ``<|endoftext|>`` after each story."""
    try:
        text = chunk.data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{chunk.name}: invalid UTF-8 at byte offset {chunk.offset + error.start:,}"
        ) from None
    stories: dict[str, list[str]] = {split: [] for split in SPLITS}
    for piece in _SEPARATOR.split(text):
        story = piece.strip()
        if not story:
            continue
        split = chunk.split
        if split == BOTH:
            assert chunk.val_fraction is not None
            split = "val" if goes_to_val(story, chunk.val_fraction) else "train"
        stories[split].append(story)
    return {split: _tokens(texts) for split, texts in stories.items()}


def _tokens(stories: list[str]) -> np.ndarray:
    # The processes are the parallelism. tiktoken's encode_ordinary_batch would hand each story
    # to a thread pool, which on one thread per process is 1.7x slower than this plain loop.
    tokenizer = get_tokenizer()
    ids = [tokenizer.encode(story) for story in stories]
    for story in ids:
        story.append(EOT_ID)
    return np.fromiter(itertools.chain.from_iterable(ids), DTYPE, count=sum(map(len, ids)))


def _init_worker() -> None:
    # Ctrl-C reaches the whole process group; the parent alone handles it and stops the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    get_tokenizer()


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent was killed (SIGKILL, the OOM killer) would wait on its task queue
    forever, since it holds that pipe's other end itself: leave once the parent is gone."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _encode_in_order(
    chunks: Iterable[Chunk], workers: int
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """``(chunk size, tokens)`` for each chunk, in input order, encoded in ``workers`` processes
    with at most two chunks per worker in flight, so memory stays bounded on any file size."""
    pool = ProcessPoolExecutor(workers, initializer=_init_worker)
    pending: deque[tuple[int, Future[dict[str, np.ndarray]]]] = deque()
    try:
        for chunk in chunks:
            pending.append((len(chunk.data), pool.submit(encode_chunk, chunk)))
            if len(pending) >= 2 * workers:
                size, future = pending.popleft()
                yield size, future.result()
        while pending:
            size, future = pending.popleft()
            yield size, future.result()
    finally:
        pool.shutdown(cancel_futures=True)


# --- writing: temporaries, then renames, then the manifest ------------------------------------


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


def _chunks(inputs: list[_Input], chunk_bytes: int, val_fraction: float | None) -> Iterator[Chunk]:
    for item in inputs:
        for offset, data in read_chunks(item.path, chunk_bytes):
            yield Chunk(item.name, offset, data, item.split, val_fraction)


def _write_splits(
    inputs: list[_Input],
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
            for size, tokens in _encode_in_order(
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


# --- the entry point -------------------------------------------------------------------------


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
) -> Prepared:
    """Tokenize ``source`` into ``out_dir`` (see the module docstring for sources and format).

    Does nothing when ``out_dir`` already holds a finished preparation of the same source files
    (by sha256; a URL is downloaded again to be checked) with the same settings.
    ``val_fraction`` applies to single-file sources only; ``workers`` (default: every CPU) and
    ``chunk_bytes`` change the speed, never the output.
    ``quiet`` hides the progress bars (stderr).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    workers = default_workers() if workers is None else workers
    if workers < 1 or chunk_bytes < 1:
        raise ValueError(f"workers and chunk_bytes must be positive, got {workers}, {chunk_bytes}")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    get_tokenizer()  # a missing vocabulary fails here, before any download
    inputs = _resolve(str(source), out_dir, quiet)
    try:
        files = tuple(_describe(item) for item in inputs)
        fraction = val_fraction if any(item.split == BOTH for item in inputs) else None
        previous = _finished_manifest(out_dir)
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
            source=str(source),
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

"""Text → token ids: files cut into chunks at separator lines, encoded in worker processes.

Text format: each story is followed by a line holding only ``<|endoftext|>`` (spaces, tabs and
``\\r`` around it are allowed); text after the last such line counts as a story too. Stories are
stripped of surrounding whitespace and empty ones skipped. The file is streamed in chunks cut at
separator lines and tokenized in worker processes, so memory stays bounded on the 2.2 GB train file.

A single file (a source whose split is ``both``) is split story by story: a story goes to val when
the first 8 bytes of the BLAKE2b digest of its stripped UTF-8 text, read as a big-endian number,
fall below ``val_fraction`` × 2**64 (``goes_to_val``). The rule looks at the story alone, so it
does not depend on chunk size or worker count, and duplicate stories all land on one side.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.tokenizer import END_OF_TEXT, get_tokenizer
from worker.data.manifest import BOTH, DTYPE, EOT_ID, SPLITS, DataError

DEFAULT_CHUNK_BYTES = 1 << 20
# A story is about 1 KB; a file with no separator line in this many bytes is not TinyStories text,
# and refusing it keeps memory bounded.
MAX_STORY_BYTES = 64 << 20
_SEPARATOR = re.compile(r"^[ \t\r]*<\|endoftext\|>[ \t\r]*$", re.MULTILINE)
_SEPARATOR_BYTES = END_OF_TEXT.encode()
_LINE_SPACE = b" \t\r"


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


def encode_in_order(
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

"""GPT-2's BPE through tiktoken (``r50k_base``), with an offline way to fill tiktoken's cache.

tiktoken downloads ``r50k_base.tiktoken`` on first use and keeps it in its own cache
(``$TIKTOKEN_CACHE_DIR``, else ``$DATA_GYM_CACHE_DIR``, else ``<tmp>/data-gym-cache``) under the
SHA-1 of the download URL, checking the file's SHA-256. Machines without internet fill that
same cache with ``slm fetch-vocab``, which takes the identical file from the openai-whisper
source distribution on PyPI (``whisper/assets/gpt2.tiktoken``), so tiktoken never knows the
difference.

Every vocabulary is GPT-2's BPE, perhaps with fewer merges (``model.config.VOCABULARIES``): its
first ``vocab_size - 1`` tokens and ``<|endoftext|>`` as the last id, built from r50k's rank
table (tiktoken's documented way to extend an encoding). BPE with a prefix of the merges
applies them in the same order and stops earlier, so a GPT-2 token's bytes split, under a
smaller vocabulary, exactly as that token's text does in context: ``Tokenizer.from_gpt2``
turns prepared GPT-2 ids into a smaller vocabulary's without the text.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
import tiktoken

from model.atomic import atomic_write_bytes
from model.config import GPT2_VOCAB_SIZE, VOCAB_SIZE_RANGE, is_vocab_size, vocabulary_name

ENCODING_NAME = "r50k_base"
VOCAB_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
VOCAB_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
WHISPER_REQUIREMENT = "openai-whisper==20250625"
WHISPER_VOCAB_MEMBER = "whisper/assets/gpt2.tiktoken"
FETCH_COMMAND = "slm fetch-vocab"
END_OF_TEXT = "<|endoftext|>"


class TokenizerUnavailable(RuntimeError):
    """The GPT-2 vocabulary is neither in tiktoken's cache nor downloadable."""


def tiktoken_cache_dir() -> Path:
    """The folder tiktoken reads its cache from, resolved exactly as tiktoken does."""
    for variable in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if variable in os.environ:
            return Path(os.environ[variable])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def cached_vocab_path() -> Path:
    return tiktoken_cache_dir() / hashlib.sha1(VOCAB_URL.encode()).hexdigest()


def install_vocab(source: Path | None = None) -> Path:
    """Put GPT-2's vocabulary into tiktoken's cache and return where it went.

    ``source`` is a ``gpt2.tiktoken`` / ``r50k_base.tiktoken`` file or an openai-whisper sdist
    (``.tar.gz``); without one, the sdist is fetched from PyPI with ``pip download`` (whisper is
    never installed). The file must match tiktoken's SHA-256 or nothing is written.
    """
    if source is None:
        with tempfile.TemporaryDirectory() as folder:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    "--dest",
                    folder,
                    WHISPER_REQUIREMENT,
                ],
                check=True,
            )
            (sdist,) = Path(folder).glob("*.tar.gz")
            return install_vocab(sdist)
    data = _read_vocab(Path(source))
    digest = hashlib.sha256(data).hexdigest()
    if digest != VOCAB_SHA256:
        raise ValueError(
            f"{source} is not GPT-2's r50k_base vocabulary: "
            f"sha256 {digest}, expected {VOCAB_SHA256}"
        )
    target = cached_vocab_path()
    atomic_write_bytes(target, data)
    return target


def _read_vocab(source: Path) -> bytes:
    if not source.is_file():
        raise FileNotFoundError(f"vocabulary source {source} does not exist")
    if not tarfile.is_tarfile(source):
        return source.read_bytes()
    with tarfile.open(source) as archive:
        for member in archive.getmembers():
            if member.isfile() and member.name.endswith(WHISPER_VOCAB_MEMBER):
                extracted = archive.extractfile(member)
                assert extracted is not None
                return extracted.read()
    raise ValueError(f"{source} holds no {WHISPER_VOCAB_MEMBER}")


class Tokenizer:
    """Text ↔ token ids of one vocabulary of ``vocab_size`` tokens; ``<|endoftext|>`` (the last
    id: 50256 for all of GPT-2) separates stories."""

    def __init__(self, vocab_size: int = GPT2_VOCAB_SIZE) -> None:
        if not is_vocab_size(vocab_size):
            raise ValueError(f"a GPT-2 vocabulary has {VOCAB_SIZE_RANGE}, not {vocab_size}")
        gpt2 = _gpt2_encoding()
        if vocab_size == GPT2_VOCAB_SIZE:
            self._encoding = gpt2
        else:
            self._encoding = tiktoken.Encoding(
                name=f"{ENCODING_NAME}-{vocab_size}",
                pat_str=gpt2._pat_str,
                mergeable_ranks={
                    gpt2.decode_single_token_bytes(rank): rank for rank in range(vocab_size - 1)
                },
                special_tokens={END_OF_TEXT: vocab_size - 1},
            )
        self.name = vocabulary_name(vocab_size)
        self.eot_id = self._encoding.eot_token
        self.n_vocab = self._encoding.n_vocab
        self._texts: list[str] | None = None
        self._splits: tuple[np.ndarray, np.ndarray] | None = None  # see _gpt2_splits

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; a literal "<|endoftext|>" in user text is just text."""
        return self._encoding.encode_ordinary(text)

    def encode_with_special(self, text: str) -> list[int]:
        """Text to ids as Hugging Face's tokenizer reads it: "<|endoftext|>" is ``eot_id``.
        For clients that learn the special token's id by tokenizing its text (lm-eval)."""
        return self._encoding.encode(text, allowed_special="all")

    def decode(self, ids: list[int]) -> str:
        return self._encoding.decode(ids, errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._encoding.decode_single_token_bytes(token_id)

    def token_text(self, token_id: int) -> str:
        """One token's text on its own (a lone byte of a longer character shows as U+FFFD).
        Log-probability answers name every token and its alternatives: a table built once
        (50,257 strings, ~0.1 s) beats a decode call per name."""
        if self._texts is None:
            self._texts = [self.decode([token]) for token in range(self.n_vocab)]
        return self._texts[token_id]

    def ranks(self) -> dict[bytes, int]:
        """Every token but ``<|endoftext|>`` as bytes, with its id (which is its merge rank)."""
        return {self.token_bytes(token_id): token_id for token_id in range(self.eot_id)}

    def from_gpt2(self, ids: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
        """GPT-2 token ids (a prepared dataset's) as this vocabulary's, as uint16 — what
        encoding their text would give, without the text: each GPT-2 token becomes the tokens
        its bytes split into. Chunked, so a memory-mapped split is never held whole as int64 ids
        (it is read twice: once to size the output, once to fill it)."""
        if self.n_vocab == GPT2_VOCAB_SIZE:
            return np.asarray(ids)
        offsets, pieces = self._gpt2_splits()
        lengths = np.diff(offsets)
        chunks = range(0, len(ids), chunk)
        total = sum(int(lengths[ids[start : start + chunk]].sum()) for start in chunks)
        out = np.empty(total, dtype=np.uint16)
        written = 0
        for start in chunks:
            part = np.asarray(ids[start : start + chunk], dtype=np.int64)
            counts = lengths[part]
            ends = np.cumsum(counts)
            # Position j of the output reads pieces[offsets[token] + (j - where token starts)].
            index = np.repeat(offsets[part] - (ends - counts), counts) + np.arange(ends[-1])
            out[written : written + ends[-1]] = pieces[index]
            written += int(ends[-1])
        return out

    def _gpt2_splits(self) -> tuple[np.ndarray, np.ndarray]:
        """``(offsets, pieces)``: GPT-2 id ``i`` becomes ``pieces[offsets[i]:offsets[i + 1]]``,
        built once. An id below the cut is its own token; each longer GPT-2 token's bytes are
        byte-pair encoded with this vocabulary's merges, lowest rank first and leftmost on ties,
        as tiktoken does within a piece of text."""
        if self._splits is None:
            gpt2 = _gpt2_encoding()
            ranks = self.ranks()
            splits = [[i] for i in range(self.eot_id)]
            splits += [
                _byte_pair_encode(gpt2.decode_single_token_bytes(i), ranks)
                for i in range(self.eot_id, gpt2.eot_token)
            ]
            splits.append([self.eot_id])
            offsets = np.zeros(len(splits) + 1, dtype=np.int64)
            np.cumsum([len(split) for split in splits], out=offsets[1:])
            pieces = np.fromiter(
                (token for split in splits for token in split),
                dtype=np.int64,
                count=int(offsets[-1]),
            )
            self._splits = offsets, pieces
        return self._splits

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


def _byte_pair_encode(token: bytes, ranks: dict[bytes, int]) -> list[int]:
    """``token``'s ids under ``ranks``: merge the adjacent pair of lowest rank until none is
    in the table."""
    parts = [bytes([byte]) for byte in token]
    while len(parts) > 1:
        pair_ranks = [ranks.get(parts[i] + parts[i + 1]) for i in range(len(parts) - 1)]
        candidates = [(rank, i) for i, rank in enumerate(pair_ranks) if rank is not None]
        if not candidates:
            break
        _, index = min(candidates)
        parts[index : index + 2] = [parts[index] + parts[index + 1]]
    return [ranks[part] for part in parts]


@cache
def _gpt2_encoding() -> tiktoken.Encoding:
    try:
        return tiktoken.get_encoding(ENCODING_NAME)
    except Exception as error:  # tiktoken raises requests/OS/hash errors alike
        raise TokenizerUnavailable(
            f"GPT-2's vocabulary ({ENCODING_NAME}) is not in tiktoken's cache "
            f"({cached_vocab_path()}) and could not be downloaded ({error}). "
            f"Run `{FETCH_COMMAND}` to install it offline from PyPI."
        ) from error


def get_tokenizer(vocab_size: int = GPT2_VOCAB_SIZE) -> Tokenizer:
    """The process-wide tokenizer of a vocabulary (building one takes a fraction of a second):
    one object per size, however it is asked for, so tokenizers compare by identity."""
    return _tokenizer_of(vocab_size)


@cache
def _tokenizer_of(vocab_size: int) -> Tokenizer:
    return Tokenizer(vocab_size)


class StreamDecoder:
    """Turns token ids into text pieces as they arrive.

    GPT-2 tokens are byte sequences, and one UTF-8 character (an emoji, a CJK ideograph) can be
    split over several tokens. An incremental UTF-8 decoder holds incomplete bytes back until the
    character completes, and replaces invalid bytes exactly as a one-shot decode does, so the
    pieces joined always equal ``Tokenizer.decode`` of all ids.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """The text still held back, when the stream ends (incomplete bytes become U+FFFD)."""
        return self._decoder.decode(b"", final=True)

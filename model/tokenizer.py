"""GPT-2's BPE through tiktoken (``r50k_base``), with an offline way to fill tiktoken's cache.

tiktoken downloads ``r50k_base.tiktoken`` on first use and keeps it in its own cache
(``$TIKTOKEN_CACHE_DIR``, else ``$DATA_GYM_CACHE_DIR``, else ``<tmp>/data-gym-cache``) under the
SHA-1 of the download URL, checking the file's SHA-256. Machines without internet fill that
same cache with ``slm fetch-vocab``, which takes the identical file from the openai-whisper
source distribution on PyPI (``whisper/assets/gpt2.tiktoken``), so tiktoken never knows the
difference.
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

import tiktoken

from model.atomic import atomic_write_bytes

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
    """Text ↔ GPT-2 token ids. ``<|endoftext|>`` (id 50256) separates stories."""

    def __init__(self) -> None:
        try:
            self._encoding = tiktoken.get_encoding(ENCODING_NAME)
        except Exception as error:  # tiktoken raises requests/OS/hash errors alike
            raise TokenizerUnavailable(
                f"GPT-2's vocabulary ({ENCODING_NAME}) is not in tiktoken's cache "
                f"({cached_vocab_path()}) and could not be downloaded ({error}). "
                f"Run `{FETCH_COMMAND}` to install it offline from PyPI."
            ) from error
        self.eot_id = self._encoding.eot_token
        self.n_vocab = self._encoding.n_vocab
        self._texts: list[str] | None = None

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; a literal "<|endoftext|>" in user text is just text."""
        return self._encoding.encode_ordinary(text)

    def encode_with_special(self, text: str) -> list[int]:
        """Text to ids as Hugging Face's GPT-2 tokenizer reads it: "<|endoftext|>" is id 50256.
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

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


@cache
def get_tokenizer() -> Tokenizer:
    """The process-wide tokenizer (loading the vocabulary takes a fraction of a second)."""
    return Tokenizer()


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

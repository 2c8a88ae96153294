"""GPT-2 BPE through tiktoken: known ids, streaming text, offline vocabulary install."""

from __future__ import annotations

import importlib.metadata
import io
import os
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from servers import REPO

from model.tokenizer import (
    VOCAB_SHA256,
    WHISPER_VOCAB_MEMBER,
    Tokenizer,
    cached_vocab_path,
    get_tokenizer,
    install_vocab,
)

TEXTS = [
    "Once upon a time there was a pumpkin.",
    "Café, naïve, jalapeño, Ærø, Œuvre, ß",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "Emoji: 😀🎃👩‍👩‍👧‍👦 🏳️‍🌈 and flags 🇯🇵",
    "Tabs\tand   spaces\n\n\nnew lines",
    "A literal <|endoftext|> in user text",
]


def test_known_ids(tokenizer) -> None:
    ids = tokenizer.encode("Once upon a time there was a pumpkin.")
    assert ids == [7454, 2402, 257, 640, 612, 373, 257, 30089, 13]
    assert tokenizer.eot_id == 50256 and tokenizer.n_vocab == 50257


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_user_text_never_produces_the_end_of_text_token(tokenizer) -> None:
    assert tokenizer.eot_id not in tokenizer.encode("A literal <|endoftext|> here")


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_are_whole_characters_and_join_to_the_text(tokenizer, text) -> None:
    ids = tokenizer.encode(text)
    stream = tokenizer.stream_decoder()
    pieces = [stream.push(token) for token in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_a_character_split_across_tokens_is_held_back_until_complete(tokenizer) -> None:
    ids = tokenizer.encode(" 😀")
    assert len(ids) > 1  # the emoji's four bytes span several tokens
    stream = tokenizer.stream_decoder()
    pieces = [stream.push(token) for token in ids]
    assert pieces[-1].endswith("😀") and "".join(pieces) == " 😀"
    assert all("😀" not in piece and "\ufffd" not in piece for piece in pieces[:-1])


def test_broken_utf8_streams_exactly_as_the_full_decode_replaces_it(tokenizer) -> None:
    # Lone continuation bytes, a truncated emoji and a lead byte at the very end.
    emoji = tokenizer.encode("😀")
    ids = [*tokenizer.encode("a"), 126, *emoji[:1], *tokenizer.encode("b"), *emoji, *emoji[:1]]
    stream = tokenizer.stream_decoder()
    pieces = [stream.push(token) for token in ids] + [stream.flush()]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert "\ufffd" in tokenizer.decode(ids)


def test_real_tinystories_text_round_trips(tokenizer, shared_data) -> None:
    text = (shared_data / "tinystories-valid.txt").read_text(encoding="utf-8")
    ids = tokenizer.encode(text)
    assert len(ids) == 202_559  # as counted in ../shared/data/README.md
    assert tokenizer.decode(ids) == text


def whisper_sdist_stand_in(folder: Path, vocab: bytes) -> Path:
    """An sdist laid out like openai-whisper's, holding the given vocabulary file."""
    path = folder / "openai_whisper-20250625.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo(f"openai_whisper-20250625/{WHISPER_VOCAB_MEMBER}")
        info.size = len(vocab)
        archive.addfile(info, io.BytesIO(vocab))
    return path


def isolated_env(cache_dir: Path) -> dict[str, str]:
    """An environment with an empty tiktoken cache and a dead proxy: no network either."""
    env = {key: value for key, value in os.environ.items() if "CACHE_DIR" not in key}
    dead = "http://127.0.0.1:9"  # the discard port: connection refused at once
    env.update(TIKTOKEN_CACHE_DIR=str(cache_dir), HTTPS_PROXY=dead, HTTP_PROXY=dead)
    env.update(https_proxy=dead, http_proxy=dead)
    return env


LOAD = "from model.tokenizer import Tokenizer; print(Tokenizer().encode('Once upon'))"


def test_without_vocab_or_network_the_error_names_the_command(tmp_path) -> None:
    env = isolated_env(tmp_path / "empty-cache")
    result = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "slm fetch-vocab" in result.stderr
    assert "TokenizerUnavailable" in result.stderr


def test_fetch_vocab_fills_tiktokens_own_cache_from_an_sdist(tmp_path) -> None:
    vocab = cached_vocab_path().read_bytes()
    sdist = whisper_sdist_stand_in(tmp_path, vocab)
    cache_dir = tmp_path / "cache"
    env = isolated_env(cache_dir)
    slm = Path(sys.executable).with_name("slm")
    installed = subprocess.run(
        [str(slm), "fetch-vocab", "--source", str(sdist)], env=env, capture_output=True, text=True
    )
    assert installed.returncode == 0, installed.stderr
    assert len(list(cache_dir.iterdir())) == 1
    # tiktoken itself now loads offline, with its own hash check, from the filled cache.
    result = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True)
    assert result.stdout.strip() == "[7454, 2402]", result.stderr


def test_a_file_with_the_wrong_hash_is_refused_and_nothing_is_written(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    bogus = whisper_sdist_stand_in(tmp_path, b"not a vocabulary\n")
    with pytest.raises(ValueError, match=VOCAB_SHA256):
        install_vocab(bogus)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    with pytest.raises(FileNotFoundError):
        install_vocab(tmp_path / "missing.tar.gz")


def test_tiktoken_is_required_at_a_release_that_encodes_long_runs_quickly() -> None:
    # Before 0.13, one prompt of a character repeated a million times tied up the tokenizer.
    with (REPO / "pyproject.toml").open("rb") as file:
        dependencies = tomllib.load(file)["project"]["dependencies"]
    (required,) = [Requirement(d) for d in dependencies if Requirement(d).name == "tiktoken"]
    assert "0.12.0" not in required.specifier and "0.13.0" in required.specifier
    assert importlib.metadata.version("tiktoken") in required.specifier


# --- GPT-2's first merges -------------------------------------------------------------------

CUT_SIZES = [4096, 8192, 16384]


@pytest.mark.parametrize("size", CUT_SIZES)
def test_fewer_merges_keep_gpt2s_ids_below_the_cut(size: int) -> None:
    full, cut = get_tokenizer(), get_tokenizer(size)
    assert (cut.n_vocab, cut.eot_id) == (size, size - 1)
    assert cut.name == {4096: "gpt2-4k", 8192: "gpt2-8k", 16384: "gpt2-16k"}[size]
    assert all(cut.token_bytes(i) == full.token_bytes(i) for i in range(0, size - 1, 7))
    for text in TEXTS:
        ids = cut.encode(text)
        assert max(ids, default=0) < size - 1 and cut.decode(ids) == text
    # More merges never give more tokens.
    assert len(cut.encode(TEXTS[0])) >= len(full.encode(TEXTS[0]))
    assert cut.encode_with_special("The end.<|endoftext|>")[-1] == size - 1


@pytest.mark.parametrize("size", [257, *CUT_SIZES])
def test_gpt2_ids_remapped_equal_encoding_the_text_with_fewer_merges(size: int) -> None:
    full, cut = get_tokenizer(), get_tokenizer(size)
    stories = TEXTS + [text.upper() for text in TEXTS]
    gpt2_ids = [token for story in stories for token in [full.eot_id, *full.encode(story)]]
    direct = [token for story in stories for token in [cut.eot_id, *cut.encode(story)]]
    remapped = cut.from_gpt2(np.array(gpt2_ids, dtype=np.uint16), chunk=5)
    assert remapped.dtype == np.uint16 and remapped.tolist() == direct


def test_remapping_tinystories_equals_encoding_it_directly(shared_data) -> None:
    full = get_tokenizer()
    text = (shared_data / "tinystories-valid.txt").read_text(encoding="utf-8")
    stories = [story.strip() for story in text.split("<|endoftext|>") if story.strip()]
    gpt2_ids = np.array(
        [token for story in stories for token in [full.eot_id, *full.encode(story)]],
        dtype=np.uint16,
    )
    for size in CUT_SIZES:
        cut = get_tokenizer(size)
        direct = [token for story in stories for token in [cut.eot_id, *cut.encode(story)]]
        assert cut.from_gpt2(gpt2_ids).tolist() == direct, size


@pytest.mark.parametrize("size", [256, 50258, 0])
def test_a_size_that_is_no_gpt2_vocabulary_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match="257 to 50257"):
        Tokenizer(size)

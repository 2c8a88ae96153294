"""Shared fixtures: the real GPT-2 tokenizer and small models with decisive weights; and a check
that the suite leaves no process behind."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# The suite decodes eager unless a test asks for the compiled step (tests/test_decode_step.py):
# every server and engine it starts would otherwise compile in the background, on a CPU the
# tests share. Set before any import of the settings; servers inherit it.
os.environ.setdefault("COMPILE_DECODE", "false")
from servers import redis_server
from shared import SHARED_DATA
from weights import sharp_model

from model import GPT, preset
from model.tokenizer import Tokenizer, get_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return get_tokenizer()


@pytest.fixture
def tiny_model() -> GPT:
    return sharp_model(preset("tiny"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data (TinyStories excerpts) is not present on this machine")
    return SHARED_DATA


@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> Path:
    """A prepared data folder for the trainer: the real TinyStories excerpts where this machine
    has them, else stories this fixture writes (so training tests never skip)."""
    from worker.data import prepare

    out = tmp_path_factory.mktemp("train-data")
    if SHARED_DATA.is_dir():
        prepare(SHARED_DATA, out, quiet=True)
        return out
    source = tmp_path_factory.mktemp("stories")
    names = ["Tom", "Mia", "Ben", "Lily", "Sam"]
    things = ["a red ball", "a small dog", "a big tree", "a blue kite", "a funny hat"]
    for split, count in (("train", 400), ("valid", 60)):
        stories = [
            f"Once upon a time, {names[i % 5]} found {things[i // 5 % 5]}. "
            f"{names[i % 5]} was very happy and played with it all day. The end."
            for i in range(count)
        ]
        (source / f"stories-{split}.txt").write_text("\n<|endoftext|>\n".join(stories) + "\n")
    prepare(source, out, quiet=True)
    return out


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A real Redis for the session (see servers.redis_server)."""
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def _leftovers() -> list[str]:
    """Live processes of this session's process group (what tests started, servers and workers
    and their children, orphans included: a process keeps its group when its parent dies), except
    pytest itself and the processes that started it."""
    group, ancestors, pid = os.getpgid(0), set(), os.getpid()
    while pid > 1:
        ancestors.add(pid)
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            state, process_group = fields[0], int(fields[2])
            if process_group == group and int(entry.name) not in ancestors and state != "Z":
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{entry.name}: {command.strip()}")
        except (OSError, ValueError, IndexError):  # not a process, or it just exited
            continue
    return found


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The suite leaves nothing running (an `slm prepare` pool once outlived its killed parent
    for minutes): fail the session if a process it started is still alive a few seconds on."""
    if not Path("/proc/self/stat").exists():  # Linux only
        return
    deadline = time.monotonic() + 10
    while (left := _leftovers()) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        print("\nprocesses the tests left running:\n  " + "\n  ".join(left))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

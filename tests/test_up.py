"""A supervisor that dies takes its children along: `slm up` stopped by SIGHUP (the terminal
closed) or killed with `kill -9` leaves no embedded Redis, worker or API behind, and a job that
was training saves a checkpoint first; a work horse whose worker is killed does the same. The
children of `slm up` run in sessions of their own, so conftest's process-group check would miss
them: each test watches the pids it learned from /proc, and kills what is left."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import httpx
import pytest
import redis
from servers import (
    Stack,
    alive,
    descendants,
    start_stack,
    stop_stack,
    wait_for,
)
from workers import jobs_env, link_dataset, tiny_spec, worker_process

from contract.jobs import TrainJobSpec
from contract.settings import Settings
from contract.store import TrainJobs
from model.checkpoint import latest_checkpoint, read_meta

EXIT_S = 20  # SIGTERM to a training worker: a step, a checkpoint, then Redis and the API
LONG_JOB = {"max_steps": 100_000, "checkpoint_interval": 100_000, "eval_interval": 100_000}


@pytest.fixture
def watched() -> Iterator[set[int]]:
    """Pids a test learned; whatever of them still runs at its end is killed."""
    pids: set[int] = set()
    yield pids
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def family(stack: Stack, watched: set[int]) -> set[int]:
    """Every process under `slm up` once its three children run (Redis, the worker, the API)."""

    def all_started() -> set[int] | None:
        pids = descendants(stack.process.pid)
        return pids if len(pids) >= 3 else None

    found = wait_for(all_started, 30, "slm up's children")
    watched |= found
    return found


def left_running(pids: set[int]) -> list[int]:
    return sorted(pid for pid in pids if alive(pid))


def wait_gone(pids: set[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while left_running(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left_running(pids), f"still running: {left_running(pids)}"


def training(stack: Stack, run: str) -> int:
    """Submit a long job to `slm up`, wait for it to train, and return the step it reached."""
    with httpx.Client(base_url=stack.base_url, timeout=10) as client:
        response = client.post("/train-jobs", json=tiny_spec(run, **LONG_JOB))
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]

        def step() -> int:
            return client.get(f"/train-jobs/{job_id}").json()["step"]

        wait_for(lambda: step() >= 3, 120, f"job {job_id} to train", interval=0.2)
        return step()


def test_sighup_stops_slm_up_and_all_its_children_cleanly(tmp_path, train_data, watched) -> None:
    stack = start_stack(tmp_path, train_data)
    children = family(stack, watched)
    stack.process.send_signal(signal.SIGHUP)
    assert stack.process.wait(60) == 0, stack.output()
    assert "slm up: stopping" in stack.output()
    assert left_running(children) == []


def test_the_children_of_a_killed_slm_up_exit_and_free_its_port(
    tmp_path, train_data, watched
) -> None:
    stack = start_stack(tmp_path / "first", train_data)
    children = family(stack, watched)
    stack.process.kill()
    stack.process.wait()
    wait_gone(children, EXIT_S)
    port = int(stack.base_url.rsplit(":", 1)[1])
    again = start_stack(tmp_path / "again", train_data, port=port)  # /health: its own API
    watched |= descendants(again.process.pid)
    assert stop_stack(again) == 0, again.output()


def test_a_job_training_under_a_killed_slm_up_saves_a_checkpoint_and_ends(
    tmp_path, train_data, watched
) -> None:
    stack = start_stack(tmp_path, train_data)
    family(stack, watched)
    step_at_kill = training(stack, "orphan-run")
    watched |= descendants(stack.process.pid)  # the work horse too
    children = set(watched)
    stack.process.kill()
    stack.process.wait()
    wait_gone(children, EXIT_S)
    checkpoint = latest_checkpoint(stack.checkpoint_dir / "orphan-run")
    assert checkpoint is not None, "no checkpoint saved on the way out"
    assert read_meta(checkpoint).step >= step_at_kill


def test_a_work_horse_whose_worker_is_killed_saves_a_checkpoint_and_exits(
    redis_url, train_data, tmp_path, watched
) -> None:
    env = jobs_env(redis_url, tmp_path)
    link_dataset(env, train_data)
    settings = Settings(queue_name=env["QUEUE_NAME"], data_dir=Path(env["DATA_DIR"]))
    with redis.Redis.from_url(env["REDIS_URL"]) as connection:
        jobs = TrainJobs(connection, settings)
        with worker_process(env, tmp_path) as doomed:
            spec = TrainJobSpec.model_validate(tiny_spec("horse-run", **LONG_JOB))
            job_id = jobs.submit(spec).job.id
            wait_for(lambda: jobs.fetch(job_id).progress.step >= 3, 120, "the job to train")
            horse = doomed.horse_pid()
            assert horse is not None
            watched.add(horse)
            step_at_kill = jobs.fetch(job_id).progress.step
            doomed.kill()
            wait_gone({horse}, EXIT_S)
    checkpoint = latest_checkpoint(Path(env["CHECKPOINT_DIR"]) / "horse-run")
    assert checkpoint is not None, "the orphaned horse exited without a checkpoint"
    assert read_meta(checkpoint).step >= step_at_kill

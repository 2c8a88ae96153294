"""The worker side without HTTP: the embedded Redis, `slm worker` itself, and the progress a job
writes into its RQ meta."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest
import redis
from rq.job import Job
from rq.serializers import JSONSerializer
from workers import SLM

from contract.broker import connect, default_state_dir, embedded_redis
from contract.jobs import (
    HISTORY_LIMIT,
    JOB_FUNCTION,
    PROGRESS_META_KEY,
    JobProgress,
    TrainJobSpec,
)
from contract.settings import Settings
from contract.train import TrainProgress
from worker.jobs import ProgressReport


def test_an_embedded_redis_is_shared_guarded_by_a_password_and_stopped(tmp_path):
    with embedded_redis(tmp_path / "state") as url:
        client = connect(Settings(redis_url=url))
        client.set("greeting", "hello")
        with embedded_redis(tmp_path / "state") as second:  # a second user reuses the server
            assert second == url
        assert client.get("greeting") == b"hello"  # ...and leaving does not stop it
        without_password = "redis://" + url.split("@", 1)[1]
        with pytest.raises(redis.AuthenticationError):
            connect(Settings(redis_url=without_password)).get("greeting")
        client.close()
    with pytest.raises(redis.ConnectionError):
        connect(Settings(redis_url=url)).ping()


def test_slm_worker_without_redis_url_starts_an_embedded_redis(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "REDIS_URL"}
    env["CHECKPOINT_DIR"] = str(tmp_path / "checkpoints")
    run = subprocess.run(
        [SLM, "worker", "--burst"], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert "embedded Redis" in run.stdout and "REDIS_URL=redis://" in run.stdout
    state = default_state_dir(Settings(checkpoint_dir=tmp_path / "checkpoints"))
    assert state == tmp_path / ".slm" / "redis" and (state / "redis.conf").is_file()
    assert not (state / "redis.json").exists()  # the worker stopped its Redis on the way out


def step(number: int, max_steps: int) -> TrainProgress:
    return TrainProgress(
        step=number,
        max_steps=max_steps,
        train_loss=10.0 - number / max_steps,
        val_loss=None,
        lr=1e-3,
        tokens_seen=number * 256,
        tokens_per_s=1000.0,
        eta_s=float(max_steps - number),
        last_checkpoint=None,
    )


def saved_job(connection: redis.Redis, spec: TrainJobSpec) -> Job:
    """A job as the API stores it (JSON-serialized spec), for a ProgressReport to write to."""
    job = Job.create(
        JOB_FUNCTION,
        args=(spec.model_dump_json(),),
        connection=connection,
        serializer=JSONSerializer,
        id=uuid.uuid4().hex,
    )
    job.save()
    return job


def test_a_long_history_is_thinned_keeping_its_start(redis_url):
    connection = redis.Redis.from_url(redis_url)
    spec = TrainJobSpec.model_validate(
        {"run_name": "long-run", "data": {"dataset": "stories"}, "train": {"eval_interval": 500}}
    )
    job = saved_job(connection, spec)
    report = ProgressReport(job, spec)
    for number in range(1, 5001):
        report.on_progress(step(number, 5000))

    stored = Job.fetch(job.id, connection=connection, serializer=JSONSerializer)
    progress = JobProgress.model_validate_json(stored.meta[PROGRESS_META_KEY])
    steps = [point.step for point in progress.history]
    assert HISTORY_LIMIT // 2 <= len(steps) <= HISTORY_LIMIT
    assert steps[0] == 1 and steps[-1] >= 5000 - progress.history_every
    assert steps == sorted(steps)
    every = progress.history_every
    assert every >= 5000 // HISTORY_LIMIT and every & (every - 1) == 0  # a power of two
    assert progress.step == 5000  # the last step is always saved: it ends the run


def test_resumed_progress_drops_the_steps_after_the_checkpoint(redis_url):
    connection = redis.Redis.from_url(redis_url)
    spec = TrainJobSpec.model_validate({"run_name": "again-run", "data": {"dataset": "stories"}})
    job = saved_job(connection, spec)
    first = ProgressReport(job, spec)
    for number in range(1, 26):
        first.on_progress(step(number, 100))
    first.save()

    resumed = ProgressReport(Job.fetch(job.id, connection, serializer=JSONSerializer), spec)
    resumed.on_start(step(20, 100))  # the trainer resumed from its checkpoint at step 20
    for number in range(21, 31):
        resumed.on_progress(step(number, 100))
    assert resumed.progress.resumed_from == 20
    assert [point.step for point in resumed.progress.history] == list(range(1, 31))

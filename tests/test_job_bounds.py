"""A job cannot ask for more than the server will serve, and a run belongs to the job that made
it: real API servers under uvicorn, real `slm worker` processes, a real Redis."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from servers import ApiServer, api_server, metric, write_checkpoint
from weights import sharp_model
from workers import jobs_env, link_dataset, tiny_spec, wait_for_job, worker_process

from contract.jobs import run_key
from contract.train import TrainConfig
from model import GPT, preset
from model.checkpoint import latest_checkpoint, save_checkpoint
from worker.trainer import TrainError, train

API_KEY = "test-job-bounds-key-0123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
JOB_TIMEOUT_S = 90  # a tiny job takes seconds; this is for a machine busy with other work
KV_CACHE_BYTES = 1 << 20  # the jobs API's: a tiny model (64 KiB a row) gets 16 rows
ENDED = ("finished", "failed", "stopped", "abandoned", "cancelled")
OWNED_SPEC = tiny_spec("owned-run", max_steps=10, checkpoint_interval=10)


@pytest.fixture(scope="module")
def env(redis_url: str, train_data: Path, tmp_path_factory) -> dict[str, str]:
    env = jobs_env(redis_url, tmp_path_factory.mktemp("bounds"))
    link_dataset(env, train_data)
    return {**env, "API_KEY": API_KEY, "KV_CACHE_BYTES": str(KV_CACHE_BYTES), "no_proxy": "*"}


@pytest.fixture(scope="module")
def api(env: dict[str, str], tmp_path_factory) -> Iterator[ApiServer]:
    with api_server(env, tmp_path_factory.mktemp("api")) as server:
        yield server


@pytest.fixture
def client(api: ApiServer) -> Iterator[httpx.Client]:
    with api.client(headers=AUTH, timeout=10) as client:
        yield client


def submit(client: httpx.Client, spec: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/train-jobs", json=spec)
    assert response.status_code == 202, response.text
    return response.json()


def ended(job: dict[str, Any]) -> bool:
    return job["state"] in ENDED


def claim_of(env: dict[str, str], run: str) -> bytes | None:
    with redis.Redis.from_url(env["REDIS_URL"]) as connection:
        return connection.get(run_key(env["QUEUE_NAME"], run))


@pytest.fixture(scope="module")
def finished_job(api: ApiServer, env: dict[str, str], tmp_path_factory) -> dict[str, Any]:
    """One tiny job trained to the end on run ``owned-run``."""
    with (
        worker_process(env, tmp_path_factory.mktemp("worker")),
        api.client(headers=AUTH, timeout=10) as client,
    ):
        job = submit(client, OWNED_SPEC)
        job = wait_for_job(client, job["id"], ended, JOB_TIMEOUT_S)
    assert job["state"] == "finished", job["message"]
    return job


# --- item 2: a job's model must fit what the server will allocate to serve it ---------------


@pytest.mark.parametrize(
    ("train", "field", "limit"),
    [
        ({"model_block_size": 4096}, "train.model_block_size", "MAX_MODEL_BLOCK_SIZE"),
        ({"n_layer": 64, "n_head": 64, "n_embd": 4096}, "train.n_layer", "MAX_MODEL_PARAMS"),
        ({"model_block_size": 2048}, "train.model_block_size", "KV_CACHE_BYTES"),
    ],
)
def test_a_model_larger_than_the_server_serves_is_422_naming_the_field_and_the_limit(
    client, train, field, limit
):
    response = client.post("/train-jobs", json=tiny_spec("huge-run", **train))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["code"] == "model_too_large"
    assert error["message"].startswith(f"{field}: ") and limit in error["message"]


@pytest.mark.parametrize(
    ("train", "field"),
    [
        ({"checkpoint_interval": 1}, "train.checkpoint_interval"),
        ({"keep_checkpoints": 1000}, "train.keep_checkpoints"),
    ],
)
def test_checkpoint_interval_and_keep_checkpoints_are_bounded_for_a_job(client, train, field):
    response = client.post("/train-jobs", json=tiny_spec("chatty-run", **train))
    assert response.status_code == 422, response.text
    assert field in response.json()["error"]["message"]


@pytest.fixture(scope="module")
def served_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("served")
    write_checkpoint(root / "run-good")
    return root


@pytest.fixture(scope="module")
def service(served_root: Path, tmp_path_factory) -> Iterator[ApiServer]:
    """A service whose KV budget holds 2 rows of a tiny model with 2048 positions (2 MiB each);
    reloads only when asked."""
    env = {
        "CHECKPOINT_DIR": str(served_root),
        "API_KEY": API_KEY,
        "KV_CACHE_BYTES": str(4 << 20),
        "MAX_BATCH_SIZE": "64",
        "RELOAD_POLL_S": "600",
        "no_proxy": "*",
    }
    with api_server(env, tmp_path_factory.mktemp("service"), ready_path="/ready") as server:
        yield server


def reload(service: ApiServer) -> dict[str, Any]:
    with service.client(headers=AUTH) as client:
        response = client.post("/admin/reload")
    assert response.status_code == 200, response.text
    return response.json()


def metrics(service: ApiServer) -> str:
    with service.client(headers=AUTH) as client:
        return client.get("/metrics").text


def story(service: ApiServer, model: str | None = None) -> httpx.Response:
    body = {"prompt": "Once upon a time", "max_new_tokens": 24, "stream": False, "model": model}
    with service.client(headers=AUTH, timeout=60) as client:
        return client.post("/generate", json=body)


def test_a_checkpoint_longer_than_the_server_serves_is_refused_and_the_old_model_serves(
    service, served_root
):
    before = reload(service)["model"]
    rejected = metric(metrics(service), 'slm_reloads_total{outcome="rejected"}', missing=0.0)
    endless = sharp_model(preset("tiny", block_size=4096))
    save_checkpoint(served_root / "run-endless", endless, step=1)

    report = reload(service)
    assert report["outcome"] == "rejected" and report["model"] == before
    assert "run-endless" in report["message"] and "MAX_MODEL_BLOCK_SIZE" in report["message"]
    assert str(served_root) not in report["message"]
    after = metric(metrics(service), 'slm_reloads_total{outcome="rejected"}', missing=0.0)
    assert after == rejected + 1
    assert "MAX_MODEL_BLOCK_SIZE" in service.output()  # logged
    answer = story(service)
    assert answer.status_code == 200 and answer.json()["model"] == before
    named = story(service, "run-endless")
    assert named.status_code == 503 and "MAX_MODEL_BLOCK_SIZE" in named.text


def test_a_long_model_decodes_only_the_rows_its_kv_budget_holds_and_answers_everyone(
    service, served_root
):
    long = sharp_model(preset("tiny", block_size=2048))
    version = f"run-long/{save_checkpoint(served_root / 'run-long', long, step=1).stem}"
    report = reload(service)
    assert report["outcome"] == "loaded" and report["model"] == version, report
    text = metrics(service)
    steps = metric(text, "slm_batch_size_count", missing=0.0)
    small = metric(text, 'slm_batch_size_bucket{le="2.0"}', missing=0.0)

    start = threading.Barrier(6)

    def one() -> httpx.Response:
        start.wait()
        return story(service, "run-long")

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: one(), range(6)))
    assert [answer.status_code for answer in answers] == [200] * 6
    text = metrics(service)
    new_steps = metric(text, "slm_batch_size_count") - steps
    assert new_steps >= 24 * 3  # six stories of 24 tokens, at most two at a time
    assert metric(text, 'slm_batch_size_bucket{le="2.0"}') - small == new_steps


def test_a_job_does_not_start_below_the_free_disk_floor(client, env, tmp_path):
    with worker_process({**env, "MIN_FREE_DISK_BYTES": str(1 << 50)}, tmp_path):
        job = submit(client, tiny_spec("floor-run"))
        job = wait_for_job(client, job["id"], ended, JOB_TIMEOUT_S)
    assert job["state"] == "failed"
    assert "did not start" in job["message"] and "MIN_FREE_DISK_BYTES" in job["message"]
    assert env["CHECKPOINT_DIR"] not in job["message"]
    assert not (Path(env["CHECKPOINT_DIR"]) / "floor-run").exists()


def test_below_the_floor_the_trainer_writes_no_checkpoint_and_keeps_the_last(train_data, tmp_path):
    run_dir = tmp_path / "run"
    config = TrainConfig(
        preset="tiny",
        batch_size=2,
        block_size=16,
        warmup_steps=1,
        eval_interval=5,
        eval_iters=1,
        checkpoint_interval=5,
        max_steps=5,
        device="cpu",
    )
    longer = config.model_copy(update={"max_steps": 10})
    train(config, train_data, run_dir)

    with pytest.raises(TrainError, match=r"step 10 was not written .*step-00000005.*FREE_DISK"):
        train(longer, train_data, run_dir, min_free_disk_bytes=1 << 50)
    assert latest_checkpoint(run_dir) == run_dir / "step-00000005.json"
    written = [path.name for path in run_dir.iterdir()]
    assert not [name for name in written if "00000010" in name or name.endswith(".tmp")]
    assert train(longer, train_data, run_dir).step == 10  # it resumes from the one kept


def test_a_checkpoint_that_would_cross_the_floor_is_not_written(train_data, tmp_path):
    """The floor counts what the checkpoint itself will write: room for less than that above
    the floor is no room."""
    config = TrainConfig(preset="tiny", batch_size=2, block_size=16, warmup_steps=1,
                         eval_interval=5, eval_iters=1, max_steps=5, device="cpu")  # fmt: skip
    weights = 4 * GPT(preset("tiny")).num_parameters()  # fp32: one copy of the weights
    floor = shutil.disk_usage(tmp_path).free - weights  # room for one copy, not for the state
    with pytest.raises(TrainError, match=r"step 5 was not written .*MIN_FREE_DISK_BYTES"):
        train(config, train_data, tmp_path / "run", min_free_disk_bytes=floor)
    assert not list((tmp_path / "run").glob("*.safetensors"))  # not even the best-so-far copy


# --- item 3: a run belongs to the job that made it --------------------------------------------


def test_concurrent_submissions_of_one_run_name_give_exactly_one_202(api):
    """Eight clients at once submit one run name, in several rounds (a race is a matter of luck):
    each round queues exactly one job."""

    def race(run: str) -> list[httpx.Response]:
        start = threading.Barrier(8)

        def post(_: int) -> httpx.Response:
            with api.client(headers=AUTH, timeout=30) as client:
                start.wait()
                return client.post("/train-jobs", json=tiny_spec(run))

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(post, range(8)))

    rounds = [race(f"race-run-{round}") for round in range(5)]
    with api.client(headers=AUTH) as client:
        for answer in [answer for answers in rounds for answer in answers]:
            if answer.status_code == 202:
                client.delete(f"/train-jobs/{answer.json()['id']}")
    statuses = [sorted(answer.status_code for answer in answers) for answers in rounds]
    assert statuses == [[202] + [409] * 7] * 5


def test_simultaneous_resumes_of_one_job_queue_it_once(api, client, env, tmp_path):
    """A job resumed twice at once would train one run in two work horses. Five jobs, each
    resumed by eight clients at once (a race is a matter of luck)."""
    with worker_process({**env, "MIN_FREE_DISK_BYTES": str(1 << 50)}, tmp_path):
        jobs = [submit(client, tiny_spec(f"resumed-run-{i}"))["id"] for i in range(5)]
        for job in jobs:
            assert wait_for_job(client, job, ended, JOB_TIMEOUT_S)["state"] == "failed"

    def race(job: str) -> list[int]:
        start = threading.Barrier(8)

        def resume(_: int) -> int:
            with api.client(headers=AUTH, timeout=30) as each:
                start.wait()
                return each.post(f"/train-jobs/{job}/resume").status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = sorted(pool.map(resume, range(8)))
        client.delete(f"/train-jobs/{job}")  # no worker runs it now: cancelled while queued
        return statuses

    assert [race(job) for job in jobs] == [[202] + [409] * 7] * 5


@pytest.mark.parametrize(
    "change",
    [{}, {"n_layer": 1}, {"data": {"dataset": "other"}}],
    ids=["same spec", "another shape", "another data spec"],
)
def test_a_new_job_may_not_continue_or_overwrite_a_run_another_job_made(
    client, finished_job, env, change
):
    other = Path(env["DATA_DIR"]) / "other"
    if not other.exists():
        other.symlink_to(Path(env["DATA_DIR"]) / "stories")
    spec = {**OWNED_SPEC, "data": change.get("data", OWNED_SPEC["data"])}
    spec["train"] = {**OWNED_SPEC["train"], **{k: v for k, v in change.items() if k != "data"}}
    response = client.post("/train-jobs", json=spec)
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["param"] == "run_name" and error["code"] == "run_taken"
    message = error["message"]
    assert "'owned-run'" in message and finished_job["id"] in message
    assert f"POST /train-jobs/{finished_job['id']}/resume" in message


def test_a_run_claim_is_released_when_its_job_finishes_or_is_cancelled(client, finished_job, env):
    assert claim_of(env, "owned-run") is None
    queued = submit(client, tiny_spec("cancelled-run"))
    assert claim_of(env, "cancelled-run") == queued["id"].encode()
    assert client.delete(f"/train-jobs/{queued['id']}").status_code == 200
    assert claim_of(env, "cancelled-run") is None


def test_a_failed_job_leaves_no_run_folder_and_no_claim(client, finished_job, env, tmp_path):
    # Fine-tuning may not change the checkpoint's shape: the trainer refuses it after the run
    # folder was made, before any checkpoint.
    spec = {**tiny_spec("misshapen-run", n_layer=1), "init_from_run": "owned-run"}
    with worker_process(env, tmp_path):
        job = wait_for_job(client, submit(client, spec)["id"], ended, JOB_TIMEOUT_S)
    assert job["state"] == "failed" and "shape" in job["message"], job["message"]
    assert not (Path(env["CHECKPOINT_DIR"]) / "misshapen-run").exists()
    assert claim_of(env, "misshapen-run") is None

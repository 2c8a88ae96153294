"""/train-jobs end to end: the API under uvicorn, `slm worker` processes, a real Redis; jobs are
submitted, watched, stopped, cancelled, killed and resumed over HTTP, as a user would."""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shlex
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from servers import api_server, free_port, wait_for
from workers import (
    ABANDONED_AFTER_S,
    SLM,
    jobs_env,
    jobs_redis_url,
    link_dataset,
    tiny_spec,
    wait_for_job,
    worker_process,
)

from contract.jobs import (
    CHECKPOINT_CHANNEL,
    LATEST_CHECKPOINT_KEY,
    CheckpointAnnouncement,
    TrainJobSpec,
)
from contract.settings import Settings
from contract.store import TrainJobs
from model.checkpoint import latest_checkpoint, load_checkpoint

API_KEY = "test-train-jobs-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
JOB_TIMEOUT_S = 90  # a tiny job takes seconds; this is for a machine busy with other work


@pytest.fixture(scope="module")
def env(redis_url: str, train_data: Path, tmp_path_factory) -> dict[str, str]:
    env = jobs_env(jobs_redis_url(redis_url), tmp_path_factory.mktemp("jobs"))
    link_dataset(env, train_data)
    # story_url serves on 127.0.0.1, which data sources may reach only when allowed.
    return {**env, "API_KEY": API_KEY, "no_proxy": "127.0.0.1", "ALLOWED_DATA_HOSTS": "127.0.0.1"}


@pytest.fixture(scope="module")
def api(env: dict[str, str], tmp_path_factory):
    with api_server(env, tmp_path_factory.mktemp("api")) as server:
        yield server


@pytest.fixture
def client(api) -> Iterator[httpx.Client]:
    with api.client(headers=AUTH, timeout=10) as client:
        yield client


@pytest.fixture
def worker(env: dict[str, str], tmp_path: Path):
    with worker_process(env, tmp_path) as process:
        yield process


def submit(client: httpx.Client, spec: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/train-jobs", json=spec)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/train-jobs/{job['id']}"
    return job


def state_is(*states: str):
    return lambda job: job["state"] in states


def run_dir(env: dict[str, str], run: str) -> Path:
    return Path(env["CHECKPOINT_DIR"]) / run


def history_steps(job: dict[str, Any]) -> list[int]:
    return [point["step"] for point in job["history"]]


# --- a job's life ---------------------------------------------------------------------------


def test_a_job_trains_reports_progress_and_announces_its_checkpoints(client, worker, env):
    announcements = redis.Redis.from_url(env["REDIS_URL"]).pubsub()
    announcements.subscribe(CHECKPOINT_CHANNEL)
    job = submit(client, tiny_spec("happy-run", max_steps=30))
    assert job["state"] == "queued" and job["spec"]["run_name"] == "happy-run"

    steps_seen: list[int] = []

    def finished(seen: dict[str, Any]) -> bool:
        if seen["state"] == "training" and seen["step"] > 0:
            steps_seen.append(seen["step"])
        return seen["state"] in ("finished", "failed", "abandoned")

    job = wait_for_job(client, job["id"], finished, JOB_TIMEOUT_S)
    assert job["state"] == "finished", job["message"]
    assert len(set(steps_seen)) >= 2 and steps_seen == sorted(steps_seen)  # it advanced
    assert job["step"] == job["max_steps"] == 30
    assert history_steps(job) == list(range(1, 31))
    assert [p["step"] for p in job["history"] if p["val_loss"] is not None] == [10, 20, 30]
    # Each evaluation also in bits per byte, what the chart's right-hand axis shows.
    assert [p["step"] for p in job["history"] if p["val_bits_per_byte"]] == [10, 20, 30]
    assert job["val_loss"] is not None and job["tokens_per_s"] > 0
    assert job["last_checkpoint"] == "happy-run/step-00000030"

    folder = run_dir(env, "happy-run")
    for step in (10, 20, 30):
        model, meta = load_checkpoint(folder / f"step-{step:08d}.json")
        assert meta.step == step and model.config.n_layer == 2
    assert latest_checkpoint(folder) == folder / "step-00000030.json"

    messages: list[CheckpointAnnouncement] = []  # the channel is shared: other runs' too
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "step-00000030" not in [m.name for m in messages]:
        message = announcements.get_message(timeout=0.5)
        if message and message["type"] == "message":
            announced = CheckpointAnnouncement.model_validate_json(message["data"])
            messages += [announced] if announced.run == "happy-run" else []
    announcements.close()
    periodic = [m for m in messages if m.name.startswith("step-")]
    assert [(m.run, m.name, m.step, m.job_id) for m in periodic] == [
        ("happy-run", f"step-{step:08d}", step, job["id"]) for step in (10, 20, 30)
    ]
    latest = redis.Redis.from_url(env["REDIS_URL"]).get(LATEST_CHECKPOINT_KEY)
    assert CheckpointAnnouncement.model_validate_json(latest).name == "step-00000030"

    listed = client.get("/train-jobs").json()["jobs"]
    assert listed[0]["id"] == job["id"] and listed[0]["state"] == "finished"


def test_delete_stops_a_running_job_with_a_checkpoint(client, worker, env):
    job = submit(client, tiny_spec("stop-run", max_steps=5000, checkpoint_interval=0))
    wait_for_job(client, job["id"], lambda seen: seen["step"] >= 3, JOB_TIMEOUT_S)

    response = client.delete(f"/train-jobs/{job['id']}")
    assert response.status_code == 202 and response.json()["message"] == "stop requested"
    job = wait_for_job(client, job["id"], state_is("stopped", "failed"), JOB_TIMEOUT_S)

    assert job["state"] == "stopped", job["message"]
    assert 3 <= job["step"] < 5000
    assert job["last_checkpoint"] == f"stop-run/step-{job['step']:08d}"
    _, meta = load_checkpoint(run_dir(env, "stop-run") / f"step-{job['step']:08d}.json")
    assert meta.step == job["step"]
    assert client.delete(f"/train-jobs/{job['id']}").status_code == 409  # nothing left to stop


def test_sigterm_on_the_worker_stops_its_job_at_a_checkpoint_and_exits(client, env, tmp_path):
    with worker_process(env, tmp_path) as worker:
        job = submit(client, tiny_spec("sigterm-run", max_steps=5000, checkpoint_interval=0))
        wait_for_job(client, job["id"], lambda seen: seen["step"] >= 3, JOB_TIMEOUT_S)
        worker.process.terminate()  # what `docker stop` sends
        assert worker.process.wait(30) == 0  # long before the 5000 steps

    job = client.get(f"/train-jobs/{job['id']}").json()
    assert job["state"] == "stopped" and 3 <= job["step"] < 5000
    assert job["last_checkpoint"] == f"sigterm-run/step-{job['step']:08d}"
    # RQ logs "Job OK" for any job that returns; the worker's own line says it stopped.
    assert f"job {job['id']} stopped at step {job['step']}; resume" in worker.output()


def test_a_queued_job_can_be_cancelled_and_never_runs(client, env, tmp_path):
    job = submit(client, tiny_spec("cancel-run"))
    response = client.delete(f"/train-jobs/{job['id']}")
    assert response.status_code == 200 and response.json()["state"] == "cancelled"

    with worker_process(env, tmp_path, burst=True) as burst:
        burst.process.wait(60)  # a burst worker exits once the queue is empty
    assert client.get(f"/train-jobs/{job['id']}").json()["state"] == "cancelled"
    assert not run_dir(env, "cancel-run").exists()
    assert client.post(f"/train-jobs/{job['id']}/resume").status_code == 409


def test_a_killed_worker_is_detected_and_its_job_resumes_from_the_last_checkpoint(
    client, env, tmp_path
):
    spec = tiny_spec("crash-run", max_steps=40, eval_interval=10, checkpoint_interval=10)
    with worker_process(env, tmp_path) as doomed:
        job = submit(client, spec)
        at_kill = wait_for_job(client, job["id"], lambda seen: seen["step"] >= 15, JOB_TIMEOUT_S)
        horse = doomed.horse_pid()
        doomed.kill()
        killed_at = time.monotonic()

    job = wait_for_job(client, job["id"], state_is("abandoned"), ABANDONED_AFTER_S + 10)
    detected_after = time.monotonic() - killed_at
    assert detected_after <= ABANDONED_AFTER_S + 1, detected_after
    assert "resume" in job["message"]
    # The orphaned horse noticed and exited, so nothing else writes into the run folder.
    wait_for(lambda: not Path(f"/proc/{horse}").exists(), 10, "the orphaned horse to exit")

    response = client.post(f"/train-jobs/{job['id']}/resume")
    assert response.status_code == 202 and response.json()["state"] == "queued"
    with worker_process(env, tmp_path):
        job = wait_for_job(
            client, job["id"], state_is("finished", "failed", "abandoned"), JOB_TIMEOUT_S
        )

    assert job["state"] == "finished", job["message"]
    assert job["step"] == 40
    # The orphaned horse saved a checkpoint on its way out: no step before the kill is lost.
    assert at_kill["step"] <= job["resumed_from"] < 40
    assert history_steps(job) == list(range(1, 41))  # no gap, no step counted twice


def write_stories(path: Path) -> Path:
    """A text file of 3,000 short stories, <|endoftext|> between them."""
    stories = [
        f"Story {i}. Mia saw {i % 7} red birds in the park, and Tom laughed. They went home."
        for i in range(3000)
    ]
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories))
    return path


def test_a_job_whose_data_the_api_cannot_see_fails_with_advice_that_works(
    client, worker, env, tmp_path
):
    """An API whose DATA_DIR holds no dataset (Docker's: the data volume is the workers') cannot
    check data.dataset, so the worker finds it missing. Its message says how to prepare it; done
    as said (DATA_DIR being the worker's), the same dataset trains, on the worker the failure
    left ready."""
    with redis.Redis.from_url(env["REDIS_URL"]) as connection:
        blind = TrainJobs(
            connection, Settings(queue_name=env["QUEUE_NAME"], data_dir=tmp_path / "elsewhere")
        )
        spec = {**tiny_spec("no-data-run"), "data": {"dataset": "later-data"}}
        job_id = blind.submit(TrainJobSpec.model_validate(spec)).job.id
    broken = wait_for_job(client, job_id, state_is("failed", "finished"), JOB_TIMEOUT_S)
    assert broken["state"] == "failed"
    message = broken["message"]
    assert "later-data" in message and "not prepared" in message
    advice = re.search(r"`(slm prepare [^`]*)`", message)
    assert advice is not None, message
    command = shlex.split(advice[1])
    # The advice names the folder by its setting (a client never sees the server's paths).
    out = command.index("--out") + 1
    assert command[out] == "DATA_DIR/later-data"
    command[out] = str(Path(env["DATA_DIR"]) / "later-data")
    command[command.index("--source") + 1] = str(write_stories(tmp_path / "stories.txt"))
    subprocess.run([SLM, *command[1:], "--quiet"], check=True, timeout=120)

    again = tiny_spec("after-failure-run", max_steps=3, eval_interval=3)
    job = submit(client, {**again, "data": spec["data"]})
    job = wait_for_job(client, job["id"], state_is("finished", "failed"), JOB_TIMEOUT_S)
    assert job["state"] == "finished", job["message"]


@pytest.fixture
def story_url(tmp_path: Path) -> Iterator[str]:
    """A text file of stories, <|endoftext|> between them, served on 127.0.0.1."""
    served = tmp_path / "served"
    served.mkdir()
    write_stories(served / "stories.txt")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=served)
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}/stories.txt"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_url_source_is_prepared_into_data_dir_then_trained(client, worker, env, story_url):
    spec = {**tiny_spec("url-run", max_steps=4, eval_interval=4), "data": {"source": story_url}}
    job = submit(client, spec)
    job = wait_for_job(client, job["id"], state_is("finished", "failed"), JOB_TIMEOUT_S)
    assert job["state"] == "finished", job["message"]

    prepared = [p for p in Path(env["DATA_DIR"]).iterdir() if p.name.startswith("url-")]
    assert len(prepared) == 1
    manifest = json.loads((prepared[0] / "manifest.json").read_text())
    assert manifest["source"] == story_url and manifest["splits"]["val"]["tokens"] > 0


# --- the API's answers --------------------------------------------------------------------


def test_a_dataset_not_prepared_is_refused_at_submit_naming_those_that_are(client):
    spec = {**tiny_spec("nope-run"), "data": {"dataset": "nope"}}
    response = client.post("/train-jobs", json=spec)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "data.dataset" and error["code"] == "dataset_not_prepared"
    message = error["message"]
    assert "'nope'" in message and "stories" in message  # what is missing, and what is there
    assert "`slm prepare --source SOURCE --out " in message and "data.source" in message
    listed = client.get("/train-jobs", params={"limit": 100}).json()["jobs"]
    assert "nope-run" not in [job["run_name"] for job in listed]  # nothing queued


def test_datasets_lists_the_prepared_datasets_in_data_dir(client, env):
    data_dir = Path(env["DATA_DIR"])
    (data_dir / "half-prepared").mkdir(exist_ok=True)  # no manifest yet: not listed
    response = client.get("/datasets")
    assert response.status_code == 200
    listed = {dataset["name"]: dataset for dataset in response.json()["datasets"]}
    assert "stories" in listed and "half-prepared" not in listed
    manifest = json.loads((data_dir / "stories" / "manifest.json").read_text())
    splits = manifest["splits"]
    assert listed["stories"]["tokens"] == {name: split["tokens"] for name, split in splits.items()}
    assert listed["stories"]["stories"]["train"] == splits["train"]["stories"]
    assert listed["stories"]["source"] == manifest["source"]


def test_the_list_is_newest_first_and_paginated(client):
    ids = [submit(client, tiny_spec(f"page-run-{i}"))["id"] for i in range(3)]
    try:
        first = client.get("/train-jobs", params={"limit": 2}).json()
        second = client.get("/train-jobs", params={"limit": 2, "offset": 2}).json()
        assert [job["id"] for job in first["jobs"]] == ids[::-1][:2]
        assert first["next_offset"] == 2 and second["jobs"][0]["id"] == ids[0]
        assert first["total"] >= 3
    finally:
        for job_id in ids:
            client.delete(f"/train-jobs/{job_id}")


def test_a_run_name_held_by_an_active_job_is_409(client):
    job = submit(client, tiny_spec("busy-run"))
    try:
        response = client.post("/train-jobs", json=tiny_spec("busy-run"))
        assert response.status_code == 409
        error = response.json()["error"]
        assert error["param"] == "run_name" and job["id"] in error["message"]
    finally:
        client.delete(f"/train-jobs/{job['id']}")
    again = submit(client, tiny_spec("busy-run"))  # a cancelled job holds nothing
    client.delete(f"/train-jobs/{again['id']}")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"train": {"preset": "enormous"}}, "preset"),
        ({"train": {"max_steps": -5}}, "train.max_steps"),
        ({"train": {"batch_size": 1_000_000}}, "train.batch_size"),
        (
            {"train": {"batch_size": 4096, "block_size": 128, "model_block_size": 128}},
            "train.batch_size",
        ),
        ({"train": {"max_steps": 5_000_000}}, "train.max_steps"),
        ({"train": {"batch_size": "four"}}, "train.batch_size"),
        ({"run_name": "../x"}, "run_name"),
        ({"run_name": "a/b"}, "run_name"),
        ({"data": {"dataset": "../../etc"}}, "data.dataset"),
        ({"data": {"source": "file:///etc/passwd"}}, "data.source"),
        ({"data": {"dataset": "stories", "source": "hub:v2"}}, "data"),
        ({"init_from_run": "../other"}, "init_from_run"),
        ({"priority": 1}, "priority"),
        ({"train": {"n_embd": 100, "n_head": 3}}, "n_embd (100) must be divisible by n_head (3)"),
        ({"train": {"n_layer": 0}}, "train.n_layer"),
        ({"train": {"position": "absolute"}}, "train.position"),
    ],
)
def test_a_bad_spec_is_422_naming_the_field(client, change, field):
    spec = tiny_spec("valid-run")
    spec = {**spec, **{key: value for key, value in change.items() if key != "train"}}
    spec["train"] = {**spec["train"], **change.get("train", {})}
    response = client.post("/train-jobs", json=spec)
    assert response.status_code == 422, response.text
    assert field in response.json()["error"]["message"]


def test_a_shape_override_is_accepted_and_kept_in_the_spec(client):
    shape = {"n_layer": 1, "position": "rotary", "norm": "rmsnorm", "activation": "swiglu"}
    job = submit(client, tiny_spec("shaped-run", **shape))
    try:
        train = client.get(f"/train-jobs/{job['id']}").json()["spec"]["train"]
        assert {name: train[name] for name in shape} == shape
        assert train["n_head"] is None and train["qk_norm"] is None  # the preset's
    finally:
        client.delete(f"/train-jobs/{job['id']}")


def test_an_unknown_job_is_404(client):
    for job_id in ("0123456789abcdef", "rq:queues", "..%2F..%2Fetc"):
        for method, path in (
            ("GET", f"/train-jobs/{job_id}"),
            ("DELETE", f"/train-jobs/{job_id}"),
            ("POST", f"/train-jobs/{job_id}/resume"),
        ):
            response = client.request(method, path)
            assert response.status_code == 404, (method, path, response.text)
            assert response.json()["error"]["type"] == "not_found_error"


def test_the_api_key_is_required(api):
    with api.client(timeout=10) as anonymous:
        assert anonymous.get("/train-jobs").status_code == 401
        assert anonymous.post("/train-jobs", json=tiny_spec("anon-run")).status_code == 401
        assert anonymous.get("/datasets").status_code == 401
        wrong = {"Authorization": "Bearer not-the-key"}
        response = anonymous.get("/train-jobs", headers=wrong)
        assert response.status_code == 401 and response.json()["error"]["message"]


def test_redis_down_is_503_and_the_rest_of_the_service_works(env, tmp_path):
    down = {**env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    with api_server(down, tmp_path) as server, server.client(headers=AUTH, timeout=10) as client:
        started = time.monotonic()
        listed = client.get("/train-jobs")
        posted = client.post("/train-jobs", json=tiny_spec("down-run"))
        assert time.monotonic() - started < 5  # short timeouts: never a hang
        for response in (listed, posted):
            assert response.status_code == 503
            assert "Redis" in response.json()["error"]["message"]
        assert client.get("/openapi.json").status_code == 200


def test_without_redis_url_train_jobs_answer_503_saying_so(env, tmp_path):
    if "REDIS_URL" in os.environ:
        pytest.skip("REDIS_URL is set in this environment; the API would inherit it")
    unset = {key: value for key, value in env.items() if key != "REDIS_URL"}
    with api_server(unset, tmp_path) as server, server.client(headers=AUTH, timeout=10) as client:
        response = client.get("/train-jobs")
        assert response.status_code == 503
        assert "REDIS_URL" in response.json()["error"]["message"]

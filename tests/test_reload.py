"""Hot reload on a real server: new checkpoints while streams run, corrupt ones, Redis."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from servers import ApiServer, api_server, metric, sse_events, wait_for, write_checkpoint

from contract.jobs import CHECKPOINT_CHANNEL, CheckpointAnnouncement

KEY = "admin-key-for-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def server(root, redis_url, tmp_path_factory) -> ApiServer:
    write_checkpoint(root / "run-a")
    # A poll too slow to matter: reloads here come from /admin/reload or from Redis.
    env = {
        "CHECKPOINT_DIR": str(root),
        "API_KEY": KEY,
        "REDIS_URL": redis_url,
        "RELOAD_POLL_S": "600",
    }
    with api_server(env, tmp_path_factory.mktemp("server"), ready_path="/ready") as running:
        yield running


def serving(server: ApiServer) -> str:
    with server.client() as client:
        return client.get("/ready", headers=AUTH).json()["model"]


def story(server: ApiServer, max_new_tokens: int, started: threading.Event | None = None) -> dict:
    """Stream one story to the end; return its final event (an error event fails the test)."""
    body = {"prompt": "Once upon a time", "max_new_tokens": max_new_tokens, "temperature": 0}
    with (
        server.client() as client,
        client.stream("POST", "/generate", json=body, headers=AUTH) as response,
    ):
        assert response.status_code == 200
        for event, data in sse_events(response):
            assert event != "error", data
            if started is not None:
                started.set()
            if event == "done":
                return json.loads(data)
    raise AssertionError("the stream ended without a done event")


def reloads(server: ApiServer, outcome: str) -> float:
    with server.client() as client:
        text = client.get("/metrics", headers=AUTH).text
    return metric(text, f'slm_reloads_total{{outcome="{outcome}"}}', missing=0.0)


def test_a_new_checkpoint_during_eight_streams_fails_none_and_each_keeps_its_version(
    server, root
) -> None:
    old = serving(server)
    started = [threading.Event() for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        in_flight = [pool.submit(story, server, 1024, event) for event in started]
        for event in started:
            assert event.wait(30), "a stream did not start"
        new = write_checkpoint(root / "run-b", seed=1)
        with server.client() as client:
            report = client.post("/admin/reload", headers=AUTH).json()
        assert report["outcome"] == "loaded" and report["model"] == new
        newcomer = story(server, 10)
        finals = [future.result(timeout=60) for future in in_flight]
    assert newcomer["model"] == new
    assert [final["model"] for final in finals] == [old] * 8
    assert all(final["usage"]["completion_tokens"] == 1024 for final in finals)


def test_a_corrupt_checkpoint_is_refused_counted_once_and_the_old_model_keeps_serving(
    server, root
) -> None:
    before, rejected = serving(server), reloads(server, "rejected")
    run_dir = root / "run-corrupt"
    write_checkpoint(run_dir)  # the manifest points at it...
    weights = next(run_dir.glob("*.safetensors"))  # ...and its weights are cut in half
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with server.client() as client:
        first = client.post("/admin/reload", headers=AUTH).json()
        second = client.post("/admin/reload", headers=AUTH).json()
    assert first["outcome"] == second["outcome"] == "rejected"
    assert "run-corrupt" in first["message"]
    assert first["model"] == before
    assert reloads(server, "rejected") == rejected + 1  # refused once, not at every check
    assert story(server, 5)["model"] == before


def test_a_redis_announcement_reloads_without_waiting_for_the_poll(server, root, redis_url) -> None:
    broker = redis.Redis.from_url(redis_url, socket_timeout=5)
    wait_for(
        lambda: dict(broker.pubsub_numsub(CHECKPOINT_CHANNEL))[CHECKPOINT_CHANNEL.encode()] > 0,
        10,
        "the service to subscribe",
    )
    version = write_checkpoint(root / "run-announced", seed=2)
    run, name = version.split("/")
    broker.publish(
        CHECKPOINT_CHANNEL, CheckpointAnnouncement(run=run, name=name, step=1).model_dump_json()
    )
    wait_for(lambda: serving(server) == version, 5, "the announced checkpoint to serve")

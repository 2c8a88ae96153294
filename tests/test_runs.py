"""Several runs served by name on real servers: the model list, picking a run, the least recently
used run unloaded past MAX_LOADED_MODELS (streams finish on their own weights), each run
hot-reloading its own checkpoints, and two replicas on one CHECKPOINT_DIR and one Redis."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
from servers import api_server, metric, sse_events, wait_for, write_checkpoint

from contract.jobs import CHECKPOINT_CHANNEL, CheckpointAnnouncement

KEY = "runs-key-for-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}


def models(client: httpx.Client) -> dict[str, dict]:
    response = client.get("/v1/models", headers=AUTH)
    assert response.status_code == 200, response.text
    return {card["id"]: card for card in response.json()["data"]}


def version_of_answer(client: httpx.Client, model: str | None = None) -> str:
    body = {"prompt": "Once", "max_tokens": 3, **({"model": model} if model else {})}
    response = client.post("/v1/completions", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()["model"]


@pytest.fixture
def two_runs(tmp_path) -> tuple[Path, str, str]:
    root = tmp_path / "checkpoints"
    old = write_checkpoint(root / "run-a", seed=0)
    time.sleep(0.01)  # manifests record when they were written: run-b saved last
    new = write_checkpoint(root / "run-b", seed=1)
    return root, old, new


def serve(root: Path, workdir: Path, cli: bool = False, **env: str):
    settings = {"CHECKPOINT_DIR": str(root), "API_KEY": KEY, "RELOAD_POLL_S": "600", **env}
    return api_server(settings, workdir, ready_path="/ready", cli=cli)


def test_requests_pick_their_run_and_the_newest_answers_otherwise(two_runs, tmp_path) -> None:
    root, old, new = two_runs
    (root / "not-a-run").mkdir()  # a folder without a checkpoint is no model
    with serve(root, tmp_path) as server, server.client() as client:
        listed = models(client)
        assert sorted(listed) == ["run-a", "run-b"]
        assert listed["run-a"]["version"] == old and listed["run-b"]["version"] == new
        assert listed["run-b"]["loaded"] and not listed["run-a"]["loaded"]

        assert version_of_answer(client) == new
        assert version_of_answer(client, "run-a") == old
        assert version_of_answer(client, old) == old  # a version picks its run
        assert models(client)["run-a"]["loaded"]
        story = client.post(
            "/generate",
            json={"prompt": "Hi", "max_new_tokens": 2, "stream": False, "model": "run-a"},
            headers=AUTH,
        ).json()
        assert story["model"] == old
        for unknown in ("not-a-run", "run-c", "../run-a", "gpt-4o"):
            response = client.post(
                "/v1/completions", json={"prompt": "Hi", "model": unknown}, headers=AUTH
            )
            assert response.status_code == 404, unknown
            assert response.json()["error"]["code"] == "model_not_found"
        metrics = client.get("/metrics", headers=AUTH).text
    assert metric(metrics, 'slm_generated_tokens_total{model="run-a"}') >= 5
    assert metric(metrics, 'slm_generated_tokens_total{model="run-b"}') >= 3
    assert metric(metrics, f'slm_loaded_model{{model="run-a",step="1",version="{old}"}}') == 1


def test_past_max_loaded_models_the_least_recent_run_goes_after_its_streams(
    two_runs, tmp_path
) -> None:
    root, old, new = two_runs
    with serve(root, tmp_path, MAX_LOADED_MODELS="1") as server, server.client() as client:
        finals: list[dict] = []
        started = threading.Event()

        def long_story_on_run_a() -> None:
            body = {"prompt": "Once", "max_new_tokens": 600, "temperature": 0, "model": "run-a"}
            with (
                server.client() as own,
                own.stream("POST", "/generate", json=body, headers=AUTH) as response,
            ):
                for event, data in sse_events(response):
                    started.set()
                    assert event != "error", data
                    if event == "done":
                        finals.append(json.loads(data))

        reader = threading.Thread(target=long_story_on_run_a)
        reader.start()
        assert started.wait(30)
        assert not models(client)["run-b"]["loaded"]  # run-a took the only place
        assert version_of_answer(client) == new  # run-b back in, run-a out...
        assert not models(client)["run-a"]["loaded"]
        reader.join(60)
        assert version_of_answer(client, "run-a") == old
    # ...while its stream went on, on its own weights, to the end.
    assert finals and finals[0]["model"] == old
    assert finals[0]["usage"]["completion_tokens"] == 600


def test_each_loaded_run_hot_reloads_its_own_checkpoints(two_runs, tmp_path) -> None:
    root, old, new = two_runs
    with serve(root, tmp_path) as server, server.client() as client:
        assert version_of_answer(client, "run-a") == old
        newer = write_checkpoint(root / "run-a", seed=2, step=2)
        time.sleep(0.01)
        newest = write_checkpoint(root / "run-c", seed=3)  # the newest run overall now
        report = client.post("/admin/reload", headers=AUTH).json()
        assert report["outcome"] == "loaded" and report["model"] == newest
        assert version_of_answer(client, "run-a") == newer
        assert version_of_answer(client, "run-b") == new
        assert version_of_answer(client) == newest


def test_two_replicas_load_a_checkpoint_announced_once(two_runs, tmp_path, redis_url) -> None:
    root, old, new = two_runs
    env = {"REDIS_URL": redis_url}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    with (
        serve(root, tmp_path / "one", cli=True, **env) as first,
        serve(root, tmp_path / "two", cli=True, **env) as second,
    ):
        broker = redis.Redis.from_url(redis_url, socket_timeout=5)
        wait_for(
            lambda: (
                dict(broker.pubsub_numsub(CHECKPOINT_CHANNEL))[CHECKPOINT_CHANNEL.encode()] >= 2
            ),
            15,
            "both replicas to subscribe",
        )
        announced = write_checkpoint(root / "run-new", seed=4)
        run, name = announced.split("/")
        broker.publish(
            CHECKPOINT_CHANNEL,
            CheckpointAnnouncement(run=run, name=name, step=1).model_dump_json(),
        )
        for server in (first, second):
            with server.client() as client:
                wait_for(
                    lambda client=client: version_of_answer(client) == announced,
                    10,
                    "the announced checkpoint to serve",
                )
                assert version_of_answer(client, "run-a") == old
                assert version_of_answer(client, "run-b") == new
                assert sorted(models(client)) == ["run-a", "run-b", "run-new"]


def test_an_api_server_without_checkpoints_lists_no_models(tmp_path) -> None:
    with (
        api_server({"CHECKPOINT_DIR": str(tmp_path), "API_KEY": KEY}, tmp_path) as server,
        server.client() as client,
    ):
        assert models(client) == {}
        response = client.post("/v1/completions", json={"prompt": "Hi"}, headers=AUTH)
        assert response.status_code == 503
        assert "slm train" in response.json()["error"]["message"]


def test_the_model_list_carries_each_runs_val_loss(tmp_path) -> None:
    """Each card has its latest checkpoint's val loss, from the checkpoint's metadata; null when
    the checkpoint recorded none."""
    from weights import sharp_model

    from model import preset
    from model.checkpoint import save_checkpoint

    root = tmp_path / "checkpoints"
    write_checkpoint(root / "run-a", seed=0)  # no val loss
    model = sharp_model(preset("tiny"), seed=1)
    save_checkpoint(root / "run-b", model, step=1, val_loss=3.5)
    save_checkpoint(root / "run-b", model, step=2, val_loss=2.25)  # the latest counts
    with serve(root, tmp_path) as server, server.client() as client:
        listed = models(client)
        assert listed["run-a"]["val_loss"] is None
        assert listed["run-b"]["val_loss"] == 2.25
        assert listed["run-b"]["version"].endswith("step-00000002")

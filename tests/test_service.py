"""POST /generate and the service around it, over real HTTP against uvicorn."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from servers import (
    ApiServer,
    api_server,
    free_port,
    metric,
    sse_events,
    wait_for,
    write_checkpoint,
)

KEY = "service-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["Once upon a time", "Tom had a red ball.", "The sun", "Lily and her mom went to"]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> ApiServer:
    root = tmp_path_factory.mktemp("checkpoints")
    write_checkpoint(root / "run-a")
    env = {
        "CHECKPOINT_DIR": str(root),
        "API_KEY": KEY,
        "MAX_PROMPT_TOKENS": "200",
        "MAX_NEW_TOKENS": "1024",
        "RELOAD_POLL_S": "60",
    }
    with api_server(env, tmp_path_factory.mktemp("server"), ready_path="/ready") as running:
        yield running


def stream(client: httpx.Client, body: dict[str, Any]) -> tuple[list[dict], dict]:
    """The pieces and the final event of a /generate stream."""
    pieces, final = [], None
    with client.stream("POST", "/generate", json=body, headers=AUTH) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for event, data in sse_events(response):
            assert event in ("token", "done"), data
            if event == "token":
                pieces.append(json.loads(data))
            else:
                final = json.loads(data)
    assert final is not None
    return pieces, final


def running_requests(client: httpx.Client) -> float:
    return metric(client.get("/metrics", headers=AUTH).text, "slm_running_requests")


def cancelled_generations(client: httpx.Client) -> float:
    sample = 'slm_generations_total{model="run-a",reason="cancelled"}'
    return metric(client.get("/metrics", headers=AUTH).text, sample, missing=0.0)


def test_health_and_ready_answer_with_the_loaded_version(server) -> None:
    with server.client() as client:
        assert client.get("/health").json() == {"status": "ok"}
        ready = client.get("/ready", headers=AUTH).json()
    assert ready == {"ready": True, "model": "run-a/step-00000001", "step": 1}


def test_streamed_pieces_join_to_the_non_streamed_text_for_the_same_seed(server) -> None:
    body = {"prompt": PROMPTS[0], "max_new_tokens": 60, "temperature": 0.8, "top_k": 40, "seed": 7}
    with server.client() as client:
        pieces, final = stream(client, body)
        whole = client.post("/generate", json={**body, "stream": False}, headers=AUTH).json()
    assert "".join(piece["text"] for piece in pieces) == whole["text"]
    assert [token for piece in pieces for token in piece["token_ids"]] == whole["token_ids"]
    assert final["finish_reason"] == whole["finish_reason"] == "length"
    assert final["seed"] == whole["seed"] == 7


def test_the_final_event_reports_usage_timings_and_version(server) -> None:
    with server.client() as client:
        pieces, final = stream(client, {"prompt": "The dog", "max_new_tokens": 12, "seed": 1})
    tokens = sum(len(piece["token_ids"]) for piece in pieces)
    assert final["usage"] == {"prompt_tokens": 2, "completion_tokens": tokens, "total_tokens": 14}
    timings = final["timings"]
    assert 0 <= timings["queue_s"] <= timings["time_to_first_token_s"] <= timings["total_s"]
    assert timings["tokens_per_s"] > 0
    assert final["model"] == "run-a/step-00000001"
    assert final["prompt_truncated"] is False


def test_sixteen_concurrent_streams_match_the_same_requests_run_one_by_one(server) -> None:
    bodies = [
        {"prompt": PROMPTS[i % 4] + " and" * i, "max_new_tokens": 24 + i, "temperature": 0}
        for i in range(16)
    ]

    def text_of(body: dict[str, Any]) -> str:
        with server.client() as client:
            pieces, final = stream(client, body)
        assert final["finish_reason"] in ("length", "end_of_text", "stop")
        return "".join(piece["text"] for piece in pieces)

    one_by_one = [text_of(body) for body in bodies]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(text_of, bodies))
    assert together == one_by_one
    assert len(set(one_by_one)) > 1  # different prompts, different stories


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server) -> None:
    with server.client() as client:
        cancelled = cancelled_generations(client)
        body = {"prompt": PROMPTS[1], "max_new_tokens": 1024, "temperature": 0}
        with client.stream("POST", "/generate", json=body, headers=AUTH) as response:
            events = sse_events(response)
            next(events), next(events)
        # The server notices the disconnect, the engine drops the sequence at its next step.
        wait_for(
            lambda: (
                cancelled_generations(client) == cancelled + 1 and running_requests(client) == 0
            ),
            10,
            "the slot to be freed",
        )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"max_new_tokens": 1025}, "max_new_tokens"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**53}, "seed"),
        ({"stop": ["a"] * 9}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"prompt": "word " * 300}, "prompt"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_bad_inputs_get_422_naming_the_field(server, change, field) -> None:
    with server.client() as client:
        response = client.post("/generate", json={"prompt": "Hi", **change}, headers=AUTH)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == field
    assert field in error["message"]


def test_seeds_stay_within_javascripts_exact_integers(server) -> None:
    """A fresh seed is at most 2**53 - 1, so JSON.parse in a browser reads it exactly and the
    seed sent back replays the story; the largest such seed is accepted, one above is a 422."""
    body = {"prompt": "Hi", "max_new_tokens": 4, "stream": False}
    with server.client() as client:
        for _ in range(3):
            answer = client.post("/generate", json=body, headers=AUTH)
            assert answer.status_code == 200, answer.text
            seed = answer.json()["seed"]
            assert 0 <= seed <= 2**53 - 1, seed
            again = client.post("/generate", json={**body, "seed": seed}, headers=AUTH)
            assert again.json()["text"] == answer.json()["text"]
        largest = client.post("/generate", json={**body, "seed": 2**53 - 1}, headers=AUTH)
        assert largest.status_code == 200, largest.text
        above = client.post("/generate", json={**body, "seed": 2**53}, headers=AUTH)
    assert above.status_code == 422, above.text
    assert above.json()["error"]["param"] == "seed"
    assert "seed" in above.json()["error"]["message"]


def test_max_tokens_is_read_as_max_new_tokens_within_the_same_limit(server) -> None:
    """/v1's name for the token count works on /generate too; a refusal names it as sent."""
    body = {"prompt": "Hi", "temperature": 0, "stream": False}
    with server.client() as client:
        by_alias = client.post("/generate", json={**body, "max_tokens": 3}, headers=AUTH)
        by_name = client.post("/generate", json={**body, "max_new_tokens": 3}, headers=AUTH)
        assert by_alias.status_code == 200, by_alias.text
        assert by_alias.json()["text"] == by_name.json()["text"]
        assert by_alias.json()["usage"] == by_name.json()["usage"]
        for value, says in ((1025, "MAX_NEW_TOKENS"), (0, "greater than or equal to 1")):
            response = client.post("/generate", json={**body, "max_tokens": value}, headers=AUTH)
            assert response.status_code == 422, response.text
            error = response.json()["error"]
            assert (error["param"], says in error["message"]) == ("max_tokens", True), error
        both = {**body, "max_new_tokens": 3, "max_tokens": 3}
        response = client.post("/generate", json=both, headers=AUTH)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"] == "max_tokens"


def test_a_prompt_longer_than_the_context_keeps_its_last_tokens(server) -> None:
    prompt = "The cat sat on the mat. " * 20  # ~140 tokens: under the cap, over block_size 64
    body = {"prompt": prompt, "max_new_tokens": 5, "stream": False}
    with server.client() as client:
        answer = client.post("/generate", json=body, headers=AUTH).json()
    assert answer["prompt_truncated"] is True
    assert answer["usage"]["prompt_tokens"] > 64


def test_a_body_above_the_limit_gets_413(server) -> None:
    with server.client() as client:
        response = client.post("/generate", json={"prompt": "x" * (1 << 20)}, headers=AUTH)
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "request_too_large"


def test_generate_needs_the_api_key_when_one_is_set(server) -> None:
    with server.client() as client:
        assert client.post("/generate", json={"prompt": "Hi"}).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert client.post("/generate", json={"prompt": "Hi"}, headers=wrong).status_code == 401
        assert client.post("/admin/reload").status_code == 401


def test_metrics_count_requests_by_route_and_status(server) -> None:
    with server.client() as client:
        client.post(
            "/generate", json={"prompt": "Hi", "max_new_tokens": 2, "stream": False}, headers=AUTH
        )
        text = client.get("/metrics", headers=AUTH).text
    assert 'slm_requests_total{route="/generate",status="200"}' in text
    for name in (
        "slm_time_to_first_token_seconds_count",
        "slm_inter_token_latency_seconds_count",
        "slm_request_latency_seconds_count",
        "slm_queue_time_seconds_count",
        'slm_generated_tokens_total{model="run-a"}',
        'slm_prompt_tokens_total{model="run-a"}',
        "slm_waiting_requests",
        "slm_batch_size_count",
        'slm_loaded_model{model="run-a",step="1",version="run-a/step-00000001"} 1.0',
        'slm_reloads_total{outcome="loaded"}',
    ):
        assert name in text


def test_overload_gets_429_with_retry_after(tmp_path) -> None:
    write_checkpoint(tmp_path / "run-a")
    env = {
        "CHECKPOINT_DIR": str(tmp_path),
        "MAX_BATCH_SIZE": "1",
        "MAX_WAITING": "0",
        "MAX_NEW_TOKENS": "100000",
        "MAX_REQUEST_TOKENS": "200000",
    }
    with api_server(env, tmp_path, ready_path="/ready") as running, running.client() as client:
        body = {"prompt": "Once", "max_new_tokens": 100000, "temperature": 0}  # never ends
        with client.stream("POST", "/generate", json=body) as busy:
            events = sse_events(busy)  # held: dropping it would close the connection
            next(events)
            refused = client.post("/generate", json={"prompt": "Hi", "stream": False})
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        wait_for(lambda: running_requests(client) == 0, 10, "the slot to be freed")
        again = client.post(
            "/generate", json={"prompt": "Hi", "max_new_tokens": 3, "stream": False}
        )
        assert again.status_code == 200


def test_before_any_checkpoint_ready_and_generate_say_503_until_one_appears(tmp_path) -> None:
    root = tmp_path / "checkpoints"
    root.mkdir()
    env = {
        "CHECKPOINT_DIR": str(root),
        "RELOAD_POLL_S": "0.2",
        # Redis configured but down: generation and the poll must not care.
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
    }
    with api_server(env, tmp_path, ready_path="/health") as running, running.client() as client:
        assert client.get("/ready").status_code == 503
        refused = client.post("/generate", json={"prompt": "Hi"})
        assert refused.status_code == 503
        message = refused.json()["error"]["message"]
        assert "slm train" in message and "/train-jobs" in message and "slm init" in message

        version = write_checkpoint(root / "first-run")
        wait_for(lambda: client.get("/ready").status_code == 200, 10, "/ready to flip")
        assert client.get("/ready").json()["model"] == version
        answer = client.post(
            "/generate", json={"prompt": "Hi", "max_new_tokens": 3, "stream": False}
        )
        assert answer.status_code == 200
        assert answer.json()["model"] == version

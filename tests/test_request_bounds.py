"""No single request takes the server: what one request may start is bounded, its stories stop
when its client leaves, and text no tokenizer can read is a 422 naming the field; over real
HTTP against uvicorn."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx
import pytest
from servers import ApiServer, api_server, metric, wait_for, write_checkpoint


def serve(tmp_path_factory, **settings: str) -> Iterator[ApiServer]:
    """A server on one tiny checkpoint with ``settings`` as its environment."""
    root = tmp_path_factory.mktemp("checkpoints")
    write_checkpoint(root / "run-a")
    env = {"CHECKPOINT_DIR": str(root), "MAX_PROMPT_TOKENS": "200", "RELOAD_POLL_S": "60"}
    workdir = tmp_path_factory.mktemp("server")
    with api_server({**env, **settings}, workdir, ready_path="/ready") as running:
        yield running


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ApiServer]:
    yield from serve(
        tmp_path_factory,
        MAX_STORIES_PER_REQUEST="4",
        MAX_REQUEST_TOKENS="600",
        MAX_PROMPT_CHARS="2000",
    )


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory) -> Iterator[ApiServer]:
    """A server that writes one story at a time and queues none."""
    yield from serve(
        tmp_path_factory,
        MAX_BATCH_SIZE="1",
        MAX_WAITING="0",
        MAX_NEW_TOKENS="100000",
        MAX_REQUEST_TOKENS="200000",
    )


@pytest.fixture(scope="module")
def one_slot_queued(tmp_path_factory) -> Iterator[ApiServer]:
    """A server that writes one story at a time and queues the rest."""
    yield from serve(tmp_path_factory, MAX_BATCH_SIZE="1", MAX_WAITING="8", MAX_NEW_TOKENS="5000")


def post_raw(client: httpx.Client, path: str, body: dict) -> httpx.Response:
    """``body`` as JSON with ASCII escapes, the way a client can send a lone surrogate
    (``"\\ud800"``), which UTF-8 cannot hold."""
    content = json.dumps(body)  # ensure_ascii: a surrogate goes as its \\u escape
    return client.post(path, content=content, headers={"Content-Type": "application/json"})


def running(server: ApiServer) -> float:
    return metric(httpx.get(server.base_url + "/metrics").text, "slm_running_requests")


def waiting(server: ApiServer) -> float:
    return metric(httpx.get(server.base_url + "/metrics").text, "slm_waiting_requests")


@contextmanager
def whole_answer_awaited(server: ApiServer, path: str, body: dict) -> Iterator[socket.socket]:
    """A non-streaming request sent over a raw socket, open while its story is written; the
    client leaves when the block ends."""
    address = urlsplit(server.base_url)
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {address.hostname}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(head.encode() + payload)
        wait_for(lambda: running(server) == 1, 20, "the story to join the batch")
        yield sock


NEVER_ENDING = {"prompt": "Tom had a red ball.", "temperature": 0}

# --- what one request may start ---------------------------------------------------------------


def test_more_stories_than_max_stories_per_request_is_a_422_naming_the_setting(server) -> None:
    body = {"prompt": ["Once", "The dog", "Lily"], "n": 2, "max_tokens": 4}  # 6 stories
    with server.client() as client:
        response = client.post("/v1/completions", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt"
    assert "MAX_STORIES_PER_REQUEST" in error["message"], error


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": ["Once", "The dog"], "n": 2, "max_tokens": 160},  # 4 × 160 new tokens
        {"prompt": ["Once upon a time, " * 30] * 4, "max_tokens": 16},  # 4 × ~150 prompt tokens
    ],
    ids=["new-tokens", "prompt-tokens"],
)
def test_a_request_over_max_request_tokens_is_a_422_naming_the_setting(server, body) -> None:
    with server.client() as client:
        response = client.post("/v1/completions", json=body)
    assert response.status_code == 422, response.text
    assert "MAX_REQUEST_TOKENS" in response.json()["error"]["message"]


def test_a_prompt_over_max_prompt_chars_is_a_422_naming_the_setting(server) -> None:
    with server.client() as client:
        response = client.post("/generate", json={"prompt": "=" * 2001, "stream": False})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt" and "MAX_PROMPT_CHARS" in error["message"], error


def test_a_busy_server_answers_429_before_it_tokenizes_the_prompt(one_slot) -> None:
    # Tokenized first, this prompt would be a 422 (above MAX_PROMPT_TOKENS): the 429 shows
    # that a full server refuses it without encoding it.
    long_prompt = {"prompt": "Once upon a time " * 500, "stream": False}
    story = {**NEVER_ENDING, "max_new_tokens": 100_000, "stream": False}
    with whole_answer_awaited(one_slot, "/generate", story), one_slot.client() as client:
        response = client.post("/generate", json=long_prompt)
    assert response.status_code == 429, response.text
    assert response.headers["Retry-After"] == "1"
    wait_for(lambda: running(one_slot) == 0, 10, "the slot to be given back")


# --- a whole answer stops when its client leaves ----------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", {**NEVER_ENDING, "max_new_tokens": 100_000, "stream": False}),
        ("/v1/completions", {**NEVER_ENDING, "max_tokens": 100_000}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Tom"}], "max_tokens": 100_000,
             "temperature": 0},
        ),
    ],
    ids=["generate", "completions", "chat"],
)  # fmt: skip
def test_a_whole_answer_stops_decoding_when_its_client_leaves(one_slot, path, body) -> None:
    with whole_answer_awaited(one_slot, path, body):
        pass  # the client hangs up while its story is being written
    wait_for(lambda: running(one_slot) == 0, 10, "the abandoned story to leave the batch")
    with one_slot.client() as client:  # and the one slot serves the next client at once
        story = client.post("/generate", json={"prompt": "Once", "max_new_tokens": 4,
                                                "stream": False})  # fmt: skip
    assert story.status_code == 200, story.text


def test_waiting_stories_join_the_batch_client_by_client(one_slot_queued) -> None:
    """One client queues three stories behind its long one; another client's story, queued
    after them, is written second, not fourth (clients are told apart by address: this one
    sends from 127.0.0.2)."""
    server, finished, threads = one_slot_queued, [], []

    def story(name: str, address: str, tokens: int) -> None:
        transport = httpx.HTTPTransport(local_address=address)
        with httpx.Client(base_url=server.base_url, transport=transport, timeout=120) as client:
            body = {"prompt": "Once", "max_new_tokens": tokens, "seed": 1, "stream": False}
            response = client.post("/generate", json=body)
        assert response.status_code == 200, response.text
        finished.append(name)

    def queue(name: str, address: str, tokens: int) -> None:
        threads.append(threading.Thread(target=story, args=(name, address, tokens)))
        threads[-1].start()
        in_engine = lambda: running(server) + waiting(server) >= len(threads)  # noqa: E731
        wait_for(in_engine, 10, f"{name} to be in the engine")

    queue("a-long", "127.0.0.1", 3000)  # holds the one slot while the rest queue
    for index in range(3):
        queue(f"a-{index}", "127.0.0.1", 60)
    queue("b", "127.0.0.2", 60)
    for thread in threads:
        thread.join()
    assert finished == ["a-long", "a-0", "b", "a-1", "a-2"]


# --- text no tokenizer can read ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/generate", {"prompt": "Once \ud800", "stream": False}, "prompt"),
        ("/generate", {"prompt": "Once", "stop": "\udfff", "stream": False}, "stop"),
        ("/v1/completions", {"prompt": "Once \ud800", "echo": True, "max_tokens": 2}, "prompt"),
        ("/v1/completions", {"prompt": ["Once", "x\udc00"], "max_tokens": 2}, "prompt"),
        ("/v1/completions", {"prompt": "Once", "stop": ["x", "\ud83d"]}, "stop"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi \ud800"}]},
         "messages.0.content"),
        ("/v1/chat/completions",
         {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udbff"}]}]},
         "messages.0.content"),
        ("/tokenize", {"prompt": "Once \ud800"}, "prompt"),
    ],
    ids=["generate", "generate-stop", "echo", "prompt-list", "stop-list", "chat", "chat-parts",
         "tokenize"],
)  # fmt: skip
def test_a_lone_surrogate_is_a_422_naming_the_field(server, path, body, field) -> None:
    with server.client() as client:
        response = post_raw(client, path, body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == field, error
    assert "lone surrogate" in error["message"]


@pytest.mark.parametrize("path", ["/generate", "/train-jobs"])
def test_a_lone_surrogate_in_a_field_name_is_a_422_that_quotes_it_escaped(server, path) -> None:
    """An unknown field is quoted back in the error, though UTF-8 cannot hold its name. (The
    OpenAI routes take unknown fields, as OpenAI's do.)"""
    with server.client() as client:
        response = post_raw(client, path, {"prompt": "Once", "\ud800": 1})
    assert response.status_code in (422, 503), response.text  # /train-jobs: 503 without Redis
    assert response.json()["error"]["message"]


# --- temperature ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
def test_a_temperature_near_zero_writes_the_greedy_story(server, path) -> None:
    # Divided by 1e-40, a confident model's logits pass float32's range, where they all tie:
    # the draw among them would be uniform, not the likeliest token.
    body = {"prompt": "Once upon a time", "max_tokens": 24, "seed": 3, "stream": False}
    with server.client() as client:
        greedy = client.post(path, json={**body, "temperature": 0})
        tiny = client.post(path, json={**body, "temperature": 1e-40})
    assert greedy.status_code == tiny.status_code == 200, tiny.text

    def text(response: httpx.Response) -> str:
        answer = response.json()
        return answer["text"] if "text" in answer else answer["choices"][0]["text"]

    assert text(tiny) == text(greedy)

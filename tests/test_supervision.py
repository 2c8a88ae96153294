"""A supervised engine and bounded connections, against `slm serve` over a socket.

The engine's faults need a server that fails on cue: ``FAULTY_SERVE`` is `slm serve` with
memory that runs short for requests of two seeds (the one way the decode loop can fail outside
a step is a resource failing under it), started like test_faults.py's writer, with ``-c``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from servers import api_server, metric, sse_events, wait_for, write_checkpoint

# Memory runs short: admitting a request with ADMIT_FAULT seed (where a penalised request's
# sampler state is allocated), or in a forward of a batch holding a STEP_FAULT one; and this
# process has room for one KV cache of the model, no more.
FAULTY_SERVE = """
import sys
import weakref
import torch
from model.cache import KVCache
from model.generate import BatchGenerator
from slm.cli import main

ADMIT_FAULT, STEP_FAULT = 4040, 5050
add, step, make_cache = BatchGenerator.add, BatchGenerator.step, KVCache.__init__
caches = weakref.WeakSet()

def short_of_memory():
    return torch.OutOfMemoryError("not enough memory: you tried to allocate 16777216 bytes")

def add_or_fail(self, prompt, params):
    if params.seed == ADMIT_FAULT:
        raise short_of_memory()
    return add(self, prompt, params)

def step_or_fail(self):
    if any(sequence.params.seed == STEP_FAULT for sequence in self.rows):
        raise short_of_memory()
    return step(self)

def one_cache(self, config, max_batch, *args, **kwargs):
    if max_batch and any(cache.max_batch for cache in caches):
        raise short_of_memory()
    make_cache(self, config, max_batch, *args, **kwargs)
    caches.add(self)

BatchGenerator.add, BatchGenerator.step, KVCache.__init__ = add_or_fail, step_or_fail, one_cache
sys.exit(main(["serve", *sys.argv[1:]]))
"""
ADMIT_FAULT, STEP_FAULT = 4040, 5050
CANCELLED = 'slm_generations_total{model="run-a",reason="cancelled"}'


def stream_body(max_new_tokens: int, seed: int = 1, **extra: object) -> dict:
    return {"prompt": "Once upon a time", "max_new_tokens": max_new_tokens, "seed": seed, **extra}


class Stream:
    """A streamed story read on a thread: its events as they come, and how it ended."""

    def __init__(self, base_url: str, body: dict) -> None:
        self.events: list[tuple[str, str]] = []
        self.status: int | None = None
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._read, args=(base_url, body), daemon=True)
        self._thread.start()

    def _read(self, base_url: str, body: dict) -> None:
        try:
            with (
                httpx.Client(base_url=base_url, timeout=15) as client,
                client.stream("POST", "/generate", json=body) as response,
            ):
                self.status = response.status_code
                if response.status_code != 200:
                    response.read()
                    self.events.append(("refused", response.text))
                    return
                self.events.extend(sse_events(response))
        except httpx.HTTPError as error:  # a hang shows as a read timeout
            self.failure = repr(error)

    def last(self, timeout: float = 20) -> tuple[str, str]:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream neither ended nor failed"
        assert self.failure is None, self.failure
        return self.events[-1]


def one_story(base_url: str, max_new_tokens: int = 8) -> dict:
    with httpx.Client(base_url=base_url, timeout=15) as client:
        answer = client.post("/generate", json={**stream_body(max_new_tokens), "stream": False})
    assert answer.status_code == 200, answer.text
    return answer.json()


def serve_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    root = tmp_path / "checkpoints"
    write_checkpoint(root / "run-a")
    return {"CHECKPOINT_DIR": str(root), "RELOAD_POLL_S": "600", **settings}


# --- item 6: a supervised engine ----------------------------------------------------------


def test_a_failed_decode_loop_errors_every_request_says_unready_and_restarts(tmp_path) -> None:
    env = serve_env(tmp_path, MAX_BATCH_SIZE="2", MAX_NEW_TOKENS="5000")
    with api_server(env, tmp_path, ready_path="/ready", script=FAULTY_SERVE) as server:

        def waiting_count() -> float:
            with server.client() as client:
                return metric(client.get("/metrics").text, "slm_waiting_requests")

        running = Stream(server.base_url, stream_body(3000))
        wait_for(lambda: running.events, 15, "the first story's first token")
        with (
            httpx.Client(base_url=server.base_url, timeout=15) as client,
            client.stream("POST", "/generate", json=stream_body(3000, seed=2)) as holding,
        ):
            events = sse_events(holding)  # kept: a dropped iterator would close the stream
            next(events)  # the batch is full
            failing = Stream(server.base_url, stream_body(8, seed=ADMIT_FAULT))
            wait_for(lambda: waiting_count() == 1, 5, "the faulty request to wait")
            waiting = Stream(server.base_url, stream_body(8, seed=3))
            wait_for(lambda: waiting_count() == 2, 5, "a request to wait behind it")
        # The second story's client left: the faulty request takes its slot.

        event, data = running.last()
        with server.client() as client:
            ready = client.get("/ready")
        assert (event, ready.status_code) == ("error", 503), (event, data, ready.text)
        assert "restarting" in json.loads(data)["error"]["message"]
        assert "restarting" in ready.json()["error"]["message"]
        for refused in (failing, waiting):
            event, data = refused.last()
            assert event in ("error", "refused") and "restarting" in data, (event, data)

        wait_for(lambda: httpx.get(server.base_url + "/ready").status_code == 200, 10, "ready")
        assert one_story(server.base_url)["finish_reason"] == "length"
        with server.client() as client:
            assert metric(client.get("/metrics").text, "slm_engine_restarts_total") == 1


def test_a_failed_step_rebuilds_its_lane_without_a_second_kv_cache(tmp_path) -> None:
    env = serve_env(tmp_path, MAX_BATCH_SIZE="2")
    with api_server(env, tmp_path, ready_path="/ready", script=FAULTY_SERVE) as server:
        event, data = Stream(server.base_url, stream_body(8, seed=STEP_FAULT)).last()
        assert event == "error" and "generation failed" in data, (event, data)
        assert one_story(server.base_url)["finish_reason"] == "length"
        with server.client() as client:
            assert metric(client.get("/metrics").text, "slm_engine_restarts_total") == 0


# --- item 7: bounded connections ----------------------------------------------------------


@pytest.fixture(scope="module")
def bounded_server(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bounded")
    env = serve_env(
        tmp_path,
        MAX_CONNECTIONS="4",
        HEADER_TIMEOUT_S="1",
        STREAM_SEND_TIMEOUT_S="1",
        MAX_BATCH_SIZE="1",
        MAX_WAITING="0",
        MAX_NEW_TOKENS="100000",
        MAX_REQUEST_TOKENS="200000",
        MAX_LOGPROBS="100",  # kilobytes a token: an unread socket fills in a few tokens
    )
    with api_server(env, tmp_path, ready_path="/ready", cli=True) as server:
        yield server


def connect(server) -> socket.socket:
    host, port = server.base_url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def test_a_request_beyond_max_connections_gets_503_in_the_error_shape(bounded_server) -> None:
    idle = [connect(bounded_server) for _ in range(4)]
    try:
        time.sleep(0.2)  # the server has accepted them all
        refused = httpx.get(bounded_server.base_url + "/health", timeout=5)
    finally:
        for each in idle:
            each.close()
    assert refused.status_code == 503, refused.text
    assert "MAX_CONNECTIONS" in refused.json()["error"]["message"]
    wait_for(
        lambda: httpx.get(bounded_server.base_url + "/health", timeout=5).status_code == 200,
        5,
        "a connection to be accepted again",
    )


def test_headers_trickled_slower_than_header_timeout_get_408_and_a_close(bounded_server) -> None:
    with connect(bounded_server) as slow:
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started, answer = time.monotonic(), b""
        while time.monotonic() - started < 5:
            try:
                slow.sendall(b"X")  # a header byte at a time, never the blank line
            except OSError:  # closed by the server
                break
            slow.settimeout(0.01)  # often enough that a byte is unread when the 408 goes
            try:
                chunk = slow.recv(4096)
            except TimeoutError:
                continue
            if not chunk:
                break
            answer += chunk
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"HEADER_TIMEOUT_S" in answer
    assert elapsed < 3


def test_a_stream_longer_than_header_timeout_is_not_cut(bounded_server) -> None:
    with (
        httpx.Client(base_url=bounded_server.base_url, timeout=30) as client,
        client.stream("POST", "/generate", json=stream_body(5000)) as response,
    ):
        started = time.monotonic()
        events = list(sse_events(response))
    assert events[-1][0] == "done", events[-1]
    assert time.monotonic() - started > 1  # outlived HEADER_TIMEOUT_S (else it proves nothing)


def test_a_stream_its_client_never_reads_is_dropped_and_frees_its_slot(bounded_server) -> None:
    body = json.dumps(stream_body(50_000, logprobs=100)).encode()
    host, port = bounded_server.base_url.removeprefix("http://").split(":")
    deaf = socket.socket()
    deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a window that fills at once
    try:
        deaf.connect((host, int(port)))
        deaf.sendall(
            b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )  # and never a recv
        with bounded_server.client() as client:

            def cancelled() -> bool:
                text = client.get("/metrics").text
                return metric(text, CANCELLED, missing=0) > 0

            wait_for(cancelled, 20, "the unread stream to be dropped", interval=0.5)
        assert one_story(bounded_server.base_url)["finish_reason"] == "length"  # its slot is free
    finally:
        deaf.close()

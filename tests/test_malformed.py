"""Malformed requests, byte for byte over a raw socket to a real server: each gets its documented
4xx with the JSON error body (or a 200 where the input is odd but valid), and the server still
answers /health afterwards.

Policy, as documented in the OpenAPI schema (service/errors.py ``error_responses``):
- 400: a body that cannot be decoded at all (invalid UTF-8, JSON nested past Python's limit);
- 408: a body that does not arrive within BODY_TIMEOUT_S of the headers (slow loris);
- 413: a body over MAX_BODY_BYTES, declared or streamed (chunked);
- 415: a body that is not declared as JSON;
- 422: JSON that is not a valid request (broken syntax, wrong types, numbers out of range).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from servers import ApiServer, api_server, write_checkpoint

MAX_BODY = 64 * 1024
BODY_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ApiServer]:
    root = tmp_path_factory.mktemp("checkpoints")
    write_checkpoint(root / "run-a")
    env = {
        "CHECKPOINT_DIR": str(root),
        "MAX_BODY_BYTES": str(MAX_BODY),
        "BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "MAX_NEW_TOKENS": "256",
        "RELOAD_POLL_S": "600",
    }
    with api_server(env, tmp_path_factory.mktemp("server"), ready_path="/ready") as running:
        yield running


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def port_of(server: ApiServer) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


def read_answer(sock: socket.socket) -> Answer:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    length = int(headers.get("content-length", "-1"))
    while length < 0 or len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Answer(int(status_line.split()[1]), headers, body[: max(length, 0)] or body)


def request(
    server: ApiServer,
    body: bytes,
    *,
    path: str = "/generate",
    method: str = "POST",
    content_type: str | None = "application/json",
    chunked: bool = False,
) -> Answer:
    """Send ``body`` exactly as given (Content-Length, or one chunk); read the answer."""
    headers = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if content_type is not None:
        headers.append(f"Content-Type: {content_type}")
    if chunked:
        headers.append("Transfer-Encoding: chunked")
        payload = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    else:
        headers.append(f"Content-Length: {len(body)}")
        payload = body
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=30) as sock:
        sock.sendall(("\r\n".join(headers) + "\r\n\r\n").encode() + payload)
        return read_answer(sock)


def story(prompt_json: str = '"Once"', **fields) -> bytes:
    extra = "".join(f', "{k}": {v}' for k, v in fields.items())
    return f'{{"prompt": {prompt_json}, "max_new_tokens": 4, "stream": false{extra}}}'.encode()


def nested(depth: int) -> bytes:
    return b'{"prompt": "Hi", "stop": ' + b"[" * depth + b"]" * depth + b"}"


GENERATE_CASES = {
    # --- content types ---
    "text/plain": dict(body=story(), content_type="text/plain", status=415),
    "no content type": dict(body=story(), content_type=None, status=415),
    "form-encoded": dict(
        body=b"prompt=Hi", content_type="application/x-www-form-urlencoded", status=415
    ),
    "multipart": dict(
        body=b"--x\r\n\r\nHi\r\n--x--", content_type="multipart/form-data; boundary=x", status=415
    ),
    "json with charset": dict(
        body=story(), content_type="application/json; charset=utf-8", status=200
    ),
    # --- broken or odd JSON ---
    "truncated JSON": dict(body=b'{"prompt": "Hi",', status=422),
    "not JSON at all": dict(body=b"Once upon a time", status=422),
    "JSON array": dict(body=b'["Once"]', status=422),
    "JSON string": dict(body=b'"Once"', status=422),
    "JSON null": dict(body=b"null", status=422),
    "no fields but stream": dict(body=b'{"stream": false}', status=200),
    "trailing garbage": dict(body=story() + b"}}", status=422),
    "NaN literal": dict(body=story(temperature="NaN"), status=422),
    "nested 10,000 deep": dict(body=nested(10_000), status=400),
    "nested 100 deep": dict(body=nested(100), status=422),
    # --- unicode ---
    "lone surrogate": dict(body=story(r'"\ud800 tail"'), status=422),
    "NUL": dict(body=story(r'"a\u0000b"'), status=200),
    "right-to-left override": dict(body=story('"\u202eabc \u05e9\u05dc\u05d5\u05dd"'), status=200),
    "emoji and combining marks": dict(
        body=story('"\U0001f409 e\u0301 \U0001f468\u200d\U0001f469"'), status=200
    ),
    "invalid UTF-8 in the prompt": dict(body=b'{"prompt": "\xff\xfe\xc3("}', status=400),
    "overlong UTF-8 encoding": dict(body=b'{"prompt": "\xc0\xaf"}', status=400),
    "UTF-16 body": dict(body=story().decode().encode("utf-16"), status=200),
    # --- numbers ---
    "negative max_new_tokens": dict(body=story(max_new_tokens=-1), status=422),
    "10**30 max_new_tokens": dict(body=story(max_new_tokens=10**30), status=422),
    "10**30 seed": dict(body=story(seed=10**30), status=422),
    "negative seed": dict(body=story(seed=-(10**30)), status=422),
    "10**30 top_k": dict(body=story(top_k=10**30), status=200),
    "1e308 temperature": dict(body=story(temperature="1e308"), status=200),
    "1e-308 temperature": dict(body=story(temperature="1e-308"), status=200),
    "-1e308 temperature": dict(body=story(temperature="-1e308"), status=422),
    "1e309 (inf) temperature": dict(body=story(temperature="1e309"), status=422),
    "5e-324 repetition_penalty": dict(body=story(repetition_penalty="5e-324"), status=200),
    "1e-300 top_p": dict(body=story(top_p="1e-300"), status=200),
    "float max_new_tokens": dict(body=story(max_new_tokens="2.5"), status=422),
    "numeric string max_new_tokens": dict(body=story(max_new_tokens='"4"'), status=200),
    "word max_new_tokens": dict(body=story(max_new_tokens='"four"'), status=422),
    "10,000-digit integer": dict(body=story(seed="9" * 10_000), status=400),
    # --- limits ---
    "body over the limit": dict(body=story('"' + "x" * MAX_BODY + '"'), status=413),
    "chunked body over the limit": dict(
        body=story('"' + "x" * MAX_BODY + '"'), chunked=True, status=413
    ),
    "chunked body within the limit": dict(body=story(), chunked=True, status=200),
    "too many stop strings": dict(body=story(stop=json.dumps(["a"] * 100)), status=422),
    "prompt over MAX_PROMPT_TOKENS": dict(body=story(json.dumps("hi " * 5000)), status=422),
}


@pytest.mark.parametrize("case", GENERATE_CASES.values(), ids=GENERATE_CASES.keys())
def test_generate_answers_malformed_input_with_its_documented_status(server, case) -> None:
    case = dict(case)
    status = case.pop("status")
    answer = request(server, **case)
    assert answer.status == status, answer.body[:500]
    assert answer.headers["content-type"].startswith("application/json")
    if status >= 400:
        error = answer.json()["error"]
        assert error["message"] and error["type"]
    else:
        assert answer.json()["finish_reason"] in ("length", "end_of_text", "stop")
    assert_alive(server)


OTHER_CASES = {
    "completions, text/plain": dict(
        path="/v1/completions", body=b"{}", content_type="text/plain", status=415
    ),
    "completions, broken JSON": dict(path="/v1/completions", body=b"{", status=422),
    "train job, text/plain": dict(
        path="/train-jobs", body=b"{}", content_type="text/plain", status=415
    ),
    "unknown path": dict(path="/../../etc/passwd", method="GET", body=b"", status=404),
    "static path traversal": dict(
        path="/static/..%2f..%2fapp.py", method="GET", body=b"", status=404
    ),
    "wrong method": dict(path="/generate", method="GET", body=b"", status=405),
}


@pytest.mark.parametrize("case", OTHER_CASES.values(), ids=OTHER_CASES.keys())
def test_other_routes_answer_malformed_input_with_json_errors(server, case) -> None:
    case = dict(case)
    status = case.pop("status")
    answer = request(server, **case)
    assert answer.status == status, answer.body[:500]
    assert answer.json()["error"]["message"]
    assert_alive(server)


def slow_request(server: ApiServer, declared: int, sent: bytes, every_s: float) -> Answer:
    """Declare ``declared`` bytes, then trickle ``sent`` one byte per ``every_s`` (or send nothing
    when ``sent`` is empty) until the server answers."""
    head = (
        "POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=30) as sock:
        sock.sendall(head)
        for byte in sent:
            sock.settimeout(every_s)
            try:
                peek = sock.recv(1, socket.MSG_PEEK)
            except TimeoutError:
                peek = None
            if peek is not None:  # the server answered (or closed): stop trickling
                break
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
        sock.settimeout(30)
        return read_answer(sock)


@pytest.mark.parametrize(
    ("declared", "sent"),
    [(200, story() * 10), (100, b"")],
    ids=["a byte every 0.25 s", "headers, then nothing"],
)
def test_a_slow_body_gets_408_within_the_body_timeout(server, declared, sent) -> None:
    started = time.monotonic()
    answer = slow_request(server, declared, sent, every_s=0.25)
    elapsed = time.monotonic() - started
    assert answer.status == 408, answer.body
    assert "BODY_TIMEOUT_S" in answer.json()["error"]["message"]
    assert BODY_TIMEOUT_S <= elapsed < BODY_TIMEOUT_S + 3
    assert_alive(server)


def test_slow_bodies_do_not_hold_up_other_clients(server) -> None:
    """Eight slow-loris connections open at once; a normal request is answered meanwhile."""
    head = (
        b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{"
    )
    socks = [socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) for _ in range(8)]
    try:
        for sock in socks:
            sock.sendall(head)
        started = time.monotonic()
        answer = request(server, story())
        assert answer.status == 200
        assert time.monotonic() - started < BODY_TIMEOUT_S  # not queued behind the slow ones
        for sock in socks:
            assert read_answer(sock).status == 408
    finally:
        for sock in socks:
            sock.close()
    assert_alive(server)


def assert_alive(server: ApiServer) -> None:
    with server.client(timeout=5) as client:
        assert client.get("/health").json() == {"status": "ok"}

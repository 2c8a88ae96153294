"""Data sources cannot reach inside: a train job's http(s) source is a client's choice that the
worker fetches, so it may reach only public addresses (after DNS resolution and at every
redirect) unless ALLOWED_DATA_HOSTS names the host; downloads are capped in size and time; a
failure says what failed without telling listening ports from closed ones; and a URL's
credentials are never shown. Against the API under uvicorn, a real `slm worker` and Redis, with
HTTP servers on 127.0.0.1 standing for the inside of the network (one of them allowed)."""

from __future__ import annotations

import base64
import http.server
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import api_server, free_port
from test_data import files_in, synthetic_stories, write_stories
from workers import jobs_env, link_dataset, tiny_spec, wait_for_job, worker_process

from contract.jobs import DataSpec
from worker.data import DataError, prepare

API_KEY = "test-sources-guard-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_DOWNLOAD_BYTES = 512 * 1024
DOWNLOAD_TIMEOUT_S = 3
JOB_TIMEOUT_S = 90
CREDENTIALS = ("reader", "s3cret-token")


class InsideHandler(http.server.BaseHTTPRequestHandler):
    """``/stories.txt``; ``/to-inside`` redirects to the server that is not allowed (by name);
    ``/big.txt`` and ``/big-unsized.txt`` (no Content-Length) exceed MAX_DOWNLOAD_BYTES;
    ``/drip.txt`` sends a byte every 0.2 s, ``/drip-headers.txt`` a byte of its headers every
    0.2 s; ``/private/stories.txt`` needs CREDENTIALS."""

    server: InsideServer

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        stories = self.server.stories
        if self.path == "/to-inside":
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{self.server.redirect_port}/a.txt")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path in ("/stories.txt", "/private/stories.txt"):
            expected = "Basic " + base64.b64encode(":".join(CREDENTIALS).encode()).decode()
            if self.path.startswith("/private") and self.headers["Authorization"] != expected:
                self.send_error(401)
                return
            self._send(stories)
        elif self.path == "/big.txt":
            self._send(stories * (MAX_DOWNLOAD_BYTES // len(stories) + 1))
        elif self.path == "/big-unsized.txt":
            self.send_response(200)
            self.end_headers()
            self.close_connection = True
            for _ in range(MAX_DOWNLOAD_BYTES // len(stories) + 1):
                self.wfile.write(stories)
        elif self.path == "/drip-headers.txt":  # headers that never end
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for _ in range(200):
                self.wfile.write(b"X")
                self.wfile.flush()
                time.sleep(0.2)
        elif self.path == "/drip.txt":
            self.send_response(200)
            self.send_header("Content-Length", str(len(stories)))
            self.end_headers()
            for byte in stories[:200]:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)
        else:
            self.send_error(404)

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class InsideServer(http.server.ThreadingHTTPServer):
    requests: list[str]
    stories: bytes
    redirect_port: int


@pytest.fixture(scope="module")
def stories(tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("stories")
    return write_stories(folder / "stories.txt", synthetic_stories(1500)).read_bytes()


def serve(stories: bytes) -> InsideServer:
    httpd = InsideServer(("127.0.0.1", 0), InsideHandler)
    httpd.requests, httpd.stories = [], stories
    threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True).start()
    return httpd


@pytest.fixture(scope="module")
def inside(stories: bytes) -> Iterator[InsideServer]:
    """A server no rule allows: nothing may ever reach it."""
    httpd = serve(stories)
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def allowed(stories: bytes, inside: InsideServer) -> Iterator[InsideServer]:
    """A server on a loopback address that ALLOWED_DATA_HOSTS names (host:port)."""
    httpd = serve(stories)
    httpd.redirect_port = inside.server_port
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def silent() -> Iterator[int]:
    """A port that accepts connections and never answers (a firewall that drops, a stuck
    server), and allowed: its failure must read as a closed port's does."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    yield listener.getsockname()[1]
    listener.close()


@pytest.fixture(scope="module")
def closed() -> int:
    return free_port()


@pytest.fixture(scope="module")
def env(redis_url, train_data, tmp_path_factory, allowed, silent, closed) -> dict[str, str]:
    env = jobs_env(redis_url, tmp_path_factory.mktemp("guard"))
    link_dataset(env, train_data)
    hosts = ",".join(f"127.0.0.1:{port}" for port in (allowed.server_port, silent, closed))
    return {
        **env,
        "API_KEY": API_KEY,
        "ALLOWED_DATA_HOSTS": hosts,
        "MAX_DOWNLOAD_BYTES": str(MAX_DOWNLOAD_BYTES),
        "DOWNLOAD_TIMEOUT_S": str(DOWNLOAD_TIMEOUT_S),
    }


@pytest.fixture(scope="module")
def client(env, tmp_path_factory) -> Iterator[httpx.Client]:
    with (
        api_server(env, tmp_path_factory.mktemp("api")) as api,
        worker_process(env, tmp_path_factory.mktemp("worker")),
        api.client(headers=AUTH, timeout=10) as client,
    ):
        yield client


def run_job(client: httpx.Client, name: str, source: str, **train: Any) -> dict[str, Any]:
    spec = {**tiny_spec(name, max_steps=2, eval_interval=2, **train), "data": {"source": source}}
    response = client.post("/train-jobs", json=spec)
    assert response.status_code == 202, response.text
    return wait_for_job(
        client, response.json()["id"], lambda job: job["state"] in ("finished", "failed"),
        JOB_TIMEOUT_S,
    )  # fmt: skip


def failure(client: httpx.Client, name: str, source: str) -> str:
    job = run_job(client, name, source)
    assert job["state"] == "failed", job
    return job["message"]


def data_folder(env: dict[str, str], source: str) -> Path:
    return Path(env["DATA_DIR"]) / DataSpec(source=source).folder_name()


def assert_refused(message: str) -> None:
    assert "refused" in message and "ALLOWED_DATA_HOSTS" in message, message


def test_a_source_on_a_loopback_address_is_refused_unrequested(client, env, inside) -> None:
    source = f"http://127.0.0.1:{inside.server_port}/a.txt"
    assert_refused(failure(client, "loopback-run", source))
    assert inside.requests == []
    folder = data_folder(env, source)  # nothing written for it: no folder, no lock file
    assert [p.name for p in folder.parent.iterdir() if folder.name in p.name] == []


def test_a_name_resolving_to_loopback_is_refused_unrequested(client, inside) -> None:
    assert_refused(failure(client, "name-run", f"http://localhost:{inside.server_port}/b.txt"))
    assert inside.requests == []


def test_a_redirect_from_an_allowed_host_to_the_inside_is_refused(client, allowed, inside):
    message = failure(client, "redirect-run", f"http://127.0.0.1:{allowed.server_port}/to-inside")
    assert_refused(message)
    assert "/to-inside" in allowed.requests and inside.requests == []


@pytest.mark.parametrize("path", ["big.txt", "big-unsized.txt"])
def test_a_download_over_max_download_bytes_fails_and_leaves_no_file(client, env, allowed, path):
    source = f"http://127.0.0.1:{allowed.server_port}/{path}"
    message = failure(client, f"big-{path.split('.')[0]}-run", source)
    assert "MAX_DOWNLOAD_BYTES" in message and f"{MAX_DOWNLOAD_BYTES:,}" in message, message
    assert files_in(data_folder(env, source)) == []


@pytest.mark.parametrize("path", ["drip.txt", "drip-headers.txt"])
def test_a_download_slower_than_download_timeout_s_fails_in_time(client, allowed, path) -> None:
    started = time.monotonic()
    source = f"http://127.0.0.1:{allowed.server_port}/{path}"
    message = failure(client, f"{path.split('.')[0]}-run", source)
    assert "DOWNLOAD_TIMEOUT_S" in message, message
    assert time.monotonic() - started < DOWNLOAD_TIMEOUT_S + 30  # not the 40 s the drip takes


def test_a_closed_port_and_a_silent_one_fail_with_the_same_words(client, closed, silent):
    """No port scanner: which ports listen on a host the worker may reach is not told."""
    words = [
        failure(client, f"port-{port}-run", f"http://127.0.0.1:{port}/c.txt").replace(
            str(port), "PORT"
        )
        for port in (closed, silent)
    ]
    assert words[0] == words[1], words
    assert "could not download http://127.0.0.1:PORT/c.txt" in words[0]


def test_a_urls_credentials_are_used_but_never_shown(client, env, allowed) -> None:
    user, password = CREDENTIALS
    source = f"http://{user}:{password}@127.0.0.1:{allowed.server_port}/private/stories.txt"
    job = run_job(client, "private-run", source)
    assert job["state"] == "finished", job["message"]
    shown = [
        client.get(f"/train-jobs/{job['id']}").text,
        client.get("/train-jobs", params={"limit": 100}).text,
        client.get("/datasets").text,
        (data_folder(env, source) / "manifest.json").read_text(),
    ]
    assert not [text for text in shown if password in text]
    assert f"http://***@127.0.0.1:{allowed.server_port}/private/stories.txt" in shown[0]


@pytest.mark.parametrize(
    "host",
    ["10.1.2.3", "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1", "[::1]",
     "[::ffff:127.0.0.1]", "[fe80::1]", "[fc00::1]", "[2002:a00:1::1]", "[64:ff9b::a00:1]",
     "no-such-host.invalid"],
)  # fmt: skip
def test_sources_that_are_not_public_addresses_are_refused(host, tmp_path, monkeypatch):
    monkeypatch.delenv("ALLOWED_DATA_HOSTS", raising=False)
    with pytest.raises(DataError) as refused:
        prepare(f"http://{host}/stories.txt", tmp_path / "data", quiet=True)
    assert_refused(str(refused.value))

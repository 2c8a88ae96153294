"""Who may reach what, tried against a real server bound to every interface: a client on the
network (this machine's own non-loopback address, so the server sees a non-loopback peer), a web
page on loopback through DNS rebinding (a foreign Host header), and the playground on a laptop."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from servers import REPO, ApiServer, api_server, write_checkpoint
from workers import SLM, jobs_env, link_dataset, tiny_spec, wait_for_job, worker_process

from contract.broker import free_port

KEY = "exposure-test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Routes that start work or change the server: the ones the network may not use without a key.
OPERATOR_ROUTES = [
    ("POST", "/train-jobs"),
    ("GET", "/train-jobs"),
    ("GET", "/datasets"),
    ("POST", "/admin/reload"),
]


def own_address() -> str | None:
    """This machine's address on its default route (a UDP connect sends nothing), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if ipaddress.ip_address(address).is_loopback else address


ADDRESS = own_address()
needs_an_address = pytest.mark.skipif(ADDRESS is None, reason="no non-loopback IPv4 address")


def from_the_network(server: ApiServer, **kwargs) -> httpx.Client:
    """A client that reaches ``server`` through this machine's non-loopback address."""
    port = urlsplit(server.base_url).port
    return httpx.Client(base_url=f"http://{ADDRESS}:{port}", timeout=30, trust_env=False, **kwargs)


def on_loopback(server: ApiServer, **kwargs) -> httpx.Client:
    return server.client(trust_env=False, **kwargs)


@pytest.fixture(scope="module")
def env(redis_url: str, train_data: Path, tmp_path_factory) -> dict[str, str]:
    env = jobs_env(redis_url, tmp_path_factory.mktemp("exposure"))
    link_dataset(env, train_data)
    return env


@pytest.fixture(scope="module")
def open_api(env: dict[str, str], tmp_path_factory) -> Iterator[ApiServer]:
    """`slm serve --host 0.0.0.0` with no API_KEY and no model yet."""
    with api_server(env, tmp_path_factory.mktemp("open"), cli=True, host="0.0.0.0") as server:
        yield server


@pytest.fixture(scope="module")
def keyed_api(env: dict[str, str], tmp_path_factory) -> Iterator[ApiServer]:
    """The API on every interface with API_KEY set, serving the run `secret-run`."""
    root = tmp_path_factory.mktemp("keyed")
    write_checkpoint(root / "checkpoints" / "secret-run")
    settings = {**env, "CHECKPOINT_DIR": str(root / "checkpoints"), "API_KEY": KEY}
    with api_server(settings, root, ready_path="/ready", host="0.0.0.0") as server:
        yield server


# --- without a key: loopback only -------------------------------------------------------------


@needs_an_address
@pytest.mark.parametrize(("method", "path"), OPERATOR_ROUTES)
def test_without_a_key_a_network_client_gets_403_naming_api_key(
    open_api: ApiServer, method: str, path: str
) -> None:
    with from_the_network(open_api) as client:
        response = client.request(method, path, json=tiny_spec("from-afar"))
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["type"] == "permission_error"
    assert "API_KEY" in error["message"] and "Authorization: Bearer" in error["message"]


@needs_an_address
def test_a_refused_train_job_is_not_queued(open_api: ApiServer) -> None:
    with from_the_network(open_api) as client:
        assert client.post("/train-jobs", json=tiny_spec("never-queued")).status_code == 403
    with on_loopback(open_api) as client:
        listed = client.get("/train-jobs", params={"limit": 100}).json()["jobs"]
    assert "never-queued" not in [job["run_name"] for job in listed]


@needs_an_address
def test_a_forwarded_for_header_does_not_make_a_network_client_local(open_api: ApiServer) -> None:
    with from_the_network(open_api, headers={"X-Forwarded-For": "127.0.0.1"}) as client:
        assert client.get("/train-jobs").status_code == 403


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "192.0.2.7:8000"])
def test_a_foreign_host_header_is_refused_on_loopback(open_api: ApiServer, host: str) -> None:
    """A web page whose name resolves to 127.0.0.1 (DNS rebinding) sends its own name as Host."""
    with on_loopback(open_api, headers={"Host": host}) as client:
        response = client.get("/train-jobs")
    assert response.status_code == 403, response.text
    assert "Host header" in response.json()["error"]["message"]


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost", "[::1]"])
def test_the_playground_on_loopback_trains_without_a_key(open_api: ApiServer, name: str) -> None:
    port = urlsplit(open_api.base_url).port
    with on_loopback(open_api, headers={"Host": f"{name}:{port}"}) as client:
        assert client.get("/train-jobs").status_code == 200
        assert client.get("/datasets").status_code == 200
        assert client.post("/admin/reload").json()["outcome"] == "no_checkpoint"


@needs_an_address
def test_without_a_key_generation_stays_open_to_the_network(open_api: ApiServer) -> None:
    """The operator chose who reaches the port by binding 0.0.0.0; `slm serve` says so."""
    with from_the_network(open_api) as client:
        assert client.get("/v1/models").status_code == 200
    assert "listening on 0.0.0.0 with no API_KEY" in open_api.output()


# --- with a key -------------------------------------------------------------------------------


@needs_an_address
def test_with_a_key_a_network_client_may_train_and_reload(keyed_api: ApiServer) -> None:
    with from_the_network(keyed_api) as client:
        assert client.get("/train-jobs").status_code == 401
        assert client.get("/train-jobs", headers=AUTH).status_code == 200
        assert client.post("/admin/reload", headers=AUTH).status_code == 200


@needs_an_address
def test_with_a_key_ready_names_no_run_to_a_client_without_it(keyed_api: ApiServer) -> None:
    with from_the_network(keyed_api) as client:
        anonymous = client.get("/ready")
        keyed = client.get("/ready", headers=AUTH)
    assert anonymous.status_code == 200 and "secret-run" not in anonymous.text
    assert anonymous.json()["ready"] is True
    assert keyed.json()["model"] == "secret-run/step-00000001"


@needs_an_address
def test_with_a_key_metrics_need_it(keyed_api: ApiServer) -> None:
    with from_the_network(keyed_api) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=AUTH).status_code == 200


@needs_an_address
def test_public_status_shows_ready_and_metrics_without_the_key(
    env: dict[str, str], tmp_path: Path
) -> None:
    write_checkpoint(tmp_path / "checkpoints" / "open-run")
    settings = {**env, "CHECKPOINT_DIR": str(tmp_path / "checkpoints"), "API_KEY": KEY}
    settings["PUBLIC_STATUS"] = "true"
    with (
        api_server(settings, tmp_path, ready_path="/ready", host="0.0.0.0") as server,
        from_the_network(server) as client,
    ):
        assert client.get("/ready").json()["model"] == "open-run/step-00000001"
        assert client.get("/metrics").status_code == 200
        assert client.get("/train-jobs").status_code == 401  # status only, not the rest


def test_an_api_key_shorter_than_16_characters_stops_the_server_at_start(tmp_path: Path) -> None:
    env = {**os.environ, "API_KEY": "short-key", "CHECKPOINT_DIR": str(tmp_path)}
    command = [SLM, "serve", "--port", str(free_port())]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "API_KEY must be at least 16 characters" in result.stdout + result.stderr


# --- no server paths in answers ---------------------------------------------------------------


def test_error_answers_show_no_absolute_path_of_the_server(
    open_api: ApiServer, env: dict[str, str]
) -> None:
    folders = [str(Path(env["CHECKPOINT_DIR"]).resolve()), str(Path(env["DATA_DIR"]).resolve())]
    with on_loopback(open_api) as client:
        answers = [
            client.get("/ready"),  # no model yet: advice on where checkpoints go
            client.post("/generate", json={"prompt": "Hi"}),
            client.post("/admin/reload"),
            client.post("/train-jobs", json={**tiny_spec("nope"), "data": {"dataset": "nope"}}),
        ]
    for answer in answers:
        assert not any(folder in answer.text for folder in folders), answer.text
    assert [answer.status_code for answer in answers] == [503, 503, 200, 422]
    assert "CHECKPOINT_DIR" in answers[0].text and "DATA_DIR" in answers[3].text


def test_a_failed_jobs_message_shows_no_absolute_path_of_the_worker(
    open_api: ApiServer, env: dict[str, str], tmp_path: Path
) -> None:
    """The API sees the dataset, the worker's own DATA_DIR lacks it: the job fails on the
    worker, whose message names its folder by the setting."""
    worker_env = {**env, "DATA_DIR": str(tmp_path / "worker-data")}
    with (
        worker_process(worker_env, tmp_path),
        on_loopback(open_api) as client,
    ):
        response = client.post("/train-jobs", json=tiny_spec("no-data-on-worker"))
        assert response.status_code == 202, response.text
        job = wait_for_job(client, response.json()["id"], lambda j: j["state"] == "failed", 60)
    assert "is not prepared under DATA_DIR" in job["message"]
    assert str(tmp_path) not in job["message"], job["message"]

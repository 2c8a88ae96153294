"""The Docker set-up, checked without a Docker engine: docker-compose.yml resolved by a real
Compose (Debian's docker-compose v1.29 answers `config` offline), docker/Dockerfile linted by
hadolint and read instruction by instruction, and the containers' health checks run for real.

The tools are skipped only where they are absent; .ci/run installs both, and under CI (CI set)
a missing tool fails instead, so CI never passes by skipping.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from servers import free_port

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
HADOLINT_CONFIG = REPO / "docker" / ".hadolint.yaml"
HEALTHCHECK_SCRIPT = REPO / "docker" / "healthcheck.py"
# Where the image's CHECKPOINT_DIR and DATA_DIR point, and so where the volumes must be mounted.
CHECKPOINT_DIR = "/var/lib/slm/checkpoints"
DATA_DIR = "/var/lib/slm/data"
FINAL_TARGETS = {"worker": ["slm", "worker"], "api": ["slm", "serve", "--host", "0.0.0.0"]}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: under CI this check must run, not skip")
        pytest.skip(reason)
    return path


# --- docker-compose.yml, as Compose resolves it -----------------------------------------------

# Variables the compose file reads; each test starts from none of them set.
COMPOSE_VARIABLES = re.compile(
    r"^(API_KEY|API_BIND|API_PORT|PUBLIC_STATUS|QUEUE_NAME|SLM_.*|WORKER_.*|CUDA_IMAGE|TORCH_.*|"
    r"DEVICE|QUANTIZATION|"
    r"MAX_.*|DECODE_THREADS|COMPILE_DECODE|REQUEST_TIMEOUT_S|BODY_TIMEOUT_S|RELOAD_POLL_S|JOB_TIMEOUT_S|"
    r"KV_CACHE_BYTES|MIN_FREE_DISK_BYTES|HEADER_TIMEOUT_S|STREAM_SEND_TIMEOUT_S|"
    r"ALLOWED_DATA_HOSTS|DOWNLOAD_TIMEOUT_S|COMPOSE_.*)$"
)


@cache
def empty_env_file() -> str:
    """Stands in for a developer's .env beside the compose file (Compose wants a real file)."""
    path = Path(tempfile.mkdtemp(prefix="slm-compose-")) / "empty.env"
    path.write_text("")
    return str(path)


def compose(*args: str, **variables: str) -> str:
    """`docker-compose ARGS` on the repository's file, with only ``variables`` set of those it
    reads (and no .env file), so the result does not depend on the caller's shell."""
    env = {key: value for key, value in os.environ.items() if not COMPOSE_VARIABLES.match(key)}
    env.update(variables)
    result = subprocess.run(
        [tool("docker-compose"), "--env-file", empty_env_file(), "-f", str(COMPOSE_FILE), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"docker-compose {' '.join(args)} failed:\n{result.stderr}"
    return result.stdout


def resolved(**variables: str) -> dict:
    return yaml.safe_load(compose("config", **variables))


@pytest.fixture(scope="module")
def config() -> dict:
    return resolved()


def mounts(service: dict) -> dict[str, tuple[str, str]]:
    """Container path → (source, mode) of a resolved service's volumes."""
    found = {}
    for entry in service.get("volumes", []):
        source, target, *mode = entry.split(":")
        found[target] = (source, mode[0] if mode else "rw")
    return found


def test_compose_defines_redis_worker_and_api_with_named_volumes(config):
    assert set(config["services"]) == {"redis", "worker", "api"}
    assert {"checkpoints", "data", "redis-data"} <= set(config["volumes"])
    services = compose("config", "--services").split()
    assert sorted(services) == ["api", "redis", "worker"]


def test_worker_reserves_nvidia_gpus(config):
    devices = config["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    (gpu,) = devices
    assert gpu["driver"] == "nvidia"
    assert "gpu" in gpu["capabilities"]
    assert gpu["count"] == "all"
    one_each = resolved(WORKER_GPUS="1")["services"]["worker"]["deploy"]["resources"]
    assert str(one_each["reservations"]["devices"][0]["count"]) == "1"


def test_worker_can_be_scaled(config):
    """`--scale worker=N` fails on a fixed name or host port; a fixed hostname would make every
    replica's health check accept any replica's registration."""
    worker = config["services"]["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    assert "hostname" not in worker


def test_worker_mounts_checkpoints_and_data_read_write(config):
    worker = mounts(config["services"]["worker"])
    assert worker[CHECKPOINT_DIR] == ("checkpoints", "rw")
    assert worker[DATA_DIR] == ("data", "rw")


def test_api_mounts_the_same_checkpoints_and_data_read_only(config):
    api = mounts(config["services"]["api"])
    assert api[CHECKPOINT_DIR] == ("checkpoints", "ro")
    assert api[DATA_DIR] == ("data", "ro")  # GET /datasets; a job's dataset checked at submit


def test_api_publishes_port_8000_on_the_hosts_loopback_only(config):
    """Without API_KEY the API is open to whoever reaches the port: by default, only this host."""
    assert config["services"]["api"]["ports"] == ["127.0.0.1:8000:8000/tcp"]
    moved = resolved(API_BIND="0.0.0.0", API_PORT="9000")["services"]["api"]["ports"]
    assert moved == ["0.0.0.0:9000:8000/tcp"]


@pytest.mark.parametrize("service", ["worker", "api"])
def test_services_start_after_redis_is_healthy(config, service):
    assert config["services"][service]["depends_on"] == {"redis": {"condition": "service_healthy"}}


def test_redis_has_a_healthcheck_and_a_persistent_volume(config):
    redis = config["services"]["redis"]
    assert redis["image"].startswith("redis:")
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert mounts(redis)["/data"][0] == "redis-data"
    assert "--appendonly" in redis["command"]


@pytest.mark.parametrize("service", ["worker", "api"])
def test_services_talk_to_the_compose_redis_on_one_queue(service):
    environment = resolved(QUEUE_NAME="gpu-jobs")["services"][service]["environment"]
    assert environment["REDIS_URL"] == "redis://redis:6379/0"
    assert environment["QUEUE_NAME"] == "gpu-jobs"


def test_api_key_passes_through_only_when_set_on_the_host():
    """An unset host variable leaves API_KEY unset in the container (open user routes), rather
    than setting it to an empty string."""
    assert resolved()["services"]["api"]["environment"]["API_KEY"] is None
    assert resolved(API_KEY="s3cret")["services"]["api"]["environment"]["API_KEY"] == "s3cret"


def test_engine_settings_keep_the_service_defaults_unless_set(config):
    environment = config["services"]["api"]["environment"]
    assert environment["MAX_BATCH_SIZE"] is None
    tuned = resolved(MAX_BATCH_SIZE="8")["services"]["api"]["environment"]
    assert tuned["MAX_BATCH_SIZE"] == "8"


# The bounds an operator exposing the service tunes, and the service that reads each.
BOUNDS = {
    "api": ["MAX_STORIES_PER_REQUEST", "MAX_REQUEST_TOKENS", "MAX_PROMPT_CHARS",
            "MAX_CONNECTIONS", "HEADER_TIMEOUT_S", "STREAM_SEND_TIMEOUT_S", "KV_CACHE_BYTES",
            "MAX_MODEL_BLOCK_SIZE", "MAX_MODEL_PARAMS", "PUBLIC_STATUS", "COMPILE_DECODE"],
    "worker": ["ALLOWED_DATA_HOSTS", "MAX_DOWNLOAD_BYTES", "DOWNLOAD_TIMEOUT_S",
               "MIN_FREE_DISK_BYTES"],
}  # fmt: skip


@pytest.mark.parametrize(
    ("service", "variable"),
    [(service, name) for service, names in BOUNDS.items() for name in names],
)
def test_the_bounds_pass_through_to_their_service_when_set_on_the_host(config, service, variable):
    assert config["services"][service]["environment"][variable] is None
    tuned = resolved(**{variable: "7"})["services"][service]["environment"]
    assert tuned[variable] == "7"


@pytest.mark.parametrize("service", sorted(FINAL_TARGETS))
def test_services_build_their_target_of_the_dockerfile(config, service, dockerfile):
    build = config["services"][service]["build"]
    assert (Path(build["context"]) / build["dockerfile"]).resolve() == DOCKERFILE
    assert build["target"] == service
    assert service in dockerfile.stages
    # `docker compose build` and a plain `docker build` make the same image.
    for name, value in build["args"].items():
        assert dockerfile.arg_defaults[name] == value, name


# --- docker/Dockerfile -------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Dockerfile:
    arg_defaults: dict[str, str]
    stages: dict[str, Stage]

    def chain(self, name: str) -> list[Stage]:
        """The stage and the stages it is built FROM, base first."""
        stages = []
        while name in self.stages:
            stages.insert(0, self.stages[name])
            name = self.stages[name].base
        return stages

    def effective(self, name: str, keyword: str) -> str | None:
        """The last ``keyword`` instruction (USER, CMD, HEALTHCHECK) in force in a stage."""
        found = None
        for stage in self.chain(name):
            for instruction, arguments in stage.instructions:
                if instruction == keyword:
                    found = arguments
        return found

    def all(self, name: str, keyword: str) -> list[str]:
        return [a for s in self.chain(name) for i, a in s.instructions if i == keyword]


def parse_dockerfile(text: str) -> Dockerfile:
    """Instructions with their continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line.strip())
        pending = ""
    arg_defaults: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for entry in logical:
        instruction, _, arguments = entry.partition(" ")
        instruction = instruction.upper()
        arguments = " ".join(arguments.split())
        if instruction == "FROM":
            match = re.fullmatch(r"(\S+) AS (\S+)", arguments, flags=re.IGNORECASE)
            assert match, f"every stage is named: FROM {arguments}"
            current = stages[match[2]] = Stage(match[2], match[1])
        elif current is None:
            assert instruction == "ARG", f"{instruction} before the first FROM"
            name, _, default = arguments.partition("=")
            arg_defaults[name] = default
        else:
            if instruction == "ARG" and "=" in arguments:
                name, _, default = arguments.partition("=")
                arg_defaults[name] = default
            current.instructions.append((instruction, arguments))
    return Dockerfile(arg_defaults, stages)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


def hadolint(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("hadolint"), "--no-color", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dockerfile_lints_clean_with_hadolint():
    result = hadolint(
        "--config", str(HADOLINT_CONFIG), "--failure-threshold", "info", str(DOCKERFILE)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_hadolint_and_its_config_do_catch_problems():
    """The lint above means something: the same config still flags a bad Dockerfile."""
    bad = "FROM ubuntu\nRUN cd /tmp && apt-get install curl\n"
    result = hadolint("--config", str(HADOLINT_CONFIG), "-", stdin=bad)
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged base image
    assert "DL3003" in result.stdout  # cd instead of WORKDIR


@pytest.mark.parametrize("target", sorted(FINAL_TARGETS))
def test_final_stages_run_as_a_non_root_user(dockerfile, target):
    user = dockerfile.effective(target, "USER")
    assert user is not None, f"{target} runs as root"
    uid = user.split(":")[0]
    assert uid not in {"root", "0"}
    # The uid is the one the image creates (its volumes' owner), not just any number.
    assert any(f"--uid {uid} " in run for run in dockerfile.all(target, "RUN"))
    assert dockerfile.effective(target, "ENTRYPOINT") == '["tini", "--"]'


@pytest.mark.parametrize("target", sorted(FINAL_TARGETS))
def test_final_stages_check_their_own_health(dockerfile, target):
    check = dockerfile.effective(target, "HEALTHCHECK")
    assert check is not None and "NONE" not in check.upper()
    assert f'"/app/docker/healthcheck.py", "{target}"]' in check
    assert "--start-period=" in check


@pytest.mark.parametrize("target", sorted(FINAL_TARGETS))
def test_final_stages_start_their_command(dockerfile, target):
    command = dockerfile.effective(target, "CMD")
    assert command is not None
    assert command.startswith(str(FINAL_TARGETS[target]).replace("'", '"')[:-1])


@pytest.mark.parametrize("target", sorted(FINAL_TARGETS))
def test_image_looks_for_checkpoints_and_data_where_compose_mounts_them(dockerfile, target):
    environment = " ".join(dockerfile.all(target, "ENV")).split()
    assert f"CHECKPOINT_DIR={CHECKPOINT_DIR}" in environment
    assert f"DATA_DIR={DATA_DIR}" in environment
    # Created in the image and owned by its user, so new named volumes are writable by it.
    prepare = " ".join(dockerfile.all(target, "RUN"))
    assert f"mkdir -p {CHECKPOINT_DIR} {DATA_DIR}" in prepare
    assert "chown -R slm:slm /var/lib/slm" in prepare


def test_api_listens_on_port_8000_on_all_interfaces(dockerfile):
    assert dockerfile.effective("api", "CMD") == (
        '["slm", "serve", "--host", "0.0.0.0", "--port", "8000"]'
    )
    assert "8000" in dockerfile.all("api", "EXPOSE")


def test_gpt2_vocabulary_is_baked_into_the_image(dockerfile):
    builder = dockerfile.stages["builder"].instructions
    fetches = [
        i for i, (k, a) in enumerate(builder) if k == "RUN" and a.startswith("slm fetch-vocab")
    ]
    assert fetches, "the builder stage runs `slm fetch-vocab`"
    fetch = fetches[0]
    cache_env = [i for i, (k, a) in enumerate(builder) if k == "ENV" and "TIKTOKEN_CACHE_DIR=" in a]
    assert cache_env and cache_env[0] < fetch, "fetch-vocab must write to TIKTOKEN_CACHE_DIR"
    folder = re.search(r"TIKTOKEN_CACHE_DIR=(\S+)", builder[cache_env[0]][1])[1]
    for target in FINAL_TARGETS:
        assert f"--from=builder {folder} {folder}" in dockerfile.all(target, "COPY")
        runtime_env = " ".join(dockerfile.all(target, "ENV"))
        assert f"TIKTOKEN_CACHE_DIR={folder}" in runtime_env


def test_torch_is_the_cuda_build_of_the_version_ci_tests(dockerfile):
    cpu_pin = re.search(r"^torch==(\S+)", (REPO / "constraints/cpu.txt").read_text(), re.M)[1]
    assert dockerfile.arg_defaults["TORCH_VERSION"] == cpu_pin
    assert re.fullmatch(r"cu\d{3}", dockerfile.arg_defaults["TORCH_CUDA"])
    assert dockerfile.arg_defaults["CUDA_IMAGE"].startswith("nvidia/cuda:")
    cuda = dockerfile.arg_defaults["TORCH_CUDA"][2:]
    image_cuda = re.search(r":(\d+)\.(\d+)", dockerfile.arg_defaults["CUDA_IMAGE"])
    assert image_cuda[1] + image_cuda[2] == cuda, "base image and torch want the same CUDA"
    install = next(
        a for k, a in dockerfile.stages["builder"].instructions if k == "RUN" and "torch==" in a
    )
    assert '--index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"' in install
    assert '"torch==${TORCH_VERSION}"' in install


def test_image_installs_every_package_of_the_project_with_worker_and_service(dockerfile):
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {pattern.rstrip("*") for pattern in include["packages"]["find"]["include"]}
    copied = {a.split()[0] for k, a in dockerfile.stages["builder"].instructions if k == "COPY"}
    assert packages <= copied
    assert any(
        k == "RUN" and 'pip install -e ".[worker,service]"' in a
        for k, a in dockerfile.stages["builder"].instructions
    )


def copy_sources(dockerfile: Dockerfile) -> set[str]:
    sources = set()
    for stage in dockerfile.stages.values():
        for keyword, arguments in stage.instructions:
            if keyword == "COPY" and not arguments.startswith("--from"):
                sources.update(arguments.split()[:-1])
    return sources


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_everything_the_image_copies_exists_and_is_in_the_build_context(dockerfile):
    patterns = dockerignore_patterns()
    for source in copy_sources(dockerfile):
        assert (REPO / source).exists(), source
        top = source.rstrip("/").split("/")[0]
        assert top not in patterns and source not in patterns, f"{source} is .dockerignored"


@pytest.mark.parametrize(
    "path", [".git", ".venv", "checkpoints", "data", "**/__pycache__", ".pytest_cache", ".env"]
)
def test_dockerignore_keeps_local_state_out_of_the_build_context(path):
    assert path in dockerignore_patterns()


# --- docker/healthcheck.py ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docker_healthcheck", HEALTHCHECK_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 503)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_api_check_passes_when_health_answers_200(healthcheck, http_url):
    assert healthcheck.check_api(f"{http_url}/health") is None


def test_api_check_fails_on_an_error_status(healthcheck, http_url):
    assert "answered 503" in healthcheck.check_api(f"{http_url}/ready")


def test_api_check_fails_when_nothing_listens(healthcheck):
    problem = healthcheck.check_api(f"http://127.0.0.1:{free_port()}/health", timeout_s=2)
    assert "unreachable" in problem


def run_script(mode: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The check as Docker runs it: a separate process, configured by the environment."""
    clean = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "QUEUE_NAME"}}
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK_SCRIPT), mode],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_api_script_exits_0_when_healthy_and_1_when_not(http_url):
    healthy = run_script("api", HEALTHCHECK_URL=f"{http_url}/health")
    assert (healthy.returncode, healthy.stdout.strip()) == (0, "healthy")
    broken = run_script("api", HEALTHCHECK_URL=f"{http_url}/broken")
    assert broken.returncode == 1
    assert "503" in broken.stdout


@pytest.fixture
def registered_worker(redis_url) -> Iterator[str]:
    """An RQ worker registered from this host on a fresh queue; yields the queue's name."""
    from redis import Redis
    from rq import Worker

    queue = f"healthcheck-{uuid.uuid4().hex[:8]}"
    connection = Redis.from_url(redis_url)
    worker = Worker([queue], connection=connection)
    worker.register_birth()
    yield queue
    worker.register_death()
    connection.close()


def test_worker_check_passes_with_this_hosts_worker_registered(
    healthcheck, redis_url, registered_worker
):
    assert healthcheck.check_worker(redis_url, registered_worker, socket.gethostname()) is None


def test_worker_check_fails_for_another_containers_worker(
    healthcheck, redis_url, registered_worker
):
    problem = healthcheck.check_worker(redis_url, registered_worker, "another-container")
    assert "no RQ worker from this container" in problem
    assert "1 from other hosts" in problem


def test_worker_check_fails_without_a_worker_on_the_queue(healthcheck, redis_url):
    problem = healthcheck.check_worker(redis_url, "nobody-listens", socket.gethostname())
    assert "no RQ worker" in problem


def test_worker_check_fails_when_redis_does_not_answer(healthcheck):
    url = f"redis://127.0.0.1:{free_port()}/0"
    problem = healthcheck.check_worker(url, "slm-train", socket.gethostname(), timeout_s=2)
    assert "does not answer" in problem


def test_worker_check_fails_without_redis_url(healthcheck):
    assert "REDIS_URL" in healthcheck.check_worker(None, "slm-train", socket.gethostname())


def test_worker_script_reads_redis_url_and_queue_name(redis_url, registered_worker):
    healthy = run_script("worker", REDIS_URL=redis_url, QUEUE_NAME=registered_worker)
    assert (healthy.returncode, healthy.stdout.strip()) == (0, "healthy"), healthy.stderr
    unhealthy = run_script("worker", REDIS_URL=redis_url, QUEUE_NAME="empty-queue")
    assert unhealthy.returncode == 1
    assert "no RQ worker" in unhealthy.stdout

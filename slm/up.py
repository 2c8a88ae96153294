"""`slm up`: Redis, one training worker and the API as local processes — the topology of
docker-compose.yml on one machine, without Docker.

Redis is REDIS_URL's, or an embedded one (``contract.broker.embedded_redis``) shared with the
children through REDIS_URL. Each child's output is shown line by line behind its name. Ctrl-C (or
SIGTERM) stops the API and the worker with SIGTERM — the worker asks a running job to stop, which
saves a checkpoint — then the embedded Redis; a second Ctrl-C kills what is still running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass

from contract.broker import default_state_dir, embedded_redis
from contract.settings import Settings

STOP_TIMEOUT_S = 120.0  # a worker stopping a training job saves a checkpoint first


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    relay: threading.Thread


def _relay(name: str, stream, width: int) -> None:
    """Copy a child's output to ours, each line behind the child's name."""
    for line in iter(stream.readline, b""):
        sys.stdout.write(f"{name:>{width}} | {line.decode(errors='replace')}")
        sys.stdout.flush()


def _start(name: str, args: list[str], env: dict[str, str], width: int) -> Child:
    process = subprocess.Popen(
        [sys.executable, "-m", "slm.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # Its own session: a terminal's Ctrl-C reaches only us, and we stop the children in order.
        start_new_session=True,
    )
    relay = threading.Thread(target=_relay, args=(name, process.stdout, width), daemon=True)
    relay.start()
    return Child(name, process, relay)


def _stop(children: list[Child]) -> None:
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    try:
        for child in children:
            child.process.wait(max(0.0, deadline - time.monotonic()))
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        for child in children:
            if child.process.poll() is None:
                print(f"slm up: killing {child.name}", flush=True)
                child.process.kill()
                child.process.wait()
    for child in children:
        child.relay.join(5)


def run_up(host: str, port: int, log_level: str = "info") -> int:
    """Run until Ctrl-C or SIGTERM (exit 0) or until a child exits on its own (its failure is
    ours: exit 1)."""
    settings = Settings()
    # SIGTERM (docker stop, systemd, a test) takes the same clean path as Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with ExitStack() as stack:
        url = settings.redis_url
        if url is None:
            url = stack.enter_context(embedded_redis(default_state_dir(settings)))
            print(f"slm up: embedded Redis at {url.split('@')[-1]}", flush=True)
        env = {**os.environ, "REDIS_URL": url, "PYTHONUNBUFFERED": "1"}
        children = [
            _start("worker", ["worker"], env, width=6),
            _start(
                "api",
                ["serve", "--host", host, "--port", str(port), "--log-level", log_level],
                env,
                width=6,
            ),
        ]
        print(f"slm up: the API and playground at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
        try:
            while True:
                exited = next((c for c in children if c.process.poll() is not None), None)
                if exited is not None:
                    print(
                        f"slm up: {exited.name} exited with {exited.process.returncode}; "
                        "stopping the rest",
                        flush=True,
                    )
                    _stop(children)
                    return 1
                time.sleep(0.2)
        except KeyboardInterrupt:
            print("slm up: stopping", flush=True)
            _stop(children)
            return 0

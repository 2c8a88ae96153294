"""`slm up`: Redis, one training worker and the API as local processes — the topology of
docker-compose.yml on one machine, without Docker.

Redis is REDIS_URL's, or an embedded one (``contract.broker.embedded_redis``) shared with the
children through REDIS_URL. Each child's output is shown line by line behind its name. Ctrl-C (or
SIGTERM, or SIGHUP: the terminal closed) stops the API and the worker with SIGTERM — the worker
asks a running job to stop, which saves a checkpoint — then the embedded Redis; a second Ctrl-C
kills what is still running. If `slm up` dies without that (``kill -9``, the OOM killer), the
kernel sends each child SIGTERM (``contract.lifetime``), so none outlives it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, suppress
from dataclasses import dataclass

from contract.broker import default_state_dir, embedded_redis
from contract.lifetime import parent_death_signal
from contract.settings import Settings

STOP_TIMEOUT_S = 120.0  # a worker stopping a training job saves a checkpoint first


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    relay: threading.Thread


def _relay(name: str, stream, width: int) -> None:
    """Copy a child's output to ours, each line behind the child's name. Lines that cannot be
    shown (the terminal closed) are dropped, but the pipe is still drained: a child blocked on a
    full pipe could not finish stopping."""
    for line in iter(stream.readline, b""):
        _say(f"{name:>{width}} | {line.decode(errors='replace')}", end="")


def _say(text: str, end: str = "\n") -> None:
    with suppress(OSError):  # no terminal any more (SIGHUP): nowhere to show it
        print(text, end=end, flush=True)


def _start(name: str, args: list[str], env: dict[str, str], width: int) -> Child:
    process = subprocess.Popen(
        [sys.executable, "-m", "slm.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # Its own session: a terminal's Ctrl-C reaches only us, and we stop the children in order.
        start_new_session=True,
        preexec_fn=parent_death_signal(),
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
                _say(f"slm up: killing {child.name}")
                child.process.kill()
                child.process.wait()
    for child in children:
        child.relay.join(5)


def run_up(host: str, port: int, log_level: str = "info") -> int:
    """Run until Ctrl-C or SIGTERM (exit 0) or until a child exits on its own (its failure is
    ours: exit 1)."""
    settings = Settings()
    # SIGTERM (docker stop, systemd, a test) and SIGHUP (the terminal closed) take the same clean
    # path as Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.default_int_handler)
    with ExitStack() as stack:
        url = settings.redis_url
        if url is None:
            url = stack.enter_context(embedded_redis(default_state_dir(settings)))
            _say(f"slm up: embedded Redis at {url.split('@')[-1]}")
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
        # On every interface, the playground is still opened on loopback: there, without
        # API_KEY, its Train panel may reach the train-job routes (service.auth).
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        _say(f"slm up: the API and playground at http://{shown}:{port}/ (Ctrl-C stops)")
        try:
            while True:
                exited = next((c for c in children if c.process.poll() is not None), None)
                if exited is not None:
                    _say(
                        f"slm up: {exited.name} exited with {exited.process.returncode}; "
                        "stopping the rest"
                    )
                    _stop(children)
                    return 1
                time.sleep(0.2)
        except KeyboardInterrupt:
            _say("slm up: stopping")
            _stop(children)
            return 0

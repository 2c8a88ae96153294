"""The containers' HEALTHCHECK: ``healthcheck.py api`` or ``healthcheck.py worker``.

Exit 0 when healthy, 1 when not, with one line saying why; Docker keeps that line in
``docker inspect --format '{{json .State.Health}}' CONTAINER``.

- ``api``: GET /health answers 200 (``HEALTHCHECK_URL``, default http://127.0.0.1:8000/health).
  Liveness only: /ready stays 503 until a checkpoint is loaded, and a service waiting for its
  first checkpoint is not broken.
- ``worker``: Redis (``REDIS_URL``) answers PING, and an RQ worker started in this container (its
  hostname is the container's) is registered on ``QUEUE_NAME``. RQ forgets a worker whose
  heartbeat stops, so a hung or dead worker process turns the container unhealthy.

Only the standard library, redis and rq, so the check stays fast (no torch import).
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request

DEFAULT_HEALTH_URL = "http://127.0.0.1:8000/health"
TIMEOUT_S = 5.0


def check_api(url: str, timeout_s: float = TIMEOUT_S) -> str | None:
    """None when ``url`` answers 200, else what went wrong."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            if response.status != 200:
                return f"{url} answered {response.status}"
    except urllib.error.HTTPError as error:
        return f"{url} answered {error.code}"
    except (urllib.error.URLError, OSError) as error:
        return f"{url} unreachable: {getattr(error, 'reason', error)}"
    return None


def check_worker(
    redis_url: str | None, queue_name: str, hostname: str, timeout_s: float = TIMEOUT_S
) -> str | None:
    """None when Redis answers and a worker on ``hostname`` serves ``queue_name``."""
    if not redis_url:
        return "REDIS_URL is not set: the worker would run an embedded Redis nobody else sees"
    from redis import Redis
    from redis.exceptions import RedisError
    from rq import Queue, Worker

    # from_url only parses; the first command connects.
    connection = Redis.from_url(
        redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )
    try:
        connection.ping()
        workers = Worker.all(queue=Queue(queue_name, connection=connection))
    except (RedisError, OSError) as error:
        return f"Redis at {redis_url} does not answer: {error}"
    finally:
        connection.close()
    if not any(worker.hostname == hostname for worker in workers):
        return (
            f"no RQ worker from this container ({hostname}) is registered on queue "
            f"{queue_name!r} ({len(workers)} from other hosts)"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["api"]:
        problem = check_api(os.environ.get("HEALTHCHECK_URL", DEFAULT_HEALTH_URL))
    elif args == ["worker"]:
        from contract.settings import Settings

        settings = Settings()
        problem = check_worker(settings.redis_url, settings.queue_name, socket.gethostname())
    else:
        print("usage: healthcheck.py api|worker", file=sys.stderr)
        return 2
    print(problem or "healthy")
    return 1 if problem else 0


if __name__ == "__main__":
    sys.exit(main())

"""Finds, validates and swaps in checkpoints while the service keeps answering.

``check`` asks ``model.checkpoint.newest_checkpoint`` which checkpoint under CHECKPOINT_DIR was
written last; if it is not the one serving, it is loaded and validated in a worker thread (never
on the event loop) and handed to the engine, which serves new requests from it while streams in
flight finish on the old one. A checkpoint that fails to load is logged, counted
(``slm_reloads_total{outcome="rejected"}``) and remembered, so it is refused once, not at every
poll, and the old model keeps serving.

Three things call ``check``: a poll every RELOAD_POLL_S (the only path without Redis, and the
fallback with it), the worker's announcements on Redis (CHECKPOINT_CHANNEL, plus
LATEST_CHECKPOINT_KEY on every connect, for announcements missed while disconnected), and
POST /admin/reload. Announcements only trigger a check: the folder, not the message, says what
is newest, so a late or stray message can never roll the service back. Redis being down only
delays reloads until the next poll; generation never depends on it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import RedisError

from contract.jobs import (
    CHECKPOINT_CHANNEL,
    LATEST_CHECKPOINT_KEY,
    CheckpointAnnouncement,
    checkpoint_version,
)
from contract.settings import Settings
from model.checkpoint import CheckpointError, load_checkpoint, newest_checkpoint
from model.device import pick_device
from service.engine import Engine, no_model_message, use_torch_threads
from service.loaded import LoadedModel
from service.metrics import RELOADS
from service.schemas import ReloadOutcome, ReloadReport

log = logging.getLogger("slm.reloader")

REDIS_RETRY_S = (0.5, 1, 2, 5, 10)  # reconnect back-off while Redis is unreachable


def version_of(meta_path: Path) -> str:
    """``<run>/<checkpoint name>``: how users, metrics and announcements name a checkpoint."""
    return checkpoint_version(meta_path.parent.name, meta_path.stem)


@dataclass(frozen=True)
class _Seen:
    """A checkpoint as found on disk: its path and when its metadata was last written, so a
    checkpoint rewritten under the same name counts as new."""

    path: Path
    mtime_ns: int


class Reloader:
    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self._lock = asyncio.Lock()  # one check at a time, whoever asks
        self._serving: _Seen | None = None
        self._rejected: set[_Seen] = set()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Load what is there now, then keep watching (poll, and Redis when configured)."""
        report = await self._check_safely("startup")
        if report is not None and report.outcome == "no_checkpoint":
            log.warning(no_model_message(self.settings))
        self._tasks.append(asyncio.create_task(self._poll(), name="slm-reload-poll"))
        if self.settings.redis_url:
            self._tasks.append(asyncio.create_task(self._listen(), name="slm-reload-redis"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def check(self, reason: str) -> ReloadReport:
        """Load the newest checkpoint if it is new; report what happened."""
        async with self._lock:
            report = await self._check()
        if report.outcome in ("loaded", "rejected"):
            log.log(
                logging.INFO if report.outcome == "loaded" else logging.WARNING,
                "reload (%s): %s",
                reason,
                report.message,
            )
        return report

    async def _check(self) -> ReloadReport:
        found = await asyncio.to_thread(self._find)
        if found is None:
            return self._report("no_checkpoint", f"no checkpoint under {self._root}")
        version = version_of(found.path)
        if found == self._serving:
            return self._report("unchanged", f"{version} is already serving")
        if found in self._rejected:
            return self._report("rejected", f"{version} was refused before; still serving")
        try:
            loaded = await asyncio.to_thread(self._load, found.path, version)
        except (CheckpointError, OSError, ValueError, RuntimeError) as error:
            # A checkpoint is untrusted input: whatever is wrong with it, refuse it and go on.
            self._rejected.add(found)
            RELOADS.labels("rejected").inc()
            return self._report("rejected", f"refused {version}: {error}")
        self._serving = found
        RELOADS.labels("loaded").inc()
        return self._report("loaded", f"loaded {version} (step {loaded.meta.step})")

    @property
    def _root(self) -> Path:
        return self.settings.checkpoint_dir

    def _find(self) -> _Seen | None:
        try:
            path = newest_checkpoint(self._root)
            return None if path is None else _Seen(path, path.stat().st_mtime_ns)
        except FileNotFoundError:  # the manifest points at metadata that is not there (yet)
            return None

    def _load(self, path: Path, version: str) -> LoadedModel:
        use_torch_threads(1)
        model, meta = load_checkpoint(path, device=pick_device(self.settings.device))
        loaded = LoadedModel(model=model, meta=meta, path=path, version=version)
        self.engine.install(loaded)
        return loaded

    def _report(self, outcome: ReloadOutcome, message: str) -> ReloadReport:
        serving = self.engine.model
        return ReloadReport(
            outcome=outcome, model=serving.version if serving else None, message=message
        )

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_poll_s)
            await self._check_safely("poll")

    async def _check_safely(self, reason: str) -> ReloadReport | None:
        """A check nobody waits on: an unexpected failure (an unreadable CHECKPOINT_DIR) is
        logged, never fatal; the next check tries again."""
        try:
            return await self.check(reason)
        except Exception:
            log.exception("reload check (%s) failed", reason)
            return None

    async def _listen(self) -> None:
        """Follow the worker's announcements; reconnect with back-off whenever Redis drops."""
        assert self.settings.redis_url is not None
        failures = 0
        while True:
            client = aioredis.Redis.from_url(
                self.settings.redis_url, socket_connect_timeout=2, health_check_interval=15
            )
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(CHECKPOINT_CHANNEL)
                    failures = 0
                    latest = await client.get(LATEST_CHECKPOINT_KEY)
                    if latest is not None:
                        await self._announced(latest)
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            await self._announced(message["data"])
            except (RedisError, OSError) as error:
                if failures == 0:
                    log.warning("Redis unreachable (%s); reloads rely on polling meanwhile", error)
                await asyncio.sleep(REDIS_RETRY_S[min(failures, len(REDIS_RETRY_S) - 1)])
                failures += 1
            finally:
                await client.aclose()

    async def _announced(self, raw: bytes) -> None:
        try:
            announcement = CheckpointAnnouncement.model_validate_json(raw)
        except ValidationError as error:
            log.warning("ignoring a malformed checkpoint announcement: %s", error)
            return
        serving = self.engine.model
        if serving is None or serving.version != announcement.version:
            await self._check_safely(f"announced {announcement.version}")

"""Finds, validates and swaps in checkpoints while the service keeps answering, for every run
served by name.

Every run folder under CHECKPOINT_DIR with a checkpoint can be served; a request picks one by
``model`` (its run name) and one naming none gets the *default run*, the run that saved last.
At most MAX_LOADED_MODELS runs are held in memory: ``resolve`` loads a run on its first request
and unloads the least recently used one beyond that (stories already running on it finish
first). The default run is loaded at start and whenever another run becomes the newest.

``check`` asks ``model.checkpoint`` for the latest checkpoint of the default run and of every
loaded run; any that is not the one serving is loaded and validated in a worker thread (never on
the event loop) and handed to the engine, which serves new requests from it while streams in
flight finish on the old one. A checkpoint that fails to load, or whose model is larger than
this server serves (``contract.capacity``), is logged, counted
(``slm_reloads_total{outcome="rejected"}``) and remembered, so it is refused once, not at every
poll, and the old model keeps serving.

Three things call ``check``: a poll every RELOAD_POLL_S (the only path without Redis, and the
fallback with it), the worker's announcements on Redis (CHECKPOINT_CHANNEL, plus
LATEST_CHECKPOINT_KEY on every connect, for announcements missed while disconnected), and
POST /admin/reload. Announcements only trigger a check: the folder, not the message, says what
is newest, so a late or stray message can never roll the service back. Redis being down only
delays reloads until the next poll; generation never depends on it. So several replicas on one
CHECKPOINT_DIR and one Redis all load a checkpoint that was announced once.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydantic import ValidationError
from redis.exceptions import RedisError

from contract.broker import connect_async
from contract.capacity import check_model
from contract.jobs import (
    CHECKPOINT_CHANNEL,
    LATEST_CHECKPOINT_KEY,
    CheckpointAnnouncement,
    checkpoint_version,
)
from contract.settings import Settings
from model.checkpoint import (
    DTYPES,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    newest_checkpoint,
    read_meta,
    run_checkpoints,
)
from model.device import pick_device, use_torch_threads
from service.engine import Engine, NoModel, UnknownModel, no_model_message
from service.loaded import LoadedModel
from service.metrics import RELOADS
from service.schemas import ReloadOutcome, ReloadReport

log = logging.getLogger("slm.reloader")

REDIS_RETRY_S = (0.5, 1, 2, 5, 10)  # reconnect back-off while Redis is unreachable
# A run is a folder directly under CHECKPOINT_DIR: a name, never a path.
RUN_NAME = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9._-]{1,128}$")


@dataclass(frozen=True)
class RunInfo:
    """A run that can be served: its name, latest checkpoint and whether it is in memory."""

    name: str
    version: str
    created_at: datetime
    loaded: bool


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
        self._lock = asyncio.Lock()  # one check or load at a time, whoever asks
        self._serving: dict[str, _Seen] = {}  # by run: the checkpoint it serves from
        self._rejected: dict[_Seen, str] = {}  # why each was refused
        self._used: OrderedDict[str, None] = OrderedDict()  # loaded runs, least recent first
        self._default: str | None = None  # the run that saved last
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Load what is there now, then keep watching (poll, and Redis when configured)."""
        report = await self._check_safely("startup")
        if report is not None and report.outcome == "no_checkpoint":
            log.warning("%s (CHECKPOINT_DIR: %s)", no_model_message(self.settings), self._root)
        self._tasks.append(asyncio.create_task(self._poll(), name="slm-reload-poll"))
        if self.settings.redis_url:
            self._tasks.append(asyncio.create_task(self._listen(), name="slm-reload-redis"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def resolve(self, model: str | None) -> str:
        """The loaded run a request's ``model`` names (a run name, or a ``<run>/<checkpoint>``
        version, which picks its run: the run's latest checkpoint answers); None or "" names
        the default run. Loads the run if it is not in memory. Raises UnknownModel (no such
        run) or NoModel (nothing to serve yet, or the run's checkpoint was refused)."""
        run = model.partition("/")[0] if model else self._default
        if run is None:
            raise NoModel(no_model_message(self.settings))
        if run not in self.engine.models:
            if not RUN_NAME.match(run):
                raise UnknownModel(f"model: {model!r} is not a run name; GET /v1/models lists them")
            async with self._lock:
                if run not in self.engine.models:
                    await self._load_run(run)
        self._used[run] = None
        self._used.move_to_end(run)
        return run

    async def runs(self) -> list[RunInfo]:
        """Every run with a checkpoint under CHECKPOINT_DIR, by name."""
        found = await asyncio.to_thread(run_checkpoints, self._root)
        loaded = self.engine.models
        return [
            RunInfo(run, version_of(path), created_at, run in loaded)
            for run, (path, created_at) in found.items()
        ]

    async def _load_run(self, run: str) -> None:
        try:
            path = await asyncio.to_thread(latest_checkpoint, self._root / run)
            seen = None if path is None else _Seen(path, path.stat().st_mtime_ns)
        except (CheckpointError, OSError):
            seen = None
        if seen is None:
            raise UnknownModel(
                f"model: no run {run!r} with a checkpoint under CHECKPOINT_DIR; "
                "GET /v1/models lists the runs"
            )
        error = await self._swap_in(run, seen)
        if error is not None:
            raise NoModel(f"model: {run} cannot be served: {error}")

    async def check(self, reason: str) -> ReloadReport:
        """Load the newest checkpoint of the default run and of every loaded run where it is
        new; report on the default run."""
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
        newest, latest = await asyncio.to_thread(self._find, list(self.engine.models))
        if newest is None:
            return self._report("no_checkpoint", "no checkpoint under CHECKPOINT_DIR")
        run = newest.path.parent.name
        for other, seen in latest.items():  # the other loaded runs: their outcome is logged
            if other != run and (error := await self._swap_in(other, seen)):
                log.warning("reload of %s: %s", other, error)
        version = version_of(newest.path)
        if newest == self._serving.get(run):
            self._default = run
            return self._report("unchanged", f"{version} is already serving")
        if newest in self._rejected:
            return self._report("rejected", f"{version} was refused before; still serving")
        # Requests naming no run move to the newest run only once it loaded.
        if error := await self._swap_in(run, newest, default=True):
            return self._report("rejected", f"refused {version}: {error}")
        self._default = run
        loaded = self.engine.models[run]
        return self._report("loaded", f"loaded {version} (step {loaded.meta.step})")

    async def _swap_in(self, run: str, seen: _Seen, default: bool = False) -> str | None:
        """Serve ``run`` from the checkpoint ``seen`` unless it already does (and requests
        naming no run, with ``default``); then unload the least recently used runs beyond
        MAX_LOADED_MODELS. Returns why it was refused, or None."""
        if seen == self._serving.get(run):
            return None
        if seen in self._rejected:
            return f"its checkpoint was refused before: {self._rejected[seen]}"
        version = version_of(seen.path)
        try:
            await asyncio.to_thread(self._load, seen.path, version, default or run == self._default)
        except (CheckpointError, OSError, ValueError, RuntimeError) as error:
            # A checkpoint is untrusted input: whatever is wrong with it, refuse it and go on.
            self._rejected[seen] = str(error)
            RELOADS.labels("rejected").inc()
            return str(error)
        self._serving[run] = seen
        RELOADS.labels("loaded").inc()
        self._used[run] = None
        self._used.move_to_end(run)
        while len(self._used) > self.settings.max_loaded_models:
            evicted, _ = self._used.popitem(last=False)
            self._serving.pop(evicted, None)
            self.engine.unload(evicted)
            log.info("unloaded %s (MAX_LOADED_MODELS=%d)", evicted, self.settings.max_loaded_models)
        return None

    @property
    def _root(self) -> Path:
        return self.settings.checkpoint_dir

    def _find(self, loaded: list[str]) -> tuple[_Seen | None, dict[str, _Seen]]:
        """The newest checkpoint under the root, and the latest of each loaded run."""
        try:
            path = newest_checkpoint(self._root)
            newest = None if path is None else _Seen(path, path.stat().st_mtime_ns)
        except FileNotFoundError:  # the manifest points at metadata that is not there (yet)
            newest = None
        latest: dict[str, _Seen] = {}
        for run in loaded:
            try:
                path = latest_checkpoint(self._root / run)
                if path is not None:
                    latest[run] = _Seen(path, path.stat().st_mtime_ns)
            except (CheckpointError, OSError):  # a run being rewritten, or deleted: keep it
                continue
        return newest, latest

    def _load(self, path: Path, version: str, default: bool) -> LoadedModel:
        use_torch_threads(1)
        # A checkpoint's metadata says its shape: one larger than this server serves is refused
        # before any of its weights, or its KV cache, is allocated (contract.capacity). Read as
        # the load below reads it, through the run folder.
        meta = read_meta(path.parent)
        check_model(meta.config, DTYPES[meta.dtype], self.settings)
        # Through the run folder, not the metadata path: if the trainer's retention deletes this
        # checkpoint mid-load, load_checkpoint then follows the manifest to its successor.
        model, meta = load_checkpoint(path.parent, device=pick_device(self.settings.device))
        if meta.name != path.stem:
            path = path.with_name(f"{meta.name}.json")
            version = version_of(path)
        loaded = LoadedModel(model=model, meta=meta, path=path, version=version)
        self.engine.install(loaded, default=default)
        return loaded

    def _report(self, outcome: ReloadOutcome, message: str) -> ReloadReport:
        serving = self.engine.model
        # The admin route answers with it: a refused checkpoint's error names no server path.
        message = self.settings.redact(message)
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
        failures = 0
        while True:
            client = connect_async(self.settings)
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
        serving = self.engine.models.get(announcement.version.partition("/")[0])
        if serving is None or serving.version != announcement.version:
            await self._check_safely(f"announced {announcement.version}")

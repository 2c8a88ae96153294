"""The RQ job function: a ``TrainJobSpec`` in, a training run out, its progress in the job's meta.

This module runs in RQ's work horse, the process forked for each job, never in the worker's
parent (``worker.runner``): torch, and CUDA with it, start here and die with the horse, so a
crashed or out-of-memory job leaves the worker whole for the next one.

What a job does, in order: prepare its data if the spec names a source (under a file lock, so
two jobs never write one folder), pick the checkpoint to fine-tune from, then train into
CHECKPOINT_DIR/<run_name>/, which resumes exactly when that folder holds a training state (a job
resumed after a stop or a crash), once it has checked that the folder is its own and recorded
itself there (``contract.runs``). A job that saved no checkpoint leaves no run folder, and every
job releases its claim on the run when it ends. Along the way it writes a ``JobProgress`` into
the job's meta (throttled, see ``ProgressReport``), announces every checkpoint on Redis, and
polls the stop key.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
import torch
from rq import get_current_job
from rq.job import Job

from contract.datasets import prepare_advice
from contract.jobs import (
    CHECKPOINT_CHANNEL,
    HISTORY_LIMIT,
    LATEST_CHECKPOINT_KEY,
    PROGRESS_META_KEY,
    CheckpointAnnouncement,
    DataSpec,
    JobProgress,
    JobState,
    LossPoint,
    TrainJobSpec,
    checkpoint_version,
    redact_url,
    stop_key,
)
from contract.runs import holds_checkpoints, run_conflict, write_owner
from contract.settings import Settings
from contract.store import release_run
from contract.train import TrainProgress
from model.checkpoint import CheckpointError, latest_checkpoint, read_meta
from worker.callbacks import TrainCallback
from worker.data import MANIFEST, DataError, prepare, read_manifest
from worker.data.sources import DownloadRules, check_url
from worker.runner import stop_signalled
from worker.trainer import BEST, check_free_disk, train

log = logging.getLogger("slm.worker")

META_WRITE_INTERVAL_S = 0.5  # progress reaches Redis at most twice a second between events
STOP_POLL_INTERVAL_S = 0.25  # how often the stop key is read (the trainer asks every step)
WORKER_GONE_EXIT_CODE = 70


class TrainJobError(RuntimeError):
    """A job that cannot run as specified; the message is what the user sees."""


def thin_history(points: list[LossPoint]) -> list[LossPoint]:
    """Every other point, the first always kept: the curve keeps its start and its shape at
    half the resolution."""
    return points[::2]


class ProgressReport(TrainCallback):
    """The job's ``JobProgress``, kept in its RQ meta, and its checkpoints announced on Redis.
    Writes go out when the state changes, after an evaluation or a checkpoint, and otherwise at
    most every ``META_WRITE_INTERVAL_S``, so a fast GPU loop does not turn into a stream of Redis
    writes. Redis errors are logged and skipped: a blip in Redis must not kill hours of
    training."""

    def __init__(self, job: Job, spec: TrainJobSpec) -> None:
        self.job, self.spec = job, spec
        stored = job.meta.get(PROGRESS_META_KEY)
        # A resumed job keeps its step count and history (trimmed in on_start).
        self.progress = JobProgress.model_validate_json(stored) if stored else JobProgress()
        self._written_at = 0.0

    def update(self, **fields: Any) -> None:
        self.progress = self.progress.model_copy(update=fields)

    def set_state(self, state: JobState, message: str | None) -> None:
        self.update(state=state, message=message)
        self.save()

    def save(self) -> None:
        self.update(updated_at=datetime.now(UTC))
        self.job.meta[PROGRESS_META_KEY] = self.progress.model_dump_json()
        try:
            self.job.save_meta()
        except redis.RedisError as error:
            log.warning("job %s: progress not saved (%s)", self.job.id, error)
        self._written_at = time.monotonic()

    def log(self, message: str) -> None:
        log.info(message)

    def on_start(self, progress: TrainProgress) -> None:
        # A resumed run goes on from its checkpoint: what was recorded after it is redone.
        history = [point for point in self.progress.history if point.step <= progress.step]
        self.update(
            resumed_from=progress.step or None,
            history=history,
            message=None,
            **self._trained(progress),
        )
        self.save()

    def on_progress(self, progress: TrainProgress) -> None:
        evaluated = (
            progress.step % self.spec.train.eval_interval == 0
            or progress.step == progress.max_steps
        )
        self.update(**self._trained(progress))
        self._record(
            LossPoint(
                step=progress.step,
                train_loss=progress.train_loss,
                val_loss=progress.val_loss if evaluated else None,
                val_bits_per_byte=progress.val_bits_per_byte if evaluated else None,
            )
        )
        if evaluated or time.monotonic() - self._written_at >= META_WRITE_INTERVAL_S:
            self.save()

    def on_checkpoint(self, path: Path) -> None:
        meta = read_meta(path)
        self.update(last_checkpoint=checkpoint_version(self.spec.run_name, meta.name))
        self.save()
        announce(
            self.job.connection,
            CheckpointAnnouncement(
                run=self.spec.run_name,
                name=meta.name,
                step=meta.step,
                val_loss=meta.val_loss,
                job_id=self.job.id,
            ),
        )

    @staticmethod
    def _trained(progress: TrainProgress) -> dict[str, Any]:
        """The run's own fields; the job names its checkpoint by version, not by path."""
        return progress.model_dump(exclude={"last_checkpoint"})

    def _record(self, point: LossPoint) -> None:
        history = [old for old in self.progress.history if old.step < point.step]
        every = self.progress.history_every
        if point.step % every == 0 or point.val_loss is not None:
            history.append(point)
        if len(history) > HISTORY_LIMIT:
            history, every = thin_history(history), every * 2
        self.update(history=history, history_every=every)


class StopRequests(TrainCallback):
    """True once the API has set the job's stop key (read at most every STOP_POLL_INTERVAL_S),
    or the worker has sent this horse SIGTERM (``worker.runner``: its warm shutdown).

    It is also true when the worker that forked the horse is gone (``kill -9`` on the worker
    leaves the horse orphaned, re-parented, and still training): the run saves a checkpoint,
    then ``train_job`` ends the horse, since an orphan would go on writing into the run folder
    while the job is reported abandoned and perhaps resumed by another worker."""

    def __init__(self, connection: redis.Redis, job_id: str) -> None:
        self.connection, self.key = connection, stop_key(job_id)
        self.worker_pid = os.getppid()
        self.orphaned = False
        self._checked_at = 0.0

    def should_stop(self) -> bool:
        if os.getppid() != self.worker_pid:
            if not self.orphaned:
                log.error("the worker (pid %d) is gone; this work horse stops", self.worker_pid)
            self.orphaned = True
            return True
        if stop_signalled():
            return True
        now = time.monotonic()
        if now - self._checked_at < STOP_POLL_INTERVAL_S:
            return False
        self._checked_at = now
        try:
            return bool(self.connection.exists(self.key))
        except redis.RedisError as error:
            log.warning("stop key not read (%s); training goes on", error)
            return False


def announce(connection: redis.Redis, announcement: CheckpointAnnouncement) -> None:
    """Publish a new checkpoint and record it as the latest, in one round trip: subscribers
    hear it now, and a service that was down reads ``LATEST_CHECKPOINT_KEY`` when it starts."""
    message = announcement.model_dump_json()
    try:
        with connection.pipeline() as pipeline:
            pipeline.set(LATEST_CHECKPOINT_KEY, message)
            pipeline.publish(CHECKPOINT_CHANNEL, message)
            pipeline.execute()
    except redis.RedisError as error:
        log.warning("checkpoint %s not announced (%s)", announcement.name, error)


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` (a ``.<name>.lock`` file beside it). The kernel drops it
    when its process dies, so a job killed mid-preparation never blocks the next one."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with folder.with_name(f".{folder.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def prepared_data(data: DataSpec, settings: Settings, report: ProgressReport) -> Path:
    """The prepared data folder for ``data``, tokenizing its source first when it has one."""
    folder = settings.data_dir / data.folder_name()
    if data.source is None:
        try:
            read_manifest(folder)
        except DataError as error:
            # A folder with no manifest at all: say so, not read_manifest's advice, which leaves
            # out the --source that `slm prepare` needs.
            why = str(error) if (folder / MANIFEST).exists() else f"it has no {MANIFEST}"
            raise TrainJobError(
                f"dataset {data.dataset!r} is not prepared under DATA_DIR: "
                f"{why}. Prepare it with {prepare_advice(data.dataset)}, or "
                f"submit the job with data.source (hub:v2, hub:v1 or an http(s) URL) instead of "
                f"data.dataset, which the worker prepares first"
            ) from None
        return folder
    rules = DownloadRules.from_settings(settings)
    check_url(data.source, rules)  # a refused host leaves not even a lock file
    shown = redact_url(data.source)
    report.set_state("preparing", f"preparing {shown} into DATA_DIR/{folder.name}")
    with folder_lock(folder):  # `prepare` allows one writer per folder
        prepare(data.source, folder, quiet=True, rules=rules)
    return folder


def fine_tune_source(run: str | None, checkpoint_dir: Path) -> Path | None:
    """The checkpoint a fine-tuning job starts from: the run's best, else its latest."""
    if run is None:
        return None
    run_dir = checkpoint_dir / run
    best = run_dir / f"{BEST}.json"
    if best.is_file():
        return best
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise TrainJobError(f"init_from_run: run {run!r} has no checkpoint to fine-tune from")
    return latest


def train_job(spec_json: str) -> dict[str, Any]:
    """The job function RQ runs (``contract.jobs.JOB_FUNCTION``). Errors end the job failed,
    with a message in its progress; a stop ends it ``stopped`` after a checkpoint."""
    job = get_current_job()
    if job is None:
        raise TrainJobError("train_job runs inside an RQ worker")
    settings = Settings()
    spec = TrainJobSpec.model_validate_json(spec_json)
    report = ProgressReport(job, spec)
    run_dir = settings.checkpoint_dir / spec.run_name
    made_run_dir = False
    try:
        settings.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        floor = settings.min_free_disk_bytes
        check_free_disk(settings.checkpoint_dir, floor, "the job did not start")
        data_dir = prepared_data(spec.data, settings, report)
        init_from = fine_tune_source(spec.init_from_run, settings.checkpoint_dir)
        conflict = run_conflict(run_dir, job.id, new=False)
        if conflict is not None:
            raise TrainJobError(conflict)
        report.set_state("training", "loading the model")

        made_run_dir = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        write_owner(run_dir, job.id)
        stop = StopRequests(job.connection, job.id)
        result = train(
            spec.train,
            data_dir,
            run_dir,
            init_from=init_from,
            callbacks=[report, stop],
            min_free_disk_bytes=floor,
        )
    except torch.cuda.OutOfMemoryError as error:
        message = (
            f"CUDA out of memory: lower train.batch_size or the block size (train.grad_accum "
            f"keeps the tokens per step), or pick a smaller preset ({str(error)[:200]})"
        )
        report.set_state("failed", message)
        raise TrainJobError(message) from None
    except Exception as error:
        # Our own errors say what to do; anything else at least names its type.
        expected = isinstance(error, TrainJobError | DataError | CheckpointError | ValueError)
        said = str(error) if expected else f"{type(error).__name__}: {error}"
        report.set_state("failed", settings.redact(said))  # clients read it: no server paths
        raise
    finally:
        if made_run_dir and not holds_checkpoints(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)  # a run that never saved is no run
        try:
            job.connection.delete(stop_key(job.id))
            release_run(job.connection, job.origin, spec.run_name, job.id)
        except redis.RedisError:
            log.warning("stop key or run claim of job %s not cleared", job.id)

    checkpoint = result.last_checkpoint.stem if result.last_checkpoint else None
    if stop.orphaned:
        # No worker records how the job ended: it is found abandoned, and resumes from here,
        # with the last step's loss, which the write throttle may have held back.
        report.save()
        log.error("job %s saved %s; its worker is gone, this work horse exits", job.id, checkpoint)
        os._exit(WORKER_GONE_EXIT_CODE)
    if result.status == "stopped":
        message = f"stopped at step {result.step}; resume to continue from {checkpoint}"
    else:
        best = "none" if result.best_val_loss is None else f"{result.best_val_loss:.4f}"
        message = f"finished at step {result.step}; best val loss {best}"
    report.set_state(result.status, message)
    # RQ's own line says "Job OK" for any job that returns, a stopped one too: say which it was.
    log.info("job %s %s", job.id, message)
    return {
        "status": result.status,
        "step": result.step,
        "max_steps": result.max_steps,
        "best_val_loss": result.best_val_loss,
        "last_checkpoint": checkpoint_version(spec.run_name, checkpoint) if checkpoint else None,
    }

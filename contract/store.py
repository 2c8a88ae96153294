"""The train jobs of one queue, as Redis and RQ keep them, for whoever reads or writes them.

Jobs are plain RQ jobs (so ``rq info`` and rq-dashboard show them), with JSON serialization
(``train_queue``), the function named by its import path (``JOB_FUNCTION``: the API never imports
``worker``), the spec as the job's one argument and the progress in its meta. Beside RQ's keys
the store keeps two of its own per queue (``contract.jobs.index_key`` and ``run_key``): an index
of job ids by creation time, for a newest-first list, and a claim per run name, so two live jobs
never train into one run folder. A run is claimed in the transaction that queues its job, so of
two submissions of one run name at once exactly one is queued; the claim is released when its
job ends (by the worker, or by a cancel), and a claim whose job is no longer active (a job whose
worker died) counts as released. Who may train into a run folder at all is
``contract.runs``'s rule; whether its model can be served, ``contract.capacity``'s.

What a user sees as a job's ``state`` is derived from RQ's status and the progress the worker
wrote (``job_state``): a job RQ failed without the worker reporting a failure lost its worker
(``abandoned``). Every read first runs RQ's StartedJobRegistry cleanup, which is what turns a job
whose worker stopped sending heartbeats into a failed one (see ``worker.runner``).

The store raises its own errors (``JobStoreError``); it knows nothing of HTTP.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import redis
from redis.client import Pipeline
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from contract.capacity import job_model_misfit
from contract.datasets import missing_dataset
from contract.jobs import (
    JOB_FUNCTION,
    PROGRESS_META_KEY,
    JobProgress,
    JobState,
    TrainJobSpec,
    index_key,
    run_key,
    stop_key,
)
from contract.runs import run_conflict
from contract.settings import Settings

ACTIVE_STATES = frozenset({"queued", "preparing", "training"})
RESUMABLE_STATES = frozenset({"failed", "abandoned", "stopped"})
# RQ's words for a work horse that vanished: its worker was killed, or the horse itself was.
_WORKER_LOST = ("AbandonedJobError", "Work-horse terminated unexpectedly")
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
# Delete a run's claim only if ``job_id`` still holds it (a later job may hold it by now).
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end"


def train_queue(connection: redis.Redis, name: str) -> Queue:
    """The RQ queue train jobs go through. JSON, not RQ's default pickle: nothing read back from
    Redis can run code in the API or the worker."""
    return Queue(name, connection=connection, serializer=JSONSerializer)


class JobStoreError(Exception):
    """A request the store cannot honour; the message says why and what to do."""


class JobNotFound(JobStoreError):
    pass


class RunInUse(JobStoreError):
    pass


class RunTaken(JobStoreError):
    """The run folder is another job's, or holds checkpoints a new job may not touch."""


class ModelDoesNotFit(JobStoreError):
    """The job's model is over what the service would serve; ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class JobNotActive(JobStoreError):
    pass


class JobNotResumable(JobStoreError):
    pass


class DatasetNotPrepared(JobStoreError):
    pass


def release_run(connection: redis.Redis, queue: str, run_name: str, job_id: str) -> None:
    """Release ``run_name`` if ``job_id`` holds it: its job has ended."""
    connection.eval(_RELEASE, 1, run_key(queue, run_name), job_id)


def progress_of(job: Job) -> JobProgress:
    stored = job.meta.get(PROGRESS_META_KEY)
    return JobProgress.model_validate_json(stored) if stored else JobProgress()


def job_state(job: Job, progress: JobProgress) -> tuple[JobState, str | None]:
    """The state a user sees, and why: RQ knows whether the job runs, the worker's progress
    knows what it is doing and how it ended."""
    status = job.get_status(refresh=False)
    if status == JobStatus.CANCELED:
        return "cancelled", progress.message
    if status == JobStatus.STARTED:
        if progress.state in ("preparing", "training"):
            return progress.state, progress.message
        return "training", "starting"
    if status == JobStatus.FINISHED:
        finished = progress.state if progress.state in ("finished", "stopped") else "finished"
        return finished, progress.message
    if status in (JobStatus.FAILED, JobStatus.STOPPED):
        if progress.state == "failed":
            return "failed", progress.message
        result = job.latest_result()
        lines = (result.exc_string or "").strip().splitlines() if result else []
        reason = lines[-1] if lines else "no reason recorded"
        if any(words in reason for words in _WORKER_LOST):
            return "abandoned", (
                f"its worker died mid-job ({reason}); resume the job to continue from its last "
                f"checkpoint"
            )
        return "failed", reason
    return "queued", progress.message


@dataclass(frozen=True)
class TrainJobRecord:
    """One job read once: its spec and progress parsed, its state derived."""

    job: Job
    spec: TrainJobSpec
    progress: JobProgress
    state: JobState
    message: str | None


@dataclass(frozen=True)
class TrainJobPage:
    records: list[TrainJobRecord]
    total: int
    more: bool  # whether a page follows this one


def _record(job: Job, spec: TrainJobSpec | None = None) -> TrainJobRecord:
    # The spec is the job function's one argument (jobs of the previous version also kept a
    # copy in their meta, now ignored).
    if spec is None:
        spec = TrainJobSpec.model_validate_json(job.args[0])
    progress = progress_of(job)
    state, message = job_state(job, progress)
    return TrainJobRecord(job, spec, progress, state, message)


class TrainJobs:
    """The train jobs of one queue."""

    def __init__(self, connection: redis.Redis, settings: Settings) -> None:
        self.connection, self.settings = connection, settings
        self.queue = train_queue(connection, settings.queue_name)
        self.index_key = index_key(settings.queue_name)

    # --- reading ---

    def fetch(self, job_id: str) -> TrainJobRecord:
        """A train job of this queue (other RQ jobs on this Redis are not ours)."""
        missing = JobNotFound(f"no train job {job_id!r}")
        if not _JOB_ID.fullmatch(job_id):
            raise missing
        self.reap_abandoned()
        try:
            job = Job.fetch(job_id, connection=self.connection, serializer=self.queue.serializer)
        except NoSuchJobError:
            raise missing from None
        if job.func_name != JOB_FUNCTION or job.origin != self.queue.name:
            raise missing
        return _record(job)

    def reap_abandoned(self) -> None:
        """Fail started jobs whose worker stopped sending heartbeats (RQ's own cleanup)."""
        self.queue.started_job_registry.cleanup()

    def page(self, limit: int, offset: int) -> TrainJobPage:
        """Up to ``limit`` jobs from ``offset``, newest first."""
        self.reap_abandoned()
        # One more than a page, to know whether another page follows.
        newest = self.connection.zrevrange(self.index_key, offset, offset + limit)
        ids = [raw.decode() for raw in newest]
        more = len(ids) > limit
        ids = ids[:limit]
        jobs = Job.fetch_many(ids, connection=self.connection, serializer=self.queue.serializer)
        expired = [job_id for job_id, job in zip(ids, jobs, strict=True) if job is None]
        if expired:  # finished jobs expire after JOB_RETENTION_S; forget them here too
            self.connection.zrem(self.index_key, *expired)
        return TrainJobPage(
            records=[_record(job) for job in jobs if job is not None],
            total=self.connection.zcard(self.index_key),
            more=more,
        )

    def is_active(self, job_id: str) -> bool:
        try:
            job = Job.fetch(job_id, connection=self.connection, serializer=self.queue.serializer)
        except NoSuchJobError:
            return False
        return job_state(job, progress_of(job))[0] in ACTIVE_STATES

    # --- writing ---

    def _claim_and_queue(
        self, run_name: str, job_id: str, new: bool, queue: Callable[[Pipeline], None]
    ) -> None:
        """Make ``job_id`` the holder of ``run_name`` and run ``queue``'s commands, in one
        transaction: unless another active job holds the run (RunInUse) or the run folder is not
        this job's to train into (RunTaken). WATCH makes check-and-set atomic against a
        concurrent claim, and since a holder is queued with its claim, it is always there to be
        asked whether it is active."""
        key = run_key(self.queue.name, run_name)
        with self.connection.pipeline() as pipeline:
            while True:
                try:
                    pipeline.watch(key)
                    holder = pipeline.get(key)
                    holder_id = holder.decode() if holder is not None else None
                    if holder_id == job_id and self.is_active(job_id):  # two resumes at once
                        raise JobNotResumable(f"job {job_id} is queued or running already")
                    if holder_id is not None and self.is_active(holder_id):
                        raise RunInUse(
                            f"run {run_name!r} is in use by the active job {holder_id}; stop it "
                            f"(DELETE /train-jobs/{holder_id}) or choose another run_name"
                        )
                    conflict = run_conflict(self.settings.checkpoint_dir / run_name, job_id, new)
                    if conflict is not None:
                        raise RunTaken(conflict)
                    pipeline.multi()
                    pipeline.set(key, job_id)
                    queue(pipeline)
                    pipeline.execute()
                    return
                except redis.WatchError:
                    continue

    def submit(self, spec: TrainJobSpec) -> TrainJobRecord:
        """Queue ``spec``; a dataset it names must be prepared under DATA_DIR, where this process
        can see DATA_DIR's datasets (``contract.datasets.missing_dataset``), else
        DatasetNotPrepared. A source is the worker's to prepare."""
        self.reap_abandoned()
        misfit = job_model_misfit(spec.train, self.settings)
        if misfit is not None:
            raise ModelDoesNotFit(*misfit)
        if spec.data.dataset is not None:
            problem = missing_dataset(self.settings.data_dir, spec.data.dataset)
            if problem is not None:
                raise DatasetNotPrepared(problem)
        job = Job.create(
            JOB_FUNCTION,
            args=(spec.model_dump_json(),),
            connection=self.connection,
            serializer=self.queue.serializer,
            timeout=self.settings.job_timeout_s,  # RQ's default of 180 s would kill any real run
            result_ttl=self.settings.job_retention_s,
            failure_ttl=self.settings.job_retention_s,
            description=f"train {spec.run_name}",
            meta={
                PROGRESS_META_KEY: JobProgress(message="waiting for a worker").model_dump_json(),
            },
        )

        def queue(pipeline: Pipeline) -> None:  # claimed, queued and listed, or none of them
            self.queue.enqueue_job(job, pipeline=pipeline)
            pipeline.zadd(self.index_key, {job.id: job.created_at.timestamp()})

        self._claim_and_queue(spec.run_name, job.id, True, queue)
        return _record(job, spec)

    def cancel_or_stop(self, record: TrainJobRecord) -> bool:
        """Cancel a queued job (True), or ask a running one to stop (False); JobNotActive
        otherwise."""
        job = record.job
        if record.state not in ACTIVE_STATES:
            raise JobNotActive(f"job {job.id} is already {record.state}")
        # Set first: if a worker takes the job before it leaves the queue, it stops at once.
        self.connection.set(stop_key(job.id), 1, ex=self.settings.job_timeout_s)
        # LREM is atomic against a worker's dequeue: 1 means no worker can ever start it.
        if self.queue.remove(job) == 1:
            progress = record.progress.model_copy(
                update={"state": "cancelled", "message": "cancelled before it started"}
            )
            job.meta[PROGRESS_META_KEY] = progress.model_dump_json()
            job.save_meta()
            job.cancel()
            self.connection.expire(job.key, self.settings.job_retention_s)
            self.connection.delete(stop_key(job.id))
            release_run(self.connection, self.queue.name, record.spec.run_name, job.id)
            return True
        return False

    def resume(self, record: TrainJobRecord) -> TrainJobRecord:
        """Queue a failed, abandoned or stopped job again, under the same id: the worker finds
        the run folder's training state and continues from its last checkpoint."""
        job = record.job
        if record.state not in RESUMABLE_STATES:
            raise JobNotResumable(
                f"job {job.id} is {record.state}; only failed, abandoned or stopped jobs can be "
                f"resumed"
            )
        job.meta[PROGRESS_META_KEY] = record.progress.model_copy(
            update={"state": "queued", "message": "resuming: waiting for a worker"}
        ).model_dump_json()
        job.started_at = job.ended_at = None

        def queue(pipeline: Pipeline) -> None:  # the job is either back in the queue or untouched
            pipeline.delete(stop_key(job.id))
            job.failed_job_registry.remove(job, pipeline=pipeline)
            job.finished_job_registry.remove(job, pipeline=pipeline)
            pipeline.persist(job.key)  # a finished or failed job was set to expire
            self.queue.enqueue_job(job, pipeline=pipeline)

        self._claim_and_queue(record.spec.run_name, job.id, False, queue)
        return _record(job, record.spec)

"""/train-jobs: enqueue training jobs for the RQ worker and report their progress.

Jobs are plain RQ jobs on Settings.queue_name (so ``rq info`` and rq-dashboard show them), with
JSON serialization, the function named by its import path (``JOB_FUNCTION``: this service never
imports ``worker``) and the spec and progress in the job's meta. Beside RQ's keys this module keeps
two of its own per queue: an index of job ids by creation time (``INDEX_KEY``), for a
newest-first list, and a claim per run name (``RUN_KEY``), so two live jobs never train into one
run folder.

What a user sees as a job's ``state`` is derived from RQ's status and the progress the worker
wrote (``job_state``): a job RQ failed without the worker reporting a failure lost its worker
(``abandoned``). Every read first runs RQ's StartedJobRegistry cleanup, which is what turns a job
whose worker stopped sending heartbeats into a failed one (see ``worker.runner``).

Every Redis call has a short timeout; an unreachable Redis is a 503 on these routes only.
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, ParamSpec, TypeVar

import redis
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from pydantic import BaseModel, Field
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from contract.broker import connect
from contract.jobs import (
    JOB_FUNCTION,
    PROGRESS_META_KEY,
    SPEC_META_KEY,
    JobProgress,
    JobState,
    LossPoint,
    TrainJobSpec,
    stop_key,
)
from contract.settings import Settings
from service.auth import require_api_key, settings_of
from service.errors import ApiError, error_responses
from service.limits import require_json

SOCKET_TIMEOUT_S = 2.0
INDEX_KEY = "slm:train-jobs:{queue}:index"  # sorted set: job id → creation time
RUN_KEY = "slm:train-jobs:{queue}:run:{run}"  # run name → id of the job that last claimed it
ACTIVE_STATES = frozenset({"queued", "preparing", "training"})
RESUMABLE_STATES = frozenset({"failed", "abandoned", "stopped"})
# RQ's words for a work horse that vanished: its worker was killed, or the horse itself was.
_WORKER_LOST = ("AbandonedJobError", "Work-horse terminated unexpectedly")
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")

# Every route may answer: no key (401), Redis down or unset (503), a bad parameter (422).
router = APIRouter(
    prefix="/train-jobs", tags=["train jobs"], responses=error_responses(401, 422, 503)
)
Authorized = [Depends(require_api_key)]


# --- response models ----------------------------------------------------------------------------


class TrainJobStatus(BaseModel):
    """A job at a glance, as listed."""

    id: str
    run_name: str
    state: JobState
    message: str | None = None
    step: int = 0
    max_steps: int | None = None
    train_loss: float | None = None
    val_loss: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = None
    last_checkpoint: str | None = Field(None, description="<run>/<name> under CHECKPOINT_DIR")
    resumed_from: int | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    updated_at: datetime | None = Field(None, description="when the worker last reported")


class TrainJob(TrainJobStatus):
    """One job in full: its spec and its loss history."""

    spec: TrainJobSpec
    history: list[LossPoint]
    history_every: int = Field(description="steps between history points (grows as it thins)")


class TrainJobPage(BaseModel):
    jobs: list[TrainJobStatus]
    total: int = Field(description="jobs kept (finished ones expire after JOB_RETENTION_S)")
    limit: int
    offset: int
    next_offset: int | None = Field(None, description="offset of the next page; null at the end")


# --- jobs in Redis ------------------------------------------------------------------------------


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


class TrainJobs:
    """The train jobs of one queue."""

    def __init__(self, connection: redis.Redis, settings: Settings) -> None:
        self.connection, self.settings = connection, settings
        self.queue = Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)
        self.index_key = INDEX_KEY.format(queue=settings.queue_name)

    # --- reading ---

    def fetch(self, job_id: str) -> Job:
        """A train job of this queue, or a 404 (other RQ jobs on this Redis are not ours)."""
        missing = ApiError(404, f"no train job {job_id!r}", param="id", code="job_not_found")
        if not _JOB_ID.fullmatch(job_id):
            raise missing
        self.reap_abandoned()
        try:
            job = Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
        except NoSuchJobError:
            raise missing from None
        if job.func_name != JOB_FUNCTION or job.origin != self.queue.name:
            raise missing
        return job

    def reap_abandoned(self) -> None:
        """Fail started jobs whose worker stopped sending heartbeats (RQ's own cleanup)."""
        self.queue.started_job_registry.cleanup()

    def status(self, job: Job) -> TrainJobStatus:
        return TrainJobStatus(**self._fields(job, progress_of(job)))

    def detail(self, job: Job) -> TrainJob:
        progress = progress_of(job)
        return TrainJob(
            **self._fields(job, progress),
            spec=TrainJobSpec.model_validate_json(job.meta[SPEC_META_KEY]),
            history=progress.history,
            history_every=progress.history_every,
        )

    def _fields(self, job: Job, progress: JobProgress) -> dict[str, Any]:
        state, message = job_state(job, progress)
        spec = TrainJobSpec.model_validate_json(job.meta[SPEC_META_KEY])
        return {
            **progress.model_dump(
                include={
                    "step",
                    "max_steps",
                    "train_loss",
                    "val_loss",
                    "tokens_per_s",
                    "eta_s",
                    "last_checkpoint",
                    "resumed_from",
                    "updated_at",
                }
            ),
            "id": job.id,
            "run_name": spec.run_name,
            "state": state,
            "message": message,
            "created_at": job.created_at,
            "started_at": job.started_at,
            "ended_at": job.ended_at,
        }

    def page(self, limit: int, offset: int) -> TrainJobPage:
        self.reap_abandoned()
        # One more than a page, to know whether another page follows.
        newest = self.connection.zrevrange(self.index_key, offset, offset + limit)
        ids = [raw.decode() for raw in newest]
        more = len(ids) > limit
        ids = ids[:limit]
        jobs = Job.fetch_many(ids, connection=self.connection, serializer=JSONSerializer)
        expired = [job_id for job_id, job in zip(ids, jobs, strict=True) if job is None]
        if expired:  # finished jobs expire after JOB_RETENTION_S; forget them here too
            self.connection.zrem(self.index_key, *expired)
        return TrainJobPage(
            jobs=[self.status(job) for job in jobs if job is not None],
            total=self.connection.zcard(self.index_key),
            limit=limit,
            offset=offset,
            next_offset=offset + limit if more else None,
        )

    def is_active(self, job_id: str) -> bool:
        try:
            job = Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
        except NoSuchJobError:
            return False
        return job_state(job, progress_of(job))[0] in ACTIVE_STATES

    # --- writing ---

    def claim_run(self, run_name: str, job_id: str) -> None:
        """Make ``job_id`` the holder of ``run_name``, unless another active job holds it (409).
        WATCH makes check-and-set atomic against a concurrent claim."""
        key = RUN_KEY.format(queue=self.queue.name, run=run_name)
        with self.connection.pipeline() as pipeline:
            while True:
                try:
                    pipeline.watch(key)
                    holder = pipeline.get(key)
                    holder_id = holder.decode() if holder is not None else None
                    if holder_id not in (None, job_id) and self.is_active(holder_id):
                        raise ApiError(
                            409,
                            f"run {run_name!r} is in use by the active job {holder_id}; stop it "
                            f"(DELETE /train-jobs/{holder_id}) or choose another run_name",
                            param="run_name",
                            code="run_in_use",
                        )
                    pipeline.multi()
                    pipeline.set(key, job_id)
                    pipeline.execute()
                    return
                except redis.WatchError:
                    continue

    def submit(self, spec: TrainJobSpec) -> Job:
        self.reap_abandoned()
        job = Job.create(
            JOB_FUNCTION,
            args=(spec.model_dump_json(),),
            connection=self.connection,
            serializer=JSONSerializer,
            timeout=self.settings.job_timeout_s,  # RQ's default of 180 s would kill any real run
            result_ttl=self.settings.job_retention_s,
            failure_ttl=self.settings.job_retention_s,
            description=f"train {spec.run_name}",
            meta={
                SPEC_META_KEY: spec.model_dump_json(),
                PROGRESS_META_KEY: JobProgress(message="waiting for a worker").model_dump_json(),
            },
        )
        self.claim_run(spec.run_name, job.id)
        with self.connection.pipeline() as pipeline:
            pipeline.multi()  # one transaction: queued and listed, or neither
            self.queue.enqueue_job(job, pipeline=pipeline)
            pipeline.zadd(self.index_key, {job.id: job.created_at.timestamp()})
            pipeline.execute()
        return job

    def cancel_or_stop(self, job: Job) -> bool:
        """Cancel a queued job (True), or ask a running one to stop (False); 409 otherwise."""
        state, _ = job_state(job, progress_of(job))
        if state not in ACTIVE_STATES:
            raise ApiError(409, f"job {job.id} is already {state}", code="job_not_active")
        # Set first: if a worker takes the job before it leaves the queue, it stops at once.
        self.connection.set(stop_key(job.id), 1, ex=self.settings.job_timeout_s)
        # LREM is atomic against a worker's dequeue: 1 means no worker can ever start it.
        if self.queue.remove(job) == 1:
            progress = progress_of(job).model_copy(
                update={"state": "cancelled", "message": "cancelled before it started"}
            )
            job.meta[PROGRESS_META_KEY] = progress.model_dump_json()
            job.save_meta()
            job.cancel()
            self.connection.expire(job.key, self.settings.job_retention_s)
            self.connection.delete(stop_key(job.id))
            return True
        return False

    def resume(self, job: Job) -> Job:
        """Queue a failed, abandoned or stopped job again, under the same id: the worker finds
        the run folder's training state and continues from its last checkpoint."""
        progress = progress_of(job)
        state, _ = job_state(job, progress)
        if state not in RESUMABLE_STATES:
            raise ApiError(
                409,
                f"job {job.id} is {state}; only failed, abandoned or stopped jobs can be resumed",
                code="job_not_resumable",
            )
        spec = TrainJobSpec.model_validate_json(job.meta[SPEC_META_KEY])
        self.claim_run(spec.run_name, job.id)
        job.meta[PROGRESS_META_KEY] = progress.model_copy(
            update={"state": "queued", "message": "resuming: waiting for a worker"}
        ).model_dump_json()
        job.started_at = job.ended_at = None
        with self.connection.pipeline() as pipeline:
            pipeline.multi()  # one transaction: the job is either back in the queue or untouched
            pipeline.delete(stop_key(job.id))
            job.failed_job_registry.remove(job, pipeline=pipeline)
            job.finished_job_registry.remove(job, pipeline=pipeline)
            pipeline.persist(job.key)  # a finished or failed job was set to expire
            self.queue.enqueue_job(job, pipeline=pipeline)
            pipeline.execute()
        return job


# --- wiring -------------------------------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """One Redis client for the app's life; none without REDIS_URL (the routes then say so).
    Nothing is contacted here: a Redis that is down must not keep the service from starting."""
    settings: Settings = app.state.settings
    client = None
    if settings.redis_url is not None:
        client = connect(settings, socket_timeout=SOCKET_TIMEOUT_S)
    app.state.train_jobs = client
    try:
        yield
    finally:
        if client is not None:
            client.close()


def train_jobs(request: Request) -> TrainJobs:
    client: redis.Redis | None = getattr(request.app.state, "train_jobs", None)
    if client is None:
        raise ApiError(
            503,
            "train jobs need REDIS_URL: set it to the Redis that `slm worker` uses",
            code="train_jobs_unavailable",
        )
    return TrainJobs(client, settings_of(request))


Jobs = Annotated[TrainJobs, Depends(train_jobs)]
P = ParamSpec("P")
R = TypeVar("R")


def redis_errors_are_503(route: Callable[P, R]) -> Callable[P, R]:
    """Turn a Redis failure inside ``route`` into a 503 saying so, instead of a 500."""

    @functools.wraps(route)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return route(*args, **kwargs)
        except redis.RedisError as error:
            raise ApiError(
                503,
                f"train jobs are unavailable: Redis does not answer ({error})",
                code="redis_unavailable",
            ) from None

    return guarded


def _location(job: Job) -> str:
    return f"{router.prefix}/{job.id}"


@router.post(
    "",
    status_code=202,
    response_model=TrainJob,
    dependencies=[*Authorized, Depends(require_json)],
    responses=error_responses(400, 408, 409, 413, 415),
)
@redis_errors_are_503
def create_train_job(spec: TrainJobSpec, jobs: Jobs, response: Response) -> TrainJob:
    """Queue a training job; 409 if an active job already trains this run_name."""
    job = jobs.submit(spec)
    response.headers["Location"] = _location(job)
    return jobs.detail(job)


@router.get("", response_model=TrainJobPage, dependencies=Authorized)
@redis_errors_are_503
def list_train_jobs(
    jobs: Jobs,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> TrainJobPage:
    """Jobs, newest first."""
    return jobs.page(limit, offset)


@router.get(
    "/{job_id}", response_model=TrainJob, dependencies=Authorized, responses=error_responses(404)
)
@redis_errors_are_503
def get_train_job(job_id: str, jobs: Jobs) -> TrainJob:
    """Status, progress and loss history."""
    return jobs.detail(jobs.fetch(job_id))


@router.delete(
    "/{job_id}",
    response_model=TrainJobStatus,
    dependencies=Authorized,
    responses={
        202: {"model": TrainJobStatus, "description": "stop requested from a running job"},
        **error_responses(404, 409),
    },
)
@redis_errors_are_503
def delete_train_job(job_id: str, jobs: Jobs, response: Response) -> TrainJobStatus:
    """Cancel a queued job (200, cancelled), or ask a running one to stop (202): it saves a
    checkpoint and ends ``stopped``."""
    job = jobs.fetch(job_id)
    if not jobs.cancel_or_stop(job):
        response.status_code = 202
        return jobs.status(job).model_copy(update={"message": "stop requested"})
    return jobs.status(jobs.fetch(job_id))


@router.post(
    "/{job_id}/resume",
    status_code=202,
    response_model=TrainJob,
    dependencies=Authorized,
    responses=error_responses(404, 409),
)
@redis_errors_are_503
def resume_train_job(job_id: str, jobs: Jobs, response: Response) -> TrainJob:
    """Queue a failed, abandoned or stopped job again; it continues from its last checkpoint."""
    job = jobs.resume(jobs.fetch(job_id))
    response.headers["Location"] = _location(job)
    return jobs.detail(job)

"""/train-jobs: enqueue training jobs for the RQ worker and report their progress.

The jobs, their Redis keys and what a job's state means live in ``contract.store``; this module
turns its records into responses and its errors into 404s and 409s. Every Redis call has a short
timeout; an unreachable Redis is a 503 on these routes only.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, ParamSpec, TypeVar

import redis
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from pydantic import BaseModel, Field

from contract.broker import connect
from contract.jobs import JobSummary, LossHistory, TrainJobSpec
from contract.settings import Settings
from contract.store import (
    DatasetNotPrepared,
    JobNotActive,
    JobNotFound,
    JobNotResumable,
    JobStoreError,
    ModelDoesNotFit,
    RunInUse,
    RunTaken,
    TrainJobRecord,
    TrainJobs,
)
from service.auth import require_operator, settings_of
from service.errors import ApiError, error_responses
from service.limits import require_json

SOCKET_TIMEOUT_S = 2.0
# How each store error is answered: status, the request field at fault, a stable code.
STORE_ERRORS: dict[type[JobStoreError], tuple[int, str | None, str]] = {
    JobNotFound: (404, "id", "job_not_found"),
    RunInUse: (409, "run_name", "run_in_use"),
    RunTaken: (409, "run_name", "run_taken"),
    ModelDoesNotFit: (422, "train", "model_too_large"),  # the error names its field
    JobNotActive: (409, None, "job_not_active"),
    JobNotResumable: (409, None, "job_not_resumable"),
    DatasetNotPrepared: (422, "data.dataset", "dataset_not_prepared"),
}

# Every route may answer: no key (401), not a local client without API_KEY (403), Redis down or
# unset (503), a bad parameter (422).
router = APIRouter(
    prefix="/train-jobs", tags=["train jobs"], responses=error_responses(401, 403, 422, 503)
)
Authorized = [Depends(require_operator)]


# --- response models ----------------------------------------------------------------------------


class TrainJobStatus(JobSummary):
    """A job at a glance, as listed: its progress without the loss history."""

    id: str
    run_name: str
    created_at: datetime | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None


class TrainJob(TrainJobStatus, LossHistory):
    """One job in full: its spec and its loss history."""

    spec: TrainJobSpec


class TrainJobPage(BaseModel):
    jobs: list[TrainJobStatus]
    total: int = Field(description="jobs kept (finished ones expire after JOB_RETENTION_S)")
    limit: int
    offset: int
    next_offset: int | None = Field(None, description="offset of the next page; null at the end")


# What of a job's stored progress each answer shows; state and message are derived (job_state).
SUMMARY = set(JobSummary.model_fields) - {"state", "message"}
DETAIL = SUMMARY | set(LossHistory.model_fields)


def job_status(record: TrainJobRecord) -> TrainJobStatus:
    return TrainJobStatus(**_fields(record), **record.progress.model_dump(include=SUMMARY))


def job_detail(record: TrainJobRecord) -> TrainJob:
    return TrainJob(
        **_fields(record),
        **record.progress.model_dump(include=DETAIL),
        spec=record.spec.redacted(),  # a source URL without its credentials
    )


def _fields(record: TrainJobRecord) -> dict[str, Any]:
    job = record.job
    return {
        "id": job.id,
        "run_name": record.spec.run_name,
        "state": record.state,
        "message": record.message,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "ended_at": job.ended_at,
    }


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


def store_errors_answered(route: Callable[P, R]) -> Callable[P, R]:
    """Answer the store's errors with their 404 or 409, and a Redis failure inside ``route``
    with a 503 saying so, instead of a 500."""

    @functools.wraps(route)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return route(*args, **kwargs)
        except JobStoreError as error:
            status, param, code = STORE_ERRORS[type(error)]
            param = getattr(error, "param", param)
            raise ApiError(status, str(error), param=param, code=code) from None
        except redis.RedisError as error:
            raise ApiError(
                503,
                f"train jobs are unavailable: Redis does not answer ({error})",
                code="redis_unavailable",
            ) from None

    return guarded


def _location(record: TrainJobRecord) -> str:
    return f"{router.prefix}/{record.job.id}"


@router.post(
    "",
    status_code=202,
    response_model=TrainJob,
    dependencies=[*Authorized, Depends(require_json)],
    responses=error_responses(400, 408, 409, 413, 415),
)
@store_errors_answered
def create_train_job(spec: TrainJobSpec, jobs: Jobs, response: Response) -> TrainJob:
    """Queue a training job; 409 if an active job already trains this run_name or the run
    already exists (it is continued by resuming the job that made it), 422 if the model is
    larger than this server serves (MAX_MODEL_BLOCK_SIZE, MAX_MODEL_PARAMS, KV_CACHE_BYTES) or
    data.dataset names a dataset that is not prepared under DATA_DIR (GET /datasets lists them;
    checked where the API sees DATA_DIR's datasets)."""
    record = jobs.submit(spec)
    response.headers["Location"] = _location(record)
    return job_detail(record)


@router.get("", response_model=TrainJobPage, dependencies=Authorized)
@store_errors_answered
def list_train_jobs(
    jobs: Jobs,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> TrainJobPage:
    """Jobs, newest first."""
    page = jobs.page(limit, offset)
    return TrainJobPage(
        jobs=[job_status(record) for record in page.records],
        total=page.total,
        limit=limit,
        offset=offset,
        next_offset=offset + limit if page.more else None,
    )


@router.get(
    "/{job_id}", response_model=TrainJob, dependencies=Authorized, responses=error_responses(404)
)
@store_errors_answered
def get_train_job(job_id: str, jobs: Jobs) -> TrainJob:
    """Status, progress and loss history."""
    return job_detail(jobs.fetch(job_id))


@router.delete(
    "/{job_id}",
    response_model=TrainJobStatus,
    dependencies=Authorized,
    responses={
        202: {"model": TrainJobStatus, "description": "stop requested from a running job"},
        **error_responses(404, 409),
    },
)
@store_errors_answered
def delete_train_job(job_id: str, jobs: Jobs, response: Response) -> TrainJobStatus:
    """Cancel a queued job (200, cancelled), or ask a running one to stop (202): it saves a
    checkpoint and ends ``stopped``."""
    record = jobs.fetch(job_id)
    if not jobs.cancel_or_stop(record):
        response.status_code = 202
        return job_status(record).model_copy(update={"message": "stop requested"})
    return job_status(jobs.fetch(job_id))


@router.post(
    "/{job_id}/resume",
    status_code=202,
    response_model=TrainJob,
    dependencies=Authorized,
    responses=error_responses(404, 409),
)
@store_errors_answered
def resume_train_job(job_id: str, jobs: Jobs, response: Response) -> TrainJob:
    """Queue a failed, abandoned or stopped job again; it continues from its last checkpoint."""
    record = jobs.resume(jobs.fetch(job_id))
    response.headers["Location"] = _location(record)
    return job_detail(record)

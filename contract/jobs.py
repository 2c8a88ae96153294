"""The train-job contract: the spec a user submits, the progress the worker reports, and the names
of everything the two sides share in Redis.

The API validates a spec and enqueues it by the job function's import path (``JOB_FUNCTION``), so
it never imports the worker; the worker parses the same spec back and writes ``JobProgress`` into
the job's meta, which the API reads. Checkpoints are announced on ``CHECKPOINT_CHANNEL`` and the
newest is also kept under ``LATEST_CHECKPOINT_KEY``, so a service that was down still finds it.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from contract.train import TrainConfig, TrainProgress

# Names a user gives (runs, datasets): letters, digits and '-', never a path.
NAME_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?$"
NAME_RULE = (
    "letters, digits and '-', at most 64 characters, starting and ending with a letter or digit"
)
SOURCE_PATTERN = r"^(hub:v1|hub:v2|https?://[^\s]+)$"

# Caps on a job beyond TrainConfig's own bounds, so one request cannot ask for a machine's worth.
MAX_JOB_STEPS = 1_000_000
MAX_JOB_BLOCK_SIZE = 2048
MAX_TOKENS_PER_MICRO_BATCH = 1 << 18  # batch_size × block_size: 512 windows of 512
# A checkpoint is a write of the whole model (and an announcement every service reloads): at
# most one per MIN_JOB_CHECKPOINT_INTERVAL steps, and a bounded number kept on disk.
MIN_JOB_CHECKPOINT_INTERVAL = 10
MAX_JOB_KEEP_CHECKPOINTS = 20
HISTORY_LIMIT = 500  # loss points kept in a job's meta; older ones are thinned, not dropped

JOB_FUNCTION = "worker.jobs.train_job"
PROGRESS_META_KEY = "progress"  # the spec itself is the job's one argument, kept once
CHECKPOINT_CHANNEL = "slm:checkpoints"
LATEST_CHECKPOINT_KEY = "slm:checkpoints:latest"


def checkpoint_version(run: str, name: str) -> str:
    """How the service, the job progress and users name a checkpoint: ``<run>/<name>``, unique
    under CHECKPOINT_DIR (the run folder, then the checkpoint in it)."""
    return f"{run}/{name}"


def stop_key(job_id: str) -> str:
    """Set by the API to ask a running job to stop; read by the job after every step."""
    return f"slm:train-jobs:{job_id}:stop"


def index_key(queue: str) -> str:
    """A sorted set of the queue's train-job ids by creation time, for a newest-first list."""
    return f"slm:train-jobs:{queue}:index"


def run_key(queue: str, run: str) -> str:
    """The id of the job that last claimed run folder ``run``, so two live jobs never share it."""
    return f"slm:train-jobs:{queue}:run:{run}"


def redact_url(source: str) -> str:
    """``source`` as anyone may read it: an http(s) URL's user and password, and the values of
    its query (signed URLs carry their token there), become ``***``; other sources are kept."""
    if not source.startswith(("http://", "https://")):
        return source
    try:
        parts = urlsplit(source)
    except ValueError:  # not a URL after all: show none of it
        return source.partition("://")[0] + "://***"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = re.sub(r"=[^&]*", "=***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _name_rule(value: Any, handler: ValidatorFunctionWrapHandler) -> str:
    """A name that does not match NAME_PATTERN is refused with NAME_RULE, a sentence, rather than
    the regular expression."""
    try:
        return handler(value)
    except ValidationError as error:
        if any(item["type"] == "string_pattern_mismatch" for item in error.errors()):
            raise PydanticCustomError(
                "name_pattern",
                "must be {rule}, not {value}",
                {"rule": NAME_RULE, "value": repr(value)},
            ) from None
        raise


# A run or dataset name: the JSON schema keeps NAME_PATTERN, a refusal says NAME_RULE.
Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN), WrapValidator(_name_rule)]


class DataSpec(BaseModel):
    """Where a job's tokens come from: a dataset already prepared under DATA_DIR (by name), or a
    source the worker prepares first (the TinyStories files on the hub, or an http(s) URL)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: Name | None = Field(None, description="a prepared dataset: DATA_DIR/<dataset>")
    source: str | None = Field(
        None,
        pattern=SOURCE_PATTERN,
        max_length=2048,
        description="hub:v2, hub:v1 or an http(s) URL, prepared into DATA_DIR first",
    )

    @model_validator(mode="after")
    def _one_of(self) -> DataSpec:
        if (self.dataset is None) == (self.source is None):
            raise ValueError("give exactly one of data.dataset and data.source")
        return self

    def folder_name(self) -> str:
        """The dataset's folder under DATA_DIR. A source gets a name derived from it (never the
        URL itself, which could hold '/' or '..'): ``tinystories-v2`` for ``hub:v2``,
        ``url-<16 hex digits of its sha256>`` for a URL, so one URL is prepared once."""
        if self.dataset is not None:
            return self.dataset
        assert self.source is not None  # _one_of
        if self.source.startswith("hub:"):
            return "tinystories-" + self.source.removeprefix("hub:")
        return "url-" + hashlib.sha256(self.source.encode()).hexdigest()[:16]


class TrainJobSpec(BaseModel):
    """One training job. Checkpoints go to CHECKPOINT_DIR/<run_name>/."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_name: Name = Field(description=NAME_RULE)
    data: DataSpec
    train: TrainConfig = Field(default_factory=TrainConfig)
    init_from_run: Name | None = Field(
        None,
        description="fine-tune: start from the best (else latest) checkpoint of this run",
    )

    def redacted(self) -> TrainJobSpec:
        """The spec as the API shows it: data.source without its credentials (``redact_url``)."""
        if self.data.source is None:
            return self
        data = self.data.model_copy(update={"source": redact_url(self.data.source)})
        return self.model_copy(update={"data": data})

    @model_validator(mode="after")
    def _within_job_limits(self) -> TrainJobSpec:
        train = self.train
        block = train.block_size or train.model().block_size
        if block > MAX_JOB_BLOCK_SIZE:
            raise ValueError(f"block size {block} exceeds the job limit of {MAX_JOB_BLOCK_SIZE}")
        steps = train.total_steps(block)  # None under max_minutes: the clock decides
        if steps is not None and steps > MAX_JOB_STEPS:
            raise ValueError(
                f"train.max_steps (or max_tokens, {steps:,} steps) may be at "
                f"most {MAX_JOB_STEPS:,} steps for a job"
            )
        if train.batch_size * block > MAX_TOKENS_PER_MICRO_BATCH:
            raise ValueError(
                f"train.batch_size × block size = {train.batch_size * block:,} tokens per "
                f"micro-batch exceeds the job limit of {MAX_TOKENS_PER_MICRO_BATCH:,}; "
                f"use grad_accum for larger batches"
            )
        interval = train.checkpoint_interval
        if interval and not MIN_JOB_CHECKPOINT_INTERVAL <= interval <= MAX_JOB_STEPS:
            raise ValueError(
                f"train.checkpoint_interval must be 0 (at the end only) or from "
                f"{MIN_JOB_CHECKPOINT_INTERVAL} to {MAX_JOB_STEPS:,} steps for a job, not "
                f"{interval:,}"
            )
        if train.keep_checkpoints > MAX_JOB_KEEP_CHECKPOINTS:
            raise ValueError(
                f"train.keep_checkpoints may be at most {MAX_JOB_KEEP_CHECKPOINTS} for a job, "
                f"not {train.keep_checkpoints:,}"
            )
        if self.init_from_run == self.run_name:
            raise ValueError("init_from_run must name another run (to continue one, resume it)")
        return self


JobState = Literal[
    "queued",  # waiting for a worker
    "preparing",  # tokenizing a source into DATA_DIR
    "training",
    "finished",
    "stopped",  # a stop request was honoured: a checkpoint was saved, the job can be resumed
    "failed",  # an error; the message says what, the job can be resumed
    "cancelled",  # removed from the queue before it started
    "abandoned",  # its worker died mid-job; resume continues from the last checkpoint
]


class LossPoint(BaseModel):
    step: int
    train_loss: float | None = None
    val_loss: float | None = None
    val_bits_per_byte: float | None = None


class JobSummary(TrainProgress):
    """A job at a glance: the run's progress, and what the job is doing."""

    state: JobState = "queued"
    message: str | None = Field(None, description="what went wrong, or what is happening")
    resumed_from: int | None = Field(
        None, description="the step this run last resumed from (its last checkpoint)"
    )
    updated_at: datetime = Field(
        default_factory=lambda: datetime.now(UTC), description="when the worker last reported"
    )


class LossHistory(BaseModel):
    history: list[LossPoint] = Field(default_factory=list, description="bounded loss history")
    history_every: int = Field(
        1, ge=1, description="steps between history points; doubles each time it is thinned"
    )


class JobProgress(JobSummary, LossHistory):
    """A job's progress as the worker stores it in its RQ meta; GET /train-jobs/{id} returns
    it whole, the job list its ``JobSummary`` part."""


class CheckpointAnnouncement(BaseModel):
    """Published on CHECKPOINT_CHANNEL and stored under LATEST_CHECKPOINT_KEY for each new one."""

    run: str = Field(pattern=NAME_PATTERN)
    name: str = Field(description="the checkpoint's name inside the run folder")
    step: int
    val_loss: float | None = None
    job_id: str | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def version(self) -> str:
        return checkpoint_version(self.run, self.name)

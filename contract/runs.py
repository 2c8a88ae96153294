"""Which train job a run folder belongs to.

A run belongs to the job that made it: the worker writes ``job.json`` (``RUN_OWNER``) into
CHECKPOINT_DIR/<run> before that job first trains there, and from then on only that job
continues the run (``POST /train-jobs/{id}/resume``). A new job naming a run that holds
checkpoints is refused when it is submitted (``contract.store``), whoever made them, so no job
resumes or overwrites another's run with other data or another shape; and a job is refused a
folder another job owns, by the API at resume and by the worker before it trains (in case the
API does not see CHECKPOINT_DIR).

Messages name the folder as CHECKPOINT_DIR/<run>, never by the server's path.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ValidationError

from model.atomic import atomic_write_bytes

RUN_OWNER = "job.json"


class RunOwner(BaseModel):
    job_id: str


def owner_of(run_dir: Path) -> str | None:
    """The id of the job that made the run, None when no job recorded itself (a run of
    `slm train` or of an earlier version) or the record is unreadable."""
    try:
        return RunOwner.model_validate_json((run_dir / RUN_OWNER).read_bytes()).job_id
    except (OSError, ValidationError):
        return None


def write_owner(run_dir: Path, job_id: str) -> None:
    atomic_write_bytes(run_dir / RUN_OWNER, RunOwner(job_id=job_id).model_dump_json().encode())


def holds_checkpoints(run_dir: Path) -> bool:
    """Whether the folder holds weights: a checkpoint, or the training state beside one."""
    return run_dir.is_dir() and any(run_dir.glob("*.safetensors"))


def run_conflict(run_dir: Path, job_id: str, new: bool) -> str | None:
    """Why job ``job_id`` (a ``new`` one, or one resumed or starting) may not train into
    ``run_dir``, or None when it may."""
    run, owner = run_dir.name, owner_of(run_dir)
    if owner == job_id:
        return None
    if owner is not None:
        return (
            f"run {run!r} belongs to job {owner}, which made it; another job may not continue or "
            f"overwrite it. To continue it, resume that job (POST /train-jobs/{owner}/resume); "
            f"to start from its weights, give init_from_run: {run!r} and another run_name"
        )
    if new and holds_checkpoints(run_dir):
        return (
            f"run {run!r} already holds checkpoints in CHECKPOINT_DIR/{run} (trained by `slm "
            f"train` or before jobs recorded their runs); a new job may not continue or "
            f"overwrite it: choose another run_name, or start from its weights with "
            f"init_from_run: {run!r}"
        )
    return None

"""/train-jobs: enqueue training jobs for the RQ worker and report their progress."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["train jobs"])

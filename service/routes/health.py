"""GET /health (the process answers), GET /ready (a model is loaded and the engine decodes),
GET /metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.auth import require_status_key, sees_status
from service.dependencies import engine_of
from service.engine import Engine, NoModel, no_model_message
from service.errors import error_responses
from service.schemas import Readiness

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", responses=error_responses(503))
async def ready(request: Request, engine: Annotated[Engine, Depends(engine_of)]) -> Readiness:
    # The default run's model, or while it is reloaded after an eviction, any run's.
    engine.check_running()  # 503 while the decode loop restarts after a failure
    loaded = engine.model or next(iter(engine.models.values()), None)
    if loaded is None:
        raise NoModel(no_model_message(engine.settings))  # 503, as for a story asked too early
    if not sees_status(request):
        return Readiness()
    return Readiness(model=loaded.version, step=loaded.meta.step)


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(require_status_key)],
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"},
        **error_responses(401),
    },
)
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

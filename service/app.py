"""The FastAPI application: settings, error shape, body limit, and the route groups.

Run it with ``slm serve`` (uvicorn), or ``uvicorn service.app:create_app --factory``.
Each route group owns its resources through its own ``lifespan``; this module only composes them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI

from contract.settings import Settings
from service.errors import install_error_handlers
from service.limits import BodySizeLimit
from service.metrics import RequestMetrics
from service.routes import admin, generate, health, openai, playground, train_jobs

# generate first: its lifespan starts the engine and the reloader that the others use.
ROUTE_GROUPS = (generate, openai, health, admin, train_jobs, playground)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with AsyncExitStack() as stack:
        for group in ROUTE_GROUPS:
            if hasattr(group, "lifespan"):
                await stack.enter_async_context(group.lifespan(app))
        yield


def create_app(settings: Settings | None = None) -> FastAPI:
    app = FastAPI(
        title="slm",
        summary="Stories from a small GPT, streamed; training jobs on a GPU worker",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings or Settings()
    install_error_handlers(app)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=app.state.settings.max_body_bytes,
        timeout_s=app.state.settings.body_timeout_s,
    )
    app.add_middleware(RequestMetrics)  # added last, so outermost: it counts 413s too
    for group in ROUTE_GROUPS:
        app.include_router(group.router)
    return app

"""The FastAPI application: settings, error shape, body limit, and the route groups.

Run it with ``slm serve`` (uvicorn), or ``uvicorn service.app:create_app --factory``.
The app's lifespan starts what every route shares, the engine and the reloader feeding it; a
route group with resources of its own (train jobs' Redis client) adds its own ``lifespan``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from contract.settings import Settings
from service.engine import Engine
from service.errors import install_error_handlers
from service.limits import BodySizeLimit
from service.metrics import RequestMetrics
from service.reloader import Reloader
from service.routes import (
    admin,
    datasets,
    generate,
    health,
    openai,
    playground,
    runs,
    tokenizer,
    train_jobs,
)

ROUTE_GROUPS = (
    generate,
    openai,
    tokenizer,
    runs,
    health,
    admin,
    train_jobs,
    datasets,
    playground,
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine = Engine(app.state.settings)
    engine.start()
    reloader = Reloader(app.state.settings, engine)
    app.state.engine, app.state.reloader = engine, reloader
    try:
        await reloader.start()
        async with AsyncExitStack() as stack:
            for group in ROUTE_GROUPS:
                if hasattr(group, "lifespan"):
                    await stack.enter_async_context(group.lifespan(app))
            yield
    finally:
        await reloader.stop()
        engine.stop()


# Where /docs (Swagger UI) and /redoc load their scripts and styles from: files that the
# fastapi-offline package ships, served by this app, not FastAPI's default CDN, so the pages work
# on a machine with no internet.
DOCS_ASSETS = "/docs-assets"


def create_app(settings: Settings | None = None) -> FastAPI:
    # FastAPIOffline is a FastAPI whose /docs and /redoc are FastAPI's own pages pointed at a
    # StaticFiles mount (FastAPI's "Self-hosting JavaScript and CSS for docs" recipe).
    app = FastAPIOffline(
        title="slm",
        summary="Stories from a small GPT, streamed; training jobs on a GPU worker",
        version="0.1.0",
        lifespan=lifespan,
        static_url=DOCS_ASSETS,
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

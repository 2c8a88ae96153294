"""POST /generate: a story, streamed as server-sent events (or one JSON with stream=false).

Events: ``token`` with a ``Piece`` (text and the token ids that released it) for each piece of
text, then ``done`` with ``Finished`` (finish reason, usage, timings, model version, seed); a
failure after the stream began (the deadline passed) arrives as ``error`` with the usual error
JSON. This group also owns the engine and the reloader that every generating route shares.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from service.auth import require_api_key, settings_of
from service.engine import Engine, Generation, engine_of
from service.errors import ApiError, error_body, error_responses
from service.limits import require_json
from service.reloader import Reloader
from service.schemas import GenerateRequest, GenerateResponse, Piece

router = APIRouter(tags=["generate"])


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine = Engine(app.state.settings)
    engine.start()
    reloader = Reloader(app.state.settings, engine)
    app.state.engine, app.state.reloader = engine, reloader
    await reloader.start()
    try:
        yield
    finally:
        await reloader.stop()
        engine.stop()


@router.post(
    "/generate",
    dependencies=[Depends(require_api_key), Depends(require_json)],
    response_model=GenerateResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "SSE, or one JSON"},
        **error_responses(400, 401, 408, 413, 415, 422, 429, 503, 504),
    },
)
async def generate(
    body: GenerateRequest, request: Request, engine: Annotated[Engine, Depends(engine_of)]
) -> GenerateResponse | EventSourceResponse:
    generation = await engine.submit(body.prompt, body.sampling(settings_of(request)))
    if body.stream:
        return EventSourceResponse(_events(generation))
    return await generation.result()


async def _events(generation: Generation) -> AsyncIterator[ServerSentEvent]:
    try:
        async for item in generation.events():
            kind = "token" if isinstance(item, Piece) else "done"
            yield ServerSentEvent(item.model_dump_json(), event=kind)
    except ApiError as error:
        body = error_body(error.status, error.message, error.param, error.code)
        yield ServerSentEvent(json.dumps(body), event="error")

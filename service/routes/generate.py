"""POST /generate: a story, streamed as server-sent events (or one JSON with stream=false).

Events: ``token`` with a ``Piece`` (text and the token ids that released it) for each piece of
text, then ``done`` with ``Finished`` (finish reason, usage, timings, model version, seed); a
failure after the stream began (the deadline passed) arrives as ``error`` with the usual error
JSON.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from sse_starlette import ServerSentEvent

from service.auth import require_api_key, settings_of
from service.dependencies import client_of, engine_of, reloader_of
from service.engine import Engine, EngineError, Generation, TextPiece
from service.errors import error_body, error_responses, from_engine
from service.limits import event_stream, require_json
from service.reloader import Reloader
from service.replies import json_answer, whole_stories
from service.schemas import (
    Finished,
    GenerateRequest,
    GenerateResponse,
    Piece,
    finished_fields,
    logprob_of,
)

router = APIRouter(tags=["generate"])


@router.post(
    "/generate",
    dependencies=[Depends(require_api_key), Depends(require_json)],
    response_model=GenerateResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "SSE, or one JSON"},
        **error_responses(400, 401, 404, 408, 413, 415, 422, 429, 503, 504),
    },
)
async def generate(
    body: GenerateRequest,
    request: Request,
    engine: Annotated[Engine, Depends(engine_of)],
    reloader: Annotated[Reloader, Depends(reloader_of)],
) -> Response:
    params = body.sampling(settings_of(request))
    run = await reloader.resolve(body.model)
    generation = await engine.submit(body.prompt, params, run, client_of(request))
    if body.stream:
        return event_stream(request, _events(generation))
    (story,) = await whole_stories(request, [generation])
    tokenizer = generation.tokenizer
    return await json_answer(
        lambda: GenerateResponse(
            text=story.text,
            token_ids=story.token_ids,
            logprobs=None
            if story.logprobs is None
            else [logprob_of(score, tokenizer) for score in story.logprobs],
            **finished_fields(story.finish),
        ),
        [story],
    )


async def _events(generation: Generation) -> AsyncIterator[ServerSentEvent]:
    try:
        async for record in generation.records():
            if isinstance(record, TextPiece):
                yield ServerSentEvent(
                    Piece.of(record, generation.tokenizer).model_dump_json(), event="token"
                )
            else:
                yield ServerSentEvent(Finished.of(record).model_dump_json(), event="done")
    except EngineError as failure:
        error = from_engine(failure)
        body = error_body(error.status, error.message, error.param, error.code)
        yield ServerSentEvent(json.dumps(body), event="error")

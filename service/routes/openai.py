"""OpenAI-compatible API: POST /v1/completions and GET /v1/models, so the official SDKs work
unchanged (``OpenAI(base_url="http://HOST:PORT/v1", api_key=...)``).

Streams are OpenAI's: data-only events each holding a ``text_completion`` chunk, the last with
its ``finish_reason`` (then one with ``usage`` if ``stream_options.include_usage``), then
``data: [DONE]``. Our ``end_of_text`` is OpenAI's ``stop``: the model ended the story itself.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from model.generate import FinishReason
from service.auth import require_api_key, settings_of
from service.dependencies import engine_of
from service.engine import Engine, EngineError, Generation, TextPiece
from service.errors import error_body, error_responses, from_engine
from service.limits import require_json
from service.schemas import (
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    usage_of,
)

router = APIRouter(
    prefix="/v1",
    tags=["openai"],
    dependencies=[Depends(require_api_key)],
    responses=error_responses(401),
)


def openai_reason(reason: FinishReason) -> Literal["stop", "length"]:
    return "length" if reason == "length" else "stop"


@router.get("/models")
async def models(engine: Annotated[Engine, Depends(engine_of)]) -> ModelList:
    loaded = engine.model
    cards = (
        []
        if loaded is None
        else [ModelCard(id=loaded.version, created=int(loaded.loaded_at.timestamp()))]
    )
    return ModelList(data=cards)


@router.post(
    "/completions",
    response_model=Completion,
    dependencies=[Depends(require_json)],
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "SSE, or one JSON"},
        **error_responses(400, 408, 413, 415, 422, 429, 503, 504),
    },
)
async def completions(
    body: CompletionRequest, request: Request, engine: Annotated[Engine, Depends(engine_of)]
) -> Completion | EventSourceResponse:
    generation = await engine.submit(body.prompt, body.sampling(settings_of(request)))
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return EventSourceResponse(_chunks(generation, completion_id, created, include_usage))
    story = await generation.story()
    choice = CompletionChoice(text=story.text, finish_reason=openai_reason(story.finish.reason))
    return Completion(
        id=completion_id,
        created=created,
        model=story.finish.version,
        choices=[choice],
        usage=usage_of(story.finish),
    )


async def _chunks(
    generation: Generation, completion_id: str, created: int, include_usage: bool
) -> AsyncIterator[ServerSentEvent]:
    def chunk(choices: list[CompletionChoice], **extra: object) -> ServerSentEvent:
        # The version is set when the request joins the batch, before its first event is sent.
        assert generation.version is not None
        completion = Completion(
            id=completion_id, created=created, model=generation.version, choices=choices, **extra
        )
        return ServerSentEvent(completion.model_dump_json())

    try:
        async for record in generation.records():
            if isinstance(record, TextPiece):
                if record.text:
                    yield chunk([CompletionChoice(text=record.text, finish_reason=None)])
                continue
            reason = openai_reason(record.reason)
            yield chunk([CompletionChoice(text="", finish_reason=reason)])
            if include_usage:
                yield chunk([], usage=usage_of(record))
    except EngineError as failure:
        error = from_engine(failure)
        yield ServerSentEvent(json.dumps(error_body(error.status, error.message, error.param)))
    yield ServerSentEvent("[DONE]")

"""Whole answers (``stream: false``), given as carefully as streams: their stories leave the
batch when the client leaves, and a large one's JSON is built off the event loop.

A stream learns that its client left when a send fails; a whole answer sends nothing until the
end, so it listens for the client's disconnect while its stories are written. And the answer
to many choices with log-probabilities holds hundreds of thousands of objects: built on the
event loop, it would stall every stream for as long.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi import Request, Response
from pydantic import BaseModel
from starlette.types import Receive

from service.engine import Generation, Story, stories
from service.errors import ApiError

# nginx's status for a request whose client closed the connection first: nobody reads it, but
# the request counter shows how many whole answers were abandoned.
CLIENT_LEFT = 499
# Answers up to this size, in tokens (a token's log-probabilities, with their alternatives,
# counting as LOGPROB_WEIGHT), are built on the event loop: well under a millisecond.
INLINE_ANSWER_SIZE = 4096
LOGPROB_WEIGHT = 8


async def whole_stories(request: Request, generations: list[Generation]) -> list[Story]:
    """Every generation's whole story, in order; if the client disconnects first, the
    generations leave the engine and ApiError(499) is raised."""
    written = asyncio.ensure_future(stories(generations))
    left = asyncio.ensure_future(_disconnect(request.receive))
    try:
        await asyncio.wait((written, left), return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
        if not written.done():
            written.cancel()
            # A task cancelled before it ran never reached the records' own cancel.
            for generation in generations:
                generation.engine.cancel(generation)
    if written.done():
        return written.result()
    raise ApiError(CLIENT_LEFT, "the client closed the connection before the answer was ready")


async def _disconnect(receive: Receive) -> None:
    # The body is read: the only message still to come is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


async def json_answer(build: Callable[[], BaseModel], answers: list[Story]) -> Response:
    """The JSON of the model ``build`` makes of ``answers``: made and serialized on a worker
    thread when it is large, on the event loop when a thread hop would cost more."""
    size = sum(
        len(story.token_ids)
        + LOGPROB_WEIGHT * len(story.logprobs or ())
        + LOGPROB_WEIGHT * len(story.prompt.logprobs if story.prompt else ())
        for story in answers
    )
    if size <= INLINE_ANSWER_SIZE:
        return Response(build().model_dump_json(), media_type="application/json")
    body = await asyncio.to_thread(lambda: build().model_dump_json())
    return Response(body, media_type="application/json")

"""Whole answers (``stream: false``), given as carefully as streams: their stories leave the
batch when the client leaves, and their JSON is built off the event loop.

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


async def json_answer(build: Callable[[], BaseModel]) -> Response:
    """The JSON of the model ``build`` makes, made and serialized on a worker thread."""
    body = await asyncio.to_thread(lambda: build().model_dump_json())
    return Response(body, media_type="application/json")

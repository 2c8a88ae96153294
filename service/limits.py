"""Limits on request bodies, enforced before a route reads them, each answered with the usual JSON
error.

- Size (413): checked against Content-Length up front, and while the body streams in, so a
  chunked or lying client cannot send more than MAX_BODY_BYTES either.
- Time (408): the whole body must arrive within BODY_TIMEOUT_S of the request's headers, so a
  client trickling a few bytes a second (slow loris) cannot hold a connection and its slot for
  ever. The clock stops once the body is complete: a stream's later wait for the client to
  disconnect is not bounded by it.
- Type (415): a body must be JSON (``require_json``, a dependency of the routes that take one).
- A stream's reader (``event_stream``): a client that stops reading is dropped once one send has
  waited STREAM_SEND_TIMEOUT_S, and its story leaves the batch, so a socket nobody reads holds
  no slot. What waits for it meanwhile is bounded by the story's length (MAX_NEW_TOKENS).
"""

from __future__ import annotations

import asyncio
import email.message
import json
import time
from collections.abc import AsyncIterator

from fastapi import Request
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError, error_body


class BodyTooLarge(Exception):
    pass


class BodyTooSlow(Exception):
    pass


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send, 413)
            return

        deadline = time.monotonic() + self.timeout_s
        received, refused, answered, complete = 0, 0, False, False

        async def limited_receive() -> Message:
            nonlocal received, refused, complete
            if complete:  # after the body: waiting for a disconnect, unbounded
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - time.monotonic())
            except TimeoutError:
                refused = 408
                raise BodyTooSlow from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.max_bytes:
                    refused = 413
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            # The framework may turn the interrupted read into its own error answer: once a
            # limit is crossed, whatever the app sends is replaced by ours.
            nonlocal answered
            if not refused:
                answered = answered or message["type"] == "http.response.start"
                await send(message)
            elif not answered:
                answered = True
                await self._refuse(send, refused)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except (BodyTooLarge, BodyTooSlow):
            if not answered:
                await self._refuse(send, refused)

    async def _refuse(self, send: Send, status: int) -> None:
        message = (
            f"request body larger than the limit of {self.max_bytes:,} bytes (MAX_BODY_BYTES)"
            if status == 413
            else f"the request body did not arrive within {self.timeout_s:g} s (BODY_TIMEOUT_S)"
        )
        body = json.dumps(error_body(status, message)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    # The rest of the body is never read: this connection cannot serve another.
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def event_stream(request: Request, events: AsyncIterator[ServerSentEvent]) -> EventSourceResponse:
    """The SSE answer of every streaming route. Closing ``events`` on a send timeout ends its
    generations (``Generation.records`` cancels them as it closes)."""
    timeout = request.app.state.settings.stream_send_timeout_s
    return EventSourceResponse(events, send_timeout=timeout)


async def require_json(request: Request) -> None:
    """A dependency of routes that take a body: one sent with another Content-Type is a 415, not
    a confusing validation error. (No Content-Type at all is refused the same way.)"""
    has_body = request.headers.get("content-length", "0") != "0" or (
        "transfer-encoding" in request.headers
    )
    if not has_body:
        return
    declared = request.headers.get("content-type", "")
    header = email.message.Message()
    header["content-type"] = declared
    subtype = header.get_content_subtype()
    if header.get_content_maintype() != "application" or not (
        subtype == "json" or subtype.endswith("+json")
    ):
        shown = f"Content-Type {declared!r}" if declared else "no Content-Type"
        raise ApiError(
            415, f"the body must be JSON: send `Content-Type: application/json` ({shown})"
        )

"""Bounds on connections, for ``slm serve``: uvicorn's h11 protocol with two additions.

- MAX_CONNECTIONS: a request that arrives while more connections than that are open gets 503
  in the usual error shape (uvicorn's own ``limit_concurrency`` answers in plain text).
- HEADER_TIMEOUT_S: uvicorn bounds nothing between a connection opening and its request's
  headers being complete, so a client sending a header byte now and then (slow loris) holds a
  connection for ever. A timer armed when the connection opens, and again when an answer is
  done, closes it, with a 408 if part of a request came.
- A fixed kernel send buffer per connection (SEND_BUFFER_BYTES): Linux grows one to 4 MiB for a
  client that never reads, so a thousand such clients could pin gigabytes; and the smaller
  buffer fills soon, so a stream's send timeout notices such a client within seconds.

The body's own clock (BODY_TIMEOUT_S) is ``service.limits``'; a stream's client that stops
reading is dropped by the stream's send timeout (``event_stream`` there).
"""

from __future__ import annotations

import asyncio
import json
import socket

import h11
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from contract.settings import Settings
from service.errors import error_body

# A story streams a few kilobytes a second; a big JSON answer just takes more writes.
SEND_BUFFER_BYTES = 64 * 1024
# How long a connection that got a 408 is drained before it is closed (see ``_close_gracefully``).
LINGER_S = 2.0


def _error_answer(status: int, message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers and body of an error in the usual shape, on a connection that closes after it."""
    body = json.dumps(error_body(status, message)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    return headers, body


class BoundedH11Protocol(H11Protocol):
    """One connection; ``bounded_protocol`` makes the subclass that carries the settings."""

    max_connections: int = 1000
    header_timeout_s: float = 10.0

    def __init__(self, *args, **kwargs) -> None:  # uvicorn's own signature
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._lingering = False
        served = self.app

        async def bounded(scope: Scope, receive: Receive, send: Send) -> None:
            # This request's connection and task are counted already.
            if len(self.connections) > self.max_connections or (
                len(self.tasks) > self.max_connections
            ):
                await self._refuse_busy(send)
                return
            await served(scope, receive, send)

        self.app = bounded

    async def _refuse_busy(self, send: Send) -> None:
        message = (
            f"the server holds {self.max_connections} connections (MAX_CONNECTIONS); retry shortly"
        )
        headers, body = _error_answer(503, message)
        headers.append((b"retry-after", b"1"))
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        connection = transport.get_extra_info("socket")
        if connection is not None:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._lingering:  # the answer is sent; what the client still sends is dropped
            return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request's headers are complete
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the next request's headers

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        partial, _ = self.conn.trailing_data
        if partial:
            message = (
                f"the request's headers did not arrive within {self.header_timeout_s:g} s "
                "(HEADER_TIMEOUT_S)"
            )
            headers, body = _error_answer(408, message)
            head = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\n" + head + b"\r\n" + body)
            self._close_gracefully()
        else:  # a client that said nothing (a browser's spare connection) just goes
            self.transport.close()

    def _close_gracefully(self) -> None:
        """Send the end of the stream after the answer, and close once the client has read it.

        Closing a socket with unread bytes in its receive buffer (the slow client's next header
        byte) makes the kernel send a reset, and a reset makes the client's kernel drop the 408 it
        has not read yet. So the write side is shut first and what still arrives is read and
        dropped, until the client closes its side (``eof_received``) or LINGER_S passes.
        """
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self._lingering = True
        self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def bounded_protocol(settings: Settings) -> type[BoundedH11Protocol]:
    """The protocol class to pass uvicorn as ``http``, bounded by ``settings``."""
    return type(
        "BoundedH11Protocol",
        (BoundedH11Protocol,),
        {
            "max_connections": settings.max_connections,
            "header_timeout_s": settings.header_timeout_s,
        },
    )

"""FastAPI dependencies for the app-wide parts that ``service.app`` starts: the engine and the
reloader.

Dependencies that do no blocking I/O are ``async def`` throughout the service: FastAPI runs a
plain ``def`` one in its thread pool, and a thread hop per dependency per request costs more than
the check itself while the decode thread keeps both cores busy."""

from __future__ import annotations

from fastapi import Request

from service.engine import Engine
from service.reloader import Reloader


async def engine_of(request: Request) -> Engine:
    return request.app.state.engine


async def reloader_of(request: Request) -> Reloader:
    return request.app.state.reloader


def client_of(request: Request) -> str:
    """Who sent the request, as the engine's fair queue tells clients apart: the peer's address
    (behind a proxy, the proxy's: every client is one then)."""
    return request.client.host if request.client else ""

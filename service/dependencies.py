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

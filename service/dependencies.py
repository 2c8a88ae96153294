"""FastAPI dependencies for the app-wide parts that ``service.app`` starts: the engine and the
reloader."""

from __future__ import annotations

from fastapi import Request

from service.engine import Engine
from service.reloader import Reloader


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


def reloader_of(request: Request) -> Reloader:
    return request.app.state.reloader

"""GET /: the web playground, static files served from ``service/static`` with no build step.

The files are a fixed set known at start-up, so nothing a request sends becomes a file path."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from service.errors import ApiError

STATIC = Path(__file__).resolve().parents[1] / "static"
MEDIA_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
FILES = {path.name: path for path in STATIC.iterdir() if path.suffix in MEDIA_TYPES}

router = APIRouter(tags=["playground"], include_in_schema=False)


def _file(name: str) -> Response:
    path = FILES.get(name)
    if path is None:
        raise ApiError(404, f"no static file {name!r}")
    return Response(
        path.read_bytes(),
        media_type=f"{MEDIA_TYPES[path.suffix]}; charset=utf-8",
        headers={"Cache-Control": "no-cache"},
    )


@router.get("/")
def playground() -> Response:
    return _file("index.html")


@router.get("/static/{name}")
def static_file(name: str) -> Response:
    return _file(name)

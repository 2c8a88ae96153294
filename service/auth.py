"""API-key checks, as FastAPI dependencies.

With API_KEY set, user routes need ``Authorization: Bearer <key>``; without it they are open (the
README says so). Admin routes always need the key, so they are closed when none is configured.
Keys are compared in constant time.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from contract.settings import Settings
from service.errors import ApiError

CHALLENGE = {"WWW-Authenticate": "Bearer"}


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _check(request: Request, key: str) -> None:
    token = _bearer(request)
    if token is None:
        message = "missing API key: send `Authorization: Bearer <key>`"
        raise ApiError(401, message, headers=CHALLENGE)
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise ApiError(401, "invalid API key", headers=CHALLENGE)


async def require_api_key(request: Request) -> None:
    key = settings_of(request).api_key
    if key is not None:
        _check(request, key.get_secret_value())


async def require_admin(request: Request) -> None:
    key = settings_of(request).api_key
    if key is None:
        raise ApiError(403, "admin routes are disabled: set API_KEY to enable them")
    _check(request, key.get_secret_value())

"""Who may call what, as FastAPI dependencies.

Generation routes (``require_api_key``): with API_KEY set they need ``Authorization: Bearer
<key>``; without it they are open to whoever reaches the port, which `slm serve` binds to
127.0.0.1 unless told otherwise. Routes that run work or change the server, /train-jobs,
/datasets and /admin (``require_operator``): with API_KEY set they need it too; without it they
answer only a client on this machine that names this machine in its ``Host`` header, so neither
the network nor a web page (through DNS rebinding: a name of the attacker's that resolves to
127.0.0.1) can start training. Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import Request

from contract.settings import Settings
from service.errors import ApiError

CHALLENGE = {"WWW-Authenticate": "Bearer"}
SET_A_KEY = (
    "set API_KEY on the server (16 characters or more) and send `Authorization: Bearer <key>`"
)


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, key: str) -> bool:
    return hmac.compare_digest(token.encode(), key.encode())


def _check(request: Request, key: str) -> None:
    token = _bearer(request)
    if token is None:
        message = "missing API key: send `Authorization: Bearer <key>`"
        raise ApiError(401, message, headers=CHALLENGE)
    if not _matches(token, key):
        raise ApiError(401, "invalid API key", headers=CHALLENGE)


def sees_status(request: Request) -> bool:
    """Whether /ready and /metrics may show this client the run names: no API_KEY is set (who
    reaches the port is the operator's choice), PUBLIC_STATUS says anyone may, or it sent the
    key."""
    settings = settings_of(request)
    if settings.api_key is None or settings.public_status:
        return True
    token = _bearer(request)
    return token is not None and _matches(token, settings.api_key.get_secret_value())


def _is_loopback_address(text: str) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1, from a dual-stack socket
    return address.is_loopback


def is_loopback_name(name: str) -> bool:
    """Whether ``name`` is this machine: localhost, a name under .localhost (which browsers
    resolve to loopback themselves), or a loopback address."""
    name = name.lower().rstrip(".")
    return name == "localhost" or name.endswith(".localhost") or _is_loopback_address(name)


def _names_this_machine(host: str) -> bool:
    """Whether a ``Host`` header (``name``, ``name:port``, ``[::1]:port``) is a loopback name."""
    if host.startswith("["):
        return is_loopback_name(host[1:].partition("]")[0])
    return is_loopback_name(host.rpartition(":")[0] if ":" in host else host)


async def require_api_key(request: Request) -> None:
    key = settings_of(request).api_key
    if key is not None:
        _check(request, key.get_secret_value())


async def require_operator(request: Request) -> None:
    key = settings_of(request).api_key
    if key is not None:
        _check(request, key.get_secret_value())
        return
    client = request.client.host if request.client else ""
    if not _is_loopback_address(client):
        message = "without API_KEY this route answers clients on the server's machine only: "
        raise ApiError(403, message + SET_A_KEY)
    if not _names_this_machine(request.headers.get("host", "")):
        raise ApiError(
            403,
            "without API_KEY this route answers only requests whose Host header names the "
            f"server's machine (localhost, 127.0.0.1 or [::1]), so a web page cannot reach it "
            f"through DNS rebinding: open the playground at http://127.0.0.1:PORT/, or {SET_A_KEY}",
        )


async def require_status_key(request: Request) -> None:
    """For /metrics, whose labels name runs: the key when one is set, unless PUBLIC_STATUS."""
    if not sees_status(request):
        await require_api_key(request)

"""One JSON error shape for every failure, OpenAI's: ``{"error": {"message", "type", "param",
"code"}}``, so the openai SDK and plain clients both read it. Validation errors name the field."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.engine import (
    Busy,
    DeadlinePassed,
    EngineError,
    GenerationFailed,
    NoModel,
    PromptRejected,
    Restarting,
    ShuttingDown,
    UnknownModel,
)

log = logging.getLogger("slm.service")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "request_timeout",
    409: "conflict_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class ErrorInfo(BaseModel):
    message: str = Field(description="what was wrong, and what to do about it")
    type: str = Field(description="invalid_request_error, authentication_error, ...")
    param: str | None = Field(None, description="the request field at fault, if one is")
    code: str | None = Field(None, description="a stable name for the error, where it has one")


class ErrorResponse(BaseModel):
    """The body of every answer that is not a success."""

    error: ErrorInfo


_DESCRIPTIONS = {
    400: "the body could not be read (not UTF-8, or nested too deeply)",
    408: "the request body did not arrive within BODY_TIMEOUT_S",
    401: "missing or wrong API key",
    403: "without API_KEY, a client not on the server's machine (or a foreign Host header)",
    404: "no such resource",
    409: "conflicts with the resource's state",
    413: "request body larger than MAX_BODY_BYTES",
    415: "the body is not application/json",
    422: "invalid request: the message names the field",
    429: "the server is busy; retry after Retry-After seconds",
    503: "not available now: the message says why",
    504: "the story took longer than REQUEST_TIMEOUT_S",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for routes that can answer these error statuses, all with the one
    error shape, so clients (and schemathesis) know every status a route may give."""
    return {
        status: {"model": ErrorResponse, "description": _DESCRIPTIONS[status]}
        for status in statuses
    }


class ApiError(Exception):
    """Raised by routes and dependencies for any answer that is not a success."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def from_engine(error: EngineError) -> ApiError:
    """The HTTP answer to what the engine raised."""
    match error:
        case PromptRejected():
            return ApiError(422, error.message, param="prompt")
        case UnknownModel():
            return ApiError(404, error.message, param="model", code="model_not_found")
        case Busy():
            return ApiError(429, error.message, headers={"Retry-After": str(error.retry_after_s)})
        case Restarting():
            return ApiError(503, error.message, headers={"Retry-After": str(error.retry_after_s)})
        case DeadlinePassed():
            return ApiError(504, error.message)
        case NoModel() | ShuttingDown():
            return ApiError(503, error.message)
        case GenerationFailed():
            return ApiError(500, error.message)
    return ApiError(500, error.message)


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    message, param = _printable(message), param and _printable(param)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _printable(text: str) -> str:
    """``text`` as UTF-8 can carry it: a lone surrogate echoed from the request (a JSON key, a
    value quoted in a validation message) becomes ``\\udXXX`` instead of failing the answer."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status, headers=headers)


def _field(loc: tuple[Any, ...]) -> str:
    # ("body", "train", "max_steps") → "train.max_steps"; the "body"/"query" prefix says nothing.
    parts = [str(part) for part in loc[1:]] if len(loc) > 1 else [str(part) for part in loc]
    return ".".join(parts)


def describe_validation(error: RequestValidationError) -> tuple[str, str | None]:
    messages, first_field = [], None
    for item in error.errors():
        if item.get("type") == "json_invalid":  # loc is ("body", position): not a field
            reason = item.get("ctx", {}).get("error", "invalid JSON")
            messages.append(f"the body is not valid JSON: {reason} at character {item['loc'][-1]}")
            continue
        field = _field(tuple(item.get("loc", ())))
        first_field = first_field or field or None
        message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        messages.append(f"{field}: {message}" if field else message)
    return "; ".join(messages) or "invalid request", first_field


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        # Messages may name files (a checkpoint that did not load); clients see no server paths.
        message = request.app.state.settings.redact(error.message)
        return error_response(
            error.status, message, param=error.param, code=error.code, headers=error.headers
        )

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, error: EngineError) -> JSONResponse:
        return await _api_error(request, from_engine(error))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        message, field = describe_validation(error)
        return error_response(422, message, param=field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        message = str(error.detail)
        if error.status_code == 400 and error.__cause__ is not None:
            # FastAPI's "There was an error parsing the body" hides why; the cause says it
            # (invalid UTF-8, nesting past the recursion limit, an integer over 4,300 digits).
            message = f"the body could not be read as JSON: {error.__cause__}"
        return error_response(error.status_code, message, headers=error.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(error).__name__}")

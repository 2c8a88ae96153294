"""/runs/{run}/...: one base URL per run, for clients that find the tokenizer beside the
completions URL rather than naming a model in every request.

lm-eval's remote tokenizer calls ``/tokenize``, ``/detokenize`` and ``/tokenizer_info`` beside its
``base_url`` and names no ``model``: at ``/v1/completions`` it would tokenize with the default
run's vocabulary whatever run the completions name. With
``base_url=http://HOST:PORT/runs/RUN/v1/completions`` each of those, and the completions, are
RUN's. A request may name RUN or one of its versions (``RUN/step-...``) as ``model``; one that
names another run is refused.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel

from service.auth import require_api_key
from service.errors import ApiError, error_responses
from service.limits import require_json
from service.openai_schemas import Completion, CompletionRequest
from service.routes import openai, tokenizer
from service.routes.tokenizer import (
    BODY_ERRORS,
    DetokenizeRequest,
    DetokenizeResponse,
    Engines,
    Reloaders,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)

router = APIRouter(
    prefix="/runs/{run}",
    tags=["runs"],
    dependencies=[Depends(require_api_key)],
    responses=error_responses(401, 404, 503),
)
RunName = Annotated[str, Path(description="the run this base URL serves")]
Body = TypeVar("Body", bound=BaseModel)


def _check_run(named: str | None, run: str) -> None:
    """``named`` (a request's ``model``) may be absent, the run, or one of its versions."""
    if named is not None and named.partition("/")[0] != run:
        raise ApiError(
            422, f"this URL serves the run {run!r}, and the request names {named!r}", param="model"
        )


def _for_run(body: Body, run: str) -> Body:
    named = getattr(body, "model", None)
    _check_run(named, run)
    return body if named else body.model_copy(update={"model": run})


@router.post("/tokenize", dependencies=[Depends(require_json)], responses=BODY_ERRORS)
async def tokenize(
    run: RunName, body: TokenizeRequest, engine: Engines, reloader: Reloaders
) -> TokenizeResponse:
    return await tokenizer.tokenize(_for_run(body, run), engine, reloader)


@router.post("/detokenize", dependencies=[Depends(require_json)], responses=BODY_ERRORS)
async def detokenize(
    run: RunName, body: DetokenizeRequest, engine: Engines, reloader: Reloaders
) -> DetokenizeResponse:
    return await tokenizer.detokenize(_for_run(body, run), engine, reloader)


@router.get("/tokenizer_info")
async def tokenizer_info(
    run: RunName,
    engine: Engines,
    reloader: Reloaders,
    model: Annotated[str | None, Query(description="the run, if named: this URL's")] = None,
) -> TokenizerInfo:
    _check_run(model, run)
    return await tokenizer.tokenizer_info(engine, reloader, model or run)


@router.post(
    "/v1/completions",
    response_model=Completion,
    dependencies=[Depends(require_json)],
    responses={**openai.STREAMED, **error_responses(400, 408, 413, 415, 422, 429, 504)},
)
async def completions(run: RunName, body: CompletionRequest, request: Request) -> Response:
    return await openai.completions(_for_run(body, run), request)

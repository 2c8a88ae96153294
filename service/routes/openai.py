"""OpenAI-compatible API: POST /v1/completions, POST /v1/chat/completions and GET /v1/models, so
the official SDKs, chat front-ends and EleutherAI's lm-evaluation-harness work unchanged
(``OpenAI(base_url="http://HOST:PORT/v1", api_key=...)``).

Completions take one prompt or many (texts or token ids) and answer ``n`` choices per prompt,
indexed prompt by prompt; ``echo`` with ``logprobs`` scores the prompt in the engine's batched
prefill (with ``max_tokens: 0`` that is all it does: one prefill per text). Streams are
OpenAI's: data-only events each holding a chunk, a choice's last with its ``finish_reason``
(then one with ``usage`` if ``stream_options.include_usage``), then ``data: [DONE]``. Our
``end_of_text`` is OpenAI's ``stop``: the model ended the story itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.types import DecoratedCallable
from pydantic import BaseModel
from sse_starlette import ServerSentEvent

from contract.settings import Settings
from model.checkpoint import CheckpointError, read_meta
from model.generate import FinishReason, TokenLogprob
from model.sampling import derive_seed, resolve_seed
from model.tokenizer import Tokenizer
from service.auth import require_api_key, settings_of
from service.dependencies import client_of, reloader_of
from service.engine import (
    Engine,
    EngineError,
    Finish,
    Generation,
    PromptScores,
    Story,
    TextPiece,
    interleaved,
)
from service.errors import error_body, error_responses, from_engine
from service.limits import event_stream, require_json
from service.openai_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatTokenLogprob,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    ModelCard,
    ModelList,
    TopLogprob,
)
from service.reloader import Reloader
from service.replies import json_answer, whole_stories
from service.schemas import Usage

router = APIRouter(
    prefix="/v1",
    tags=["openai"],
    dependencies=[Depends(require_api_key)],
    responses=error_responses(401),
)

STREAMED = {200: {"content": {"text/event-stream": {}}, "description": "SSE, or one JSON"}}


def openai_reason(reason: FinishReason) -> Literal["stop", "length"]:
    return "length" if reason == "length" else "stop"


@router.get("/models")
async def models(
    reloader: Annotated[Reloader, Depends(reloader_of)],
    settings: Annotated[Settings, Depends(settings_of)],
) -> ModelList:
    runs = await reloader.runs()
    recorded = await asyncio.to_thread(
        lambda: [_recorded(settings.checkpoint_dir, run.version) for run in runs]
    )
    return ModelList(
        data=[
            ModelCard(
                id=run.name,
                created=int(run.created_at.timestamp()),
                version=run.version,
                loaded=run.loaded,
                **fields,
            )
            for run, fields in zip(runs, recorded, strict=True)
        ]
    )


def _recorded(root: Path, version: str) -> dict[str, Any]:
    """What a checkpoint's metadata records of its quality and vocabulary (``version``:
    ``<run>/<checkpoint>``); nothing when it cannot be read (rewritten or deleted since it was
    listed)."""
    run, _, checkpoint = version.partition("/")
    try:
        meta = read_meta(root / run / f"{checkpoint}.json")
    except (CheckpointError, OSError, ValueError):
        return {}
    evaluated = meta.extra.get("eval")
    bits = evaluated.get("val_bits_per_byte") if isinstance(evaluated, dict) else None
    return {
        "val_loss": meta.val_loss,
        "val_bits_per_byte": bits if isinstance(bits, float) else None,
        "vocabulary": meta.config.vocabulary,
    }


def _answers(
    path: str, answer: type[BaseModel]
) -> Callable[[DecoratedCallable], DecoratedCallable]:
    """POST ``path``: a JSON body, answered with ``answer`` or a stream of its chunks."""
    return router.post(
        path,
        response_model=answer,
        dependencies=[Depends(require_json)],
        responses={**STREAMED, **error_responses(400, 404, 408, 413, 415, 422, 429, 503, 504)},
    )


async def _submit(
    request: Request,
    body: CompletionRequest | ChatCompletionRequest,
    prompts: list[str | list[int]],
) -> list[Generation]:
    """``body.n`` generations per prompt, prompt by prompt, on the run ``body.model`` names,
    within this deployment's limits; the i-th of a prompt's n draws with the i-th seed derived
    from the request's."""
    params = body.sampling(settings_of(request))
    engine: Engine = request.app.state.engine
    reloader: Reloader = request.app.state.reloader
    run = await reloader.resolve(body.model)
    if body.n > 1:
        seed = resolve_seed(params.seed)
        draws = [dataclasses.replace(params, seed=derive_seed(seed, i)) for i in range(body.n)]
    else:
        draws = [params]
    stories = [(prompt, draw) for prompt in prompts for draw in draws]
    return await engine.submit_all(stories, run, client_of(request))


def _usage(finishes: list[Finish], n: int) -> Usage:
    """Prompt tokens once per prompt (not per choice), completion tokens over every choice."""
    prompt = sum(finish.prompt_tokens for finish in finishes[::n])
    completion = sum(finish.completion_tokens for finish in finishes)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _error_event(failure: EngineError) -> ServerSentEvent:
    error = from_engine(failure)
    return ServerSentEvent(json.dumps(error_body(error.status, error.message, error.param)))


# --- POST /v1/completions ----------------------------------------------------------------------


@dataclasses.dataclass
class _Offsets:
    """Legacy logprobs of one choice, built as its tokens come: ``text_offset`` counts
    characters of the choice's text from its start."""

    tokenizer: Tokenizer
    position: int = 0

    def logprobs(self, tokens: list[int], scores: list[TokenLogprob | None]) -> CompletionLogprobs:
        answer = CompletionLogprobs()
        for token, score in zip(tokens, scores, strict=True):
            text = self.tokenizer.token_text(token)
            answer.tokens.append(text)
            answer.text_offset.append(self.position)
            self.position += len(text)
            if score is None:
                answer.token_logprobs.append(None)
                answer.top_logprobs.append(None)
                continue
            answer.token_logprobs.append(score.logprob)
            # vLLM's shape, which lm-eval reads: the alternatives and the token itself.
            top = {self.tokenizer.token_text(t): logprob for t, logprob in score.top}
            top.setdefault(text, score.logprob)
            answer.top_logprobs.append(top)
        return answer


def _prompt_text(prompt: str | list[int], tokenizer: Tokenizer) -> str:
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt)


@_answers("/completions", Completion)
async def completions(body: CompletionRequest, request: Request) -> Response:
    prompts = body.prompts
    generations = await _submit(request, body, prompts)
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echoes = [prompt for prompt in prompts for _ in range(body.n)]
    if body.stream:
        events = _completion_chunks(body, generations, echoes, completion_id, created)
        return event_stream(request, events)
    answers = await whole_stories(request, generations)
    return await json_answer(
        lambda: Completion(
            id=completion_id,
            created=created,
            model=answers[0].finish.version,
            choices=[
                _completion_choice(index, body, story, echo, generations[0].tokenizer)
                for index, (story, echo) in enumerate(zip(answers, echoes, strict=True))
            ],
            usage=_usage([story.finish for story in answers], body.n),
        ),
        answers,
    )


def _version(generations: list[Generation]) -> str:
    # Set when a request joins the batch, before its first record is sent.
    version = next((g.version for g in generations if g.version is not None), None)
    assert version is not None
    return version


def _completion_choice(
    index: int,
    body: CompletionRequest,
    story: Story,
    prompt: str | list[int],
    tokenizer: Tokenizer,
) -> CompletionChoice:
    text = story.text
    logprobs = None
    if body.echo:
        text = _prompt_text(prompt, tokenizer) + text
    if body.logprobs is not None:
        drawn = story.logprobs or []
        tokens: list[int] = [score.token_id for score in drawn]
        scores: list[TokenLogprob | None] = list(drawn)
        if story.prompt is not None:  # echo: the prompt's tokens come first
            tokens = story.prompt.token_ids + tokens
            scores = story.prompt.logprobs + scores
        logprobs = _Offsets(tokenizer).logprobs(tokens, scores)
    return CompletionChoice(
        index=index,
        text=text,
        logprobs=logprobs,
        finish_reason=openai_reason(story.finish.reason),
    )


async def _completion_chunks(
    body: CompletionRequest,
    generations: list[Generation],
    echoes: list[str | list[int]],
    completion_id: str,
    created: int,
) -> AsyncIterator[ServerSentEvent]:
    tokenizer = generations[0].tokenizer  # one run writes them all
    offsets = [_Offsets(tokenizer) for _ in generations]
    echoed = [False] * len(generations)
    finishes: list[Finish | None] = [None] * len(generations)

    def event(choices: list[CompletionChoice], **extra: object) -> ServerSentEvent:
        answer = Completion(
            id=completion_id,
            created=created,
            model=_version(generations),
            choices=choices,
            **extra,
        )
        return ServerSentEvent(answer.model_dump_json())

    def text(index: int, text: str, logprobs: CompletionLogprobs | None) -> ServerSentEvent:
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=None)
        return event([choice])

    try:
        async for index, record in interleaved(generations):
            if body.echo and not echoed[index]:  # the prompt first, scored if asked
                echoed[index] = True
                scored = None
                if isinstance(record, PromptScores):
                    scored = offsets[index].logprobs(record.token_ids, record.logprobs)
                yield text(index, _prompt_text(echoes[index], tokenizer), scored)
            if isinstance(record, TextPiece):
                scores = record.logprobs if body.logprobs is not None else None
                if record.text or scores:
                    tokens = [score.token_id for score in scores or ()]
                    scored = offsets[index].logprobs(tokens, list(scores)) if scores else None
                    yield text(index, record.text, scored)
            elif isinstance(record, Finish):
                finishes[index] = record
                reason = openai_reason(record.reason)
                yield event([CompletionChoice(index=index, text="", finish_reason=reason)])
        if body.include_usage:
            done = [finish for finish in finishes if finish is not None]
            yield event([], usage=_usage(done, body.n))
    except EngineError as failure:
        yield _error_event(failure)
    yield ServerSentEvent("[DONE]")


# --- POST /v1/chat/completions -----------------------------------------------------------------


def _chat_logprobs(scores: list[TokenLogprob], tokenizer: Tokenizer) -> ChatLogprobs:
    def entry(token: int, logprob: float) -> TopLogprob:
        return TopLogprob(
            token=tokenizer.token_text(token),
            logprob=logprob,
            bytes=list(tokenizer.token_bytes(token)),
        )

    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                **entry(score.token_id, score.logprob).model_dump(),
                top_logprobs=[entry(token, logprob) for token, logprob in score.top],
            )
            for score in scores
        ]
    )


@_answers("/chat/completions", ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    generations = await _submit(request, body, [body.prompt])
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return event_stream(request, _chat_chunks(body, generations, completion_id, created))
    answers = await whole_stories(request, generations)
    tokenizer = generations[0].tokenizer  # one run writes them all
    return await json_answer(
        lambda: ChatCompletion(
            id=completion_id,
            created=created,
            model=answers[0].finish.version,
            choices=[
                ChatChoice(
                    index=index,
                    message=AssistantMessage(content=story.text),
                    logprobs=_chat_logprobs(story.logprobs, tokenizer) if body.logprobs else None,
                    finish_reason=openai_reason(story.finish.reason),
                )
                for index, story in enumerate(answers)
            ],
            usage=_usage([story.finish for story in answers], body.n),
        ),
        answers,
    )


async def _chat_chunks(
    body: ChatCompletionRequest, generations: list[Generation], completion_id: str, created: int
) -> AsyncIterator[ServerSentEvent]:
    tokenizer = generations[0].tokenizer  # one run writes them all
    finishes: list[Finish | None] = [None] * len(generations)
    started = [False] * len(generations)

    def event(choices: list[ChatChunkChoice], **extra: object) -> ServerSentEvent:
        answer = ChatCompletionChunk(
            id=completion_id,
            created=created,
            model=_version(generations),
            choices=choices,
            **extra,
        )
        return ServerSentEvent(answer.model_dump_json(exclude_none=True))

    try:
        async for index, record in interleaved(generations):
            if not started[index]:  # OpenAI's first delta of a choice names the role
                started[index] = True
                yield event([ChatChunkChoice(index=index, delta=Delta(role="assistant"))])
            if isinstance(record, TextPiece):
                logprobs = None
                if body.logprobs and record.logprobs:
                    logprobs = _chat_logprobs(record.logprobs, tokenizer)
                if record.text or logprobs is not None:
                    delta = Delta(content=record.text)
                    yield event([ChatChunkChoice(index=index, delta=delta, logprobs=logprobs)])
            elif isinstance(record, Finish):
                finishes[index] = record
                reason = openai_reason(record.reason)
                yield event([ChatChunkChoice(index=index, delta=Delta(), finish_reason=reason)])
        if body.include_usage:
            done = [finish for finish in finishes if finish is not None]
            yield event([], usage=_usage(done, body.n))
    except EngineError as failure:
        yield _error_event(failure)
    yield ServerSentEvent("[DONE]")

"""POST /tokenize, POST /detokenize, GET /tokenizer_info: the model's tokenizer over HTTP, in
vLLM's shapes, which lm-eval's ``local-completions`` reads as its remote tokenizer (it finds them
beside ``/v1/completions``' base URL).

Each run has its own vocabulary (GPT-2's, or GPT-2's first merges): ``model`` names the run,
as in a completion request (none: the default run's), and the run is loaded if it is not. vLLM's
``add_special_tokens`` is accepted and changes nothing (GPT-2 adds no special tokens).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from model.config import GPT2_VOCAB_SIZE
from model.tokenizer import END_OF_TEXT, Tokenizer
from service.auth import require_api_key
from service.dependencies import engine_of, reloader_of
from service.engine import INLINE_TOKENIZE_CHARS, Engine, NoModel
from service.errors import ApiError, error_responses
from service.limits import require_json
from service.reloader import Reloader
from service.schemas import ValidUnicode

router = APIRouter(
    tags=["tokenizer"],
    dependencies=[Depends(require_api_key)],
    responses=error_responses(401, 404, 503),
)
BODY_ERRORS = error_responses(400, 408, 413, 415, 422)
MODEL_FIELD = Field(None, description="the run whose tokenizer to use (default: the default run)")
TokenId = Annotated[int, Field(ge=0, lt=GPT2_VOCAB_SIZE)]


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = MODEL_FIELD
    prompt: Annotated[str, ValidUnicode] = Field(
        description='text; a literal "<|endoftext|>" is the end-of-text token (the vocabulary\'s '
        "last id: 50256 in GPT-2's), as in Hugging Face's GPT-2 tokenizer (a /v1/completions "
        "text prompt reads it as plain text)"
    )


class TokenizeResponse(BaseModel):
    count: int = Field(description="how many tokens")
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = MODEL_FIELD
    tokens: list[TokenId] = Field(
        description="token ids of the run's vocabulary (0 to vocab_size - 1; all of GPT-2's: "
        f"0 to {GPT2_VOCAB_SIZE - 1})"
    )


class DetokenizeResponse(BaseModel):
    prompt: str = Field(description="the text; bytes that are not UTF-8 become U+FFFD")


class TokenizerInfo(BaseModel):
    """A run's tokenizer as Hugging Face's tokenizer_config.json describes it (vLLM's answer),
    its name and the size of its vocabulary."""

    tokenizer_class: str = "GPT2Tokenizer"
    bos_token: str = END_OF_TEXT
    eos_token: str = END_OF_TEXT
    unk_token: str = END_OF_TEXT
    add_bos_token: bool = Field(False, description="no token is put before a text")
    vocabulary: str = Field(description="gpt2, or GPT-2's first merges (gpt2-8k, ...)")
    vocab_size: int = Field(description="tokens, <|endoftext|> (the last id) included")
    eos_token_id: int


async def _tokenizer(engine: Engine, reloader: Reloader, model: str | None) -> Tokenizer:
    run = await reloader.resolve(model)
    loaded = engine.models.get(run)
    if loaded is None:  # unloaded since it was resolved (another run took its place)
        raise NoModel(f"{run} is not loaded")
    return loaded.tokenizer


Engines = Annotated[Engine, Depends(engine_of)]
Reloaders = Annotated[Reloader, Depends(reloader_of)]


@router.post("/tokenize", dependencies=[Depends(require_json)], responses=BODY_ERRORS)
async def tokenize(body: TokenizeRequest, engine: Engines, reloader: Reloaders) -> TokenizeResponse:
    encode = (await _tokenizer(engine, reloader, body.model)).encode_with_special
    if len(body.prompt) <= INLINE_TOKENIZE_CHARS:
        tokens = encode(body.prompt)
    else:  # a text near the body limit takes tens of milliseconds: not on the event loop
        tokens = await asyncio.to_thread(encode, body.prompt)
    return TokenizeResponse(count=len(tokens), tokens=tokens)


@router.post("/detokenize", dependencies=[Depends(require_json)], responses=BODY_ERRORS)
async def detokenize(
    body: DetokenizeRequest, engine: Engines, reloader: Reloaders
) -> DetokenizeResponse:
    tokenizer = await _tokenizer(engine, reloader, body.model)
    for index, token in enumerate(body.tokens):
        if token >= tokenizer.n_vocab:
            raise ApiError(
                422,
                f"token id {token} is outside the vocabulary {tokenizer.name} "
                f"(ids 0 to {tokenizer.n_vocab - 1})",
                param=f"tokens.{index}",
            )
    return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))


@router.get("/tokenizer_info")
async def tokenizer_info(
    engine: Engines,
    reloader: Reloaders,
    model: Annotated[str | None, Query(description=MODEL_FIELD.description)] = None,
) -> TokenizerInfo:
    tokenizer = await _tokenizer(engine, reloader, model)
    return TokenizerInfo(
        vocabulary=tokenizer.name, vocab_size=tokenizer.n_vocab, eos_token_id=tokenizer.eot_id
    )

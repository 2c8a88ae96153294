"""POST /tokenize, POST /detokenize, GET /tokenizer_info: the model's tokenizer over HTTP, in
vLLM's shapes, which lm-eval's ``local-completions`` reads as its remote tokenizer (it finds them
beside ``/v1/completions``' base URL).

Every run shares GPT-2's vocabulary, so these take no ``model``; vLLM's ``model`` and
``add_special_tokens`` (GPT-2 adds no special tokens) are accepted and change nothing.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from model.config import GPT2_VOCAB_SIZE
from model.tokenizer import END_OF_TEXT, get_tokenizer
from service.auth import require_api_key
from service.engine import INLINE_TOKENIZE_CHARS
from service.errors import error_responses
from service.limits import require_json
from service.schemas import ValidUnicode

router = APIRouter(
    tags=["tokenizer"],
    dependencies=[Depends(require_api_key)],
    responses=error_responses(401),
)
BODY_ERRORS = error_responses(400, 408, 413, 415, 422)
TokenId = Annotated[int, Field(ge=0, lt=GPT2_VOCAB_SIZE)]


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: Annotated[str, ValidUnicode] = Field(
        description='text; a literal "<|endoftext|>" is the end-of-text token (id 50256), as in '
        "Hugging Face's GPT-2 tokenizer (a /v1/completions text prompt reads it as plain text)"
    )


class TokenizeResponse(BaseModel):
    count: int = Field(description="how many tokens")
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tokens: list[TokenId] = Field(description=f"GPT-2 token ids, 0 to {GPT2_VOCAB_SIZE - 1}")


class DetokenizeResponse(BaseModel):
    prompt: str = Field(description="the text; bytes that are not UTF-8 become U+FFFD")


class TokenizerInfo(BaseModel):
    """GPT-2's tokenizer as Hugging Face's tokenizer_config.json describes it (vLLM's answer),
    and the size of its vocabulary."""

    tokenizer_class: str = "GPT2Tokenizer"
    bos_token: str = END_OF_TEXT
    eos_token: str = END_OF_TEXT
    unk_token: str = END_OF_TEXT
    add_bos_token: bool = Field(False, description="no token is put before a text")
    vocab_size: int = GPT2_VOCAB_SIZE


@router.post("/tokenize", dependencies=[Depends(require_json)], responses=BODY_ERRORS)
async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
    encode = get_tokenizer().encode_with_special
    if len(body.prompt) <= INLINE_TOKENIZE_CHARS:
        tokens = encode(body.prompt)
    else:  # a text near the body limit takes tens of milliseconds: not on the event loop
        tokens = await asyncio.to_thread(encode, body.prompt)
    return TokenizeResponse(count=len(tokens), tokens=tokens)


@router.post("/detokenize", dependencies=[Depends(require_json)], responses=BODY_ERRORS)
async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
    return DetokenizeResponse(prompt=get_tokenizer().decode(body.tokens))


@router.get("/tokenizer_info")
async def tokenizer_info() -> TokenizerInfo:
    return TokenizerInfo()

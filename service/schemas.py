"""Request and response models of the generation API, shared by the routes and the tests.

``SamplingRequest`` declares the sampling fields every generation API shares (POST /generate
and OpenAI's /v1 completions and chat), each once with its bounds and description; the request
models derive from it and set only the defaults that differ. Pydantic checks what a request can
say about itself (types, ranges); ``SamplingRequest.sampling_params`` adds the limits this
deployment sets (MAX_NEW_TOKENS, MAX_STOP_STRINGS, MAX_LOGPROBS, MAX_N), and the engine checks
the prompt's length in tokens, since only the tokenizer knows it. Every refusal is a 422 naming
the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    model_validator,
)

from contract.settings import Settings
from model.generate import FinishReason, TokenLogprob
from model.sampling import (
    GREEDY_BELOW,
    MAX_SEED,
    STORY_TEMPERATURE,
    STORY_TOP_K,
    SamplingParams,
)
from model.tokenizer import Tokenizer
from service.engine import Finish, TextPiece
from service.errors import ApiError

# ---------------------------------------------------------------------------------------------
# Text a request sends


def valid_unicode(value: Any) -> Any:
    """``value`` (a text, or a list of texts and other things), if every text in it is Unicode.
    JSON can spell half of a UTF-16 pair (``"\\ud800"``), which is no character: it cannot be
    written back as UTF-8 (an echoed prompt's answer was a 500), and a tokenizer reads it only
    by replacing it."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError as error:
            code = ord(value[error.start])
            raise ValueError(
                f"a lone surrogate (U+{code:04X}) at character {error.start} is not text: "
                "send valid Unicode"
            ) from None
    elif isinstance(value, list):
        for index, item in enumerate(value):
            try:
                valid_unicode(item)
            except ValueError as error:
                raise ValueError(f"item {index}: {error}") from None
    return value


# Every request field that takes text a client wrote (prompts, stop strings, messages) uses it.
ValidUnicode = AfterValidator(valid_unicode)

# ---------------------------------------------------------------------------------------------
# The sampling fields every generation API shares

# The fields whose default differs by API: each type with its bounds and description, declared
# once here; the request models give the defaults.
Temperature = Annotated[
    float, Field(ge=0, description=f"below {GREEDY_BELOW:g} (0 included) is greedy decoding")
]
TopK = Annotated[
    int | None, Field(ge=0, description="keep the k most likely tokens; 0 or null: off")
]
Stream = Annotated[bool, Field(description="server-sent events; false: one JSON answer")]

# Request fields that mean the same in every API and go to SamplingParams as they are.
SAMPLING_KNOBS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
)


class SamplingRequest(BaseModel):
    """The run, sampling knobs, stop strings, seed, streaming and log-probabilities of a
    generation request. Its defaults are the model's plain distribution (OpenAI's, which /v1
    keeps); POST /generate sets the story defaults (model/sampling.py's) instead. The number of
    tokens to generate is each API's own field, passed to ``sampling_params`` by name."""

    model_config = ConfigDict(allow_inf_nan=False)

    model: str | None = Field(
        None,
        description="the run to answer with (GET /v1/models lists them; a `<run>/<checkpoint>` "
        "version picks its run); absent: the run that saved last",
    )
    temperature: Temperature = 1.0
    top_k: TopK = None
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    min_p: float = Field(
        0.0, ge=0, le=1, description="drop tokens less likely than min_p × the likeliest's"
    )
    repetition_penalty: float = Field(1.0, gt=0, description="> 1 discourages repeats")
    presence_penalty: float = Field(
        0.0, ge=-2, le=2, description="subtracted from every token already generated"
    )
    frequency_penalty: float = Field(
        0.0, ge=-2, le=2, description="subtracted once per time a token was generated"
    )
    stop: Annotated[str | list[str] | None, ValidUnicode] = Field(
        None,
        description="end before the first of these: one string or a list (at most "
        "MAX_STOP_STRINGS)",
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=MAX_SEED,
        description="replays the answer exactly; of n completions, the i-th uses a seed derived "
        "from it. At most 2**53 - 1 (JavaScript's largest exact integer), as are the seeds the "
        "service picks",
    )
    stream: Stream = False
    logprobs: int | None = Field(
        None,
        ge=0,
        description="each token's log-probability under the model (before the sampling knobs), "
        "with this many likeliest alternatives (at most MAX_LOGPROBS)",
    )

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else self.stop or []

    def sampling_params(
        self,
        settings: Settings,
        *,
        max_new_tokens: tuple[str, int],
        logprobs: tuple[str, int | None],
        prompt_logprobs: int | None = None,
        n: int = 1,
    ) -> SamplingParams:
        """SamplingParams from this request, within this deployment's limits: the one place
        they are checked. ``max_new_tokens`` and ``logprobs`` are (the field's name in the
        request, its value): /generate calls the first ``max_new_tokens``, OpenAI's
        ``max_tokens``, and chat's the second ``top_logprobs``; ``n`` is OpenAI's choices per
        prompt."""
        if n > settings.max_n:
            message = f"n: {n} is above this server's limit of {settings.max_n} (MAX_N)"
            raise ApiError(422, message, param="n")
        field, requested = max_new_tokens
        if requested > settings.max_new_tokens:
            raise ApiError(
                422,
                f"{field}: {requested} is above this server's limit of {settings.max_new_tokens} "
                "(MAX_NEW_TOKENS)",
                param=field,
            )
        stop = self.stop_strings
        if len(stop) > settings.max_stop_strings:
            raise ApiError(
                422,
                f"stop: at most {settings.max_stop_strings} stop strings (MAX_STOP_STRINGS), "
                f"got {len(stop)}",
                param="stop",
            )
        if any(not text for text in stop):
            raise ApiError(422, "stop: stop strings must not be empty", param="stop")
        field, alternatives = logprobs
        if alternatives is not None and alternatives > settings.max_logprobs:
            raise ApiError(
                422,
                f"{field}: {alternatives} is above this server's limit of "
                f"{settings.max_logprobs} (MAX_LOGPROBS)",
                param=field,
            )
        return SamplingParams(
            max_new_tokens=requested,
            stop=tuple(stop),
            logprobs=alternatives,
            prompt_logprobs=prompt_logprobs,
            **{knob: getattr(self, knob) for knob in SAMPLING_KNOBS},
        )


# ---------------------------------------------------------------------------------------------
# POST /generate


class GenerateRequest(SamplingRequest):
    """A story: ``SamplingRequest``'s fields with the story defaults (model/sampling.py's, which
    `slm generate` and the playground use too), streamed unless ``stream`` is false."""

    model_config = ConfigDict(extra="forbid")

    prompt: Annotated[str, ValidUnicode] = Field(
        "",
        description="the story's beginning; empty starts a new story. At most MAX_PROMPT_TOKENS "
        "tokens (422 above); of a prompt longer than the model's context, the model reads the "
        "last block_size tokens (the answer says prompt_truncated)",
    )
    max_new_tokens: int = Field(
        200,
        ge=1,
        validation_alias=AliasChoices("max_new_tokens", "max_tokens"),
        description="at most MAX_NEW_TOKENS; `max_tokens`, the /v1 APIs' name, is read as this "
        "field too (send one of the two)",
    )
    temperature: Temperature = STORY_TEMPERATURE
    top_k: TopK = STORY_TOP_K
    stream: Stream = True
    # Which name the request gave max_new_tokens, for the 422 that refuses it.
    _tokens_field: str = PrivateAttr("max_new_tokens")

    @model_validator(mode="wrap")
    @classmethod
    def _note_the_token_counts_name(
        cls, data: Any, handler: ModelWrapValidatorHandler[GenerateRequest]
    ) -> GenerateRequest:
        # Both names in one request: extra="forbid" refuses the second, max_tokens.
        request = handler(data)
        if isinstance(data, dict) and "max_tokens" in data:
            request._tokens_field = "max_tokens"
        return request

    def sampling(self, settings: Settings) -> SamplingParams:
        return self.sampling_params(
            settings,
            max_new_tokens=(self._tokens_field, self.max_new_tokens),
            logprobs=("logprobs", self.logprobs),
        )


class Alternative(BaseModel):
    token_id: int
    token: str = Field(description="its text (a lone byte of a longer character shows as �)")
    logprob: float


class Logprob(Alternative):
    top: list[Alternative] = Field(description="the likeliest tokens at this position")


def logprob_of(score: TokenLogprob, tokenizer: Tokenizer) -> Logprob:
    return Logprob(
        token_id=score.token_id,
        token=tokenizer.token_text(score.token_id),
        logprob=score.logprob,
        top=[
            Alternative(token_id=token, token=tokenizer.token_text(token), logprob=logprob)
            for token, logprob in score.top
        ],
    )


class Piece(BaseModel):
    """One streamed event: text released by the tokens listed (text may be empty while a
    character or a possible stop string is held back), with their log-probabilities when the
    request asked for them."""

    text: str
    token_ids: list[int]
    logprobs: list[Logprob] | None = None

    @classmethod
    def of(cls, piece: TextPiece, tokenizer: Tokenizer) -> Piece:
        logprobs = piece.logprobs
        return cls(
            text=piece.text,
            token_ids=piece.token_ids,
            logprobs=None if logprobs is None else [logprob_of(s, tokenizer) for s in logprobs],
        )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(BaseModel):
    queue_s: float = Field(description="arrival to joining the batch")
    time_to_first_token_s: float = Field(description="arrival to the first token")
    total_s: float = Field(description="arrival to the last token")
    tokens_per_s: float | None = Field(
        description="decode rate after the first token; null with fewer than two tokens"
    )


class Finished(BaseModel):
    """The last event of a stream: how the story ended and what it cost."""

    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    model: str = Field(description="the checkpoint version that wrote the story: <run>/<name>")
    seed: int = Field(description="send it back to replay the story")
    prompt_truncated: bool = Field(
        description="the prompt was longer than the model's context; its last tokens were kept"
    )

    @classmethod
    def of(cls, finish: Finish) -> Finished:
        return cls(**finished_fields(finish))


class GenerateResponse(Finished):
    """The answer to ``stream: false``: the same content as a stream, in one JSON."""

    text: str
    token_ids: list[int]
    logprobs: list[Logprob] | None = None


def usage_of(finish: Finish) -> Usage:
    return Usage(
        prompt_tokens=finish.prompt_tokens,
        completion_tokens=finish.completion_tokens,
        total_tokens=finish.prompt_tokens + finish.completion_tokens,
    )


def finished_fields(finish: Finish) -> dict[str, object]:
    """A Finish record as the fields of ``Finished``."""
    return {
        "finish_reason": finish.reason,
        "usage": usage_of(finish),
        "timings": Timings(
            queue_s=finish.queue_s,
            time_to_first_token_s=finish.time_to_first_token_s,
            total_s=finish.total_s,
            tokens_per_s=finish.tokens_per_s,
        ),
        "model": finish.version,
        "seed": finish.seed,
        "prompt_truncated": finish.prompt_truncated,
    }


# ---------------------------------------------------------------------------------------------
# Health and admin


class Readiness(BaseModel):
    ready: Literal[True] = True
    # Run names are the key's when API_KEY is set: a client without it reads only `ready`.
    model: str | None = Field(None, description="the version serving new requests")
    step: int | None = Field(None, description="its training step")


ReloadOutcome = Literal["loaded", "unchanged", "rejected", "no_checkpoint"]


class ReloadReport(BaseModel):
    outcome: ReloadOutcome
    model: str | None = Field(description="the version serving new requests after the check")
    message: str

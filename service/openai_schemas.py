"""The OpenAI-compatible API's requests and answers: legacy completions (the shape lm-eval's
``local-completions`` and vLLM speak, with ``echo``, ``logprobs``, token-id prompts and ``n``),
chat completions and the model list.

Fields OpenAI defines that this model cannot honour (``best_of``, ``logit_bias``, ``user``...)
are ignored, as other OpenAI-compatible servers do, so clients written for OpenAI keep working;
``top_k``, ``min_p`` and ``repetition_penalty`` are extras, as in vLLM and llama.cpp's server.
Log-probabilities are the model's own distribution (fp32), before temperature, penalties and
filters change what is drawn.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationInfo, field_validator

from contract.settings import Settings
from model.sampling import SamplingParams
from service.schemas import SamplingRequest, Usage, ValidUnicode, valid_unicode


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAISampling(SamplingRequest):
    """What completions and chat completions share: ``SamplingRequest``'s fields with OpenAI's
    defaults (temperature 1, no top-k, no stream), n and stream options."""

    model_config = ConfigDict(extra="ignore")

    n: int = Field(1, ge=1, description="completions per prompt, at most MAX_N")
    stream_options: StreamOptions | None = None

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_a_stream(
        cls, options: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("only allowed with stream: true")
        return options

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


# ---------------------------------------------------------------------------------------------
# POST /v1/completions

TokenIds = Annotated[list[NonNegativeInt], Field(min_length=1)]


class CompletionRequest(OpenAISampling):
    """OpenAI's legacy completions request, as vLLM answers it."""

    prompt: Annotated[str | list[str] | TokenIds | list[TokenIds], ValidUnicode] = Field(
        "",
        description="a text, a list of texts, a list of token ids, or a list of such lists: "
        "one completion (n with n) per prompt, indexed in order",
    )
    echo: bool = Field(False, description="the prompt's text (and logprobs) before the answer")
    max_tokens: int = Field(16, ge=0, description="OpenAI's default is 16; 0 needs echo")

    @field_validator("prompt")
    @classmethod
    def _not_an_empty_list(cls, prompt: object) -> object:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("an empty list holds no prompt")
        return prompt

    @field_validator("max_tokens")
    @classmethod
    def _zero_needs_echo(cls, max_tokens: int, info: ValidationInfo) -> int:
        if max_tokens == 0 and not info.data.get("echo"):
            raise ValueError(
                "0 generates nothing; send echo: true (with logprobs) to score the prompt"
            )
        return max_tokens

    @property
    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(token, int) for token in prompt):
            return [prompt]  # one prompt as token ids
        return list(prompt)

    def sampling(self, settings: Settings) -> SamplingParams:
        return self.sampling_params(
            settings,
            max_new_tokens=("max_tokens", self.max_tokens),
            logprobs=("logprobs", self.logprobs),
            prompt_logprobs=self.logprobs if self.echo else None,
            n=self.n,
        )


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs: one entry per token (with echo, the prompt's come first, the
    very first without a log-probability, nothing preceding it)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list, description="where each token starts")


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str = Field(description="the checkpoint version that answered: <run>/<checkpoint>")
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------------------------------------
# POST /v1/chat/completions


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    @field_validator("content")
    @classmethod
    def _content_is_unicode(
        cls, content: str | list[TextPart] | None
    ) -> str | list[TextPart] | None:
        valid_unicode([part.text for part in content] if isinstance(content, list) else content)
        return content

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(OpenAISampling):
    """OpenAI's chat request. A story model has no chat template: the messages' texts are
    joined with newlines, in order, and the model continues that text."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI; still read")
    max_completion_tokens: int | None = Field(None, ge=1, description="default 200")
    logprobs: bool = False  # chat's is a switch: top_logprobs counts the alternatives
    top_logprobs: int | None = Field(None, ge=0, description="needs logprobs: true")

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("only allowed with logprobs: true")
        return top

    @property
    def prompt(self) -> str:
        return "\n".join(message.text for message in self.messages)

    def sampling(self, settings: Settings) -> SamplingParams:
        field, limit = "max_completion_tokens", self.max_completion_tokens
        if limit is None and self.max_tokens is not None:
            field, limit = "max_tokens", self.max_tokens
        return self.sampling_params(
            settings,
            max_new_tokens=(field, 200 if limit is None else limit),
            logprobs=("top_logprobs", (self.top_logprobs or 0) if self.logprobs else None),
            n=self.n,
        )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------------------------------------
# GET /v1/models


class ModelCard(BaseModel):
    id: str = Field(description="the run's name: what `model` in a request names")
    object: Literal["model"] = "model"
    created: int = Field(description="when its latest checkpoint was written (Unix time)")
    owned_by: str = "slm"
    version: str = Field(description="its latest checkpoint: <run>/<checkpoint>")
    loaded: bool = Field(description="in memory now (at most MAX_LOADED_MODELS runs are)")
    val_loss: float | None = Field(
        default=None,
        description="its latest checkpoint's val loss, from the checkpoint's metadata (null when "
        "the checkpoint recorded none); per token, so comparable within one vocabulary only",
    )
    val_bits_per_byte: float | None = Field(
        default=None,
        description="the same evaluation in bits per byte of text: comparable across vocabularies",
    )
    vocabulary: str | None = Field(
        default=None, description="its tokenizer: gpt2, or GPT-2's first merges (gpt2-8k, ...)"
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

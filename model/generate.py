"""KV-cached generation: prefill a prompt, then one cheap decode step per token for a whole batch.

``BatchGenerator`` owns a model and a ``KVCache`` whose rows are the sequences being decoded.
``add`` prefills a new prompt into a free row and returns its first token right away (time to
first token is one prefill); ``step`` decodes one token for every running sequence in a single
forward; finished sequences leave the batch and newcomers join between steps. The inference
service drives it request by request; ``generate`` below drives it for one prompt.

The context window: GPT-2 learns absolute positions, so a sequence cannot grow past block_size
and the cache cannot simply drop its oldest entries (every cached key was computed at its old
position). When a sequence fills the window, the oldest quarter is dropped and the remaining
three quarters are re-encoded from position 0 (one prefill every block_size/4 tokens), so a
story can be longer than the context. A prompt longer than the window keeps its last block_size
tokens (``Sequence.prompt_truncated`` says so).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from model.cache import KVCache
from model.gpt import GPT
from model.quantize import quantize_int8
from model.sampling import SamplingParams, new_generator, sample_token
from model.tokenizer import StreamDecoder, Tokenizer, get_tokenizer

FinishReason = Literal["stop", "length", "end_of_text"]
QUANTIZATIONS = ("none", "int8")


class StopStrings:
    """Releases streamed text, holding back any tail that could still become a stop string,
    so a stop string is never sent, even in part."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to release, whether a stop string was reached)."""
        if not self._stops:
            return text, False
        held = self._held + text
        hits = [index for index in (held.find(stop) for stop in self._stops) if index >= 0]
        if hits:
            self._held = ""
            return held[: min(hits)], True
        keep = max((self._partial_match(held, stop) for stop in self._stops), default=0)
        self._held = held[len(held) - keep :]
        return held[: len(held) - keep], False

    @staticmethod
    def _partial_match(text: str, stop: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
        for length in range(min(len(text), len(stop) - 1), 0, -1):
            if text.endswith(stop[:length]):
                return length
        return 0

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


@dataclass
class Sequence:
    """One story being written: its tokens, sampling state and streamed text."""

    id: int
    params: SamplingParams
    seed: int
    tokens: list[int]  # prompt then generated; the last one is pending (not yet in the cache)
    prompt_length: int
    prompt_truncated: bool
    context_start: int  # tokens[context_start:] are the model's current window
    generator: torch.Generator
    decoder: StreamDecoder
    stops: StopStrings
    finish_reason: FinishReason | None = None
    text: list[str] = field(default_factory=list)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_length :]


@dataclass(frozen=True)
class TokenEvent:
    """What one sequence produced in one step: a token and the text it released (possibly "",
    while a multi-byte character or a possible stop string is held back). ``token_id`` is None
    when the step produced ``<|endoftext|>``, which is never part of the story."""

    sequence_id: int
    token_id: int | None
    text: str
    finish_reason: FinishReason | None


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: FinishReason
    seed: int
    prompt_truncated: bool


class BatchGenerator:
    """Decodes up to ``max_batch`` sequences together on one KV cache.

    ``use_cache=False`` recomputes the whole window for every token (the reference that cached
    decoding is tested and benchmarked against). ``quantization="int8"`` runs int8 linear layers
    on the CPU.
    """

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer | None = None,
        max_batch: int = 1,
        use_cache: bool = True,
        quantization: str = "none",
    ) -> None:
        if model.training:
            raise ValueError("call model.eval() before generating (dropout would be active)")
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        self.config = model.config
        self.tokenizer = tokenizer or get_tokenizer()
        self.use_cache = use_cache
        parameter = next(model.parameters())
        self.device = parameter.device
        if quantization == "int8":
            self.model = quantize_int8(model)
            self._head = self.model.lm_head
            self.device = torch.device("cpu")
        else:
            self.model = model
            # Decoding reads the whole output matrix (most of the weights) for every token;
            # stored transposed and contiguous, the (B × n_embd) @ (n_embd × vocab) product runs
            # faster on a CPU than a product with the transpose of the tied embedding.
            head_t = model.lm_head.weight.detach().t().contiguous()
            self._head = lambda hidden: hidden @ head_t
        self.cache = KVCache(self.config, max_batch, device=self.device, dtype=parameter.dtype)
        self.window = self.config.block_size
        self.keep_on_slide = max(1, self.window * 3 // 4)
        self.rows: list[Sequence] = []  # row i of the cache holds rows[i]
        self._next_id = 0

    @property
    def free_rows(self) -> int:
        return self.cache.max_batch - len(self.rows)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt text to ids; an empty prompt starts from ``<|endoftext|>``, as a new story
        does in the training data."""
        return self.tokenizer.encode(prompt) or [self.tokenizer.eot_id]

    @torch.inference_mode()
    def add(self, prompt: list[int], params: SamplingParams) -> tuple[Sequence, TokenEvent]:
        """Prefill ``prompt`` into a free row and sample the first new token."""
        if not self.free_rows:
            raise RuntimeError("the batch is full; wait for a sequence to finish")
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        if any(not 0 <= token < self.config.vocab_size for token in prompt):
            raise ValueError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        generator, seed = new_generator(params.seed, self.device)
        context_start = max(0, len(prompt) - self.window)
        sequence = Sequence(
            id=self._next_id,
            params=params,
            seed=seed,
            tokens=list(prompt),
            prompt_length=len(prompt),
            prompt_truncated=context_start > 0,
            context_start=context_start,
            generator=generator,
            decoder=self.tokenizer.stream_decoder(),
            stops=StopStrings(params.stop),
        )
        self._next_id += 1
        row = len(self.rows)
        try:
            hidden = self._prefill(row, prompt[context_start:])
            event = self._accept(sequence, self._sample(self._head(hidden), [sequence])[0])
        except BaseException:
            self.cache.clear_row(row)  # the row stays free for the next sequence
            raise
        if sequence.finish_reason is None:
            self.rows.append(sequence)
        else:
            self.cache.clear_row(row)
        return sequence, event

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Decode one token for every running sequence; finished ones leave the batch."""
        if not self.rows:
            return []
        for row, sequence in enumerate(self.rows):
            if len(sequence.tokens) - sequence.context_start > self.window:
                self._slide(row, sequence)
        if self.use_cache:
            pending = torch.tensor([[s.tokens[-1]] for s in self.rows], device=self.device)
            hidden = self.model.forward_cached(pending, self.cache.decode(len(self.rows)))
        else:
            hidden = torch.cat([self._full_forward(s.tokens[s.context_start :]) for s in self.rows])
        tokens = self._sample(self._head(hidden), self.rows)
        events = [
            self._accept(sequence, token) for sequence, token in zip(self.rows, tokens, strict=True)
        ]
        for sequence in [s for s in self.rows if s.finish_reason is not None]:
            self.remove(sequence.id)
        return events

    def remove(self, sequence_id: int) -> None:
        """Drop a sequence from the batch (finished, or its client went away)."""
        row = next((i for i, s in enumerate(self.rows) if s.id == sequence_id), None)
        if row is None:
            raise KeyError(f"no running sequence with id {sequence_id}")
        last = len(self.rows) - 1
        if row != last and self.use_cache:
            self.cache.move_row(last, row)
        self.cache.clear_row(last)
        self.rows[row] = self.rows[last]
        self.rows.pop()

    def _prefill(self, row: int, context: list[int]) -> Tensor:
        if not self.use_cache:
            return self._full_forward(context)
        idx = torch.tensor([context], device=self.device)
        return self.model.forward_cached(idx, self.cache.prefill(row, len(context)))

    def _full_forward(self, context: list[int]) -> Tensor:
        idx = torch.tensor([context], device=self.device)
        return self.model.hidden_states(idx)[:, -1]

    def _slide(self, row: int, sequence: Sequence) -> None:
        """Drop the oldest quarter of a full window and re-encode the rest from position 0."""
        sequence.context_start = len(sequence.tokens) - self.keep_on_slide
        if self.use_cache:
            self._prefill(row, sequence.tokens[sequence.context_start : -1])

    def _sample(self, logits: Tensor, sequences: list[Sequence]) -> list[int]:
        plain_greedy = [s.params.greedy and s.params.repetition_penalty == 1.0 for s in sequences]
        # Greedy rows without a penalty share one batched max (several times faster than
        # argmax on a CPU); every other row samples with its own generator, so its draws never
        # depend on its neighbours.
        if any(plain_greedy):
            picks = logits.max(dim=-1).indices
        else:
            picks = torch.empty(len(sequences), dtype=torch.long, device=logits.device)
        for row, sequence in enumerate(sequences):
            if plain_greedy[row]:
                continue
            previous = None
            if sequence.params.repetition_penalty != 1.0:
                previous = torch.tensor(sequence.tokens, device=logits.device)
            picks[row] = sample_token(logits[row], sequence.params, sequence.generator, previous)
        return picks.tolist()  # one device sync for the whole batch

    def _accept(self, sequence: Sequence, token: int) -> TokenEvent:
        """Record a sampled token; work out the text it releases and whether the story ends."""
        token_id: int | None = None
        text, reason = "", "end_of_text"
        if token != self.tokenizer.eot_id:  # <|endoftext|> is never part of the story
            token_id = token
            sequence.tokens.append(token)
            text, stopped = sequence.stops.push(sequence.decoder.push(token))
            if stopped:
                reason = "stop"
            elif len(sequence.generated) >= sequence.params.max_new_tokens:
                reason = "length"
            else:
                reason = None
        if reason in ("end_of_text", "length"):
            # Release what was held back: an incomplete character, or the start of a stop
            # string that will now never complete (unless the flushed bytes complete it).
            tail, stopped = sequence.stops.push(sequence.decoder.flush())
            text += tail if stopped else tail + sequence.stops.flush()
            reason = "stop" if stopped else reason
        sequence.finish_reason = reason
        sequence.text.append(text)
        return TokenEvent(sequence.id, token_id, text, reason)


def generate(
    model: GPT,
    prompt: str,
    params: SamplingParams,
    tokenizer: Tokenizer | None = None,
    quantization: str = "none",
) -> Iterator[TokenEvent]:
    """Stream one story: a ``TokenEvent`` per token, the last one carrying the finish reason."""
    generator = BatchGenerator(model, tokenizer, quantization=quantization)
    _, event = generator.add(generator.encode_prompt(prompt), params)
    yield event
    while generator.rows:
        yield from generator.step()


def complete(
    model: GPT, prompt: str, params: SamplingParams, tokenizer: Tokenizer | None = None
) -> GenerationResult:
    """Generate one story to the end and return it whole."""
    generator = BatchGenerator(model, tokenizer)
    sequence, _ = generator.add(generator.encode_prompt(prompt), params)
    while generator.rows:
        generator.step()
    assert sequence.finish_reason is not None
    return GenerationResult(
        text="".join(sequence.text),
        token_ids=sequence.generated,
        prompt_tokens=sequence.prompt_length,
        finish_reason=sequence.finish_reason,
        seed=sequence.seed,
        prompt_truncated=sequence.prompt_truncated,
    )

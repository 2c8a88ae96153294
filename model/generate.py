"""KV-cached generation: prefill prompts in batches, then one cheap decode step per token for a
whole batch.

``BatchGenerator`` owns a model, a ``KVCache`` and a ``BatchSampler`` whose rows are the
sequences in flight. ``add`` queues a prompt; each ``step`` is one iteration of the batch: the
sequences waiting for their prefill are encoded together, right-padded, in forwards of at most
``prefill_tokens`` tokens (a long prompt takes several steps, so it never freezes the stories
already running for more than one such forward), the running sequences decode one token each,
and the first tokens of the newly encoded prompts are sampled with everyone else's. Finished
sequences leave between steps. The inference service drives it; ``generate`` below drives it for
one prompt.

Rows are kept in order: ``rows[:decoding]`` are decoding, the rest wait for (the rest of) their
prefill, first come first served.

Log-probabilities (``SamplingParams.logprobs`` / ``prompt_logprobs``) are those of the model's
own distribution, in fp32, before the sampling knobs: a drawn token's come from the logits it
was drawn from; a prompt's from the prefill's activations at every position (so scoring a text
costs its prefill plus the output projection at each position: ``max_new_tokens=0`` stops
there).

The context window: GPT-2 learns absolute positions, so a sequence cannot grow past block_size
and the cache cannot simply drop its oldest entries (every cached key was computed at its old
position). When a sequence fills the window, it keeps its newest three quarters and goes back to
the front of the prefill queue, to be re-encoded from position 0 with whoever else is waiting
(one prefill every block_size/4 tokens), so a story can be longer than the context. A model with
rotary positions sees only differences of positions: its full window drops its oldest quarter in
the cache itself (``KVCache.drop_oldest``) and decodes on at the next position, re-encoding
nothing, so a long story costs the same per token as a short one. A prompt longer than the
window keeps its last block_size tokens (``Sequence.prompt_truncated`` says so).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from model.cache import FixedStep, KVCache
from model.decode_step import (
    COMPILE_MODES,
    COMPILED_STEPS,
    CompileMode,
    CudaGraphStep,
    StepFunction,
    StepShape,
    bucket_for,
    bucket_sizes,
    span_sizes,
    step_weights,
)
from model.device import use_torch_threads
from model.gpt import GPT
from model.head import OutputHead
from model.loss import token_log_probs
from model.quantize import quantize_int8
from model.sampling import BatchSampler, SamplingParams, resolve_seed
from model.tokenizer import StreamDecoder, get_tokenizer

FinishReason = Literal["stop", "length", "end_of_text"]
# With no story decoding, no stream's next token waits on a prefill: it may take this many times
# prefill_tokens, so a burst of prompts (texts to score) goes through in fewer, larger forwards.
IDLE_PREFILL_FACTOR = 4
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


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model's own distribution (fp32, before temperature,
    penalties and filters), with the likeliest tokens at that position when asked for."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability), likeliest first


def token_logprobs(logits: Tensor, chosen: Tensor, top: int) -> list[TokenLogprob]:
    """Log-probabilities of ``chosen`` (N,) under ``logits`` (N, vocab), each with the ``top``
    likeliest tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
    ids = chosen.tolist()
    if not top:
        return [TokenLogprob(t, p) for t, p in zip(ids, picked, strict=True)]
    values, tokens = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
    return [
        TokenLogprob(t, p, tuple(zip(row_tokens, row_values, strict=True)))
        for t, p, row_tokens, row_values in zip(
            ids, picked, tokens.tolist(), values.tolist(), strict=True
        )
    ]


def scored_tokens(hidden: Tensor, weight: Tensor, chosen: Tensor, top: int) -> list[TokenLogprob]:
    """What ``token_logprobs`` gives for the logits ``hidden @ weight.T``, without ever holding
    them whole (``model.loss.token_log_probs``): how a prompt is scored."""
    picked, best_tokens, best_values = token_log_probs(hidden, weight, chosen, top)
    return [
        TokenLogprob(token, logprob, tuple(zip(alternatives, values, strict=True)))
        for token, logprob, alternatives, values in zip(
            chosen.tolist(),
            picked.tolist(),
            best_tokens.tolist(),
            best_values.tolist(),
            strict=True,
        )
    ]


@dataclass
class Sequence:
    """One story being written: its tokens, sampling parameters and streamed text."""

    id: int
    params: SamplingParams
    seed: int
    tokens: list[int]  # prompt then generated; while decoding, the last one is not yet cached
    prompt_length: int
    prompt_truncated: bool
    context_start: int  # tokens[context_start:] are the model's current window
    decoder: StreamDecoder
    stops: StopStrings
    encoded: int = 0  # how much of the window its prefill has encoded so far
    finish_reason: FinishReason | None = None
    text: list[str] = field(default_factory=list)
    # With params.prompt_logprobs: one per prompt token, the first None (nothing precedes it).
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)

    @property
    def scoring(self) -> bool:
        """Whether its prefill still has prompt tokens to score."""
        return (
            self.params.prompt_logprobs is not None
            and self.context_start == 0
            and len(self.prompt_logprobs) < self.prompt_length
        )

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_length :]

    @property
    def window(self) -> list[int]:
        return self.tokens[self.context_start :]


@dataclass(frozen=True)
class TokenEvent:
    """What one sequence produced in one step: a token and the text it released (possibly "",
    while a multi-byte character or a possible stop string is held back). ``token_id`` is None
    when the step produced ``<|endoftext|>``, which is never part of the story."""

    sequence_id: int
    token_id: int | None
    text: str
    finish_reason: FinishReason | None
    # With params.logprobs: the drawn token's, <|endoftext|> included (scoring clients count
    # on one entry per token drawn, as vLLM gives them).
    logprob: TokenLogprob | None = None


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
    on the CPU. ``prefill_tokens`` bounds one prefill forward (prompts × padded length).

    ``decode_step`` says how a decode step runs: ``"off"`` plans each at the shapes it needs
    (``KVCache.extend``); ``"eager"`` runs it at a bucket's fixed shape (``model.decode_step``);
    ``"compiled"`` too, compiled in the background, each bucket eager until its compiled step
    is ready (int8 layers are not compiled: with them it means ``"off"``).

    ``threads``: the torch threads every ``step`` runs on, whichever thread calls it (the
    caller's count is restored after); by default the constructing thread's count. A compiled
    step is specialised to its count, so the generator, not its caller, owns it.
    """

    def __init__(
        self,
        model: GPT,
        max_batch: int = 1,
        use_cache: bool = True,
        quantization: str = "none",
        prefill_tokens: int = 256,
        decode_step: CompileMode = "off",
        threads: int | None = None,
    ) -> None:
        if model.training:
            raise ValueError("call model.eval() before generating (dropout would be active)")
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be at least 1, got {prefill_tokens}")
        if decode_step not in COMPILE_MODES:
            raise ValueError(f"decode_step must be one of {COMPILE_MODES}, got {decode_step!r}")
        self.config = model.config
        self.threads = threads or torch.get_num_threads()
        self.tokenizer = get_tokenizer(model.config.vocab_size)  # the vocabulary it learned
        self.use_cache = use_cache
        self.prefill_tokens = prefill_tokens
        parameter = next(model.parameters())
        self.device = parameter.device
        self._head_weight: Tensor | None = None  # for scoring prompts a vocabulary slice at a time
        self._buckets = bucket_sizes(max_batch)
        if quantization == "int8":
            self.model = quantize_int8(model)
            self._head = self.model.lm_head
            self.device = torch.device("cpu")
        else:
            self.model = model
            self._head_weight = model.output_weight.detach()
            self._head = OutputHead(self._head_weight, self._buckets)
        self.cache = KVCache(self.config, max_batch, device=self.device, dtype=parameter.dtype)
        self.sampler = BatchSampler(max_batch, self.config.vocab_size, self.device)
        if quantization == "int8" and decode_step == "compiled":
            decode_step = "off"
        self.decode_step = decode_step
        self._spans = span_sizes(self.cache.max_len)
        # Each bucket's step inputs (token ids, positions, slots), written in place every step.
        self._step_inputs = {
            bucket: torch.zeros((3, bucket), dtype=torch.long, device=self.device)
            for bucket in (self._buckets if decode_step != "off" else ())
        }
        self._step_shapes: dict[tuple[int, int], StepShape] = {}
        self._cuda_graphs: CudaGraphStep | None = None
        if decode_step == "compiled":
            # The whole cache's span first, for every bucket: with it, any step runs compiled.
            spans = (self._spans[-1], *self._spans[:-1])
            self._step_shapes = {
                (bucket, span): StepShape(
                    self.config,
                    parameter.dtype,
                    str(self.device),
                    tuple(self.cache.keys.shape),
                    bucket,
                    span,
                    self.cache.keys.is_inference(),
                    self.threads,
                )
                for span in spans
                for bucket in self._buckets
            }
            self._step_weights = step_weights(self.model)
            COMPILED_STEPS.warm(list(self._step_shapes.values()), self.model)
        self.window = self.config.block_size
        self.keep_on_slide = max(1, self.window * 3 // 4)
        self.rows: list[Sequence] = []  # row i of the cache and the sampler holds rows[i]
        self.decoding = 0  # rows[:decoding] decode; the rest wait for their prefill
        self._next_id = 0

    @property
    def free_rows(self) -> int:
        return self.cache.max_batch - len(self.rows)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt text to ids; an empty prompt starts from ``<|endoftext|>``, as a new story
        does in the training data."""
        return self.tokenizer.encode(prompt) or [self.tokenizer.eot_id]

    def add(self, prompt: list[int], params: SamplingParams) -> Sequence:
        """Queue ``prompt`` for prefill; its first token comes from a later ``step``."""
        if not self.free_rows:
            raise RuntimeError("the batch is full; wait for a sequence to finish")
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        if any(not 0 <= token < self.config.vocab_size for token in prompt):
            raise ValueError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        if params.prompt_logprobs is not None and len(prompt) > self.window:
            raise ValueError(
                f"scoring a prompt needs all of it in the model's context: {len(prompt)} tokens "
                f"is above its block_size of {self.window}"
            )
        context_start = max(0, len(prompt) - self.window)
        sequence = Sequence(
            id=self._next_id,
            params=params,
            seed=resolve_seed(params.seed),
            tokens=list(prompt),
            prompt_length=len(prompt),
            prompt_truncated=context_start > 0,
            context_start=context_start,
            decoder=self.tokenizer.stream_decoder(),
            stops=StopStrings(params.stop),
            prompt_logprobs=[None] if params.prompt_logprobs is not None else [],
        )
        self._next_id += 1
        row = len(self.rows)
        self.cache.clear_row(row)
        self.sampler.set_row(row, params, sequence.seed, sequence.tokens, [])
        self.rows.append(sequence)
        return sequence

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """One iteration: a bounded prefill for the sequences waiting, one decode step for the
        running ones, and a token for each of both; finished sequences leave the batch."""
        callers = use_torch_threads(self.threads)
        try:
            return self._step()
        finally:
            torch.set_num_threads(callers)

    def _step(self) -> list[TokenEvent]:
        decoding = self.decoding
        if self.use_cache:
            hidden = [self._decode_forward(decoding)] if decoding else []
            encoded = self._prefill_forward()
            if encoded is not None:
                hidden.append(encoded)
            if not hidden:
                return []
            sampled = decoding + (hidden[-1].shape[0] if encoded is not None else 0)
            states = torch.cat(hidden) if len(hidden) > 1 else hidden[0]
        else:  # the reference: every window from scratch, every prompt at once
            sampled = len(self.rows)
            if not sampled:
                return []
            states = torch.cat([self._full_forward(s.window) for s in self.rows])
        rows = slice(0, sampled)
        logits = self._head(states)
        tokens = self.sampler.sample(logits, rows)
        self.sampler.observe(rows, tokens)
        self.decoding = sampled
        logprobs = self._logprobs_of(logits, tokens)
        events = [
            self._accept(sequence, token, logprob)
            for sequence, token, logprob in zip(
                self.rows[:sampled], tokens.tolist(), logprobs, strict=True
            )
        ]
        for sequence in [s for s in self.rows[:sampled] if s.finish_reason is not None]:
            self.remove(sequence.id)
        for sequence in [s for s in self.rows[: self.decoding] if self._window_full(s)]:
            self._slide(sequence)
        return events

    def remove(self, sequence_id: int) -> None:
        """Drop a sequence from the batch (finished, or its client went away)."""
        row = next((i for i, s in enumerate(self.rows) if s.id == sequence_id), None)
        if row is None:
            raise KeyError(f"no running sequence with id {sequence_id}")
        if row < self.decoding:
            last = self.decoding - 1
            self._move_rows(slice(last, last + 1), row)  # the last decoding row fills the gap
            self.rows[row] = self.rows[last]
            row = last
            self.decoding -= 1
        self._move_rows(slice(row + 1, len(self.rows)), row)  # the prefill queue moves up
        del self.rows[row]
        self.cache.clear_row(len(self.rows))
        self.sampler.clear_row(len(self.rows))

    def close(self) -> None:
        """Drop every sequence and free the KV cache and the sampling state now, whoever still
        holds this generator, so that a replacement can take their memory. Nothing decodes here
        after this; ``config``, ``tokenizer``, ``window`` and ``encode_prompt`` still answer."""
        self.rows, self.decoding = [], 0
        dtype = self.cache.keys.dtype
        self.cache = KVCache(self.config, 0, device=self.device, dtype=dtype)
        self.sampler = BatchSampler(0, self.config.vocab_size, self.device)
        self._head = None  # with it goes the head's transposed copy of the output matrix
        self._cuda_graphs = None  # and the graphs captured on the old cache

    def _move_rows(self, source: slice, target: int) -> None:
        self.cache.move_rows(source, target)
        self.sampler.move_rows(source, target)

    def _logprobs_of(self, logits: Tensor, tokens: Tensor) -> list[TokenLogprob | None]:
        """The drawn tokens' log-probabilities, for the rows that asked for them."""
        scores: list[TokenLogprob | None] = [None] * len(tokens)
        rows = self.rows[: len(tokens)]
        asking = [i for i, sequence in enumerate(rows) if sequence.params.logprobs is not None]
        if not asking:
            return scores
        top = max(self.rows[i].params.logprobs or 0 for i in asking)
        index = torch.tensor(asking, device=logits.device)
        for row, score in zip(
            asking, token_logprobs(logits[index], tokens[index], top), strict=True
        ):
            wanted = self.rows[row].params.logprobs or 0
            scores[row] = TokenLogprob(score.token_id, score.logprob, score.top[:wanted])
        return scores

    def compiled_ready(self, timeout: float | None = None) -> bool:
        """Wait until every bucket's compiled step is ready (or failed, and runs eager); whether
        they all got there within ``timeout``. True at once when nothing compiles."""
        return COMPILED_STEPS.wait(list(self._step_shapes.values()), timeout)

    def _decode_forward(self, batch: int) -> Tensor:
        if self.decode_step == "off":
            pending = torch.tensor([[s.tokens[-1]] for s in self.rows[:batch]], device=self.device)
            return self.model.forward_cached(pending, self.cache.decode(batch))
        bucket = bucket_for(batch, self._buckets)
        slots, positions = self.cache.fixed_decode(batch, bucket)
        span = bucket_for(max(slots[:batch]) + 1, self._spans)
        tokens = [s.tokens[-1] for s in self.rows[:batch]] + [0] * (bucket - batch)
        inputs = self._step_inputs[bucket]
        inputs.copy_(torch.tensor([tokens, positions, slots]), non_blocking=True)
        keys, values = self.cache.keys, self.cache.values
        compiled, span = self._compiled_step(bucket, span)
        if compiled is None:
            plan = FixedStep(keys, values, inputs, span)
            hidden = self.model.forward_cached(inputs[0][:, None], plan)
        elif self.device.type == "cuda":
            if self._cuda_graphs is None:
                self._cuda_graphs = CudaGraphStep(self._step_weights, keys, values)
            hidden = self._cuda_graphs.run(compiled, inputs, span)
        else:
            hidden = compiled(self._step_weights, keys, values, inputs, span)
        return hidden[:batch]

    def _compiled_step(self, bucket: int, span: int) -> tuple[StepFunction | None, int]:
        """The compiled step for ``bucket`` over ``span`` slots, or, while that one compiles,
        over the shortest longer span ready (the mask keeps it exact); (None, span) if none is
        ready: the step runs eager."""
        for longer in self._spans[self._spans.index(span) :]:
            shape = self._step_shapes.get((bucket, longer))
            compiled = COMPILED_STEPS.get(shape) if shape is not None else None
            if compiled is not None:
                return compiled, longer
        return None, span

    def _prefill_forward(self) -> Tensor | None:
        """Encode the next chunk of the prefill queue: whole prompts, first come first served,
        while prompts × padded length stays within ``prefill_tokens`` (``IDLE_PREFILL_FACTOR``
        times that while nothing decodes); the first in the queue always advances, by at most
        that many tokens. Returns the final activations of the
        prompts now fully encoded (a prefix of the queue), or None."""
        budget = self.prefill_tokens * (1 if self.decoding else IDLE_PREFILL_FACTOR)
        chunks: list[tuple[Sequence, int]] = []
        width = 0
        for sequence in self.rows[self.decoding :]:
            remaining = len(sequence.window) - sequence.encoded
            if chunks and (len(chunks) + 1) * max(width, remaining) > budget:
                break
            count = min(remaining, budget)
            chunks.append((sequence, count))
            width = max(width, count)
        if not chunks:
            return None
        idx = torch.tensor(
            [
                s.window[s.encoded : s.encoded + count] + [0] * (width - count)
                for s, count in chunks
            ],
            device=self.device,
        )
        plan = self.cache.extend(
            self.decoding, [s.encoded for s, _ in chunks], [count for _, count in chunks]
        )
        hidden = self.model.hidden_states(idx, plan.positions, plan)
        for row, (sequence, count) in enumerate(chunks):
            if sequence.scoring:
                self._score_prompt(sequence, hidden[row, :count])
            sequence.encoded += count
        done = sum(s.encoded == len(s.window) for s, _ in chunks)
        return plan.last_hidden(hidden)[:done] if done else None

    def _score_prompt(self, sequence: Sequence, hidden: Tensor) -> None:
        """Log-probabilities of the prompt tokens that the chunk just encoded predicts: its
        activation at position i scores token i + 1 (the last one of the prompt's final chunk
        predicts the first generated token, scored when it is drawn)."""
        start = sequence.encoded + 1
        targets = sequence.tokens[start : min(start + len(hidden), sequence.prompt_length)]
        if not targets:
            return
        chosen = torch.tensor(targets, device=hidden.device)
        top = sequence.params.prompt_logprobs or 0
        hidden = hidden[: len(targets)]
        if self._head_weight is None:
            scores = token_logprobs(self._head(hidden), chosen, top)
        else:
            scores = scored_tokens(hidden, self._head_weight, chosen, top)
        sequence.prompt_logprobs.extend(scores)

    def _full_forward(self, context: list[int]) -> Tensor:
        idx = torch.tensor([context], device=self.device)
        return self.model.hidden_states(idx)[:, -1]

    def _window_full(self, sequence: Sequence) -> bool:
        return len(sequence.window) > self.window

    def _slide(self, sequence: Sequence) -> None:
        """Keep the newest three quarters of a full window: in the cache as they are with
        rotary positions, else by sending the sequence back to the front of the prefill queue,
        to be re-encoded from position 0."""
        row = self.rows.index(sequence)
        dropped = len(sequence.window) - 1 - self.keep_on_slide  # the last token is not cached
        if self.config.position == "rotary" and dropped > 0:
            if self.use_cache:
                self.cache.drop_oldest(row, dropped)
            sequence.context_start += dropped
            return
        last = self.decoding - 1
        if row != last:  # its cached keys are stale anyway: only the sampler state must survive
            self._move_rows(slice(last, last + 1), row)
            self.rows[row] = self.rows[last]
            self.rows[last] = sequence
            self.sampler.set_row(
                last, sequence.params, sequence.seed, sequence.tokens, sequence.generated
            )
        self.decoding -= 1
        sequence.context_start = len(sequence.tokens) - self.keep_on_slide
        sequence.encoded = 0
        self.cache.clear_row(last)

    def _accept(self, sequence: Sequence, token: int, logprob: TokenLogprob | None) -> TokenEvent:
        """Record a sampled token; work out the text it releases and whether the story ends."""
        token_id: int | None = None
        text, reason = "", "end_of_text"
        if sequence.params.max_new_tokens == 0:  # the prompt was all it wanted read
            reason = "length"
        elif token != self.tokenizer.eot_id:  # <|endoftext|> is never part of the story
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
        drawn = logprob if sequence.params.max_new_tokens else None
        return TokenEvent(sequence.id, token_id, text, reason, drawn)


def generate(
    model: GPT,
    prompt: str,
    params: SamplingParams,
    quantization: str = "none",
) -> Iterator[TokenEvent]:
    """Stream one story: a ``TokenEvent`` per token, the last one carrying the finish reason."""
    generator = BatchGenerator(model, quantization=quantization)
    generator.add(generator.encode_prompt(prompt), params)
    while generator.rows:
        yield from generator.step()


def complete(model: GPT, prompt: str, params: SamplingParams) -> GenerationResult:
    """Generate one story to the end and return it whole."""
    generator = BatchGenerator(model)
    sequence = generator.add(generator.encode_prompt(prompt), params)
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

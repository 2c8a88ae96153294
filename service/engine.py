"""The generation engine: one thread decodes every request together (continuous batching).

Routes ``submit`` a prompt and iterate the ``Generation`` they get back; the event loop never
runs the model. The decode thread loops: drop requests whose client left or whose deadline
passed, let waiting requests join the batch, then run one ``BatchGenerator.step`` per model: a
bounded, batched prefill for the newcomers and one decode step for everyone already running.
Each record goes back to the request's asyncio queue through ``loop.call_soon_threadsafe``.
The thread supervises its own loop: a failure outside a step (out of memory, a bug) ends every
request in the engine with ``Restarting`` and starts the loop again on rebuilt lanes.

The engine knows nothing of HTTP: it raises ``EngineError``s (no model, prompt too long, busy
with a retry-after, deadline passed, ...) and emits plain records (``TextPiece``s, then one
``Finish`` with usage and timings); the routes turn both into HTTP answers.

Runs and hot reload: every loaded model gets its own *lane* (a ``BatchGenerator`` with its KV
cache), and a request names the run it wants (``service.reloader`` loads runs and says which).
``install`` makes a new lane serve a run's new requests and ``unload`` stops a run taking any;
sequences already in an older lane keep decoding there until they finish, and the lane is
dropped once empty. So a stream always ends on the checkpoint it started with.

Scoring: a request may ask for log-probabilities of the tokens it draws and, with a prompt to
score (``echo`` in the OpenAI API), of its prompt's tokens, which the prefill computes from the
activations it produces anyway; a ``PromptScores`` record then comes before any text.

Batching does not change results: every draw is keyed on the request's seed and its token count
(``model.sampling`` explains why rounding differences between batch sizes do not move it), so a
seeded story is the same alone or among others, greedy or sampled (tested on a flat model).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from contract.capacity import kv_cache_rows
from contract.settings import Settings
from model.device import use_torch_threads
from model.generate import BatchGenerator, FinishReason, Sequence, TokenEvent, TokenLogprob
from model.sampling import SamplingParams
from model.tokenizer import Tokenizer
from service.loaded import LoadedModel
from service.metrics import (
    BATCH_SIZE,
    END_TO_END_LATENCY,
    ENGINE_RESTARTS,
    GENERATED_TOKENS,
    GENERATIONS,
    INTER_TOKEN_LATENCY,
    LOADED_MODEL,
    PROMPT_TOKENS,
    QUEUE_TIME,
    RUNNING,
    TIME_TO_FIRST_TOKEN,
    WAITING,
)

log = logging.getLogger("slm.engine")

# A slot frees as soon as any running story ends, which on this model is a matter of seconds.
RETRY_AFTER_S = 1
# A request's prompts shorter than this in all are tokenized on the event loop (tens of
# microseconds): a thread hop per request would cost more.
INLINE_TOKENIZE_CHARS = 4096
# After the decode loop itself fails, it starts again after 1 s, doubling to at most 30 s while
# it keeps failing within a minute of each start (a fault that lasts, as memory that stays short).
RESTART_DELAY_S = (1.0, 30.0)
STABLE_AFTER_S = 60.0


# --- what the engine raises -------------------------------------------------------------------


class EngineError(Exception):
    """Why the engine cannot serve a request, or cannot go on with it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NoModel(EngineError):
    """No checkpoint is loaded yet."""


class UnknownModel(EngineError):
    """A request named a run that has no checkpoint under CHECKPOINT_DIR."""


class PromptRejected(EngineError):
    """The prompt is too long for this server or the model, or holds ids this model's
    vocabulary lacks; or the request asks for more stories or tokens than one request may."""


class Busy(EngineError):
    """The batch and the waiting queue are full."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlinePassed(EngineError):
    """The story took longer than REQUEST_TIMEOUT_S."""


class GenerationFailed(EngineError):
    """A forward failed (the server log says why)."""


class ShuttingDown(EngineError):
    """The engine stopped while the request was in it."""


class Restarting(EngineError):
    """The decode loop failed (out of memory, a bug: the server log says) and starts again by
    itself; the request was in the engine then, or came before it was back."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(
            "the generation engine failed and is restarting; retry in "
            f"{retry_after_s:g} s (the server log says why)"
        )
        self.retry_after_s = max(1, round(retry_after_s))


# --- what the engine emits --------------------------------------------------------------------


@dataclass(frozen=True)
class PromptScores:
    """The prompt's tokens and their log-probabilities (the first None), sent before any text
    when the request asked for ``prompt_logprobs``."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


@dataclass(frozen=True)
class TextPiece:
    """Text released by the tokens listed (empty while a character or a possible stop string
    is held back), with their log-probabilities when the request asked for ``logprobs`` (the
    last piece's may end with ``<|endoftext|>``'s, which ends the story outside its text)."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Finish:
    """How a story ended and what it cost; the last record of every generation."""

    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    queue_s: float  # arrival to joining the batch
    time_to_first_token_s: float
    total_s: float
    tokens_per_s: float | None  # decode rate after the first token
    version: str  # the checkpoint that wrote the story
    seed: int
    prompt_truncated: bool


@dataclass(frozen=True)
class Story:
    """A whole generation at once: what the records would have said, joined."""

    text: str
    token_ids: list[int]
    finish: Finish
    logprobs: list[TokenLogprob] | None = None
    prompt: PromptScores | None = None


Record = PromptScores | TextPiece | Finish


def no_model_message(settings: Settings) -> str:
    # Clients read this: the folder is named by its setting, not by its path on the server.
    return (
        "no model loaded yet: there is no valid checkpoint under CHECKPOINT_DIR. "
        "Train one with `slm train --data DATA_DIR --out CHECKPOINT_DIR/RUN` or POST /train-jobs "
        "(or use the Train panel of the playground at /), "
        "or write an untrained one with `slm init --preset tiny --out CHECKPOINT_DIR/RUN`; "
        f"the service loads it within {settings.reload_poll_s:g} s."
    )


def decode_threads(configured: int) -> int:
    """Torch threads for decoding: DECODE_THREADS, or by default every core this process may use.
    Keeping one core for the event loop sounds right but measured worse: on 2 cores, 16 and 64
    streams ran at 618 and 831 tokens/s with one decode thread against 714 and 1236 with two
    (BENCHMARKS.md); the loop's work per token is small beside a decode step."""
    return configured or len(os.sched_getaffinity(0))


@dataclass(eq=False)  # identity: a request is itself, whatever it holds
class Generation:
    """One request in the engine. The route iterates ``records()``; everything else is written
    by the decode thread only (``cancelled`` aside, a flag the event loop sets)."""

    prompt: list[int]
    params: SamplingParams
    lane: Lane  # the run's lane when it arrived; a reload may hand it a newer one on admission
    arrived: float  # time.perf_counter()
    deadline: float
    engine: Engine
    loop: asyncio.AbstractEventLoop
    client: str = ""  # who asked (an address): waiting requests join the batch client by client
    queue: asyncio.Queue[Record | EngineError] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    sequence: Sequence | None = None
    version: str | None = None
    admitted: float | None = None
    first_event_at: float | None = None
    last_event_at: float | None = None
    pending_ids: list[int] = field(default_factory=list)  # tokens whose text is held back
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def tokenizer(self) -> Tokenizer:
        """The vocabulary of the run this story is written by: its records' ids are in it."""
        return self.lane.generator.tokenizer

    async def records(self) -> AsyncIterator[Record]:
        """The prompt's scores if asked for, text pieces, then one ``Finish`` (iterate once).
        Raises an EngineError when the deadline passes or a forward fails. Leaving early (the
        client went away) frees the request's slot at the next step."""
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, EngineError):
                    raise item
                yield item
                if isinstance(item, Finish):
                    return
        finally:
            self.engine.cancel(self)

    async def story(self) -> Story:
        """The whole story at once."""
        pieces: list[TextPiece] = []
        prompt: PromptScores | None = None
        async for item in self.records():
            if isinstance(item, PromptScores):
                prompt = item
            elif isinstance(item, TextPiece):
                pieces.append(item)
            else:
                logprobs = None
                if self.params.logprobs is not None:
                    logprobs = [score for piece in pieces for score in piece.logprobs or ()]
                return Story(
                    text="".join(piece.text for piece in pieces),
                    token_ids=[token for piece in pieces for token in piece.token_ids],
                    finish=item,
                    logprobs=logprobs,
                    prompt=prompt,
                )
        raise AssertionError("records() always ends with a Finish or raises")


@dataclass(eq=False)
class Lane:
    """One loaded model and the sequences in its batch (prefilling or decoding)."""

    loaded: LoadedModel
    generator: BatchGenerator
    running: dict[int, Generation] = field(default_factory=dict)  # by sequence id

    @property
    def run(self) -> str:
        return self.loaded.run


class Engine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._cond = threading.Condition()
        # Shared with the event loop, under _cond:
        self._serving: dict[str, Lane] = {}  # by run: the lane new requests for it join
        self._default: str | None = None  # the run that requests naming none get
        self._waiting: deque[Generation] = deque()
        self._accepted = 0  # waiting + running: what admission control counts
        self._stopping = False
        self._restart_in: float | None = None  # seconds, while the decode loop is down
        # The decode thread's own:
        self._lanes: list[Lane] = []
        self._joining: list[Generation] = []  # taken from _waiting, not yet in a lane
        self._turns: dict[str, int] = {}  # stories of each waiting client that joined the batch
        self._outbox: list[tuple[Generation, Record | EngineError]] = []
        self._thread = threading.Thread(target=self._run, name="slm-decode", daemon=True)

    # --- the event loop's side ---------------------------------------------------------------

    @property
    def model(self) -> LoadedModel | None:
        """The model serving new requests that name no run."""
        lane = self._serving.get(self._default) if self._default else None
        return lane.loaded if lane else None

    @property
    def models(self) -> dict[str, LoadedModel]:
        """Every run loaded, by name, with the model serving its new requests."""
        return {run: lane.loaded for run, lane in list(self._serving.items())}

    def start(self) -> None:
        self._thread.start()

    def check_running(self) -> None:
        """Raise Restarting while the decode loop is down after a failure."""
        restart_in = self._restart_in
        if restart_in is not None:
            raise Restarting(restart_in)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop decoding; requests still in the engine get ShuttingDown."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def install(self, loaded: LoadedModel, default: bool = True) -> None:
        """Serve new requests for ``loaded.run`` from ``loaded`` (and requests naming no run,
        with ``default``). Called from the reloader's worker thread: the lane's KV cache and
        transposed output matrix take a moment to build."""
        lane = Lane(loaded, self._generator(loaded))
        with self._cond:
            replaced = self._serving.get(loaded.run)
            self._serving[loaded.run] = lane
            if default or self._default is None:
                self._default = loaded.run
            self._cond.notify()
        if replaced is not None:
            _forget_loaded(replaced.loaded)
        LOADED_MODEL.labels(loaded.run, loaded.version, str(loaded.meta.step)).set(1)

    def unload(self, run: str) -> None:
        """Stop serving ``run``: new requests for it are refused (the reloader loads it again
        first); the stories already in its lane finish there, and the lane goes with the last
        of them."""
        with self._cond:
            lane = self._serving.pop(run, None)
        if lane is not None:
            _forget_loaded(lane.loaded)

    def _generator(self, loaded: LoadedModel) -> BatchGenerator:
        # As many rows as KV_CACHE_BYTES holds for this model (up to MAX_BATCH_SIZE): a long or
        # wide model decodes fewer stories at once instead of taking gigabytes.
        dtype = next(loaded.model.parameters()).dtype
        return BatchGenerator(
            loaded.model,
            max_batch=kv_cache_rows(loaded.model.config, dtype, self.settings),
            quantization=self.settings.quantization,
            prefill_tokens=self.settings.prefill_tokens,
            decode_step="compiled" if self.settings.compile_decode else "off",
            threads=decode_threads(self.settings.decode_threads),
        )

    async def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        run: str | None = None,
        client: str = "",
    ) -> Generation:
        """Queue a story; see ``submit_all``."""
        (generation,) = await self.submit_all([(prompt, params)], run, client)
        return generation

    async def submit_all(
        self,
        requests: list[tuple[str | list[int], SamplingParams]],
        run: str | None = None,
        client: str = "",
    ) -> list[Generation]:
        """Queue stories on ``run``'s model (None: the default run) for ``client``, all or none:
        prompts are text or token ids. Raises NoModel (the run is not loaded), PromptRejected
        (more stories than MAX_STORIES_PER_REQUEST or the engine can queue, a text over
        MAX_PROMPT_CHARS or MAX_PROMPT_TOKENS, more tokens in all than MAX_REQUEST_TOKENS, ids
        outside the vocabulary, a prompt to score longer than the context) or Busy (the batch
        and the waiting queue are full). What needs no tokenizer is checked first, so a request
        refused costs no encoding, and its places are claimed before it is encoded."""
        lane = self._serving.get(run or self._default or "")
        if lane is None:
            raise NoModel(
                no_model_message(self.settings) if run is None else f"{run} is not loaded"
            )
        count = len(requests)
        self._check_size(requests)
        self._check_budget(sum(params.max_new_tokens for _, params in requests), count)
        with self._cond:
            self.check_running()
            if self._accepted + count > self.settings.max_batch_size + self.settings.max_waiting:
                raise Busy(
                    f"the server is busy: {self.settings.max_batch_size} stories are being "
                    f"written and {self.settings.max_waiting} are waiting; retry shortly",
                    RETRY_AFTER_S,
                )
            self._accepted += count
        try:
            encoded = await self._encode(lane, requests)
            prompt_tokens = sum(len(ids) for ids in encoded)
            self._check_budget(
                prompt_tokens + sum(params.max_new_tokens for _, params in requests), count
            )
        except BaseException:  # refused, or the client left while its prompts were encoded
            with self._cond:
                self._accepted -= count
            raise
        now = time.perf_counter()
        loop = asyncio.get_running_loop()
        deadline = now + self.settings.request_timeout_s
        generations = [
            Generation(ids, params, lane, now, deadline, self, loop, client)
            for ids, (_, params) in zip(encoded, requests, strict=True)
        ]
        with self._cond:
            self._waiting.extend(generations)
            WAITING.set(len(self._waiting))
            self._cond.notify()
        return generations

    def _check_size(self, requests: list[tuple[str | list[int], SamplingParams]]) -> None:
        """The limits a request's size sets before any tokenizing: stories and characters."""
        settings = self.settings
        capacity = settings.max_batch_size + settings.max_waiting
        limit, name = min(
            (settings.max_stories_per_request, "MAX_STORIES_PER_REQUEST"),
            (capacity, "MAX_BATCH_SIZE + MAX_WAITING"),
        )
        if len(requests) > limit:
            raise PromptRejected(
                f"prompt: {len(requests)} stories (prompts × n) is above this server's limit of "
                f"{limit} in one request ({name})"
            )
        longest = max((len(p) for p, _ in requests if isinstance(p, str)), default=0)
        if longest > settings.max_prompt_chars:
            raise PromptRejected(
                f"prompt: {longest} characters is above this server's limit of "
                f"{settings.max_prompt_chars} (MAX_PROMPT_CHARS)"
            )

    def _check_budget(self, tokens: int, stories: int) -> None:
        limit = self.settings.max_request_tokens
        if tokens > limit:
            raise PromptRejected(
                f"prompt: {stories} stories of prompt and new tokens come to {tokens} tokens, "
                f"above this server's limit of {limit} in one request (MAX_REQUEST_TOKENS)"
            )

    async def _encode(
        self, lane: Lane, requests: list[tuple[str | list[int], SamplingParams]]
    ) -> list[list[int]]:
        """The prompts' token ids, checked against this server's limits and the lane's model.
        Texts longer in all than INLINE_TOKENIZE_CHARS are encoded off the event loop."""

        def encode() -> list[list[int]]:
            texts: dict[str, list[int]] = {}  # a prompt's n copies are encoded once
            return [self._token_ids(lane, prompt, params, texts) for prompt, params in requests]

        if sum(len(prompt) for prompt, _ in requests) <= INLINE_TOKENIZE_CHARS:
            return encode()
        return await asyncio.to_thread(encode)

    def _token_ids(
        self,
        lane: Lane,
        prompt: str | list[int],
        params: SamplingParams,
        texts: dict[str, list[int]],
    ) -> list[int]:
        generator = lane.generator
        if isinstance(prompt, list):
            vocab = generator.config.vocab_size
            outside = next((token for token in prompt if not 0 <= token < vocab), None)
            if outside is not None:
                raise PromptRejected(
                    f"prompt: token id {outside} is outside the vocabulary of "
                    f"{lane.loaded.version} (ids 0 to {vocab - 1})"
                )
            ids = prompt or [generator.tokenizer.eot_id]
        else:
            if prompt not in texts:
                texts[prompt] = generator.encode_prompt(prompt)
            ids = list(texts[prompt])  # each story its own list
        if len(ids) > self.settings.max_prompt_tokens:
            raise PromptRejected(
                f"prompt: {len(ids)} tokens is above this server's limit of "
                f"{self.settings.max_prompt_tokens} (MAX_PROMPT_TOKENS)"
            )
        if params.prompt_logprobs is not None and len(ids) > generator.window:
            raise PromptRejected(
                f"prompt: {len(ids)} tokens is above the model's context of {generator.window} "
                "tokens; scoring a prompt (echo with logprobs) needs all of it in context, so "
                "split longer texts into windows (lm-eval's loglikelihood_rolling does)"
            )
        return ids

    def cancel(self, generation: Generation) -> None:
        """The client stopped listening: a waiting request leaves the queue now, a running one
        leaves the batch at the next step. Harmless once the generation has finished."""
        generation.cancelled = True
        with self._cond:
            if generation in self._waiting:
                self._waiting.remove(generation)
                WAITING.set(len(self._waiting))
                self._release(generation, "cancelled")

    # --- the decode thread -------------------------------------------------------------------

    def _run(self) -> None:
        """Decode until stopped, supervised: if the loop itself fails (out of memory outside a
        step, a bug), every request in the engine gets Restarting instead of waiting for ever,
        /ready answers 503, and the loop starts again on fresh lanes after a delay that grows
        while the failures go on."""
        use_torch_threads(decode_threads(self.settings.decode_threads))
        failures = 0
        broken: list[Lane] = []
        while True:
            started = time.monotonic()
            try:
                with torch.inference_mode():
                    self._decode(broken)
                break
            except Exception:
                log.exception("the decode loop failed; failing its requests and restarting it")
            # Out of the except block, whose traceback held the failed iteration's tensors.
            ENGINE_RESTARTS.inc()
            failures = 1 if time.monotonic() - started > STABLE_AFTER_S else failures + 1
            delay = min(RESTART_DELAY_S[0] * 2 ** (failures - 1), RESTART_DELAY_S[1])
            broken = self._halt(broken, delay)
            with self._cond:
                if self._cond.wait_for(lambda: self._stopping, delay):
                    break
        self._fail_all(ShuttingDown("the server is shutting down"))

    def _halt(self, broken: list[Lane], delay: float) -> list[Lane]:
        """After the decode loop failed: new requests are refused for ``delay`` seconds, those
        in the engine end with an error, and every lane's generator, in no known state now, is
        closed; returns the lanes to build again before decoding goes on."""
        with self._cond:
            self._restart_in = delay
        self._fail_all(Restarting(delay))
        for lane in self._lanes:
            lane.generator.close()
        broken, self._lanes = [*broken, *self._lanes], []
        return broken

    def _decode(self, broken: list[Lane]) -> None:
        """Build the ``broken`` lanes that still serve again (emptying the list), then decode
        until stopped."""
        while broken:
            with self._cond:
                serving = broken[0] in self._serving.values()
            if serving:  # a lane since replaced or unloaded just goes
                self._rebuild(broken[0])
            broken.pop(0)
        with self._cond:
            self._restart_in = None
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._running()):
                    self._cond.wait()
                if self._stopping:
                    return
                self._expire_waiting(time.perf_counter())
                free = self.settings.max_batch_size - self._running()
                self._joining = self._take_fairly(free)
                WAITING.set(len(self._waiting))
                # A run reloaded since a request arrived serves it from its newest model.
                lanes = [self._serving.get(g.lane.run, g.lane) for g in self._joining]
                serving = list(self._serving.values())
            self._drop_leavers(time.perf_counter())
            full: list[Generation] = []  # their lane's KV cache has no free row yet
            try:
                for generation, lane in zip(list(self._joining), lanes, strict=True):
                    if lane not in self._lanes:
                        self._lanes.append(lane)
                    if not self._admit(generation, lane):
                        full.append(generation)
                    self._joining.remove(generation)
            finally:  # even when an admission failed: _fail_all must find them all
                self._requeue(full)
            for each in self._lanes:
                self._step(each)
            # A replaced or unloaded model's lane goes once its last story is done.
            self._lanes = [each for each in self._lanes if each.running or each in serving]
            RUNNING.set(self._running())
            self._flush()

    def _rebuild(self, lane: Lane) -> None:
        """A fresh generator for ``lane``, its old KV cache freed first: a long model's cache
        may fit only once (a failed step often means memory ran short already)."""
        lane.generator.close()
        lane.generator = self._generator(lane.loaded)

    def _send(self, generation: Generation, item: Record | EngineError) -> None:
        """Queue a record for the request's event loop; ``_flush`` hands it over."""
        self._outbox.append((generation, item))

    def _flush(self) -> None:
        """Hand this step's records to their event loops in one call per loop: one wake-up per
        step instead of one per token (a step of 64 streams is 64 records)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for generation, item in self._outbox:
            by_loop.setdefault(generation.loop, []).append((generation.queue, item))
        self._outbox = []
        for loop, items in by_loop.items():
            # A closed event loop means the server is gone and nobody listens.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_put_all, items)

    def _running(self) -> int:
        return sum(len(lane.running) for lane in self._lanes)

    def _expire_waiting(self, now: float) -> None:
        for generation in [g for g in self._waiting if g.deadline <= now]:
            self._waiting.remove(generation)
            self._time_out(generation)

    def _drop_leavers(self, now: float) -> None:
        for lane in self._lanes:
            for generation in list(lane.running.values()):
                if generation.cancelled or generation.deadline <= now:
                    assert generation.sequence is not None
                    lane.generator.remove(generation.sequence.id)
                    del lane.running[generation.sequence.id]
                    if generation.cancelled:
                        self._release(generation, "cancelled")
                    else:
                        self._time_out(generation)

    def _time_out(self, generation: Generation) -> None:
        timeout = self.settings.request_timeout_s
        self._send(
            generation,
            DeadlinePassed(f"the story took longer than {timeout:g} s (REQUEST_TIMEOUT_S)"),
        )
        self._release(generation, "timeout")

    def _take_fairly(self, count: int) -> list[Generation]:
        """Up to ``count`` waiting requests, out of the queue, client by client: each next one
        is the oldest of the waiting client whose stories joined the batch fewest times since
        it began waiting; so one client that queued many stories does not keep everyone behind
        all of them. Under ``_cond``."""
        if count >= len(self._waiting):
            taken, self._waiting = list(self._waiting), deque()
            self._turns.clear()
            return taken
        taken = []
        for _ in range(count):
            # min() keeps the first of equals: among the clients with fewest turns, arrival order.
            generation = min(self._waiting, key=lambda g: self._turns.get(g.client, 0))
            self._waiting.remove(generation)
            self._turns[generation.client] = self._turns.get(generation.client, 0) + 1
            taken.append(generation)
        waiting = {generation.client for generation in self._waiting}
        self._turns = {client: turns for client, turns in self._turns.items() if client in waiting}
        return taken

    def _requeue(self, generations: list[Generation]) -> None:
        """Back at the head of the waiting queue, in their order; one whose client left while
        it was out of the queue (``cancel`` did not find it there) leaves now."""
        with self._cond:
            for generation in reversed(generations):
                if generation.cancelled:
                    self._release(generation, "cancelled")
                else:
                    self._waiting.appendleft(generation)
            WAITING.set(len(self._waiting))

    def _admit(self, generation: Generation, lane: Lane) -> bool:
        """Queue a newcomer for the lane's next prefill; False, leaving it alone, while the
        lane's KV cache has no free row (a long model's has fewer rows than MAX_BATCH_SIZE)."""
        if not lane.generator.free_rows:
            return False
        if lane.generator.tokenizer is not generation.tokenizer:
            # The run was trained again with another vocabulary while the request waited: its
            # prompt's ids mean other text now.
            self._send(
                generation,
                PromptRejected(
                    f"prompt: {lane.run} changed its vocabulary to {lane.generator.tokenizer.name} "
                    "while the request waited; send it again"
                ),
            )
            self._release(generation, "error")
            return True
        now = time.perf_counter()
        generation.lane = lane
        generation.admitted = now
        QUEUE_TIME.observe(now - generation.arrived)
        try:
            sequence = lane.generator.add(generation.prompt, generation.params)
        except ValueError as error:  # a token this checkpoint's vocabulary does not have
            self._send(generation, PromptRejected(f"prompt: {error}"))
            self._release(generation, "error")
            return True  # answered: it leaves the queue
        PROMPT_TOKENS.labels(lane.run).inc(len(generation.prompt))
        generation.sequence, generation.version = sequence, lane.loaded.version
        lane.running[sequence.id] = generation
        return True

    def _step(self, lane: Lane) -> None:
        if not lane.running:
            return
        BATCH_SIZE.observe(len(lane.running))
        try:
            events = lane.generator.step()
        except Exception:
            log.exception("generation step failed on %s", lane.loaded.version)
            events = None
        if events is None:
            # Nothing in the batch can be trusted after a failed forward: end its stories with
            # an error and start the lane afresh, so later requests still get served. (Out of
            # the except block: its traceback holds the forward's views of the old cache.)
            for generation in lane.running.values():
                self._send(generation, GenerationFailed("generation failed; see the server log"))
                self._release(generation, "error")
            lane.running.clear()
            self._rebuild(lane)
            return
        now = time.perf_counter()
        for event in events:
            generation = lane.running[event.sequence_id]
            if event.finish_reason is not None:
                del lane.running[event.sequence_id]
            self._deliver(generation, event, now)

    def _deliver(self, generation: Generation, event: TokenEvent, now: float) -> None:
        sequence = generation.sequence
        assert sequence is not None
        if generation.first_event_at is None:
            generation.first_event_at = now
            TIME_TO_FIRST_TOKEN.observe(now - generation.arrived)
            if sequence.params.prompt_logprobs is not None:
                prompt = sequence.tokens[: sequence.prompt_length]
                self._send(generation, PromptScores(prompt, sequence.prompt_logprobs))
        else:
            INTER_TOKEN_LATENCY.observe(now - generation.last_event_at)
        generation.last_event_at = now
        if event.token_id is not None:
            generation.pending_ids.append(event.token_id)
            GENERATED_TOKENS.labels(generation.lane.run).inc()
        if event.logprob is not None:
            generation.pending_logprobs.append(event.logprob)
        if event.text or (
            event.finish_reason and (generation.pending_ids or generation.pending_logprobs)
        ):
            logprobs = generation.pending_logprobs if sequence.params.logprobs is not None else None
            self._send(generation, TextPiece(event.text, generation.pending_ids, logprobs))
            generation.pending_ids, generation.pending_logprobs = [], []
        if event.finish_reason is not None:
            self._send(generation, self._finish(generation, event.finish_reason, now))
            self._release(generation, event.finish_reason)
            END_TO_END_LATENCY.observe(now - generation.arrived)

    @staticmethod
    def _finish(generation: Generation, reason: FinishReason, now: float) -> Finish:
        sequence = generation.sequence
        assert sequence is not None and generation.version is not None
        assert generation.admitted is not None and generation.first_event_at is not None
        generated = len(sequence.generated)
        decoding = now - generation.first_event_at
        return Finish(
            reason=reason,
            prompt_tokens=sequence.prompt_length,
            completion_tokens=generated,
            queue_s=generation.admitted - generation.arrived,
            time_to_first_token_s=generation.first_event_at - generation.arrived,
            total_s=now - generation.arrived,
            tokens_per_s=(generated - 1) / decoding if generated > 1 and decoding > 0 else None,
            version=generation.version,
            seed=sequence.seed,
            prompt_truncated=sequence.prompt_truncated,
        )

    def _release(self, generation: Generation, reason: str) -> None:
        """A request leaves the engine, for ``reason`` (a finish reason, or why it was cut)."""
        with self._cond:  # reentrant: callers may hold it already
            self._accepted -= 1
        GENERATIONS.labels(generation.lane.run, reason).inc()

    def _fail_all(self, error: EngineError) -> None:
        with self._cond:
            running = (g for lane in self._lanes for g in lane.running.values())
            # dict.fromkeys: one that failed while joining a lane may be in it already.
            leaving = list(dict.fromkeys([*self._waiting, *self._joining, *running]))
            self._waiting.clear()
            self._joining = []
            for lane in self._lanes:
                lane.running.clear()
            for generation in leaving:
                self._send(generation, error)
                self._release(generation, "error")
        self._flush()
        RUNNING.set(0)
        WAITING.set(0)


async def stories(generations: list[Generation]) -> list[Story]:
    """Every generation's whole story, in order. If one fails, or the caller goes away, the
    others leave the engine too."""
    tasks = [asyncio.ensure_future(generation.story()) for generation in generations]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def interleaved(generations: list[Generation]) -> AsyncIterator[tuple[int, Record]]:
    """The records of several generations as they come, each with its generation's index.
    Raises the first EngineError any of them raises; leaving early cancels them all."""
    if len(generations) == 1:
        async for record in generations[0].records():
            yield 0, record
        return
    arrivals: asyncio.Queue[tuple[int, Record | EngineError | None]] = asyncio.Queue()

    async def follow(index: int, generation: Generation) -> None:
        try:
            async for record in generation.records():
                arrivals.put_nowait((index, record))
        except EngineError as error:
            arrivals.put_nowait((index, error))
        arrivals.put_nowait((index, None))

    tasks = [asyncio.ensure_future(follow(i, g)) for i, g in enumerate(generations)]
    try:
        running = len(tasks)
        while running:
            index, item = await arrivals.get()
            if item is None:
                running -= 1
            elif isinstance(item, EngineError):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _forget_loaded(loaded: LoadedModel) -> None:
    with contextlib.suppress(KeyError):  # never labelled if a test built the engine bare
        LOADED_MODEL.remove(loaded.run, loaded.version, str(loaded.meta.step))


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)

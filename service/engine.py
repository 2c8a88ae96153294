"""The generation engine: one thread decodes every request together (continuous batching).

Routes ``submit`` a prompt and iterate the ``Generation`` they get back; the event loop never
runs the model. The decode thread loops: drop requests whose client left or whose deadline
passed, let waiting requests join the batch, then run one ``BatchGenerator.step`` per model: a
bounded, batched prefill for the newcomers and one decode step for everyone already running.
Each record goes back to the request's asyncio queue through ``loop.call_soon_threadsafe``.

The engine knows nothing of HTTP: it raises ``EngineError``s (no model, prompt too long, busy
with a retry-after, deadline passed, ...) and emits plain records (``TextPiece``s, then one
``Finish`` with usage and timings); the routes turn both into HTTP answers.

Hot reload: every loaded model gets its own *lane* (a ``BatchGenerator`` with its KV cache).
``install`` makes a new lane serve new requests; sequences already in an older lane keep
decoding there until they finish, and the lane is dropped once empty. So a stream always ends
on the checkpoint it started with.

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

from contract.settings import Settings
from model.generate import BatchGenerator, FinishReason, Sequence, TokenEvent
from model.sampling import SamplingParams
from service.loaded import LoadedModel
from service.metrics import (
    BATCH_SIZE,
    END_TO_END_LATENCY,
    GENERATED_TOKENS,
    GENERATIONS,
    INTER_TOKEN_LATENCY,
    MODEL,
    PROMPT_TOKENS,
    QUEUE_TIME,
    RUNNING,
    TIME_TO_FIRST_TOKEN,
    WAITING,
)

log = logging.getLogger("slm.engine")

# A slot frees as soon as any running story ends, which on this model is a matter of seconds.
RETRY_AFTER_S = 1
# Shorter prompts are tokenized on the event loop (tens of microseconds): a thread hop per
# request would cost more.
INLINE_TOKENIZE_CHARS = 4096


# --- what the engine raises -------------------------------------------------------------------


class EngineError(Exception):
    """Why the engine cannot serve a request, or cannot go on with it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NoModel(EngineError):
    """No checkpoint is loaded yet."""


class PromptRejected(EngineError):
    """The prompt is too long for this server, or holds ids this model's vocabulary lacks."""


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


# --- what the engine emits --------------------------------------------------------------------


@dataclass(frozen=True)
class TextPiece:
    """Text released by the tokens listed (empty while a character or a possible stop string
    is held back)."""

    text: str
    token_ids: list[int]


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


def no_model_message(settings: Settings) -> str:
    folder = settings.checkpoint_dir
    return (
        f"no model loaded yet: there is no valid checkpoint under {folder} (CHECKPOINT_DIR). "
        f"Train one with `slm train --data DATA_DIR --out {folder}/RUN` or POST /train-jobs, "
        f"or write an untrained one with `slm init --preset tiny --out {folder}/RUN`; "
        f"the service loads it within {settings.reload_poll_s:g} s."
    )


def decode_threads(configured: int) -> int:
    """Torch threads for decoding: DECODE_THREADS, or by default every core this process may use.
    Keeping one core for the event loop sounds right but measured worse: on 2 cores, 16 and 64
    streams ran at 618 and 831 tokens/s with one decode thread against 714 and 1236 with two
    (BENCHMARKS.md); the loop's work per token is small beside a decode step."""
    return configured or len(os.sched_getaffinity(0))


def use_torch_threads(count: int) -> None:
    """Set the calling thread's torch (OpenMP) thread count.

    Two traps, both measured (BENCHMARKS.md): torch sets a thread's count lazily, at its first
    parallel op, to the value any thread set last, so a count set before that op is undone
    (the decode thread decoded on one core after a checkpoint loaded on another thread); hence
    the ``get_num_threads`` first. And a thread that runs parallel ops keeps OpenMP threads of
    its own: once the process holds more of them than cores, libgomp stops them spinning between
    ops, and every decode step waits for sleeping threads to wake (6.8 → 9.9 ms at batch 1).
    So the decode thread takes every core and any other thread that runs torch (loading a
    checkpoint, building a lane) takes one.
    """
    torch.get_num_threads()
    torch.set_num_threads(count)


@dataclass(eq=False)  # identity: a request is itself, whatever it holds
class Generation:
    """One request in the engine. The route iterates ``records()``; everything else is written
    by the decode thread only (``cancelled`` aside, a flag the event loop sets)."""

    prompt: list[int]
    params: SamplingParams
    arrived: float  # time.perf_counter()
    deadline: float
    engine: Engine
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TextPiece | Finish | EngineError] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    sequence: Sequence | None = None
    version: str | None = None
    admitted: float | None = None
    first_event_at: float | None = None
    last_event_at: float | None = None
    pending_ids: list[int] = field(default_factory=list)  # tokens whose text is held back

    async def records(self) -> AsyncIterator[TextPiece | Finish]:
        """Text pieces, then one ``Finish`` (iterate once). Raises an EngineError when the
        deadline passes or a forward fails. Leaving early (the client went away) frees the
        request's slot at the next step."""
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
        async for item in self.records():
            if isinstance(item, TextPiece):
                pieces.append(item)
            else:
                return Story(
                    text="".join(piece.text for piece in pieces),
                    token_ids=[token for piece in pieces for token in piece.token_ids],
                    finish=item,
                )
        raise AssertionError("records() always ends with a Finish or raises")


@dataclass(eq=False)
class Lane:
    """One loaded model and the sequences in its batch (prefilling or decoding)."""

    loaded: LoadedModel
    generator: BatchGenerator
    running: dict[int, Generation] = field(default_factory=dict)  # by sequence id


class Engine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._cond = threading.Condition()
        # Shared with the event loop, under _cond:
        self._current: Lane | None = None
        self._waiting: deque[Generation] = deque()
        self._accepted = 0  # waiting + running: what admission control counts
        self._stopping = False
        # The decode thread's own:
        self._lanes: list[Lane] = []
        self._outbox: list[tuple[Generation, TextPiece | Finish | EngineError]] = []
        self._thread = threading.Thread(target=self._run, name="slm-decode", daemon=True)

    # --- the event loop's side ---------------------------------------------------------------

    @property
    def model(self) -> LoadedModel | None:
        """The model serving new requests."""
        lane = self._current
        return lane.loaded if lane else None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop decoding; requests still in the engine get ShuttingDown."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def install(self, loaded: LoadedModel) -> None:
        """Serve new requests from ``loaded``. Called from the reloader's worker thread: the
        lane's KV cache and transposed output matrix take a moment to build."""
        lane = Lane(loaded, self._generator(loaded))
        with self._cond:
            self._current = lane
            self._cond.notify()
        MODEL.info({"version": loaded.version, "step": str(loaded.meta.step)})

    def _generator(self, loaded: LoadedModel) -> BatchGenerator:
        return BatchGenerator(
            loaded.model,
            max_batch=self.settings.max_batch_size,
            quantization=self.settings.quantization,
            prefill_tokens=self.settings.prefill_tokens,
        )

    async def submit(self, prompt: str, params: SamplingParams) -> Generation:
        """Queue a story. Raises NoModel, PromptRejected (over MAX_PROMPT_TOKENS) or Busy (the
        batch and the waiting queue are full)."""
        lane = self._current
        if lane is None:
            raise NoModel(no_model_message(self.settings))
        if len(prompt) <= INLINE_TOKENIZE_CHARS:
            ids = lane.generator.encode_prompt(prompt)
        else:  # a prompt near the body limit takes tens of milliseconds: not on the loop
            ids = await asyncio.to_thread(lane.generator.encode_prompt, prompt)
        if len(ids) > self.settings.max_prompt_tokens:
            raise PromptRejected(
                f"prompt: {len(ids)} tokens is above this server's limit of "
                f"{self.settings.max_prompt_tokens} (MAX_PROMPT_TOKENS)"
            )
        now = time.perf_counter()
        generation = Generation(
            prompt=ids,
            params=params,
            arrived=now,
            deadline=now + self.settings.request_timeout_s,
            engine=self,
            loop=asyncio.get_running_loop(),
        )
        capacity = self.settings.max_batch_size + self.settings.max_waiting
        with self._cond:
            if self._accepted >= capacity:
                raise Busy(
                    f"the server is busy: {self.settings.max_batch_size} stories are being "
                    f"written and {self.settings.max_waiting} are waiting; retry shortly",
                    RETRY_AFTER_S,
                )
            self._accepted += 1
            self._waiting.append(generation)
            WAITING.set(len(self._waiting))
            self._cond.notify()
        return generation

    def cancel(self, generation: Generation) -> None:
        """The client stopped listening: a waiting request leaves the queue now, a running one
        leaves the batch at the next step. Harmless once the generation has finished."""
        generation.cancelled = True
        with self._cond:
            if generation in self._waiting:
                self._waiting.remove(generation)
                WAITING.set(len(self._waiting))
                self._release("cancelled")

    # --- the decode thread -------------------------------------------------------------------

    def _run(self) -> None:
        use_torch_threads(decode_threads(self.settings.decode_threads))
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._stopping or self._waiting or self._running()):
                        self._cond.wait()
                    if self._stopping:
                        break
                    self._expire_waiting(time.perf_counter())
                    lane = self._current
                    free = self.settings.max_batch_size - self._running()
                    joining = min(free, len(self._waiting))
                    newcomers = [self._waiting.popleft() for _ in range(joining)]
                    WAITING.set(len(self._waiting))
                if lane is not None and lane not in self._lanes:
                    self._lanes.append(lane)
                self._drop_leavers(time.perf_counter())
                for generation in newcomers:
                    self._admit(generation, lane)
                for each in self._lanes:
                    self._step(each)
                # An older model's lane goes once its last story is done.
                self._lanes = [each for each in self._lanes if each.running or each is lane]
                RUNNING.set(self._running())
                self._flush()
        self._fail_all(ShuttingDown("the server is shutting down"))

    def _send(self, generation: Generation, item: TextPiece | Finish | EngineError) -> None:
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
                        self._release("cancelled")
                    else:
                        self._time_out(generation)

    def _time_out(self, generation: Generation) -> None:
        timeout = self.settings.request_timeout_s
        self._send(
            generation,
            DeadlinePassed(f"the story took longer than {timeout:g} s (REQUEST_TIMEOUT_S)"),
        )
        self._release("timeout")

    def _admit(self, generation: Generation, lane: Lane | None) -> None:
        """Queue a newcomer for the lane's next prefill."""
        now = time.perf_counter()
        assert lane is not None, "submit accepts requests only once a model is installed"
        generation.admitted = now
        QUEUE_TIME.observe(now - generation.arrived)
        try:
            sequence = lane.generator.add(generation.prompt, generation.params)
        except ValueError as error:  # a token this checkpoint's vocabulary does not have
            self._send(generation, PromptRejected(f"prompt: {error}"))
            self._release("error")
            return
        PROMPT_TOKENS.inc(len(generation.prompt))
        generation.sequence, generation.version = sequence, lane.loaded.version
        lane.running[sequence.id] = generation

    def _step(self, lane: Lane) -> None:
        if not lane.running:
            return
        BATCH_SIZE.observe(len(lane.running))
        try:
            events = lane.generator.step()
        except Exception:
            # Nothing in the batch can be trusted after a failed forward: end its stories with
            # an error and start the lane afresh, so later requests still get served.
            log.exception("generation step failed on %s", lane.loaded.version)
            for generation in lane.running.values():
                self._send(generation, GenerationFailed("generation failed; see the server log"))
                self._release("error")
            lane.running.clear()
            lane.generator = self._generator(lane.loaded)
            return
        now = time.perf_counter()
        for event in events:
            generation = lane.running[event.sequence_id]
            if event.finish_reason is not None:
                del lane.running[event.sequence_id]
            self._deliver(generation, event, now)

    def _deliver(self, generation: Generation, event: TokenEvent, now: float) -> None:
        if generation.first_event_at is None:
            generation.first_event_at = now
            TIME_TO_FIRST_TOKEN.observe(now - generation.arrived)
        else:
            INTER_TOKEN_LATENCY.observe(now - generation.last_event_at)
        generation.last_event_at = now
        if event.token_id is not None:
            generation.pending_ids.append(event.token_id)
            GENERATED_TOKENS.inc()
        if event.text or (event.finish_reason and generation.pending_ids):
            self._send(generation, TextPiece(text=event.text, token_ids=generation.pending_ids))
            generation.pending_ids = []
        if event.finish_reason is not None:
            self._send(generation, self._finish(generation, event.finish_reason, now))
            self._release(event.finish_reason)
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

    def _release(self, reason: str) -> None:
        """A request leaves the engine, for ``reason`` (a finish reason, or why it was cut)."""
        with self._cond:  # reentrant: callers may hold it already
            self._accepted -= 1
        GENERATIONS.labels(reason).inc()

    def _fail_all(self, error: EngineError) -> None:
        with self._cond:
            leaving = [*self._waiting, *(g for lane in self._lanes for g in lane.running.values())]
            self._waiting.clear()
            for lane in self._lanes:
                lane.running.clear()
            for generation in leaving:
                self._send(generation, error)
                self._release("error")
        self._flush()
        RUNNING.set(0)
        WAITING.set(0)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)

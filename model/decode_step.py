"""The decode step at fixed shapes: compiled for every bucket of rows, with eager as the reference.

At batch 1 a small model's decode step is ~150 small operations; eager PyTorch pays a few
microseconds of Python and dispatch for each on a CPU, and a kernel launch each on a GPU, which
is most of the step for a model this size. So the step is built the way gpt-fast builds it:

- one shape per bucket of rows (1, 2, 4, 8, … up to the cache's rows) and span of slots: the
  rows decoding are padded up to the next bucket, and every row attends over the first slots
  of the cache through a length mask (``model.cache.FixedStep``), as many as the next span
  holds (the cache's length, and its halves down to an eighth: ``span_sizes``), so nothing in
  the step changes shape from token to token, and short stories do not read the whole cache
  (at 64 rows of 60 tokens in a cache of 512, `small`'s step took 17.6 ms over every slot
  against 9.4 ms for the eager step over the longest row: BENCHMARKS.md);
- every per-step number (token ids, positions, cache slots) travels in one small tensor, copied
  into a buffer that lives as long as the generator, so a graph sees the same inputs each step;
- the weights are inputs of the graph, not constants baked into it (the network runs through
  ``torch.func.functional_call`` on a weightless skeleton of its config), so a model reloaded
  with the same shape runs the code compiled for the one before it;
- ``torch.compile(fullgraph=True)`` compiles two graphs per span: one for a single row, and
  one whose rows are a symbolic size for every bigger bucket (compiling a graph per bucket
  took 190 s for seven buckets on 2 cores, these two 70 s, and steps as fast: BENCHMARKS.md);
  on CUDA the compiled step is then captured in a CUDA graph per bucket and span
  (``CudaGraphStep``), so a step is one launch, at a fixed shape;
- on a CPU, inductor's C++ kernels are called from a C++ wrapper (``cpp_wrapper``), which
  releases the GIL for the whole step: called from Python, each generated kernel holds it, and
  the server's event loop, which streams the tokens out, waited for the step (served, one
  stream greedy, 450 → 552 tokens/s: BENCHMARKS.md).

Compiling takes seconds, so it never happens on the decode path. ``warm`` compiles every bucket
and span in a background thread (past the first two buckets of a span, a bucket only checks the
graph it shares), and a generator runs a step eager until a compiled step of its bucket is
ready, over its span or a longer one. Compiled steps are shared by
every generator of the same shape and kept for the process's life; inductor caches the
generated code on disk (``TORCHINDUCTOR_CACHE_DIR``), so a restart compiles faster. Any compile
error leaves that shape eager, logged once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor, nn
from torch._dynamo import config as dynamo_config
from torch._inductor import config as inductor_config

from model.cache import FixedStep
from model.config import GPTConfig
from model.device import use_torch_threads
from model.gpt import GPT

log = logging.getLogger(__name__)

CompileMode = Literal["off", "eager", "compiled"]
COMPILE_MODES: tuple[CompileMode, ...] = ("off", "eager", "compiled")

# Graphs compiled in one process at most (2 families × spans × model shapes; the bound of
# dynamo's cache for the step's code object); past it, new shapes run eager.
MAX_COMPILED_SHAPES = 256
# The spans a step attends over: the cache's length and its halves, at most this many times,
# never below MIN_SPAN slots (one graph per span and family: more of them is more to compile).
SPAN_HALVINGS = 3
MIN_SPAN = 32

StepFunction = Callable[[dict[str, Tensor], Tensor, Tensor, Tensor, int], Tensor]


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch``, then ``max_batch`` itself."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch)


def bucket_for(batch: int, buckets: tuple[int, ...]) -> int:
    """The smallest of ``buckets`` (ascending) that holds ``batch``: rows, or slots of a span."""
    return next(size for size in buckets if size >= batch)


def span_sizes(cache_length: int) -> tuple[int, ...]:
    """The spans of slots a step attends over, ascending: ``cache_length`` and its halves,
    SPAN_HALVINGS of them at most, none below MIN_SPAN."""
    spans, span = [cache_length], cache_length
    for _ in range(SPAN_HALVINGS):
        span //= 2
        if span < MIN_SPAN:
            break
        spans.append(span)
    return tuple(reversed(spans))


def step_count(max_batch: int, cache_length: int) -> int:
    """How many compiled steps a generator of ``max_batch`` rows over a cache of
    ``cache_length`` slots warms: one per bucket of rows and span."""
    return len(bucket_sizes(max_batch)) * len(span_sizes(cache_length))


class _Decoder(nn.Module):
    """The GPT's cached forward as a module's ``forward``, for ``functional_call``."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, keys: Tensor, values: Tensor, inputs: Tensor, span: int) -> Tensor:
        plan = FixedStep(keys, values, inputs, span)
        return self.gpt.forward_cached(plan.tokens[:, None], plan)


def decode_function(config: GPTConfig) -> StepFunction:
    """``(weights, keys, values, inputs, span) → final activations (B, n_embd)`` for any model
    of ``config``: the network of a skeleton on the meta device, run with the weights given."""
    with torch.device("meta"):
        skeleton = _Decoder(GPT(config)).eval()

    def decode(
        weights: dict[str, Tensor], keys: Tensor, values: Tensor, inputs: Tensor, span: int
    ) -> Tensor:
        return torch.func.functional_call(skeleton, weights, (keys, values, inputs, span))

    return decode


def step_weights(model: GPT) -> dict[str, Tensor]:
    """The weights ``decode_function``'s steps take, named as the skeleton names them; detached,
    as the compiled steps were traced with them (a parameter that requires grad would fail
    their guards, and the step would run eager)."""
    return {f"gpt.{name}": parameter.detach() for name, parameter in model.named_parameters()}


@dataclass(frozen=True)
class StepShape:
    """What a compiled step is specialised to: the network, and its inputs' shapes."""

    config: GPTConfig
    dtype: torch.dtype
    device: str
    cache_shape: tuple[int, ...]
    bucket: int
    span: int
    # Whether the cache was made under inference mode: guards tell such tensors apart, so a step
    # compiled for the one kind would run eager on the other.
    inference: bool
    # The torch threads it runs on: its C++ kernels are generated for that many, and its guards
    # check the count, so a step run on another count would run eager.
    threads: int


@dataclass
class _Compiled:
    """One shape's compiled step: None until it is ready, and for ever if compiling failed."""

    function: StepFunction | None = None
    ready: threading.Event = field(default_factory=threading.Event)  # compiled, or failed


class CompiledSteps:
    """Every shape's compiled step in this process, built in background threads, one at a time
    (compiling competes with decoding for the CPU)."""

    def __init__(self) -> None:
        self._steps: dict[StepShape, _Compiled] = {}
        # One torch.compile per family of shapes (``_family``): its graphs, however many.
        self._functions: dict[StepShape, StepFunction] = {}
        self._lock = threading.Lock()
        self._compiling = threading.Lock()

    def get(self, shape: StepShape) -> StepFunction | None:
        """The compiled step for ``shape`` if it is ready, else None (the caller runs eager)."""
        compiled = self._steps.get(shape)
        return compiled.function if compiled is not None else None

    def compiled_count(self) -> int:
        """How many shapes have a compiled step ready."""
        return sum(compiled.function is not None for compiled in list(self._steps.values()))

    def wait(self, shapes: list[StepShape], timeout: float | None = None) -> bool:
        """Block until every one of ``shapes`` is compiled or failed; whether all got there."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for shape in shapes:
            compiled = self._steps.get(shape)
            if compiled is None:
                return False
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not compiled.ready.wait(left):
                return False
        return True

    def warm(self, shapes: list[StepShape], model: GPT) -> threading.Thread | None:
        """Compile the steps of ``shapes`` not compiled yet, in a background thread, running
        each once on scratch tensors (never the caller's cache) with ``model``'s weights."""
        with self._lock:
            missing = [shape for shape in shapes if shape not in self._steps]
            for shape in missing:
                self._steps[shape] = _Compiled()
        if not missing:
            return None
        thread = threading.Thread(
            target=self._compile_all,
            args=(missing, step_weights(model)),
            name="slm-compile",
            daemon=True,
        )
        thread.start()
        return thread

    def _compile_all(self, shapes: list[StepShape], weights: dict[str, Tensor]) -> None:
        # One compiler thread in this process: no pool of compile workers beside the server,
        # and the decoding keeps the other cores.
        with self._compiling, torch.inference_mode(), inductor_config.patch(compile_threads=1):
            for index, shape in enumerate(shapes):
                started = time.monotonic()
                try:
                    family = _family(shape)
                    if family not in self._functions:
                        self._functions[family] = torch.compile(
                            decode_function(shape.config),
                            fullgraph=True,
                            dynamic=False if shape.bucket == 1 else None,
                        )
                    with inductor_config.patch(cpp_wrapper=shape.device == "cpu"):
                        compiled = _compile(self._functions[family], shape, weights)
                    self._steps[shape].function = compiled
                except Exception:  # whatever the compiler's failure, the step decodes eager
                    log.exception(
                        "compiling the decode step failed (bucket of %d rows over %d slots); it "
                        "decodes eager for this model's shape",
                        shape.bucket,
                        shape.span,
                    )
                    for left in shapes[index:]:  # the same cause would fail them all
                        self._steps[left].ready.set()
                    return
                log.info(
                    "decode step compiled for a bucket of %d rows over %d slots in %.1f s",
                    shape.bucket,
                    shape.span,
                    time.monotonic() - started,
                )
                self._steps[shape].ready.set()


def _family(shape: StepShape) -> StepShape:
    """Buckets of two rows or more share one graph whose rows are a symbolic size, so the
    buckets after the first compile in no time; one row gets a graph of its own (a dimension
    of 1 is always specialised). Each span is a graph of its own."""
    return replace(shape, bucket=min(shape.bucket, 2))


def _compile(function: StepFunction, shape: StepShape, weights: dict[str, Tensor]) -> StepFunction:
    """Compile ``function`` (a ``torch.compile`` of ``decode_function``) for ``shape`` by running
    it once (that is when compiling happens) on scratch inputs; returns the step that only ever
    runs what was compiled (``torch._dynamo.run``): were its guards to fail on the decode
    thread, it would run eager there rather than compile in the middle of a step."""
    use_torch_threads(shape.threads)
    with torch.inference_mode(shape.inference):
        keys = torch.zeros(shape.cache_shape, dtype=shape.dtype, device=shape.device)
        values = torch.zeros_like(keys)
        inputs = torch.zeros((3, shape.bucket), dtype=torch.long, device=shape.device)
    if shape.bucket > 1:
        torch._dynamo.maybe_mark_dynamic(inputs, 1)
    # Every shape's step is a compilation of the same code object, whose cache dynamo bounds
    # by recompile_limit (8): one entry per shape is the point here, not a runaway. Without
    # automatic dynamic shapes, a second span is a graph of its own, not a symbolic span.
    with dynamo_config.patch(recompile_limit=MAX_COMPILED_SHAPES, automatic_dynamic_shapes=False):
        function(weights, keys, values, inputs, shape.span)
    return torch._dynamo.run(function)


# One per process: what one generator compiled, the next of the same shape (a reload) reuses.
COMPILED_STEPS = CompiledSteps()


class CudaGraphStep:
    """A compiled step captured in a CUDA graph per bucket and span, for one generator's cache
    and weights: one launch per step. ``run`` copies the step's inputs into the graph's own
    buffer and returns the graph's output tensor (overwritten by the next run)."""

    def __init__(self, weights: dict[str, Tensor], keys: Tensor, values: Tensor) -> None:
        self._weights, self._keys, self._values = weights, keys, values
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}

    def run(self, function: StepFunction, inputs: Tensor, span: int) -> Tensor:
        """One step of ``function`` (the compiled step of ``inputs``' bucket and ``span``)."""
        shape = (inputs.shape[1], span)
        if shape not in self._graphs:
            self._graphs[shape] = self._capture(function, *shape)
        graph, static_inputs, output = self._graphs[shape]
        static_inputs.copy_(inputs)
        graph.replay()
        return output

    def _capture(
        self, function: StepFunction, bucket: int, span: int
    ) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        # The warm-up run writes padding keys into every row's last slot, which no row holds
        # between steps (a row that fills it slides its window before the next step).
        static_inputs = torch.zeros((3, bucket), dtype=torch.long, device=self._keys.device)
        static_inputs[2] = self._keys.shape[3] - 1
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # a run outside the graph first, as capture needs
            function(self._weights, self._keys, self._values, static_inputs, span)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = function(self._weights, self._keys, self._values, static_inputs, span)
        return graph, static_inputs, output

"""The output head's product for decoding: for each bucket of rows, the fastest of three ways
to multiply the rows by the output matrix, measured on this machine.

Decoding reads the whole output matrix (most of a small model's weights) for every step, and
which product reads it fastest depends on the rows and on the CPU (BENCHMARKS.md): on an AMD
EPYC, one row times a transposed contiguous copy took 0.74 ms against 2.4 for ``F.linear``
(`small`), and two to eight rows ran fastest as the matrix times the rows' transpose (0.7
against 2.7 ms at four rows); on an Intel Xeon that same product took twice the copy's time
at two rows (`small` 1.04 against 0.51 ms, `seed` 4.1 against 1.75). So the head times the
three once per bucket, on the model's own matrix, and keeps the fastest; the choice is kept
for the process, per shape and thread count. The three give the same logits up
to float rounding, which a seeded story never depends on (the batch a row decodes in changes
the product too). On a GPU the head is ``F.linear``.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from model.decode_step import bucket_for

# (rows, matrix, its transposed contiguous copy) → logits (rows × vocabulary)
Product = Callable[[Tensor, Tensor, Tensor], Tensor]

PRODUCTS: dict[str, Product] = {
    "rows by the transposed copy": lambda rows, matrix, copy: rows @ copy,
    # The answer stays a transposed view, which the sampler reads as fast.
    "matrix by the rows' transpose": lambda rows, matrix, copy: (matrix @ rows.t()).t(),
    "linear": lambda rows, matrix, copy: F.linear(rows, matrix),
}
TIMED_CALLS = 3  # per product and bucket, after one untimed call; the median decides

# (device, dtype, matrix shape, threads, rows) → the fastest product's name, for this process.
_CHOSEN: dict[tuple[str, torch.dtype, tuple[int, ...], int, int], str] = {}
_CHOOSING = threading.Lock()


class OutputHead:
    """``hidden (rows × n_embd) → logits`` for a generator whose steps have ``buckets`` rows;
    rows between buckets use the next bucket's product, rows past the last ``F.linear``.

    A bucket's product is timed at its first call, on the calling thread at its torch thread
    count: the generator's step, on the decode thread. Timing it when the generator is built
    would run parallel work on the building thread at the decode thread's count, and a process
    holding more OpenMP threads than cores makes every later step wait for sleeping threads
    (``model.device.use_torch_threads``): one stream served went 431 → 242 tokens/s."""

    def __init__(self, matrix: Tensor, buckets: tuple[int, ...]) -> None:
        self.matrix = matrix
        self._buckets = buckets
        self._on_cpu = matrix.device.type == "cpu"
        self._copy = matrix.t().contiguous() if self._on_cpu else matrix
        self._products: dict[int, Product] = {}

    def __call__(self, hidden: Tensor) -> Tensor:
        rows = hidden.shape[0]
        if rows > self._buckets[-1] or not self._on_cpu:
            return F.linear(hidden, self.matrix)
        bucket = bucket_for(rows, self._buckets)
        product = self._products.get(bucket)
        if product is None:
            product = self._products[bucket] = PRODUCTS[self._chosen(bucket)]
        return product(hidden, self.matrix, self._copy)

    def _chosen(self, rows: int) -> str:
        matrix = self.matrix
        key = (str(matrix.device), matrix.dtype, tuple(matrix.shape), torch.get_num_threads(), rows)
        with _CHOOSING:
            if key not in _CHOSEN:
                _CHOSEN[key] = _fastest(matrix, self._copy, rows)
            return _CHOSEN[key]


def _fastest(matrix: Tensor, copy: Tensor, rows: int) -> str:
    hidden = torch.ones(rows, matrix.shape[1], dtype=matrix.dtype)  # the global RNG untouched
    timings: dict[str, list[float]] = {name: [] for name in PRODUCTS}
    for product in PRODUCTS.values():
        product(hidden, matrix, copy)
    for _ in range(TIMED_CALLS):  # interleaved, so a noisy moment hits every product
        for name, product in PRODUCTS.items():
            started = time.perf_counter()
            product(hidden, matrix, copy)
            timings[name].append(time.perf_counter() - started)
    return min(PRODUCTS, key=lambda name: statistics.median(timings[name]))

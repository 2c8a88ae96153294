"""The output head's product for decoding: for each bucket of rows, the fastest of three ways
to multiply the rows by the output matrix, measured on this machine.

Decoding reads the whole output matrix (most of a small model's weights) for every step, and
which product reads it fastest depends on the rows and on the CPU (BENCHMARKS.md): on an AMD
EPYC, one row times a transposed contiguous copy took 0.74 ms against 2.4 for ``F.linear``
(`small`), and two to eight rows ran fastest as the matrix times the rows' transpose (0.7
against 2.7 ms at four rows); on an Intel Xeon that same product took twice the copy's time
at two rows (`small` 1.04 against 0.51 ms, `seed` 4.1 against 1.75). So the head times the
three once per bucket, on the model's own matrix and the generator's thread count, and keeps
the fastest; the choice is kept for the process, per shape. The three give the same logits up
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

from model.device import use_torch_threads

# (rows, matrix, its transposed contiguous copy) → logits (rows × vocabulary)
Product = Callable[[Tensor, Tensor, Tensor], Tensor]

PRODUCTS: dict[str, Product] = {
    "rows by the transposed copy": lambda rows, matrix, copy: rows @ copy,
    # The answer stays a transposed view, which the sampler reads as fast.
    "matrix by the rows' transpose": lambda rows, matrix, copy: (matrix @ rows.t()).t(),
    "linear": lambda rows, matrix, copy: F.linear(rows, matrix),
}
TIMED_CALLS = 5  # per product and bucket, after one untimed call; the median decides

# (device, dtype, matrix shape, threads, rows) → the fastest product's name, for this process.
_CHOSEN: dict[tuple[str, torch.dtype, tuple[int, ...], int, int], str] = {}
_CHOOSING = threading.Lock()


class OutputHead:
    """``hidden (rows × n_embd) → logits`` for a generator whose steps have ``buckets`` rows;
    rows between buckets use the next bucket's product, rows past the last ``F.linear``."""

    def __init__(self, matrix: Tensor, buckets: tuple[int, ...], threads: int) -> None:
        self.matrix = matrix
        self._buckets = buckets
        if matrix.device.type != "cpu":
            self._copy = matrix
            self._products = {rows: PRODUCTS["linear"] for rows in buckets}
            return
        self._copy = matrix.t().contiguous()
        chosen = {rows: _chosen(matrix, self._copy, rows, threads) for rows in buckets}
        self._products = {rows: PRODUCTS[name] for rows, name in chosen.items()}
        if "rows by the transposed copy" not in chosen.values():
            self._copy = matrix  # no bucket reads the copy: it need not take the memory

    def __call__(self, hidden: Tensor) -> Tensor:
        rows = hidden.shape[0]
        bucket = next((size for size in self._buckets if size >= rows), None)
        if bucket is None:
            return F.linear(hidden, self.matrix)
        return self._products[bucket](hidden, self.matrix, self._copy)


def _chosen(matrix: Tensor, copy: Tensor, rows: int, threads: int) -> str:
    key = (str(matrix.device), matrix.dtype, tuple(matrix.shape), threads, rows)
    with _CHOOSING:
        if key not in _CHOSEN:
            _CHOSEN[key] = _fastest(matrix, copy, rows, threads)
        return _CHOSEN[key]


@torch.inference_mode()
def _fastest(matrix: Tensor, copy: Tensor, rows: int, threads: int) -> str:
    hidden = torch.randn(rows, matrix.shape[1], dtype=matrix.dtype)
    callers = use_torch_threads(threads)
    try:
        timings: dict[str, list[float]] = {name: [] for name in PRODUCTS}
        for product in PRODUCTS.values():
            product(hidden, matrix, copy)
        for _ in range(TIMED_CALLS):  # interleaved, so a noisy moment hits every product
            for name, product in PRODUCTS.items():
                started = time.perf_counter()
                product(hidden, matrix, copy)
                timings[name].append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(callers)
    return min(PRODUCTS, key=lambda name: statistics.median(timings[name]))

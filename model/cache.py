"""A preallocated key/value cache whose rows are the sequences of a decoding batch.

Each row holds one sequence; rows may have different lengths, so sequences that started at
different times decode together in one forward. The batch is always rows ``0..B-1``: the caller
keeps it compact (``move_row`` fills the hole a finished sequence leaves), so a decode step reads
plain slices of the cache and never gathers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from model.config import GPTConfig


class KVCache:
    def __init__(
        self,
        config: GPTConfig,
        max_batch: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.max_len = max_len or config.block_size
        if self.max_len > config.block_size:
            raise ValueError(
                f"cache length {self.max_len} exceeds the model's block_size {config.block_size}"
            )
        shape = (config.n_layer, max_batch, config.n_head, self.max_len, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = [0] * max_batch

    @property
    def max_batch(self) -> int:
        return len(self.lengths)

    def prefill(self, row: int, length: int) -> CacheStep:
        """Plan a forward that encodes ``length`` tokens from position 0 into ``row``."""
        if length > self.max_len:
            raise ValueError(f"prefill of {length} tokens exceeds the cache length {self.max_len}")
        self.lengths[row] = length
        positions = torch.arange(length, device=self.keys.device)
        return CacheStep(self, slice(row, row + 1), positions.unsqueeze(0), None, None, length)

    def decode(self, batch: int) -> CacheStep:
        """Plan a forward that appends one token to each of rows ``0..batch-1``."""
        lengths = self.lengths[:batch]
        if max(lengths) >= self.max_len:
            raise ValueError("a row of the cache is full; slide its window before decoding")
        device = self.keys.device
        positions = torch.tensor(lengths, device=device)
        end = max(lengths) + 1
        if min(lengths) == end - 1:
            # Every row has the same length (always so at batch 1): a slice write, no mask.
            write: slice | Tensor = slice(end - 1, end)
            mask = None
        else:
            write = positions
            mask = torch.arange(end, device=device) <= positions.unsqueeze(1)
            mask = mask[:, None, None, :]
        for row in range(batch):
            self.lengths[row] += 1
        return CacheStep(self, slice(0, batch), positions.unsqueeze(1), write, mask, end)

    def move_row(self, source: int, target: int) -> None:
        """Copy one sequence's cache to another row (to keep the batch compact)."""
        length = self.lengths[source]
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]
        self.lengths[target] = length
        self.lengths[source] = 0

    def clear_row(self, row: int) -> None:
        self.lengths[row] = 0


@dataclass
class CacheStep:
    """How every layer of one forward writes its new keys/values and what it attends to.

    ``write`` is None for a prefill (positions ``0..T-1``), a slice when all rows append at the
    same position, or a tensor of per-row positions when lengths differ (then ``mask`` hides
    each row's unused tail).
    """

    cache: KVCache
    rows: slice
    positions: Tensor  # (B, T) absolute positions of the new tokens
    write: slice | Tensor | None
    mask: Tensor | None  # (B, 1, 1, end) True where a key may be attended
    end: int  # keys 0..end-1 are read

    def update(
        self, layer: int, k: Tensor, v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None, bool]:
        """Store the new keys/values; return (keys, values, mask, is_causal) to attend with."""
        keys, values = self.cache.keys[layer, self.rows], self.cache.values[layer, self.rows]
        if self.write is None:
            keys[:, :, : self.end] = k
            values[:, :, : self.end] = v
            return k, v, None, True
        if isinstance(self.write, slice):
            keys[:, :, self.write] = k
            values[:, :, self.write] = v
        else:
            batch = torch.arange(k.shape[0], device=k.device)
            keys[batch, :, self.write] = k[:, :, 0]
            values[batch, :, self.write] = v[:, :, 0]
        return keys[:, :, : self.end], values[:, :, : self.end], self.mask, False

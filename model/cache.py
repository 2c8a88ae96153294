"""A preallocated key/value cache whose rows are the sequences of a decoding batch.

Each row holds one sequence; rows may have different lengths, so sequences that started at
different times decode together in one forward. Every forward appends tokens to a contiguous
range of rows: one token each for a decode step, a chunk of a prompt each for a prefill (several
prompts right-padded to the longest, so a burst of arrivals is one forward). The caller keeps
the rows it decodes compact (``move_rows`` closes the gap a finished sequence leaves), so a
forward reads plain slices of the cache and never gathers.

A row's slots hold consecutive positions from its ``offsets`` entry on. With rotary positions a
full row can drop its oldest entries (``drop_oldest``): the keys left keep the rotations of their
positions, and attention only sees differences of positions, so the sequence goes on at the
next position without re-encoding anything.

A forward is planned in one of two ways. ``extend`` plans any forward at the shapes it needs (the
attended length grows with the longest row). ``FixedStep`` plans a decode step at one fixed shape:
a bucket of rows, every row attending over a fixed span of the cache's slots through a length
mask, all from one small tensor of inputs, so that the step can be compiled once per bucket and
span (``model.decode_step``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from model.config import GPTConfig


class KVCache:
    def __init__(
        self,
        config: GPTConfig,
        max_batch: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.max_len = config.block_size
        shape = (config.n_layer, max_batch, config.n_head, self.max_len, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = [0] * max_batch
        self.offsets = [0] * max_batch  # the position of each row's slot 0

    @staticmethod
    def row_bytes(config: GPTConfig, dtype: torch.dtype) -> int:
        """What one row (one sequence) of the cache holds: keys and values of every layer, for
        every position."""
        return 2 * config.n_layer * config.block_size * config.n_embd * dtype.itemsize

    @property
    def max_batch(self) -> int:
        return len(self.lengths)

    def extend(self, first_row: int, starts: list[int], counts: list[int]) -> CacheStep:
        """Plan a forward that writes ``counts[i]`` tokens from position ``starts[i]`` into row
        ``first_row + i`` (the input is right-padded to the largest count); a start of 0
        (re)encodes the row from scratch, a start equal to its length appends to it."""
        rows = slice(first_row, first_row + len(starts))
        if rows.stop > self.max_batch:
            raise ValueError(f"rows {first_row}..{rows.stop - 1} exceed the cache's batch")
        for row, start, count in zip(range(rows.start, rows.stop), starts, counts, strict=True):
            if not 0 <= start <= self.lengths[row] or count < 1:
                raise ValueError(
                    f"row {row} holds {self.lengths[row]} tokens: cannot write {count} from "
                    f"position {start}"
                )
            if start + count > self.max_len:
                raise ValueError(
                    f"row {row}: {start + count} tokens exceed the cache length {self.max_len}; "
                    "slide its window first"
                )
            self.lengths[row] = start + count
        device = self.keys.device
        width = max(counts)
        offsets = torch.arange(width, device=device)
        start_column = torch.tensor(starts, device=device)[:, None]
        # Padding positions are clamped: their embeddings are computed and never read.
        positions = (start_column + offsets).clamp_(max=self.max_len - 1)
        if any(self.offsets[rows]):
            positions += torch.tensor(self.offsets[rows], device=device)[:, None]
        end = max(s + c for s, c in zip(starts, counts, strict=True))
        same_start = min(starts) == max(starts)
        if same_start and starts[0] == 0:
            # Fresh prompts: causal attention over the new tokens alone; right padding comes
            # after every real token, so no real token sees it.
            return CacheStep(self, rows, positions, None, None, end, _last(counts, device))
        if same_start and min(counts) == width:
            write: slice | tuple[Tensor | None, Tensor, Tensor] = slice(
                starts[0], starts[0] + width
            )
        else:
            row_index = torch.arange(len(starts), device=device)[:, None].expand(-1, width)
            key_index = start_column + offsets
            if min(counts) == width:  # no padding: every input is written (a decode step)
                write = (None, row_index.flatten(), key_index.flatten())
            else:
                real = offsets < torch.tensor(counts, device=device)[:, None]
                write = (real, row_index[real], key_index[real])
        mask = None
        if not (same_start and width == 1):  # one new token per row at one position sees all
            key_positions = torch.arange(end, device=device)
            mask = (key_positions <= (start_column + offsets)[:, :, None])[:, None]
        return CacheStep(self, rows, positions, write, mask, end, _last(counts, device))

    def decode(self, batch: int) -> CacheStep:
        """Plan a forward that appends one token to each of rows ``0..batch-1``."""
        return self.extend(0, self.lengths[:batch], [1] * batch)

    def fixed_decode(self, batch: int, bucket: int) -> tuple[list[int], list[int]]:
        """Book a decode step of rows ``0..batch-1`` padded to ``bucket`` rows: the slot each
        row writes and the position of its token, for ``FixedStep``. A padding row writes its
        next free slot, which it has not filled yet (a row waiting for its prefill encodes that
        slot later in the same step), so it spoils nothing."""
        if not batch <= bucket <= self.max_batch:
            raise ValueError(f"cannot pad {batch} rows to {bucket} in a cache of {self.max_batch}")
        slots = self.lengths[:bucket]
        if max(slots[:batch], default=0) >= self.max_len:
            raise ValueError(f"a row fills the cache length {self.max_len}: slide its window first")
        if max(slots[batch:], default=0) >= self.max_len:  # a padding row never fills its cache
            raise ValueError("a row beyond the decoding ones holds a whole window")
        offsets = self.offsets[:bucket]
        positions = [slot + offset for slot, offset in zip(slots, offsets, strict=True)]
        for row in range(batch):
            self.lengths[row] += 1
        return slots, positions

    def move_rows(self, source: slice, target: int) -> None:
        """Copy the sequences in rows ``source`` to the rows from ``target`` on (to keep the
        batch compact); only the filled part of the cache is copied."""
        count = source.stop - source.start
        if count <= 0 or source.start == target:
            return
        length = max(self.lengths[source])
        destination = slice(target, target + count)
        if length:
            for cache in (self.keys, self.values):
                cache[:, destination, :, :length] = cache[:, source, :, :length].clone()
        self.lengths[destination] = self.lengths[source]
        self.offsets[destination] = self.offsets[source]

    def drop_oldest(self, row: int, count: int) -> None:
        """Forget the ``count`` oldest entries of ``row``; the rest move to the front and keep
        their positions (only valid for relative positions: rotary embeddings)."""
        if not 0 < count <= self.lengths[row]:
            raise ValueError(f"row {row} holds {self.lengths[row]} tokens: cannot drop {count}")
        kept = self.lengths[row] - count
        for cache in (self.keys, self.values):
            cache[:, row, :, :kept] = cache[:, row, :, count : count + kept].clone()
        self.lengths[row] = kept
        self.offsets[row] += count

    def clear_row(self, row: int) -> None:
        self.lengths[row] = 0
        self.offsets[row] = 0


def _last(counts: list[int], device: torch.device) -> slice | Tensor:
    """Where each row's last real token is in the padded input."""
    if min(counts) == max(counts):
        return slice(-1, None)
    return torch.tensor(counts, device=device) - 1


class CachePlan(Protocol):
    """What a forward through the cache needs: ``CacheStep`` or ``FixedStep``."""

    positions: Tensor  # (B, T) absolute positions of the new tokens

    def update(
        self, layer: int, k: Tensor, v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None, bool]: ...

    def last_hidden(self, hidden: Tensor) -> Tensor: ...


@dataclass
class CacheStep:
    """How every layer of one forward writes its new keys/values and what it attends to.

    ``write`` is None when every row is encoded from position 0 (the new keys are all there is
    to attend to, causally), a slice when all rows write the same positions, or else which
    inputs are real tokens (B, T; None when none is padding) with their rows and positions;
    ``mask`` then says which keys each query sees.
    """

    cache: KVCache
    rows: slice
    positions: Tensor  # (B, T) absolute positions of the new tokens
    write: slice | tuple[Tensor | None, Tensor, Tensor] | None
    mask: Tensor | None  # (B, 1, T, end) True where a key may be attended
    end: int  # keys 0..end-1 are read
    last: slice | Tensor  # each row's last real token: a slice of T, or one index per row

    def update(
        self, layer: int, k: Tensor, v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None, bool]:
        """Store the new keys/values; return (keys, values, mask, is_causal) to attend with."""
        keys, values = self.cache.keys[layer, self.rows], self.cache.values[layer, self.rows]
        if self.write is None:
            width = k.shape[2]
            keys[:, :, :width] = k
            values[:, :, :width] = v
            return k, v, None, True
        if isinstance(self.write, slice):
            keys[:, :, self.write] = k
            values[:, :, self.write] = v
        else:
            real, rows, positions = self.write
            # (B, heads, T, dim) → the real tokens' (N, heads, dim), in the order of rows/positions
            for cache, new in ((keys, k), (values, v)):
                by_token = new.transpose(1, 2)
                cache[rows, :, positions] = (
                    by_token.flatten(0, 1) if real is None else by_token[real]
                )
        return keys[:, :, : self.end], values[:, :, : self.end], self.mask, False

    def last_hidden(self, hidden: Tensor) -> Tensor:
        """Each row's activations at its last real token: (B, T, C) → (B, C)."""
        if isinstance(self.last, slice):
            return hidden[:, -1]
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), self.last]


class FixedStep:
    """A decode step at a fixed shape: one token for each of a bucket of rows, which attend over
    the first ``span`` slots of the cache (every row's length within it), those beyond their
    own length masked. Built from the cache's tensors, one (3, bucket) tensor of token ids,
    positions and slots (``KVCache.fixed_decode``) and the span, so a compiled graph guards on
    no other Python number. A padding row may write past the span: its output is not read."""

    def __init__(self, keys: Tensor, values: Tensor, inputs: Tensor, span: int) -> None:
        self.keys, self.values, self.span = keys, values, span
        self.tokens, positions, self.slots = inputs.unbind(0)
        self.positions = positions[:, None]
        self.rows = torch.arange(inputs.shape[1], device=inputs.device)
        cache_slots = torch.arange(span, device=inputs.device)
        self.mask = (cache_slots <= self.slots[:, None])[:, None, None, :]

    def update(
        self, layer: int, k: Tensor, v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None, bool]:
        bucket = self.rows.shape[0]
        # (B, heads, 1, dim) → each row's slot, written by one index_put on the whole cache: on
        # a view of it (one layer's), a compiled graph would copy the layer's cache every step.
        where = (self.rows.new_full((bucket,), layer), self.rows, None, self.slots)
        torch.ops.aten.index_put_(self.keys, where, k[:, :, 0])
        torch.ops.aten.index_put_(self.values, where, v[:, :, 0])
        keys = self.keys[layer, :bucket, :, : self.span]
        values = self.values[layer, :bucket, :, : self.span]
        return keys, values, self.mask, False

    def last_hidden(self, hidden: Tensor) -> Tensor:
        return hidden[:, -1]

"""Training batches: random windows of ``block_size + 1`` tokens from a memmapped split, the next
one drawn while the current one computes."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class Batches:
    """Random windows from ``tokens``, as (inputs, targets) on ``device``.

    All processes share one seeded generator and draw the whole global batch, each keeping its
    own slice: the generator's state is then the whole data position, the same on every rank,
    and N processes see exactly the windows one process would with an N-times larger batch.

    ``prefetch()`` draws the next batch ahead, as nanoGPT does between the forward and the
    backward pass: on a GPU the host's gathering and the copy (pinned, non-blocking) then run
    while the device still computes. ``position()`` is the data position as if nothing had been
    drawn ahead, so a run saved with a batch in hand resumes with that same batch."""

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        block_size: int,
        generator: torch.Generator,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(tokens) <= block_size + 1:
            raise ValueError(
                f"a split of {len(tokens):,} tokens is too short for windows of {block_size}"
            )
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size
        self.generator, self.device = generator, device
        self.rank, self.world_size = rank, world_size
        self._ahead: tuple[Tensor, tuple[Tensor, Tensor]] | None = None  # (position, batch)

    def next(self) -> tuple[Tensor, Tensor]:
        """The batch drawn ahead, else a new one."""
        if self._ahead is None:
            return self._draw()
        batch, self._ahead = self._ahead[1], None
        return batch

    def prefetch(self) -> None:
        if self._ahead is None:
            position = self.generator.get_state()
            self._ahead = (position, self._draw())

    def position(self) -> Tensor:
        return self.generator.get_state() if self._ahead is None else self._ahead[0]

    def restore(self, position: Tensor) -> None:
        self.generator.set_state(position)
        self._ahead = None

    def _draw(self) -> tuple[Tensor, Tensor]:
        starts = torch.randint(
            len(self.tokens) - self.block_size,
            (self.batch_size * self.world_size,),
            generator=self.generator,
        )[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        rows = np.stack([self.tokens[s : s + self.block_size + 1] for s in starts.tolist()])
        windows = torch.from_numpy(rows.astype(np.int64))
        if self.device.type == "cuda":
            windows = windows.pin_memory().to(self.device, non_blocking=True)
        return windows[:, :-1], windows[:, 1:]

"""Logits → next token: repetition penalty, temperature, top-k, top-p, a seeded draw.

Every function works on one sequence's logits (a 1-D tensor over the vocabulary) with that
sequence's own ``torch.Generator``: a story depends only on its prompt, its parameters and its
seed, never on which other stories share its batch.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch
from torch import Tensor

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens, and when to stop. ``temperature=0`` is greedy decoding."""

    max_new_tokens: int = 200
    temperature: float = 1.0
    top_k: int | None = None  # keep only the k most likely tokens; None or 0: off
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the sequence (CTRL)
    seed: int | None = None  # None: a fresh random seed, reported with the result
    stop: tuple[str, ...] = ()  # the story ends before the first of these strings

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**63 - 1], got {self.seed}")
        if any(not stop for stop in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def new_generator(
    seed: int | None, device: torch.device | str = "cpu"
) -> tuple[torch.Generator, int]:
    """A generator seeded with ``seed`` (or a fresh random seed), and the seed it used."""
    if seed is None:
        seed = secrets.randbits(63)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator, seed


def apply_repetition_penalty(logits: Tensor, previous: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty: a token already seen has its logit divided by ``penalty`` when positive,
    multiplied when negative, so it always becomes less likely (for penalty > 1)."""
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    logits = logits.clone()
    seen = logits[previous]
    # nan_to_num: a penalty that float32 rounds to 0 or inf must not turn a logit into nan.
    logits[previous] = torch.nan_to_num(torch.where(seen > 0, seen / penalty, seen * penalty))
    return logits


def top_p_mask(sorted_probs: Tensor, top_p: float) -> Tensor:
    """For probabilities sorted in descending order: True where a token falls outside the
    nucleus (the smallest prefix whose total reaches ``top_p``). The top token always stays."""
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    outside = mass_before >= top_p
    outside[..., 0] = False  # even a top_p that float32 rounds to 0 keeps one token to draw
    return outside


def sample_token(
    logits: Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    previous: Tensor | None = None,
) -> Tensor:
    """Pick the next token id (a 0-d tensor) from one sequence's logits over the vocabulary."""
    logits = logits.float()
    if previous is not None:
        logits = apply_repetition_penalty(logits, previous, params.repetition_penalty)
    if params.greedy:
        return logits.max(dim=-1).indices  # argmax, with the same first-index tie rule, faster
    # Extreme but valid settings (a temperature or penalty of 1e-300 is 0 in float32, 1e300 is
    # inf) can give inf or nan logits, and multinomial refuses those. Clamp to the finite range:
    # the draw then goes to the best tokens, the limit those settings tend to.
    logits = torch.nan_to_num(logits / params.temperature, nan=0.0)
    if params.top_k:
        # Only the k best tokens matter from here on: sort and draw among them alone.
        logits, candidates = torch.topk(logits, min(params.top_k, logits.numel()))
    elif params.top_p < 1.0:
        logits, candidates = torch.sort(logits, descending=True)
    else:
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[0]
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        probs = probs.masked_fill(top_p_mask(probs, params.top_p), 0.0)
    return candidates[torch.multinomial(probs, 1, generator=generator)[0]]

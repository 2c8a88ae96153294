"""Logits → next tokens for a whole batch at once: penalties, temperature, top-k, top-p, min-p and
a seeded draw, every row with its own parameters, all as tensor operations.

``BatchSampler`` keeps each row's parameters in tensors that change only when a sequence joins,
leaves or moves, so a decode step samples every row with a handful of batched kernels and no
per-row Python.

Why a seed gives the same story alone or in any batch
-----------------------------------------------------
The random numbers are counter-based, not a generator's stream: the draw for a sequence's n-th
token is a hash of (its seed, n) and, where a draw picks among candidates, of each candidate's
token id. Nothing depends on the row a sequence sits in, its neighbours, or how many draws they
made.

The logits are the other input. A batched forward rounds differently from a lone one (~1e-6), so
the draw must not hinge on the order of near-equal logits:

- With top-k, top-p or min-p the candidates race: each gets an exponential variate keyed on its
  token id, and the token with the largest ``p / E`` wins (the exponential-race form of the
  Gumbel-max trick, which picks token i with probability p_i). Sorting only decides which tokens
  are candidates; two near-equal tokens that swap places in the sort keep their own noise, so the
  winner is unchanged. A token whose logit lies within rounding of a cut-off can fall in or out,
  and that changes the story only if it would have won. (An inverse-CDF draw would not survive
  that: one token in or out shifts every boundary after it.)
- Without filters the draw is the inverse of the cumulative distribution taken in vocabulary
  order (a fixed order, not a sorted one; the running sum in float64 so that its own rounding
  adds nothing): rounding moves the boundaries by ~1e-6, so a draw changes only if its uniform
  lies that close to one. One uniform per row instead of noise for 50,257 tokens keeps it cheap.
- Greedy decoding is an argmax; it differs only if the two best logits are within rounding.

tests/test_generate.py checks exact stories alone against 15 and 63 neighbours on a flat,
untrained model, sampled with top-k and with top-p.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

# Seeds stay within JavaScript's exact integers (Number.MAX_SAFE_INTEGER), so a seed the service
# reports survives JSON.parse in a browser or any JavaScript client and replays the same story.
MAX_SEED = 2**53 - 1
# Rows with top-p or min-p but no top-k look for their nucleus among this many best tokens
# first, and sort the whole vocabulary only when it is not there (a flat distribution).
NUCLEUS_CANDIDATES = 256
# A whole-vocabulary draw finds its token's block of this many tokens first, then the token.
VOCABULARY_BLOCK = 256

# How stories are written unless a request says otherwise: the one set `slm generate`, `slm eval`,
# POST /generate and the playground use (nanoGPT's sample.py settings, which suit models this
# size). The OpenAI routes keep OpenAI's own defaults, which their clients expect.
STORY_TEMPERATURE = 0.8
STORY_TOP_K = 200
# Temperatures below this are greedy decoding (vLLM's rule): dividing by one scales every
# logit of a confident model past float32's range, where they all tie and the draw among them
# would be uniform, the opposite of what a temperature near 0 asks for.
GREEDY_BELOW = 1e-5

_MASK32 = 0xFFFFFFFF
_TWO_TO_MINUS_32 = 2.0**-32
_FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens, when to stop, and what to report. A temperature below GREEDY_BELOW
    (0 included) is greedy decoding; ``max_new_tokens=0`` reads the prompt only (to score it
    with ``prompt_logprobs``)."""

    max_new_tokens: int = 200
    temperature: float = 1.0
    top_k: int | None = None  # keep only the k most likely tokens; None or 0: off
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    min_p: float = 0.0  # drop tokens less likely than min_p × the most likely one's probability
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the sequence (CTRL)
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated so far
    seed: int | None = None  # None: a fresh random seed, reported with the result
    stop: tuple[str, ...] = ()  # the story ends before the first of these strings
    # Log-probabilities of the model's own distribution (before the knobs above) for each
    # generated / prompt token, with this many likeliest alternatives; None: not computed.
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**53 - 1], got {self.seed}")
        if any(not stop for stop in self.stop):
            raise ValueError("stop strings must not be empty")
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0 (or None), got {getattr(self, name)}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def filtered(self) -> bool:
        """Whether the draw picks among candidates (top-k, top-p or min-p) rather than from the
        whole vocabulary."""
        return bool(self.top_k) or self.top_p < 1 or self.min_p > 0

    @property
    def penalised(self) -> bool:
        return (
            self.repetition_penalty != 1
            or self.presence_penalty != 0
            or self.frequency_penalty != 0
        )


def resolve_seed(seed: int | None) -> int:
    """``seed``, or a fresh random one (at most MAX_SEED) to report with the story so that it can
    be replayed."""
    return secrets.randbits(53) if seed is None else seed


def derive_seed(seed: int, index: int) -> int:
    """The seed of a request's ``index``-th completion: the request's own for the first, so one
    completion replays as it would alone; an odd multiple of the golden ratio apart for the
    others, wrapped within MAX_SEED (odd, so distinct indices always get distinct seeds modulo
    2**53)."""
    return (seed + index * 0x9E3779B97F4A7C15) & MAX_SEED


def mix32(x: Tensor | int) -> Tensor | int:
    """A 32-bit integer hash (Wellons' "lowbias32" shape, constants 0x21f0aaad and 0x735a2d97)
    of values in [0, 2**32), on Python ints or int64 tensors alike. Both multipliers are below
    2**31, so no product reaches 2**63: int64 never overflows, and shifts of non-negative values
    are the logical shifts the hash needs."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def seed_key(seed: int) -> int:
    """The 32-bit key every draw of a sequence derives from; seeds below 2**32 get distinct
    keys."""
    return (seed & _MASK32) ^ int(mix32(seed >> 32))


def _float32(value: float) -> float:
    """A setting float32 cannot hold becomes inf (what arithmetic on it would give anyway)."""
    return value if abs(value) <= _FLOAT32_MAX else math.copysign(math.inf, value)


def _unit(bits: Tensor) -> Tensor:
    """32 random bits → a float64 uniform in (0, 1), never 0 or 1."""
    return (bits.double() + 0.5) * _TWO_TO_MINUS_32


@dataclass(frozen=True)
class _Groups:
    """Which rows of a call are greedy, sample from the whole vocabulary, or sample among
    candidates; worked out once per batch composition, not per step."""

    all_greedy: bool
    greedy: bool
    plain: Tensor | slice | None  # the rows (within the call): indices, or all of them
    filtered: Tensor | slice | None
    candidates: int  # how many best tokens the filtered rows need at most
    unbounded: bool  # some filtered row has top-p or min-p but no top-k
    penalised: bool


class BatchSampler:
    """The sampling state of up to ``max_batch`` rows. Rows mirror the KV cache's: ``set_row``
    when a sequence takes a row, ``move_rows`` when rows move, ``observe`` after every draw."""

    def __init__(self, max_batch: int, vocab_size: int, device: torch.device | str = "cpu") -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)

        def column(value: float, dtype: torch.dtype = torch.float32) -> Tensor:
            return torch.full((max_batch,), value, dtype=dtype, device=self.device)

        self.temperature = column(1.0)
        self.top_k = column(0, torch.long)  # 0: off
        self.top_p = column(1.0)
        self.log_min_p = column(-math.inf)  # log(min_p): min-p compares logits
        self.repetition = column(1.0)
        self.presence = column(0.0)
        self.frequency = column(0.0)
        self.keys = column(0, torch.long)
        self.draws = column(0, torch.long)  # how many tokens each row has drawn
        self._params: list[SamplingParams | None] = [None] * max_batch
        # Allocated when the first penalised sequence arrives: tokens in the prompt or story so
        # far (the repetition penalty), and how often each was generated (presence, frequency).
        self._seen: Tensor | None = None
        self._counts: Tensor | None = None
        self._vocabulary_work: Tensor | None = None  # the whole-vocabulary draw's weights
        self._version = 0
        self._groups_cache: tuple[tuple[int, int, int], _Groups] | None = None

    @cached_property
    def _token_noise_keys(self) -> Tensor:
        return mix32(torch.arange(self.vocab_size, device=self.device) + 0x9E3779B9)

    # --- rows ------------------------------------------------------------------------------------

    def set_row(
        self, row: int, params: SamplingParams, seed: int, tokens: list[int], generated: list[int]
    ) -> None:
        """A sequence takes ``row``: its parameters, its seed, and the tokens it has so far."""
        self._params[row] = params
        # A greedy row never divides by its temperature.
        self.temperature[row] = 1.0 if params.greedy else _float32(params.temperature)
        self.top_k[row] = min(params.top_k or 0, self.vocab_size)
        self.top_p[row] = params.top_p
        self.log_min_p[row] = math.log(params.min_p) if params.min_p > 0 else -math.inf
        self.repetition[row] = _float32(params.repetition_penalty)
        self.presence[row] = params.presence_penalty
        self.frequency[row] = params.frequency_penalty
        self.keys[row] = seed_key(seed)
        self.draws[row] = len(generated)
        if params.penalised:
            seen, counts = self._penalty_state()
            seen[row] = False
            seen[row, torch.tensor(tokens, dtype=torch.long, device=self.device)] = True
            counts[row] = 0
            if generated:
                ids = torch.tensor(generated, dtype=torch.long, device=self.device)
                counts[row].index_add_(0, ids, torch.ones_like(ids, dtype=counts.dtype))
        self._version += 1

    def move_rows(self, source: slice, target: int) -> None:
        """Copy rows ``source`` to the rows starting at ``target`` (the batch stays compact)."""
        count = source.stop - source.start
        if count <= 0 or source.start == target:
            return
        destination = slice(target, target + count)
        for state in self._row_tensors():
            state[destination] = state[source].clone()
        self._params[destination] = self._params[source]
        self._version += 1

    def clear_row(self, row: int) -> None:
        self._params[row] = None
        self._version += 1

    def _row_tensors(self) -> list[Tensor]:
        tensors = [
            self.temperature,
            self.top_k,
            self.top_p,
            self.log_min_p,
            self.repetition,
            self.presence,
            self.frequency,
            self.keys,
            self.draws,
        ]
        if self._seen is not None and self._counts is not None:
            tensors += [self._seen, self._counts]
        return tensors

    def _penalty_state(self) -> tuple[Tensor, Tensor]:
        if self._seen is None or self._counts is None:
            shape = (len(self._params), self.vocab_size)
            self._seen = torch.zeros(shape, dtype=torch.bool, device=self.device)
            self._counts = torch.zeros(shape, dtype=torch.int32, device=self.device)
        return self._seen, self._counts

    # --- drawing ---------------------------------------------------------------------------------

    def sample(self, logits: Tensor, rows: slice) -> Tensor:
        """One token per row of ``logits`` (n × vocab), drawn for the sampler rows ``rows``."""
        groups = self._groups(rows)
        logits = logits.float()
        if groups.penalised:
            logits = self._penalise(logits, rows)
        if groups.all_greedy:
            return logits.max(dim=-1).indices  # argmax's first-index rule, several times faster
        if groups.greedy:
            picks = logits.max(dim=-1).indices
        else:
            picks = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        draw_keys = mix32(self.keys[rows] ^ mix32(self.draws[rows]))
        if groups.plain is not None:
            index = groups.plain
            picks[index] = self._draw_from_vocabulary(
                logits[index], self._rows(index, rows), draw_keys[index]
            )
        if groups.filtered is not None:
            index = groups.filtered
            picks[index] = self._draw_among_candidates(
                logits[index], self._rows(index, rows), draw_keys[index], groups
            )
        return picks

    def observe(self, rows: slice, tokens: Tensor) -> None:
        """Record the tokens just drawn for ``rows``: the next draw uses fresh random numbers,
        and the penalties count them."""
        self.draws[rows] += 1
        if self._seen is not None and self._counts is not None:
            column = tokens[:, None]
            self._seen[rows].scatter_(1, column, True)
            self._counts[rows].scatter_add_(1, column, torch.ones_like(column, dtype=torch.int32))

    def _groups(self, rows: slice) -> _Groups:
        cache_key = (rows.start, rows.stop, self._version)
        if self._groups_cache is not None and self._groups_cache[0] == cache_key:
            return self._groups_cache[1]
        params = self._params[rows]
        if any(p is None for p in params):
            raise ValueError(f"sampler rows {rows.start}..{rows.stop - 1} are not all set")
        plain = [i for i, p in enumerate(params) if not p.greedy and not p.filtered]
        filtered = [i for i, p in enumerate(params) if not p.greedy and p.filtered]
        groups = _Groups(
            all_greedy=not plain and not filtered,
            greedy=len(plain) + len(filtered) < len(params),
            plain=self._index(plain, len(params)),
            filtered=self._index(filtered, len(params)),
            candidates=max(
                (min(params[i].top_k or NUCLEUS_CANDIDATES, self.vocab_size) for i in filtered),
                default=0,
            ),
            unbounded=any(not params[i].top_k for i in filtered),
            penalised=any(p.penalised for p in params),
        )
        self._groups_cache = (cache_key, groups)
        return groups

    def _index(self, rows: list[int], count: int) -> Tensor | slice | None:
        """Rows of a call as an index: none, all of them (a slice: no gather), or some."""
        if not rows:
            return None
        if len(rows) == count:
            return slice(None)
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    @staticmethod
    def _rows(index: Tensor | slice, rows: slice) -> Tensor | slice:
        """The sampler rows of a group, from its index within the call."""
        return rows if isinstance(index, slice) else index + rows.start

    def _penalise(self, logits: Tensor, rows: slice) -> Tensor:
        seen, counts = self._penalty_state()
        repetition = self.repetition[rows, None]
        # CTRL's rule: a seen token's logit is divided by the penalty when positive, multiplied
        # when negative, so it always becomes less likely (for a penalty > 1). nan_to_num: a
        # penalty that float32 rounds to 0 or inf must not make a logit nan.
        penalised = torch.nan_to_num(
            torch.where(logits > 0, logits / repetition, logits * repetition)
        )
        logits = torch.where(seen[rows], penalised, logits)
        generated = counts[rows].float()
        return (
            logits
            - self.presence[rows, None] * (generated > 0)
            - self.frequency[rows, None] * generated
        )

    def _scaled(self, logits: Tensor, rows: Tensor | slice, out: Tensor | None = None) -> Tensor:
        """``logits`` over the rows' temperatures, into ``out`` when given.

        Extreme but valid settings (a temperature of 1e300 is inf in float32) can give inf or
        nan logits; clamped to the finite range, the draw goes to the best tokens, the limit
        those settings tend to."""
        scaled = torch.div(logits, self.temperature[rows, None], out=out)
        return torch.nan_to_num_(scaled, nan=0.0)

    def _draw_from_vocabulary(
        self, logits: Tensor, rows: Tensor | slice, draw_keys: Tensor
    ) -> Tensor:
        """Inverse-CDF sampling in vocabulary order, one uniform per row, in two levels: the
        uniform picks a block of VOCABULARY_BLOCK tokens by the blocks' running sum, then a
        token by the running sum inside that block. The running sums are float64: in float32,
        their rounding over 50k terms (~1e-5) would move the boundaries between tokens by far
        more than a batched forward moves the logits (a block's own sum of 256 terms rounds
        at ~1e-7). One running sum over the whole vocabulary would be the same draw, but a
        sequential float64 scan of every token in a fresh buffer cost 9 ms at 16 rows against
        1 ms for greedy (BENCHMARKS.md); the weights are written into a buffer kept for it."""
        count, vocab = logits.shape
        blocks = -(-vocab // VOCABULARY_BLOCK)
        if self._vocabulary_work is None:  # its padding columns stay 0: tokens of no weight
            shape = (len(self._params), blocks * VOCABULARY_BLOCK)
            self._vocabulary_work = torch.zeros(shape, device=self.device)
        work = self._vocabulary_work[:count]
        weights = self._scaled(logits, rows, out=work[:, :vocab])
        weights.sub_(weights.amax(dim=-1, keepdim=True)).exp_()
        by_block = work.view(count, blocks, VOCABULARY_BLOCK)
        block_ends = torch.cumsum(by_block.sum(dim=-1), dim=-1, dtype=torch.float64)
        targets = (_unit(mix32(draw_keys)) * block_ends[:, -1])[:, None]
        block = torch.searchsorted(block_ends, targets).clamp_(max=blocks - 1)
        before = block_ends.gather(1, (block - 1).clamp(min=0)).masked_fill_(block == 0, 0.0)
        inside = torch.cumsum(
            by_block[torch.arange(count, device=work.device), block[:, 0]],
            dim=-1,
            dtype=torch.float64,
        )
        # target - before lies in (0, the block's sum]; min: the block's own running sum may
        # round a hair below that sum, and the draw must stay on a token of the block.
        residual = torch.minimum(targets - before, inside[:, -1:])
        picks = block * VOCABULARY_BLOCK + torch.searchsorted(inside, residual)
        return picks.squeeze(1).clamp_(max=vocab - 1)

    def _draw_among_candidates(
        self, logits: Tensor, rows: Tensor | slice, draw_keys: Tensor, groups: _Groups
    ) -> Tensor:
        """Top-k, then top-p, then min-p, then an exponential race keyed on token ids. A
        temperature does not change which tokens are best, so it scales the candidates only,
        unless a row normalises over the whole vocabulary."""
        top_k, top_p = self.top_k[rows], self.top_p[rows]
        log_min_p = self.log_min_p[rows]
        unbounded = top_k == 0
        whole = None
        if groups.unbounded:
            # Rows without top-k normalise over the whole vocabulary; if their nucleus (or
            # min-p set) reaches past the candidates, sort everything.
            scaled = self._scaled(logits, rows)
            values, tokens = torch.topk(scaled, groups.candidates)
            whole = torch.logsumexp(scaled, dim=-1)
            mass = torch.exp(values - whole[:, None]).sum(dim=-1)
            covered = (mass >= top_p) | (values[:, -1] < values[:, 0] + log_min_p)
            if not bool((covered | ~unbounded).all()):
                values, tokens = torch.sort(scaled, dim=-1, descending=True)
        else:
            values, tokens = torch.topk(logits, groups.candidates)
            values = self._scaled(values, rows)
        rank = torch.arange(values.shape[-1], device=values.device)
        keep = unbounded[:, None] | (rank < top_k[:, None])
        kept = values.masked_fill(~keep, -math.inf)
        normaliser = torch.logsumexp(kept, dim=-1)
        if whole is not None:
            normaliser = torch.where(unbounded, whole, normaliser)
        probs = torch.exp(kept - normaliser[:, None])
        mass_before = torch.cumsum(probs, dim=-1) - probs
        keep &= mass_before < top_p[:, None]
        keep &= values >= values[:, :1] + log_min_p[:, None]
        keep[:, 0] = True  # the best token always stays, whatever float32 does to the cut-offs
        noise = _unit(mix32(draw_keys[:, None] ^ self._token_noise_keys[tokens]))
        race = values.double() - torch.log(-torch.log(noise))  # log(p / E), E ~ Exp(1)
        winners = race.masked_fill(~keep, -math.inf).argmax(dim=-1, keepdim=True)
        return tokens.gather(1, winners).squeeze(1)

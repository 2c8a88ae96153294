"""Sampling rules, checked on crafted logits through the batched sampler."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest
import torch

from model.sampling import MAX_SEED, BatchSampler, SamplingParams, derive_seed, resolve_seed

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def draw(
    params: SamplingParams,
    logits: torch.Tensor = LOGITS,
    n: int = 2000,
    tokens: tuple[int, ...] = (0,),
    generated: tuple[int, ...] = (),
) -> Counter[int]:
    """One draw for each of ``n`` rows with seeds 0..n-1, all in one batched call."""
    sampler = BatchSampler(n, logits.numel())
    for row in range(n):
        sampler.set_row(row, params, row, [*tokens, *generated], list(generated))
    picks = sampler.sample(logits.expand(n, -1), slice(0, n))
    return Counter(picks.tolist())


def draws_of_one_row(params: SamplingParams, logits: torch.Tensor, seed: int, n: int) -> list[int]:
    """``n`` successive draws of one sequence."""
    sampler = BatchSampler(1, logits.numel())
    sampler.set_row(0, params, seed, [0], [])
    picks = []
    for _ in range(n):
        pick = sampler.sample(logits[None], slice(0, 1))
        sampler.observe(slice(0, 1), pick)
        picks.append(int(pick))
    return picks


def test_greedy_picks_the_largest_logit() -> None:
    assert draw(SamplingParams(temperature=0), n=10) == Counter({0: 10})


def test_plain_sampling_follows_the_distribution() -> None:
    counts = draw(SamplingParams(temperature=1.0), n=4000)
    for token, probability in enumerate(PROBS.tolist()):
        assert counts[token] / 4000 == pytest.approx(probability, abs=0.03)


def test_temperature_sharpens_and_flattens() -> None:
    cold = draw(SamplingParams(temperature=0.2))
    hot = draw(SamplingParams(temperature=5.0))
    # p ** (1 / T), renormalised: 0.925 for the top token at T=0.2, 0.19 for the last at T=5.
    assert cold[0] / 2000 == pytest.approx(0.925, abs=0.03)
    assert hot[3] / 2000 == pytest.approx(0.19, abs=0.03)


@pytest.mark.parametrize("filters", [{}, {"top_k": 3}, {"top_p": 0.99}])
def test_a_temperature_near_zero_is_greedy(filters) -> None:
    # Divided by 1e-40, every positive logit passes float32's range; they would all tie.
    logits = torch.tensor([1.0, 0.5, 3.0, 2.0])
    assert draw(SamplingParams(temperature=1e-40, **filters), logits, n=200) == Counter({2: 200})


def test_top_k_keeps_only_the_k_best_in_proportion() -> None:
    counts = draw(SamplingParams(top_k=2), n=4000)
    assert set(counts) == {0, 1}
    assert counts[0] / 4000 == pytest.approx(0.5 / 0.8, abs=0.03)
    assert set(draw(SamplingParams(top_k=0))) == {0, 1, 2, 3}  # 0 disables it


def test_top_p_keeps_the_smallest_nucleus_reaching_p() -> None:
    assert set(draw(SamplingParams(top_p=0.8))) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert set(draw(SamplingParams(top_p=0.81))) == {0, 1, 2}
    assert set(draw(SamplingParams(top_p=0.1))) == {0}  # the top token always stays
    assert set(draw(SamplingParams(top_k=3, top_p=0.8))) == {0, 1}  # both filters apply
    counts = draw(SamplingParams(top_p=0.81), n=4000)
    assert counts[2] / 4000 == pytest.approx(0.15 / 0.95, abs=0.03)


def test_top_p_reaches_past_the_first_candidates_on_a_flat_distribution() -> None:
    # 2,000 near-equal tokens: a 0.99 nucleus holds ~1,980 of them, far beyond the 256 best
    # that the sampler looks at first, so it must fall back to sorting the whole vocabulary.
    logits = torch.randn(2000, generator=torch.Generator().manual_seed(0)) * 0.01
    rank = logits.argsort(descending=True).argsort()
    counts = draw(SamplingParams(top_p=0.99), logits, n=3000)
    assert max(rank[token] for token in counts) > 1000


def test_min_p_drops_tokens_below_a_share_of_the_best() -> None:
    assert set(draw(SamplingParams(min_p=0.2))) == {0, 1, 2}  # 0.15 ≥ 0.2 × 0.5 > 0.05
    assert set(draw(SamplingParams(min_p=0.7))) == {0}  # 0.3 < 0.35
    assert set(draw(SamplingParams(min_p=0.0))) == {0, 1, 2, 3}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([2.0, -1.0, 1.5, 0.5])
    greedy = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert draw(greedy, logits, n=1, tokens=(0,)) == Counter({2: 1})  # 2.0 → 1.0 < 1.5
    assert draw(greedy, logits, n=1, tokens=(3,)) == Counter({0: 1})
    negative = torch.tensor([-1.0, -1.5, -3.0, -4.0])
    assert draw(greedy, negative, n=1, tokens=(0,)) == Counter({1: 1})  # -1 → -2 < -1.5


def test_presence_penalty_counts_a_generated_token_once() -> None:
    logits = torch.tensor([2.0, 1.8, 0.0, 0.0])
    greedy = SamplingParams(temperature=0, presence_penalty=0.5)
    assert draw(greedy, logits, n=1, generated=(0,)) == Counter({1: 1})  # 2.0 - 0.5 < 1.8
    assert draw(greedy, logits, n=1, generated=(0, 0, 0)) == Counter({1: 1})
    assert draw(greedy, logits, n=1, tokens=(0,)) == Counter({0: 1})  # the prompt is exempt


def test_frequency_penalty_grows_with_each_repeat() -> None:
    logits = torch.tensor([2.0, 1.8, 0.0, 0.0])
    greedy = SamplingParams(temperature=0, frequency_penalty=0.1)
    assert draw(greedy, logits, n=1, generated=(0,)) == Counter({0: 1})  # 1.9 > 1.8
    assert draw(greedy, logits, n=1, generated=(0, 0, 0)) == Counter({1: 1})  # 1.7 < 1.8


def test_penalties_count_tokens_as_the_story_is_drawn() -> None:
    logits = torch.tensor([2.0, 1.9, 1.8, 1.7])
    params = SamplingParams(temperature=0, presence_penalty=1.0)
    assert draws_of_one_row(params, logits, seed=0, n=4) == [0, 1, 2, 3]


def test_every_row_samples_with_its_own_parameters() -> None:
    sampler = BatchSampler(4, 4)
    rows = [
        SamplingParams(temperature=0),
        SamplingParams(top_k=1),
        SamplingParams(temperature=0, repetition_penalty=10.0),
        SamplingParams(min_p=0.9),
    ]
    for row, params in enumerate(rows):
        sampler.set_row(row, params, row, [0], [])
    logits = torch.tensor([3.0, 2.9, 0.0, -1.0]).expand(4, -1)
    assert sampler.sample(logits, slice(0, 4)).tolist() == [0, 0, 1, 0]


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 5e-324},  # 0 in float32: logits / 0
        {"temperature": 1e300},  # inf in float32
        {"repetition_penalty": 5e-324},
        {"repetition_penalty": 1e308},
        {"temperature": 1e-30, "top_k": 2},
        {"temperature": 1e-30, "top_p": 0.5},
        {"temperature": 1e-30, "min_p": 0.5},
        {"top_p": 1e-50},  # 0 in float32: the nucleus must still keep the top token
        {"min_p": 1.0},
    ],
)
def test_extreme_valid_settings_still_draw_a_token(change) -> None:
    # Found by tests/test_fuzz.py: these made a draw raise, failing every story in the batch.
    logits = torch.tensor([2.0, -1.0, 0.0, 0.5])
    counts = draw(SamplingParams(**change), logits, n=50, tokens=(0, 1, 2))
    assert sum(counts.values()) == 50 and set(counts) <= {0, 1, 2, 3}


def test_same_seed_same_draws_and_another_seed_differs() -> None:
    logits = torch.randn(50257, generator=torch.Generator().manual_seed(0))
    for params in (SamplingParams(), SamplingParams(top_k=50), SamplingParams(top_p=0.9)):
        assert draws_of_one_row(params, logits, 7, 20) == draws_of_one_row(params, logits, 7, 20)
        assert draws_of_one_row(params, logits, 7, 20) != draws_of_one_row(params, logits, 8, 20)


def test_a_draw_does_not_depend_on_the_order_of_near_equal_logits() -> None:
    # What a batched forward does to a row: rounding moves logits by ~1e-6 and reorders
    # near-ties. Keyed on token ids, the race picks the same tokens.
    generator = torch.Generator().manual_seed(1)
    flat = torch.randn(5000, generator=generator) * 0.05
    logits = torch.stack([flat, flat + 1e-7], dim=1).flatten()  # 5,000 near-equal pairs
    nudged = logits + torch.randn(logits.shape, generator=generator) * 1e-6
    assert (logits.argsort() != nudged.argsort()).sum() > 1000
    for params in (
        SamplingParams(top_k=40),
        SamplingParams(top_p=0.9),
        SamplingParams(min_p=0.9),
        SamplingParams(),
    ):
        params = replace(params, temperature=0.8)
        assert draw(params, logits, n=500) == draw(params, nudged, n=500)


def test_a_fresh_seed_is_reported_so_a_sample_can_be_replayed() -> None:
    seed_a, seed_b = resolve_seed(None), resolve_seed(None)
    assert seed_a != seed_b and 0 <= seed_a < 2**63
    assert resolve_seed(5) == 5


def test_seeds_stay_within_javascripts_exact_integers() -> None:
    """A seed above 2**53 - 1 would reach a browser rounded, and the "same" seed write another
    story: fresh, derived and accepted seeds all stay at or below Number.MAX_SAFE_INTEGER."""
    assert MAX_SEED == 2**53 - 1
    assert all(0 <= resolve_seed(None) <= MAX_SEED for _ in range(2000))
    for seed in (0, 7, MAX_SEED - 1, MAX_SEED):
        assert derive_seed(seed, 0) == seed
        derived = [derive_seed(seed, i) for i in range(64)]
        assert all(0 <= value <= MAX_SEED for value in derived)
        assert len(set(derived)) == 64
    SamplingParams(seed=MAX_SEED)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=MAX_SEED + 1)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.1, "temperature"),
        ("temperature", math.nan, "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("top_k", -1, "top_k"),
        ("min_p", -0.1, "min_p"),
        ("min_p", 1.5, "min_p"),
        ("max_new_tokens", -1, "max_new_tokens"),
        ("repetition_penalty", 0.0, "repetition_penalty"),
        ("presence_penalty", 2.5, "presence_penalty"),
        ("frequency_penalty", -3.0, "frequency_penalty"),
        ("seed", -1, "seed"),
        ("stop", ("",), "stop strings"),
    ],
)
def test_invalid_parameters_are_refused_with_the_field_named(field, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})

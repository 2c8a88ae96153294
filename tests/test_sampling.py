"""Sampling rules, checked on crafted logits."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from model.sampling import SamplingParams, apply_repetition_penalty, new_generator, sample_token

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def draw(params: SamplingParams, logits: torch.Tensor = LOGITS, n: int = 2000, previous=None):
    generator, _ = new_generator(1234)
    return Counter(int(sample_token(logits, params, generator, previous)) for _ in range(n))


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


def test_top_k_keeps_only_the_k_best() -> None:
    counts = draw(SamplingParams(top_k=2))
    assert set(counts) == {0, 1}
    assert counts[0] / sum(counts.values()) == pytest.approx(0.5 / 0.8, abs=0.04)
    assert set(draw(SamplingParams(top_k=0))) == {0, 1, 2, 3}  # 0 disables it


def test_top_p_keeps_the_smallest_nucleus_reaching_p() -> None:
    assert set(draw(SamplingParams(top_p=0.8))) == {0, 1}  # 0.5 + 0.3 reaches 0.8
    assert set(draw(SamplingParams(top_p=0.81))) == {0, 1, 2}
    assert set(draw(SamplingParams(top_p=0.1))) == {0}  # the top token always stays
    assert set(draw(SamplingParams(top_k=3, top_p=0.8))) == {0, 1}  # both filters apply


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([2.0, -1.0, 1.5, 0.5])
    penalised = apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert penalised.tolist() == [1.0, -2.0, 1.5, 0.5]
    assert logits.tolist() == [2.0, -1.0, 1.5, 0.5]  # the input is left alone
    greedy = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert draw(greedy, logits, n=1, previous=torch.tensor([0])) == Counter({2: 1})


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 5e-324},  # 0 in float32: logits / 0
        {"temperature": 1e300},  # inf in float32
        {"repetition_penalty": 5e-324},
        {"repetition_penalty": 1e308},
        {"temperature": 1e-30, "top_k": 2},
        {"temperature": 1e-30, "top_p": 0.5},
        {"top_p": 1e-50},  # 0 in float32: the nucleus must still keep the top token
    ],
)
def test_extreme_valid_settings_still_draw_a_token(change) -> None:
    # Found by tests/test_fuzz.py: these made multinomial raise, failing every story in the batch.
    logits = torch.tensor([2.0, -1.0, 0.0, 0.5])
    params = SamplingParams(**change)
    counts = draw(params, logits, n=50, previous=torch.tensor([0, 1, 2]))
    assert sum(counts.values()) == 50 and set(counts) <= {0, 1, 2, 3}


def test_same_seed_same_sample_and_another_seed_differs() -> None:
    logits = torch.randn(50257, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0)

    def sample(seed: int) -> list[int]:
        generator, _ = new_generator(seed)
        return [int(sample_token(logits, params, generator)) for _ in range(20)]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_a_fresh_seed_is_reported_so_a_sample_can_be_replayed() -> None:
    _, seed_a = new_generator(None)
    _, seed_b = new_generator(None)
    assert seed_a != seed_b and 0 <= seed_a < 2**63


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.1, "temperature"),
        ("temperature", math.nan, "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("top_k", -1, "top_k"),
        ("max_new_tokens", 0, "max_new_tokens"),
        ("repetition_penalty", 0.0, "repetition_penalty"),
        ("seed", -1, "seed"),
        ("stop", ("",), "stop strings"),
    ],
)
def test_invalid_parameters_are_refused_with_the_field_named(field, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})

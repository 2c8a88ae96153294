"""KV-cached decoding gives exactly what a full forward gives."""

from __future__ import annotations

import torch

from model import preset
from model.cache import KVCache
from model.generate import BatchGenerator
from model.sampling import SamplingParams
from tests.conftest import sharp_model


def full_logits(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0][0]


def test_cached_decoding_matches_full_forward_at_every_position_batched() -> None:
    torch.manual_seed(1)
    config = preset("tiny", bias=False)
    model = sharp_model(config)
    head = model.lm_head.weight
    # Three sequences of different lengths, prefilled separately, then decoded together.
    sequences = [torch.randint(0, 50257, (n,)).tolist() for n in (40, 30, 33)]
    prompt_lengths = [5, 17, 1]
    cache = KVCache(config, max_batch=3)
    with torch.no_grad():
        for row, (tokens, length) in enumerate(zip(sequences, prompt_lengths, strict=True)):
            hidden = model.forward_cached(
                torch.tensor([tokens[:length]]), cache.prefill(row, length)
            )
            expected = full_logits(model, tokens[:length])[-1]
            torch.testing.assert_close(hidden @ head.t(), expected[None], atol=1e-5, rtol=0)
        steps = min(len(t) - p for t, p in zip(sequences, prompt_lengths, strict=True))
        for step in range(steps):
            positions = [p + step for p in prompt_lengths]
            idx = torch.tensor([[t[pos]] for t, pos in zip(sequences, positions, strict=True)])
            logits = model.forward_cached(idx, cache.decode(3)) @ head.t()
            for row, (tokens, pos) in enumerate(zip(sequences, positions, strict=True)):
                expected = full_logits(model, tokens[: pos + 1])[-1]
                torch.testing.assert_close(logits[row], expected, atol=1e-5, rtol=0)


def test_moving_a_row_keeps_its_sequence_intact() -> None:
    config = preset("tiny")
    model = sharp_model(config)
    tokens = list(range(1000, 1012))
    cache = KVCache(config, max_batch=2)
    with torch.no_grad():
        model.forward_cached(torch.tensor([tokens[:10]]), cache.prefill(1, 10))
        cache.move_row(1, 0)
        logits = model.forward_cached(torch.tensor([[tokens[10]]]), cache.decode(1))
    expected = full_logits(model, tokens[:11])[-1]
    torch.testing.assert_close((logits @ model.lm_head.weight.t())[0], expected, atol=1e-5, rtol=0)
    assert cache.lengths == [11, 0]


def greedy(max_new_tokens: int = 90) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0)


def run_to_end(generator: BatchGenerator, prompts: list[list[int]], params) -> list[list[int]]:
    sequences = [generator.add(prompt, p)[0] for prompt, p in zip(prompts, params, strict=True)]
    while generator.rows:
        generator.step()
    return [s.generated for s in sequences]


def test_greedy_with_cache_is_token_identical_to_greedy_without(tiny_model, tokenizer) -> None:
    # Prompts of different lengths, and 90 new tokens: past the tiny model's 64-token window,
    # so the sliding window is exercised on both paths too.
    prompts = [tokenizer.encode(text) for text in ("Once upon a time", "The cat", "Lily saw a big")]
    params = [greedy()] * 3
    cached = run_to_end(BatchGenerator(tiny_model, max_batch=3), prompts, params)
    uncached = run_to_end(BatchGenerator(tiny_model, max_batch=3, use_cache=False), prompts, params)
    assert cached == uncached
    assert all(len(tokens) == 90 for tokens in cached)

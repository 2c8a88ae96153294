"""KV-cached decoding gives exactly what a full forward gives."""

from __future__ import annotations

import pytest
import torch
from weights import sharp_model

from model import preset
from model.cache import KVCache
from model.generate import BatchGenerator
from model.sampling import SamplingParams


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
                torch.tensor([tokens[:length]]), cache.extend(row, [0], [length])
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
        model.forward_cached(torch.tensor([tokens[:10]]), cache.extend(1, [0], [10]))
        cache.move_rows(slice(1, 2), 0)
        logits = model.forward_cached(torch.tensor([[tokens[10]]]), cache.decode(1))
    expected = full_logits(model, tokens[:11])[-1]
    torch.testing.assert_close((logits @ model.lm_head.weight.t())[0], expected, atol=1e-5, rtol=0)
    assert cache.lengths[0] == 11


def test_one_padded_forward_encodes_prompts_and_chunks_exactly() -> None:
    # Rows 0-1 hold 7 and 4 tokens already; one forward appends a 5-token chunk to row 0, a
    # 2-token chunk to row 1 and a fresh 6-token prompt to row 2 (right-padded to 6).
    torch.manual_seed(2)
    config = preset("tiny")
    model = sharp_model(config)
    head = model.lm_head.weight
    sequences = [torch.randint(0, 50257, (n,)).tolist() for n in (12, 6, 6)]
    cache = KVCache(config, max_batch=3)
    with torch.no_grad():
        model.forward_cached(
            torch.tensor([sequences[0][:7], sequences[1][:4] + [0] * 3]),
            cache.extend(0, [0, 0], [7, 4]),
        )
        chunks = [[*sequences[0][7:12], 0], sequences[1][4:6] + [0] * 4, sequences[2]]
        hidden = model.forward_cached(torch.tensor(chunks), cache.extend(0, [7, 4, 0], [5, 2, 6]))
        for row, tokens in enumerate(sequences):
            expected = full_logits(model, tokens)[-1]
            torch.testing.assert_close(hidden[row] @ head.t(), expected, atol=1e-5, rtol=0)
        assert cache.lengths == [12, 6, 6]
        # and the rows decode on from there
        step = [[sequences[0][-1]], [sequences[1][-1]], [sequences[2][-1]]]
        logits = model.forward_cached(torch.tensor(step), cache.decode(3)) @ head.t()
        for row, tokens in enumerate(sequences):
            expected = full_logits(model, tokens + tokens[-1:])[-1]
            torch.testing.assert_close(logits[row], expected, atol=1e-5, rtol=0)


def test_writing_past_the_cache_is_refused() -> None:
    cache = KVCache(preset("tiny"), max_batch=1)
    cache.extend(0, [0], [60])
    with pytest.raises(ValueError, match="slide its window"):
        cache.extend(0, [60], [5])
    with pytest.raises(ValueError, match="holds 60 tokens"):
        cache.extend(0, [61], [1])


def greedy(max_new_tokens: int = 90) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0)


def run_to_end(generator: BatchGenerator, prompts: list[list[int]], params) -> list[list[int]]:
    sequences = [generator.add(prompt, p) for prompt, p in zip(prompts, params, strict=True)]
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


def test_a_rotary_row_drops_its_oldest_entries_and_decodes_on_at_the_next_position() -> None:
    # One layer: every cached key depends on its own token and position alone, so after the
    # drop the row must give exactly what a fresh forward of the tokens it kept gives.
    torch.manual_seed(3)
    config = preset("tiny", n_layer=1, position="rotary", norm="rmsnorm", activation="swiglu")
    model = sharp_model(config)
    tokens = torch.randint(0, 50257, (65,)).tolist()
    cache = KVCache(config, max_batch=1)
    with torch.no_grad():
        model.forward_cached(torch.tensor([tokens[:64]]), cache.extend(0, [0], [64]))
        cache.drop_oldest(0, 16)
        assert cache.lengths == [48] and cache.offsets == [16]
        hidden = model.forward_cached(torch.tensor([tokens[64:]]), cache.decode(1))
    expected = full_logits(model, tokens[16:])[-1]
    torch.testing.assert_close((hidden @ model.lm_head.weight.t())[0], expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="cannot drop 50"):
        cache.drop_oldest(0, 50)


def test_rotary_stories_slide_in_the_cache_without_reencoding(tokenizer) -> None:
    # One layer again, so sliding in the cache and re-encoding the kept window agree exactly.
    config = preset("tiny", n_layer=1, position="rotary", norm="rmsnorm", activation="swiglu")
    model = sharp_model(config)
    prompts = [tokenizer.encode(text) for text in ("Once upon a time", "The cat")]
    params = [greedy(150)] * 2
    generator = BatchGenerator(model, max_batch=2)
    cached = run_to_end(generator, prompts, params)
    uncached = run_to_end(BatchGenerator(model, max_batch=2, use_cache=False), prompts, params)
    assert cached == uncached and all(len(tokens) == 150 for tokens in cached)
    # No prefill after the prompts: the rows' windows moved in the cache (offsets > 0).
    generator.add(prompts[0], greedy(150))
    prefills = 0
    while generator.rows:
        prefills += generator.decoding == 0
        generator.step()
        if generator.rows:
            assert generator.decoding == 1  # never sent back to the prefill queue
    assert prefills == 1

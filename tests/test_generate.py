"""Generation as users see it: stories, stops, batching, windows."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from weights import sharp_model

from model import GPT, preset
from model.generate import (
    BatchGenerator,
    StopStrings,
    complete,
    generate,
    scored_tokens,
    token_logprobs,
)
from model.sampling import SamplingParams

PROMPTS = [
    "Once upon a time",
    "Tom had a red ball.",
    "The sun",
    "Lily and her mom went to the park. They saw",
]


def run_to_end(generator: BatchGenerator, requests):
    sequences = [generator.add(generator.encode_prompt(p), params) for p, params in requests]
    while generator.rows:
        generator.step()
    return sequences


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_story_is_the_same_alone_or_among_fifteen_others(tiny_model, temperature) -> None:
    params = SamplingParams(max_new_tokens=40, temperature=temperature, top_k=50, seed=42)
    (alone,) = run_to_end(BatchGenerator(tiny_model), [(PROMPTS[0], params)])
    crowd = [
        (PROMPTS[i % 4] + " x" * i, SamplingParams(max_new_tokens=30 + i, seed=i))
        for i in range(15)
    ]
    batched = run_to_end(
        BatchGenerator(tiny_model, max_batch=16), [*crowd[:7], (PROMPTS[0], params), *crowd[7:]]
    )
    assert batched[7].generated == alone.generated
    assert len(alone.generated) == 40


def flat_model() -> GPT:
    """A freshly initialised model: near-uniform logits, where batched float rounding reorders
    near-equal tokens at every step (what a briefly trained model also looks like)."""
    torch.manual_seed(0)
    return GPT(preset("tiny")).eval()


NEIGHBOUR_PARAMS = [
    SamplingParams(max_new_tokens=50, temperature=0),
    SamplingParams(max_new_tokens=70, temperature=1.0),
    SamplingParams(max_new_tokens=30, temperature=0.7, top_k=5, repetition_penalty=1.2),
    SamplingParams(max_new_tokens=90, temperature=0.9, top_p=0.5, min_p=0.1),
    SamplingParams(max_new_tokens=60, temperature=1.1, presence_penalty=1.0, frequency_penalty=0.5),
]


FLAT_CASES = {  # top-p and top-k against 15 and 63 neighbours; every other knob against 15
    "top-p": SamplingParams(max_new_tokens=80, temperature=0.9, top_p=0.95),
    "top-k": SamplingParams(max_new_tokens=80, temperature=0.9, top_k=50),
    "plain": SamplingParams(max_new_tokens=80, temperature=0.8),
    "min-p": SamplingParams(max_new_tokens=80, temperature=0.9, min_p=0.0001),
    "penalties": SamplingParams(max_new_tokens=80, temperature=0.9, frequency_penalty=1.0),
}


@pytest.mark.parametrize(
    ("case", "neighbours"),
    [(case, 15) for case in FLAT_CASES] + [("top-p", 63), ("top-k", 63)],
)
def test_seeded_stories_on_a_flat_model_are_the_same_alone_or_among_neighbours(
    case, neighbours
) -> None:
    # Six seeded stories, each told alone, then together with the others and with neighbours
    # that use every other knob, some already decoding when they arrive.
    model = flat_model()
    stories = [(PROMPTS[seed % 4], replace(FLAT_CASES[case], seed=seed)) for seed in range(6)]
    alone = [run_to_end(BatchGenerator(model), [story])[0] for story in stories]
    generator = BatchGenerator(model, max_batch=neighbours + 1, prefill_tokens=64)
    crowd = [
        (PROMPTS[i % 4] + " x" * i, replace(NEIGHBOUR_PARAMS[i % 5], seed=100 + i))
        for i in range(neighbours + 1 - len(stories))
    ]
    early = crowd[: len(crowd) // 2]
    for prompt, neighbour_params in early:
        generator.add(generator.encode_prompt(prompt), neighbour_params)
    for _ in range(3):
        generator.step()
    batched = run_to_end(generator, [*stories, *crowd[len(early) :]])[: len(stories)]
    assert [s.generated for s in batched] == [s.generated for s in alone]
    assert all(len(s.generated) == 80 for s in alone)  # past the 64-token window: slides too


def test_a_long_prompt_is_prefilled_in_chunks_while_running_stories_keep_streaming(
    tiny_model, tokenizer
) -> None:
    generator = BatchGenerator(tiny_model, max_batch=2, prefill_tokens=16)
    running = generator.add(tokenizer.encode("Once"), SamplingParams(max_new_tokens=200))
    generator.step()
    long_prompt = tokenizer.encode(" ".join(["the cat sat on the mat"] * 9))[:60]
    arriving = generator.add(long_prompt, SamplingParams(max_new_tokens=5, temperature=0))
    steps = 0
    while not arriving.generated:
        events = generator.step()
        steps += 1
        assert [e.sequence_id for e in events if e.sequence_id == running.id] == [running.id]
    assert steps == 4  # 60 tokens in chunks of at most 16
    solo = BatchGenerator(tiny_model)
    (expected,) = run_to_end(solo, [(tokenizer.decode(long_prompt), arriving.params)])
    while generator.rows:
        generator.step()
    assert arriving.generated == expected.generated


def test_arrivals_are_prefilled_together_within_the_token_budget(tiny_model, tokenizer) -> None:
    generator = BatchGenerator(tiny_model, max_batch=12, prefill_tokens=32)
    params = SamplingParams(max_new_tokens=50, temperature=0)
    running = generator.add(tokenizer.encode("Once"), params)
    generator.step()
    prompt = tokenizer.encode("Once upon a time there was a dog")  # 8 tokens
    arrivals = [generator.add(prompt, params) for _ in range(6)]
    first = generator.step()  # 4 prompts × 8 tokens fill one forward's 32
    assert sorted(e.sequence_id for e in first) == [running.id] + [s.id for s in arrivals[:4]]
    second = generator.step()  # the 4 decode, the other 2 join them
    assert sorted(e.sequence_id for e in second) == [running.id] + [s.id for s in arrivals]
    assert arrivals[5].generated == arrivals[0].generated[:1]


def test_with_nothing_decoding_a_prefill_takes_four_budgets(tiny_model, tokenizer) -> None:
    generator = BatchGenerator(tiny_model, max_batch=20, prefill_tokens=32)
    prompt = tokenizer.encode("Once upon a time there was a dog")  # 8 tokens
    arrivals = [generator.add(prompt, SamplingParams(max_new_tokens=5)) for _ in range(20)]
    first = generator.step()  # no stream waits: 16 prompts × 8 tokens, four budgets of 32
    assert sorted(e.sequence_id for e in first) == [s.id for s in arrivals[:16]]


def test_same_seed_same_story_and_another_seed_another(tiny_model) -> None:
    def story(seed: int) -> str:
        return complete(
            tiny_model, "Once upon a time", SamplingParams(max_new_tokens=30, seed=seed)
        ).text

    assert story(3) == story(3)
    assert story(3) != story(4)


def test_result_reports_the_seed_that_replays_it(tiny_model) -> None:
    first = complete(tiny_model, "The dog", SamplingParams(max_new_tokens=20))
    replay = complete(tiny_model, "The dog", SamplingParams(max_new_tokens=20, seed=first.seed))
    assert replay.token_ids == first.token_ids


def test_max_new_tokens_ends_with_finish_reason_length(tiny_model) -> None:
    result = complete(tiny_model, "Once", SamplingParams(max_new_tokens=7, temperature=0))
    assert result.finish_reason == "length"
    assert len(result.token_ids) == 7


def test_end_of_text_ends_the_story_and_is_not_part_of_it(tokenizer) -> None:
    model = sharp_model(preset("tiny"))
    with torch.no_grad():  # every position's final activation now points at <|endoftext|>
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[tokenizer.eot_id] * 10)
    events = list(
        generate(model, "Once upon a time", SamplingParams(max_new_tokens=50, temperature=0))
    )
    assert [(e.token_id, e.text, e.finish_reason) for e in events] == [(None, "", "end_of_text")]
    # A client asking for logprobs still gets the drawn <|endoftext|>'s: scoring clients (lm-eval)
    # count one entry per token drawn and cut the last one off.
    params = SamplingParams(max_new_tokens=1, temperature=0, logprobs=1, prompt_logprobs=1)
    generator = BatchGenerator(model)
    sequence = generator.add(tokenizer.encode("Once upon a time"), params)
    (event,) = generator.step()
    assert event.token_id is None and event.logprob is not None
    assert event.logprob.token_id == tokenizer.eot_id
    assert event.logprob.top[0][0] == tokenizer.eot_id
    assert len(sequence.prompt_logprobs) == 4 and sequence.prompt_logprobs[0] is None


def test_prompt_logprobs_are_the_models_whatever_the_chunking(tiny_model, tokenizer) -> None:
    """A prompt scored in chunks of a small prefill budget, beside others, gets the
    log-probabilities of one plain forward."""
    ids = tokenizer.encode("Once upon a time there was a girl named Lily who loved the sea. " * 3)
    with torch.no_grad():
        logits, _ = tiny_model(torch.tensor([ids]))
    expected = torch.log_softmax(logits[0], dim=-1)
    expected = [expected[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    generator = BatchGenerator(tiny_model, max_batch=3, prefill_tokens=16)
    scored = SamplingParams(max_new_tokens=0, prompt_logprobs=0)
    generator.add(ids[:5], SamplingParams(max_new_tokens=40))
    first = generator.add(ids, scored)
    second = generator.add(ids[:9], scored)
    while generator.rows:
        generator.step()
    assert first.finish_reason == second.finish_reason == "length"
    assert first.generated == second.generated == []
    assert [s.logprob for s in first.prompt_logprobs[1:]] == pytest.approx(expected, abs=1e-4)
    assert [s.logprob for s in second.prompt_logprobs[1:]] == pytest.approx(expected[:8], abs=1e-4)
    too_long = [1] * (tiny_model.config.block_size + 1)
    with pytest.raises(ValueError, match="block_size"):
        generator.add(too_long, scored)


def test_stop_string_ends_the_story_before_it_and_is_never_streamed(tiny_model) -> None:
    free = complete(
        tiny_model, "Once upon a time", SamplingParams(max_new_tokens=60, temperature=0)
    )
    stop = free.text[25:29]
    expected = free.text[: free.text.find(stop)]
    params = SamplingParams(max_new_tokens=60, temperature=0, stop=("never appears", stop))
    events = list(generate(tiny_model, "Once upon a time", params))
    assert "".join(e.text for e in events) == expected
    assert events[-1].finish_reason == "stop"
    assert all(stop not in e.text for e in events)


def test_stop_strings_hold_back_partial_matches() -> None:
    stops = StopStrings(("o w", "xyz"))
    assert stops.push("Hel") == ("Hel", False)
    assert stops.push("lo") == ("l", False)  # "o" could start "o w"
    assert stops.push(" wor") == ("", True)  # the held "o" began the stop string
    tail = StopStrings(("xyz",))
    assert tail.push("abcx") == ("abc", False)
    assert tail.flush() == "x"  # the story ended: what was held is released


def test_streamed_pieces_join_to_the_full_decode(tiny_model, tokenizer) -> None:
    # A random model emits arbitrary byte-level tokens, broken UTF-8 included.
    for seed in range(5):
        params = SamplingParams(max_new_tokens=60, temperature=1.5, seed=seed)
        events = list(generate(tiny_model, "😀 日本語 café", params))
        ids = [e.token_id for e in events if e.token_id is not None]
        assert "".join(e.text for e in events) == tokenizer.decode(ids)


def test_a_prompt_longer_than_the_window_keeps_its_last_tokens(tiny_model, tokenizer) -> None:
    prompt = tokenizer.encode(" ".join(["the cat sat on the mat"] * 30))
    assert len(prompt) > 64
    params = SamplingParams(max_new_tokens=10, temperature=0)
    generator = BatchGenerator(tiny_model)
    long = generator.add(prompt, params)
    while generator.rows:
        generator.step()
    short = generator.add(prompt[-64:], params)
    while generator.rows:
        generator.step()
    assert long.prompt_truncated and not short.prompt_truncated
    assert long.generated == short.generated


def test_stories_longer_than_the_window_keep_going(tiny_model) -> None:
    result = complete(
        tiny_model, "Once", SamplingParams(max_new_tokens=300, temperature=0.8, seed=1)
    )
    assert result.finish_reason in ("length", "end_of_text")
    assert len(result.token_ids) == 300 or result.finish_reason == "end_of_text"


def test_newcomers_join_and_leavers_do_not_disturb_the_batch(tiny_model) -> None:
    params = SamplingParams(max_new_tokens=30, temperature=0)
    (solo,) = run_to_end(BatchGenerator(tiny_model), [(PROMPTS[3], params)])
    generator = BatchGenerator(tiny_model, max_batch=3)
    target = generator.add(generator.encode_prompt(PROMPTS[3]), params)
    leaver = generator.add(generator.encode_prompt(PROMPTS[0]), params)
    for _ in range(5):
        generator.step()
    generator.remove(leaver.id)  # its client went away
    generator.add(generator.encode_prompt(PROMPTS[1]), params)  # a newcomer mid-story
    while generator.rows:
        generator.step()
    assert target.generated == solo.generated
    with pytest.raises(KeyError, match=f"no running sequence with id {leaver.id}"):
        generator.remove(leaver.id)


def test_a_full_batch_refuses_newcomers(tiny_model) -> None:
    generator = BatchGenerator(tiny_model, max_batch=1)
    generator.add([1, 2, 3], SamplingParams(max_new_tokens=5))
    with pytest.raises(RuntimeError, match="batch is full"):
        generator.add([1, 2, 3], SamplingParams(max_new_tokens=5))


def test_generation_refuses_a_model_in_training_mode(tiny_model) -> None:
    with pytest.raises(ValueError, match="model.eval"):
        BatchGenerator(tiny_model.train())


def test_int8_logits_stay_close_to_fp32(tokenizer) -> None:
    model = sharp_model(preset("seed"))
    prompt = tokenizer.encode("Once upon a time there was a little girl")
    fp32 = BatchGenerator(model)
    int8 = BatchGenerator(model, quantization="int8")
    idx = torch.tensor([prompt])
    with torch.no_grad():
        expected = fp32._head(model.hidden_states(idx)[:, -1])
        quantized = int8._head(int8.model.hidden_states(idx)[:, -1])
    similarity = torch.nn.functional.cosine_similarity(expected, quantized).item()
    assert similarity > 0.99
    result = list(
        generate(model, "Once upon a time", SamplingParams(max_new_tokens=5), quantization="int8")
    )
    assert result[-1].finish_reason in ("length", "end_of_text")


@pytest.mark.parametrize("top", [0, 1, 5])
def test_scoring_a_vocabulary_slice_at_a_time_equals_the_whole_softmax(top) -> None:
    torch.manual_seed(0)
    weight, hidden = torch.randn(50257, 64) * 0.3, torch.randn(37, 64)
    chosen = torch.randint(0, 50257, (37,))
    sliced = scored_tokens(hidden, weight, chosen, top)
    whole = token_logprobs(hidden @ weight.t(), chosen, top)
    for by_slice, at_once in zip(sliced, whole, strict=True):
        assert by_slice.token_id == at_once.token_id
        assert by_slice.logprob == pytest.approx(at_once.logprob, abs=1e-5)
        assert [token for token, _ in by_slice.top] == [token for token, _ in at_once.top]
        assert [value for _, value in by_slice.top] == pytest.approx(
            [value for _, value in at_once.top], abs=1e-5
        )

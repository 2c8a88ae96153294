"""`slm eval`: loss over every window of the valid split, the story-ending test, generation
statistics, and the command that prints and saves them."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from shared import SHARED_DATA

from model import GPT, preset
from model.evaluate import (
    EvalReport,
    distinct_n,
    ending_items,
    generation_stats,
    repetition_rate,
    sample_stories,
    split_last_sentence,
    story_endings,
    windowed_loss,
)
from model.generate import complete
from model.sampling import SamplingParams
from slm.cli import main
from worker.data import load_split, prepare

SLM = str(Path(sys.executable).with_name("slm"))
NAMES = ["Tom", "Mia", "Ben", "Lily", "Sam", "Anna"]
THINGS = ["red ball", "small dog", "big tree", "blue kite", "funny hat", "green frog"]
# Stories whose last sentence repeats the words of the first: a model that copies what it has
# read picks their true endings.
REPEATING = [
    f"Once upon a time, {name} found a {thing} in the park. {name} played with the {thing} all day."
    for name, thing in zip(NAMES, THINGS, strict=True)
]


def prepare_stories(folder: Path, stories: list[str]) -> Path:
    """A data folder whose train and valid splits both hold ``stories``."""
    source = folder / "source"
    source.mkdir(parents=True)
    text = "".join(f"{story}\n<|endoftext|>\n" for story in stories)
    for split in ("train", "valid"):
        (source / f"stories-{split}.txt").write_text(text)
    prepare(source, folder / "data", workers=1, quiet=True)
    return folder / "data"


@pytest.fixture(scope="module")
def stories() -> list[str]:
    """The first real TinyStories validation stories where this machine has them."""
    if not SHARED_DATA.is_dir():
        return REPEATING
    text = (SHARED_DATA / "tinystories-valid.txt").read_text()
    return [story.strip() for story in text.split("\n<|endoftext|>\n")[:8]]


@pytest.fixture(scope="module")
def data_dir(stories, tmp_path_factory) -> Path:
    return prepare_stories(tmp_path_factory.mktemp("eval-data"), stories)


@pytest.fixture
def untrained() -> GPT:
    torch.manual_seed(0)
    return GPT(preset("tiny")).eval()


def copying_model(vocabulary: list[int]) -> GPT:
    """A tiny GPT that copies: the ``vocabulary`` tokens get orthogonal embeddings (rows of a
    Hadamard matrix, whose mean is zero so LayerNorm keeps them orthogonal; every other token's
    is zero), one attention layer averages everything read so far (queries and keys are zero)
    and writes it, amplified, into the residual stream, and nothing else does anything. Its
    next-token logits are high for the tokens already in the story."""
    config = preset("tiny")
    width = config.n_embd
    hadamard = torch.ones(1, 1)
    while len(hadamard) < width:
        hadamard = torch.cat(
            [torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)]
        )
    model = GPT(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
        model.transformer.wte.weight[vocabulary] = hadamard[1 : len(vocabulary) + 1]
        attention = model.transformer.h[0].attn
        attention.c_attn.weight[2 * width :] = torch.eye(width)  # values: the tokens themselves
        attention.c_proj.weight.copy_(100 * torch.eye(width))
    return model


# --- validation loss -------------------------------------------------------------------------


def test_windowed_loss_is_the_cross_entropy_of_every_window(untrained, data_dir) -> None:
    tokens = load_split(data_dir, "val")[:300]
    result = windowed_loss(untrained, tokens, window=32, batch_size=4)
    stream = torch.from_numpy(tokens.astype(np.int64))
    total = 0.0
    for start in range(0, 299, 32):  # 9 windows of 32 predicted tokens, then one of 11
        targets = stream[start + 1 : start + 33]
        inputs = stream[start : start + len(targets)]
        with torch.no_grad():
            _, loss = untrained(inputs[None], targets[None])
        total += loss.item() * len(targets)
    assert (result.windows, result.tokens, result.window) == (10, 299, 32)
    assert result.loss == pytest.approx(total / 299, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    assert result.loss == pytest.approx(math.log(50257), abs=0.1)  # untrained: near uniform


def test_bits_per_byte_divides_the_loss_by_the_bytes_of_the_scored_text(
    untrained, data_dir, stories, tokenizer
) -> None:
    tokens = load_split(data_dir, "val")
    result = windowed_loss(untrained, tokens)
    # Every story and its <|endoftext|> (one byte), less the first token, which is not scored.
    text_bytes = sum(len(story.encode()) + 1 for story in stories)
    assert result.bytes == text_bytes - len(tokenizer.token_bytes(int(tokens[0])))
    assert result.tokens == len(tokens) - 1
    bits = result.loss * result.tokens / math.log(2)
    assert result.bits_per_byte == pytest.approx(bits / result.bytes)


def test_a_window_longer_than_the_context_is_refused(untrained, data_dir) -> None:
    tokens = load_split(data_dir, "val")
    with pytest.raises(ValueError, match=r"window must be in \[1, 64\]"):
        windowed_loss(untrained, tokens, window=65)


# --- story endings ---------------------------------------------------------------------------


def test_the_last_sentence_of_a_complete_story_is_its_ending() -> None:
    assert split_last_sentence("Tom ran. He fell!\n\nThen he smiled.") == (
        "Tom ran. He fell!",
        "Then he smiled.",
    )
    assert split_last_sentence('Mia said, "Look!" They looked? "Wow," said Ben.') == (
        'Mia said, "Look!" They looked?',
        '"Wow," said Ben.',
    )
    assert split_last_sentence("One sentence only.") is None
    assert split_last_sentence("Roxy climbed. And Roxy learned") is None  # cut off mid-sentence


def test_each_question_holds_its_story_ending_among_other_stories_endings(
    data_dir, stories, tokenizer
) -> None:
    tokens = load_split(data_dir, "val")
    items = ending_items(tokens, tokenizer, max_ending_tokens=32, choices=4, seed=3)
    own = [split_last_sentence(story) for story in stories]
    own = [parts for parts in own if parts and len(tokenizer.encode(" " + parts[1])) <= 32]
    assert len(items) == len(own) >= 4
    for item, (context, ending) in zip(items, own, strict=True):
        assert tokenizer.decode(item.context) == "<|endoftext|>" + context
        texts = [tokenizer.decode(choice) for choice in item.endings]
        assert texts[item.answer] == " " + ending
        assert len(set(texts)) == 4
        assert {text.strip() for text in texts} <= {parts[1] for parts in own}
        assert item.ending_bytes == [len(text.encode()) for text in texts]
    again = ending_items(tokens, tokenizer, max_ending_tokens=32, choices=4, seed=3)
    assert again == items
    other_seed = ending_items(tokens, tokenizer, max_ending_tokens=32, choices=4, seed=4)
    assert other_seed != items


def test_ending_accuracy_is_a_share_and_the_same_every_run(tiny_model, data_dir) -> None:
    tokens = load_split(data_dir, "val")
    result = story_endings(tiny_model, tokens, choices=4, batch_size=3)
    assert result == story_endings(tiny_model, tokens, choices=4, batch_size=8)
    assert result.chance == 0.25 and result.choices == 4 and result.stories >= 4
    assert 0 <= result.accuracy <= 1 and 0 <= result.accuracy_norm <= 1


def test_a_model_that_copies_picks_endings_that_repeat_the_story(untrained, tmp_path) -> None:
    tokens = load_split(prepare_stories(tmp_path, REPEATING), "val")
    model = copying_model(sorted(set(tokens.tolist())))
    result = story_endings(model, tokens, choices=4)
    assert result.stories == len(REPEATING)
    assert result.accuracy == 1.0 and result.accuracy_norm == 1.0  # chance: 0.25
    assert story_endings(untrained, tokens, choices=4).accuracy < 1.0


# --- generation statistics -------------------------------------------------------------------


def test_distinct_n_counts_ngrams_within_each_story() -> None:
    stories = [[1, 2, 3, 1, 2, 3], [4, 5]]
    # Bigrams 12 23 31 12 23 and 45 (none across the stories): 4 distinct of 6.
    assert distinct_n(stories, 2) == pytest.approx(4 / 6)
    # Trigrams 123 231 312 123: 3 distinct of 4; the second story has none.
    assert distinct_n(stories, 3) == pytest.approx(3 / 4)
    assert distinct_n([[1, 2], [3, 4]], 2) == 1.0
    assert distinct_n([[1], []], 2) == 0.0


def test_repetition_rate_counts_ngrams_seen_earlier_in_the_same_story() -> None:
    # 4-grams 1234 2341 3412 4123 1234: the last one repeats.
    assert repetition_rate([[1, 2, 3, 4, 1, 2, 3, 4]]) == pytest.approx(1 / 5)
    assert repetition_rate([[1, 2, 3, 4], [1, 2, 3, 4]]) == 0.0  # another story's is no repeat
    assert repetition_rate([[7, 7, 7, 7, 7, 7]]) == pytest.approx(2 / 3)
    assert repetition_rate([[1, 2, 3]]) == 0.0


def test_generation_stats_describe_the_stories_of_seeds_0_to_n(tiny_model, tokenizer) -> None:
    stats = generation_stats(tiny_model, samples=3, max_new_tokens=12)
    assert stats == generation_stats(tiny_model, samples=3, max_new_tokens=12)
    params = [
        SamplingParams(max_new_tokens=12, temperature=0.8, top_k=200, seed=s) for s in range(3)
    ]
    written = sample_stories(tiny_model, params)
    for (story, ended), alone in zip(written, params, strict=True):
        result = complete(tiny_model, "", alone)  # what `slm generate --seed S` writes
        assert story == result.token_ids
        assert ended == (result.finish_reason == "end_of_text")
    stories = [story for story, _ in written]
    assert stats.distinct_2 == distinct_n(stories, 2)
    assert stats.distinct_3 == distinct_n(stories, 3)
    assert stats.repetition_rate == repetition_rate(stories)
    assert stats.mean_length == sum(map(len, stories)) / 3
    assert stats.ended_share == sum(ended for _, ended in written) / 3


# --- the command -----------------------------------------------------------------------------


def test_slm_eval_prints_two_checkpoints_side_by_side_and_saves_each_report(
    data_dir, tmp_path, capsys
) -> None:
    for seed, vocabulary in (("0", "gpt2"), ("1", "gpt2-4k")):
        out = str(tmp_path / seed)
        initialised = ["init", "--preset", "tiny", "--seed", seed, "--vocabulary", vocabulary]
        assert main([*initialised, "--out", out]) == 0
    options = ("--data", str(data_dir), "--samples", "2", "--max-new-tokens", "8", "--quiet")
    evaluated = subprocess.run(
        [SLM, "eval", str(tmp_path / "0"), str(tmp_path / "1"), *options],
        capture_output=True,
        text=True,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    table = evaluated.stdout.splitlines()
    assert table[0].split() == ["0/step-00000000", "1/step-00000000"]
    cells = [re.split(r"\s{2,}", line.strip()) for line in table[1:]]
    rows = {name: values for name, *values in cells}
    # Two vocabularies: each checkpoint reads the val split in its own; bits per byte compare.
    assert rows["vocabulary"] == ["gpt2", "gpt2-4k"]
    assert len(rows["val bits per byte"]) == len(rows["val loss (nats/token)"]) == 2

    reports = [tmp_path / run / "step-00000000.eval.json" for run in ("0", "1")]
    saved = json.loads(reports[0].read_text())
    assert saved["name"] == "0/step-00000000" and saved["data"] == str(data_dir)
    assert saved["loss"]["tokens"] == len(load_split(data_dir, "val")) - 1
    assert saved["loss"]["loss"] == pytest.approx(math.log(50257), abs=0.1)
    assert saved["endings"]["chance"] == 0.25
    assert saved["generation"]["samples"] == 2 and saved["generation"]["mean_length"] <= 8
    assert rows["val loss (nats/token)"][0] == f"{saved['loss']['loss']:.4f}"
    other = json.loads(reports[1].read_text())
    assert other["vocabulary"] == "gpt2-4k"
    assert other["loss"]["tokens"] == len(load_split(data_dir, "val", vocab_size=4096)) - 1
    assert other["loss"]["loss"] == pytest.approx(math.log(4096), abs=0.1)

    capsys.readouterr()
    assert main(["eval", "--compare", *map(str, reports)]) == 0
    assert capsys.readouterr().out == evaluated.stdout


def test_slm_eval_out_names_one_file_so_one_checkpoint(data_dir, tmp_path, capsys) -> None:
    run = str(tmp_path / "run")
    main(["init", "--preset", "tiny", "--out", run])
    out = str(tmp_path / "report.json")
    assert main(["eval", run, run, "--data", str(data_dir), "--out", out]) == 2
    assert "--out names one file" in capsys.readouterr().err


def test_a_file_that_is_not_a_report_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"notes\.json is not an `slm eval` report"):
        EvalReport.from_json(b'{"loss": 1}', "notes.json")

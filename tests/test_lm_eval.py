"""EleutherAI's lm-evaluation-harness scores the served model over /v1/completions (its
``local-completions`` model, our /tokenize as its tokenizer) exactly as it scores the same weights
exported to Hugging Face (its ``hf`` model): the same accuracy on a multiple-choice task and the
same bits per byte on a perplexity task.

Two runs are served side by side: one with GPT-2's vocabulary and one with its first 4,096
tokens, saved last, so the default run. Each is scored through its own base URL
(``/runs/RUN/v1/completions``), where the remote tokenizer is that run's, and against its own
export, whose tokenizer is too.

Both tasks are built at test time from the shared TinyStories validation stories (their text is
the dataset's, never the repository's): pick a story's true last sentence among three other
stories' last sentences, and score whole stories with ``loglikelihood_rolling``. A tiny model
trained for a few dozen steps on the shared training stories is enough: agreement, not quality,
is what is measured.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from servers import ApiServer, api_server
from shared import SHARED_DATA

from contract.train import TrainConfig
from worker.trainer import train

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not SHARED_DATA.is_dir(), reason="../shared/data (TinyStories excerpts) is not present"
    ),
]

BLOCK_SIZE = 128
RUNS = {"stories": "gpt2", "stories-4k": "gpt2-4k"}  # run: vocabulary, trained in this order
CHOICE_TASK, ROLLING_TASK = "slm_story_endings", "slm_story_perplexity"
CHOICE_DOCS, ROLLING_DOCS = 32, 16
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@pytest.fixture(scope="module")
def offline(tmp_path_factory) -> Iterator[None]:
    # lm-eval loads tasks through `datasets` and models through `transformers`: local files
    # only, and the datasets' cache in a temporary folder rather than the user's.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("HF_DATASETS_OFFLINE", "1")
        env.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets-cache")))
        # Quiet: the server's process is forked after the Hugging Face tokenizer has run.
        env.setenv("TOKENIZERS_PARALLELISM", "false")
        yield


@pytest.fixture(scope="module")
def checkpoints(train_data: Path, tmp_path_factory) -> Path:
    """CHECKPOINT_DIR holding the runs: the tiny preset over 128 positions, 30 steps each."""
    root = tmp_path_factory.mktemp("checkpoints")
    for run, vocabulary in RUNS.items():
        config = TrainConfig(
            preset="tiny",
            vocabulary=vocabulary,
            model_block_size=BLOCK_SIZE,
            batch_size=4,
            lr=3e-3,
            min_lr=3e-4,
            warmup_steps=4,
            max_steps=30,
            eval_interval=1000,
            eval_iters=1,
            checkpoint_interval=0,
            seed=0,
            device="cpu",
        )
        train(config, train_data, root / run)
    return root


@pytest.fixture(scope="module", params=list(RUNS))
def run(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def exported(checkpoints: Path, run: str, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "hf"
    slm = Path(sys.executable).with_name("slm")
    subprocess.run([str(slm), "export-hf", str(checkpoints / run), str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """A folder of two task YAMLs over JSONL files written from the shared validation stories."""
    folder = tmp_path_factory.mktemp("tasks")
    raw = (SHARED_DATA / "tinystories-valid.txt").read_text(encoding="utf-8")
    stories = [story.strip() for story in raw.split("<|endoftext|>") if story.strip()]
    endings = list(_ending_docs(stories[: CHOICE_DOCS * 2]))[:CHOICE_DOCS]
    whole = [{"text": story} for story in stories[-ROLLING_DOCS:]]
    for name, docs in ((CHOICE_TASK, endings), (ROLLING_TASK, whole)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    common = {
        "dataset_path": "json",
        "test_split": "test",
        "metadata": {"version": 1},
    }
    choice = {
        "task": CHOICE_TASK,
        "dataset_kwargs": {"data_files": {"test": str(folder / f"{CHOICE_TASK}.jsonl")}},
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
        **common,
    }
    rolling = {
        "task": ROLLING_TASK,
        "dataset_kwargs": {"data_files": {"test": str(folder / f"{ROLLING_TASK}.jsonl")}},
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [
            {"metric": "word_perplexity"},
            {"metric": "byte_perplexity"},
            {"metric": "bits_per_byte"},
        ],
        **common,
    }
    for config in (choice, rolling):  # YAML is a superset of JSON
        (folder / f"{config['task']}.yaml").write_text(json.dumps(config, indent=2))
    return folder


def _ending_docs(stories: list[str]) -> Iterator[dict[str, Any]]:
    """The three sentences before each story's last, that last sentence hidden among the last
    sentences of the three stories after it; the true one's place turns with the story's index.
    (Three sentences, not the whole story: a shorter context is as good a test, and quicker.)"""
    last = [SENTENCE_END.split(story)[-1] for story in stories]
    for index, story in enumerate(stories[:-3]):
        sentences = SENTENCE_END.split(story)
        if len(sentences) < 4:
            continue
        context = " ".join(sentences[-4:-1])
        choices = last[index + 1 : index + 4]
        label = index % 4
        choices.insert(label, sentences[-1])
        yield {"context": context, "choices": choices, "label": label}


@dataclass(frozen=True)
class Scores:
    """What lm-eval reports of one model: each task's metrics ("acc,none"...) and each
    document's answers (a multiple-choice document's (loglikelihood, is_greedy) per choice, a
    rolled document's loglikelihood)."""

    metrics: dict[str, dict[str, Any]]
    answers: dict[str, dict[int, list[Any]]]


def evaluate(model: str, model_args: dict[str, Any], tasks: Path) -> Scores:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[CHOICE_TASK, ROLLING_TASK],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        bootstrap_iters=0,  # no standard errors: the figures themselves are compared
    )
    assert results is not None
    answers = {
        task: {sample["doc_id"]: sample["filtered_resps"] for sample in samples}
        for task, samples in results["samples"].items()
    }
    return Scores(results["results"], answers)


@pytest.fixture(scope="module")
def exported_scores(offline: None, exported: Path, tasks: Path) -> Scores:
    # Windows of max_length - 2 tokens, as local-completions makes them from max_length below.
    args = {"pretrained": str(exported), "device": "cpu", "dtype": "float32"}
    return evaluate("hf", {**args, "max_length": BLOCK_SIZE - 2, "batch_size": 8}, tasks)


@pytest.fixture(scope="module")
def served(checkpoints: Path, tmp_path_factory) -> Iterator[ApiServer]:
    env = {"CHECKPOINT_DIR": str(checkpoints)}
    with api_server(env, tmp_path_factory.mktemp("server"), ready_path="/ready", cli=True) as api:
        yield api


@pytest.fixture(scope="module")
def served_scores(offline: None, served: ApiServer, run: str, tasks: Path) -> Scores:
    args = {
        "base_url": f"{served.base_url}/runs/{run}/v1/completions",  # and its tokenizer beside
        "model": run,  # sent with every request
        "tokenizer_backend": "remote",
        "tokenized_requests": True,
        # A prompt of max_length - 1 tokens plus the one token lm-eval asks for fills the
        # context exactly.
        "max_length": BLOCK_SIZE,
        "batch_size": 8,
        "num_concurrent": 2,
    }
    return evaluate("local-completions", args, tasks)


def test_the_served_model_gets_its_exports_accuracy(
    exported_scores: Scores, served_scores: Scores
) -> None:
    exported, served = exported_scores.metrics[CHOICE_TASK], served_scores.metrics[CHOICE_TASK]
    assert served["acc,none"] == exported["acc,none"]
    assert served["acc_norm,none"] == exported["acc_norm,none"]


def test_the_served_model_gets_its_exports_bits_per_byte(
    exported_scores: Scores, served_scores: Scores
) -> None:
    exported, served = exported_scores.metrics[ROLLING_TASK], served_scores.metrics[ROLLING_TASK]
    assert served["bits_per_byte,none"] == pytest.approx(exported["bits_per_byte,none"], rel=0.01)
    # Trained, if briefly: well under the ~3.3-3.9 bits a byte of guessing among all tokens.
    assert exported["bits_per_byte,none"] < 3.0


def test_every_choice_scores_the_same_and_is_greedy_alike(
    exported_scores: Scores, served_scores: Scores
) -> None:
    # Stricter than equal accuracy, which a near-chance model could reach by luck: each
    # choice's loglikelihood, and whether greedy decoding would have written it (lm-eval reads
    # that from the served top_logprobs).
    exported, served = exported_scores.answers[CHOICE_TASK], served_scores.answers[CHOICE_TASK]
    assert served.keys() == exported.keys()
    for doc_id, choices in exported.items():
        logprobs, greedy = zip(*choices, strict=True)
        served_logprobs, served_greedy = zip(*served[doc_id], strict=True)
        assert served_logprobs == pytest.approx(logprobs, rel=1e-4), doc_id
        assert served_greedy == greedy, doc_id


def test_every_story_scores_the_same(exported_scores: Scores, served_scores: Scores) -> None:
    exported, served = exported_scores.answers[ROLLING_TASK], served_scores.answers[ROLLING_TASK]
    assert served.keys() == exported.keys()
    for doc_id, (loglikelihood,) in exported.items():
        assert served[doc_id] == [pytest.approx(loglikelihood, rel=1e-4)], doc_id

"""How good a checkpoint is, in numbers that can be compared between runs: ``slm eval``.

Three measurements, each deterministic (the same checkpoint and data give the same numbers):

**Validation loss** (``windowed_loss``) over the whole valid split, not sampled batches. The token
stream (stories joined by ``<|endoftext|>``, as ``slm prepare`` writes it) is cut into
consecutive windows of T = ``window`` tokens (default: the model's ``block_size``): window k feeds
the model tokens ``k·T .. k·T+T-1`` and scores its predictions of tokens ``k·T+1 .. k·T+T``, each
made from the window's tokens up to the one before it: the input/target shape the trainer uses.
So every token but the stream's first is scored exactly once, and the context restarts at every
window (the first prediction of a window sees one token, the last sees T; the last window is
shorter).

- ``loss``: mean negative log-likelihood of the scored tokens, in nats per token.
- ``perplexity``: ``exp(loss)``, the number of equally likely tokens the model is as unsure as.
  Untrained, it is about the vocabulary size (50,257 for GPT-2's: loss ln 50257 ≈ 10.8). Loss
  and perplexity compare runs of one vocabulary only: fewer merges mean more, easier tokens.
- ``bits_per_byte``: total NLL / ln 2 / the UTF-8 bytes of the scored tokens' text, where
  ``<|endoftext|>`` counts one byte (it stands for the line that separates stories): comparable
  between tokenizers, and the figure the trainer logs as val bits/byte (from random windows
  there).

**Story endings** (``story_endings``), a multiple-choice test built from the valid stories. Each of
the first ``stories`` valid stories whose last sentence is complete (ends in ``.``, ``!`` or
``?``, quotes allowed) and at most half the model's window long is cut into a context
(``<|endoftext|>`` then everything before the last sentence) and its ending (the last sentence,
after one space). The choices are the true ending and ``choices - 1`` different endings of other
stories in the test, drawn as often as they occur there (a common ending is as often a wrong
choice as a right one), the true ending at a random position; a generator seeded with ``seed``
makes both choices. A choice's score is the sum of the log-probabilities of its tokens given the
context (a context too long for the window keeps its last tokens).

- ``accuracy``: share of stories whose true ending scores highest; ``chance`` is 1 / choices.
- ``accuracy_norm``: the same with each score divided by the ending's length in UTF-8 bytes, so
  long endings are not punished for their length (lm-eval-harness's ``acc_norm``, which divides
  by characters: the same for ASCII text).

**Generation statistics** (``generation_stats``) over ``samples`` stories written from an empty
prompt (``<|endoftext|>``, as every story starts in training) with seeds ``0 .. samples-1``, by
default at ``slm generate``'s temperature 0.8 and top-k 200, at most ``max_new_tokens`` each, in
one batch (each story is the one its seed writes alone). The end-of-text token is not part of a
story.

- ``distinct_2`` / ``distinct_3``: distinct n-grams over all n-grams of all stories (Li et al.,
  2016): low means the stories repeat themselves or each other.
- ``repetition_rate``: share of 4-grams that already occurred earlier in the same story: loops.
- ``mean_length``: mean tokens per story.
- ``ended_share``: share of stories that ended with ``<|endoftext|>`` rather than the length cap.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import cache

import numpy as np
import torch
from torch import Tensor

from model.config import GPT2_VOCAB_SIZE
from model.generate import BatchGenerator
from model.gpt import GPT
from model.loss import token_log_probs
from model.sampling import STORY_TEMPERATURE, STORY_TOP_K, SamplingParams
from model.tokenizer import Tokenizer, get_tokenizer

DEFAULT_BATCH_SIZE = 16
DEFAULT_ENDING_STORIES = 200
DEFAULT_CHOICES = 4
DEFAULT_SAMPLES = 16
DEFAULT_MAX_NEW_TOKENS = 256
REPETITION_N = 4

# (what is being measured, units done, units in all), after every batch.
Progress = Callable[[str, int, int], None]

# A sentence ends in . ! or ?, perhaps inside closing quotes or brackets.
_SENTENCE_END = r"[.!?]+[\"'”’)]*"
_SENTENCE_BREAK = re.compile(_SENTENCE_END + r"\s+")
_COMPLETE = re.compile(_SENTENCE_END + r"$")


@cache
def token_byte_lengths(vocab_size: int = GPT2_VOCAB_SIZE) -> Tensor:
    """UTF-8 bytes each token of a vocabulary stands for, to turn nats per token into bits per
    byte (comparable across vocabularies, which loss is not). <|endoftext|> counts one byte: it
    stands for the separator line, not its 13 characters."""
    tokenizer = get_tokenizer(vocab_size)
    lengths = [len(tokenizer.token_bytes(i)) for i in range(tokenizer.n_vocab)]
    lengths[tokenizer.eot_id] = 1
    return torch.tensor(lengths, dtype=torch.float64)


# --- validation loss -------------------------------------------------------------------------


@dataclass(frozen=True)
class LossResult:
    window: int  # tokens predicted per window
    windows: int
    tokens: int  # tokens scored: every token of the split but the first
    bytes: int  # UTF-8 bytes of their text (<|endoftext|> counts one)
    loss: float  # nats per token
    perplexity: float
    bits_per_byte: float


def _windows(stream: Tensor, window: int, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(inputs, targets) batches of consecutive windows; the shorter last window comes alone."""
    full = (len(stream) - 1) // window
    inputs = stream[: full * window].view(full, window)
    targets = stream[1 : full * window + 1].view(full, window)
    for start in range(0, full, batch_size):
        yield inputs[start : start + batch_size], targets[start : start + batch_size]
    if full * window + 1 < len(stream):
        yield stream[full * window : -1].unsqueeze(0), stream[full * window + 1 :].unsqueeze(0)


@torch.inference_mode()
def windowed_loss(
    model: GPT,
    tokens: np.ndarray,
    window: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> LossResult:
    """Loss, perplexity and bits per byte of ``tokens`` (a split's token ids), every token but
    the first scored once, in windows of ``window`` (see the module docstring)."""
    window = model.config.block_size if window is None else window
    if not 1 <= window <= model.config.block_size:
        raise ValueError(f"window must be in [1, {model.config.block_size}], got {window}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if len(tokens) < 2:
        raise ValueError(f"{len(tokens)} tokens: nothing to score")
    if int(np.max(tokens)) >= model.config.vocab_size:
        raise ValueError(
            f"token id {int(np.max(tokens))} is outside this model's vocabulary "
            f"({model.config.vocabulary}, {model.config.vocab_size} tokens): load the split "
            f"with its vocab_size"
        )
    device = next(model.parameters()).device
    stream = torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(device)
    byte_lengths = token_byte_lengths(model.config.vocab_size).to(device)
    count = math.ceil((len(stream) - 1) / window)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    n_bytes = torch.zeros((), dtype=torch.float64, device=device)
    done = 0
    for inputs, targets in _windows(stream, window, batch_size):
        hidden = model.hidden_states(inputs)
        log_probs, _, _ = token_log_probs(
            hidden.flatten(0, 1), model.output_weight, targets.flatten()
        )
        nats -= log_probs.double().sum()
        n_bytes += byte_lengths[targets].sum()
        done += len(inputs)
        if progress:
            progress("val loss", done, count)
    scored = len(stream) - 1
    loss = nats.item() / scored
    return LossResult(
        window=window,
        windows=count,
        tokens=scored,
        bytes=int(n_bytes.item()),
        loss=loss,
        perplexity=math.exp(loss),
        bits_per_byte=nats.item() / math.log(2) / n_bytes.item(),
    )


# --- story endings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EndingItem:
    """One multiple-choice question: a story's beginning and candidate last sentences."""

    context: list[int]  # <|endoftext|>, then the story up to its last sentence
    endings: list[list[int]]  # each " " + a last sentence
    ending_bytes: list[int]  # UTF-8 bytes of each ending's text
    answer: int  # which ending is the story's own


@dataclass(frozen=True)
class EndingsResult:
    stories: int
    choices: int
    seed: int
    chance: float
    accuracy: float
    accuracy_norm: float  # scores per byte of ending


def split_last_sentence(story: str) -> tuple[str, str] | None:
    """(everything before the last sentence, the last sentence), or None when the story is one
    sentence or its last one is cut off (some TinyStories stories stop mid-sentence)."""
    story = story.strip()
    if not _COMPLETE.search(story):
        return None
    breaks = list(_SENTENCE_BREAK.finditer(story))
    if not breaks:
        return None
    cut = breaks[-1]
    return story[: cut.end()].rstrip(), story[cut.end() :]


def _stories(tokens: np.ndarray, tokenizer: Tokenizer) -> Iterator[str]:
    """The split's stories as text, in order, decoded as they are needed."""
    ends = np.flatnonzero(np.asarray(tokens) == tokenizer.eot_id)
    start = 0
    for end in ends.tolist():
        yield tokenizer.decode(np.asarray(tokens[start:end]).tolist())
        start = end + 1


def ending_items(
    tokens: np.ndarray,
    tokenizer: Tokenizer,
    max_ending_tokens: int,
    stories: int = DEFAULT_ENDING_STORIES,
    choices: int = DEFAULT_CHOICES,
    seed: int = 0,
) -> list[EndingItem]:
    """The questions of the story-ending test, from the first ``stories`` valid stories that can
    be cut (and whose ending has at most ``max_ending_tokens`` tokens, so that some context fits
    the window beside it). Fewer stories than asked when the split runs out."""
    if choices < 2:
        raise ValueError(f"choices must be at least 2, got {choices}")
    cut: list[tuple[str, str]] = []
    for story in _stories(tokens, tokenizer):
        if len(cut) == stories:
            break
        parts = split_last_sentence(story)
        if parts and len(tokenizer.encode(" " + parts[1])) <= max_ending_tokens:
            cut.append(parts)
    endings = [ending for _, ending in cut]
    if len(set(endings)) < choices:
        raise ValueError(
            f"{len(set(endings))} distinct story endings in the valid split, {choices} choices "
            f"asked: use fewer choices or more stories"
        )
    generator = random.Random(seed)
    items = []
    for context, true_ending in cut:
        # Other stories' endings as often as they occur, so that a common ending ("They were
        # happy.") is as likely a wrong choice as a right one: drawn from the distinct endings,
        # short common ones would be right more often than wrong, and a model that merely
        # prefers short endings would beat chance.
        options: list[str] = []
        while len(options) < choices - 1:
            option = generator.choice(endings)
            if option != true_ending and option not in options:
                options.append(option)
        answer = generator.randrange(choices)
        options.insert(answer, true_ending)
        items.append(
            EndingItem(
                context=[tokenizer.eot_id, *tokenizer.encode(context)],
                endings=[tokenizer.encode(" " + option) for option in options],
                ending_bytes=[len((" " + option).encode()) for option in options],
                answer=answer,
            )
        )
    return items


def _ending_log_likelihoods(model: GPT, items: list[EndingItem]) -> Tensor:
    """(items, choices): the summed log-probability of each ending given its context, all
    items' choices in one right-padded forward (causal attention: padding changes nothing)."""
    window = model.config.block_size
    device = next(model.parameters()).device
    rows, row_index, positions, targets = [], [], [], []
    for item in items:
        for ending in item.endings:
            context = item.context[-(window - len(ending)) :]
            row_index += [len(rows)] * len(ending)
            positions += range(len(context) - 1, len(context) + len(ending) - 1)
            targets += ending
            rows.append(context + ending)
    width = max(map(len, rows))
    idx = torch.tensor([row + [0] * (width - len(row)) for row in rows], device=device)
    row_index_t = torch.tensor(row_index, device=device)
    hidden = model.hidden_states(idx)[row_index_t, torch.tensor(positions, device=device)]
    log_probs, _, _ = token_log_probs(
        hidden, model.output_weight, torch.tensor(targets, device=device)
    )
    sums = torch.zeros(len(rows), dtype=torch.float64, device=device)
    sums.index_add_(0, row_index_t, log_probs.double())
    return sums.view(len(items), -1).cpu()


@torch.inference_mode()
def story_endings(
    model: GPT,
    tokens: np.ndarray,
    stories: int = DEFAULT_ENDING_STORIES,
    choices: int = DEFAULT_CHOICES,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> EndingsResult:
    """Accuracy at telling each story's true last sentence from other stories' (module
    docstring); ``batch_size`` questions per forward."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    tokenizer = get_tokenizer(model.config.vocab_size)
    items = ending_items(tokens, tokenizer, model.config.block_size // 2, stories, choices, seed)
    correct = correct_norm = 0
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        scores = _ending_log_likelihoods(model, batch)
        per_byte = scores / torch.tensor([item.ending_bytes for item in batch])
        answers = torch.tensor([item.answer for item in batch])
        correct += int((scores.argmax(dim=1) == answers).sum())
        correct_norm += int((per_byte.argmax(dim=1) == answers).sum())
        if progress:
            progress("story endings", start + len(batch), len(items))
    return EndingsResult(
        stories=len(items),
        choices=choices,
        seed=seed,
        chance=1 / choices,
        accuracy=correct / len(items),
        accuracy_norm=correct_norm / len(items),
    )


# --- generation statistics -------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationStats:
    samples: int  # stories, with seeds 0 .. samples-1
    max_new_tokens: int
    temperature: float
    top_k: int
    distinct_2: float
    distinct_3: float
    repetition_rate: float
    mean_length: float  # tokens
    ended_share: float  # stories that ended with <|endoftext|>


def distinct_n(stories: list[list[int]], n: int) -> float:
    """Distinct n-grams / all n-grams, over every story's tokens (n-grams never cross from one
    story into the next); 0 when there are none."""
    grams = [tuple(story[i : i + n]) for story in stories for i in range(len(story) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(stories: list[list[int]], n: int = REPETITION_N) -> float:
    """Share of n-grams that already occurred earlier in the same story; 0 when there are
    none."""
    repeated = total = 0
    for story in stories:
        seen: set[tuple[int, ...]] = set()
        for i in range(len(story) - n + 1):
            gram = tuple(story[i : i + n])
            repeated += gram in seen
            seen.add(gram)
            total += 1
    return repeated / total if total else 0.0


def sample_stories(
    model: GPT,
    params: list[SamplingParams],
    progress: Progress | None = None,
) -> list[tuple[list[int], bool]]:
    """One story from an empty prompt per entry of ``params``, all in one batch: each story's
    tokens and whether it ended with ``<|endoftext|>``."""
    generator = BatchGenerator(model, max_batch=len(params))
    sequences = [generator.add([generator.tokenizer.eot_id], p) for p in params]
    budget = sum(p.max_new_tokens for p in params)
    while generator.rows:
        generator.step()
        if progress:  # a story that ended has used its whole budget
            used = sum(
                s.params.max_new_tokens if s.finish_reason else len(s.generated) for s in sequences
            )
            progress("generation", used, budget)
    return [(s.generated, s.finish_reason == "end_of_text") for s in sequences]


def generation_stats(
    model: GPT,
    samples: int = DEFAULT_SAMPLES,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = STORY_TEMPERATURE,
    top_k: int = STORY_TOP_K,
    progress: Progress | None = None,
) -> GenerationStats:
    """Diversity, repetition and length of ``samples`` stories at seeds 0 .. samples-1."""
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    params = [
        SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed
        )
        for seed in range(samples)
    ]
    written = sample_stories(model, params, progress)
    stories = [story for story, _ in written]
    return GenerationStats(
        samples=samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        distinct_2=distinct_n(stories, 2),
        distinct_3=distinct_n(stories, 3),
        repetition_rate=repetition_rate(stories),
        mean_length=sum(map(len, stories)) / samples,
        ended_share=sum(ended for _, ended in written) / samples,
    )


# --- the report ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalReport:
    """Everything ``slm eval`` measured for one checkpoint; what its JSON file holds."""

    name: str  # as the service names it: <run>/<checkpoint>
    checkpoint: str  # its metadata file
    step: int
    data: str  # the prepared data folder whose valid split was read
    loss: LossResult
    endings: EndingsResult
    generation: GenerationStats
    vocabulary: str = "gpt2"  # its tokenizer (model.config.VOCABULARIES); reports before it: gpt2

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, source: str = "report") -> EvalReport:
        """Read a report written by ``to_json``; a ValueError naming ``source`` otherwise."""
        try:
            fields = json.loads(data)
            return cls(
                **{
                    **fields,
                    "loss": LossResult(**fields["loss"]),
                    "endings": EndingsResult(**fields["endings"]),
                    "generation": GenerationStats(**fields["generation"]),
                }
            )
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(f"{source} is not an `slm eval` report: {error!r}") from None


def format_table(reports: list[EvalReport]) -> str:
    """The reports side by side, a column each, a row per number. Bits per byte come first:
    the one figure that compares runs of different vocabularies (loss and perplexity are per
    token, and the tokens differ)."""
    rows: list[tuple[str, Callable[[EvalReport], str]]] = [
        ("step", lambda r: f"{r.step:,}"),
        ("vocabulary", lambda r: r.vocabulary),
        ("val bits per byte", lambda r: f"{r.loss.bits_per_byte:.4f}"),
        ("val loss (nats/token)", lambda r: f"{r.loss.loss:.4f}"),
        ("val perplexity", lambda r: f"{r.loss.perplexity:,.2f}"),
        ("  tokens scored, window", lambda r: f"{r.loss.tokens:,}, {r.loss.window}"),
        ("ending accuracy", lambda r: f"{r.endings.accuracy:.3f}"),
        ("ending accuracy per byte", lambda r: f"{r.endings.accuracy_norm:.3f}"),
        ("  chance, stories", lambda r: f"{r.endings.chance:.3f}, {r.endings.stories}"),
        ("distinct-2", lambda r: f"{r.generation.distinct_2:.3f}"),
        ("distinct-3", lambda r: f"{r.generation.distinct_3:.3f}"),
        (f"{REPETITION_N}-gram repetition rate", lambda r: f"{r.generation.repetition_rate:.3f}"),
        ("mean length (tokens)", lambda r: f"{r.generation.mean_length:.1f}"),
        ("ended with <|endoftext|>", lambda r: f"{r.generation.ended_share:.3f}"),
        (
            "  samples, max tokens",
            lambda r: f"{r.generation.samples}, {r.generation.max_new_tokens}",
        ),
    ]
    table = [["", *(report.name for report in reports)]]
    table += [[name, *(show(report) for report in reports)] for name, show in rows]
    widths = [max(len(cell) for cell in column) for column in zip(*table, strict=True)]
    lines = []
    for name, *cells in table:
        values = (cell.rjust(width) for cell, width in zip(cells, widths[1:], strict=True))
        lines.append("  ".join([name.ljust(widths[0]), *values]))
    return "\n".join(lines)

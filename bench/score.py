"""Scoring throughput: prompt tokens scored per second through `slm serve`'s ``/v1/completions``
(``echo``, ``max_tokens: 0``, ``logprobs: 1``: what lm-eval's loglikelihood asks, without the
one generated token) against the Hugging Face export's forward (``AutoModelForCausalLM``) on the
same texts and the same weights, in one run.

    python bench/score.py                       # the seed preset at block 512, random weights
    python bench/score.py --quick               # a first look in about a minute
    python bench/score.py --prefill-tokens 256 1024 --repeats 5 --json score.json

The texts: TinyStories validation stories (``../shared/data/tinystories-valid.txt``), each
tokenized with GPT-2's BPE after an ``<|endoftext|>`` (lm-eval's rolling-window prefix) and cut
into windows of at most the block size; the first ``--texts`` windows. Served: `slm serve` with
``MAX_BATCH_SIZE`` = ``--concurrency`` and each ``--prefill-tokens`` value (a server each);
``--concurrency`` clients (one asyncio ``httpx`` client, a connection each) each send one text at
a time as token ids, temperature 0, until every text is scored; the tokens counted are the
``usage.prompt_tokens`` the server answers, over the wall time. Hugging Face: ``--batch`` texts
per forward, right-padded with an attention mask, longest first (lm-eval's ``HFLM`` orders
requests so), then the work the server does with the activations: log-softmax over the
vocabulary, each next token's log-probability and the likeliest token's, as Python floats. And
the server's engine without HTTP: the same texts through a ``BatchGenerator`` in this process,
which tells the model's work from the HTTP layer's. Every contender uses the same torch thread
count (``--threads``, default every core; the server's ``DECODE_THREADS``); they run in turn,
their order rotating each repeat, and the table prints medians, each run's figure and the
machine's load average (other work on the machine slows many small operations more than a few
big ones). Before timing, every contender's log-probabilities of the first ``--check`` texts are
compared with Hugging Face's (tolerance 1e-3); a mismatch fails the run. Not a test: speed is
measured here, never asserted in the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch
from decode import VALID_FILE  # bench/decode.py: the TinyStories validation excerpt
from quality import valid_stories  # bench/quality.py: the stories as it judges them
from serve import (  # bench/serve.py: the same server start-up
    client_for,
    init_run,
    start_service,
    stop,
    write_figures,
)

from contract.broker import free_port
from model.checkpoint import load_checkpoint, newest_checkpoint
from model.export.hf import export_hf
from model.generate import BatchGenerator
from model.sampling import SamplingParams
from model.tokenizer import get_tokenizer

RUN = "bench"  # the run folder under CHECKPOINT_DIR, and the `model` the requests name
TOLERANCE = 1e-3  # the largest |served − Hugging Face| log-probability the check accepts


def load_texts(path: Path, count: int, block: int, vocab_size: int) -> list[list[int]]:
    """The first ``count`` windows of at most ``block`` tokens over the stories in ``path``, in
    the model's vocabulary: each story is ``<|endoftext|>`` then its tokens, cut into
    consecutive windows; windows of a single token (nothing to score) are skipped."""
    tokenizer = get_tokenizer(vocab_size)
    texts: list[list[int]] = []
    for story in valid_stories(path):
        ids = [tokenizer.eot_id, *tokenizer.encode(story)]
        texts.extend(ids[i : i + block] for i in range(0, len(ids), block) if len(ids) - i > 1)
        if len(texts) >= count:
            return texts[:count]
    raise SystemExit(f"{path} holds only {len(texts)} windows; ask for fewer --texts")


def request_body(text: list[int]) -> dict:
    """What lm-eval's ``local-completions`` sends to score a text, with ``max_tokens: 0``."""
    return {
        "model": RUN,
        "prompt": [text],
        "echo": True,
        "max_tokens": 0,
        "logprobs": 1,
        "temperature": 0,
    }


# --- the contenders: each returns (tokens scored, per-text scores) -----------------------------

# A text's scores: (log-probability of token i + 1, the likeliest token's) for every position
# but the last.
Scores = list[tuple[float, float]]
Contender = Callable[[list[list[int]]], tuple[int, list[Scores]]]


async def score_served(
    base_url: str, texts: list[list[int]], concurrency: int
) -> tuple[int, list[Scores]]:
    """Every text scored by the server, ``concurrency`` requests in flight at a time."""
    scores: list[Scores] = [[] for _ in texts]
    pending = iter(range(len(texts)))
    tokens = 0

    async def one_client(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        for index in pending:  # shared: each client takes the next text not yet sent
            response = await client.post("/v1/completions", json=request_body(texts[index]))
            if response.status_code != 200:
                raise SystemExit(f"HTTP {response.status_code}: {response.text[:300]}")
            answer = response.json()
            logprobs = answer["choices"][0]["logprobs"]
            tokens += answer["usage"]["prompt_tokens"]
            # Entry 0 is None: nothing precedes the first token.
            scores[index] = [
                (picked, max(top.values()))
                for picked, top in zip(
                    logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:], strict=True
                )
            ]

    async with client_for(base_url, concurrency) as client:
        await asyncio.gather(*(one_client(client) for _ in range(concurrency)))
    return tokens, scores


def score_hf(hf_model, texts: list[list[int]], batch: int) -> tuple[int, list[Scores]]:
    """Every text through ``hf_model`` in right-padded batches, longest first."""
    scores: list[Scores] = [[] for _ in texts]
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    with torch.inference_mode():
        for start in range(0, len(order), batch):
            chosen = order[start : start + batch]
            width = len(texts[chosen[0]])
            ids = torch.tensor([texts[i] + [0] * (width - len(texts[i])) for i in chosen])
            mask = torch.tensor(
                [[1] * len(texts[i]) + [0] * (width - len(texts[i])) for i in chosen]
            )
            logits = hf_model(input_ids=ids, attention_mask=mask).logits
            # As lm-eval's HFLM: the log-softmax of the whole batch, then each text's scores.
            logprobs = torch.log_softmax(logits, dim=-1)[:, :-1]
            picked = logprobs.gather(2, ids[:, 1:, None])[..., 0]
            best = logprobs.max(dim=-1).values
            for row, index in enumerate(chosen):
                length = len(texts[index]) - 1
                scores[index] = list(
                    zip(picked[row, :length].tolist(), best[row, :length].tolist(), strict=True)
                )
    return sum(map(len, texts)), scores


def score_engine(generator: BatchGenerator, texts: list[list[int]]) -> tuple[int, list[Scores]]:
    """Every text through the server's ``BatchGenerator`` in this process, no HTTP: as many in
    the batch at once as it has rows, as the engine admits them."""
    params = SamplingParams(max_new_tokens=0, temperature=0, logprobs=1, prompt_logprobs=1)
    waiting = iter(texts)
    sequences = []
    while True:
        for _ in range(generator.free_rows):
            text = next(waiting, None)
            if text is None:
                break
            sequences.append(generator.add(text, params))
        if not generator.rows:
            break
        generator.step()
    scores = [
        [(score.logprob, score.top[0][1]) for score in sequence.prompt_logprobs[1:]]
        for sequence in sequences
    ]
    return sum(map(len, texts)), scores


# --- the run ------------------------------------------------------------------------------------


def largest_difference(ours: list[Scores], theirs: list[Scores]) -> float:
    """The largest |difference| between two contenders' log-probabilities (picked and top-1)."""
    worst = 0.0
    for our_text, their_text in zip(ours, theirs, strict=True):
        if len(our_text) != len(their_text):
            return float("inf")
        for ours_pair, theirs_pair in zip(our_text, their_text, strict=True):
            worst = max(worst, *(abs(a - b) for a, b in zip(ours_pair, theirs_pair, strict=True)))
    return worst


def timed(run: Contender, texts: list[list[int]]) -> float:
    """Tokens per second of one run over ``texts``."""
    started = time.perf_counter()
    tokens, _ = run(texts)
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--block-size", type=int, default=512, help="the longest window")
    parser.add_argument("--texts", type=int, default=128, help="windows scored per run")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--batch", type=int, default=16, help="Hugging Face's texts per forward")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each contender, in turn")
    parser.add_argument(
        "--prefill-tokens",
        type=int,
        nargs="+",
        default=[256],
        help="PREFILL_TOKENS to serve with, a server each (default: the service's 256)",
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads for every contender (default: all cores)"
    )
    parser.add_argument("--check", type=int, default=8, help="texts whose scores are compared")
    parser.add_argument("--no-engine", action="store_true", help="skip the in-process engine")
    parser.add_argument("--quick", action="store_true", help="32 texts, 1 repeat")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.texts, args.repeats = 32, 1
    if not VALID_FILE.exists():
        sys.exit(f"the texts come from {VALID_FILE}, which is missing (../shared/data)")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        checkpoints = root / "checkpoints"
        init_run(checkpoints / RUN, args.preset, args.block_size)
        model, _ = load_checkpoint(newest_checkpoint(checkpoints))
        texts = load_texts(VALID_FILE, args.texts, args.block_size, model.config.vocab_size)
        export_hf(model, root / "hf")
        hf_model = AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()
        hf_class = type(hf_model).__name__
        contenders: dict[str, Contender] = {
            f"HF {hf_class}, batch {args.batch}": lambda some: score_hf(hf_model, some, args.batch)
        }
        processes = []
        try:
            for budget in args.prefill_tokens:
                port = free_port()
                processes.append(
                    start_service(
                        checkpoints,
                        port,
                        root / f"serve-{budget}.log",
                        MAX_BATCH_SIZE=str(args.concurrency),
                        MAX_WAITING="1024",
                        DECODE_THREADS=str(threads),
                        PREFILL_TOKENS=str(budget),
                    )
                )
                url = f"http://127.0.0.1:{port}"
                contenders[f"served, {args.concurrency} clients, PREFILL_TOKENS={budget}"] = (
                    lambda some, url=url: asyncio.run(score_served(url, some, args.concurrency))
                )
            if not args.no_engine:
                for budget in args.prefill_tokens:
                    generator = BatchGenerator(
                        model, max_batch=args.concurrency, prefill_tokens=budget
                    )
                    contenders[f"engine in-process, PREFILL_TOKENS={budget}"] = (
                        lambda some, generator=generator: score_engine(generator, some)
                    )
            figures = measure(args, contenders, texts)
        finally:
            for process in processes:
                stop(process)
    report(args, figures, threads)
    write_figures(args, figures)


def measure(
    args: argparse.Namespace, contenders: dict[str, Contender], texts: list[list[int]]
) -> dict:
    """Compare every contender's scores of the first ``--check`` texts with Hugging Face's
    (the first contender), which warms them up too; then time them in turn, rotating which
    goes first."""
    names = list(contenders)
    checked = texts[: args.check]
    _, reference = contenders[names[0]](checked)
    differences = {
        name: largest_difference(contenders[name](checked)[1], reference) for name in names[1:]
    }
    for name, difference in differences.items():
        print(f"largest |Δ log-probability| against Hugging Face, {name}: {difference:.2e}")
    failed = {name: d for name, d in differences.items() if not d <= TOLERANCE}
    if failed:
        sys.exit(f"scores differ from Hugging Face's by more than {TOLERANCE}: {failed}")
    rates: dict[str, list[float]] = {name: [] for name in names}
    load_before = os.getloadavg()[0]
    for repeat in range(args.repeats):
        turn = repeat % len(names)
        for name in names[turn:] + names[:turn]:
            rates[name].append(timed(contenders[name], texts))
            print(f"  run {repeat + 1}: {name}: {rates[name][-1]:,.0f} tokens/s", flush=True)
    return {
        "tokens_per_second": {name: statistics.median(values) for name, values in rates.items()},
        "runs": rates,
        "largest_difference": differences,
        "load_average": [load_before, os.getloadavg()[0]],  # the machine's, before and after
        "texts": len(texts),
        "tokens": sum(map(len, texts)),
    }


def report(args: argparse.Namespace, figures: dict, threads: int) -> None:
    medians = figures["tokens_per_second"]
    hf_name = next(iter(medians))
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {threads} threads each; preset {args.preset} at block "
        f"{args.block_size}, random weights; {figures['texts']} texts, {figures['tokens']:,} "
        f"tokens (TinyStories valid); median of {args.repeats}; load average "
        + " → ".join(f"{load:.1f}" for load in figures["load_average"])
    )
    print(f"{'contender':52} {'tokens/s':>10} {'vs HF':>7}  runs")
    for name, rate in medians.items():
        runs = ", ".join(f"{value:,.0f}" for value in figures["runs"][name])
        print(f"{name:52} {rate:10,.0f} {rate / medians[hf_name]:6.2f}×  {runs}")


if __name__ == "__main__":
    main()

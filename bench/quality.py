"""Quality per CPU-minute: nanoGPT's recipe against ours in the same wall time, on the same
machine, in one run, every model judged the same way.

    git -C nanoGPT show HEAD:model.py > /tmp/nanogpt_model.py
    python bench/quality.py --nanogpt /tmp/nanogpt_model.py --json quality.json

1. **nanoGPT's recipe**: its ``model.py`` (4 layers, 4 heads, 128 wide, GPT-2's network, the
   vocabulary padded to 50,304), its training step (``configure_optimizers``' AdamW, clipping
   at 1.0), batches of 16 × 128 tokens, 300 steps, lr 1e-3 cosine to 1e-4 after 30 warm-up
   steps. Its wall time, the loop alone, is the budget T.
2. **Ours, as a user runs it**: ``slm train --max-minutes T`` with the default preset and
   defaults.
3. **Our GPT-2-style network** (``--gpt2-style``): the default preset's shape with GPT-2's
   options (learned positions, LayerNorm, GELU, biases) and AdamW on nanoGPT's learning rates.
4. **Each ``--vocabulary V``**: the defaults with that vocabulary; each ``--run NAME=OPTIONS``:
   the defaults with those ``slm train`` options (a shape to try, say).

Ours evaluate every 50 steps (10 batches per split) so their curves can be compared per token;
nanoGPT evaluates nothing, so the evaluations are time ours lose. Every model is then judged by
its Hugging Face export (``slm export-hf``; nanoGPT's weights converted to our GPT first, as its
names are GPT-2's too) with the export's own tokenizer (``AutoTokenizer``): the shared valid
file's stories, each encoded and followed by ``<|endoftext|>``, scored over every
non-overlapping 128-token window (each window predicting its next 128 tokens, fp32). Bits per
byte divide those nats by the text's own bytes (the separator counting one), so models of
different vocabularies compare; val loss compares only within one. Equal tokens (with
``--gpt2-style``): from the trainer's val curves, the tokens our recipe needs to reach the
GPT-2-style run's final val loss, as a share of what that run saw. Five stories at seeds 0..4
from each of ours close the report. Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from train import NANOGPT_VOCAB, SHARED_DATA, load_nanogpt  # bench/train.py

from model import GPT, GPTConfig
from model.checkpoint import load_checkpoint
from model.export.hf import export_hf
from model.generate import complete
from model.sampling import SamplingParams
from model.tokenizer import END_OF_TEXT
from worker.data import load_split, prepare

WINDOW = 128
SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=128)
RECIPE = dict(batch_size=16, steps=300, lr=1e-3, min_lr=1e-4, warmup=30)
GPT2_STYLE = (
    "--position learned --norm layernorm --activation gelu --bias --optimizer adamw "
    f"--lr {RECIPE['lr']} --min-lr {RECIPE['min_lr']}"
).split()
OUR_LOGGING = ["--eval-interval", "50", "--eval-iters", "10", "--checkpoint-interval", "0"]
PROMPT = "Once upon a time"
JUDGE_BATCH = 8  # windows per forward: 8 × 128 × 50,257 fp32 logits are 206 MB


def nanogpt_recipe(nanogpt_path: Path, data_dir: Path) -> tuple[GPT, float]:
    """Train nanoGPT's model with its recipe; return it as our GPT and the loop's seconds."""
    nanogpt = load_nanogpt(nanogpt_path)
    torch.manual_seed(1337)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints parameter counts
        model = nanogpt.GPT(
            nanogpt.GPTConfig(**SHAPE, vocab_size=NANOGPT_VOCAB, dropout=0.0, bias=True)
        )
        optimizer = model.configure_optimizers(0.1, RECIPE["lr"], (0.9, 0.95), "cpu")
    data = load_split(data_dir, "train")
    block, batch = SHAPE["block_size"], RECIPE["batch_size"]

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(data) - block, (batch,))
        x = torch.stack([torch.from_numpy(data[i : i + block].astype(np.int64)) for i in ix])
        y = torch.stack(
            [torch.from_numpy(data[i + 1 : i + 1 + block].astype(np.int64)) for i in ix]
        )
        return x, y

    def lr_at(step: int) -> float:  # nanoGPT's get_lr
        steps, warmup = RECIPE["steps"], RECIPE["warmup"]
        if step < warmup:
            return RECIPE["lr"] * (step + 1) / (warmup + 1)
        ratio = (step - warmup) / (steps - warmup)
        coefficient = 0.5 * (1.0 + math.cos(math.pi * ratio))
        return RECIPE["min_lr"] + coefficient * (RECIPE["lr"] - RECIPE["min_lr"])

    started = time.perf_counter()
    x, y = get_batch()
    for step in range(RECIPE["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        _, loss = model(x, y)
        x, y = get_batch()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # its log_interval of 1
    seconds = time.perf_counter() - started
    # Its names are GPT-2's, as ours are; its padded vocabulary is our pad_vocab.
    ours = GPT(GPTConfig(**SHAPE, bias=True, pad_vocab=True))
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(".attn.bias")}
    ours.load_state_dict(state)
    return ours.eval(), seconds


def slm_train(data_dir: Path, run_dir: Path, minutes: float, options: list[str]) -> GPT:
    slm = shutil.which("slm") or sys.exit("the `slm` command is not installed (pip install -e .)")
    command = [slm, "train", "--data", str(data_dir), "--out", str(run_dir)]
    command += ["--max-minutes", f"{minutes:.4f}", "--quiet", *OUR_LOGGING, *options]
    subprocess.run(command, check=True)
    model, _ = load_checkpoint(run_dir)
    return model


def valid_stories(path: Path) -> list[str]:
    """The stories of a TinyStories text file, each stripped, in order."""
    text = path.read_text(encoding="utf-8")
    return [story.strip() for story in text.split(END_OF_TEXT) if story.strip()]


def story_bytes(stories: list[str]) -> int:
    """The UTF-8 bytes of the stories, each followed by <|endoftext|>, which counts one byte:
    it stands for the separator line (as the trainer's bits per byte count it)."""
    return sum(len(story.encode()) + 1 for story in stories)


def judged(model: GPT, export_dir: Path, stories: list[str]) -> dict[str, float]:
    """The Hugging Face export, with its own tokenizer, over every non-overlapping window of
    the stories: mean cross-entropy per token, and bits per byte of the text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_hf(model, export_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    ids: list[int] = []
    for story in stories:
        ids += tokenizer(story, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    stream = torch.tensor(ids)
    # Every token but the first is predicted: the text's bytes, less the first token's.
    first = len(tokenizer.decode(ids[:1]).encode())
    n_bytes = story_bytes(stories) - first
    nats = 0.0
    starts = range(0, len(stream) - 1, WINDOW)
    full = [start for start in starts if start + WINDOW < len(stream)]
    batches = [full[i : i + JUDGE_BATCH] for i in range(0, len(full), JUDGE_BATCH)]
    batches += [[start] for start in starts[len(full) :]]  # the short last one, alone
    with torch.inference_mode():
        for batch in batches:
            windows = torch.stack([stream[start : start + WINDOW + 1] for start in batch])
            logits = hf_model(windows[:, :-1]).logits.float()
            nats += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="sum"
            ).item()
    return {
        "val_loss": nats / (len(stream) - 1),
        "bits_per_byte": nats / (math.log(2) * n_bytes),
        "bytes_per_token": n_bytes / (len(stream) - 1),
    }


def tokens_to_reach(history: list[dict], loss: float) -> float | None:
    """Tokens at which a run's val curve first reaches ``loss`` (linear between evaluations)."""
    previous = None
    for point in history:
        if point["val_loss"] <= loss:
            if previous is None:
                return point["tokens_seen"]
            share = (previous["val_loss"] - loss) / (previous["val_loss"] - point["val_loss"])
            return previous["tokens_seen"] + share * (
                point["tokens_seen"] - previous["tokens_seen"]
            )
        previous = point
    return None


def stories(model: GPT, seeds: range) -> list[str]:
    return [
        complete(model, PROMPT, SamplingParams(max_new_tokens=150, temperature=0.8, seed=seed)).text
        for seed in seeds
    ]


def named_run(text: str) -> tuple[str, list[str]]:
    name, separator, options = text.partition("=")
    if not separator or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=OPTIONS")
    return name.strip(), options.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="nanoGPT's model.py")
    parser.add_argument("--data", type=Path, help="a prepared data folder")
    parser.add_argument(
        "--valid", type=Path, default=SHARED_DATA / "tinystories-valid.txt", help="stories to judge"
    )
    parser.add_argument("--gpt2-style", action="store_true", help="also our GPT-2-style network")
    parser.add_argument(
        "--vocabulary", action="append", default=[], help="also the defaults with this vocabulary"
    )
    parser.add_argument(
        "--run",
        action="append",
        type=named_run,
        default=[],
        metavar="NAME=OPTIONS",
        help="also the defaults with these `slm train` options",
    )
    parser.add_argument("--keep", type=Path, help="keep the runs and exports in this folder")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    runs = [("ours", [])] + ([("ours, GPT-2-style", GPT2_STYLE)] if args.gpt2_style else [])
    runs += [(f"ours, {name}", ["--vocabulary", name]) for name in args.vocabulary]
    runs += [(f"ours, {name}", run_options) for name, run_options in args.run]
    options = dict(runs)
    if len(options) < len(runs):
        parser.error("two runs have the same name: give each --vocabulary and --run its own")
    stories_to_judge = valid_stories(args.valid)

    with tempfile.TemporaryDirectory() as scratch:
        work = args.keep or Path(scratch)
        data_dir = args.data
        if data_dir is None:
            data_dir = work / "data"
            prepare(SHARED_DATA, data_dir, quiet=True)

        nanogpt_model, budget = nanogpt_recipe(args.nanogpt, data_dir)
        minutes = budget / 60
        print(f"nanoGPT's recipe: {budget:.0f} s; ours get the same", flush=True)
        folders = {name: f"run-{index}" for index, name in enumerate(options)}
        runs = {
            name: slm_train(data_dir, work / folders[name], minutes, run_options)
            for name, run_options in options.items()
        }
        histories = {
            name: json.loads((work / folder / "history.json").read_text())["evals"]
            for name, folder in folders.items()
        }
        nanogpt_result = judged(nanogpt_model, work / "export-nanogpt", stories_to_judge)
        results = {"nanoGPT recipe": nanogpt_result | {"vocabulary": "gpt2"}}
        results["nanoGPT recipe"] |= {"tokens": RECIPE["steps"] * RECIPE["batch_size"] * 128}
        results["nanoGPT recipe"] |= {"steps": RECIPE["steps"]}
        for name, model in runs.items():
            results[name] = judged(model, work / f"export-{folders[name]}", stories_to_judge)
            last = histories[name][-1]
            results[name] |= {"tokens": last["tokens_seen"], "steps": last["step"]}
            results[name] |= {"vocabulary": model.config.vocabulary}
            results[name]["parameters"] = model.num_parameters()
            results[name]["config"] = model.config.to_dict()

        reached = token_ratio = gpt2_final = None
        if args.gpt2_style:
            gpt2_final = histories["ours, GPT-2-style"][-1]
            reached = tokens_to_reach(histories["ours"], gpt2_final["val_loss"])
            token_ratio = None if reached is None else reached / gpt2_final["tokens_seen"]
        samples = {name: stories(model, range(5)) for name, model in runs.items()}

    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(f"\nequal wall time: {budget:.0f} s each, {machine}")
    print(
        f"{'recipe':<24} {'vocabulary':>10} {'params':>7} {'steps':>6} {'tokens':>10} "
        f"{'bytes/tok':>9} {'val loss':>9} {'bits/byte':>10} {'vs nanoGPT':>11}"
    )
    reference = results["nanoGPT recipe"]["bits_per_byte"]
    for name, result in results.items():
        parameters = result.get("parameters")
        shown = f"{parameters / 1e6:.2f}M" if parameters else "—"
        print(
            f"{name:<24} {result['vocabulary']:>10} {shown:>7} {result['steps']:>6} "
            f"{result['tokens']:>10,} {result['bytes_per_token']:>9.2f} "
            f"{result['val_loss']:>9.3f} {result['bits_per_byte']:>10.3f} "
            f"{result['bits_per_byte'] - reference:>+11.3f}"
        )
    if gpt2_final is not None:
        gap = results["ours, GPT-2-style"]["val_loss"] - results["ours"]["val_loss"]
        print(f"ours vs our GPT-2-style network: {-gap:+.3f} val loss")
        if token_ratio is None:
            print("equal tokens: ours never reached the GPT-2-style run's final val loss")
        else:
            print(
                f"equal tokens: ours reaches the GPT-2-style run's final val loss "
                f"({gpt2_final['val_loss']:.3f}) after {reached:,.0f} tokens, "
                f"{token_ratio:.2f}× its {gpt2_final['tokens_seen']:,}"
            )
    for name, texts in samples.items():
        print(f"\n{name}:")
        for seed, text in enumerate(texts):
            print(f"  seed {seed}: {PROMPT}{text}")
    if args.json:
        document = {
            "machine": machine,
            "budget_s": budget,
            "options": options,
            "results": results,
            "token_ratio": token_ratio,
            "histories": histories,
            "samples": samples,
        }
        args.json.write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()

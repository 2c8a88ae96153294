"""`slm`: one command line for everything the project does.

Each command is a handler registered with `@command(NAME, OPTIONS)`, OPTIONS being the function
just above it that adds the command's arguments and whose docstring is its help. Options that
several commands take (a checkpoint, --device, --data, --quiet, the sampling knobs) come from the
`_add_*` helpers below. `build_parser` makes a subparser per command, in the order registered.

Heavy imports (torch, tiktoken) happen inside the commands, so `slm --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.evaluate import EvalReport
    from model.sampling import SamplingParams

Handler = Callable[[argparse.Namespace], int]
Options = Callable[[argparse.ArgumentParser], None]


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    options: Options
    help: str
    description: str | None


COMMANDS: list[Command] = []


def command(name: str, options: Options) -> Callable[[Handler], Handler]:
    """Registers the decorated handler as `slm NAME`, its arguments added by OPTIONS. The first
    line of OPTIONS' docstring is the command's line in `slm --help`; the paragraphs after it, if
    any, are the text under the usage line of `slm NAME --help` (argparse rewraps them)."""
    summary, _, rest = (options.__doc__ or "").strip().partition("\n")
    description = " ".join(rest.split()) or None

    def register(handler: Handler) -> Handler:
        COMMANDS.append(Command(name, handler, options, summary, description))
        return handler

    return register


def checkpoint_dir() -> Path:
    """CHECKPOINT_DIR, as the service and the worker read it."""
    from contract.settings import Settings

    return Settings().checkpoint_dir


def find_checkpoint(path: Path | None) -> Path:
    """A checkpoint's metadata file from what a user names: a checkpoint, a run folder, or a
    folder of runs (CHECKPOINT_DIR by default), where the newest checkpoint is taken."""
    from model.checkpoint import newest_checkpoint, resolve_checkpoint

    path = path or checkpoint_dir()
    if path.is_dir() and not (path / "latest.json").exists():
        found = newest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(
                f"no checkpoint under {path}; create one with `slm init --out {path}/NAME`"
            )
        return found
    return resolve_checkpoint(path)


def _add_checkpoint(parser: argparse.ArgumentParser, name: str = "checkpoint", **kwargs) -> None:
    """A checkpoint as find_checkpoint reads it (a positional NAME or an option --NAME)."""
    help_text = (
        "a checkpoint (.json), a run folder, or a folder of runs (newest wins); "
        "default: $CHECKPOINT_DIR or ./checkpoints"
    )
    parser.add_argument(name, type=Path, help=help_text, **kwargs)


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")


def _add_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, metavar="DATA_DIR", help="from `slm prepare`")


def _add_quiet(parser: argparse.ArgumentParser, help_text: str = "no progress bars") -> None:
    parser.add_argument("--quiet", action="store_true", help=help_text)


def _add_defaulted(
    parser: argparse.ArgumentParser, flag: str, kind: type, default: object, help_text: str
) -> None:
    """An option whose help ends with its default."""
    parser.add_argument(
        flag, type=kind, default=default, help=f"{help_text} (default: %(default)s)"
    )


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """How a story is drawn: one option per SamplingParams field, named after it (see
    _sampling_params), with the story defaults of model/sampling.py."""
    from model.sampling import STORY_TEMPERATURE, STORY_TOP_K

    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=STORY_TEMPERATURE, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=STORY_TOP_K, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    for penalty in ("--presence-penalty", "--frequency-penalty"):
        parser.add_argument(penalty, type=float, default=0.0, help="-2..2")
    parser.add_argument("--seed", type=int, help="makes the story reproducible")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The SamplingParams that the options of _add_sampling_options name."""
    from dataclasses import fields

    from model.sampling import SamplingParams

    names = [field.name for field in fields(SamplingParams) if hasattr(args, field.name)]
    given = {name: getattr(args, name) for name in names}
    return SamplingParams(**given | {"stop": tuple(args.stop)})


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    """Where the API listens, for `slm serve` and `slm up` alike."""
    parser.add_argument("--host", default="127.0.0.1", help="(default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))


def _fetch_vocab_options(parser: argparse.ArgumentParser) -> None:
    """install GPT-2's BPE vocabulary into tiktoken's cache (works offline from PyPI)

    Fill tiktoken's cache with r50k_base (sha256-checked). Without --source the file is
    taken from the openai-whisper sdist on PyPI (pip download; never installed).
    """
    parser.add_argument(
        "--source", type=Path, help="a gpt2.tiktoken file or an openai-whisper sdist"
    )


@command("fetch-vocab", _fetch_vocab_options)
def _fetch_vocab(args: argparse.Namespace) -> int:
    from model.tokenizer import install_vocab

    path = install_vocab(args.source)
    print(f"GPT-2 vocabulary installed in tiktoken's cache: {path}")
    return 0


def _init_options(parser: argparse.ArgumentParser) -> None:
    """write a freshly initialised (untrained) checkpoint of a preset"""
    from model.config import PRESETS

    parser.add_argument("--preset", choices=sorted(PRESETS), default="seed")
    parser.add_argument("--out", type=Path, required=True, help="run folder to write into")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed")
    parser.add_argument("--block-size", type=int, help="positions (default: the preset's)")
    parser.add_argument(
        "--vocabulary", help="gpt2, or GPT-2's first merges: gpt2-8k ... (default: the preset's)"
    )


@command("init", _init_options)
def _init(args: argparse.Namespace) -> int:
    import torch

    from model import GPT, preset
    from model.checkpoint import save_checkpoint
    from model.config import vocabulary_size

    torch.manual_seed(args.seed)
    overrides = {"block_size": args.block_size} if args.block_size else {}
    if args.vocabulary:
        overrides["vocab_size"] = vocabulary_size(args.vocabulary)
    model = GPT(preset(args.preset, **overrides))
    path = save_checkpoint(
        args.out, model, step=0, extra={"preset": args.preset, "init_seed": args.seed}
    )
    print(f"{args.preset}: {model.num_parameters():,} parameters, untrained, saved to {path}")
    return 0


def _info_options(parser: argparse.ArgumentParser) -> None:
    """print a checkpoint's metadata"""
    _add_checkpoint(parser, nargs="?")


@command("info", _info_options)
def _info(args: argparse.Namespace) -> int:
    from model.checkpoint import read_meta

    meta = read_meta(find_checkpoint(args.checkpoint))
    print(json.dumps(meta.to_dict(), indent=2))
    return 0


def _generate_options(parser: argparse.ArgumentParser) -> None:
    """stream a story from a checkpoint to stdout"""
    _add_checkpoint(parser, "--checkpoint")
    parser.add_argument("--prompt", default="Once upon a time", help="the story's beginning")
    _add_sampling_options(parser)
    _add_device(parser)
    parser.add_argument("--int8", action="store_true", help="int8 weights (CPU), ~2x faster")


@command("generate", _generate_options)
def _generate(args: argparse.Namespace) -> int:
    import torch

    from model.checkpoint import load_checkpoint
    from model.device import pick_device
    from model.generate import generate

    params = _sampling_params(args)
    device = pick_device(args.device)
    model, meta = load_checkpoint(find_checkpoint(args.checkpoint), device=device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        model = model.to(torch.bfloat16)
    print(f"[{meta.name}, step {meta.step}, on {device}]", file=sys.stderr)
    sys.stdout.write(args.prompt)
    started = time.perf_counter()
    first_token_at = None
    tokens = 0
    quantization = "int8" if args.int8 else "none"
    for event in generate(model, args.prompt, params, quantization=quantization):
        sys.stdout.write(event.text)
        sys.stdout.flush()
        first_token_at = first_token_at or time.perf_counter()
        tokens += event.token_id is not None  # <|endoftext|> ends a story, is not in it
        finish = event.finish_reason
    sys.stdout.write("\n")  # the story ends its line, as text on a terminal does
    sys.stdout.flush()
    decoding = time.perf_counter() - first_token_at
    rate = f", then {(tokens - 1) / decoding:.1f} tok/s" if tokens > 1 else ""
    print(
        f"[{finish}; {tokens} tokens; first after {first_token_at - started:.2f} s{rate}]",
        file=sys.stderr,
    )
    return 0


def _eval_options(parser: argparse.ArgumentParser) -> None:
    """measure checkpoints on a prepared valid split; print them side by side, write JSON

    Val loss, perplexity and bits per byte over every window of the valid split; accuracy
    at picking each story's true last sentence among other stories' (chance = 1/choices);
    diversity, repetition and length of stories sampled at seeds 0..N-1. model/evaluate.py says
    exactly what each number is. Each checkpoint's report is written as JSON beside it
    (<name>.eval.json) or to --out; --compare prints saved reports side by side.
    """
    from model.evaluate import (
        DEFAULT_BATCH_SIZE,
        DEFAULT_CHOICES,
        DEFAULT_ENDING_STORIES,
        DEFAULT_MAX_NEW_TOKENS,
        DEFAULT_SAMPLES,
    )
    from model.sampling import STORY_TEMPERATURE, STORY_TOP_K

    _add_checkpoint(parser, "checkpoints", nargs="*", metavar="CHECKPOINT")
    _add_data(parser)
    parser.add_argument("--out", type=Path, metavar="FILE", help="the JSON report (one checkpoint)")
    parser.add_argument(
        "--compare", type=Path, nargs="+", metavar="REPORT", help="print saved reports instead"
    )
    parser.add_argument(
        "--window", type=int, help="tokens predicted per window (default: block_size)"
    )
    options = [
        ("--batch-size", int, DEFAULT_BATCH_SIZE, "windows or questions per forward"),
        ("--endings", int, DEFAULT_ENDING_STORIES, "valid stories in the ending test"),
        ("--choices", int, DEFAULT_CHOICES, "endings per question, the true one included"),
        ("--seed", int, 0, "picks the wrong endings"),
        ("--samples", int, DEFAULT_SAMPLES, "stories to generate"),
        ("--max-new-tokens", int, DEFAULT_MAX_NEW_TOKENS, "length cap of each story"),
        ("--temperature", float, STORY_TEMPERATURE, "of the sampled stories"),
        ("--top-k", int, STORY_TOP_K, "0 = off"),
    ]
    for flag, kind, default, help_text in options:
        _add_defaulted(parser, flag, kind, default, help_text)
    _add_device(parser)
    _add_quiet(parser)


@command("eval", _eval_options)
def _eval(args: argparse.Namespace) -> int:
    from model.atomic import atomic_write_bytes
    from model.evaluate import EvalReport, format_table

    if args.compare:
        if args.checkpoints or args.data or args.out:
            raise ValueError(
                "--compare prints saved reports: it takes no checkpoint, --data or --out"
            )
        print(format_table([EvalReport.from_json(p.read_bytes(), str(p)) for p in args.compare]))
        return 0
    if args.data is None:
        raise ValueError("--data DATA_DIR (a folder from `slm prepare`) is required")
    paths = [find_checkpoint(path) for path in args.checkpoints or [None]]
    if args.out is not None and len(paths) > 1:
        raise ValueError(
            "--out names one file: with several checkpoints, leave it out and each report is "
            "written beside its checkpoint"
        )
    reports = []
    for path in paths:
        report = _evaluate_checkpoint(path, args)
        out = args.out or path.with_suffix(".eval.json")
        atomic_write_bytes(out, report.to_json())
        print(f"[{report.name}: report written to {out}]", file=sys.stderr)
        reports.append(report)
    print(format_table(reports))
    return 0


def _evaluate_checkpoint(path: Path, args: argparse.Namespace) -> EvalReport:
    """One checkpoint's EvalReport on the val split in its own vocabulary, with a progress bar
    per measurement."""
    from tqdm import tqdm

    from contract.jobs import checkpoint_version
    from model.checkpoint import load_checkpoint
    from model.device import pick_device
    from model.evaluate import EvalReport, generation_stats, story_endings, windowed_loss
    from worker.data import load_split

    model, meta = load_checkpoint(path, device=pick_device(args.device))
    model = model.float()  # the numbers must not depend on the dtype the weights were saved in
    name = checkpoint_version(path.parent.name, meta.name)
    tokens = load_split(args.data, "val", vocab_size=meta.config.vocab_size)
    bars: dict[str, tqdm] = {}

    def show(what: str, done: int, total: int) -> None:
        if what not in bars:
            bars[what] = tqdm(
                desc=f"{name} {what}", total=total, file=sys.stderr, disable=args.quiet
            )
        bars[what].update(done - bars[what].n)
        if done == total:
            bars[what].close()  # one bar at a time on the terminal

    try:
        batched = {"batch_size": args.batch_size, "progress": show}
        loss = windowed_loss(model, tokens, window=args.window, **batched)
        endings = story_endings(
            model, tokens, stories=args.endings, choices=args.choices, seed=args.seed, **batched
        )
        generation = generation_stats(
            model,
            samples=args.samples,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            progress=show,
        )
    finally:
        for bar in bars.values():
            bar.close()
    return EvalReport(
        name=name,
        checkpoint=str(path),
        step=meta.step,
        data=str(args.data),
        loss=loss,
        endings=endings,
        generation=generation,
        vocabulary=meta.config.vocabulary,
    )


def _export_hf_options(parser: argparse.ArgumentParser) -> None:
    """write a Hugging Face folder (GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM)"""
    _add_checkpoint(parser)
    parser.add_argument("out_dir", type=Path)


@command("export-hf", _export_hf_options)
def _export_hf(args: argparse.Namespace) -> int:
    from model.checkpoint import load_checkpoint
    from model.export.hf import HF_CLASSES, export_hf
    from model.export.weights import export_architecture

    model, meta = load_checkpoint(find_checkpoint(args.checkpoint))
    export_hf(model, args.out_dir)
    kind = HF_CLASSES[export_architecture(model.config)]
    print(f"{meta.name} exported as a transformers {kind} folder: {args.out_dir}")
    return 0


def _export_gguf_options(parser: argparse.ArgumentParser) -> None:
    """write a GGUF file for llama.cpp / Ollama"""
    _add_checkpoint(parser)
    parser.add_argument("file", type=Path)
    parser.add_argument("--type", choices=("f32", "f16", "q8_0"), default="f16")


@command("export-gguf", _export_gguf_options)
def _export_gguf(args: argparse.Namespace) -> int:
    from model.checkpoint import load_checkpoint
    from model.export.gguf import export_gguf
    from model.export.weights import export_architecture

    model, meta = load_checkpoint(find_checkpoint(args.checkpoint))
    export_gguf(model, args.file, dtype=args.type)
    kind = export_architecture(model.config)
    print(f"{meta.name} exported as GGUF ({args.type}, llama.cpp's {kind}): {args.file}")
    return 0


def _prepare_options(parser: argparse.ArgumentParser) -> None:
    """tokenize TinyStories into train.bin / val.bin and a manifest, for training

    Tokenize stories with GPT-2's BPE into DATA_DIR/train.bin and val.bin (uint16,
    <|endoftext|> after each story) and manifest.json, written last. Does nothing when DATA_DIR
    already holds the same sources prepared with the same settings.
    """
    from worker.data import DEFAULT_CHUNK_BYTES, DEFAULT_VAL_FRACTION

    parser.add_argument(
        "--source",
        required=True,
        help="hub:v2 or hub:v1 (roneneldan/TinyStories on the Hugging Face hub), a folder of "
        "*train*.txt and *valid*.txt files, one text file, or an http(s) URL of one",
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DATA_DIR", help="folder to write into"
    )
    val_fraction_help = (
        "share of stories sent to val when the source is a single file or URL (chosen by a hash "
        "of each story)"
    )
    _add_defaulted(parser, "--val-fraction", float, DEFAULT_VAL_FRACTION, val_fraction_help)
    parser.add_argument("--workers", type=int, help="tokenizer processes (default: one per CPU)")
    chunk_help = "bytes of text per chunk handed to a worker"
    _add_defaulted(parser, "--chunk-bytes", int, DEFAULT_CHUNK_BYTES, chunk_help)
    _add_quiet(parser)


@command("prepare", _prepare_options)
def _prepare(args: argparse.Namespace) -> int:
    from worker.data import MANIFEST, prepare

    result = prepare(
        args.source,
        args.out,
        val_fraction=args.val_fraction,
        workers=args.workers,
        chunk_bytes=args.chunk_bytes,
        quiet=args.quiet,
    )
    manifest = result.manifest
    if result.skipped:
        print(f"{args.out} already holds {args.source}, prepared ({MANIFEST} matches): no work")
        return 0
    tokens = sum(split.tokens for split in manifest.splits.values())
    for name, split in manifest.splits.items():
        path = args.out / split.file
        print(f"{name}: {split.tokens:,} tokens, {split.stories:,} stories → {path}")
    print(
        f"{tokens:,} tokens in {result.seconds:.1f} s ({tokens / result.seconds:,.0f} tokens/s); "
        f"manifest: {args.out / MANIFEST}"
    )
    return 0


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, so `slm train --help` lists every setting; unset
    options stay None and TrainConfig's own defaults apply."""
    import types
    import typing

    from contract.train import TrainConfig

    group = parser.add_argument_group("training settings (TrainConfig)")
    for name, field in TrainConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = field.description
        if field.default is not None:
            help_text += f" (default: {field.default})"
        annotation = field.annotation
        # `int | None` (a types.UnionType) or `Position | None` (a typing.Union: Literal's `|`)
        if typing.get_origin(annotation) in (types.UnionType, typing.Union):
            (annotation,) = (arg for arg in typing.get_args(annotation) if arg is not type(None))
        if annotation is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(annotation) is typing.Literal:
            group.add_argument(flag, choices=typing.get_args(annotation), help=help_text)
        else:
            group.add_argument(flag, type=annotation, metavar=name.upper(), help=help_text)


def _train_options(parser: argparse.ArgumentParser) -> None:
    """train a model on prepared token files (or resume, or fine-tune)

    Train from scratch (--preset), fine-tune a checkpoint (--init-from) or resume a run
    exactly (--resume RUN_DIR, or --out naming a run that holds a training state). Checkpoints,
    history.json and loss.png go into RUN_DIR. Under torchrun every process trains a slice of
    each batch; only rank 0 writes.
    """
    _add_data(parser)
    parser.add_argument("--out", type=Path, metavar="RUN_DIR", help="run folder to write into")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue this run exactly")
    parser.add_argument(
        "--init-from", type=Path, metavar="CHECKPOINT", help="fine-tune from these weights"
    )
    _add_quiet(parser, "no progress bar or log lines")
    _add_config_options(parser)


@command("train", _train_options)
def _train(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from contract.train import LENGTHS, TrainConfig, describe_error
    from worker.callbacks import ProgressBar, StopOnInterrupt
    from worker.state import has_state, load_state
    from worker.trainer import train

    given = {name: getattr(args, name) for name in TrainConfig.model_fields}
    given = {name: value for name, value in given.items() if value is not None}
    if args.resume is not None:
        length = {name: given.pop(name) for name in LENGTHS if name in given}
        if given or args.data or args.out or args.init_from:
            raise ValueError(
                "--resume RUN_DIR takes no other options than --max-steps, --max-tokens or "
                "--max-minutes (to train it longer): the run keeps its own"
            )
        if not has_state(args.resume):
            raise ValueError(f"{args.resume} holds no training state to resume")
        state = load_state(args.resume)
        if length:  # the new length replaces the old, whichever way it was given
            length = {**dict.fromkeys(LENGTHS), **length}
        try:
            config = TrainConfig.from_saved({**state.config, **length})
        except ValidationError as error:
            raise ValueError(describe_error(error)) from None
        data_dir, run_dir = Path(state.data_dir), args.resume
    else:
        if args.data is None or args.out is None:
            raise ValueError("--data DATA_DIR and --out RUN_DIR are required (or --resume)")
        try:
            config = TrainConfig(**given)
        except ValidationError as error:
            raise ValueError(describe_error(error)) from None
        data_dir, run_dir = args.data, args.out

    master = int(os.environ.get("RANK", 0)) == 0  # under torchrun, rank 0 alone reports
    with ProgressBar(quiet=args.quiet or not master) as bar, StopOnInterrupt() as interrupt:
        callbacks = [bar, interrupt]
        result = train(config, data_dir, run_dir, init_from=args.init_from, callbacks=callbacks)
    if master:
        best = "none" if result.best_val_loss is None else f"{result.best_val_loss:.4f}"
        print(
            f"{result.status} at step {result.step}/{result.max_steps} "
            f"({result.tokens_seen:,} tokens); best val loss {best}; "
            f"checkpoint {result.last_checkpoint}"
        )
        if result.status == "stopped":
            print(f"continue with: slm train --resume {run_dir}")
    return 0


def _worker_options(parser: argparse.ArgumentParser) -> None:
    """run training jobs from the queue (an RQ worker; one job at a time)

    An RQ worker for the /train-jobs API. Settings come from the environment (REDIS_URL,
    QUEUE_NAME, CHECKPOINT_DIR, DATA_DIR, JOB_TIMEOUT_S, JOB_HEARTBEAT_S, JOB_ABANDONED_AFTER_S);
    without REDIS_URL it starts an embedded Redis and prints its URL.
    """
    parser.add_argument("--queue", help="queue to work on (default: $QUEUE_NAME or slm-train)")
    parser.add_argument("--burst", action="store_true", help="exit once the queue is empty")


@command("worker", _worker_options)
def _worker(args: argparse.Namespace) -> int:
    import logging

    from contract.broker import default_state_dir, embedded_redis
    from contract.settings import Settings
    from worker.runner import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = Settings()
    if settings.redis_url is not None:
        run_worker(settings, queue_name=args.queue, burst=args.burst)
        return 0
    with embedded_redis(default_state_dir(settings)) as url:
        print(f"no REDIS_URL: using an embedded Redis; share it with REDIS_URL={url}", flush=True)
        os.environ["REDIS_URL"] = url  # for the work horses, which read Settings again
        settings = settings.model_copy(update={"redis_url": url})
        run_worker(settings, queue_name=args.queue, burst=args.burst)
    return 0


def _serve_options(parser: argparse.ArgumentParser) -> None:
    """serve stories over HTTP (SSE, OpenAI-compatible) from CHECKPOINT_DIR

    Run the inference service. Settings come from the environment (CHECKPOINT_DIR,
    API_KEY, MAX_BATCH_SIZE, REDIS_URL...); new checkpoints are picked up while it runs.
    """
    _add_server_options(parser)


@command("serve", _serve_options)
def _serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from service.app import create_app
    from service.auth import is_loopback_name
    from service.connections import bounded_protocol

    # The service's own loggers (reloads, engine errors) at the level uvicorn's use.
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
    app = create_app()
    if app.state.settings.api_key is None and not is_loopback_name(args.host):
        logging.getLogger("slm.service").warning(
            "listening on %s with no API_KEY: anyone who reaches this port can generate stories "
            "(training stays loopback-only); set API_KEY to require a key",
            args.host,
        )
    # One process: the engine batches every request on one copy of the model.
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        http=bounded_protocol(app.state.settings),  # MAX_CONNECTIONS, HEADER_TIMEOUT_S
    )
    return 0


def _up_options(parser: argparse.ArgumentParser) -> None:
    """run Redis, a training worker and the API together (the compose setup, no Docker)

    Start Redis (REDIS_URL's, or an embedded one), one `slm worker` and `slm serve`, with
    their logs side by side; Ctrl-C stops them all.
    """
    _add_server_options(parser)


@command("up", _up_options)
def _up(args: argparse.Namespace) -> int:
    from slm.up import run_up

    return run_up(args.host, args.port, args.log_level)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slm", description="Train and serve a small story-writing GPT."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for registered in COMMANDS:
        sub = commands.add_parser(
            registered.name, help=registered.help, description=registered.description
        )
        registered.options(sub)
        sub.set_defaults(handler=registered.handler)
    return parser


# The extra that installs each optional dependency a command may import.
EXTRA_OF_MODULE = {
    "gguf": "export",
    "matplotlib": "worker",
    "huggingface_hub": "worker",
    "fastapi": "service",
    "uvicorn": "service",
    "sse_starlette": "service",
    "prometheus_client": "service",
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ModuleNotFoundError as error:
        extra = EXTRA_OF_MODULE.get((error.name or "").partition(".")[0])
        if extra is None:
            raise
        print(
            f"slm {args.command}: needs {error.name}, from the {extra!r} extra: "
            f'pip install -c constraints/cpu.txt -e ".[{extra}]" in a checkout, '
            f'else pip install "slm[{extra}]"',
            file=sys.stderr,
        )
        return 1
    except (ValueError, OSError, RuntimeError) as error:
        print(f"slm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

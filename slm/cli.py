"""`slm`: one command line for everything the project does."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _fetch_vocab(args: argparse.Namespace) -> int:
    from model.tokenizer import install_vocab

    path = install_vocab(args.source)
    print(f"GPT-2 vocabulary installed in tiktoken's cache: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fetch = commands.add_parser(
        "fetch-vocab",
        help="install GPT-2's BPE vocabulary into tiktoken's cache (works offline from PyPI)",
        description="Fill tiktoken's cache with r50k_base (sha256-checked). Without --source the "
        "file is taken from the openai-whisper sdist on PyPI (pip download; never installed).",
    )
    fetch.add_argument(
        "--source", type=Path, help="a gpt2.tiktoken file or an openai-whisper sdist"
    )
    fetch.set_defaults(handler=_fetch_vocab)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"slm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

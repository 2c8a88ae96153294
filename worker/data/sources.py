"""Where stories come from: ``prepare``'s ``source`` (``slm prepare --source``) → input files.

- ``hub:v2`` / ``hub:v1``: ``TinyStoriesV2-GPT4-{train,valid}.txt`` /
  ``TinyStories-{train,valid}.txt`` from the ``roneneldan/TinyStories`` dataset on the Hugging
  Face hub (downloaded once, resumably, and cached by huggingface_hub);
- a folder holding ``*train*.txt`` and ``*valid*.txt`` files, named as on the hub; train files are
  concatenated in name order, and so are valid files;
- one text file, or an ``http(s)://`` URL of one, split story by story between train and val
  (the rule: ``worker.data.encoding.goes_to_val``).
"""

from __future__ import annotations

import http.client
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse

from tqdm import tqdm

from contract.datasets import SourceFile
from worker.data.manifest import BOTH, DataError, file_sha256

HUB_REPO = "roneneldan/TinyStories"
HUB_FILES = {
    "v1": {"train": "TinyStories-train.txt", "val": "TinyStories-valid.txt"},
    "v2": {"train": "TinyStoriesV2-GPT4-train.txt", "val": "TinyStoriesV2-GPT4-valid.txt"},
}
_DOWNLOAD_BLOCK = 1 << 20


@dataclass(frozen=True)
class Input:
    """One text file to tokenize, as a source resolves to."""

    path: Path
    name: str  # the file's own name (a download's, a hub file's), not where it lies locally
    split: str  # "train", "val" or BOTH
    temporary: bool = False  # a download, deleted when preparation ends


def resolve(source: str, out_dir: Path, quiet: bool) -> list[Input]:
    """The files ``source`` names; a URL is downloaded to ``out_dir`` first."""
    if source.startswith("hub:"):
        return _from_hub(source)
    if source.startswith(("http://", "https://")):
        name = PurePosixPath(urlparse(source).path).name or "download.txt"
        return [Input(download(source, out_dir / f"{name}.part", quiet), name, BOTH, True)]
    return _from_path(Path(source))


def _from_hub(source: str) -> list[Input]:
    files = HUB_FILES.get(source.removeprefix("hub:"))
    if files is None:
        raise DataError(f"unknown hub source {source!r}: use {' or '.join(_hub_sources())}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DataError(
            "hub sources need huggingface_hub: pip install 'slm[worker]'; or pass --source "
            "a local file or folder, or an http(s) URL"
        ) from None
    inputs = []
    for split, name in files.items():
        try:
            path = hf_hub_download(HUB_REPO, name, repo_type="dataset")
        except Exception as error:  # huggingface_hub raises HTTP, network and cache errors alike
            raise DataError(
                f"cannot fetch {name} from the Hugging Face hub ({HUB_REPO}): {error} — "
                f"without the hub, pass --source a local file or folder, or an http(s) URL"
            ) from None
        inputs.append(Input(Path(path), name, split))
    return inputs


def _hub_sources() -> list[str]:
    return [f"hub:{version}" for version in HUB_FILES]


def _from_path(path: Path) -> list[Input]:
    if path.is_file():
        return [Input(path, path.name, BOTH)]
    if not path.is_dir():
        raise DataError(
            f"{path}: no such file or folder (a source is a text file, a folder of "
            f"*train*.txt and *valid*.txt files, an http(s) URL, or "
            f"{' / '.join(_hub_sources())})"
        )
    val = sorted(p for p in path.glob("*valid*.txt") if p.is_file())
    train = sorted(p for p in path.glob("*train*.txt") if p.is_file() and p not in val)
    for files, pattern in ((train, "*train*.txt"), (val, "*valid*.txt")):
        if not files:
            raise DataError(
                f"{path} holds no {pattern} file: a folder source needs train and valid files "
                f"named as on the hub (TinyStoriesV2-GPT4-train.txt, "
                f"TinyStoriesV2-GPT4-valid.txt); to split a single file, pass the file itself"
            )
    return [Input(p, p.name, "train") for p in train] + [Input(p, p.name, "val") for p in val]


def download(url: str, part: Path, quiet: bool = True) -> Path:
    """Stream ``url`` into ``part`` and return it. A ``part`` left by a dropped connection is
    resumed with an HTTP range request where the server allows; a body shorter than its
    Content-Length is an error, never a silently short file."""
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.is_file() else 0
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {}),
            timeout=60,
        )
    except HTTPError as error:
        if error.code == 416 and have:  # the part is stale (the file changed): start over
            part.unlink()
            return download(url, part, quiet)
        raise DataError(f"{url}: HTTP {error.code} {error.reason}") from None
    except (URLError, OSError) as error:
        raise DataError(f"cannot download {url}: {getattr(error, 'reason', error)}") from None
    with response:
        if response.status != 206:  # a server that ignores ranges sends the whole file
            have = 0
        length = response.headers.get("Content-Length")
        expected = None if length is None else have + int(length)
        received = have
        with (
            part.open("ab" if have else "wb") as handle,
            tqdm(
                total=expected,
                initial=have,
                unit="B",
                unit_scale=True,
                desc=f"downloading {part.name.removesuffix('.part')}",
                file=sys.stderr,
                disable=quiet,
            ) as bar,
        ):
            for block in _response_blocks(response, url):
                handle.write(block)
                received += len(block)
                bar.update(len(block))
    if expected is not None and received != expected:
        raise DataError(
            f"{url}: the connection dropped mid-way ({received:,} of {expected:,} bytes); "
            f"run again to resume"
        )
    return part


def _response_blocks(response: http.client.HTTPResponse, url: str) -> Iterator[bytes]:
    try:
        while block := response.read(_DOWNLOAD_BLOCK):
            yield block
    except (http.client.HTTPException, OSError) as error:
        raise DataError(f"{url}: the connection dropped mid-way ({error!r})") from None


def describe(item: Input) -> SourceFile:
    size = item.path.stat().st_size
    if size == 0:
        raise DataError(f"{item.path} is empty")
    return SourceFile(item.name, item.split, size, file_sha256(item.path))

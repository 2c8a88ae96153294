"""Data preparation: real files, real worker processes, a real HTTP server, the real command."""

from __future__ import annotations

import hashlib
import http.server
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from servers import alive, children_of

import worker.data.encoding
from slm.cli import build_parser
from worker.data import DataError, load_split, prepare, read_chunks, read_manifest

SLM = str(Path(sys.executable).with_name("slm"))
EOT = 50256
SEPARATOR = "<|endoftext|>"


def source_stories(path: Path) -> list[str]:
    """Stories of a file in the TinyStories format, read line by line (independently of the
    code under test): each is followed by a line holding only <|endoftext|>."""
    stories, lines = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() == SEPARATOR:
            stories.append("\n".join(lines).strip())
            lines = []
        else:
            lines.append(line)
    stories.append("\n".join(lines).strip())
    return [story for story in stories if story]


def expected_tokens(tokenizer, stories: list[str]) -> list[int]:
    """Each story tokenized on its own, <|endoftext|> after it."""
    return [token for story in stories for token in [*tokenizer.encode(story), EOT]]


def split_at_eot(tokenizer, tokens: np.ndarray) -> list[str]:
    ends = np.flatnonzero(tokens == EOT)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(tokens[a:b].tolist()) for a, b in zip(starts, ends, strict=True)]


def synthetic_stories(count: int, start: int = 0) -> list[str]:
    # Multi-byte characters everywhere, so a chunk cut in the wrong place would corrupt them.
    return [
        f'Story {i}. Mia saw {i % 7} red birds — and one blue bird 🐦.\n\n"Wow," said Tom. '
        f"They played café games until dark."
        for i in range(start, start + count)
    ]


def write_stories(path: Path, stories: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{story}\n{SEPARATOR}\n" for story in stories), encoding="utf-8")
    return path


def story_folder(folder: Path, train: int = 60, val: int = 20) -> Path:
    write_stories(folder / "stories-train.txt", synthetic_stories(train))
    write_stories(folder / "stories-valid.txt", synthetic_stories(val, start=10_000))
    return folder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- the shared TinyStories excerpts ---------------------------------------------------------


@pytest.fixture
def prepared_shared(shared_data, tmp_path) -> Path:
    # One chunk per file, one worker: the simplest path, the reference for the others.
    out = tmp_path / "one-shot"
    prepare(shared_data, out, workers=1, chunk_bytes=1 << 30, quiet=True)
    return out


def test_tokens_equal_each_story_tokenized_alone(prepared_shared, shared_data, tokenizer) -> None:
    train_files = sorted(shared_data.glob("*train*.txt"))
    assert [p.name for p in train_files] == [
        "tinystories-train-part-v1.txt",
        "tinystories-train-part-v2.txt",
    ]
    train = [story for path in train_files for story in source_stories(path)]
    val = source_stories(shared_data / "tinystories-valid.txt")
    assert (len(train), len(val)) == (2316 + 1727, 1000)
    assert load_split(prepared_shared, "train").tolist() == expected_tokens(tokenizer, train)
    assert load_split(prepared_shared, "val").tolist() == expected_tokens(tokenizer, val)


def test_first_story_decodes_to_the_sources_first_story(
    prepared_shared, shared_data, tokenizer
) -> None:
    train = load_split(prepared_shared, "train")
    first = train[: int(np.argmax(train == EOT))].tolist()
    text = (shared_data / "tinystories-train-part-v1.txt").read_text(encoding="utf-8")
    assert tokenizer.decode(first) == text.split(f"\n{SEPARATOR}\n")[0]
    assert len(first) > 50


def test_manifest_describes_sources_tokenizer_and_splits(prepared_shared, shared_data) -> None:
    manifest = read_manifest(prepared_shared)
    assert (manifest.format_version, manifest.tokenizer, manifest.eot_id, manifest.dtype) == (
        1,
        "r50k_base",
        EOT,
        "uint16",
    )
    assert manifest.val_fraction is None  # the folder has its own valid file
    described = {(s.name, s.split, s.size, s.sha256) for s in manifest.sources}
    actual = {
        (p.name, "val" if "valid" in p.name else "train", p.stat().st_size, sha256(p))
        for p in shared_data.glob("*.txt")
    }
    assert described == actual
    for split, stories in (("train", 4043), ("val", 1000)):
        info = manifest.splits[split]
        tokens = load_split(prepared_shared, split)
        assert (info.file, info.tokens, info.stories) == (f"{split}.bin", len(tokens), stories)
        assert info.sha256 == sha256(prepared_shared / info.file)
    assert files_in(prepared_shared) == ["manifest.json", "train.bin", "val.bin"]


def test_chunked_parallel_preparation_equals_one_shot(
    prepared_shared, shared_data, tmp_path
) -> None:
    result = prepare(shared_data, tmp_path, workers=3, chunk_bytes=16 << 10, quiet=True)
    assert not result.skipped
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / name).read_bytes() == (prepared_shared / name).read_bytes()
    assert read_manifest(tmp_path).splits == read_manifest(prepared_shared).splits


# --- reruns ----------------------------------------------------------------------------------


def test_rerun_on_the_same_inputs_does_no_work(tmp_path) -> None:
    source, out = story_folder(tmp_path / "src"), tmp_path / "data"
    prepare(source, out, quiet=True)
    mtimes = {name: (out / name).stat().st_mtime_ns for name in files_in(out)}
    started = time.perf_counter()
    again = prepare(source, out, quiet=True)
    assert again.skipped and time.perf_counter() - started < 0.5
    assert {name: (out / name).stat().st_mtime_ns for name in files_in(out)} == mtimes
    assert again.manifest == read_manifest(out)


def test_a_changed_source_is_prepared_again(tmp_path, tokenizer) -> None:
    source, out = story_folder(tmp_path / "src"), tmp_path / "data"
    prepare(source, out, quiet=True)
    changed = synthetic_stories(5, start=500)
    write_stories(source / "stories-valid.txt", changed)
    result = prepare(source, out, quiet=True)
    assert not result.skipped
    assert load_split(out, "val").tolist() == expected_tokens(tokenizer, changed)


def test_a_changed_val_fraction_is_prepared_again(tmp_path) -> None:
    source = write_stories(tmp_path / "stories.txt", synthetic_stories(200))
    out = tmp_path / "data"
    first = prepare(source, out, val_fraction=0.1, quiet=True)
    second = prepare(source, out, val_fraction=0.3, quiet=True)
    assert not second.skipped
    assert second.manifest.splits["val"].stories > first.manifest.splits["val"].stories


# --- the text format -------------------------------------------------------------------------


def test_single_file_val_stories_are_those_the_documented_hash_picks(tmp_path, tokenizer) -> None:
    stories = synthetic_stories(400)
    source = write_stories(tmp_path / "my-stories.txt", stories)

    def documented_val(story: str) -> bool:  # the rule the module docstring states
        digest = hashlib.blake2b(story.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "big") < 0.2 * 2**64

    prepare(source, tmp_path / "data", val_fraction=0.2, workers=2, chunk_bytes=2048, quiet=True)
    val = split_at_eot(tokenizer, load_split(tmp_path / "data", "val"))
    train = split_at_eot(tokenizer, load_split(tmp_path / "data", "train"))
    assert val == [story for story in stories if documented_val(story)]
    assert train == [story for story in stories if not documented_val(story)]
    assert 40 < len(val) < 120 and len(train) + len(val) == 400
    assert read_manifest(tmp_path / "data").val_fraction == 0.2


def test_stories_are_stripped_and_separators_read_as_lines(tmp_path, tokenizer) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a-train.txt").write_text(
        "\n\n  First story.  \n<|endoftext|>\n"
        "\n<|endoftext|>\n"  # an empty story: skipped
        "Says <|endoftext|> inside a line, which is text.\r\n  <|endoftext|>\t\r\n"
        "Last story, with no separator after it.\n"
    )
    write_stories(tmp_path / "src" / "a-valid.txt", ["Valid story."])
    prepare(tmp_path / "src", tmp_path / "data", quiet=True)
    assert split_at_eot(tokenizer, load_split(tmp_path / "data", "train")) == [
        "First story.",
        "Says <|endoftext|> inside a line, which is text.",
        "Last story, with no separator after it.",
    ]


def test_chunks_cover_the_file_and_end_after_separator_lines(tmp_path) -> None:
    source = write_stories(tmp_path / "stories.txt", synthetic_stories(100))
    pieces = list(read_chunks(source, 1000))
    assert len(pieces) > 5
    assert b"".join(piece for _, piece in pieces) == source.read_bytes()
    assert [offset for offset, _ in pieces] == list(
        itertools.accumulate((len(piece) for _, piece in pieces[:-1]), initial=0)
    )
    for _, piece in pieces:
        assert piece.endswith(b"\n<|endoftext|>\n")
        assert len(piece) < 1000 + 200  # a chunk's bytes plus the rest of one story


def test_a_story_too_long_to_hold_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(worker.data.encoding, "MAX_STORY_BYTES", 10_000)
    source = write_stories(tmp_path / "long.txt", ["word " * 5_000])
    with pytest.raises(DataError, match=r"long.txt: no line holding only .* from byte offset 0"):
        list(read_chunks(source, 1000))


# --- bad input -------------------------------------------------------------------------------


def test_missing_source_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(DataError, match=r"nope.txt: no such file or folder"):
        prepare(tmp_path / "nope.txt", tmp_path / "data", quiet=True)


def test_empty_file_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty.txt is empty"):
        prepare(tmp_path / "empty.txt", tmp_path / "data", quiet=True)


def test_text_without_separators_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "plain.txt").write_text("Just some text.\nNo separators at all.\n")
    with pytest.raises(DataError, match=r"plain.txt holds no line with only <\|endoftext\|>"):
        prepare(tmp_path / "plain.txt", tmp_path / "data", quiet=True)


def test_invalid_utf8_names_the_file_and_byte_offset(tmp_path) -> None:
    good = "".join(f"{story}\n{SEPARATOR}\n" for story in synthetic_stories(50)).encode()
    (tmp_path / "bad.txt").write_bytes(good + b"A bad \xff byte.\n" + SEPARATOR.encode() + b"\n")
    offset = len(good) + len(b"A bad ")
    with pytest.raises(DataError, match=rf"bad.txt: invalid UTF-8 at byte offset {offset:,}"):
        prepare(tmp_path / "bad.txt", tmp_path / "data", chunk_bytes=1000, quiet=True)


@pytest.mark.parametrize("missing", ["train", "valid"])
def test_folder_without_train_or_valid_files_is_a_clear_error(tmp_path, missing) -> None:
    story_folder(tmp_path / "src")
    (tmp_path / "src" / f"stories-{missing}.txt").unlink()
    with pytest.raises(DataError, match=rf"src holds no \*{missing}\*.txt file"):
        prepare(tmp_path / "src", tmp_path / "data", quiet=True)


def test_a_split_left_without_stories_is_a_clear_error(tmp_path) -> None:
    source = write_stories(tmp_path / "two.txt", ["One story.", "Another story."])
    with pytest.raises(DataError, match=r"no stories for val .* \(raise --val-fraction\)"):
        prepare(source, tmp_path / "data", val_fraction=1e-9, quiet=True)
    assert files_in(tmp_path / "data") == []


def test_unknown_hub_version_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(DataError, match=r"unknown hub source 'hub:v9': use hub:v1 or hub:v2"):
        prepare("hub:v9", tmp_path / "data", quiet=True)


# --- the reader ------------------------------------------------------------------------------


def test_reader_refuses_a_folder_without_its_manifest(tmp_path) -> None:
    prepare(story_folder(tmp_path / "src"), tmp_path / "data", quiet=True)
    (tmp_path / "data" / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"preparation did not finish"):
        load_split(tmp_path / "data", "train")


def test_reader_refuses_token_files_that_do_not_match_the_manifest(tmp_path) -> None:
    out = tmp_path / "data"
    prepare(story_folder(tmp_path / "src"), out, quiet=True)
    tokens = (out / "val.bin").read_bytes()
    (out / "val.bin").write_bytes(tokens[:-2])
    with pytest.raises(DataError, match=r"val.bin holds .* bytes, its manifest says"):
        load_split(out, "val")
    (out / "val.bin").write_bytes(bytes([tokens[0] ^ 1]) + tokens[1:])
    assert len(load_split(out, "val")) == len(tokens) // 2  # sizes alone look right
    with pytest.raises(DataError, match=r"val.bin does not match the sha256"):
        load_split(out, "val", verify=True)


# --- interrupted runs ------------------------------------------------------------------------


def test_a_failing_worker_leaves_no_files_and_a_rerun_finishes(tmp_path, tokenizer) -> None:
    stories = synthetic_stories(300)
    source = tmp_path / "src" / "stories-train.txt"
    write_stories(source, stories)
    write_stories(tmp_path / "src" / "stories-valid.txt", ["Valid."])
    with source.open("ab") as handle:  # bad bytes in the last of many chunks
        handle.write(b"\xc3\x28\n" + SEPARATOR.encode() + b"\n")
    out = tmp_path / "data"
    with pytest.raises(DataError, match=r"invalid UTF-8"):
        prepare(tmp_path / "src", out, workers=2, chunk_bytes=4096, quiet=True)
    assert files_in(out) == []
    write_stories(source, stories)
    prepare(tmp_path / "src", out, workers=2, chunk_bytes=4096, quiet=True)
    assert load_split(out, "train").tolist() == expected_tokens(tokenizer, stories)


def test_a_failed_preparation_keeps_the_previous_finished_one(tmp_path) -> None:
    source, out = story_folder(tmp_path / "src"), tmp_path / "data"
    before = prepare(source, out, quiet=True).manifest
    (source / "stories-valid.txt").write_bytes(b"\xff\n")
    with pytest.raises(DataError):
        prepare(source, out, quiet=True)
    assert read_manifest(out) == before
    assert len(load_split(out, "val", verify=True)) == before.splits["val"].tokens


def start_slow_prepare(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """`slm prepare` on ~13 MB with one worker and small chunks (a second or two of work),
    returned once it has written tokens to its temporary file."""
    source = write_stories(tmp_path / "big.txt", synthetic_stories(100_000))
    out = tmp_path / "data"
    args = ["--source", str(source), "--out", str(out), "--workers", "1", "--chunk-bytes", "4096"]
    run = subprocess.Popen([SLM, "prepare", *args, "--quiet"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not ((out / "train.bin.tmp").exists() and (out / "train.bin.tmp").stat().st_size):
        assert run.poll() is None and time.monotonic() < deadline, "prepare ended too early"
        time.sleep(0.005)
    return run, source, out


def test_a_killed_run_leaves_no_manifest_no_workers_and_a_rerun_finishes(tmp_path) -> None:
    run, source, out = start_slow_prepare(tmp_path)
    workers = children_of(run.pid)
    assert workers, "prepare runs its tokenizer in worker processes"
    run.kill()
    run.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers), "workers outlived their killed parent"
    assert "manifest.json" not in files_in(out)
    with pytest.raises(DataError, match=r"did not finish"):
        load_split(out, "train")
    result = prepare(source, out, quiet=True)
    assert not result.skipped and result.manifest.splits["train"].stories > 90_000
    assert files_in(out) == ["manifest.json", "train.bin", "val.bin"]


def test_ctrl_c_stops_cleanly_and_leaves_nothing(tmp_path) -> None:
    run, _, out = start_slow_prepare(tmp_path)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=30)
    assert run.returncode == 130 and b"Traceback" not in stderr
    assert files_in(out) == []


# --- over HTTP -------------------------------------------------------------------------------


class StoryHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.root``: ``/ok/NAME`` whole; ``/drop/NAME`` announces the whole length
    but sends half and closes; ``/flaky/NAME`` does the same unless asked for a byte range."""

    server: StoryServer

    def do_GET(self) -> None:
        kind, _, name = self.path.strip("/").partition("/")
        path = self.server.root / name
        self.server.ranges.append(self.headers["Range"])
        if not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        start = 0
        if kind == "flaky" and self.headers["Range"]:
            start = int(self.headers["Range"].removeprefix("bytes=").removesuffix("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if kind in ("drop", "flaky") and not start:
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
        else:
            self.wfile.write(body[start:])

    def log_message(self, format: str, *args: object) -> None:
        pass


class StoryServer(http.server.ThreadingHTTPServer):
    root: Path
    ranges: list[str | None]


@pytest.fixture
def server(tmp_path, monkeypatch) -> Iterator[StoryServer]:
    monkeypatch.setenv("ALLOWED_DATA_HOSTS", "127.0.0.1")  # a local server, on purpose
    httpd = StoryServer(("127.0.0.1", 0), StoryHandler)
    httpd.root, httpd.ranges = tmp_path / "served", []
    write_stories(httpd.root / "stories.txt", synthetic_stories(300))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def url(server: StoryServer, path: str) -> str:
    return f"http://127.0.0.1:{server.server_port}/{path}"


def test_url_source_equals_the_same_file_prepared_locally(server, tmp_path) -> None:
    remote = prepare(url(server, "ok/stories.txt"), tmp_path / "remote", quiet=True)
    local = prepare(server.root / "stories.txt", tmp_path / "local", quiet=True)
    assert remote.manifest.sources == local.manifest.sources
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert files_in(tmp_path / "remote") == ["manifest.json", "train.bin", "val.bin"]


def test_url_answering_404_is_a_clear_error(server, tmp_path) -> None:
    with pytest.raises(DataError, match=r"/ok/missing.txt: HTTP 404"):
        prepare(url(server, "ok/missing.txt"), tmp_path / "data", quiet=True)
    assert files_in(tmp_path / "data") == []


def test_connection_dropped_mid_way_is_an_error_not_a_short_file(server, tmp_path) -> None:
    with pytest.raises(DataError, match=r"the connection dropped mid-way \([\d,]+ of [\d,]+"):
        prepare(url(server, "drop/stories.txt"), tmp_path / "data", quiet=True)
    # Only the partial download remains, kept to resume from; nothing that looks finished.
    assert files_in(tmp_path / "data") == ["stories.txt.part"]


def test_a_dropped_download_resumes_where_it_stopped(server, tmp_path) -> None:
    size = (server.root / "stories.txt").stat().st_size
    with pytest.raises(DataError, match=r"dropped mid-way"):
        prepare(url(server, "flaky/stories.txt"), tmp_path / "data", quiet=True)
    prepare(url(server, "flaky/stories.txt"), tmp_path / "data", quiet=True)
    assert server.ranges == [None, f"bytes={size // 2}-"]
    local = prepare(server.root / "stories.txt", tmp_path / "local", quiet=True)
    assert read_manifest(tmp_path / "data").sources == local.manifest.sources
    assert files_in(tmp_path / "data") == ["manifest.json", "train.bin", "val.bin"]


# --- the command line and the hub ------------------------------------------------------------


def slm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SLM, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


def test_cli_prepares_and_says_where_and_what(tmp_path) -> None:
    source, out = story_folder(tmp_path / "src"), tmp_path / "data"
    done = slm("prepare", "--source", str(source), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"train: {read_manifest(out).splits['train'].tokens:,} tokens, 60 stories" in done.stdout
    assert str(out / "train.bin") in done.stdout and str(out / "manifest.json") in done.stdout
    assert "tokenizing" in done.stderr  # the progress bar
    again = slm("prepare", "--source", str(source), "--out", str(out), "--quiet")
    assert again.returncode == 0 and "no work" in again.stdout and again.stderr == ""


def test_cli_bad_source_exits_2_with_the_error_only(tmp_path) -> None:
    (tmp_path / "plain.txt").write_text("no separators here\n")
    result = slm("prepare", "--source", str(tmp_path / "plain.txt"), "--out", str(tmp_path / "d"))
    assert result.returncode == 2
    assert "slm prepare: error:" in result.stderr and "holds no line with only" in result.stderr
    assert "Traceback" not in result.stderr


def test_hub_source_reads_huggingface_hubs_cache(tmp_path) -> None:
    # A cache laid out as huggingface_hub keeps it, read offline: the real library, no network.
    snapshot = tmp_path / "hub" / "datasets--roneneldan--TinyStories" / "snapshots" / "c0ffee"
    write_stories(snapshot / "TinyStoriesV2-GPT4-train.txt", synthetic_stories(30))
    write_stories(snapshot / "TinyStoriesV2-GPT4-valid.txt", synthetic_stories(10, start=50))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("c0ffee")
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = slm("prepare", "--source", "hub:v2", "--out", str(tmp_path / "data"), env=offline)
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(tmp_path / "data")
    assert [(s.name, s.split) for s in manifest.sources] == [
        ("TinyStoriesV2-GPT4-train.txt", "train"),
        ("TinyStoriesV2-GPT4-valid.txt", "val"),
    ]
    assert (manifest.splits["train"].stories, manifest.splits["val"].stories) == (30, 10)


def test_unreachable_hub_suggests_a_local_path_or_url(tmp_path) -> None:
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    result = slm("prepare", "--source", "hub:v1", "--out", str(tmp_path / "data"), env=offline)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot fetch TinyStories-train.txt from the Hugging Face hub" in result.stderr
    assert "pass --source a local file or folder, or an http(s) URL" in result.stderr


def test_cli_help_lists_every_option(capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prepare", "--help"])
    shown = capsys.readouterr().out
    for option in ("--source", "--out", "--val-fraction", "--workers", "--chunk-bytes", "--quiet"):
        assert option in shown

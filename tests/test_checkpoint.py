"""Checkpoints: round trips, the manifest, refusing anything we did not write, and a reader that
polls while another process writes."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from model import checkpoint
from model.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    latest_checkpoint,
    load_checkpoint,
    newest_checkpoint,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from model.config import preset
from model.gpt import GPT

ROOT = Path(__file__).resolve().parents[1]
TINY = preset("tiny")


def make_model(**overrides: Any) -> GPT:
    torch.manual_seed(0)
    return GPT(preset("tiny", **overrides))


@pytest.fixture(scope="module")
def model() -> GPT:
    return make_model()


@pytest.fixture
def saved(tmp_path: Path, model: GPT) -> Path:
    """The metadata path of a checkpoint of ``model`` in a fresh run folder."""
    return save_checkpoint(tmp_path / "run", model, step=1)


def rewrite_meta(meta_path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(meta_path.read_text())
    change(data)
    meta_path.write_text(json.dumps(data))


def replace_weights(meta_path: Path, weights: bytes) -> None:
    """Put ``weights`` in place of the checkpoint's weights, with a matching checksum, so only
    the content checks stand between them and the model."""
    meta_path.with_suffix(".safetensors").write_bytes(weights)
    digest = hashlib.sha256(weights).hexdigest()
    rewrite_meta(meta_path, lambda data: data.update(weights_sha256=digest))


def assert_same_weights(a: GPT, b: GPT) -> None:
    a_state, b_state = a.state_dict(), b.state_dict()
    assert a_state.keys() == b_state.keys()
    for key, value in a_state.items():
        assert b_state[key].dtype == value.dtype, key
        assert torch.equal(b_state[key], value), key


def test_round_trip(tmp_path: Path, model: GPT) -> None:
    extra = {"run": "tiny-a", "lr": 3e-4, "schedule": {"warmup": [1, 2]}}
    meta_path = save_checkpoint(
        tmp_path,
        model,
        step=100,
        tokens_seen=12_800,
        train_loss=2.5,
        val_loss=2.75,
        extra=extra,
    )
    assert meta_path == tmp_path / "step-00000100.json"
    # Nothing but the three files: no temporary files left behind, the tied matrix stored once.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest.json",
        "step-00000100.json",
        "step-00000100.safetensors",
    ]
    stored = safetensors.torch.load_file(tmp_path / "step-00000100.safetensors")
    assert "lm_head.weight" not in stored
    assert "transformer.wte.weight" in stored

    loaded, meta = load_checkpoint(meta_path)
    assert_same_weights(model, loaded)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert not loaded.training
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])

    assert meta.name == "step-00000100"
    assert meta.config == TINY
    assert (meta.step, meta.tokens_seen) == (100, 12_800)
    assert (meta.train_loss, meta.val_loss) == (2.5, 2.75)
    assert meta.extra == extra
    assert meta.dtype == "float32"
    assert meta.weights_file == "step-00000100.safetensors"
    assert meta.created_at.endswith("+00:00")
    assert read_meta(meta_path) == meta
    assert CheckpointMeta.from_dict(meta.to_dict()) == meta


def test_round_trip_without_bias(tmp_path: Path) -> None:
    model = make_model(bias=False)
    loaded, meta = load_checkpoint(save_checkpoint(tmp_path, model, step=3))
    assert meta.config.bias is False
    assert_same_weights(model, loaded)


def test_bfloat16_round_trip(tmp_path: Path) -> None:
    model = make_model().to(torch.bfloat16)
    loaded, meta = load_checkpoint(save_checkpoint(tmp_path, model, step=3))
    assert meta.dtype == "bfloat16"
    assert loaded.transformer.wpe.weight.dtype == torch.bfloat16
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert_same_weights(model, loaded)


def test_resolve_accepts_folder_manifest_metadata_and_weights(saved: Path) -> None:
    run_dir = saved.parent
    for path in (run_dir, run_dir / "latest.json", saved, saved.with_suffix(".safetensors")):
        assert resolve_checkpoint(path) == saved
    with pytest.raises(CheckpointError, match="neither a run folder"):
        resolve_checkpoint(run_dir / "model.pt")


def test_read_meta_does_not_touch_the_weights(saved: Path) -> None:
    saved.with_suffix(".safetensors").unlink()
    assert read_meta(saved.parent).step == 1
    with pytest.raises(CheckpointError, match=r"step-00000001\.safetensors does not exist"):
        load_checkpoint(saved.parent)


def test_manifest_is_written_last_and_follows_the_newest_save(
    tmp_path: Path, model: GPT, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[str] = []
    write = checkpoint.atomic_write_bytes

    def record(path: Path, data: bytes) -> None:
        written.append(path.name)
        write(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", record)
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, model, step=1)
    assert written == ["step-00000001.safetensors", "step-00000001.json", "latest.json"]

    second = save_checkpoint(tmp_path, model, step=2)
    assert latest_checkpoint(tmp_path) == second
    assert load_checkpoint(tmp_path)[1].step == 2
    best = save_checkpoint(tmp_path, model, step=2, name="best")
    assert latest_checkpoint(tmp_path) == best == tmp_path / "best.json"


def test_no_checkpoint_yet(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="no checkpoint yet"):
        load_checkpoint(tmp_path)


def test_newest_checkpoint_across_runs(tmp_path: Path, model: GPT) -> None:
    assert newest_checkpoint(tmp_path) is None
    assert newest_checkpoint(tmp_path / "missing") is None
    (tmp_path / "not-started").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "latest.json").write_text("{")
    (tmp_path / "notes.txt").write_text("not a run")

    save_checkpoint(tmp_path / "a", model, step=1)
    b = save_checkpoint(tmp_path / "b", model, step=1)
    assert newest_checkpoint(tmp_path) == b
    a = save_checkpoint(tmp_path / "a", model, step=2)
    assert newest_checkpoint(tmp_path) == a
    assert latest_checkpoint(tmp_path / "b") == b


def test_failed_save_leaves_the_folder_untouched(saved: Path, model: GPT) -> None:
    before = sorted(saved.parent.iterdir())
    with pytest.raises(CheckpointError, match="not JSON-safe"):
        save_checkpoint(saved.parent, model, step=2, extra={"optimizer": object()})
    with pytest.raises(CheckpointError, match="train_loss must be a finite float"):
        save_checkpoint(saved.parent, model, step=2, train_loss=float("nan"))
    with pytest.raises(CheckpointError, match="plain file name"):
        save_checkpoint(saved.parent, model, step=2, name="../elsewhere")
    assert sorted(saved.parent.iterdir()) == before
    assert latest_checkpoint(saved.parent) == saved


def test_truncated_weights_are_refused(saved: Path) -> None:
    weights = saved.with_suffix(".safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"step-00000001\.safetensors has sha256") as error:
        load_checkpoint(saved)
    assert "truncated" in str(error.value)


def test_flipped_byte_is_refused(saved: Path) -> None:
    weights = saved.with_suffix(".safetensors")
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step-00000001\.safetensors has sha256"):
        load_checkpoint(saved)


def test_weights_of_another_config_are_refused(saved: Path, tmp_path: Path) -> None:
    other = save_checkpoint(tmp_path / "other", make_model(n_embd=32), step=1)
    replace_weights(saved, other.with_suffix(".safetensors").read_bytes())
    message = r"wte\.weight has shape \(50257, 32\), the config needs \(50257, 64\)"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(saved)


def test_weights_of_another_dtype_are_refused(saved: Path, tmp_path: Path) -> None:
    other = save_checkpoint(tmp_path / "other", make_model().half(), step=1)
    replace_weights(saved, other.with_suffix(".safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="torch.float16, the metadata says float32"):
        load_checkpoint(saved)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop("transformer.h.1.mlp.c_proj.bias"), r"missing \['transformer.h.1.mlp"),
        (lambda t: t.update(junk=torch.zeros(2)), r"unexpected \['junk'\]"),
        # The tied matrix is stored once; a second copy is not ours either.
        (
            lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"].clone()}),
            r"unexpected \['lm_head.weight'\]",
        ),
    ],
    ids=["missing", "extra", "untied-lm-head"],
)
def test_wrong_tensor_names_are_refused(saved: Path, change: Callable, message: str) -> None:
    tensors = safetensors.torch.load_file(saved.with_suffix(".safetensors"))
    change(tensors)
    replace_weights(saved, safetensors.torch.save(tensors))
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(saved)
    assert "step-00000001.safetensors does not hold the tensors of its config" in str(error.value)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda data: data.update({key: value})


def _set_config(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda data: data["config"].update({key: value})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set_config("rope", True), r"unknown \['rope'\]"),
        (lambda data: data["config"].pop("block_size"), r"missing \['block_size'\]"),
        (_set_config("n_embd", 65), "must be divisible by n_head"),
        (_set_config("n_layer", "2"), "n_layer must be a positive integer"),
        (_set_config("n_head", 2.0), "n_head must be a positive integer"),
        (_set_config("bias", "yes"), "bias must be a bool"),
        (_set("config", [64, 2]), "config must be an object"),
        (_set("note", "hi"), r"unknown \['note'\]"),
        (lambda data: data.pop("step"), r"missing \['step'\]"),
        (_set("step", True), "step must be a non-negative integer"),
        (_set("step", -1), "step must be a non-negative integer"),
        (_set("tokens_seen", 1.0), "tokens_seen must be a non-negative integer"),
        (_set("train_loss", "2.5"), "train_loss must be a finite float or null"),
        (_set("format_version", 2), "format_version must be 1"),
        (_set("format_version", True), "format_version must be 1"),
        (_set("dtype", "float64"), "dtype must be one of"),
        (_set("weights_sha256", "ABC"), "weights_sha256 must be 64 lowercase hex digits"),
        (_set("created_at", "yesterday"), "created_at must be an ISO-8601 time"),
        (_set("created_at", "2024-05-01T12:00:00"), "created_at must be UTC"),
        (_set("extra", ["a"]), "extra must be an object"),
        (
            lambda data: data.update(name="step-2", weights_file="step-2.safetensors"),
            "does not match the file name",
        ),
    ],
)
def test_invalid_metadata_is_refused(saved: Path, change: Callable, message: str) -> None:
    rewrite_meta(saved, change)
    for read in (read_meta, load_checkpoint):
        with pytest.raises(CheckpointError, match=message) as error:
            read(saved)
        assert str(saved) in str(error.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [("{", "not valid JSON"), ('{"train_loss": NaN}', "NaN is not valid JSON"), ("[]", "object")],
)
def test_metadata_that_is_not_a_json_object_is_refused(
    saved: Path, text: str, message: str
) -> None:
    saved.write_text(text)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(saved)


class _Trap:
    """Unpickling this creates ``marker``: proof that something ran a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return Path.touch, (self.marker,)


def _pickled_state(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"transformer.wte.weight": torch.zeros(2), "trap": _Trap(marker)}, buffer)
    return buffer.getvalue()


def test_a_pickle_is_refused_without_being_unpickled(saved: Path, tmp_path: Path) -> None:
    # First show the trap works, so the assertion below can fail.
    witness = tmp_path / "witness"
    torch.load(io.BytesIO(_pickled_state(witness)), weights_only=False)
    assert witness.exists()

    marker = tmp_path / "unpickled"
    replace_weights(saved, _pickled_state(marker))
    with pytest.raises(CheckpointError, match=r"step-00000001\.safetensors is not a valid safet"):
        load_checkpoint(saved)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../other/step-00000001", "/tmp/step-1", "sub/x", ".hidden", ""])
def test_path_traversal_in_the_manifest_is_refused(saved: Path, model: GPT, name: str) -> None:
    save_checkpoint(saved.parent.parent / "other", model, step=1)
    manifest = saved.parent / "latest.json"
    data = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**data, "name": name}))
    for read in (latest_checkpoint, load_checkpoint):
        with pytest.raises(CheckpointError, match="must be a plain file name") as error:
            read(saved.parent)
        assert str(manifest) in str(error.value)
    # Only the good run is left to be newest.
    assert newest_checkpoint(saved.parent.parent) == saved.parent.parent / "other" / saved.name


def test_path_traversal_in_weights_file_is_refused(saved: Path, model: GPT) -> None:
    other = save_checkpoint(saved.parent.parent / "other", model, step=1)
    escape = f"../other/{other.with_suffix('.safetensors').name}"
    rewrite_meta(saved, _set("weights_file", escape))
    with pytest.raises(CheckpointError, match="weights_file must be 'step-00000001.safetensors'"):
        load_checkpoint(saved)


def test_load_follows_the_manifest_when_retention_removes_what_it_was_reading(
    saved: Path, model: GPT, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = saved.parent
    original = checkpoint.read_meta

    def read_then_trainer_moves_on(path: Path) -> CheckpointMeta:
        meta = original(path)
        if meta.step == 1:  # the trainer saves step 2 and retention deletes step 1
            save_checkpoint(run_dir, model, step=2)
            saved.unlink()
            saved.with_suffix(".safetensors").unlink()
        return meta

    monkeypatch.setattr(checkpoint, "read_meta", read_then_trainer_moves_on)
    assert load_checkpoint(run_dir)[1].step == 2


def test_a_vanished_checkpoint_is_not_retried_when_the_manifest_stays(saved: Path) -> None:
    saved.with_suffix(".safetensors").unlink()
    for path in (saved.parent, saved):
        with pytest.raises(CheckpointError, match="does not exist"):
            load_checkpoint(path)


# Saves checkpoint k with every parameter equal to k, deleting old ones as a trainer would.
WRITER = """
import sys, time
from pathlib import Path
import torch
from model import GPT, preset
from model.checkpoint import save_checkpoint

run_dir, count = Path(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(1)  # leave the other core to the reader
model = GPT(preset("tiny", vocab_size=512))
kept = []
for k in range(1, count + 1):
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(k)
    kept.append(save_checkpoint(run_dir, model, step=k))
    for old in kept[:-4]:
        old.unlink()
        old.with_suffix(".safetensors").unlink()
    del kept[:-4]
    time.sleep(0.01)
"""


def test_reader_never_sees_a_partial_checkpoint(tmp_path: Path, model: GPT) -> None:
    # The first load in a process pays for one-off imports; pay it now, not while the writer runs.
    load_checkpoint(save_checkpoint(tmp_path / "warm-up", model, step=0))
    run_dir, count = tmp_path / "run", 30
    run_dir.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir), str(count)], cwd=ROOT)
    seen: list[int] = []
    try:
        while writer.poll() is None:
            try:
                loaded, meta = load_checkpoint(run_dir)
            except CheckpointError as error:
                assert not seen, f"load failed after step {seen[-1]} had loaded: {error}"
                assert "no checkpoint yet" in str(error)
                time.sleep(0.005)
                continue
            values = torch.cat([p.detach().flatten() for p in loaded.parameters()]).unique()
            assert values.tolist() == [meta.step]
            assert not seen or meta.step >= seen[-1]
            seen.append(meta.step)
    finally:
        writer.kill()
        writer.wait()
    assert writer.returncode == 0
    assert load_checkpoint(run_dir)[1].step == count
    assert len(set(seen)) >= 5, f"the reader only saw steps {sorted(set(seen))}"

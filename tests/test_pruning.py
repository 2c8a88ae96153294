"""Checkpoint retention: a run keeps its newest periodic checkpoints, `best` and the manifest's,
removes what a killed writer left, and never makes a reader's load fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from contract.jobs import TrainJobSpec
from contract.settings import Settings
from contract.train import TrainConfig
from model import checkpoint
from model.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from model.config import preset
from model.gpt import GPT
from service.loaded import LoadedModel
from service.reloader import Reloader, version_of
from worker.callbacks import TrainCallback
from worker.state import STATE_JSON
from worker.trainer import train

SLM = str(Path(sys.executable).with_name("slm"))


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(preset("tiny"))


def names(run_dir: Path) -> set[str]:
    return {path.name for path in run_dir.iterdir()}


def files_of(*checkpoints: str) -> set[str]:
    return {f"{name}{suffix}" for name in checkpoints for suffix in (".json", ".safetensors")}


def test_pruning_keeps_the_3_newest_periodic_and_best(model, tmp_path) -> None:
    for step in (1, 2, 3, 4, 5):
        save_checkpoint(tmp_path, model, step=step)
    save_checkpoint(tmp_path, model, step=2, name="best", manifest=False)
    assert prune_checkpoints(tmp_path, 3) == ["step-00000001", "step-00000002"]
    kept = files_of("step-00000003", "step-00000004", "step-00000005", "best")
    assert names(tmp_path) == kept | {"latest.json"}


def test_pruning_never_deletes_the_checkpoint_the_manifest_names(model, tmp_path) -> None:
    for step in (3, 4, 5):
        save_checkpoint(tmp_path, model, step=step, manifest=False)
    save_checkpoint(tmp_path, model, step=1)  # a manifest behind the newest files
    assert prune_checkpoints(tmp_path, 1) == ["step-00000003", "step-00000004"]
    assert names(tmp_path) == files_of("step-00000001", "step-00000005") | {"latest.json"}


def test_keeping_1_leaves_only_the_latest_and_best(model, tmp_path) -> None:
    save_checkpoint(tmp_path, model, step=1, name="best", manifest=False)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model, step=step)
        prune_checkpoints(tmp_path, 1)
    assert names(tmp_path) == files_of("step-00000003", "best") | {"latest.json"}
    assert load_checkpoint(tmp_path)[1].step == 3


def test_weights_a_killed_prune_or_save_left_without_metadata_are_pruned(model, tmp_path) -> None:
    for step in (1, 2):
        save_checkpoint(tmp_path, model, step=step)
    (tmp_path / "step-00000001.json").unlink()  # killed between the two deletions
    assert prune_checkpoints(tmp_path, 1) == ["step-00000001"]
    assert names(tmp_path) == files_of("step-00000002") | {"latest.json"}


@pytest.mark.parametrize("keep", [0, -1, None, 1.5, True])
def test_pruning_refuses_to_keep_fewer_than_one(tmp_path, keep) -> None:
    with pytest.raises(ValueError, match="keep must be an integer of at least 1"):
        prune_checkpoints(tmp_path, keep)


def test_stale_temporary_files_are_removed_at_the_next_save(model, tmp_path) -> None:
    save_checkpoint(tmp_path, model, step=1)
    stale = tmp_path / ".step-00000002.safetensors.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    unrelated = tmp_path / "notes.tmp"  # not a name atomic_write_bytes would give
    unrelated.write_bytes(b"")
    save_checkpoint(tmp_path, model, step=2)
    assert not stale.exists() and unrelated.exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


# --- TrainConfig, the job spec and the CLI --------------------------------------------------


def test_keep_checkpoints_defaults_to_3_and_must_be_at_least_1() -> None:
    assert TrainConfig().keep_checkpoints == 3
    assert TrainConfig(keep_checkpoints=1).keep_checkpoints == 1
    with pytest.raises(ValidationError, match="keep_checkpoints"):
        TrainConfig(keep_checkpoints=0)


def test_the_job_spec_carries_keep_checkpoints() -> None:
    spec = {"run_name": "story", "data": {"dataset": "tinystories-v2"}}
    assert TrainJobSpec.model_validate(spec).train.keep_checkpoints == 3
    kept = TrainJobSpec.model_validate({**spec, "train": {"keep_checkpoints": 5}})
    assert kept.train.keep_checkpoints == 5
    with pytest.raises(ValidationError, match="keep_checkpoints"):
        TrainJobSpec.model_validate({**spec, "train": {"keep_checkpoints": 0}})


def test_the_cli_offers_keep_checkpoints_and_refuses_0(tmp_path) -> None:
    helped = subprocess.run([SLM, "train", "--help"], capture_output=True, text=True)
    assert "--keep-checkpoints" in helped.stdout
    out = str(tmp_path / "run")
    refused = subprocess.run(
        [SLM, "train", "--data", str(tmp_path), "--out", out, "--keep-checkpoints", "0"],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2
    assert "keep_checkpoints: Input should be greater than or equal to 1" in refused.stderr
    assert "Traceback" not in refused.stderr


# --- the trainer and the service ------------------------------------------------------------


def test_a_run_leaves_the_kept_checkpoints_best_and_its_state(train_data, tmp_path) -> None:
    config = TrainConfig(
        preset="tiny",
        batch_size=4,
        block_size=32,
        warmup_steps=2,
        max_steps=6,
        eval_interval=2,
        eval_iters=1,
        checkpoint_interval=1,
        keep_checkpoints=2,
        seed=0,
    )
    train(config, train_data, tmp_path / "run")
    left = names(tmp_path / "run")
    assert {name for name in left if name.startswith(("step-", "best."))} == files_of(
        "step-00000005", "step-00000006", "best"
    )
    assert {"latest.json", "train-state.json", "state-00000006.safetensors"} <= left
    assert not [name for name in left if name.endswith(".tmp")]
    assert latest_checkpoint(tmp_path / "run") == tmp_path / "run" / "step-00000006.json"


def test_a_run_saved_before_keep_checkpoints_existed_resumes(train_data, tmp_path) -> None:
    config = TrainConfig(
        preset="tiny", batch_size=4, block_size=32, max_steps=4, log_interval=1, seed=0
    )
    run = tmp_path / "run"
    stopped = train(config, train_data, run, callbacks=[StopAtOnce()])
    assert stopped.status == "stopped" and stopped.step == 1
    state = json.loads((run / STATE_JSON).read_text())
    del state["config"]["keep_checkpoints"]
    (run / STATE_JSON).write_text(json.dumps(state))
    resumed = train(config, train_data, run)
    assert resumed.status == "finished" and resumed.step == 4


class StopAtOnce(TrainCallback):
    def should_stop(self) -> bool:
        return True


@pytest.mark.parametrize("deleted_before", ["metadata", "weights"])
def test_a_reader_whose_checkpoint_is_pruned_mid_load_follows_the_manifest(
    model, tmp_path, monkeypatch, deleted_before
) -> None:
    """The writer saves step 2 and prunes step 1 after the reader resolved the manifest (before
    it read step 1's metadata, or between its metadata and its weights)."""
    save_checkpoint(tmp_path, model, step=1)
    read_bytes = checkpoint._read_bytes
    moved = []

    def racing_read(path: Path) -> bytes:
        wanted = "step-00000001" + (".json" if deleted_before == "metadata" else ".safetensors")
        if path.name == wanted and not moved:
            moved.append(save_checkpoint(tmp_path, model, step=2))
            prune_checkpoints(tmp_path, 1)
        return read_bytes(path)

    monkeypatch.setattr(checkpoint, "_read_bytes", racing_read)
    assert load_checkpoint(tmp_path)[1].step == 2
    assert moved and not (tmp_path / "step-00000001.safetensors").exists()


def test_readers_never_fail_while_a_writer_saves_and_prunes_to_1(model, tmp_path) -> None:
    save_checkpoint(tmp_path, model, step=0)
    done = threading.Event()
    failures: list[BaseException] = []
    loaded: list[int] = []

    def write() -> None:
        try:
            for step in range(1, 25):
                save_checkpoint(tmp_path, model, step=step)
                prune_checkpoints(tmp_path, 1)
        finally:
            done.set()

    def read() -> None:
        while not done.is_set():
            try:
                loaded.append(load_checkpoint(tmp_path)[1].step)
            except BaseException as error:  # any failure at all is what this test counts
                failures.append(error)

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not failures, failures[:3]
    assert len(set(loaded)) > 1  # the readers loaded while the writer moved on
    assert names(tmp_path) == files_of("step-00000024") | {"latest.json"}


def test_the_reloader_serves_the_successor_of_a_checkpoint_pruned_before_it_loaded(
    model, tmp_path
) -> None:
    """The service found step 1 in the manifest; before it loaded it, the trainer saved step 2
    and pruned step 1. The load must not be refused: it serves step 2."""
    installed = []

    class Engine:
        def install(self, loaded: LoadedModel, default: bool) -> None:
            installed.append(loaded)

    run = tmp_path / "story"
    found = save_checkpoint(run, model, step=1)
    save_checkpoint(run, model, step=2)
    prune_checkpoints(run, 1)
    reloader = Reloader(Settings(checkpoint_dir=tmp_path, device="cpu"), Engine())
    loaded = reloader._load(found, version_of(found), default=True)
    assert loaded.meta.step == 2 and installed == [loaded]
    assert loaded.path == run / "step-00000002.json" and loaded.version == version_of(loaded.path)

"""The trainer: real token files, the tiny preset, the CPU, real processes for DDP."""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from contract.train import TrainConfig, TrainProgress
from model import GPT, preset
from model.checkpoint import load_checkpoint, read_meta, save_checkpoint
from worker.callbacks import ProgressBar, TrainCallback
from worker.data import prepare
from worker.history import HISTORY, LOSS_PLOT
from worker.optim import Muon, muon_split, param_groups
from worker.state import STATE_JSON
from worker.trainer import (
    Trainer,
    TrainError,
    lr_at,
    train,
)


def tiny(**overrides) -> TrainConfig:
    """Small, fast settings; every test states what it changes."""
    settings = dict(
        preset="tiny",
        batch_size=4,
        block_size=32,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=2,
        max_steps=10,
        eval_interval=1000,
        eval_iters=2,
        checkpoint_interval=0,
        log_interval=1,  # a report, and a stop check, after every step
        seed=0,
    )
    return TrainConfig(**{**settings, **overrides})


class Recorder(TrainCallback):
    """Keeps every report; with ``stop_after``, asks to stop at that stop check."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.seen: list[TrainProgress] = []
        self.checks = itertools.count(1)
        self.stop_after = stop_after

    def on_progress(self, progress: TrainProgress) -> None:
        self.seen.append(progress)

    def should_stop(self) -> bool:
        return self.stop_after is not None and next(self.checks) >= self.stop_after


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[0].state_dict()


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


# --- learning ---------------------------------------------------------------------------------


def test_loss_falls_on_real_text(train_data, tmp_path) -> None:
    config = tiny(max_steps=40, eval_interval=20, eval_iters=4, warmup_steps=4)
    result = train(config, train_data, tmp_path / "run")
    evals = json.loads((tmp_path / "run" / HISTORY).read_text())["evals"]
    assert [entry["step"] for entry in evals] == [20, 40]
    # An untrained model scores ln(50257) ≈ 10.8 nats per token.
    assert evals[-1]["val_loss"] < 7.5 < evals[0]["val_loss"] + 1.5
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert result.status == "finished" and result.best_val_loss == evals[-1]["val_loss"]
    assert math.isclose(evals[-1]["val_perplexity"], math.exp(evals[-1]["val_loss"]))
    # GPT-2 tokens of English stories average ~4 bytes: bits/byte ≈ nats/token / (4 ln 2).
    ratio = evals[-1]["val_loss"] / math.log(2) / evals[-1]["val_bits_per_byte"]
    assert 3.0 < ratio < 5.0
    assert (tmp_path / "run" / LOSS_PLOT).read_bytes().startswith(b"\x89PNG")


def test_one_batch_can_be_overfitted(tmp_path, tokenizer) -> None:
    story = "Tom had a red ball. He threw it to Mia and she laughed."
    (tmp_path / "src").mkdir()
    for name in ("one-train.txt", "one-valid.txt"):
        (tmp_path / "src" / name).write_text(story + "\n<|endoftext|>\n")
    prepare(tmp_path / "src", tmp_path / "data", quiet=True)
    length = len(tokenizer.encode(story)) + 1
    # Windows of length-2 tokens can start at one of two places only: one batch, memorised.
    config = tiny(block_size=length - 2, batch_size=2, max_steps=80, lr=1e-2, min_lr=1e-3)
    result = train(config, tmp_path / "data", tmp_path / "run")
    assert result.best_val_loss is not None and result.best_val_loss < 0.05


# --- schedule, groups, accumulation -----------------------------------------------------------


def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr() -> None:
    config = tiny(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, config, 110) == pytest.approx(1e-4)
    assert lr_at(4, config, 110) == pytest.approx(5e-4)
    assert lr_at(9, config, 110) == pytest.approx(1e-3)
    assert lr_at(10, config, 110) == pytest.approx(1e-3)
    assert lr_at(60, config, 110) == pytest.approx(5.5e-4)  # half-way down the cosine
    assert lr_at(110, config, 110) == pytest.approx(1e-4)
    assert lr_at(500, config, 110) == pytest.approx(1e-4)


def test_schedule_advances_per_optimizer_step_not_per_micro_batch(train_data, tmp_path) -> None:
    config = tiny(grad_accum=4, batch_size=1, warmup_steps=3, max_steps=6)
    recorder = Recorder()
    train(config, train_data, tmp_path / "run", callbacks=[recorder])
    assert [p.lr for p in recorder.seen] == pytest.approx([lr_at(s, config, 6) for s in range(6)])


def test_a_training_seed_stays_within_javascripts_exact_integers() -> None:
    assert tiny(seed=2**53 - 1).seed == 2**53 - 1  # a JSON client sends it unrounded
    with pytest.raises(ValueError, match="seed"):
        tiny(seed=2**53)


def test_min_lr_above_peak_is_refused() -> None:
    with pytest.raises(ValueError, match=r"min_lr \(0.01\) must not exceed lr \(0.001\)"):
        tiny(lr=1e-3, min_lr=1e-2)


def test_weight_decay_applies_to_matrices_only() -> None:
    model = GPT(preset("tiny"))
    decayed, plain = param_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    assert all(p.dim() == 2 for p in decayed["params"])
    assert {names[id(p)].rsplit(".", 1)[-1] for p in plain["params"]} == {"weight", "bias"}
    assert all(p.dim() == 1 for p in plain["params"])  # LayerNorm gains and biases
    # Every parameter once; the tied embedding/head matrix is not counted twice.
    assert len(decayed["params"]) + len(plain["params"]) == len(names)
    assert sum(p.numel() for p in decayed["params"] + plain["params"]) == model.num_parameters()


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(train_data, tmp_path) -> None:
    model = GPT(preset("tiny"))
    muon, adamw = muon_split(model)
    names = {id(p): name for name, p in model.named_parameters()}
    assert {names[id(p)].split(".", 3)[-1] for p in muon} == {
        "attn.c_attn.weight",
        "attn.c_proj.weight",
        "mlp.c_fc.weight",
        "mlp.c_proj.weight",
    }
    assert all(names[id(p)].startswith("transformer.h.") and p.dim() == 2 for p in muon)
    assert {names[id(p)] for p in adamw if p.dim() == 2} == {"transformer.wte.weight"} | (
        {"transformer.wpe.weight"} if "transformer.wpe.weight" in names.values() else set()
    )  # the tied head is the embedding
    assert len(muon) + len(adamw) == len(names)

    trainer = Trainer(tiny(optimizer="muon", muon_lr=0.04), train_data, tmp_path / "run")
    adam_opt, muon_opt = trainer.optimizer.optimizers
    assert isinstance(adam_opt, torch.optim.AdamW) and isinstance(muon_opt, torch.optim.Muon)
    expected = {id(p) for p in muon_split(trainer.model)[0]}
    assert {id(p) for g in muon_opt.param_groups for p in g["params"]} == expected
    decayed, plain = adam_opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])
    # One schedule, each optimizer from its own peak.
    trainer.optimizer.set_lr(0.5)
    assert decayed["lr"] == pytest.approx(1.5e-3) and muon_opt.param_groups[0]["lr"] == 0.02


def test_muon_on_a_cpu_is_torchs_update_orthogonalised_in_fp32() -> None:
    torch.manual_seed(0)
    ours_model = GPT(preset("tiny", n_embd=128, n_head=4))
    torchs_model = copy.deepcopy(ours_model)
    idx = torch.randint(0, 50257, (2, 32))
    for model in (ours_model, torchs_model):
        model(idx, idx)[1].backward()
    ours, torchs = muon_split(ours_model)[0], muon_split(torchs_model)[0]
    start = [p.detach().clone() for p in ours]
    Muon(ours, lr=0.02, weight_decay=0.0).step()
    torch.optim.Muon(torchs, lr=0.02, weight_decay=0.0).step()
    for mine, theirs, before in zip(ours, torchs, start, strict=True):
        update = (mine - before).detach() / 0.02
        rows, columns = update.shape
        update /= max(1.0, rows / columns) ** 0.5  # torch's "original" lr scaling
        # Newton–Schulz pushes the gradient's singular values towards 1 (0.5-1.5 by design; a
        # batch of 64 tokens gives the gradient at most 64 of them) ...
        singular = torch.linalg.svdvals(update)[:32]
        assert singular.min() > 0.3 and singular.max() < 1.6
        # ... and torch's bfloat16 iteration lands close to our fp32 one.
        difference = (mine - theirs).norm() / (mine - before).norm()
        assert difference < 0.3
    # The same state: one momentum buffer per matrix, which torch's Muon loads as it is.
    saved = Muon(ours, lr=0.02)
    saved.step()
    torch.optim.Muon(ours, lr=0.02).load_state_dict(saved.state_dict())


def test_bf16_autocast_and_a_padded_vocabulary_train_on_a_cpu_too(train_data, tmp_path) -> None:
    # bf16 autocast and the padded vocabulary, on the Llama-style network. (torch.compile is not
    # run here: inductor builds the model's C++ kernels for minutes on a 2-core CPU.)
    config = tiny(
        dtype="bfloat16",
        pad_vocab=True,
        position="rotary",
        norm="rmsnorm",
        activation="swiglu",
        max_steps=8,
        eval_interval=8,
        eval_iters=2,
    )
    recorder = Recorder()
    result = train(config, train_data, tmp_path / "run", callbacks=[recorder])
    assert result.status == "finished" and math.isfinite(result.best_val_loss)
    assert recorder.seen[-1].train_loss < recorder.seen[0].train_loss
    model, meta = load_checkpoint(result.last_checkpoint)
    assert meta.dtype == "float32" and model.lm_head.weight.shape[0] == 50304  # fp32 masters
    logits, _ = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape[-1] == 50257


def test_muon_trains_a_tiny_model(train_data, tmp_path) -> None:
    config = tiny(optimizer="muon", max_steps=16, eval_interval=8, eval_iters=4, warmup_steps=2)
    recorder = Recorder()
    result = train(config, train_data, tmp_path / "run", callbacks=[recorder])
    evals = json.loads((tmp_path / "run" / HISTORY).read_text())["evals"]
    assert result.status == "finished" and [e["step"] for e in evals] == [8, 16]
    # An untrained model scores ln(50257) ≈ 10.8 nats per token.
    assert evals[-1]["val_loss"] < min(9.5, evals[0]["val_loss"] - 0.3)
    assert recorder.seen[-1].train_loss < recorder.seen[0].train_loss - 1
    # Muon moved the blocks' matrices away from the seed's initialisation.
    torch.manual_seed(config.seed)
    start = GPT(config.model()).state_dict()
    trained = weights(result.last_checkpoint)
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"):
        moved = (trained[name] - start[name]).norm() / start[name].norm()
        assert moved > 0.05, name
    state = json.loads((tmp_path / "run" / STATE_JSON).read_text())
    assert [len(g) > 0 for g in state["param_groups"]] == [True] * 3
    assert "momentum" in state["param_groups"][2] and "betas" in state["param_groups"][0]


def gradients_after_one_step(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> list:
    """Feed the trainer fixed micro-batches and capture the gradients its optimizer sees."""
    micro = x.shape[0] // trainer.config.grad_accum
    parts = iter(zip(x.split(micro), y.split(micro), strict=True))
    trainer.batches.next = lambda: next(parts)
    captured = []
    trainer.optimizer.step = lambda *a, **k: captured.append(
        [p.grad.clone() for p in trainer.model.parameters()]
    )
    trainer._optimizer_step(lr=1e-3)
    return captured[0]


def test_accumulating_4_batches_of_2_equals_one_batch_of_8(train_data, tmp_path) -> None:
    torch.manual_seed(1)
    x = torch.randint(0, 50257, (8, 32))
    y = torch.randint(0, 50257, (8, 32))
    big = Trainer(tiny(batch_size=8, grad_clip=0), train_data, tmp_path / "a")
    small = Trainer(tiny(batch_size=2, grad_accum=4, grad_clip=0), train_data, tmp_path / "b")
    expected = gradients_after_one_step(big, x, y)
    got = gradients_after_one_step(small, x, y)
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in got)


# --- resume -----------------------------------------------------------------------------------


# Muon with fewer steps, to keep the suite short: the same checks.
@pytest.mark.parametrize(("optimizer", "half"), [("adamw", 10), ("muon", 4)])
def test_ten_steps_resumed_then_ten_more_equal_twenty_straight(
    train_data, tmp_path, optimizer, half
) -> None:
    # Dropout and accumulation make the RNG and the data position matter as much as the weights.
    every = half // 2
    config = tiny(
        max_steps=2 * half, dropout=0.1, grad_accum=2, eval_interval=every, optimizer=optimizer
    )
    straight = train(config, train_data, tmp_path / "straight")

    first = train(config, train_data, tmp_path / "resumed", callbacks=[Recorder(stop_after=half)])
    assert first.status == "stopped" and first.step == half
    rest = Recorder()
    second = train(config, train_data, tmp_path / "resumed", callbacks=[rest])
    assert second.status == "finished" and rest.seen[0].step == half + 1
    assert second.step == 2 * half and second.tokens_seen == straight.tokens_seen

    assert_close(weights(straight.last_checkpoint), weights(second.last_checkpoint), atol=1e-6)
    history = [
        json.loads((tmp_path / run / HISTORY).read_text())["evals"]
        for run in ("straight", "resumed")
    ]
    assert [e["step"] for e in history[1]] == list(range(every, 2 * half + 1, every))
    for a, b in zip(*history, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)


def test_training_state_is_safetensors_and_json_and_resumes_without_unpickling(
    train_data, tmp_path, monkeypatch
) -> None:
    config = tiny(max_steps=6)
    train(config, train_data, tmp_path / "run", callbacks=[Recorder(stop_after=3)])
    files = sorted(path.name for path in (tmp_path / "run").iterdir())
    assert {Path(name).suffix for name in files} == {".json", ".safetensors"}  # and no pickle
    state = json.loads((tmp_path / "run" / STATE_JSON).read_text())
    tensors = safetensors.torch.load_file(tmp_path / "run" / state["tensors_file"])
    assert "rng.data" in tensors and "rng.torch.0" in tensors
    assert any(key.endswith(".exp_avg_sq") for key in tensors)
    assert state["step"] == 3 and state["checkpoint"] == "step-00000003"

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert train(config, train_data, tmp_path / "run").step == 6


def test_resuming_with_other_settings_is_refused(train_data, tmp_path) -> None:
    train(tiny(max_steps=2), train_data, tmp_path / "run")
    with pytest.raises(TrainError, match=r"other settings \(lr\)"):
        train(tiny(max_steps=2, lr=1e-3), train_data, tmp_path / "run")


# --- hooks for the worker ---------------------------------------------------------------------


def test_cooperative_stop_saves_a_checkpoint_and_returns_stopped(train_data, tmp_path) -> None:
    recorder = Recorder(stop_after=3)
    result = train(tiny(max_steps=50), train_data, tmp_path / "run", callbacks=[recorder])
    seen = recorder.seen
    assert result.status == "stopped" and result.step == 3 and result.max_steps == 50
    meta = read_meta(tmp_path / "run")
    assert meta.step == 3 and result.last_checkpoint == tmp_path / "run" / "step-00000003.json"
    assert seen[-1].last_checkpoint == str(result.last_checkpoint)


def test_progress_reports_advancing_steps_rates_and_eta(train_data, tmp_path) -> None:
    recorder = Recorder()
    train(
        tiny(max_steps=5, checkpoint_interval=2), train_data, tmp_path / "run", callbacks=[recorder]
    )
    seen = recorder.seen
    assert [p.step for p in seen] == [1, 2, 3, 4, 5]
    assert all(
        p.max_steps == 5 and p.tokens_per_s > 0 and math.isfinite(p.train_loss) for p in seen
    )
    assert [p.tokens_seen for p in seen] == [128 * s for s in range(1, 6)]
    assert seen[-1].eta_s == 0 and seen[0].eta_s > 0
    assert seen[0].last_checkpoint is None
    assert seen[1].last_checkpoint.endswith("step-00000002.json")


def test_fine_tuning_starts_from_the_checkpoint_weights(train_data, tmp_path) -> None:
    torch.manual_seed(5)
    source = GPT(preset("tiny"))
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.normal_(0.0, 0.3)  # far from any fresh initialisation
    path = save_checkpoint(tmp_path / "base", source, step=1234)
    # Learning rates so small that one step leaves the weights where they started.
    result = train(
        tiny(max_steps=1, lr=1e-8, min_lr=0, muon_lr=1e-8, warmup_steps=0),
        train_data,
        tmp_path / "ft",
        init_from=path,
    )
    assert result.step == 1  # its own schedule, not the source's step 1234
    tuned, meta = load_checkpoint(result.last_checkpoint)
    assert_close(tuned.state_dict(), source.state_dict(), atol=1e-6)
    assert meta.extra["init_from"] == str(path)
    assert meta.extra["train_config"]["lr"] == 1e-8


# --- several processes ------------------------------------------------------------------------

DDP_SCRIPT = """
import hashlib, os, sys
from pathlib import Path
import model.checkpoint, worker.history, worker.state, worker.trainer
from contract.train import TrainConfig

rank = int(os.environ["RANK"])
if rank != 0:
    def refuse(path, data):
        raise AssertionError(f"rank {rank} wrote {path}")
    for module in (model.checkpoint, worker.state, worker.history):
        module.atomic_write_bytes = refuse
config = TrainConfig.model_validate_json(sys.argv[1])
trainer = worker.trainer.Trainer(config, Path(sys.argv[2]), Path(sys.argv[3]))
trainer.run()
digest = hashlib.sha256()
for tensor in trainer.model.state_dict().values():
    digest.update(tensor.numpy().tobytes())
print(f"rank {rank} weights {digest.hexdigest()}", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_gloo_processes_stay_in_sync_and_only_rank_0_writes(
    train_data, tmp_path, optimizer
) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    config = tiny(max_steps=4, batch_size=2, eval_interval=2, dropout=0.0, optimizer=optimizer)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            config.model_dump_json(),
            str(train_data),
            str(tmp_path / "ddp"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    digests = {
        line.split()[1]: line.split()[3]
        for line in result.stdout.splitlines()
        if line.startswith("rank ")
    }
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    # Two processes of batch 2 draw exactly the windows one process of batch 4 does. Only the
    # order of float additions differs, which Adam's normalisation magnifies to ~1e-5 on
    # near-zero gradients; other windows would move weights by ~lr (3e-3).
    single = train(config.model_copy(update={"batch_size": 4}), train_data, tmp_path / "single")
    ddp, one = weights(tmp_path / "ddp"), weights(single.last_checkpoint)
    if optimizer == "adamw":
        assert_close(ddp, one, atol=1e-4)
    else:
        # Newton-Schulz normalises each update, so that noise moves whole directions a little,
        # and Adam then magnifies the difference in the next steps' gradients: ~1% of a matrix,
        # where other windows (or a missing all-reduce) would differ by about as much as the
        # matrices moved (~100%).
        for name in one:
            assert (ddp[name] - one[name]).norm() < 0.05 * one[name].norm(), name


def test_a_finished_run_trains_longer_at_min_lr_keeping_its_schedule(train_data, tmp_path) -> None:
    config = tiny(max_steps=4, warmup_steps=1)
    run = tmp_path / "run"
    train(config, train_data, run)
    longer = Recorder()
    result = train(config.model_copy(update={"max_steps": 7}), train_data, run, callbacks=[longer])
    assert result.status == "finished" and result.step == 7
    assert [p.step for p in longer.seen] == [5, 6, 7]
    assert [p.lr for p in longer.seen] == pytest.approx([config.min_lr] * 3)  # the cosine ended
    state = json.loads((run / STATE_JSON).read_text())
    assert state["config"]["lr_decay_steps"] == 4 and state["config"]["max_steps"] == 7
    with pytest.raises(TrainError, match="at step 7: to extend it, ask for more steps"):
        train(config.model_copy(update={"max_steps": 6}), train_data, run)
    with pytest.raises(TrainError, match=r"other settings \(lr, max_steps\)"):
        train(config.model_copy(update={"max_steps": 9, "lr": 1e-2}), train_data, run)


# --- a wall-clock budget (max_minutes) --------------------------------------------------------


class Clocked(Recorder):
    """A Recorder that notes when each report came, and may ask to stop after ``stop_s``."""

    def __init__(self, stop_s: float | None = None) -> None:
        super().__init__()
        self.stop_s = stop_s
        self.times: list[float] = []

    def on_start(self, progress: TrainProgress) -> None:
        self.start, self.first = time.perf_counter(), progress

    def on_progress(self, progress: TrainProgress) -> None:
        super().on_progress(progress)
        self.times.append(time.perf_counter() - self.start)

    def should_stop(self) -> bool:
        return self.stop_s is not None and time.perf_counter() - self.start > self.stop_s


def test_one_length_at_most_and_the_clock_schedule() -> None:
    with pytest.raises(ValueError, match="not max_steps and max_minutes"):
        tiny(max_minutes=1.0)  # tiny() gives max_steps
    with pytest.raises(ValueError, match="not max_tokens and max_minutes"):
        tiny(max_steps=None, max_tokens=1000, max_minutes=1.0)
    with pytest.raises(ValueError, match="max_minutes"):
        tiny(max_steps=None, max_minutes=0)
    config = tiny(max_steps=None, max_minutes=2.0, lr=1e-3, min_lr=1e-4, warmup_steps=10)
    assert config.total_steps(32) is None and config.decay_seconds() == 120
    assert lr_at(4, config, None, elapsed_s=50.0) == pytest.approx(5e-4)  # warm-up: steps
    # The cosine spans the time from the warm-up's end (20 s) to the budget's (120 s).
    assert lr_at(10, config, None, elapsed_s=20.0, warmup_s=20.0) == pytest.approx(1e-3)
    assert lr_at(99, config, None, elapsed_s=70.0, warmup_s=20.0) == pytest.approx(5.5e-4)
    assert lr_at(99, config, None, elapsed_s=121.0, warmup_s=20.0) == pytest.approx(1e-4)


def test_a_time_budget_ends_near_it_with_an_eval_and_a_checkpoint(train_data, tmp_path) -> None:
    config = tiny(max_steps=None, max_minutes=0.05, warmup_steps=2)  # 3 seconds
    clocked = Clocked()
    with ProgressBar() as bar:  # the CLI's bar, with an estimated total
        result = train(config, train_data, tmp_path / "run", callbacks=[clocked, bar])
        assert bar.bar.total == bar.bar.n == result.step
    seen = clocked.seen
    assert result.status == "finished" and result.max_steps == result.step == seen[-1].step > 2
    assert 3.0 <= clocked.times[-1] < 30.0  # generous: the machine is shared
    assert clocked.first.max_steps is None  # no pace known yet
    evals = json.loads((tmp_path / "run" / HISTORY).read_text())["evals"]
    assert [e["step"] for e in evals] == [result.step]
    assert read_meta(tmp_path / "run").step == result.step
    # The cosine ran on the clock: the last step came late in the budget, near min_lr.
    assert seen[-1].lr < config.min_lr + 0.3 * (config.lr - config.min_lr)
    lrs = [p.lr for p in seen[config.warmup_steps :]]
    assert lrs == sorted(lrs, reverse=True)
    for progress in seen[:-1]:
        assert progress.max_steps > progress.step and 0 <= progress.eta_s <= 3.0
    assert seen[-1].max_steps == seen[-1].step and seen[-1].eta_s == 0
    state = json.loads((tmp_path / "run" / STATE_JSON).read_text())
    assert 3.0 <= state["elapsed_s"] < 30.0 and state["warmup_s"] > 0


def test_a_resumed_budget_trains_what_is_left_and_can_be_extended(train_data, tmp_path) -> None:
    # Six seconds, stopped after two: room for a slow step on a shared machine.
    config = tiny(max_steps=None, max_minutes=0.1, warmup_steps=2)
    run = tmp_path / "run"
    first = train(config, train_data, run, callbacks=[Clocked(stop_s=2.0)])
    spent = json.loads((run / STATE_JSON).read_text())["elapsed_s"]
    assert first.status == "stopped" and 2.0 <= spent < 6.0

    rest = Clocked()
    second = train(config, train_data, run, callbacks=[rest])
    assert second.status == "finished" and second.step > first.step
    # The clock went on from where it stopped: only the budget's remainder was left.
    assert rest.first.step == first.step and rest.seen[0].eta_s < 6.0 - spent
    elapsed = json.loads((run / STATE_JSON).read_text())["elapsed_s"]
    assert 6.0 <= elapsed < 60.0  # the final eval and checkpoint come after the budget

    # Two seconds more: the schedule keeps its planned end, so the extra time runs at min_lr.
    more = Clocked()
    longer = config.model_copy(update={"max_minutes": (elapsed + 2.0) / 60})
    third = train(longer, train_data, run, callbacks=[more])
    assert third.step > second.step and more.seen[0].eta_s < 2.0
    assert [p.lr for p in more.seen] == pytest.approx([config.min_lr] * len(more.seen))
    assert json.loads((run / STATE_JSON).read_text())["config"]["lr_decay_minutes"] == 0.1
    with pytest.raises(TrainError, match="to extend it, ask for more than that"):
        train(config.model_copy(update={"max_minutes": elapsed / 60}), train_data, run)

"""Shapes users choose: TrainConfig's overrides of a preset's network (layers, heads, width and
the architecture options), as the trainer and the `slm train` command take them."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from test_cli import slm

from contract.train import SHAPE_FIELDS, TrainConfig, TrainProgress, describe_error
from model import GPT, preset
from model.checkpoint import load_checkpoint, save_checkpoint
from worker.callbacks import TrainCallback
from worker.trainer import TrainError, train

FAST = dict(
    preset="tiny",
    batch_size=2,
    block_size=16,
    warmup_steps=1,
    max_steps=3,
    eval_interval=1000,
    eval_iters=1,
    checkpoint_interval=0,
    seed=0,
    device="cpu",
)


class Recorder(TrainCallback):
    def __init__(self) -> None:
        self.seen: list[TrainProgress] = []

    def on_progress(self, progress: TrainProgress) -> None:
        self.seen.append(progress)


def test_overrides_change_the_presets_network_and_none_keeps_it() -> None:
    assert TrainConfig(preset="tiny").model() == preset("tiny")
    overrides = dict(
        n_layer=1,
        n_head=4,
        n_embd=96,
        bias=False,
        position="rotary",
        norm="rmsnorm",
        activation="swiglu",
        qk_norm=True,
        tie_embeddings=False,
        pad_vocab=True,
        dropout=0.1,
    )
    config = TrainConfig(preset="tiny", model_block_size=32, **overrides)
    assert config.model() == preset("tiny").replace(block_size=32, **overrides)
    # Only what is given changes: the 50m preset keeps its 8 heads and 512 positions.
    assert TrainConfig(preset="50m", n_layer=2).model() == preset("50m", n_layer=2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"n_embd": 100, "n_head": 3},
            "preset 'tiny' with n_head=3, n_embd=100: n_embd (100) must be divisible by n_head (3)",
        ),
        ({"n_head": 5}, "n_embd (64) must be divisible by n_head (5)"),  # the preset's width
        (
            {"n_embd": 96, "n_head": 32, "position": "rotary"},
            "rotary positions rotate pairs of dimensions: n_embd / n_head (96 / 32 = 3) must be "
            "even",
        ),
        ({"n_layer": 0}, "n_layer: Input should be greater than or equal to 1"),
        ({"position": "absolute"}, "position: Input should be 'learned' or 'rotary'"),
        ({"activation": "tanh"}, "activation: Input should be 'gelu', 'relu2' or 'swiglu'"),
    ],
)
def test_a_shape_gptconfig_refuses_is_a_validation_error_naming_it(overrides, message) -> None:
    with pytest.raises(ValidationError) as refused:
        TrainConfig(preset="tiny", **overrides)
    assert message in describe_error(refused.value)


def test_a_modern_architecture_trains_and_its_checkpoint_records_it(train_data, tmp_path) -> None:
    config = TrainConfig(**FAST, position="rotary", norm="rmsnorm", activation="swiglu")
    result = train(config, train_data, tmp_path / "run")
    assert result.status == "finished" and result.step == 3
    model, meta = load_checkpoint(result.last_checkpoint)
    assert meta.config == config.model()
    assert (meta.config.position, meta.config.norm, meta.config.activation) == (
        "rotary",
        "rmsnorm",
        "swiglu",
    )
    assert meta.config.n_layer == 2 and meta.config.n_embd == 64  # the rest is tiny's
    assert meta.extra["train_config"]["position"] == "rotary"
    assert "transformer.wpe.weight" not in model.state_dict()  # no learned position table


def test_fine_tuning_cannot_change_the_checkpoints_shape(train_data, tmp_path) -> None:
    path = save_checkpoint(tmp_path / "base", GPT(preset("tiny")), step=1)
    changed = TrainConfig(**FAST, n_layer=1, position="rotary", activation="gelu")
    with pytest.raises(TrainError) as refused:
        train(changed, train_data, tmp_path / "ft", init_from=path)
    message = str(refused.value)
    assert "fine-tuning cannot change the shape of the checkpoint" in message
    assert "n_layer 1 (it has 2)" in message and "position rotary (it has learned)" in message
    assert "activation" not in message  # gelu is what the checkpoint has
    # Repeating the checkpoint's own settings is no change.
    same = TrainConfig(**{**FAST, "max_steps": 1}, n_layer=2, position="learned", bias=True)
    assert train(same, train_data, tmp_path / "ft2", init_from=path).step == 1


def test_slm_train_offers_the_shape_options_and_refuses_a_bad_one(train_data, tmp_path) -> None:
    shown = slm("train", "--help")
    assert shown.returncode == 0, shown.stderr
    for name in SHAPE_FIELDS:
        assert "--" + name.replace("_", "-") in shown.stdout, name
    for options in (
        "--bias, --no-bias",
        "--position {learned,rotary}",
        "--norm {layernorm,rmsnorm}",
    ):
        assert options in shown.stdout
    assert "--activation {gelu,relu2,swiglu}" in shown.stdout

    out = tmp_path / "run"
    refused = slm("train", "--data", str(train_data), "--out", str(out), "--n-head", "5")
    assert refused.returncode == 2
    # The default preset's width (small: 128) does not divide by 5.
    assert "n_embd (128) must be divisible by n_head (5)" in refused.stderr
    assert "Traceback" not in refused.stderr and not out.exists()


def test_a_run_with_fewer_merges_trains_on_gpt2_data_and_reports_bits_per_byte(
    train_data, tmp_path
) -> None:
    from model.generate import complete
    from model.sampling import SamplingParams
    from worker.data import load_split

    config = TrainConfig(**{**FAST, "eval_interval": 3}, vocabulary="gpt2-1024")
    recorder = Recorder()
    result = train(config, train_data, tmp_path / "run", callbacks=[recorder])
    assert result.status == "finished"
    model, meta = load_checkpoint(result.last_checkpoint)
    assert meta.config.vocab_size == 1024 and meta.config.vocabulary == "gpt2-1024"
    assert model.transformer.wte.weight.shape[0] == 1024
    final = recorder.seen[-1]
    assert final.val_loss is not None and final.val_bits_per_byte is not None
    # Fewer merges: the same text is more tokens.
    val = load_split(train_data, "val", vocab_size=1024)
    assert len(val) > len(load_split(train_data, "val")) and int(val.max()) < 1024
    # The checkpoint writes in its own vocabulary: every id below 1024.
    story = complete(model.eval(), "Once upon a time", SamplingParams(max_new_tokens=12, seed=1))
    assert story.token_ids and max(story.token_ids) < 1024


def test_an_unknown_vocabulary_is_refused_with_the_names() -> None:
    with pytest.raises(ValidationError) as refused:
        TrainConfig(vocabulary="gpt3")
    message = describe_error(refused.value)
    assert "vocabulary" in message and "gpt2-8k" in message and "gpt2-<size>" in message
    assert TrainConfig(vocabulary="gpt2-8k").model().vocab_size == 8192
    assert TrainConfig(vocabulary="gpt2-3000").model().vocab_size == 3000
    # One vocabulary, one name: what its checkpoints report.
    assert TrainConfig(vocabulary="gpt2-8192").vocabulary == "gpt2-8k"

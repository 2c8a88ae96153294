"""The network: presets, initialisation, tying, loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, preset


def test_presets_have_the_promised_sizes() -> None:
    seed = GPT(preset("seed"))
    assert seed.config.n_layer == 6 and seed.config.n_head == 6 and seed.config.n_embd == 384
    assert seed.config.block_size == 128
    assert 29e6 < seed.num_parameters() < 31e6
    fifty = GPT(preset("50m"))
    assert 50e6 <= fifty.num_parameters() <= 60e6
    assert fifty.config.block_size >= 512
    assert GPT(preset("tiny")).num_parameters() < 4e6
    small = GPT(preset("small"))
    assert small.num_parameters() < seed.num_parameters() / 4
    assert small.config.position == "rotary" and small.config.activation == "swiglu"


def test_unknown_preset_and_bad_config_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.5)
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(n_layer=0)


def test_output_head_is_tied_to_the_token_embedding() -> None:
    model = GPT(preset("tiny"))
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [name for name, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # one tensor, counted once


def test_gpt2_initialisation() -> None:
    torch.manual_seed(0)
    config = preset("seed")
    model = GPT(config)
    block = model.transformer.h[0]
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * config.n_layer)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(block.attn.c_attn.bias == 0)
    assert torch.all(block.ln_1.weight == 1)


def test_bias_false_removes_every_bias() -> None:
    model = GPT(preset("tiny", bias=False))
    assert not [name for name, _ in model.named_parameters() if name.endswith("bias")]


def test_forward_returns_logits_or_the_mean_cross_entropy() -> None:
    model = GPT(preset("tiny")).eval()
    idx = torch.randint(0, 50257, (2, 16))
    targets = torch.randint(0, 50257, (2, 16))
    targets[0, :4] = -1  # ignored positions
    logits, loss = model(idx)
    assert logits is not None and logits.shape == (2, 16, 50257) and loss is None
    none, loss = model(idx, targets)
    assert none is None  # the fused loss never holds the logits
    expected = F.cross_entropy(logits.view(-1, 50257), targets.view(-1), ignore_index=-1)
    assert loss is not None and loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # An untrained model is close to uniform over the vocabulary.
    assert loss.item() == pytest.approx(math.log(50257), rel=0.05)


def test_fused_loss_gives_the_gradients_of_the_plain_one() -> None:
    torch.manual_seed(0)
    model = GPT(preset("tiny")).train()
    idx = torch.randint(0, 50257, (3, 40))
    targets = torch.randint(0, 50257, (3, 40))
    targets[1, 5:] = -1
    _, fused = model(idx, targets)
    (fused * 0.5).backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logits, _ = model(idx)
    plain = F.cross_entropy(logits.view(-1, 50257), targets.view(-1), ignore_index=-1)
    (plain * 0.5).backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_attention_is_causal() -> None:
    model = GPT(preset("tiny")).eval()
    idx = torch.randint(0, 50257, (1, 20))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 50257
    with torch.no_grad():
        before, _ = model(idx)
        after, _ = model(changed)
    torch.testing.assert_close(before[0, :10], after[0, :10])
    assert not torch.allclose(before[0, 10:], after[0, 10:])


def test_sequence_longer_than_block_size_is_refused_clearly() -> None:
    model = GPT(preset("tiny"))
    with pytest.raises(ValueError, match="exceeds block_size 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_dropout_is_active_only_in_training() -> None:
    model = GPT(preset("tiny", dropout=0.5))
    idx = torch.randint(0, 50257, (1, 8))
    model.train()
    assert not torch.allclose(model(idx)[0], model(idx)[0])
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0])


# --- architecture options -------------------------------------------------------------------

LLAMA_STYLE = dict(position="rotary", norm="rmsnorm", activation="swiglu", bias=False)


def test_the_default_network_is_gpt2s_and_configs_saved_before_the_options_load_as_it() -> None:
    config = GPTConfig.from_dict(
        dict(
            block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=64, dropout=0.0, bias=True
        )
    )
    assert config == preset("tiny") and config.is_gpt2
    names = set(GPT(config).state_dict())
    assert {"transformer.wpe.weight", "transformer.h.0.ln_1.bias"} <= names
    assert not [name for name in names if "norm" in name]
    with pytest.raises(ValueError, match=r"unknown \['rope'\]"):
        GPTConfig.from_dict({**config.to_dict(), "rope": True})
    with pytest.raises(ValueError, match=r"missing \['bias'\]"):
        GPTConfig.from_dict({k: v for k, v in config.to_dict().items() if k != "bias"})


def test_architecture_options_build_what_they_name() -> None:
    config = preset("tiny", **LLAMA_STYLE, qk_norm=True, tie_embeddings=False, pad_vocab=True)
    model = GPT(config)
    assert not config.is_gpt2
    assert "wpe" not in model.transformer  # rotary: no position table
    block = model.transformer.h[0]
    assert isinstance(block.ln_1, torch.nn.RMSNorm) and isinstance(
        block.attn.q_norm, torch.nn.RMSNorm
    )
    # SwiGLU: gate and up in one matmul, 8/3 of the width rounded up to 64 (64 → 192)
    assert config.mlp_hidden == 192 and block.mlp.c_fc.out_features == 2 * 192
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.lm_head.weight.shape[0] == 50304 == model.transformer.wte.weight.shape[0]
    logits, _ = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 50257)  # padding rows are never predicted


def test_swiglu_and_relu2_hold_about_as_many_weights_as_gelu() -> None:
    sizes = {
        activation: GPT(preset("seed", activation=activation)).num_parameters()
        for activation in ("gelu", "relu2", "swiglu")
    }
    assert sizes["relu2"] == sizes["gelu"]
    assert abs(sizes["swiglu"] - sizes["gelu"]) / sizes["gelu"] < 0.01


def test_bad_architecture_options_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="position must be one of learned, rotary"):
        GPTConfig(position="alibi")
    with pytest.raises(ValueError, match="activation must be one of gelu, relu2, swiglu"):
        GPTConfig(activation="tanh")
    with pytest.raises(ValueError, match=r"must be even"):
        GPTConfig(n_embd=6, n_head=2, position="rotary")
    with pytest.raises(ValueError, match="qk_norm must be a bool"):
        GPTConfig(qk_norm="yes")


def test_rotary_attention_sees_only_differences_of_positions() -> None:
    torch.manual_seed(0)
    idx = torch.randint(0, 50257, (2, 20))
    shifted = torch.arange(20) + 1000  # far past block_size: rotary positions have no table
    rotary = GPT(preset("tiny", **LLAMA_STYLE, qk_norm=True)).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            rotary.hidden_states(idx, shifted), rotary.hidden_states(idx), atol=1e-4, rtol=0
        )
    learned = GPT(preset("tiny")).eval()
    with torch.no_grad():
        moved = learned.hidden_states(idx, torch.arange(20) + 10)
        assert not torch.allclose(moved, learned.hidden_states(idx), atol=1e-3)


@pytest.mark.parametrize(
    "options",
    [LLAMA_STYLE, dict(activation="relu2", qk_norm=True), dict(tie_embeddings=False)],
    ids=["llama-style", "relu2-qk-norm", "untied"],
)
def test_every_option_learns_one_batch(options) -> None:
    torch.manual_seed(0)
    model = GPT(preset("tiny", **options))
    idx = torch.randint(0, 50257, (2, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0] - 3


def test_padded_vocabulary_is_masked_out_of_the_loss_and_its_gradient() -> None:
    torch.manual_seed(0)
    model = GPT(preset("tiny", pad_vocab=True))
    idx, targets = torch.randint(0, 50257, (2, 8)), torch.randint(0, 50257, (2, 8))
    _, loss = model(idx, targets)
    hidden = model.hidden_states(idx)
    plain = F.cross_entropy((hidden @ model.output_weight.t()).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, plain, atol=1e-5, rtol=0)
    loss.backward()
    assert torch.all(model.lm_head.weight.grad[50257:] == 0)

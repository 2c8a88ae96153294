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

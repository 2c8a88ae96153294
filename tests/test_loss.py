"""The fused, chunked output layer and cross-entropy against F.cross_entropy on full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.loss import linear_cross_entropy


def reference(hidden, weight, targets):
    return F.cross_entropy(hidden @ weight.T, targets, ignore_index=-1)


def gradients(loss_fn, hidden, weight, targets, scale):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    loss = loss_fn(hidden, weight, targets)
    (loss * scale).backward()
    return loss.detach(), hidden.grad, weight.grad


def rel_close(got, expected, rtol=1e-5):
    """Within rtol of the largest magnitude of ``expected`` (elementwise rtol fails on ~0s)."""
    error = (got - expected).abs().max().item()
    assert error <= rtol * expected.abs().max().item(), error


@pytest.mark.parametrize(
    ("rows", "width", "vocab", "chunk"),
    [(1, 8, 11, 4), (37, 16, 101, 8), (300, 32, 500, 128), (128, 8, 50, 32), (65, 24, 257, 300)],
)
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_loss_and_gradients_match_cross_entropy_on_full_logits(
    rows, width, vocab, chunk, scale
) -> None:
    torch.manual_seed(rows + vocab)
    hidden = torch.randn(rows, width)
    weight = torch.randn(vocab, width)
    targets = torch.randint(0, vocab, (rows,))
    if rows > 1:
        targets[: min(chunk + 3, rows // 2)] = -1  # a whole chunk ignored where there are two
        targets[-1] = -1
    fused = gradients(
        lambda h, w, t: linear_cross_entropy(h, w, t, chunk_rows=chunk),
        hidden,
        weight,
        targets,
        scale,
    )
    plain = gradients(reference, hidden, weight, targets, scale)
    for got, expected in zip(fused, plain, strict=True):
        rel_close(got, expected)
    assert torch.all(fused[1][targets == -1] == 0)


def test_batched_hidden_states_and_targets_are_flattened() -> None:
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 5, 8), torch.randn(30, 8)
    targets = torch.randint(0, 30, (2, 5))
    got = linear_cross_entropy(hidden, weight, targets, chunk_rows=3)
    rel_close(got, reference(hidden.view(-1, 8), weight, targets.view(-1)))


def test_no_gradient_wanted_gives_the_same_loss_and_keeps_no_graph() -> None:
    torch.manual_seed(0)
    hidden, weight = torch.randn(20, 8), torch.randn(30, 8, requires_grad=True)
    targets = torch.randint(0, 30, (20,))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=6)
    assert loss.grad_fn is None
    rel_close(loss, reference(hidden, weight.detach(), targets))


def test_every_target_ignored_gives_nan_like_cross_entropy() -> None:
    hidden, weight = torch.randn(6, 4, requires_grad=True), torch.randn(9, 4)
    targets = torch.full((6,), -1)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=4)
    assert torch.isnan(loss) and torch.isnan(reference(hidden, weight, targets))


def test_float64_inputs_are_computed_in_float64() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 13, (10,))
    assert torch.autograd.gradcheck(
        lambda h, w: linear_cross_entropy(h, w, targets, chunk_rows=3), (hidden, weight)
    )


def test_bfloat16_autocast_matches_the_upcast_reference() -> None:
    torch.manual_seed(0)
    hidden, weight = torch.randn(40, 16), torch.randn(64, 16)
    targets = torch.randint(0, 64, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, weight, targets, chunk_rows=16)
    logits = hidden.bfloat16() @ weight.bfloat16().T
    expected = F.cross_entropy(logits.float(), targets)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-3)

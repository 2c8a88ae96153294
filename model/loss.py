"""The output layer and its cross-entropy in one pass, chunk by chunk, never holding all logits.

With the GPT-2 vocabulary the head is most of a small model's work: 2,048 positions × 50,257
tokens is 411 MB of fp32 logits, written by the head's matmul, read by log-softmax, and a
gradient as large written and read again by the two backward matmuls. ``linear_cross_entropy``
computes ``F.cross_entropy(hidden @ weight.T, targets, ignore_index=-1)`` a few hundred rows at a
time and, when a gradient will be wanted, the gradients of that loss in the same pass (softmax
minus one-hot is all they need): backward then only scales them by the incoming gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

IGNORE_INDEX = -1
CHUNK_ROWS = 512


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int = CHUNK_ROWS
) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` (N, C) @ (C, V) against ``targets`` (N,),
    positions whose target is -1 ignored; the same numbers as ``F.cross_entropy`` on the full
    logits (NaN when every target is ignored, as there). Under autocast the matmuls run in the
    autocast dtype and the softmax in fp32."""
    if hidden.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    targets = targets.reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows)
    with torch.no_grad():
        return _chunked(hidden, weight, targets, chunk_rows, with_grads=False)[0]


def _chunked(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int, with_grads: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(loss, d loss / d hidden, d loss / d weight), the gradients only ``with_grads``."""
    with torch.autocast(hidden.device.type, enabled=False):
        # fp32 softmax (fp64 for fp64 inputs); the matmuls in the inputs' dtype.
        accumulate = torch.promote_types(hidden.dtype, torch.float32)
        valid = targets != IGNORE_INDEX
        count = valid.sum()
        rows = hidden.shape[0]
        grad_hidden = grad_weight = None
        if with_grads:
            grad_hidden = torch.zeros_like(hidden)
            grad_weight = torch.zeros(
                weight.shape,
                dtype=torch.promote_types(weight.dtype, torch.float32),
                device=weight.device,
            )
        # Each position's share of the mean: 1/count for counted ones, 0 for ignored ones.
        share = valid.to(accumulate) / count.clamp(min=1)
        total = torch.zeros((), dtype=accumulate, device=hidden.device)
        buffer = None
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            chunk_valid = valid[start:stop]
            if not chunk_valid.any():
                continue
            h = hidden[start:stop]
            target = targets[start:stop].clamp(min=0).unsqueeze(1)
            if hidden.dtype == weight.dtype == accumulate:
                if buffer is None:  # one allocation reused by every chunk
                    buffer = hidden.new_empty(min(chunk_rows, rows), weight.shape[0])
                logits = torch.mm(h, weight.t(), out=buffer[: stop - start])
            else:
                logits = torch.mm(h, weight.t()).to(accumulate)
            # logsumexp by hand: max, then exp(logits − max) in place and its sum. The softmax
            # itself is never written out: its row sums 1/s fold into the small operands.
            top = logits.amax(dim=1, keepdim=True)
            target_logit = logits.gather(1, target)
            exps = logits.sub_(top).exp_()
            sums = exps.sum(dim=1, keepdim=True)
            losses = top + sums.log() - target_logit
            total += (losses.squeeze(1) * chunk_valid).sum()
            if not with_grads:
                continue
            # d loss / d logits = share · (exps / sums − one-hot), where share is 1/count for a
            # counted position and 0 for an ignored one; so d hidden = exps @ W · share/sums −
            # W[target] · share and d W = exps.T @ (hidden · share/sums) − one-hot.T @ (hidden ·
            # share): the large matrix enters the two matmuls as it is.
            chunk_share = share[start:stop].unsqueeze(1)
            row_scale = chunk_share / sums
            exps = exps.to(weight.dtype)
            target = target.squeeze(1)
            grad_hidden[start:stop] = (
                torch.mm(exps, weight) * row_scale - weight[target] * chunk_share
            ).to(hidden.dtype)
            scaled = (h * row_scale).to(weight.dtype)
            if weight.dtype == grad_weight.dtype:
                grad_weight.addmm_(exps.t(), scaled)
            else:
                grad_weight += torch.mm(exps.t(), scaled)
            grad_weight.index_add_(0, target, (h * -chunk_share).to(grad_weight.dtype))
        loss = total / count
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return loss, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int):
        loss, grad_hidden, grad_weight = _chunked(
            hidden, weight, targets, chunk_rows, with_grads=True
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        # The gradients were computed for d loss = 1: scale them by the actual one (a loss
        # divided for accumulation, scaled by a GradScaler...).
        if not bool(grad_output == 1):
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
            grad_weight = grad_weight * grad_output.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None

"""The output layer and its cross-entropy in one pass, chunk by chunk, never holding all logits.

With the GPT-2 vocabulary the head is most of a small model's work: 2,048 positions × 50,257
tokens is 411 MB of fp32 logits, written by the head's matmul, read by log-softmax, and a
gradient as large written and read again by the two backward matmuls. ``linear_cross_entropy``
computes ``F.cross_entropy(hidden @ weight.T, targets, ignore_index=-1)`` a few hundred rows at a
time and, when a gradient will be wanted, the gradients of that loss in the same pass (softmax
minus one-hot is all they need): backward then only scales them by the incoming gradient.
``token_log_probs`` is the same idea for scoring: each position's log-probability of its target
(and the likeliest tokens), for ``slm eval`` and for prompts scored by the service.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -1
CHUNK_ROWS = 512
# Output-matrix rows multiplied at once when scoring: 512 × 4,096 fp32 logits (8 MB) stay in
# cache, where whole-vocabulary logits (100 MB for 512 rows) go to memory and back twice.
VOCAB_SLICE = 4096


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_rows: int = CHUNK_ROWS,
    vocab_size: int | None = None,
) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` (N, C) @ (C, V) against ``targets`` (N,),
    positions whose target is -1 ignored; the same numbers as ``F.cross_entropy`` on the full
    logits (NaN when every target is ignored, as there). Under autocast the matmuls run in the
    autocast dtype and the softmax in fp32. A ``vocab_size`` below the weight's rows masks the
    logits of the rows past it (padding): they get no probability and no gradient."""
    if hidden.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    targets = targets.reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, vocab_size)
    with torch.no_grad():
        return _chunked(hidden, weight, targets, chunk_rows, vocab_size, with_grads=False)[0]


def _chunked(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_rows: int,
    vocab_size: int | None,
    with_grads: bool,
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
            if vocab_size is not None and vocab_size < weight.shape[0]:
                logits[:, vocab_size:] = -math.inf
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
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        chunk_rows: int,
        vocab_size: int | None,
    ):
        loss, grad_hidden, grad_weight = _chunked(
            hidden, weight, targets, chunk_rows, vocab_size, with_grads=True
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
        return grad_hidden, grad_weight, None, None, None


@torch.inference_mode()
def token_log_probs(
    hidden: Tensor, weight: Tensor, targets: Tensor, top: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """``log_softmax(hidden @ weight.T)`` at ``targets`` (N,), in fp32, and the ``top`` likeliest
    tokens with theirs, (N, top) each; computed for CHUNK_ROWS rows and VOCAB_SLICE vocabulary
    entries at a time with a running log-sum-exp, so the (N, vocab) logits never exist whole
    (1.6× faster than the product plus log_softmax on a CPU, BENCHMARKS.md). Returns
    (log-probabilities, top tokens, top log-probabilities)."""
    picked = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
    best_tokens = targets.new_empty(len(targets), top)
    best_values = torch.empty(len(targets), top, dtype=torch.float32, device=hidden.device)
    for start in range(0, len(targets), CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        picked[rows], best_tokens[rows], best_values[rows] = _sliced_log_probs(
            hidden[rows].float(), weight, targets[rows], top
        )
    return picked, best_tokens, best_values


def _sliced_log_probs(
    hidden: Tensor, weight: Tensor, targets: Tensor, top: int
) -> tuple[Tensor, Tensor, Tensor]:
    rows = hidden.shape[0]
    running_max = hidden.new_full((rows,), -math.inf)
    running_sum = hidden.new_zeros(rows)
    picked = hidden.new_empty(rows)
    best_values = hidden.new_empty(rows, 0)
    best_tokens = targets.new_empty(rows, 0)
    for start in range(0, weight.shape[0], VOCAB_SLICE):
        logits = F.linear(hidden, weight[start : start + VOCAB_SLICE].float())
        width = logits.shape[1]
        new_max = torch.maximum(running_max, logits.amax(dim=-1))
        running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(
            logits - new_max[:, None]
        ).sum(dim=-1)
        running_max = new_max
        inside = ((targets >= start) & (targets < start + width)).nonzero()[:, 0]
        picked[inside] = logits[inside, targets[inside] - start]
        if top:
            values, tokens = logits.topk(min(top, width), dim=-1)
            best_values = torch.cat([best_values, values], dim=1)
            best_tokens = torch.cat([best_tokens, tokens + start], dim=1)
            best_values, order = best_values.topk(min(top, best_values.shape[1]), dim=-1)
            best_tokens = best_tokens.gather(1, order)
    normaliser = running_max + torch.log(running_sum)
    return picked - normaliser, best_tokens, best_values - normaliser[:, None]

"""The GPT: a GPT-2-style decoder-only transformer, in the order data flows through it.

Module names follow GPT-2's (``transformer.h.0.attn.c_attn`` ...) so that exporting to Hugging
Face ``GPT2LMHeadModel`` and llama.cpp's ``gpt2`` architecture is a renaming, not a rewrite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.cache import CacheStep
from model.config import GPTConfig
from model.loss import linear_cross_entropy


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # Query, key and value projections for all heads in one matmul.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, layer: int, cache_step: CacheStep | None) -> Tensor:
        batch, seq, width = x.shape
        # (B, T, 3·C) → three (B, n_head, T, head_dim) views, in one permute.
        qkv = self.c_attn(x).view(batch, seq, 3, self.n_head, width // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        mask, is_causal = None, True
        if cache_step is not None:
            k, v, mask, is_causal = cache_step.update(layer, k, v)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        y = y.transpose(1, 2).reshape(batch, seq, width)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2's tanh approximation: what Hugging Face's "gelu_new" and llama.cpp's gelu compute,
        # so exported models give the same numbers.
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache_step: CacheStep | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), self.layer, cache_step)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config, layer) for layer in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Tie the output projection to the token embedding: a third fewer parameters at this
        # size, and the same matrix GPT-2 uses for both.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2·n_layer)
        # so the stream's variance does not grow with depth.
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, parameter in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(parameter, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(
        self,
        idx: Tensor,
        positions: Tensor | None = None,
        cache_step: CacheStep | None = None,
    ) -> Tensor:
        """Token ids (B, T) → final-LayerNorm activations (B, T, n_embd)."""
        seq = idx.shape[1]
        if positions is None:
            if seq > self.config.block_size:
                raise ValueError(
                    f"sequence of {seq} tokens exceeds block_size {self.config.block_size}"
                )
            positions = torch.arange(seq, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))
        for block in self.transformer.h:
            x = block(x, cache_step)
        return self.transformer.ln_f(x)

    def forward(
        self, idx: Tensor, targets: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Without targets: the logits (B, T, vocab) for every position, and None. With targets
        (B, T): None, and the mean cross-entropy over the positions whose target is not -1,
        computed by ``model.loss.linear_cross_entropy`` a chunk of positions at a time, never
        holding the (B·T, vocab) logits (their gradient neither)."""
        hidden = self.hidden_states(idx)
        if targets is None:
            return self.lm_head(hidden), None
        head = self.lm_head
        if type(head) is not nn.Linear or head.bias is not None:  # a quantized head, say
            logits = head(hidden)
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1
            )
            return None, loss
        return None, linear_cross_entropy(hidden, head.weight, targets)

    def forward_cached(self, idx: Tensor, cache_step: CacheStep) -> Tensor:
        """Run ``idx`` (B, T) through the network, reading and writing the KV cache as planned
        by ``cache_step``; returns each row's final activations at its last real (not padding)
        token (B, n_embd)."""
        return cache_step.last_hidden(self.hidden_states(idx, cache_step.positions, cache_step))

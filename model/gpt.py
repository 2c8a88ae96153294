"""The GPT: a decoder-only transformer, in the order data flows through it.

By default it is GPT-2's network; ``GPTConfig``'s options swap in rotary positions, RMSNorm,
ReLU² or SwiGLU, QK-norm and an untied head. Module names follow GPT-2's
(``transformer.h.0.attn.c_attn`` ...) whatever the options, so that exporting to Hugging Face
(``GPT2LMHeadModel``, or ``LlamaForCausalLM`` for the Llama-style options) and llama.cpp is a
renaming, not a rewrite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.cache import CachePlan
from model.config import NORM_EPS, ROPE_THETA, GPTConfig
from model.loss import linear_cross_entropy


def make_norm(config: GPTConfig, size: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(size, eps=NORM_EPS)
    return nn.LayerNorm(size, eps=NORM_EPS, bias=config.bias)


def rotary_tables(positions: Tensor, head_dim: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin of each position's rotation angles (…, T, head_dim), laid out as Llama's
    Hugging Face code lays them (each angle twice: once per half of the head), computed in
    fp32 from the positions themselves, so any position, past block_size too, has its own."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inverse_frequencies = ROPE_THETA ** (-exponents / head_dim)
    angles = positions.to(torch.float32)[..., None] * inverse_frequencies
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, heads, T, head_dim) queries or keys; the pairs rotated together are
    dimensions i and i + head_dim/2 ("rotate half", as in Hugging Face's Llama)."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat((-second, first), dim=-1)
    # cos/sin are (T, D) or (B, T, D): add the heads dimension.
    return x * cos.unsqueeze(-3) + rotated_half * sin.unsqueeze(-3)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # Query, key and value projections for all heads in one matmul.
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        if config.qk_norm:
            # Bounded attention logits let a small model take a larger learning rate.
            self.q_norm = nn.RMSNorm(config.head_dim, eps=NORM_EPS)
            self.k_norm = nn.RMSNorm(config.head_dim, eps=NORM_EPS)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        layer: int,
        cache_step: CachePlan | None,
        rotary: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        batch, seq, width = x.shape
        # (B, T, 3·C) → three (B, n_head, T, head_dim) views, in one permute.
        qkv = self.c_attn(x).view(batch, seq, 3, self.n_head, width // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
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
        self.activation = config.activation
        hidden = config.mlp_hidden
        # SwiGLU's gate and up projections are one matmul: the gate is the first half.
        inputs = 2 * hidden if self.activation == "swiglu" else hidden
        self.c_fc = nn.Linear(config.n_embd, inputs, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.activation == "relu2":
            h = F.relu(h).square()
        else:
            # GPT-2's tanh approximation: what Hugging Face's "gelu_new" and llama.cpp's gelu
            # compute, so exported models give the same numbers.
            h = F.gelu(h, approximate="tanh")
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        cache_step: CachePlan | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        x = x + self.attn(self.ln_1(x), self.layer, cache_step, rotary)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        rows = config.padded_vocab_size
        modules: dict[str, nn.Module] = {"wte": nn.Embedding(rows, config.n_embd)}
        if config.position == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules |= dict(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, layer) for layer in range(config.n_layer)),
            ln_f=make_norm(config, config.n_embd),
        )
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, rows, bias=False)
        if config.tie_embeddings:
            # The output projection is the token embedding: a third fewer parameters at this
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

    @property
    def output_weight(self) -> Tensor:
        """The output matrix's rows for real tokens (a view: pad_vocab's rows left out)."""
        weight = self.lm_head.weight
        return weight[: self.config.vocab_size] if self.config.pad_vocab else weight

    def hidden_states(
        self,
        idx: Tensor,
        positions: Tensor | None = None,
        cache_step: CachePlan | None = None,
    ) -> Tensor:
        """Token ids (B, T) → final-LayerNorm activations (B, T, n_embd)."""
        seq = idx.shape[1]
        if positions is None:
            if seq > self.config.block_size:
                raise ValueError(
                    f"sequence of {seq} tokens exceeds block_size {self.config.block_size}"
                )
            positions = torch.arange(seq, device=idx.device)
        x = self.transformer.wte(idx)
        rotary = None
        if self.config.position == "rotary":
            rotary = rotary_tables(positions, self.config.head_dim, x.dtype)
        else:
            x = x + self.transformer.wpe(positions)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, cache_step, rotary)
        return self.transformer.ln_f(x)

    def forward(
        self, idx: Tensor, targets: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Without targets: the logits (B, T, vocab) for every position, and None. With targets
        (B, T): None, and the mean cross-entropy over the positions whose target is not -1,
        computed by ``model.loss.linear_cross_entropy`` a chunk of positions at a time, never
        holding the (B·T, vocab) logits (their gradient neither)."""
        hidden = self.hidden_states(idx)
        head = self.lm_head
        if targets is None or type(head) is not nn.Linear:  # a quantized head, say
            logits = head(hidden)[..., : self.config.vocab_size]
            if targets is None:
                return logits, None
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1
            )
            return None, loss
        # The padded matrix as it is (its row count is what makes the matmuls fast); the
        # padding tokens' logits are masked inside.
        return None, linear_cross_entropy(
            hidden, head.weight, targets, vocab_size=self.config.vocab_size
        )

    def forward_cached(self, idx: Tensor, cache_step: CachePlan) -> Tensor:
        """Run ``idx`` (B, T) through the network, reading and writing the KV cache as planned
        by ``cache_step``; returns each row's final activations at its last real (not padding)
        token (B, n_embd)."""
        return cache_step.last_hidden(self.hidden_states(idx, cache_step.positions, cache_step))

"""Our parameters as the exported architectures lay them out, the common starting point of
every export format, and the choice of that architecture from a model's config."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from model.config import GPTConfig
from model.gpt import GPT

# What an export is: GPT-2's own network, or Llama's (rotary, RMSNorm, SwiGLU), or Llama's with
# QK-norm, which is Qwen3's.
Architecture = Literal["gpt2", "llama", "qwen3"]

_WHAT_EXPORTS = (
    "exports need GPT-2's network (learned positions, layernorm, gelu, tied embeddings) or "
    "Llama's (rotary positions, rmsnorm, swiglu; with qk_norm, Qwen3's)"
)


def export_architecture(config: GPTConfig) -> Architecture:
    """The Hugging Face and llama.cpp architecture that computes what ``config``'s network does,
    or a ValueError naming the option that none of them has."""
    if config.is_gpt2:
        return "gpt2"
    if config.activation == "relu2":
        raise ValueError(
            "activation relu2 has no Hugging Face or GGUF architecture; exports need gelu "
            "(GPT-2) or swiglu (Llama)"
        )
    if config.activation == "gelu":
        # GPT-2's MLP with something else of another family.
        for name, gpt2_value in (
            ("position", "learned"),
            ("norm", "layernorm"),
            ("qk_norm", False),
            ("tie_embeddings", True),
        ):
            value = getattr(config, name)
            if value != gpt2_value:
                raise ValueError(
                    f"{name} {value} with activation gelu has no Hugging Face or GGUF "
                    f"architecture: GPT-2's needs {name} {gpt2_value}; {_WHAT_EXPORTS}"
                )
    for name, llama_value in (("position", "rotary"), ("norm", "rmsnorm")):
        value = getattr(config, name)
        if value != llama_value:
            raise ValueError(
                f"{name} {value} with activation swiglu has no Hugging Face or GGUF "
                f"architecture: Llama's needs {name} {llama_value}; {_WHAT_EXPORTS}"
            )
    if config.qk_norm:
        if config.bias:
            raise ValueError(
                "qk_norm with bias=True has no Hugging Face or GGUF architecture: Qwen3's "
                "(Llama's with qk_norm) has no MLP biases, and llama.cpp's no biases at all; "
                "export needs bias=False with qk_norm"
            )
        return "qwen3"
    return "llama"


def gpt2_state_dict(model: GPT) -> dict[str, Tensor]:
    """``model``'s parameters as fp32 CPU tensors under GPT-2's names, in module order, without
    the tied ``lm_head.weight`` and a padded vocabulary's extra rows (read-only: they may share
    memory with the model).

    GPT-2 (and so Hugging Face and llama.cpp) has a bias in every Linear and LayerNorm; a model
    built with ``bias=False`` gets zero biases, which compute exactly what it computes.
    Linear weights keep PyTorch's (out, in) layout.
    """
    if export_architecture(model.config) != "gpt2":
        raise ValueError("this model is not GPT-2's network; see export_architecture")
    if model.lm_head.weight is not model.transformer.wte.weight:
        raise ValueError("GPT-2 formats tie lm_head to wte, but this model's are separate")
    tensors: dict[str, Tensor] = {}
    for name, module in model.transformer.named_modules(prefix="transformer"):
        if module is model.transformer.wte:
            tensors[f"{name}.weight"] = fp32(model.output_weight)  # the real tokens' rows
        elif isinstance(module, nn.Embedding | nn.Linear | nn.LayerNorm):
            tensors[f"{name}.weight"] = fp32(module.weight)
        if isinstance(module, nn.Linear | nn.LayerNorm):
            bias = module.bias
            if bias is None:
                bias = torch.zeros(module.weight.shape[0])
            tensors[f"{name}.bias"] = fp32(bias)
    return tensors


def llama_state_dict(model: GPT) -> dict[str, Tensor]:
    """``model``'s parameters as fp32 CPU tensors under Hugging Face Llama's (or Qwen3's) names,
    in module order (read-only: they may share memory with the model).

    The fused projections are split: ``c_attn``'s rows into ``q_proj``, ``k_proj``, ``v_proj``
    and ``c_fc``'s into ``gate_proj`` (the first half) and ``up_proj``. Only the real tokens'
    rows of the embedding (and of a separate ``lm_head``) are kept. Biases are written only
    for a model that has them. q and k stay in the "rotate half" layout Hugging Face uses.
    """
    config = model.config
    architecture = export_architecture(config)
    if architecture not in ("llama", "qwen3"):
        raise ValueError(f"this model is {architecture}'s network, not Llama's")
    vocab = config.vocab_size
    n = config.n_embd
    tensors = {"model.embed_tokens.weight": fp32(model.transformer.wte.weight[:vocab])}

    def linear(name: str, module: nn.Linear, rows: slice = slice(None)) -> None:
        tensors[f"{name}.weight"] = fp32(module.weight[rows])
        if module.bias is not None:
            tensors[f"{name}.bias"] = fp32(module.bias[rows])

    for i, block in enumerate(model.transformer.h):
        prefix = f"model.layers.{i}"
        tensors[f"{prefix}.input_layernorm.weight"] = fp32(block.ln_1.weight)
        attn = block.attn
        for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
            linear(f"{prefix}.self_attn.{name}", attn.c_attn, slice(part * n, (part + 1) * n))
        if config.qk_norm:
            tensors[f"{prefix}.self_attn.q_norm.weight"] = fp32(attn.q_norm.weight)
            tensors[f"{prefix}.self_attn.k_norm.weight"] = fp32(attn.k_norm.weight)
        linear(f"{prefix}.self_attn.o_proj", attn.c_proj)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = fp32(block.ln_2.weight)
        hidden = config.mlp_hidden
        linear(f"{prefix}.mlp.gate_proj", block.mlp.c_fc, slice(0, hidden))
        linear(f"{prefix}.mlp.up_proj", block.mlp.c_fc, slice(hidden, 2 * hidden))
        linear(f"{prefix}.mlp.down_proj", block.mlp.c_proj)
    tensors["model.norm.weight"] = fp32(model.transformer.ln_f.weight)
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = fp32(model.output_weight)
    return tensors


def fp32(tensor: Tensor) -> Tensor:
    return tensor.detach().to("cpu", torch.float32)

"""Our parameters as GPT-2 lays them out, the common starting point of every export format."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.config import GPT2_VOCAB_SIZE
from model.gpt import GPT


def gpt2_state_dict(model: GPT) -> dict[str, Tensor]:
    """``model``'s parameters as fp32 CPU tensors under GPT-2's names, in module order, without
    the tied ``lm_head.weight`` (read-only: they may share memory with the model).

    GPT-2 (and so Hugging Face and llama.cpp) has a bias in every Linear and LayerNorm; a model
    built with ``bias=False`` gets zero biases, which compute exactly what it computes.
    Linear weights keep PyTorch's (out, in) layout.
    """
    if model.config.vocab_size != GPT2_VOCAB_SIZE:
        # Exports carry GPT-2's tokenizer, which must cover the embedding rows exactly.
        raise ValueError(
            f"exports need GPT-2's vocabulary of {GPT2_VOCAB_SIZE} tokens, "
            f"but this model has vocab_size {model.config.vocab_size}"
        )
    if model.lm_head.weight is not model.transformer.wte.weight:
        raise ValueError("GPT-2 formats tie lm_head to wte, but this model's are separate")
    tensors: dict[str, Tensor] = {}
    for name, module in model.transformer.named_modules(prefix="transformer"):
        if isinstance(module, nn.Embedding | nn.Linear | nn.LayerNorm):
            tensors[f"{name}.weight"] = _fp32(module.weight)
        if isinstance(module, nn.Linear | nn.LayerNorm):
            bias = module.bias
            if bias is None:
                bias = torch.zeros(module.weight.shape[0])
            tensors[f"{name}.bias"] = _fp32(bias)
    return tensors


def _fp32(tensor: Tensor) -> Tensor:
    return tensor.detach().to("cpu", torch.float32)

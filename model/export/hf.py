"""Export to a Hugging Face model folder that ``from_pretrained`` loads as it is, GPT-2's
tokenizer included.

The architecture follows the model's config (``model.export.weights.export_architecture``):

- GPT-2's network → ``GPT2LMHeadModel``. Our module names are GPT-2's, so the state dict needs
  no renaming; only the projection weights change layout, because GPT-2's ``Conv1D`` stores
  (in, out) where ``nn.Linear`` stores (out, in).
- rotary positions + RMSNorm + SwiGLU → ``LlamaForCausalLM``, with QK-norm → ``Qwen3ForCausalLM``
  (tied or untied head, biases or none; a padded vocabulary loses its padding rows). The fused
  projections are split into Llama's (``model.export.weights.llama_state_dict``).

Any other combination of options raises ValueError before anything is written.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from model.atomic import fsync_directory
from model.config import NORM_EPS, ROPE_THETA
from model.export.vocab import gpt2_vocab_and_merges
from model.export.weights import (
    Architecture,
    export_architecture,
    gpt2_state_dict,
    llama_state_dict,
)
from model.gpt import GPT
from model.tokenizer import END_OF_TEXT

# Weights of the Linear layers that GPT-2 implements as Conv1D.
CONV1D_WEIGHTS = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")

# The transformers class each export architecture loads as.
HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}

EXPORT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def export_hf(model: GPT, out_dir: Path) -> None:
    """Write ``model`` and its tokenizer (GPT-2's, or GPT-2's first merges) to ``out_dir`` as a
    ``GPT2LMHeadModel``, ``LlamaForCausalLM`` or ``Qwen3ForCausalLM`` folder, whichever computes
    what it does.

    The folder appears complete or not at all: everything is written to a hidden sibling and
    renamed into place. An existing ``out_dir`` is replaced only if it is empty or holds nothing
    but a previous export's files, so a mistyped path cannot delete unrelated work.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        unexpected = sorted(set(os.listdir(out_dir)) - set(EXPORT_FILES))
        if unexpected:
            raise FileExistsError(
                f"{out_dir} exists and holds files that are not part of an export "
                f"({', '.join(unexpected[:5])}); choose another folder or empty it"
            )
    files = _export_files(model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _hidden_sibling(out_dir, "tmp")
    # Plain mkdir/open honour the umask; tempfile's would leave the export readable by us alone.
    staging.mkdir()
    try:
        for name, data in files.items():
            with open(staging / name, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        fsync_directory(staging)
        if out_dir.exists():
            # A folder cannot be renamed over a non-empty one: move the old export aside first.
            old = _hidden_sibling(out_dir, "old")
            os.replace(out_dir, old)
            os.replace(staging, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fsync_directory(out_dir.parent)


def _hidden_sibling(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.{suffix}")


def _export_files(model: GPT) -> dict[str, bytes]:
    config = model.config
    architecture = export_architecture(config)
    if architecture == "gpt2":
        tensors = {
            name: tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
            for name, tensor in gpt2_state_dict(model).items()
        }
        hf_config = _gpt2_config(model)
    else:
        tensors = llama_state_dict(model)
        hf_config = _llama_config(model, architecture)
    # Copies: safetensors refuses tensors that share memory (q, k and v are rows of one matrix).
    tensors = {
        name: tensor.clone(memory_format=torch.contiguous_format)
        for name, tensor in tensors.items()
    }
    eot_id = config.vocab_size - 1  # <|endoftext|> is every vocabulary's last token
    vocab, merges = gpt2_vocab_and_merges(config.vocab_size)
    special_tokens = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT}
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": config.block_size,
        "add_prefix_space": False,
        "add_bos_token": False,
        # Decoding must give back exactly the text tiktoken would, spaces before punctuation too.
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        **special_tokens,
    }
    return {
        "config.json": _json_bytes(hf_config),
        "generation_config.json": _json_bytes({"bos_token_id": eot_id, "eos_token_id": eot_id}),
        "model.safetensors": safetensors_bytes(tensors, metadata={"format": "pt"}),
        "vocab.json": _json_bytes(vocab),
        "merges.txt": "".join(
            ["#version: 0.2\n", *(f"{left} {right}\n" for left, right in merges)]
        ).encode(),
        "tokenizer_config.json": _json_bytes(tokenizer_config),
        "special_tokens_map.json": _json_bytes(special_tokens),
    }


def _gpt2_config(model: GPT) -> dict[str, Any]:
    """config.json of a ``GPT2LMHeadModel``."""
    config = model.config
    eot_id = config.vocab_size - 1
    return {
        "architectures": [HF_CLASSES["gpt2"]],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        # Older readers of GPT-2 configs (llama.cpp's convert_hf_to_gguf.py) look for n_ctx.
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd, as in our MLP
        "activation_function": "gelu_new",  # the tanh approximation our MLP uses
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": model.transformer.ln_f.eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": "float32",
    }


def _llama_config(model: GPT, architecture: Architecture) -> dict[str, Any]:
    """config.json of a ``LlamaForCausalLM`` (or, with QK-norm, a ``Qwen3ForCausalLM``)."""
    config = model.config
    eot_id = config.vocab_size - 1
    hf_config: dict[str, Any] = {
        "architectures": [HF_CLASSES[architecture]],
        "model_type": architecture,
        "vocab_size": config.vocab_size,  # a padded model's extra rows are left out
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_head,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": NORM_EPS,
        # transformers 5 reads rope_parameters; 4.x read rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "rope_theta": ROPE_THETA,
        "attention_bias": config.bias,
        "attention_dropout": config.dropout,
        "initializer_range": 0.02,
        "tie_word_embeddings": config.tie_embeddings,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": "float32",
    }
    if architecture == "llama":
        hf_config["mlp_bias"] = config.bias
        hf_config["pretraining_tp"] = 1
    else:
        hf_config["use_sliding_window"] = False
    return hf_config


def _json_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode()

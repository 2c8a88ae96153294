"""Export to a GGUF file for llama.cpp and Ollama, GPT-2's tokenizer included.

The architecture follows the model's config (``model.export.weights.export_architecture``):

- GPT-2's network → llama.cpp's ``gpt2``. Tensor names come from the ``gguf`` package's own
  GPT-2 name map (our module names are GPT-2's).
- rotary positions + RMSNorm + SwiGLU → llama.cpp's ``llama``; with QK-norm → ``qwen3``. The
  tensors are Hugging Face Llama's (``model.export.weights.llama_state_dict``) renamed by the
  ``gguf`` package's map for that architecture. llama.cpp rotates pairs of adjacent dimensions
  for ``llama`` where we (and Hugging Face) rotate dimension i with i + head_dim/2, so the rows
  of q and k are permuted as llama.cpp's own converter does; ``qwen3`` rotates as we do (NEOX).

Any other combination of options raises ValueError before anything is written. Linear weights
keep PyTorch's (out, in) layout, which is ggml's {in, out}. A tied model has no
``output.weight``: llama.cpp reuses ``token_embd.weight`` when it is missing. Only the real
tokens' rows of a padded vocabulary are written.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import gguf
import torch

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

_ARCHS = {
    "gpt2": gguf.MODEL_ARCH.GPT2,
    "llama": gguf.MODEL_ARCH.LLAMA,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
}
# dtype → (the file type llama.cpp reports, the type its matrices are stored in)
_TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
GGUF_TYPES = tuple(_TYPES)


def export_gguf(model: GPT, path: Path, dtype: str = "f16") -> None:
    """Write ``model`` to the GGUF file ``path`` with its matrices stored as ``dtype``.

    Biases, norms and position embeddings stay f32 whatever ``dtype`` is, as llama.cpp's own
    converter does; with q8_0, a matrix whose rows are not a multiple of 32 falls back to f16.
    The file is written beside ``path`` and renamed into place, so it is never seen half-written.
    """
    if dtype not in GGUF_TYPES:
        raise ValueError(f"unknown GGUF type {dtype!r}; choose one of {GGUF_TYPES}")
    architecture = export_architecture(model.config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of our own rather than tempfile's, whose private mode would stick to the export.
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        writer = gguf.GGUFWriter(temporary, gguf.MODEL_ARCH_NAMES[_ARCHS[architecture]])
        _add_metadata(writer, model, architecture, dtype, name=path.stem)
        _add_tokenizer(writer, model.config.vocab_size)
        _add_tensors(writer, model, architecture, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def _add_metadata(
    writer: gguf.GGUFWriter, model: GPT, architecture: Architecture, dtype: str, name: str
) -> None:
    config = model.config
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.mlp_hidden)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    if architecture == "gpt2":
        writer.add_layer_norm_eps(model.transformer.ln_f.eps)
    else:
        writer.add_head_count_kv(config.n_head)
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(ROPE_THETA)
        writer.add_layer_norm_rms_eps(NORM_EPS)
        writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_TYPES[dtype][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer: gguf.GGUFWriter, vocab_size: int) -> None:
    vocab, merges = gpt2_vocab_and_merges(vocab_size)
    tokens = sorted(vocab, key=vocab.__getitem__)
    eot_id = vocab_size - 1  # <|endoftext|> is every vocabulary's last token
    writer.add_tokenizer_model("gpt2")  # byte-level BPE
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenizing regex
    writer.add_token_list(tokens)
    writer.add_token_types(
        [
            gguf.TokenType.CONTROL if i == eot_id else gguf.TokenType.NORMAL
            for i in range(len(tokens))
        ]
    )
    writer.add_token_merges([f"{left} {right}" for left, right in merges])
    writer.add_bos_token_id(eot_id)
    writer.add_eos_token_id(eot_id)
    # Like Hugging Face's GPT-2 tokenizer (and our own), prompts are encoded as they are.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def _add_tensors(
    writer: gguf.GGUFWriter, model: GPT, architecture: Architecture, dtype: str
) -> None:
    config = model.config
    names = gguf.get_tensor_name_map(_ARCHS[architecture], config.n_layer)
    matrix_type = _TYPES[dtype][1]
    tensors = gpt2_state_dict(model) if architecture == "gpt2" else llama_state_dict(model)
    for name, tensor in tensors.items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise AssertionError(f"no {architecture} GGUF name for {name}")
        if architecture == "llama" and name.endswith(PERMUTED):
            tensor = rotate_half_to_interleaved(tensor, config.n_head)
        data = tensor.numpy()
        # llama.cpp reads vectors (norms, biases) as f32 only; its own converter and quantizer
        # leave position embeddings f32 too.
        if data.ndim == 1 or gguf_name == "position_embd.weight":
            qtype = gguf.GGMLQuantizationType.F32
        else:
            qtype = matrix_type
        try:
            data = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # q8_0 blocks are 32 values of a row
            qtype = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(data, qtype)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)


# Hugging Face Llama tensors whose rows llama.cpp's llama architecture wants permuted.
PERMUTED = tuple(f"{proj}.{kind}" for proj in ("q_proj", "k_proj") for kind in ("weight", "bias"))


def rotate_half_to_interleaved(tensor: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder each head's output rows of a q or k projection (or its bias) from Hugging Face's
    layout, where dimension i rotates with i + head_dim/2, to llama.cpp's, where 2i rotates with
    2i + 1: the order (0, h, 1, h + 1, ...), as ``LlamaModel.permute`` in llama.cpp's
    convert_hf_to_gguf.py reorders them. Attention scores are unchanged, since q and k are
    reordered alike."""
    rows = tensor.shape[0]
    return (
        tensor.reshape(n_head, 2, rows // n_head // 2, *tensor.shape[1:])
        .swapaxes(1, 2)
        .reshape(tensor.shape)
    )

"""Exports: Hugging Face GPT2LMHeadModel folders and llama.cpp GGUF files, checked against our own
model with the consumers' own readers (transformers, gguf, and llama.cpp when it is installed)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import tiktoken
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, GPT2LMHeadModel, PreTrainedTokenizerBase
from weights import sharp_model

from model import GPT, GPTConfig
from model.export.gguf import GGUF_TYPES, export_gguf
from model.export.hf import EXPORT_FILES, export_hf
from model.export.vocab import gpt2_vocab_and_merges

EOT = 50256
TEXTS = [
    "Once upon a time there was a pumpkin.",
    "The café served crème brûlée; naïve Zoë said «déjà vu».",
    "Emoji 🎃👻🧙‍♀️ and 🇫🇷 flags",
    "日本語のテキストと中文文本, 한국어도.",
    "  leading, trailing   \n\n\tand   runs of\twhitespace  \r\n ",
    "Story one ends.<|endoftext|>Story two begins.",
    "numbers 1234567 3.14159 and 's 't 're 've 'm 'll 'd",
    "",
]


# ---------------------------------------------------------------------------------------------
# Vocabulary


def test_vocab_and_merges_rebuild_gpt2_files() -> None:
    vocab, merges = gpt2_vocab_and_merges()
    assert len(vocab) == 50257 and sorted(vocab.values()) == list(range(50257))
    assert len(merges) == 50000
    assert vocab["<|endoftext|>"] == EOT
    assert vocab["!"] == 0 and vocab["Ġ"] == 220 and vocab["Ċ"] == 198  # bytes ' ', '\n'
    # GPT-2's merges.txt opens and closes with these; merge i creates token 256 + i.
    assert merges[:3] == [("Ġ", "t"), ("Ġ", "a"), ("h", "e")]
    assert merges[-1] == ("Ġg", "azed")
    assert all(vocab[left + right] == 256 + i for i, (left, right) in enumerate(merges))


# ---------------------------------------------------------------------------------------------
# Hugging Face

PARITY_CONFIGS = [
    GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64, bias=True),
    GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64, bias=False),
    GPTConfig(block_size=24, n_layer=3, n_head=3, n_embd=48, bias=True, dropout=0.1),
    GPTConfig(block_size=16, n_layer=1, n_head=4, n_embd=32, bias=False, dropout=0.2),
    GPTConfig(block_size=40, n_layer=2, n_head=1, n_embd=40, bias=True),
]


@pytest.mark.parametrize(
    "config",
    PARITY_CONFIGS,
    ids=lambda c: f"L{c.n_layer}H{c.n_head}E{c.n_embd}T{c.block_size}-bias{int(c.bias)}",
)
def test_hf_logits_match_ours(config: GPTConfig, tmp_path: Path) -> None:
    model = sharp_model(config)
    export_hf(model, tmp_path / "hf")
    assert sorted(os.listdir(tmp_path / "hf")) == sorted(EXPORT_FILES)

    hf, info = GPT2LMHeadModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    hf.eval()
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert hf.dtype == torch.float32
    assert hf.config.n_positions == config.block_size
    assert hf.config.resid_pdrop == hf.config.embd_pdrop == hf.config.attn_pdrop == config.dropout
    assert hf.config.bos_token_id == hf.config.eos_token_id == EOT
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()

    idx = torch.randint(0, config.vocab_size, (3, config.block_size))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    error = (ours - theirs).abs().max().item()
    assert error < 1e-4, f"max |logit difference| {error:.2e}"


def test_hf_export_is_fp32_whatever_the_model_dtype(tmp_path: Path) -> None:
    model = sharp_model(PARITY_CONFIGS[1]).to(torch.bfloat16)
    export_hf(model, tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert {tensor.dtype for tensor in tensors.values()} == {torch.float32}
    assert torch.equal(tensors["transformer.wte.weight"], model.transformer.wte.weight.float())
    # Conv1D layout: (in, out).
    c_fc = model.transformer.h[0].mlp.c_fc.weight
    assert torch.equal(tensors["transformer.h.0.mlp.c_fc.weight"], c_fc.float().t())
    assert not tensors["transformer.h.0.mlp.c_fc.bias"].any()  # bias=False: zeros


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    out_dir = tmp_path_factory.mktemp("tokenizer") / "hf"
    export_hf(sharp_model(GPTConfig(block_size=16, n_layer=1, n_head=1, n_embd=16)), out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def test_hf_tokenizer_matches_tiktoken(hf_tokenizer: PreTrainedTokenizerBase) -> None:
    encoding = tiktoken.get_encoding("r50k_base")
    assert hf_tokenizer.encode(TEXTS[0]) == [7454, 2402, 257, 640, 612, 373, 257, 30089, 13]
    for text in TEXTS:
        ids = encoding.encode(text, allowed_special="all")
        assert hf_tokenizer.encode(text) == ids, text
        assert hf_tokenizer.decode(ids) == text
    assert hf_tokenizer.eos_token_id == hf_tokenizer.bos_token_id == EOT


def test_exports_refuse_a_vocabulary_other_than_gpt2s(tmp_path: Path) -> None:
    model = sharp_model(GPTConfig(block_size=8, n_layer=1, n_head=1, n_embd=8, vocab_size=50304))
    with pytest.raises(ValueError, match="50257"):
        export_hf(model, tmp_path / "hf")
    with pytest.raises(ValueError, match="50257"):
        export_gguf(model, tmp_path / "model.gguf")
    assert os.listdir(tmp_path) == []


def test_hf_export_replaces_a_previous_export_only(tmp_path: Path) -> None:
    small, other = (sharp_model(c, seed) for seed, c in enumerate(PARITY_CONFIGS[3:5]))
    out_dir = tmp_path / "hf"
    export_hf(small, out_dir)
    export_hf(other, out_dir)
    assert json.loads((out_dir / "config.json").read_text())["n_embd"] == other.config.n_embd
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no staging or old folder left behind

    (out_dir / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        export_hf(small, out_dir)
    assert (out_dir / "notes.txt").read_text() == "mine"


def test_hf_export_failing_midway_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_fsync(descriptor: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        export_hf(sharp_model(PARITY_CONFIGS[3]), tmp_path / "hf")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# GGUF

GGUF_CONFIG = GPTConfig(block_size=24, n_layer=2, n_head=2, n_embd=64, bias=False)


def expected_gguf_tensors(config: GPTConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """llama.cpp's gpt2 tensors: name → (our parameter, shape in ggml order {ne0, ne1}).
    ``output.weight`` is absent: llama.cpp duplicates ``token_embd.weight`` for it."""
    n, ff = config.n_embd, 4 * config.n_embd
    tensors = {
        "token_embd.weight": ("transformer.wte.weight", (n, config.vocab_size)),
        "position_embd.weight": ("transformer.wpe.weight", (n, config.block_size)),
        "output_norm.weight": ("transformer.ln_f.weight", (n,)),
        "output_norm.bias": ("transformer.ln_f.bias", (n,)),
    }
    for i in range(config.n_layer):
        ours = f"transformer.h.{i}"
        for gguf_name, our_name, shape in [
            ("attn_norm", "ln_1", (n,)),
            ("attn_qkv", "attn.c_attn", (n, 3 * n)),
            ("attn_output", "attn.c_proj", (n, n)),
            ("ffn_norm", "ln_2", (n,)),
            ("ffn_up", "mlp.c_fc", (n, ff)),
            ("ffn_down", "mlp.c_proj", (ff, n)),
        ]:
            tensors[f"blk.{i}.{gguf_name}.weight"] = (f"{ours}.{our_name}.weight", shape)
            tensors[f"blk.{i}.{gguf_name}.bias"] = (f"{ours}.{our_name}.bias", (shape[-1],))
    return tensors


def our_parameter(model: GPT, name: str) -> np.ndarray:
    """A parameter by name, zeros for the biases a bias-free model lacks."""
    module_name, kind = name.rsplit(".", 1)
    module = model.get_submodule(module_name)
    tensor = getattr(module, kind)
    if tensor is None:
        return np.zeros(module.weight.shape[0], dtype=np.float32)
    return tensor.detach().float().numpy()


def field(reader: gguf.GGUFReader, key: str) -> Any:
    return reader.fields[key].contents()


def assert_q8_0_close(actual: np.ndarray, expected: np.ndarray, name: str) -> None:
    """q8_0 stores blocks of 32 as int8 times an f16 scale amax/127: each value is off by at
    most half a step, plus the scale's own f16 rounding."""
    blocks, got = expected.reshape(-1, 32), actual.reshape(-1, 32)
    step = np.abs(blocks).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(got - blocks) <= 0.6 * step + 1e-7), name


@pytest.fixture(scope="module")
def gguf_model() -> GPT:
    return sharp_model(GGUF_CONFIG, seed=1)


@pytest.fixture(scope="module")
def gguf_files(gguf_model: GPT, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gguf")
    files = {dtype: folder / f"model-{dtype}.gguf" for dtype in GGUF_TYPES}
    for dtype, path in files.items():
        export_gguf(gguf_model, path, dtype)
    assert sorted(os.listdir(folder)) == sorted(path.name for path in files.values())
    return files


@pytest.mark.parametrize("dtype", GGUF_TYPES)
def test_gguf_file(dtype: str, gguf_model: GPT, gguf_files: dict[str, Path]) -> None:
    config = gguf_model.config
    reader = gguf.GGUFReader(gguf_files[dtype])

    assert field(reader, "general.architecture") == "gpt2"
    assert field(reader, "gpt2.context_length") == config.block_size
    assert field(reader, "gpt2.embedding_length") == config.n_embd
    assert field(reader, "gpt2.feed_forward_length") == 4 * config.n_embd
    assert field(reader, "gpt2.block_count") == config.n_layer
    assert field(reader, "gpt2.attention.head_count") == config.n_head
    assert field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    file_type = {"f32": 0, "f16": 1, "q8_0": 7}[dtype]  # llama.cpp's LLAMA_FTYPE_*
    assert field(reader, "general.file_type") == file_type

    vocab, merges = gpt2_vocab_and_merges()
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == 50257 and all(vocab[token] == i for i, token in enumerate(tokens))
    assert field(reader, "tokenizer.ggml.merges") == [f"{a} {b}" for a, b in merges]
    token_types = field(reader, "tokenizer.ggml.token_type")
    assert token_types[EOT] == gguf.TokenType.CONTROL
    assert set(token_types[:EOT]) == {gguf.TokenType.NORMAL}
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.bos_token_id") == EOT
    assert field(reader, "tokenizer.ggml.eos_token_id") == EOT
    assert field(reader, "tokenizer.ggml.add_bos_token") is False

    expected = expected_gguf_tensors(config)
    assert sorted(tensor.name for tensor in reader.tensors) == sorted(expected)
    matrix_type = gguf.GGMLQuantizationType[dtype.upper()]
    for tensor in reader.tensors:
        our_name, shape = expected[tensor.name]
        assert tuple(int(n) for n in tensor.shape) == shape, tensor.name
        ours = our_parameter(gguf_model, our_name)
        stored = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(ours.shape)
        if len(shape) == 1 or tensor.name == "position_embd.weight":
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, tensor.name
        else:
            assert tensor.tensor_type == matrix_type, tensor.name
        if tensor.tensor_type == gguf.GGMLQuantizationType.F32:
            np.testing.assert_array_equal(stored, ours, err_msg=tensor.name)
        elif tensor.tensor_type == gguf.GGMLQuantizationType.F16:
            half = torch.from_numpy(ours).half().float().numpy()
            np.testing.assert_array_equal(stored, half, err_msg=tensor.name)
        else:
            assert_q8_0_close(stored, ours, tensor.name)


def test_gguf_q8_0_falls_back_to_f16_for_rows_not_in_blocks_of_32(tmp_path: Path) -> None:
    model = sharp_model(GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=48))
    export_gguf(model, tmp_path / "model.gguf", "q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors}
    # Rows of n_embd = 48 values cannot be quantized; ffn_down's rows of 4 * 48 can.
    assert types["token_embd.weight"] == types["blk.0.attn_qkv.weight"] == "F16"
    assert types["blk.0.ffn_down.weight"] == "Q8_0"


def test_gguf_rejects_unknown_type(gguf_model: GPT, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="q4_0"):
        export_gguf(gguf_model, tmp_path / "model.gguf", "q4_0")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# llama.cpp itself, through its Python binding (llama-cpp-python) where one is installed: it is
# no dependency of ours, so these tests skip without it.


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position of ``ids``, through its C API."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model_params = llama_cpp.llama_model_default_params()
    # The high-level Llama class cannot turn weight repacking off, and the AMX repacking of
    # llama-cpp-python 0.3.36 crashes on q8_0 models (llama.cpp's own quantizations too) on
    # AMX CPUs. Plain CPU buffers compute the same logits.
    model_params.use_extra_bufts = False
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
    assert model, f"llama.cpp could not load {path}"
    context_params = llama_cpp.llama_context_default_params()
    context_params.n_ctx = context_params.n_batch = context_params.n_ubatch = len(ids)
    context = llama_cpp.llama_init_from_model(model, context_params)
    batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
    try:
        batch.n_tokens = len(ids)
        for position, token in enumerate(ids):
            batch.token[position] = token
            batch.pos[position] = position
            batch.n_seq_id[position] = 1
            batch.seq_id[position][0] = 0
            batch.logits[position] = True
        assert llama_cpp.llama_decode(context, batch) == 0
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        return np.stack(
            [
                np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(context, i), (n_vocab,))
                for i in range(len(ids))
            ]
        )
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(context)
        llama_cpp.llama_model_free(model)


# Relative to the largest logit. llama.cpp computes parts of attention in f16 even for f32
# weights (about 5e-4 here); q8_0 adds its own rounding (about 2e-2). A misplaced or misnamed
# weight would be off by the order of the logits themselves.
@pytest.mark.parametrize(("dtype", "tolerance"), [("f32", 2e-3), ("f16", 3e-3), ("q8_0", 6e-2)])
def test_llama_cpp_logits_match_ours(
    dtype: str, tolerance: float, gguf_model: GPT, gguf_files: dict[str, Path]
) -> None:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50257, (gguf_model.config.block_size,), generator=generator).tolist()
    theirs = llama_cpp_logits(gguf_files[dtype], ids)
    with torch.no_grad():
        ours = gguf_model(torch.tensor([ids]))[0][0].numpy()
    error = np.abs(theirs - ours).max() / np.abs(ours).max()
    assert error < tolerance, f"max |logit difference| / max |logit| = {error:.2e}"


def test_llama_cpp_tokenizer_matches_tiktoken(gguf_files: dict[str, Path]) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    llama = llama_cpp.Llama(str(gguf_files["f32"]), vocab_only=True, verbose=False)
    encoding = tiktoken.get_encoding("r50k_base")
    for text in TEXTS:
        ids = llama.tokenize(text.encode(), add_bos=False, special=True)
        assert ids == encoding.encode(text, allowed_special="all"), text
        assert llama.detokenize(ids, special=True) == text.encode()

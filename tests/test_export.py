"""Exports: Hugging Face GPT2LMHeadModel / LlamaForCausalLM / Qwen3ForCausalLM folders and
llama.cpp GGUF files (gpt2, llama, qwen3), checked against our own model with the consumers' own
readers (transformers, gguf, and llama.cpp when it is installed)."""

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
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2LMHeadModel,
    PreTrainedTokenizerBase,
)
from weights import sharp_model

from model import GPT, GPTConfig
from model.config import preset
from model.export.gguf import GGUF_TYPES, export_gguf
from model.export.hf import EXPORT_FILES, export_hf
from model.export.vocab import gpt2_vocab_and_merges
from model.generate import complete
from model.gpt import apply_rotary, rotary_tables
from model.sampling import SamplingParams
from model.tokenizer import get_tokenizer

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


# llama.cpp's LLAMA_FTYPE_* for each GGUF type we write.
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}


def assert_same_logits(model: GPT, hf: torch.nn.Module) -> None:
    """Our logits and the export's, for random windows of the full context, within 1e-4."""
    idx = torch.randint(0, model.config.vocab_size, (3, model.config.block_size))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    error = (ours - theirs).abs().max().item()
    assert error < 1e-4, f"max |logit difference| {error:.2e}"


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
    GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32, bias=True, pad_vocab=True),
]


@pytest.mark.parametrize(
    "config",
    PARITY_CONFIGS,
    ids=lambda c: (
        f"L{c.n_layer}H{c.n_head}E{c.n_embd}T{c.block_size}-bias{int(c.bias)}"
        + ("-padded" * c.pad_vocab)
    ),
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

    assert_same_logits(model, hf)


def llama_style(**overrides: Any) -> GPTConfig:
    """A tiny model with Llama's options: rotary positions, RMSNorm, SwiGLU."""
    options = dict(position="rotary", norm="rmsnorm", activation="swiglu", block_size=32)
    return preset("tiny", **{**options, **overrides})


LLAMA_CONFIGS = {
    "llama-tied": llama_style(bias=False),
    "llama-untied-bias": llama_style(bias=True, tie_embeddings=False),
    "llama-padded-bias": llama_style(bias=True, pad_vocab=True),
    "qwen3-untied-padded": llama_style(
        bias=False, qk_norm=True, tie_embeddings=False, pad_vocab=True
    ),
    "qwen3-tied": llama_style(bias=False, qk_norm=True, n_head=4),
    # GPT-2's first 8,191 tokens and <|endoftext|>: the tokenizer files shrink with the model.
    "llama-8k": llama_style(bias=False, vocab_size=8192),
}


def greedy_tokens(model: GPT, prompt: str, n: int) -> list[int]:
    """Our greedy continuation (KV-cached generation), ending with <|endoftext|> if drawn."""
    result = complete(model, prompt, SamplingParams(max_new_tokens=n, temperature=0))
    eot = model.config.vocab_size - 1
    return result.token_ids + ([eot] if len(result.token_ids) < n else [])


@pytest.mark.parametrize("name", LLAMA_CONFIGS)
def test_hf_llama_logits_and_greedy_tokens_match_ours(name: str, tmp_path: Path) -> None:
    config = LLAMA_CONFIGS[name]
    model = sharp_model(config)
    export_hf(model, tmp_path / "hf")
    assert sorted(os.listdir(tmp_path / "hf")) == sorted(EXPORT_FILES)

    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    hf.eval()
    expected_class = "Qwen3ForCausalLM" if config.qk_norm else "LlamaForCausalLM"
    assert type(hf).__name__ == expected_class
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert hf.dtype == torch.float32
    hf_config = hf.config
    vocab_size, eot = config.vocab_size, config.vocab_size - 1
    assert hf_config.vocab_size == vocab_size
    assert hf_config.hidden_size == config.n_embd
    assert hf_config.intermediate_size == config.mlp_hidden
    assert hf_config.num_attention_heads == hf_config.num_key_value_heads == config.n_head
    assert hf_config.head_dim == config.head_dim
    assert hf_config.max_position_embeddings == config.block_size
    assert hf_config.rms_norm_eps == 1e-5
    assert hf_config.rope_parameters["rope_theta"] == 10000.0
    assert hf_config.attention_bias == config.bias
    assert hf_config.bos_token_id == hf_config.eos_token_id == eot
    assert hf_config.tie_word_embeddings == config.tie_embeddings
    embed, head = hf.model.embed_tokens.weight, hf.lm_head.weight
    assert embed.shape == head.shape == (vocab_size, config.n_embd)
    assert (embed.data_ptr() == head.data_ptr()) == config.tie_embeddings
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert ("lm_head.weight" in tensors) != config.tie_embeddings
    assert torch.equal(
        tensors["model.layers.0.mlp.gate_proj.weight"],
        model.transformer.h[0].mlp.c_fc.weight[: config.mlp_hidden],
    )

    assert_same_logits(model, hf)

    prompt = "Once upon a time"
    ids = torch.tensor([get_tokenizer(vocab_size).encode(prompt)])
    if name in ("llama-tied", "llama-8k"):  # the tokenizer files are the GPT-2 export's
        assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode(prompt) == ids[0].tolist()
    with torch.no_grad():
        generated = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=eot)
    assert generated[0, ids.shape[1] :].tolist() == greedy_tokens(model, prompt, 6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(activation="relu2"), "activation relu2 has no Hugging Face or GGUF architecture"),
        (
            dict(activation="relu2", position="rotary", norm="rmsnorm"),
            "exports need gelu (GPT-2) or swiglu (Llama)",
        ),
        (dict(norm="rmsnorm"), "norm rmsnorm with activation gelu"),
        (dict(position="rotary"), "position rotary with activation gelu"),
        (dict(tie_embeddings=False), "tie_embeddings False with activation gelu"),
        (dict(activation="swiglu"), "position learned with activation swiglu"),
        (dict(activation="swiglu", position="rotary"), "norm layernorm with activation swiglu"),
        (
            dict(activation="swiglu", position="rotary", norm="rmsnorm", qk_norm=True, bias=True),
            "export needs bias=False with qk_norm",
        ),
    ],
    ids=lambda value: (
        "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else ""
    ),
)
def test_exports_refuse_options_no_architecture_has(
    overrides: dict[str, Any], message: str, tmp_path: Path
) -> None:
    model = sharp_model(preset("tiny", block_size=8, n_layer=1, **overrides))
    with pytest.raises(ValueError) as refused:
        export_hf(model, tmp_path / "hf")
    assert message in str(refused.value)
    with pytest.raises(ValueError) as refused:
        export_gguf(model, tmp_path / "model.gguf")
    assert message in str(refused.value)
    assert os.listdir(tmp_path) == []


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


@pytest.fixture(scope="module", params=[50257, 8192, 4096], ids=lambda size: f"vocab{size}")
def hf_tokenizer(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> PreTrainedTokenizerBase:
    out_dir = tmp_path_factory.mktemp("tokenizer") / "hf"
    config = GPTConfig(block_size=16, n_layer=1, n_head=1, n_embd=16, vocab_size=request.param)
    export_hf(sharp_model(config), out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def test_hf_tokenizer_matches_ours(hf_tokenizer: PreTrainedTokenizerBase) -> None:
    ours = get_tokenizer(len(hf_tokenizer))
    if ours.n_vocab == 50257:  # all of GPT-2's: tiktoken's own r50k_base
        encoding = tiktoken.get_encoding("r50k_base")
        assert all(
            ours.encode_with_special(text) == encoding.encode(text, allowed_special="all")
            for text in TEXTS
        )
        assert hf_tokenizer.encode(TEXTS[0]) == [7454, 2402, 257, 640, 612, 373, 257, 30089, 13]
    for text in TEXTS:
        ids = ours.encode_with_special(text)
        assert hf_tokenizer.encode(text) == ids, text
        assert hf_tokenizer.decode(ids) == text
    assert hf_tokenizer.eos_token_id == hf_tokenizer.bos_token_id == ours.eot_id
    assert max(hf_tokenizer.get_vocab().values()) == ours.n_vocab - 1


def test_hf_tokenizer_of_fewer_merges_matches_ours_on_tinystories(
    hf_tokenizer: PreTrainedTokenizerBase, shared_data: Path
) -> None:
    text = (shared_data / "tinystories-valid.txt").read_text(encoding="utf-8")[:100_000]
    assert hf_tokenizer.encode(text) == get_tokenizer(len(hf_tokenizer)).encode_with_special(text)


@pytest.mark.parametrize("vocab_size", [256, 50304])
def test_a_vocabulary_that_is_not_gpt2s_is_refused(vocab_size: int) -> None:
    with pytest.raises(ValueError, match="257.*50257"):
        GPTConfig(block_size=8, n_layer=1, n_head=1, n_embd=8, vocab_size=vocab_size)


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


# One model of each GGUF architecture; the Llama one has biases, an untied head and a padded
# vocabulary, the Qwen3 one (no biases: llama.cpp's qwen3 has none) a tied head.
GGUF_CONFIGS = {
    "gpt2": GGUF_CONFIG,
    "llama": llama_style(block_size=24, bias=True, tie_embeddings=False, pad_vocab=True),
    "qwen3": llama_style(block_size=24, bias=False, qk_norm=True),
    "llama-8k": llama_style(block_size=24, bias=False, vocab_size=8192),
}


@pytest.fixture(scope="module")
def gguf_exports(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[GPT, dict[str, Path]]]:
    """Each architecture's model and its GGUF file of each type."""
    exports = {}
    for arch, config in GGUF_CONFIGS.items():
        model = sharp_model(config, seed=1)
        folder = tmp_path_factory.mktemp(f"gguf-{arch}")
        files = {dtype: folder / f"model-{dtype}.gguf" for dtype in GGUF_TYPES}
        for dtype, path in files.items():
            export_gguf(model, path, dtype)
        assert sorted(os.listdir(folder)) == sorted(path.name for path in files.values())
        exports[arch] = (model, files)
    return exports


@pytest.fixture(scope="module")
def gguf_model(gguf_exports: dict[str, tuple[GPT, dict[str, Path]]]) -> GPT:
    return gguf_exports["gpt2"][0]


@pytest.fixture(scope="module")
def gguf_files(gguf_exports: dict[str, tuple[GPT, dict[str, Path]]]) -> dict[str, Path]:
    return gguf_exports["gpt2"][1]


def assert_stored(tensor: Any, ours: np.ndarray, matrix_type: gguf.GGMLQuantizationType) -> None:
    """A GGUF tensor holds ``ours``: vectors and position embeddings exactly in f32, matrices in
    ``matrix_type`` (exactly for f32 and f16, to q8_0's rounding otherwise)."""
    stored = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(ours.shape)
    assert_stored_values(tensor, stored, ours, matrix_type)


def assert_stored_values(
    tensor: Any, stored: np.ndarray, ours: np.ndarray, matrix_type: gguf.GGMLQuantizationType
) -> None:
    if ours.ndim == 1 or tensor.name == "position_embd.weight":
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


def assert_gpt2_tokenizer(reader: gguf.GGUFReader, vocab_size: int = 50257) -> None:
    vocab, merges = gpt2_vocab_and_merges(vocab_size)
    eot = vocab_size - 1
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == vocab_size and all(vocab[token] == i for i, token in enumerate(tokens))
    assert field(reader, "tokenizer.ggml.merges") == [f"{a} {b}" for a, b in merges]
    assert len(merges) == vocab_size - 257
    token_types = field(reader, "tokenizer.ggml.token_type")
    assert token_types[eot] == gguf.TokenType.CONTROL
    assert set(token_types[:eot]) == {gguf.TokenType.NORMAL}
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.bos_token_id") == eot
    assert field(reader, "tokenizer.ggml.eos_token_id") == eot
    assert field(reader, "tokenizer.ggml.add_bos_token") is False


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
    assert field(reader, "general.file_type") == FILE_TYPES[dtype]

    assert_gpt2_tokenizer(reader)

    expected = expected_gguf_tensors(config)
    assert sorted(tensor.name for tensor in reader.tensors) == sorted(expected)
    matrix_type = gguf.GGMLQuantizationType[dtype.upper()]
    for tensor in reader.tensors:
        our_name, shape = expected[tensor.name]
        assert tuple(int(n) for n in tensor.shape) == shape, tensor.name
        assert_stored(tensor, our_parameter(gguf_model, our_name), matrix_type)


def expected_llama_gguf_tensors(model: GPT) -> dict[str, tuple[np.ndarray, tuple[int, ...]]]:
    """llama.cpp's llama / qwen3 tensors: name → (our values, shape in ggml order {ne0, ne1}),
    q and k in our (Hugging Face's) row order. Only the real tokens' rows; no
    ``output.weight`` for a tied model; biases only for a model that has them."""
    config = model.config
    n, ff, vocab = config.n_embd, config.mlp_hidden, config.vocab_size

    def values(tensor: torch.Tensor) -> np.ndarray:
        return tensor.detach().float().numpy()

    tensors = {
        "token_embd.weight": (values(model.transformer.wte.weight[:vocab]), (n, vocab)),
        "output_norm.weight": (values(model.transformer.ln_f.weight), (n,)),
    }
    if not config.tie_embeddings:
        tensors["output.weight"] = (values(model.lm_head.weight[:vocab]), (n, vocab))
    for i, block in enumerate(model.transformer.h):
        attn, mlp = block.attn, block.mlp
        linears = [
            ("attn_q", attn.c_attn, slice(0, n), n),
            ("attn_k", attn.c_attn, slice(n, 2 * n), n),
            ("attn_v", attn.c_attn, slice(2 * n, 3 * n), n),
            ("attn_output", attn.c_proj, slice(None), n),
            ("ffn_gate", mlp.c_fc, slice(0, ff), n),
            ("ffn_up", mlp.c_fc, slice(ff, 2 * ff), n),
            ("ffn_down", mlp.c_proj, slice(None), ff),
        ]
        for name, linear, rows, inputs in linears:
            weight = values(linear.weight[rows])
            tensors[f"blk.{i}.{name}.weight"] = (weight, (inputs, weight.shape[0]))
            if config.bias:
                tensors[f"blk.{i}.{name}.bias"] = (values(linear.bias[rows]), (weight.shape[0],))
        tensors[f"blk.{i}.attn_norm.weight"] = (values(block.ln_1.weight), (n,))
        tensors[f"blk.{i}.ffn_norm.weight"] = (values(block.ln_2.weight), (n,))
        if config.qk_norm:
            head_dim = (config.head_dim,)
            tensors[f"blk.{i}.attn_q_norm.weight"] = (values(attn.q_norm.weight), head_dim)
            tensors[f"blk.{i}.attn_k_norm.weight"] = (values(attn.k_norm.weight), head_dim)
    return tensors


def interleaved_to_rotate_half(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's permutation of q/k rows: within each head, stored row 2i is our row i
    and stored row 2i + 1 our row i + head_dim/2."""
    head_dim = rows.shape[0] // n_head
    heads = rows.reshape(n_head, head_dim // 2, 2, *rows.shape[1:])
    return heads.swapaxes(1, 2).reshape(rows.shape)


@pytest.mark.parametrize(
    ("arch", "dtype"),
    # Each type once (the storing code is shared); qwen3 differs in names and norms only.
    [*(("llama", dtype) for dtype in GGUF_TYPES), ("qwen3", "f32"), ("llama-8k", "f32")],
)
def test_gguf_llama_style_file(
    arch: str, dtype: str, gguf_exports: dict[str, tuple[GPT, dict[str, Path]]]
) -> None:
    model, files = gguf_exports[arch]
    arch = arch.removesuffix("-8k")  # GPT-2's first merges: the llama architecture still
    config = model.config
    reader = gguf.GGUFReader(files[dtype])

    assert field(reader, "general.architecture") == arch
    assert field(reader, f"{arch}.context_length") == config.block_size
    assert field(reader, f"{arch}.embedding_length") == config.n_embd
    assert field(reader, f"{arch}.feed_forward_length") == config.mlp_hidden
    assert field(reader, f"{arch}.block_count") == config.n_layer
    assert field(reader, f"{arch}.attention.head_count") == config.n_head
    assert field(reader, f"{arch}.attention.head_count_kv") == config.n_head
    assert field(reader, f"{arch}.attention.key_length") == config.head_dim
    assert field(reader, f"{arch}.attention.value_length") == config.head_dim
    assert field(reader, f"{arch}.rope.dimension_count") == config.head_dim
    assert field(reader, f"{arch}.rope.freq_base") == 10000.0
    assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert field(reader, f"{arch}.vocab_size") == config.vocab_size
    assert field(reader, "general.file_type") == FILE_TYPES[dtype]
    if dtype == "f32":  # the tokenizer is written whatever the type (its checks are slow)
        assert_gpt2_tokenizer(reader, config.vocab_size)
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"

    expected = expected_llama_gguf_tensors(model)
    assert sorted(tensor.name for tensor in reader.tensors) == sorted(expected)
    matrix_type = gguf.GGMLQuantizationType[dtype.upper()]
    for tensor in reader.tensors:
        ours, shape = expected[tensor.name]
        assert tuple(int(n) for n in tensor.shape) == shape, tensor.name
        stored = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(ours.shape)
        if arch == "llama" and tensor.name.split(".")[-2] in ("attn_q", "attn_k"):
            # Permuted for llama.cpp's interleaved rotary (qwen3's NEOX rotary needs none).
            assert not np.array_equal(stored, ours), tensor.name
            stored = interleaved_to_rotate_half(stored, config.n_head)
        assert_stored_values(tensor, stored, ours, matrix_type)
    if arch == "llama" and dtype == "f32" and config.bias:  # the check reads the biases
        assert_llama_cpp_rotary_gives_our_scores(model, reader)


def assert_llama_cpp_rotary_gives_our_scores(model: GPT, reader: gguf.GGUFReader) -> None:
    """One attention layer's scores from an f32 llama file's q and k as llama.cpp computes them
    (rotary on adjacent pairs of dimensions, its "normal" mode) equal ours (rotate half)."""
    config = model.config
    seq, heads, head_dim, n = 12, config.n_head, config.head_dim, config.n_embd
    stored = {tensor.name: np.asarray(tensor.data, dtype=np.float64) for tensor in reader.tensors}
    x = np.random.default_rng(0).standard_normal((seq, n))

    def interleaved_rotary(name: str) -> np.ndarray:
        projected = x @ stored[f"blk.0.{name}.weight"].T + stored[f"blk.0.{name}.bias"]
        pairs = projected.reshape(seq, heads, head_dim // 2, 2)
        frequencies = 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)
        angles = np.arange(seq)[:, None, None] * frequencies[None, None, :]
        even, odd = pairs[..., 0], pairs[..., 1]
        cos, sin = np.cos(angles), np.sin(angles)
        return np.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1).reshape(
            seq, heads, head_dim
        )

    theirs = np.einsum("thd,uhd->htu", interleaved_rotary("attn_q"), interleaved_rotary("attn_k"))

    with torch.no_grad():
        qkv = model.transformer.h[0].attn.c_attn(torch.from_numpy(x).float())
        q, k, _ = qkv.view(seq, 3, heads, head_dim).permute(1, 2, 0, 3)
        tables = rotary_tables(torch.arange(seq), head_dim, torch.float32)
        ours = apply_rotary(q[None], *tables)[0] @ apply_rotary(k[None], *tables)[0].transpose(1, 2)
    ours = ours.numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4 * np.abs(ours).max())


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
@pytest.mark.parametrize("arch", GGUF_CONFIGS)
def test_llama_cpp_logits_match_ours(
    arch: str,
    dtype: str,
    tolerance: float,
    gguf_exports: dict[str, tuple[GPT, dict[str, Path]]],
) -> None:
    model, files = gguf_exports[arch]
    generator = torch.Generator().manual_seed(0)
    vocab_size = model.config.vocab_size
    ids = torch.randint(0, vocab_size, (model.config.block_size,), generator=generator).tolist()
    theirs = llama_cpp_logits(files[dtype], ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].numpy()
    error = np.abs(theirs - ours).max() / np.abs(ours).max()
    assert error < tolerance, f"max |logit difference| / max |logit| = {error:.2e}"


@pytest.mark.parametrize("arch", GGUF_CONFIGS)
def test_llama_cpp_greedy_tokens_match_ours(
    arch: str, gguf_exports: dict[str, tuple[GPT, dict[str, Path]]]
) -> None:
    model, files = gguf_exports[arch]
    prompt = "Once upon a time"
    tokenizer = get_tokenizer(model.config.vocab_size)
    ids = tokenizer.encode(prompt)
    theirs: list[int] = []
    while len(theirs) < 6 and tokenizer.eot_id not in theirs:
        theirs.append(int(llama_cpp_logits(files["f32"], ids + theirs)[-1].argmax()))
    assert theirs == greedy_tokens(model, prompt, 6)


@pytest.mark.parametrize("arch", GGUF_CONFIGS)
def test_llama_cpp_tokenizer_matches_ours(
    arch: str, gguf_exports: dict[str, tuple[GPT, dict[str, Path]]]
) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    model, files = gguf_exports[arch]
    llama = llama_cpp.Llama(str(files["f32"]), vocab_only=True, verbose=False)
    ours = get_tokenizer(model.config.vocab_size)
    for text in TEXTS:
        ids = llama.tokenize(text.encode(), add_bos=False, special=True)
        assert ids == ours.encode_with_special(text), text
        assert llama.detokenize(ids, special=True) == text.encode()

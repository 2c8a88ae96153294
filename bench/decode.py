"""Decode speed: our KV-cached generation (eager, and with the compiled decode step) against our
uncached model, Hugging Face's ``generate`` and, where llama-cpp-python is installed, llama.cpp
(our GGUF export as f32 and q8_0) on identical weights, in one run, with ratios.

    python bench/decode.py                      # the seed preset at block 512, CPU, fp32
    python bench/decode.py --preset small       # the default preset
    python bench/decode.py --device cuda --dtype bfloat16
    python bench/decode.py --checkpoint checkpoints/run   # trained weights (int8 loss cost)

200 new tokens after a 10-token prompt, greedy and sampled (temperature 0.8 after top-k 40,
top-p 0.95 and min-p 0.05, llama-server's default chain, a distinct seed per sequence); medians
over --repeats runs, the contenders interleaved so machine noise hits them alike. Not a test:
speed is measured here, never asserted in the test suite. llama.cpp runs on the CPU with
torch's thread count, a window of the block size per sequence, a sampler chain per sequence as
llama-server keeps one per slot, and decodes all the new tokens whatever they are (end-of-text
included); the table sets our fp32 path against its f32 file, our int8 path against its q8_0.
Hugging Face runs greedy only: its sampling draws from one generator for the whole batch.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, TracebackType

import numpy as np
import torch

from model import GPT, preset
from model.checkpoint import load_checkpoint
from model.export.gguf import export_gguf
from model.export.hf import export_hf
from model.generate import BatchGenerator
from model.sampling import SamplingParams

VALID_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories-valid.txt"


# The sampled workload: llama-server's default filters, spelled out for both sides.
TEMPERATURE, TOP_K, TOP_P, MIN_P = 0.8, 40, 0.95, 0.05
MODES = ("greedy", "sampled")
COMPILE_TIMEOUT_S = 600


def our_params(mode: str, new_tokens: int, seed: int) -> SamplingParams:
    if mode == "greedy":
        return SamplingParams(max_new_tokens=new_tokens, temperature=0)
    return SamplingParams(
        max_new_tokens=new_tokens,
        temperature=TEMPERATURE,
        top_k=TOP_K,
        top_p=TOP_P,
        min_p=MIN_P,
        seed=seed,
    )


def our_continuations(
    generator: BatchGenerator, prompts: list[list[int]], new_tokens: int, mode: str = "greedy"
) -> list[list[int]]:
    """The continuations of ``prompts``, decoded together (sequence i sampled with seed i)."""
    sequences = [
        generator.add(prompt, our_params(mode, new_tokens, seed))
        for seed, prompt in enumerate(prompts)
    ]
    while generator.rows:
        generator.step()
    return [s.generated for s in sequences]


def our_decode(
    generator: BatchGenerator, prompts: list[list[int]], new_tokens: int, mode: str
) -> int:
    return sum(map(len, our_continuations(generator, prompts, new_tokens, mode)))


def hf_decode(hf_model, prompts: list[list[int]], new_tokens: int) -> int:
    idx = torch.tensor(prompts, device=hf_model.device)
    out = hf_model.generate(
        idx,
        attention_mask=torch.ones_like(idx),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=50256,
        use_cache=True,
    )
    return (out.shape[1] - idx.shape[1]) * idx.shape[0]


class LlamaCppDecoder:
    """Greedy or sampled decoding of a GGUF file in llama.cpp, through the C API of its Python
    binding: up to ``sequences`` independent sequences of up to ``context`` tokens each, all
    advanced by one ``llama_decode`` per token, as our ``BatchGenerator`` does; end-of-text never
    stops them.
    """

    def __init__(
        self, llama_cpp: ModuleType, path: Path, sequences: int, context: int, threads: int
    ) -> None:
        self._lib = llama_cpp
        model_params = llama_cpp.llama_model_default_params()
        # As in tests/test_export.py: the high-level Llama class cannot turn weight repacking
        # off, and its AMX repacking crashes on q8_0 models on AMX CPUs.
        model_params.use_extra_bufts = False
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = llama_cpp.llama_context_default_params()
        params.n_seq_max = sequences
        # Each sequence gets a window of its own (the cache is not unified): n_ctx / n_seq_max.
        params.n_ctx = params.n_batch = sequences * context
        params.n_threads = params.n_threads_batch = threads
        self._context = llama_cpp.llama_init_from_model(self._model, params)
        if not self._context:
            llama_cpp.llama_model_free(self._model)
            raise RuntimeError(f"llama.cpp could not make a context for {path}")
        self._batch = llama_cpp.llama_batch_init(sequences * context, 0, 1)
        vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._vocab_size = llama_cpp.llama_vocab_n_tokens(vocab)

    def continuations(
        self, prompts: list[list[int]], new_tokens: int, mode: str = "greedy"
    ) -> list[list[int]]:
        """``new_tokens`` tokens after each prompt; all prompts are prefilled at once."""
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._context), True)
        sampled = mode != "greedy"
        samplers = [self._sampler_chain(seed) for seed in range(len(prompts))] if sampled else []
        pick = functools.partial(self._sample, samplers) if sampled else self._argmax
        tokens = [list(prompt) for prompt in prompts]
        batch = [
            (token, position, seq, position == len(prompt) - 1)
            for seq, prompt in enumerate(prompts)
            for position, token in enumerate(prompt)
        ]
        try:
            for _ in range(new_tokens):
                outputs = self._run(batch)
                for sequence, token in zip(tokens, pick(outputs), strict=True):
                    sequence.append(token)
                batch = [(s[-1], len(s) - 1, seq, True) for seq, s in enumerate(tokens)]
        finally:
            for sampler in samplers:
                self._lib.llama_sampler_free(sampler)
        return [s[len(prompt) :] for s, prompt in zip(tokens, prompts, strict=True)]

    def decode(self, prompts: list[list[int]], new_tokens: int, mode: str) -> int:
        return sum(map(len, self.continuations(prompts, new_tokens, mode)))

    def _sampler_chain(self, seed: int):
        """llama-server's default order: top-k, top-p, min-p, temperature, then the draw."""
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        for sampler in (
            lib.llama_sampler_init_top_k(TOP_K),
            lib.llama_sampler_init_top_p(TOP_P, 1),
            lib.llama_sampler_init_min_p(MIN_P, 1),
            lib.llama_sampler_init_temp(TEMPERATURE),
            lib.llama_sampler_init_dist(seed),
        ):
            lib.llama_sampler_chain_add(chain, sampler)
        return chain

    def _sample(self, samplers: list, outputs: list[int]) -> list[int]:
        return [
            self._lib.llama_sampler_sample(sampler, self._context, index)
            for index, sampler in zip(outputs, samplers, strict=True)
        ]

    def _argmax(self, outputs: list[int]) -> list[int]:
        logits = self._lib.llama_get_logits(self._context)  # outputs in batch order
        return np.ctypeslib.as_array(logits, (len(outputs), self._vocab_size)).argmax(1).tolist()

    def _run(self, entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """Run (token, position, sequence, wants logits) entries; the batch indices of the
        entries that want logits (one per sequence, in sequence order)."""
        batch = self._batch
        batch.n_tokens = len(entries)
        for i, (token, position, seq, wants_logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = wants_logits
        if (status := self._lib.llama_decode(self._context, batch)) != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")
        return [i for i, (*_, wants_logits) in enumerate(entries) if wants_logits]

    def close(self) -> None:
        self._lib.llama_batch_free(self._batch)
        self._lib.llama_free(self._context)
        self._lib.llama_model_free(self._model)

    def __enter__(self) -> LlamaCppDecoder:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def import_llama_cpp() -> ModuleType | None:
    """llama-cpp-python's low-level binding, quiet but for errors; None where not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its log callback's level
    return llama_cpp


def leading_matches(ours: list[int], theirs: list[int]) -> int:
    """How many tokens two continuations share before their first difference."""
    for i, (our_token, their_token) in enumerate(zip(ours, theirs, strict=False)):
        if our_token != their_token:
            return i
    return min(len(ours), len(theirs))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(run: Callable[[], int], device: str) -> float:
    """Tokens per second of one run."""
    synchronize(device)
    started = time.perf_counter()
    tokens = run()
    synchronize(device)
    return tokens / (time.perf_counter() - started)


def validation_loss(
    model: torch.nn.Module, vocab_size: int, block: int, batches: int = 8
) -> float | None:
    """Mean next-token loss on the first windows of the TinyStories validation excerpt, in the
    model's vocabulary."""
    if not VALID_FILE.exists():
        return None
    from model.tokenizer import get_tokenizer

    tokenizer = get_tokenizer(vocab_size)
    ids = tokenizer.encode(VALID_FILE.read_text(encoding="utf-8")[:400_000])
    data = torch.tensor(ids[: batches * 4 * (block + 1)]).view(batches, 4, block + 1)
    losses = []
    with torch.inference_mode():
        for batch in data:
            losses.append(model(batch[:, :-1], batch[:, 1:])[1].item())
    return statistics.mean(losses)


def llama_cpp_decoders(
    model: GPT, batches: list[int], window_needed: int, device: str, stack: contextlib.ExitStack
) -> tuple[dict[tuple[str, int], LlamaCppDecoder], str]:
    """llama.cpp decoders of ``model`` exported as f32 and q8_0, keyed by (file type, batch), closed
    by ``stack``, and a line saying what they are; none, and why, where llama.cpp cannot run."""
    llama_cpp = import_llama_cpp()
    block = model.config.block_size
    if llama_cpp is None:
        return {}, "llama.cpp skipped: llama-cpp-python is not installed"
    if device != "cpu":
        return {}, "llama.cpp skipped: it is measured on the CPU only"
    if window_needed > block:
        return {}, f"llama.cpp skipped: prompt + new tokens overflow the block ({block})"
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    threads = torch.get_num_threads()
    decoders: dict[tuple[str, int], LlamaCppDecoder] = {}
    for file_type in ("f32", "q8_0"):
        path = folder / f"model-{file_type}.gguf"
        export_gguf(model, path, file_type)
        for batch in batches:
            decoder = LlamaCppDecoder(llama_cpp, path, batch, block, threads)
            decoders[file_type, batch] = stack.enter_context(decoder)
    return decoders, (
        f"llama.cpp: llama-cpp-python {llama_cpp.__version__}, {threads} threads, "
        f"window {block} per sequence, end-of-text ignored"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="trained weights instead of random ones")
    parser.add_argument("--preset", default="seed", help="the network, with random weights")
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16, help="the aggregate-throughput batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--skip-uncached", action="store_true", help="skip the slowest contender")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        bench(args, stack)


def bench(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if args.checkpoint:
        model, _ = load_checkpoint(args.checkpoint)
    else:
        model = GPT(preset(args.preset, block_size=args.block_size)).eval()
    if args.prompt_tokens + args.new_tokens > model.config.block_size:
        # Hugging Face's GPT-2 cannot go past its position table (ours slides its window).
        raise SystemExit(
            f"prompt + new tokens ({args.prompt_tokens + args.new_tokens}) exceed the model's "
            f"block_size ({model.config.block_size}): lower --new-tokens"
        )
    with tempfile.TemporaryDirectory() as folder:
        export_hf(model, Path(folder))
        # GPT2LMHeadModel, or LlamaForCausalLM for the Llama-style presets (`small`).
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    batches = sorted({1, args.batch})
    llama_decoders, llama_line = llama_cpp_decoders(
        model, batches, args.prompt_tokens + args.new_tokens, args.device, stack
    )
    dtype = getattr(torch, args.dtype)
    model = model.to(args.device, dtype)
    hf_model = hf_model.to(args.device, dtype)

    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(
        0, 50000, (args.batch, args.prompt_tokens), generator=generator
    ).tolist()
    new = args.new_tokens

    batch_n = args.batch
    ours = {
        ("ours", 1): BatchGenerator(model, max_batch=1),
        ("ours", batch_n): BatchGenerator(model, max_batch=batch_n),
        # What `slm serve` runs by default (COMPILE_DECODE): timed once every bucket is compiled.
        ("ours compiled", 1): BatchGenerator(model, max_batch=1, decode_step="compiled"),
        ("ours compiled", batch_n): BatchGenerator(
            model, max_batch=batch_n, decode_step="compiled"
        ),
    }
    for kind, batch in [("ours compiled", 1), ("ours compiled", batch_n)]:
        if not ours[kind, batch].compiled_ready(COMPILE_TIMEOUT_S):
            sys.exit(f"the decode step for batch {batch} did not compile in {COMPILE_TIMEOUT_S} s")
    int8_model = None
    if args.device == "cpu" and args.dtype == "float32":
        ours["ours int8", 1] = BatchGenerator(model, max_batch=1, quantization="int8")
        ours["ours int8", batch_n] = BatchGenerator(model, max_batch=batch_n, quantization="int8")
        int8_model = ours["ours int8", 1].model
    contenders: dict[str, Callable[[], int]] = {}
    llama_peers: dict[str, tuple[str, str]] = {}  # ours → (the llama.cpp contender, file type)
    for mode in MODES:
        for (kind, batch), generator in ours.items():
            name = f"{kind}, batch {batch}, {mode}"
            contenders[name] = functools.partial(our_decode, generator, prompts[:batch], new, mode)
            file_type = "q8_0" if kind == "ours int8" else "f32"
            if (file_type, batch) in llama_decoders:
                llama_peers[name] = (f"llama.cpp {file_type}, batch {batch}, {mode}", file_type)
        for (file_type, batch), decoder in llama_decoders.items():
            contenders[f"llama.cpp {file_type}, batch {batch}, {mode}"] = functools.partial(
                decoder.decode, prompts[:batch], new, mode
            )
    for batch in batches:
        contenders[f"HF generate, batch {batch}, greedy"] = functools.partial(
            hf_decode, hf_model, prompts[:batch], new
        )
    if not args.skip_uncached:
        uncached = BatchGenerator(model, max_batch=1, use_cache=False)
        contenders["ours, no cache, batch 1, greedy"] = functools.partial(
            our_decode, uncached, prompts[:1], new, "greedy"
        )

    for run in contenders.values():  # warm-up: allocator, kernels, caches
        run()
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, run in contenders.items():
            rates[name].append(timed(run, args.device))
    medians = {name: statistics.median(values) for name, values in rates.items()}

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}")
    print(
        f"device {args.device}, {args.dtype}, block {model.config.block_size}, "
        f"{model.num_parameters() / 1e6:.1f}M parameters, prompt {args.prompt_tokens}, "
        f"{new} new tokens, median of {args.repeats}; sampled = temperature {TEMPERATURE}, "
        f"top-k {TOP_K}, top-p {TOP_P}, min-p {MIN_P}, seed per sequence"
    )
    print(llama_line)
    llama_column = f"  {'vs llama.cpp':>12}" if llama_peers else ""
    print(f"{'contender':44} {'tok/s':>9} {'vs HF':>7}{llama_column}")
    for name, rate in medians.items():
        batch = int(name.split("batch ")[1].split(",")[0])
        line = f"{name:44} {rate:9.1f}"
        hf_rate = medians[f"HF generate, batch {batch}, greedy"]
        line += f" {rate / hf_rate:6.2f}x" if name.endswith("greedy") else " " * 8
        if name in llama_peers:
            llama_name, llama_type = llama_peers[name]
            line += f"  {rate / medians[llama_name]:6.2f}x {llama_type}"
        print(line)
    figures: dict[str, object] = {"tokens_per_second": medians, "runs": rates}
    if llama_decoders:  # a sanity check: the same weights should mostly pick the same tokens
        agreement = {
            f"{file_type}, batch {batch}": min(
                map(
                    leading_matches,
                    our_continuations(ours["ours", batch], prompts[:batch], new),
                    decoder.continuations(prompts[:batch], new),
                )
            )
            for (file_type, batch), decoder in llama_decoders.items()
        }
        print(
            f"greedy tokens equal to ours before the first difference (worst sequence, of {new}): "
            + "; ".join(f"{name}: {n}" for name, n in agreement.items())
        )
        figures["llama_cpp_leading_matches"] = agreement
    if int8_model is not None:
        vocab_size, block = model.config.vocab_size, min(256, model.config.block_size)
        fp32_loss = validation_loss(model, vocab_size, block)
        int8_loss = validation_loss(int8_model, vocab_size, block)
        if fp32_loss is not None and int8_loss is not None:
            print(
                f"validation loss: fp32 {fp32_loss:.4f}, int8 {int8_loss:.4f} "
                f"(cost {int8_loss - fp32_loss:+.4f})"
            )
            figures["validation_loss"] = {"fp32": fp32_loss, "int8": int8_loss}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

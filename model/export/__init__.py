"""Exports of a trained GPT to other runtimes, in the architecture that computes what its
config's network does (``model.export.weights.export_architecture``): GPT-2's own network as
GPT-2; rotary positions + RMSNorm + SwiGLU as Llama, and with QK-norm as Qwen3. Other option
combinations have no such architecture and are refused with a ValueError naming the option.

- ``model.export.hf.export_hf``: a Hugging Face ``GPT2LMHeadModel``, ``LlamaForCausalLM`` or
  ``Qwen3ForCausalLM`` folder, GPT-2's tokenizer included.
- ``model.export.gguf.export_gguf``: a GGUF file of llama.cpp's ``gpt2``, ``llama`` or ``qwen3``
  architecture for llama.cpp and Ollama (needs ``gguf``, the ``export`` extra, which is why
  nothing is imported here).
"""

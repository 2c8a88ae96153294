"""Exports of a trained GPT to other runtimes.

- ``model.export.hf.export_hf``: a Hugging Face ``GPT2LMHeadModel`` folder.
- ``model.export.gguf.export_gguf``: a GGUF file for llama.cpp and Ollama (needs ``gguf``, the
  ``export`` extra, which is why nothing is imported here).
"""

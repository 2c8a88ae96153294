"""The shared model package: configuration, network, KV-cached generation, tokenizer, checkpoints.

Pure PyTorch: nothing here knows about HTTP or Redis.
"""

from model.config import PRESETS, GPTConfig, preset
from model.gpt import GPT

__all__ = ["GPT", "PRESETS", "GPTConfig", "preset"]

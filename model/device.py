"""Which device "auto" means here: the GPU when PyTorch sees one, else the CPU."""

from __future__ import annotations

import torch


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name

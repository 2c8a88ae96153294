"""Which device a device setting means here ("auto": the GPU when PyTorch sees one, else the
CPU), for the trainer, the service and the CLI alike."""

from __future__ import annotations

import torch


def pick_device(name: str, index: int = 0) -> torch.device:
    """``name`` as a device: ``auto`` is GPU ``index`` (a DDP process's local rank) when PyTorch
    sees a GPU, else the CPU. Raises ValueError for a GPU PyTorch does not see."""
    if name == "auto":
        return torch.device(f"cuda:{index}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but PyTorch sees no CUDA GPU")
    return torch.device(name)

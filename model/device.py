"""Which device a device setting means here ("auto": the GPU when PyTorch sees one, else the
CPU), for the trainer, the service and the CLI alike; and how many threads torch runs on."""

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


def use_torch_threads(count: int) -> int:
    """Set the calling thread's torch (OpenMP) thread count; returns the count it had.

    Two traps, both measured (BENCHMARKS.md): torch sets a thread's count lazily, at its first
    parallel op, to the value any thread set last, so a count set before that op is undone
    (the decode thread decoded on one core after a checkpoint loaded on another thread); hence
    the ``get_num_threads`` first. And a thread that runs parallel ops keeps OpenMP threads of
    its own: once the process holds more of them than cores, libgomp stops them spinning between
    ops, and every decode step waits for sleeping threads to wake (6.8 → 9.9 ms at batch 1).
    So the service's decode thread takes every core and any other thread that runs torch
    (loading a checkpoint, building a lane) takes one.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    return previous

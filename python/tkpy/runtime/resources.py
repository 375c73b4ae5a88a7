"""Where a model runs and whether it fits there: the ``device`` argument, checked before anything
is allocated, and the bytes a model needs against the memory that device has."""

from __future__ import annotations

import os

import torch

from .. import cuda_compiled
from ..errors import ArgumentError

__all__ = ["check_fits", "memory_bytes", "resolve_device"]


def resolve_device(device) -> torch.device:
    """``device`` as a torch.device: CUDA when available if None; refused unless it is the CPU or a
    CUDA device that exists."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ArgumentError(f"LLM: device {device!r} is not a device: {e}") from None
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise ArgumentError(f"LLM: device {device} does not exist (the CPU is 'cpu')")
        return torch.device("cpu")
    if device.type != "cuda":
        raise ArgumentError(f"LLM: device must be the CPU or a CUDA device, got {device}")
    if not cuda_compiled():
        raise ArgumentError(f"LLM: device {device}: this tkpy build has no CUDA kernels")
    if not torch.cuda.is_available():
        raise ArgumentError(f"LLM: device {device}: no CUDA device is available")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ArgumentError(f"LLM: device {device} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return device


def memory_bytes(device: torch.device) -> int:
    """All the memory of ``device``: what can never be exceeded, whoever else uses some of it."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def check_fits(device: torch.device, kv_bytes: int, model_bytes: int, what: str) -> None:
    """Refuse, naming ``what`` sized the KV cache, when the KV cache and the model together need more
    memory than ``device`` has."""
    capacity = memory_bytes(device)
    if kv_bytes + model_bytes > capacity:
        raise ArgumentError(
            f"LLM: {what} need {kv_bytes} bytes ({_gib(kv_bytes)}) of KV cache, and the model {_gib(model_bytes)} "
            f"more, but {device} has {_gib(capacity)} of memory"
        )

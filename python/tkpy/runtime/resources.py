"""Where a model runs and what it may take there: the ``device`` argument, checked before anything
is allocated, and the bytes of KV cache that the model leaves room for."""

from __future__ import annotations

import os
from numbers import Integral
from pathlib import Path

import torch

from .. import cuda_compiled
from ..errors import ArgumentError

__all__ = ["check_kv_cache_memory", "free_memory_bytes", "kv_cache_budget", "memory_bytes", "resolve_device"]

# The default KV cache takes this share of the memory left free once the weights are in: the rest
# is for the allocator's slack, CUDA graphs and other processes.
DEFAULT_SHARE = {"cuda": 0.9, "cpu": 0.5}


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


def free_memory_bytes(device: torch.device) -> int:
    """Memory ``device`` has free now: CUDA's free memory, or the host's available memory (Linux's
    MemAvailable, else free pages)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def check_kv_cache_memory(kv_cache_memory) -> bool:
    """Refuse a ``kv_cache_memory`` that is neither bytes (an int >= 1), a share (a float in
    (0, 1]) nor None; True for bytes."""
    is_bytes = isinstance(kv_cache_memory, Integral) and not isinstance(kv_cache_memory, bool)
    is_share = isinstance(kv_cache_memory, float) and 0 < kv_cache_memory <= 1
    if not (kv_cache_memory is None or is_share or (is_bytes and kv_cache_memory >= 1)):
        raise ArgumentError(f"LLM: kv_cache_memory must be bytes (an int >= 1), a share of the free memory (a float "
                            f"in (0, 1]) or None, got {kv_cache_memory!r}")
    return is_bytes


def kv_cache_budget(device: torch.device, kv_cache_memory, model_bytes: int, activation_bytes: int) -> int:
    """Bytes the KV cache may take on ``device``.

    ``kv_cache_memory`` is bytes (an int), a share of the memory free now (a float in (0, 1]), or
    None for :data:`DEFAULT_SHARE`. A share is of what stays free once the model (weights and
    tables, ``model_bytes``) and a step's activations (``activation_bytes``, an estimate) have
    their room. Bytes are refused when they, with the model, exceed all of the device's memory.
    """
    if not check_kv_cache_memory(kv_cache_memory):
        share = DEFAULT_SHARE[device.type] if kv_cache_memory is None else kv_cache_memory
        free = free_memory_bytes(device)
        if free <= model_bytes + activation_bytes:
            raise ArgumentError(f"LLM: {device} has {_gib(free)} free, and the model ({_gib(model_bytes)}) and a step's "
                                f"activations (about {_gib(activation_bytes)}, less with a smaller max_seq_len) need "
                                f"more: no room is left for a KV cache")
        return int(share * (free - model_bytes - activation_bytes))
    capacity = memory_bytes(device)
    if kv_cache_memory + model_bytes > capacity:
        raise ArgumentError(f"LLM: kv_cache_memory={kv_cache_memory} bytes ({_gib(kv_cache_memory)}) and the model "
                            f"({_gib(model_bytes)}) need more than the {_gib(capacity)} of memory {device} has")
    return int(kv_cache_memory)

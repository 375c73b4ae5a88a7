"""Timers, rotating input copies and the copy-bandwidth yardstick."""

from __future__ import annotations

import itertools
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, Union

import torch

# The working set of the rotating input copies should be this many times the last-level cache.
_CACHE_OVERFLOW = 4
# There is no portable way to ask for a CPU's last-level cache; this is a typical server L3.
_CPU_LLC_BYTES = 32 << 20
_FALLBACK_L2_BYTES = 50 << 20  # H100
_COPY_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}


@dataclass(frozen=True)
class Timing:
    """Per-call times of one implementation.

    Attributes
    ----------
    samples_s : tuple of float
        One duration per timed call, in seconds.
    method : str
        ``"cuda-events"`` or ``"perf_counter"``.
    """

    samples_s: tuple[float, ...]
    method: str

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)


def time_cuda_or_cpu(
    fn: Callable[..., Any],
    arg_sets: Sequence[tuple],
    device: Union[str, torch.device],
    *,
    warmup: int,
    reps: int,
) -> Timing:
    """Time ``fn(*args)``, taking ``args`` from ``arg_sets`` round robin.

    Parameters
    ----------
    fn : callable
        The call to time. Its result is discarded.
    arg_sets : sequence of tuple
        Argument tuples, typically copies of the same inputs in different buffers.
    device : str or torch.device
        CUDA: each call is bracketed by CUDA events on the current stream. CPU: by
        ``time.perf_counter``.
    warmup, reps : int
        Untimed calls first, then timed calls.

    Returns
    -------
    Timing
    """
    if not arg_sets:
        raise ValueError("time_cuda_or_cpu: arg_sets is empty")
    if reps < 1:
        raise ValueError(f"time_cuda_or_cpu: reps must be >= 1, got {reps}")
    device = torch.device(device)
    rotation = itertools.cycle(arg_sets)
    for _ in range(warmup):
        fn(*next(rotation))
    if device.type == "cuda":
        with torch.cuda.device(device):
            return _time_cuda(fn, rotation, reps)
    return _time_cpu(fn, rotation, reps)


def _time_cuda(fn: Callable[..., Any], rotation: Iterator[tuple], reps: int) -> Timing:
    # Events are read only after the last call, so timing never adds a host sync between calls.
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        args = next(rotation)
        start.record()
        fn(*args)
        end.record()
    torch.cuda.synchronize()
    return Timing(tuple(start.elapsed_time(end) * 1e-3 for start, end in events), "cuda-events")


def _time_cpu(fn: Callable[..., Any], rotation: Iterator[tuple], reps: int) -> Timing:
    samples = []
    for _ in range(reps):
        args = next(rotation)
        start = time.perf_counter()
        fn(*args)
        samples.append(time.perf_counter() - start)
    return Timing(tuple(samples), "perf_counter")


def synchronized(fn: Callable[..., Any], device: Union[str, torch.device]) -> Callable[..., None]:
    """``fn`` followed by a device synchronize, so that a wall-clock timer sees the whole call.

    pytest-benchmark times with the host clock; without the sync it would time the launch only.
    On the CPU ``fn`` is returned unchanged.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return fn

    def run(*args: Any) -> None:
        fn(*args)
        torch.cuda.synchronize(device)

    return run


def rotating_setup(arg_sets: Sequence[tuple]) -> Callable[[], tuple[tuple, dict]]:
    """A ``setup`` for ``benchmark.pedantic`` that hands out ``arg_sets`` round robin."""
    rotation = itertools.cycle(arg_sets)
    return lambda: (next(rotation), {})


def buffer_copies(nbytes_per_copy: int, device: Union[str, torch.device], *, max_copies: int = 16) -> int:
    """How many copies of the inputs to rotate through so that they overflow the last-level cache.

    At least 2, so that no call finds the previous call's output in the cache.
    """
    device = torch.device(device)
    if device.type == "cuda":
        cache = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or _FALLBACK_L2_BYTES
    else:
        cache = _CPU_LLC_BYTES
    wanted = math.ceil(_CACHE_OVERFLOW * cache / max(nbytes_per_copy, 1))
    return max(2, min(max_copies, wanted))


def gbps(nbytes: int, seconds: float) -> float:
    """Bandwidth in GB/s (1e9 bytes per second)."""
    return nbytes / seconds / 1e9


def measure_copy_bandwidth(device: Union[str, torch.device], *, warmup: int, reps: int) -> float:
    """Read + write GB/s of ``Tensor.copy_`` on a buffer far larger than the caches.

    It is the practical ceiling of a memory-bound op on this device, the yardstick for the
    "≥ 85% of HBM bandwidth" target.
    """
    device = torch.device(device)
    elements = _COPY_BYTES[device.type] // 2
    src = torch.randn(elements, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    timing = time_cuda_or_cpu(torch.Tensor.copy_, [(dst, src)], device, warmup=warmup, reps=reps)
    return gbps(2 * src.nbytes, timing.median_s)

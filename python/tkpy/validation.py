"""tkpy's validation policy, on the Python side; the bindings apply the same one (csrc/ops/validate.h).

Shapes, dtypes and devices are checked by the op bindings, once, and by their Meta kernels under
torch.compile. Values that only the host can check (cu_seqlens monotone, page ids inside a pool,
head types, ring slots) are read on the host:

- CPU tensors: always (no sync involved).
- CUDA tensors: only with ``TKPY_CHECK_VALUES=1``, a host sync per call, and never while a CUDA
  graph is being captured or torch.compile traces. By default the kernels guard their own reads
  instead: a bad value gives a wrong result for the rows it touches, never an access outside the
  tensors.

``TKPY_CHECK_VALUES=0`` applies CUDA's default to CPU tensors in Python's checks (the bindings
still check CPU values, which cost nothing): tests/test_no_sync.py runs the public functions that
way on the CPU to prove that none reads a value on the host.
"""

from __future__ import annotations

import math
import numbers
import os

import torch

from .errors import ArgumentError

__all__ = ["positive_as_float32", "values_checked", "window_edges"]


def values_checked(t: torch.Tensor) -> bool:
    """Whether the policy reads ``t``'s values on the host now."""
    mode = os.environ.get("TKPY_CHECK_VALUES")
    if mode == "0" or t.is_meta or torch.compiler.is_compiling():
        return False
    if t.device.type == "cpu":
        return True
    return mode == "1" and not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def positive_as_float32(value) -> bool:
    """Whether a real number (not a bool) is finite and > 0 once rounded to float32, the dtype the
    kernels and the model compute with: 1e-46 is 0 there and 1e39 is inf."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        rounded = torch.tensor(float(value), dtype=torch.float64).float().item()
    except OverflowError:  # an integer beyond any float
        return False
    return 0 < rounded < math.inf


def window_edges(causal: bool, window_size) -> tuple[int, int]:
    """flash-attn's ``(causal, window_size)`` as the ops' ``(window_left, window_right)``: causal is a
    window whose right edge is the diagonal; -1 is unbounded."""
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise ArgumentError(f"window_size must be a pair of ints (left, right), got {window_size!r}") from None
    if left < -1 or right < -1:
        raise ArgumentError(f"window_size entries must be >= -1 (-1 is unbounded), got {window_size!r}")
    return left, 0 if causal else right

"""Matrix multiply on the tk tile library's warp-specialised wgmma pipeline."""

from __future__ import annotations

import torch

from . import _ops

__all__ = ["gemm"]


def gemm(a: torch.Tensor, b: torch.Tensor, trans_b: bool = False) -> torch.Tensor:
    """``a @ b`` (or ``a @ b.T`` with ``trans_b``) with fp32 accumulation.

    Parameters
    ----------
    a : Tensor ``[M, K]``, bf16 or fp16
    b : Tensor ``[K, N]``, or ``[N, K]`` when ``trans_b``; a's dtype and device
        M, N and K must be multiples of 8; each matrix needs a contiguous last dim, a row stride
        that is a multiple of 8 elements and a 16-byte aligned start (TMA's rules).
    trans_b : bool

    Returns
    -------
    Tensor ``[M, N]`` in a's dtype.
    """
    return _ops.call("gemm", a, b, trans_b)

"""Rotary position embeddings, in place on q and k.

Both functions run one fused pass over q and k (a CUDA kernel with 16-byte accesses on the GPU, an
ATen-parallel loop on the CPU) and compute the rotation in fp32 whatever the storage dtype.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _ops

__all__ = ["apply_rope_", "apply_rope_3d_", "as_cos_sin_table"]


def as_cos_sin_table(freqs: torch.Tensor, name: str = "freqs") -> torch.Tensor:
    """View a per-axis table as float32 ``[L, d/2, 2]`` of (cos, sin) pairs.

    Accepts complex ``[L, d/2]`` (``torch.polar`` output, as RIFLEx and Wan build it) or a real
    ``[L, d/2, 2]`` table, and never copies a float32 table.
    """
    if not isinstance(freqs, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(freqs).__name__}")
    if freqs.is_complex():
        if freqs.dtype != torch.complex64:
            freqs = freqs.to(torch.complex64)
        return torch.view_as_real(freqs.resolve_conj())
    return freqs


def apply_rope_(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: Optional[torch.Tensor] = None,
    interleaved: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Rotate ``q`` and ``k`` in place by the angles in ``cos``/``sin``.

    Parameters
    ----------
    q : Tensor ``[B, S, Hq, D]`` or ``[T, Hq, D]``
        bf16, fp16 or fp32; the last dim contiguous, other strides free (views are fine).
    k : Tensor ``[B, S, Hk, D]`` or ``[T, Hk, D]``, or None
        Same dtype, device and token dims as ``q``; any head count.
    cos, sin : Tensor ``[max_pos, R/2]``
        float32 or q's dtype. ``R = 2 · cos.shape[1] <= D`` dims are rotated (partial rotary);
        the rest are left alone.
    positions : int32/int64 Tensor ``[B, S]``, ``[S]`` or ``[T]``, optional
        Row of ``cos``/``sin`` for each token; default ``arange(S)`` for every batch.
        On the CPU an out-of-range position raises; on CUDA (checked without a host sync) it
        turns that token's rotated dims into NaN, so it can never pass as a right answer.
    interleaved : bool
        False: neox style, dim ``i`` pairs with ``i + R/2``. True: GPT-J style, ``2i`` with ``2i+1``.

    Returns
    -------
    (q, k) : the same tensors, rotated.
    """
    _ops.call("apply_rope_", q, k, cos, sin, positions, interleaved)
    return q, k


def apply_rope_3d_(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    grid_thw: Sequence[int],
    freqs_t: torch.Tensor,
    freqs_h: torch.Tensor,
    freqs_w: torch.Tensor,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """3D RoPE for video-DiT tokens laid out in (t, h, w) order, in place.

    No ``[S, D]`` table is built: each token's angles are gathered from the three per-axis tables.

    Parameters
    ----------
    q : Tensor ``[B, S, Hq, D]``, ``S = T·H·W``
        bf16, fp16 or fp32; the last dim contiguous.
    k : Tensor ``[B, S, Hk, D]`` or None
    grid_thw : (T, H, W)
    freqs_t, freqs_h, freqs_w : Tensor
        complex ``[Lt >= T, dt/2]``, ``[Lh >= H, dh/2]``, ``[Lw >= W, dw/2]`` (e.g. from
        :func:`tkpy.riflex.rope_3d_freqs`), or float32 ``[L, d/2, 2]`` (cos, sin) tables.
        Dims ``[0, dt)`` rotate with t, ``[dt, dt+dh)`` with h, ``[dt+dh, dt+dh+dw)`` with w,
        as interleaved pairs (CogVideoX, HunyuanVideo and Wan all use this layout). Dims past
        ``dt+dh+dw <= D`` are left alone.

    Returns
    -------
    (q, k) : the same tensors, rotated.
    """
    grid = [_ops.int_arg(f"apply_rope_3d_: grid_thw[{i}]", x) for i, x in enumerate(grid_thw)]
    _ops.call(
        "apply_rope_3d_",
        q,
        k,
        grid,
        as_cos_sin_table(freqs_t, "freqs_t"),
        as_cos_sin_table(freqs_h, "freqs_h"),
        as_cos_sin_table(freqs_w, "freqs_w"),
    )
    return q, k

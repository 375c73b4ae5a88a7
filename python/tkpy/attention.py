"""Dense attention forward with flash-attn 2's exact signatures, positional order included.

``from tkpy import flash_attn_func, flash_attn_varlen_func`` replaces the flash-attn import. Both
run ``torch.ops.tkpy.attention_forward``: the H100 warp-specialised kernel on CUDA, a tiled
online-softmax implementation on the CPU.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _ops
from .errors import ArgumentError

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]


def _window(causal: bool, window_size) -> tuple[int, int]:
    try:
        left, right = (int(w) for w in window_size)
    except (TypeError, ValueError):
        raise ArgumentError(f"window_size must be a pair of ints (left, right), got {window_size!r}") from None
    if left < -1 or right < -1:
        raise ArgumentError(f"window_size entries must be >= -1 (-1 is unbounded), got {window_size!r}")
    # flash-attn: causal is a window whose right edge is the diagonal.
    return left, 0 if causal else right


def _refuse_unimplemented(fn: str, dropout_p: float, alibi_slopes, block_table=None) -> None:
    if dropout_p != 0.0:
        raise NotImplementedError(f"{fn}: dropout_p={dropout_p} is not implemented; tkpy's attention is inference-only (use 0.0)")
    if alibi_slopes is not None:
        raise NotImplementedError(f"{fn}: alibi_slopes are not implemented yet")
    if block_table is not None:
        raise NotImplementedError(f"{fn}: a paged KV block_table is not implemented yet")


def _check_cu_seqlens(name: str, cu, q: torch.Tensor, total: int, max_seqlen: int) -> None:
    """Values of cu_seqlens: start at 0, never decrease, end at the packed length, and no
    sequence longer than max_seqlen. Reading them costs a host sync on CUDA, so it is skipped
    while a CUDA graph is being captured and while torch.compile traces."""
    if cu is None:
        raise ArgumentError(f"flash_attn_varlen_func: {name} is required (int32 [batch + 1])")
    if not isinstance(cu, torch.Tensor) or cu.device != q.device or q.dim() != 3:
        return  # the op reports type, device and rank errors itself, with their names
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        return
    if torch.compiler.is_compiling() or (cu.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    lengths = cu[1:] - cu[:-1]
    first, last, shortest, longest = torch.stack([cu[0], cu[-1], lengths.min(), lengths.max()]).tolist()
    if first != 0 or last != total or shortest < 0:
        raise ArgumentError(
            f"{name} must start at 0, never decrease and end at the packed length {total}; got {cu.tolist()}"
        )
    if longest > max_seqlen:
        raise ArgumentError(f"{name} has a sequence of {longest} tokens but max_seqlen is {max_seqlen}")


def _scale(q: torch.Tensor, softmax_scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """softmax(q kᵀ · scale) v for batched sequences, flash-attn layout.

    Parameters
    ----------
    q : Tensor ``[B, Sq, Hq, D]``, bf16 or fp16, D in {64, 128, 256}
    k, v : Tensor ``[B, Sk, Hkv, D]``, ``Hq % Hkv == 0`` (GQA/MQA)
        Last dims contiguous; other strides multiples of 8 elements.
    dropout_p : float
        Must be 0.0 (inference only).
    softmax_scale : float, optional
        Default ``1 / sqrt(D)``.
    causal : bool
        Bottom-right aligned: query i sees key j iff ``j <= i + Sk - Sq``.
    window_size : (left, right)
        Keys ``[i + Sk - Sq - left, i + Sk - Sq + right]``; -1 is unbounded.
    softcap : float
        > 0 applies ``softcap · tanh(s / softcap)`` to the scaled scores.
    alibi_slopes : None
        Not implemented; anything else is refused.
    deterministic : bool
        Accepted for compatibility; the forward pass is always deterministic.
    return_attn_probs : bool
        Also return ``softmax_lse`` (fp32 ``[B, Hq, Sq]``, natural log) and None.

    Returns
    -------
    out : Tensor ``[B, Sq, Hq, D]``, or ``(out, softmax_lse, None)``. A query that sees no key gives
    0 and lse -inf (flash-attn 2 reports +inf there; -inf is the log of an empty sum).
    """
    _refuse_unimplemented("flash_attn_func", dropout_p, alibi_slopes)
    left, right = _window(causal, window_size)
    out, lse = _ops.call(
        "attention_forward", q, k, v, None, None, 0, 0, _scale(q, softmax_scale), left, right, float(softcap)
    )
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    """Attention over sequences packed along the token dimension, flash-attn layout.

    Parameters
    ----------
    q : Tensor ``[total_q, Hq, D]``
    k, v : Tensor ``[total_k, Hkv, D]``
    cu_seqlens_q, cu_seqlens_k : int32 Tensor ``[B + 1]``
        Sequence b is tokens ``cu[b] .. cu[b+1] - 1``; empty sequences are allowed.
    max_seqlen_q, max_seqlen_k : int
        Upper bounds of the sequence lengths.
    block_table : None
        Paged KV is not implemented here; anything else is refused.

    The other arguments are those of :func:`flash_attn_func`. ``softmax_lse`` is fp32
    ``[Hq, total_q]``.
    """
    _refuse_unimplemented("flash_attn_varlen_func", dropout_p, alibi_slopes, block_table)
    left, right = _window(causal, window_size)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q, q.shape[0], int(max_seqlen_q))
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q, k.shape[0], int(max_seqlen_k))
    out, lse = _ops.call(
        "attention_forward", q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
        _scale(q, softmax_scale), left, right, float(softcap),
    )
    return (out, lse, None) if return_attn_probs else out

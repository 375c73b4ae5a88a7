"""Dense attention with flash-attn 2's exact signatures, positional order included.

``from tkpy import flash_attn_func, flash_attn_varlen_func`` replaces the flash-attn import. Both
run ``torch.ops.tkpy.attention_forward``: the H100 warp-specialised kernel on CUDA, a tiled
online-softmax implementation on the CPU. Both are differentiable: autograd runs
``torch.ops.tkpy.attention_backward`` (gradients of q, k and v; see ``deterministic``).
"""

from __future__ import annotations

from . import _ops
from .errors import ArgumentError
from .validation import window_edges

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]


def _refuse_unimplemented(fn: str, dropout_p: float, alibi_slopes, block_table=None) -> None:
    if dropout_p != 0.0:
        raise NotImplementedError(f"{fn}: dropout_p={dropout_p} is not implemented (use 0.0)")
    if alibi_slopes is not None:
        raise NotImplementedError(f"{fn}: alibi_slopes are not implemented yet")
    if block_table is not None:
        raise NotImplementedError(f"{fn}: a paged KV block_table is not implemented yet")


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
    q : Tensor ``[B, Sq, Hq, D]``, D in {64, 128, 256}
        bf16 or fp16; on the CPU also fp32 or fp64 (computed in fp64 for fp64, else in fp32), so that
        ``torch.autograd.gradcheck`` can run in float64. k, v (and the gradients) take q's dtype.
    k, v : Tensor ``[B, Sk, Hkv, D]``, ``Hq % Hkv == 0`` (GQA/MQA)
        Last dims contiguous; other strides multiples of 8 elements.
    dropout_p : float
        Must be 0.0 (dropout is not implemented).
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
        Backward: bitwise-identical gradients run to run. On CUDA dQ's additions from different key
        blocks then wait for each other in a fixed order, which costs speed (README, "Attention
        backward"); the forward, and the CPU backward, are deterministic either way.
    return_attn_probs : bool
        Also return ``softmax_lse`` (``[B, Hq, Sq]``, natural log; fp32, or fp64 for fp64 inputs) and
        None.

    Returns
    -------
    out : Tensor ``[B, Sq, Hq, D]``, or ``(out, softmax_lse, None)``. A query that sees no key gives
    0 and lse -inf (flash-attn 2 reports +inf there; -inf is the log of an empty sum).
    """
    _refuse_unimplemented("flash_attn_func", dropout_p, alibi_slopes)
    left, right = window_edges(causal, window_size)
    out, lse = _ops.call("attention_forward", q, k, v, softmax_scale=_ops.optional_float("softmax_scale", softmax_scale),
                         window_left=left, window_right=right, softcap=_ops.float_arg("softcap", softcap),
                         deterministic=_ops.bool_arg("deterministic", deterministic))
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

    The other arguments (dtypes included) are those of :func:`flash_attn_func`. ``softmax_lse`` is
    ``[Hq, total_q]``, fp32 (fp64 for fp64 inputs).
    """
    _refuse_unimplemented("flash_attn_varlen_func", dropout_p, alibi_slopes, block_table)
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ArgumentError("flash_attn_varlen_func: cu_seqlens_q and cu_seqlens_k are required (int32 [batch + 1])")
    left, right = window_edges(causal, window_size)
    out, lse = _ops.call("attention_forward", q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                         max_seqlen_q=_ops.int_arg("max_seqlen_q", max_seqlen_q),
                         max_seqlen_k=_ops.int_arg("max_seqlen_k", max_seqlen_k),
                         softmax_scale=_ops.optional_float("softmax_scale", softmax_scale), window_left=left, window_right=right,
                         softcap=_ops.float_arg("softcap", softcap), deterministic=_ops.bool_arg("deterministic", deterministic))
    return (out, lse, None) if return_attn_probs else out

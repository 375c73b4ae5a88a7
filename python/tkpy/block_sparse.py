"""LServe's unified sparse prefill with mit-han-lab Block-Sparse-Attention's exact signatures.

Dense (type 0), streaming (type -1) and block-sparse (type 1) heads run in one launch of
``torch.ops.tkpy.block_sparse_attention_forward``, which visits only each query block's active
128-token key blocks: its cost scales with the number of active blocks. The block lists are a
plan built here from ``base_blockmask`` with device ops (no host sync), so the launch itself is
CUDA-graph safe.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _ops
from .errors import ArgumentError

__all__ = ["block_sparse_attn_func", "block_streaming_attn_func", "token_streaming_attn_func", "block_lists", "plan",
           "lse_per_sequence"]

BLOCK = 128


def block_lists(base_blockmask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan of a block mask: each row's active key blocks first, ascending, and their count.

    Parameters
    ----------
    base_blockmask : bool Tensor ``[B, n_sparse, QB, KB]``

    Returns
    -------
    (indices, counts) : int32 ``[B, n_sparse, QB, KB]`` and int32 ``[B, n_sparse, QB]``
    """
    inactive_first_false = (~base_blockmask).to(torch.uint8)
    indices = torch.argsort(inactive_first_false, dim=-1, stable=True).to(torch.int32)
    counts = base_blockmask.sum(dim=-1, dtype=torch.int32)
    return indices.contiguous(), counts.contiguous()


def plan(head_mask_type: torch.Tensor, base_blockmask: Optional[torch.Tensor]):
    """Everything the op needs besides q, k, v and the sizes, from device ops only (no host sync).

    Build it once per layer and step, then call ``torch.ops.tkpy.block_sparse_attention_forward``
    repeatedly (e.g. inside a CUDA graph) without re-sorting the mask.

    Returns
    -------
    (sparse_index, block_indices, block_counts) : int32 ``[Hq]`` (the column of ``base_blockmask``
    of each block-sparse head, -1 elsewhere), and :func:`block_lists` of the mask, or None, None.
    """
    is_sparse = head_mask_type == 1
    sparse_index = torch.where(is_sparse, torch.cumsum(is_sparse.to(torch.int32), 0, dtype=torch.int32) - 1, -1)
    indices, counts = block_lists(base_blockmask) if base_blockmask is not None else (None, None)
    return sparse_index.to(torch.int32), indices, counts


def _run(fn, q, k, v, cu_seqlens_q, cu_seqlens_k, head_mask_type, streaming_info, base_blockmask, max_seqlen_q,
         max_seqlen_k, p_dropout, deterministic, softmax_scale, is_causal, exact_streaming, return_attn_probs):
    # The binding checks shapes, dtypes and devices, and, under tkpy.validation's policy, the
    # values of cu_seqlens, head_mask_type and streaming_info.
    if p_dropout != 0.0:
        raise NotImplementedError(f"{fn}: p_dropout={p_dropout} is not implemented; use 0.0")
    tensors = {"q": q, "cu_seqlens_q": cu_seqlens_q, "cu_seqlens_k": cu_seqlens_k, "head_mask_type": head_mask_type}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if streaming_info is None:
        streaming_info = torch.zeros(2 * q.shape[-2], dtype=torch.int32, device=q.device)
    if base_blockmask is not None and (not isinstance(base_blockmask, torch.Tensor) or base_blockmask.dtype != torch.bool):
        raise ArgumentError(f"{fn}: base_blockmask must be a bool Tensor [batch, n_sparse_heads, ceil(max_seqlen_q / "
                            f"{BLOCK}), ceil(max_seqlen_k / {BLOCK})], got "
                            f"{getattr(base_blockmask, 'dtype', type(base_blockmask).__name__)}")
    max_seqlen_q, max_seqlen_k = _ops.int_arg("max_seqlen_q", max_seqlen_q), _ops.int_arg("max_seqlen_k", max_seqlen_k)
    sparse_index, indices, counts = plan(head_mask_type, base_blockmask)
    out, lse = _ops.call(
        "block_sparse_attention_forward", q, k, v, cu_seqlens_q, cu_seqlens_k, head_mask_type, streaming_info,
        sparse_index, max_seqlen_q, max_seqlen_k, block_indices=indices, block_counts=counts,
        softmax_scale=_ops.optional_float("softmax_scale", softmax_scale), is_causal=bool(is_causal),
        exact_streaming=bool(exact_streaming), deterministic=_ops.bool_arg("deterministic", deterministic),
    )
    return (out, lse_per_sequence(lse, cu_seqlens_q, max_seqlen_q), None) if return_attn_probs else out


def lse_per_sequence(lse: torch.Tensor, cu_seqlens_q: torch.Tensor, max_seqlen_q: int) -> torch.Tensor:
    """Packed ``[Hq, total_q]`` -> Block-Sparse-Attention's ``[B, Hq, max_seqlen_q]``, with device ops
    only (no host sync). Rows past a sequence's end are -inf; a token that cu_seqlens_q places
    outside ``[B, max_seqlen_q)`` (bad cu_seqlens while checks are off) is dropped, never written
    out of bounds."""
    heads, total = lse.shape
    batch = cu_seqlens_q.numel() - 1
    token = torch.arange(total, dtype=cu_seqlens_q.dtype, device=lse.device)
    seq = torch.searchsorted(cu_seqlens_q[1:].contiguous(), token, right=True).clamp(max=max(batch - 1, 0))
    row = (token - cu_seqlens_q[seq]).long()
    inside = (row >= 0) & (row < max_seqlen_q) & (token < cu_seqlens_q[-1])
    head = torch.arange(heads, device=lse.device)[:, None]
    slot = (seq[None, :] * heads + head) * max_seqlen_q + row[None, :]  # [Hq, total_q]
    spill = batch * heads * max_seqlen_q  # one extra element takes the dropped tokens
    padded = lse.new_full((spill + 1,), float("-inf"))
    padded.scatter_(0, torch.where(inside[None, :], slot, spill).flatten(), lse.flatten())
    return padded[:spill].view(batch, heads, max_seqlen_q)


def block_sparse_attn_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    head_mask_type,
    streaming_info,
    base_blockmask,
    max_seqlen_q_,
    max_seqlen_k_,
    p_dropout,
    deterministic=False,
    softmax_scale=None,
    is_causal=False,
    exact_streaming=False,
    return_attn_probs=False,
):
    """Unified dense / streaming / block-sparse attention over packed sequences.

    Parameters
    ----------
    q : Tensor ``[total_q, Hq, D]``, D in {64, 128, 256}
        bf16 or fp16; on the CPU also fp32 or fp64 (computed in fp64 for fp64, else in fp32), so that
        ``torch.autograd.gradcheck`` can run in float64. k, v (and the gradients) take q's dtype.
    k, v : Tensor ``[total_k, Hkv, D]``, ``Hq % Hkv == 0``
    cu_seqlens_q, cu_seqlens_k : int32 Tensor ``[B + 1]``
    head_mask_type : int32 Tensor ``[Hq]``
        0 dense, -1 streaming, 1 block-sparse; the n-th block-sparse head (in head order) uses
        ``base_blockmask[:, n - 1]``.
    streaming_info : int32 Tensor ``[2 * Hq]``
        (sink, local) per head: tokens if ``exact_streaming``, else 128-token blocks.
    base_blockmask : bool Tensor ``[B, n_sparse_heads, ceil(max_seqlen_q / 128), ceil(max_seqlen_k / 128)]`` or None
    max_seqlen_q_, max_seqlen_k_ : int
    p_dropout : float
        Must be 0.0.
    deterministic : bool
        Backward: bitwise-identical gradients run to run (as in :func:`tkpy.flash_attn_func`). All
        three functions are differentiable with the forward's plans: a sparse head's backward
        visits exactly the key blocks its forward did.
    softmax_scale : float, optional
        Default ``1 / sqrt(D)``.
    is_causal : bool
        Bottom-right causal mask (key j visible to query i only if ``j <= i + Sk - Sq``) for every
        head type, streaming heads included.
    exact_streaming : bool
        Requires ``is_causal``. Streaming heads see keys ``j <= i + Sk - Sq`` with ``j < sink`` or
        ``j >= i + Sk - Sq - (local - 1)`` (tokens). Otherwise (block streaming) row block i sees
        key blocks ``[0, sink) u [m - local, m)``: with ``is_causal``,
        ``m = ceil(max(Sk - Sq, 0) / 128) + 1 + i - floor(max(Sq - Sk, 0) / 128)``, ANDed with the
        causal mask; without it, ``m = ceil(Sk / 128)`` for every row (the sink and the last
        ``local`` key blocks), keys past Sk masked.
    return_attn_probs : bool
        Also return ``softmax_lse``, ``[B, Hq, max_seqlen_q_]`` as Block-Sparse-Attention lays it out
        (natural log; -inf where a row sees no key and past each sequence's end; fp32, or fp64 for
        fp64 inputs), and None.
    """
    return _run("block_sparse_attn_func", q, k, v, cu_seqlens_q, cu_seqlens_k, head_mask_type, streaming_info,
                base_blockmask, max_seqlen_q_, max_seqlen_k_, p_dropout, deterministic, softmax_scale, is_causal,
                exact_streaming, return_attn_probs)


def block_streaming_attn_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    head_mask_type,
    streaming_info,
    max_seqlen_q,
    max_seqlen_k,
    p_dropout,
    deterministic=False,
    softmax_scale=None,
    is_causal=True,
    return_attn_probs=False,
):
    """Dense (type 0) and block-streaming (type -1) heads; ``streaming_info`` in 128-token blocks.
    Causal by default; ``is_causal=False`` gives every row the sink and the last ``local`` key
    blocks. Arguments as in :func:`block_sparse_attn_func`."""
    return _run("block_streaming_attn_func", q, k, v, cu_seqlens_q, cu_seqlens_k, head_mask_type, streaming_info,
                None, max_seqlen_q, max_seqlen_k, p_dropout, deterministic, softmax_scale, is_causal, False,
                return_attn_probs)


def token_streaming_attn_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    head_mask_type,
    streaming_info,
    max_seqlen_q,
    max_seqlen_k,
    deterministic=False,
    softmax_scale=None,
    return_attn_probs=False,
):
    """Dense causal (type 0) and exact token-streaming (type -1) heads; ``streaming_info`` in tokens.
    Arguments as in :func:`block_sparse_attn_func`."""
    return _run("token_streaming_attn_func", q, k, v, cu_seqlens_q, cu_seqlens_k, head_mask_type, streaming_info,
                None, max_seqlen_q, max_seqlen_k, 0.0, deterministic, softmax_scale, True, True, return_attn_probs)

"""Decode over a KV cache with flash-attn 2's ``flash_attn_with_kvcache``, exact signature included.

``from tkpy import flash_attn_with_kvcache`` replaces the flash-attn import. New keys and values are
written into the cache by ``torch.ops.tkpy.kv_append_`` (optionally rotated), then
``torch.ops.tkpy.decode_attention`` attends over the cache: a split-KV decode kernel on CUDA, whose
GQA groups share each K/V load, and a CPU implementation on the same index math.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _ops
from .attention import _scale, _window
from .block_sparse import _host_checks_allowed
from .errors import ArgumentError
from .rope import apply_rope_

__all__ = ["flash_attn_with_kvcache"]


def _require_tensor(fn: str, name: str, t, dims: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor {layout}, got {type(t).__name__}")
    if t.dim() != dims:
        raise ArgumentError(f"{fn}: {name} must be {dims}-D {layout}, got shape {tuple(t.shape)}")


def _seqlens_tensor(fn: str, cache_seqlens, batch: int, device: torch.device) -> torch.Tensor:
    """cache_seqlens as int32 ``[batch]``: an int is broadcast, a tensor must already be int32 ``[batch]``."""
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (int, torch.Tensor)):
        raise TypeError(f"{fn}: cache_seqlens must be an int or an int32 Tensor [{batch}], got {type(cache_seqlens).__name__}")
    if isinstance(cache_seqlens, int):
        if cache_seqlens < 0:
            raise ArgumentError(f"{fn}: cache_seqlens must be >= 0, got {cache_seqlens}")
        return torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    if cache_seqlens.dtype != torch.int32:
        raise ArgumentError(f"{fn}: cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if cache_seqlens.shape != (batch,):
        raise ArgumentError(f"{fn}: cache_seqlens must be [batch={batch}], got shape {tuple(cache_seqlens.shape)}")
    return cache_seqlens


def check_cache_values(fn: str, seqlens: torch.Tensor, new_tokens: int, capacity: int,
                       block_table: Optional[torch.Tensor] = None, page_size: int = 0, num_pages: int = 0,
                       cache_batch_idx: Optional[torch.Tensor] = None, cache_rows: int = 0,
                       ring_table: Optional[torch.Tensor] = None, ring_pool_pages: int = 0) -> None:
    """Index values a kernel would follow: every sequence fits its table row, every page of a
    sequence's ``seqlens + new_tokens`` tokens is in the pool, cache rows and ring pages exist.

    Reading them costs one host sync on CUDA, so nothing is checked while a CUDA graph is being
    captured or torch.compile traces; the kernels guard their own reads then.
    """
    tables = [t for t in (block_table, cache_batch_idx, ring_table) if t is not None]
    if not _host_checks_allowed(seqlens) or seqlens.numel() == 0 or any(t.device != seqlens.device for t in tables):
        return  # nothing to read, or a device mismatch that the op reports with the names
    lengths = seqlens.long() + new_tokens
    checks = [seqlens.min(), lengths.max()]
    if block_table is not None:
        used = torch.arange(block_table.shape[1], device=block_table.device) < (lengths[:, None] + page_size - 1) // page_size
        out_of_pool = used & ((block_table < 0) | (block_table >= num_pages))
        checks.append(out_of_pool.sum())
    if cache_batch_idx is not None:
        checks += [cache_batch_idx.min(), cache_batch_idx.max()]
    if ring_table is not None:
        checks.append(((ring_table < 0) | (ring_table >= ring_pool_pages)).sum())
    values = torch.stack([c.long() for c in checks]).tolist()
    shortest, longest = values[0], values[1]
    if shortest < 0:
        raise ArgumentError(f"{fn}: cache_seqlens must be >= 0, got {seqlens.tolist()}")
    if longest > capacity:
        raise ArgumentError(
            f"{fn}: a sequence would hold {longest} tokens (cache_seqlens + {new_tokens} new) but the cache holds "
            f"at most {capacity} per sequence (block_table columns x page_size, or the cache's seqlen)"
        )
    index = 2
    if block_table is not None:
        if values[index]:
            b, n = (int(i) for i in out_of_pool.nonzero()[0].tolist())
            raise ArgumentError(
                f"{fn}: block_table[{b}, {n}] = {int(block_table[b, n])} is outside the pool of {num_pages} pages "
                f"(page {n} holds tokens of sequence {b})"
            )
        index += 1
    if cache_batch_idx is not None:
        low, high = values[index], values[index + 1]
        if low < 0 or high >= cache_rows:
            raise ArgumentError(f"{fn}: cache_batch_idx entries must be in [0, {cache_rows}), got {cache_batch_idx.tolist()}")
        index += 2
    if ring_table is not None and values[index]:
        raise ArgumentError(f"{fn}: ring_table entries must be in [0, {ring_pool_pages}) (the ring pool's pages)")


def _q_rotary_positions(cache_seqlens: torch.Tensor, seqlen_q: int, progressive: bool) -> torch.Tensor:
    # flash-attn: with a causal or local mask query i sits at cache_seqlens + i; otherwise every
    # query takes the rotation of position cache_seqlens.
    offsets = torch.arange(seqlen_q, dtype=torch.int32, device=cache_seqlens.device) if progressive else \
        torch.zeros(seqlen_q, dtype=torch.int32, device=cache_seqlens.device)
    return cache_seqlens[:, None] + offsets[None, :]


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    """Attention of new queries over a KV cache, appending new keys and values first (in place).

    Parameters
    ----------
    q : Tensor ``[B, Sq, Hq, D]``, bf16 or fp16, D in {64, 128, 256}
    k_cache, v_cache : Tensor, q's dtype
        Paged ``[num_pages, page_size, Hkv, D]`` (page_size a multiple of 16) with ``block_table``,
        or contiguous ``[B_cache, S_cache, Hkv, D]`` without one. ``Hq % Hkv == 0``.
    k, v : Tensor ``[B, S_new, Hkv, D]``, optional
        Written into the cache at positions ``cache_seqlens[b] + i`` before attending (the caches
        are modified in place; ``k`` and ``v`` are not).
    rotary_cos, rotary_sin : Tensor ``[rows, R/2]``, float32 or q's dtype, optional
        Rotary embedding (``R <= D``): ``k`` is rotated at its positions before it is stored, and a
        copy of ``q`` is rotated at ``cache_seqlens + i`` when ``causal`` or a local window is set,
        else every query at ``cache_seqlens``. Requires ``k``.
    cache_seqlens : int or int32 Tensor ``[B]``
        Tokens in the cache before the append; never modified. Default: the whole capacity
        (``S_cache``, or ``block_table.shape[1] · page_size``); required with ``k``.
    cache_batch_idx : int32 Tensor ``[B]``, optional
        Contiguous cache only: the cache row of each sequence (default ``b``).
    cache_leftpad : None
        Not implemented; anything else is refused.
    block_table : int32 Tensor ``[B, max_pages]``, optional
        Page n of sequence b (tokens ``[n · page_size, (n+1) · page_size)``) is
        ``k_cache[block_table[b, n]]``. Only the pages holding a sequence's tokens are read.
    softmax_scale : float, optional
        Default ``1 / sqrt(D)``.
    causal : bool
        Bottom-right aligned: query i of sequence b (``L = cache_seqlens[b] + S_new`` keys) sees key
        j iff ``j <= i + L - Sq``.
    window_size : (left, right)
        Keys ``[i + L - Sq - left, i + L - Sq + right]``; -1 is unbounded. As in flash-attn, an edge
        >= the capacity is unbounded, and then the unbounded right edge of a window whose left edge
        is set is the capacity (it binds only when Sq > capacity + 1).
    softcap : float
        > 0 applies ``softcap · tanh(s / softcap)`` to the scaled scores.
    rotary_interleaved : bool
        True (flash-attn's default): GPT-J pairs ``(2p, 2p+1)``; False: neox pairs ``(p, p + R/2)``.
    alibi_slopes : None
        Not implemented; anything else is refused.
    num_splits : int
        Split-KV ranges per (sequence, kv head): 0 picks from the lengths and the device, >= 1
        forces it. The result does not depend on it beyond fp32 rounding.
    return_softmax_lse : bool
        Also return ``softmax_lse``.

    Returns
    -------
    out : Tensor ``[B, Sq, Hq, D]``, or ``(out, softmax_lse)`` with softmax_lse fp32 ``[B, Hq, Sq]``
    (natural log). A query that sees no key gives 0 and lse -inf (flash-attn 2 reports +inf there;
    -inf is the log of an empty sum).

    On CUDA the value checks that need a host sync (pages within the pool, lengths within the
    capacity) run outside CUDA-graph capture and torch.compile only; the kernels never read or
    write outside the pools either way.
    """
    fn = "flash_attn_with_kvcache"
    if cache_leftpad is not None:
        raise NotImplementedError(f"{fn}: cache_leftpad is not implemented yet")
    if alibi_slopes is not None:
        raise NotImplementedError(f"{fn}: alibi_slopes are not implemented yet")
    if (k is None) != (v is None):
        raise ArgumentError(f"{fn}: pass both k and v (the tokens to append), or neither")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ArgumentError(f"{fn}: pass both rotary_cos and rotary_sin, or neither")
    if rotary_cos is not None and k is None:
        raise ArgumentError(f"{fn}: rotary_cos/rotary_sin rotate the appended keys: they need k and v")
    _require_tensor(fn, "q", q, 4, "[batch, seqlen_q, heads_q, head_dim]")
    layout = "[num_pages, page_size, heads_kv, head_dim]" if block_table is not None else "[batch_cache, seqlen_cache, heads_kv, head_dim]"
    _require_tensor(fn, "k_cache", k_cache, 4, layout)
    _require_tensor(fn, "v_cache", v_cache, 4, layout)
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dtype != q.dtype:
            raise ArgumentError(f"{fn}: {name} must have q's dtype {q.dtype}, got {cache.dtype} (INT8 caches: tkpy.lserve)")
    if block_table is not None:
        if cache_batch_idx is not None:
            raise ArgumentError(f"{fn}: a paged cache (block_table) does not take cache_batch_idx")
        _require_tensor(fn, "block_table", block_table, 2, "[batch, max_pages]")
        if block_table.dtype != torch.int32:
            raise ArgumentError(f"{fn}: block_table must be int32, got {block_table.dtype}")
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
    if cache_batch_idx is not None:
        _require_tensor(fn, "cache_batch_idx", cache_batch_idx, 1, "[batch]")
        if cache_batch_idx.dtype != torch.int32:
            raise ArgumentError(f"{fn}: cache_batch_idx must be int32, got {cache_batch_idx.dtype}")
    batch, seqlen_q = q.shape[0], q.shape[1]
    new_tokens = 0
    if k is not None:
        if cache_seqlens is None:
            raise ArgumentError(f"{fn}: appending k/v needs cache_seqlens (where the new tokens go)")
        _require_tensor(fn, "k", k, 4, "[batch, seqlen_new, heads_kv, head_dim]")
        _require_tensor(fn, "v", v, 4, "[batch, seqlen_new, heads_kv, head_dim]")
        new_tokens = k.shape[1]
    if cache_seqlens is None:
        seqlens_before = torch.full((batch,), capacity, dtype=torch.int32, device=q.device)
    else:
        seqlens_before = _seqlens_tensor(fn, cache_seqlens, batch, q.device)
    left, right = _window(causal, window_size)
    # flash-attn (mha_fwd_kvcache, set_params_fprop): an edge at or past seqlen_k, the capacity, is
    # unbounded, then the open edge of a one-sided window is seqlen_k. That bound binds only when
    # Sq > capacity + 1 (no append); an unbounded left edge never binds, so it stays -1.
    left = -1 if left >= capacity else left
    right = -1 if right >= capacity else right
    if left >= 0 and right < 0:
        right = capacity
    check_cache_values(
        fn, seqlens_before, new_tokens, capacity, block_table, k_cache.shape[1], k_cache.shape[0],
        cache_batch_idx, k_cache.shape[0],
    )

    if k is not None:
        _ops.call(
            "kv_append_",
            k_cache, v_cache, k, v, block_table, seqlens_before, cache_batch_idx, None, None, rotary_cos,
            rotary_sin, bool(rotary_interleaved), 1.0, 1.0, None, None, None, None, 0, 0,
        )
        seqlens = seqlens_before + new_tokens
    else:
        seqlens = seqlens_before
    if rotary_cos is not None:
        # flash-attn picks the positions after dropping the edges past the capacity (above).
        progressive = left >= 0 or right >= 0
        q = q.clone(memory_format=torch.contiguous_format)
        apply_rope_(q, None, rotary_cos, rotary_sin, _q_rotary_positions(seqlens_before, seqlen_q, progressive),
                    interleaved=bool(rotary_interleaved))
    out, lse = _ops.call(
        "decode_attention",
        q, k_cache, v_cache, block_table, seqlens, cache_batch_idx, None, None, None, None, 0, 0, None, None, None,
        1.0, 1.0, _scale(q, softmax_scale), left, right, float(softcap), int(num_splits),
    )
    return (out, lse) if return_softmax_lse else out

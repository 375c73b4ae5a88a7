"""Decode over a KV cache with flash-attn 2's ``flash_attn_with_kvcache``, exact signature included.

``from tkpy import flash_attn_with_kvcache`` replaces the flash-attn import. New keys and values are
written into the cache by ``torch.ops.tkpy.kv_append_`` (optionally rotated), then
``torch.ops.tkpy.decode_attention`` attends over the cache: a split-KV decode kernel on CUDA, whose
GQA groups share each K/V load, and a CPU implementation on the same index math.
"""

from __future__ import annotations

import torch

from . import _ops
from .errors import ArgumentError
from .rope import apply_rope_
from .validation import window_edges

__all__ = ["flash_attn_with_kvcache"]


def _require_tensor(fn: str, name: str, t, dims: int, layout: str) -> None:
    # Only for the tensors whose shapes this wrapper reads to translate the call; the binding checks
    # everything else.
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor {layout}, got {type(t).__name__}")
    if t.dim() != dims:
        raise ArgumentError(f"{fn}: {name} must be {dims}-D {layout}, got shape {tuple(t.shape)}")


def _seqlens_tensor(fn: str, cache_seqlens, batch: int, device: torch.device) -> torch.Tensor:
    """cache_seqlens as the op takes it: an int is broadcast to int32 ``[batch]``; a tensor is passed on."""
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, (int, torch.Tensor)):
        raise TypeError(f"{fn}: cache_seqlens must be an int or an int32 Tensor [{batch}], got {type(cache_seqlens).__name__}")
    if isinstance(cache_seqlens, int):
        if not 0 <= cache_seqlens <= 2**31 - 1:
            raise ArgumentError(f"{fn}: cache_seqlens must be in [0, 2**31 - 1], got {cache_seqlens}")
        return torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    return cache_seqlens


def _on_meta(t):
    """A tensor's shape, strides and storage offset on the meta device (no data, no copy), for a dry
    run of an op's checks; anything else as it is."""
    if not isinstance(t, torch.Tensor):
        return t
    extent = t.storage_offset() + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1 if t.numel() else 0
    storage = torch.empty(extent, dtype=t.dtype, device="meta")
    return storage.as_strided(t.shape, t.stride(), t.storage_offset())


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

    Index values (pages within the pool, lengths within the capacity) are checked under
    :mod:`tkpy.validation`'s policy: always on the CPU, on CUDA only with ``TKPY_CHECK_VALUES=1``
    (a host sync); the kernels never read or write outside the pools either way.
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
    # The binding checks shapes, dtypes, devices and (under tkpy.validation's policy) the index
    # values; here only what the translation reads, and what this API refuses beyond the op.
    _require_tensor(fn, "q", q, 4, "[batch, seqlen_q, heads_q, head_dim]")
    layout = "[num_pages, page_size, heads_kv, head_dim]" if block_table is not None else "[batch_cache, seqlen_cache, heads_kv, head_dim]"
    _require_tensor(fn, "k_cache", k_cache, 4, layout)
    if k_cache.dtype != q.dtype:
        raise ArgumentError(f"{fn}: k_cache must have q's dtype {q.dtype}, got {k_cache.dtype} (INT8 caches: tkpy.lserve)")
    if block_table is not None:
        _require_tensor(fn, "block_table", block_table, 2, "[batch, max_pages]")
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
    batch, seqlen_q = q.shape[0], q.shape[1]
    if k is not None and cache_seqlens is None:
        raise ArgumentError(f"{fn}: appending k/v needs cache_seqlens (where the new tokens go)")
    if cache_seqlens is None:
        seqlens_before = torch.full((batch,), capacity, dtype=torch.int32, device=q.device)
    else:
        seqlens_before = _seqlens_tensor(fn, cache_seqlens, batch, q.device)
    left, right = window_edges(causal, window_size)
    # flash-attn (mha_fwd_kvcache, set_params_fprop): an edge at or past seqlen_k, the capacity, is
    # unbounded, then the open edge of a one-sided window is seqlen_k. That bound binds only when
    # Sq > capacity + 1 (no append); an unbounded left edge never binds, so it stays -1.
    left = -1 if left >= capacity else left
    right = -1 if right >= capacity else right
    if left >= 0 and right < 0:
        right = capacity

    decode_options = dict(block_table=block_table, cache_batch_idx=cache_batch_idx,
                          softmax_scale=_ops.optional_float("softmax_scale", softmax_scale), window_left=left, window_right=right,
                          softcap=_ops.float_arg("softcap", softcap),
                          num_splits=_ops.int_arg("num_splits", num_splits))
    if rotary_cos is not None:
        # A rotated copy of q, made before the append so that positions past the tables are refused
        # while the cache is untouched. flash-attn picks the positions after dropping the edges
        # past the capacity (above).
        progressive = left >= 0 or right >= 0
        # Decode has no backward (its op refuses one), so the copy's rotation needs none either.
        q = q.clone(memory_format=torch.contiguous_format)
        with torch.no_grad():
            apply_rope_(q, None, rotary_cos, rotary_sin, _q_rotary_positions(seqlens_before, seqlen_q, progressive),
                        interleaved=bool(rotary_interleaved))
    seqlens = seqlens_before
    if k is not None:
        _require_tensor(fn, "k", k, 4, "[batch, seqlen_new, heads_kv, head_dim]")
        if not torch.compiler.is_compiling():  # a trace runs both ops' checks before anything runs
            # The decode's checks, on meta tensors, before the append writes the cache: a refused
            # call must leave the cache as it was. The append checks the page ids both read.
            _ops.call("decode_attention", *map(_on_meta, (q, k_cache, v_cache, seqlens_before)),
                      **{name: _on_meta(value) for name, value in decode_options.items()})
        _ops.call("kv_append_", k_cache, v_cache, k, v, seqlens_before, block_table=block_table,
                  cache_batch_idx=cache_batch_idx, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                  rotary_interleaved=bool(rotary_interleaved))
        seqlens = seqlens_before + k.shape[1]
    out, lse = _ops.call("decode_attention", q, k_cache, v_cache, seqlens, **decode_options)
    return (out, lse) if return_softmax_lse else out

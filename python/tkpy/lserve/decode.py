"""LServe's sparse decode: retrieval heads over their selected pages and streaming heads over their
sink and local window, every head in one ``torch.ops.tkpy.decode_attention`` launch."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _ops
from ..errors import ArgumentError
from .cache import LServeCache
from .selection import PageSelection

__all__ = ["sparse_decode"]


def sparse_decode(q: torch.Tensor, cache: LServeCache, block_table: torch.Tensor, ring_table: torch.Tensor,
                  cache_seqlens: torch.Tensor, selection: Optional[PageSelection] = None,
                  softmax_scale: Optional[float] = None, num_splits: int = 0, return_softmax_lse: bool = False):
    """One decode step of attention for a layer's LServe cache.

    Retrieval (dense) kv heads attend over the pages ``selection`` lists for their query heads
    plus the newest page, or over every page when ``selection`` is None; streaming kv heads
    attend over tokens ``[0, sink)`` and the newest ``local`` tokens through their ring.

    Parameters
    ----------
    q : Tensor ``[B, 1, Hq, D]``, the cache's model dtype (already rotated)
    cache : LServeCache of the layer, holding the current token already (:meth:`LServeCache.append`)
    block_table : int32 ``[B, max_pages]``
    ring_table : int32 ``[B, ring_pages]`` (:meth:`LServeCache.ring_table`)
    cache_seqlens : int32 ``[B]``: tokens in the cache, the current one included
    selection : PageSelection, optional
        From :func:`select_pages` or a :class:`PageSelector` (possibly from an earlier step).
    softmax_scale : float, optional
        Default ``1 / sqrt(D)``.
    num_splits : int
        Split-KV ranges: 0 picks automatically, >= 1 forces it.
    return_softmax_lse : bool
        Also return the fp32 ``[B, Hq, 1]`` log-sum-exp (natural log).

    Returns
    -------
    out : Tensor ``[B, 1, Hq, D]``, or ``(out, softmax_lse)``.
    """
    fn = "sparse_decode"
    if not isinstance(cache, LServeCache):
        raise TypeError(f"{fn}: cache must be an LServeCache, got {type(cache).__name__}")
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{fn}: q must be a Tensor [batch, 1, heads_q, head_dim], got {type(q).__name__}")
    if q.dtype != cache.dtype:
        raise ArgumentError(f"{fn}: q must have the cache's model dtype {cache.dtype}, got {q.dtype}")
    if selection is not None and not isinstance(selection, PageSelection):
        raise TypeError(f"{fn}: selection must be a PageSelection or None, got {type(selection).__name__}")
    if selection is None:
        page_indices = page_counts = head_bits = None
    else:
        page_indices, page_counts, head_bits = selection.page_indices, selection.page_counts, selection.head_bits
    out, lse = _ops.call("decode_attention", q, cache.k, cache.v, cache_seqlens, block_table=block_table,
                         page_indices=page_indices, page_counts=page_counts, head_bits=head_bits,
                         k_scale=cache.k_scale, v_scale=cache.v_scale,
                         softmax_scale=_ops.optional_float("softmax_scale", softmax_scale),
                         num_splits=_ops.int_arg("num_splits", num_splits),
                         **cache.ring_arguments(ring_table))
    return (out, lse) if return_softmax_lse else out

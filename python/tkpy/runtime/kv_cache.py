"""Paged KV cache: a page allocator, the per-step batch metadata, and each layer's attention over
its :class:`tkpy.lserve.LServeCache` (dense, or LServe's streaming heads and page selection)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..attention import flash_attn_varlen_func
from ..block_sparse import token_streaming_attn_func
from ..kvcache import flash_attn_with_kvcache
from ..lserve import LServeCache, LServeConfig, PageSelector, sparse_decode
from ..lserve.config import PAGE_TOKENS
from .config import ModelConfig

__all__ = ["PAGE_TOKENS", "Batch", "KVCache", "PageAllocator"]


class PageAllocator:
    """A free list of ids ``1 .. count - 1``. Id 0 is never handed out: it is the scratch page
    (and scratch ring slot) that padding rows and CUDA-graph warm-ups write into."""

    def __init__(self, count: int, what: str = "pages"):
        self.count, self.what = count, what
        self._free = list(range(count - 1, 0, -1))  # pop() hands out the lowest id first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"out of KV {self.what}: asked for {n}, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, ids: list[int]) -> None:
        self._free.extend(reversed(ids))


@dataclass
class Batch:
    """What one forward pass needs to address the cache, passed down explicitly through the model.

    A prefill packs sequences along the token dimension (``cu_seqlens``); a decode step has one
    token per sequence.
    """

    positions: torch.Tensor  # int32 [T]: each token's position in its sequence
    block_table: torch.Tensor  # int32 [B, max_pages]: pool page of each 64-token page
    ring_table: torch.Tensor  # int32 [B, ring_pages]: the sequence's streaming ring
    cache_seqlens: torch.Tensor  # int32 [B]: tokens in the cache before this pass
    decode: bool
    cu_seqlens: Optional[torch.Tensor] = None  # prefill: int32 [B + 1]
    max_seqlen: int = 0  # prefill
    spans: tuple = ()  # prefill: host (start, end) of each sequence in the packed tokens
    step: int = 0  # decode: steps since the last prefill (page-selection reuse)
    context_lens: Optional[torch.Tensor] = None  # decode: cache_seqlens + 1


class KVCache:
    """Every layer's :class:`LServeCache` plus how each layer attends.

    Dense (``lserve=None``): every kv head is a retrieval head and no page is skipped. Prefill
    runs :func:`tkpy.flash_attn_varlen_func`; decode runs :func:`tkpy.flash_attn_with_kvcache` on
    the pool, which appends and attends in one call and takes the sliding window of Mistral-style
    layers (``sparse_decode`` has no window). Its caches keep no page stats: dense decode never
    reads them.

    LServe: the pattern's streaming kv heads live in per-sequence rings; prefill runs
    :func:`tkpy.token_streaming_attn_func` (streaming heads see ``prefill_sink`` + ``prefill_local``
    tokens, the rest dense causal, one launch); decode appends through :meth:`LServeCache.append`
    (page stats kept) and runs :func:`tkpy.lserve.sparse_decode` over the pages a per-layer
    :class:`PageSelector` picks.
    """

    def __init__(self, config: ModelConfig, num_pages: int, max_seqs: int, dtype: torch.dtype,
                 device: torch.device, lserve: Optional[LServeConfig] = None):
        self.lserve = lserve
        self.window_left = config.window_left
        streaming = [[False] * config.num_kv_heads for _ in range(config.num_layers)]
        self.head_mask_type = self.streaming_info = None
        if lserve is not None:
            if any(w >= 0 for w in config.window_left):
                raise NotImplementedError("LServe on a sliding-window model is not supported (sparse_decode has no window)")
            if lserve.pattern is not None:
                shape = f"{config.num_layers} layers x {config.num_kv_heads} kv heads ({config.num_heads} query heads)"
                try:
                    pattern = lserve.head_pattern(config.num_heads)
                except ValueError as e:
                    raise ValueError(f"LServe pattern {lserve.pattern} does not fit the model's {shape}: {e}") from e
                if pattern.streaming_mask.shape != (config.num_layers, config.num_kv_heads):
                    raise ValueError(f"LServe pattern {lserve.pattern} is for {pattern.num_layers} layers x "
                                     f"{pattern.num_kv_heads} kv heads, the model has {shape}")
                streaming = pattern.streaming_mask.tolist()
                self.head_mask_type = [pattern.head_mask_type(i, device) for i in range(config.num_layers)]
                self.streaming_info = [pattern.streaming_info(i, device) for i in range(config.num_layers)]
            self.selectors = [PageSelector.from_config(lserve) for _ in range(config.num_layers)]
        self.layers = [
            LServeCache(num_pages, max_seqs, flags, config.head_dim, dtype, lserve, device, page_stats=lserve is not None)
            for flags in streaming
        ]
        self.ring_pages = self.layers[0].ring_pages
        self.has_streaming = [any(flags) for flags in streaming]

    def ring_table(self, slots: torch.Tensor) -> torch.Tensor:
        return self.layers[0].ring_table(slots)

    def reset_selection(self) -> None:
        """A prefill or a finished sequence changes the batch: cached page selections are stale."""
        if self.lserve is not None:
            for selector in self.selectors:
                selector.reset()

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch) -> torch.Tensor:
        """q ``[T, Hq, D]``, k and v ``[T, Hkv, D]`` (rotated) -> ``[T, Hq, D]``; stores k and v."""
        if batch.decode:
            return self._decode(layer, q[:, None], k[:, None], v[:, None], batch)[:, 0]
        return self._prefill(layer, q, k, v, batch)

    def _prefill(self, layer, q, k, v, batch: Batch) -> torch.Tensor:
        cache = self.layers[layer]
        for b, (start, end) in enumerate(batch.spans):
            cache.append(k[None, start:end], v[None, start:end], batch.block_table[b:b + 1],
                         batch.ring_table[b:b + 1], batch.cache_seqlens[b:b + 1])
        cu, max_len = batch.cu_seqlens, batch.max_seqlen
        if self.head_mask_type is not None and self.has_streaming[layer]:
            return token_streaming_attn_func(q, k, v, cu, cu, self.head_mask_type[layer], self.streaming_info[layer],
                                             max_len, max_len)
        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True,
                                      window_size=(self.window_left[layer], -1))

    def _decode(self, layer, q, k, v, batch: Batch) -> torch.Tensor:
        # q: [B, 1, Hq, D], k/v: [B, 1, Hkv, D]
        cache = self.layers[layer]
        if self.lserve is None:
            return flash_attn_with_kvcache(q, cache.k, cache.v, k, v, cache_seqlens=batch.cache_seqlens,
                                           block_table=batch.block_table, causal=True,
                                           window_size=(self.window_left[layer], -1))
        cache.append(k, v, batch.block_table, batch.ring_table, batch.cache_seqlens)
        selection = self.selectors[layer](batch.step, q, cache.stats, batch.block_table, batch.context_lens)
        return sparse_decode(q, cache, batch.block_table, batch.ring_table, batch.context_lens, selection)

"""The attention backend: every layer's KV cache, the batch metadata of the current step, and each
layer's attention over them (dense, or LServe's streaming heads and page selection).

The model runner plans a step (:meth:`AttentionBackend.plan_prefill` or
:meth:`~AttentionBackend.plan_decode`), then runs the model, whose layers call
:meth:`AttentionBackend.attention`. A prefill plan does its host work (index arithmetic on the
CPU, copied to the device once per step, not once per layer); a decode plan does none, so a CUDA
graph can capture it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from .. import flash_attn_varlen_func, flash_attn_with_kvcache, token_streaming_attn_func
from ..lserve import LServeCache, LServeConfig, PageSelector, sparse_decode
from ..lserve.config import LOGICAL_PAGE_TOKENS, PAGE_TOKENS
from .config import ModelConfig

__all__ = ["AttentionBackend", "DecodeMetadata", "PrefillMetadata", "cache_bytes"]


def cache_bytes(config: ModelConfig, num_pages: int, max_seqs: int, dtype: torch.dtype,
                lserve: Optional[LServeConfig] = None) -> int:
    """Bytes of the caches an :class:`AttentionBackend` of these arguments allocates, known before
    it does. Exact for dense attention. With LServe an upper bound: each kv head lives either in
    the pool (with page stats) or in the rings, as the pattern, read later, decides."""
    kv_dtype = dtype if lserve is None or lserve.kv_dtype is None else lserve.kv_dtype
    page = 2 * PAGE_TOKENS * config.head_dim * kv_dtype.itemsize  # k and v of one head
    if lserve is None:
        per_head = num_pages * page
    else:
        stats = 2 * (PAGE_TOKENS // LOGICAL_PAGE_TOKENS) * config.head_dim * torch.float32.itemsize
        per_head = max(num_pages * (page + stats), max_seqs * lserve.ring_pages * page)
    return config.num_layers * config.num_kv_heads * per_head


@dataclass
class PrefillMetadata:
    """A prefill: the prompts packed one after another along the token dimension.

    Their keys and values are stored by one :meth:`LServeCache.append` per layer. An append writes
    as many tokens into every row as into the first, and prompts differ in length, so each prompt
    is cut into rows of one page (64 tokens): row r writes page n of a prompt at positions
    ``64·n + i``. A prompt's last row is padded with repeats of its last token, which no query
    ever sees:

    - pool slots past the prompt are overwritten by decode before any query reads them;
    - page stats are per-channel min and max, which repeats of a key already in the logical page
      leave unchanged (and decode resets a logical page at its first token);
    - a streaming ring keeps the sink pages and the newest pages, each in its own slot; the rows
      are written in parallel, so a page whose slot a later page of the prompt takes is written to
      the scratch ring (slot 0) instead.
    """

    positions: torch.Tensor  # int32 [T]: each token's position in its prompt
    cu_seqlens: torch.Tensor  # int32 [B + 1]
    max_seqlen: int
    row_tokens: torch.Tensor  # int64 [R * 64]: the packed token at each position of the rows
    row_block_table: torch.Tensor  # int32 [R, max_pages]: the block table of the row's prompt
    row_ring_table: torch.Tensor  # int32 [R, ring_pages]: the prompt's ring, or the scratch ring
    row_seqlens: torch.Tensor  # int32 [R]: 64·n, the position of the row's first token


@dataclass
class DecodeMetadata:
    """A decode step: one new token per sequence, at position ``cache_seqlens``."""

    cache_seqlens: torch.Tensor  # int32 [B]: tokens in the cache before this step
    block_table: torch.Tensor  # int32 [B, max_pages]: pool page of each 64-token page
    ring_table: torch.Tensor  # int32 [B, ring_pages]: the sequence's streaming ring
    step: int  # steps since the batch last changed (page-selection reuse)
    context_lens: torch.Tensor  # int32 [B]: cache_seqlens + 1, the new token included

    @property
    def positions(self) -> torch.Tensor:
        return self.cache_seqlens


class AttentionBackend:
    """Every layer's :class:`LServeCache`, how each layer attends, and the current step's metadata.

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
        self.device = device
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
        self.caches = [
            LServeCache(num_pages, max_seqs, flags, config.head_dim, dtype, lserve, device, page_stats=lserve is not None)
            for flags in streaming
        ]
        self.has_streaming = [any(flags) for flags in streaming]
        self.ring_pages = self.caches[0].ring_pages
        self.sink_pages = self.caches[0].sink // PAGE_TOKENS
        self.metadata: Union[PrefillMetadata, DecodeMetadata, None] = None

    def ring_table(self, slots: torch.Tensor) -> torch.Tensor:
        """int32 ``[B, ring_pages]`` for ring slots int32 ``[B]``."""
        return self.caches[0].ring_table(slots)

    def reset_selection(self) -> None:
        """A prefill or a finished sequence changes the batch: cached page selections are stale."""
        if self.lserve is not None:
            for selector in self.selectors:
                selector.reset()

    def plan_prefill(self, lengths: list[int], block_table: torch.Tensor, slots: torch.Tensor) -> PrefillMetadata:
        """Plan a prefill of prompts of ``lengths`` tokens, given their block table (int32
        ``[B, max_pages]``) and ring slots (int32 ``[B]``) on the device."""
        lengths = torch.tensor(lengths)
        starts = lengths.cumsum(0) - lengths  # packed index of each prompt's first token
        pages = (lengths + PAGE_TOKENS - 1) // PAGE_TOKENS
        # Row r writes page page[r] of prompt prompt[r].
        prompt = torch.repeat_interleave(torch.arange(len(lengths)), pages)
        page = torch.arange(len(prompt)) - torch.repeat_interleave(pages.cumsum(0) - pages, pages)
        # [R, 64]: the packed token at each position of a row; the padding repeats the prompt's last.
        row_tokens = (starts[prompt] + page * PAGE_TOKENS)[:, None] + torch.arange(PAGE_TOKENS)
        row_tokens = torch.minimum(row_tokens, (starts + lengths - 1)[prompt, None])
        # Sink pages stay put and later pages rotate through the ring's other slots (DESIGN.md §5),
        # so a page keeps its slot unless a later page of the same prompt takes it.
        keeps_slot = (page < self.sink_pages) | (page + self.ring_pages - self.sink_pages >= pages[prompt])
        row_prompt = prompt.to(self.device)
        ring_slots = torch.where(keeps_slot.to(self.device), slots[row_prompt], 0)
        positions = torch.arange(int(lengths.sum())) - torch.repeat_interleave(starts, lengths)
        self.metadata = PrefillMetadata(
            positions=positions.to(self.device, torch.int32),
            cu_seqlens=torch.cat([starts, lengths.sum(0, keepdim=True)]).to(self.device, torch.int32),
            max_seqlen=int(lengths.max()),
            row_tokens=row_tokens.flatten().to(self.device),
            row_block_table=block_table[row_prompt],
            row_ring_table=self.ring_table(ring_slots),
            row_seqlens=(page * PAGE_TOKENS).to(self.device, torch.int32),
        )
        return self.metadata

    def plan_decode(self, cache_seqlens: torch.Tensor, block_table: torch.Tensor, ring_table: torch.Tensor,
                    step: int) -> DecodeMetadata:
        """Plan a decode step on device tensors (no host work: a CUDA graph captures it)."""
        self.metadata = DecodeMetadata(cache_seqlens, block_table, ring_table, step, cache_seqlens + 1)
        return self.metadata

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q ``[T, Hq, D]``, k and v ``[T, Hkv, D]`` (rotated) -> ``[T, Hq, D]``; stores k and v."""
        if isinstance(self.metadata, DecodeMetadata):
            return self._decode(layer, q[:, None], k[:, None], v[:, None], self.metadata)[:, 0]
        return self._prefill(layer, q, k, v, self.metadata)

    def _prefill(self, layer, q, k, v, plan: PrefillMetadata) -> torch.Tensor:
        rows = (-1, PAGE_TOKENS) + k.shape[1:]
        # k, v: [R, 64, Hkv, D], every prompt's tokens in one append.
        self.caches[layer].append(k.index_select(0, plan.row_tokens).view(rows),
                                  v.index_select(0, plan.row_tokens).view(rows),
                                  plan.row_block_table, plan.row_ring_table, plan.row_seqlens)
        cu, max_len = plan.cu_seqlens, plan.max_seqlen
        if self.head_mask_type is not None and self.has_streaming[layer]:
            return token_streaming_attn_func(q, k, v, cu, cu, self.head_mask_type[layer], self.streaming_info[layer],
                                             max_len, max_len)
        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True,
                                      window_size=(self.window_left[layer], -1))

    def _decode(self, layer, q, k, v, plan: DecodeMetadata) -> torch.Tensor:
        # q: [B, 1, Hq, D], k/v: [B, 1, Hkv, D]
        cache = self.caches[layer]
        if self.lserve is None:
            return flash_attn_with_kvcache(q, cache.k, cache.v, k, v, cache_seqlens=plan.cache_seqlens,
                                           block_table=plan.block_table, causal=True,
                                           window_size=(self.window_left[layer], -1))
        cache.append(k, v, plan.block_table, plan.ring_table, plan.cache_seqlens)
        selection = self.selectors[layer](plan.step, q, cache.stats, plan.block_table, plan.context_lens)
        return sparse_decode(q, cache, plan.block_table, plan.ring_table, plan.context_lens, selection)

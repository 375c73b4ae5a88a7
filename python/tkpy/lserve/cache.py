"""One layer's LServe KV pools: retrieval heads in a paged pool with page stats, streaming heads in
a constant-size ring per sequence (DESIGN.md §5)."""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

from .. import _ops
from ..errors import ArgumentError
from ..validation import values_checked
from .config import LOGICAL_PAGE_TOKENS, PAGE_TOKENS, LServeConfig

__all__ = ["PageStats", "LServeCache"]

LOGICAL_PER_PAGE = PAGE_TOKENS // LOGICAL_PAGE_TOKENS
HEAD_DIMS = (64, 128, 256)


class PageStats(NamedTuple):
    """Per-channel min and max of the keys of every logical page (16 tokens) of a pool.

    k_min, k_max : float32 ``[num_pages, 4, Hr, D]``
        Logical page l of physical page p of pool head r. Taken from the keys after RoPE and
        before quantisation; kept up to date by every append.
    kv_head_slot : int32 ``[Hkv]``, optional
        The model's kv head h is pool head ``kv_head_slot[h]`` when that is >= 0, and a streaming
        head (no stats) otherwise. None: the pool holds every kv head, in order.
    """

    k_min: torch.Tensor
    k_max: torch.Tensor
    kv_head_slot: Optional[torch.Tensor] = None

    @classmethod
    def allocate(cls, num_pages: int, heads: int, head_dim: int, device=None,
                 kv_head_slot: Optional[torch.Tensor] = None) -> "PageStats":
        shape = (num_pages, LOGICAL_PER_PAGE, heads, head_dim)
        return cls(torch.zeros(shape, dtype=torch.float32, device=device),
                   torch.zeros(shape, dtype=torch.float32, device=device), kv_head_slot)

    @property
    def num_kv_heads(self) -> int:
        return self.k_max.shape[2] if self.kv_head_slot is None else self.kv_head_slot.shape[0]


def _streaming_flags(flags) -> list[bool]:
    if isinstance(flags, torch.Tensor):
        if flags.dtype != torch.bool or flags.dim() != 1:
            raise TypeError(f"LServeCache: kv_head_streaming must be a 1-D bool tensor or list, got {flags.dtype} {tuple(flags.shape)}")
        flags = flags.tolist()
    flags = list(flags)
    if not flags or not all(isinstance(f, bool) for f in flags):
        raise TypeError(f"LServeCache: kv_head_streaming must be a non-empty list of bools (one per kv head), got {flags!r}")
    return flags


class LServeCache:
    """The K/V pools of one layer.

    Parameters
    ----------
    num_pages : int
        Pages of 64 tokens in the retrieval pool (shared by every sequence through block tables).
    max_seqs : int
        Sequences that can hold a streaming ring at once (ring slots).
    kv_head_streaming : bool list or Tensor ``[Hkv]``
        True where the kv head is streaming (e.g. ``HeadPattern.streaming_mask[layer]``).
    head_dim : int
        64, 128 or 256.
    dtype : torch.bfloat16 or torch.float16
        The model's dtype (q, k and v).
    config : LServeConfig, optional
        ``sink``, ``local`` and the KV dtype and scales are read from it.
    page_stats : bool
        Keep the retrieval pool's page stats (default). A cache that is only ever read densely
        (every page) can skip them and save their memory, 1/8 of a bf16 pool's.

    Attributes
    ----------
    k, v : ``[num_pages, 64, Hr, D]``, the retrieval pool (Hr retrieval heads; int8 with INT8 KV).
    stats : PageStats of the retrieval pool, or None without ``page_stats``.
    k_ring, v_ring : ``[max_seqs · ring_pages, 64, Hs, D]``, the streaming ring pool.
    kv_head_slot : int32 ``[Hkv]``: retrieval head h is pool head ``slot >= 0``, streaming head h
        is ring head ``-1 - slot``.
    ring_pages : int, ``sink/64 + local/64 + 1``.
    """

    def __init__(self, num_pages: int, max_seqs: int, kv_head_streaming: Union[Sequence[bool], torch.Tensor],
                 head_dim: int, dtype: torch.dtype, config: Optional[LServeConfig] = None, device=None,
                 page_stats: bool = True):
        config = LServeConfig() if config is None else config
        if not isinstance(config, LServeConfig):
            raise TypeError(f"LServeCache: config must be an LServeConfig, got {type(config).__name__}")
        for name, value in (("num_pages", num_pages), ("max_seqs", max_seqs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ArgumentError(f"LServeCache: {name} must be an int >= 1, got {value!r}")
        if head_dim not in HEAD_DIMS:
            raise ArgumentError(f"LServeCache: head_dim must be one of {HEAD_DIMS}, got {head_dim!r}")
        if dtype not in (torch.bfloat16, torch.float16):
            raise ArgumentError(f"LServeCache: dtype must be torch.bfloat16 or torch.float16, got {dtype}")
        streaming = _streaming_flags(kv_head_streaming)
        retrieval_slots = iter(range(len(streaming)))
        ring_slots = iter(range(len(streaming)))
        slots = [-1 - next(ring_slots) if s else next(retrieval_slots) for s in streaming]

        self.config = config
        self.dtype = dtype
        self.kv_dtype = dtype if config.kv_dtype is None else config.kv_dtype
        self.k_scale = 1.0 if config.k_scale is None else float(config.k_scale)
        self.v_scale = 1.0 if config.v_scale is None else float(config.v_scale)
        self.sink, self.local = config.sink, config.local
        self.ring_pages = config.ring_pages
        self.max_seqs = max_seqs
        self.num_kv_heads = len(streaming)
        self.num_streaming_heads = sum(streaming)
        self.num_retrieval_heads = self.num_kv_heads - self.num_streaming_heads
        self.kv_head_streaming = torch.tensor(streaming, dtype=torch.bool, device=device)
        self.kv_head_slot = torch.tensor(slots, dtype=torch.int32, device=device)
        pool = (num_pages, PAGE_TOKENS, self.num_retrieval_heads, head_dim)
        ring = (max_seqs * self.ring_pages, PAGE_TOKENS, self.num_streaming_heads, head_dim)
        self.k = torch.zeros(pool, dtype=self.kv_dtype, device=device)
        self.v = torch.zeros(pool, dtype=self.kv_dtype, device=device)
        self.k_ring = torch.zeros(ring, dtype=self.kv_dtype, device=device)
        self.v_ring = torch.zeros(ring, dtype=self.kv_dtype, device=device)
        self.stats = PageStats.allocate(num_pages, self.num_retrieval_heads, head_dim, device,
                                        self.kv_head_slot) if page_stats else None

    @property
    def num_pages(self) -> int:
        return self.k.shape[0]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    @property
    def device(self) -> torch.device:
        return self.k.device

    def ring_table(self, slots: torch.Tensor) -> torch.Tensor:
        """int32 ``[B, ring_pages]``: the ring pool pages of each sequence's slot (int32 ``[B]``,
        each in ``[0, max_seqs)``): row = ``slot · ring_pages + arange(ring_pages)``."""
        if not isinstance(slots, torch.Tensor) or slots.dim() != 1 or slots.dtype not in (torch.int32, torch.int64):
            raise TypeError("LServeCache.ring_table: slots must be a 1-D int32 Tensor [batch]")
        if values_checked(slots) and slots.numel() and not 0 <= int(slots.min()) <= int(slots.max()) < self.max_seqs:
            raise ArgumentError(f"LServeCache.ring_table: slots must be in [0, {self.max_seqs}), got {slots.tolist()}")
        pages = torch.arange(self.ring_pages, dtype=torch.int64, device=slots.device)
        return (slots.long()[:, None] * self.ring_pages + pages[None, :]).to(torch.int32)

    def append(self, k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor, ring_table: torch.Tensor,
               cache_seqlens: torch.Tensor, rotary_cos: Optional[torch.Tensor] = None,
               rotary_sin: Optional[torch.Tensor] = None, rotary_interleaved: bool = False) -> None:
        """Write ``S_new`` tokens per sequence at positions ``cache_seqlens[b] + i``, in one launch.

        Retrieval heads go to the pool (their page stats updated from the rotated keys before
        quantisation), streaming heads to the ring (only tokens the ring keeps). A prefill is an
        append at ``cache_seqlens = 0``.

        Parameters
        ----------
        k, v : Tensor ``[B, S_new, Hkv, D]``, the model's dtype
        block_table : int32 ``[B, max_pages]``: pool page of each 64-token page of a sequence
        ring_table : int32 ``[B, ring_pages]`` (:meth:`ring_table`)
        cache_seqlens : int32 ``[B]``: tokens before the append (not modified)
        rotary_cos, rotary_sin : ``[rows, R/2]``, optional: rotate k at its positions first
        rotary_interleaved : bool: GPT-J pairs if True, neox pairs if False
        """
        fn = "LServeCache.append"
        for name, t in (("k", k), ("v", v)):
            if isinstance(t, torch.Tensor) and t.dtype != self.dtype:
                raise ArgumentError(f"{fn}: {name} must have the cache's model dtype {self.dtype}, got {t.dtype}")
        k_min, k_max = (None, None) if self.stats is None else (self.stats.k_min, self.stats.k_max)
        _ops.call("kv_append_", self.k, self.v, k, v, cache_seqlens, block_table=block_table, k_min=k_min, k_max=k_max,
                  rotary_cos=rotary_cos, rotary_sin=rotary_sin, rotary_interleaved=bool(rotary_interleaved),
                  k_scale=self.k_scale, v_scale=self.v_scale, **self.ring_arguments(ring_table))

    def ring_arguments(self, ring_table: torch.Tensor) -> dict:
        """The keyword arguments that make kv_append_ and decode_attention LServe's: the head roles,
        the ring pools and their table, sink and local."""
        return dict(kv_head_slot=self.kv_head_slot, k_ring=self.k_ring, v_ring=self.v_ring, ring_table=ring_table,
                    sink=self.sink, local=self.local)

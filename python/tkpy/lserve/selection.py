"""LServe's query-aware page selection for retrieval heads at decode (DESIGN.md §5).

Everything here is device ops with shapes taken from the block table, never from the lengths'
values: no host sync, so a decode step that selects pages can be captured in a CUDA graph or
traced by torch.compile.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..errors import ArgumentError
from ..validation import values_checked
from .cache import LOGICAL_PER_PAGE, PageStats
from .config import LOGICAL_PAGE_TOKENS, PAGE_TOKENS

__all__ = ["PageSelection", "PageSelector", "page_scores", "select_pages"]

MAX_GROUP = 32  # head_bits holds one bit per query head of a GQA group


class PageSelection(NamedTuple):
    """Pages that retrieval heads read in a decode step.

    selected : bool ``[B, Hq, max_pages]``
        Per query head; False beyond each sequence's pages and for streaming heads.
    page_indices : int32 ``[B, Hkv, n]``, ``n <= max_pages`` the longest union the budget allows
        The union over each kv head's query heads, ascending, then unselected pages.
    page_counts : int32 ``[B, Hkv]``
        Length of each union.
    head_bits : int32 ``[B, Hkv, n]``
        Bit j of entry i: query head ``kv_head · group + j`` selected page ``page_indices[..., i]``.
    """

    selected: torch.Tensor
    page_indices: torch.Tensor
    page_counts: torch.Tensor
    head_bits: torch.Tensor


def _check_inputs(fn: str, q, stats, block_table, cache_seqlens) -> torch.Tensor:
    """q as ``[B, Hq, D]`` after checking shapes, dtypes and devices (no values: that would sync)."""
    if not isinstance(q, torch.Tensor) or q.dim() not in (3, 4) or (q.dim() == 4 and q.shape[1] != 1):
        raise ArgumentError(f"{fn}: q must be a Tensor [batch, heads_q, head_dim] or [batch, 1, heads_q, head_dim]"
                         f"{'' if not isinstance(q, torch.Tensor) else f', got {tuple(q.shape)}'}")
    q = q[:, 0] if q.dim() == 4 else q
    if q.dtype not in (torch.bfloat16, torch.float16) or q.shape[1] < 1:
        raise ArgumentError(f"{fn}: q must be bfloat16 or float16 with at least one head, got {q.dtype} "
                            f"{tuple(q.shape)}")
    if not isinstance(stats, PageStats):
        raise TypeError(f"{fn}: stats must be a PageStats (LServeCache.stats; None when the cache was made "
                        f"with page_stats=False), got {type(stats).__name__}")
    for name, t in (("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
            raise TypeError(f"{fn}: {name} must be an int32 Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    batch, heads_q, head_dim = q.shape
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.shape[1] < 1:
        raise ArgumentError(f"{fn}: block_table must be [batch={batch}, max_pages >= 1], got {tuple(block_table.shape)}")
    if tuple(cache_seqlens.shape) != (batch,):
        raise ArgumentError(f"{fn}: cache_seqlens must be [batch={batch}], got {tuple(cache_seqlens.shape)}")
    if stats.k_max.dim() != 4 or stats.k_max.shape[1] != LOGICAL_PER_PAGE or stats.k_max.shape[3] != head_dim \
            or stats.k_min.shape != stats.k_max.shape or stats.k_min.dtype != torch.float32 \
            or stats.k_max.dtype != torch.float32:
        raise ArgumentError(f"{fn}: stats must be float32 [num_pages, {LOGICAL_PER_PAGE}, heads, head_dim={head_dim}], "
                            f"got {stats.k_min.dtype} {tuple(stats.k_min.shape)} and {stats.k_max.dtype} "
                            f"{tuple(stats.k_max.shape)}")
    heads_kv = stats.num_kv_heads
    if heads_q % heads_kv or heads_q // heads_kv > MAX_GROUP:
        raise ArgumentError(f"{fn}: q's {heads_q} heads must be a multiple of the {heads_kv} kv heads, "
                         f"at most {MAX_GROUP} per kv head")
    for name, t in (("stats", stats.k_max), ("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        if t.device != q.device:
            raise ArgumentError(f"{fn}: {name} must be on q's device {q.device}, got {t.device}")
    if block_table.shape[1] > 2**31 - 1:
        raise ArgumentError(f"{fn}: block_table has {block_table.shape[1]} columns, more than int32 indices address")
    if values_checked(cache_seqlens):
        _check_values(fn, stats, block_table, cache_seqlens)
    return q


def _check_values(fn: str, stats: PageStats, block_table: torch.Tensor, cache_seqlens: torch.Tensor) -> None:
    """The pages each sequence holds are in the pool, its length within block_table's capacity, and
    kv_head_slot names distinct pool heads that exist (host reads: the validation policy's)."""
    capacity = block_table.shape[1] * PAGE_TOKENS
    lengths = cache_seqlens.tolist()
    for b, length in enumerate(lengths):
        if not 0 <= length <= capacity:
            raise ArgumentError(f"{fn}: cache_seqlens[{b}] = {length} is outside [0, {capacity}] "
                                f"(block_table's {block_table.shape[1]} pages of {PAGE_TOKENS} tokens)")
        used = block_table[b, :-(-length // PAGE_TOKENS)]
        if used.numel() and not 0 <= int(used.min()) <= int(used.max()) < stats.k_max.shape[0]:
            raise ArgumentError(f"{fn}: block_table[{b}] holds pages outside the {stats.k_max.shape[0]} pages of "
                                f"stats in its first {used.numel()} entries: {used.tolist()}")
    if stats.kv_head_slot is not None:
        slots = stats.kv_head_slot.tolist()
        retrieval = [s for s in slots if s >= 0]
        if len(set(slots)) != len(slots) or any(s >= stats.k_max.shape[2] for s in retrieval):
            raise ArgumentError(f"{fn}: stats.kv_head_slot must name distinct pool heads in [0, "
                                f"{stats.k_max.shape[2]}) (and -1 - ring head for streaming heads), got {slots}")


def _retrieval_query_heads(stats: PageStats, heads_q: int, device) -> torch.Tensor:
    """bool ``[Hq]``: query heads whose kv head has page stats."""
    if stats.kv_head_slot is None:
        return torch.ones(heads_q, dtype=torch.bool, device=device)
    group = heads_q // stats.kv_head_slot.shape[0]
    return (stats.kv_head_slot >= 0).repeat_interleave(group)


def _physical_scores(q: torch.Tensor, stats: PageStats, pages: torch.Tensor, n_logical: torch.Tensor) -> torch.Tensor:
    """float32 ``[B, Hq, max_pages]``: max over each page's logical pages that hold tokens (the
    first ``n_logical[b]`` of the sequence) of relu(q)·kmax + min(q, 0)·kmin.

    ``pages`` int64 ``[B, max_pages]`` are valid pool pages (callers clamp padding).
    """
    batch, heads_q, head_dim = q.shape
    heads_kv = stats.num_kv_heads
    if stats.kv_head_slot is None:
        pool_head = torch.arange(heads_kv, device=q.device)
    else:
        pool_head = stats.kv_head_slot.long().clamp(min=0)  # streaming heads' rows are masked later
    logical = torch.arange(LOGICAL_PER_PAGE, device=q.device)
    index = (pages[:, :, None, None], logical[None, None, :, None], pool_head[None, None, None, :])
    k_max = stats.k_max[index]  # [B, P, 4, Hkv, D]
    k_min = stats.k_min[index]
    q_grouped = q.float().view(batch, heads_kv, heads_q // heads_kv, head_dim)
    # The upper bound of q·k over the box [kmin, kmax]: each channel takes the corner that q favours.
    logical_scores = torch.einsum("bkgd,bnlkd->bkgnl", q_grouped.clamp(min=0), k_max) + \
        torch.einsum("bkgd,bnlkd->bkgnl", q_grouped.clamp(max=0), k_min)
    # The newest page's logical pages past the sequence's end hold stale stats: leave them out.
    logical_index = torch.arange(pages.shape[1] * LOGICAL_PER_PAGE, device=q.device).view(pages.shape[1], LOGICAL_PER_PAGE)
    holds_tokens = logical_index[None] < n_logical[:, None, None]  # [B, P, 4]
    logical_scores = torch.where(holds_tokens[:, None, None], logical_scores, float("-inf"))
    return logical_scores.amax(dim=-1).reshape(batch, heads_q, pages.shape[1])


def page_scores(q: torch.Tensor, stats: PageStats, block_table: torch.Tensor, cache_seqlens: torch.Tensor) -> torch.Tensor:
    """The selection score of every page of every sequence, per query head.

    ``score(h, page) = max over its logical pages (16 tokens; those holding tokens) of
    sum_c max(q_c · kmax_c, q_c · kmin_c)``
    (no 1/sqrt(D)): an upper bound of ``q_h · k`` for every key k of the page.

    Parameters
    ----------
    q : Tensor ``[B, Hq, D]`` or ``[B, 1, Hq, D]``
    stats : PageStats (``LServeCache.stats``)
    block_table : int32 ``[B, max_pages]``
    cache_seqlens : int32 ``[B]``: tokens in the cache, the current one included

    Returns
    -------
    float32 ``[B, Hq, max_pages]``; -inf for pages past ``ceil(cache_seqlens / 64)`` and for
    streaming heads.
    """
    q = _check_inputs("page_scores", q, stats, block_table, cache_seqlens)
    return _masked_scores(q, stats, block_table, cache_seqlens)[0]


def _masked_scores(q, stats, block_table, cache_seqlens):
    batch, heads_q, _ = q.shape
    max_pages = block_table.shape[1]
    n_pages = (cache_seqlens.long() + PAGE_TOKENS - 1) // PAGE_TOKENS  # [B]
    column = torch.arange(max_pages, device=q.device)
    in_sequence = column[None, :] < n_pages[:, None]  # [B, P]
    retrieval = _retrieval_query_heads(stats, heads_q, q.device)  # [Hq]
    if stats.k_max.shape[2] == 0:  # no retrieval head in this layer
        scores = torch.full((batch, heads_q, max_pages), float("-inf"), dtype=torch.float32, device=q.device)
        return scores, n_pages, in_sequence, retrieval
    # Padding entries of the table may hold anything: read page 0 there, then mask.
    pages = torch.where(in_sequence, block_table.long(), 0).clamp(0, stats.k_max.shape[0] - 1)
    n_logical = (cache_seqlens.long() + LOGICAL_PAGE_TOKENS - 1) // LOGICAL_PAGE_TOKENS
    scores = _physical_scores(q, stats, pages, n_logical)
    visible = in_sequence[:, None, :] & retrieval[None, :, None]
    return torch.where(visible, scores, float("-inf")), n_pages, in_sequence, retrieval


def _head_bits(selected_grouped: torch.Tensor) -> torch.Tensor:
    """int32 ``[B, Hkv, P]`` with bit j set where query head j of the group selected the page."""
    group = selected_grouped.shape[2]
    weights = torch.ones(group, dtype=torch.int64, device=selected_grouped.device) << torch.arange(
        group, device=selected_grouped.device)
    bits = (selected_grouped.long() * weights[None, None, :, None]).sum(dim=2)
    # Bit 31 belongs to the sign of an int32: wrap it there explicitly.
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)


def select_pages(q: torch.Tensor, stats: PageStats, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                 token_budget: int = 4096) -> PageSelection:
    """Pick the pages each retrieval query head reads (LServe's dynamic sparsity).

    With ``n`` pages of 64 tokens in sequence b: if ``cache_seqlens[b] <= token_budget`` every
    page; otherwise the ``K = min(max(3, token_budget // 64), n) - 1`` best pages by
    :func:`page_scores` among pages ``[0, n - 1)``, plus the newest page ``n - 1``. Per query head.

    Parameters
    ----------
    q : Tensor ``[B, Hq, D]`` or ``[B, 1, Hq, D]``, the (rotated) decode queries
    stats : PageStats (``LServeCache.stats``)
    block_table : int32 ``[B, max_pages]``
    cache_seqlens : int32 ``[B]``: tokens in the cache, the current one included
    token_budget : int

    Returns
    -------
    PageSelection; its lists feed :func:`tkpy.lserve.sparse_decode`.
    """
    if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
        raise ArgumentError(f"select_pages: token_budget must be an int >= 1, got {token_budget!r}")
    q = _check_inputs("select_pages", q, stats, block_table, cache_seqlens)
    batch, heads_q, _ = q.shape
    heads_kv = stats.num_kv_heads
    max_pages = block_table.shape[1]
    scores, n_pages, in_sequence, retrieval = _masked_scores(q, stats, block_table, cache_seqlens)
    column = torch.arange(max_pages, device=q.device)
    newest = column[None, :] == (n_pages - 1)[:, None]  # [B, P]
    older = in_sequence & ~newest

    most_pages = max(3, token_budget // PAGE_TOKENS)
    top_k = n_pages.clamp(max=most_pages) - 1  # [B]: pages taken by score
    width = min(most_pages - 1, max_pages)
    candidates = torch.where(older[:, None, :], scores, float("-inf"))
    best = candidates.topk(width, dim=-1).indices  # [B, Hq, width], best first
    within_k = (torch.arange(width, device=q.device)[None, :] < top_k[:, None])[:, None, :].expand(batch, heads_q, width)
    chosen = torch.zeros(batch, heads_q, max_pages, dtype=torch.bool, device=q.device).scatter(-1, best, within_k)
    sparse = (chosen & older[:, None, :]) | newest[:, None, :]
    fits = (cache_seqlens <= token_budget)[:, None, None]
    selected = torch.where(fits, in_sequence[:, None, :], sparse) & retrieval[None, :, None]

    group = heads_q // heads_kv
    grouped = selected.view(batch, heads_kv, group, max_pages)
    union = grouped.any(dim=2)  # [B, Hkv, P]
    # A stable sort of "not selected" puts the selected pages first, in ascending order. A union
    # holds at most every page of a sequence within the budget, or each head's K pages plus the
    # newest: the lists keep that many columns, so the kernel's split-KV is sized by what it reads.
    longest_union = min(max_pages, max(-(-token_budget // PAGE_TOKENS), group * (most_pages - 1) + 1))
    page_indices = torch.argsort((~union).to(torch.uint8), dim=-1, stable=True)[..., :longest_union]
    page_counts = union.sum(dim=-1, dtype=torch.int32)
    head_bits = _head_bits(grouped).gather(-1, page_indices)
    return PageSelection(selected, page_indices.to(torch.int32), page_counts, head_bits)


class PageSelector:
    """Page selection reused across decode steps.

    ``selector(step, q, stats, block_table, cache_seqlens)`` recomputes :func:`select_pages` when
    ``step % reuse_interval == 0`` or when nothing is cached, and otherwise returns the cached
    selection unchanged (its pages stay valid as the sequence grows; the kernel always adds the
    current newest page). Call :meth:`reset` at every prefill.
    """

    def __init__(self, token_budget: int = 4096, reuse_interval: int = 4):
        if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
            raise ArgumentError(f"PageSelector: token_budget must be an int >= 1, got {token_budget!r}")
        if isinstance(reuse_interval, bool) or not isinstance(reuse_interval, int) or reuse_interval < 1:
            raise ArgumentError(f"PageSelector: reuse_interval must be an int >= 1, got {reuse_interval!r}")
        self.token_budget = token_budget
        self.reuse_interval = reuse_interval
        self.selection: Optional[PageSelection] = None

    @classmethod
    def from_config(cls, config) -> "PageSelector":
        return cls(config.token_budget, config.reuse_interval)

    def __call__(self, step: int, q: torch.Tensor, stats: PageStats, block_table: torch.Tensor,
                 cache_seqlens: torch.Tensor) -> PageSelection:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ArgumentError(f"PageSelector: step must be an int >= 0, got {step!r}")
        if self.selection is None or step % self.reuse_interval == 0:
            self.selection = select_pages(q, stats, block_table, cache_seqlens, self.token_budget)
        return self.selection

    def reset(self) -> None:
        """Forget the cached selection (a new prefill changes the sequences)."""
        self.selection = None

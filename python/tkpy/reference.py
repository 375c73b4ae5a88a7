"""The test oracle: straightforward, slow PyTorch, meant to run in float64.

Nothing here shares code with the implementations it checks. Each function returns a new tensor
and never modifies its inputs.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

__all__ = ["REL_TOL", "relative_error", "rope_frequencies", "rope", "rope_3d_table", "rope_3d", "matmul", "attention",
           "block_sparse_attention", "ultravico_attention", "attention_grads", "page_stats", "page_scores",
           "select_pages"]

# The one tolerance table of tkpy's tests and benchmarks (DESIGN.md §7): the largest
# ‖out − reference‖ / ‖reference‖ accepted from an op computing in each dtype (fp32 for the CPU
# path's fp32 math).
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 3e-3}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64; a NaN anywhere in ``out`` is infinitely wrong."""
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def rope_frequencies(dim: int, theta: float, k: Optional[int] = None, L_test: Optional[float] = None) -> torch.Tensor:
    """float64 ``[dim/2]``: ``theta^(-2j/dim)``, with component ``k`` (1-based) set to ``0.9·2π/L_test``."""
    freqs = torch.tensor([theta ** (-2.0 * j / dim) for j in range(dim // 2)], dtype=torch.float64)
    if k is not None:
        freqs[k - 1] = 0.9 * 2 * math.pi / L_test
    return freqs


def rope(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: Optional[torch.Tensor] = None,
    interleaved: bool = False,
) -> torch.Tensor:
    """Rotary embedding of ``x`` ``[B, S, H, D]`` or ``[T, H, D]`` by rows of ``cos``/``sin`` ``[P, R/2]``."""
    x = x.double()
    seq_dim = x.dim() - 3
    seqlen = x.shape[seq_dim]
    if positions is None:
        positions = torch.arange(seqlen)
    positions = positions.long()
    c = cos.double()[positions]  # [S, R/2] or [B, S, R/2]
    s = sin.double()[positions]
    if c.dim() == 2 and x.dim() == 4:
        c, s = c.unsqueeze(0), s.unsqueeze(0)
    c, s = c.unsqueeze(-2), s.unsqueeze(-2)  # broadcast over heads
    rotary = 2 * cos.shape[-1]
    out = x.clone()
    if interleaved:
        pairs = torch.view_as_complex(x[..., :rotary].reshape(*x.shape[:-1], rotary // 2, 2).contiguous())
        rotated = torch.view_as_real(pairs * torch.complex(c, s))
        out[..., :rotary] = rotated.reshape(*x.shape[:-1], rotary)
    else:
        x1, x2 = x[..., : rotary // 2], x[..., rotary // 2 : rotary]
        out[..., : rotary // 2] = x1 * c - x2 * s
        out[..., rotary // 2 : rotary] = x2 * c + x1 * s
    return out


def rope_3d_table(grid_thw: Sequence[int], freqs_t: torch.Tensor, freqs_h: torch.Tensor, freqs_w: torch.Tensor) -> torch.Tensor:
    """The materialised complex128 ``[T·H·W, (dt+dh+dw)/2]`` table of a (t, h, w) token grid.

    ``freqs_*`` are complex ``[L, d/2]`` tables (only the first T, H, W rows are used).
    """
    t_len, h_len, w_len = grid_thw
    ft = freqs_t[:t_len].to(torch.complex128)[:, None, None, :].expand(t_len, h_len, w_len, -1)
    fh = freqs_h[:h_len].to(torch.complex128)[None, :, None, :].expand(t_len, h_len, w_len, -1)
    fw = freqs_w[:w_len].to(torch.complex128)[None, None, :, :].expand(t_len, h_len, w_len, -1)
    return torch.cat([ft, fh, fw], dim=-1).reshape(t_len * h_len * w_len, -1)


def rope_3d(x: torch.Tensor, grid_thw: Sequence[int], freqs_t: torch.Tensor, freqs_h: torch.Tensor, freqs_w: torch.Tensor) -> torch.Tensor:
    """3D RoPE of ``x`` ``[B, S, H, D]`` through the materialised table, interleaved pairs."""
    table = rope_3d_table(grid_thw, freqs_t, freqs_h, freqs_w)  # [S, R/2]
    rotary = 2 * table.shape[-1]
    x = x.double()
    out = x.clone()
    pairs = torch.view_as_complex(x[..., :rotary].reshape(*x.shape[:-1], rotary // 2, 2).contiguous())
    out[..., :rotary] = torch.view_as_real(pairs * table[None, :, None, :]).reshape(*x.shape[:-1], rotary)
    return out


def matmul(a: torch.Tensor, b: torch.Tensor, trans_b: bool = False) -> torch.Tensor:
    """``a @ b`` (``a @ b.T`` with ``trans_b``) in float64."""
    b = b.double()
    return a.double() @ (b.T if trans_b else b)


def _attention_one_sequence(q, k, v, causal, window_size, softcap, softmax_scale):
    """One sequence: q ``[Sq, Hq, D]``, k/v ``[Sk, Hkv, D]`` -> out ``[Sq, Hq, D]``, lse ``[Hq, Sq]``."""
    q, k, v = q.double(), k.double(), v.double()
    seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[0], k.shape[1]
    group = heads_q // heads_kv
    k = k.repeat_interleave(group, dim=1)  # query head h reads kv head h // group
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [Hq, Sq, Sk]
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)

    left, right = window_size
    if causal:
        right = 0
    i = torch.arange(seqlen_q, device=q.device)[:, None]
    j = torch.arange(seqlen_k, device=q.device)[None, :]
    diagonal = i + seqlen_k - seqlen_q  # bottom-right aligned
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if left >= 0:
        visible &= j >= diagonal - left
    if right >= 0:
        visible &= j <= diagonal + right

    return _masked_attention(q, k, v, visible.expand(heads_q, -1, -1), scores=scores)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    softmax_scale: Optional[float] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
):
    """Dense attention in float64 with flash-attn's layouts and masks, one explicit mask per sequence.

    Batched: q ``[B, Sq, Hq, D]``, k/v ``[B, Sk, Hkv, D]`` -> out ``[B, Sq, Hq, D]``, lse
    ``[B, Hq, Sq]``. Varlen (``cu_seqlens_*`` given, ``[B+1]``): q ``[Tq, Hq, D]``, k/v
    ``[Tk, Hkv, D]`` -> out ``[Tq, Hq, D]``, lse ``[Hq, Tq]``.

    Query i of a sequence sees key j iff ``i+Sk-Sq-left <= j <= i+Sk-Sq+right`` and ``0 <= j < Sk``,
    where -1 leaves that side unbounded and causal sets right to 0. Scores are ``q·k·scale``
    (default ``1/sqrt(D)``), then ``softcap·tanh(s/softcap)`` when softcap > 0. A row that sees no
    key gives out 0 and lse -inf. Both results are float64.
    """
    def one_sequence(q, k, v):
        return _attention_one_sequence(q, k, v, causal, window_size, softcap, softmax_scale)

    return _each_sequence(q, k, v, cu_seqlens_q, cu_seqlens_k, one_sequence)


def _each_sequence(q, k, v, cu_seqlens_q, cu_seqlens_k, one_sequence):
    """``one_sequence(q, k, v) -> (out [Sq, Hq, D], lse [Hq, Sq])`` over each batch entry, or over
    each packed sequence (``cu_seqlens_*``), assembled as :func:`attention` returns them."""
    if cu_seqlens_q is None:
        results = [one_sequence(q[b], k[b], v[b]) for b in range(q.shape[0])]
        return torch.stack([o for o, _ in results]), torch.stack([l for _, l in results])
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float64, device=q.device)
    for b in range(len(starts_q) - 1):
        q0, q1 = starts_q[b], starts_q[b + 1]
        k0, k1 = starts_k[b], starts_k[b + 1]
        out[q0:q1], lse[:, q0:q1] = one_sequence(q[q0:q1], k[k0:k1], v[k0:k1])
    return out, lse


def _ultravico_one_sequence(q, k, v, softmax_scale, query_offset, total_queries, tokens_per_frame, train_frames, alpha,
                            beta, band_period, band_width, band_count, first_frame_mask, text_tokens):
    """One sequence of :func:`ultravico_attention`: q ``[Sq, Hq, D]`` (queries ``query_offset..`` of
    ``total_queries``), k/v ``[Sk, Hkv, D]``."""
    q, k, v = q.double(), k.double(), v.double()
    seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[0], k.shape[1]
    group = heads_q // heads_kv
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    key_mean = k.mean(dim=0) if seqlen_k > 0 else torch.zeros(heads_kv, head_dim, dtype=torch.float64)  # [Hkv, D]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    key_mean = key_mean.repeat_interleave(group, dim=0)  # [Hq, D]
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale  # [Hq, Sq, Sk]
    centre = torch.einsum("qhd,hd->hq", q, key_mean)[:, :, None] * scale  # [Hq, Sq, 1]

    hw = tokens_per_frame
    i = torch.arange(seqlen_q, device=q.device)[:, None] + query_offset
    j = torch.arange(seqlen_k, device=q.device)[None, :]
    total_queries = seqlen_q if total_queries is None else total_queries
    video_pair = (i < total_queries - text_tokens) & (j < seqlen_k - text_tokens)
    distance = (i - j).abs()
    in_band = torch.zeros(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    for m in range(1, band_count + 1):
        in_band |= (distance >= (m * band_period - band_width) * hw) & (distance <= (m * band_period + band_width) * hw)
    beyond = 2 * distance > train_frames * hw
    factor = torch.where(in_band, beta, torch.where(beyond, alpha, 1.0)).double()
    factor = torch.where(video_pair, factor, torch.ones_like(factor))
    decayed = torch.where(scores > centre, centre + factor * (scores - centre), scores)

    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if first_frame_mask:  # frame-0 video queries against video keys of frames >= train_frames
        visible &= ~(video_pair & (i // hw == 0) & (j // hw >= train_frames))
    return _masked_attention(q, k, v, visible.expand(heads_q, -1, -1), scores=decayed)


def ultravico_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    tokens_per_frame: int,
    train_frames: int,
    alpha: float = 0.9,
    beta: float = 1.0,
    band_period: int = 0,
    band_width: int = 0,
    band_count: int = 0,
    first_frame_mask: bool = False,
    text_tokens: int = 0,
    softmax_scale: Optional[float] = None,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    query_offset: int = 0,
    total_queries: Optional[int] = None,
):
    """UltraViCo's attention (arXiv 2511.20123) in float64, straight from its definition; layouts and
    results as :func:`attention` (non-causal, no window). Batched, q may hold only some rows of its
    sequences: queries ``query_offset`` on, of ``total_queries`` (default: q's length).

    Per sequence, tokens are video frame-major (frame = index // tokens_per_frame), then the last
    ``text_tokens`` are text. s = q_i·k_j·scale, c_i = q_i·k̄·scale with k̄ the mean of the sequence's
    keys of that kv head. For a pair of video tokens with s > c_i, s becomes c_i + f·(s − c_i) where f
    is ``beta`` if ``(m·band_period − band_width)·HW <= |i − j| <= (m·band_period + band_width)·HW``
    for some m in 1..band_count, else ``alpha`` if ``2|i − j| > train_frames·HW``, else 1. With
    ``first_frame_mask``, a video query of frame 0 does not see video keys of frames >= train_frames.
    """
    settings = (tokens_per_frame, train_frames, alpha, beta, band_period, band_width, band_count, first_frame_mask,
                text_tokens)
    if cu_seqlens_q is not None and (query_offset or total_queries is not None):
        raise ValueError("ultravico_attention: query_offset and total_queries are for batched inputs")

    def one_sequence(q, k, v):
        return _ultravico_one_sequence(q, k, v, softmax_scale, query_offset, total_queries, *settings)

    return _each_sequence(q, k, v, cu_seqlens_q, cu_seqlens_k, one_sequence)


SPARSE_BLOCK = 128  # the token size of Block-Sparse-Attention's mask blocks and streaming blocks


def block_sparse_mask(seqlen_q, seqlen_k, head_type, sink, local, blockmask, is_causal, exact_streaming, device="cpu"):
    """bool ``[Sq, Sk]``: which keys each query of one (sequence, head) sees, straight from the
    definitions that :func:`block_sparse_attention` lists. ``blockmask`` is the head's bool
    ``[QB, KB]`` for block-sparse heads, else unused."""
    if exact_streaming and not is_causal:
        raise ValueError("exact_streaming requires is_causal (as in Block-Sparse-Attention)")
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    diagonal = i + seqlen_k - seqlen_q  # bottom-right aligned
    visible = j <= diagonal if is_causal else torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if head_type == -1:
        if exact_streaming:  # tokens; the local window holds the query itself
            return visible & ((j < sink) | (j >= diagonal - (local - 1)))
        row_block, key_block = i // SPARSE_BLOCK, j // SPARSE_BLOCK
        if is_causal:  # the window ends on the block of the row block's (full, 128-row) last diagonal
            end = (math.ceil(max(seqlen_k - seqlen_q, 0) / SPARSE_BLOCK) + 1 + row_block
                   - max(seqlen_q - seqlen_k, 0) // SPARSE_BLOCK)
        else:  # the last `local` key blocks of the sequence, for every row
            end = math.ceil(seqlen_k / SPARSE_BLOCK)
        return visible & ((key_block < sink) | ((key_block >= end - local) & (key_block < end)))
    if head_type == 1:
        visible = visible & blockmask[i // SPARSE_BLOCK, j // SPARSE_BLOCK]
    return visible


def _masked_attention(q, k, v, visible, scale=None, scores=None):
    """q ``[Sq, H, D]``, k/v ``[Sk, H, D]``, visible bool ``[H, Sq, Sk]`` -> out ``[Sq, H, D]``, lse
    ``[H, Sq]``, from ``scores`` ``[H, Sq, Sk]`` or q·k·scale. Differentiable everywhere: a row that
    sees no key has lse -inf and weights 0, and neither its forward nor its gradient is NaN."""
    if scores is None:
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    seen = visible.any(dim=-1)  # [H, Sq]
    # Unseen rows take finite stand-in scores, so that no exp(-inf - -inf) appears, forward or back.
    scores = scores.masked_fill(~visible & seen[..., None], float("-inf")).masked_fill(~seen[..., None], 0.0)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.where(seen[..., None], torch.exp(scores - lse[..., None]), 0.0)
    return torch.einsum("hqk,khd->qhd", probs, v), torch.where(seen, lse, float("-inf"))


def attention_grads(forward, q, k, v, dout, dlse=None, **kwargs):
    """The float64 autograd oracle of an attention forward of this module (:func:`attention` or
    :func:`block_sparse_attention`): ``(dq, dk, dv)`` of ``sum(out · dout) + sum(lse · dlse)`` (the
    lse term over the rows that see a key), float64, for ``forward(q, k, v, **kwargs)``."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    out, lse = forward(q, k, v, **kwargs)
    loss = (out * dout.double()).sum()
    if dlse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0.0) * dlse.double()).sum()
    return torch.autograd.grad(loss, (q, k, v), allow_unused=True)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    head_mask_type: torch.Tensor,
    streaming_info: torch.Tensor,
    base_blockmask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    exact_streaming: bool = False,
    softmax_scale: Optional[float] = None,
):
    """LServe's unified block-sparse prefill in float64, one explicit mask per (sequence, head).

    q ``[Tq, Hq, D]``, k/v ``[Tk, Hkv, D]``, ``cu_seqlens_*`` ``[B+1]``, ``head_mask_type``
    ``[Hq]`` (0 dense, -1 streaming, 1 block-sparse), ``streaming_info`` ``[2·Hq]`` (sink, local),
    ``base_blockmask`` bool ``[B, n_block_sparse_heads, QB, KB]`` -> out ``[Tq, Hq, D]``, lse
    ``[Hq, Tq]``, both float64. Positions count from each sequence's start; with ``diag = i+Sk-Sq``:

    - every head type sees only ``j <= diag`` if ``is_causal``;
    - dense heads see every other key;
    - the n-th block-sparse head (1-based, in head order) sees the 128×128 blocks that
      ``base_blockmask[b, n-1]`` marks;
    - streaming heads, with ``exact_streaming`` (which requires ``is_causal``), see ``j < sink`` or
      ``j >= diag-(local-1)`` (tokens). Otherwise row block ``i`` sees key blocks
      ``[0, sink) ∪ [m-local, m)``, with ``m = ceil(max(Sk-Sq, 0)/128) + 1 + i - floor(max(Sq-Sk, 0)/128)``
      if ``is_causal`` and ``m = ceil(Sk/128)`` (every row) if not.

    Query head h reads kv head ``h // (Hq/Hkv)``. A row that sees no key gives out 0, lse -inf.
    """
    q, k, v = q.double(), k.double(), v.double()
    heads_q, head_dim = q.shape[1], q.shape[2]
    group = heads_q // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    types = [int(t) for t in head_mask_type.tolist()]
    sizes = [int(s) for s in streaming_info.tolist()]
    sparse_column = {h: n for n, h in enumerate(h for h, t in enumerate(types) if t == 1)}
    if sparse_column and (base_blockmask is None or base_blockmask.shape[1] != len(sparse_column)):
        raise ValueError(f"{len(sparse_column)} block-sparse heads need base_blockmask [B, {len(sparse_column)}, QB, KB]")

    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    lse = torch.full((heads_q, q.shape[0]), float("-inf"), dtype=torch.float64, device=q.device)
    for b in range(len(starts_q) - 1):
        q0, q1 = starts_q[b], starts_q[b + 1]
        k0, k1 = starts_k[b], starts_k[b + 1]
        visible = torch.stack([
            block_sparse_mask(
                q1 - q0, k1 - k0, types[h], sizes[2 * h], sizes[2 * h + 1],
                base_blockmask[b, sparse_column[h]].to(q.device) if types[h] == 1 else None, is_causal,
                exact_streaming, q.device,
            )
            for h in range(heads_q)
        ])
        out[q0:q1], lse[:, q0:q1] = _masked_attention(q[q0:q1], k[k0:k1], v[k0:k1], visible, scale)
    return out, lse


LSERVE_LOGICAL_PAGE = 16  # tokens per logical page (page-stats granularity)
LSERVE_PAGE = 64  # tokens per physical page


def page_stats(keys: torch.Tensor):
    """Per logical page of one sequence's keys ``[L, H, D]`` (tokens in order): the channel-wise
    min and max, float64 ``[ceil(L/16), H, D]`` each. The last logical page may be partial."""
    keys = keys.double()
    mins, maxs = [], []
    for start in range(0, keys.shape[0], LSERVE_LOGICAL_PAGE):
        tokens = keys[start:start + LSERVE_LOGICAL_PAGE]
        mins.append(tokens.min(dim=0).values)
        maxs.append(tokens.max(dim=0).values)
    return torch.stack(mins), torch.stack(maxs)


def page_scores(q: torch.Tensor, k_min: torch.Tensor, k_max: torch.Tensor) -> torch.Tensor:
    """Quest/LServe scores of one sequence: q ``[Hq, D]``, logical-page stats ``[n_logical, Hkv, D]``
    -> float64 ``[Hq, ceil(n_logical/4)]``.

    Query head h reads kv head ``h // (Hq/Hkv)``. A logical page scores
    ``sum_c max(q_c·kmax_c, q_c·kmin_c)`` (no 1/sqrt(D)); a physical page of 4 logical pages scores
    the max of theirs.
    """
    q, k_min, k_max = q.double(), k_min.double(), k_max.double()
    heads_q, n_logical = q.shape[0], k_min.shape[0]
    group = heads_q // k_min.shape[1]
    per_page = LSERVE_PAGE // LSERVE_LOGICAL_PAGE
    n_pages = -(-n_logical // per_page)
    scores = torch.empty(heads_q, n_pages, dtype=torch.float64)
    for h in range(heads_q):
        for p in range(n_pages):
            logical = [
                torch.maximum(q[h] * k_max[l, h // group], q[h] * k_min[l, h // group]).sum().item()
                for l in range(p * per_page, min((p + 1) * per_page, n_logical))
            ]
            scores[h, p] = max(logical)
    return scores


def select_pages(scores: torch.Tensor, length: int, token_budget: int) -> torch.Tensor:
    """LServe's page selection of one sequence of ``length`` tokens from its scores ``[Hq, n_pages]``
    -> bool ``[Hq, n_pages]``: every page if ``length <= token_budget``; otherwise, per head, the
    ``min(max(3, token_budget//64), n_pages) - 1`` highest-scoring pages other than the last, and
    the last (newest) page."""
    heads_q = scores.shape[0]
    n_pages = -(-length // LSERVE_PAGE)
    selected = torch.zeros(heads_q, n_pages, dtype=torch.bool)
    if length <= token_budget:
        selected[:] = True
        return selected
    count = min(max(3, token_budget // LSERVE_PAGE), n_pages) - 1
    for h in range(heads_q):
        ranked = sorted(range(n_pages - 1), key=lambda p: -scores[h, p].item())
        for p in ranked[:count]:
            selected[h, p] = True
        selected[h, n_pages - 1] = True
    return selected


# ---- decode over a KV cache (flash_attn_with_kvcache, LServe sparse decode) ---------------------

_LSERVE_PAGE = 64  # tokens per LServe page (the ring's page)


def int8_roundtrip(x: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 value of ``x`` after per-tensor symmetric INT8 storage with ``scale``: ``x/scale``
    rounded half away from zero, clamped to ``[-127, 127]``, times ``scale``."""
    return _int8_integers(x, scale) * float(scale)


def _int8_integers(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The integers an INT8 pool stores for ``x`` (float64): ``x/scale`` rounded half away from
    zero, clamped to ``[-127, 127]``."""
    scaled = x.double() / float(scale)
    return (torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)).clamp(-127, 127)


def _ring_slot_of_page(page: int, sink: int, local: int) -> int:
    """Ring slot of a streaming head's page: sink pages stay put, window pages rotate through the
    ``local/64 + 1`` remaining slots (DESIGN.md §5)."""
    sink_pages = sink // _LSERVE_PAGE
    if page < sink_pages:
        return page
    return sink_pages + (page - sink_pages) % (local // _LSERVE_PAGE + 1)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    block_table: Optional[torch.Tensor] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    kv_head_slot: Optional[torch.Tensor] = None,
    k_ring: Optional[torch.Tensor] = None,
    v_ring: Optional[torch.Tensor] = None,
    ring_table: Optional[torch.Tensor] = None,
    sink: int = 0,
    local: int = 0,
    page_indices: Optional[torch.Tensor] = None,
    page_counts: Optional[torch.Tensor] = None,
    head_bits: Optional[torch.Tensor] = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    softmax_scale: Optional[float] = None,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
):
    """Decode attention over a KV cache in float64, one (sequence, query head, query row) at a time
    over the explicit list of the tokens it sees, each gathered from its page.

    q ``[B, Sq, Hq, D]``; seqlens ``[B]`` keys per sequence; query row i sits at position
    ``seqlens[b] - Sq + i``. Cache: paged ``[num_pages, page_size, Hc, D]`` with ``block_table``
    ``[B, max_pages]``, or contiguous ``[B_cache, S_cache, Hc, D]`` (row ``cache_batch_idx[b]``, or b).
    int8 caches hold ``value / scale``. Without ``kv_head_slot`` query head h reads kv head
    ``h // (Hq/Hkv)`` and sees the keys of its window (flash-attn's, -1 unbounded). With
    ``kv_head_slot`` (Sq = 1): kv head h with slot >= 0 reads pool head ``slot`` and, given
    ``page_indices``/``page_counts``/``head_bits``, sees the listed pages (other than the newest)
    whose bit for the query head is set, plus the newest page; slot < 0 is a streaming head
    ``-1 - slot`` of ``k_ring``/``v_ring`` ``[ring_pool_pages, 64, Hs, D]`` that sees
    ``[0, sink) ∪ [len - local, len)``, page n at ``ring_table[b, slot(n)]``.
    Returns out ``[B, Sq, Hq, D]`` and lse ``[B, Hq, Sq]`` (float64); a row that sees no key gives
    out 0 and lse -inf.
    """
    q = q.double()
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_kv = kv_head_slot.numel() if kv_head_slot is not None else k_cache.shape[2]
    group = heads_q // heads_kv
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)
    int8 = k_cache.dtype == torch.int8
    k_mult, v_mult = (float(k_scale), float(v_scale)) if int8 else (1.0, 1.0)
    left, right = window_size
    lengths = [int(x) for x in seqlens.tolist()]
    slots = [int(s) for s in kv_head_slot.tolist()] if kv_head_slot is not None else list(range(heads_kv))

    out = torch.zeros(batch, seqlen_q, heads_q, head_dim, dtype=torch.float64)
    lse = torch.full((batch, heads_q, seqlen_q), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        length = lengths[b]
        newest_page = (length - 1) // _LSERVE_PAGE
        for h in range(heads_kv):
            slot = slots[h]
            streaming = kv_head_slot is not None and slot < 0
            listed = {}
            if kv_head_slot is not None and not streaming and page_indices is not None:
                for n in range(int(page_counts[b, h])):
                    listed[int(page_indices[b, h, n])] = int(head_bits[b, h, n]) & 0xFFFFFFFF
            for j in range(group):
                head_q = h * group + j
                for i in range(seqlen_q):
                    diagonal = length - seqlen_q + i
                    tokens = []
                    for t in range(length):
                        if left >= 0 and t < diagonal - left:
                            continue
                        if right >= 0 and t > diagonal + right:
                            continue
                        if streaming and not (t < sink or t >= length - local):
                            continue
                        if page_indices is not None and not streaming:
                            page = t // _LSERVE_PAGE
                            if page != newest_page and not (page in listed and (listed[page] >> j) & 1):
                                continue
                        tokens.append(t)
                    if not tokens:
                        continue
                    positions = torch.tensor(tokens)
                    if streaming:
                        ring_pages = torch.tensor(
                            [int(ring_table[b, _ring_slot_of_page(t // _LSERVE_PAGE, sink, local)]) for t in tokens]
                        )
                        rows = positions % _LSERVE_PAGE
                        keys = k_ring[ring_pages, rows, -1 - slot].double() * k_mult
                        values = v_ring[ring_pages, rows, -1 - slot].double() * v_mult
                    else:
                        if block_table is not None:
                            page_size = k_cache.shape[1]
                            pages = block_table[b].long()[positions // page_size]
                            rows = positions % page_size
                        else:
                            row = int(cache_batch_idx[b]) if cache_batch_idx is not None else b
                            pages = torch.full_like(positions, row)
                            rows = positions
                        keys = k_cache[pages, rows, slot].double() * k_mult
                        values = v_cache[pages, rows, slot].double() * v_mult
                    scores = keys @ q[b, i, head_q] * scale
                    if softcap > 0:
                        scores = softcap * torch.tanh(scores / softcap)
                    row_lse = torch.logsumexp(scores, dim=0)
                    out[b, i, head_q] = torch.exp(scores - row_lse) @ values
                    lse[b, head_q, i] = row_lse
    return out, lse


def paged_kv_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seqlens: torch.Tensor,
    block_table: Optional[torch.Tensor] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    rotary_cos: Optional[torch.Tensor] = None,
    rotary_sin: Optional[torch.Tensor] = None,
    rotary_interleaved: bool = False,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    kv_head_slot: Optional[torch.Tensor] = None,
    k_ring: Optional[torch.Tensor] = None,
    v_ring: Optional[torch.Tensor] = None,
    ring_table: Optional[torch.Tensor] = None,
    sink: int = 0,
    local: int = 0,
):
    """The pools after appending k/v ``[B, S_new, Hkv, D]`` at positions ``seqlens[b] + i``, as new
    float64 tensors ``(k_cache, v_cache, k_ring, v_ring)`` (rings None when not given), one token at
    a time.

    k is first rotated (``rope`` with rows = positions) when rotary tables are given. An int8 pool
    holds ``x/scale`` rounded half away from zero and clamped to ``[-127, 127]`` (as integers in
    float64); other pools hold x. Pool layout and head roles as in ``paged_decode_attention``;
    a streaming head writes token t only if its page is a sink page or one of the ``local/64 + 1``
    newest pages of the sequence after the append.
    """
    batch, seqlen_new, heads_kv, _ = k.shape
    starts = [int(x) for x in seqlens.tolist()]
    keys = k.double()
    if rotary_cos is not None:
        positions = torch.tensor(starts)[:, None] + torch.arange(seqlen_new)[None, :]
        keys = rope(keys, rotary_cos, rotary_sin, positions, rotary_interleaved)
    values = v.double()
    slots = [int(s) for s in kv_head_slot.tolist()] if kv_head_slot is not None else list(range(heads_kv))

    def stored(x, scale, pool):
        return _int8_integers(x, scale) if pool.dtype == torch.int8 else x

    new_k, new_v = k_cache.double().clone(), v_cache.double().clone()
    new_k_ring = k_ring.double().clone() if k_ring is not None else None
    new_v_ring = v_ring.double().clone() if v_ring is not None else None
    for b in range(batch):
        new_len = starts[b] + seqlen_new
        for i in range(seqlen_new):
            t = starts[b] + i
            page = t // _LSERVE_PAGE
            for h in range(heads_kv):
                slot = slots[h]
                key = stored(keys[b, i, h], k_scale, k_cache)
                value = stored(values[b, i, h], v_scale, v_cache)
                if kv_head_slot is not None and slot < 0:
                    newest = (new_len - 1) // _LSERVE_PAGE
                    if not (page < sink // _LSERVE_PAGE or page > newest - (local // _LSERVE_PAGE + 1)):
                        continue
                    ring_page = int(ring_table[b, _ring_slot_of_page(page, sink, local)])
                    new_k_ring[ring_page, t % _LSERVE_PAGE, -1 - slot] = key
                    new_v_ring[ring_page, t % _LSERVE_PAGE, -1 - slot] = value
                    continue
                if block_table is not None:
                    page_size = k_cache.shape[1]
                    physical, row = int(block_table[b, t // page_size]), t % page_size
                else:
                    physical = int(cache_batch_idx[b]) if cache_batch_idx is not None else b
                    row = t
                new_k[physical, row, slot] = key
                new_v[physical, row, slot] = value
    return new_k, new_v, new_k_ring, new_v_ring

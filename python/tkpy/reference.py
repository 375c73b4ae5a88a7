"""The test oracle: straightforward, slow PyTorch, meant to run in float64.

Nothing here shares code with the implementations it checks. Each function returns a new tensor
and never modifies its inputs.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

__all__ = ["rope_frequencies", "rope", "rope_3d_table", "rope_3d", "matmul", "attention", "block_sparse_attention"]


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

    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, Sq]; -inf where a row sees no key
    seen = visible.any(dim=-1)  # [Sq]
    # A row with no visible key would give exp(-inf - -inf) = NaN; its weights are all 0 instead.
    probs = torch.where(seen[None, :, None], torch.exp(scores - torch.where(seen, lse, 0.0)[..., None]), 0.0)
    out = torch.einsum("hqk,khd->qhd", probs, v)
    return out, lse


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
    if cu_seqlens_q is None:
        results = [
            _attention_one_sequence(q[b], k[b], v[b], causal, window_size, softcap, softmax_scale)
            for b in range(q.shape[0])
        ]
        return torch.stack([o for o, _ in results]), torch.stack([l for _, l in results])

    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float64, device=q.device)
    for b in range(len(starts_q) - 1):
        q0, q1 = starts_q[b], starts_q[b + 1]
        k0, k1 = starts_k[b], starts_k[b + 1]
        out[q0:q1], lse[:, q0:q1] = _attention_one_sequence(
            q[q0:q1], k[k0:k1], v[k0:k1], causal, window_size, softcap, softmax_scale
        )
    return out, lse


SPARSE_BLOCK = 128  # the token size of Block-Sparse-Attention's mask blocks and streaming blocks


def _block_sparse_head_mask(seqlen_q, seqlen_k, head_type, sink, local, blockmask, is_causal, exact_streaming, device):
    """bool ``[Sq, Sk]``: which keys each query of one (sequence, head) sees, straight from the definitions."""
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    diagonal = i + seqlen_k - seqlen_q  # bottom-right aligned
    causal = j <= diagonal
    if head_type == -1:  # streaming heads are causal whatever is_causal says
        if exact_streaming:  # sink and local count tokens; the local window holds the query itself
            return causal & ((j < sink) | (j >= diagonal - (local - 1)))
        row_block, key_block = i // SPARSE_BLOCK, j // SPARSE_BLOCK
        end = math.ceil(max(seqlen_k - seqlen_q, 0) / SPARSE_BLOCK) + 1 + row_block
        return causal & ((key_block < sink) | ((key_block >= end - local) & (key_block < end)))
    visible = causal if is_causal else torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if head_type == 1:
        visible = visible & blockmask[i // SPARSE_BLOCK, j // SPARSE_BLOCK]
    return visible


def _masked_attention(q, k, v, visible, scale):
    """q ``[Sq, H, D]``, k/v ``[Sk, H, D]``, visible bool ``[H, Sq, Sk]`` -> out ``[Sq, H, D]``, lse ``[H, Sq]``."""
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where a row sees no key
    seen = visible.any(dim=-1)  # [H, Sq]
    probs = torch.where(seen[..., None], torch.exp(scores - torch.where(seen, lse, 0.0)[..., None]), 0.0)
    return torch.einsum("hqk,khd->qhd", probs, v), lse


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

    - dense heads see ``j <= diag`` if ``is_causal``, else every key;
    - the n-th block-sparse head (1-based, in head order) sees the 128×128 blocks that
      ``base_blockmask[b, n-1]`` marks, ANDed with the causal mask if ``is_causal``;
    - streaming heads are always causal. With ``exact_streaming`` they see ``j < sink`` or
      ``j >= diag-(local-1)`` (tokens); otherwise row block ``i`` sees key blocks
      ``[0, sink) ∪ [m-local, m)``, ``m = ceil(max(Sk-Sq, 0)/128)+1+i`` (blocks).

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
            _block_sparse_head_mask(
                q1 - q0, k1 - k0, types[h], sizes[2 * h], sizes[2 * h + 1],
                base_blockmask[b, sparse_column[h]].to(q.device) if types[h] == 1 else None, is_causal,
                exact_streaming, q.device,
            )
            for h in range(heads_q)
        ])
        out[q0:q1], lse[:, q0:q1] = _masked_attention(q[q0:q1], k[k0:k1], v[k0:k1], visible, scale)
    return out, lse

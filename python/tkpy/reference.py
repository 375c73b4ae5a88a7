"""The test oracle: straightforward, slow PyTorch, meant to run in float64.

Nothing here shares code with the implementations it checks. Each function returns a new tensor
and never modifies its inputs.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

__all__ = ["rope_frequencies", "rope", "rope_3d_table", "rope_3d", "matmul"]


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

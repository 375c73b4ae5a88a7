"""Video-DiT self-attention on tkpy ops: fused 3D RoPE with RIFLEx, then flash attention, with
UltraViCo's logit decay if asked (length extrapolation, :mod:`tkpy.ultravico`).

:class:`VideoDiTAttention` is a standalone block: qkv projection, optional q/k RMSNorm, 3D RoPE
through :func:`tkpy.rope.apply_rope_3d_` (per-axis tables from :mod:`tkpy.riflex`; its differentiable
:func:`tkpy.rope.apply_rope_3d` while autograd records, for training), attention
through :func:`tkpy.flash_attn_func`, output projection. :class:`Rope3D` and :func:`attention` are
its parts that model integrations share (diffusers' Wan: :mod:`tkpy.integrations.diffusers`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import torch
from torch import nn

from tkpy.attention import flash_attn_func
from tkpy.errors import ArgumentError
from tkpy.riflex import AxisSplit, axis_split, rope_3d_freqs
from tkpy.rope import apply_rope_3d, apply_rope_3d_
from tkpy.ultravico import UltraViCoConfig, check_config, ultravico_attn_func

__all__ = ["HEAD_DIMS", "RIFLEX_MODES", "Rope3D", "VideoDiTAttention", "attention", "check_dtype", "check_head_dim"]

HEAD_DIMS = (64, 128, 256)
RIFLEX_MODES = ("training_free", "fine_tuned", "off")
_QK_NORMS = (None, "rms_per_head", "rms_across_heads")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              ultravico: Optional[UltraViCoConfig] = None) -> torch.Tensor:
    """Non-causal ``softmax(q kᵀ / sqrt(D)) v`` through :func:`tkpy.flash_attn_func`, or with
    UltraViCo's decay through :func:`tkpy.ultravico_attn_func` when ``ultravico`` is given.

    q ``[B, Sq, H, D]``, k and v ``[B, Sk, H, D]``; returns ``[B, Sq, H, D]`` in q's dtype.
    bf16 and fp16 run as they are. fp32 q, k, v are rounded to bf16 for the attention only, and
    the output comes back as fp32: tkpy's kernels, like flash-attn's, exist for bf16/fp16 only,
    and this keeps fp32 models (and CPU tests) usable at bf16 attention accuracy.
    """
    check_dtype(q, "attention")

    def run(q, k, v):
        return flash_attn_func(q, k, v) if ultravico is None else ultravico_attn_func(q, k, v, ultravico)

    if q.dtype == torch.float32:
        return run(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()
    return run(q, k, v)


def check_dtype(x: torch.Tensor, who: str) -> None:
    """Checked before any work, so that fp64 is refused by name rather than deep inside an op."""
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ArgumentError(f"{who}: tkpy attention needs bf16, fp16 or fp32 inputs, got {x.dtype}")


def check_head_dim(head_dim: int, who: str) -> None:
    if head_dim not in HEAD_DIMS:
        raise ArgumentError(f"{who}: tkpy attention needs head_dim in {HEAD_DIMS}, got {head_dim}")


@dataclasses.dataclass(frozen=True)
class Rope3D:
    """A video's 3D RoPE as per-axis tables: what :func:`tkpy.rope.apply_rope_3d_` and
    :func:`tkpy.rope.apply_rope_3d` take.

    ``freqs_t/h/w`` are complex64 ``[T, t/2]``, ``[H, h/2]``, ``[W, w/2]``
    (:func:`tkpy.riflex.rope_3d_freqs`).
    """

    grid_thw: tuple[int, int, int]
    freqs_t: torch.Tensor
    freqs_h: torch.Tensor
    freqs_w: torch.Tensor

    def rotate(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k rotated: in place for inference, as differentiable copies while autograd
        records for either (training, e.g. RIFLEx's fine-tuning)."""
        tables = (self.grid_thw, self.freqs_t, self.freqs_h, self.freqs_w)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            return apply_rope_3d(q, k, *tables)
        return apply_rope_3d_(q, k, *tables)


class VideoDiTAttention(nn.Module):
    """Self-attention over video tokens in (t, h, w) order, with 3D RoPE and RIFLEx.

    Parameters
    ----------
    dim : int
        Model width; ``dim = num_heads · head_dim`` with head_dim in {64, 128, 256}.
    num_heads : int
        Query, key and value heads (no GQA, as in video DiTs).
    rope : str or AxisSplit
        ``"wan"``, ``"hunyuanvideo"`` or ``"cogvideox"`` for that model's axis split
        (:func:`tkpy.riflex.axis_split`), or an explicit :class:`tkpy.riflex.AxisSplit`.
    qk_norm : {None, "rms_per_head", "rms_across_heads"}
        RMSNorm of q and k before RoPE: over each head's dims (HunyuanVideo) or over all heads
        at once (Wan).
    fused_qkv : bool
        One ``[3·dim, dim]`` projection, or separate ``to_q``, ``to_k``, ``to_v``.
    riflex_mode : {"training_free", "fine_tuned", "off"}
        See :func:`tkpy.riflex.riflex_frequency_index`.
    ultravico : UltraViCoConfig, optional
        UltraViCo's logit decay in the attention (inference only: it has no backward), with
        ``tokens_per_frame`` taken from each call's grid (H·W); combine with ``riflex_mode="off"``
        to run it as its authors did, or keep RIFLEx for both.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        rope: Union[str, AxisSplit] = "wan",
        qk_norm: Optional[str] = None,
        fused_qkv: bool = True,
        bias: bool = True,
        eps: float = 1e-6,
        riflex_mode: str = "training_free",
        ultravico: Optional[UltraViCoConfig] = None,
    ):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ArgumentError(f"VideoDiTAttention: dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        head_dim = dim // num_heads
        check_head_dim(head_dim, "VideoDiTAttention")
        if qk_norm not in _QK_NORMS:
            raise ArgumentError(f"VideoDiTAttention: qk_norm must be one of {_QK_NORMS}, got {qk_norm!r}")
        if riflex_mode not in RIFLEX_MODES:
            raise ArgumentError(f"VideoDiTAttention: riflex_mode must be one of {RIFLEX_MODES}, got {riflex_mode!r}")
        check_config("VideoDiTAttention", ultravico, optional=True)
        self.ultravico = ultravico
        self.split = rope if isinstance(rope, AxisSplit) else axis_split(rope, head_dim)
        if self.split.rotary_dim > head_dim:
            raise ArgumentError(
                f"VideoDiTAttention: the RoPE split rotates {self.split.rotary_dim} dims, more than head_dim {head_dim}"
            )
        self.num_heads, self.head_dim, self.riflex_mode = num_heads, head_dim, riflex_mode
        if fused_qkv:
            self.to_qkv = nn.Linear(dim, 3 * dim, bias=bias)
        else:
            self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=bias) for _ in range(3))
        self.fused_qkv = fused_qkv
        norm_dim = head_dim if qk_norm == "rms_per_head" else dim
        self.norm_q = nn.RMSNorm(norm_dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = nn.RMSNorm(norm_dim, eps=eps) if qk_norm else nn.Identity()
        self.qk_norm = qk_norm
        self.to_out = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, grid_thw: Sequence[int], L_test: Optional[int] = None) -> torch.Tensor:
        """x ``[B, S, dim]`` with ``S = T·H·W`` tokens in (t, h, w) order -> ``[B, S, dim]``.

        ``L_test`` is the number of latent frames RIFLEx extrapolates to (default T): with
        ``riflex_mode="training_free"`` the temporal component k changes only when ``L_test > N_k``.
        """
        grid = tuple(int(n) for n in grid_thw)
        if x.dim() != 3 or len(grid) != 3 or x.shape[1] != grid[0] * grid[1] * grid[2]:
            raise ArgumentError(
                f"VideoDiTAttention: expected x [B, T·H·W, dim] for grid_thw {grid}, got {tuple(x.shape)}"
            )
        check_dtype(x, "VideoDiTAttention")
        if self.fused_qkv:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        heads = (self.num_heads, self.head_dim)
        if self.qk_norm == "rms_across_heads":
            q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = q.unflatten(-1, heads), k.unflatten(-1, heads), v.unflatten(-1, heads)  # [B, S, H, D]
        if self.qk_norm == "rms_per_head":
            q, k = self.norm_q(q), self.norm_k(k)
        freqs = rope_3d_freqs(self.split, grid, L_test=L_test, mode=self.riflex_mode, device=x.device)
        q, k = Rope3D(grid, *freqs).rotate(q, k)
        decay = None if self.ultravico is None else self.ultravico.for_grid(grid)
        return self.to_out(attention(q, k, v, decay).flatten(2))

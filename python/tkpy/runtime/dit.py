"""Video-DiT self-attention on tkpy ops: fused 3D RoPE with RIFLEx, then flash attention.

- :class:`VideoDiTAttention` is a standalone block: qkv projection, optional q/k RMSNorm, 3D RoPE
  through :func:`tkpy.rope.apply_rope_3d_` (per-axis tables from :mod:`tkpy.riflex`), attention
  through :func:`tkpy.flash_attn_func`, output projection.
- :class:`WanAttnProcessor` is an attention processor for diffusers' Wan transformer, and
  :func:`use_tkpy_attention` installs it together with a RoPE module that hands the processor
  per-axis tables (with RIFLEx for a requested clip length) instead of ``[S, D]`` cos/sin tables.

Wan's processor is the one that is supported because it is the simplest to match exactly: RoPE
covers every token of the self-attention (HunyuanVideo and CogVideoX concatenate text tokens into
a joint attention, rotate only the video part, and HunyuanVideo masks padded text), and there is
no attention mask.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import torch
from torch import nn

from tkpy.attention import flash_attn_func
from tkpy.riflex import AxisSplit, axis_split, latent_frames, rope_3d_freqs
from tkpy.rope import apply_rope_, apply_rope_3d_

__all__ = ["Rope3D", "VideoDiTAttention", "WanAttnProcessor", "attention", "use_tkpy_attention"]

_HEAD_DIMS = (64, 128, 256)
_QK_NORMS = (None, "rms_per_head", "rms_across_heads")
_RIFLEX_MODES = ("training_free", "fine_tuned", "off")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal ``softmax(q kᵀ / sqrt(D)) v`` through :func:`tkpy.flash_attn_func`.

    q ``[B, Sq, H, D]``, k and v ``[B, Sk, H, D]``; returns ``[B, Sq, H, D]`` in q's dtype.
    bf16 and fp16 run as they are. fp32 q, k, v are rounded to bf16 for the attention only, and
    the output comes back as fp32: tkpy's kernels, like flash-attn's, exist for bf16/fp16 only,
    and this keeps fp32 models (and CPU tests) usable at bf16 attention accuracy.
    """
    _check_dtype(q, "attention")
    if q.dtype == torch.float32:
        return flash_attn_func(q.bfloat16(), k.bfloat16(), v.bfloat16()).float()
    return flash_attn_func(q, k, v)


def _check_dtype(x: torch.Tensor, who: str) -> None:
    """Checked before any work, so that fp64 is refused by name rather than deep inside an op."""
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{who}: tkpy attention needs bf16, fp16 or fp32 inputs, got {x.dtype}")


def _check_head_dim(head_dim: int, who: str) -> None:
    if head_dim not in _HEAD_DIMS:
        raise ValueError(f"{who}: tkpy attention needs head_dim in {_HEAD_DIMS}, got {head_dim}")


@dataclasses.dataclass(frozen=True)
class Rope3D:
    """A video's 3D RoPE as per-axis tables: what :func:`tkpy.rope.apply_rope_3d_` takes.

    ``freqs_t/h/w`` are complex64 ``[T, t/2]``, ``[H, h/2]``, ``[W, w/2]``
    (:func:`tkpy.riflex.rope_3d_freqs`).
    """

    grid_thw: tuple[int, int, int]
    freqs_t: torch.Tensor
    freqs_h: torch.Tensor
    freqs_w: torch.Tensor

    def apply_(self, q: torch.Tensor, k: torch.Tensor) -> None:
        apply_rope_3d_(q, k, self.grid_thw, self.freqs_t, self.freqs_h, self.freqs_w)


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
    ):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"VideoDiTAttention: dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        head_dim = dim // num_heads
        _check_head_dim(head_dim, "VideoDiTAttention")
        if qk_norm not in _QK_NORMS:
            raise ValueError(f"VideoDiTAttention: qk_norm must be one of {_QK_NORMS}, got {qk_norm!r}")
        if riflex_mode not in _RIFLEX_MODES:
            raise ValueError(f"VideoDiTAttention: riflex_mode must be one of {_RIFLEX_MODES}, got {riflex_mode!r}")
        self.split = rope if isinstance(rope, AxisSplit) else axis_split(rope, head_dim)
        if self.split.rotary_dim > head_dim:
            raise ValueError(
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
            raise ValueError(
                f"VideoDiTAttention: expected x [B, T·H·W, dim] for grid_thw {grid}, got {tuple(x.shape)}"
            )
        _check_dtype(x, "VideoDiTAttention")
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
        Rope3D(grid, *freqs).apply_(q, k)
        return self.to_out(attention(q, k, v).flatten(2))


class _WanRope(nn.Module):
    """Replaces a Wan transformer's ``rope``: returns a :class:`Rope3D` rather than ``[S, D]`` tables."""

    def __init__(self, split: AxisSplit, patch_size: Sequence[int], L_test: Optional[int], mode: str):
        super().__init__()
        self.split, self.patch_size, self.L_test, self.mode = split, tuple(patch_size), L_test, mode

    def forward(self, hidden_states: torch.Tensor) -> Rope3D:
        # hidden_states: the latents [B, C, F, H, W] before patching; RoPE counts patches.
        grid = tuple(n // p for n, p in zip(hidden_states.shape[2:], self.patch_size))
        # mode "off" when no clip length was given: L_test would otherwise default to T.
        mode = "off" if self.L_test is None else self.mode
        return Rope3D(grid, *rope_3d_freqs(self.split, grid, self.L_test, mode, device=hidden_states.device))

    def extra_repr(self) -> str:
        return f"split={self.split}, L_test={self.L_test}, mode={self.mode!r}"


class WanAttnProcessor:
    """diffusers' ``WanAttnProcessor`` with tkpy attention and tkpy's fused RoPE.

    Self-attention takes either :class:`Rope3D` (from :func:`use_tkpy_attention`, rotated by
    :func:`tkpy.rope.apply_rope_3d_`) or diffusers' own ``(cos, sin)`` tables ``[1, S, 1, D]``
    (stock or :func:`tkpy.integrations.diffusers.apply_riflex`'d, rotated by
    :func:`tkpy.rope.apply_rope_`), so ``transformer.set_attn_processor(WanAttnProcessor())``
    alone works too. fp32 models get bf16 attention (see :func:`attention`).
    Wan image-to-video attention (``add_k_proj``) and attention masks are refused.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.transformers.transformer_wan import WanAttention

        if not isinstance(attn, WanAttention):
            raise ValueError(
                f"tkpy WanAttnProcessor supports diffusers' Wan attention (WanAttention), got {type(attn).__name__}; "
                "HunyuanVideo and CogVideoX attention are not supported"
            )
        if attn.add_k_proj is not None:
            raise ValueError("tkpy WanAttnProcessor: Wan image-to-video attention (add_k_proj) is not supported")
        if attention_mask is not None:
            raise ValueError("tkpy WanAttnProcessor: an attention_mask is not supported (Wan passes none)")
        _check_dtype(hidden_states, "tkpy WanAttnProcessor")
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.fused_projections and not attn.is_cross_attention:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        elif attn.fused_projections:
            q, (k, v) = attn.to_q(hidden_states), attn.to_kv(context).chunk(2, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        # Wan normalises q and k over all heads at once, before splitting them.
        q, k = attn.norm_q(q).unflatten(2, (attn.heads, -1)), attn.norm_k(k).unflatten(2, (attn.heads, -1))
        v = v.unflatten(2, (attn.heads, -1))  # q, k, v: [B, S, H, D]
        _check_head_dim(q.shape[-1], "tkpy WanAttnProcessor")
        if isinstance(rotary_emb, Rope3D):
            rotary_emb.apply_(q, k)
        elif rotary_emb is not None:
            cos, sin = rotary_emb
            # Each angle is repeated on the two dims of its interleaved pair; keep one per pair.
            cos = cos.reshape(q.shape[1], q.shape[-1])[:, 0::2].float().contiguous()
            sin = sin.reshape(q.shape[1], q.shape[-1])[:, 1::2].float().contiguous()
            apply_rope_(q, k, cos, sin, interleaved=True)
        out = attention(q, k, v).flatten(2).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def use_tkpy_attention(transformer, num_frames: Optional[int] = None, mode: str = "training_free",
                       k: Optional[int] = None, temporal_compression: int = 4):
    """Run a diffusers ``WanTransformer3DModel``'s attention on tkpy, RoPE included.

    Sets :class:`WanAttnProcessor` on every attention module and replaces ``transformer.rope``
    by a module that gives the processors per-axis RoPE tables. With ``num_frames``, the temporal
    axis follows RIFLEx for that clip length, exactly as
    :func:`tkpy.integrations.diffusers.apply_riflex` (``L_test`` = latent frames of the clip
    divided, rounding up, by the temporal patch size; ``mode`` and ``k`` as there); without it,
    RoPE is diffusers'. Returns ``transformer``. Other models are refused with a ValueError.
    """
    import diffusers
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    if not isinstance(transformer, diffusers.WanTransformer3DModel):
        raise ValueError(
            f"use_tkpy_attention: {type(transformer).__name__} is not supported; tkpy's video-DiT attention "
            "processor supports diffusers' WanTransformer3DModel (not HunyuanVideo or CogVideoX)"
        )
    if not isinstance(transformer.rope, (WanRotaryPosEmbed, _WanRope)):
        raise ValueError(
            f"use_tkpy_attention: transformer.rope is a {type(transformer.rope).__name__}, not Wan's own; "
            "if apply_riflex patched it, pass num_frames here instead"
        )
    config = transformer.config
    _check_head_dim(config.attention_head_dim, "use_tkpy_attention")
    split = axis_split("wan", config.attention_head_dim)
    if k is not None:
        if not 1 <= k <= split.t // 2:
            raise ValueError(f"use_tkpy_attention: k must be in [1, {split.t // 2}] for Wan's temporal axis, got {k}")
        split = dataclasses.replace(split, riflex_k=k)
    patch_t = config.patch_size[0]
    L_test = None if num_frames is None else -(-latent_frames(num_frames, temporal_compression) // patch_t)
    if mode not in _RIFLEX_MODES:
        raise ValueError(f"use_tkpy_attention: mode must be one of {_RIFLEX_MODES}, got {mode!r}")
    transformer.rope = _WanRope(split, config.patch_size, L_test, mode)
    transformer.set_attn_processor(WanAttnProcessor())
    return transformer

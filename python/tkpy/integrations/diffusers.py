"""diffusers' video transformers on tkpy: RIFLEx for HunyuanVideo, Wan and CogVideoX, and tkpy
attention for Wan.

:func:`apply_riflex` gives a pipeline (or its transformer) RIFLEx's temporal frequency for a
requested clip length. The model's own code still builds its rotary embedding; the patch then
overwrites the one temporal component that RIFLEx changes. So every other value stays exactly as
diffusers computed it (Wan builds its tables in float64, for instance), the output keeps the
model's format, dtype and device, and when RIFLEx is inactive the model is left as diffusers made it.

- HunyuanVideo and Wan build their RoPE in the transformer's ``rope`` submodule, which is replaced
  by a wrapper around it (both ``transformer`` and ``transformer_2`` of a Wan 2.2 pipeline).
- CogVideoX's transformer receives its RoPE as an argument from the pipeline, so the pipeline's
  ``_prepare_rotary_positional_embeddings`` is overridden on that pipeline instance.

:class:`WanAttnProcessor` runs Wan's attention on tkpy, and :func:`use_tkpy_attention` installs it
together with a RoPE module that hands it per-axis tables (:class:`tkpy.runtime.dit.Rope3D`, with
RIFLEx for a requested clip length) instead of ``[S, D]`` cos/sin tables; with
``extrapolation="ultravico"`` or ``"both"`` the self-attention also decays its logits as UltraViCo
does (:mod:`tkpy.ultravico`). Wan is the model that is supported because it is the simplest to
match exactly: RoPE covers every token of the self-attention (HunyuanVideo and CogVideoX
concatenate text tokens into a joint attention, rotate only the video part, and HunyuanVideo masks
padded text), and there is no attention mask.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import diffusers
import torch
from torch import nn

from tkpy.errors import ArgumentError
from tkpy.riflex import (AxisSplit, axis_split, get_1d_rotary_pos_embed_riflex, latent_frames, riflex_frequency_index,
                         rope_3d_freqs)
from tkpy.rope import apply_rope, apply_rope_
from tkpy.runtime.dit import RIFLEX_MODES, Rope3D, attention, check_dtype, check_head_dim
from tkpy.ultravico import UltraViCoConfig, check_config

__all__ = ["EXTRAPOLATIONS", "WanAttnProcessor", "apply_riflex", "use_tkpy_attention"]

# use_tkpy_attention's ways to generate past the trained length: RIFLEx's RoPE frequency,
# UltraViCo's logit decay (what its authors ran, with stock RoPE), or both.
EXTRAPOLATIONS = ("riflex", "ultravico", "both")

_COGVIDEOX_METHOD = "_prepare_rotary_positional_embeddings"
_SUPPORTED = (
    "a HunyuanVideoTransformer3DModel, a WanTransformer3DModel, or a diffusers pipeline whose transformer "
    "is one of those or a CogVideoXTransformer3DModel"
)


def _isinstance(obj, class_name: str) -> bool:
    """isinstance against a diffusers class; False when the installed diffusers lacks that class."""
    cls = getattr(diffusers, class_name, None)
    return cls is not None and isinstance(obj, cls)


@dataclasses.dataclass(frozen=True)
class _TemporalRiflex:
    """RIFLEx's value for component ``k`` of a temporal RoPE axis of ``t_dim`` dims and base ``theta``."""

    t_dim: int
    theta: float
    k: int
    L_test: int

    def __call__(self, cos: torch.Tensor, sin: torch.Tensor, num_t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Overwrite component ``k`` in a diffusers ``(cos, sin)`` pair.

        The tables hold one row per token in (t, h, w) order, with the temporal dims first in the
        last axis; any leading or trailing size-1 axes (Wan's ``[1, S, 1, D]``) are kept.
        """
        pos = torch.arange(num_t, device=cos.device, dtype=torch.float32)
        new_cos, new_sin = get_1d_rotary_pos_embed_riflex(
            self.t_dim, pos, self.theta, use_real=True, k=self.k, L_test=self.L_test
        )
        # Real tables repeat each component on two adjacent dims.
        pair = slice(2 * self.k - 2, 2 * self.k)
        return _overwrite(cos, new_cos[:, pair], pair), _overwrite(sin, new_sin[:, pair], pair)


def _overwrite(table: torch.Tensor, values: torch.Tensor, dims: slice) -> torch.Tensor:
    """A copy of ``table`` with ``dims`` of every token of frame t set to ``values[t]``."""
    # A copy, because the model's table may be a cached buffer or shared with other callers.
    out = table.clone(memory_format=torch.contiguous_format)
    out.view(values.shape[0], -1, out.shape[-1])[..., dims] = values[:, None].to(out.dtype)
    return out


class _RiflexRope(nn.Module):
    """A HunyuanVideo or Wan ``rope`` module whose temporal component ``k`` follows RIFLEx."""

    def __init__(self, rope: nn.Module, patch_size_t: int, riflex: _TemporalRiflex):
        super().__init__()
        self.rope = rope
        self.patch_size_t = patch_size_t
        self.riflex = riflex

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rope(hidden_states)
        return self.riflex(cos, sin, hidden_states.shape[2] // self.patch_size_t)

    def extra_repr(self) -> str:
        return f"k={self.riflex.k}, L_test={self.riflex.L_test}"


def _riflex_split(who: str, model: str, head_dim: int, k: Optional[int]) -> AxisSplit:
    """The model's RoPE axis split, with RIFLEx's component ``k`` when one is given."""
    split = axis_split(model, head_dim)
    if k is None:
        return split
    if not 1 <= k <= split.t // 2:
        raise ArgumentError(f"{who}: k must be in [1, {split.t // 2}] for {model}'s temporal axis, got {k}")
    return dataclasses.replace(split, riflex_k=k)


def _rope_frames(num_frames: int, temporal_compression: int, patch_size_t: int) -> int:
    """L_test: RoPE positions count patched latent frames, so the clip length is measured in them."""
    return -(-latent_frames(num_frames, temporal_compression) // patch_size_t)


def _temporal_riflex(model: str, head_dim: int, patch_size_t: int, num_frames: int, temporal_compression: int,
                     mode: str, k: Optional[int]) -> Optional[_TemporalRiflex]:
    """The temporal change RIFLEx makes for this model and clip, or None when RoPE stays unchanged."""
    split = _riflex_split("apply_riflex", model, head_dim, k)
    L_test = _rope_frames(num_frames, temporal_compression, patch_size_t)
    k_used, L = riflex_frequency_index(split, L_test, mode)
    return None if k_used is None else _TemporalRiflex(split.t, split.theta, k_used, L)


def _rope_module_model(transformer) -> Optional[tuple[str, int]]:
    """(tkpy model name, temporal patch size) of a transformer with a ``rope`` submodule, or None."""
    if _isinstance(transformer, "HunyuanVideoTransformer3DModel"):
        config = transformer.config
        split = axis_split("hunyuanvideo", config.attention_head_dim)
        if tuple(config.rope_axes_dim) != (split.t, split.h, split.w) or config.rope_theta != split.theta:
            raise ArgumentError(
                f"apply_riflex: HunyuanVideo with rope_axes_dim={tuple(config.rope_axes_dim)} and "
                f"rope_theta={config.rope_theta} is not supported; RIFLEx's k is known for "
                f"({split.t}, {split.h}, {split.w}) and theta {split.theta}"
            )
        return "hunyuanvideo", config.patch_size_t
    if _isinstance(transformer, "WanTransformer3DModel"):
        return "wan", transformer.config.patch_size[0]
    return None


def _patch_rope_module(transformer, patch_size_t: int, riflex: Optional[_TemporalRiflex]) -> None:
    rope = transformer.rope
    if isinstance(rope, _RiflexRope):  # applied before: start again from diffusers' own module
        rope = rope.rope
    transformer.rope = rope if riflex is None else _RiflexRope(rope, patch_size_t, riflex)


def _patch_cogvideox(pipe, riflex: Optional[_TemporalRiflex]) -> None:
    pipe.__dict__.pop(_COGVIDEOX_METHOD, None)  # applied before: back to the class's method
    if riflex is None:
        return
    original = getattr(pipe, _COGVIDEOX_METHOD)
    # CogVideoX 1.5 patches 2 latent frames into one RoPE position; 1.0 has patch_size_t None.
    patch_size_t = pipe.transformer.config.patch_size_t or 1

    def prepare_rotary_positional_embeddings(height, width, num_frames, device):
        cos, sin = original(height, width, num_frames, device)
        return riflex(cos, sin, -(-num_frames // patch_size_t))

    setattr(pipe, _COGVIDEOX_METHOD, prepare_rotary_positional_embeddings)


def apply_riflex(target, num_frames: int, mode: str = "training_free", k: Optional[int] = None):
    """Give a diffusers video model RIFLEx's temporal RoPE frequency for ``num_frames`` frames.

    Parameters
    ----------
    target : diffusers pipeline or transformer
        A HunyuanVideo or Wan pipeline, or its ``HunyuanVideoTransformer3DModel`` /
        ``WanTransformer3DModel``; or a CogVideoX pipeline (``CogVideoXPipeline`` and its
        image-to-video, video-to-video and Fun-control variants). A bare
        ``CogVideoXTransformer3DModel`` is refused because its pipeline builds its RoPE.
    num_frames : int
        Frames of the clip to generate. ``L_test`` is its number of latent frames (temporal
        compression 4, or the pipeline's ``vae_scale_factor_temporal``) divided, rounding up, by
        the transformer's temporal patch size.
    mode : {"training_free", "fine_tuned", "off"}
        ``"training_free"``: set component ``k`` to ``0.9 · 2π / L_test`` when ``L_test > N_k``,
        else keep RoPE unchanged. ``"fine_tuned"``: set it for ``L = N_k``, as the RIFLEx
        fine-tuned checkpoints expect. ``"off"``: keep RoPE unchanged.
    k : int, optional
        1-based index of the temporal intrinsic frequency; defaults to the model's
        (HunyuanVideo 4, CogVideoX 2, Wan 6, see :func:`tkpy.riflex.axis_split`).

    Returns
    -------
    target
        The same object, patched. Calling again replaces an earlier patch; when RoPE is to stay
        unchanged, diffusers' own rotary embedding is restored.

    Raises
    ------
    ValueError
        For an unsupported target, a CogVideoX model without rotary embeddings, or a bad
        ``num_frames``, ``mode`` or ``k``.
    """
    is_pipeline = _isinstance(target, "DiffusionPipeline")
    transformer = getattr(target, "transformer", None) if is_pipeline else target
    temporal_compression = getattr(target, "vae_scale_factor_temporal", 4) if is_pipeline else 4

    if _isinstance(transformer, "CogVideoXTransformer3DModel"):
        config = transformer.config
        if not is_pipeline:
            raise ArgumentError(
                "apply_riflex: a CogVideoXTransformer3DModel receives its rotary embedding from its pipeline; "
                "pass the CogVideoX pipeline instead"
            )
        if not hasattr(type(target), _COGVIDEOX_METHOD):
            raise ArgumentError(f"apply_riflex: unsupported target {type(target).__name__}; it has no {_COGVIDEOX_METHOD}")
        if not config.use_rotary_positional_embeddings:
            raise ArgumentError("apply_riflex: this CogVideoX model uses no rotary embedding, so RIFLEx does not apply")
        riflex = _temporal_riflex(
            "cogvideox", config.attention_head_dim, config.patch_size_t or 1, num_frames, temporal_compression, mode, k
        )
        _patch_cogvideox(target, riflex)
        return target

    # A Wan 2.2 pipeline denoises with two experts; both need the same RoPE.
    transformers = [transformer]
    if is_pipeline and getattr(target, "transformer_2", None) is not None:
        transformers.append(target.transformer_2)
    # Work out every change before making any, so a bad argument leaves the target untouched.
    changes = []
    for t in transformers:
        found = _rope_module_model(t)
        if found is None:
            received = type(target).__name__
            if is_pipeline:
                received += f" with transformer {type(t).__name__}"
            raise ArgumentError(f"apply_riflex: unsupported target {received}; expected {_SUPPORTED}")
        model, patch_size_t = found
        riflex = _temporal_riflex(
            model, t.config.attention_head_dim, patch_size_t, num_frames, temporal_compression, mode, k
        )
        changes.append((t, patch_size_t, riflex))
    for t, patch_size_t, riflex in changes:
        _patch_rope_module(t, patch_size_t, riflex)
    return target


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
    (stock or :func:`apply_riflex`'d, rotated by :func:`tkpy.rope.apply_rope_`), so
    ``transformer.set_attn_processor(WanAttnProcessor())`` alone works too. fp32 models get bf16
    attention (see :func:`tkpy.runtime.dit.attention`). Wan image-to-video attention
    (``add_k_proj``) and attention masks are refused.

    With ``ultravico``, self-attention decays its logits as UltraViCo does, with
    ``tokens_per_frame`` taken from the token grid of the :class:`Rope3D` it receives (so it needs
    :func:`use_tkpy_attention`'s RoPE); cross-attention is left as it is.
    """

    def __init__(self, ultravico: Optional[UltraViCoConfig] = None):
        check_config("WanAttnProcessor", ultravico, optional=True)
        self.ultravico = ultravico

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.transformers.transformer_wan import WanAttention

        if not isinstance(attn, WanAttention):
            raise ArgumentError(
                f"tkpy WanAttnProcessor supports diffusers' Wan attention (WanAttention), got {type(attn).__name__}; "
                "HunyuanVideo and CogVideoX attention are not supported"
            )
        if attn.add_k_proj is not None:
            raise ArgumentError("tkpy WanAttnProcessor: Wan image-to-video attention (add_k_proj) is not supported")
        if attention_mask is not None:
            raise ArgumentError("tkpy WanAttnProcessor: an attention_mask is not supported (Wan passes none)")
        check_dtype(hidden_states, "tkpy WanAttnProcessor")
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
        check_head_dim(q.shape[-1], "tkpy WanAttnProcessor")
        if isinstance(rotary_emb, Rope3D):
            q, k = rotary_emb.rotate(q, k)
        elif rotary_emb is not None:
            cos, sin = rotary_emb
            # Each angle is repeated on the two dims of its interleaved pair; keep one per pair.
            cos = cos.reshape(q.shape[1], q.shape[-1])[:, 0::2].float().contiguous()
            sin = sin.reshape(q.shape[1], q.shape[-1])[:, 1::2].float().contiguous()
            training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
            q, k = (apply_rope if training else apply_rope_)(q, k, cos, sin, interleaved=True)
        decay = None
        if self.ultravico is not None and encoder_hidden_states is None:
            if not isinstance(rotary_emb, Rope3D):
                raise ArgumentError(
                    "tkpy WanAttnProcessor: UltraViCo needs the token grid, which use_tkpy_attention's RoPE passes; "
                    "install the processor with use_tkpy_attention(transformer, extrapolation='ultravico')"
                )
            decay = self.ultravico.for_grid(rotary_emb.grid_thw)
        out = attention(q, k, v, decay).flatten(2).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def use_tkpy_attention(transformer, num_frames: Optional[int] = None, mode: str = "training_free",
                       k: Optional[int] = None, temporal_compression: int = 4, extrapolation: str = "riflex",
                       ultravico: Optional[UltraViCoConfig] = None):
    """Run a diffusers ``WanTransformer3DModel``'s attention on tkpy, RoPE included.

    Sets :class:`WanAttnProcessor` on every attention module and replaces ``transformer.rope``
    by a module that gives the processors per-axis RoPE tables.

    ``extrapolation`` says how to generate past the trained length:

    - ``"riflex"`` (default): with ``num_frames``, the temporal axis follows RIFLEx for that clip
      length, exactly as :func:`apply_riflex` (``L_test`` = latent frames of the clip divided,
      rounding up, by the temporal patch size; ``mode`` and ``k`` as there); without it, RoPE is
      diffusers'.
    - ``"ultravico"``: diffusers' RoPE, and the self-attention decays its logits as UltraViCo does
      (``ultravico``, default :meth:`UltraViCoConfig.wan21`, its ``tokens_per_frame`` taken from each
      call's token grid). This is what UltraViCo's authors ran. ``num_frames``, ``mode`` and ``k``
      concern RIFLEx only and are not needed (they are still checked): the decay depends on token
      distances and the trained length alone.
    - ``"both"``: RIFLEx's RoPE for ``num_frames`` and UltraViCo's decay.

    Returns ``transformer``. Other models are refused with a ValueError. UltraViCo is for
    inference: its decay has no backward.
    """
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    if not isinstance(transformer, diffusers.WanTransformer3DModel):
        raise ArgumentError(
            f"use_tkpy_attention: {type(transformer).__name__} is not supported; tkpy's video-DiT attention "
            "processor supports diffusers' WanTransformer3DModel (not HunyuanVideo or CogVideoX)"
        )
    if not isinstance(transformer.rope, (WanRotaryPosEmbed, _WanRope)):
        raise ArgumentError(
            f"use_tkpy_attention: transformer.rope is a {type(transformer.rope).__name__}, not Wan's own; "
            "if apply_riflex patched it, pass num_frames here instead"
        )
    if mode not in RIFLEX_MODES:
        raise ArgumentError(f"use_tkpy_attention: mode must be one of {RIFLEX_MODES}, got {mode!r}")
    if extrapolation not in EXTRAPOLATIONS:
        raise ArgumentError(f"use_tkpy_attention: extrapolation must be one of {EXTRAPOLATIONS}, got {extrapolation!r}")
    check_config("use_tkpy_attention", ultravico, optional=True)
    if extrapolation == "riflex" and ultravico is not None:
        raise ArgumentError("use_tkpy_attention: an ultravico config needs extrapolation='ultravico' or 'both'")
    if extrapolation == "both" and num_frames is None:
        raise ArgumentError("use_tkpy_attention: extrapolation='both' needs num_frames (RIFLEx's clip length)")
    if extrapolation != "riflex" and ultravico is None:
        ultravico = UltraViCoConfig.wan21()
    config = transformer.config
    check_head_dim(config.attention_head_dim, "use_tkpy_attention")
    split = _riflex_split("use_tkpy_attention", "wan", config.attention_head_dim, k)
    riflex = num_frames is not None and extrapolation != "ultravico"
    L_test = _rope_frames(num_frames, temporal_compression, config.patch_size[0]) if num_frames is not None else None
    transformer.rope = _WanRope(split, config.patch_size, L_test if riflex else None, mode)
    transformer.set_attn_processor(WanAttnProcessor(ultravico))
    return transformer

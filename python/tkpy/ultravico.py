"""UltraViCo: video length extrapolation by decaying attention logits (arXiv 2511.20123).

A video DiT trained on ``T_train`` latent frames repeats or freezes when asked for more. UltraViCo
(training-free, from the RIFLEx group) pulls down the attention logits between video tokens
farther apart than the training window, which reaches about 4x the trained length. tkpy fuses
it into its attention: ``ultravico_attn_func`` is ``flash_attn_func`` (non-causal, no window)
with the decay applied per element in registers, on the CPU and on Hopper.

For self-attention over tokens laid out frame-major (token = t·H·W + h·W + w), video first and
``text_tokens`` text tokens after it (HunyuanVideo's joint attention), with s = q_i·k_j·scale and
c_i = q_i·k̄·scale, k̄ the mean key of the sequence (text included) and head:

- **Window.** A video pair with ``2|i − j| > train_frames · tokens_per_frame`` whose logit is
  above the row's centre (s > c_i) gets ``c_i + alpha · (s − c_i)``.
- **Harmonic bands.** Where ``|i − j|`` lies in ``[m·band_period − band_width,
  m·band_period + band_width] · tokens_per_frame`` for some m in 1..band_count (both ends included),
  ``beta`` replaces ``alpha``. HunyuanVideo's bands sit at multiples of RIFLEx's intrinsic period
  (N_k = 50 latent frames), γ = 4 frames wide.
- **First-frame mask.** Queries of latent frame 0 do not see the video keys of frames
  ``train_frames`` and later (the authors' Wan setting; their kernel is off by one at both frame
  boundaries, tkpy tests the frames exactly).
- Text queries and keys are never decayed; padding past a sequence's length is never attended.

The authors ran UltraViCo *instead of* RIFLEx (stock RoPE). tkpy lets a model take either or both
(:func:`tkpy.integrations.diffusers.use_tkpy_attention`'s ``extrapolation``).

The decay has no backward: UltraViCo is training-free, and the functions refuse inputs that need
a gradient.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional, Sequence

import torch

from . import _ops
from .errors import ArgumentError

__all__ = ["UltraViCoConfig", "num_frames_for_ratio", "ultravico_attn_func", "ultravico_attn_varlen_func"]

# The VAE and patch sizes of both models: 8x spatial compression then 2x2 patches, so one latent
# frame of an H x W video is (H/16)·(W/16) tokens; 4x temporal compression.
_SPATIAL_STRIDE = 16
_TEMPORAL_COMPRESSION = 4


_INT32_MAX = 2**31 - 1  # the kernels index tokens in int32


def _integer(who: str, name: str, value, lo: int) -> int:
    """An int setting in [lo, 2^31 - 1]: a TypeError for another type, an ArgumentError outside."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{who}: {name} must be an int, got {type(value).__name__} {value!r}")
    if not lo <= value <= _INT32_MAX:
        raise ArgumentError(f"{who}: {name} must be in [{lo}, {_INT32_MAX}], got {value!r}")
    return int(value)


def _factor(who: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{who}: {name} must be a real number, got {type(value).__name__} {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ArgumentError(f"{who}: {name} must be in [0, 1] (a decay factor), got {value!r}")
    return float(value)


def check_config(who: str, config, optional: bool = False, name: str = "ultravico") -> None:
    """A TypeError naming ``who`` and the argument ``name`` unless ``config`` is an UltraViCoConfig
    (or None when optional)."""
    if not isinstance(config, UltraViCoConfig) and not (optional and config is None):
        raise TypeError(f"{who}: {name} must be a tkpy.ultravico.UltraViCoConfig{' or None' if optional else ''}, "
                        f"got {type(config).__name__}")


@dataclasses.dataclass(frozen=True)
class UltraViCoConfig:
    """UltraViCo's settings for one model and resolution (see the module docstring for the rules).

    Parameters
    ----------
    tokens_per_frame : int
        Tokens of one latent frame after patching, H·W of the token grid (Wan2.1 at 480x832: 1560).
    train_frames : int
        T_train, the latent frames the model was trained on (Wan2.1: 21, HunyuanVideo: 33). Frames
        here are frames of the token grid: latent frames divided by the temporal patch size, which
        is 1 for both models.
    alpha : float in [0, 1]
        The decay beyond half the training window (0.9 in both of the authors' scripts).
    beta : float in [0, 1]
        The decay inside the harmonic bands (HunyuanVideo: 0.6); unused without bands.
    band_period, band_width, band_count : int
        The bands, in latent frames: ``[m·band_period − band_width, m·band_period + band_width]`` for
        m = 1..band_count (HunyuanVideo: 50, 4, 4). band_count 0 turns them off.
    first_frame_mask : bool
        Queries of latent frame 0 do not see the video keys of frames ``train_frames`` and later
        (Wan: on).
    text_tokens : int
        Tokens after the video in each sequence that are text (HunyuanVideo's joint attention: 256),
        never decayed; the same count for every sequence of a call. 0 for Wan's self-attention.

    Integers must be in [0, 2^31 - 1] (a TypeError for another type, an ArgumentError outside), and
    the op refuses settings whose token products overflow int32.
    """

    tokens_per_frame: int
    train_frames: int
    alpha: float = 0.9
    beta: float = 1.0
    band_period: int = 0
    band_width: int = 0
    band_count: int = 0
    first_frame_mask: bool = False
    text_tokens: int = 0

    def __post_init__(self):
        who = "UltraViCoConfig"
        _integer(who, "tokens_per_frame", self.tokens_per_frame, 1)
        _integer(who, "train_frames", self.train_frames, 1)
        _factor(who, "alpha", self.alpha)
        _factor(who, "beta", self.beta)
        _integer(who, "band_count", self.band_count, 0)
        _integer(who, "band_period", self.band_period, 1 if self.band_count else 0)
        _integer(who, "band_width", self.band_width, 0)
        _integer(who, "text_tokens", self.text_tokens, 0)
        # A numpy bool is taken as the bool it is; the frozen dataclass keeps a plain one.
        if type(self.first_frame_mask).__module__ == "numpy" and type(self.first_frame_mask).__name__ in ("bool", "bool_"):
            object.__setattr__(self, "first_frame_mask", bool(self.first_frame_mask))
        if not isinstance(self.first_frame_mask, bool):
            raise TypeError(f"{who}: first_frame_mask must be a bool, got {type(self.first_frame_mask).__name__}")

    @classmethod
    def wan21(cls, height: int = 480, width: int = 832, **overrides) -> "UltraViCoConfig":
        """The authors' Wan2.1 setting (``ultra-wan``'s inference script): T_train = 21 latent
        frames (81 frames), alpha 0.9, the first-frame mask, no bands, no text in self-attention.
        ``tokens_per_frame`` follows the resolution: (height/16)·(width/16), 1560 at 480x832.
        Keyword overrides replace any field, e.g. ``wan21(alpha=0.8)``."""
        config = cls(tokens_per_frame=_frame_tokens("wan21", height, width), train_frames=21, alpha=0.9,
                     first_frame_mask=True)
        return dataclasses.replace(config, **overrides)

    @classmethod
    def hunyuan_video(cls, height: int = 544, width: int = 960, **overrides) -> "UltraViCoConfig":
        """The authors' HunyuanVideo setting (``ultra-hunyuan``'s scripts): T_train = 33 latent
        frames (129 frames), alpha 0.9, beta 0.6 in the bands at multiples of 50 frames ± 4 (m = 1..4),
        256 text tokens after the video, no first-frame mask. 2040 tokens per frame at 544x960."""
        config = cls(tokens_per_frame=_frame_tokens("hunyuan_video", height, width), train_frames=33, alpha=0.9,
                     beta=0.6, band_period=50, band_width=4, band_count=4, text_tokens=256)
        return dataclasses.replace(config, **overrides)

    def for_grid(self, grid_thw: Sequence[int]) -> "UltraViCoConfig":
        """This config with ``tokens_per_frame`` = H·W of a (T, H, W) token grid."""
        grid = tuple(grid_thw)
        if len(grid) != 3 or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 for n in grid):
            raise ArgumentError(f"UltraViCoConfig.for_grid: grid_thw must be 3 positive integers, got {grid_thw!r}")
        return dataclasses.replace(self, tokens_per_frame=int(grid[1]) * int(grid[2]))

    def num_frames(self, ratio) -> int:
        """Frames to generate for an extrapolation ratio: ``(train_frames · ratio − 1) · 4 + 1``."""
        return num_frames_for_ratio(self.train_frames, ratio)


def _frame_tokens(who: str, height: int, width: int) -> int:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < _SPATIAL_STRIDE or \
                value % _SPATIAL_STRIDE:
            raise ArgumentError(f"UltraViCoConfig.{who}: {name} must be a positive multiple of {_SPATIAL_STRIDE}, "
                                f"got {value!r}")
    return (height // _SPATIAL_STRIDE) * (width // _SPATIAL_STRIDE)


def num_frames_for_ratio(train_frames: int, ratio) -> int:
    """Frames of a clip ``ratio`` times as long as the training one: ``(train_frames · ratio − 1) · 4 + 1``
    (Wan2.1 at 4x: 333; HunyuanVideo at 3x: 393). ``train_frames · ratio`` must be a whole number of
    latent frames."""
    train_frames = _integer("num_frames_for_ratio", "train_frames", train_frames, 1)
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise TypeError(f"num_frames_for_ratio: ratio must be a real number, got {type(ratio).__name__}")
    if not (math.isfinite(ratio) and 0 < ratio and train_frames * ratio <= _INT32_MAX):
        raise ArgumentError(f"num_frames_for_ratio: ratio must be a positive number with train_frames * ratio "
                            f"latent frames in int32, got {ratio!r}")
    latent = train_frames * ratio
    if abs(latent - round(latent)) > 1e-9:
        raise ArgumentError(f"num_frames_for_ratio: train_frames * ratio = {train_frames} * {ratio} is not a whole "
                            "number of latent frames")
    return (int(round(latent)) - 1) * _TEMPORAL_COMPRESSION + 1


def _check(who: str, config, tensors) -> None:
    check_config(who, config, name="config")
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise NotImplementedError(
            f"{who}: UltraViCo's decay has no backward (the method is training-free); call it under "
            "torch.no_grad() or torch.inference_mode()")


def _settings(config: UltraViCoConfig) -> dict:
    return dict(tokens_per_frame=config.tokens_per_frame, train_frames=config.train_frames, alpha=config.alpha,
                beta=config.beta, band_period=config.band_period, band_width=config.band_width,
                band_count=config.band_count, first_frame_mask=config.first_frame_mask,
                text_tokens=config.text_tokens)


def ultravico_attn_func(q, k, v, config: UltraViCoConfig, softmax_scale: Optional[float] = None,
                        return_attn_probs: bool = False):
    """Non-causal attention with UltraViCo's decay, flash-attn layout.

    q ``[B, S, Hq, D]``, k and v ``[B, S_k, Hkv, D]`` (GQA as in :func:`tkpy.flash_attn_func`), D in
    {64, 128, 256}; bf16 or fp16 (fp32 on the CPU). Each sequence holds its video tokens frame-major,
    then ``config.text_tokens`` text tokens. Returns out ``[B, S, Hq, D]``, or ``(out, softmax_lse,
    None)`` with ``return_attn_probs`` (lse of the decayed logits, fp32 ``[B, Hq, S]``).
    """
    _check("ultravico_attn_func", config, (q, k, v))
    out, lse = _ops.call("ultravico_attention_forward", q, k, v,
                         softmax_scale=_ops.optional_float("softmax_scale", softmax_scale), **_settings(config))
    return (out, lse, None) if _ops.bool_arg("return_attn_probs", return_attn_probs) else out


def ultravico_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               config: UltraViCoConfig, softmax_scale: Optional[float] = None,
                               return_attn_probs: bool = False):
    """:func:`ultravico_attn_func` over videos packed along the token dimension (flash-attn's varlen
    layout: q ``[total_q, Hq, D]``, int32 ``cu_seqlens`` ``[B + 1]``). Token positions, and so frames
    and distances, count from each sequence's start; its last ``config.text_tokens`` tokens are text
    (a sequence shorter than that is all text)."""
    _check("ultravico_attn_varlen_func", config, (q, k, v))
    if cu_seqlens_q is None or cu_seqlens_k is None:
        raise ArgumentError("ultravico_attn_varlen_func: cu_seqlens_q and cu_seqlens_k are required (int32 [batch + 1])")
    out, lse = _ops.call("ultravico_attention_forward", q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                         max_seqlen_q=_ops.int_arg("max_seqlen_q", max_seqlen_q),
                         max_seqlen_k=_ops.int_arg("max_seqlen_k", max_seqlen_k),
                         softmax_scale=_ops.optional_float("softmax_scale", softmax_scale), **_settings(config))
    return (out, lse, None) if _ops.bool_arg("return_attn_probs", return_attn_probs) else out

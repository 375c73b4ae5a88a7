"""RIFLEx: training-free length extrapolation for video diffusion transformers.

RIFLEx (Zhao et al., 2025) lowers the one RoPE frequency of the temporal axis whose period matches
the length at which a video starts to repeat (the *intrinsic* frequency, index ``k``), so that the
extrapolated clip stays within 90% of one period of it.

The first two functions keep the signatures and results of the RIFLEx repository. The rest builds
per-axis frequency tables for the 3D RoPE of CogVideoX, HunyuanVideo and Wan, in the form that
:func:`tkpy.rope.apply_rope_3d_` takes.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .errors import ArgumentError
from .validation import positive_as_float32

__all__ = [
    "identify_k",
    "get_1d_rotary_pos_embed_riflex",
    "AxisSplit",
    "axis_split",
    "latent_frames",
    "riflex_frequency_index",
    "rope_3d_freqs",
]


def _check_theta(fn: str, theta) -> None:
    # A base <= 0 (or NaN, inf, or one that float32, the frequencies' dtype, rounds to 0 or inf)
    # gives NaN or constant angles: no rotation anyone could want.
    if not positive_as_float32(theta):
        raise ArgumentError(f"{fn}: theta (the RoPE base) must be a finite number > 0 as a float32, got {theta!r}")


def _check_int(fn: str, name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ArgumentError(f"{fn}: {name} must be an int >= {low}, got {value!r}")
    return int(value)


def _periods(b: float, d: int) -> list[int]:
    """Period N_j = round(2π / θ_j) of each RoPE component, θ_j = b^(-2(j-1)/d), j = 1..d/2."""
    return [round(2 * math.pi * b ** (2 * (j - 1) / d)) for j in range(1, d // 2 + 1)]


def identify_k(b: float, d: int, N: int) -> tuple[int, int]:
    """Find the intrinsic frequency of a RoPE axis.

    Parameters
    ----------
    b : float
        RoPE base of the axis (HunyuanVideo: 256, CogVideoX and Wan: 10000).
    d : int
        Number of dims of the axis (even).
    N : int
        First latent frame at which the video repeats.

    Returns
    -------
    (k, N_k) : tuple of int
        The 1-based index of the component whose period is closest to ``N``, and that period.
        The first closest wins on ties. HunyuanVideo: ``identify_k(256, 16, 48) == (4, 50)``.
    """
    if _check_int("identify_k", "d", d, low=2) % 2:
        raise ArgumentError(f"identify_k: d must be a positive even number of dims, got {d}")
    _check_int("identify_k", "N", N)
    if not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 1:
        raise ArgumentError(f"identify_k: the RoPE base b must be a finite number > 1, got {b!r}")
    periods = _periods(b, d)
    distances = [abs(n_j - N) for n_j in periods]
    k = distances.index(min(distances)) + 1
    return k, periods[k - 1]


def get_1d_rotary_pos_embed_riflex(
    dim: int,
    pos: Union[np.ndarray, int, torch.Tensor],
    theta: float = 10000.0,
    use_real: bool = False,
    k: Optional[int] = None,
    L_test: Optional[int] = None,
):
    """1D RoPE frequencies with the RIFLEx change to component ``k``.

    Parameters
    ----------
    dim : int
        Even number of dims.
    pos : int, np.ndarray or torch.Tensor
        Positions ``[S]``, or ``S`` for ``arange(S)``.
    theta : float
        RoPE base.
    use_real : bool
        If True, return ``(cos, sin)``, each float32 ``[S, dim]`` with every value repeated twice
        (interleaved pairs). Otherwise return complex64 ``[S, dim/2]``.
    k : int, optional
        1-based index of the intrinsic frequency. None leaves RoPE unchanged.
    L_test : int, optional
        Number of latent frames at inference; required with ``k``. Component ``k`` becomes
        ``0.9 · 2π / L_test``.
    """
    if _check_int("get_1d_rotary_pos_embed_riflex", "dim", dim, low=2) % 2:
        raise ArgumentError(f"get_1d_rotary_pos_embed_riflex: dim must be a positive even number, got {dim}")
    _check_theta("get_1d_rotary_pos_embed_riflex", theta)
    if isinstance(pos, numbers.Integral) and not isinstance(pos, bool):
        pos = torch.arange(_check_int("get_1d_rotary_pos_embed_riflex", "pos", pos, low=0))
    elif isinstance(pos, np.ndarray):
        pos = torch.from_numpy(pos)
    elif not isinstance(pos, torch.Tensor):
        raise TypeError(f"get_1d_rotary_pos_embed_riflex: pos must be an int, np.ndarray or Tensor, got {type(pos).__name__}")
    if pos.dim() != 1 or pos.is_complex():
        raise ArgumentError(f"get_1d_rotary_pos_embed_riflex: pos must be 1-D real positions [S], got "
                            f"{pos.dtype} {tuple(pos.shape)}")

    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, device=pos.device)[: dim // 2].float() / dim))
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= dim // 2:
            raise ArgumentError(f"get_1d_rotary_pos_embed_riflex: k must be in [1, {dim // 2}], got {k}")
        if isinstance(L_test, bool) or not isinstance(L_test, numbers.Real) or not math.isfinite(L_test) \
                or L_test <= 0:
            raise ArgumentError(f"get_1d_rotary_pos_embed_riflex: k={k} needs a positive L_test, got {L_test}")
        freqs[k - 1] = 0.9 * 2 * math.pi / L_test

    angles = torch.outer(pos, freqs)  # [S, dim/2]
    if use_real:
        return angles.cos().repeat_interleave(2, dim=1).float(), angles.sin().repeat_interleave(2, dim=1).float()
    return torch.polar(torch.ones_like(angles), angles)


@dataclass(frozen=True)
class AxisSplit:
    """How a model splits a head's dims over the (t, h, w) axes, and its RoPE base.

    ``riflex_k`` is the model's intrinsic temporal frequency (1-based); ``period`` is its period
    in latent frames (N_k).
    """

    t: int
    h: int
    w: int
    theta: float
    riflex_k: int

    def __post_init__(self):
        for axis in ("t", "h", "w"):
            value = getattr(self, axis)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 2:
                raise ArgumentError(f"AxisSplit: {axis} must be a positive even number of dims, got {value!r}")
        _check_theta("AxisSplit", self.theta)
        if isinstance(self.riflex_k, bool) or not isinstance(self.riflex_k, int) or not 1 <= self.riflex_k <= self.t // 2:
            raise ArgumentError(f"AxisSplit: riflex_k must be in [1, t/2 = {self.t // 2}], got {self.riflex_k!r}")

    @property
    def period(self) -> int:
        return _periods(self.theta, self.t)[self.riflex_k - 1]

    @property
    def rotary_dim(self) -> int:
        return self.t + self.h + self.w


# k for each model, as used by the RIFLEx integrations: HunyuanVideo k=4 (N_k=50),
# CogVideoX-5B k=2 (N_k=20), Wan2.1 k=6.
_MODELS = ("cogvideox", "hunyuanvideo", "wan")


def axis_split(model: str, head_dim: int) -> AxisSplit:
    """The (t, h, w) dims, base and intrinsic frequency of ``model``'s 3D RoPE.

    ``model`` is one of ``"cogvideox"``, ``"hunyuanvideo"``, ``"wan"``.
    """
    if not isinstance(model, str):
        raise ArgumentError(f"axis_split: model must be one of {_MODELS}, got {model!r}")
    model = model.lower()
    _check_int("axis_split", "head_dim", head_dim)
    if model == "cogvideox":
        if head_dim % 8:
            raise ArgumentError(f"axis_split: CogVideoX needs head_dim % 8 == 0, got {head_dim}")
        return AxisSplit(head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3, 10000.0, 2)
    if model == "hunyuanvideo":
        if head_dim != 128:
            raise ArgumentError(f"axis_split: HunyuanVideo's split (16, 56, 56) needs head_dim 128, got {head_dim}")
        return AxisSplit(16, 56, 56, 256.0, 4)
    if model == "wan":
        spatial = 2 * (head_dim // 6)
        temporal = head_dim - 2 * spatial
        if min(temporal, spatial) <= 0 or temporal % 2 or temporal // 2 < 6:
            raise ArgumentError(f"axis_split: Wan's split is undefined for head_dim {head_dim}")
        return AxisSplit(temporal, spatial, spatial, 10000.0, 6)
    raise ArgumentError(f"axis_split: unknown model {model!r}; expected one of {_MODELS}")


def latent_frames(num_frames: int, temporal_compression: int = 4) -> int:
    """Latent frames of a clip of ``num_frames`` frames: ``(num_frames - 1) // 4 + 1``."""
    _check_int("latent_frames", "num_frames", num_frames)
    _check_int("latent_frames", "temporal_compression", temporal_compression)
    return (num_frames - 1) // temporal_compression + 1


def riflex_frequency_index(split: AxisSplit, L_test: int, mode: str = "training_free") -> tuple[Optional[int], Optional[int]]:
    """``(k, L)`` to pass to :func:`get_1d_rotary_pos_embed_riflex` for the temporal axis.

    Modes:
      - ``"training_free"``: apply RIFLEx only when ``L_test > N_k``; otherwise return
        ``(None, None)`` (RoPE unchanged).
      - ``"fine_tuned"``: the model was fine-tuned with the frequency set at ``L = N_k``.
      - ``"off"``: never change RoPE.
    """
    if not isinstance(split, AxisSplit):
        raise ArgumentError(f"riflex_frequency_index: split must be an AxisSplit (from axis_split), got "
                            f"{type(split).__name__}")
    _check_int("riflex_frequency_index", "L_test", L_test)
    if mode == "off":
        return None, None
    if mode == "training_free":
        return (split.riflex_k, L_test) if L_test > split.period else (None, None)
    if mode == "fine_tuned":
        return split.riflex_k, split.period
    raise ArgumentError(f"riflex_frequency_index: mode must be 'training_free', 'fine_tuned' or 'off', got {mode!r}")


def rope_3d_freqs(
    split: AxisSplit,
    grid_thw: Sequence[int],
    L_test: Optional[int] = None,
    mode: str = "training_free",
    positions_hw: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    device: Optional[torch.device] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-axis frequency tables for :func:`tkpy.rope.apply_rope_3d_`.

    Parameters
    ----------
    split : AxisSplit
        From :func:`axis_split`.
    grid_thw : (T, H, W)
        Latent grid after patching.
    L_test : int, optional
        Latent frames at inference for RIFLEx; defaults to ``T``.
    mode : str
        See :func:`riflex_frequency_index`.
    positions_hw : (Tensor [H], Tensor [W]), optional
        Spatial positions when they are not ``arange`` (CogVideoX 1.0 crops).
    device : torch.device, optional

    Returns
    -------
    (freqs_t, freqs_h, freqs_w) : complex64 ``[T, t/2]``, ``[H, h/2]``, ``[W, w/2]``.
    """
    if len(grid_thw) != 3:
        raise ArgumentError(f"rope_3d_freqs: grid_thw must be (T, H, W), got {tuple(grid_thw)}")
    t_len, h_len, w_len = (_check_int("rope_3d_freqs", f"grid_thw[{i}]", x) for i, x in enumerate(grid_thw))
    k, L = riflex_frequency_index(split, t_len if L_test is None else L_test, mode)
    pos_t = torch.arange(t_len, device=device, dtype=torch.float32)
    if positions_hw is None:
        pos_h = torch.arange(h_len, device=device, dtype=torch.float32)
        pos_w = torch.arange(w_len, device=device, dtype=torch.float32)
    else:
        pos_h, pos_w = (p.to(device=device, dtype=torch.float32) for p in positions_hw)
        if pos_h.shape != (h_len,) or pos_w.shape != (w_len,):
            raise ArgumentError(f"rope_3d_freqs: positions_hw must be [H]={h_len} and [W]={w_len}, got {tuple(pos_h.shape)}, {tuple(pos_w.shape)}")
    freqs_t = get_1d_rotary_pos_embed_riflex(split.t, pos_t, split.theta, k=k, L_test=L)
    freqs_h = get_1d_rotary_pos_embed_riflex(split.h, pos_h, split.theta)
    freqs_w = get_1d_rotary_pos_embed_riflex(split.w, pos_w, split.theta)
    return freqs_t, freqs_h, freqs_w

"""RoPE cases (:func:`tkpy.rope.apply_rope_` and ``apply_rope_3d_``) and their eager peers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Optional, Sequence, Union

import torch

from .. import riflex
from .. import rope as tkpy_rope
from .core import PEER, _for_device, _random_copies


def rope_bytes(q_shape: Sequence[int], k_shape: Optional[Sequence[int]], dtype: torch.dtype) -> int:
    """Bytes an in-place RoPE is credited with: q and k read once and written once.

    Whole heads count even with partial rotary dims; the cos/sin tables and positions are
    small next to q and k and are not counted (see :data:`BYTES_CONVENTION`).
    """
    elements = math.prod(q_shape) + (math.prod(k_shape) if k_shape is not None else 0)
    return 2 * dtype.itemsize * elements


# --------------------------------------------------------------------------------------------
# Eager-PyTorch peers
# --------------------------------------------------------------------------------------------


def torch_rope_reference(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: Optional[torch.Tensor] = None,
    interleaved: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Eager-PyTorch peer of :func:`tkpy.rope.apply_rope_`, out of place.

    Written the way eager model code does it (Hugging Face transformers, vLLM's native path):
    gather the cos/sin rows, cast them to q's dtype and rotate in that dtype. This is the
    benchmark's baseline, not the test oracle (that is ``tkpy.reference``, in float64).

    Parameters
    ----------
    q, k, cos, sin, positions, interleaved
        As for :func:`tkpy.rope.apply_rope_`.

    Returns
    -------
    (q_rot, k_rot) : new tensors; ``k_rot`` is None when ``k`` is.
    """
    rows = positions if positions is not None else slice(0, q.shape[-3])
    # [..., S, 1, R/2]: broadcasts over the heads.
    c = cos[rows].to(q.dtype).unsqueeze(-2)
    s = sin[rows].to(q.dtype).unsqueeze(-2)
    k_rot = None if k is None else _rotate_pairs(k, c, s, interleaved)
    return _rotate_pairs(q, c, s, interleaved), k_rot


def _rotate_pairs(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, interleaved: bool) -> torch.Tensor:
    rotary = 2 * c.shape[-1]
    if interleaved:
        a, b = x[..., 0:rotary:2], x[..., 1:rotary:2]
        rotated = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    else:
        a, b = x[..., : rotary // 2], x[..., rotary // 2 : rotary]
        rotated = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    return _with_tail(rotated, x)


def _with_tail(rotated: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``rotated`` (x's first rotary dims, rotated) followed by x's dims past the rotary ones."""
    rotary = rotated.shape[-1]
    if rotary == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rotary:]), dim=-1)


def rope_3d_freqs_cis(
    grid_thw: Sequence[int], freqs_t: torch.Tensor, freqs_h: torch.Tensor, freqs_w: torch.Tensor
) -> torch.Tensor:
    """The complex ``[T·H·W, R/2]`` table that eager video DiTs build from the per-axis tables.

    Tokens are in (t, h, w) order; each token's row is its t, h and w rows side by side.
    """
    t, h, w = (int(x) for x in grid_thw)
    per_axis = (
        freqs_t[:t, None, None, :].expand(t, h, w, -1),
        freqs_h[None, :h, None, :].expand(t, h, w, -1),
        freqs_w[None, None, :w, :].expand(t, h, w, -1),
    )
    return torch.cat(per_axis, dim=-1).reshape(t * h * w, -1)


def torch_rope_3d_reference(
    q: torch.Tensor, k: Optional[torch.Tensor], freqs_cis: torch.Tensor
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Eager-PyTorch peer of :func:`tkpy.rope.apply_rope_3d_`, out of place.

    Written the way HunyuanVideo and Wan do it: view the interleaved dim pairs as complex
    float32, multiply by the precomputed table, cast back. The table (from
    :func:`rope_3d_freqs_cis`) is built once per forward in those models, so it is an input
    here rather than part of the timed call.

    Parameters
    ----------
    q, k : Tensor ``[B, S, H, D]``
    freqs_cis : complex Tensor ``[S, R/2]``, ``R <= D``

    Returns
    -------
    (q_rot, k_rot) : new tensors; ``k_rot`` is None when ``k`` is.
    """
    f = freqs_cis.unsqueeze(-2)  # [S, 1, R/2]: broadcasts over the batch and the heads
    k_rot = None if k is None else _rotate_complex(k, f)
    return _rotate_complex(q, f), k_rot


def _rotate_complex(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    rotary = 2 * f.shape[-1]
    pairs = x[..., :rotary].float().reshape(*x.shape[:-1], rotary // 2, 2)
    return _with_tail(torch.view_as_real(torch.view_as_complex(pairs) * f).flatten(-2).to(x.dtype), x)


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


def rope_cos_sin(
    max_positions: int, rotary_dim: int, device: Union[str, torch.device], theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``cos``, ``sin`` tables ``[max_positions, rotary_dim/2]`` of standard RoPE."""
    inv_freq = theta ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=device) / rotary_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64, device=device), inv_freq)
    return angles.cos().float(), angles.sin().float()


class _RopeTables(NamedTuple):
    cos: torch.Tensor
    sin: torch.Tensor
    positions: Optional[torch.Tensor]


class _Rope3dTables(NamedTuple):
    freqs_t: torch.Tensor
    freqs_h: torch.Tensor
    freqs_w: torch.Tensor
    freqs_cis: torch.Tensor  # the peer's materialised table


class _QKCase:
    """What both RoPE case kinds share: random q/k allocation, the byte count and the check.

    Subclasses define ``q_shape``, ``k_shape``, ``dtype``, ``tables``, ``run_tkpy`` and ``run_peer``.
    """

    metric: ClassVar[str] = "GB/s"
    peer: ClassVar[str] = PEER

    def work(self) -> int:
        """Bytes credited per call (:func:`rope_bytes`)."""
        return rope_bytes(self.q_shape, self.k_shape, self.dtype)

    def input_bytes(self) -> int:
        """Size of one copy of q and k: the working set of one call."""
        return self.dtype.itemsize * (math.prod(self.q_shape) + math.prod(self.k_shape))

    def arg_sets(self, device: torch.device, generator: torch.Generator, count: int) -> list[tuple]:
        """``count`` tuples ``(q, k, tables)``: random normal q and k, and the (small) tables, shared."""
        tables = self.tables(device, generator)
        copies = _random_copies((self.q_shape, self.k_shape), self.dtype, device, generator, count)
        return [(q, k, tables) for q, k in copies]

    def outputs(self, q: torch.Tensor, k: torch.Tensor, tables: Any) -> tuple[tuple, tuple]:
        """tkpy's and the peer's rotated ``(q, k)``; tkpy rotates clones, so the inputs stay as they were."""
        q_tkpy, k_tkpy = q.clone(), k.clone()
        self.run_tkpy(q_tkpy, k_tkpy, tables)
        return (q_tkpy, k_tkpy), self.run_peer(q, k, tables)


@dataclass(frozen=True)
class RopeCase(_QKCase):
    """A :func:`tkpy.rope.apply_rope_` shape: q ``[B, S, Hq, D]``, k ``[B, S, Hk, D]``."""

    op: ClassVar[str] = "apply_rope_"

    name: str
    batch: int
    seqlen: int
    heads_q: int
    heads_k: int
    head_dim: int = 128
    rotary_dim: int = 128
    interleaved: bool = False
    random_positions: bool = False  # a random row of cos/sin per token, as in batched decode
    max_positions: int = 8192
    dtype: torch.dtype = torch.bfloat16

    @property
    def id(self) -> str:
        return f"{self.name}-B{self.batch}-S{self.seqlen}"

    @property
    def shape(self) -> str:
        text = f"B{self.batch} S{self.seqlen} Hq{self.heads_q} Hk{self.heads_k} D{self.head_dim}"
        if self.rotary_dim != self.head_dim:
            text += f" R{self.rotary_dim}"
        if self.random_positions:
            text += " pos"
        return text + (" gptj" if self.interleaved else " neox")

    @property
    def q_shape(self) -> tuple[int, ...]:
        return (self.batch, self.seqlen, self.heads_q, self.head_dim)

    @property
    def k_shape(self) -> tuple[int, ...]:
        return (self.batch, self.seqlen, self.heads_k, self.head_dim)

    def tables(self, device: torch.device, generator: torch.Generator) -> _RopeTables:
        cos, sin = rope_cos_sin(max(self.max_positions, self.seqlen), self.rotary_dim, device)
        positions = None
        if self.random_positions:
            positions = torch.randint(
                0, cos.shape[0], (self.batch, self.seqlen), generator=generator, device=device
            )
        return _RopeTables(cos, sin, positions)

    def run_tkpy(self, q: torch.Tensor, k: torch.Tensor, tables: _RopeTables) -> None:
        tkpy_rope.apply_rope_(q, k, tables.cos, tables.sin, tables.positions, self.interleaved)

    def run_peer(self, q: torch.Tensor, k: torch.Tensor, tables: _RopeTables) -> tuple[torch.Tensor, torch.Tensor]:
        return torch_rope_reference(q, k, tables.cos, tables.sin, tables.positions, self.interleaved)


@dataclass(frozen=True)
class Rope3dCase(_QKCase):
    """A :func:`tkpy.rope.apply_rope_3d_` shape: q and k ``[B, T·H·W, heads, D]``.

    ``model`` names the axis split and base (:func:`tkpy.riflex.axis_split`).
    """

    op: ClassVar[str] = "apply_rope_3d_"

    model: str
    grid: tuple[int, int, int]
    heads: int
    head_dim: int = 128
    batch: int = 1
    dtype: torch.dtype = torch.bfloat16

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def id(self) -> str:
        return f"{self.model}-{'x'.join(map(str, self.grid))}"

    @property
    def shape(self) -> str:
        thw = "x".join(map(str, self.grid))
        return f"B{self.batch} THW {thw} (S{self.tokens}) H{self.heads} D{self.head_dim}"

    @property
    def q_shape(self) -> tuple[int, ...]:
        return (self.batch, self.tokens, self.heads, self.head_dim)

    @property
    def k_shape(self) -> tuple[int, ...]:
        return self.q_shape

    def tables(self, device: torch.device, generator: torch.Generator) -> _Rope3dTables:
        """Per-axis tables for tkpy and the materialised table for the peer (``generator`` is unused)."""
        split = riflex.axis_split(self.model, self.head_dim)
        freqs = riflex.rope_3d_freqs(split, self.grid, device=device)
        return _Rope3dTables(*freqs, rope_3d_freqs_cis(self.grid, *freqs))

    def run_tkpy(self, q: torch.Tensor, k: torch.Tensor, tables: _Rope3dTables) -> None:
        tkpy_rope.apply_rope_3d_(q, k, self.grid, tables.freqs_t, tables.freqs_h, tables.freqs_w)

    def run_peer(self, q: torch.Tensor, k: torch.Tensor, tables: _Rope3dTables) -> tuple[torch.Tensor, torch.Tensor]:
        return torch_rope_3d_reference(q, k, tables.freqs_cis)


_LLAMA = dict(heads_q=32, heads_k=8)  # Llama-3-8B attention heads, D=128
_CUDA_CASES: tuple[Union[RopeCase, Rope3dCase], ...] = (
    *(RopeCase("llama-neox", batch, 4096, **_LLAMA) for batch in (1, 2, 4, 8)),
    RopeCase("gptj-interleaved", 4, 4096, **_LLAMA, interleaved=True),
    RopeCase("partial-rot64", 4, 4096, **_LLAMA, rotary_dim=64),
    RopeCase("decode", 64, 1, **_LLAMA, random_positions=True, max_positions=32768),
    Rope3dCase("hunyuanvideo", (33, 45, 80), heads=24),  # 129 frames at 720p
    Rope3dCase("wan", (21, 30, 52), heads=12),  # Wan2.1-1.3B, 81 frames at 480p
    Rope3dCase("cogvideox", (13, 30, 45), heads=48, head_dim=64),  # CogVideoX-5B, 49 frames
)
# The same kinds of case, small enough that the whole CPU bench stays well under a minute.
_CPU_CASES: tuple[Union[RopeCase, Rope3dCase], ...] = (
    *(RopeCase("llama-neox", batch, 256, heads_q=8, heads_k=2) for batch in (1, 2)),
    RopeCase("gptj-interleaved", 1, 256, heads_q=8, heads_k=2, interleaved=True),
    RopeCase("partial-rot64", 1, 256, heads_q=8, heads_k=2, rotary_dim=64),
    RopeCase("decode", 8, 1, heads_q=8, heads_k=2, random_positions=True, max_positions=4096),
    Rope3dCase("hunyuanvideo", (5, 6, 10), heads=4),
    Rope3dCase("wan", (3, 6, 8), heads=2),
    Rope3dCase("cogvideox", (3, 6, 8), heads=4, head_dim=64),
)


def rope_cases(device: Union[str, torch.device]) -> list[Union[RopeCase, Rope3dCase]]:
    """The RoPE benchmark cases for ``device``.

    CUDA: Llama-like prefill (B=1..8, S=4096, Hq=32, Hk=8, D=128, bf16), GPT-J style, partial
    rotary, batched decode with positions, and the HunyuanVideo, Wan and CogVideoX grids for 3D
    RoPE. CPU: the same kinds, small. Listing allocates nothing, so it works without a GPU.
    """
    return _for_device(device, _CUDA_CASES, _CPU_CASES)

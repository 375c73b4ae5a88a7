"""Times tkpy's ops against eager-PyTorch peers: the engine behind ``python -m tkpy bench``.

The pieces are public so that the pytest-benchmark suites in ``benchmarks/`` measure the same
cases the same way:

- :func:`rope_cases`, :func:`gemm_cases`, :func:`attention_cases` and :func:`block_sparse_cases`
  list the shapes,
  :func:`prepare_case` allocates their inputs, :func:`measure` checks tkpy against the peer and
  times both;
- :func:`time_cuda_or_cpu` is the timer, :func:`rope_bytes` the byte count;
- :func:`torch_rope_reference` and :func:`torch_rope_3d_reference` are the eager RoPE peers;
  ``torch.matmul`` (cuBLAS on the GPU) is the GEMM's; attention's are torch SDPA's backends, each
  timed on its own.

How the figures are counted (DESIGN §6):

- Timing: CUDA events on the GPU, ``time.perf_counter`` on the CPU; warm-up runs first, then the
  median of many runs. Each run takes the next of several copies of random inputs, so that the
  working set overflows the last-level cache and caches do not flatter the result.
- Bandwidth: an in-place RoPE reads and writes q and k once, so both implementations are credited
  with ``2 · (bytes(q) + bytes(k))`` per call, whatever they actually move.
- Throughput: a GEMM is credited with ``2·M·N·K`` FLOPs per call, attention with
  ``4·B·Hq·Sq·Sk·D`` (halved for causal), reported in TFLOP/s. Sparse prefill at density ρ is
  credited ρ times dense causal attention's FLOPs (:data:`DENSITY_CONVENTION`).
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import statistics
import sys
import re
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import __version__, block_sparse, cuda_compiled, flash_attn_func, flash_attn_varlen_func, gemm, riflex, rope
from .lserve import HeadPattern

__all__ = [
    "ATTENTION_FLOPS_CONVENTION",
    "AttentionCase",
    "AttentionResult",
    "BYTES_CONVENTION",
    "BenchCase",
    "BlockSparseCase",
    "BlockSparseResult",
    "DENSITY_CONVENTION",
    "PEER",
    "CaseResult",
    "FLOPS_CONVENTION",
    "GemmCase",
    "PreparedCase",
    "Rope3dCase",
    "RopeCase",
    "Timing",
    "attention_cases",
    "block_sparse_cases",
    "buffer_copies",
    "check_case",
    "environment_info",
    "format_report",
    "gbps",
    "gemm_cases",
    "main",
    "measure",
    "measure_attention",
    "measure_block_sparse",
    "measure_copy_bandwidth",
    "nvml_gpu_info",
    "prepare_case",
    "rope_3d_freqs_cis",
    "rope_bytes",
    "rope_cases",
    "rope_cos_sin",
    "rotating_setup",
    "synchronized",
    "time_cuda_or_cpu",
    "torch_rope_3d_reference",
    "torch_rope_reference",
]

PEER = "torch eager"
BYTES_CONVENTION = (
    "q and k each read once and written once: 2*(bytes(q)+bytes(k)); cos/sin tables and positions not counted"
)
FLOPS_CONVENTION = "2*M*N*K per call: a multiply and an add per multiply-accumulate"
ATTENTION_FLOPS_CONVENTION = "4*B*Hq*Sq*Sk*D per call (q k^T and P v), halved for causal"

# The working set of the rotating input copies should be this many times the last-level cache.
_CACHE_OVERFLOW = 4
# There is no portable way to ask for a CPU's last-level cache; this is a typical server L3.
_CPU_LLC_BYTES = 32 << 20
_FALLBACK_L2_BYTES = 50 << 20  # H100
_COPY_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}
_DEFAULT_RUNS = {"cuda": (10, 100), "cpu": (3, 20)}  # (warm-up, timed)
# Largest accepted ‖tkpy − peer‖ / ‖peer‖: the peers round in the storage dtype (DESIGN §7).
_TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-5}


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Per-call times of one implementation.

    Attributes
    ----------
    samples_s : tuple of float
        One duration per timed call, in seconds.
    method : str
        ``"cuda-events"`` or ``"perf_counter"``.
    """

    samples_s: tuple[float, ...]
    method: str

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)


def time_cuda_or_cpu(
    fn: Callable[..., Any],
    arg_sets: Sequence[tuple],
    device: Union[str, torch.device],
    *,
    warmup: int,
    reps: int,
) -> Timing:
    """Time ``fn(*args)``, taking ``args`` from ``arg_sets`` round robin.

    Parameters
    ----------
    fn : callable
        The call to time. Its result is discarded.
    arg_sets : sequence of tuple
        Argument tuples, typically copies of the same inputs in different buffers.
    device : str or torch.device
        CUDA: each call is bracketed by CUDA events on the current stream. CPU: by
        ``time.perf_counter``.
    warmup, reps : int
        Untimed calls first, then timed calls.

    Returns
    -------
    Timing
    """
    if not arg_sets:
        raise ValueError("time_cuda_or_cpu: arg_sets is empty")
    if reps < 1:
        raise ValueError(f"time_cuda_or_cpu: reps must be >= 1, got {reps}")
    device = torch.device(device)
    rotation = itertools.cycle(arg_sets)
    for _ in range(warmup):
        fn(*next(rotation))
    if device.type == "cuda":
        with torch.cuda.device(device):
            return _time_cuda(fn, rotation, reps)
    return _time_cpu(fn, rotation, reps)


def _time_cuda(fn: Callable[..., Any], rotation: Iterator[tuple], reps: int) -> Timing:
    # Events are read only after the last call, so timing never adds a host sync between calls.
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        args = next(rotation)
        start.record()
        fn(*args)
        end.record()
    torch.cuda.synchronize()
    return Timing(tuple(start.elapsed_time(end) * 1e-3 for start, end in events), "cuda-events")


def _time_cpu(fn: Callable[..., Any], rotation: Iterator[tuple], reps: int) -> Timing:
    samples = []
    for _ in range(reps):
        args = next(rotation)
        start = time.perf_counter()
        fn(*args)
        samples.append(time.perf_counter() - start)
    return Timing(tuple(samples), "perf_counter")


def synchronized(fn: Callable[..., Any], device: Union[str, torch.device]) -> Callable[..., None]:
    """``fn`` followed by a device synchronize, so that a wall-clock timer sees the whole call.

    pytest-benchmark times with the host clock; without the sync it would time the launch only.
    On the CPU ``fn`` is returned unchanged.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return fn

    def run(*args: Any) -> None:
        fn(*args)
        torch.cuda.synchronize(device)

    return run


def rotating_setup(arg_sets: Sequence[tuple]) -> Callable[[], tuple[tuple, dict]]:
    """A ``setup`` for ``benchmark.pedantic`` that hands out ``arg_sets`` round robin."""
    rotation = itertools.cycle(arg_sets)
    return lambda: (next(rotation), {})


def buffer_copies(nbytes_per_copy: int, device: Union[str, torch.device], *, max_copies: int = 16) -> int:
    """How many copies of the inputs to rotate through so that they overflow the last-level cache.

    At least 2, so that no call finds the previous call's output in the cache.
    """
    device = torch.device(device)
    if device.type == "cuda":
        cache = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or _FALLBACK_L2_BYTES
    else:
        cache = _CPU_LLC_BYTES
    wanted = math.ceil(_CACHE_OVERFLOW * cache / max(nbytes_per_copy, 1))
    return max(2, min(max_copies, wanted))


# --------------------------------------------------------------------------------------------
# Work counting
# --------------------------------------------------------------------------------------------


def rope_bytes(q_shape: Sequence[int], k_shape: Optional[Sequence[int]], dtype: torch.dtype) -> int:
    """Bytes an in-place RoPE is credited with: q and k read once and written once.

    Whole heads count even with partial rotary dims; the cos/sin tables and positions are
    small next to q and k and are not counted (see :data:`BYTES_CONVENTION`).
    """
    elements = math.prod(q_shape) + (math.prod(k_shape) if k_shape is not None else 0)
    return 2 * dtype.itemsize * elements


def gbps(nbytes: int, seconds: float) -> float:
    """Bandwidth in GB/s (1e9 bytes per second)."""
    return nbytes / seconds / 1e9


class _Metric(NamedTuple):
    key: str  # extra_info's tkpy_<key> and peer_<key>
    work: str  # what a case's work() counts per call; also its extra_info key
    per_unit: float  # work per second in one unit of the metric
    spec: str  # table format, fine enough for CPU-path figures
    convention: str


# Memory-bound ops are read as bandwidth, compute-bound ones as arithmetic throughput.
_METRICS = {
    "GB/s": _Metric("gbps", "bytes", 1e9, ",.1f", BYTES_CONVENTION),
    "TFLOP/s": _Metric("tflops", "flops", 1e12, ",.3f", FLOPS_CONVENTION),
}


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
    rotated = torch.view_as_real(torch.view_as_complex(pairs) * f).flatten(-2).to(x.dtype)
    if rotary == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rotary:]), dim=-1)


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


def _random_copies(
    shapes: Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device, generator: torch.Generator, count: int
) -> list[tuple[torch.Tensor, ...]]:
    """``count`` tuples of random normal tensors of ``shapes``, each tensor in its own buffer."""
    return [
        tuple(torch.randn(shape, generator=generator, device=device, dtype=dtype) for shape in shapes)
        for _ in range(count)
    ]


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
        rope.apply_rope_(q, k, tables.cos, tables.sin, tables.positions, self.interleaved)

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
        rope.apply_rope_3d_(q, k, self.grid, tables.freqs_t, tables.freqs_h, tables.freqs_w)

    def run_peer(self, q: torch.Tensor, k: torch.Tensor, tables: _Rope3dTables) -> tuple[torch.Tensor, torch.Tensor]:
        return torch_rope_3d_reference(q, k, tables.freqs_cis)


@dataclass(frozen=True)
class GemmCase:
    """A :func:`tkpy.gemm` shape: a ``[M, K]`` times b ``[K, N]``, or b ``[N, K]`` with ``trans_b``.

    The peer multiplies by ``b.T``, a view that cuBLAS reads in place, as model code does. torch's
    reduced-precision-reduction defaults are left as they are: they are what torch users get.
    """

    op: ClassVar[str] = "gemm"
    metric: ClassVar[str] = "TFLOP/s"
    peer: ClassVar[str] = "torch.matmul"

    name: str
    m: int
    n: int
    k: int
    trans_b: bool = False
    dtype: torch.dtype = torch.bfloat16

    @property
    def id(self) -> str:
        return f"{self.name}-{self.m}x{self.n}x{self.k}"

    @property
    def shape(self) -> str:
        return f"M{self.m} N{self.n} K{self.k}" + (" b^T" if self.trans_b else "")

    def work(self) -> int:
        """FLOPs credited per call (:data:`FLOPS_CONVENTION`)."""
        return 2 * self.m * self.n * self.k

    def input_bytes(self) -> int:
        """Size of one copy of a and b, the inputs that rotate."""
        return self.dtype.itemsize * (self.m + self.n) * self.k

    def arg_sets(self, device: torch.device, generator: torch.Generator, count: int) -> list[tuple]:
        """``count`` tuples ``(a, b)`` of random normal matrices."""
        b_shape = (self.n, self.k) if self.trans_b else (self.k, self.n)
        return _random_copies(((self.m, self.k), b_shape), self.dtype, device, generator, count)

    def run_tkpy(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return gemm(a, b, self.trans_b)

    def run_peer(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b.T if self.trans_b else b)

    def outputs(self, a: torch.Tensor, b: torch.Tensor) -> tuple[tuple, tuple]:
        """tkpy's and the peer's product, each as a 1-tuple."""
        return (self.run_tkpy(a, b),), (self.run_peer(a, b),)


# torch SDPA's backends, each a peer of tkpy's attention on its own. "default" is SDPA's own choice.
_SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "default": None,
}


@dataclass(frozen=True)
class AttentionCase:
    """A :func:`tkpy.flash_attn_func` shape: q, k and v ``[B, S, H, D]``, self-attention.

    The peers are torch SDPA's ``backends``, each timed on its own (:func:`measure_attention`) on
    the same inputs as ``[B, H, S, D]`` transposed views, made once at allocation. The correctness
    check compares tkpy with ``run_peer``, SDPA with its own choice of backend.
    """

    op: ClassVar[str] = "flash_attn_func"
    metric: ClassVar[str] = "TFLOP/s"

    batch: int
    seqlen: int
    heads: int
    head_dim: int
    causal: bool
    backends: tuple[str, ...]
    dtype: torch.dtype = torch.bfloat16

    @property
    def peer(self) -> str:
        return f"torch SDPA ({', '.join(self.backends)})"

    @property
    def id(self) -> str:
        return f"{'causal' if self.causal else 'full'}-D{self.head_dim}-S{self.seqlen}"

    @property
    def shape(self) -> str:
        return f"B{self.batch} S{self.seqlen} H{self.heads} D{self.head_dim}" + (" causal" if self.causal else "")

    def work(self) -> int:
        """FLOPs credited per call (:data:`ATTENTION_FLOPS_CONVENTION`)."""
        flops = 4 * self.batch * self.heads * self.seqlen**2 * self.head_dim
        return flops // 2 if self.causal else flops

    def input_bytes(self) -> int:
        """Size of one copy of q, k and v."""
        return 3 * self.dtype.itemsize * self.batch * self.seqlen * self.heads * self.head_dim

    def arg_sets(self, device: torch.device, generator: torch.Generator, count: int) -> list[tuple]:
        """``count`` tuples ``(bshd, bhsd)``: random normal q, k, v ``[B, S, H, D]``, and as ``[B, H, S, D]`` views."""
        shape = (self.batch, self.seqlen, self.heads, self.head_dim)
        copies = _random_copies((shape,) * 3, self.dtype, device, generator, count)
        return [(qkv, tuple(t.transpose(1, 2) for t in qkv)) for qkv in copies]

    def run_tkpy(self, bshd: tuple, bhsd: tuple) -> torch.Tensor:
        return flash_attn_func(*bshd, causal=self.causal)

    def run_peer(self, bshd: tuple, bhsd: tuple) -> torch.Tensor:
        """SDPA on the ``[B, H, S, D]`` views, with whichever backends are enabled around the call."""
        return torch.nn.functional.scaled_dot_product_attention(*bhsd, is_causal=self.causal)

    def outputs(self, bshd: tuple, bhsd: tuple) -> tuple[tuple, tuple]:
        """tkpy's and SDPA's output, both ``[B, S, H, D]``, each as a 1-tuple."""
        return (self.run_tkpy(bshd, bhsd),), (self.run_peer(bshd, bhsd).transpose(1, 2),)


DENSITY_CONVENTION = (
    "rho = active (query block, key block) pairs / causal pairs, 128-token blocks, over all heads; tkpy is "
    "credited rho * dense causal FLOPs; DESIGN.md section 6 target: time <= (1.1*rho + 0.05) * dense causal time"
)
_BLOCK = 128
_DUO_PATTERN = (Path(__file__).resolve().parents[3] / "shared" / "data" / "duo_attention"
                / "Meta-Llama-3.1-8B-Instruct.full_attention_heads.tsv")


class _SparseInputs(NamedTuple):
    cu_seqlens: torch.Tensor
    head_mask_type: torch.Tensor
    streaming_info: torch.Tensor
    blockmask: Optional[torch.Tensor]  # [1, Hq, QB, KB] when every head is block-sparse; None for LServe
    active: torch.Tensor  # bool [Hq, QB, KB]: the block pairs the kernel visits
    plan: tuple  # tkpy.block_sparse.plan(...), built once as a server would per layer
    pattern: str  # where the head types came from
    gate: str  # how the output is checked: a key of _GATES


@dataclass(frozen=True)
class BlockSparseCase:
    """One causal sequence. With ``density``, every head block-sparse with a random mask of exactly
    ``round(density · causal blocks)`` causal blocks; without, LServe's 50% streaming heads with a
    ``sink`` + ``local`` token window. The peer is dense causal tkpy on the same inputs."""

    metric: ClassVar[str] = "TFLOP/s"
    peer: ClassVar[str] = "tkpy.flash_attn_varlen_func (dense causal)"

    seqlen: int
    heads_q: int
    heads_kv: int
    density: Optional[float] = None
    sink: int = 128
    local: int = 8192
    head_dim: int = 128
    dtype: torch.dtype = torch.bfloat16

    @property
    def op(self) -> str:
        return "token_streaming_attn_func" if self.density is None else "block_sparse_attn_func"

    @property
    def id(self) -> str:
        return f"{'lserve' if self.density is None else f'rho{self.density:g}'}-S{self.seqlen}"

    @property
    def shape(self) -> str:
        text = f"B1 S{self.seqlen} Hq{self.heads_q} Hkv{self.heads_kv} D{self.head_dim} causal"
        return text + (f" 50% streaming sink{self.sink} local{self.local}" if self.density is None else "")

    def work(self) -> int:
        """Dense causal attention's FLOPs (:data:`ATTENTION_FLOPS_CONVENTION`), the peer's work."""
        return 2 * self.heads_q * self.seqlen**2 * self.head_dim

    def input_bytes(self) -> int:
        return self.dtype.itemsize * self.seqlen * self.head_dim * (self.heads_q + 2 * self.heads_kv)

    def arg_sets(self, device: torch.device, generator: torch.Generator, count: int) -> list[tuple]:
        """``count`` tuples ``(q, k, v, inputs)``: random normal q, k, v and the shared head types and masks."""
        blocks = math.ceil(self.seqlen / _BLOCK)
        row, col = torch.arange(blocks, device=device)[:, None], torch.arange(blocks, device=device)
        causal = col <= row
        if self.density is None:
            pattern, layer, note = _lserve_pattern(self)
            types, info = pattern.head_mask_type(layer, device), pattern.streaming_info(layer, device)
            # Exact streaming: row block i reaches back to token 128·i − (local − 1).
            window = causal & ((col * _BLOCK < self.sink) | ((col + 1) * _BLOCK > row * _BLOCK - self.local + 1))
            active, blockmask = torch.where((types == -1)[:, None, None], window, causal), None
        else:
            count_on = max(1, round(self.density * int(causal.sum())))
            keys = torch.rand(self.heads_q, blocks * blocks, generator=generator, device=device)
            order = keys.masked_fill(~causal.flatten(), 2.0).argsort(dim=1)[:, :count_on]
            active = torch.zeros_like(keys, dtype=torch.bool).scatter_(1, order, True).view(-1, blocks, blocks)
            types, blockmask = torch.ones(self.heads_q, dtype=torch.int32, device=device), active[None]
            info = torch.zeros(2 * self.heads_q, dtype=torch.int32, device=device)
            note = f"random block masks, {count_on} of {int(causal.sum())} causal blocks per head"
        cu = torch.tensor([0, self.seqlen], dtype=torch.int32, device=device)
        gate = "reference" if device.type == "cpu" else "dense" if self.density == 1.0 else "skipped"
        inputs = _SparseInputs(cu, types, info, blockmask, active, block_sparse.plan(types, blockmask), note, gate)
        shapes = ((self.seqlen, self.heads_q, self.head_dim), *((self.seqlen, self.heads_kv, self.head_dim),) * 2)
        return [(*qkv, inputs) for qkv in _random_copies(shapes, self.dtype, device, generator, count)]

    def run_tkpy(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: _SparseInputs) -> torch.Tensor:
        # The op on a prebuilt plan: the kernel's time, without the API's per-call mask sort and
        # host-side argument checks (block_sparse_attn_func and token_streaming_attn_func do both).
        out, _ = torch.ops.tkpy.block_sparse_attention_forward(
            q, k, v, x.cu_seqlens, x.cu_seqlens, x.head_mask_type, x.streaming_info, *x.plan,
            self.seqlen, self.seqlen, 1.0 / math.sqrt(self.head_dim), True, x.blockmask is None,
        )
        return out

    def run_peer(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: _SparseInputs) -> torch.Tensor:
        return flash_attn_varlen_func(q, k, v, x.cu_seqlens, x.cu_seqlens, self.seqlen, self.seqlen, causal=True)

    def outputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: _SparseInputs) -> tuple[tuple, tuple]:
        """tkpy's output and, per ``x.gate``, dense causal tkpy's or fp32 attention under the token mask."""
        if x.gate == "dense":
            return (self.run_tkpy(q, k, v, x),), (self.run_peer(q, k, v, x),)
        i, j = torch.arange(self.seqlen, device=q.device)[:, None], torch.arange(self.seqlen, device=q.device)
        if x.blockmask is None:
            keep = torch.where((x.head_mask_type == -1)[:, None, None], (j < self.sink) | (j > i - self.local), True)
        else:
            keep = x.active.repeat_interleave(_BLOCK, 1).repeat_interleave(_BLOCK, 2)[:, : self.seqlen, : self.seqlen]
        group = self.heads_q // self.heads_kv
        qf, kf, vf = (t.float().repeat_interleave(1 if t is q else group, 1).transpose(0, 1) for t in (q, k, v))
        scores = (qf @ kf.transpose(1, 2)) / math.sqrt(self.head_dim)
        probs = scores.masked_fill(~(keep & (j <= i)), -math.inf).softmax(-1).nan_to_num(0.0)  # no key: 0
        return (self.run_tkpy(q, k, v, x),), ((probs @ vf).transpose(0, 1),)


def _lserve_pattern(case: BlockSparseCase) -> tuple[HeadPattern, int, str]:
    """DuoAttention's Llama-3.1-8B heads at 50% sparsity, the layer nearest 50%; else a seeded random half."""
    if _DUO_PATTERN.is_file():
        pattern = HeadPattern.load(_DUO_PATTERN, case.heads_q, 0.5, case.sink, case.local)
        share = pattern.streaming_mask.mean(axis=1)
        layer = min(range(pattern.num_layers), key=lambda n: abs(share[n] - 0.5))
        streaming = f"{int(pattern.streaming_mask[layer].sum())}/{pattern.num_kv_heads} KV heads streaming"
        return pattern, layer, f"DuoAttention {_DUO_PATTERN.name} at 50% static sparsity, layer {layer} ({streaming})"
    split = torch.randperm(case.heads_kv, generator=torch.Generator().manual_seed(0)) < case.heads_kv // 2
    note = f"seeded random 50% of the KV heads streaming (no DuoAttention file at {_DUO_PATTERN})"
    return HeadPattern(split.numpy()[None], case.heads_q, case.sink, case.local), 0, note


BenchCase = Union[RopeCase, Rope3dCase, GemmCase, AttentionCase, BlockSparseCase]

_LLAMA = dict(heads_q=32, heads_k=8)  # Llama-3-8B attention heads, D=128
_CUDA_CASES: tuple[BenchCase, ...] = (
    *(RopeCase("llama-neox", batch, 4096, **_LLAMA) for batch in (1, 2, 4, 8)),
    RopeCase("gptj-interleaved", 4, 4096, **_LLAMA, interleaved=True),
    RopeCase("partial-rot64", 4, 4096, **_LLAMA, rotary_dim=64),
    RopeCase("decode", 64, 1, **_LLAMA, random_positions=True, max_positions=32768),
    Rope3dCase("hunyuanvideo", (33, 45, 80), heads=24),  # 129 frames at 720p
    Rope3dCase("wan", (21, 30, 52), heads=12),  # Wan2.1-1.3B, 81 frames at 480p
    Rope3dCase("cogvideox", (13, 30, 45), heads=48, head_dim=64),  # CogVideoX-5B, 49 frames
)
# The same kinds of case, small enough that the whole CPU bench stays well under a minute.
_CPU_CASES: tuple[BenchCase, ...] = (
    *(RopeCase("llama-neox", batch, 256, heads_q=8, heads_k=2) for batch in (1, 2)),
    RopeCase("gptj-interleaved", 1, 256, heads_q=8, heads_k=2, interleaved=True),
    RopeCase("partial-rot64", 1, 256, heads_q=8, heads_k=2, rotary_dim=64),
    RopeCase("decode", 8, 1, heads_q=8, heads_k=2, random_positions=True, max_positions=4096),
    Rope3dCase("hunyuanvideo", (5, 6, 10), heads=4),
    Rope3dCase("wan", (3, 6, 8), heads=2),
    Rope3dCase("cogvideox", (3, 6, 8), heads=4, head_dim=64),
)


def rope_cases(device: Union[str, torch.device]) -> list[BenchCase]:
    """The RoPE benchmark cases for ``device``.

    CUDA: Llama-like prefill (B=1..8, S=4096, Hq=32, Hk=8, D=128, bf16), GPT-J style, partial
    rotary, batched decode with positions, and the HunyuanVideo, Wan and CogVideoX grids for 3D
    RoPE. CPU: the same kinds, small. Listing allocates nothing, so it works without a GPU.
    """
    return list(_CUDA_CASES if torch.device(device).type == "cuda" else _CPU_CASES)


_CUDA_GEMM_CASES = (
    *(GemmCase("square", size, size, size) for size in (2048, 4096, 8192)),
    GemmCase("trans-b", 4096, 4096, 4096, trans_b=True),
    GemmCase("fp16", 4096, 4096, 4096, dtype=torch.float16),
    GemmCase("tail", 4104, 4104, 4104),  # not a multiple of the 128x256 tile: partial tiles on every edge
)
_CPU_GEMM_CASES = (
    GemmCase("square", 256, 256, 256),
    GemmCase("rect", 512, 384, 256),
    GemmCase("trans-b", 256, 256, 256, trans_b=True),
    GemmCase("fp16", 256, 256, 256, dtype=torch.float16),
    GemmCase("tail", 264, 264, 264),
)


def gemm_cases(device: Union[str, torch.device]) -> list[GemmCase]:
    """The :func:`tkpy.gemm` benchmark cases for ``device``.

    CUDA: square bf16 GEMMs of 2048, 4096 and 8192, 4096 with b transposed and in fp16, and 4104,
    which leaves partial tiles. CPU: the same kinds, small. Listing allocates nothing.
    """
    return list(_CUDA_GEMM_CASES if torch.device(device).type == "cuda" else _CPU_GEMM_CASES)


def _attention_grid(
    tokens: int, hidden: int, seqlens: Sequence[int], backends: tuple[str, ...]
) -> tuple[AttentionCase, ...]:
    """D 64, 128 and 256 at ``heads · D = hidden``, full and causal, ``batch · S = tokens`` (batch >= 1)."""
    return tuple(
        AttentionCase(max(1, tokens // seqlen), seqlen, hidden // head_dim, head_dim, causal, backends)
        for head_dim in (64, 128, 256)
        for causal in (False, True)
        for seqlen in seqlens
    )


_CUDA_ATTENTION_CASES = _attention_grid(
    16384, 2048, (1024, 2048, 4096, 8192, 16384, 32768), backends=("flash", "cudnn", "efficient")
)
# S=200 leaves a partial 64-row tile.
_CPU_ATTENTION_CASES = _attention_grid(256, 256, (128, 200), backends=("default",))


def attention_cases(device: Union[str, torch.device]) -> list[AttentionCase]:
    """The :func:`tkpy.flash_attn_func` benchmark cases for ``device``, bf16.

    CUDA: S from 1k to 32k with 16k tokens per call, D 64, 128 and 256 at heads·D = 2048, causal
    and not; the peers are SDPA's flash, cuDNN and memory-efficient backends. CPU: the same grid
    at S 128 and 200, 256 tokens, heads·D = 256, against SDPA's default choice. Listing
    allocates nothing.
    """
    return list(_CUDA_ATTENTION_CASES if torch.device(device).type == "cuda" else _CPU_ATTENTION_CASES)


_CUDA_BLOCK_SPARSE_CASES = (
    *(BlockSparseCase(s, 32, 8, rho) for s in (32768, 65536, 131072) for rho in (0.1, 0.25, 0.5, 1.0)),
    *(BlockSparseCase(s, 32, 8) for s in (65536, 131072)),
)
# DuoAttention's pattern has 8 KV heads, so the LServe case keeps 8; its window shrinks with S.
_CPU_BLOCK_SPARSE_CASES = (
    *(BlockSparseCase(1024, 4, 2, rho) for rho in (0.1, 0.25, 0.5, 1.0)),
    BlockSparseCase(1024, 8, 8, sink=128, local=256),
)


def block_sparse_cases(device: Union[str, torch.device]) -> list[BlockSparseCase]:
    """Sparse prefill cases, bf16. CUDA: Hq=32, Hkv=8, D=128; rho 0.1 to 1 at S 32k to 128k, LServe
    (sink 128, local 8192) at 64k and 128k. CPU: the same kinds at S=1024. Listing allocates nothing."""
    return list(_CUDA_BLOCK_SPARSE_CASES if torch.device(device).type == "cuda" else _CPU_BLOCK_SPARSE_CASES)


# --------------------------------------------------------------------------------------------
# Measuring one case
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedCase:
    """A case's inputs on a device.

    ``arg_sets`` holds one argument tuple per input copy (``case.arg_sets``: ``(q, k, tables)``
    for RoPE, ``(a, b)`` for GEMM); the copies hold different random data in different buffers.
    Both ``case.run_tkpy`` and ``case.run_peer`` take such a tuple.
    """

    case: BenchCase
    device: torch.device
    arg_sets: list[tuple]


def prepare_case(
    case: BenchCase, device: Union[str, torch.device], *, seed: int = 0, copies: Optional[int] = None
) -> PreparedCase:
    """Allocate ``copies`` (default: :func:`buffer_copies`) sets of random normal inputs for ``case``."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    count = copies or buffer_copies(case.input_bytes(), device)
    return PreparedCase(case, device, case.arg_sets(device, generator, count))


def check_case(prepared: PreparedCase) -> float:
    """``‖tkpy − peer‖ / ‖peer‖`` over all of the case's outputs together, on the first input copy.

    The inputs stay as they were (``case.outputs``). NaN or inf in tkpy's output makes the result
    NaN or inf, which fails every tolerance.
    """
    ours, theirs = prepared.case.outputs(*prepared.arg_sets[0])
    diff = sum(torch.linalg.vector_norm(a.float() - b.float()) ** 2 for a, b in zip(ours, theirs, strict=True))
    norm = sum(torch.linalg.vector_norm(b.float()) ** 2 for b in theirs)
    return math.sqrt(float(diff) / float(norm))


@dataclass(frozen=True)
class CaseResult:
    """tkpy and its peer on one case."""

    case: BenchCase
    device: str
    work: int  # bytes or FLOPs credited per call, as the case's metric counts
    tkpy: Timing
    peer: Optional[Timing]  # None only for an AttentionResult where no backend ran
    rel_err: float

    @property
    def tolerance(self) -> float:
        return _TOLERANCE[self.case.dtype]

    @property
    def passed(self) -> bool:
        return self.rel_err <= self.tolerance  # False for NaN

    @property
    def tkpy_rate(self) -> float:
        """tkpy's throughput in the case's metric (GB/s or TFLOP/s)."""
        return self.work / self.tkpy.median_s / _METRICS[self.case.metric].per_unit

    @property
    def peer_rate(self) -> Optional[float]:
        """The peer's throughput in the case's metric."""
        return None if self.peer is None else self.work / self.peer.median_s / _METRICS[self.case.metric].per_unit

    @property
    def speedup(self) -> Optional[float]:
        """Peer time over tkpy time (equal to the throughput ratio)."""
        return None if self.peer is None else self.peer.median_s / self.tkpy.median_s

    def as_extra_info(self) -> dict[str, Any]:
        """A JSON-ready summary, in the ``extra_info`` layout that ``scripts/summarize_gpu_run.py`` reads."""
        metric = _METRICS[self.case.metric]
        return {
            "op": self.case.op,
            "case": self.case.id,
            "shape": self.case.shape,
            "dtype": str(self.case.dtype).removeprefix("torch."),
            "device": self.device,
            "peer": self.case.peer,
            "metric": self.case.metric,
            metric.work: self.work,
            f"{metric.work}_convention": metric.convention,
            "timer": self.tkpy.method,
            "tkpy_median_us": self.tkpy.median_s * 1e6,
            "peer_median_us": None if self.peer is None else self.peer.median_s * 1e6,
            f"tkpy_{metric.key}": self.tkpy_rate,
            f"peer_{metric.key}": self.peer_rate,
            "ratio": self.speedup,
            "rel_err": self.rel_err,
            "check_passed": self.passed,
        }


def measure(prepared: PreparedCase, *, warmup: int, reps: int) -> CaseResult:
    """Check tkpy against the peer on ``prepared``, then time both with :func:`time_cuda_or_cpu`."""
    if isinstance(prepared.case, AttentionCase):
        return measure_attention(prepared, warmup=warmup, reps=reps)
    if isinstance(prepared.case, BlockSparseCase):
        return measure_block_sparse(prepared, warmup=warmup, reps=reps)
    case, device = prepared.case, prepared.device
    rel_err = check_case(prepared)
    tkpy_timing = time_cuda_or_cpu(case.run_tkpy, prepared.arg_sets, device, warmup=warmup, reps=reps)
    peer_timing = time_cuda_or_cpu(case.run_peer, prepared.arg_sets, device, warmup=warmup, reps=reps)
    return CaseResult(case, device.type, case.work(), tkpy_timing, peer_timing, rel_err)


@dataclass(frozen=True)
class AttentionResult(CaseResult):
    """tkpy and each SDPA backend on one :class:`AttentionCase`.

    ``backends`` maps each backend to its timing, or to the reason it could not run the case;
    ``peer`` is the fastest backend's timing (None when none ran), so the ratio is tkpy against
    the best of them.
    """

    backends: dict[str, Union[Timing, str]] = field(default_factory=dict)

    @property
    def best_backend(self) -> Optional[str]:
        timed = {name: t.median_s for name, t in self.backends.items() if isinstance(t, Timing)}
        return min(timed, key=timed.get) if timed else None

    def backend_rate(self, name: str) -> Optional[float]:
        """TFLOP/s of SDPA's ``name`` backend; None when it did not run."""
        timing = self.backends.get(name)
        return self.work / timing.median_s / 1e12 if isinstance(timing, Timing) else None

    def as_extra_info(self) -> dict[str, Any]:
        """:meth:`CaseResult.as_extra_info`, the peer being the best backend, plus the case's
        dimensions and ``backends``: per backend ``{"tflops", "median_us"}`` or ``{"error"}``."""
        case, best = self.case, self.best_backend
        backends = {
            name: {"tflops": self.backend_rate(name), "median_us": t.median_s * 1e6}
            if isinstance(t, Timing) else {"error": t}
            for name, t in self.backends.items()
        }
        return {
            **super().as_extra_info(),
            "peer": f"torch SDPA {best}" if best else case.peer,
            "flops_convention": ATTENTION_FLOPS_CONVENTION,
            "batch": case.batch, "seqlen": case.seqlen, "heads": case.heads, "head_dim": case.head_dim,
            "causal": case.causal,
            "best_backend": best,
            "backends": backends,
        }


def measure_attention(prepared: PreparedCase, *, warmup: int, reps: int) -> AttentionResult:
    """Check tkpy against SDPA on an :class:`AttentionCase`, then time tkpy and each backend."""
    case, device = prepared.case, prepared.device
    rel_err = check_case(prepared)
    tkpy_timing = time_cuda_or_cpu(case.run_tkpy, prepared.arg_sets, device, warmup=warmup, reps=reps)
    backends = {name: _time_sdpa_backend(prepared, name, warmup, reps) for name in case.backends}
    timed = [t for t in backends.values() if isinstance(t, Timing)]
    best = min(timed, key=lambda t: t.median_s, default=None)
    return AttentionResult(case, device.type, case.work(), tkpy_timing, best, rel_err, backends)


# SDPA explains a refusal in warnings: a header per backend, then the reasons; the backends
# switched off by ``sdpa_kernel`` say only that.
_SDPA_NOISE = re.compile(r"not used because:$|has been runtime disabled")
_TORCH_WARNING_ORIGIN = re.compile(r"\s*\(Triggered internally at .*\)\s*$", re.DOTALL)


def _time_sdpa_backend(prepared: PreparedCase, backend: str, warmup: int, reps: int) -> Union[Timing, str]:
    """Time ``run_peer`` with only SDPA's ``backend`` enabled, or say why that backend cannot run the case."""
    case, selected = prepared.case, _SDPA_BACKENDS[backend]
    only_backend = nullcontext() if selected is None else sdpa_kernel(selected)
    with only_backend, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return time_cuda_or_cpu(case.run_peer, prepared.arg_sets, prepared.device, warmup=warmup, reps=reps)
        except RuntimeError as exc:
            reasons = [_TORCH_WARNING_ORIGIN.sub("", str(w.message)).strip() for w in caught]
            reasons = [r for r in dict.fromkeys(reasons) if r and not _SDPA_NOISE.search(r)]
            return "; ".join(reasons) or str(exc).splitlines()[0]


_GATES = {
    "reference": "vs fp32 attention under the token mask (causal AND the block or streaming mask)",
    "dense": "vs tkpy.flash_attn_varlen_func: at rho = 1 every causal block is on, which equals dense causal",
    "skipped": "NOT GATED: a masked reference does not fit at this S on the GPU; only rho = 1 is checked",
}
# Calls over this many FLOPs take up to ~0.25 s each on an H100 (S >= 64k): fewer runs keep the bench short.
_HEAVY_FLOPS, _HEAVY_RUNS = 1e13, (3, 20)


@dataclass(frozen=True)
class BlockSparseResult(CaseResult):
    """Sparse prefill and dense causal attention on one :class:`BlockSparseCase`; ``rel_err`` is NaN
    where the ``gate`` is "skipped", and tkpy is credited ``density`` times the dense FLOPs."""

    density: float = 1.0
    gate: str = "skipped"
    pattern: str = ""

    @property
    def passed(self) -> bool:
        return self.gate == "skipped" or self.rel_err <= self.tolerance

    @property
    def tkpy_rate(self) -> float:
        return self.density * self.work / self.tkpy.median_s / 1e12

    @property
    def time_ratio(self) -> float:
        """tkpy time / dense time, to compare with ``target_ratio`` (DESIGN §6: 1.1·rho + 5% of dense)."""
        return self.tkpy.median_s / self.peer.median_s

    @property
    def target_ratio(self) -> float:
        return 1.1 * self.density + 0.05

    def as_extra_info(self) -> dict[str, Any]:
        """:meth:`CaseResult.as_extra_info` (``ratio``: rho · dense time / tkpy time), rho and the target."""
        case = self.case
        return {
            **super().as_extra_info(),
            "ratio": self.tkpy_rate / self.peer_rate,
            "rel_err": None if self.gate == "skipped" else self.rel_err,
            "flops_convention": f"dense: {ATTENTION_FLOPS_CONVENTION}; tkpy: rho times that",
            "density": self.density, "density_convention": DENSITY_CONVENTION,
            "time_vs_dense": self.time_ratio, "target_time_vs_dense": self.target_ratio,
            "meets_target": self.time_ratio <= self.target_ratio, "gate": _GATES[self.gate],
            "head_pattern": self.pattern, "runs": len(self.tkpy.samples_s),
            "seqlen": case.seqlen, "heads_q": case.heads_q, "heads_kv": case.heads_kv, "head_dim": case.head_dim,
        }


def measure_block_sparse(prepared: PreparedCase, *, warmup: int, reps: int) -> BlockSparseResult:
    """Check tkpy's sparse prefill (``_GATES``), then time it and dense causal attention."""
    case, device = prepared.case, prepared.device
    if case.work() > _HEAVY_FLOPS:
        warmup, reps = min(warmup, _HEAVY_RUNS[0]), min(reps, _HEAVY_RUNS[1])
    inputs = prepared.arg_sets[0][-1]
    rel_err = math.nan if inputs.gate == "skipped" else check_case(prepared)
    blocks = inputs.active.shape[-1]
    density = float(inputs.active.sum()) / (case.heads_q * blocks * (blocks + 1) // 2)
    tkpy_timing = time_cuda_or_cpu(case.run_tkpy, prepared.arg_sets, device, warmup=warmup, reps=reps)
    peer_timing = time_cuda_or_cpu(case.run_peer, prepared.arg_sets, device, warmup=warmup, reps=reps)
    return BlockSparseResult(
        case, device.type, case.work(), tkpy_timing, peer_timing, rel_err, density, inputs.gate, inputs.pattern
    )


def measure_copy_bandwidth(device: Union[str, torch.device], *, warmup: int, reps: int) -> float:
    """Read + write GB/s of ``Tensor.copy_`` on a buffer far larger than the caches.

    It is the practical ceiling of a memory-bound op on this device, the yardstick for the
    "≥ 85% of HBM bandwidth" target.
    """
    device = torch.device(device)
    elements = _COPY_BYTES[device.type] // 2
    src = torch.randn(elements, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    timing = time_cuda_or_cpu(torch.Tensor.copy_, [(dst, src)], device, warmup=warmup, reps=reps)
    return gbps(2 * src.nbytes, timing.median_s)


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def nvml_gpu_info(uuid: Optional[str] = None, index: int = 0) -> dict[str, Any]:
    """Name, clocks, power and memory of a GPU from NVML, or ``{}`` when NVML is unavailable.

    Parameters
    ----------
    uuid : str, optional
        The device's UUID (``torch.cuda.get_device_properties(i).uuid``); it identifies the
        device even when ``CUDA_VISIBLE_DEVICES`` renumbers devices.
    index : int
        NVML index, used when ``uuid`` is missing or unknown to NVML.
    """
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return {}
    try:
        handle = _nvml_handle(pynvml, uuid, index)

        def query(fn: Callable[..., Any], *args: Any, scale: float = 1.0) -> Any:
            # Each query may be unsupported on its own (e.g. power on some boards): skip just that one.
            try:
                value = fn(*args)
            except pynvml.NVMLError:
                return None
            if isinstance(value, bytes):
                return value.decode()
            return value * scale if scale != 1.0 else value

        memory = query(pynvml.nvmlDeviceGetMemoryInfo, handle)
        return {
            "name": query(pynvml.nvmlDeviceGetName, handle),
            "driver": query(pynvml.nvmlSystemGetDriverVersion),
            "memory_total_gib": None if memory is None else memory.total / 2**30,
            "sm_clock_mhz": query(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_SM),
            "sm_clock_max_mhz": query(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": query(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_MEM),
            "mem_clock_max_mhz": query(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_MEM),
            "power_draw_w": query(pynvml.nvmlDeviceGetPowerUsage, handle, scale=1e-3),
            "power_limit_w": query(pynvml.nvmlDeviceGetEnforcedPowerLimit, handle, scale=1e-3),
        }
    except pynvml.NVMLError:  # no handle for the device
        return {}
    finally:
        pynvml.nvmlShutdown()


def _nvml_handle(pynvml: Any, uuid: Optional[str], index: int) -> Any:
    if uuid:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
        except pynvml.NVMLError:
            pass  # an unexpected UUID format; the index is right on single-GPU machines
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def environment_info(device: Union[str, torch.device]) -> dict[str, Any]:
    """Versions and the device: what a benchmark result must be read against.

    On CUDA the ``gpu`` entry has torch's device properties, the theoretical HBM bandwidth
    and NVML's clocks and power at the time of the call.
    """
    device = torch.device(device)
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "tkpy": __version__,
        "tkpy_cuda_kernels": cuda_compiled(),
        "python": platform.python_version(),
        "device": device.type,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        mem_khz = getattr(props, "memory_clock_rate", 0)
        bus_bits = getattr(props, "memory_bus_width", 0)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count,
            # Double data rate: two transfers per memory clock.
            "hbm_peak_gbps": 2 * mem_khz * 1e3 * bus_bits / 8 / 1e9 if mem_khz and bus_bits else None,
            **nvml_gpu_info(str(getattr(props, "uuid", "")) or None, device.index or 0),
        }
    else:
        info["cpu"] = {
            "machine": platform.machine(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
        }
    return info


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _fmt(value: Optional[float], spec: str, unit: str = "") -> str:
    return "?" if value is None else f"{value:{spec}}{unit}"


def _device_lines(env: dict[str, Any]) -> list[str]:
    lines = [
        f"torch {env['torch']} (CUDA runtime {env['torch_cuda']}), tkpy {env['tkpy']} "
        f"(CUDA kernels compiled: {'yes' if env['tkpy_cuda_kernels'] else 'no'}), Python {env['python']}"
    ]
    gpu = env.get("gpu")
    if gpu:
        lines.append(
            f"GPU: {gpu.get('name')} (sm_{gpu['capability'].replace('.', '')}, {gpu['sms']} SMs, "
            f"{_fmt(gpu.get('memory_total_gib'), '.0f', ' GiB')}), driver {gpu.get('driver', '?')}"
        )
        lines.append(
            f"clocks after the run: SM {_fmt(gpu.get('sm_clock_mhz'), 'd')}/{_fmt(gpu.get('sm_clock_max_mhz'), 'd')}"
            f" MHz, memory {_fmt(gpu.get('mem_clock_mhz'), 'd')}/{_fmt(gpu.get('mem_clock_max_mhz'), 'd')} MHz; "
            f"power {_fmt(gpu.get('power_draw_w'), '.0f')}/{_fmt(gpu.get('power_limit_w'), '.0f')} W; "
            f"theoretical HBM {_fmt(gpu.get('hbm_peak_gbps'), '.0f', ' GB/s')}"
        )
    else:
        cpu = env["cpu"]
        lines.append(f"CPU: {cpu['processor'] or cpu['machine']}, {cpu['threads']} torch threads")
    return lines


def format_report(
    results: Sequence[CaseResult], env: dict[str, Any], copy_gbps: Optional[float], warmup: int, reps: int
) -> str:
    """The header lines and one markdown table per metric: GB/s (RoPE), then TFLOP/s (GEMM), then
    attention's table of TFLOP/s against each SDPA backend.

    ``copy_gbps`` may be None when no GB/s case ran.
    """
    timer = results[0].tkpy.method if results else "?"
    lines = _device_lines(env) + [
        f"timing: {timer}, median of {reps} runs after {warmup} warm-up runs, rotating random-normal input copies",
        "check: ||tkpy - peer|| / ||peer|| within the dtype's tolerance",
    ]
    for name, metric in _METRICS.items():
        rows = [r for r in results if r.case.metric == name and not isinstance(r, (AttentionResult, BlockSparseResult))]
        if rows:
            lines += ["", *_metric_table(name, metric, rows, copy_gbps)]
    attention = [r for r in results if isinstance(r, AttentionResult)]
    if attention:
        lines += ["", *_attention_table(attention)]
    sparse = [r for r in results if isinstance(r, BlockSparseResult)]
    if sparse:
        lines += ["", *_block_sparse_table(sparse)]
    return "\n".join(lines)


def _metric_table(name: str, metric: _Metric, rows: Sequence[CaseResult], copy_gbps: Optional[float]) -> list[str]:
    # Bandwidth is also read against the measured copy bandwidth, the ceiling of a memory-bound op.
    vs_copy = name == "GB/s" and copy_gbps is not None
    peers = ", ".join(dict.fromkeys(r.case.peer for r in rows))
    lines = [f"{name} convention (both columns): {metric.convention}", f"peer: {peers}"]
    if vs_copy:
        lines.append(f"copy bandwidth (Tensor.copy_, read + write): {copy_gbps:.1f} GB/s; '% copy' = tkpy GB/s / that")
    lines += [
        "",
        f"| op | case | shape | dtype | tkpy us | tkpy {name} | torch us | torch {name} | speedup |"
        + (" % copy |" if vs_copy else "") + " check |",
        "|---|---|---|---|--:|--:|--:|--:|--:|" + ("--:|" if vs_copy else "") + "---|",
    ]
    for r in rows:
        check = "ok" if r.passed else f"MISMATCH {r.rel_err:.1e}"
        copy_cell = f" {100 * r.tkpy_rate / copy_gbps:.0f}% |" if vs_copy else ""
        lines.append(
            f"| {r.case.op} | {r.case.id} | {r.case.shape} | {str(r.case.dtype).removeprefix('torch.')} "
            f"| {r.tkpy.median_s * 1e6:,.1f} | {r.tkpy_rate:{metric.spec}} | {r.peer.median_s * 1e6:,.1f} "
            f"| {r.peer_rate:{metric.spec}} | {r.speedup:.2f}x |{copy_cell} {check} |"
        )
    return lines


def _attention_table(rows: Sequence[AttentionResult]) -> list[str]:
    """One row per case: tkpy, each backend ("n/a" with the reason below the table) and tkpy / best."""
    backends = list(dict.fromkeys(name for r in rows for name in r.case.backends))
    lines = [
        f"attention TFLOP/s convention (every column): {ATTENTION_FLOPS_CONVENTION}",
        "peers: torch SDPA, each backend timed on its own (sdpa_kernel); 'vs best' = tkpy / the fastest backend",
        "",
        "| op | case | shape | dtype | tkpy us | tkpy TFLOP/s | "
        + " | ".join(f"{name} TFLOP/s" for name in backends) + " | best | vs best | check |",
        "|---|---|---|---|--:|--:|" + "--:|" * len(backends) + "---|--:|---|",
    ]
    unavailable: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        cells = []
        for name in backends:
            rate = r.backend_rate(name)
            cells.append("n/a" if rate is None else f"{rate:,.4f}")
            if rate is None:
                unavailable.setdefault((name, r.backends.get(name, "not run")), []).append(r.case.id)
        check = "ok" if r.passed else f"MISMATCH {r.rel_err:.1e}"
        ratio = "n/a" if r.speedup is None else f"{r.speedup:.2f}x"
        lines.append(
            f"| {r.case.op} | {r.case.id} | {r.case.shape} | {str(r.case.dtype).removeprefix('torch.')} "
            f"| {r.tkpy.median_s * 1e6:,.1f} | {r.tkpy_rate:,.4f} | {' | '.join(cells)} "
            f"| {r.best_backend or 'none'} | {ratio} | {check} |"
        )
    if unavailable:
        lines += ["", "n/a:", *(f"- {name} on {', '.join(ids)}: {why}" for (name, why), ids in unavailable.items())]
    return lines


def _block_sparse_table(rows: Sequence[BlockSparseResult]) -> list[str]:
    """One row per case: rho, tkpy and dense times, time / dense against the DESIGN §6 target, the gate."""
    lines = [
        f"sparse prefill vs dense causal tkpy.flash_attn_varlen_func on the same inputs: {DENSITY_CONVENTION}",
        "",
        "| op | case | shape | dtype | rho | tkpy us | dense us | time / dense | target | meets | tkpy TFLOP/s "
        "| dense TFLOP/s | runs | check |",
        "|---|---|---|---|--:|--:|--:|--:|--:|---|--:|--:|--:|---|",
    ]
    for r in rows:
        check = "not gated" if r.gate == "skipped" else "ok" if r.passed else f"MISMATCH {r.rel_err:.1e}"
        meets = "yes" if r.time_ratio <= r.target_ratio else "NO"
        lines.append(
            f"| {r.case.op} | {r.case.id} | {r.case.shape} | {str(r.case.dtype).removeprefix('torch.')} "
            f"| {r.density:.3f} | {r.tkpy.median_s * 1e6:,.1f} | {r.peer.median_s * 1e6:,.1f} | {r.time_ratio:.3f} "
            f"| {r.target_ratio:.3f} | {meets} | {r.tkpy_rate:,.4f} | {r.peer_rate:,.4f} | {len(r.tkpy.samples_s)} "
            f"| {check} |"
        )
    notes = {}
    for r in rows:
        notes.setdefault(f"check: {_GATES[r.gate]}", []).append(r.case.id)
        notes.setdefault(f"heads: {r.pattern}", []).append(r.case.id)
    return lines + ["", *(f"- {note} ({', '.join(ids)})" for note, ids in notes.items())]


def _progress(cases: Sequence[BenchCase], enabled: bool) -> Iterable[BenchCase]:
    """Yield ``cases`` with progress on stderr: a tqdm bar on a terminal, else one line per case.

    Plain lines keep logs readable where a bar's carriage returns would not.
    """
    if not enabled:
        yield from cases
        return
    tqdm = None
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
    if tqdm is not None:
        with tqdm(cases, desc="tkpy bench", unit="case", file=sys.stderr) as bar:
            for case in bar:
                bar.set_postfix_str(f"{case.op} {case.id}")
                yield case
        return
    for number, case in enumerate(cases, 1):
        print(f"[{number}/{len(cases)}] {case.op} {case.id}", file=sys.stderr, flush=True)
        yield case


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


_SPARSE_OPS = ("block_sparse_attn_func", "token_streaming_attn_func")  # BlockSparseCase.op
_OPS = (RopeCase.op, Rope3dCase.op, GemmCase.op, AttentionCase.op, *_SPARSE_OPS)


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tkpy bench",
        description="Time tkpy's ops against eager PyTorch and print a table (stdout); progress goes to stderr.",
    )
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when a GPU and tkpy's CUDA kernels are both present (default)")
    parser.add_argument("--ops", nargs="+", choices=_OPS, default=list(_OPS), help="which ops to time (default: all)")
    parser.add_argument("--warmup", type=int, help="warm-up runs per implementation (default: 10 CUDA, 3 CPU)")
    parser.add_argument("--reps", type=int, help="timed runs per implementation (default: 100 CUDA, 20 CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    return parser.parse_args(argv)


def _pick_device(requested: str) -> tuple[Optional[torch.device], str]:
    """The device to time on and a note for the top of the report (an error when device is None)."""
    gpu, kernels = torch.cuda.is_available(), cuda_compiled()
    if requested == "cuda" and not (gpu and kernels):
        reason = "torch sees no CUDA device" if not gpu else "this tkpy build has no CUDA kernels"
        return None, f"tkpy bench: --device cuda asked for, but {reason}"
    if requested == "cuda" or (requested == "auto" and gpu and kernels):
        return torch.device("cuda", torch.cuda.current_device()), "device: CUDA"
    if not gpu:
        note = "NO GPU PRESENT: torch sees no CUDA device. These are CPU-path timings"
    elif not kernels:
        note = "A GPU is present but this tkpy build has no CUDA kernels. These are CPU-path timings"
    else:
        note = "CPU requested. These are CPU-path timings"
    note += " (tkpy's CPU implementation vs its torch peer, small shapes); they say nothing about GPU speed."
    return torch.device("cpu"), note


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark and print the report.

    Parameters
    ----------
    argv : list of str, optional
        The arguments after ``bench`` (``--help`` lists them); default ``sys.argv[1:]``.

    Returns
    -------
    int
        0 when every case matched its peer, 1 when one did not, 2 on a usage error.
    """
    args = _parse_args(argv)
    device, note = _pick_device(args.device)
    if device is None:
        print(note, file=sys.stderr)
        return 2
    default_warmup, default_reps = _DEFAULT_RUNS[device.type]
    warmup = default_warmup if args.warmup is None else args.warmup
    reps = default_reps if args.reps is None else args.reps
    print(f"tkpy bench: {', '.join(args.ops)} vs their torch peers\n{note}", flush=True)

    all_cases = (*rope_cases(device), *gemm_cases(device), *attention_cases(device), *block_sparse_cases(device))
    cases = [case for case in all_cases if case.op in args.ops]
    copy_gbps = None
    if any(case.metric == "GB/s" for case in cases):
        copy_gbps = measure_copy_bandwidth(device, warmup=warmup, reps=reps)
    results = [
        measure(prepare_case(case, device, seed=args.seed), warmup=warmup, reps=reps)
        for case in _progress(cases, enabled=not args.no_progress)
    ]
    # Queried after the run, so that the clocks shown are the ones the timed kernels ran at.
    env = environment_info(device)
    print(format_report(results, env, copy_gbps, warmup, reps))
    mismatches = [f"{r.case.op} {r.case.id} (vs {r.case.peer})" for r in results if not r.passed]
    if mismatches:
        print(f"tkpy bench: tkpy disagrees with its peer on: {', '.join(mismatches)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

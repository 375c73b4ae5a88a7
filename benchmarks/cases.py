"""The benchmark cases of tkpy's ops, which both ``pytest benchmarks`` and ``python -m tkpy bench`` run.

A case allocates random inputs and returns tkpy's call, its peers' calls and a check. :func:`measure`
runs the check, ``‖tkpy − reference‖ / ‖reference‖`` against ``tkpy.reference`` (float64) within the
tests' tolerance, on what the reference can afford (the last 128 query rows of one sequence for
attention, one sequence for decode), then times tkpy and each peer once.

Attention backward cases (ops ``<function>.backward``) differentiate the forward's calls with
``torch.autograd.grad(out, (q, k, v), dout)``. ``bwd-`` cases time the backward alone: each
implementation's forward runs once, in the timer's first, untimed call, and every call after it runs
that graph's backward again (``retain_graph=True``); ``fwd+bwd-`` cases run both in every call. Their
check is the gradients of the same 128 output rows alone (dout zero elsewhere): dq of those rows, dk
and dv of their sequence, each within the tolerance of ``reference.attention_grads``.

How the figures are counted (DESIGN.md §6):

- Time: on CUDA ``triton.testing.do_bench`` (CUDA events around each call, the L2 cache flushed
  before it, warm-up, the median); on the CPU the median wall-clock time of a few calls.
- Every implementation of a case is credited the case's work per call, so a ratio of rates is a
  ratio of times. GEMM: ``2·M·N·K`` FLOPs. Attention: ``4·B·Hq·Sq·Sk·D``, halved for causal. Sparse
  prefill: rho times dense causal attention, rho being the active (query block, key block) pairs over
  the causal ones, 128-token blocks, all heads. RoPE: q and k each read and written once. Decode: K
  and V of every context token and q read, out written; sparse decode is credited dense decode's
  bytes (its GB/s is dense-equivalent). Attention backward: 2.5 times the forward's FLOPs (its five
  matmuls to the forward's two), forward + backward 3.5 times.
- Bandwidth is also read against the copy bandwidth of the device (``Tensor.copy_``, read + write).
- UltraViCo: attention's FLOPs; its peer is tkpy's plain attention on the same inputs, so the ratio
  is the decay's cost (``decay_overhead``: UltraViCo's time over plain attention's, minus 1).
"""

from __future__ import annotations

import functools
import math
import platform
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import tkpy
from tkpy import reference, riflex
from tkpy.reference import REL_TOL
from tkpy.reference import relative_error as rel_err
from tkpy.lserve import HeadPattern, LServeCache, LServeConfig, select_pages, sparse_decode
from tkpy.rope import apply_rope_, apply_rope_3d_


TFLOPS, GBPS = "TFLOP/s", "GB/s"
UNITS = {TFLOPS: ("tflops", 1e12, "flops"), GBPS: ("gbps", 1e9, "bytes")}  # record key, scale, work key
FASTEST = "the fastest peer"
COPY = "device copy (Tensor.copy_, read + write)"
CPU_RUNS = 5
TIMERS = {"cuda": "triton.testing.do_bench: CUDA events, L2 flushed before each call, median after warm-up",
          "cpu": f"time.perf_counter: median of {CPU_RUNS} calls after one warm-up"}
BF16 = torch.bfloat16
# Query rows the attention references check: whole 128-token blocks, and few enough that float64
# scores against 128k keys fit on the GPU.
CHECK_ROWS = 128
BLOCK, PAGE, SINK = 128, 64, 128
HQ, HKV, D = 32, 8, 128  # Llama-3-8B's attention heads
HEAD_PATTERN = "Meta-Llama-3.1-8B-Instruct.full_attention_heads.tsv"
_PATTERN_FILE = f"DuoAttention's {HEAD_PATTERN}, from the shared data's duo_attention/"
HEAD_PATTERN_HELP = f"{_PATTERN_FILE}, for the LServe cases (no other pattern stands in for it)"
# What an attention case times, and the FLOPs of a differentiated one over the forward's.
FORWARD, BACKWARD, FORWARD_BACKWARD = "forward", "backward", "forward+backward"
PASS_FLOPS = {BACKWARD: 2.5, FORWARD_BACKWARD: 3.5}


class Run(NamedTuple):
    """A case's inputs on a device, as calls."""

    tkpy: Callable[[], Any]
    peers: dict[str, Callable[[], Any]]
    check: Callable[[], tuple[Any, Any]]  # tkpy's output and the reference's, alike (tensors or tuples of them)
    work: float  # FLOPs or bytes per call, credited to tkpy and to every peer
    figures: Callable[[dict], dict] = lambda record: {}  # the family's own figures, from the record


@dataclass(frozen=True)
class Case:
    op: str  # the public function timed; "<function>.backward": autograd through it
    id: str
    shape: str
    metric: str  # TFLOPS or GBPS
    peer: str  # what the record's ratio compares with
    prepare: Callable[[torch.device, torch.Generator], Run]
    dtype: torch.dtype = BF16
    dims: dict = field(default_factory=dict)  # recorded as they are (the attention plot reads them)
    # Runs the Hopper attention forward: on CUDA, each kernel (tkpy.use_attention_kernel) is
    # checked and timed, side by side.
    attention_kernels: bool = False


def all_cases(device: Union[str, torch.device], head_pattern: Optional[Path]) -> list[Case]:
    """Every case for ``device``, in the order that matters most if time runs out. Listing allocates
    nothing; ``head_pattern`` is read when an LServe case runs."""
    cuda = torch.device(device).type == "cuda"
    return [*gemm_cases(cuda), *attention_cases(cuda), *attention_backward_cases(cuda),
            *sparse_prefill_cases(cuda, head_pattern), *decode_cases(cuda), *rope_cases(cuda),
            *ultravico_cases(cuda)]


def require_head_pattern(path: Optional[Path]) -> Path:
    """``path``, the ``--head-pattern`` file; a clear error when it was not given or is missing."""
    if path is None:
        raise ValueError(f"the LServe cases need --head-pattern PATH: {_PATTERN_FILE}; "
                         "no other pattern stands in for it")
    if not Path(path).is_file():
        raise ValueError(f"--head-pattern {path}: no such file; expected {HEAD_PATTERN}")
    return Path(path)


# --------------------------------------------------------------------------------------------
# Timing, the check and the record
# --------------------------------------------------------------------------------------------


def median_seconds(fn: Callable[[], Any], device: torch.device) -> float:
    """The median time of one call of ``fn``, as :data:`TIMERS` says."""
    if device.type == "cuda":
        from triton.testing import do_bench  # triton comes with torch's CUDA builds only

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    samples = []
    for _ in range(CPU_RUNS):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def peer_seconds(fn: Callable[[], Any], device: torch.device) -> Union[float, str]:
    """A peer's :func:`median_seconds`, or why it could not run: SDPA explains a refused backend in
    warnings, FlexAttention may fail to compile, and a large case may not fit."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return median_seconds(fn, device)
        except Exception as error:  # the case keeps tkpy's figures and records the reason
            reasons = [str(w.message).strip().split("\n")[0] for w in caught]
            first_line = str(error).strip().split("\n")[0]
            return "; ".join(dict.fromkeys([*reasons, f"{type(error).__name__}: {first_line}"]))


@functools.cache
def copy_gbps(device: torch.device) -> float:
    """Read + write GB/s of ``Tensor.copy_`` over 1 GiB (64 MiB on the CPU): the practical ceiling of a
    memory-bound op, measured once per process so that every figure is read against the same one."""
    src = torch.empty((1 << 29) if device.type == "cuda" else (1 << 25), dtype=BF16, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * src.nbytes / median_seconds(lambda: dst.copy_(src), device) / 1e9


def measure(case: Case, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Check tkpy on ``case`` against the reference, then time tkpy and each peer once.

    Returns the record (pytest-benchmark's ``extra_info``, which scripts/summarize_gpu_run.py and
    plot.py read): ``tkpy_<unit>`` and ``peer_<unit>`` (``tflops`` or ``gbps``), ``ratio`` (tkpy's
    rate over the peer's), ``peers`` (each one's figures, or why it did not run), ``rel_err`` and
    ``check_passed``, and the family's own figures and dimensions. Attention cases on CUDA run under
    the process's kernel (``kernel``, :func:`tkpy.attention_kernel`) and record every other one in
    ``other_kernels`` (checked and timed the same way; ``ratio``: its time over the main kernel's).
    """
    run = case.prepare(device, torch.Generator(device).manual_seed(seed))
    unit, scale, work_key = UNITS[case.metric]
    kernel = tkpy.attention_kernel() if case.attention_kernels and device.type == "cuda" else None
    error, tkpy_s = _check_and_time(run, device)
    other_kernels = {}
    for name in ATTENTION_KERNELS if kernel is not None else ():
        if name != kernel:
            with tkpy.use_attention_kernel(name):
                other_error, seconds = _check_and_time(run, device)
            other_kernels[name] = {"median_us": seconds * 1e6, unit: run.work / seconds / scale,
                                   "ratio": seconds / tkpy_s, "rel_err": other_error,
                                   "check_passed": other_error <= REL_TOL[case.dtype]}
    peers = {}
    for name, call in run.peers.items():
        seconds = peer_seconds(call, device)
        peers[name] = {"error": seconds} if isinstance(seconds, str) else {
            "median_us": seconds * 1e6, unit: run.work / seconds / scale, "ratio": seconds / tkpy_s}
    timed = [name for name, figures in peers.items() if "error" not in figures]
    main = case.peer if case.peer != FASTEST else min(timed, key=lambda n: peers[n]["median_us"], default=None)
    peer = peers.get(main, {})
    record = {
        "op": case.op, "case": case.id, "shape": case.shape, "dtype": str(case.dtype).removeprefix("torch."),
        "device": device.type, "metric": case.metric, work_key: run.work, "timer": TIMERS[device.type],
        "tkpy_median_us": tkpy_s * 1e6, f"tkpy_{unit}": run.work / tkpy_s / scale, "peer": main,
        "peer_median_us": peer.get("median_us"), f"peer_{unit}": peer.get(unit), "ratio": peer.get("ratio"),
        "peers": peers, "rel_err": error, "tolerance": REL_TOL[case.dtype],
        "check_passed": error <= REL_TOL[case.dtype] and all(k["check_passed"] for k in other_kernels.values()),
        "kernel": kernel, "other_kernels": other_kernels, **case.dims,
    }
    return {**record, **run.figures(record)}


ATTENTION_KERNELS = ("pipelined", "baseline")


def _check_and_time(run: Run, device: torch.device) -> tuple[float, float]:
    """tkpy's relative error against the reference (the worst of its outputs' when the check returns
    several, as a gradient check returns dq, dk and dv), and its median seconds."""
    ours, ref = run.check()
    pairs = [(ours, ref)] if isinstance(ours, torch.Tensor) else zip(ours, ref)
    error = max(rel_err(out, expected) for out, expected in pairs)
    del ours, ref  # the reference's float64 tensors are large on the GPU
    return error, median_seconds(run.tkpy, device)


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and the device: what a result must be read against."""
    info: dict[str, Any] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "tkpy": tkpy.__version__,
                            "tkpy_cuda_kernels": tkpy.cuda_compiled(), "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "sms": props.multi_processor_count, "memory_total_gib": props.total_memory / 2**30}
    else:
        info["cpu"] = {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    return info


def _randn(gen: torch.Generator, device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=gen, device=device, dtype=dtype)


def _copy_share(record: dict, device: torch.device) -> dict:
    """tkpy's GB/s against the copy bandwidth; DESIGN §6 asks for 85% on the GPU."""
    copy, gated = copy_gbps(device), device.type == "cuda"
    share = record["tkpy_gbps"] / copy
    return {"copy_gbps": copy, "pct_of_copy": 100 * share, "target_pct_of_copy": 85.0 if gated else None,
            "meets_target": share >= 0.85 if gated else None}


# --------------------------------------------------------------------------------------------
# GEMM and dense attention
# --------------------------------------------------------------------------------------------


def gemm_cases(cuda: bool) -> Iterator[Case]:
    """:func:`tkpy.gemm` against ``torch.matmul``; 4104 and 264 leave partial tiles on every edge."""
    fp16 = torch.float16
    if cuda:
        shapes = [*(("square", s, s, s, False, BF16) for s in (2048, 4096, 8192)),
                  ("trans-b", 4096, 4096, 4096, True, BF16), ("fp16", 4096, 4096, 4096, False, fp16),
                  ("tail", 4104, 4104, 4104, False, BF16)]
    else:
        shapes = [("square", 256, 256, 256, False, BF16), ("rect", 512, 384, 256, False, BF16),
                  ("trans-b", 256, 256, 256, True, BF16), ("fp16", 256, 256, 256, False, fp16),
                  ("tail", 264, 264, 264, False, BF16)]
    for name, m, n, k, trans_b, dtype in shapes:
        yield Case("gemm", f"{name}-{m}x{n}x{k}", f"M{m} N{n} K{k}" + (" b^T" if trans_b else ""), TFLOPS,
                   "torch.matmul", partial(_gemm, m, n, k, trans_b, dtype), dtype)


def _gemm(m: int, n: int, k: int, trans_b: bool, dtype: torch.dtype, device, gen) -> Run:
    a, b = _randn(gen, device, dtype, (m, k)), _randn(gen, device, dtype, (n, k) if trans_b else (k, n))
    # b.T is a view that cuBLAS reads in place, as model code multiplies by a weight.
    return Run(partial(tkpy.gemm, a, b, trans_b), {"torch.matmul": lambda: torch.matmul(a, b.T if trans_b else b)},
               lambda: (tkpy.gemm(a, b, trans_b), reference.matmul(a, b, trans_b)), 2 * m * n * k)


_SDPA = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
         "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}


class Dense(NamedTuple):
    """A dense attention shape: heads·D = hidden, batch·S = tokens (the record's dims)."""

    batch: int
    seqlen: int
    heads: int
    head_dim: int
    causal: bool

    @property
    def mask(self) -> str:
        return "causal" if self.causal else "full"

    @property
    def id(self) -> str:
        return f"{self.mask}-D{self.head_dim}-S{self.seqlen}"

    def __str__(self) -> str:
        return f"B{self.batch} S{self.seqlen} H{self.heads} D{self.head_dim} {self.mask}"


def _dense_shapes(cuda: bool, head_dims: tuple[int, ...], seqlens: tuple[int, ...]) -> Iterator[Dense]:
    """Each head dim, full then causal, each S; on the CPU S 128 and 200 (a partial tile) instead."""
    tokens, hidden, seqlens = (16384, 2048, seqlens) if cuda else (256, 256, (128, 200))
    for head_dim in head_dims:
        for causal in (False, True):
            for seqlen in seqlens:
                yield Dense(max(1, tokens // seqlen), seqlen, hidden // head_dim, head_dim, causal)


def attention_cases(cuda: bool) -> Iterator[Case]:
    """:func:`tkpy.flash_attn_func` against each of torch SDPA's backends on its own (on the CPU, SDPA's
    choice) and, on FLEX_DENSE's shapes, compiled FlexAttention: D 64, 128 and 256, S 1k to 32k."""
    for shape in _dense_shapes(cuda, (64, 128, 256), (1024, 2048, 4096, 8192, 16384, 32768)):
        yield Case("flash_attn_func", shape.id, str(shape), TFLOPS, FASTEST, partial(_attention, *shape),
                   dims=shape._asdict(), attention_kernels=True)


# The peer of a deterministic backward: tkpy's default one, so that the ratio is its cost.
NONDETERMINISTIC = "tkpy deterministic=False"


def attention_backward_cases(cuda: bool) -> Iterator[Case]:
    """Autograd through :func:`tkpy.flash_attn_func` against each SDPA backend's on its own, at D 64,
    128 and 256, S 4k and 16k: the backward alone (``bwd-``) and forward + backward (``fwd+bwd-``); at
    D 128 also the backward with ``deterministic=True`` against tkpy's default one
    (``bwd-deterministic-``)."""
    for shape in _dense_shapes(cuda, (64, 128, 256), (4096, 16384)):
        variants = [("bwd", BACKWARD, False), ("fwd+bwd", FORWARD_BACKWARD, False)]
        if shape.head_dim == 128:
            variants.append(("bwd-deterministic", BACKWARD, True))
        for prefix, timed, deterministic in variants:
            yield Case("flash_attn_func.backward", f"{prefix}-{shape.id}", str(shape), TFLOPS,
                       NONDETERMINISTIC if deterministic else FASTEST,
                       partial(_attention, *shape, timed=timed, deterministic=deterministic),
                       dims={**shape._asdict(), "timed": timed, "deterministic": deterministic})


def _sdpa(bhsd: list[torch.Tensor], causal: bool, backend: Optional[SDPBackend]) -> torch.Tensor:
    """SDPA as model code calls it: on ``[B, H, S, D]`` views of tkpy's inputs, its output viewed back
    as ``[B, S, H, D]``."""
    with nullcontext() if backend is None else sdpa_kernel(backend):
        return F.scaled_dot_product_attention(*bhsd, is_causal=causal).transpose(1, 2)


# Dense cases that FlexAttention (compiled, one compile per shape) also times: few enough to stay
# within Dynamo's recompile limit with the sparse cases' shapes, and the GPU run's time.
FLEX_DENSE = {(128, 4096), (128, 16384)}


def _flex_dense(bhsd: list[torch.Tensor], causal: bool) -> Callable:
    """Compiled FlexAttention on SDPA's layout, with a causal block mask or none."""
    attend = _compiled(flex_attention)
    if not causal:
        return lambda: attend(*bhsd)
    batch, heads, seqlen = bhsd[0].shape[:3]
    block_mask = functools.cache(lambda: _compiled(create_block_mask)(
        lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, None, None, seqlen, seqlen, device=bhsd[0].device))
    return lambda: attend(*bhsd, block_mask=block_mask())


def _attention(batch: int, seqlen: int, heads: int, head_dim: int, causal: bool, device, gen, timed: str = FORWARD,
               deterministic: bool = False) -> Run:
    q, k, v = (_randn(gen, device, BF16, (batch, seqlen, heads, head_dim)).requires_grad_(timed != FORWARD)
               for _ in range(3))
    bhsd = [t.transpose(1, 2) for t in (q, k, v)]  # SDPA's layout: views, made once
    backends = _SDPA if device.type == "cuda" else {"sdpa": None}
    call = partial(tkpy.flash_attn_func, q, k, v, causal=causal, deterministic=deterministic)
    peers = ({NONDETERMINISTIC: partial(tkpy.flash_attn_func, q, k, v, causal=causal)} if deterministic else
             {name: partial(_sdpa, bhsd, causal, backend) for name, backend in backends.items()})
    if device.type == "cuda" and (head_dim, seqlen) in FLEX_DENSE and timed == FORWARD:  # the forward's peer only
        peers["flex"] = _flex_dense(bhsd, causal)
    # Causal masks are bottom-right aligned: q's last rows alone see what they see in the full call.
    rows = (slice(0, 1), slice(max(0, seqlen - CHECK_ROWS), seqlen))
    return _attention_run(timed, call, peers, (q, k, v), rows, slice(0, 1), partial(reference.attention, causal=causal),
                          4 * batch * heads * seqlen**2 * head_dim // (2 if causal else 1), gen)


def _attention_run(timed: str, call: Callable, peers: dict[str, Callable], inputs: tuple, rows: tuple, sequence: slice,
                   reference_forward: Callable, work: float, gen: torch.Generator,
                   figures: Callable[[dict], dict] = lambda record: {}) -> Run:
    """An attention case's Run: its forward calls (output in q's layout) as they are, or differentiated
    for a random ``dout`` as ``timed`` says. The check reads ``out[rows]`` (of the sequence
    ``k[sequence]``, ``v[sequence]``), against ``reference_forward(q[rows], k[sequence], v[sequence])``."""
    if timed == FORWARD:
        return Run(call, peers, partial(_output_check, call, inputs, rows, sequence, reference_forward), work, figures)
    q = inputs[0]
    dout = _randn(gen, q.device, q.dtype, q.shape)
    grads = partial(_gradients, inputs=inputs, dout=dout, with_forward=timed == FORWARD_BACKWARD)
    check = partial(_gradient_check, call, inputs, dout, rows, sequence, reference_forward)
    return Run(grads(call), {name: grads(peer) for name, peer in peers.items()}, check, PASS_FLOPS[timed] * work,
               figures)


def _output_check(call, inputs, rows, sequence, reference_forward) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = inputs
    return call()[rows], reference_forward(q[rows], k[sequence], v[sequence])[0]


def _gradients(forward: Callable[[], torch.Tensor], inputs: tuple, dout: torch.Tensor, with_forward: bool) -> Callable:
    """A call giving dq, dk, dv of ``forward()`` for ``dout``. Without the forward: its first call runs
    the forward (the timers' first call is never timed), and every call runs that graph's backward.
    A forward that cannot run (an SDPA backend that refuses the shape) fails in the timer, which
    records why."""
    if with_forward:
        return lambda: torch.autograd.grad(forward(), inputs, dout)
    out = functools.cache(forward)
    return lambda: torch.autograd.grad(out(), inputs, dout, retain_graph=True)


def _gradient_check(call, inputs, dout, rows, sequence, reference_forward) -> tuple[tuple, tuple]:
    """tkpy's gradients of ``out[rows]`` alone (``dout`` zero elsewhere, on a fresh forward): dq of
    those rows, dk and dv of their sequence, and the reference's."""
    q, k, v = inputs
    dout_rows = torch.zeros_like(dout)
    dout_rows[rows] = dout[rows]
    dq, dk, dv = torch.autograd.grad(call(), inputs, dout_rows)
    expected = reference.attention_grads(reference_forward, q[rows], k[sequence], v[sequence], dout[rows])
    return (dq[rows], dk[sequence], dv[sequence]), expected


# --------------------------------------------------------------------------------------------
# Sparse prefill
# --------------------------------------------------------------------------------------------


def sparse_prefill_cases(cuda: bool, head_pattern: Optional[Path]) -> Iterator[Case]:
    """One causal sequence against dense causal :func:`tkpy.flash_attn_varlen_func` and FlexAttention
    on the same inputs and mask. ``block_sparse_attn_func``: every head with round(rho · causal blocks)
    random causal blocks. ``token_streaming_attn_func``: DuoAttention's Llama-3.1-8B heads at 50%
    static sparsity (``head_pattern``, which has 8 KV heads), sink 128 and local 8192 tokens (CPU: 256);
    the backward of the second block-sparse case and of the first LServe one against the dense causal
    backward and FlexAttention's."""
    if cuda:
        sparse = [(s, 32, 8, rho) for s in (32768, 65536, 131072) for rho in (0.1, 0.25, 0.5, 1.0)]
        lserve = [(s, 32, 8, 8192) for s in (65536, 131072)]
    else:
        sparse, lserve = [(1024, 4, 2, rho) for rho in (0.1, 0.25, 0.5, 1.0)], [(1024, 8, 8, 256)]
    for seqlen, heads_q, heads_kv, rho in sparse:
        yield Case("block_sparse_attn_func", f"rho{rho:g}-S{seqlen}",
                   f"B1 S{seqlen} Hq{heads_q} Hkv{heads_kv} D{D} causal", TFLOPS, "dense",
                   partial(_sparse_prefill, seqlen, heads_q, heads_kv, rho, None, 0), attention_kernels=True)
    for seqlen, heads_q, heads_kv, local in lserve:
        yield Case("token_streaming_attn_func", f"lserve-S{seqlen}",
                   f"B1 S{seqlen} Hq{heads_q} Hkv{heads_kv} D{D} causal 50% streaming sink{SINK} local{local}",
                   TFLOPS, "dense", partial(_sparse_prefill, seqlen, heads_q, heads_kv, None, head_pattern, local),
                   attention_kernels=True)
    seqlen, heads_q, heads_kv, rho = sparse[1]
    yield Case("block_sparse_attn_func.backward", f"bwd-rho{rho:g}-S{seqlen}",
               f"B1 S{seqlen} Hq{heads_q} Hkv{heads_kv} D{D} causal", TFLOPS, "flex",
               partial(_sparse_prefill, seqlen, heads_q, heads_kv, rho, None, 0, timed=BACKWARD),
               dims={"timed": BACKWARD})
    seqlen, heads_q, heads_kv, local = lserve[0]
    yield Case("token_streaming_attn_func.backward", f"bwd-lserve-S{seqlen}",
               f"B1 S{seqlen} Hq{heads_q} Hkv{heads_kv} D{D} causal 50% streaming sink{SINK} local{local}", TFLOPS,
               "flex", partial(_sparse_prefill, seqlen, heads_q, heads_kv, None, head_pattern, local, timed=BACKWARD),
               dims={"timed": BACKWARD})


def _duo_layer(path: Optional[Path], heads_q: int, local: int) -> tuple[HeadPattern, int, str]:
    """DuoAttention's heads at 50% static sparsity, and the layer whose streaming share is nearest 50%."""
    pattern = HeadPattern.load(require_head_pattern(path), heads_q, 0.5, SINK, local)
    layer = int(abs(pattern.streaming_mask.mean(axis=1) - 0.5).argmin())
    streaming = f"{int(pattern.streaming_mask[layer].sum())}/{pattern.num_kv_heads} KV heads streaming"
    return pattern, layer, f"DuoAttention {Path(path).name}, layer {layer}: {streaming}"


def _sparse_prefill(seqlen: int, heads_q: int, heads_kv: int, rho: Optional[float], pattern_path: Optional[Path],
                    local: int, device, gen, timed: str = FORWARD) -> Run:
    blocks = math.ceil(seqlen / BLOCK)
    row, col = torch.arange(blocks, device=device)[:, None], torch.arange(blocks, device=device)
    causal = col <= row
    q = _randn(gen, device, BF16, (seqlen, heads_q, D)).requires_grad_(timed != FORWARD)
    k, v = (_randn(gen, device, BF16, (seqlen, heads_kv, D)).requires_grad_(timed != FORWARD) for _ in range(2))
    cu = torch.tensor([0, seqlen], dtype=torch.int32, device=device)
    if rho is None:
        pattern, layer, heads = _duo_layer(pattern_path, heads_q, local)
        types, info = pattern.head_mask_type(layer, device), pattern.streaming_info(layer, device)
        # The blocks a streaming head visits: row block i reaches back to token 128·i − (local − 1).
        window = causal & ((col * BLOCK < SINK) | ((col + 1) * BLOCK > row * BLOCK - local + 1))
        active, blockmask = torch.where((types == -1)[:, None, None], window, causal), None
        call = partial(tkpy.token_streaming_attn_func, q, k, v, cu, cu, types, info, seqlen, seqlen)
    else:
        count = max(1, round(rho * int(causal.sum())))
        keys = torch.rand(heads_q, blocks * blocks, generator=gen, device=device).masked_fill(~causal.flatten(), 2.0)
        active = torch.zeros_like(keys, dtype=torch.bool).scatter_(1, keys.argsort(dim=1)[:, :count], True)
        active, blockmask = active.view(heads_q, blocks, blocks), active.view(1, heads_q, blocks, blocks)
        types = torch.ones(heads_q, dtype=torch.int32, device=device)
        info = torch.zeros(2 * heads_q, dtype=torch.int32, device=device)
        call = partial(tkpy.block_sparse_attn_func, q, k, v, cu, cu, types, info, blockmask, seqlen, seqlen, 0.0,
                       is_causal=True)
        heads = f"random block masks, {count} of {int(causal.sum())} causal blocks per head"
    density = float(active.sum()) / (heads_q * int(causal.sum()))
    # Whole blocks at the end of a sequence of whole blocks: their row blocks are the full call's last.
    cu_tail = torch.tensor([0, CHECK_ROWS], dtype=torch.int32, device=device)
    masks = None if blockmask is None else blockmask[:, :, -CHECK_ROWS // BLOCK:]

    def reference_forward(q_tail, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        return reference.block_sparse_attention(q_tail, k, v, cu_tail, cu, types, info, masks, is_causal=True,
                                                exact_streaming=rho is None)

    def figures(record: dict) -> dict:
        time_vs_dense = record["tkpy_median_us"] / record["peers"]["dense"]["median_us"]
        target = 1.1 * density + 0.05 if timed == FORWARD else None  # DESIGN §6 sets the forward's
        return {"density": density, "time_vs_dense": time_vs_dense, "target_time_vs_dense": target,
                "meets_target": None if target is None else time_vs_dense <= target, "heads": heads}

    peers = {"dense": partial(tkpy.flash_attn_varlen_func, q, k, v, cu, cu, seqlen, seqlen, causal=True),
             "flex": _flex(q, k, v, active, types == -1, local, compiled=device.type == "cuda")}
    return _attention_run(timed, call, peers, (q, k, v), slice(seqlen - CHECK_ROWS, seqlen), slice(None),
                          reference_forward, density * 2 * heads_q * seqlen**2 * D, gen, figures)


def _flex_attention_with_grad(*args, **kwargs) -> torch.Tensor:
    """flex_attention under its own code object: Dynamo's recompile limit counts per code object, and
    the inputs' requires_grad is one more guard, so the backward cases' compiles leave the forward's
    budget alone."""
    return flex_attention(*args, **kwargs)


@functools.cache
def _compiled(fn: Callable) -> Callable:
    """``fn`` under ``torch.compile``, wrapped once. Static shapes compile once per sequence length
    (three on CUDA), within Dynamo's recompile limit (8), past which FlexAttention would run eagerly."""
    return torch.compile(fn, dynamic=False)


def _flex(q, k, v, active: torch.Tensor, streaming: torch.Tensor, local: int, compiled: bool) -> Callable:
    """FlexAttention under tkpy's token mask (causal, each head's active blocks and, on streaming heads,
    the sink + local window), output ``[S, Hq, D]``. Its first call builds the block mask."""
    seqlen, heads = q.shape[:2]

    def token_mask(b, h, q_idx, kv_idx):
        window = (kv_idx < SINK) | (kv_idx > q_idx - local)
        return (kv_idx <= q_idx) & active[h, q_idx // BLOCK, kv_idx // BLOCK] & (window | ~streaming[h])

    # Eager create_block_mask materialises the [Hq, S, S] token mask: 512 GiB at S = 128k.
    build, attend = (create_block_mask, _flex_attention_with_grad if q.requires_grad else flex_attention)
    if compiled:
        build, attend = _compiled(build), _compiled(attend)
    block_mask = functools.cache(lambda: build(token_mask, None, heads, seqlen, seqlen, device=q.device,
                                               BLOCK_SIZE=BLOCK))
    bhsd = [t[None].transpose(1, 2) for t in (q, k, v)]
    return lambda: attend(*bhsd, block_mask=block_mask(), enable_gqa=k.shape[1] != heads)[0].transpose(0, 1)


# --------------------------------------------------------------------------------------------
# Decode over a paged KV cache
# --------------------------------------------------------------------------------------------


def decode_cases(cuda: bool) -> Iterator[Case]:
    """One query token per sequence over 64-token pages scattered in the pool. Dense
    :func:`tkpy.flash_attn_with_kvcache` (``num_splits=0``) against the copy bandwidth; 4000 tokens end
    in a partial page. :func:`tkpy.lserve.sparse_decode` on a prebuilt selection (every other KV head
    streaming, sink 128, local 256) against dense decode of the same keys and values."""
    contexts = tuple(4096 << n for n in range(7))  # 4k to 256k
    dense = [(b, ctx) for b in (1, 8, 64) for ctx in contexts] if cuda else [(1, 1024), (2, 4000)]
    sparse = [(b, ctx, 4096) for b in (1, 8) for ctx in contexts[3:]] if cuda else [(1, 2048, 512), (2, 4000, 1024)]
    for batch, context in dense:
        yield Case("flash_attn_with_kvcache", f"B{batch}-ctx{context}", f"B{batch} ctx{context} Hq{HQ} Hkv{HKV} D{D} "
                   f"page{PAGE}", GBPS, COPY, partial(_decode, batch, context))
    for batch, context, budget in sparse:
        yield Case("sparse_decode", f"B{batch}-ctx{context}-T{budget}", f"B{batch} ctx{context} Hq{HQ} Hkv{HKV} D{D} "
                   f"budget{budget} 50% streaming sink{SINK} local256", GBPS, "dense",
                   partial(_sparse_decode, batch, context, budget))


def _paged_inputs(batch: int, context: int, device, gen) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """q ``[B, 1, Hq, D]``, a block table scattering the pages (a random permutation of the pool), the
    sequence lengths, and dense decode's bytes per call."""
    pages = math.ceil(context / PAGE)
    table = torch.randperm(batch * pages, generator=gen, device=device).to(torch.int32).view(batch, pages)
    seqlens = torch.full((batch,), context, dtype=torch.int32, device=device)
    work = batch * (2 * context * HKV + 2 * HQ) * D * BF16.itemsize
    return _randn(gen, device, BF16, (batch, 1, HQ, D)), table, seqlens, work


def _decode(batch: int, context: int, device, gen) -> Run:
    q, table, seqlens, work = _paged_inputs(batch, context, device, gen)
    k_pool, v_pool = (_randn(gen, device, BF16, (table.numel(), PAGE, HKV, D)) for _ in range(2))
    call = partial(tkpy.flash_attn_with_kvcache, q, k_pool, v_pool, cache_seqlens=seqlens, block_table=table)

    def check() -> tuple[torch.Tensor, torch.Tensor]:  # sequence 0, against attention over its gathered keys
        k, v = (pool[table[0].long()].flatten(0, 1)[:context] for pool in (k_pool, v_pool))
        return call()[0], reference.attention(q[:1], k[None], v[None])[0][0]

    def figures(record: dict) -> dict:
        share = _copy_share(record, device)
        return {"peer_gbps": share["copy_gbps"], "ratio": share["pct_of_copy"] / 100, **share}

    return Run(call, {}, check, work, figures)


def _sparse_decode(batch: int, context: int, budget: int, device, gen) -> Run:
    q, table, seqlens, work = _paged_inputs(batch, context, device, gen)
    config = LServeConfig(sink=SINK, local=256, token_budget=budget)
    cache = LServeCache(table.numel(), batch, [h % 2 == 1 for h in range(HKV)], D, BF16, config, device)
    ring = cache.ring_table(torch.arange(batch, dtype=torch.int32, device=device))
    pages = table.shape[1]
    k_pool, v_pool = (torch.empty(table.numel(), PAGE, HKV, D, dtype=BF16, device=device) for _ in range(2))
    k, v = (_randn(gen, device, BF16, (batch, context, HKV, D)) for _ in range(2))
    for pool, x in ((k_pool, k), (v_pool, v)):  # the dense peer reads the same keys and values
        pool[table.long()] = F.pad(x, (0, 0, 0, 0, 0, pages * PAGE - context)).view(batch, pages, PAGE, HKV, D)
    cache.append(k, v, table, ring, torch.zeros(batch, dtype=torch.int32, device=device))
    del k, v
    select = partial(select_pages, q, cache.stats, table, seqlens, budget)
    selection = select()
    call = partial(sparse_decode, q, cache, table, ring, seqlens, selection=selection)

    def check() -> tuple[torch.Tensor, torch.Tensor]:
        # Sequence 0 against the paged reference, on CPU copies of its own pages: the reference walks
        # the tokens in Python, and indexes CPU tensors fastest.
        own, own_ring = table[0].long(), ring[0].long()
        ref, _ = reference.paged_decode_attention(
            q[:1].cpu(), cache.k[own].cpu(), cache.v[own].cpu(), seqlens[:1].cpu(),
            block_table=torch.arange(pages, dtype=torch.int32)[None], kv_head_slot=cache.kv_head_slot.cpu(),
            k_ring=cache.k_ring[own_ring].cpu(), v_ring=cache.v_ring[own_ring].cpu(),
            ring_table=torch.arange(len(own_ring), dtype=torch.int32)[None], sink=cache.sink, local=cache.local,
            page_indices=selection.page_indices[:1].cpu(), page_counts=selection.page_counts[:1].cpu(),
            head_bits=selection.head_bits[:1].cpu(), k_scale=cache.k_scale, v_scale=cache.v_scale)
        return call()[:1].cpu(), ref

    def figures(record: dict) -> dict:
        select_s, dense_s = median_seconds(select, device), record["peers"]["dense"]["median_us"] / 1e6
        target = 8.0 if device.type == "cuda" and context == 131072 else None  # DESIGN §6: 8x dense at 128k
        # A PageSelector reuses a selection for 4 steps by default.
        return {"select_pages_us": select_s * 1e6,
                "speedup_with_selection_every_4_steps": dense_s / (record["tkpy_median_us"] / 1e6 + select_s / 4),
                "target_speedup": target, "meets_target": None if target is None else record["ratio"] >= target}

    dense = partial(tkpy.flash_attn_with_kvcache, q, k_pool, v_pool, cache_seqlens=seqlens, block_table=table)
    return Run(call, {"dense": dense}, check, work, figures)


# --------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------


def rope_cases(cuda: bool) -> Iterator[Case]:
    """:func:`tkpy.rope.apply_rope_` and ``apply_rope_3d_`` (in place) against eager PyTorch as model
    code writes it. 1D: Llama-3-8B's heads, GPT-J pairs, 64 of 128 dims rotated, batched decode at
    random positions. 3D: the grids of HunyuanVideo (129 frames at 720p), Wan2.1-1.3B (81 frames at
    480p) and CogVideoX-5B (49 frames)."""
    if cuda:  # name, batch, seqlen, heads_q, heads_k, rotary dims, GPT-J pairs, random positions below
        one_d = [*(("llama-neox", b, 4096, 32, 8, 128, False, 0) for b in (1, 2, 4, 8)),
                 ("gptj-interleaved", 4, 4096, 32, 8, 128, True, 0), ("partial-rot64", 4, 4096, 32, 8, 64, False, 0),
                 ("decode", 64, 1, 32, 8, 128, False, 32768)]
        grids = [("hunyuanvideo", (33, 45, 80), 24, 128), ("wan", (21, 30, 52), 12, 128),
                 ("cogvideox", (13, 30, 45), 48, 64)]
    else:
        one_d = [*(("llama-neox", b, 256, 8, 2, 128, False, 0) for b in (1, 2)),
                 ("gptj-interleaved", 1, 256, 8, 2, 128, True, 0), ("partial-rot64", 1, 256, 8, 2, 64, False, 0),
                 ("decode", 8, 1, 8, 2, 128, False, 4096)]
        grids = [("hunyuanvideo", (5, 6, 10), 4, 128), ("wan", (3, 6, 8), 2, 128), ("cogvideox", (3, 6, 8), 4, 64)]
    for name, batch, seqlen, heads_q, heads_k, rotary, interleaved, positions in one_d:
        shape = (f"B{batch} S{seqlen} Hq{heads_q} Hk{heads_k} D{D}" + (f" R{rotary}" if rotary != D else "")
                 + (" pos" if positions else "") + (" gptj" if interleaved else " neox"))
        yield Case("apply_rope_", f"{name}-B{batch}-S{seqlen}", shape, GBPS, "torch eager",
                   partial(_rope, batch, seqlen, heads_q, heads_k, rotary, interleaved, positions))
    for model, grid, heads, head_dim in grids:
        thw = "x".join(map(str, grid))
        yield Case("apply_rope_3d_", f"{model}-{thw}", f"B1 THW {thw} (S{math.prod(grid)}) H{heads} D{head_dim}", GBPS,
                   "torch eager", partial(_rope_3d, model, grid, heads, head_dim))


def _rope(batch: int, seqlen: int, heads_q: int, heads_k: int, rotary: int, interleaved: bool, positions_below: int,
          device, gen) -> Run:
    q, k = (_randn(gen, device, BF16, (batch, seqlen, heads, D)) for heads in (heads_q, heads_k))
    rows = max(positions_below or 8192, seqlen)
    inv_freq = 10000.0 ** (-torch.arange(0, rotary, 2, dtype=torch.float64) / rotary)
    angles = torch.outer(torch.arange(rows, dtype=torch.float64), inv_freq).to(device)
    cos, sin = angles.cos().float(), angles.sin().float()
    positions = torch.randint(0, rows, (batch, seqlen), generator=gen, device=device) if positions_below else None

    def check() -> tuple[torch.Tensor, torch.Tensor]:  # batch 0; tkpy rotates clones, the inputs stay as they are
        ours = apply_rope_(q.clone(), k.clone(), cos, sin, positions, interleaved)
        first = None if positions is None else positions[:1]
        refs = [reference.rope(x[:1], cos, sin, first, interleaved) for x in (q, k)]
        return torch.cat([x[:1].flatten() for x in ours]), torch.cat([x.flatten() for x in refs])

    eager = {"torch eager": lambda: tuple(_eager_rope(x, cos, sin, positions, interleaved) for x in (q, k))}
    return Run(partial(apply_rope_, q, k, cos, sin, positions, interleaved), eager, check,
               2 * BF16.itemsize * (q.numel() + k.numel()), partial(_copy_share, device=device))


def _eager_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: Optional[torch.Tensor],
                interleaved: bool) -> torch.Tensor:
    """RoPE as eager model code writes it (transformers, vLLM's native path): gather the rows of the
    tables, cast them to x's dtype, rotate in it, out of place."""
    rows = slice(0, x.shape[1]) if positions is None else positions
    c, s = (t[rows].to(x.dtype).unsqueeze(-2) for t in (cos, sin))  # broadcast over the heads
    half = c.shape[-1]
    if interleaved:
        a, b = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
        rotated = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    else:
        a, b = x[..., :half], x[..., half:2 * half]
        rotated = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    return rotated if 2 * half == x.shape[-1] else torch.cat((rotated, x[..., 2 * half:]), dim=-1)


def _rope_3d(model: str, grid: tuple[int, int, int], heads: int, head_dim: int, device, gen) -> Run:
    q, k = (_randn(gen, device, BF16, (1, math.prod(grid), heads, head_dim)) for _ in range(2))
    freqs = riflex.rope_3d_freqs(riflex.axis_split(model, head_dim), grid, device=device)
    # The models build this complex [S, R/2] table once per forward: the peer's input, not its work.
    table = reference.rope_3d_table(grid, *freqs).to(torch.complex64)

    def check() -> tuple[torch.Tensor, torch.Tensor]:
        ours = apply_rope_3d_(q.clone(), k.clone(), grid, *freqs)
        refs = [reference.rope_3d(x, grid, *freqs) for x in (q, k)]
        return torch.cat([x.flatten() for x in ours]), torch.cat([x.flatten() for x in refs])

    eager = {"torch eager": lambda: (_complex_rope(q, table), _complex_rope(k, table))}
    return Run(partial(apply_rope_3d_, q, k, grid, *freqs), eager, check,
               2 * BF16.itemsize * (q.numel() + k.numel()), partial(_copy_share, device=device))


def _complex_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """3D RoPE as HunyuanVideo and Wan write it: interleaved pairs as complex float32 times the table."""
    rotary = 2 * table.shape[-1]
    pairs = torch.view_as_complex(x[..., :rotary].float().reshape(*x.shape[:-1], -1, 2))
    rotated = torch.view_as_real(pairs * table[:, None]).flatten(-2).to(x.dtype)
    return rotated if rotary == x.shape[-1] else torch.cat((rotated, x[..., rotary:]), dim=-1)


# --------------------------------------------------------------------------------------------
# UltraViCo
# --------------------------------------------------------------------------------------------

PLAIN = "tkpy flash_attn_func (no decay)"


class VideoShape(NamedTuple):
    """Self-attention over ``frames`` latent frames of ``tokens_per_frame`` tokens (+ text)."""

    name: str
    frames: int
    heads: int
    config: tkpy.UltraViCoConfig

    @property
    def seqlen(self) -> int:
        return self.frames * self.config.tokens_per_frame + self.config.text_tokens

    def __str__(self) -> str:
        return f"B1 S{self.seqlen} ({self.frames} frames x {self.config.tokens_per_frame}) H{self.heads} D128"


def ultravico_cases(cuda: bool) -> Iterator[Case]:
    """:func:`tkpy.ultravico_attn_func` against tkpy's plain attention on the same inputs. On the GPU,
    Wan2.1 at 4x (84 latent frames of 1560 tokens, 12 heads, D 128, the authors' rules: the
    pipelined kernel) and HunyuanVideo-style rules at 2x (bands and 256 text tokens: the baseline
    kernel) on 4 heads; on the CPU, both rules at a small shape."""
    if cuda:
        shapes = [VideoShape("wan21-4x", 84, 12, tkpy.UltraViCoConfig.wan21()),
                  VideoShape("hunyuan-2x", 66, 4, tkpy.UltraViCoConfig.hunyuan_video())]
    else:
        shapes = [VideoShape("wan-like", 8, 2, tkpy.UltraViCoConfig(tokens_per_frame=48, train_frames=4, alpha=0.9,
                                                                      first_frame_mask=True)),
                  VideoShape("hunyuan-like", 8, 2, tkpy.UltraViCoConfig(tokens_per_frame=48, train_frames=2,
                                                                          alpha=0.9, beta=0.6, band_period=3,
                                                                          band_width=1, band_count=2,
                                                                          text_tokens=32))]
    for shape in shapes:
        yield Case("ultravico_attn_func", shape.name, str(shape), TFLOPS, PLAIN, partial(_ultravico, shape),
                   dims={"frames": shape.frames, "heads": shape.heads, "head_dim": 128, "seqlen": shape.seqlen,
                         **asdict(shape.config)}, attention_kernels=True)


def _ultravico(shape: VideoShape, device, gen) -> Run:
    q, k, v = (_randn(gen, device, BF16, (1, shape.seqlen, shape.heads, 128)) for _ in range(3))
    call = partial(tkpy.ultravico_attn_func, q, k, v, shape.config)
    peers = {PLAIN: partial(tkpy.flash_attn_func, q, k, v)}
    # The first rows (frame 0: the first-frame mask included) of a sequence of seqlen queries.
    rows = (slice(0, 1), slice(0, CHECK_ROWS))
    reference_forward = partial(reference.ultravico_attention, total_queries=shape.seqlen, **asdict(shape.config))

    def figures(record: dict) -> dict:
        plain = record["peers"][PLAIN]
        return {"decay_overhead": record["tkpy_median_us"] / plain["median_us"] - 1 if "median_us" in plain else None,
                "target_decay_overhead": 0.10 if device.type == "cuda" else None}

    return _attention_run(FORWARD, call, peers, (q, k, v), rows, slice(0, 1), reference_forward,
                          4 * shape.heads * shape.seqlen**2 * 128, gen, figures)

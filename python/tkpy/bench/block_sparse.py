"""Sparse prefill cases (block-sparse and LServe streaming) against dense causal tkpy, and on CUDA
against FlexAttention on the same blocks."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, NamedTuple, Optional, Union

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .. import block_sparse as tkpy_block_sparse
from .. import flash_attn_varlen_func
from .._data import duo_attention_pattern
from ..lserve import HeadPattern
from .core import ATTENTION_FLOPS_CONVENTION, CaseResult, PreparedCase, _for_device, _random_copies, check_case
from .timing import Timing

DENSITY_CONVENTION = (
    "rho = active (query block, key block) pairs / causal pairs, 128-token blocks, over all heads; tkpy and "
    "FlexAttention are credited rho * dense causal FLOPs; DESIGN.md section 6 target: time <= (1.1*rho + 0.05) * "
    "dense causal time"
)
_BLOCK = 128
_DUO_MODEL = "Meta-Llama-3.1-8B-Instruct"
# Compiled FlexAttention on the CPU is slow and says nothing about the GPU.
_FLEX_NOT_ON_CPU = "not run on the CPU: FlexAttention is a peer on CUDA only"

# How a case's output is checked, keyed by _SparseInputs.gate.
_GATES = {
    "reference": "vs fp32 attention under the token mask (causal AND the block or streaming mask)",
    "dense": "vs tkpy.flash_attn_varlen_func: at rho = 1 every causal block is on, which equals dense causal",
    "skipped": "NOT GATED: a masked reference does not fit at this S on the GPU; only rho = 1 is checked",
}
# Calls over this many FLOPs take up to ~0.25 s each on an H100 (S >= 64k): fewer runs keep the bench short.
_HEAVY_FLOPS, _HEAVY_RUNS = 1e13, (3, 20)


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
    flex_peer: ClassVar[str] = "torch.compile(flex_attention), BlockMask of the same 128-token blocks"

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
        plan = tkpy_block_sparse.plan(types, blockmask)
        inputs = _SparseInputs(cu, types, info, blockmask, active, plan, note, gate)
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

    def flex_block_mask(self, x: _SparseInputs) -> BlockMask:
        """FlexAttention's mask of tkpy's token mask: causal AND each head's active block AND, on
        streaming heads, the sink + local window. Its 128-token blocks are exactly ``x.active``."""
        streaming, active, sink, local = x.head_mask_type == -1, x.active, self.sink, self.local

        def token_mask(b, h, q_idx, kv_idx):
            window = (kv_idx < sink) | (kv_idx > q_idx - local)
            return (kv_idx <= q_idx) & active[h, q_idx // _BLOCK, kv_idx // _BLOCK] & (window | ~streaming[h])

        # Eager create_block_mask materialises the [Hq, S, S] token mask: 512 GiB at S = 128k.
        build = _compiled(create_block_mask) if active.is_cuda else create_block_mask
        return build(token_mask, None, self.heads_q, self.seqlen, self.seqlen, device=active.device, BLOCK_SIZE=_BLOCK)

    def run_flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
        """FlexAttention, compiled on CUDA (eager elsewhere), on ``[1, H, S, D]`` views; the output ``[S, Hq, D]``."""
        flex = _compiled(flex_attention) if q.is_cuda else flex_attention
        out = flex(*(t[None].transpose(1, 2) for t in (q, k, v)), block_mask=block_mask,
                   enable_gqa=self.heads_q != self.heads_kv)
        return out[0].transpose(0, 1)

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
    """DuoAttention's Llama-3.1-8B heads at 50% sparsity, the layer nearest 50%.

    A missing file raises FileNotFoundError (naming the path and TKPY_SHARED_DATA): any other
    pattern would time a different workload under the same case name.
    """
    path = duo_attention_pattern(_DUO_MODEL)
    pattern = HeadPattern.load(path, case.heads_q, 0.5, case.sink, case.local)
    share = pattern.streaming_mask.mean(axis=1)
    layer = min(range(pattern.num_layers), key=lambda n: abs(share[n] - 0.5))
    streaming = f"{int(pattern.streaming_mask[layer].sum())}/{pattern.num_kv_heads} KV heads streaming"
    return pattern, layer, f"DuoAttention {path.name} at 50% static sparsity, layer {layer} ({streaming})"


@functools.cache
def _compiled(fn: Callable) -> Callable:
    """``fn`` under ``torch.compile``, wrapped once, so that timed calls do not pay for wrapping.

    Dynamo guards a mask's closure by its code, not its identity, so static shapes compile once per
    sequence length (three on CUDA): within the recompile limit (8), past which FlexAttention would
    run eagerly and materialise the [Hq, S, S] scores.
    """
    return torch.compile(fn, dynamic=False)


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
    return _for_device(device, _CUDA_BLOCK_SPARSE_CASES, _CPU_BLOCK_SPARSE_CASES)


@dataclass(frozen=True)
class BlockSparseResult(CaseResult):
    """Sparse prefill and dense causal attention on one :class:`BlockSparseCase`; ``rel_err`` is NaN
    where the ``gate`` is "skipped", and tkpy is credited ``density`` times the dense FLOPs.

    ``flex`` is FlexAttention's timing on the same blocks, or why it did not run; ``flex_rel_err``
    is ``‖tkpy − flex‖ / ‖flex‖`` (NaN when it did not run), recorded but not part of ``passed``.
    """

    density: float = 1.0
    gate: str = "skipped"
    pattern: str = ""
    flex: Union[Timing, str] = _FLEX_NOT_ON_CPU
    flex_rel_err: float = math.nan

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
    def flex_rate(self) -> Optional[float]:
        """FlexAttention's TFLOP/s, credited like tkpy (``density`` times the dense FLOPs); None if it did not run."""
        return self.density * self._rate(self.flex) if isinstance(self.flex, Timing) else None

    @property
    def flex_check_passed(self) -> bool:
        """tkpy within the dtype's tolerance of FlexAttention; False when flex did not run."""
        return self.flex_rel_err <= self.tolerance  # False for NaN

    @property
    def target_ratio(self) -> float:
        return 1.1 * self.density + 0.05

    @property
    def meets_target(self) -> bool:
        return self.time_ratio <= self.target_ratio

    def as_extra_info(self) -> dict[str, Any]:
        """:meth:`CaseResult.as_extra_info` (``ratio``: rho · dense time / tkpy time), rho, the target
        and ``flex``: ``{"peer", "median_us", "tflops", "ratio", "rel_err", "check_passed"}`` (``ratio``:
        flex time / tkpy time) or ``{"peer", "error"}``."""
        case = self.case
        if isinstance(self.flex, Timing):
            flex = {
                "median_us": self.flex.median_s * 1e6, "tflops": self.flex_rate,
                "ratio": self.tkpy_rate / self.flex_rate,
                "rel_err": self.flex_rel_err, "check_passed": self.flex_check_passed,
            }
        else:
            flex = {"error": self.flex}
        return {
            **super().as_extra_info(),
            "ratio": self.tkpy_rate / self.peer_rate,
            "rel_err": None if self.gate == "skipped" else self.rel_err,
            "flops_convention": f"dense: {ATTENTION_FLOPS_CONVENTION}; tkpy and flex: rho times that",
            "density": self.density, "density_convention": DENSITY_CONVENTION,
            "time_vs_dense": self.time_ratio, "target_time_vs_dense": self.target_ratio,
            "meets_target": self.meets_target, "gate": _GATES[self.gate],
            "head_pattern": self.pattern, "runs": len(self.tkpy.samples_s),
            "seqlen": case.seqlen, "heads_q": case.heads_q, "heads_kv": case.heads_kv, "head_dim": case.head_dim,
            "flex": {"peer": case.flex_peer, **flex},
        }


def measure_block_sparse(prepared: PreparedCase, *, warmup: int, reps: int) -> BlockSparseResult:
    """Check tkpy's sparse prefill (``_GATES``), then time it, dense causal attention and, on CUDA, FlexAttention."""
    case = prepared.case
    if case.work() > _HEAVY_FLOPS:
        warmup, reps = min(warmup, _HEAVY_RUNS[0]), min(reps, _HEAVY_RUNS[1])
    inputs = prepared.arg_sets[0][-1]
    rel_err = math.nan if inputs.gate == "skipped" else check_case(prepared)
    blocks = inputs.active.shape[-1]
    density = float(inputs.active.sum()) / (case.heads_q * blocks * (blocks + 1) // 2)
    tkpy_timing = prepared.time(case.run_tkpy, warmup=warmup, reps=reps)
    peer_timing = prepared.time(case.run_peer, warmup=warmup, reps=reps)
    flex, flex_rel_err = (_FLEX_NOT_ON_CPU, math.nan)
    if prepared.device.type == "cuda":
        flex, flex_rel_err = _time_flex(prepared, warmup, reps)
    return BlockSparseResult(
        case, prepared.device.type, case.work(), tkpy_timing, peer_timing, rel_err, density, inputs.gate,
        inputs.pattern, flex, flex_rel_err,
    )


def _time_flex(prepared: PreparedCase, warmup: int, reps: int) -> tuple[Union[Timing, str], float]:
    """FlexAttention's timing and ``‖tkpy − flex‖ / ‖flex‖`` on the first input copy; or why it could not
    run, and NaN."""
    case = prepared.case
    q, k, v, inputs = prepared.arg_sets[0]
    try:
        block_mask = case.flex_block_mask(inputs)  # once per case, untimed, as a server builds it per layer

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: _SparseInputs) -> torch.Tensor:
            return case.run_flex(q, k, v, block_mask)

        rel_err = _rel_err(case.run_tkpy(q, k, v, inputs), run(q, k, v, inputs))  # the first flex call compiles
        return prepared.time(run, warmup=warmup, reps=reps), rel_err
    # Compilation fails with Dynamo's, Inductor's or Triton's own exception types, and a large S may
    # run out of memory: the case keeps its other results and records why flex has none.
    except Exception as exc:
        first_line = str(exc).strip().partition("\n")[0]
        return f"{type(exc).__name__}: {first_line}", math.nan


def _rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """``‖ours − theirs‖ / ‖theirs‖`` in fp32."""
    ours, theirs = ours.float(), theirs.float()
    return float(torch.linalg.vector_norm(ours - theirs) / torch.linalg.vector_norm(theirs))

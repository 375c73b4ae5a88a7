"""What every op family shares: conventions, input copies, the check and the result type."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Sequence, TypeVar, Union

import torch

from .timing import Timing, buffer_copies, time_cuda_or_cpu

if TYPE_CHECKING:
    from .cases import BenchCase

PEER = "torch eager"
BYTES_CONVENTION = (
    "q and k each read once and written once: 2*(bytes(q)+bytes(k)); cos/sin tables and positions not counted"
)
FLOPS_CONVENTION = "2*M*N*K per call: a multiply and an add per multiply-accumulate"
ATTENTION_FLOPS_CONVENTION = "4*B*Hq*Sq*Sk*D per call (q k^T and P v), halved for causal"

# Largest accepted ‖tkpy − peer‖ / ‖peer‖: the peers round in the storage dtype (DESIGN §7).
_TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-5}


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

_Case = TypeVar("_Case")


def _for_device(device: Union[str, torch.device], cuda: Sequence[_Case], cpu: Sequence[_Case]) -> list[_Case]:
    """``cuda`` on a CUDA device, else ``cpu``, as a new list."""
    return list(cuda if torch.device(device).type == "cuda" else cpu)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _random_copies(
    shapes: Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device, generator: torch.Generator, count: int
) -> list[tuple[torch.Tensor, ...]]:
    """``count`` tuples of random normal tensors of ``shapes``, each tensor in its own buffer."""
    return [
        tuple(torch.randn(shape, generator=generator, device=device, dtype=dtype) for shape in shapes)
        for _ in range(count)
    ]


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

    def time(self, fn: Callable[..., Any], *, warmup: int, reps: int) -> Timing:
        """:func:`time_cuda_or_cpu` of ``fn`` over ``arg_sets`` on ``device``."""
        return time_cuda_or_cpu(fn, self.arg_sets, self.device, warmup=warmup, reps=reps)


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

    def _rate(self, timing: Optional[Timing]) -> Optional[float]:
        """``work`` per call at ``timing``'s median, in the case's metric; None without a timing."""
        return None if timing is None else self.work / timing.median_s / _METRICS[self.case.metric].per_unit

    @property
    def tkpy_rate(self) -> float:
        """tkpy's throughput in the case's metric (GB/s or TFLOP/s)."""
        return self._rate(self.tkpy)

    @property
    def peer_rate(self) -> Optional[float]:
        """The peer's throughput in the case's metric."""
        return self._rate(self.peer)

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
            "dtype": _dtype_name(self.case.dtype),
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

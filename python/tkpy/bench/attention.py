"""Dense attention cases (:func:`tkpy.flash_attn_func`) against each torch SDPA backend."""

from __future__ import annotations

import re
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence, Union

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import flash_attn_func
from .core import ATTENTION_FLOPS_CONVENTION, CaseResult, PreparedCase, _for_device, _random_copies, check_case
from .timing import Timing

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
    return _for_device(device, _CUDA_ATTENTION_CASES, _CPU_ATTENTION_CASES)


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
        return self._rate(timing) if isinstance(timing, Timing) else None

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
    case = prepared.case
    rel_err = check_case(prepared)
    tkpy_timing = prepared.time(case.run_tkpy, warmup=warmup, reps=reps)
    backends = {name: _time_sdpa_backend(prepared, name, warmup, reps) for name in case.backends}
    timed = [t for t in backends.values() if isinstance(t, Timing)]
    best = min(timed, key=lambda t: t.median_s, default=None)
    return AttentionResult(case, prepared.device.type, case.work(), tkpy_timing, best, rel_err, backends)


# SDPA explains a refusal in warnings: a header per backend, then the reasons; the backends
# switched off by ``sdpa_kernel`` say only that.
_SDPA_NOISE = re.compile(r"not used because:$|has been runtime disabled")
_TORCH_WARNING_ORIGIN = re.compile(r"\s*\(Triggered internally at .*\)\s*$", re.DOTALL)


def _time_sdpa_backend(prepared: PreparedCase, backend: str, warmup: int, reps: int) -> Union[Timing, str]:
    """Time ``run_peer`` with only SDPA's ``backend`` enabled, or say why that backend cannot run the case."""
    selected = _SDPA_BACKENDS[backend]
    only_backend = nullcontext() if selected is None else sdpa_kernel(selected)
    with only_backend, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return prepared.time(prepared.case.run_peer, warmup=warmup, reps=reps)
        except RuntimeError as exc:
            reasons = [_TORCH_WARNING_ORIGIN.sub("", str(w.message)).strip() for w in caught]
            reasons = [r for r in dict.fromkeys(reasons) if r and not _SDPA_NOISE.search(r)]
            return "; ".join(reasons) or str(exc).splitlines()[0]

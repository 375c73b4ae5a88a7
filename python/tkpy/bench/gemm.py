"""GEMM cases (:func:`tkpy.gemm`) against ``torch.matmul``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Union

import torch

from .. import gemm as tkpy_gemm
from .core import _for_device, _random_copies


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
        return tkpy_gemm(a, b, self.trans_b)

    def run_peer(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b.T if self.trans_b else b)

    def outputs(self, a: torch.Tensor, b: torch.Tensor) -> tuple[tuple, tuple]:
        """tkpy's and the peer's product, each as a 1-tuple."""
        return (self.run_tkpy(a, b),), (self.run_peer(a, b),)


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
    return _for_device(device, _CUDA_GEMM_CASES, _CPU_GEMM_CASES)

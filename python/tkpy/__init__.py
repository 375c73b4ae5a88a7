"""tkpy: H100 tile kernels (dense and LServe sparse attention, RIFLEx RoPE) as drop-in torch ops."""

from . import _ops, riflex, rope
from ._ops import cuda_compiled
from .matmul import gemm

__version__ = "0.1.0"

__all__ = ["gemm", "riflex", "rope", "cuda_compiled", "__version__"]

"""tkpy: H100 tile kernels (dense and LServe sparse attention, RIFLEx RoPE) as drop-in torch ops."""

from . import _ops, riflex, rope
from ._ops import cuda_compiled
from .attention import flash_attn_func, flash_attn_varlen_func
from .matmul import gemm

__version__ = "0.1.0"

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "gemm", "riflex", "rope", "cuda_compiled", "__version__"]

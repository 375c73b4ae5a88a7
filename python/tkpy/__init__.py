"""tkpy: H100 tile kernels (dense and LServe sparse attention, RIFLEx RoPE, UltraViCo) as drop-in torch ops."""

from . import _autograd, _ops, lserve, riflex, rope, ultravico  # noqa: F401  (_autograd registers the backwards)
from ._ops import attention_kernel, cuda_compiled, use_attention_kernel
from .attention import flash_attn_func, flash_attn_varlen_func
from .block_sparse import block_sparse_attn_func, block_streaming_attn_func, token_streaming_attn_func
from .errors import ArgumentError
from .info import include_dir, library_dir
from .kvcache import flash_attn_with_kvcache
from .matmul import gemm
from .ultravico import UltraViCoConfig, ultravico_attn_func, ultravico_attn_varlen_func

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "attention_kernel",
    "block_sparse_attn_func",
    "block_streaming_attn_func",
    "cuda_compiled",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "gemm",
    "lserve",
    "riflex",
    "rope",
    "token_streaming_attn_func",
    "ultravico",
    "ultravico_attn_func",
    "ultravico_attn_varlen_func",
    "UltraViCoConfig",
    "use_attention_kernel",
    "__version__",
]

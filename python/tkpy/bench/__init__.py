"""Times tkpy's ops against their peers: the engine behind ``python -m tkpy bench``.

The pieces are public so that the pytest-benchmark suites in ``benchmarks/`` measure the same
cases the same way: :func:`rope_cases`, :func:`gemm_cases`, :func:`attention_cases` and
:func:`block_sparse_cases` list the shapes, :func:`prepare_case` allocates their inputs and
:func:`measure` checks tkpy against the peer and times both. :func:`decode_cases` and
:func:`sparse_decode_cases` list decode over a paged KV cache (dense, and LServe's sparse decode
with its page selector).

Modules: ``timing`` (timers, input rotation), ``core`` (conventions, check, results), one per op
family (``rope``, ``gemm``, ``attention``, ``block_sparse``, ``decode``: cases and peers), ``cases`` (all
families together), ``env``, ``report`` and ``cli``.

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

from .attention import AttentionCase, AttentionResult, attention_cases, measure_attention
from .block_sparse import DENSITY_CONVENTION, BlockSparseCase, BlockSparseResult, block_sparse_cases, measure_block_sparse
from .cases import BenchCase, measure
from .cli import main
from .core import (
    ATTENTION_FLOPS_CONVENTION,
    BYTES_CONVENTION,
    FLOPS_CONVENTION,
    PEER,
    CaseResult,
    PreparedCase,
    check_case,
    prepare_case,
)
from .decode import (
    DECODE_BYTES_CONVENTION,
    SPARSE_CONVENTION,
    DecodeCase,
    DecodeResult,
    SparseDecodeCase,
    SparseDecodeResult,
    copy_bandwidth_gbps,
    decode_cases,
    format_decode_tables,
    measure_decode,
    measure_sparse_decode,
    sparse_decode_cases,
)
from .env import environment_info, nvml_gpu_info
from .gemm import GemmCase, gemm_cases
from .report import format_report
from .rope import (
    Rope3dCase,
    RopeCase,
    rope_3d_freqs_cis,
    rope_bytes,
    rope_cases,
    rope_cos_sin,
    torch_rope_3d_reference,
    torch_rope_reference,
)
from .timing import (
    Timing,
    buffer_copies,
    gbps,
    measure_copy_bandwidth,
    rotating_setup,
    synchronized,
    time_cuda_or_cpu,
)

__all__ = [
    "ATTENTION_FLOPS_CONVENTION",
    "AttentionCase",
    "AttentionResult",
    "BYTES_CONVENTION",
    "BenchCase",
    "BlockSparseCase",
    "BlockSparseResult",
    "DECODE_BYTES_CONVENTION",
    "DENSITY_CONVENTION",
    "DecodeCase",
    "DecodeResult",
    "PEER",
    "CaseResult",
    "FLOPS_CONVENTION",
    "GemmCase",
    "PreparedCase",
    "Rope3dCase",
    "RopeCase",
    "SPARSE_CONVENTION",
    "SparseDecodeCase",
    "SparseDecodeResult",
    "Timing",
    "attention_cases",
    "block_sparse_cases",
    "buffer_copies",
    "check_case",
    "copy_bandwidth_gbps",
    "decode_cases",
    "environment_info",
    "format_decode_tables",
    "format_report",
    "gbps",
    "gemm_cases",
    "main",
    "measure",
    "measure_attention",
    "measure_block_sparse",
    "measure_copy_bandwidth",
    "measure_decode",
    "measure_sparse_decode",
    "nvml_gpu_info",
    "prepare_case",
    "rope_3d_freqs_cis",
    "rope_bytes",
    "rope_cases",
    "rope_cos_sin",
    "rotating_setup",
    "sparse_decode_cases",
    "synchronized",
    "time_cuda_or_cpu",
    "torch_rope_3d_reference",
    "torch_rope_reference",
]

"""Every op family together: the case union, the op names and :func:`measure`'s dispatch."""

from __future__ import annotations

from typing import Union

import torch

from .attention import AttentionCase, attention_cases, measure_attention
from .block_sparse import BlockSparseCase, block_sparse_cases, measure_block_sparse
from .core import CaseResult, PreparedCase, check_case
from .decode import (
    DecodeCase, SparseDecodeCase, decode_cases, measure_decode, measure_sparse_decode, sparse_decode_cases,
)
from .gemm import GemmCase, gemm_cases
from .rope import Rope3dCase, RopeCase, rope_cases

BenchCase = Union[RopeCase, Rope3dCase, GemmCase, AttentionCase, BlockSparseCase, DecodeCase, SparseDecodeCase]

_SPARSE_OPS = ("block_sparse_attn_func", "token_streaming_attn_func")  # BlockSparseCase.op
_OPS = (RopeCase.op, Rope3dCase.op, GemmCase.op, AttentionCase.op, *_SPARSE_OPS, DecodeCase.op, SparseDecodeCase.op)


def _all_cases(device: Union[str, torch.device]) -> tuple[BenchCase, ...]:
    """Every op family's cases for ``device``, in report order; decode cases only where they fit in memory."""
    decode = (case for case in (*decode_cases(device), *sparse_decode_cases(device)) if case.fits(device))
    return (*rope_cases(device), *gemm_cases(device), *attention_cases(device), *block_sparse_cases(device), *decode)


def measure(prepared: PreparedCase, *, warmup: int, reps: int) -> CaseResult:
    """Check tkpy against the peer on ``prepared``, then time both with :func:`time_cuda_or_cpu`."""
    case = prepared.case
    if isinstance(case, AttentionCase):
        return measure_attention(prepared, warmup=warmup, reps=reps)
    if isinstance(case, BlockSparseCase):
        return measure_block_sparse(prepared, warmup=warmup, reps=reps)
    if isinstance(case, DecodeCase):
        return measure_decode(prepared, warmup=warmup, reps=reps)
    if isinstance(case, SparseDecodeCase):
        return measure_sparse_decode(prepared, warmup=warmup, reps=reps)
    rel_err = check_case(prepared)
    tkpy_timing = prepared.time(case.run_tkpy, warmup=warmup, reps=reps)
    peer_timing = prepared.time(case.run_peer, warmup=warmup, reps=reps)
    return CaseResult(case, prepared.device.type, case.work(), tkpy_timing, peer_timing, rel_err)

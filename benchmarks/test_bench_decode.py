"""Decode over a paged KV cache (page 64, one query token per sequence, Hq=32, Hkv=8, D=128, bf16).

- Dense :func:`tkpy.flash_attn_with_kvcache` with a block table and ``num_splits=0``: GB/s from
  ``bench.DECODE_BYTES_CONVENTION`` (K and V of the context, q, out) over the device's copy
  bandwidth, measured once per session; ``extra_info`` records ``pct_of_copy`` against DESIGN §6's
  85% on the GPU (not gated on the CPU) and the automatic split count.
- :func:`tkpy.lserve.sparse_decode` on a prebuilt selection (budget 4096, every other KV head
  streaming with sink 128 and local 256) against dense paged decode of the same keys and values:
  ``ratio`` is the speedup, recorded against DESIGN §6's 8x at 128k; ``extra_info`` adds the
  selector's cost (:func:`select_pages` alone, a ``PageSelector`` per step at reuse interval 4 and 1).

Cases whose inputs do not fit in the GPU's memory are skipped. Each output is checked on sequences
0 and B-1 against fp32 attention over the tokens each query head may see.
"""

import pytest

from suite import case_params, run_case
from tkpy import bench

DENSE, DENSE_PARAMS = case_params(bench.decode_cases)
SPARSE, SPARSE_PARAMS = case_params(bench.sparse_decode_cases)


def _run(benchmark, case, device: str) -> None:
    if not case.fits(device):
        pytest.skip(f"one copy of the inputs ({case.copy_bytes() / 2**30:.1f} GiB) does not fit on {device}")
    run_case(benchmark, case, device, group=f"{device} {case.op} B{case.batch}")


@pytest.mark.parametrize(("device", "case_name"), DENSE_PARAMS)
def test_decode(benchmark, device: str, case_name: str) -> None:
    _run(benchmark, DENSE[device, case_name], device)


@pytest.mark.parametrize(("device", "case_name"), SPARSE_PARAMS)
def test_sparse_decode(benchmark, device: str, case_name: str) -> None:
    _run(benchmark, SPARSE[device, case_name], device)

"""tkpy's LServe sparse prefill (:func:`tkpy.block_sparse_attn_func` with random block masks of density
rho, :func:`tkpy.token_streaming_attn_func` with 50% streaming heads) against dense causal
:func:`tkpy.flash_attn_varlen_func` on the same inputs. rho is active (query block, key block) pairs
over causal pairs; tkpy is credited rho times dense causal FLOPs (``4·B·Hq·S²·D / 2``), and
``extra_info`` records ``time_vs_dense`` against DESIGN §6's target ``1.1·rho + 0.05``. On the GPU only
rho = 1 is checked (against dense); the others record ``gate`` as not gated."""

import pytest

from suite import case_params, run_case
from tkpy import bench

CASES, PARAMS = case_params(bench.block_sparse_cases)


@pytest.mark.parametrize(("device", "case_name"), PARAMS)
def test_block_sparse(benchmark, device: str, case_name: str) -> None:
    case = CASES[device, case_name]
    run_case(benchmark, case, device, group=f"{device} {case.op} S{case.seqlen}")

"""tkpy's GEMM (:func:`tkpy.gemm`) against ``torch.matmul`` (cuBLAS on the GPU), in TFLOP/s
(``2·M·N·K`` FLOPs per call)."""

import pytest

from suite import case_params, run_case
from tkpy import bench

CASES, PARAMS = case_params(bench.gemm_cases)


@pytest.mark.parametrize(("device", "case_name"), PARAMS)
def test_gemm(benchmark, device: str, case_name: str) -> None:
    case = CASES[device, case_name]
    run_case(benchmark, case, device, group=f"{device} {case.op}")

"""tkpy's RoPE ops (:func:`tkpy.rope.apply_rope_`, :func:`tkpy.rope.apply_rope_3d_`) against torch
eager, in GB/s (q and k each read and written once)."""

import pytest

from suite import case_params, run_case
from tkpy import bench

CASES, PARAMS = case_params(bench.rope_cases)


@pytest.mark.parametrize(("device", "case_name"), PARAMS)
def test_rope(benchmark, device: str, case_name: str) -> None:
    case = CASES[device, case_name]
    run_case(benchmark, case, device, group=f"{device} {case.op}")

"""tkpy's dense attention (:func:`tkpy.flash_attn_func`) against torch SDPA's flash, cuDNN and
memory-efficient backends, each timed on its own (SDPA's default choice on the CPU), in TFLOP/s
(``4·B·Hq·Sq·Sk·D`` FLOPs per call, halved for causal). A backend that cannot run a shape is
recorded as ``{"error": reason}``; ``ratio`` is tkpy over the fastest backend.
``scripts/plot_attention_bench.py`` plots the ``--benchmark-json`` output."""

import pytest

from suite import case_params, run_case
from tkpy import bench

CASES, PARAMS = case_params(bench.attention_cases)


@pytest.mark.parametrize(("device", "case_name"), PARAMS)
def test_attention(benchmark, device: str, case_name: str) -> None:
    case = CASES[device, case_name]
    run_case(benchmark, case, device, group=f"{device} {case.op} D{case.head_dim} {'causal' if case.causal else 'full'}")

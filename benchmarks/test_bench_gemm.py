"""tkpy's GEMM (:func:`tkpy.gemm`) against ``torch.matmul`` (cuBLAS on the GPU).

For each case, :func:`tkpy.bench.measure` first checks tkpy against the peer, then times both
(CUDA events on the GPU); ``extra_info`` gets their medians, TFLOP/s (``2·M·N·K`` FLOPs per call)
and ratio. pytest-benchmark's own statistics time the tkpy op alone with the host clock, each call
followed by a synchronize. Both timings rotate through several copies of random inputs.
"""

from __future__ import annotations

import pytest
import torch

import tkpy
from tkpy import bench

# (warm-up, timed) runs per device, for the extra_info timings and for pytest-benchmark's rounds.
_RUNS = {"cpu": (2, 10), "cuda": (10, 50)}


def _case_table() -> dict[tuple[str, str], bench.GemmCase]:
    return {(device, f"{case.op}-{case.id}"): case for device in ("cpu", "cuda") for case in bench.gemm_cases(device)}


_CASES = _case_table()


def _params() -> list:
    """One param per (device, case name); the CUDA ones are marked ``gpu`` and skip without CUDA.

    Params are plain strings so that pytest-benchmark's JSON records them readably.
    """
    cuda_ready = torch.cuda.is_available() and tkpy.cuda_compiled()
    cuda_marks = [
        pytest.mark.gpu,
        pytest.mark.skipif(not cuda_ready, reason="needs a CUDA device and a tkpy build with CUDA kernels"),
    ]
    return [
        pytest.param(device, name, id=f"{device}-{name}", marks=cuda_marks if device == "cuda" else [])
        for device, name in _CASES
    ]


@pytest.mark.parametrize(("device", "case_name"), _params())
def test_gemm(benchmark, device: str, case_name: str) -> None:
    case = _CASES[device, case_name]
    warmup, reps = _RUNS[device]
    prepared = bench.prepare_case(case, device)
    result = bench.measure(prepared, warmup=warmup, reps=reps)
    benchmark.group = f"{device} {case.op}"
    benchmark.extra_info.update(result.as_extra_info())
    # A wrong answer has no speed worth recording.
    assert result.passed, (
        f"tkpy {case.op} differs from {case.peer} on {case.id}: "
        f"relative error {result.rel_err:.2e} > {result.tolerance:.0e}"
    )
    benchmark.pedantic(
        bench.synchronized(case.run_tkpy, device),
        setup=bench.rotating_setup(prepared.arg_sets),
        rounds=reps,
        warmup_rounds=warmup,
    )

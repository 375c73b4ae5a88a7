"""tkpy's dense attention (:func:`tkpy.flash_attn_func`) against torch SDPA's backends.

For each case, :func:`tkpy.bench.measure` first checks tkpy against SDPA, then times tkpy and each
SDPA backend on its own (flash, cuDNN and memory-efficient on the GPU; SDPA's default choice on
the CPU), with CUDA events on the GPU. ``extra_info`` gets their medians and TFLOP/s
(``4·B·Hq·Sq·Sk·D`` FLOPs per call, halved for causal), a backend that cannot run the shape as
``{"error": reason}``, and tkpy's ratio to the fastest backend. pytest-benchmark's own statistics
time the tkpy op alone with the host clock, each call followed by a synchronize. All timings
rotate through several copies of random inputs. ``scripts/plot_attention_bench.py`` plots the
JSON that ``--benchmark-json`` writes.
"""

from __future__ import annotations

import pytest
import torch

import tkpy
from tkpy import bench

# (warm-up, timed) runs per device, for the extra_info timings and for pytest-benchmark's rounds.
_RUNS = {"cpu": (2, 10), "cuda": (10, 50)}


def _case_table() -> dict[tuple[str, str], bench.AttentionCase]:
    return {
        (device, f"{case.op}-{case.id}"): case for device in ("cpu", "cuda") for case in bench.attention_cases(device)
    }


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
def test_attention(benchmark, device: str, case_name: str) -> None:
    case = _CASES[device, case_name]
    warmup, reps = _RUNS[device]
    prepared = bench.prepare_case(case, device)
    result = bench.measure(prepared, warmup=warmup, reps=reps)
    benchmark.group = f"{device} {case.op} D{case.head_dim} {'causal' if case.causal else 'full'}"
    benchmark.extra_info.update(result.as_extra_info())
    # A wrong answer has no speed worth recording.
    assert result.passed, (
        f"tkpy {case.op} differs from torch SDPA on {case.id}: "
        f"relative error {result.rel_err:.2e} > {result.tolerance:.0e}"
    )
    benchmark.pedantic(
        bench.synchronized(case.run_tkpy, device),
        setup=bench.rotating_setup(prepared.arg_sets),
        rounds=reps,
        warmup_rounds=warmup,
    )

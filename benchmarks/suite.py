"""What every benchmark file shares: its cases as pytest params, and how one case is run.

For each case, :func:`tkpy.bench.measure` first checks tkpy against its peer, then times both
(CUDA events on the GPU) into ``benchmark.extra_info``; pytest-benchmark's own statistics time the
tkpy op alone with the host clock, each call followed by a synchronize. All timings rotate through
several copies of random inputs.
"""

from __future__ import annotations

from typing import Callable, Sequence

import pytest
import torch

import tkpy
from tkpy import bench

# (warm-up, timed) runs per device, for the extra_info timings and for pytest-benchmark's rounds.
RUNS = {"cpu": (2, 10), "cuda": (10, 50)}


def case_params(cases: Callable[[str], Sequence]) -> tuple[dict, list]:
    """``(table, params)``: ``table[device, name]`` is a case; one param per entry, the CUDA ones
    marked ``gpu`` and skipped without CUDA. Params are plain strings, so that pytest-benchmark's
    JSON records them readably."""
    table = {(device, f"{case.op}-{case.id}"): case for device in ("cpu", "cuda") for case in cases(device)}
    cuda_ready = torch.cuda.is_available() and tkpy.cuda_compiled()
    cuda_marks = [
        pytest.mark.gpu,
        pytest.mark.skipif(not cuda_ready, reason="needs a CUDA device and a tkpy build with CUDA kernels"),
    ]
    params = [
        pytest.param(device, name, id=f"{device}-{name}", marks=cuda_marks if device == "cuda" else [])
        for device, name in table
    ]
    return table, params


def run_case(benchmark, case, device: str, group: str) -> None:
    warmup, reps = RUNS[device]
    prepared = bench.prepare_case(case, device)
    result = bench.measure(prepared, warmup=warmup, reps=reps)
    benchmark.group = group
    benchmark.extra_info.update(result.as_extra_info())
    # A wrong answer has no speed worth recording.
    assert result.passed, (
        f"tkpy {case.op} differs from its peer on {case.id}: relative error {result.rel_err:.2e} > {result.tolerance:.0e}"
    )
    benchmark.pedantic(
        bench.synchronized(case.run_tkpy, device),
        setup=bench.rotating_setup(prepared.arg_sets),
        rounds=reps,
        warmup_rounds=warmup,
    )

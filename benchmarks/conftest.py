"""The pytest-benchmark suite of tkpy's ops: ``pytest benchmarks --head-pattern PATH``.

``pytest tests`` never collects it (``testpaths``). Its cases are cases.py's, which
``python -m tkpy bench`` runs too; CUDA cases carry ``@pytest.mark.gpu`` and skip without a GPU.
``--head-pattern PATH`` is DuoAttention's Llama-3.1-8B-Instruct head pattern: the LServe cases fail
without it, since no other pattern stands in for it. ``--benchmark-json`` output holds each case's
record in ``extra_info`` (``cases.measure``) and the environment in ``machine_info["tkpy"]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest
import torch

import cases
import tkpy

GPU_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not (torch.cuda.is_available() and tkpy.cuda_compiled()),
                                                 reason="needs a CUDA device and a tkpy build with CUDA kernels")]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--head-pattern", type=Path, help=cases.HEAD_PATTERN_HELP)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_report_header(config: pytest.Config) -> str:
    if _device().type == "cpu":
        return "tkpy benchmarks: NO GPU present; only the CPU-path cases run, and they say nothing about GPU speed"
    return f"tkpy benchmarks: {torch.cuda.get_device_name()}"


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["tkpy"] = cases.environment(_device())


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``(device, case)``: every case of cases.py, the CPU's then the GPU's, each in the cases' order."""
    if "case" not in metafunc.fixturenames:
        return
    pattern = metafunc.config.getoption("head_pattern")
    metafunc.parametrize(("device", "case"), [
        pytest.param(torch.device(device), case, id=f"{device}-{case.op}-{case.id}",
                     marks=GPU_MARKS if device == "cuda" else [])
        for device in ("cpu", "cuda") for case in cases.all_cases(device, pattern)
    ])


@pytest.fixture(scope="session")
def head_pattern(request: pytest.FixtureRequest) -> Optional[Path]:
    """``--head-pattern``, unchecked: a case that needs it calls ``cases.require_head_pattern``."""
    return request.config.getoption("head_pattern")

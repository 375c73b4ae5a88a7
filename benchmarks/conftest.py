"""pytest-benchmark suites of tkpy's ops: ``pytest benchmarks/``.

``pytest tests/`` never collects these (``testpaths = ["tests"]`` in pyproject.toml), so the
main test run stays fast. CPU cases run everywhere; CUDA cases carry ``@pytest.mark.gpu`` and are
skipped without a GPU.

Every benchmark fills ``benchmark.extra_info`` in the layout that ``scripts/summarize_gpu_run.py``
reads (:meth:`tkpy.bench.CaseResult.as_extra_info` writes it for RoPE):

- ``op``, ``case``, ``shape``, ``dtype``, ``device``;
- ``peer``: what tkpy is compared with (e.g. ``"torch eager"``);
- ``metric``: ``"GB/s"`` or ``"TFLOP/s"``, with ``tkpy_gbps``/``peer_gbps`` or
  ``tkpy_tflops``/``peer_tflops`` to match;
- ``ratio``: tkpy's throughput over the peer's;
- ``tkpy_median_us``, ``peer_median_us``: CUDA-event medians on the GPU (perf_counter on the CPU),
  which the throughputs come from.
"""

from __future__ import annotations

import torch

from tkpy import bench


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def pytest_report_header(config) -> str:
    if _device() == "cpu":
        return "tkpy benchmarks: NO GPU present; only the CPU-path cases run, and they say nothing about GPU speed"
    return f"tkpy benchmarks: {torch.cuda.get_device_name()}"


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    """Put versions, the GPU and its clocks in the header of ``--benchmark-json`` output."""
    machine_info["tkpy"] = bench.environment_info(_device())

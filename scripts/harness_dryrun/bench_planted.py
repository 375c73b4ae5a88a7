"""Planted benchmarks for the bench dry run (named so that only an explicit path collects it): a
case that hangs between two that record results; the step must resume after the hang and keep both."""

import time

import pytest


def _record(benchmark, case: str) -> None:
    benchmark.extra_info.update({"op": "planted", "case": case, "shape": "-", "dtype": "-", "device": "cpu",
                                 "peer": "none", "metric": "GB/s", "tkpy_gbps": 1.0, "peer_gbps": 1.0, "ratio": 1.0})
    benchmark.pedantic(lambda: None, rounds=3)


def test_planted_bench_before(benchmark):
    _record(benchmark, "before")


def test_planted_bench_hang(benchmark):
    time.sleep(3600)


def test_planted_bench_after(benchmark):
    _record(benchmark, "after")

"""A segfault, a wrong result and a broken context, beside tests that must still pass."""

import ctypes

import pytest
import torch

import helpers
import pytest_gpu_harness


def test_planted_segfault():
    ctypes.string_at(0)


def test_planted_mismatch():
    ref = torch.randn(2, 300, 4, 64)
    out = ref.clone()
    out[:, 64:128] += 1.0
    out[:, 192:256] += 1.0
    assert helpers.rel_err(out, ref) < 1e-2


def test_planted_broken_context():
    pytest_gpu_harness.context_probes.append(lambda: "planted: this process's context is unusable")
    assert False, "planted failure after which the worker must restart"


@pytest.mark.parametrize("i", range(4))
def test_after_the_crash(i):
    assert i < 4

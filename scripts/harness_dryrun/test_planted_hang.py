"""A test that never returns, beside tests that must still pass."""

import time

import pytest


def test_planted_hang():
    time.sleep(3600)


@pytest.mark.parametrize("i", range(3))
def test_after_the_hang(i):
    assert i < 3

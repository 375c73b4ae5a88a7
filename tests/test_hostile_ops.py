"""Hostile input to every op and public function (tests/hostile_cases.py): each broken call is
refused with an exception that names the broken argument, leaves every input as it was, and
neither crashes nor hangs. The calls run in guarded worker processes: a segfault or a hang fails
its case (and the pool is rebuilt) instead of taking the test session down. The fakes (Meta
kernels) refuse the same shapes, dtypes and scalars as the real ops."""

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pytest

import hostile_cases

# Seconds one call may take in the worker before it counts as a hang; the slowest is well under 10.
CASE_TIMEOUT = 120


class GuardedWorkers:
    """A pool of spawned workers (spawn: no OpenMP state inherited through fork) that survives a
    worker's death: the failure is reported and the next call gets a fresh pool."""

    def __init__(self):
        self._pool = None

    def run(self, fn, *args):
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))
        future = self._pool.submit(fn, *args)
        try:
            return future.result(timeout=CASE_TIMEOUT)
        except BrokenProcessPool:
            self.close()
            pytest.fail(f"{fn.__name__}{args}: the worker process died (a crash in native code)")
        except TimeoutError:
            self.close()
            pytest.fail(f"{fn.__name__}{args}: no answer within {CASE_TIMEOUT} s (a hang)")

    def close(self):
        if self._pool is not None:
            for process in list(getattr(self._pool, "_processes", {}).values()):
                process.kill()  # a hung worker would keep shutdown waiting
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


@pytest.fixture(scope="module")
def workers():
    pool = GuardedWorkers()
    yield pool
    pool.close()


def _check_refusal(name, result):
    expected = hostile_cases.CASES[name][2]
    assert result["refused"], f"{name}: not refused ({result['type']}): {result['message']}"
    assert expected in result["message"], f"{name}: the refusal does not name {expected!r}: {result['message']}"
    assert not result["changed"], f"{name}: refused after changing {result['changed']}"


@pytest.mark.parametrize("name", hostile_cases.CASES)
def test_broken_call_is_refused_naming_the_argument_and_changes_nothing(workers, name, rng):
    seed = int(rng.initial_seed())
    _check_refusal(name, workers.run(hostile_cases.run_case, name, False, seed))


META_CASES = [name for name, (build, _, expected) in hostile_cases.CASES.items()
              if build().meta and not any(m in expected or m in name for m in hostile_cases.VALUE_OR_ALIAS)]


@pytest.mark.parametrize("name", META_CASES)
def test_fake_refuses_what_the_op_refuses(workers, name, rng):
    """torch.compile traces through the Meta kernels: they must refuse what the real op refuses."""
    _check_refusal(name, workers.run(hostile_cases.run_case, name, True, int(rng.initial_seed())))


@pytest.mark.parametrize("builder", hostile_cases.BUILDERS)
def test_the_unbroken_calls_run(workers, builder):
    """Each case breaks a call that works: a refusal is about the broken argument alone."""
    failure = workers.run(hostile_cases.run_valid, builder)
    assert not failure, failure


@pytest.mark.parametrize("prop", hostile_cases.PROPERTIES)
def test_property(workers, prop):
    failure = workers.run(hostile_cases.run_property, prop)
    assert not failure, failure


def test_the_guard_reports_a_crash():
    """A worker that dies is reported as a failure naming the call, and the next call works."""
    pool = GuardedWorkers()
    try:
        with pytest.raises(pytest.fail.Exception, match="died"):
            pool.run(hostile_cases.crash_for_test)
        assert pool.run(hostile_cases.run_valid, "gemm") == ""
    finally:
        pool.close()

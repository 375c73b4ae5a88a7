"""pytest plugin of the GPU run harness (``scripts/gpu_run.py``): a hang or a crash costs one test,
not the run, and every failure leaves a file that says where it went wrong.

Active only when ``scripts/gpu_run.py`` loads it (``-p pytest_gpu_harness``) with
``TKPY_HARNESS_DIR`` set; ``pytest tests`` in CI never sees it. It works with pytest-xdist
(``-n N``), where the controller and the workers play different parts, and without it (the
sanitizer steps), where one process plays both.

Controller:

- ``journal.jsonl``: one fsync'd line per test start and end, per crash or hang, per worker restart
  and per file given up on; a run killed at any point still says what ran.
- ``failures/<test>.txt``: one file per failing test with its traceback, its seed (tests print
  ``seed=...``), its captured output (where a kernel's watchdog message lands) and the worker's
  diagnosis of the mismatch.
- After two crashes or hangs in one test file, the file goes into ``skip_files.txt`` and the
  workers skip its remaining tests.

Workers:

- Per-test timeout (``TKPY_HARNESS_TIMEOUT`` seconds): faulthandler's watchdog thread, which runs
  in C and needs no GIL (a thread blocked in a CUDA call may hold it), writes every thread's stack to
  ``stacks/<worker>.txt`` and ends the process; xdist names the test and starts a new worker.
- After a failed test, a probe checks the CUDA context; a broken (sticky) context makes the worker
  exit once the test is reported, so it does not fail every later test.
- A failed comparison is diagnosed from the last ``(out, ref)`` pair the test compared
  (``helpers.LAST_COMPARISON``, recorded by ``helpers.rel_err`` under the harness).
- Each benchmark's ``extra_info`` goes to ``bench_cases.jsonl`` as soon as it is measured.
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

from harness_files import append_event, failure_header, failure_path

# Each probe returns None when the process can go on running tests, else why it cannot. The
# harness's dry run appends a planted probe to show that the worker restart works without a GPU.
context_probes: list[Callable[[], Optional[str]]] = []

_CRASH = re.compile(r"worker '?(gw\d+)'? crashed while running")
_MAX_CRASHES_PER_FILE = 2


def _cuda_context_error() -> Optional[str]:
    """Why this process's CUDA context is unusable, or None (also when CUDA was never used)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).cpu()
    except Exception as error:  # any CUDA error here is sticky: the context is gone
        return f"{type(error).__name__}: {error}"
    return None


context_probes.append(_cuda_context_error)


def _test_file(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


class Controller:
    """Journal, failure files and the per-file crash count (runs where reports arrive)."""

    def __init__(self, config: pytest.Config, root: Path, timeout: float):
        self.root = root
        self.timeout = timeout
        self.started: dict[str, float] = {}
        self.failed: set[str] = set()
        self.crashes: dict[str, int] = {}

    def _event(self, event: str, **fields) -> None:
        append_event(self.root, event, **fields)

    def pytest_runtest_logstart(self, nodeid: str, location) -> None:
        self.started[nodeid] = time.time()
        self._event("start", test=nodeid)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        crash = _CRASH.search(str(report.longrepr)) if report.failed and report.when == "???" else None
        if crash:
            self._crashed(report, crash.group(1))
        elif report.failed:
            self.failed.add(report.nodeid)
            self._write_failure(report, kind=f"failed in {report.when}")
        elif report.when == "call" or (report.skipped and report.when == "setup"):
            self._event("end", test=report.nodeid, outcome=report.outcome, seconds=round(report.duration, 3))
        if report.failed and report.when != "???":
            self._event("end", test=report.nodeid, outcome="failed", when=report.when,
                               seconds=round(report.duration, 3))

    def _crashed(self, report: pytest.TestReport, worker: str) -> None:
        elapsed = time.time() - self.started.get(report.nodeid, time.time())
        kind = "hang" if elapsed >= 0.9 * self.timeout else "crash"
        if report.nodeid in self.failed:
            # The worker left on purpose after this test broke its CUDA context (see Worker).
            kind = "restart"
        self._event(kind, test=report.nodeid, worker=worker, seconds=round(elapsed, 1))
        if kind == "restart":
            return
        what = (f"HANG: no result after {elapsed:.0f} s (timeout {self.timeout:.0f} s); the stacks of every thread "
                f"are in stacks/{worker}.txt" if kind == "hang"
                else f"CRASH: worker {worker} died after {elapsed:.1f} s (a signal or an abort in native code; "
                     f"faulthandler's traceback, if it got one, is in stacks/{worker}.txt)")
        self._write_failure(report, kind=kind, headline=what)
        path = _test_file(report.nodeid)
        self.crashes[path] = self.crashes.get(path, 0) + 1
        if self.crashes[path] == _MAX_CRASHES_PER_FILE:
            with (self.root / "skip_files.txt").open("a") as handle:
                handle.write(path + "\n")
            self._event("skip-file", file=path, reason=f"{_MAX_CRASHES_PER_FILE} hangs or crashes")

    def _write_failure(self, report: pytest.TestReport, kind: str, headline: str = "") -> None:
        sections = "".join(f"\n----- {title} -----\n{text.rstrip()}\n" for title, text in report.sections)
        seed = re.search(r"seed=(\d+)", sections)
        worker = getattr(getattr(report, "node", None), "gateway", None)
        with failure_path(self.root, report.nodeid).open("a") as handle:
            handle.write(failure_header(report.nodeid, kind, seed.group(1) if seed else "none printed",
                                        worker.id if worker else "main", headline))
            handle.write(f"\n----- traceback -----\n{report.longreprtext.rstrip()}\n{sections}\n")


class Worker:
    """Per-test timeout, skipping given-up files, CUDA context probe and mismatch diagnosis."""

    def __init__(self, config: pytest.Config, root: Path, timeout: float, name: str, distributed: bool):
        self.root = root
        self.timeout = timeout
        self.distributed = distributed
        (root / "stacks").mkdir(exist_ok=True)
        self.stacks = (root / "stacks" / f"{name}.txt").open("a", buffering=1)
        self.broken: Optional[str] = None
        faulthandler.enable(file=self.stacks, all_threads=True)

    def _skipped_files(self) -> set[str]:
        path = self.root / "skip_files.txt"
        return set(path.read_text().split()) if path.is_file() else set()

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if _test_file(item.nodeid) in self._skipped_files():
            pytest.skip(f"harness: {_MAX_CRASHES_PER_FILE} tests of this file hung or crashed; its other tests are skipped")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem):
        self.stacks.write(f"\n== {item.nodeid} started {time.strftime('%H:%M:%S')}\n")
        faulthandler.dump_traceback_later(self.timeout, exit=True, file=self.stacks)
        helpers = sys.modules.get("helpers")
        if helpers is not None:
            helpers.LAST_COMPARISON = None
        try:
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call):
        outcome = yield
        report = outcome.get_result()
        if report.when == "call":
            self._save_benchmark(item)
        if not report.failed:
            return
        if report.when == "call":
            diagnosis = self._diagnose()
            if diagnosis:
                report.sections.append(("tkpy diagnosis", diagnosis))
        if self.broken is None:
            for probe in context_probes:
                self.broken = probe()
                if self.broken:
                    report.sections.append(("tkpy harness", f"context broken after this test: {self.broken}; "
                                                             "the worker restarts"))
                    break

    def _save_benchmark(self, item: pytest.Item) -> None:
        """A benchmark's extra_info and median, as soon as it is measured: pytest-benchmark writes its
        JSON only at the end of the session, which a later hang or crash never reaches."""
        fixture = getattr(item, "funcargs", {}).get("benchmark")
        if fixture is None or not getattr(fixture, "extra_info", None):
            return
        stats = getattr(getattr(fixture, "stats", None), "stats", None)
        entry = {"name": item.name, "fullname": item.nodeid, "extra_info": fixture.extra_info,
                 "stats": {"median": getattr(stats, "median", None)}}
        with (self.root / "bench_cases.jsonl").open("a") as handle:
            handle.write(json.dumps(entry, default=str) + "\n")

    @staticmethod
    def _diagnose() -> Optional[str]:
        helpers = sys.modules.get("helpers")
        pair = getattr(helpers, "LAST_COMPARISON", None)
        if pair is None or not hasattr(helpers, "describe_mismatch"):
            return None
        try:
            return "last comparison of this test (helpers.rel_err):\n" + helpers.describe_mismatch(*pair)
        except Exception as error:  # a broken context can make the diagnosis itself fail
            return f"no diagnosis: {type(error).__name__}: {error}"

    def pytest_runtest_logfinish(self, nodeid: str, location) -> None:
        if not self.broken:
            return
        if self.distributed:
            # Every report of this test has gone to the controller; leaving now costs no other test.
            self.stacks.flush()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(3)

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem) -> None:
        if self.broken and not self.distributed:
            item.session.shouldstop = f"harness: the CUDA context broke ({self.broken}); stopping this run"


def pytest_configure(config: pytest.Config) -> None:
    root = os.environ.get("TKPY_HARNESS_DIR")
    if not root:
        return
    root_path = Path(root)
    root_path.mkdir(parents=True, exist_ok=True)
    timeout = float(os.environ.get("TKPY_HARNESS_TIMEOUT", "60"))
    worker_input = getattr(config, "workerinput", None)
    # xdist turns `-n N` into a `dist` mode other than "no" before plugins are configured.
    distributed = worker_input is not None or getattr(config.option, "dist", "no") != "no"
    if worker_input is None:
        config.pluginmanager.register(Controller(config, root_path, timeout), "tkpy-harness-controller")
    if worker_input is not None or not distributed:
        name = worker_input["workerid"] if worker_input is not None else "main"
        config.pluginmanager.register(Worker(config, root_path, timeout, name, distributed), "tkpy-harness-worker")

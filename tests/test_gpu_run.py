"""The GPU run harness (scripts/gpu_run.py, scripts/pytest_gpu_harness.py, scripts/summarize_gpu_run.py)
on this machine: its dry run with planted failures, its verdicts and its step deadlines. A harness
that rots is found here, not on the rare GPU."""

import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from helpers import describe_mismatch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_run  # noqa: E402
import summarize_gpu_run  # noqa: E402

pytest.importorskip("xdist", reason="the harness runs tests in pytest-xdist workers")


def unpack(out: Path, into: Path) -> Path:
    with tarfile.open(out / "run.tgz") as tar:
        tar.extractall(into, filter="data")
    return into / "run"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_run.py"), "check", "--dry-run", "--out", str(out),
                           "--timeout", "10", "--workers", "2"], capture_output=True, text=True, timeout=600)
    run = unpack(out, tmp_path_factory.mktemp("unpacked"))
    return proc, out, run, json.loads((run / "summary.json").read_text())



def test_dry_run_names_the_hang_and_the_crashes_and_completes_the_rest(dry_run):
    proc, out, run, summary = dry_run
    assert proc.returncode == 1, proc.stdout[-3000:]  # the planted failures make it FAIL
    assert sorted(p.name for p in out.iterdir()) == ["run.tgz", "steps.tsv", "summary.md"]
    assert proc.stdout.rstrip().endswith((run / "summary.md").read_text().rstrip())  # the summary comes last
    harness = summary["harness"]
    planted = "scripts/harness_dryrun/"
    assert harness["hang"] == [planted + "test_planted_hang.py::test_planted_hang"]
    assert planted + "test_planted_crash.py::test_planted_segfault" in harness["crash"]
    assert harness["restart"] == [planted + "test_planted_crash.py::test_planted_broken_context"]
    assert harness["skip-file"] == [planted + "test_planted_given_up.py"]
    hang = (run / "stacks").glob("*.txt")
    assert any("test_planted_hang.py\", line" in p.read_text() for p in hang), "no stack dump of the hung test"

    per_file = summary["steps"][-1]["tests"]["per_file"]
    assert per_file[planted + "test_planted_hang.py"] == {"passed": 3, "failed": 0, "errors": 1, "skipped": 0}
    # 4 after the crash pass; the mismatch and the broken context fail; the segfault errors, and so
    # does the broken-context test again when its worker leaves.
    assert per_file[planted + "test_planted_crash.py"] == {"passed": 4, "failed": 2, "errors": 2, "skipped": 0}
    given_up = per_file[planted + "test_planted_given_up.py"]
    assert given_up["errors"] == 2 and given_up["failed"] == 0 and given_up["passed"] + given_up["skipped"] == 8
    for name in gpu_run.DRY_RUN_TESTS:
        counts = per_file[name]
        assert counts["passed"] > 0 and counts["failed"] + counts["errors"] == 0, (name, counts)


def test_dry_run_failure_files_say_where(dry_run):
    _, _, run, summary = dry_run
    mismatch = (run / "failures").glob("*test_planted_mismatch.txt")
    text = next(mismatch).read_text()
    assert "dim 1 (size 300): 128 indices hold wrong elements: 64-127, 192-255 (index mod 128 in 64-127" in text
    signatures = {f["test"].split("::")[-1]: f for f in summary["harness"]["failures"]}
    assert signatures["test_planted_hang"]["detail"].startswith("HANG: no result after")
    assert signatures["test_planted_segfault"]["detail"].startswith("CRASH: worker")
    assert "index mod 128 in 64-127" in signatures["test_planted_mismatch"]["detail"]


def write_run(folder: Path, *, gpu_visible: bool, junit_cases: str, rc: str = "0") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.json").write_text(json.dumps({"mode": "check", "dry_run": False, "gpu_visible": gpu_visible}))
    (folder / "steps.tsv").write_text("step\tkind\trc\tseconds\tlog\tjunit\tnote\n"
                                      f"gpu-tests\ttests\t{rc}\t1.0\tlogs/gpu-tests.log\tgpu-tests.xml\t\n")
    (folder / "gpu-tests.xml").write_text(f'<testsuites><testsuite name="pytest">{junit_cases}</testsuite></testsuites>')


PASSED = '<testcase file="tests/test_tk.py" classname="tests.test_tk" name="test_a"/>'
SKIPPED = '<testcase file="tests/test_tk.py" classname="tests.test_tk" name="test_b"><skipped message="no GPU"/></testcase>'


def test_verdict_passes_only_with_a_gpu_and_a_test_that_ran(tmp_path):
    write_run(tmp_path / "ok", gpu_visible=True, junit_cases=PASSED + SKIPPED)
    assert summarize_gpu_run.main(["--out", str(tmp_path / "ok")]) == 0
    write_run(tmp_path / "nogpu", gpu_visible=False, junit_cases=PASSED)
    assert summarize_gpu_run.main(["--out", str(tmp_path / "nogpu")]) == 1
    assert "torch saw no GPU" in (tmp_path / "nogpu" / "summary.md").read_text()
    write_run(tmp_path / "skipped", gpu_visible=True, junit_cases=SKIPPED)
    assert summarize_gpu_run.main(["--out", str(tmp_path / "skipped")]) == 1
    text = (tmp_path / "skipped" / "summary.md").read_text()
    assert "no test ran" in text and "all skipped" in text


def test_a_step_without_time_left_is_skipped_and_fails_the_run(tmp_path, monkeypatch):
    run = gpu_run.Run(tmp_path / "out", deadline_s=gpu_run.SUMMARY_RESERVE_S + 5, mode="check", dry_run=True)
    assert run.step("late", "tests", [sys.executable, "-c", "pass"], cap=60) is None
    steps = summarize_gpu_run.read_steps(run.work / "steps.tsv")
    assert steps[0]["rc"] is None and steps[0]["note"].startswith("skipped")
    assert summarize_gpu_run.step_status(steps[0]) == "skipped"
    assert (tmp_path / "out" / "steps.tsv").read_text() == (run.work / "steps.tsv").read_text()


def test_a_step_over_its_cap_is_stopped_and_recorded(tmp_path):
    run = gpu_run.Run(tmp_path / "out", deadline_s=600, mode="check", dry_run=True)
    rc = run.step("sleepy", "tests", [sys.executable, "-c", "import time; time.sleep(600)"], cap=gpu_run.MIN_STEP_S)
    assert rc == 124
    assert summarize_gpu_run.step_status(summarize_gpu_run.read_steps(run.work / "steps.tsv")[0]) == "timeout"


def test_packing_cuts_large_logs_to_head_and_tail(tmp_path):
    run = gpu_run.Run(tmp_path / "out", deadline_s=600, mode="check", dry_run=True)
    (run.work / "logs" / "big.log").write_bytes(b"H" * 100 + b"x" * (gpu_run.MAX_PACKED_FILE * 2) + b"TAIL")
    run.pack()
    packed = (unpack(tmp_path / "out", tmp_path / "unpacked") / "logs" / "big.log").read_bytes()
    assert packed.startswith(b"H" * 100) and packed.endswith(b"TAIL") and b"cut by the harness" in packed
    assert len(packed) < gpu_run.MAX_PACKED_FILE + 200


def test_test_order_covers_every_file_with_gpu_tests():
    for name in gpu_run.TEST_ORDER + gpu_run.BENCH_ORDER + gpu_run.DRY_RUN_TESTS:
        assert (ROOT / name).is_file(), f"{name} in scripts/gpu_run.py does not exist"
    gpu_files = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_*.py"))
                 if re.search(r"mark\.gpu\b", p.read_text())]
    assert set(gpu_files) <= set(gpu_run.TEST_ORDER), set(gpu_files) - set(gpu_run.TEST_ORDER)
    assert gpu_run.TEST_ORDER[0] == "tests/test_tk.py"  # the primitives first


def test_source_digest_follows_the_sources(tmp_path):
    for top in gpu_run.SOURCES:
        src = ROOT / top
        (tmp_path / top).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            import shutil

            shutil.copytree(src, tmp_path / top)
        else:
            (tmp_path / top).write_bytes(src.read_bytes())
    assert gpu_run.source_digest(tmp_path) == gpu_run.source_digest(ROOT)
    (tmp_path / "include" / "tk" / "tk.cuh").write_text((ROOT / "include/tk/tk.cuh").read_text() + "\n")
    assert gpu_run.source_digest(tmp_path) != gpu_run.source_digest(ROOT)


def test_describe_mismatch_names_tiles_partial_tiles_and_nans():
    ref = torch.randn(3, 300, 2, 64, generator=torch.Generator().manual_seed(0))
    out = ref.clone()
    out[:, 256:] = float("nan")
    text = describe_mismatch(out, ref)
    assert "NaN in out 16896" in text
    assert "dim 1 (size 300): 44 indices hold wrong elements: 256-299 (only the last partial 128-tile, 44 of 128)" in text
    out = ref.clone()
    out[1, :, 1, 16:32] *= -1
    text = describe_mismatch(out, ref)
    assert "dim 0 (size 3): 1 indices hold wrong elements: 1\n" in text
    assert "dim 3 (size 64): 16 indices hold wrong elements: 16-31" in text
    close = ref + 1e-3 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    assert "wrong elements (off by > 5% of |ref| + rms, or not finite): 0 of" in describe_mismatch(close, ref)


def test_bench_dry_run_resumes_after_a_hang_and_keeps_every_result(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_run.py"), "bench", "--dry-run", "--out", str(out),
                           "--timeout", "10"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:]  # the planted hang makes it FAIL
    summary = json.loads((unpack(out, tmp_path / "unpacked") / "summary.json").read_text())
    assert summary["harness"]["hang"] == ["scripts/harness_dryrun/bench_planted.py::test_planted_bench_hang"]
    assert [s["name"] for s in summary["steps"] if s["name"].startswith("bench-tests")] == ["bench-tests", "bench-tests-2"]
    cases = {(row["op"], row["case"]) for row in summary["benchmarks"]}
    assert {("planted", "before"), ("planted", "after")} <= cases  # measured before and after the hang
    assert any(op == "gemm" for op, _ in cases)


def test_a_case_without_pytest_benchmark_stats_keeps_its_row(tmp_path):
    """The harness plugin saves a case's extra_info with no median when pytest-benchmark did not time
    it (seen when the bench's first step was cut short): the summary keeps the row, never crashes."""
    bench = {"benchmarks": [{"name": "test_x", "stats": {"median": None},
                             "extra_info": {"op": "gemm", "case": "c", "metric": "TFLOP/s", "tkpy_tflops": 1.0}},
                            {"name": "test_y", "stats": {"median": 2e-6}, "extra_info": {"op": "gemm", "case": "d"}}]}
    rows = summarize_gpu_run.benchmark_rows(bench)
    assert [(r["case"], r["tkpy"], r["pytest_benchmark_median_us"]) for r in rows] == [("c", 1.0, None), ("d", None, 2.0)]


def test_a_summary_that_fails_still_leaves_the_packed_files(monkeypatch, tmp_path):
    run = gpu_run.Run(tmp_path / "out", 60, "check", dry_run=True)
    (run.work / "logs" / "step.log").write_text("evidence")

    def broken(argv):
        raise TypeError("planted summary failure")

    monkeypatch.setattr(summarize_gpu_run, "main", broken)
    assert run.finish() == 1
    unpacked = unpack(tmp_path / "out", tmp_path / "unpacked")
    assert (unpacked / "logs" / "step.log").read_text() == "evidence"
    assert "planted summary failure" in (unpacked / "summary-error.txt").read_text()


def test_carried_build_stamp_names_the_watchdog_setting_and_bench_refuses_a_reporting_build(monkeypatch, tmp_path):
    monkeypatch.delenv("TKPY_WATCHDOG_REPORT", raising=False)
    default = gpu_run.extension_stamp()
    monkeypatch.setenv("TKPY_WATCHDOG_REPORT", "1")
    assert gpu_run.extension_stamp() != default and default.split()[0] == gpu_run.extension_stamp().split()[0]
    assert gpu_run.main(["bench", "--dry-run", "--out", str(tmp_path)]) == 2
    assert not any(tmp_path.iterdir())  # refused before anything ran

"""``python -m tkpy bench``: the front end over a checkout's benchmarks/, on the CPU path."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    # Without this run's xdist variables: pytest-benchmark switches itself off when it sees them.
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_")}
    return subprocess.run([sys.executable, "-m", "tkpy", "bench", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


def test_prints_a_table_per_op_and_says_it_timed_the_cpu_path(tmp_path):
    proc = bench("--device", "cpu", "--ops", "gemm", "apply_rope_3d_", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "These are CPU-path timings" in out and f"cases from {ROOT / 'benchmarks'}" in out
    assert "gemm: TFLOP/s; ratio = tkpy's rate over torch.matmul's" in out
    assert out.count("| square-256x256x256 | M256 N256 K256 | bfloat16 |") == 1
    assert "apply_rope_3d_: GB/s" in out and "| wan-3x6x8 |" in out and "MISMATCH" not in out


def test_the_lserve_case_needs_an_explicit_head_pattern():
    proc = bench("--device", "cpu", "--ops", "token_streaming_attn_func")
    assert proc.returncode == 2 and "the LServe cases need --head-pattern PATH" in proc.stderr


def test_a_folder_without_the_cases_is_refused_by_name(tmp_path):
    proc = bench("--suite", str(tmp_path))
    assert proc.returncode == 2 and f"no benchmark cases (cli.py) in {tmp_path}" in proc.stderr


def test_the_table_and_the_suite_records_come_from_one_run(tmp_path):
    """The front end runs the pytest-benchmark suite itself: each case is timed once, and the
    --benchmark-json records are the rows of the table."""
    records = tmp_path / "bench.json"
    proc = bench("--device", "cpu", "--ops", "gemm", "--no-progress", "--benchmark-json", str(records))
    assert proc.returncode == 0, proc.stderr
    entries = json.loads(records.read_text())["benchmarks"]
    cases = [entry["extra_info"]["case"] for entry in entries]
    assert len(cases) == len(set(cases)) == 5
    for entry in entries:
        assert f"| {entry['extra_info']['case']} | {entry['extra_info']['shape']} |" in proc.stdout


def test_the_table_shows_each_attention_kernel_side_by_side():
    """On CUDA an attention case records the kernel it ran (``kernel``) and every other one
    (``other_kernels``, checked and timed alike); the table gives each its column."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import cli
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    record = {"op": "flash_attn_func", "case": "full-D128-S4096", "shape": "B4 S4096 H16 D128 full", "dtype": "bfloat16",
              "metric": "TFLOP/s", "peer": "sdpa-cudnn", "tkpy_median_us": 1000.0, "tkpy_tflops": 600.0,
              "peers": {"sdpa-cudnn": {"median_us": 1100.0, "tflops": 545.0, "ratio": 1.1}}, "ratio": 1.1,
              "rel_err": 1e-3, "check_passed": True, "kernel": "pipelined",
              "other_kernels": {"baseline": {"median_us": 1500.0, "tflops": 400.0, "ratio": 1.5, "rel_err": 1e-3,
                                             "check_passed": True}}}
    lines = cli._op_table([record])
    assert "tkpy ran its pipelined attention kernel" in lines[0]
    assert "| tkpy us | tkpy | tkpy baseline | sdpa-cudnn | ratio |" in lines[2]
    assert "| 1,000 | 600 | 400 | 545 | 1.10x |" in lines[4]

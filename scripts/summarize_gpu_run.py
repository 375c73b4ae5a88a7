#!/usr/bin/env python3
"""Turn a ``scripts/gpu_check.sh`` run into the evidence files of DESIGN §7.

Reads from the run's output folder:

- ``steps.tsv``: one row per step (step, kind, rc, seconds, log, junit), written by gpu_check.sh;
- each test step's junit XML, for pass/fail/skip counts and the names of failed tests;
- the sanitizer steps' logs, for compute-sanitizer's ERROR / RACECHECK SUMMARY lines;
- ``bench.json`` from pytest-benchmark, whose ``extra_info`` follows the layout described in
  ``benchmarks/conftest.py``;

and writes ``<date>-<gpu>.json`` and ``<date>-<gpu>.md`` there (the markdown also goes to stdout).

It must work when tkpy failed to build, so it imports nothing from tkpy: the standard library,
plus nvidia-ml-py and torch when they import.

Exit status: 0 when the build and every test, sanitizer and benchmark step passed (a pytest run
that selected no tests counts as passed and is flagged), 1 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import platform
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

SCHEMA = "tkpy-gpu-run/1"
# Steps of these kinds run pytest, whose exit code 5 means that no test was selected.
_PYTEST_KINDS = {"tests", "sanitizer"}
# Steps of these kinds decide the exit status; "info" steps only inform.
_GATING_KINDS = {"build", "tests", "sanitizer", "bench"}
_OK_STATUSES = {"passed", "no tests"}
# Exit codes of `timeout`: 124 when the limit hit, 137 (128 + SIGKILL) when the step had to be killed.
_TIMEOUT_RC = {124: "timeout", 137: "killed"}
_MAX_FAILED_NAMES = 20

_ERROR_SUMMARY = re.compile(r"ERROR SUMMARY:\s*(\d+)\s+errors?")
_RACECHECK_SUMMARY = re.compile(
    r"RACECHECK SUMMARY:\s*(\d+)\s+hazards?\s+displayed\s*\((\d+)\s+errors?,\s*(\d+)\s+warnings?\)"
)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def read_steps(path: Path) -> list[dict[str, Any]]:
    """Rows of ``steps.tsv`` with ``rc`` as int and ``seconds`` as float; ``[]`` if it is missing."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return [
        {
            "name": row["step"],
            "kind": row["kind"],
            "rc": int(row["rc"]),
            "seconds": float(row["seconds"]),
            "log": row["log"],
            "junit": None if row["junit"] in ("", "-") else row["junit"],
        }
        for row in rows
    ]


def junit_counts(path: Path) -> Optional[dict[str, Any]]:
    """Test counts of a pytest junit XML, and the ids of failed tests; None if unreadable.

    pytest writes one ``<testsuite>`` (under ``<testsuites>``) with tests/failures/errors/skipped
    attributes; they are summed in case a file holds several.
    """
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname', '')}::{case.get('name', '')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {
        "total": counts["tests"],
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "failed_tests": failed[:_MAX_FAILED_NAMES],
    }


def sanitizer_summary(log: Path) -> dict[str, Optional[int]]:
    """compute-sanitizer's findings in ``log``, summed over its processes.

    ``errors`` is None when the log has no ERROR SUMMARY line, i.e. the sanitizer never got to
    report. racecheck also reports ``hazards`` and ``warnings``.
    """
    text = log.read_text(errors="replace") if log.is_file() else ""
    errors = [int(n) for n in _ERROR_SUMMARY.findall(text)]
    summary: dict[str, Optional[int]] = {"errors": sum(errors) if errors else None}
    races = _RACECHECK_SUMMARY.findall(text)
    if races:
        summary["hazards"] = sum(int(h) for h, _, _ in races)
        summary["race_errors"] = sum(int(e) for _, e, _ in races)
        summary["race_warnings"] = sum(int(w) for _, _, w in races)
    return summary


def read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def benchmark_rows(bench: Optional[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per pytest-benchmark entry: tkpy and its peer in the entry's metric, and the ratio."""
    rows = []
    for entry in (bench or {}).get("benchmarks", []):
        info = entry.get("extra_info", {})
        metric = info.get("metric")
        suffix = {"GB/s": "gbps", "TFLOP/s": "tflops", "tokens/s": "tokens_per_s"}.get(metric)
        rows.append(
            {
                "name": entry.get("name"),
                "op": info.get("op"),
                "case": info.get("case"),
                "shape": info.get("shape"),
                "dtype": info.get("dtype"),
                "device": info.get("device"),
                "metric": metric,
                "tkpy": info.get(f"tkpy_{suffix}") if suffix else None,
                "peer": info.get("peer"),
                "peer_value": info.get(f"peer_{suffix}") if suffix else None,
                "ratio": info.get("ratio"),
                "tkpy_median_us": info.get("tkpy_median_us"),
                "peer_median_us": info.get("peer_median_us"),
                "timer": info.get("timer"),
                "pytest_benchmark_median_us": entry.get("stats", {}).get("median", 0.0) * 1e6,
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def git_commit(repo: Path) -> dict[str, Any]:
    """HEAD's hash and whether the working tree had changes; None values outside a git checkout."""

    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def nvml_gpu() -> dict[str, Any]:
    """GPU 0's name, memory, clocks and power from NVML now, or ``{}`` without nvidia-ml-py or a GPU."""
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return {}
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)

        def query(fn: Any, *args: Any) -> Any:
            try:
                value = fn(*args)
            except pynvml.NVMLError:
                return None
            return value.decode() if isinstance(value, bytes) else value

        memory = query(pynvml.nvmlDeviceGetMemoryInfo, handle)
        power = query(pynvml.nvmlDeviceGetPowerUsage, handle)
        limit = query(pynvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        return {
            "name": query(pynvml.nvmlDeviceGetName, handle),
            "driver": query(pynvml.nvmlSystemGetDriverVersion),
            "memory_total_gib": None if memory is None else round(memory.total / 2**30, 1),
            "sm_clock_mhz": query(pynvml.nvmlDeviceGetClockInfo, handle, pynvml.NVML_CLOCK_SM),
            "sm_clock_max_mhz": query(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_SM),
            "mem_clock_max_mhz": query(pynvml.nvmlDeviceGetMaxClockInfo, handle, pynvml.NVML_CLOCK_MEM),
            "power_draw_w": None if power is None else power / 1000,
            "power_limit_w": None if limit is None else limit / 1000,
        }
    except pynvml.NVMLError:
        return {}
    finally:
        pynvml.nvmlShutdown()


def torch_versions(bench: Optional[dict[str, Any]]) -> dict[str, Optional[str]]:
    """torch and CUDA versions: from bench.json's machine_info, else from torch if it imports."""
    recorded = (bench or {}).get("machine_info", {}).get("tkpy")
    if recorded:
        return {"torch": recorded.get("torch"), "cuda": recorded.get("torch_cuda"), "tkpy": recorded.get("tkpy")}
    try:
        import torch
    except ImportError:
        return {"torch": None, "cuda": None, "tkpy": None}
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "tkpy": None}


def slug(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown-gpu"


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def step_status(step: dict[str, Any]) -> str:
    """passed, failed, "no tests" (pytest selected nothing), timeout or killed.

    A sanitizer step passes only when its log shows compute-sanitizer's summary with 0 errors.
    """
    rc = step["rc"]
    if rc in _TIMEOUT_RC:
        return _TIMEOUT_RC[rc]
    if rc == 5 and step["kind"] in _PYTEST_KINDS:
        status = "no tests"
    else:
        status = "passed" if rc == 0 else "failed"
    if step["kind"] == "sanitizer" and status in _OK_STATUSES and step["sanitizer"]["errors"] != 0:
        return "failed"
    return status


def summarize_step(step: dict[str, Any], out: Path) -> dict[str, Any]:
    """``step`` with its junit counts, sanitizer findings and status added."""
    step = dict(step)
    step["tests"] = junit_counts(out / step["junit"]) if step["junit"] else None
    if step["kind"] == "sanitizer":
        step["sanitizer"] = sanitizer_summary(out / step["log"])
    step["status"] = step_status(step)
    return step


def build_summary(out: Path, repo: Path, now: dt.datetime) -> dict[str, Any]:
    bench = read_json(out / "bench.json")
    steps = [summarize_step(step, out) for step in read_steps(out / "steps.tsv")]
    recorded_gpu = (bench or {}).get("machine_info", {}).get("tkpy", {}).get("gpu", {})
    gpu = nvml_gpu() or recorded_gpu
    failed = [s["name"] for s in steps if s["kind"] in _GATING_KINDS and s["status"] not in _OK_STATUSES]
    return {
        "schema": SCHEMA,
        "date": now.isoformat(timespec="seconds"),
        **git_commit(repo),
        "python": platform.python_version(),
        **torch_versions(bench),
        "gpu": gpu,
        "steps": steps,
        "benchmarks": benchmark_rows(bench),
        "failed_steps": failed,
        "ok": bool(steps) and not failed,
    }


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------


def _cell(value: Any, spec: str = "") -> str:
    return "" if value is None else format(value, spec)


def _step_notes(step: dict[str, Any]) -> str:
    notes = []
    san = step.get("sanitizer")
    if san is not None:
        if san["errors"] is None:
            notes.append("no sanitizer summary in the log")
        else:
            notes.append(f"{san['errors']} sanitizer errors")
        if "hazards" in san:
            notes.append(f"{san['hazards']} hazards ({san['race_errors']} errors, {san['race_warnings']} warnings)")
    tests = step.get("tests")
    if tests and tests["total"] and tests["passed"] == 0 and not (tests["failed"] or tests["errors"]):
        notes.append("nothing ran: every selected test skipped")
    if tests and tests["failed_tests"]:
        notes.append("failed: " + ", ".join(f"`{name}`" for name in tests["failed_tests"][:5]))
    return "; ".join(notes)


def _gpu_line(gpu: dict[str, Any]) -> str:
    if not gpu:
        return "- GPU: no information (no GPU, or nvidia-ml-py missing)"

    def get(key: str, spec: str = "") -> str:
        return _cell(gpu.get(key), spec) or "?"

    return (
        f"- GPU: {get('name')}, {get('memory_total_gib', '.0f')} GiB, driver {get('driver')}; "
        f"SM clock {get('sm_clock_mhz')}/{get('sm_clock_max_mhz')} MHz, memory clock max "
        f"{get('mem_clock_max_mhz')} MHz; power {get('power_draw_w', '.0f')}/{get('power_limit_w', '.0f')} W"
    )


def render_markdown(summary: dict[str, Any]) -> str:
    commit = summary["commit"] or "unknown"
    lines = [
        f"# tkpy GPU run, {summary['date']}: {'PASS' if summary['ok'] else 'FAIL'}",
        "",
        f"- commit `{commit}`{' (uncommitted changes)' if summary['dirty'] else ''}",
        f"- torch {summary['torch']}, CUDA {summary['cuda']}, tkpy {summary['tkpy']}, Python {summary['python']}",
        _gpu_line(summary["gpu"]),
        "",
        "| step | status | rc | seconds | passed | failed | errors | skipped | notes |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for step in summary["steps"]:
        tests = step["tests"] or {}
        lines.append(
            f"| {step['name']} | {step['status']} | {step['rc']} | {step['seconds']:.1f} "
            f"| {_cell(tests.get('passed'))} | {_cell(tests.get('failed'))} | {_cell(tests.get('errors'))} "
            f"| {_cell(tests.get('skipped'))} | {_step_notes(step)} |"
        )
    if summary["benchmarks"]:
        lines += [
            "",
            "| op | case | device | shape | dtype | tkpy | peer | peer value | tkpy / peer |",
            "|---|---|---|---|---|--:|---|--:|--:|",
        ]
        for row in summary["benchmarks"]:
            unit = f" {row['metric']}" if row["metric"] else ""
            lines.append(
                f"| {row['op']} | {row['case']} | {row['device']} | {row['shape']} | {row['dtype']} "
                f"| {_cell(row['tkpy'], ',.1f')}{unit} | {row['peer']} | {_cell(row['peer_value'], ',.1f')}{unit} "
                f"| {_cell(row['ratio'], '.2f')}x |"
            )
    if summary["failed_steps"]:
        lines += ["", f"Failed steps: {', '.join(summary['failed_steps'])}."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True,
                        help="gpu_check.sh's output folder; the summary goes there too")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the git checkout whose HEAD is recorded (default: this script's repository)")
    args = parser.parse_args(argv)

    now = dt.datetime.now(dt.timezone.utc)
    summary = build_summary(args.out, args.repo, now)
    stem = f"{now:%Y-%m-%d-%H%M%S}-{slug(summary['gpu'].get('name') or '')}"
    (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    markdown = render_markdown(summary)
    (args.out / f"{stem}.md").write_text(markdown)
    print(markdown)
    print(f"summary: {args.out / stem}.json and .md")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

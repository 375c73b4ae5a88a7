#!/usr/bin/env python3
"""Turn a ``scripts/gpu_run.py`` command's work folder into the evidence files of DESIGN §7.

Reads from the folder:

- ``run.json``: the command (check or bench), whether it was a dry run, and whether torch saw a GPU;
- ``steps.tsv``: one row per step (step, kind, rc, seconds, log, junit, note); rc ``-`` is a step
  skipped for lack of time;
- each test step's junit XML (xunit1, which names each test's file), for pass/fail/skip counts per
  step and per test file;
- ``journal.jsonl`` and ``failures/`` from ``scripts/pytest_gpu_harness.py``: hangs, crashes,
  worker restarts, files given up on, and one signature line per failing test;
- the sanitizer steps' logs, for compute-sanitizer's ERROR / RACECHECK SUMMARY lines;
- ``bench.json`` from pytest-benchmark (``extra_info``: the records of ``benchmarks/cases.py``),
  ``ceilings.json`` (copy bandwidth, matmul rate) and ``nvml.tsv`` (clocks and power while timing);

and writes ``summary.json`` and ``summary.md`` there.

It must work when tkpy failed to build, so it imports nothing from tkpy: the standard library,
plus nvidia-ml-py and torch when they import.

Verdict (exit status 0 for PASS, 1 for FAIL): every step passed, none was skipped; outside a dry
run torch saw a GPU; and the test steps ran at least one test (skips do not count).
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

from harness_files import read_events

SCHEMA = "tkpy-gpu-run/2"
# Steps of these kinds run pytest, whose exit code 5 means that no test was selected.
_PYTEST_KINDS = {"tests", "sanitizer"}
# Steps of these kinds decide the exit status; "info" steps only inform.
_GATING_KINDS = {"build", "tests", "sanitizer", "bench"}
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
    """Rows of ``steps.tsv`` with ``rc`` as int (None for a skipped step) and ``seconds`` as float."""
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return [
        {
            "name": row["step"],
            "kind": row["kind"],
            "rc": None if row["rc"] == "-" else int(row["rc"]),
            "seconds": float(row["seconds"]),
            "log": row["log"],
            "junit": None if row["junit"] in ("", "-") else row["junit"],
            "note": row.get("note") or "",
        }
        for row in rows
    ]


def junit_counts(path: Path) -> Optional[dict[str, Any]]:
    """Test counts of a pytest junit XML, in all and per test file, and the ids of failed tests;
    None if unreadable (a step killed before pytest wrote it)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    per_file: dict[str, dict[str, int]] = {}
    failed = []
    for case in root.iter("testcase"):
        outcome = ("failed" if case.find("failure") is not None
                   else "errors" if case.find("error") is not None
                   else "skipped" if case.find("skipped") is not None else "passed")
        name = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
        counts = per_file.setdefault(name, {"passed": 0, "failed": 0, "errors": 0, "skipped": 0})
        counts[outcome] += 1
        if outcome in ("failed", "errors"):
            failed.append(f"{name}::{case.get('name', '')}")
    total = {key: sum(c[key] for c in per_file.values()) for key in ("passed", "failed", "errors", "skipped")}
    return {"total": sum(total.values()), **total, "per_file": per_file, "failed_tests": failed[:_MAX_FAILED_NAMES]}


def harness_events(folder: Path) -> dict[str, Any]:
    """Hangs, crashes, worker restarts and given-up files from the harness journal, and one
    signature per failure file (its kind and the first line that says what went wrong)."""
    events: dict[str, list] = {"hang": [], "crash": [], "restart": [], "skip-file": []}
    for event in read_events(folder):
        if event.get("event") in events:
            events[event["event"]].append(event.get("test") or event.get("file"))
    signatures = []
    for path in sorted((folder / "failures").glob("*.txt")) if (folder / "failures").is_dir() else []:
        text = path.read_text(errors="replace")
        test = re.search(r"^test: (.*)$", text, re.M)
        kind = re.search(r"^kind: (.*)$", text, re.M)
        # The most telling line: the harness's headline, a watchdog report, the first dimension
        # whose wrong elements are not "all" of it, the diagnosis's count, else pytest's "E " line.
        detail = (re.search(r"^(HANG|CRASH): .*$", text, re.M) or re.search(r"^.*tk::wait watchdog.*$", text, re.M)
                  or re.search(r"^dim \d+ \(size \d+\): .*(?<!: all)$", text, re.M)
                  or re.search(r"^max abs err .*$", text, re.M) or re.search(r"^E +(.*)$", text, re.M))
        signatures.append({"test": test.group(1) if test else path.stem, "kind": kind.group(1) if kind else "?",
                           "detail": (detail.group(0) if detail else "").strip()[:300]})
    return {**{key: value for key, value in events.items()}, "failures": signatures}


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
        # pytest-benchmark leaves stats empty when it did not time a case (benchmarks disabled)
        median_s = (entry.get("stats") or {}).get("median")
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
                "pytest_benchmark_median_us": None if median_s is None else median_s * 1e6,
                "each_peer": _each_peer(info),
                "kernel": info.get("kernel"),
                "other_kernels": {name: {"value": k.get("tflops", k.get("gbps")), "ratio": k.get("ratio"),
                                         "check_passed": k.get("check_passed")}
                                  for name, k in (info.get("other_kernels") or {}).items()},
            }
        )
    return rows


def _each_peer(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every peer a case timed (``extra_info["peers"]``, e.g. each SDPA backend, dense attention and
    FlexAttention): its rate and tkpy's ratio to it, or why it did not run."""
    return {name: {"error": peer["error"]} if "error" in peer
            else {"value": peer.get("tflops", peer.get("gbps")), "ratio": peer.get("ratio")}
            for name, peer in (info.get("peers") or {}).items()}


def nvml_samples(path: Path) -> Optional[dict[str, float]]:
    """The range of SM clock, memory clock, power and temperature sampled while benchmarking."""
    if not path.is_file():
        return None
    with path.open(newline="") as handle:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle, delimiter="\t")]
    if not rows:
        return None
    out: dict[str, float] = {"samples": len(rows)}
    for key in ("sm_mhz", "mem_mhz", "power_w", "temp_c"):
        out[f"{key}_min"], out[f"{key}_max"] = min(r[key] for r in rows), max(r[key] for r in rows)
    return out


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def git_commit(repo: Path, commit_file: Optional[Path]) -> dict[str, Any]:
    """The commit the run tested: from ``commit_file`` (written by ``gpu_run.py prep``, as the
    device's copy of the tree may have no git), else HEAD of ``repo``; None values when neither."""
    if commit_file is not None:
        recorded = read_json(commit_file) or {}
        return {"commit": recorded.get("commit"), "dirty": recorded.get("dirty")}

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


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def step_status(step: dict[str, Any]) -> str:
    """passed, failed, skipped (no time left), "no tests" (pytest selected nothing), "all skipped"
    (pytest ran but every test skipped), timeout or killed.

    A sanitizer step passes only when its log shows compute-sanitizer's summary with 0 errors.
    """
    rc = step["rc"]
    if rc is None:
        return "skipped"
    if rc in _TIMEOUT_RC:
        return _TIMEOUT_RC[rc]
    if rc == 5 and step["kind"] in _PYTEST_KINDS:
        return "no tests"
    status = "passed" if rc == 0 else "failed"
    tests = step.get("tests")
    if status == "passed" and tests is not None and tests["passed"] + tests["failed"] + tests["errors"] == 0:
        return "all skipped"
    if step["kind"] == "sanitizer" and status == "passed" and step["sanitizer"]["errors"] != 0:
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


def verdict(run: dict[str, Any], steps: list[dict[str, Any]]) -> list[str]:
    """Why the run FAILs; empty when it passes."""
    reasons = []
    if not steps:
        reasons.append("no step ran")
    if not run.get("dry_run") and not run.get("gpu_visible"):
        reasons.append("torch saw no GPU")
    for step in steps:
        if step["kind"] in _GATING_KINDS and step["status"] != "passed":
            reasons.append(f"step {step['name']}: {step['status']}")
    if steps and not any(step["tests"] and step["tests"]["passed"] + step["tests"]["failed"] + step["tests"]["errors"]
                         for step in steps if step["kind"] in _PYTEST_KINDS | {"bench"}):
        reasons.append("no test ran (every selected test skipped, or none was selected)")
    return reasons


def build_summary(out: Path, repo: Path, commit_file: Optional[Path], now: dt.datetime) -> dict[str, Any]:
    bench = read_json(out / "bench.json")
    run = read_json(out / "run.json") or {}
    steps = [summarize_step(step, out) for step in read_steps(out / "steps.tsv")]
    recorded_gpu = (bench or {}).get("machine_info", {}).get("tkpy", {}).get("gpu", {})
    gpu = nvml_gpu() or recorded_gpu
    reasons = verdict(run, steps)
    return {
        "schema": SCHEMA,
        "date": now.isoformat(timespec="seconds"),
        "run": run,
        **git_commit(repo, commit_file),
        "python": platform.python_version(),
        **torch_versions(bench),
        "gpu": gpu,
        "steps": steps,
        "harness": harness_events(out),
        "ceilings": read_json(out / "ceilings.json"),
        "nvml_while_benchmarking": nvml_samples(out / "nvml.tsv"),
        "benchmarks": benchmark_rows(bench),
        "fail_reasons": reasons,
        "ok": not reasons,
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


def _file_table(steps: list[dict[str, Any]]) -> list[str]:
    lines = ["", "| step | test file | passed | failed | errors | skipped |", "|---|---|--:|--:|--:|--:|"]
    for step in steps:
        for name, c in sorted(((step.get("tests") or {}).get("per_file") or {}).items()):
            lines.append(f"| {step['name']} | {name} | {c['passed']} | {c['failed']} | {c['errors']} | {c['skipped']} |")
    return lines if len(lines) > 3 else []


def _harness_lines(harness: dict[str, Any]) -> list[str]:
    lines = []
    for key, title in (("hang", "Hangs"), ("crash", "Crashes"), ("restart", "Worker restarts (broken CUDA context)"),
                       ("skip-file", "Files given up on")):
        if harness.get(key):
            lines.append(f"- {title} ({len(harness[key])}): " + ", ".join(f"`{t}`" for t in harness[key][:10]))
    if harness.get("failures"):
        lines += ["", f"Failure signatures ({len(harness['failures'])}; full files under run/failures/):", ""]
        lines += [f"- `{f['test']}` ({f['kind']}): {f['detail']}" for f in harness["failures"][:60]]
    return lines


def render_markdown(summary: dict[str, Any]) -> str:
    commit = summary["commit"] or "unknown"
    run = summary.get("run") or {}
    title = f"{run.get('mode', 'run')}{' (dry run)' if run.get('dry_run') else ''}"
    lines = [
        f"# tkpy GPU {title}, {summary['date']}: {'PASS' if summary['ok'] else 'FAIL'}",
        "",
        f"- commit `{commit}`{' (uncommitted changes)' if summary['dirty'] else ''}",
        f"- torch {summary['torch']}, CUDA {summary['cuda']}, tkpy {summary['tkpy']}, Python {summary['python']}",
        _gpu_line(summary["gpu"]),
    ]
    ceilings = summary.get("ceilings")
    if ceilings:
        lines.append(f"- measured ceilings: copy {ceilings['copy_gbps']:,.0f} GB/s (read + write), "
                     f"bf16 8192³ matmul {ceilings['matmul_bf16_8192_tflops']:,.0f} TFLOP/s")
    nvml = summary.get("nvml_while_benchmarking")
    if nvml:
        lines.append(f"- while benchmarking ({nvml['samples']:.0f} samples): SM {nvml['sm_mhz_min']:.0f}-"
                     f"{nvml['sm_mhz_max']:.0f} MHz, memory {nvml['mem_mhz_min']:.0f}-{nvml['mem_mhz_max']:.0f} MHz, "
                     f"power {nvml['power_w_min']:.0f}-{nvml['power_w_max']:.0f} W, {nvml['temp_c_max']:.0f} °C max")
    if summary["fail_reasons"]:
        lines.append("- FAIL because: " + "; ".join(summary["fail_reasons"]))
    lines += [
        "",
        "| step | status | rc | seconds | passed | failed | errors | skipped | notes |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    for step in summary["steps"]:
        tests = step["tests"] or {}
        notes = "; ".join(n for n in (step.get("note"), _step_notes(step)) if n)
        lines.append(
            f"| {step['name']} | {step['status']} | {_cell(step['rc'])} | {step['seconds']:.1f} "
            f"| {_cell(tests.get('passed'))} | {_cell(tests.get('failed'))} | {_cell(tests.get('errors'))} "
            f"| {_cell(tests.get('skipped'))} | {notes} |"
        )
    lines += _file_table(summary["steps"])
    harness = _harness_lines(summary.get("harness") or {})
    if harness:
        lines += [""] + harness
    if summary["benchmarks"]:
        lines += [
            "",
            "| op | case | device | shape | dtype | tkpy | peer | peer value | tkpy / peer | tkpy / each peer |",
            "|---|---|---|---|---|--:|---|--:|--:|---|",
        ]
        for row in summary["benchmarks"]:
            unit = f" {row['metric']}" if row["metric"] else ""
            each = ", ".join(f"{name} {_cell(p.get('ratio'), '.2f')}x" if "error" not in p else f"{name}: did not run"
                             for name, p in row["each_peer"].items())
            lines.append(
                f"| {row['op']} | {row['case']} | {row['device']} | {row['shape']} | {row['dtype']} "
                f"| {_cell(row['tkpy'], ',.1f')}{unit} | {row['peer']} | {_cell(row['peer_value'], ',.1f')}{unit} "
                f"| {_cell(row['ratio'], '.2f')}x | {each} |"
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the gpu_run.py work folder; the summary goes there too")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the git checkout whose HEAD is recorded (default: this script's repository)")
    parser.add_argument("--commit-file", type=Path, help="commit.json from `gpu_run.py prep`, instead of git")
    args = parser.parse_args(argv)

    summary = build_summary(args.out, args.repo, args.commit_file, dt.datetime.now(dt.timezone.utc))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / "summary.md").write_text(render_markdown(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

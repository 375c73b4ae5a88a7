"""``python -m tkpy bench``: the pytest-benchmark suite of this folder (test_bench_ops.py) run in
process, so every case of cases.py is checked and timed once, by the suite; its records become one
table per op on stdout, with progress on stderr, ``--benchmark-json`` as the suite writes it and,
with ``--plot``, attention against SDPA's backends as a PNG. (``python -m tkpy bench --suite DIR``
names the folder these files are in.)"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import pytest
import torch

import cases
import tkpy

SUITE = Path(__file__).resolve().parent / "test_bench_ops.py"

OPS = tuple(dict.fromkeys(case.op for case in cases.all_cases("cpu", None)))
LSERVE_OPS = tuple(op for op in OPS if op.startswith("token_streaming_attn_func"))  # its forward and backward
# The families' own figures that the tables show, by record key.
FIGURE_COLUMNS = {
    "density": "rho", "time_vs_dense": "time / dense", "target_time_vs_dense": "target",
    "pct_of_copy": "% copy", "target_pct_of_copy": "target %",
    "select_pages_us": "select us", "speedup_with_selection_every_4_steps": "with selection",
    "target_speedup": "target", "meets_target": "meets",
}


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tkpy bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when a GPU and tkpy's CUDA kernels are both present (default)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="which ops to time (default: all)")
    parser.add_argument("--head-pattern", type=Path, help=cases.HEAD_PATTERN_HELP)
    parser.add_argument("--plot", type=Path, help="also draw the attention cases into this PNG (needs matplotlib)")
    parser.add_argument("--benchmark-json", type=Path, help="also write the suite's pytest-benchmark JSON here")
    parser.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    args = parser.parse_args(argv)
    lserve = [op for op in args.ops if op in LSERVE_OPS]
    if lserve:
        try:
            cases.require_head_pattern(args.head_pattern)
        except ValueError as missing:
            parser.error(f"{missing} (or leave {' and '.join(lserve)} out of --ops)")
    return args


def _pick_device(requested: str) -> tuple[Optional[torch.device], str]:
    """The device to time on and a note for the top of the report (an error when device is None)."""
    gpu, kernels = torch.cuda.is_available(), tkpy.cuda_compiled()
    if requested == "cuda" and not (gpu and kernels):
        reason = "torch sees no CUDA device" if not gpu else "this tkpy build has no CUDA kernels"
        return None, f"tkpy bench: --device cuda asked for, but {reason}"
    if requested == "cuda" or (requested == "auto" and gpu and kernels):
        return torch.device("cuda", torch.cuda.current_device()), "device: CUDA"
    if not gpu:
        note = "NO GPU PRESENT: torch sees no CUDA device. These are CPU-path timings"
    elif not kernels:
        note = "A GPU is present but this tkpy build has no CUDA kernels. These are CPU-path timings"
    else:
        note = "CPU requested. These are CPU-path timings"
    return torch.device("cpu"), note + " (small shapes); they say nothing about GPU speed."


class SuiteRecords:
    """A pytest plugin: keeps the suite to the chosen device and ops, shows progress on stderr (a
    tqdm bar on a terminal, else one line per case, which keeps logs readable) and collects each
    case's record (test_op's ``record`` property)."""

    def __init__(self, device: torch.device, ops: Sequence[str], progress: bool):
        self.device, self.ops, self.progress = device, set(ops), progress
        self.records: list[dict[str, Any]] = []
        self.no_room: list[str] = []
        self.failed: list[str] = []
        self.bar = None
        self.done = self.total = 0

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        def chosen(item: pytest.Item) -> bool:
            params = getattr(item, "callspec", None) and item.callspec.params
            return bool(params) and params["device"].type == self.device.type and params["case"].op in self.ops

        keep = [item for item in items if chosen(item)]
        config.hook.pytest_deselected(items=[item for item in items if not chosen(item)])
        items[:] = keep
        if self.progress and sys.stderr.isatty() and importlib.util.find_spec("tqdm"):
            from tqdm import tqdm

            self.bar = tqdm(total=len(keep), desc="tkpy bench", unit="case", file=sys.stderr)
        self.total = len(keep)

    def pytest_runtest_logstart(self, nodeid: str, location) -> None:
        name = nodeid.split("[", 1)[-1].rstrip("]")
        if self.bar is not None:
            self.bar.set_postfix_str(name)
        elif self.progress:
            self.done += 1
            print(f"[{self.done}/{self.total}] {name}", file=sys.stderr, flush=True)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.records += [value for name, value in report.user_properties if name == "record" and report.when == "call"]
        if report.skipped:
            self.no_room.append(report.nodeid.split("[", 1)[-1].rstrip("]"))
        elif report.failed and not any(name == "record" for name, _ in report.user_properties):
            self.failed.append(f"{report.nodeid}: {report.longreprtext.strip().splitlines()[-1]}")
        if report.when == "teardown" and self.bar is not None:
            self.bar.update()

    def pytest_sessionfinish(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"
    return str(value)


def _op_table(rows: list[dict[str, Any]]) -> list[str]:
    """One op's records: tkpy, each peer ("n/a" with the reason below when it could not run, "-" when
    it is not a peer of the case), the ratio, the figures, the check."""
    metric = rows[0]["metric"]
    unit = cases.UNITS[metric][0]
    peers = list(dict.fromkeys(name for r in rows for name in r["peers"]))
    kernels = list(dict.fromkeys(name for r in rows for name in r.get("other_kernels") or {}))
    figures = [key for key in FIGURE_COLUMNS if key in rows[0]]
    main = dict.fromkeys(r["peer"] for r in rows)
    ran = dict.fromkeys(r["kernel"] for r in rows if r.get("kernel"))
    lines = [f"{rows[0]['op']}: {metric}; ratio = tkpy's rate over {' or '.join(map(str, main))}'s"
             + (f"; tkpy ran its {' or '.join(ran)} attention kernel" if ran else ""), "",
             "| case | shape | dtype | tkpy us | tkpy | " + "".join(f"tkpy {name} | " for name in kernels)
             + "".join(f"{name} | " for name in peers) + "ratio | "
             + "".join(f"{FIGURE_COLUMNS[key]} | " for key in figures) + "check |",
             "|---|---|---|--:|--:|" + "--:|" * (len(kernels) + len(peers) + 1 + len(figures)) + "---|"]
    refused: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        cells = [_cell((r.get("other_kernels") or {}).get(name, {}).get(unit, "n/a")) for name in kernels]
        for name in peers:
            peer = r["peers"].get(name)  # None: not a peer of this case ("-")
            cells.append(_cell(None if peer is None else peer.get(unit, "n/a")))
            if peer is not None and "error" in peer:
                refused.setdefault((name, peer["error"]), []).append(r["case"])
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x" + (f" {r['peer']}" if len(main) > 1 else "")
        check = "ok" if r["check_passed"] else f"MISMATCH {r['rel_err']:.1e}"
        lines.append(f"| {r['case']} | {r['shape']} | {r['dtype']} | {_cell(r['tkpy_median_us'])} | "
                     f"{_cell(r[f'tkpy_{unit}'])} | " + "".join(f"{c} | " for c in cells) + f"{ratio} | "
                     + "".join(f"{_cell(r.get(key))} | " for key in figures) + f"{check} |")
    if refused:
        lines += ["", *(f"- n/a: {name} on {', '.join(ids)}: {why}" for (name, why), ids in refused.items())]
    return lines


def format_report(records: list[dict[str, Any]], env: dict[str, Any], device: torch.device) -> str:
    lines = [f"torch {env['torch']} (CUDA runtime {env['torch_cuda']}), tkpy {env['tkpy']} "
             f"(CUDA kernels compiled: {'yes' if env['tkpy_cuda_kernels'] else 'no'}), Python {env['python']}"]
    if "gpu" in env:
        gpu = env["gpu"]
        lines.append(f"GPU: {gpu['name']} (sm_{gpu['capability'].replace('.', '')}, {gpu['sms']} SMs, "
                     f"{gpu['memory_total_gib']:.0f} GiB)")
    else:
        lines.append(f"CPU: {env['cpu']['processor']}, {env['cpu']['threads']} torch threads")
    lines += [f"timing: {cases.TIMERS[device.type]}",
              "work: each column credited with the case's FLOPs or bytes per call (benchmarks/cases.py says how)",
              "check: ||tkpy - reference|| / ||reference|| (tkpy.reference, float64) within the dtype's tolerance"]
    if any(r["metric"] == cases.GBPS for r in records):
        lines.append(f"copy bandwidth ({cases.COPY}): {cases.copy_gbps(device):,.1f} GB/s")
    for op in dict.fromkeys(r["op"] for r in records):
        lines += ["", *_op_table([r for r in records if r["op"] == op])]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the suite and print the report; 0 when tkpy passed every check, 1 when not, 2 on a usage error."""
    args = _parse(argv)
    device, note = _pick_device(args.device)
    if device is None:
        print(note, file=sys.stderr)
        return 2
    print(f"tkpy bench: {', '.join(args.ops)} against their peers (cases from {Path(cases.__file__).parent})\n{note}",
          flush=True)
    plugin = SuiteRecords(device, args.ops, not args.no_progress)
    pytest_args = [str(SUITE), "-k", "test_op", "-p", "no:cacheprovider", "-o", "addopts="]
    if args.head_pattern:
        pytest_args += ["--head-pattern", str(args.head_pattern)]
    if args.benchmark_json:
        pytest_args += ["--benchmark-json", str(args.benchmark_json)]
    pytest_output = io.StringIO()  # pytest's own report: shown only when a case could not run
    with contextlib.redirect_stdout(pytest_output):
        pytest.main(pytest_args, plugins=[plugin])
    if plugin.failed:
        print(pytest_output.getvalue(), file=sys.stderr)
        print("tkpy bench: cases that failed before giving a record:\n  " + "\n  ".join(plugin.failed), file=sys.stderr)
        return 1
    records = plugin.records
    env = cases.environment(device)
    print(format_report(records, env, device))
    if plugin.no_room:
        print(f"\nnot run, their inputs do not fit in GPU memory: {', '.join(plugin.no_room)}")
    if args.benchmark_json:
        print(f"\n{args.benchmark_json}: the suite's pytest-benchmark records")
    if args.plot:
        from plot import plot_attention  # matplotlib is needed only here

        print(f"\n{args.plot}: {plot_attention(records, env, args.plot)} attention cases plotted")
    mismatches = [f"{r['op']} {r['case']}" for r in records if not r["check_passed"]]
    if mismatches:
        print(f"tkpy bench: tkpy disagrees with the reference on: {', '.join(mismatches)}", file=sys.stderr)
    return 1 if mismatches else 0

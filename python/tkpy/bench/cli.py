"""``python -m tkpy bench``: argument parsing, progress and :func:`main`."""

from __future__ import annotations

import argparse
import sys
from typing import Iterable, Optional, Sequence

import torch

from .. import cuda_compiled
from .cases import _OPS, BenchCase, _all_cases, measure
from .core import prepare_case
from .decode import DecodeResult, SparseDecodeResult, copy_bandwidth_gbps, format_decode_tables
from .env import environment_info
from .report import format_report

_DEFAULT_RUNS = {"cuda": (10, 100), "cpu": (3, 20)}  # (warm-up, timed)


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tkpy bench",
        description="Time tkpy's ops against eager PyTorch and print a table (stdout); progress goes to stderr.",
    )
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="auto: CUDA when a GPU and tkpy's CUDA kernels are both present (default)")
    parser.add_argument("--ops", nargs="+", choices=_OPS, default=list(_OPS), help="which ops to time (default: all)")
    parser.add_argument("--warmup", type=int, help="warm-up runs per implementation (default: 10 CUDA, 3 CPU)")
    parser.add_argument("--reps", type=int, help="timed runs per implementation (default: 100 CUDA, 20 CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--no-progress", action="store_true", help="no progress output on stderr")
    return parser.parse_args(argv)


def _pick_device(requested: str) -> tuple[Optional[torch.device], str]:
    """The device to time on and a note for the top of the report (an error when device is None)."""
    gpu, kernels = torch.cuda.is_available(), cuda_compiled()
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
    note += " (tkpy's CPU implementation vs its torch peer, small shapes); they say nothing about GPU speed."
    return torch.device("cpu"), note


def _progress(cases: Sequence[BenchCase], enabled: bool) -> Iterable[BenchCase]:
    """Yield ``cases`` with progress on stderr: a tqdm bar on a terminal, else one line per case.

    Plain lines keep logs readable where a bar's carriage returns would not.
    """
    if not enabled:
        yield from cases
        return
    tqdm = None
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
    if tqdm is not None:
        with tqdm(cases, desc="tkpy bench", unit="case", file=sys.stderr) as bar:
            for case in bar:
                bar.set_postfix_str(f"{case.op} {case.id}")
                yield case
        return
    for number, case in enumerate(cases, 1):
        print(f"[{number}/{len(cases)}] {case.op} {case.id}", file=sys.stderr, flush=True)
        yield case


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark and print the report.

    Parameters
    ----------
    argv : list of str, optional
        The arguments after ``bench`` (``--help`` lists them); default ``sys.argv[1:]``.

    Returns
    -------
    int
        0 when every case matched its peer, 1 when one did not, 2 on a usage error.
    """
    args = _parse_args(argv)
    device, note = _pick_device(args.device)
    if device is None:
        print(note, file=sys.stderr)
        return 2
    default_warmup, default_reps = _DEFAULT_RUNS[device.type]
    warmup = default_warmup if args.warmup is None else args.warmup
    reps = default_reps if args.reps is None else args.reps
    print(f"tkpy bench: {', '.join(args.ops)} vs their torch peers\n{note}", flush=True)

    cases = [case for case in _all_cases(device) if case.op in args.ops]
    copy_gbps = None
    if any(case.metric == "GB/s" for case in cases):
        copy_gbps = copy_bandwidth_gbps(device)
    results = [
        measure(prepare_case(case, device, seed=args.seed), warmup=warmup, reps=reps)
        for case in _progress(cases, enabled=not args.no_progress)
    ]
    # Queried after the run, so that the clocks shown are the ones the timed kernels ran at.
    env = environment_info(device)
    # format_report knows no decode results: their tables follow its own.
    others = [r for r in results if not isinstance(r, (DecodeResult, SparseDecodeResult))]
    timer = results[0].tkpy.method if results else None
    print("\n".join([format_report(others, env, copy_gbps, warmup, reps, timer), *format_decode_tables(results)]))
    mismatches = [f"{r.case.op} {r.case.id} (vs {r.case.peer})" for r in results if not r.passed]
    if mismatches:
        print(f"tkpy bench: tkpy disagrees with its peer on: {', '.join(mismatches)}", file=sys.stderr)
        return 1
    return 0

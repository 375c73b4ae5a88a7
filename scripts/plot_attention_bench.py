#!/usr/bin/env python3
"""Plot tkpy's attention against torch SDPA's backends from a pytest-benchmark JSON file.

Reads the ``--benchmark-json`` output of ``pytest benchmarks/test_bench_attention.py`` and draws
TFLOP/s against sequence length, one panel per head dim (columns) and mask (rows: full, causal),
with a line for tkpy and one per SDPA backend. A backend that could not run a shape has no point
there (the benchmark's ``extra_info`` records why). Needs matplotlib, not tkpy.

    python scripts/plot_attention_bench.py bench.json -o attention.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

OP = "flash_attn_func"
MASKS = (False, True)  # rows: full, then causal


def attention_entries(bench: dict[str, Any], device: Optional[str]) -> tuple[str, list[dict[str, Any]]]:
    """The device plotted (``device``, else CUDA when there are CUDA entries) and its entries' ``extra_info``."""
    infos = [entry.get("extra_info", {}) for entry in bench.get("benchmarks", [])]
    infos = [info for info in infos if info.get("op") == OP]
    devices = {info.get("device") for info in infos}
    chosen = device or ("cuda" if "cuda" in devices else "cpu")
    return chosen, [info for info in infos if info.get("device") == chosen]


def series(infos: list[dict[str, Any]]) -> dict[tuple[int, bool], dict[str, list[tuple[int, float]]]]:
    """Per (head_dim, causal): per implementation ("tkpy" or a backend), sorted (seqlen, TFLOP/s) points."""
    panels: dict[tuple[int, bool], dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for info in infos:
        lines = panels[info["head_dim"], info["causal"]]
        lines["tkpy"].append((info["seqlen"], info["tkpy_tflops"]))
        for backend, result in info.get("backends", {}).items():
            if result.get("tflops") is not None:
                lines[f"SDPA {backend}"].append((info["seqlen"], result["tflops"]))
    return {key: {name: sorted(points) for name, points in lines.items()} for key, lines in panels.items()}


def _seqlen_label(seqlen: int) -> str:
    return f"{seqlen // 1024}k" if seqlen % 1024 == 0 else str(seqlen)


def title(bench: dict[str, Any], device: str) -> str:
    env = bench.get("machine_info", {}).get("tkpy", {})
    if device == "cuda":
        where = env.get("gpu", {}).get("name") or "GPU"
    else:
        where = "CPU path (small shapes; says nothing about GPU speed)"
    return f"tkpy flash_attn_func vs torch SDPA, bf16: {where}; torch {env.get('torch', '?')}"


def plot(bench: dict[str, Any], device: Optional[str], out: Path) -> int:
    """Write the figure to ``out``; return the number of benchmark entries plotted."""
    chosen, infos = attention_entries(bench, device)
    if not infos:
        return 0
    panels = series(infos)
    head_dims = sorted({head_dim for head_dim, _ in panels})
    names = sorted({name for lines in panels.values() for name in lines}, key=lambda n: (n != "tkpy", n))
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    fig, axes = plt.subplots(
        len(MASKS), len(head_dims), figsize=(4.2 * len(head_dims), 3.6 * len(MASKS)), sharey=True, squeeze=False
    )
    for row, causal in enumerate(MASKS):
        for col, head_dim in enumerate(head_dims):
            ax = axes[row][col]
            ax.set_title(f"D={head_dim}, {'causal' if causal else 'full'}", fontsize=10)
            lines = panels.get((head_dim, causal), {})
            for name, points in lines.items():
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=name, color=colors[name], linewidth=2.5 if name == "tkpy" else 1.5)
            if not lines:
                ax.text(0.5, 0.5, "no cases", transform=ax.transAxes, ha="center", va="center", color="gray")
            ax.set_xscale("log", base=2)
            seqlens = sorted({x for points in lines.values() for x, _ in points})
            ax.set_xticks(seqlens, [_seqlen_label(x) for x in seqlens])
            ax.minorticks_off()
            ax.grid(True, alpha=0.3)
            if row == len(MASKS) - 1:
                ax.set_xlabel("sequence length S")
            if col == 0:
                ax.set_ylabel("TFLOP/s")
    axes[0][0].set_ylim(bottom=0)  # after plotting, so the shared top fits every panel's data
    handles = [plt.Line2D([], [], color=colors[name], marker="o", label=name) for name in names]
    fig.legend(handles=handles, loc="upper right", ncol=len(names), fontsize=9, bbox_to_anchor=(1.0, 0.99))
    fig.suptitle(title(bench, chosen), x=0.01, ha="left", fontsize=11)
    fig.text(0.01, 0.005, "FLOPs = 4·B·H·S²·D per call, halved for causal; CUDA-event medians on the GPU",
             fontsize=8, color="gray")
    fig.tight_layout(rect=(0, 0.02, 1, 0.95))
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return len(infos)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark --benchmark-json output")
    parser.add_argument("-o", "--out", type=Path, help="PNG to write (default: <json stem>-attention.png beside it)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="entries to plot (default: cuda when present)")
    args = parser.parse_args(argv)
    out = args.out or args.json.with_name(f"{args.json.stem}-attention.png")
    count = plot(json.loads(args.json.read_text()), args.device, out)
    if not count:
        print(f"{args.json}: no {OP} benchmark entries{f' on {args.device}' if args.device else ''}", file=sys.stderr)
        return 1
    print(f"{out}: {count} attention cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())

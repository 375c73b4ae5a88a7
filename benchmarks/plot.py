#!/usr/bin/env python3
"""tkpy's attention against each peer, TFLOP/s over sequence length: one panel per head dim
(columns) and mask (rows: full, causal), a line for tkpy and one per peer, dashed for the backward
alone (``flash_attn_func.backward``'s ``bwd-`` cases). A peer that could not run a shape has no point
there (its record says why). Needs matplotlib, not tkpy.

``python -m tkpy bench --plot PNG`` draws it from its records, and so does this script from
pytest-benchmark's JSON (``pytest benchmarks --benchmark-json bench.json``):

    python benchmarks/plot.py bench.json -o attention.png
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

OP, BACKWARD_OP = "flash_attn_func", "flash_attn_func.backward"
STYLES = {OP: "-", BACKWARD_OP: "--"}


def plot_attention(records: list[dict[str, Any]], env: dict[str, Any], out: Path) -> int:
    """Draw the attention records (``cases.measure``'s) of one device into ``out``; returns how many."""
    records = [r for r in records if r.get("op") == OP or (r.get("op") == BACKWARD_OP and r.get("timed") == "backward"
                                                           and not r.get("deterministic"))]
    if not records:
        return 0
    # (head dim, causal) -> (name, line style) -> points
    panels: dict[tuple[int, bool], dict[tuple[str, str], list]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        lines, style = panels[r["head_dim"], r["causal"]], STYLES[r["op"]]
        lines["tkpy", style].append((r["seqlen"], r["tkpy_tflops"]))
        for name, other in r.get("other_kernels", {}).items():
            lines[f"tkpy {name}", style].append((r["seqlen"], other["tflops"]))
        for name, peer in r["peers"].items():
            if "tflops" in peer:
                lines[name, style].append((r["seqlen"], peer["tflops"]))
    head_dims = sorted({head_dim for head_dim, _ in panels})
    names = sorted({name for lines in panels.values() for name, _ in lines}, key=lambda n: (n != "tkpy", n))
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    fig, axes = plt.subplots(2, len(head_dims), figsize=(4.2 * len(head_dims), 7.2), sharey=True, squeeze=False)
    for row, causal in enumerate((False, True)):
        for col, head_dim in enumerate(head_dims):
            ax, lines = axes[row][col], panels.get((head_dim, causal), {})
            ax.set_title(f"D={head_dim}, {'causal' if causal else 'full'}", fontsize=10)
            for (name, style), points in lines.items():
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o", color=colors[name], linestyle=style,
                        linewidth=2.5 if name == "tkpy" else 1.5)
            seqlens = sorted({x for points in lines.values() for x, _ in points})
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqlens, [f"{s // 1024}k" if s % 1024 == 0 else str(s) for s in seqlens])
            ax.minorticks_off()
            ax.grid(True, alpha=0.3)
            ax.set_xlabel("sequence length S" if row == 1 else "")
            ax.set_ylabel("TFLOP/s" if col == 0 else "")
    axes[0][0].set_ylim(bottom=0)  # after plotting, so that the shared top fits every panel
    handles = [plt.Line2D([], [], color=colors[name], marker="o", label=name) for name in names]
    if any(r["op"] == BACKWARD_OP for r in records):
        handles.append(plt.Line2D([], [], color="gray", linestyle=STYLES[BACKWARD_OP], label="backward"))
    fig.legend(handles=handles, loc="upper right", ncol=len(handles), fontsize=9, bbox_to_anchor=(1.0, 0.99))
    on_gpu = records[0]["device"] == "cuda"
    where = env.get("gpu", {}).get("name") if on_gpu else "CPU path (says nothing about GPU speed)"
    fig.suptitle(f"tkpy flash_attn_func vs torch SDPA, bf16: {where}; torch {env.get('torch', '?')}",
                 x=0.01, ha="left", fontsize=11)
    fig.text(0.01, 0.005, f"FLOPs = 4·B·H·S²·D per call, halved for causal (backward: 2.5 times that); "
                          f"{records[0]['timer']}",
             fontsize=8, color="gray")
    fig.tight_layout(rect=(0, 0.02, 1, 0.95))
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return len(records)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark --benchmark-json output")
    parser.add_argument("-o", "--out", type=Path, help="PNG to write (default: <json stem>-attention.png beside it)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="records to plot (default: cuda when present)")
    args = parser.parse_args(argv)
    bench = json.loads(args.json.read_text())
    records = [entry.get("extra_info", {}) for entry in bench.get("benchmarks", [])]
    device = args.device or ("cuda" if any(r.get("device") == "cuda" for r in records) else "cpu")
    out = args.out or args.json.with_name(f"{args.json.stem}-attention.png")
    env = bench.get("machine_info", {}).get("tkpy", {})
    count = plot_attention([r for r in records if r.get("device") == device], env, out)
    if not count:
        print(f"{args.json}: no {OP} records on {device}", file=sys.stderr)
        return 1
    print(f"{out}: {count} attention cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())

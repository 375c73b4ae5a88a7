"""Shared test helpers: error metrics and random inputs."""

import torch

# Relative-error bounds ‖out − ref‖ / ‖ref‖ of DESIGN.md §7 (fp32 for the CPU path's fp32 math).
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 3e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("inf")  # NaN never passes
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def randn(shape, dtype, generator, device="cpu"):
    """Fresh standard-normal data in `dtype` (never zeros)."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


# What a rejected call may raise (NotImplementedError is a RuntimeError).
BAD_CALL_ERRORS = (RuntimeError, ValueError, TypeError)


def assert_bad_calls_survive(setup: str, calls) -> None:
    """Run every bad call in one fresh interpreter: each must raise one of BAD_CALL_ERRORS and the
    interpreter must end normally, never by a signal (a crash in native code)."""
    import subprocess
    import sys

    body = "\n".join(
        f"try:\n    {code}\n    print('NO ERROR: ' + {code!r})\nexcept (RuntimeError, ValueError, TypeError):\n    survived += 1"
        for code in calls
    )
    script = setup + "\nsurvived = 0\n" + body + f"\nprint('survived', survived, 'of', {len(calls)})\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"interpreter died with {proc.returncode}: {proc.stderr[-2000:]}"
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


def assert_bad_call_raises(setup: str, code: str, message: str) -> None:
    """Run `setup`, then `code`, which must raise one of BAD_CALL_ERRORS matching `message`."""
    import pytest

    env = {}
    exec(setup, env)
    with pytest.raises(BAD_CALL_ERRORS, match=message):
        exec(code, env)

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

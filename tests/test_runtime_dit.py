"""tkpy.runtime.dit: the video-DiT attention block (diffusers' Wan processor, which shares its
parts, is tested in test_integrations_diffusers.py).

The block is checked against a float64 version written here (its own 3D RoPE frequencies and
RIFLEx rule, softmax attention). Nothing expected is computed with tkpy.riflex or tkpy.rope.

Tolerance: tkpy attention runs in bf16, so an fp32 block rounds q, k, v and the attention output
to bf16 (unit roundoff 2^-9 each) while everything else stays fp32. That gives norm-relative
errors of a few 1e-3; REL_TOL[bf16] = 1e-2 (DESIGN.md §7) bounds them, and every test that
relies on RoPE or RIFLEx first checks that getting them wrong would cost far more.
"""

import math

import pytest
import torch

import dataclasses

from tkpy import UltraViCoConfig, reference
from tkpy.riflex import AxisSplit
from tkpy.runtime.dit import VideoDiTAttention

from helpers import REL_TOL, rel_err

TOL = REL_TOL[torch.bfloat16]


# ---------------------------------------------------------------------------------------------
# The block against a float64 version of itself


def _training_free(k: int, L_test: int, dim: int, theta: float):
    """RIFLEx's (k, L) for the temporal axis: component k changes only when L_test > N_k."""
    period = round(2 * math.pi * theta ** (2 * (k - 1) / dim))
    return (k, L_test) if L_test > period else None


def _axis_angles(dim: int, theta: float, length: int, riflex=None) -> torch.Tensor:
    """[length, dim/2] float64 angles pos·θ_j, θ_j = θ^(-2j/dim); ``riflex=(k, L)`` sets θ_k-1 = 0.9·2π/L."""
    freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if riflex is not None:
        k, L = riflex
        freqs[k - 1] = 0.9 * 2 * math.pi / L
    return torch.arange(length, dtype=torch.float64)[:, None] * freqs


def _angles_3d(grid, dims, theta, head_dim, riflex=None) -> torch.Tensor:
    """[T·H·W, head_dim/2] angles of tokens in (t, h, w) order; pairs past the split don't turn."""
    T, H, W = grid
    t = _axis_angles(dims[0], theta, T, riflex)[:, None, None].expand(T, H, W, -1)
    h = _axis_angles(dims[1], theta, H)[None, :, None].expand(T, H, W, -1)
    w = _axis_angles(dims[2], theta, W)[None, None, :].expand(T, H, W, -1)
    angles = torch.cat([t, h, w], dim=-1).reshape(T * H * W, -1)
    return torch.nn.functional.pad(angles, (0, head_dim // 2 - angles.shape[1]))


def _rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _reference_block(block, x, angles, qk_norm, eps=1e-6, ultravico=None):
    """float64 block: projections, RMSNorm, interleaved-pair RoPE from ``angles``, softmax attention
    (UltraViCo's, from reference.py, given its settings)."""
    p = {name: t.detach().double() for name, t in block.named_parameters()}
    x = x.double()
    if "to_qkv.weight" in p:
        q, k, v = torch.nn.functional.linear(x, p["to_qkv.weight"], p.get("to_qkv.bias")).chunk(3, dim=-1)
    else:
        q, k, v = (torch.nn.functional.linear(x, p[f"to_{n}.weight"], p.get(f"to_{n}.bias")) for n in "qkv")
    B, S, dim = x.shape
    H = block.num_heads
    if qk_norm == "rms_across_heads":
        q, k = _rms(q, p["norm_q.weight"], eps), _rms(k, p["norm_k.weight"], eps)
    q, k, v = (t.reshape(B, S, H, dim // H) for t in (q, k, v))
    if qk_norm == "rms_per_head":
        q, k = _rms(q, p["norm_q.weight"], eps), _rms(k, p["norm_k.weight"], eps)
    turn = torch.polar(torch.ones_like(angles), angles)[None, :, None]  # [1, S, 1, D/2]
    q, k = (torch.view_as_real(torch.view_as_complex(t.reshape(B, S, H, -1, 2).contiguous()) * turn).flatten(3)
            for t in (q, k))
    if ultravico is not None:
        out = reference.ultravico_attention(q, k, v, **ultravico)[0].reshape(B, S, dim)
        return torch.nn.functional.linear(out, p["to_out.weight"], p.get("to_out.bias"))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dim // H)
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(B, S, dim)
    return torch.nn.functional.linear(out, p["to_out.weight"], p.get("to_out.bias"))


def _randomise_norms(module, generator):
    """RMSNorm weights start at 1, which would hide a norm over the wrong dims or a missing one."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.5 * torch.randn(param.shape, generator=generator))


# (rope, head_dim, (t, h, w) dims, theta, k) as DESIGN.md §5 gives them, written out here.
SPLITS = {
    "wan": (64, (24, 20, 20), 10000.0, 6),
    "hunyuanvideo": (128, (16, 56, 56), 256.0, 4),
    "cogvideox": (64, (16, 24, 24), 10000.0, 2),
}


CONFIGS = [
    (rope, qk_norm, fused, (3, 5, 7))
    for rope in SPLITS
    for qk_norm in (None, "rms_per_head", "rms_across_heads")
    for fused in (True, False)
] + [("wan", "rms_across_heads", True, grid) for grid in ((1, 1, 2), (2, 3, 1), (4, 1, 3))]


@pytest.mark.parametrize("rope, qk_norm, fused_qkv, grid", CONFIGS)
def test_block_matches_float64_reference(rope, qk_norm, fused_qkv, grid, rng):
    head_dim, dims, theta, k = SPLITS[rope]
    torch.manual_seed(torch.randint(2**31, (1,), generator=rng).item())
    block = VideoDiTAttention(2 * head_dim, 2, rope=rope, qk_norm=qk_norm, fused_qkv=fused_qkv)
    _randomise_norms(block, rng)
    x = torch.randn(2, math.prod(grid), 2 * head_dim, generator=rng)
    with torch.no_grad():
        out = block(x, grid)
    # RIFLEx's rule with L_test = T: never active on these short grids for the real models' k.
    riflex = _training_free(k, grid[0], dims[0], theta)
    ref = _reference_block(block, x, _angles_3d(grid, dims, theta, head_dim, riflex), qk_norm)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert rel_err(out, ref) < TOL


def test_block_rope_is_not_a_no_op(rng):
    """RoPE turns q and k by enough that the block test would see it missing or on the wrong axis."""
    grid, (head_dim, dims, theta, _) = (3, 5, 7), SPLITS["wan"]
    block = VideoDiTAttention(2 * head_dim, 2, rope="wan", qk_norm="rms_across_heads")
    x = torch.randn(1, math.prod(grid), 2 * head_dim, generator=rng)
    right = _reference_block(block, x, _angles_3d(grid, dims, theta, head_dim), "rms_across_heads")
    for wrong in ((5, 3, 7), (7, 5, 3)):  # axes swapped
        wrong_ref = _reference_block(block, x, _angles_3d(wrong, dims, theta, head_dim), "rms_across_heads")
        assert rel_err(wrong_ref, right) > 5 * TOL
    no_rope = _reference_block(block, x, torch.zeros(math.prod(grid), head_dim // 2, dtype=torch.float64),
                               "rms_across_heads")
    assert rel_err(no_rope, right) > 5 * TOL


# A split whose intrinsic component is the fastest (period round(2π) = 6 frames), so that RIFLEx
# changes the output far beyond the tolerance even on a short clip.
FAST_SPLIT = AxisSplit(24, 20, 20, 10000.0, 1)
FAST_PERIOD = 6


@pytest.mark.parametrize("L_test", [FAST_PERIOD - 1, FAST_PERIOD, FAST_PERIOD + 1, 3 * FAST_PERIOD])
def test_block_riflex_training_free(L_test, rng):
    grid = (7, 3, 2)
    block = VideoDiTAttention(128, 2, rope=FAST_SPLIT, qk_norm="rms_per_head", fused_qkv=False)
    _randomise_norms(block, rng)
    with torch.no_grad():  # sharper attention, so that RIFLEx's change clears 3 x TOL for every seed
        block.norm_q.weight.mul_(1.5)
        block.norm_k.weight.mul_(1.5)
    x = torch.randn(1, math.prod(grid), 128, generator=rng)
    with torch.no_grad():
        out = block(x, grid, L_test=L_test)
    rule = _training_free(1, L_test, 24, 1e4)
    assert (rule is not None) == (L_test > FAST_PERIOD)
    riflex = _reference_block(block, x, _angles_3d(grid, (24, 20, 20), 1e4, 64, rule), "rms_per_head")
    plain = _reference_block(block, x, _angles_3d(grid, (24, 20, 20), 1e4, 64), "rms_per_head")
    assert rel_err(out, riflex) < TOL
    if L_test == 3 * FAST_PERIOD:  # far enough past N_k that a missing RIFLEx could not pass
        assert rel_err(riflex, plain) > 3 * TOL


def test_block_riflex_default_L_test_is_T_and_modes(rng):
    grid = (FAST_PERIOD + 2, 2, 3)
    x = torch.randn(1, math.prod(grid), 128, generator=rng)
    angles = {
        "training_free": _angles_3d(grid, (24, 20, 20), 1e4, 64, (1, grid[0])),  # L_test = T > N_k
        "fine_tuned": _angles_3d(grid, (24, 20, 20), 1e4, 64, (1, FAST_PERIOD)),  # L = N_k
        "off": _angles_3d(grid, (24, 20, 20), 1e4, 64),
    }
    for mode, angle in angles.items():
        block = VideoDiTAttention(128, 2, rope=FAST_SPLIT, riflex_mode=mode)
        with torch.no_grad():
            out = block(x, grid)
        assert rel_err(out, _reference_block(block, x, angle, None)) < TOL, mode


def test_block_bf16(rng):
    grid, (head_dim, dims, theta, _) = (3, 5, 7), SPLITS["hunyuanvideo"]
    block = VideoDiTAttention(2 * head_dim, 2, rope="hunyuanvideo", qk_norm="rms_per_head").bfloat16()
    x = torch.randn(1, math.prod(grid), 2 * head_dim, generator=rng).bfloat16()
    with torch.no_grad():
        out = block(x, grid)
    assert out.dtype == torch.bfloat16
    # bf16 projections and norms round at every step as well: twice the attention-only bound.
    assert rel_err(out, _reference_block(block, x, _angles_3d(grid, dims, theta, head_dim), "rms_per_head")) < 2 * TOL


@pytest.mark.parametrize("riflex_mode", ["off", "training_free"])
def test_block_ultravico_matches_reference(riflex_mode, rng):
    """UltraViCo's decay in the block, tokens_per_frame from the grid (H·W = 6), with RIFLEx off
    (as the authors ran it) or on (both)."""
    grid = (FAST_PERIOD + 3, 2, 3)
    config = UltraViCoConfig(tokens_per_frame=1, train_frames=4, alpha=0.0, first_frame_mask=True)
    block = VideoDiTAttention(128, 2, rope=FAST_SPLIT, qk_norm="rms_per_head", riflex_mode=riflex_mode,
                              ultravico=config)
    _randomise_norms(block, rng)
    x = torch.randn(1, math.prod(grid), 128, generator=rng) * 4
    with torch.no_grad():
        out = block(x, grid)
    riflex = (1, grid[0]) if riflex_mode == "training_free" else None
    angles = _angles_3d(grid, (24, 20, 20), 1e4, 64, riflex)
    settings = dataclasses.asdict(dataclasses.replace(config, tokens_per_frame=6))
    ref = _reference_block(block, x, angles, "rms_per_head", ultravico=settings)
    assert rel_err(out, ref) < TOL
    assert rel_err(_reference_block(block, x, angles, "rms_per_head"), ref) > 3 * TOL  # the decay matters
    with pytest.raises(NotImplementedError, match="no backward"):
        block(x.requires_grad_(), grid)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: VideoDiTAttention(96, 3), "head_dim in"),  # head dim 32
        (lambda: VideoDiTAttention(128, 3), "multiple of num_heads"),
        (lambda: VideoDiTAttention(128, 2, qk_norm="layer"), "qk_norm"),
        (lambda: VideoDiTAttention(128, 2, riflex_mode="always"), "riflex_mode"),
        (lambda: VideoDiTAttention(128, 2, rope="sora"), "unknown model"),
        (lambda: VideoDiTAttention(128, 2, rope="hunyuanvideo"), "head_dim 128"),
        (lambda: VideoDiTAttention(128, 2, rope=AxisSplit(32, 24, 24, 1e4, 1)), "more than head_dim"),
    ],
)
def test_block_rejects_bad_configuration(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_block_refuses_an_ultravico_that_is_no_config():
    with pytest.raises(TypeError, match="ultravico must be a tkpy.ultravico.UltraViCoConfig or None"):
        VideoDiTAttention(128, 2, ultravico={"alpha": 0.9})


def test_block_rejects_bad_input(rng):
    block = VideoDiTAttention(128, 2)
    x = torch.randn(1, 105, 128, generator=rng)
    with torch.no_grad(), pytest.raises(ValueError, match=r"T·H·W"):
        block(x, (3, 5, 6))
    with torch.no_grad(), pytest.raises(ValueError, match=r"T·H·W"):
        block(x[0], (3, 5, 7))
    with torch.no_grad(), pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        block.double()(x.double(), (3, 5, 7))

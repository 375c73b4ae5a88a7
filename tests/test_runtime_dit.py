"""tkpy.runtime.dit: the video-DiT attention block and the diffusers Wan attention processor.

The block is checked against a float64 version written here (its own 3D RoPE frequencies and
RIFLEx rule, softmax attention); the processor against diffusers' stock Wan processor on a tiny
random transformer. Nothing expected is computed with tkpy.riflex or tkpy.rope.

Tolerance: tkpy attention runs in bf16, so an fp32 block or model rounds q, k, v and the
attention output to bf16 (unit roundoff 2^-9 each) while everything else stays fp32. That gives
norm-relative errors of a few 1e-3; REL_TOL[bf16] = 1e-2 (DESIGN.md §7) bounds them, and every
test that relies on RoPE or RIFLEx first checks that getting them wrong would cost far more.
"""

import copy
import math

import pytest
import torch

from tkpy.riflex import AxisSplit
from tkpy.runtime.dit import VideoDiTAttention, WanAttnProcessor, use_tkpy_attention

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


def _reference_block(block, x, angles, qk_norm, eps=1e-6):
    """float64 block: projections, RMSNorm, interleaved-pair RoPE from ``angles``, softmax attention."""
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


def test_block_rejects_bad_input(rng):
    block = VideoDiTAttention(128, 2)
    x = torch.randn(1, 105, 128, generator=rng)
    with torch.no_grad(), pytest.raises(ValueError, match=r"T·H·W"):
        block(x, (3, 5, 6))
    with torch.no_grad(), pytest.raises(ValueError, match=r"T·H·W"):
        block(x[0], (3, 5, 7))
    with torch.no_grad(), pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        block.double()(x.double(), (3, 5, 7))


# ---------------------------------------------------------------------------------------------
# The processor against diffusers' stock Wan processor


@pytest.fixture(scope="module")
def diffusers():
    """diffusers, or a skip of the test that asks for it: the block tests above run without it."""
    return pytest.importorskip("diffusers")


LATENTS = (3, 10, 14)  # (F, H, W) latents; patch (1, 2, 2) gives the odd token grid (3, 5, 7)


def _tiny_wan(diffusers, rng, **config):
    torch.manual_seed(torch.randint(2**31, (1,), generator=rng).item())
    model = diffusers.WanTransformer3DModel(
        num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4, text_dim=16, freq_dim=32,
        ffn_dim=32, num_layers=2, **config,
    ).eval()
    _randomise_norms(model, rng)
    return model


def _inputs(rng, latents=LATENTS):
    return dict(
        hidden_states=torch.randn(1, 4, *latents, generator=rng),
        timestep=torch.randint(0, 1000, (1,), generator=rng),
        encoder_hidden_states=torch.randn(1, 9, 16, generator=rng),
        return_dict=False,
    )


@pytest.mark.parametrize("install", ["set_attn_processor", "use_tkpy_attention"])
@pytest.mark.parametrize("fused", [False, True])
def test_wan_processor_matches_stock(install, fused, rng, diffusers):
    stock = _tiny_wan(diffusers, rng)
    if fused:
        stock.fuse_qkv_projections()
    tk = copy.deepcopy(stock)
    if install == "set_attn_processor":
        tk.set_attn_processor(WanAttnProcessor())
    else:
        use_tkpy_attention(tk)
    inputs = _inputs(rng)
    # Each attention on its own (self-attention with RoPE, and cross-attention), then the model.
    x = torch.randn(1, math.prod(LATENTS) // 4, 128, generator=rng)
    text = torch.randn(1, 9, 128, generator=rng)
    with torch.no_grad():
        latents = inputs["hidden_states"]
        ref = stock.blocks[0].attn1(x, None, None, stock.rope(latents))
        # Named, so that a failure says which comparison it was: a RoPE bug (wrong pair layout,
        # angles or axis) moves the self-attention by 0.25-0.55 and the model by only ~1e-2.
        err = rel_err(tk.blocks[0].attn1(x, None, None, tk.rope(latents)), ref)
        assert err < TOL, f"self-attention with RoPE: rel err {err:.3g}"
        err = rel_err(tk.blocks[0].attn2(x, text), stock.blocks[0].attn2(x, text))
        assert err < TOL, f"cross-attention: rel err {err:.3g}"
        err = rel_err(tk(**inputs)[0], stock(**inputs)[0])
        assert err < TOL, f"whole model: rel err {err:.3g}"


def test_wan_processor_rope_matters(rng, diffusers):
    """Without RoPE, stock Wan's self-attention moves by far more than the tolerance."""
    stock = _tiny_wan(diffusers, rng)
    x = torch.randn(1, math.prod(LATENTS) // 4, 128, generator=rng)
    with torch.no_grad():
        rope = stock.rope(torch.zeros(1, 4, *LATENTS))
        assert rel_err(stock.blocks[0].attn1(x, None, None, None), stock.blocks[0].attn1(x, None, None, rope)) > 5 * TOL


class _TableRope(torch.nn.Module):
    """Stock Wan RoPE with RIFLEx written in by hand: pair (2k-2, 2k-1) turns at 0.9·2π/L per frame."""

    def __init__(self, rope, k, L):
        super().__init__()
        self.rope, self.k, self.L = rope, k, L

    def forward(self, hidden_states):
        cos, sin = self.rope(hidden_states)
        frames = hidden_states.shape[2]
        angle = torch.arange(frames, dtype=torch.float64) * (0.9 * 2 * math.pi / self.L)
        pair = slice(2 * self.k - 2, 2 * self.k)
        cos, sin = cos.clone().view(frames, -1, cos.shape[-1]), sin.clone().view(frames, -1, sin.shape[-1])
        cos[..., pair], sin[..., pair] = angle.cos()[:, None, None].float(), angle.sin()[:, None, None].float()
        return cos.view(1, -1, 1, cos.shape[-1]), sin.view(1, -1, 1, sin.shape[-1])


def _per_axis_columns(cos, sin, grid):
    """Stock Wan (cos, sin) [1, S, 1, 64] -> per-axis complex tables [T, 12], [H, 10], [W, 10]."""
    T, H, W = grid
    table = torch.complex(cos[..., 0::2], sin[..., 1::2]).reshape(T, H, W, 32).to(torch.complex128)
    return table[:, 0, 0, :12], table[0, :, 0, 12:22], table[0, 0, :, 22:]


# Wan's temporal component k = 1 has period round(2π) = 6 latent frames (N_k). A clip of 49 frames
# has L_test = 13 latent frames, where RIFLEx turns that component at 0.9·2π/13 instead of 1 per
# frame: a change to one of 32 pairs, but one that moves a random Wan self-attention by 6–26%.
@pytest.mark.parametrize("num_frames, L_test", [(21, FAST_PERIOD), (49, 13)])
def test_wan_riflex_changes_exactly_component_k(num_frames, L_test, rng, diffusers):
    stock = _tiny_wan(diffusers, rng)
    tk = use_tkpy_attention(copy.deepcopy(stock), num_frames=num_frames, k=1)
    inputs = _inputs(rng, latents=(7, 4, 6))
    latents, grid = inputs["hidden_states"], (7, 2, 3)
    x = torch.randn(1, math.prod(grid), 128, generator=rng)
    active = L_test > FAST_PERIOD  # the training-free rule
    expected_rope = _TableRope(stock.rope, 1, L_test) if active else stock.rope
    with torch.no_grad():
        rope = tk.rope(latents)
        # The tables: only column k - 1 of the temporal axis differs from diffusers'.
        stock_tables = _per_axis_columns(*stock.rope(latents), grid)
        for name, ours, theirs in zip("thw", (rope.freqs_t, rope.freqs_h, rope.freqs_w), stock_tables):
            if name == "t" and active:
                angle = torch.arange(7, dtype=torch.float64) * (0.9 * 2 * math.pi / L_test)
                torch.testing.assert_close(ours[:, 0].cdouble(), torch.polar(torch.ones_like(angle), angle),
                                           rtol=0, atol=2e-6)
                ours, theirs = ours[:, 1:], theirs[:, 1:]
            torch.testing.assert_close(ours.cdouble(), theirs, rtol=0, atol=2e-6)
        # The self-attention and the model against the stock processor on RIFLEx tables made here.
        attn_ref = stock.blocks[0].attn1(x, None, None, expected_rope(latents))
        attn_plain = stock.blocks[0].attn1(x, None, None, stock.rope(latents))
        assert rel_err(tk.blocks[0].attn1(x, None, None, rope), attn_ref) < TOL
        if active:
            assert rel_err(attn_ref, attn_plain) > 3 * TOL  # so a missing RIFLEx could not pass
        ours = tk(**inputs)[0]
        stock.rope = expected_rope
        assert rel_err(ours, stock(**inputs)[0]) < TOL


def _tiny_hunyuanvideo(diffusers, rng):
    torch.manual_seed(torch.randint(2**31, (1,), generator=rng).item())
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=1, attention_head_dim=128, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8,
    )


def test_other_models_are_refused(rng, diffusers):
    hunyuan = _tiny_hunyuanvideo(diffusers, rng)
    with pytest.raises(ValueError, match="HunyuanVideoTransformer3DModel is not supported"):
        use_tkpy_attention(hunyuan)
    cog = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=1, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=16, num_layers=1, sample_width=4, sample_height=4, sample_frames=9,
    )
    with pytest.raises(ValueError, match="CogVideoXTransformer3DModel is not supported"):
        use_tkpy_attention(cog)
    # Set per module on a model it doesn't support, the processor refuses at its first call.
    hunyuan.set_attn_processor(WanAttnProcessor())
    inputs = dict(hidden_states=torch.randn(1, 4, 1, 4, 4), timestep=torch.tensor([1]),
                  encoder_hidden_states=torch.randn(1, 3, 16), encoder_attention_mask=torch.ones(1, 3),
                  pooled_projections=torch.randn(1, 8), guidance=torch.tensor([1000.0]), return_dict=False)
    with torch.no_grad(), pytest.raises(ValueError, match="supports diffusers' Wan attention"):
        hunyuan(**inputs)


def test_wan_unsupported_uses_are_refused(rng, diffusers):
    from diffusers.models.transformers.transformer_wan import WanAttention

    from tkpy.integrations.diffusers import apply_riflex

    x = torch.randn(1, 6, 128, generator=rng)
    i2v = WanAttention(128, heads=2, dim_head=64, added_kv_proj_dim=16, cross_attention_dim_head=64)
    with torch.no_grad(), pytest.raises(ValueError, match="image-to-video"):
        WanAttnProcessor()(i2v, x, torch.randn(1, 520, 128, generator=rng))
    self_attn = WanAttention(128, heads=2, dim_head=64)
    with torch.no_grad(), pytest.raises(ValueError, match="attention_mask"):
        WanAttnProcessor()(self_attn, x, None, torch.ones(1, 1, 6, 6, dtype=torch.bool))
    narrow = WanAttention(64, heads=2, dim_head=32)
    with torch.no_grad(), pytest.raises(ValueError, match="head_dim in"):
        WanAttnProcessor()(narrow, torch.randn(1, 6, 64, generator=rng))

    model = _tiny_wan(diffusers, rng)
    with pytest.raises(ValueError, match="mode must be"):
        use_tkpy_attention(model, num_frames=33, mode="always")
    with pytest.raises(ValueError, match="k must be in"):
        use_tkpy_attention(model, num_frames=33, k=13)
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        use_tkpy_attention(model, num_frames=0)
    assert isinstance(model.rope, diffusers.models.transformers.transformer_wan.WanRotaryPosEmbed)  # untouched
    apply_riflex(model, num_frames=4 * 400 + 1)
    with pytest.raises(ValueError, match="apply_riflex"):
        use_tkpy_attention(model)
    with pytest.raises(ValueError, match="head_dim in"):
        use_tkpy_attention(diffusers.WanTransformer3DModel(
            num_attention_heads=2, attention_head_dim=48, in_channels=4, out_channels=4, text_dim=16,
            freq_dim=32, ffn_dim=32, num_layers=1))
    fp64 = use_tkpy_attention(_tiny_wan(diffusers, rng).double())
    inputs = _inputs(rng)
    inputs["hidden_states"], inputs["encoder_hidden_states"] = (
        inputs["hidden_states"].double(), inputs["encoder_hidden_states"].double())
    with torch.no_grad(), pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        fp64(**inputs)

"""tkpy.integrations.diffusers: RIFLEx on tiny random HunyuanVideo, Wan and CogVideoX models, and
the tkpy Wan attention processor against diffusers' stock one.

Every expected value is computed here from the RIFLEx formula, not with tkpy.riflex or tkpy.rope.

Processor tolerance: tkpy attention runs in bf16, so an fp32 model rounds q, k, v and the
attention output to bf16 (unit roundoff 2^-9 each) while everything else stays fp32. That gives
norm-relative errors of a few 1e-3; REL_TOL[bf16] = 1e-2 (DESIGN.md §7) bounds them, and every
test that relies on RoPE or RIFLEx first checks that getting them wrong would cost far more.
"""

import copy
import math
from dataclasses import dataclass, replace
from typing import Callable

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import tkpy.integrations.diffusers as tkpy_diffusers  # noqa: E402
from tkpy import UltraViCoConfig, reference  # noqa: E402
from tkpy.integrations.diffusers import WanAttnProcessor, apply_riflex, use_tkpy_attention  # noqa: E402

from helpers import REL_TOL, rel_err  # noqa: E402

TOL = REL_TOL[torch.bfloat16]

CPU = torch.device("cpu")
# Spatial latent size 4x4 with patch 2 gives a 2x2 token grid per frame.
LATENT_HW = 4
# CogVideoX pipelines map height/width in pixels to that grid: 4 latents x VAE factor 8.
PIXELS_HW = LATENT_HW * 8


def _model_class(name):
    cls = getattr(diffusers, name, None)
    if cls is None:
        pytest.skip(f"diffusers {diffusers.__version__} has no {name}")
    return cls


@dataclass
class Case:
    """A tiny model, how to ask it for its RoPE, and its temporal axis as RIFLEx sees it."""

    target: object  # what apply_riflex gets
    rope: Callable[[int], tuple]  # latent frames -> the model's (cos, sin) as it is now
    patch_t: int  # latent frames per RoPE position
    t_dim: int
    theta: float
    k: int

    @property
    def period(self) -> int:
        """N_k, the period of component k in RoPE positions."""
        return round(2 * math.pi * self.theta ** (2 * (self.k - 1) / self.t_dim))

    def num_frames(self, rope_len: int) -> int:
        """Video frames whose latent clip spans ``rope_len`` RoPE positions (VAE compression 4)."""
        return 4 * (rope_len * self.patch_t - 1) + 1


def _hunyuanvideo() -> Case:
    cls = _model_class("HunyuanVideoTransformer3DModel")
    torch.manual_seed(0)
    model = cls(
        in_channels=4, out_channels=4, num_attention_heads=1, attention_head_dim=128, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8,
    )
    return Case(model, lambda f: model.rope(torch.zeros(1, 4, f, LATENT_HW, LATENT_HW)), 1, 16, 256.0, 4)


def _wan() -> Case:
    cls = _model_class("WanTransformer3DModel")
    torch.manual_seed(0)
    model = cls(
        num_attention_heads=1, attention_head_dim=128, in_channels=4, out_channels=4, text_dim=16, freq_dim=32,
        ffn_dim=32, num_layers=1,
    )
    # Wan's split for head dim 128: t = 128 - 4 * (128 // 6) = 44.
    return Case(model, lambda f: model.rope(torch.zeros(1, 4, f, LATENT_HW, LATENT_HW)), 1, 44, 10000.0, 6)


def _cogvideox(patch_size_t=None) -> Case:
    cls = _model_class("CogVideoXTransformer3DModel")
    pytest.importorskip("transformers", reason="diffusers' CogVideoX pipelines need transformers")
    torch.manual_seed(0)
    model = cls(
        num_attention_heads=1, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=16, num_layers=1, sample_width=LATENT_HW, sample_height=LATENT_HW, sample_frames=9,
        patch_size_t=patch_size_t, use_rotary_positional_embeddings=True,
    )
    pipe = _model_class("CogVideoXPipeline")(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=None)

    def rope(f):
        return pipe._prepare_rotary_positional_embeddings(PIXELS_HW, PIXELS_HW, f, CPU)

    # CogVideoX's split for head dim 64: t = 64 / 4 = 16.
    return Case(pipe, rope, patch_size_t or 1, 16, 10000.0, 2)


CASES = {
    "hunyuanvideo": _hunyuanvideo,
    "wan": _wan,
    "cogvideox": _cogvideox,
    "cogvideox1.5": lambda: _cogvideox(patch_size_t=2),
}


@pytest.fixture(params=list(CASES))
def case(request) -> Case:
    return CASES[request.param]()


def _per_frame(table: torch.Tensor, rope_len: int) -> torch.Tensor:
    """[rope_len, tokens per frame, D] view of a (t, h, w)-ordered table ([S, D] or [1, S, 1, D])."""
    return table.reshape(rope_len, -1, table.shape[-1])


def _assert_riflex_component(case, before, after, rope_len, L):
    """``after`` equals ``before`` except component k, which is cos/sin(t · 0.9 · 2π / L)."""
    pair = [2 * case.k - 2, 2 * case.k - 1]
    others = [d for d in range(before[0].shape[-1]) if d not in pair]
    angle = torch.arange(rope_len, dtype=torch.float64) * (0.9 * 2 * math.pi / L)
    for old, new, fn in zip(before, after, (torch.cos, torch.sin)):
        assert new.shape == old.shape and new.dtype == old.dtype and new.device == old.device
        old, new = _per_frame(old, rope_len), _per_frame(new, rope_len)
        assert torch.equal(new[..., others], old[..., others])
        expected = fn(angle)[:, None, None].expand(-1, new.shape[1], 2)
        torch.testing.assert_close(new[..., pair].double(), expected, rtol=0, atol=2e-6)


def test_known_periods():
    # The intrinsic periods in RIFLEx's paper (HunyuanVideo, CogVideoX-5B) and Wan2.1's.
    assert Case(None, None, 1, 16, 256.0, 4).period == 50
    assert Case(None, None, 1, 16, 10000.0, 2).period == 20
    assert Case(None, None, 1, 44, 10000.0, 6).period == 51


@pytest.mark.parametrize("mode", ["off", "training_free"])
def test_unchanged_without_riflex(case, mode):
    # L_test == N_k: training-free RIFLEx is not needed yet; "off" never changes RoPE.
    rope_len = case.period
    latent = rope_len * case.patch_t
    before = case.rope(latent)
    assert apply_riflex(case.target, case.num_frames(rope_len), mode=mode) is case.target
    after = case.rope(latent)
    for old, new in zip(before, after):
        assert torch.equal(new, old) and new.dtype == old.dtype


def test_training_free_changes_only_component_k(case):
    rope_len = case.period + 7
    latent = rope_len * case.patch_t
    before = case.rope(latent)
    apply_riflex(case.target, case.num_frames(rope_len))
    after = case.rope(latent)
    _assert_riflex_component(case, before, after, rope_len, L=rope_len)
    pair = slice(2 * case.k - 2, 2 * case.k)
    assert not torch.equal(_per_frame(after[0], rope_len)[..., pair], _per_frame(before[0], rope_len)[..., pair])


def test_fine_tuned_uses_period(case):
    rope_len = 5
    latent = rope_len * case.patch_t
    before = case.rope(latent)
    apply_riflex(case.target, case.num_frames(rope_len), mode="fine_tuned")
    _assert_riflex_component(case, before, case.rope(latent), rope_len, L=case.period)


def test_explicit_k(case):
    rope_len = case.period + 3
    latent = rope_len * case.patch_t
    before = case.rope(latent)
    apply_riflex(case.target, case.num_frames(rope_len), k=1)
    _assert_riflex_component(replace(case, k=1), before, case.rope(latent), rope_len, L=rope_len)


def test_reapplying_replaces_and_off_restores(case):
    rope_len = case.period + 7
    latent = rope_len * case.patch_t
    before = case.rope(latent)
    apply_riflex(case.target, case.num_frames(rope_len + 10))
    apply_riflex(case.target, case.num_frames(rope_len))
    _assert_riflex_component(case, before, case.rope(latent), rope_len, L=rope_len)
    apply_riflex(case.target, case.num_frames(rope_len), mode="off")
    for old, new in zip(before, case.rope(latent)):
        assert torch.equal(new, old)


def _forward(name, case, latent):
    """One forward pass of the tiny transformer on fixed random inputs."""
    gen = torch.Generator().manual_seed(1)
    text = torch.randn(1, 3, 16, generator=gen)
    timestep = torch.tensor([500])
    if name == "hunyuanvideo":
        return case.target(
            torch.randn(1, 4, latent, LATENT_HW, LATENT_HW, generator=gen), timestep, text,
            torch.ones(1, 3, dtype=torch.bool), torch.randn(1, 8, generator=gen), guidance=torch.tensor([3.0]),
        ).sample
    if name == "wan":
        return case.target(torch.randn(1, 4, latent, LATENT_HW, LATENT_HW, generator=gen), timestep, text).sample
    return case.target.transformer(
        torch.randn(1, latent, 4, LATENT_HW, LATENT_HW, generator=gen), text, timestep, image_rotary_emb=case.rope(latent)
    ).sample


@pytest.mark.parametrize("name", list(CASES))
def test_patched_model_runs(name):
    case = CASES[name]()
    rope_len = case.period + 2
    latent = rope_len * case.patch_t
    with torch.no_grad():
        reference = _forward(name, case, latent)
        apply_riflex(case.target, case.num_frames(rope_len))
        patched = _forward(name, case, latent)
        assert patched.shape == reference.shape and torch.isfinite(patched).all()
        assert not torch.equal(patched, reference)
        apply_riflex(case.target, case.num_frames(rope_len), mode="off")
        assert torch.equal(_forward(name, case, latent), reference)


def test_wan_pipeline_patches_both_experts():
    experts = [_wan().target, _wan().target]
    pipe = _model_class("WanPipeline")(
        tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=experts[0], transformer_2=experts[1]
    )
    rope_len = 60
    before = experts[0].rope(torch.zeros(1, 4, rope_len, LATENT_HW, LATENT_HW))
    apply_riflex(pipe, 4 * (rope_len - 1) + 1)
    for expert in experts:
        after = expert.rope(torch.zeros(1, 4, rope_len, LATENT_HW, LATENT_HW))
        _assert_riflex_component(Case(None, None, 1, 44, 10000.0, 6), before, after, rope_len, L=rope_len)


def test_bad_targets():
    with pytest.raises(ValueError, match=r"unsupported target Linear; expected .*HunyuanVideoTransformer3DModel"):
        apply_riflex(torch.nn.Linear(2, 2), 129)
    with pytest.raises(ValueError, match="unsupported target str"):
        apply_riflex("hunyuanvideo", 129)


def test_bare_cogvideox_transformer_is_refused():
    pipe = _cogvideox().target
    with pytest.raises(ValueError, match="pass the CogVideoX pipeline"):
        apply_riflex(pipe.transformer, 129)


def test_cogvideox_without_rope_is_refused():
    pytest.importorskip("transformers", reason="diffusers' CogVideoX pipelines need transformers")
    model = _model_class("CogVideoXTransformer3DModel")(
        num_attention_heads=1, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=16, num_layers=1, sample_width=LATENT_HW, sample_height=LATENT_HW, sample_frames=9,
    )
    pipe = _model_class("CogVideoXPipeline")(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=None)
    with pytest.raises(ValueError, match="no rotary embedding"):
        apply_riflex(pipe, 129)


def test_bad_arguments_leave_model_untouched():
    case = _hunyuanvideo()
    original = case.target.rope
    with pytest.raises(ValueError, match="mode"):
        apply_riflex(case.target, 241, mode="extrapolate")
    with pytest.raises(ValueError, match="k must be in"):
        apply_riflex(case.target, 241, k=9)
    with pytest.raises(ValueError, match="num_frames"):
        apply_riflex(case.target, 0)
    assert case.target.rope is original


# ---------------------------------------------------------------------------------------------
# The tkpy Wan attention processor against diffusers' stock Wan processor


def _randomise_norms(module, generator):
    """RMSNorm weights start at 1, which would hide a norm over the wrong dims or a missing one."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.5 * torch.randn(param.shape, generator=generator))


# N_k of Wan's temporal component k = 1 (see test_wan_riflex_changes_exactly_component_k).
FAST_PERIOD = 6


LATENTS = (3, 10, 14)  # (F, H, W) latents; patch (1, 2, 2) gives the odd token grid (3, 5, 7)


def _tiny_wan(rng, **config):
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
def test_wan_processor_matches_stock(install, fused, rng):
    stock = _tiny_wan(rng)
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


def test_wan_processor_rope_matters(rng):
    """Without RoPE, stock Wan's self-attention moves by far more than the tolerance."""
    stock = _tiny_wan(rng)
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
def test_wan_riflex_changes_exactly_component_k(num_frames, L_test, rng):
    stock = _tiny_wan(rng)
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


def _recorded_self_attention(model, x, latents, monkeypatch):
    """q, k, v that a tkpy Wan processor hands to tkpy.runtime.dit.attention for blocks[0].attn1."""
    recorded = []
    original = tkpy_diffusers.attention

    def record(q, k, v, ultravico=None):
        recorded.append((q, k, v))
        return original(q, k, v, ultravico)

    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(tkpy_diffusers, "attention", record)
        model.blocks[0].attn1(x, None, None, model.rope(latents))
    return recorded[0]


@pytest.mark.parametrize("extrapolation", ["ultravico", "both"])
def test_wan_ultravico_self_attention_matches_reference(extrapolation, rng, monkeypatch):
    """Self-attention decays as reference.ultravico_attention on the processor's own q, k, v
    (whose RoPE test_wan_processor_matches_stock checks), tokens_per_frame from the grid (2·3);
    cross-attention and, for "ultravico", RoPE stay plain; "both" also takes RIFLEx's RoPE."""
    stock = _tiny_wan(rng)
    config = UltraViCoConfig(tokens_per_frame=1, train_frames=2, alpha=0.0, first_frame_mask=True)
    num_frames = 4 * (3 * FAST_PERIOD - 1) + 1  # L_test = 3·N_k: RIFLEx is active for "both"
    tk = use_tkpy_attention(copy.deepcopy(stock), num_frames=num_frames, k=1, extrapolation=extrapolation,
                            ultravico=config)
    plain = use_tkpy_attention(copy.deepcopy(stock), num_frames=num_frames if extrapolation == "both" else None, k=1)
    latents, grid = torch.randn(1, 4, 7, 4, 6, generator=rng), (7, 2, 3)
    x = torch.randn(1, math.prod(grid), 128, generator=rng) * 4
    q, k, v = _recorded_self_attention(plain, x, latents, monkeypatch)
    settings = {**config.__dict__, "tokens_per_frame": 6}
    attn = plain.blocks[0].attn1
    with torch.no_grad():
        ref = reference.ultravico_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), **settings)[0]
        expected = attn.to_out[1](attn.to_out[0](ref.float().flatten(2)))
        ours = tk.blocks[0].attn1(x, None, None, tk.rope(latents))
        undecayed = attn(x, None, None, plain.rope(latents))
        assert rel_err(ours, expected) < TOL
        assert rel_err(undecayed, expected) > 3 * TOL, "the decay must matter"
        text = torch.randn(1, 9, 128, generator=rng)
        assert torch.equal(tk.blocks[0].attn2(x, text), plain.blocks[0].attn2(x, text))
    assert tk.rope.L_test == (None if extrapolation == "ultravico" else 3 * FAST_PERIOD)
    inputs = _inputs(rng)
    with torch.no_grad():
        assert tk(**inputs)[0].isfinite().all()


def test_wan_ultravico_defaults_to_the_wan21_preset(rng):
    model = use_tkpy_attention(_tiny_wan(rng), extrapolation="ultravico")
    processor = model.blocks[0].attn1.processor
    assert processor.ultravico == UltraViCoConfig.wan21()


def test_wan_ultravico_refusals(rng):
    model = _tiny_wan(rng)
    with pytest.raises(ValueError, match="extrapolation must be one of"):
        use_tkpy_attention(model, extrapolation="yarn")
    with pytest.raises(ValueError, match="needs extrapolation='ultravico' or 'both'"):
        use_tkpy_attention(model, ultravico=UltraViCoConfig.wan21())
    with pytest.raises(TypeError, match="ultravico must be a tkpy.ultravico.UltraViCoConfig"):
        use_tkpy_attention(model, extrapolation="ultravico", ultravico={"alpha": 0.9})
    with pytest.raises(TypeError, match="ultravico must be a tkpy.ultravico.UltraViCoConfig"):
        WanAttnProcessor({"alpha": 0.9})
    with pytest.raises(ValueError, match="extrapolation='both' needs num_frames"):
        use_tkpy_attention(model, extrapolation="both")
    assert isinstance(model.rope, diffusers.models.transformers.transformer_wan.WanRotaryPosEmbed)  # untouched
    # Set alone, the processor has diffusers' tables, not the grid UltraViCo needs.
    model.set_attn_processor(WanAttnProcessor(UltraViCoConfig.wan21()))
    with torch.no_grad(), pytest.raises(ValueError, match="UltraViCo needs the token grid"):
        model(**_inputs(rng))


def _tiny_hunyuanvideo(rng):
    torch.manual_seed(torch.randint(2**31, (1,), generator=rng).item())
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=1, attention_head_dim=128, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8,
    )


def test_other_models_are_refused(rng):
    hunyuan = _tiny_hunyuanvideo(rng)
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


def test_wan_unsupported_uses_are_refused(rng):
    from diffusers.models.transformers.transformer_wan import WanAttention

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

    model = _tiny_wan(rng)
    with pytest.raises(ValueError, match="mode must be"):
        use_tkpy_attention(model, num_frames=33, mode="always")
    with pytest.raises(ValueError, match="k must be in"):
        use_tkpy_attention(model, num_frames=33, k=13)
    with pytest.raises(ValueError, match="num_frames must be an int >= 1"):
        use_tkpy_attention(model, num_frames=0)
    assert isinstance(model.rope, diffusers.models.transformers.transformer_wan.WanRotaryPosEmbed)  # untouched
    apply_riflex(model, num_frames=4 * 400 + 1)
    with pytest.raises(ValueError, match="apply_riflex"):
        use_tkpy_attention(model)
    with pytest.raises(ValueError, match="head_dim in"):
        use_tkpy_attention(diffusers.WanTransformer3DModel(
            num_attention_heads=2, attention_head_dim=48, in_channels=4, out_channels=4, text_dim=16,
            freq_dim=32, ffn_dim=32, num_layers=1))
    fp64 = use_tkpy_attention(_tiny_wan(rng).double())
    inputs = _inputs(rng)
    inputs["hidden_states"], inputs["encoder_hidden_states"] = (
        inputs["hidden_states"].double(), inputs["encoder_hidden_states"].double())
    with torch.no_grad(), pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        fp64(**inputs)

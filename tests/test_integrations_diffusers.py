"""tkpy.integrations.diffusers: RIFLEx on tiny random HunyuanVideo, Wan and CogVideoX models.

Every expected value is computed here from the RIFLEx formula, not with tkpy.riflex.
"""

import math
from dataclasses import dataclass, replace
from typing import Callable

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from tkpy.integrations.diffusers import apply_riflex  # noqa: E402

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

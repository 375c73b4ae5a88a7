"""tkpy.riflex against the RIFLEx paper's rules and python/tkpy/reference.py."""

import math

import numpy as np
import pytest
import torch

from tkpy import reference, riflex


def test_identify_k_hunyuanvideo_worked_example():
    assert riflex.identify_k(256, 16, 48) == (4, 50)


@pytest.mark.parametrize("b,d", [(256, 16), (10000, 16), (10000, 44)])
def test_identify_k_picks_the_closest_period(b, d):
    periods = [round(2 * math.pi * b ** (2 * j / d)) for j in range(d // 2)]
    for N in range(1, 200, 7):
        k, n_k = riflex.identify_k(b, d, N)
        assert n_k == periods[k - 1]
        assert abs(n_k - N) == min(abs(p - N) for p in periods)


@pytest.mark.parametrize("pos", [12, np.arange(9), torch.arange(5, dtype=torch.float32) * 0.5])
@pytest.mark.parametrize("k,L_test", [(None, None), (3, 29)])
def test_get_1d_rotary_pos_embed_riflex_matches_reference(pos, k, L_test):
    dim, theta = 16, 10000.0
    positions = torch.as_tensor(np.arange(pos) if isinstance(pos, int) else pos, dtype=torch.float64)
    angles = torch.outer(positions, reference.rope_frequencies(dim, theta, k, L_test))

    cis = riflex.get_1d_rotary_pos_embed_riflex(dim, pos, theta, use_real=False, k=k, L_test=L_test)
    assert cis.dtype == torch.complex64 and cis.shape == angles.shape
    torch.testing.assert_close(cis.angle().double(), torch.atan2(angles.sin(), angles.cos()), atol=2e-5, rtol=0)

    cos, sin = riflex.get_1d_rotary_pos_embed_riflex(dim, pos, theta, use_real=True, k=k, L_test=L_test)
    assert cos.dtype == torch.float32 and cos.shape == (angles.shape[0], dim)
    torch.testing.assert_close(cos.double(), angles.cos().repeat_interleave(2, 1), atol=2e-5, rtol=0)
    torch.testing.assert_close(sin.double(), angles.sin().repeat_interleave(2, 1), atol=2e-5, rtol=0)


def test_riflex_changes_exactly_one_frequency():
    plain = riflex.get_1d_rotary_pos_embed_riflex(16, torch.ones(1), 256.0)
    changed = riflex.get_1d_rotary_pos_embed_riflex(16, torch.ones(1), 256.0, k=4, L_test=66)
    differs = (plain.angle() - changed.angle()).abs()[0] > 1e-7
    assert differs.tolist() == [j == 3 for j in range(8)]
    assert changed.angle()[0, 3].item() == pytest.approx(0.9 * 2 * math.pi / 66, rel=1e-6)


@pytest.mark.parametrize(
    "model,head_dim,expected",
    [
        ("cogvideox", 64, (16, 24, 24, 10000.0)),
        ("hunyuanvideo", 128, (16, 56, 56, 256.0)),
        ("wan", 128, (44, 42, 42, 10000.0)),
    ],
)
def test_axis_splits(model, head_dim, expected):
    split = riflex.axis_split(model, head_dim)
    assert (split.t, split.h, split.w, split.theta) == expected
    assert split.rotary_dim == head_dim


@pytest.mark.parametrize("model,head_dim,period", [("cogvideox", 64, 20), ("hunyuanvideo", 128, 50), ("wan", 128, 51)])
def test_intrinsic_periods(model, head_dim, period):
    split = riflex.axis_split(model, head_dim)
    expected = round(2 * math.pi * split.theta ** (2 * (split.riflex_k - 1) / split.t))
    assert split.period == expected == period


def test_latent_frames():
    assert riflex.latent_frames(129) == 33
    assert riflex.latent_frames(49) == 13
    assert riflex.latent_frames(1) == 1


def test_training_free_guard_and_fine_tuned_mode():
    split = riflex.axis_split("hunyuanvideo", 128)  # N_k = 50
    assert riflex.riflex_frequency_index(split, 50) == (None, None)
    assert riflex.riflex_frequency_index(split, 51) == (4, 51)
    assert riflex.riflex_frequency_index(split, 33, "fine_tuned") == (4, 50)
    assert riflex.riflex_frequency_index(split, 99, "off") == (None, None)


@pytest.mark.parametrize("model,head_dim", [("cogvideox", 64), ("hunyuanvideo", 128), ("wan", 128)])
def test_3d_riflex_changes_one_temporal_frequency_only(model, head_dim):
    split = riflex.axis_split(model, head_dim)
    grid = (split.period + 3, 4, 5)  # long enough for the training-free guard to apply RIFLEx
    plain = riflex.rope_3d_freqs(split, grid, mode="off")
    changed = riflex.rope_3d_freqs(split, grid, mode="training_free")
    assert torch.equal(plain[1], changed[1]) and torch.equal(plain[2], changed[2])
    column_differs = ((plain[0] - changed[0]).abs() > 1e-6).any(dim=0)
    assert column_differs.tolist() == [j == split.riflex_k - 1 for j in range(split.t // 2)]
    expected = reference.rope_frequencies(split.t, split.theta, split.riflex_k, grid[0])
    torch.testing.assert_close(changed[0][1].angle().double(), torch.atan2(expected.sin(), expected.cos()), atol=2e-6, rtol=0)


def test_3d_freqs_within_the_period_are_plain_rope():
    split = riflex.axis_split("cogvideox", 64)
    grid = (split.period, 3, 3)
    assert all(torch.equal(a, b) for a, b in zip(riflex.rope_3d_freqs(split, grid), riflex.rope_3d_freqs(split, grid, mode="off")))


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: riflex.identify_k(256, 15, 48), "even"),
        (lambda: riflex.get_1d_rotary_pos_embed_riflex(15, 4), "even"),
        (lambda: riflex.get_1d_rotary_pos_embed_riflex(16, 4, k=3), "L_test"),
        (lambda: riflex.get_1d_rotary_pos_embed_riflex(16, 4, k=9, L_test=3), "k must be"),
        (lambda: riflex.axis_split("sora", 64), "unknown model"),
        (lambda: riflex.axis_split("hunyuanvideo", 64), "head_dim 128"),
        (lambda: riflex.riflex_frequency_index(riflex.axis_split("wan", 128), 10, "sometimes"), "mode"),
        (lambda: riflex.rope_3d_freqs(riflex.axis_split("wan", 128), (0, 2, 2)), r"grid_thw\[0\] must be an int >= 1"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()

"""Bad input to the RoPE ops gets a clear error that names the problem, and never a crash."""

import textwrap

import pytest

from helpers import API_REFUSALS, assert_bad_calls_survive

# Each case is code run with these names bound: torch, rope (tkpy.rope), q [2, 8, 4, 64] bf16,
# k [2, 8, 2, 64] bf16, cos/sin [16, 32] fp32, and freqs (complex 3D tables for grid (2, 2, 2),
# CogVideoX split of head dim 64). The second item is a regex the error message must match.
CASES = [
    ("rope.apply_rope_(q.long(), None, cos, sin)", "q to be bfloat16, float16 or float32, got Long"),
    ("rope.apply_rope_(q.double(), None, cos, sin)", "q to be bfloat16, float16 or float32, got Double"),
    ("rope.apply_rope_(q, k.half(), cos, sin)", "k to have q's dtype"),
    ("rope.apply_rope_(q[0, 0], None, cos, sin)", r"q of shape \[B, S, H, D\] or \[T, H, D\]"),
    ("rope.apply_rope_(q.transpose(-1, -2), None, cos[:, :4], sin[:, :4])", "contiguous last dim"),
    ("rope.apply_rope_(q, k[:, :5], cos, sin)", "k with q's token dims"),
    ("rope.apply_rope_(q, None, torch.ones(16, 40), torch.ones(16, 40))", r"even rotary dim \(twice cos/sin.s columns, or the freqs tables. dims together\) <= head_dim 64"),
    ("rope.apply_rope_(q, None, cos, sin[:, :8])", "cos and sin of one shape"),
    ("rope.apply_rope_(q, None, cos.double(), sin.double())", "cos to be float32 or q's dtype"),
    ("rope.apply_rope_(q, None, cos[0], sin[0])", r"cos of shape \[max_pos, rotary_dim/2\]"),
    ("rope.apply_rope_(q, None, cos, sin, torch.arange(8.0))", "positions to be int32 or int64"),
    ("rope.apply_rope_(q, None, cos, sin, torch.arange(7))", r"positions of shape \[S\] or \[B, S\]"),
    ("rope.apply_rope_(q, None, cos, sin, torch.tensor([0, 1, 2, 3, 4, 5, 6, 16]))", r"positions in \[0, 16\)"),
    ("rope.apply_rope_(q, None, cos, sin, torch.tensor([0, 1, 2, 3, 4, 5, 6, -1]))", r"positions in \[0, 16\)"),
    ("rope.apply_rope_(q, None, cos[:7], sin[:7])", "seqlen 8 exceeds the 7 rows"),
    ("rope.apply_rope_(q, q, cos, sin)", "q and k share memory"),
    ("rope.apply_rope_(q[:, :, :1].expand(2, 8, 4, 64), None, cos, sin)", "q has elements that share memory"),
    ("rope.apply_rope_(q, None, cos.to('meta'), sin)", "device"),
    ("rope.apply_rope_(torch.ones(1, 2, 1, 1024, dtype=torch.bfloat16), None, torch.ones(2, 8), torch.ones(2, 8))", "head_dim <= 512"),
    ("rope.apply_rope_3d_(q, k, (1, 2, 2), *freqs)", r"must hold q.s seqlen 8 tokens"),
    ("rope.apply_rope_3d_(q, k, (2, 2), *freqs)", r"grid_thw = \(T, H, W\)"),
    ("rope.apply_rope_3d_(q, k, (2, 0, 4), *freqs)", "positive grid_thw"),
    ("rope.apply_rope_3d_(q, k, (8, 1, 1), *freqs)", "freqs_t has 2 rows but the grid needs 8"),
    ("rope.apply_rope_3d_(q, k, (2, 2, 2), freqs[0].real, freqs[1], freqs[2])", r"freqs_t as complex \[L, d/2\] or float32"),
    ("rope.apply_rope_3d_(q, k, (2, 2, 2), torch.view_as_real(freqs[0]).double(), freqs[1], freqs[2])", "freqs_t as complex"),
    ("rope.apply_rope_3d_(q[..., :32], k[..., :32], (2, 2, 2), *freqs)", r"dims together\) <= head_dim 32"),
    ("rope.apply_rope_3d_(q[0], None, (2, 2, 2), *freqs)", r"q of shape \[B, S, H, D\]"),
    ("rope.apply_rope_3d_(q, k, (2, 2, 2), freqs[0].to('meta'), freqs[1], freqs[2])", "device"),
    ("rope.apply_rope_3d_(q, k, (2, 2, 2), 'not a tensor', freqs[1], freqs[2])", "freqs_t must be a Tensor"),
]

SETUP = textwrap.dedent(
    """
    import torch
    from tkpy import riflex, rope
    q = torch.randn(2, 8, 4, 64).bfloat16()
    k = torch.randn(2, 8, 2, 64).bfloat16()
    cos, sin = torch.randn(16, 32).cos(), torch.randn(16, 32).sin()
    freqs = riflex.rope_3d_freqs(riflex.axis_split("cogvideox", 64), (2, 2, 2))
    """
)


@pytest.mark.parametrize("code,message", CASES, ids=[c[0][:60] for c in CASES])
def test_bad_input_raises_clear_error(code, message):
    env = {}
    exec(SETUP, env)
    before = env["q"].clone(), env["k"].clone()
    with pytest.raises(API_REFUSALS, match=message):
        exec(code, env)
    assert torch_equal(env["q"], before[0]) and torch_equal(env["k"], before[1]), "a rejected call modified its input"


def torch_equal(a, b):
    return bool((a == b).all())


def test_bad_input_never_crashes_the_process():
    """All the bad calls above, in one fresh interpreter: it must end normally, not by a signal."""
    assert_bad_calls_survive(SETUP, [code for code, _ in CASES])

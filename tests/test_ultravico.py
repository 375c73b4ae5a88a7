"""UltraViCo's logit decay (tkpy.ultravico) against reference.ultravico_attention (float64).

Every rule on the CPU and the GPU: the window (on both sides of the diagonal), the harmonic bands
(also overlapping the window), the first-frame mask at its exact frame boundaries, text untouched,
padding (varlen, sequences shorter than their text), GQA, odd grids with partial last frames, and
the sign test around the centre c_i. The decay off equals plain attention bitwise on the CPU. On
the GPU both Hopper kernels run each case (the pipelined kernel takes window-only configs, the
baseline the others), plus a long Wan-like sequence, CUDA graphs, determinism and a sanitizer case.
"""

import dataclasses
import itertools
import math

import pytest
import torch

import tkpy
from tkpy import UltraViCoConfig, flash_attn_func, flash_attn_varlen_func, reference
from tkpy.ultravico import num_frames_for_ratio, ultravico_attn_func, ultravico_attn_varlen_func

from helpers import REL_TOL, describe_mismatch, poison_cuda_allocator, randn, rel_err

pytestmark = pytest.mark.usefixtures("attention_kernel")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
LSE_TOL = 1e-3

# (config, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim); logits are scaled up (x3 on q and k)
# so that the decay changes the output far beyond the tolerance.
CASES = {
    # Wan's rules: window and first-frame mask; 11 frames and a 7-token partial frame; GQA 2.
    "wan_like_gqa_tail": (UltraViCoConfig(tokens_per_frame=24, train_frames=4, alpha=0.7, first_frame_mask=True),
                          271, 271, 4, 2, 128),
    # HunyuanVideo's rules: bands beyond the window, text after the video (never decayed).
    "bands_text": (UltraViCoConfig(tokens_per_frame=6, train_frames=4, alpha=0.8, beta=0.4, band_period=5,
                                   band_width=1, band_count=3, text_tokens=20), 122, 122, 2, 2, 64),
    # Bands overlapping each other and the window, every rule at once, an odd 5-token frame, MQA.
    "every_rule_odd_frame_d256": (UltraViCoConfig(tokens_per_frame=5, train_frames=6, alpha=0.5, beta=0.9,
                                                  band_period=2, band_width=1, band_count=4, first_frame_mask=True,
                                                  text_tokens=3), 300, 300, 2, 1, 256),
    # One token per frame; alpha 0 clamps far logits to the centre.
    "token_frames_alpha0": (UltraViCoConfig(tokens_per_frame=1, train_frames=3, alpha=0.0, first_frame_mask=True),
                            50, 50, 1, 1, 64),
    # A window wide enough for the CPU's 256-key blocks to cross it row by row, GQA 4.
    "wide_window": (UltraViCoConfig(tokens_per_frame=32, train_frames=10, alpha=0.6, first_frame_mask=True),
                    700, 700, 4, 1, 64),
    # alpha 0 over 600 one-token frames: whole tiles beyond the window, where the sign rule decides.
    "alpha0_whole_tiles": (UltraViCoConfig(tokens_per_frame=1, train_frames=2, alpha=0.0), 600, 600, 1, 1, 64),
    # More keys than queries: positions count from each sequence's start.
    "sq_ne_sk": (UltraViCoConfig(tokens_per_frame=8, train_frames=2, alpha=0.75, beta=0.5, band_period=3,
                                 band_width=0, band_count=2, text_tokens=5), 70, 90, 2, 2, 128),
}


def scaled_inputs(shape_q, shape_kv, dtype, gen, device, key_offsets=None):
    """q and k scaled up, and with ``key_offsets`` (a sequence index per key token, batched: None
    gives each batch its own) every sequence's keys of each kv head shifted by their own random
    vector, so that k̄ and the centres c_i = q_i·k̄ are large and differ by sequence and head: a
    mean taken over the wrong keys, head or sequence moves the output far beyond the tolerance."""
    q = randn(shape_q, torch.float32, gen).mul(3)
    k = randn(shape_kv, torch.float32, gen).mul(3)
    v = randn(shape_kv, torch.float32, gen)
    if key_offsets is None and k.dim() == 4:  # batched [B, S, H, D]
        k += randn((k.shape[0], 1, k.shape[2], k.shape[3]), torch.float32, gen) * 1.5
    elif key_offsets is not None:  # packed [T, H, D]
        offsets = randn((int(key_offsets.max()) + 1, k.shape[1], k.shape[2]), torch.float32, gen) * 1.5
        k += offsets[key_offsets]
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


def check(out, lse, ref_out, ref_lse, dtype):
    assert out.dtype == dtype and out.shape == ref_out.shape and lse.dtype == torch.float32
    out, lse = out.cpu(), lse.cpu()
    err = rel_err(out, ref_out)
    assert err < REL_TOL[dtype], describe_mismatch(out, ref_out)
    unseen = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), unseen)
    torch.testing.assert_close(lse[~unseen].double(), ref_lse[~unseen], rtol=LSE_TOL, atol=LSE_TOL)


def settings(config):
    return dataclasses.asdict(config)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(device, dtype, case, rng):
    config, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim = CASES[case]
    q, k, v = scaled_inputs((2, seqlen_q, heads_q, head_dim), (2, seqlen_k, heads_kv, head_dim), dtype, rng, device)
    ref_out, ref_lse = reference.ultravico_attention(q.cpu(), k.cpu(), v.cpu(), **settings(config))
    plain, _ = reference.attention(q.cpu(), k.cpu(), v.cpu())
    assert rel_err(plain, ref_out) > 20 * REL_TOL[dtype], "the case must change the output well beyond the tolerance"
    if device == "cuda":
        poison_cuda_allocator()
    out, lse, probs = ultravico_attn_func(q, k, v, config, return_attn_probs=True)
    assert probs is None and out.device == q.device
    check(out, lse, ref_out, ref_lse, dtype)


def test_fp32_on_the_cpu(rng):
    config, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim = CASES["every_rule_odd_frame_d256"]
    q, k, v = scaled_inputs((1, seqlen_q, heads_q, head_dim), (1, seqlen_k, heads_kv, head_dim), torch.float32,
                            rng, "cpu")
    out, lse, _ = ultravico_attn_func(q, k, v, config, softmax_scale=0.05, return_attn_probs=True)
    ref_out, ref_lse = reference.ultravico_attention(q, k, v, softmax_scale=0.05, **settings(config))
    assert rel_err(out, ref_out) < REL_TOL[torch.float32]
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


# Packed videos: an empty sequence, one shorter than its text (all text), uneven lengths, and
# query and key lengths that differ (positions count from each sequence's start on both sides).
VARLEN_CASES = {
    "bands_text_first_frame": (UltraViCoConfig(tokens_per_frame=6, train_frames=3, alpha=0.7, beta=0.3,
                                               band_period=4, band_width=1, band_count=2, first_frame_mask=True,
                                               text_tokens=9), [0, 5, 130, 61], [0, 5, 130, 61], 4, 2, 64),
    "window_only_gqa": (UltraViCoConfig(tokens_per_frame=16, train_frames=3, alpha=0.8, first_frame_mask=True),
                        [97, 0, 300, 17], [97, 0, 300, 17], 4, 1, 128),
    "queries_and_keys_differ": (UltraViCoConfig(tokens_per_frame=8, train_frames=2, alpha=0.5, beta=0.2,
                                                band_period=3, band_width=1, band_count=2, first_frame_mask=True,
                                                text_tokens=4), [40, 3, 150, 0], [90, 7, 120, 12], 2, 2, 64),
}


def cu_seqlens(lengths, device):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", VARLEN_CASES)
def test_varlen_matches_reference(device, dtype, case, rng):
    config, lens_q, lens_k, heads_q, heads_kv, head_dim = VARLEN_CASES[case]
    sequence_of_key = torch.repeat_interleave(torch.arange(len(lens_k)), torch.tensor(lens_k))
    q, k, v = scaled_inputs((sum(lens_q), heads_q, head_dim), (sum(lens_k), heads_kv, head_dim), dtype, rng, device,
                            key_offsets=sequence_of_key)
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    ref_out, ref_lse = reference.ultravico_attention(q.cpu(), k.cpu(), v.cpu(), cu_seqlens_q=cu_q.cpu(),
                                                     cu_seqlens_k=cu_k.cpu(), **settings(config))
    if device == "cuda":
        poison_cuda_allocator()
    out, lse, _ = ultravico_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), config,
                                             return_attn_probs=True)
    check(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("text_tokens", [0, 7])
def test_decay_off_is_plain_attention_bitwise_on_the_cpu(text_tokens, rng):
    """alpha = beta = 1 and no first-frame mask: every factor is 1, and the result is
    flash_attn_func's, bit for bit (batched and varlen)."""
    config = UltraViCoConfig(tokens_per_frame=4, train_frames=2, alpha=1.0, beta=1.0, band_period=3, band_width=1,
                             band_count=2, text_tokens=text_tokens)
    q, k, v = scaled_inputs((2, 300, 4, 64), (2, 300, 2, 64), torch.bfloat16, rng, "cpu")
    out, lse, _ = ultravico_attn_func(q, k, v, config, return_attn_probs=True)
    plain, plain_lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    assert torch.equal(out, plain) and torch.equal(lse, plain_lse)
    cu = torch.tensor([0, 100, 100, 600], dtype=torch.int32)
    packed = [t.flatten(0, 1) for t in (q, k, v)]
    out = ultravico_attn_varlen_func(*packed, cu, cu, 500, 500, config)
    assert torch.equal(out, flash_attn_varlen_func(*packed, cu, cu, 500, 500))


def one_hot_values(seqlen, head_dim, dtype, device="cpu"):
    """v with key j = e_j: the output row of a query is its attention weights."""
    return torch.eye(seqlen, head_dim, dtype=dtype, device=device)[None, :, None, :]


# The exact tests read attention weights through one-hot values: fp32 on the CPU, bf16 on the GPU
# (weights rounded to bf16 there, hence the looser tolerance).
EXACT = [pytest.param("cpu", torch.float32, 1e-5, id="cpu-fp32"),
         pytest.param("cuda", torch.bfloat16, 1e-2, id="cuda-bf16", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device, dtype, tol", EXACT)
def test_first_frame_mask_at_its_exact_frame_boundaries(device, dtype, tol, rng):
    """Queries 0..HW-1 (frame 0) see keys 0..T·HW-1 and nothing after; query HW (frame 1) sees all.
    The authors' kernel covered query HW and left key T·HW visible."""
    config = UltraViCoConfig(tokens_per_frame=4, train_frames=3, alpha=1.0, first_frame_mask=True)
    seqlen = 40
    q, k, _ = scaled_inputs((1, seqlen, 1, 64), (1, seqlen, 1, 64), dtype, rng, device)
    weights = ultravico_attn_func(q * 0.1, k, one_hot_values(seqlen, 64, dtype, device), config)[0, :, 0, :seqlen]
    weights = weights.float().cpu()
    assert (weights[:4, 12:] == 0).all(), "frame-0 queries must not see keys of frames >= train_frames"
    assert (weights[:4, :12] > 0).all(), "frame-0 queries see the first train_frames frames"
    assert (weights[4:] > 0).all(), "queries of later frames see every key"
    torch.testing.assert_close(weights.sum(-1), torch.ones(seqlen), rtol=0, atol=4 * tol)


def test_text_queries_are_untouched_bitwise(rng):
    """Text rows see every key with its plain logit: bit for bit flash_attn_func's rows."""
    config = UltraViCoConfig(tokens_per_frame=3, train_frames=2, alpha=0.2, beta=0.1, band_period=4, band_width=1,
                             band_count=3, first_frame_mask=True, text_tokens=30)
    q, k, v = scaled_inputs((1, 200, 2, 64), (1, 200, 2, 64), torch.bfloat16, rng, "cpu")
    out = ultravico_attn_func(q, k, v, config)
    plain = flash_attn_func(q, k, v)
    assert torch.equal(out[:, 170:], plain[:, 170:])
    assert not torch.equal(out[:, :170], plain[:, :170])


@pytest.mark.parametrize("device, dtype, tol", EXACT)
def test_only_logits_above_the_centre_decay(device, dtype, tol, rng):
    """One query against keys whose logits straddle the centre c = q·k̄·scale: beyond the window,
    with alpha 0, keys above c all weigh exp(c) and keys below keep exp(s); inside the window
    nothing changes. The weights are read through one-hot values."""
    seqlen, head_dim = 40, 64
    k = torch.zeros(seqlen, head_dim, dtype=torch.float64)
    k[:, 0] = torch.linspace(-2.0, 2.0, seqlen)[torch.randperm(seqlen, generator=rng)]
    k[:, 1:] = torch.randn(seqlen, head_dim - 1, generator=rng, dtype=torch.float64) * 0.1
    q = torch.zeros(1, head_dim, dtype=torch.float64)
    q[0, 0] = 8.0  # s = 8·k[:, 0] / 8 = k[:, 0] at the default scale 1/sqrt(64)
    # Query 0 (put first) with a window of 2 tokens: keys 0 and 1 are inside, the rest beyond.
    config = UltraViCoConfig(tokens_per_frame=1, train_frames=2, alpha=0.0)
    qs = torch.cat([q, torch.randn(seqlen - 1, head_dim, generator=rng, dtype=torch.float64)]).to(dtype)
    ks = k.to(dtype)  # the expectation below is computed from the rounded inputs
    weights = ultravico_attn_func(qs[None, :, None].to(device), ks[None, :, None].to(device),
                                  one_hot_values(seqlen, head_dim, dtype, device), config)[0, 0, 0, :seqlen]
    weights = weights.double().cpu()
    s = ks.double() @ qs.double()[0] / 8
    c = (qs.double()[0] @ ks.double().mean(0)) / 8
    expected = torch.where((s > c) & (torch.arange(seqlen) >= 2), c, s).exp()
    torch.testing.assert_close(weights, expected / expected.sum(), rtol=tol, atol=tol * 1e-2)
    above = (s > c) & (torch.arange(seqlen) >= 2)
    assert above.sum() >= 5 and (~above).sum() >= 5, "keys on both sides of the centre"


@pytest.mark.parametrize("device, dtype, tol", EXACT)
def test_distances_count_tokens_on_both_sides_of_the_diagonal(device, dtype, tol, rng):
    """The window is |i − j| > T·HW/2 whichever side the key is on: a middle query's weights for
    keys d before and d after it decay alike (their logits made equal)."""
    config = UltraViCoConfig(tokens_per_frame=2, train_frames=5, alpha=0.0)  # edge: 2|i−j| > 10, |i−j| >= 6
    seqlen, head_dim, middle = 41, 64, 20
    k = torch.randn(seqlen, head_dim, generator=rng) * 3
    k[middle + 1:] = k[:middle].flip(0)  # key middle+d equals key middle−d
    q = torch.randn(seqlen, head_dim, generator=rng) * 3
    q, k, v = q[None, :, None].to(dtype), k[None, :, None].to(dtype), one_hot_values(seqlen, head_dim, dtype)
    weights = ultravico_attn_func(q.to(device), k.to(device), v.to(device), config)[0, middle, 0, :seqlen].cpu()
    assert torch.equal(weights[middle + 1:], weights[:middle].flip(0))
    ref, _ = reference.ultravico_attention(q, k, v, **settings(config))
    torch.testing.assert_close(weights.double(), ref[0, middle, 0, :seqlen], rtol=tol, atol=tol * 1e-2)


def test_presets_follow_the_authors_scripts():
    wan = UltraViCoConfig.wan21()
    assert (wan.tokens_per_frame, wan.train_frames, wan.alpha, wan.first_frame_mask, wan.band_count,
            wan.text_tokens) == (1560, 21, 0.9, True, 0, 0)
    hunyuan = UltraViCoConfig.hunyuan_video()
    assert (hunyuan.tokens_per_frame, hunyuan.train_frames, hunyuan.alpha, hunyuan.beta, hunyuan.band_period,
            hunyuan.band_width, hunyuan.band_count, hunyuan.text_tokens, hunyuan.first_frame_mask) == \
        (2040, 33, 0.9, 0.6, 50, 4, 4, 256, False)
    assert UltraViCoConfig.wan21(720, 1280).tokens_per_frame == 45 * 80
    assert UltraViCoConfig.wan21(alpha=0.8).alpha == 0.8
    assert wan.for_grid((84, 30, 52)) == wan
    assert wan.for_grid((5, 3, 7)).tokens_per_frame == 21


def test_frame_counts_for_a_ratio():
    assert UltraViCoConfig.wan21().num_frames(4) == 333  # 84 latent frames
    assert UltraViCoConfig.wan21().num_frames(3) == 249  # the authors' default run
    assert UltraViCoConfig.hunyuan_video().num_frames(3) == 393
    assert num_frames_for_ratio(21, 1) == 81 and num_frames_for_ratio(20, 1.5) == 117
    with pytest.raises(tkpy.ArgumentError, match="not a whole number of latent frames"):
        num_frames_for_ratio(21, 1.5)
    for ratio in (0, -1, float("inf"), float("nan"), 1e300):
        with pytest.raises(tkpy.ArgumentError, match="ratio must be a positive number"):
            num_frames_for_ratio(21, ratio)
    with pytest.raises(TypeError, match="ratio must be a real number"):
        num_frames_for_ratio(21, "4")


@pytest.mark.parametrize("field, value, error, message", [
    ("tokens_per_frame", 0, tkpy.ArgumentError, r"tokens_per_frame must be in \[1, 2147483647\]"),
    ("tokens_per_frame", 2**31, tkpy.ArgumentError, r"tokens_per_frame must be in \[1, 2147483647\]"),
    ("band_period", 2**80, tkpy.ArgumentError, r"band_period must be in \[0, 2147483647\]"),
    ("train_frames", 2.5, TypeError, "train_frames must be an int, got float"),
    ("alpha", 1.5, tkpy.ArgumentError, r"alpha must be in \[0, 1\]"),
    ("alpha", float("nan"), tkpy.ArgumentError, r"alpha must be in \[0, 1\]"),
    ("alpha", "0.9", TypeError, "alpha must be a real number"),
    ("beta", -0.1, tkpy.ArgumentError, r"beta must be in \[0, 1\]"),
    ("band_count", -1, tkpy.ArgumentError, r"band_count must be in \[0, "),
    ("band_width", -1, tkpy.ArgumentError, r"band_width must be in \[0, "),
    ("text_tokens", True, TypeError, "text_tokens must be an int, got bool"),
    ("first_frame_mask", 1, TypeError, "first_frame_mask must be a bool"),
])
def test_config_refuses_bad_values_by_name(field, value, error, message):
    with pytest.raises(error, match=message):
        UltraViCoConfig(**{"tokens_per_frame": 4, "train_frames": 2, field: value})


def test_config_takes_a_numpy_bool():
    numpy = pytest.importorskip("numpy")
    config = UltraViCoConfig(tokens_per_frame=4, train_frames=2, first_frame_mask=numpy.bool_(True))
    assert config.first_frame_mask is True


def test_bands_need_a_period():
    with pytest.raises(tkpy.ArgumentError, match=r"band_period must be in \[1, "):
        UltraViCoConfig(tokens_per_frame=4, train_frames=2, band_count=2)


@pytest.mark.parametrize("call, error, message", [
    ("ultravico_attn_func(q.double(), k.double(), v.double(), config)", tkpy.ArgumentError, "got float64"),
    ("ultravico_attn_func(q, k, v, {'alpha': 0.9})", TypeError, "config must be a tkpy.ultravico.UltraViCoConfig"),
    ("ultravico_attn_func(q, k, v, dataclasses.replace(config, text_tokens=50))", tkpy.ArgumentError,
     r"text_tokens \(50\) at most the sequence lengths"),
    ("ultravico_attn_func(q, k, v, dataclasses.replace(config, band_count=65, band_period=1))", tkpy.ArgumentError,
     r"band_count in \[0, 64\]"),
    ("ultravico_attn_func(q, k, v, dataclasses.replace(config, tokens_per_frame=2**20, train_frames=2**12))",
     tkpy.ArgumentError, "train_frames in"),
    ("ultravico_attn_func(q, k, v, dataclasses.replace(config, band_count=4, band_period=2**28, tokens_per_frame=4))",
     tkpy.ArgumentError, "more than int32 indices address"),
    ("ultravico_attn_func(q.requires_grad_(), k, v, config)", NotImplementedError, "has no backward"),
    ("ultravico_attn_varlen_func(q[0], k[0], v[0], None, None, 40, 40, config)", tkpy.ArgumentError,
     "cu_seqlens_q and cu_seqlens_k are required"),
    ("ultravico_attn_func(q, k, v, config, softmax_scale='x')", TypeError, "softmax_scale must be a real number"),
    ("ultravico_attn_func(q, k[:, :, :, :32].contiguous(), v, config)", tkpy.ArgumentError, "head_dim"),
])
def test_bad_calls_are_refused_by_name(call, error, message, rng):
    q, k, v = (randn((1, 40, 2, 64), torch.bfloat16, rng) for _ in range(3))
    config = UltraViCoConfig(tokens_per_frame=4, train_frames=2)
    scope = dict(ultravico_attn_func=ultravico_attn_func, ultravico_attn_varlen_func=ultravico_attn_varlen_func,
                 q=q, k=k, v=v, config=config, dataclasses=dataclasses)
    with pytest.raises(error, match=message):
        eval(call, scope)


def test_no_gradient_needed_under_no_grad(rng):
    q, k, v = (randn((1, 40, 2, 64), torch.bfloat16, rng).requires_grad_() for _ in range(3))
    with torch.no_grad():
        out = ultravico_attn_func(q, k, v, UltraViCoConfig(tokens_per_frame=4, train_frames=2))
    assert out.shape == q.shape


def test_compiles_fullgraph_and_matches_eager(rng):
    config = CASES["bands_text"][0]
    q, k, v = scaled_inputs((1, 122, 2, 64), (1, 122, 2, 64), torch.bfloat16, rng, "cpu")
    compiled = torch.compile(lambda q, k, v: ultravico_attn_func(q, k, v, config), fullgraph=True)
    assert torch.equal(compiled(q, k, v), ultravico_attn_func(q, k, v, config))


@pytest.mark.gpu
def test_cuda_long_wan_like_sequence(rng):
    """12 frames of 390 tokens (a 15 x 26 grid) with Wan's rules: most tiles lie wholly inside or
    beyond the window, so the pipelined kernel's per-block decay runs at scale; the reference runs
    on the GPU in float64."""
    config = UltraViCoConfig(tokens_per_frame=390, train_frames=5, alpha=0.9, first_frame_mask=True)
    q, k, v = scaled_inputs((1, 4680, 2, 128), (1, 4680, 2, 128), torch.bfloat16, rng, "cuda")
    ref_out, ref_lse = reference.ultravico_attention(q, k, v, **settings(config))
    poison_cuda_allocator()
    out, lse, _ = ultravico_attn_func(q, k, v, config, return_attn_probs=True)
    check(out, lse, ref_out.cpu(), ref_lse.cpu(), torch.bfloat16)


@pytest.mark.gpu
def test_cuda_run_to_run_deterministic_and_graph_replayable(rng):
    config = CASES["bands_text"][0]
    q, k, v = scaled_inputs((2, 122, 2, 64), (2, 122, 2, 64), torch.bfloat16, rng, "cuda")
    first = ultravico_attn_func(q, k, v, config)
    assert torch.equal(first, ultravico_attn_func(q, k, v, config))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        ultravico_attn_func(q, k, v, config)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ultravico_attn_func(q, k, v, config)
    for t in (q, k, v):
        t.copy_(randn(t.shape, torch.bfloat16, rng, "cuda") * 3)
    graph.replay()
    torch.cuda.synchronize()
    ref_out, _ = reference.ultravico_attention(q.cpu(), k.cpu(), v.cpu(), **settings(config))
    assert rel_err(captured.cpu(), ref_out) < REL_TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.sanitizer
def test_cuda_small_for_sanitizer(rng):
    """Both kernels' decay paths and the k̄ reduction, small (run under compute-sanitizer)."""
    for config in (CASES["wan_like_gqa_tail"][0], CASES["bands_text"][0]):
        q, k, v = scaled_inputs((1, 130, 2, 64), (1, 130, 2, 64), torch.bfloat16, rng, "cuda")
        cu = torch.tensor([0, 30, 130], dtype=torch.int32, device="cuda")
        out = ultravico_attn_varlen_func(q[0], k[0], v[0], cu, cu, 100, 100, config)
        torch.cuda.synchronize()
        assert out.isfinite().all()


def test_reference_matches_a_direct_loop(rng):
    """The oracle itself against a loop over (i, j) written from the rules, on a small case."""
    config = UltraViCoConfig(tokens_per_frame=2, train_frames=3, alpha=0.6, beta=0.2, band_period=3, band_width=1,
                             band_count=2, first_frame_mask=True, text_tokens=3)
    seqlen, head_dim = 25, 64
    q, k, v = (torch.randn(1, seqlen, 1, head_dim, generator=rng, dtype=torch.float64) for _ in range(3))
    out, _ = reference.ultravico_attention(q, k, v, **settings(config))
    scale = 1 / math.sqrt(head_dim)
    mean = k[0, :, 0].mean(0)
    video = seqlen - 3
    for i in range(seqlen):
        c = (q[0, i, 0] @ mean).item() * scale
        logits = []
        for j in range(seqlen):
            s = (q[0, i, 0] @ k[0, j, 0]).item() * scale
            if i < video and j < video:
                if i < 2 and j >= 6:  # frame 0 against frames >= 3
                    logits.append(float("-inf"))
                    continue
                d = abs(i - j)
                band = any((3 * m - 1) * 2 <= d <= (3 * m + 1) * 2 for m in (1, 2))
                f = 0.2 if band else (0.6 if 2 * d > 6 else 1.0)
                if s > c:
                    s = c + f * (s - c)
            logits.append(s)
        weights = torch.tensor(logits, dtype=torch.float64).softmax(0)
        torch.testing.assert_close(out[0, i, 0], weights @ v[0, :, 0])


def test_reference_takes_a_slice_of_query_rows(rng):
    """query_offset / total_queries (the benchmarks' check of a few rows): the same rows as the full call."""
    config = UltraViCoConfig(tokens_per_frame=3, train_frames=2, alpha=0.3, beta=0.5, band_period=3, band_width=1,
                             band_count=2, first_frame_mask=True, text_tokens=10)
    q, k, v = (torch.randn(1, 60, 2, 64, generator=rng, dtype=torch.float64) * 3 for _ in range(3))
    full, full_lse = reference.ultravico_attention(q, k, v, **settings(config))
    for start, stop in ((0, 20), (1, 7), (45, 60)):
        part, part_lse = reference.ultravico_attention(q[:, start:stop], k, v, query_offset=start, total_queries=60,
                                                       **settings(config))
        torch.testing.assert_close(part, full[:, start:stop], rtol=0, atol=1e-12)
        torch.testing.assert_close(part_lse, full_lse[..., start:stop], rtol=0, atol=1e-12)


# Edges that fall exactly on the CPU path's tile boundaries (128 queries x 256 keys), where a tile's
# classification decides: (config, seqlen, (query, key) of a pair to give a large logit or None).
TILE_EDGES = {
    # The band is distances 71..129: the tile of queries 384.. x keys 0..255 starts on its last one.
    "band_end": (UltraViCoConfig(tokens_per_frame=1, train_frames=100, alpha=0.9, beta=0.3, band_period=100,
                                 band_width=29, band_count=1), 520, None),
    # The window's edge is distance 130; keys before queries, the pair (384, 255) at 129 stays plain.
    "window_edge": (UltraViCoConfig(tokens_per_frame=1, train_frames=258, alpha=0.0), 520, (384, 255)),
}


@pytest.mark.parametrize("device, dtype, tol", EXACT)
@pytest.mark.parametrize("case", TILE_EDGES)
def test_edges_on_tile_boundaries(device, dtype, tol, case, rng):
    config, seqlen, pair = TILE_EDGES[case]
    q, k, v = (torch.randn(1, seqlen, 1, 64, generator=rng) * 2 for _ in range(3))
    if pair is not None:
        k[0, pair[1], 0] = 2 * q[0, pair[0], 0]
    q, k, v = (t.to(dtype) for t in (q, k, v))
    out = ultravico_attn_func(q.to(device), k.to(device), v.to(device), config).cpu()
    ref, _ = reference.ultravico_attention(q, k, v, **settings(config))
    assert rel_err(out, ref) < tol, describe_mismatch(out, ref)


@pytest.mark.parametrize("device, dtype, tol", EXACT)
def test_first_frame_cutoff_on_a_tile_boundary(device, dtype, tol, rng):
    """Frame-0 queries see keys up to 254: the key block from 256 on is hidden whole, key 255 alone
    of the block before it; one-hot on key 255 reads its weight."""
    config = UltraViCoConfig(tokens_per_frame=5, train_frames=51, alpha=1.0, first_frame_mask=True)
    q, k = (torch.randn(1, 300, 1, 64, generator=rng).to(dtype) for _ in range(2))
    v = torch.zeros(1, 300, 1, 64, dtype=dtype)
    v[0, 255, 0, 0] = 1
    out = ultravico_attn_func(q.to(device), k.to(device), v.to(device), config)[0, :, 0, 0].cpu()
    assert (out[:5] == 0).all() and (out[5:] > 0).all()

"""Every torch.ops.tkpy op traces and runs inside torch.compile(fullgraph=True) on the CPU."""

import functools

import pytest
import torch

import tkpy
from tkpy import riflex
from tkpy.info import registered_ops
from tkpy.block_sparse import plan
from tkpy.rope import apply_rope, apply_rope_, apply_rope_3d, apply_rope_3d_

from helpers import randn


def rope_case(gen, functional=False):
    """apply_rope_ (in place), or with `functional` apply_rope (rotated copies)."""
    q = randn((2, 9, 4, 64), torch.bfloat16, gen)
    k = randn((2, 9, 2, 64), torch.bfloat16, gen)
    angles = randn((16, 32), torch.float32, gen)
    # cos/sin outside the graph: inductor's own cos may differ from ATen's in the last bit, which
    # is not what this test is about.
    cos, sin = angles.cos(), angles.sin()
    positions = torch.randint(0, 16, (2, 9), generator=gen)

    def fn(q, k):
        q = q * 1.5  # an op before and after, so the custom op sits inside a real graph
        if functional:
            q, k = apply_rope(q, k, cos, sin, positions, interleaved=True)
        else:
            apply_rope_(q, k, cos, sin, positions, interleaved=True)
        return q + 1, k

    return fn, (q, k)


def rope_3d_case(gen, functional=False):
    grid = (3, 2, 5)
    freqs = [torch.view_as_real(f) for f in riflex.rope_3d_freqs(riflex.axis_split("wan", 128), grid, L_test=60)]
    q = randn((1, 30, 2, 128), torch.float16, gen)
    k = randn((1, 30, 2, 128), torch.float16, gen)

    def fn(q, k):
        if functional:
            q, k = apply_rope_3d(q, k, grid, *freqs)
        else:
            apply_rope_3d_(q, k, grid, *freqs)
        return q * 2, k

    return fn, (q, k)


def gemm_case(gen):
    a = randn((24, 40), torch.bfloat16, gen)
    b = randn((48, 40), torch.bfloat16, gen)

    def fn(a, b):
        return tkpy.gemm(a * 2, b, trans_b=True).relu()

    return fn, (a, b)


def attention_case(gen):
    q = randn((2, 33, 4, 64), torch.bfloat16, gen)
    k = randn((2, 40, 2, 64), torch.bfloat16, gen)
    v = randn((2, 40, 2, 64), torch.bfloat16, gen)

    def fn(q, k, v):
        out, lse, _ = tkpy.flash_attn_func(q, k, v, causal=True, window_size=(16, -1), return_attn_probs=True)
        return out * 2, lse

    return fn, (q, k, v)


def ultravico_case(gen):
    q = randn((2, 70, 4, 64), torch.bfloat16, gen)
    k = randn((2, 70, 2, 64), torch.bfloat16, gen)
    v = randn((2, 70, 2, 64), torch.bfloat16, gen)
    config = tkpy.UltraViCoConfig(tokens_per_frame=6, train_frames=3, alpha=0.5, beta=0.2, band_period=4,
                                  band_width=1, band_count=2, first_frame_mask=True, text_tokens=5)

    def fn(q, k, v):
        out, lse, _ = tkpy.ultravico_attn_func(q, k, v, config, return_attn_probs=True)
        return out * 2, lse

    return fn, (q, k, v)


def sparse_inputs(gen):
    """Two packed sequences with dense, streaming and block-sparse heads: q, k, v, cu_seqlens,
    head_mask_type, streaming_info and a block mask."""
    q = randn((300, 4, 64), torch.bfloat16, gen)
    k = randn((300, 2, 64), torch.bfloat16, gen)
    v = randn((300, 2, 64), torch.bfloat16, gen)
    cu = torch.tensor([0, 130, 300], dtype=torch.int32)
    types = torch.tensor([0, -1, 1, 1], dtype=torch.int32)
    streaming = torch.tensor([0, 0, 1, 1, 0, 0, 0, 0], dtype=torch.int32)
    return q, k, v, cu, types, streaming, torch.rand(2, 2, 2, 2, generator=gen) > 0.5


def block_sparse_case(gen):
    q, k, v, cu, types, streaming, mask = sparse_inputs(gen)

    def fn(q, k, v):
        return tkpy.block_sparse_attn_func(q, k, v, cu, cu, types, streaming, mask, 170, 170, 0.0, is_causal=True) * 2

    return fn, (q, k, v)


def attention_backward_case(gen):
    q = randn((2, 33, 4, 64), torch.bfloat16, gen)
    k = randn((2, 40, 2, 64), torch.bfloat16, gen)
    v = randn((2, 40, 2, 64), torch.bfloat16, gen)
    out, lse = torch.ops.tkpy.attention_forward(q, k, v, window_left=16, window_right=0)
    dout = randn(out.shape, torch.bfloat16, gen)
    dlse = randn(lse.shape, torch.float32, gen)

    def fn(dout, dlse):
        dq, dk, dv = torch.ops.tkpy.attention_backward(dout * 2, q, k, v, out, lse, dlse, window_left=16, window_right=0)
        return dq + 1, dk, dv

    return fn, (dout, dlse)


def block_sparse_backward_case(gen):
    q, k, v, cu, types, streaming, mask = sparse_inputs(gen)
    sparse_index, block_indices, block_counts = plan(types, mask)
    args = (cu, cu, types, streaming, sparse_index, 170, 170)
    options = dict(block_indices=block_indices, block_counts=block_counts, is_causal=True)
    out, lse = torch.ops.tkpy.block_sparse_attention_forward(q, k, v, *args, **options)
    dout = randn(out.shape, torch.bfloat16, gen)

    def fn(dout):
        return torch.ops.tkpy.block_sparse_attention_backward(dout * 2, q, k, v, out, lse, None, *args, **options)

    return fn, (dout,)


def decode_attention_case(gen):
    q = randn((2, 3, 4, 64), torch.bfloat16, gen)
    k_cache = randn((7, 16, 2, 64), torch.bfloat16, gen)
    v_cache = randn((7, 16, 2, 64), torch.bfloat16, gen)
    block_table = torch.randperm(7, generator=gen)[:6].view(2, 3).to(torch.int32)
    seqlens = torch.tensor([20, 41], dtype=torch.int32)

    def fn(q, k_cache, v_cache):
        out, lse = tkpy.flash_attn_with_kvcache(q * 1.5, k_cache, v_cache, cache_seqlens=seqlens,
                                                block_table=block_table, causal=True, return_softmax_lse=True)
        return out * 2, lse

    return fn, (q, k_cache, v_cache)


def kv_append_case(gen):
    q = randn((2, 2, 4, 64), torch.float16, gen)
    k_cache = randn((3, 40, 2, 64), torch.float16, gen)
    v_cache = randn((3, 40, 2, 64), torch.float16, gen)
    k = randn((2, 2, 2, 64), torch.float16, gen)
    v = randn((2, 2, 2, 64), torch.float16, gen)
    angles = randn((64, 32), torch.float32, gen)
    cos, sin = angles.cos(), angles.sin()
    seqlens = torch.tensor([5, 30], dtype=torch.int32)
    batch_idx = torch.tensor([2, 0], dtype=torch.int32)

    def fn(q, k_cache, v_cache, k, v):
        out = tkpy.flash_attn_with_kvcache(q, k_cache, v_cache, k * 2, v, cos, sin, seqlens, batch_idx, causal=True)
        return out + 1, k_cache, v_cache

    return fn, (q, k_cache, v_cache, k, v)


CASES = {
    "apply_rope_": rope_case,
    "apply_rope_3d_": rope_3d_case,
    "rope": functools.partial(rope_case, functional=True),
    "rope_3d": functools.partial(rope_3d_case, functional=True),
    "gemm": gemm_case,
    "attention_forward": attention_case,
    "attention_backward": attention_backward_case,
    "ultravico_attention_forward": ultravico_case,
    "block_sparse_attention_forward": block_sparse_case,
    "block_sparse_attention_backward": block_sparse_backward_case,
    "decode_attention": decode_attention_case,
    "kv_append_": kv_append_case,
}


def test_every_op_has_a_compile_case():
    assert sorted(CASES) == registered_ops()


@pytest.mark.parametrize("op", sorted(CASES))
def test_op_compiles_fullgraph_and_matches_eager(op, rng):
    torch._dynamo.reset()
    fn, inputs = CASES[op](rng)
    eager = fn(*(x.clone() for x in inputs))
    compiled = torch.compile(fn, fullgraph=True)(*(x.clone() for x in inputs))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=0, atol=0)

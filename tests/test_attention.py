"""flash_attn_func and flash_attn_varlen_func against python/tkpy/reference.py (float64).

On CPU and GPU: awkward shapes (odd lengths, Sq != Sk, rows that see no key), GQA/MQA, head dims,
sliding windows, softcap, varlen with empty sequences, the flash-attn 2 signatures, bad input and
torch.compile. GPU only: poisoned outputs, determinism, CUDA graphs. Gradients:
test_attention_backward.py.
"""

import inspect
import itertools
import textwrap

import pytest
import torch

import tkpy
from tkpy import flash_attn_func, flash_attn_varlen_func, reference

from helpers import REL_TOL, assert_bad_call_raises, assert_bad_calls_survive, poison_cuda_allocator, randn, rel_err

# Every CUDA test runs on both Hopper forward kernels (conftest.attention_kernel).
pytestmark = pytest.mark.usefixtures("attention_kernel")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
LSE_TOL = 1e-3  # lse is fp32, computed from fp32 scores: far tighter than the output's rounding


def batched_inputs(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype, gen, device):
    q = randn((batch, seqlen_q, heads_q, head_dim), dtype, gen, device)
    k = randn((batch, seqlen_k, heads_kv, head_dim), dtype, gen, device)
    v = randn((batch, seqlen_k, heads_kv, head_dim), dtype, gen, device)
    return q, k, v


def cu_seqlens(lengths, device):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def packed_inputs(lens_q, lens_k, heads_q, heads_kv, head_dim, dtype, gen, device):
    q = randn((sum(lens_q), heads_q, head_dim), dtype, gen, device)
    k = randn((sum(lens_k), heads_kv, head_dim), dtype, gen, device)
    v = randn((sum(lens_k), heads_kv, head_dim), dtype, gen, device)
    return q, k, v, cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)


def check_attention(out, lse, ref_out, ref_lse, dtype, lse_tol=LSE_TOL):
    """out within REL_TOL of the reference; lse close where finite and -inf exactly where the
    reference's is; a row that sees no key gives exactly 0; never a NaN."""
    assert out.dtype == dtype and out.shape == ref_out.shape, (out.dtype, out.shape)
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape, (lse.dtype, lse.shape)
    out, lse, ref_out, ref_lse = out.cpu(), lse.cpu(), ref_out.cpu(), ref_lse.cpu()
    assert not torch.isnan(out).any(), "NaN in out"
    assert not torch.isnan(lse).any(), "NaN in lse"
    err = rel_err(out, ref_out)
    assert err < REL_TOL[dtype], f"relative error {err:.3g} >= {REL_TOL[dtype]:.1g}"
    unseen = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), unseen), "lse must be -inf exactly where a row sees no key"
    torch.testing.assert_close(lse[~unseen].double(), ref_lse[~unseen], rtol=lse_tol, atol=lse_tol)
    unseen_rows = unseen.movedim(-1, -2)  # lse [..., Hq, S] -> out rows [..., S, Hq]
    assert (out[unseen_rows] == 0).all(), "a row that sees no key must give 0"


def attention_by_loops(q, k, v, causal, window, softcap, scale):
    """A second oracle for the reference: one (query, head) at a time over the list of its keys."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    left, right = window[0], 0 if causal else window[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full((batch, heads_q, seqlen_q), float("-inf"), dtype=torch.float64)
    for b, h, i in itertools.product(range(batch), range(heads_q), range(seqlen_q)):
        diagonal = i + seqlen_k - seqlen_q
        keys = [j for j in range(seqlen_k) if (left < 0 or j >= diagonal - left) and (right < 0 or j <= diagonal + right)]
        if not keys:
            continue
        kv_head = h * heads_kv // heads_q
        scores = torch.stack([q[b, i, h].double() @ k[b, j, kv_head].double() * scale for j in keys])
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        lse[b, h, i] = torch.logsumexp(scores, 0)
        weights = torch.exp(scores - lse[b, h, i])
        out[b, i, h] = sum(w * v[b, j, kv_head].double() for w, j in zip(weights, keys))
    return out, lse


@pytest.mark.parametrize(
    "shape,causal,window,softcap",
    [
        ((2, 5, 7, 4, 2), True, (-1, -1), 0.0),
        ((1, 9, 4, 2, 1), True, (-1, -1), 0.0),
        ((1, 6, 6, 2, 2), False, (1, 2), 3.0),
        ((1, 9, 4, 4, 1), False, (0, 0), 0.0),
        ((1, 4, 9, 4, 2), True, (2, -1), 1.0),
    ],
)
def test_reference_agrees_with_a_loop(shape, causal, window, softcap, rng):
    batch, seqlen_q, seqlen_k, heads_q, heads_kv = shape
    q, k, v = batched_inputs(batch, seqlen_q, seqlen_k, heads_q, heads_kv, 8, torch.float32, rng, "cpu")
    out, lse = reference.attention(q, k, v, causal, window, softcap, 0.7)
    expected_out, expected_lse = attention_by_loops(q, k, v, causal, window, softcap, 0.7)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-12, atol=1e-12)


# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, window_size, softcap, softmax_scale)
CASES = {
    "len1": (1, 1, 1, 2, 2, 64, False, (-1, -1), 0.0, None),
    "odd63_mha": (2, 63, 63, 4, 4, 64, False, (-1, -1), 0.0, None),
    "odd65_gqa4_causal": (1, 65, 65, 8, 2, 128, True, (-1, -1), 0.0, None),
    "sq_lt_sk_causal_mqa8": (2, 17, 80, 8, 1, 64, True, (-1, -1), 0.0, None),
    "sq_gt_sk_causal_unseen_rows": (1, 80, 17, 4, 1, 128, True, (-1, -1), 0.0, None),
    "decode_d256_causal": (2, 1, 70, 4, 2, 256, True, (-1, -1), 0.0, None),
    "sk1": (1, 70, 1, 2, 1, 64, False, (-1, -1), 0.0, None),
    "d256_gqa4": (1, 100, 100, 4, 1, 256, False, (-1, -1), 0.0, None),
    "window_left": (1, 90, 90, 4, 2, 64, False, (16, -1), 0.0, None),
    "window_right_sq_lt_sk": (1, 70, 90, 2, 2, 128, False, (-1, 8), 0.0, None),
    "window_both": (2, 77, 77, 4, 4, 64, False, (10, 5), 0.0, None),
    "window_causal_sq_lt_sk": (1, 90, 130, 8, 1, 64, True, (20, -1), 0.0, None),
    "window_diagonal_only": (1, 33, 50, 2, 2, 64, False, (0, 0), 0.0, None),
    "window_sq_gt_sk_unseen_rows": (1, 70, 40, 2, 2, 64, False, (3, 0), 0.0, None),
    "window_right_sq_gt_sk_unseen_rows": (1, 50, 20, 2, 2, 128, False, (-1, 2), 0.0, None),
    "softcap_causal": (1, 65, 65, 4, 2, 64, True, (-1, -1), 30.0, None),
    "softcap_biting_scale": (2, 40, 50, 2, 2, 128, False, (-1, -1), 2.0, 0.5),
    "softcap_window_gqa8": (1, 64, 64, 8, 1, 64, True, (7, -1), 5.0, 0.3),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_flash_attn_matches_reference(device, dtype, case, rng):
    batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, window, softcap, scale = CASES[case]
    q, k, v = batched_inputs(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype, rng, device)
    ref_out, ref_lse = reference.attention(q.cpu(), k.cpu(), v.cpu(), causal, window, softcap, scale)
    if device == "cuda":
        poison_cuda_allocator()
    out, lse, probs = flash_attn_func(
        q, k, v, softmax_scale=scale, causal=causal, window_size=window, softcap=softcap, return_attn_probs=True
    )
    assert probs is None and out.device == q.device and lse.device == q.device
    check_attention(out, lse, ref_out, ref_lse, dtype)


# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, window_size): length 1000.
LONG_CASES = {
    "causal_gqa2_d128": (1, 1000, 1000, 2, 1, 128, True, (-1, -1)),
    "window_d64": (1, 1000, 1000, 2, 2, 64, False, (100, 30)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", LONG_CASES)
def test_flash_attn_length_1000(device, case, rng):
    batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, window = LONG_CASES[case]
    q, k, v = batched_inputs(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, torch.bfloat16, rng, device)
    ref_out, ref_lse = reference.attention(q, k, v, causal, window)
    if device == "cuda":
        poison_cuda_allocator()
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, window_size=window, return_attn_probs=True)
    check_attention(out, lse, ref_out, ref_lse, torch.bfloat16)


# (lens_q, lens_k, heads_q, heads_kv, head_dim, causal, window_size, softcap, extra max_seqlen)
VARLEN_CASES = {
    # an empty sequence, and a last one with queries but no keys (its rows see nothing)
    "uneven_empty_no_keys": ([5, 0, 63, 1, 65], [5, 0, 70, 20, 0], 4, 2, 64, False, (-1, -1), 0.0, 0),
    "uneven_causal_gqa4_d128": ([5, 0, 63, 1, 65], [5, 0, 70, 20, 0], 8, 2, 128, True, (-1, -1), 0.0, 0),
    "causal_window_mqa8": ([17, 0, 40, 3], [30, 0, 20, 3], 8, 1, 64, True, (8, -1), 0.0, 0),
    "softcap_d256_loose_max_seqlen": ([1, 64, 0], [100, 64, 0], 2, 2, 256, False, (-1, -1), 3.0, 5),
    "leading_empty_queries_only_keys": ([0, 0, 7], [0, 3, 7], 2, 1, 64, True, (2, 1), 0.0, 0),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", VARLEN_CASES)
def test_flash_attn_varlen_matches_reference(device, dtype, case, rng):
    lens_q, lens_k, heads_q, heads_kv, head_dim, causal, window, softcap, slack = VARLEN_CASES[case]
    q, k, v, cu_q, cu_k = packed_inputs(lens_q, lens_k, heads_q, heads_kv, head_dim, dtype, rng, device)
    ref_out, ref_lse = reference.attention(
        q.cpu(), k.cpu(), v.cpu(), causal, window, softcap, cu_seqlens_q=cu_q.cpu(), cu_seqlens_k=cu_k.cpu()
    )
    if device == "cuda":
        poison_cuda_allocator()
    out, lse, probs = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lens_q) + slack, max(lens_k) + slack,
        causal=causal, window_size=window, softcap=softcap, return_attn_probs=True,
    )
    assert probs is None
    check_attention(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_views_of_a_fused_qkv(device, rng):
    """q, k and v as head slices of one fused projection: non-contiguous, 16-byte-aligned strides."""
    heads_q, heads_kv, head_dim = 4, 2, 64
    qkv = randn((2, 37, heads_q + 2 * heads_kv, head_dim), torch.bfloat16, rng, device)
    q, k, v = qkv.split([heads_q, heads_kv, heads_kv], dim=2)
    ref_out, ref_lse = reference.attention(q.cpu(), k.cpu(), v.cpu(), causal=True)
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    check_attention(out, lse, ref_out, ref_lse, torch.bfloat16)

    packed = qkv.flatten(0, 1)  # [74, H, D]: two sequences of 37
    q, k, v = packed.split([heads_q, heads_kv, heads_kv], dim=1)
    cu = cu_seqlens([37, 37], device)
    ref_out, ref_lse = reference.attention(q.cpu(), k.cpu(), v.cpu(), cu_seqlens_q=cu.cpu(), cu_seqlens_k=cu.cpu())
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu, cu, 37, 37, return_attn_probs=True)
    check_attention(out, lse, ref_out, ref_lse, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_return_attn_probs_false_gives_the_tensor_and_true_the_triple(device, rng):
    q, k, v = batched_inputs(2, 19, 23, 4, 2, 64, torch.float16, rng, device)
    out = flash_attn_func(q, k, v, causal=True)
    assert isinstance(out, torch.Tensor)
    triple = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert isinstance(triple, tuple) and len(triple) == 3 and triple[2] is None
    assert torch.equal(triple[0], out)
    assert triple[1].shape == (2, 4, 19) and triple[1].dtype == torch.float32

    qp, kp, vp, cu_q, cu_k = packed_inputs([3, 0, 9], [4, 2, 9], 4, 2, 64, torch.float16, rng, device)
    out = flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, 9, 9)
    assert isinstance(out, torch.Tensor) and out.shape == qp.shape
    triple = flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, 9, 9, return_attn_probs=True)
    assert isinstance(triple, tuple) and len(triple) == 3 and triple[2] is None
    assert torch.equal(triple[0], out)
    assert triple[1].shape == (4, 12) and triple[1].dtype == torch.float32


# flash-attn 2's signatures (DESIGN.md §4), in order, with their defaults.
EMPTY = inspect.Parameter.empty
FLASH_ATTN_FUNC_PARAMS = [
    ("q", EMPTY), ("k", EMPTY), ("v", EMPTY), ("dropout_p", 0.0), ("softmax_scale", None), ("causal", False),
    ("window_size", (-1, -1)), ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False),
    ("return_attn_probs", False),
]
FLASH_ATTN_VARLEN_FUNC_PARAMS = [
    ("q", EMPTY), ("k", EMPTY), ("v", EMPTY), ("cu_seqlens_q", EMPTY), ("cu_seqlens_k", EMPTY),
    ("max_seqlen_q", EMPTY), ("max_seqlen_k", EMPTY), ("dropout_p", 0.0), ("softmax_scale", None),
    ("causal", False), ("window_size", (-1, -1)), ("softcap", 0.0), ("alibi_slopes", None),
    ("deterministic", False), ("return_attn_probs", False), ("block_table", None),
]


@pytest.mark.parametrize(
    "fn,expected",
    [(flash_attn_func, FLASH_ATTN_FUNC_PARAMS), (flash_attn_varlen_func, FLASH_ATTN_VARLEN_FUNC_PARAMS)],
    ids=["flash_attn_func", "flash_attn_varlen_func"],
)
def test_signature_is_flash_attn_2s(fn, expected):
    params = list(inspect.signature(fn).parameters.values())
    assert [(p.name, p.default) for p in params] == expected
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
    assert getattr(tkpy, fn.__name__) is fn


@pytest.mark.parametrize("device", DEVICES)
def test_positional_arguments_in_flash_attn_order(device, rng):
    """A caller written against flash-attn passes everything positionally and gets the same result."""
    q, k, v = batched_inputs(1, 40, 52, 4, 2, 64, torch.bfloat16, rng, device)
    out, lse, _ = flash_attn_func(q, k, v, 0.0, 0.3, True, (9, -1), 2.0, None, True, True)
    by_name = flash_attn_func(
        q, k, v, softmax_scale=0.3, causal=True, window_size=(9, -1), softcap=2.0, return_attn_probs=True
    )
    assert torch.equal(out, by_name[0]) and torch.equal(lse, by_name[1])
    check_attention(out, lse, *reference.attention(q.cpu(), k.cpu(), v.cpu(), True, (9, -1), 2.0, 0.3), torch.bfloat16)
    assert torch.equal(flash_attn_func(q, k, v, 0.0, 0.3, True), flash_attn_func(q, k, v, softmax_scale=0.3, causal=True))

    qp, kp, vp, cu_q, cu_k = packed_inputs([6, 0, 11], [6, 3, 20], 4, 2, 64, torch.bfloat16, rng, device)
    out, lse, _ = flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, 11, 20, 0.0, 0.3, True, (9, -1), 2.0, None, True, True, None)
    ref = reference.attention(qp.cpu(), kp.cpu(), vp.cpu(), True, (9, -1), 2.0, 0.3, cu_q.cpu(), cu_k.cpu())
    check_attention(out, lse, *ref, torch.bfloat16)


def test_compiles_fullgraph_and_matches_eager(rng):
    torch._dynamo.reset()
    q, k, v = batched_inputs(2, 33, 41, 4, 2, 64, torch.bfloat16, rng, "cpu")
    qp, kp, vp, cu_q, cu_k = packed_inputs([9, 0, 4], [11, 2, 4], 4, 1, 128, torch.float16, rng, "cpu")

    def fn(q, k, v, qp, kp, vp, cu_q, cu_k):
        out = flash_attn_func(q * 2, k, v, causal=True, window_size=(8, -1))
        out_p, lse_p, _ = flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, 9, 11, softcap=3.0, return_attn_probs=True)
        return out + 1, out_p, lse_p

    inputs = (q, k, v, qp, kp, vp, cu_q, cu_k)
    eager = fn(*inputs)
    compiled = torch.compile(fn, fullgraph=True)(*inputs)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# GPU only


# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, window_size)
CUDA_LARGE_CASES = {
    "s4099_causal_gqa2_d64": (1, 4099, 4099, 4, 2, 64, True, (-1, -1)),
    "s2048_d128_mqa8": (2, 2048, 2048, 8, 1, 128, False, (-1, -1)),
    "sq_gt_sk_causal_d256": (1, 3000, 2000, 2, 2, 256, True, (-1, -1)),
    "decode_s8191_d128": (4, 1, 8191, 8, 1, 128, True, (-1, -1)),
    "window_s5000_d128": (1, 5000, 5000, 4, 4, 128, True, (1024, -1)),
    # Several tasks per persistent CTA (more tasks than SMs) on every head dim's tiles: the task
    # slot and, in the pipelined kernel, the consumers' turns carry over from task to task.
    "tasks_per_cta_causal_d64": (2, 3000, 3000, 16, 16, 64, True, (-1, -1)),
    "tasks_per_cta_d256_gqa4": (2, 1500, 1500, 16, 4, 256, False, (-1, -1)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", CUDA_LARGE_CASES)
def test_cuda_large_shapes_and_tails(case, rng):
    batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, window = CUDA_LARGE_CASES[case]
    q, k, v = batched_inputs(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, torch.bfloat16, rng, "cuda")
    ref_out, ref_lse = reference.attention(q, k, v, causal, window)  # float64 on the GPU
    poison_cuda_allocator()
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, window_size=window, return_attn_probs=True)
    check_attention(out, lse, ref_out, ref_lse, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_varlen_long_uneven(dtype, rng):
    lens_q, lens_k = [1000, 0, 2500, 1, 129, 700], [1000, 5, 2500, 3000, 0, 64]
    q, k, v, cu_q, cu_k = packed_inputs(lens_q, lens_k, 8, 2, 128, dtype, rng, "cuda")
    ref_out, ref_lse = reference.attention(q, k, v, True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    poison_cuda_allocator()
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True, return_attn_probs=True)
    check_attention(out, lse, ref_out, ref_lse, dtype)


def batched_call(q, k, v):
    return flash_attn_func(q, k, v, causal=True, window_size=(300, -1), return_attn_probs=True)[:2]


def varlen_call(cu_q, cu_k):
    def call(q, k, v):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, 700, 900, causal=True, return_attn_probs=True)[:2]

    return call


def cuda_cases(gen):
    """(call, inputs) pairs: a batched and a varlen case with tails and GQA."""
    batched = batched_inputs(2, 777, 1029, 8, 2, 128, torch.bfloat16, gen, "cuda")
    q, k, v, cu_q, cu_k = packed_inputs([700, 0, 33, 513], [900, 17, 0, 513], 4, 1, 64, torch.bfloat16, gen, "cuda")
    return [(batched_call, batched), (varlen_call(cu_q, cu_k), (q, k, v))]


@pytest.mark.gpu
def test_cuda_run_to_run_deterministic(rng):
    for call, inputs in cuda_cases(rng):
        first = call(*inputs)
        for _ in range(3):
            again = call(*inputs)
            assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay(rng):
    for call, inputs in cuda_cases(rng):
        call(*inputs)  # warm-up outside the capture (lazy init, kernel attributes)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = call(*inputs)
        for t in inputs:  # new data in the captured buffers: the replay must read it
            t.copy_(torch.randn(t.shape, generator=rng).to(t.dtype))
        expected = call(*inputs)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured[0], expected[0]) and torch.equal(captured[1], expected[1])


@pytest.mark.gpu
@pytest.mark.sanitizer
def test_cuda_small_for_sanitizer(rng):
    q, k, v = batched_inputs(1, 65, 70, 4, 2, 64, torch.bfloat16, rng, "cuda")
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    check_attention(out, lse, *reference.attention(q.cpu(), k.cpu(), v.cpu(), True), torch.bfloat16)
    q, k, v, cu_q, cu_k = packed_inputs([5, 0, 66], [9, 3, 0], 2, 1, 128, torch.float16, rng, "cuda")
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 66, 9, causal=True, return_attn_probs=True)
    ref = reference.attention(q.cpu(), k.cpu(), v.cpu(), True, cu_seqlens_q=cu_q.cpu(), cu_seqlens_k=cu_k.cpu())
    check_attention(out, lse, *ref, torch.float16)


# ---------------------------------------------------------------------------------------------
# Bad input

# Each case runs with these names bound. The second item is a regex the message must match.
SETUP = textwrap.dedent(
    """
    import torch
    from tkpy import flash_attn_func, flash_attn_varlen_func
    q = torch.randn(2, 8, 4, 64).bfloat16()
    k = torch.randn(2, 8, 2, 64).bfloat16()
    v = torch.randn(2, 8, 2, 64).bfloat16()
    qp = torch.randn(12, 4, 64).bfloat16()  # packed: sequences of 5 and 7 tokens
    kp = torch.randn(12, 2, 64).bfloat16()
    vp = torch.randn(12, 2, 64).bfloat16()
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    def bhd(heads, dim):
        return torch.randn(2, 8, heads, dim).bfloat16()
    """
)

BAD_CALLS = [
    ("flash_attn_func(q.int(), k.int(), v.int())", "q to be bfloat16, float16, float32 or float64, got Int"),
    ("flash_attn_func(q, k.half(), v.half())", "k to have q's dtype"),
    ("flash_attn_func(q, k, v.half())", "v to have q's dtype"),
    ("flash_attn_func(q, k.to('meta'), v)", "device"),
    ("flash_attn_func(bhd(4, 96), bhd(2, 96), bhd(2, 96))", "head_dim 64, 128 or 256, got 96"),
    ("flash_attn_func(bhd(6, 64), bhd(4, 64), bhd(4, 64))", r"q's heads \(6\) to be a multiple of k/v's heads \(4\)"),
    ("flash_attn_func(q, k, v[:, :5])", "k and v of one shape"),
    ("flash_attn_func(q, k[:1], v[:1])", "q's batch 2"),
    ("flash_attn_func(qp, kp, vp)", "4-D"),
    ("flash_attn_func(torch.randn(2, 8, 64, 4).bfloat16().transpose(-1, -2), k, v)", "contiguous last dim"),
    ("flash_attn_func(q, k, v, dropout_p=0.1)", "dropout_p=0.1 is not implemented"),
    ("flash_attn_func(q, k, v, alibi_slopes=torch.ones(4))", "alibi_slopes are not implemented"),
    ("flash_attn_func(q, k, v, window_size=(-2, -1))", "window_size entries must be >= -1"),
    ("flash_attn_func(q, k, v, window_size=(4, -3))", "window_size entries must be >= -1"),
    ("flash_attn_func(q, k, v, window_size=4)", "window_size must be a pair"),
    ("flash_attn_func(q, k, v, softcap=-1.0)", "softcap finite and >= 0"),
    ("flash_attn_varlen_func(qp, kp, vp, torch.tensor([0, 7, 5, 12], dtype=torch.int32), torch.tensor([0, 4, 8, 12], dtype=torch.int32), 7, 7)",
     r"cu_seqlens_q entry 1 gives a sequence of -2 tokens; lengths must be in \[0, max_seqlen=7\]"),
    ("flash_attn_varlen_func(qp, kp, vp, cu, torch.tensor([1, 5, 12], dtype=torch.int32), 7, 7)",
     "cu_seqlens_k must start at 0"),
    ("flash_attn_varlen_func(qp, kp, vp, torch.tensor([0, 5, 11], dtype=torch.int32), cu, 7, 7)",
     "end at the packed length 12"),
    ("flash_attn_varlen_func(qp, kp, vp, cu.long(), cu.long(), 7, 7)", r"cu_seqlens_q to be a contiguous 1-D int32 tensor of batch \+ 1 >= 1 entries, got Long"),
    ("flash_attn_varlen_func(qp, kp, vp, cu, torch.tensor([0, 12], dtype=torch.int32), 7, 12)", "length batch \\+ 1"),
    ("flash_attn_varlen_func(qp, kp, vp, cu, cu, 6, 7)", r"sequence of 7 tokens; lengths must be in \[0, max_seqlen=6\]"),
    ("flash_attn_varlen_func(qp, kp, vp, cu, cu, 7, 7, block_table=torch.zeros(2, 1, dtype=torch.int32))",
     "block_table is not implemented"),
    ("flash_attn_varlen_func(qp, kp, vp, cu, cu, 7, 7, dropout_p=0.1)", "dropout_p=0.1 is not implemented"),
    ("flash_attn_varlen_func(qp, kp, vp, cu, cu, 7, 7, alibi_slopes=torch.ones(4))", "alibi_slopes are not implemented"),
    ("flash_attn_varlen_func(q, k, v, torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([0, 1, 2], dtype=torch.int32), 1, 1)",
     "3-D"),
    ("flash_attn_varlen_func(qp, kp, vp[:11], cu, cu, 7, 7)", "k and v of one shape"),
    ("flash_attn_varlen_func(qp, kp, vp, cu, None, 7, 7)", "cu_seqlens_k"),
    ("flash_attn_varlen_func(qp, kp, vp, cu, cu.to('meta'), 7, 7)", "device"),
]


@pytest.mark.parametrize("code,message", BAD_CALLS, ids=[c[:70] for c, _ in BAD_CALLS])
def test_bad_input_raises_clear_error(code, message):
    assert_bad_call_raises(SETUP, code, message)


def test_bad_input_never_crashes_the_process():
    assert_bad_calls_survive(SETUP, [code for code, _ in BAD_CALLS])


# ---- which Hopper forward kernel CUDA calls run (TKPY_ATTENTION_KERNEL, tkpy.use_attention_kernel) ----


def test_attention_kernel_defaults_to_pipelined_and_can_be_switched():
    assert tkpy.attention_kernel() == "pipelined"
    with tkpy.use_attention_kernel("baseline"):
        assert tkpy.attention_kernel() == "baseline"
        with tkpy.use_attention_kernel("pipelined"):
            assert tkpy.attention_kernel() == "pipelined"
        assert tkpy.attention_kernel() == "baseline"
    assert tkpy.attention_kernel() == "pipelined"
    with pytest.raises(ValueError, match="'baseline', 'pipelined' or None"):
        with tkpy.use_attention_kernel("fast"):
            pass


def _run_with_environment(value, code):
    import os
    import subprocess
    import sys

    env = dict(os.environ, TKPY_ATTENTION_KERNEL=value)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_attention_kernel_environment_is_read_once():
    proc = _run_with_environment("baseline", """
        import os, tkpy
        first = tkpy.attention_kernel()
        os.environ["TKPY_ATTENTION_KERNEL"] = "pipelined"
        print(first, tkpy.attention_kernel())
        with tkpy.use_attention_kernel("pipelined"):
            print(tkpy.attention_kernel())
        print(tkpy.attention_kernel())
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["baseline", "baseline", "pipelined", "baseline"]


def test_attention_kernel_environment_naming_no_kernel_is_a_clear_error():
    proc = _run_with_environment("fastest", """
        import torch, tkpy
        q = torch.randn(1, 8, 2, 64, dtype=torch.bfloat16)
        out = tkpy.flash_attn_func(q, q, q)  # the CPU path has one kernel: the variable is not read
        assert out.shape == q.shape
        try:
            tkpy.attention_kernel()
        except ValueError as e:
            print("ValueError:", e)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "ValueError: TKPY_ATTENTION_KERNEL must be 'baseline' or 'pipelined'" in proc.stdout, proc.stdout
    assert "'fastest'" in proc.stdout


@pytest.mark.gpu
def test_cuda_call_with_an_unknown_kernel_in_the_environment_is_refused():
    proc = _run_with_environment("fastest", """
        import torch, tkpy
        q = torch.randn(1, 8, 2, 64, dtype=torch.bfloat16, device="cuda")
        try:
            tkpy.flash_attn_func(q, q, q)
        except ValueError as e:
            print("ValueError:", e)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "TKPY_ATTENTION_KERNEL must be 'baseline' or 'pipelined'" in proc.stdout, proc.stdout

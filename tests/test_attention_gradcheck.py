"""The CPU attention paths in float64 (issue 19: gradcheck passes), and their float32 path.

For flash_attn_func, flash_attn_varlen_func and the block-sparse family, in float64 on the CPU:
  - out and softmax_lse, and the gradients of q, k and v (from random cotangents of both), equal
    those of python/tkpy/reference.py up to summation order;
  - torch.autograd.gradcheck, which compares the backward with finite differences of the forward.
gradcheck runs in fast_mode (the Jacobian along one pair of random directions; the full Jacobian
of a 200-token call takes minutes), so the element-wise comparison with the reference is what
places an error; one tiny call is also checked on every element. Lengths of 1, 5, 65, 130 and 200
leave tails in the forward's 128-token tiles and in the backward's 64-row query and 128-key blocks.
"""

import pytest
import torch
import torch.nn.functional as F

import tkpy
from tkpy import (
    block_sparse_attn_func,
    block_streaming_attn_func,
    flash_attn_func,
    flash_attn_varlen_func,
    reference,
    token_streaming_attn_func,
)

from helpers import REL_TOL, randn, rel_err
from test_attention import batched_inputs, check_attention, packed_inputs

F64 = torch.float64
HEAD_DIM = 64
# float64 results agree with the float64 reference up to summation order.
FP64_TOL = 1e-12


def leaves(*tensors):
    return tuple(t.detach().requires_grad_() for t in tensors)


def seen_lse(lse):
    """lse with -inf (a row that sees no key, or padding) as 0: finite differences of -inf are NaN,
    and no perturbation of q, k or v changes which rows see a key."""
    return torch.where(torch.isfinite(lse), lse, 0.0)


def check_float64(ours, ref, q, k, v, rng):
    """ours(q, k, v) -> (out, lse) in float64 equals ref's (the reference, in the same layout):
    forward, and gradients of q, k and v from random cotangents of out and lse; then gradcheck."""
    out, lse = ours(q, k, v)
    ref_out, ref_lse = ref(q, k, v)
    assert out.dtype == F64 and lse.dtype == F64, (out.dtype, lse.dtype)
    assert rel_err(out, ref_out) < FP64_TOL, rel_err(out, ref_out)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "lse must be -inf where a row sees no key"
    assert rel_err(seen_lse(lse), seen_lse(ref_lse)) < FP64_TOL

    dout, dlse = randn(out.shape, F64, rng), randn(lse.shape, F64, rng)
    grads = torch.autograd.grad((out, seen_lse(lse)), (q, k, v), (dout, dlse))
    expected = torch.autograd.grad((ref_out, seen_lse(ref_lse)), (q, k, v), (dout, dlse))
    for name, grad, want in zip("qkv", grads, expected):
        assert grad.dtype == F64, name
        assert rel_err(grad, want) < FP64_TOL, f"d{name}: relative error {rel_err(grad, want):.3g}"

    def out_and_seen_lse(q, k, v):
        out, lse = ours(q, k, v)
        return out, seen_lse(lse)

    assert torch.autograd.gradcheck(out_and_seen_lse, (q, k, v), fast_mode=True)


# ---- flash_attn_func ----------------------------------------------------------------------------

# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, causal, window_size, softcap)
DENSE_CASES = {
    "len1": (1, 1, 1, 2, 2, False, (-1, -1), 0.0),
    "gqa_causal_sq_lt_sk": (2, 5, 130, 4, 2, True, (-1, -1), 0.0),
    "mqa_causal_sq_gt_sk_unseen_rows": (1, 130, 5, 2, 1, True, (-1, -1), 0.0),
    "window_tails": (1, 200, 200, 2, 2, False, (20, 7), 0.0),
    "window_leaves_rows_empty": (1, 70, 10, 2, 1, False, (2, 0), 0.0),
    "softcap_causal_gqa": (1, 130, 200, 4, 2, True, (-1, -1), 5.0),
    "softcap_window": (2, 65, 130, 2, 1, False, (30, 30), 2.0),
}


@pytest.mark.parametrize("case", DENSE_CASES)
def test_flash_attn_func_float64(case, rng):
    batch, seqlen_q, seqlen_k, heads_q, heads_kv, causal, window, softcap = DENSE_CASES[case]
    q, k, v = leaves(*batched_inputs(batch, seqlen_q, seqlen_k, heads_q, heads_kv, HEAD_DIM, F64, rng, "cpu"))
    options = dict(causal=causal, window_size=window, softcap=softcap)

    def ours(q, k, v):
        out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **options)
        return out, lse

    check_float64(ours, lambda q, k, v: reference.attention(q, k, v, **options), q, k, v, rng)


def test_float64_keeps_scale_and_softcap_in_float64(rng):
    """A scale and softcap that float32 cannot hold (D = 128's 1/sqrt(128), 0.1, 3.3): the float64
    path computes with them as given, not rounded, so it equals the reference to float64 precision."""
    q, k, v = leaves(*batched_inputs(1, 40, 70, 2, 1, 128, F64, rng, "cpu"))
    for options in (dict(causal=True), dict(softmax_scale=0.1, softcap=3.3)):
        def ours(q, k, v):
            out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **options)
            return out, lse

        check_float64(ours, lambda q, k, v: reference.attention(q, k, v, **options), q, k, v, rng)


def test_flash_attn_func_gradcheck_on_every_element(rng):
    """Every entry of the Jacobian, on a tiny causal GQA call with Sq > Sk (a row sees no key)."""
    q, k, v = leaves(*batched_inputs(1, 3, 2, 2, 1, HEAD_DIM, F64, rng, "cpu"))

    def out_and_seen_lse(q, k, v):
        out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        return out, seen_lse(lse)

    assert torch.autograd.gradcheck(out_and_seen_lse, (q, k, v), fast_mode=False)


# ---- flash_attn_varlen_func ---------------------------------------------------------------------

# (lens_q, lens_k, heads_q, heads_kv, causal, window_size, softcap); each batch holds an empty
# query sequence and a sequence whose queries see no key.
VARLEN_CASES = {
    "gqa_causal": ([5, 0, 130, 3], [7, 4, 200, 0], 4, 2, True, (-1, -1), 0.0),
    "window_softcap": ([200, 0, 1], [130, 0, 5], 2, 1, False, (40, 3), 3.0),
}


@pytest.mark.parametrize("case", VARLEN_CASES)
def test_flash_attn_varlen_func_float64(case, rng):
    lens_q, lens_k, heads_q, heads_kv, causal, window, softcap = VARLEN_CASES[case]
    q, k, v, cu_q, cu_k = packed_inputs(lens_q, lens_k, heads_q, heads_kv, HEAD_DIM, F64, rng, "cpu")
    options = dict(causal=causal, window_size=window, softcap=softcap)

    def ours(q, k, v):
        out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), return_attn_probs=True,
                                             **options)
        return out, lse

    def ref(q, k, v):
        return reference.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **options)

    check_float64(ours, ref, *leaves(q, k, v), rng)


# ---- block_sparse_attn_func and the streaming functions ----------------------------------------

def int32(values):
    return torch.tensor(values, dtype=torch.int32)


def per_sequence(lse, lens_q):
    """The reference's packed lse [Hq, total_q] in Block-Sparse-Attention's layout
    [B, Hq, max_seqlen_q], -inf past each sequence's end."""
    starts = [sum(lens_q[:b]) for b in range(len(lens_q))]
    return torch.stack([F.pad(lse[:, s:s + n], (0, max(lens_q) - n), value=float("-inf"))
                        for s, n in zip(starts, lens_q)])


# (function, lens_q, lens_k, head types, (sink, local) per head, is_causal); 4 query heads over 2
# kv heads. Sequences of 0 and 1 query tokens, masks that leave a row block without a key block,
# and streaming windows that miss a row's keys leave rows that see no key.
SPARSE_CASES = {
    "block_sparse_causal": ("block_sparse", [130, 0, 200], [200, 5, 130], [0, -1, 1, 1],
                            [(0, 0), (1, 1), (0, 0), (0, 0)], True),
    "block_sparse_not_causal": ("block_sparse", [200, 1], [130, 200], [1, 0, -1, 1],
                                [(0, 0), (0, 0), (0, 1), (0, 0)], False),
    "block_streaming": ("block_streaming", [200, 5], [130, 200], [0, -1, -1, 0], [(0, 0), (1, 1), (0, 1), (0, 0)],
                        True),
    "token_streaming": ("token_streaming", [130, 0, 200], [200, 3, 130], [-1, 0, -1, -1],
                        [(4, 16), (0, 0), (0, 1), (3, 70)], True),
}


@pytest.mark.parametrize("case", SPARSE_CASES)
def test_block_sparse_family_float64(case, rng):
    function, lens_q, lens_k, types, pairs, causal = SPARSE_CASES[case]
    q, k, v, cu_q, cu_k = packed_inputs(lens_q, lens_k, 4, 2, HEAD_DIM, F64, rng, "cpu")
    head_mask_type = int32(types)
    info = int32([size for pair in pairs for size in pair])
    max_q, max_k = max(lens_q), max(lens_k)
    mask = None
    if function == "block_sparse":
        mask = torch.rand((len(lens_q), types.count(1), -(-max_q // 128), -(-max_k // 128)), generator=rng) < 0.6

    def ours(q, k, v):
        if function == "block_sparse":
            out, lse, _ = block_sparse_attn_func(q, k, v, cu_q, cu_k, head_mask_type, info, mask, max_q, max_k, 0.0,
                                                 is_causal=causal, return_attn_probs=True)
        elif function == "block_streaming":
            out, lse, _ = block_streaming_attn_func(q, k, v, cu_q, cu_k, head_mask_type, info, max_q, max_k, 0.0,
                                                    is_causal=causal, return_attn_probs=True)
        else:
            out, lse, _ = token_streaming_attn_func(q, k, v, cu_q, cu_k, head_mask_type, info, max_q, max_k,
                                                    return_attn_probs=True)
        return out, lse

    def ref(q, k, v):
        out, lse = reference.block_sparse_attention(q, k, v, cu_q, cu_k, head_mask_type, info, mask, causal,
                                                    function == "token_streaming")
        return out, per_sequence(lse, lens_q)

    check_float64(ours, ref, *leaves(q, k, v), rng)


# ---- the backward ops take the forward's float64 lse --------------------------------------------

def test_float64_backward_refuses_a_float32_lse_or_dlse(rng):
    q, k, v = batched_inputs(1, 5, 7, 2, 1, HEAD_DIM, F64, rng, "cpu")
    out, lse = torch.ops.tkpy.attention_forward(q, k, v)
    dout = randn(out.shape, F64, rng)
    with pytest.raises(ValueError, match="softmax_lse .*as a contiguous float64 tensor"):
        torch.ops.tkpy.attention_backward(dout, q, k, v, out, lse.float())
    with pytest.raises(ValueError, match="dlse as a contiguous float64 tensor"):
        torch.ops.tkpy.attention_backward(dout, q, k, v, out, lse, lse.float())


# ---- float32 on the CPU ------------------------------------------------------------------------

def test_float32_forward_equals_the_reference(rng):
    fp32, tol = torch.float32, REL_TOL[torch.float32]
    q, k, v = batched_inputs(2, 130, 200, 4, 2, HEAD_DIM, fp32, rng, "cpu")
    out, lse, _ = flash_attn_func(q, k, v, causal=True, softcap=5.0, return_attn_probs=True)
    check_attention(out, lse, *reference.attention(q, k, v, causal=True, softcap=5.0), fp32, lse_tol=tol)

    q, k, v = batched_inputs(1, 200, 70, 2, 1, HEAD_DIM, fp32, rng, "cpu")  # rows 0-129 see no key
    out, lse, _ = flash_attn_func(q, k, v, window_size=(3, 0), return_attn_probs=True)
    check_attention(out, lse, *reference.attention(q, k, v, window_size=(3, 0)), fp32, lse_tol=tol)

    lens_q, lens_k = [130, 0, 5], [200, 7, 0]
    q, k, v, cu_q, cu_k = packed_inputs(lens_q, lens_k, 4, 2, HEAD_DIM, fp32, rng, "cpu")
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                         return_attn_probs=True)
    ref_out, ref_lse = reference.attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    check_attention(out, lse, ref_out, ref_lse, fp32, lse_tol=tol)


def test_float32_backward_equals_the_reference(rng):
    q, k, v = leaves(*batched_inputs(1, 130, 200, 4, 2, HEAD_DIM, torch.float32, rng, "cpu"))
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    dout, dlse = randn(out.shape, torch.float32, rng), randn(lse.shape, torch.float32, rng)
    grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
    expected = reference.attention_grads(reference.attention, q, k, v, dout, dlse, causal=True)
    for name, grad, want in zip("qkv", grads, expected):
        assert grad.dtype == torch.float32, name
        assert rel_err(grad, want) < REL_TOL[torch.float32], f"d{name}: relative error {rel_err(grad, want):.3g}"


# ---- CUDA takes bf16 and fp16 only -------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_cuda_refuses_float32_and_float64(dtype):
    q = torch.randn(1, 8, 2, HEAD_DIM, dtype=dtype, device="cuda")
    with pytest.raises(tkpy.ArgumentError, match="q to be bfloat16 or float16 on CUDA, got .* on the CPU only"):
        flash_attn_func(q, q, q)
    cu = torch.tensor([0, 8], dtype=torch.int32, device="cuda")
    types = torch.zeros(2, dtype=torch.int32, device="cuda")
    with pytest.raises(tkpy.ArgumentError, match="q to be bfloat16 or float16 on CUDA"):
        token_streaming_attn_func(q[0], q[0], q[0], cu, cu, types, None, 8, 8)

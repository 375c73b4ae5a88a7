"""Gradients of the attention forwards against python/tkpy/reference.py's float64 autograd.

flash_attn_func, flash_attn_varlen_func and the block-sparse family (block_sparse_attn_func,
block_streaming_attn_func, token_streaming_attn_func) are differentiable in q, k and v, with a
gradient of softmax_lse honoured too. On CPU and GPU: awkward shapes (odd lengths, Sq != Sk both
ways, rows that see no key, keys that no query sees), GQA/MQA, head dims, windows, softcap, varlen
with empty sequences, every head type of the block-sparse family, bitwise reproducibility,
torch.compile and opcheck of the backward ops, and bad input to them. GPU only: poisoned gradient
buffers, large shapes, `deterministic` on many key blocks per query block.
"""

import functools
import textwrap

import pytest
import torch

from tkpy import (
    block_sparse_attn_func,
    block_streaming_attn_func,
    flash_attn_func,
    flash_attn_varlen_func,
    reference,
    token_streaming_attn_func,
)
from tkpy.block_sparse import plan

from helpers import REL_TOL, assert_bad_call_raises, assert_bad_calls_survive, describe_mismatch, poison_cuda_allocator
from helpers import randn, rel_err
from test_attention import DEVICES, DTYPES, batched_inputs, packed_inputs
from test_block_sparse import STREAMING_TYPES, int32, long_mixed_heads_case, mixed_types, random_blockmask, streaming_info


def backward(call, q, k, v, dout, dlse=None):
    """(dq, dk, dv) of ``call(q, k, v, return_attn_probs=...)`` from autograd, with ``dout`` as out's
    gradient and, when given, ``dlse`` as softmax_lse's (else the call returns out alone, as most
    callers use it). On CUDA the allocator is poisoned before the backward, so that a gradient
    element it never writes reads as NaN."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    result = call(*leaves, return_attn_probs=dlse is not None)
    outputs, grad_outputs = ((result[0], result[1]), (dout, dlse)) if dlse is not None else ((result,), (dout,))
    if q.is_cuda:
        poison_cuda_allocator()
    return torch.autograd.grad(outputs, leaves, grad_outputs)


def oracle(forward, q, k, v, dout, dlse=None, **options):
    """What the gradients must be: ``(dq, dk, dv)`` of reference.attention_grads of `forward`
    (float64, on the inputs' device), and which query rows see no key (bool, q's shape without
    head_dim; where the reference's lse is -inf)."""
    grads = reference.attention_grads(forward, q, k, v, dout, dlse, **options)
    lse = forward(q, k, v, **options)[1]
    return grads, torch.isneginf(lse).movedim(-1, -2)


def check_grads(grads, expected, dtype):
    """dq, dk, dv: the inputs' dtype and shape, finite, within REL_TOL[dtype] of the oracle's, and
    exactly 0 where nothing flows: dq on a query that sees no key, dk and dv on a key that no query
    sees (where the oracle's dv is exactly 0: a seen key's never is, for a random dout)."""
    ref_grads, unseen_queries = expected
    unseen_keys = (ref_grads[2] == 0).all(dim=-1)
    unseen_rows = (unseen_queries, unseen_keys, unseen_keys)
    for name, grad, ref, unseen in zip(("dq", "dk", "dv"), grads, ref_grads, unseen_rows):
        assert grad.dtype == dtype and grad.shape == ref.shape, f"{name}: {grad.dtype} {tuple(grad.shape)}"
        grad, ref = grad.cpu(), ref.cpu()
        assert torch.isfinite(grad).all(), f"{name} is not finite\n{describe_mismatch(grad, ref)}"
        err = rel_err(grad, ref)
        assert err < REL_TOL[dtype], f"{name}: relative error {err:.3g} >= {REL_TOL[dtype]:.1g}\n" + describe_mismatch(
            grad, ref)
        assert (grad[unseen.cpu()] == 0).all(), f"{name}: not 0 on a row that sees nothing or that nothing sees"


def output_grads(q, lse_shape, with_lse, gen):
    """Fresh random gradients of out (q's dtype) and, if `with_lse`, of softmax_lse (fp32)."""
    dout = randn(q.shape, q.dtype, gen, q.device)
    return dout, randn(lse_shape, torch.float32, gen, q.device) if with_lse else None


def cpu(*tensors):
    return [None if t is None else t.cpu() for t in tensors]


WITH_LSE = [pytest.param(False, id="dout"), pytest.param(True, id="dout_dlse")]

# ---------------------------------------------------------------------------------------------
# flash_attn_func

# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, window_size, softcap, softmax_scale)
CASES = {
    "odd63_mha": (2, 63, 63, 4, 4, 64, False, (-1, -1), 0.0, None),
    "len64_causal_gqa2_d128": (1, 64, 64, 4, 2, 128, True, (-1, -1), 0.0, None),
    "odd65_causal_gqa4_d128": (1, 65, 65, 8, 2, 128, True, (-1, -1), 0.0, None),
    "sq127_lt_sk129_causal_mqa4": (2, 127, 129, 4, 1, 64, True, (-1, -1), 0.0, None),
    "sq129_gt_sk127_causal_unseen_rows_d256": (1, 129, 127, 2, 1, 256, True, (-1, -1), 0.0, None),
    "sq250_gt_sk65_causal_mqa8": (1, 250, 65, 8, 1, 64, True, (-1, -1), 0.0, None),
    "sq65_lt_sk280_causal_gqa2_d128": (1, 65, 280, 4, 2, 128, True, (-1, -1), 0.0, None),
    "sq1_sk257_causal_d256": (2, 1, 257, 4, 2, 256, True, (-1, -1), 0.0, None),
    "sq300_sk257_gqa2_d256": (1, 300, 257, 4, 2, 256, False, (-1, -1), 0.0, None),
    "window_left": (1, 200, 200, 4, 2, 64, False, (16, -1), 0.0, None),
    "window_right_sq_lt_sk": (1, 70, 290, 2, 2, 128, False, (-1, 8), 0.0, None),
    "window_both": (2, 130, 130, 4, 4, 64, False, (10, 5), 0.0, None),
    "window_causal_sq_lt_sk_mqa8": (1, 90, 230, 8, 1, 64, True, (20, -1), 0.0, None),
    "window_sq_gt_sk_unseen_rows": (1, 200, 40, 2, 2, 64, False, (3, 0), 0.0, None),
    "window_right_sq_gt_sk_unseen_rows": (1, 129, 63, 2, 2, 128, False, (-1, 2), 0.0, None),
    "window_sq_lt_sk_unseen_keys": (1, 50, 200, 4, 2, 128, False, (5, 0), 0.0, None),
    "softcap_causal": (1, 65, 65, 4, 2, 64, True, (-1, -1), 30.0, None),
    "softcap_biting_scale": (2, 64, 127, 2, 2, 128, False, (-1, -1), 2.0, 0.5),
    "softcap_window_gqa8_d256": (1, 129, 129, 8, 1, 256, True, (7, -1), 5.0, 0.3),
    "s700_causal_gqa4_d128": (1, 700, 700, 8, 2, 128, True, (-1, -1), 0.0, None),
    "sq513_lt_sk1000_window_mqa4": (1, 513, 1000, 4, 1, 64, True, (300, -1), 0.0, None),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_lse", WITH_LSE)
@pytest.mark.parametrize("case", CASES)
def test_flash_attn_grads_match_reference(device, dtype, with_lse, case, rng):
    batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, window, softcap, scale = CASES[case]
    q, k, v = batched_inputs(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype, rng, device)
    dout, dlse = output_grads(q, (batch, heads_q, seqlen_q), with_lse, rng)
    options = dict(causal=causal, window_size=window, softcap=softcap, softmax_scale=scale)
    grads = backward(functools.partial(flash_attn_func, **options), q, k, v, dout, dlse)
    check_grads(grads, oracle(reference.attention, *cpu(q, k, v, dout, dlse), **options), dtype)


# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, window_size): each query sees
# one key or none.
ONE_KEY_CASES = {
    "len1": (2, 1, 1, 2, 2, 64, False, (-1, -1)),
    "sk1_gqa2_d128": (1, 65, 1, 4, 2, 128, False, (-1, -1)),
    "window_diagonal_only_sq_lt_sk": (1, 33, 50, 2, 2, 64, False, (0, 0)),
    "causal_window0_sq_gt_sk_d256": (1, 70, 40, 2, 1, 256, True, (0, -1)),
}
# |dq| and |dk| allowed where they are 0 in exact arithmetic: computing dP - delta in fp32 leaves
# ~1e-6; a key missed or seen too many gives O(1).
ZERO_GRAD_ATOL = 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ONE_KEY_CASES)
def test_one_key_per_query(device, dtype, case, rng):
    """A softmax over one key is constant: from dout alone dq and dk are 0 in exact arithmetic
    (and the oracle's are exactly 0, so no relative error applies), while dv_j sums the dout of the
    queries that see key j. A gradient of lse alone moves them: dq_i = scale · dlse_i · k_j."""
    batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, window = ONE_KEY_CASES[case]
    q, k, v = batched_inputs(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype, rng, device)
    dout, dlse = output_grads(q, (batch, heads_q, seqlen_q), True, rng)
    options = dict(causal=causal, window_size=window)
    call = functools.partial(flash_attn_func, **options)

    dq, dk, dv = backward(call, q, k, v, dout)
    (_, _, ref_dv), unseen_queries = oracle(reference.attention, *cpu(q, k, v, dout), **options)
    for name, grad in (("dq", dq), ("dk", dk)):
        largest = grad.abs().max().item()
        assert largest <= ZERO_GRAD_ATOL, f"{name} should be 0, has an element of magnitude {largest:.3g}"
    assert (dq.cpu()[unseen_queries] == 0).all(), "dq: not 0 on a query that sees no key"
    err = rel_err(dv.cpu(), ref_dv)
    assert err < REL_TOL[dtype], f"dv: relative error {err:.3g}\n{describe_mismatch(dv.cpu(), ref_dv)}"

    check_grads(backward(call, q, k, v, dout, dlse), oracle(reference.attention, *cpu(q, k, v, dout, dlse), **options),
                dtype)


# ---------------------------------------------------------------------------------------------
# flash_attn_varlen_func

# (lens_q, lens_k, heads_q, heads_kv, head_dim, causal, window_size, softcap, extra max_seqlen)
# "empty_*": sequence 1 has no tokens, sequence 3 queries but no keys, sequence 4 keys but no
# queries, sequence 6 one of each.
VARLEN_CASES = {
    "empty_uneven": ([5, 0, 63, 65, 0, 129, 1], [5, 0, 70, 0, 9, 127, 1], 4, 2, 64, False, (-1, -1), 0.0, 0),
    "empty_uneven_causal_gqa4_d128": ([5, 0, 63, 65, 0, 129, 1], [5, 0, 70, 0, 9, 127, 1], 8, 2, 128, True, (-1, -1),
                                      0.0, 0),
    "causal_window_mqa8": ([17, 0, 200, 3], [30, 4, 130, 3], 8, 1, 64, True, (8, -1), 0.0, 0),
    "softcap_d256_loose_max_seqlen": ([1, 64, 0, 257], [100, 0, 64, 200], 2, 2, 256, False, (-1, -1), 3.0, 5),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_lse", WITH_LSE)
@pytest.mark.parametrize("case", VARLEN_CASES)
def test_flash_attn_varlen_grads_match_reference(device, dtype, with_lse, case, rng):
    lens_q, lens_k, heads_q, heads_kv, head_dim, causal, window, softcap, slack = VARLEN_CASES[case]
    q, k, v, cu_q, cu_k = packed_inputs(lens_q, lens_k, heads_q, heads_kv, head_dim, dtype, rng, device)
    dout, dlse = output_grads(q, (heads_q, q.shape[0]), with_lse, rng)
    options = dict(causal=causal, window_size=window, softcap=softcap)
    call = functools.partial(flash_attn_varlen_func, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                             max_seqlen_q=max(lens_q) + slack, max_seqlen_k=max(lens_k) + slack, **options)
    dq, dk, dv = backward(call, q, k, v, dout, dlse)
    expected = oracle(reference.attention, *cpu(q, k, v, dout, dlse), cu_seqlens_q=cu_q.cpu(), cu_seqlens_k=cu_k.cpu(),
                      **options)
    check_grads((dq, dk, dv), expected, dtype)
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    for b, (seqlen_q, seqlen_k) in enumerate(zip(lens_q, lens_k)):
        if seqlen_k == 0:
            assert (dq[starts_q[b]:starts_q[b + 1]] == 0).all(), f"sequence {b} has no keys: its dq must be 0"
        if seqlen_q == 0:
            for grad in (dk, dv):
                assert (grad[starts_k[b]:starts_k[b + 1]] == 0).all(), f"sequence {b} has no queries: dk, dv must be 0"


# ---------------------------------------------------------------------------------------------
# The block-sparse family


def per_sequence_rows(x, cu_q):
    """Block-Sparse-Attention's lse layout ``[B, Hq, max_seqlen_q]`` -> the packed ``[Hq, total_q]``."""
    starts = cu_q.tolist()
    return torch.cat([x[b, :, :starts[b + 1] - starts[b]] for b in range(len(starts) - 1)], dim=1)


# (lens_q, lens_k, heads_q, heads_kv, head_dim): tails past 128-token blocks, Sq != Sk both ways;
# "varlen_*": sequence 1 has keys but no queries, sequence 3 a query but no keys.
SPARSE_SHAPES = {
    "varlen_tails_gqa4_d128": ([129, 0, 300, 1, 5], [129, 7, 300, 0, 260], 8, 2, 128),
    "sq_lt_sk_gqa2_d256": ([100, 200], [390, 257], 4, 2, 256),
    "sq_gt_sk_mqa_d64": ([300, 129], [130, 5], 4, 1, 64),
}
# (function, is_causal, exact_streaming, with a gradient of softmax_lse)
SPARSE_MODES = {
    "block_sparse_full": ("block_sparse", False, False, False),
    "block_sparse_causal_dlse": ("block_sparse", True, False, True),
    "block_sparse_causal_exact_dlse": ("block_sparse", True, True, True),
    "block_streaming_causal": ("block_streaming", True, False, False),
    "block_streaming_full_dlse": ("block_streaming", False, False, True),
    "token_streaming": ("token_streaming", True, True, False),
}


def sparse_call(api, cu_q, cu_k, types, info, mask, max_q, max_k, causal, exact, deterministic=False):
    """One of the three public functions with everything but q, k, v and return_attn_probs bound."""
    if api == "token_streaming":
        return functools.partial(token_streaming_attn_func, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, head_mask_type=types,
                                 streaming_info=info, max_seqlen_q=max_q, max_seqlen_k=max_k,
                                 deterministic=deterministic)
    if api == "block_streaming":
        return functools.partial(block_streaming_attn_func, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, head_mask_type=types,
                                 streaming_info=info, max_seqlen_q=max_q, max_seqlen_k=max_k, p_dropout=0.0,
                                 deterministic=deterministic, is_causal=causal)
    return functools.partial(block_sparse_attn_func, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, head_mask_type=types,
                             streaming_info=info, base_blockmask=mask, max_seqlen_q_=max_q, max_seqlen_k_=max_k,
                             p_dropout=0.0, deterministic=deterministic, is_causal=causal, exact_streaming=exact)


# (sink, local) of the streaming heads in head order, cycled: tokens for exact streaming, 128-token
# blocks otherwise. The second sees nothing at all.
STREAMING_PAIRS = {True: [(4, 16), (0, 0), (0, 129), (130, 3)], False: [(1, 1), (0, 0), (0, 2), (2, 0)]}


def sparse_case(api, lens_q, lens_k, heads_q, exact, gen, device):
    """Head types, streaming_info and block mask for `api`: dense, streaming and (block_sparse only)
    block-sparse heads with a random mask, one of whose row blocks has no active block."""
    if api == "block_sparse":
        types = mixed_types(heads_q)
        mask = random_blockmask(len(lens_q), types.count(1), max(lens_q), max(lens_k), 0.4, gen, device)
        mask[:, 0, -1] = False
    else:
        types, mask = STREAMING_TYPES[:heads_q], None
    streaming = iter(STREAMING_PAIRS[exact] * heads_q)
    pairs = [next(streaming) if t == -1 else (0, 0) for t in types]
    return int32(types, device), streaming_info(pairs, device), mask


def sparse_oracle(q, k, v, dout, dlse, cu_q, cu_k, types, info, mask, causal, exact):
    """The oracle of reference.block_sparse_attention, on the inputs' device."""
    return oracle(reference.block_sparse_attention, q, k, v, dout, dlse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                  head_mask_type=types, streaming_info=info, base_blockmask=mask, is_causal=causal,
                  exact_streaming=exact)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", SPARSE_MODES)
@pytest.mark.parametrize("shape", SPARSE_SHAPES)
def test_block_sparse_family_grads_match_reference(device, dtype, mode, shape, rng):
    api, causal, exact, with_lse = SPARSE_MODES[mode]
    lens_q, lens_k, heads_q, heads_kv, head_dim = SPARSE_SHAPES[shape]
    max_q, max_k = max(lens_q), max(lens_k)
    q, k, v, cu_q, cu_k = packed_inputs(lens_q, lens_k, heads_q, heads_kv, head_dim, dtype, rng, device)
    types, info, mask = sparse_case(api, lens_q, lens_k, heads_q, exact, rng, device)
    dout, dlse = output_grads(q, (len(lens_q), heads_q, max_q), with_lse, rng)
    call = sparse_call(api, cu_q, cu_k, types, info, mask, max_q, max_k, causal, exact)
    grads = backward(call, q, k, v, dout, dlse)
    packed_dlse = None if dlse is None else per_sequence_rows(dlse, cu_q)
    check_grads(grads, sparse_oracle(q, k, v, dout, packed_dlse, cu_q, cu_k, types, info, mask, causal, exact), dtype)


# ---------------------------------------------------------------------------------------------
# Reproducibility, torch.compile, opcheck


def oracle_by_batch(q, k, v, dout, dlse=None, **options):
    """The oracle of reference.attention one batch element at a time, on the inputs' device: on the
    GPU a long sequence's float64 scores and their autograd buffers take GiBs."""
    parts = [oracle(reference.attention, q[b:b + 1], k[b:b + 1], v[b:b + 1], dout[b:b + 1],
                    None if dlse is None else dlse[b:b + 1], **options)
             for b in range(q.shape[0])]
    grads = [torch.cat(grad) for grad in zip(*(part[0] for part in parts))]
    return grads, torch.cat([part[1] for part in parts])


def many_key_block_cases(gen, device, length):
    """(call taking `deterministic`, (q, k, v, dout), the oracle of (q, k, v, dout)) for a GQA
    softcapped flash_attn_func and a causal mixed-heads block_sparse_attn_func over `length` tokens,
    so that each query block takes dQ additions from many key blocks."""
    q, k, v = batched_inputs(2, length, length, 8, 2, 128, torch.bfloat16, gen, device)
    options = dict(softcap=20.0)
    dense = (functools.partial(flash_attn_func, **options), (q, k, v, randn(q.shape, q.dtype, gen, device)),
             functools.partial(oracle_by_batch, **options))

    lens = [length, length // 2 + 1]
    qp, kp, vp, cu_q, cu_k = packed_inputs(lens, lens, 8, 2, 128, torch.bfloat16, gen, device)
    types, info, mask = sparse_case("block_sparse", lens, lens, 8, False, gen, device)

    def sparse_attention(q, k, v, deterministic, return_attn_probs):
        call = sparse_call("block_sparse", cu_q, cu_k, types, info, mask, length, length, True, False, deterministic)
        return call(q, k, v, return_attn_probs=return_attn_probs)

    def sparse_grads(q, k, v, dout):
        return sparse_oracle(q, k, v, dout, None, cu_q, cu_k, types, info, mask, True, False)

    sparse = (sparse_attention, (qp, kp, vp, randn(qp.shape, qp.dtype, gen, device)), sparse_grads)
    return [dense, sparse]


@pytest.mark.parametrize("deterministic", [False, True])
def test_cpu_backward_is_bitwise_reproducible(deterministic, rng):
    """The CPU backward sums in a fixed order whatever `deterministic` says."""
    for call, inputs, _ in many_key_block_cases(rng, "cpu", 300):
        call = functools.partial(call, deterministic=deterministic)
        first = backward(call, *inputs)
        again = backward(call, *inputs)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_compiled_backward_matches_eager(rng):
    torch._dynamo.reset()
    q, k, v = batched_inputs(2, 33, 141, 4, 2, 64, torch.bfloat16, rng, "cpu")
    qp, kp, vp, cu_q, cu_k = packed_inputs([9, 0, 130], [11, 2, 140], 4, 1, 128, torch.float16, rng, "cpu")

    def fn(q, k, v, qp, kp, vp, cu_q, cu_k):
        out = flash_attn_func(q * 2, k, v, causal=True, window_size=(8, -1))
        out_p, lse_p, _ = flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, 130, 140, softcap=3.0, return_attn_probs=True)
        return out + 1, out_p, lse_p

    grad_outputs = (randn(q.shape, q.dtype, rng), randn(qp.shape, qp.dtype, rng), randn((4, 139), torch.float32, rng))

    def grads(f):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, qp, kp, vp)]
        return torch.autograd.grad(f(*leaves, cu_q, cu_k), leaves, grad_outputs)

    eager = grads(fn)
    compiled = grads(torch.compile(fn, fullgraph=True))
    for name, e, c in zip(("dq", "dk", "dv", "dq_varlen", "dk_varlen", "dv_varlen"), eager, compiled):
        assert torch.equal(c, e), f"{name}: compiled differs from eager\n{describe_mismatch(c, e)}"


# Every opcheck test but test_aot_dispatch_dynamic: a tkpy op's Meta kernel is its real
# implementation without the launch, which reads concrete sizes and offsets, so no tkpy op traces
# with symbolic shapes (torch.compile(dynamic=True)).
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static")


def test_opcheck_of_the_backward_ops_and_of_the_forwards_autograd(rng):
    """The backward ops' schemas and fakes against their real CPU kernels, and each forward op with
    inputs that require grad, whose AOT-traced backward must equal eager's."""
    q, k, v = batched_inputs(2, 70, 140, 4, 2, 64, torch.bfloat16, rng, "cpu")
    options = dict(window_left=30, window_right=0, softcap=5.0)
    out, lse = torch.ops.tkpy.attention_forward(q, k, v, **options)
    dout, dlse = randn(out.shape, out.dtype, rng), randn(lse.shape, torch.float32, rng)
    torch.library.opcheck(torch.ops.tkpy.attention_backward.default, (dout, q, k, v, out, lse, dlse), options,
                          test_utils=OPCHECK_TESTS)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    torch.library.opcheck(torch.ops.tkpy.attention_forward.default, leaves, options, test_utils=OPCHECK_TESTS)

    lens = [130, 0, 70]
    qp, kp, vp, cu_q, cu_k = packed_inputs(lens, lens, 4, 2, 64, torch.float16, rng, "cpu")
    types, info, mask = sparse_case("block_sparse", lens, lens, 4, False, rng, "cpu")
    sparse_index, block_indices, block_counts = plan(types, mask)
    args = (cu_q, cu_k, types, info, sparse_index, 130, 130)
    options = dict(block_indices=block_indices, block_counts=block_counts, is_causal=True)
    out, lse = torch.ops.tkpy.block_sparse_attention_forward(qp, kp, vp, *args, **options)
    dout = randn(out.shape, out.dtype, rng)
    torch.library.opcheck(torch.ops.tkpy.block_sparse_attention_backward.default,
                          (dout, qp, kp, vp, out, lse, None, *args), options, test_utils=OPCHECK_TESTS)
    leaves = [x.clone().requires_grad_() for x in (qp, kp, vp)]
    torch.library.opcheck(torch.ops.tkpy.block_sparse_attention_forward.default, (*leaves, *args), options,
                          test_utils=OPCHECK_TESTS)


# ---------------------------------------------------------------------------------------------
# Bad input to the backward ops (autograd always passes the forward's own tensors; a direct call
# may not). Each case runs with these names bound; the second item is a regex the message must match.

SETUP = textwrap.dedent(
    """
    import torch
    import tkpy  # registers torch.ops.tkpy
    q = torch.randn(2, 8, 4, 64).bfloat16()
    k = torch.randn(2, 9, 2, 64).bfloat16()
    v = torch.randn(2, 9, 2, 64).bfloat16()
    out, lse = torch.ops.tkpy.attention_forward(q, k, v, window_right=0)
    dout = torch.randn_like(out)
    def dense(**changes):
        args = dict(dout=dout, q=q, k=k, v=v, out=out, softmax_lse=lse, window_right=0)
        return torch.ops.tkpy.attention_backward(**{**args, **changes})
    qp = torch.randn(12, 4, 64).half()  # packed: sequences of 5 and 7 tokens
    kp = torch.randn(12, 2, 64).half()
    vp = torch.randn(12, 2, 64).half()
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    types = torch.tensor([0, -1, 0, -1], dtype=torch.int32)
    info = torch.tensor([0, 0, 1, 1] * 2, dtype=torch.int32)
    sparse_args = (qp, kp, vp, cu, cu, types, info, torch.full((4,), -1, dtype=torch.int32), 7, 7)
    out_p, lse_p = torch.ops.tkpy.block_sparse_attention_forward(*sparse_args, is_causal=True)
    dout_p = torch.randn_like(out_p)
    def sparse(dout=dout_p, out=out_p, softmax_lse=lse_p, dlse=None):
        return torch.ops.tkpy.block_sparse_attention_backward(dout, *sparse_args[:3], out, softmax_lse, dlse,
                                                              *sparse_args[3:], is_causal=True)
    """
)

BAD_CALLS = [
    ("dense(dout=dout[:, :7])", r"expected dout of q's shape \[2, 8, 4, 64\], got \[2, 7, 4, 64\]"),
    ("dense(dout=dout.half())", "expected dout to have q's dtype BFloat16, got Half"),
    ("dense(dout=dout[0])", "expected dout to be 4-D"),
    ("dense(dout=dout.to('meta'))", "device"),
    ("dense(out=out[:, :7])", r"expected out \(the forward's output\) of q's shape"),
    ("dense(softmax_lse=lse[..., :7].contiguous())",
     r"expected softmax_lse \(the forward's\) as a contiguous float32 tensor \[2, 4, 8\], got Float \[2, 4, 7\]"),
    ("dense(softmax_lse=lse.double())", r"expected softmax_lse \(the forward's\) as a contiguous float32 .*got Double"),
    ("dense(softmax_lse=lse.transpose(0, 1).contiguous().transpose(0, 1))", "softmax_lse .*contiguous float32"),
    ("dense(dlse=torch.randn(2, 4, 7))",
     r"expected dlse as a contiguous float32 tensor .*\[2, 4, 8\], got Float \[2, 4, 7\]"),
    ("dense(dlse=torch.randn(2, 4, 8).half())", "expected dlse as a contiguous float32 tensor .*got Half"),
    ("dense(dlse=lse.to('meta'))", "device"),
    ("sparse(dout=dout_p[:11])", r"expected dout of q's shape \[12, 4, 64\], got \[11, 4, 64\]"),
    ("sparse(softmax_lse=lse_p[:, :11].contiguous())",
     r"expected softmax_lse \(the forward's\) as a contiguous float32 tensor \[4, 12\], got Float \[4, 11\]"),
    ("sparse(dlse=torch.randn(2, 4, 7))", r"expected dlse .*\[4, 12\], got Float \[2, 4, 7\]"),
    # The sparse backward's own checks name it, not the forward.
    ("sparse(out=out_p.bfloat16())", r"^block_sparse_attention_backward: expected out to have q's dtype"),
]


@pytest.mark.parametrize("code,message", BAD_CALLS, ids=[c for c, _ in BAD_CALLS])
def test_bad_input_to_the_backward_ops_raises_clear_error(code, message):
    assert_bad_call_raises(SETUP, code, message, errors=ValueError)  # the raw ops: ValueError for a refused argument


def test_bad_input_to_the_backward_ops_never_crashes_the_process():
    assert_bad_calls_survive(SETUP, [code for code, _ in BAD_CALLS])


def test_double_backward_is_refused(rng):
    """A gradient of the gradients (a gradient penalty) raises, rather than come back as zeros."""
    q, k, v = (x.requires_grad_() for x in batched_inputs(1, 40, 40, 2, 2, 64, torch.bfloat16, rng, "cpu"))
    dq = torch.autograd.grad((flash_attn_func(q, k, v).float() ** 2).sum(), q, create_graph=True)[0]
    with pytest.raises(NotImplementedError, match="no double backward"):
        torch.autograd.grad(dq.float().pow(2).sum(), q)


def test_gradients_that_autograd_hands_out_are_taken(rng):
    """Autograd's own gradients of out: a slice of a concatenation's gradient (not 16-byte aligned),
    an expanded one, and an empty batch's; and lse's alone."""
    q, k, v = (x.requires_grad_() for x in batched_inputs(1, 40, 50, 2, 1, 64, torch.bfloat16, rng, "cpu"))
    dout = randn((1, 40, 2, 64), torch.bfloat16, rng)
    expected = torch.autograd.grad(flash_attn_func(q, k, v), (q, k, v), dout)
    out = flash_attn_func(q, k, v)
    weights = torch.cat([randn((3,), torch.float32, rng), dout.reshape(-1).float()])
    loss = (torch.cat([randn((3,), torch.float32, rng), out.reshape(-1).float()]) * weights).sum()
    for got, want in zip(torch.autograd.grad(loss, (q, k, v)), expected):
        assert torch.equal(got, want)
    grads = torch.autograd.grad(flash_attn_func(q, k, v).float().sum(-1).sum(), (q, k, v))  # expanded
    assert all(torch.isfinite(g).all() for g in grads)
    empty = [x[:0].detach().requires_grad_() for x in (q, k, v)]
    assert [g.shape for g in torch.autograd.grad(flash_attn_func(*empty).sum(), empty)] == [x.shape for x in empty]
    _, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    assert torch.autograd.grad(lse.sum(), q)[0].abs().sum() > 0


def test_a_mask_changed_in_place_before_the_backward_is_an_error(rng):
    """The forward's mask tensors are saved like its inputs: changing one before the backward is
    autograd's error, not silently different gradients."""
    q, k, v, cu_q, cu_k = packed_inputs([20, 20], [20, 20], 2, 2, 64, torch.bfloat16, rng, "cpu")
    q.requires_grad_()
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 20, 20)
    cu_k.copy_(torch.tensor([0, 10, 40], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_deterministic_takes_a_numpy_bool(rng):
    numpy = pytest.importorskip("numpy")
    q, k, v = (x.requires_grad_() for x in batched_inputs(1, 8, 8, 2, 2, 64, torch.bfloat16, rng, "cpu"))
    flash_attn_func(q, k, v, deterministic=numpy.True_).sum().backward()
    assert torch.isfinite(q.grad).all()


# ---------------------------------------------------------------------------------------------
# GPU only


# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, window_size, with a gradient of lse)
CUDA_LARGE_CASES = {
    "b2_s4096_h8_d128_causal": (2, 4096, 4096, 8, 8, 128, True, (-1, -1), False),
    "b2_s4096_h8_d128": (2, 4096, 4096, 8, 8, 128, False, (-1, -1), True),
    "s3001_causal_gqa8_d64": (1, 3001, 3001, 8, 1, 64, True, (-1, -1), False),
    "sq1500_lt_sk2500_window_gqa2_d256": (1, 1500, 2500, 4, 2, 256, True, (512, -1), True),
    "sq2000_gt_sk1000_causal_d256": (1, 2000, 1000, 4, 4, 256, True, (-1, -1), False),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", CUDA_LARGE_CASES)
def test_cuda_large_shapes(case, rng):
    batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, window, with_lse = CUDA_LARGE_CASES[case]
    q, k, v = batched_inputs(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, torch.bfloat16, rng, "cuda")
    dout, dlse = output_grads(q, (batch, heads_q, seqlen_q), with_lse, rng)
    grads = backward(functools.partial(flash_attn_func, causal=causal, window_size=window), q, k, v, dout, dlse)
    check_grads(grads, oracle_by_batch(q, k, v, dout, dlse, causal=causal, window_size=window), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("causal,exact", [(True, False), (True, True), (False, False)], ids=["causal", "exact", "full"])
def test_cuda_block_sparse_long_mixed_heads(causal, exact, rng):
    q, k, v, cu_q, cu_k, types, info, mask, max_q, max_k = long_mixed_heads_case(exact, rng)
    dout, dlse = output_grads(q, (cu_q.numel() - 1, 8, max_q), True, rng)
    call = sparse_call("block_sparse", cu_q, cu_k, types, info, mask, max_q, max_k, causal, exact)
    grads = backward(call, q, k, v, dout, dlse)
    expected = sparse_oracle(q, k, v, dout, per_sequence_rows(dlse, cu_q), cu_q, cu_k, types, info, mask, causal, exact)
    check_grads(grads, expected, torch.bfloat16)


@pytest.mark.gpu
def test_cuda_deterministic_backward_is_bitwise_reproducible(rng):
    """At S=2048 each query block takes dQ additions from 16 key blocks: deterministic=True fixes
    their order, and three runs agree bit for bit; deterministic=False (in any order) and True are
    both within tolerance of the oracle."""
    for call, inputs, expected_of in many_key_block_cases(rng, "cuda", 2048):
        deterministic = functools.partial(call, deterministic=True)
        first = backward(deterministic, *inputs)
        for _ in range(2):
            again = backward(deterministic, *inputs)
            assert all(torch.equal(a, b) for a, b in zip(first, again))
        expected = expected_of(*inputs)  # float64 on the GPU
        check_grads(first, expected, torch.bfloat16)
        check_grads(backward(functools.partial(call, deterministic=False), *inputs), expected, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.sanitizer
def test_cuda_small_for_sanitizer(rng):
    q, k, v = batched_inputs(1, 65, 70, 4, 2, 64, torch.bfloat16, rng, "cuda")
    dout, dlse = output_grads(q, (1, 4, 65), True, rng)
    grads = backward(functools.partial(flash_attn_func, causal=True), q, k, v, dout, dlse)
    check_grads(grads, oracle(reference.attention, *cpu(q, k, v, dout, dlse), causal=True), torch.bfloat16)

    lens_q, lens_k = [5, 0, 130], [9, 3, 200]
    q, k, v, cu_q, cu_k = packed_inputs(lens_q, lens_k, 4, 2, 128, torch.float16, rng, "cuda")
    dout = randn(q.shape, q.dtype, rng, "cuda")
    call = functools.partial(flash_attn_varlen_func, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=130,
                             max_seqlen_k=200, causal=True)
    expected = oracle(reference.attention, *cpu(q, k, v, dout), causal=True, cu_seqlens_q=cu_q.cpu(),
                      cu_seqlens_k=cu_k.cpu())
    check_grads(backward(call, q, k, v, dout), expected, torch.float16)

    types, info, mask = sparse_case("block_sparse", lens_q, lens_k, 4, False, rng, "cuda")
    call = sparse_call("block_sparse", cu_q, cu_k, types, info, mask, 130, 200, True, False)
    expected = sparse_oracle(*cpu(q, k, v, dout), None, *cpu(cu_q, cu_k, types, info, mask), True, False)
    check_grads(backward(call, q, k, v, dout), expected, torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_unchecked_block_lists_backward_as_the_forward_walked_them(monkeypatch, deterministic, rng):
    """CUDA reads no list values on the host by default: a count past the list's end, a repeated or
    a descending block are cut where the list stops ascending, in the backward as in the forward
    (so the deterministic dQ order has no gap to wait on forever): the gradients equal those of the
    lists cut by hand."""
    monkeypatch.delenv("TKPY_CHECK_VALUES", raising=False)
    q, k, v, cu_q, cu_k = packed_inputs([256], [384], 1, 1, 64, torch.bfloat16, rng, "cuda")
    types, info = int32([1], "cuda"), int32([0, 0], "cuda")
    args = (cu_q, cu_k, types, info, int32([0], "cuda"), 256, 384)
    hostile = (int32([[[[0, 2, 2], [1, 0, 2]]]], "cuda"), int32([[[7, 3]]], "cuda"))
    ascending = (int32([[[[0, 2, 0], [1, 0, 0]]]], "cuda"), int32([[[2, 1]]], "cuda"))
    dout = randn(q.shape, q.dtype, rng, "cuda")

    def grads(lists):
        indices, counts = lists
        out, lse = torch.ops.tkpy.block_sparse_attention_forward(q, k, v, *args, block_indices=indices,
                                                                 block_counts=counts)
        return torch.ops.tkpy.block_sparse_attention_backward(dout, q, k, v, out, lse, None, *args,
                                                              block_indices=indices, block_counts=counts,
                                                              deterministic=deterministic)

    poison_cuda_allocator()
    for got, expected in zip(grads(hostile), grads(ascending)):
        torch.cuda.synchronize()
        assert torch.isfinite(got).all()
        if deterministic:
            assert torch.equal(got, expected)
        else:
            assert rel_err(got, expected) < REL_TOL[torch.bfloat16]

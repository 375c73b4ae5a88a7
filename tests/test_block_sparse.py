"""LServe block-sparse prefill against python/tkpy/reference.py (float64).

block_sparse_attn_func, block_streaming_attn_func and token_streaming_attn_func, on CPU and GPU:
DESIGN.md §4's invariants (every block on equals dense, streaming that covers every key equals
dense causal, a head's output does not depend on the other heads' types), the exact- and
block-streaming masks with Sq != Sk and small sink/local, random block masks with mixed head types,
varlen with uneven and empty sequences, GQA, head dims, the Block-Sparse-Attention signatures and
bad input. GPU only: poisoned outputs, large shapes, determinism, CUDA graphs.
"""

import functools
import inspect
import itertools
import math
import textwrap

import pytest
import torch

import tkpy
from tkpy import (
    block_sparse_attn_func,
    block_streaming_attn_func,
    flash_attn_varlen_func,
    reference,
    token_streaming_attn_func,
)

from helpers import REL_TOL, assert_bad_call_raises, assert_bad_calls_survive, poison_cuda_allocator, rel_err
from test_attention import DEVICES, LSE_TOL, check_attention, packed_inputs

# Every CUDA test runs on both Hopper forward kernels (conftest.attention_kernel).
pytestmark = pytest.mark.usefixtures("attention_kernel")

BLOCK = 128  # Block-Sparse-Attention's mask and streaming block, in tokens


def blocks(tokens):
    return -(-tokens // BLOCK)


def int32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


def streaming_info(pairs, device):
    """int32 ``[2·Hq]`` from one (sink, local) pair per head."""
    return int32([size for pair in pairs for size in pair], device)


def random_blockmask(batch, heads, max_q, max_k, density, gen, device):
    """bool ``[B, heads, ceil(max_q/128), ceil(max_k/128)]`` with each block on with probability `density`."""
    return (torch.rand((batch, heads, blocks(max_q), blocks(max_k)), generator=gen) < density).to(device)


def sparse_reference(q, k, v, cu_q, cu_k, types, info, mask, causal, exact):
    return reference.block_sparse_attention(
        q.cpu(), k.cpu(), v.cpu(), cu_q.cpu(), cu_k.cpu(), types.cpu(), info.cpu(),
        None if mask is None else mask.cpu(), causal, exact,
    )


def packed_lse(lse, cu_q, max_q):
    """Block-Sparse-Attention's lse ``[B, Hq, max_seqlen_q]`` -> ``[Hq, total_q]`` like the reference's,
    after checking the layout: its rows past each sequence's end are -inf."""
    starts = cu_q.tolist()
    assert lse.dim() == 3 and tuple(lse.shape[::2]) == (len(starts) - 1, max_q), tuple(lse.shape)
    rows = []
    for b in range(len(starts) - 1):
        length = starts[b + 1] - starts[b]
        assert torch.isneginf(lse[b, :, length:]).all(), f"sequence {b}: lse past its {length} rows is not -inf"
        rows.append(lse[b, :, :length])
    return torch.cat(rows, dim=1)


def run_block_sparse(q, k, v, cu_q, cu_k, types, info, mask, max_q, max_k, causal, exact):
    """block_sparse_attn_func on poisoned memory (GPU) -> (out, lse ``[Hq, total_q]``)."""
    if q.is_cuda:
        poison_cuda_allocator()
    out, lse, probs = block_sparse_attn_func(
        q, k, v, cu_q, cu_k, types, info, mask, max_q, max_k, 0.0,
        is_causal=causal, exact_streaming=exact, return_attn_probs=True,
    )
    assert probs is None and out.device == q.device and lse.device == q.device
    return out, packed_lse(lse, cu_q, max_q)


def check_same_attention(out, lse, other_out, other_lse, dtype):
    """Two implementations' results agree within the dtype's tolerance (the second one as the reference)."""
    check_attention(out, lse, other_out.double(), other_lse.double(), dtype)


# ---------------------------------------------------------------------------------------------
# The reference itself


def ceil_div(x, y):
    """C++'s ``(x + y - 1) / y`` on ints, truncating toward zero, as cute::ceil_div computes it."""
    return math.trunc((x + y - 1) / y)


@functools.lru_cache(maxsize=None)
def peer_streaming_blocks(row_block, seqlen_q, seqlen_k, sink, local, is_causal, exact_streaming):
    """The key blocks that Block-Sparse-Attention visits for a streaming head's 128-row block, restated
    step by step from its kernel (flash_blockmask.h fwdStreaming / fwdExactStreaming, with the
    n_block_max of flash_fwd_kernel.h): the iterator walks down from ``start`` through ``local``
    blocks, then the ``sink`` blocks down to 0, or through every block below ``start`` when the two
    meet; the kernel visits the steps below ``n_block_max``."""
    n_block_max = ceil_div(seqlen_k, BLOCK)
    if is_causal:
        n_block_max = min(n_block_max, ceil_div((row_block + 1) * BLOCK + seqlen_k - seqlen_q, BLOCK))
        start_row = max(math.trunc((seqlen_q - seqlen_k) / BLOCK), 0)
        start = ceil_div(max(seqlen_k - seqlen_q, 0), BLOCK) + 1 + row_block - start_row
    else:
        start = n_block_max
    if exact_streaming:  # tokens: the sink's blocks, and the local window's plus two
        sink, local = ceil_div(sink, BLOCK), ceil_div(local, BLOCK) + 2
    no_gap = start < sink + local
    visited = set()
    for step in range(min(sink + local, start)):
        block = start - 1 - step if no_gap or step < local else sink - 1 - (step - local)
        if 0 <= block < n_block_max:
            visited.add(block)
    return frozenset(visited)


def visible_in_the_peer(i, j, seqlen_q, seqlen_k, head_type, sink, local, block_on, is_causal, exact_streaming):
    """Whether Block-Sparse-Attention lets query i see key j: the visited blocks, then the
    token-level masks (causal; for exact streaming also the sink and the local window)."""
    diagonal = i + seqlen_k - seqlen_q
    if is_causal and j > diagonal:
        return False
    if head_type == 0:
        return True
    if head_type == 1:
        return bool(block_on[i // BLOCK, j // BLOCK])
    if j // BLOCK not in peer_streaming_blocks(i // BLOCK, seqlen_q, seqlen_k, sink, local, is_causal, exact_streaming):
        return False
    return not exact_streaming or j < sink or j >= diagonal - (local - 1)


def peer_streaming_mask(seqlen_q, seqlen_k, sink, local, is_causal, exact_streaming):
    """bool ``[Sq, Sk]`` from :func:`visible_in_the_peer`, one row block at a time."""
    i = torch.arange(seqlen_q)[:, None]
    j = torch.arange(seqlen_k)[None, :]
    diagonal = i + seqlen_k - seqlen_q
    blocks_of_row = torch.zeros(seqlen_q, blocks(seqlen_k), dtype=torch.bool)
    for row_block in range(blocks(seqlen_q)):
        for block in peer_streaming_blocks(row_block, seqlen_q, seqlen_k, sink, local, is_causal, exact_streaming):
            blocks_of_row[row_block * BLOCK:(row_block + 1) * BLOCK, block] = True
    visible = blocks_of_row[:, j[0] // BLOCK]
    if is_causal:
        visible &= j <= diagonal
    if exact_streaming:
        visible &= (j < sink) | (j >= diagonal - (local - 1))
    return visible


# Lengths on both sides of the 128-token block edges, and sequences with no tokens.
EDGE_LENGTHS = [0, 1, 5, 127, 128, 129, 200, 256, 257, 300, 513]


@pytest.mark.parametrize("mode", ["block_causal", "block_full", "exact_causal"])
def test_reference_masks_are_block_sparse_attentions(mode):
    """reference.block_sparse_mask (closed form) == the peer's iterators, step by step, for every
    pair of edge lengths (Sq = Sk, Sq < Sk and Sq > Sk) and small sink and local windows."""
    is_causal, exact = mode != "block_full", mode == "exact_causal"
    windows = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (2, 1), (1, 3), (3, 0)]
    if exact:
        windows = [(0, 1), (1, 0), (4, 16), (0, 129), (130, 3), (5, 200), (0, 0), (2, 256)]
    for seqlen_q, seqlen_k, (sink, local) in itertools.product(EDGE_LENGTHS, EDGE_LENGTHS, windows):
        expected = peer_streaming_mask(seqlen_q, seqlen_k, sink, local, is_causal, exact)
        mask = reference.block_sparse_mask(seqlen_q, seqlen_k, -1, sink, local, None, is_causal, exact)
        assert torch.equal(mask, expected), (
            f"Sq={seqlen_q} Sk={seqlen_k} sink={sink} local={local}: rows "
            f"{(mask != expected).any(dim=1).nonzero().flatten().tolist()[:10]} differ"
        )


def test_reference_refuses_exact_streaming_without_causal():
    with pytest.raises(ValueError, match="exact_streaming requires is_causal"):
        reference.block_sparse_mask(4, 4, -1, 1, 1, None, False, True)


def block_sparse_by_loops(q, k, v, lens_q, lens_k, types, pairs, mask, is_causal, exact_streaming, scale):
    """A second oracle for the reference: one (query, head) at a time over the list of keys that
    Block-Sparse-Attention's iterators and masks let it see."""
    heads_q, heads_kv = q.shape[1], k.shape[1]
    sparse_column = list(itertools.accumulate(int(t == 1) for t in types))  # 1-based where type is 1
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full((heads_q, q.shape[0]), float("-inf"), dtype=torch.float64)
    q0 = k0 = 0
    for b, (seqlen_q, seqlen_k) in enumerate(zip(lens_q, lens_k)):
        for h, i in itertools.product(range(heads_q), range(seqlen_q)):
            block_on = mask[b, sparse_column[h] - 1] if types[h] == 1 else None
            keys = [
                j for j in range(seqlen_k)
                if visible_in_the_peer(i, j, seqlen_q, seqlen_k, types[h], *pairs[h], block_on, is_causal, exact_streaming)
            ]
            if not keys:
                continue
            kv_head = h * heads_kv // heads_q
            rows = torch.tensor(keys) + k0
            scores = k[rows, kv_head].double() @ q[q0 + i, h].double() * scale
            lse[h, q0 + i] = torch.logsumexp(scores, 0)
            out[q0 + i, h] = torch.exp(scores - lse[h, q0 + i]) @ v[rows, kv_head].double()
        q0, k0 = q0 + seqlen_q, k0 + seqlen_k
    return out, lse


# (lens_q, lens_k, types, (sink, local) per head, is_causal, exact_streaming); head dim 8, 2 kv heads
LOOP_CASES = {
    "square_block_streaming": ([5, 0, 260], [7, 3, 260], [1, -1, 0, -1], [(0, 0), (1, 1), (0, 0), (0, 2)], True, False),
    "square_block_streaming_full": ([5, 0, 400], [7, 3, 400], [-1, 1, 0, -1], [(1, 1), (0, 0), (0, 0), (0, 2)], False, False),
    "sq_lt_sk_block_streaming": ([5, 140], [7, 300], [-1, 1, -1, 0], [(0, 1), (0, 0), (1, 0), (0, 0)], True, False),
    "sq_lt_sk_block_streaming_full": ([5, 140], [7, 300], [-1, 1, -1, 0], [(0, 1), (0, 0), (1, 0), (0, 0)], False, False),
    "sq_gt_sk_block_streaming": ([300, 1], [130, 0], [-1, -1, 1, 0], [(1, 1), (0, 2), (0, 0), (0, 0)], True, False),
    "sq_gt_sk_block_streaming_full": ([300, 1], [130, 0], [-1, -1, 1, 0], [(1, 1), (0, 1), (0, 0), (0, 0)], False, False),
    "sq_lt_sk_exact": ([5, 140], [7, 300], [-1, 1, -1, 0], [(3, 5), (0, 0), (0, 1), (0, 0)], True, True),
    "sq_gt_sk_exact": ([300, 1], [130, 0], [0, -1, 1, -1], [(0, 0), (130, 0), (0, 0), (2, 40)], True, True),
}


@pytest.mark.parametrize("case", LOOP_CASES)
def test_reference_agrees_with_a_loop(case, rng):
    lens_q, lens_k, types, pairs, causal, exact = LOOP_CASES[case]
    q, k, v, cu_q, cu_k = packed_inputs(lens_q, lens_k, 4, 2, 8, torch.float32, rng, "cpu")
    mask = random_blockmask(len(lens_q), types.count(1), max(lens_q), max(lens_k), 0.5, rng, "cpu")
    out, lse = reference.block_sparse_attention(
        q, k, v, cu_q, cu_k, int32(types, "cpu"), streaming_info(pairs, "cpu"), mask, causal, exact, 0.7
    )
    expected_out, expected_lse = block_sparse_by_loops(q, k, v, lens_q, lens_k, types, pairs, mask, causal, exact, 0.7)
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-12, atol=1e-12)


# Worked by hand from DESIGN.md §4 (Block-Sparse-Attention's masks):
# (Sq, Sk, is_causal, exact_streaming, sink, local, {query row: keys it sees}).
KNOWN_COUNTS = {
    "exact_square": (10, 10, True, True, 2, 3, {0: 1, 1: 2, 3: 4, 4: 5, 9: 5}),
    "exact_diagonal_only": (10, 10, True, True, 0, 1, {0: 1, 9: 1}),
    "exact_sink_only": (10, 10, True, True, 3, 0, {0: 1, 2: 3, 9: 3}),
    "exact_nothing": (10, 10, True, True, 0, 0, {0: 0, 9: 0}),
    "exact_sq_lt_sk": (4, 10, True, True, 2, 3, {0: 5, 3: 5}),
    "exact_sq_gt_sk": (10, 4, True, True, 1, 2, {0: 0, 5: 0, 6: 1, 7: 2, 9: 3}),
    "block_square_local2": (300, 300, True, False, 0, 2, {0: 1, 200: 201, 299: 172}),
    "block_square_sink_only": (300, 300, True, False, 1, 0, {5: 6, 299: 128}),
    "block_sq_lt_sk": (200, 300, True, False, 1, 1, {0: 101, 127: 228, 128: 128, 199: 172}),
    "block_sq_lt_sk_by_256": (44, 300, True, False, 0, 1, {0: 1, 43: 44}),
    # the window of row block 1 ends at m = 4, past the last key block (2): it sees nothing
    "block_sq_lt_sk_by_129_local1": (171, 300, True, False, 0, 1, {0: 0, 127: 1, 128: 0, 170: 0}),
    "block_sq_lt_sk_by_129_local2": (171, 300, True, False, 0, 2, {0: 2, 170: 44}),
    # Sq > Sk by one block: row block 1 ends its window at m = 1, on key block 0
    "block_sq_gt_sk_by_128": (256, 128, True, False, 0, 1, {0: 0, 127: 0, 128: 1, 200: 73, 255: 128}),
    "block_sq_gt_sk_local1": (300, 130, True, False, 0, 1, {0: 0, 169: 0, 170: 1, 255: 86, 256: 0, 299: 2}),
    "block_sq_gt_sk_sink1": (300, 130, True, False, 1, 1, {169: 0, 170: 1, 255: 86, 299: 130}),
    # not causal: every row sees the sink and the last `local` of ceil(Sk/128) key blocks
    "block_full_peer_grid": (256, 256, False, False, 1, 3, {0: 256, 255: 256}),
    "block_full_square": (700, 700, False, False, 1, 2, {0: 316, 350: 316, 699: 316}),
    "block_full_sink_only": (300, 300, False, False, 2, 0, {0: 256, 299: 256}),
    "block_full_nothing": (300, 300, False, False, 0, 0, {0: 0, 299: 0}),
    "block_full_sq_lt_sk": (200, 700, False, False, 0, 1, {0: 60, 199: 60}),
    "block_full_sq_gt_sk": (700, 130, False, False, 0, 1, {0: 2, 699: 2}),
}


@pytest.mark.parametrize("device", [None, *DEVICES], ids=["reference", "cpu", "cuda"])
@pytest.mark.parametrize("case", KNOWN_COUNTS)
def test_streaming_masks_worked_by_hand(device, case, rng):
    """With q = 0 every visible key scores 0, so lse is log(number of visible keys)."""
    seqlen_q, seqlen_k, causal, exact, sink, local, counts = KNOWN_COUNTS[case]
    q, k, v, cu_q, cu_k = packed_inputs([seqlen_q], [seqlen_k], 2, 1, 64, torch.bfloat16, rng, device or "cpu")
    q.zero_()
    types = int32([-1, 0], q.device)  # head 1 is dense, causal or not as the call says
    info = streaming_info([(sink, local), (0, 0)], q.device)
    if device is None:
        out, lse = reference.block_sparse_attention(q, k, v, cu_q, cu_k, types, info, None, causal, exact)
    else:
        out, lse = run_block_sparse(q, k, v, cu_q, cu_k, types, info, None, seqlen_q, seqlen_k, causal, exact)
        check_attention(out, lse, *sparse_reference(q, k, v, cu_q, cu_k, types, info, None, causal, exact), torch.bfloat16)
    lse = lse.double().cpu()
    seen = {row: 0 if math.isinf(lse[0, row]) else round(math.exp(lse[0, row])) for row in counts}
    assert seen == counts
    rows = torch.arange(seqlen_q, dtype=torch.float64)
    dense_counts = (rows + seqlen_k - seqlen_q + 1).clamp(0, seqlen_k) if causal else torch.full_like(rows, seqlen_k)
    torch.testing.assert_close(lse[1], dense_counts.log(), rtol=1e-6, atol=1e-6)


# Block-Sparse-Attention's own test grid (block_sparse_tests/fwd/test_correctness/full_test.py):
# its (Sq, Sk) pairs up to 512 and its (is_causal, exact_streaming, sink, local) modes.
PEER_SHAPES = [(113, 203), (128, 217), (108, 256), (256, 512), (512, 256), (256, 256)]
PEER_MODES = {
    "causal_exact_1_3": (True, True, 1, 3),
    "causal_exact_64_256": (True, True, 64, 256),
    "causal_blocks_1_3": (True, False, 1, 3),
    "full_blocks_1_3": (False, False, 1, 3),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", PEER_MODES)
@pytest.mark.parametrize("seqlen_q,seqlen_k", PEER_SHAPES, ids=[f"{q}x{k}" for q, k in PEER_SHAPES])
def test_block_sparse_attentions_test_grid(device, mode, seqlen_q, seqlen_k, rng):
    """Its head mix (dense, block-sparse, streaming thirds), batch 2 with padded lengths a little
    under the maximum, against the reference (which test_reference_masks_are_block_sparse_attentions
    holds to the peer's iterators)."""
    causal, exact, sink, local = PEER_MODES[mode]
    lens_q = [seqlen_q, seqlen_q - int(torch.randint(0, 20, (1,), generator=rng))]
    lens_k = [seqlen_k - int(torch.randint(0, 20, (1,), generator=rng)), seqlen_k]
    q, k, v, cu_q, cu_k = packed_inputs(lens_q, lens_k, 6, 2, 64, torch.bfloat16, rng, device)
    types = int32([0, 0, 1, 1, -1, -1], device)
    info = streaming_info([(sink, local)] * 6, device)
    mask = random_blockmask(2, 2, seqlen_q, seqlen_k, 0.3, rng, device)
    out, lse = run_block_sparse(q, k, v, cu_q, cu_k, types, info, mask, seqlen_q, seqlen_k, causal, exact)
    check_attention(out, lse, *sparse_reference(q, k, v, cu_q, cu_k, types, info, mask, causal, exact), torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# DESIGN.md §4's invariants

# (lens_q, lens_k, heads_q, heads_kv, head_dim, dtype)
SHAPES = {
    "varlen_uneven_gqa4_d128_bf16": ([1, 127, 0, 129, 300], [1, 127, 0, 129, 300], 8, 2, 128, torch.bfloat16),
    "sq_lt_sk_mha_d64_fp16": ([100, 200], [390, 333], 4, 4, 64, torch.float16),
    "sq_gt_sk_unseen_rows_mqa_d64_bf16": ([300, 129, 20], [130, 5, 0], 4, 1, 64, torch.bfloat16),
    "d256_gqa2_fp16": ([200], [257], 2, 1, 256, torch.float16),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES)
def test_every_block_on_equals_dense(device, causal, shape, rng):
    lens_q, lens_k, heads_q, heads_kv, head_dim, dtype = SHAPES[shape]
    max_q, max_k = max(lens_q), max(lens_k)
    q, k, v, cu_q, cu_k = packed_inputs(lens_q, lens_k, heads_q, heads_kv, head_dim, dtype, rng, device)
    types = int32([1] * heads_q, device)
    info = streaming_info([(0, 0)] * heads_q, device)
    mask = torch.ones(len(lens_q), heads_q, blocks(max_q), blocks(max_k), dtype=torch.bool, device=device)

    dense_ref = reference.attention(q.cpu(), k.cpu(), v.cpu(), causal, cu_seqlens_q=cu_q.cpu(), cu_seqlens_k=cu_k.cpu())
    sparse_ref = sparse_reference(q, k, v, cu_q, cu_k, types, info, mask, causal, False)
    torch.testing.assert_close(sparse_ref, dense_ref, rtol=1e-12, atol=1e-12)

    out, lse = run_block_sparse(q, k, v, cu_q, cu_k, types, info, mask, max_q, max_k, causal, False)
    check_attention(out, lse, *dense_ref, dtype)
    dense_out, dense_lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, return_attn_probs=True)
    check_same_attention(out, lse, dense_out, dense_lse, dtype)


def window_end_of_last_row_block(seqlen_q, seqlen_k, causal):
    """Where block streaming's local window of a sequence's last row block ends (DESIGN.md §4's m)."""
    if not causal:
        return blocks(seqlen_k)
    return blocks(max(seqlen_k - seqlen_q, 0)) + blocks(seqlen_q) - max(seqlen_q - seqlen_k, 0) // BLOCK


def covering_pairs(lens_q, lens_k, exact, causal):
    """(sink, local) pairs, one per head of 4, that each reach every key the mask allows.

    Exact streaming counts tokens: sink + local >= Sk suffices. Block streaming counts blocks and
    reaches every key once sink + local >= m of the last row block. Not causal, m = ceil(Sk/128);
    causal, m can pass the last key block when the last row block is partial (the window sits
    where a full 128-row block's last diagonal falls).
    """
    if exact:
        n = max(lens_k)
    else:
        n = max(window_end_of_last_row_block(sq, sk, causal) for sq, sk in zip(lens_q, lens_k))
    return [(0, n), (n, 0), (1, n - 1), (n + 5, n + 5)]


# (lens_q, lens_k)
COVERING_SHAPES = {
    "square_varlen": ([1, 127, 0, 129, 300], [1, 127, 0, 129, 300]),
    "sq_lt_sk": ([100, 200], [390, 333]),
    "sq_gt_sk": ([300, 129, 20], [130, 5, 0]),
}
STREAMING_APIS = ["block_sparse_exact", "block_sparse_blocks", "token_streaming", "block_streaming"]


def run_streaming_api(api, q, k, v, cu_q, cu_k, types, info, mask, max_q, max_k, causal):
    """One of the three public functions, as `api` names it -> (out, lse ``[Hq, total_q]``)."""
    if q.is_cuda:
        poison_cuda_allocator()
    if api == "token_streaming":
        assert causal, "token_streaming_attn_func is causal"
        out, lse, _ = token_streaming_attn_func(q, k, v, cu_q, cu_k, types, info, max_q, max_k, return_attn_probs=True)
    elif api == "block_streaming":
        out, lse, _ = block_streaming_attn_func(
            q, k, v, cu_q, cu_k, types, info, max_q, max_k, 0.0, is_causal=causal, return_attn_probs=True
        )
    else:
        out, lse, _ = block_sparse_attn_func(
            q, k, v, cu_q, cu_k, types, info, mask, max_q, max_k, 0.0,
            is_causal=causal, exact_streaming=api == "block_sparse_exact", return_attn_probs=True,
        )
    return out, packed_lse(lse, cu_q, max_q)


def is_exact(api):
    return api in ("block_sparse_exact", "token_streaming")


# (api, is_causal): exact streaming is causal only
STREAMING_MODES = [(api, causal) for api in STREAMING_APIS for causal in (True, False) if causal or not is_exact(api)]
STREAMING_MODE_IDS = [f"{api}-{'causal' if causal else 'full'}" for api, causal in STREAMING_MODES]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("api,causal", STREAMING_MODES, ids=STREAMING_MODE_IDS)
@pytest.mark.parametrize("shape", COVERING_SHAPES)
def test_streaming_that_covers_every_key_equals_dense(device, api, causal, shape, rng):
    lens_q, lens_k = COVERING_SHAPES[shape]
    max_q, max_k = max(lens_q), max(lens_k)
    dtype = torch.bfloat16 if is_exact(api) else torch.float16
    q, k, v, cu_q, cu_k = packed_inputs(lens_q, lens_k, 4, 2, 64, dtype, rng, device)
    types = int32([-1] * 4, device)
    info = streaming_info(covering_pairs(lens_q, lens_k, is_exact(api), causal), device)

    dense_ref = reference.attention(q.cpu(), k.cpu(), v.cpu(), causal, cu_seqlens_q=cu_q.cpu(), cu_seqlens_k=cu_k.cpu())
    sparse_ref = sparse_reference(q, k, v, cu_q, cu_k, types, info, None, causal, is_exact(api))
    torch.testing.assert_close(sparse_ref, dense_ref, rtol=1e-12, atol=1e-12)

    out, lse = run_streaming_api(api, q, k, v, cu_q, cu_k, types, info, None, max_q, max_k, causal)
    check_attention(out, lse, *dense_ref, dtype)
    dense_out, dense_lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, return_attn_probs=True)
    check_same_attention(out, lse, dense_out, dense_lse, dtype)


# (lens_q, lens_k) whose last row blocks end their causal windows on the last key block, so that
# sink + local = ceil(Sk/128) blocks covers every key in both causal modes
KEY_BLOCK_SHAPES = {
    "square": ([300, 129, 1], [300, 129, 1]),
    "sq_lt_sk": ([100, 44], [390, 300]),
    "sq_gt_sk": ([300, 256], [130, 128]),
}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", KEY_BLOCK_SHAPES)
def test_block_streaming_over_as_many_blocks_as_keys_equals_dense(causal, shape, rng):
    """sink + local = ceil(Sk/128) key blocks (the longest sequence's) is dense; one block fewer
    leaves keys out of the longest sequence's rows."""
    lens_q, lens_k = KEY_BLOCK_SHAPES[shape]
    q, k, v, cu_q, cu_k = packed_inputs(lens_q, lens_k, 4, 2, 64, torch.bfloat16, rng, "cpu")
    types = int32([-1] * 4, "cpu")
    n = blocks(max(lens_k))
    assert all(window_end_of_last_row_block(sq, sk, causal) <= n for sq, sk in zip(lens_q, lens_k))
    dense_out, dense_lse = reference.attention(q, k, v, causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    info = streaming_info([(0, n), (n, 0), (1, n - 1), (n - 1, 1)], "cpu")
    out, lse = run_block_sparse(q, k, v, cu_q, cu_k, types, info, None, max(lens_q), max(lens_k), causal, False)
    check_attention(out, lse, dense_out, dense_lse, torch.bfloat16)

    fewer = [(0, n - 1), (n - 1, 0), (1, n - 2), (n - 2, 1)]
    info = streaming_info(fewer, "cpu")
    out, lse = run_block_sparse(q, k, v, cu_q, cu_k, types, info, None, max(lens_q), max(lens_k), causal, False)
    check_attention(out, lse, *sparse_reference(q, k, v, cu_q, cu_k, types, info, None, causal, False), torch.bfloat16)
    seqlen_q, seqlen_k = lens_q[0], lens_k[0]  # the first sequence has the most key blocks
    dense_mask = reference.block_sparse_mask(seqlen_q, seqlen_k, 0, 0, 0, None, causal, False)
    for sink, local in fewer:
        mask = reference.block_sparse_mask(seqlen_q, seqlen_k, -1, sink, local, None, causal, False)
        assert (dense_mask & ~mask).any(), f"(sink, local) = ({sink}, {local}) still sees every key"


def test_causal_block_window_can_end_past_the_last_key_block(rng):
    """Block-Sparse-Attention places a causal row block's window as if the block had all 128 rows:
    with Sq = 171, Sk = 300 (3 key blocks), row block 1 ends its window at m = 4, so sink + local =
    3 blocks misses key block 0 for rows 128..170, while rows 0..127 see every key."""
    q, k, v, cu_q, cu_k = packed_inputs([171], [300], 2, 1, 64, torch.bfloat16, rng, "cpu")
    types = int32([-1, -1], "cpu")
    info = streaming_info([(0, 3), (1, 2)], "cpu")
    out, lse = run_block_sparse(q, k, v, cu_q, cu_k, types, info, None, 171, 300, True, False)
    check_attention(out, lse, *sparse_reference(q, k, v, cu_q, cu_k, types, info, None, True, False), torch.bfloat16)
    dense_out = reference.attention(q, k, v, True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)[0]
    for h in range(2):
        assert rel_err(out[:128, h], dense_out[:128, h]) < REL_TOL[torch.bfloat16]
        assert rel_err(out[128:, h], dense_out[128:, h]) > 0.05


# Head types besides the head under test, in head order.
OTHER_HEAD_TYPES = [(0, 0, 0), (-1, -1, -1), (1, 1, 1), (1, -1, 0), (-1, 1, 1), (0, 0, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_type", [-1, 0, 1], ids=["streaming", "dense", "block_sparse"])
@pytest.mark.parametrize("causal,exact", [(False, False), (True, True)], ids=["full_block_streaming", "causal_exact"])
def test_a_heads_output_does_not_depend_on_the_other_heads_types(device, head_type, causal, exact, rng):
    lens_q, lens_k, heads_q, head = [130, 0, 257], [300, 7, 257], 4, 2
    max_q, max_k = max(lens_q), max(lens_k)
    q, k, v, cu_q, cu_k = packed_inputs(lens_q, lens_k, heads_q, 2, 64, torch.bfloat16, rng, device)
    masks_by_head = random_blockmask(len(lens_q), heads_q, max_q, max_k, 0.5, rng, device)
    pairs = [(4, 50), (0, 20), (16, 100), (3, 9)] if exact else [(1, 1), (0, 2), (1, 2), (2, 0)]
    info = streaming_info(pairs, device)

    results = []
    for others in OTHER_HEAD_TYPES:
        types = [*others[:head], head_type, *others[head:]]
        sparse_heads = [h for h in range(heads_q) if types[h] == 1]
        mask = masks_by_head[:, sparse_heads].contiguous() if sparse_heads else None
        types = int32(types, device)
        out, lse = run_block_sparse(q, k, v, cu_q, cu_k, types, info, mask, max_q, max_k, causal, exact)
        check_attention(out, lse, *sparse_reference(q, k, v, cu_q, cu_k, types, info, mask, causal, exact), torch.bfloat16)
        results.append((out[:, head], lse[head]))

    first_out, first_lse = results[0]
    for others, (out, lse) in zip(OTHER_HEAD_TYPES[1:], results[1:]):
        if device == "cpu":
            assert torch.equal(out, first_out) and torch.equal(lse, first_lse), f"head {head} changed with others {others}"
        else:
            assert rel_err(out, first_out) < REL_TOL[torch.bfloat16], f"head {head} changed with others {others}"
            assert torch.equal(torch.isneginf(lse), torch.isneginf(first_lse))
            finite = ~torch.isneginf(first_lse)
            torch.testing.assert_close(lse[finite], first_lse[finite], rtol=LSE_TOL, atol=LSE_TOL)


# ---------------------------------------------------------------------------------------------
# Streaming masks, block masks and mixed heads against the reference

# (lens_q, lens_k): Sk - Sq of 0, of multiples of 128 and not, both signs; sequences with no keys
STREAMING_SHAPES = {
    "square_varlen": ([1, 127, 0, 129, 300], [1, 127, 0, 129, 300]),
    "sq_lt_sk": ([100, 5, 44, 171], [390, 300, 300, 300]),
    "sq_gt_sk": ([300, 129, 7, 20], [130, 5, 1, 0]),
}
# (sink, local) per head of 8: tokens for exact streaming, 128-token blocks otherwise
SMALL_PAIRS = {
    True: [(0, 1), (1, 0), (4, 16), (0, 7), (130, 3), (5, 200), (0, 0), (2, 129)],
    False: [(0, 1), (1, 0), (1, 1), (0, 2), (2, 1), (0, 0), (3, 0), (1, 3)],
}
STREAMING_TYPES = [-1, -1, -1, 0, -1, -1, -1, -1]  # one dense head rides along


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("api,causal", STREAMING_MODES, ids=STREAMING_MODE_IDS)
@pytest.mark.parametrize("shape", STREAMING_SHAPES)
def test_streaming_matches_its_mask(device, api, causal, shape, rng):
    lens_q, lens_k = STREAMING_SHAPES[shape]
    dtype = torch.float16 if api in ("block_sparse_exact", "block_streaming") else torch.bfloat16
    q, k, v, cu_q, cu_k = packed_inputs(lens_q, lens_k, 8, 2, 64, dtype, rng, device)
    types = int32(STREAMING_TYPES, device)
    info = streaming_info(SMALL_PAIRS[is_exact(api)], device)
    ref = sparse_reference(q, k, v, cu_q, cu_k, types, info, None, causal, is_exact(api))
    out, lse = run_streaming_api(api, q, k, v, cu_q, cu_k, types, info, None, max(lens_q), max(lens_k), causal)
    check_attention(out, lse, *ref, dtype)


def mixed_types(heads_q):
    """Every head type, in an order where block-sparse heads are not contiguous."""
    return ([1, 0, -1, 1, 1, -1, 0, 1] * heads_q)[:heads_q]


# (lens_q, lens_k, heads_q, heads_kv, head_dim, dtype, extra max_seqlen)
MASK_SHAPES = {
    "varlen_uneven_gqa4_d128": ([1, 127, 0, 129, 300], [1, 127, 0, 129, 300], 8, 2, 128, torch.bfloat16, 0),
    "sq_lt_sk_mha_d64": ([100, 200], [390, 333], 4, 4, 64, torch.float16, 0),
    "sq_gt_sk_mqa_d64": ([300, 129, 20], [130, 5, 0], 4, 1, 64, torch.bfloat16, 0),
    "loose_max_seqlen_gqa4_d64": ([60, 200], [200, 60], 8, 2, 64, torch.float16, 130),
    "d256_gqa2": ([200], [257], 2, 1, 256, torch.bfloat16, 0),
    "long_600_mqa_d64": ([600, 37], [600, 601], 4, 1, 64, torch.float16, 0),
}
# (density of the block mask, is_causal, exact_streaming)
MASK_MODES = {
    "empty_causal": (0.0, True, False),
    "sparse_full": (0.3, False, False),
    "sparse_causal_exact": (0.3, True, True),
    "dense_causal": (0.8, True, False),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("shape", MASK_SHAPES)
def test_random_block_masks_with_mixed_heads(device, mode, shape, rng):
    density, causal, exact = MASK_MODES[mode]
    lens_q, lens_k, heads_q, heads_kv, head_dim, dtype, slack = MASK_SHAPES[shape]
    max_q, max_k = max(lens_q) + slack, max(lens_k) + slack
    q, k, v, cu_q, cu_k = packed_inputs(lens_q, lens_k, heads_q, heads_kv, head_dim, dtype, rng, device)
    types = mixed_types(heads_q)
    n_sparse = types.count(1)
    mask = random_blockmask(len(lens_q), n_sparse, max_q, max_k, density, rng, device)
    mask[:, 0, -1] = False  # a row block with no active block at all
    if density > 0:
        mask[-1, -1, 0] = True  # and one with every block on
    types = int32(types, device)
    info = streaming_info(SMALL_PAIRS[exact][:heads_q], device)
    ref = sparse_reference(q, k, v, cu_q, cu_k, types, info, mask, causal, exact)
    out, lse = run_block_sparse(q, k, v, cu_q, cu_k, types, info, mask, max_q, max_k, causal, exact)
    check_attention(out, lse, *ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_block_mask_columns_follow_the_sparse_heads_order(device, rng):
    """Head h of type 1 reads column (number of type-1 heads before h): a mask that differs per
    column gives each head its own pattern."""
    lens = [256, 256]
    q, k, v, cu_q, cu_k = packed_inputs(lens, lens, 4, 4, 64, torch.bfloat16, rng, device)
    types = int32([0, 1, -1, 1], device)
    info = streaming_info([(0, 0), (0, 0), (1, 1), (0, 0)], device)
    mask = torch.zeros(2, 2, 2, 2, dtype=torch.bool, device=device)
    mask[:, 0, :, 0] = True  # head 1: key block 0 only
    mask[:, 1, :, 1] = True  # head 3: key block 1 only
    out, lse = run_block_sparse(q, k, v, cu_q, cu_k, types, info, mask, 256, 256, False, False)
    check_attention(out, lse, *sparse_reference(q, k, v, cu_q, cu_k, types, info, mask, False, False), torch.bfloat16)
    cu = cu_q.tolist()
    for b in range(2):
        rows = slice(cu[b], cu[b + 1])
        head1 = reference.attention(q[rows, 1:2][None], k[rows, 1:2][None, :128], v[rows, 1:2][None, :128])
        head3 = reference.attention(q[rows, 3:4][None], k[rows, 3:4][None, 128:], v[rows, 3:4][None, 128:])
        assert rel_err(out[rows, 1], head1[0][0, :, 0]) < REL_TOL[torch.bfloat16]
        assert rel_err(out[rows, 3], head3[0][0, :, 0]) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
def test_softmax_scale(device, rng):
    lens_q, lens_k = [70, 200], [200, 200]
    q, k, v, cu_q, cu_k = packed_inputs(lens_q, lens_k, 4, 2, 64, torch.float16, rng, device)
    types = int32([1, -1, 0, 1], device)
    info = streaming_info([(0, 0), (1, 1), (0, 0), (0, 0)], device)
    mask = random_blockmask(2, 2, 200, 200, 0.6, rng, device)
    ref = reference.block_sparse_attention(
        q.cpu(), k.cpu(), v.cpu(), cu_q.cpu(), cu_k.cpu(), types.cpu(), info.cpu(), mask.cpu(), True, False, 0.3
    )
    out, lse, _ = block_sparse_attn_func(
        q, k, v, cu_q, cu_k, types, info, mask, 200, 200, 0.0, softmax_scale=0.3, is_causal=True, return_attn_probs=True
    )
    check_attention(out, packed_lse(lse, cu_q, 200), *ref, torch.float16)


# ---------------------------------------------------------------------------------------------
# The Block-Sparse-Attention contract: signatures, return values, positional calls

EMPTY = inspect.Parameter.empty
SIGNATURES = {
    "block_sparse_attn_func": [
        ("q", EMPTY), ("k", EMPTY), ("v", EMPTY), ("cu_seqlens_q", EMPTY), ("cu_seqlens_k", EMPTY),
        ("head_mask_type", EMPTY), ("streaming_info", EMPTY), ("base_blockmask", EMPTY), ("max_seqlen_q_", EMPTY),
        ("max_seqlen_k_", EMPTY), ("p_dropout", EMPTY), ("deterministic", False), ("softmax_scale", None),
        ("is_causal", False), ("exact_streaming", False), ("return_attn_probs", False),
    ],
    "block_streaming_attn_func": [
        ("q", EMPTY), ("k", EMPTY), ("v", EMPTY), ("cu_seqlens_q", EMPTY), ("cu_seqlens_k", EMPTY),
        ("head_mask_type", EMPTY), ("streaming_info", EMPTY), ("max_seqlen_q", EMPTY), ("max_seqlen_k", EMPTY),
        ("p_dropout", EMPTY), ("deterministic", False), ("softmax_scale", None), ("is_causal", True),
        ("return_attn_probs", False),
    ],
    "token_streaming_attn_func": [
        ("q", EMPTY), ("k", EMPTY), ("v", EMPTY), ("cu_seqlens_q", EMPTY), ("cu_seqlens_k", EMPTY),
        ("head_mask_type", EMPTY), ("streaming_info", EMPTY), ("max_seqlen_q", EMPTY), ("max_seqlen_k", EMPTY),
        ("deterministic", False), ("softmax_scale", None), ("return_attn_probs", False),
    ],
}


@pytest.mark.parametrize("name", SIGNATURES)
def test_signature_is_block_sparse_attentions(name):
    fn = getattr(tkpy, name)
    params = list(inspect.signature(fn).parameters.values())
    assert [(p.name, p.default) for p in params] == SIGNATURES[name]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
    assert name in tkpy.__all__


@pytest.mark.parametrize("device", DEVICES)
def test_return_attn_probs_false_gives_the_tensor_and_true_the_triple(device, rng):
    lens_q, lens_k = [3, 0, 130], [4, 2, 140]
    q, k, v, cu_q, cu_k = packed_inputs(lens_q, lens_k, 4, 2, 64, torch.float16, rng, device)
    streaming_types = int32([0, -1, -1, 0], device)
    info = streaming_info([(1, 2)] * 4, device)
    mask = random_blockmask(3, 1, 130, 140, 0.5, rng, device)
    calls = {
        "block_sparse": lambda **kw: block_sparse_attn_func(
            q, k, v, cu_q, cu_k, int32([1, 0, -1, 0], device), info, mask, 130, 140, 0.0, is_causal=True, **kw
        ),
        "block_streaming": lambda **kw: block_streaming_attn_func(
            q, k, v, cu_q, cu_k, streaming_types, info, 130, 140, 0.0, **kw
        ),
        "token_streaming": lambda **kw: token_streaming_attn_func(q, k, v, cu_q, cu_k, streaming_types, info, 130, 140, **kw),
    }
    for name, call in calls.items():
        out = call()
        assert isinstance(out, torch.Tensor) and out.shape == q.shape and out.dtype == q.dtype, name
        triple = call(return_attn_probs=True)
        assert isinstance(triple, tuple) and len(triple) == 3 and triple[2] is None, name
        assert torch.equal(triple[0], out), name
        # Block-Sparse-Attention's lse layout: [B, Hq, max_seqlen_q]
        assert triple[1].shape == (3, 4, 130) and triple[1].dtype == torch.float32, name


@pytest.mark.parametrize("device", DEVICES)
def test_positional_arguments_in_block_sparse_attentions_order(device, rng):
    """A caller written against Block-Sparse-Attention passes everything positionally."""
    lens_q, lens_k = [50, 140], [170, 140]
    q, k, v, cu_q, cu_k = packed_inputs(lens_q, lens_k, 4, 2, 64, torch.bfloat16, rng, device)
    types = int32([1, -1, 0, 1], device)
    streaming_types = int32([0, -1, -1, 0], device)
    info = streaming_info([(2, 30)] * 4, device)  # tokens, for exact streaming
    info_blocks = streaming_info([(1, 1)] * 4, device)
    mask = random_blockmask(2, 2, 140, 170, 0.5, rng, device)

    out, lse, _ = block_sparse_attn_func(q, k, v, cu_q, cu_k, types, info, mask, 140, 170, 0.0, True, 0.3, True, True, True)
    by_name = block_sparse_attn_func(
        q, k, v, cu_q, cu_k, types, info, mask, max_seqlen_q_=140, max_seqlen_k_=170, p_dropout=0.0,
        softmax_scale=0.3, is_causal=True, exact_streaming=True, return_attn_probs=True,
    )
    assert torch.equal(out, by_name[0]) and torch.equal(lse, by_name[1])
    ref = reference.block_sparse_attention(
        q.cpu(), k.cpu(), v.cpu(), cu_q.cpu(), cu_k.cpu(), types.cpu(), info.cpu(), mask.cpu(), True, True, 0.3
    )
    check_attention(out, packed_lse(lse, cu_q, 140), *ref, torch.bfloat16)

    out, lse, _ = block_streaming_attn_func(
        q, k, v, cu_q, cu_k, streaming_types, info_blocks, 140, 170, 0.0, True, 0.3, False, True
    )
    by_name = block_streaming_attn_func(
        q, k, v, cu_q, cu_k, streaming_types, info_blocks, 140, 170, 0.0,
        softmax_scale=0.3, is_causal=False, return_attn_probs=True,
    )
    assert torch.equal(out, by_name[0]) and torch.equal(lse, by_name[1])
    ref = reference.block_sparse_attention(
        q.cpu(), k.cpu(), v.cpu(), cu_q.cpu(), cu_k.cpu(), streaming_types.cpu(), info_blocks.cpu(), None, False, False, 0.3
    )
    check_attention(out, packed_lse(lse, cu_q, 140), *ref, torch.bfloat16)

    out, lse, _ = token_streaming_attn_func(q, k, v, cu_q, cu_k, streaming_types, info, 140, 170, True, 0.3, True)
    ref = reference.block_sparse_attention(
        q.cpu(), k.cpu(), v.cpu(), cu_q.cpu(), cu_k.cpu(), streaming_types.cpu(), info.cpu(), None, True, True, 0.3
    )
    check_attention(out, packed_lse(lse, cu_q, 140), *ref, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_inputs_are_not_modified(device, rng):
    q, k, v, cu_q, cu_k = packed_inputs([70, 130], [130, 130], 4, 2, 64, torch.bfloat16, rng, device)
    types = int32([1, -1, 0, 1], device)
    info = streaming_info([(0, 0), (1, 1), (0, 0), (0, 0)], device)
    mask = random_blockmask(2, 2, 130, 130, 0.5, rng, device)
    inputs = (q, k, v, cu_q, cu_k, types, info, mask)
    before = [t.clone() for t in inputs]
    block_sparse_attn_func(q, k, v, cu_q, cu_k, types, info, mask, 130, 130, 0.0, is_causal=True)
    assert all(torch.equal(t, b) for t, b in zip(inputs, before))


# ---------------------------------------------------------------------------------------------
# GPU only


def long_mixed_heads_case(exact, gen):
    """Mixed heads (GQA 8/2, D 128) over long uneven CUDA sequences, empty ones and tails included:
    (q, k, v, cu_q, cu_k, types, streaming_info, base_blockmask, max_q, max_k)."""
    lens_q, lens_k = [2000, 0, 4097, 130, 1], [2000, 9, 4097, 3000, 1]
    max_q, max_k = max(lens_q), max(lens_k)
    q, k, v, cu_q, cu_k = packed_inputs(lens_q, lens_k, 8, 2, 128, torch.bfloat16, gen, "cuda")
    types = int32(mixed_types(8), "cuda")
    pairs = [(64, 1000), (0, 4096), (128, 256), (1, 1)] * 2 if exact else [(1, 4), (0, 2), (1, 1), (2, 0)] * 2
    info = streaming_info(pairs, "cuda")
    mask = random_blockmask(len(lens_q), 4, max_q, max_k, 0.3, gen, "cuda")
    return q, k, v, cu_q, cu_k, types, info, mask, max_q, max_k


@pytest.mark.gpu
@pytest.mark.parametrize("causal,exact", [(False, False), (True, False), (True, True)], ids=["full", "causal", "causal_exact"])
def test_cuda_long_mixed_heads(causal, exact, rng):
    q, k, v, cu_q, cu_k, types, info, mask, max_q, max_k = long_mixed_heads_case(exact, rng)
    ref = reference.block_sparse_attention(q, k, v, cu_q, cu_k, types, info, mask, causal, exact)  # float64 on the GPU
    out, lse = run_block_sparse(q, k, v, cu_q, cu_k, types, info, mask, max_q, max_k, causal, exact)
    check_attention(out, lse, *ref, torch.bfloat16)


def cuda_case(gen):
    """(call, inputs): mixed heads over uneven sequences, GQA, tails."""
    lens_q, lens_k = [700, 0, 33, 513], [900, 17, 0, 513]
    q, k, v, cu_q, cu_k = packed_inputs(lens_q, lens_k, 8, 2, 128, torch.bfloat16, gen, "cuda")
    types = int32(mixed_types(8), "cuda")
    info = streaming_info(SMALL_PAIRS[False], "cuda")
    mask = random_blockmask(4, 4, 700, 900, 0.5, gen, "cuda")

    def call(q, k, v, info, mask):
        out, lse, _ = block_sparse_attn_func(
            q, k, v, cu_q, cu_k, types, info, mask, 700, 900, 0.0, is_causal=True, return_attn_probs=True
        )
        return out, lse

    return call, [q, k, v, info, mask]


@pytest.mark.gpu
def test_cuda_run_to_run_deterministic(rng):
    call, inputs = cuda_case(rng)
    first = call(*inputs)
    for _ in range(3):
        again = call(*inputs)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay(rng):
    call, inputs = cuda_case(rng)
    call(*inputs)  # warm-up outside the capture (lazy init, kernel attributes)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call(*inputs)
    q, k, v, info, mask = inputs  # new data in the captured buffers: the replay must read it, plan included
    for t in (q, k, v):
        t.copy_(torch.randn(t.shape, generator=rng).to(t.dtype))
    info.copy_(torch.randint(0, 4, info.shape, generator=rng, dtype=torch.int32))
    mask.copy_(torch.rand(mask.shape, generator=rng) < 0.3)
    expected = call(*inputs)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], expected[0]) and torch.equal(captured[1], expected[1])


@pytest.mark.gpu
@pytest.mark.sanitizer
def test_cuda_small_for_sanitizer(rng):
    lens_q, lens_k = [5, 0, 130], [9, 3, 200]
    q, k, v, cu_q, cu_k = packed_inputs(lens_q, lens_k, 4, 2, 64, torch.bfloat16, rng, "cuda")
    types = int32([1, -1, 0, 1], "cuda")
    mask = random_blockmask(3, 2, 130, 200, 0.5, rng, "cuda")
    for exact, pairs in ((False, [(1, 1)] * 4), (True, [(3, 20)] * 4)):
        info = streaming_info(pairs, "cuda")
        out, lse = run_block_sparse(q, k, v, cu_q, cu_k, types, info, mask, 130, 200, True, exact)
        check_attention(out, lse, *sparse_reference(q, k, v, cu_q, cu_k, types, info, mask, True, exact), torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Bad input

# Each case runs with these names bound. The second item is a regex the message must match.
SETUP = textwrap.dedent(
    """
    import torch
    from tkpy import block_sparse_attn_func, block_streaming_attn_func, token_streaming_attn_func
    q = torch.randn(12, 4, 64).bfloat16()  # packed: sequences of 5 and 7 tokens
    k = torch.randn(12, 2, 64).bfloat16()
    v = torch.randn(12, 2, 64).bfloat16()
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    types = torch.tensor([1, 0, -1, 1], dtype=torch.int32)  # two block-sparse heads
    streaming_types = torch.tensor([0, -1, -1, 0], dtype=torch.int32)
    info = torch.tensor([1, 2] * 4, dtype=torch.int32)
    mask = torch.ones(2, 2, 1, 1, dtype=torch.bool)  # [B, n_sparse, ceil(7/128), ceil(7/128)]
    def sparse(**changes):
        args = dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, head_mask_type=types, streaming_info=info,
                    base_blockmask=mask, max_seqlen_q_=7, max_seqlen_k_=7, p_dropout=0.0)
        return block_sparse_attn_func(**{**args, **changes})
    """
)

BAD_CALLS = [
    ("sparse(base_blockmask=torch.ones(2, 2, 2, 1, dtype=torch.bool))",
     r"block_indices \(the plan of base_blockmask\) int32 \[batch=2, .*got Int \[2, 2, 2, 1\]"),
    ("sparse(base_blockmask=torch.ones(1, 2, 1, 1, dtype=torch.bool))", r"plan of base_blockmask\) int32 \[batch=2, .*got Int \[1, 2, 1, 1\]"),
    ("sparse(base_blockmask=torch.ones(2, 2, 1, dtype=torch.bool))", r"plan of base_blockmask\) int32 \[batch=2, n_sparse, .*got Int \[2, 2, 1\]"),
    ("sparse(base_blockmask=mask.int())", r"base_blockmask must be a bool Tensor .*got torch.int32"),
    ("sparse(base_blockmask=mask[:, :1])", r"2 heads are block-sparse \(head_mask_type 1\) but there are 1 block lists"),
    ("sparse(base_blockmask=torch.ones(2, 3, 1, 1, dtype=torch.bool))", r"2 heads are block-sparse \(head_mask_type 1\) but there are 3 block lists"),
    ("sparse(base_blockmask=None)", r"2 heads are block-sparse \(head_mask_type 1\) but there are 0 block lists"),
    ("sparse(head_mask_type=torch.tensor([1, 0, 2, 1], dtype=torch.int32))", r"head_mask_type\[2\] = 2 is not -1 \(streaming\), 0 \(dense\) or 1"),
    ("sparse(head_mask_type=torch.tensor([1, -2, 0, 1], dtype=torch.int32))", r"head_mask_type\[1\] = -2 is not -1"),
    ("sparse(head_mask_type=types[:3])", r"head_mask_type to be a contiguous int32 vector of length 4, got Int \[3\]"),
    ("sparse(head_mask_type=[1, 0, -1, 1])", "head_mask_type must be a Tensor, got list"),
    ("sparse(head_mask_type=types.long())", "head_mask_type to be a contiguous int32 vector"),
    ("sparse(streaming_info=info[:6])", r"streaming_info to be a contiguous int32 vector of length 8"),
    ("sparse(streaming_info=torch.tensor([1, 2, 1, -1, 1, 2, 1, 2], dtype=torch.int32))", "streaming_info .*must be >= 0"),
    ("sparse(streaming_info=info.long())", "streaming_info to be a contiguous int32 vector"),
    ("sparse(p_dropout=0.1)", "p_dropout=0.1 is not implemented"),
    ("sparse(is_causal=False, exact_streaming=True)", "exact_streaming=True requires is_causal=True"),
    ("sparse(cu_seqlens_q=None)", "cu_seqlens_q must be a Tensor, got NoneType"),
    ("sparse(cu_seqlens_k=None)", "cu_seqlens_k must be a Tensor, got NoneType"),
    ("sparse(cu_seqlens_q=torch.tensor([0, 5, 11], dtype=torch.int32))", "cu_seqlens_q must start at 0.*end at (the packed length )?12"),
    ("sparse(cu_seqlens_k=torch.tensor([0, 5, 13], dtype=torch.int32))", "cu_seqlens_k must start at 0.*end at (the packed length )?12"),
    ("sparse(max_seqlen_q_=6)", "sequence of 7 tokens.*max_seqlen(=| is )6"),
    ("sparse(q=q.int(), k=k.int(), v=v.int())", "q to be bfloat16, float16, float32 or float64, got Int"),
    ("sparse(q=torch.randn(12, 4, 96).bfloat16(), k=torch.randn(12, 2, 96).bfloat16(), v=torch.randn(12, 2, 96).bfloat16())",
     "head_dim 64, 128 or 256, got 96"),
    ("sparse(k=torch.randn(12, 3, 64).bfloat16(), v=torch.randn(12, 3, 64).bfloat16())",
     r"q's heads \(4\) to be a multiple of k/v's heads \(3\)"),
    ("sparse(q=q[None], k=k[None], v=v[None])", "3-D"),
    ("sparse(head_mask_type=types.to('meta'))", "device"),
    ("sparse(base_blockmask=mask.to('meta'))", "device"),
    ("block_streaming_attn_func(q, k, v, cu, cu, types, info, 7, 7, 0.0)", r"2 heads are block-sparse \(head_mask_type 1\) but there are 0 block lists.*streaming functions take none"),
    ("token_streaming_attn_func(q, k, v, cu, cu, types, info, 7, 7)", r"2 heads are block-sparse \(head_mask_type 1\) but there are 0 block lists"),
    ("block_streaming_attn_func(q, k, v, cu, cu, streaming_types, info, 7, 7, 0.5)", "p_dropout=0.5 is not implemented"),
    ("block_streaming_attn_func(q, k, v, cu, cu, streaming_types, info[:2], 7, 7, 0.0)", r"streaming_info to be a contiguous int32 vector of length 8"),
    ("token_streaming_attn_func(q, k, v, cu, cu, streaming_types, -info, 7, 7)", "streaming_info .*must be >= 0"),
    ("token_streaming_attn_func(q, k, v, None, cu, streaming_types, info, 7, 7)", "cu_seqlens_q must be a Tensor, got NoneType"),
]


@pytest.mark.parametrize("code,message", BAD_CALLS, ids=[c[:70] for c, _ in BAD_CALLS])
def test_bad_input_raises_clear_error(code, message):
    assert_bad_call_raises(SETUP, code, message)


CUDA_SETUP = SETUP + "q, k, v, cu, types, streaming_types, info, mask = (t.cuda() for t in (q, k, v, cu, types, streaming_types, info, mask))\n"
# On CUDA the values of cu_seqlens, head_mask_type and streaming_info are device memory: checked all the same.
CUDA_BAD_CALLS = [
    ("sparse(cu_seqlens_q=torch.tensor([0, 5, 11], dtype=torch.int32, device='cuda'))", "cu_seqlens_q must start at 0.*end at (the packed length )?12"),
    ("sparse(cu_seqlens_k=torch.tensor([0, 5, 13], dtype=torch.int32, device='cuda'))", "cu_seqlens_k must start at 0.*end at (the packed length )?12"),
    ("sparse(max_seqlen_k_=6)", "sequence of 7 tokens.*max_seqlen(=| is )6"),
    ("sparse(head_mask_type=torch.tensor([1, 0, 2, 1], dtype=torch.int32, device='cuda'))", r"must be in \[-1, 0, 1\], got \[2\]"),
    ("sparse(streaming_info=-info)", "streaming_info .*must be >= 0"),
    ("sparse(base_blockmask=mask[:, :1])", "2 heads are block-sparse"),
    ("sparse(base_blockmask=mask.cpu())", "device"),
    ("sparse(head_mask_type=types.cpu())", "device"),
    ("block_streaming_attn_func(q, k, v, cu, cu, types, info, 7, 7, 0.0)", r"must be in \[-1, 0\], got \[1\]"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("code,message", CUDA_BAD_CALLS, ids=[c[:70] for c, _ in CUDA_BAD_CALLS])
def test_cuda_bad_input_raises_clear_error(code, message):
    assert_bad_call_raises(CUDA_SETUP, code, message)


def test_bad_input_never_crashes_the_process():
    assert_bad_calls_survive(SETUP, [code for code, _ in BAD_CALLS])


@pytest.mark.gpu
def test_unchecked_block_lists_end_where_they_stop_ascending(monkeypatch, rng):
    """CUDA's default policy reads no values on the host: a list with a count past its end, a
    repeated or a descending block is cut where it stops ascending (shared plan of
    block_sparse_index.h), never read past or counted twice. With TKPY_CHECK_VALUES=1 the same
    lists are refused, as on the CPU."""
    monkeypatch.delenv("TKPY_CHECK_VALUES", raising=False)
    q, k, v, cu_q, cu_k = packed_inputs([256], [384], 1, 1, 64, torch.bfloat16, rng, "cuda")
    types, info = int32([1], "cuda"), int32([0, 0], "cuda")
    args = (q, k, v, cu_q, cu_k, types, info, int32([0], "cuda"), 256, 384)
    hostile = int32([[[[0, 2, 2], [1, 0, 2]]]], "cuda")  # row 0: 0, 2, then 2 again; row 1: 1, then descends
    counts = int32([[[7, 3]]], "cuda")                   # past the 3 key blocks
    poison_cuda_allocator()
    out, lse = torch.ops.tkpy.block_sparse_attention_forward(*args, block_indices=hostile, block_counts=counts)
    ascending = int32([[[[0, 2, 0], [1, 0, 0]]]], "cuda")
    expected, expected_lse = torch.ops.tkpy.block_sparse_attention_forward(
        *args, block_indices=ascending, block_counts=int32([[[2, 1]]], "cuda"))
    torch.cuda.synchronize()
    assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
    mask = torch.tensor([[[[True, False, True], [False, True, False]]]])
    check_attention(out, lse, *sparse_reference(q, k, v, cu_q, cu_k, types, info, mask, False, False), torch.bfloat16)
    monkeypatch.setenv("TKPY_CHECK_VALUES", "1")
    with pytest.raises(ValueError, match=r"block_counts\[0, 0, 0\] = 7"):
        torch.ops.tkpy.block_sparse_attention_forward(*args, block_indices=hostile, block_counts=counts)

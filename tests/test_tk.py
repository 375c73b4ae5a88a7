"""The tk tile library: its host index math on the CPU, and one self-test kernel per class of
primitives on the GPU (torch.ops.tkpy_selftest), each against a host reference."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tkpy  # noqa: F401  (loads torch.ops.tkpy_selftest)
from tkpy import reference
from tkpy.info import selftest_compiled

from helpers import BAD_CALL_ERRORS, REL_TOL, assert_bad_call_raises, assert_bad_calls_survive, poison_cuda_allocator, randn, rel_err

# The self-test ops are test instruments that only a TKPY_SELFTEST=1 build has (`pip install .`
# leaves them out). Where TKPY_SELFTEST=1 says they were built (make build, make test, the GPU
# harness), their absence fails the run instead of skipping these tests.
if not selftest_compiled():
    _NOT_BUILT = ("this build of tkpy has no self-test ops (torch.ops.tkpy_selftest): "
                  "build it with TKPY_SELFTEST=1, as `make build` does")
    if os.environ.get("TKPY_SELFTEST", "0") not in ("", "0"):
        pytest.fail(f"TKPY_SELFTEST is set, but {_NOT_BUILT}", pytrace=False)
    pytest.skip(_NOT_BUILT, allow_module_level=True)

selftest = torch.ops.tkpy_selftest


def swizzled_offset(row, col, rows, elem_bytes, swizzle):
    """HOPPER_NOTES §4, written out: column chunks of `swizzle`-byte rows, then 16-byte units
    XOR-ed by address bits 7.. (128B: bits 6:4 ^= 9:7; 64B: 5:4 ^= 8:7; 32B: 4 ^= 7)."""
    chunk_cols = swizzle // elem_bytes
    linear = (col // chunk_cols) * rows * swizzle + row * swizzle + (col % chunk_cols) * elem_bytes
    unit_bits = {128: 3, 64: 2, 32: 1}[swizzle]
    mask = (1 << unit_bits) - 1
    return linear ^ (((linear >> 7) & mask) << 4)


@pytest.mark.parametrize("swizzle", [32, 64, 128])
@pytest.mark.parametrize("elem_bytes,rows,cols", [(2, 64, 128), (2, 8, 64), (4, 16, 64)])
def test_shared_tile_layout(swizzle, elem_bytes, rows, cols):
    if (cols * elem_bytes) % swizzle:
        pytest.skip("row is not a whole number of swizzle widths")
    offsets = selftest.tk_tile_offsets(rows, cols, elem_bytes, swizzle)
    expected = torch.tensor([[swizzled_offset(r, c, rows, elem_bytes, swizzle) for c in range(cols)] for r in range(rows)])
    assert torch.equal(offsets, expected)
    # A bijection onto the tile's bytes: every element its own, element-aligned slot.
    assert torch.equal(offsets.flatten().sort().values, torch.arange(rows * cols) * elem_bytes)


def test_sw128_bf16_worked_example():
    """HOPPER_NOTES §4: bf16 [rows][64] SW128, element (r, c) at r*128 + (((c>>3)^(r&7))<<4) + (c&7)*2."""
    offsets = selftest.tk_tile_offsets(64, 64, 2, 128)
    for r in (0, 1, 7, 8, 13, 63):
        for c in (0, 7, 8, 33, 63):
            assert offsets[r, c] == r * 128 + (((c >> 3) ^ (r & 7)) << 4) + (c & 7) * 2


@pytest.mark.parametrize("tiles_m,tiles_n,group_m", [(1, 1, 8), (17, 5, 8), (8, 9, 8), (3, 40, 2), (33, 33, 1)])
def test_gemm_tile_order_is_a_banded_bijection(tiles_m, tiles_n, group_m):
    order = selftest.gemm_tile_order(tiles_m, tiles_n, group_m).tolist()
    assert sorted(map(tuple, order)) == [(m, n) for m in range(tiles_m) for n in range(tiles_n)]
    # Tasks fill one band of group_m tile rows completely before the next band starts.
    bands = [m // group_m for m, _ in order]
    assert bands == sorted(bands)


@pytest.mark.parametrize("q_tiles,heads_q,heads_kv,batch,section_heads",
                         [(5, 8, 2, 3, 4), (3, 6, 6, 2, 5), (1, 4, 1, 1, 4), (7, 32, 8, 2, 8), (4, 3, 3, 3, 9)])
def test_attention_task_order(q_tiles, heads_q, heads_kv, batch, section_heads):
    """detail::attention_task, which both attention kernels' producer and consumers run: every
    (batch, head, tile) exactly once; sections of section_heads (batch, head) pairs, heads fastest,
    one after another; inside a section the tiles heaviest (last) first, each with every head of the
    section, so a kv head's query heads run side by side."""
    order = [tuple(t) for t in selftest.attention_task_order(q_tiles, heads_q, batch, section_heads).tolist()]
    assert sorted(order) == [(b, h, t) for b in range(batch) for h in range(heads_q) for t in range(q_tiles)]
    pairs = [b * heads_q + h for b, h, _ in order]
    sections = [p // section_heads for p in pairs]
    assert sections == sorted(sections), "a section must finish before the next starts"
    for section in sorted(set(sections)):
        tasks = [(p, t) for p, (_, _, t), s in zip(pairs, order, sections) if s == section]
        heads = sorted({p for p, _ in tasks})
        assert heads == list(range(section * section_heads, section * section_heads + len(heads)))
        chunks = [tasks[i:i + len(heads)] for i in range(0, len(tasks), len(heads))]
        assert [c[0][1] for c in chunks] == list(range(q_tiles - 1, -1, -1)), "tiles go heaviest (last) first"
        for chunk in chunks:
            assert [p for p, _ in chunk] == heads and len({t for _, t in chunk}) == 1, "a tile with every head in order"


def test_attention_section_heads_fit_l2_in_whole_kv_heads():
    # K and V of 8192 x 128 bf16 per kv head = 4 MiB; half of 50 MiB of L2 holds 6 of them.
    assert selftest.attention_section_heads(32, 8, 2, 8192, 128, 2, 50 * 2**20) == 6 * 4
    # Never less than one kv head with its query heads, never more than there are pairs.
    assert selftest.attention_section_heads(32, 8, 1, 2**20, 256, 2, 50 * 2**20) == 4
    assert selftest.attention_section_heads(4, 2, 1, 128, 64, 2, 50 * 2**20) == 4
    # No keys: one section for everything.
    assert selftest.attention_section_heads(8, 8, 3, 0, 64, 2, 50 * 2**20) == 24


# The attention backward's walk (tkpy/detail/attention_bwd_index.h), which the CPU backward and the
# CUDA kernel's producer and consumers run: against brute force from the forward's definitions.
BWD_QUERY_BLOCK = 32  # detail::kBwdQueryBlock


def _dense_visible(sq, sk, left, right):
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    diag = i + sk - sq
    visible = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        visible &= j >= diag - left
    if right >= 0:
        visible &= j <= diag + right
    return visible


def _block_pairs(visible, key_rows):
    """[key blocks, query blocks]: whether any query of the block sees any key of the block."""
    sq, sk = visible.shape
    kb, mb = -(-sk // key_rows), -(-sq // BWD_QUERY_BLOCK)
    return torch.tensor([[bool(visible[m * BWD_QUERY_BLOCK:(m + 1) * BWD_QUERY_BLOCK, n * key_rows:(n + 1) * key_rows].any())
                          for m in range(mb)] for n in range(kb)], dtype=torch.bool).reshape(kb, mb)


def _check_ranks(ranks):
    """Each query block's visited key blocks are ranked 0, 1, ... in key-block order (the order the
    deterministic kernel adds dQ in: a gap or a repeat would leave a key block waiting forever)."""
    for m in range(ranks.shape[1]):
        column = ranks[:, m]
        visited = column[column >= 0].tolist()
        assert visited == list(range(len(visited))), f"query block {m}: ranks {column.tolist()}"


def _walk(sq, sk, key_rows, left=-1, right=-1, sparse=None, causal=False, exact=False, head=0):
    args = sparse or (None,) * 5
    out = selftest.attention_bwd_walk(sq, sk, left, right, key_rows, *args, causal, exact, 0, head)
    mb = -(-sq // BWD_QUERY_BLOCK)
    return out[:, :mb], out[:, mb], out[:, mb + 1]


@pytest.mark.parametrize("key_rows", [64, 128])
@pytest.mark.parametrize("sq,sk", [(1, 1), (64, 64), (200, 333), (333, 200), (130, 1000), (1000, 130), (512, 512)])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (100, 0), (0, 0), (17, 40), (-1, 5), (300, -1), (3, 1)])
def test_attention_bwd_dense_walk_is_exact(key_rows, sq, sk, window):
    """Dense attention: key block n visits exactly the query blocks holding a query that sees one of
    its keys (so candidates, all visited, is what the producer loads without testing each), ranked
    as the deterministic dQ order needs."""
    ranks, lo, hi = _walk(sq, sk, key_rows, *window)
    pairs = _block_pairs(_dense_visible(sq, sk, *window), key_rows)
    assert torch.equal(ranks >= 0, pairs)
    for n in range(pairs.shape[0]):
        assert pairs[n].nonzero().flatten().tolist() == list(range(lo[n], hi[n])), f"key block {n}"
    _check_ranks(ranks)


def _sparse_case(rng, sq, sk, types, causal, exact):
    """Sparse heads' tensors (one batch) and the plan of a random base_blockmask."""
    from tkpy.block_sparse import plan

    heads = len(types)
    head_mask_type = torch.tensor(types, dtype=torch.int32)
    local_max = 300 if exact else 4
    streaming_info = torch.randint(0, local_max, (2 * heads,), generator=rng, dtype=torch.int32)
    n_sparse = sum(t == 1 for t in types)
    blockmask = torch.rand(1, n_sparse, -(-sq // 128), -(-sk // 128), generator=rng) < 0.5
    sparse_index, indices, counts = plan(head_mask_type, blockmask if n_sparse else None)
    return (head_mask_type, streaming_info, sparse_index, indices, counts), blockmask


@pytest.mark.parametrize("key_rows", [64, 128])
@pytest.mark.parametrize("sq,sk", [(200, 333), (333, 200), (700, 700), (129, 1000)])
@pytest.mark.parametrize("causal,exact", [(False, False), (True, False), (True, True)])
def test_attention_bwd_sparse_walk_covers_the_forward(key_rows, sq, sk, causal, exact, rng):
    """Sparse heads: every (query, key) pair the forward sums over lies in a visited block pair;
    block-sparse heads visit exactly their mask's blocks that the rows can reach; ranks in order."""
    types = [0, -1, 1, 1]
    sparse, blockmask = _sparse_case(rng, sq, sk, types, causal, exact)
    info = sparse[1].tolist()
    column = 0
    for head, kind in enumerate(types):
        ranks, lo, hi = _walk(sq, sk, key_rows, sparse=sparse, causal=causal, exact=exact, head=head)
        mask = blockmask[0, column] if kind == 1 else None
        visible = reference.block_sparse_mask(sq, sk, kind, info[2 * head], info[2 * head + 1], mask, causal, exact)
        pairs = _block_pairs(visible, key_rows)
        assert bool(((ranks >= 0) | ~pairs).all()), f"head {head}: a visible pair's blocks are not visited"
        visited_m = (ranks >= 0).nonzero()
        for n, m in visited_m.tolist():
            assert lo[n] <= m < hi[n], f"head {head}: visited query block {m} outside the candidates"
        if kind == 1:
            sub = 128 // key_rows
            for n in range(ranks.shape[0]):
                for m in range(ranks.shape[1]):
                    qb = m * BWD_QUERY_BLOCK // 128  # the plan's 128-row block
                    planned = bool(mask[qb, n // sub]) and bool(_reachable(sq, sk, qb, n // sub, causal))
                    assert (ranks[n, m] >= 0) == planned, f"head {head}: block pair ({m}, {n})"
            column += 1
        _check_ranks(ranks)


def _reachable(sq, sk, qb, kb, causal):
    """Whether any row of 128-row block qb can see a key of 128-key block kb (lengths, causality)."""
    rows = range(qb * 128, min((qb + 1) * 128, sq))
    keys_lo, keys_hi = kb * 128, min((kb + 1) * 128, sk)
    return any(keys_lo < keys_hi and (not causal or keys_lo <= i + sk - sq) for i in rows)


@pytest.mark.parametrize("sq,sk", [(200, 333), (333, 200), (64, 64), (1, 130)])
@pytest.mark.parametrize("rule", ["dense", "dense_causal", "dense_window", "causal", "exact_streaming",
                                  "exact_streaming_no_local", "not_causal"])
def test_attention_bwd_key_rule_is_the_forwards_mask_transposed(sq, sk, rule, rng):
    """The per-key rule the backward masks with equals the forward's token-level mask, and a tile
    of a query block x 16 keys it calls fully visible is."""
    sink, local = int(torch.randint(0, 150, (1,), generator=rng)), int(torch.randint(1, 200, (1,), generator=rng))
    if rule.startswith("dense"):
        window = {"dense": (-1, -1), "dense_causal": (-1, 0), "dense_window": (37, 5)}[rule]
        queries, full = selftest.attention_bwd_key_rule(sq, sk, *window, None, 0, 0, False, False)
        visible = _dense_visible(sq, sk, *window)
    else:
        kind = -1 if rule.startswith("exact") else 0
        local = 0 if rule == "exact_streaming_no_local" else local
        causal, exact = rule != "not_causal", rule.startswith("exact")
        queries, full = selftest.attention_bwd_key_rule(sq, sk, -1, -1, kind, sink, local, causal, exact)
        visible = reference.block_sparse_mask(sq, sk, kind, sink, local, None, causal, exact)
    i = torch.arange(sq)[:, None]
    from_rule = (i >= queries[:, 0][None, :]) & (i < queries[:, 1][None, :])
    assert torch.equal(from_rule, visible)
    for m in range(full.shape[0]):
        for t in range(full.shape[1]):
            if full[m, t]:
                rows = slice(m * BWD_QUERY_BLOCK, (m + 1) * BWD_QUERY_BLOCK)
                assert bool(visible[rows, t * 16:t * 16 + 16].all()) and (m + 1) * BWD_QUERY_BLOCK <= sq
    if rule == "dense" and sq % BWD_QUERY_BLOCK == 0 and sk % 16 == 0:
        assert bool(full.all()), "an unmasked tile inside the sequence must skip the mask"


def test_selftest_index_ops_reject_bad_arguments():
    with pytest.raises(RuntimeError, match="swizzle must be 32, 64 or 128"):
        selftest.tk_tile_offsets(8, 64, 2, 16)
    with pytest.raises(RuntimeError, match="positive"):
        selftest.gemm_tile_order(0, 4, 8)


# ---- GPU: each primitive class against the host -------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("swizzle", [32, 64, 128])
@pytest.mark.parametrize("rows,cols,row,col", [(64, 128, 0, 0), (200, 384, 64, 128), (100, 136, 64, 64)])
def test_tma_roundtrip(swizzle, rows, cols, row, col, rng):
    """TMA load -> swizzled tile -> registers (x2) -> swizzled tile -> TMA store and store-add.
    A wrong swizzle formula scrambles the data; the partial tiles check zero-fill and clipping."""
    x = randn((rows, cols), torch.bfloat16, rng, "cuda")
    y = torch.full_like(x, float("nan"))
    z0 = randn((rows, cols), torch.bfloat16, rng, "cuda")
    z = z0.clone()
    selftest.tk_tma_roundtrip(x, y, z, swizzle, row, col)
    window = (slice(row, row + 64), slice(col, col + 128))
    expected_y = torch.full_like(x, float("nan"))
    expected_y[window] = 2 * x[window]
    assert torch.equal(y.isnan(), expected_y.isnan()), "TMA store wrote outside its tile or missed part of it"
    torch.testing.assert_close(y[window], expected_y[window], rtol=0, atol=0)
    expected_z = z0.clone()
    expected_z[window] = (z0[window].float() + 2 * x[window].float()).bfloat16()
    torch.testing.assert_close(z, expected_z, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.sanitizer
@pytest.mark.parametrize("rows,cols", [(32, 64), (17, 30), (1, 2)])
def test_register_ops(rows, cols, rng):
    x = randn((rows, cols), torch.float32, rng, "cuda")
    row_max, row_sum, col_max, col_sum, y, z = selftest.tk_register_ops(x)
    tile = torch.zeros(32, 64, dtype=torch.float64)  # the kernel reads zeros outside x
    tile[:rows, :cols] = x.double().cpu()
    torch.testing.assert_close(row_max.cpu().double(), tile.amax(1), rtol=0, atol=0)
    torch.testing.assert_close(row_sum.cpu().double(), tile.sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(col_max.cpu().double(), tile.amax(0), rtol=0, atol=0)
    torch.testing.assert_close(col_sum.cpu().double(), tile.sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.cpu().double(), torch.exp2(tile - tile.amax(1, keepdim=True))[:rows, :cols], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(z.cpu().double(), (tile + tile.amax(0))[:rows, :cols], rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.sanitizer
@pytest.mark.parametrize("cols", [32, 96, 256])
@pytest.mark.parametrize("softcap", [0.0, 2.5])
def test_online_softmax(cols, softcap, rng):
    """tk's softmax vocabulary (softmax_state, softcap, mask, rescale, finish) block by block
    against a float64 softmax: o[r][c] sums row r's probabilities of columns c, c + 32, ...; rows
    that see no column (keys 0) give 0 and -inf; row 1 sees only the first block, row 2 only the
    first column, so the running max changes and rescales O."""
    x = 4 * randn((16, cols), torch.float32, rng, "cuda")
    keys = torch.randint(1, cols + 1, (16,), generator=rng, dtype=torch.int32)
    keys[0], keys[1], keys[2], keys[3] = 0, 32, 1, cols
    scale = 0.3
    o, lse = selftest.tk_online_softmax(x, keys.cuda(), scale, softcap)
    s = x.double().cpu() * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(torch.arange(cols)[None, :] >= keys[:, None].long(), float("-inf"))
    probs = torch.softmax(s, 1).nan_to_num(0.0)
    expected_o = probs.view(16, cols // 32, 32).sum(1)
    expected_lse = torch.logsumexp(s, 1)
    torch.testing.assert_close(o.cpu().double(), expected_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.cpu().double(), expected_lse, rtol=1e-5, atol=1e-5)


def test_decay_ops_op_is_registered():
    """Runs without a GPU: the schema is declared, and a CUDA build registers its CUDA kernel."""
    assert "factors" in str(selftest.tk_decay_ops.default._schema)
    if tkpy.cuda_compiled():
        assert torch._C._dispatch_has_kernel_for_dispatch_key("tkpy_selftest::tk_decay_ops", "CUDA")


@pytest.mark.gpu
@pytest.mark.sanitizer
@pytest.mark.parametrize("factor", [0.0, 0.35, 1.0])
def test_decay_ops_and_row_dot(factor, rng):
    """UltraViCo's warp ops: row_dot of a shared bf16 tile's rows with a vector (the centres), and
    the decay x > c ? c + f·(x − c) : x everywhere, where (r + c) % 3 == 0, and per element."""
    x = 3 * randn((16, 64), torch.float32, rng, "cuda")
    centre = randn((16,), torch.float32, rng, "cuda")
    factors = torch.rand((16, 64), generator=rng).cuda()
    q = randn((16, 128), torch.bfloat16, rng, "cuda")
    vec = randn((128,), torch.float32, rng, "cuda")
    dot, uniform, where, each = selftest.tk_decay_ops(x, centre, factors, q, vec, factor)
    torch.testing.assert_close(dot.cpu().double(), q.double().cpu() @ vec.double().cpu(), rtol=1e-5, atol=1e-4)
    xs, c = x.double().cpu(), centre.double().cpu()[:, None]

    def decayed(f):
        return torch.where(xs > c, c + f * (xs - c), xs)

    third = (torch.arange(16)[:, None] + torch.arange(64)[None, :]) % 3 == 0
    torch.testing.assert_close(uniform.cpu().double(), decayed(factor), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(where.cpu().double(), torch.where(third, decayed(factor), xs), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(each.cpu().double(), decayed(factors.double().cpu()), rtol=1e-6, atol=1e-5)


VARIANTS = {"ABt": 0, "AB": 1, "AtB": 2, "AtBt": 3, "reg_ABt": 4, "reg_AB": 5}


def wgmma_operands(variant, n, k, dtype, gen):
    a = randn((k, 64) if variant in ("AtB", "AtBt") else (64, k), dtype, gen, "cuda")
    b = randn((n, k) if variant in ("ABt", "AtBt", "reg_ABt") else (k, n), dtype, gen, "cuda")
    a_mk = a.T if variant in ("AtB", "AtBt") else a
    b_kn = b.T if variant in ("ABt", "AtBt", "reg_ABt") else b
    return a, b, reference.matmul(a_mk.cpu(), b_kn.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", [16, 32, 64, 128, 256])  # 32: the attention backward's Sᵀ, dPᵀ and dQᵀ
def test_wgmma_bf16(variant, n, rng):
    a, b, expected = wgmma_operands(variant, n, 64, torch.bfloat16, rng)
    d = selftest.tk_wgmma(a, b, VARIANTS[variant])
    torch.testing.assert_close(d.cpu().double(), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["ABt", "AB"])
@pytest.mark.parametrize("dtype,k", [(torch.bfloat16, 128), (torch.float16, 64)])
def test_wgmma_two_chunks_and_fp16(variant, dtype, k, rng):
    a, b, expected = wgmma_operands(variant, 64, k, dtype, rng)
    d = selftest.tk_wgmma(a, b, VARIANTS[variant])
    torch.testing.assert_close(d.cpu().double(), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [64, 128])
def test_wgmma_register_a_with_32_deep_k(n, rng):
    """The attention backward's dV += Pᵀ dO and dK += dSᵀ Q: A from registers, K = 32 (a stage's
    queries), B a [32][n] tile of 64-byte rows."""
    a, b, expected = wgmma_operands("reg_AB", n, 32, torch.bfloat16, rng)
    d = selftest.tk_wgmma(a, b, VARIANTS["reg_AB"])
    torch.testing.assert_close(d.cpu().double(), expected, rtol=1e-4, atol=1e-3)


# ---- warp-scope mma.sync path of the decode kernel (tk::warp::mma_ABt, ldmatrix, cp.async) -----

WARP_MMA_VARIANTS = {"ABt": 0, "AB": 1}


def test_warp_mma_op_is_registered():
    """Runs without a GPU: the schema is declared, and a CUDA build registers its CUDA kernel."""
    op = selftest.tk_warp_mma
    assert "b_valid_rows" in str(op.default._schema)
    if tkpy.cuda_compiled():
        assert torch._C._dispatch_has_kernel_for_dispatch_key("tkpy_selftest::tk_warp_mma", "CUDA")


def test_warp_mma_refuses_cpu_tensors():
    """A self-test kernel only: CPU tensors are refused by the dispatcher, never computed."""
    a = torch.zeros(16, 16, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError):
        selftest.tk_warp_mma(a, a, 0)


def warp_mma_case(variant, dtype, rows, k, n, valid, gen):
    """a [rows, k], b ([n, k] for ABt, [k, n] for AB) with NaN in b's rows at and past `valid`
    (the kernel must zero-fill them without reading), and the float64 reference with them zeroed."""
    a = randn((rows, k), dtype, gen, "cuda")
    b = randn((n, k) if variant == "ABt" else (k, n), dtype, gen, "cuda")
    b[valid:] = float("nan")
    b_ref = b.double().cpu()
    b_ref[valid:] = 0
    a_ref = a.double().cpu()
    return a, b, a_ref @ (b_ref.T if variant == "ABt" else b_ref)


def check_warp_mma(c, expected, dtype):
    assert c.dtype == torch.float32 and c.shape == expected.shape
    err = rel_err(c.cpu(), expected)  # NaN (unwritten, poisoned, or a read past `valid`) never passes
    assert err <= REL_TOL[dtype], f"relative error {err:.3e} > {REL_TOL[dtype]}"
    # The products are exact in fp32 and the AB repack of a's values is exact: per element, only
    # fp32 accumulation error is left, so a single misplaced fragment cannot hide in the norm.
    torch.testing.assert_close(c.cpu().double(), expected, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", WARP_MMA_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rows", [16, 64])
@pytest.mark.parametrize("k", [16, 64, 128])
@pytest.mark.parametrize("n", [16, 64, 128])
def test_warp_mma(variant, dtype, rows, k, n, rng):
    """ABt: c = a · bᵀ as decode's S = Q·Kᵀ (ldmatrix, mma.sync). AB: c = a · b as decode's
    O += P·V (fp32 accumulator repacked to a 16-bit A fragment, ldmatrix.trans). Every element of b
    comes through cp.async into a 128-byte-swizzled tile; all of b's rows are valid here."""
    b_rows = n if variant == "ABt" else k
    a, b, expected = warp_mma_case(variant, dtype, rows, k, n, b_rows, rng)
    poison_cuda_allocator()
    c = selftest.tk_warp_mma(a, b, WARP_MMA_VARIANTS[variant], b_rows)
    check_warp_mma(c, expected, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", WARP_MMA_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("valid", [0, 1, 9, 37])
def test_warp_mma_zero_fills_rows_past_valid(variant, dtype, valid, rng):
    """Rows of b at and past `valid` hold NaN in memory and must read as zero (cp.async zero-fill,
    as decode's slots past the sequence): for ABt those columns of c are exactly 0, for AB those
    reduction steps add nothing. One NaN read spoils the whole result."""
    rows, k, n = 48, 64, 64
    a, b, expected = warp_mma_case(variant, dtype, rows, k, n, valid, rng)
    poison_cuda_allocator()
    c = selftest.tk_warp_mma(a, b, WARP_MMA_VARIANTS[variant], valid)
    if variant == "ABt":
        assert torch.equal(c[:, valid:].cpu(), torch.zeros(rows, n - valid)), "masked keys must give exactly 0"
    if valid == 0:
        assert torch.equal(c.cpu(), torch.zeros(rows, n))
    else:
        check_warp_mma(c, expected, dtype)


@pytest.mark.gpu
def test_warp_mma_default_reads_every_row(rng):
    a = randn((32, 64), torch.bfloat16, rng, "cuda")
    b = randn((128, 64), torch.bfloat16, rng, "cuda")
    poison_cuda_allocator()
    check_warp_mma(selftest.tk_warp_mma(a, b, 0), a.double().cpu() @ b.double().cpu().T, torch.bfloat16)


@pytest.mark.gpu
def test_warp_mma_rejects_bad_inputs():
    """Validated before launch, with messages that say what was wrong. (CUDA tensors are needed to
    reach the check at all: the op has only a CUDA kernel.)"""
    setup = (
        "import torch, tkpy\n"
        "op = torch.ops.tkpy_selftest.tk_warp_mma\n"
        "def t(*shape, dtype=torch.bfloat16):\n"
        "    return torch.zeros(*shape, dtype=dtype, device='cuda')\n"
    )
    cases = [
        ("op(t(16, 64), t(64, 64), 2)", "variant must be 0"),
        ("op(t(16, 64, dtype=torch.float32), t(64, 64, dtype=torch.float32), 0)", "bfloat16 or float16"),
        ("op(t(16, 64), t(64, 64, dtype=torch.float16), 0)", "expected b to be a contiguous 2-D CUDA BFloat16"),
        ("op(t(16, 64), t(64, 64).T, 0)", "expected b to be a contiguous"),
        ("op(t(16, 64), t(64, 64)[None], 0)", "expected b to be a contiguous 2-D"),
        ("op(t(16, 64), t(64, 128), 0)", r"b must be \[n, k\] with a's k = 64"),
        ("op(t(16, 64), t(128, 64), 1)", r"b must be \[k, n\] with a's k = 64"),
        ("op(t(24, 64), t(64, 64), 0)", "rows must be 16, 32, 48 or 64"),
        ("op(t(80, 64), t(64, 64), 0)", "rows must be 16, 32, 48 or 64"),
        ("op(t(16, 32), t(64, 32), 0)", "n, k each 16, 64 or 128"),
        ("op(t(16, 64), t(64, 64), 0, 65)", "b_valid_rows must be -1"),
        ("op(t(16, 64), t(64, 64), 0, -2)", "b_valid_rows must be -1"),
        ("op(t(17 * 64).view(-1)[1:].view(-1)[: 16 * 64].view(16, 64), t(64, 64), 0)", "16-byte aligned"),
    ]
    # In a subprocess first: on the first H200 run (2026-12-04) one of these calls segfaulted the
    # test process itself, and the subprocess names the call that crashes.
    assert_bad_calls_survive(setup, [code for code, _ in cases])
    for code, message in cases:
        assert_bad_call_raises(setup, code, message, errors=BAD_CALL_ERRORS)


# ---- tk::wait's deadlock watchdog (include/tk/pipeline/watchdog.cuh) ---------------------------

STUCK_WAIT_SOURCE = Path(__file__).resolve().parents[1] / "csrc/kernels/tk_selftest/stuck_wait.cuh"


def test_stuck_wait_op_is_registered():
    """Runs without a GPU: the schema is declared, and a CUDA build registers its CUDA kernel."""
    assert "report" in str(selftest.tk_stuck_wait.default._schema)
    if tkpy.cuda_compiled():
        assert torch._C._dispatch_has_kernel_for_dispatch_key("tkpy_selftest::tk_stuck_wait", "CUDA")


@pytest.mark.gpu
@pytest.mark.parametrize("report", [False, True], ids=["default", "report"])
def test_wait_watchdog_ends_a_deadlock(report):
    """A wait that no thread arrives at must end its kernel with an error within seconds instead of
    hanging. The trap leaves the CUDA context unusable, so the kernel runs in a fresh interpreter.
    As the library builds it, the watchdog traps after 2^33 cycles (about 4 s); built with the
    report (2^24 cycles), every stuck warp first names the wait's call site, block and barrier."""
    script = (
        "import torch, tkpy\n"
        "reached = torch.zeros(1, dtype=torch.int32, device='cuda')\n"
        f"torch.ops.tkpy_selftest.tk_stuck_wait(reached, {report})\n"
        "torch.cuda.synchronize()\n"
        "print('the wait returned; reached =', reached.item())\n"
    )
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "the wait returned" not in output, output[-4000:]
    assert "unspecified launch failure" in output, output[-4000:]
    assert elapsed < 30, f"the watchdog took {elapsed:.1f} s"
    if not report:
        assert elapsed > 2, f"the watchdog fired after {elapsed:.1f} s, well before its 2^33-cycle budget"
        assert "tk::wait watchdog" not in output
        return
    wait_line = next(n for n, text in enumerate(STUCK_WAIT_SOURCE.read_text().splitlines(), 1) if "tk::wait(" in text)
    reports = re.findall(
        rf"stuck_wait\.cuh:{wait_line}: in stuck_wait_kernel: tk::wait watchdog: block \((\d), 0, 0\) warp (\d): "
        r"the mbarrier at shared address 0x[0-9a-f]+ has not completed the phase of parity 0 within 16777216 cycles",
        output,
    )
    assert reports, output[-4000:]
    # One line per reporting warp (its lowest active lane), never one per thread.
    assert len(reports) == len(set(reports)) and all(int(b) < 2 and int(w) < 2 for b, w in reports), reports

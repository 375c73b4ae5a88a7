"""torch.ops.tkpy.decode_attention and torch.ops.tkpy.kv_append_ against python/tkpy/reference.py.

Decode over paged caches (page sizes 16/64/256), contiguous caches and cache_batch_idx, odd and empty
lengths, Sq > 1 with causal and sliding windows, softcap, GQA, head dims, bf16/fp16, split-KV
(forced and auto splits agree), LServe's streaming heads (a ring that must equal dense attention
over sink + local tokens) and retrieval heads (page lists with per-query-head bits), int8 caches.
Append: positions, rotary (both pair styles, partial), page stats equal to a recomputation after
several appends, the ring keeping exactly the sink and newest pages, int8 storage. Bad input: clear
errors and no crash. GPU variants run on poisoned memory.
"""

import math

import pytest
import torch

import tkpy  # noqa: F401  (loads torch.ops.tkpy)
from tkpy import reference

from helpers import REL_TOL, assert_bad_calls_survive, poison_cuda_allocator, randn, rel_err
from test_attention import DEVICES, DTYPES, check_attention

LSERVE_PAGE = 64


def int32(values, device="cpu"):
    return torch.tensor(values, dtype=torch.int32, device=device)


def to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def decode(q, k_cache, v_cache, seqlens, block_table=None, cache_batch_idx=None, kv_head_slot=None, k_ring=None,
           v_ring=None, ring_table=None, sink=0, local=0, page_indices=None, page_counts=None, head_bits=None,
           k_scale=1.0, v_scale=1.0, softmax_scale=None, window_size=(-1, -1), softcap=0.0, num_splits=0):
    """torch.ops.tkpy.decode_attention with reference.paged_decode_attention's keywords; poisons
    the CUDA allocator first so that an unwritten output reads as NaN."""
    if q.is_cuda:
        poison_cuda_allocator()
    return torch.ops.tkpy.decode_attention(
        q, k_cache, v_cache, seqlens, block_table=block_table, cache_batch_idx=cache_batch_idx,
        kv_head_slot=kv_head_slot, k_ring=k_ring, v_ring=v_ring, ring_table=ring_table, sink=sink, local=local,
        page_indices=page_indices, page_counts=page_counts, head_bits=head_bits, k_scale=k_scale, v_scale=v_scale,
        softmax_scale=softmax_scale, window_left=window_size[0], window_right=window_size[1], softcap=softcap,
        num_splits=num_splits,
    )


def decode_reference(q, k_cache, v_cache, seqlens, **kwargs):
    cpu = {name: (t.cpu() if isinstance(t, torch.Tensor) else t) for name, t in kwargs.items()}
    return reference.paged_decode_attention(q.cpu(), k_cache.cpu(), v_cache.cpu(), seqlens.cpu(), **cpu)


def append(k_cache, v_cache, k, v, seqlens, block_table=None, cache_batch_idx=None, k_min=None, k_max=None,
           rotary_cos=None, rotary_sin=None, rotary_interleaved=False, k_scale=1.0, v_scale=1.0, kv_head_slot=None,
           k_ring=None, v_ring=None, ring_table=None, sink=0, local=0):
    torch.ops.tkpy.kv_append_(
        k_cache, v_cache, k, v, seqlens, block_table=block_table, cache_batch_idx=cache_batch_idx, k_min=k_min,
        k_max=k_max, rotary_cos=rotary_cos, rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved,
        k_scale=k_scale, v_scale=v_scale, kv_head_slot=kv_head_slot, k_ring=k_ring, v_ring=v_ring,
        ring_table=ring_table, sink=sink, local=local,
    )


def paged_cache(batch, max_pages, page_size, heads, head_dim, dtype, gen, spare_pages=3):
    """Random pools (every slot holds data, so a read of the wrong slot shows) and a block table of
    distinct pages in random order."""
    num_pages = batch * max_pages + spare_pages
    k_cache = randn((num_pages, page_size, heads, head_dim), dtype, gen)
    v_cache = randn((num_pages, page_size, heads, head_dim), dtype, gen)
    block_table = torch.randperm(num_pages, generator=gen)[: batch * max_pages].view(batch, max_pages).int()
    return k_cache, v_cache, block_table


# ---------------------------------------------------------------------------------------------
# Dense decode over paged and contiguous caches

# batch lengths, Sq, Hq, Hkv, D, layout (page size, "contiguous" or "batch_idx"), window, softcap
DECODE_CASES = {
    "page64-gqa4": ([1, 130, 257], 1, 8, 2, 128, 64, (-1, -1), 0.0),
    "page16-odd-mha": ([37, 5], 1, 4, 4, 64, 16, (-1, -1), 0.0),
    "page256-mqa8-d256": ([300, 511], 1, 8, 1, 256, 256, (-1, -1), 0.0),
    "contiguous": ([100, 77], 1, 4, 1, 64, "contiguous", (-1, -1), 0.0),
    "cache-batch-idx": ([50, 90], 2, 4, 2, 128, "batch_idx", (-1, 0), 0.0),
    "empty-sequences": ([0, 40, 0], 1, 4, 2, 64, 16, (-1, -1), 0.0),
    "sq4-causal": ([70, 200], 4, 4, 2, 128, 64, (-1, 0), 0.0),
    "sq3-window": ([150, 9], 3, 4, 4, 64, 16, (20, 0), 0.0),
    "sq5-two-sided-window": ([64, 100], 5, 2, 1, 64, 16, (8, 3), 0.0),
    "sq-longer-than-len": ([2, 30], 4, 4, 2, 64, 16, (-1, 0), 0.0),
    "softcap-group8": ([120, 33], 1, 16, 2, 64, 64, (-1, -1), 5.0),
    "softcap-sq2-window": ([90], 2, 4, 1, 128, 32, (40, 0), 3.0),
}


def dense_case_inputs(case, dtype, gen):
    lengths, seqlen_q, heads_q, heads_kv, head_dim, layout, window, softcap = DECODE_CASES[case]
    batch = len(lengths)
    q = randn((batch, seqlen_q, heads_q, head_dim), dtype, gen)
    kwargs = dict(window_size=window, softcap=softcap)
    if layout in ("contiguous", "batch_idx"):
        rows = batch + 2 if layout == "batch_idx" else batch
        seqlen_cache = max(lengths) + 11
        k_cache = randn((rows, seqlen_cache, heads_kv, head_dim), dtype, gen)
        v_cache = randn((rows, seqlen_cache, heads_kv, head_dim), dtype, gen)
        if layout == "batch_idx":
            kwargs["cache_batch_idx"] = torch.randperm(rows, generator=gen)[:batch].int()
    else:
        max_pages = -(-max(max(lengths), 1) // layout) + 1
        k_cache, v_cache, kwargs["block_table"] = paged_cache(batch, max_pages, layout, heads_kv, head_dim, dtype, gen)
    return q, k_cache, v_cache, int32(lengths), kwargs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_matches_reference(device, dtype, case, rng):
    q, k_cache, v_cache, seqlens, kwargs = dense_case_inputs(case, dtype, rng)
    ref_out, ref_lse = decode_reference(q, k_cache, v_cache, seqlens, **kwargs)
    q, k_cache, v_cache, seqlens = to(device, q, k_cache, v_cache, seqlens)
    kwargs = {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in kwargs.items()}
    out, lse = decode(q, k_cache, v_cache, seqlens, **kwargs)
    assert out.device == q.device and lse.device == q.device and out.is_contiguous()
    check_attention(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_batch_idx", [False, True])
def test_long_contiguous_rows_are_split_like_pages(device, use_batch_idx, rng):
    """A contiguous cache whose rows are a multiple of 64 tokens is read as 64-token pages, so that
    split-KV can share a long row among CTAs: every split count, with and without cache_batch_idx,
    still attends over exactly the row's first seqlens[b] tokens (other rows hold random data)."""
    lengths, rows, seqlen_cache = [300, 77, 256], 5, 320
    q = randn((3, 1, 8, 64), torch.bfloat16, rng)
    k_cache = randn((rows, seqlen_cache, 2, 64), torch.bfloat16, rng)
    v_cache = randn((rows, seqlen_cache, 2, 64), torch.bfloat16, rng)
    kwargs = {"cache_batch_idx": torch.randperm(rows, generator=rng)[:3].int()} if use_batch_idx else {}
    seqlens = int32(lengths)
    ref_out, ref_lse = decode_reference(q, k_cache, v_cache, seqlens, **kwargs)
    q, k_cache, v_cache, seqlens = to(device, q, k_cache, v_cache, seqlens)
    kwargs = {n: t.to(device) for n, t in kwargs.items()}
    for splits in (1, 3, 0):
        out, lse = decode(q, k_cache, v_cache, seqlens, num_splits=splits, **kwargs)
        check_attention(out, lse, ref_out, ref_lse, torch.bfloat16)


def test_reference_rows_that_see_no_key():
    """The oracle itself: an empty sequence and rows before the first key give out 0, lse -inf."""
    gen = torch.Generator().manual_seed(0)
    q = randn((2, 3, 2, 64), torch.float32, gen)
    k_cache = randn((2, 8, 1, 64), torch.float32, gen)
    out, lse = reference.paged_decode_attention(q, k_cache, k_cache, int32([0, 1]), window_size=(-1, 0))
    assert torch.isneginf(lse[0]).all() and (out[0] == 0).all()
    assert torch.isneginf(lse[1, :, :2]).all() and torch.isfinite(lse[1, :, 2]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_decode_non_contiguous_q(device, rng):
    """q sliced out of a wider buffer (strides over heads and tokens) reads the right rows."""
    q_buffer = randn((2, 3, 6, 64), torch.bfloat16, rng)
    q = q_buffer[:, :, 1:5]
    k_cache, v_cache, table = paged_cache(2, 4, 16, 2, 64, torch.bfloat16, rng)
    seqlens = int32([40, 63])
    ref = decode_reference(q, k_cache, v_cache, seqlens, block_table=table, window_size=(-1, 0))
    q, k_cache, v_cache, seqlens, table = to(device, q, k_cache, v_cache, seqlens, table)
    out, lse = decode(q, k_cache, v_cache, seqlens, block_table=table, window_size=(-1, 0))
    check_attention(out, lse, *ref, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_num_splits_agree(device, rng):
    """Forced splits (1, 3, more splits than pages) and auto give one result within fp32 rounding,
    and each matches the reference. B = Hkv = 1 so that auto splits on the CPU too."""
    dtype = torch.float16
    for lengths, heads_kv, page_size in (([1000], 1, 16), ([700, 33], 2, 64), ([100], 1, 64)):
        k_cache, v_cache, table = paged_cache(len(lengths), -(-max(lengths) // page_size), page_size, heads_kv, 128,
                                              dtype, rng)
        q = randn((len(lengths), 1, 8, 128), dtype, rng)
        seqlens = int32(lengths)
        ref = decode_reference(q, k_cache, v_cache, seqlens, block_table=table)
        q, k_cache, v_cache, seqlens, table = to(device, q, k_cache, v_cache, seqlens, table)
        results = {s: decode(q, k_cache, v_cache, seqlens, block_table=table, num_splits=s) for s in (1, 3, 0, 64)}
        for splits, (out, lse) in results.items():
            check_attention(out, lse, *ref, dtype)
            torch.testing.assert_close(out.float(), results[1][0].float(), rtol=2e-3, atol=2e-3, msg=f"{splits} splits")
            torch.testing.assert_close(lse, results[1][1], rtol=1e-5, atol=1e-5, msg=f"{splits} splits")


# ---------------------------------------------------------------------------------------------
# LServe: streaming heads over the ring, retrieval heads over page lists


class LServePools:
    """One layer's LServe pools for `roles` ("r" retrieval, "s" streaming per kv head), filled with
    garbage that the appends overwrite."""

    def __init__(self, roles, lengths, head_dim, dtype, sink, local, gen, kv_dtype=None):
        self.roles, self.sink, self.local = roles, sink, local
        batch = len(lengths)
        retrieval, streaming = roles.count("r"), roles.count("s")
        slots, r, s = [], 0, 0
        for role in roles:
            slots.append(r if role == "r" else -1 - s)
            r, s = r + (role == "r"), s + (role == "s")
        self.kv_head_slot = int32(slots)
        max_pages = -(-max(lengths) // LSERVE_PAGE) + 1
        self.k, self.v, self.block_table = paged_cache(batch, max_pages, LSERVE_PAGE, retrieval, head_dim, dtype, gen)
        self.ring_pages = sink // LSERVE_PAGE + local // LSERVE_PAGE + 1
        ring_pool = batch * self.ring_pages + 2
        self.k_ring = randn((ring_pool, LSERVE_PAGE, streaming, head_dim), dtype, gen)
        self.v_ring = randn((ring_pool, LSERVE_PAGE, streaming, head_dim), dtype, gen)
        self.ring_table = torch.randperm(ring_pool, generator=gen)[: batch * self.ring_pages].view(batch, -1).int()
        self.k_scale = self.v_scale = 1.0
        if kv_dtype == torch.int8:
            self.k_scale, self.v_scale = 4.5 / 127, 4.0 / 127
            for name in ("k", "v", "k_ring", "v_ring"):
                setattr(self, name, torch.randint(-127, 128, getattr(self, name).shape, generator=gen, dtype=torch.int8))
        self.k_min = randn((self.k.shape[0], LSERVE_PAGE // 16, retrieval, head_dim), torch.float32, gen)
        self.k_max = randn(self.k_min.shape, torch.float32, gen)

    def to(self, device):
        for name in ("kv_head_slot", "k", "v", "block_table", "k_ring", "v_ring", "ring_table", "k_min", "k_max"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def heads(self):
        return dict(kv_head_slot=self.kv_head_slot, k_ring=self.k_ring, v_ring=self.v_ring, ring_table=self.ring_table,
                    sink=self.sink, local=self.local, k_scale=self.k_scale, v_scale=self.v_scale)

    def append(self, k, v, starts, rows=None, **kwargs):
        """Appends k/v [B, S_new, Hkv, D] at `starts`; `rows` picks a subset of the sequences."""
        rows = slice(None) if rows is None else rows
        append(self.k, self.v, k, v, int32(starts, k.device), self.block_table[rows], None, self.k_min, self.k_max,
               kv_head_slot=self.kv_head_slot, k_ring=self.k_ring, v_ring=self.v_ring,
               ring_table=self.ring_table[rows], sink=self.sink, local=self.local, k_scale=self.k_scale,
               v_scale=self.v_scale, **kwargs)

    def prefill(self, keys, values, lengths, chunk=None):
        """Appends each sequence's first lengths[b] tokens, one sequence at a time, in chunks."""
        for b, length in enumerate(lengths):
            step = chunk or max(length, 1)
            for start in range(0, length, step):
                end = min(length, start + step)
                self.append(keys[b : b + 1, start:end].contiguous(), values[b : b + 1, start:end].contiguous(),
                            [start], rows=slice(b, b + 1))


def attention_over_tokens(q, keys, values, visible, scale):
    """float64 attention of q [B, 1, Hq, D] over the token sets visible(b, head_q) of dense
    keys/values [B, L, Hkv, D]."""
    batch, _, heads_q, head_dim = q.shape
    group = heads_q // keys.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full((batch, heads_q, 1), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        for head in range(heads_q):
            tokens = sorted(visible(b, head))
            if not tokens:
                continue
            k = keys[b, tokens, head // group].double()
            v = values[b, tokens, head // group].double()
            scores = k @ q[b, 0, head].double() * scale
            lse[b, head, 0] = torch.logsumexp(scores, 0)
            out[b, 0, head] = torch.softmax(scores, 0) @ v
    return out, lse


def random_selection(lengths, heads_kv, group, gen, max_selected):
    """Per (sequence, kv head): a random ascending page list (sometimes listing the newest page),
    random bits (some zero), garbage past the count."""
    batch = len(lengths)
    indices = torch.full((batch, heads_kv, max_selected), 10**6, dtype=torch.int32)
    counts = torch.zeros((batch, heads_kv), dtype=torch.int32)
    bits = torch.randint(-(2**31), 2**31, (batch, heads_kv, max_selected), generator=gen, dtype=torch.int64)
    bits = (bits & ((1 << group) - 1) if group < 32 else bits).to(torch.int32)
    for b, length in enumerate(lengths):
        n_pages = -(-length // LSERVE_PAGE)
        for h in range(heads_kv):
            pages = [p for p in range(n_pages) if torch.rand((), generator=gen) < 0.5][:max_selected]
            indices[b, h, : len(pages)] = int32(pages)
            counts[b, h] = len(pages)
    return indices, counts, bits


def lserve_visible(roles, group, lengths, sink, local, selection=None):
    """Token sets of DESIGN.md §5, from the positions alone."""
    def visible(b, head_q):
        length, h = lengths[b], head_q // group
        if roles[h] == "s":
            return {t for t in range(length) if t < sink or t >= length - local}
        if selection is None:
            return set(range(length))
        indices, counts, bits = selection
        newest = (length - 1) // LSERVE_PAGE
        pages = {newest} | {int(indices[b, h, n]) for n in range(int(counts[b, h]))
                            if (int(bits[b, h, n]) >> (head_q % group)) & 1}
        return {t for t in range(length) if t // LSERVE_PAGE in pages}
    return visible


LSERVE_CASES = {
    # roles, Hq, lengths, sink, local, D, selected pages, prefill chunk
    "streaming-and-dense": ("rssr", 8, [50, 300, 701], 64, 128, 128, False, None),
    "selected-group4": ("rsrs", 16, [64, 257, 700], 128, 256, 64, True, 100),
    "selected-group32": ("r", 32, [500, 129], 64, 64, 64, True, None),
    "streaming-only-no-sink": ("ss", 4, [1, 65, 600], 0, 64, 256, False, 77),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LSERVE_CASES)
def test_lserve_decode(device, dtype, case, rng):
    """Streaming heads over the ring equal dense attention over [0, sink) u [len - local, len);
    retrieval heads equal attention over exactly their listed pages plus the newest; both also
    match the paged reference on the pools; forced and auto splits agree."""
    roles, heads_q, lengths, sink, local, head_dim, selected, chunk = LSERVE_CASES[case]
    heads_kv, batch = len(roles), len(lengths)
    group = heads_q // heads_kv
    keys = randn((batch, max(lengths), heads_kv, head_dim), dtype, rng)
    values = randn((batch, max(lengths), heads_kv, head_dim), dtype, rng)
    q = randn((batch, 1, heads_q, head_dim), dtype, rng)
    pools = LServePools(roles, lengths, head_dim, dtype, sink, local, rng).to(device)
    pools.prefill(keys.to(device), values.to(device), lengths, chunk)
    selection = random_selection(lengths, heads_kv, group, rng, 20) if selected else None
    sel_kwargs = {}
    if selection is not None:
        sel_kwargs = dict(zip(("page_indices", "page_counts", "head_bits"), (s.to(device) for s in selection)))
    seqlens = int32(lengths, device)
    scale = 1.0 / math.sqrt(head_dim)

    by_tokens = attention_over_tokens(q, keys, values, lserve_visible(roles, group, lengths, sink, local, selection),
                                      scale)
    paged_ref = decode_reference(q, pools.k, pools.v, seqlens, block_table=pools.block_table, **pools.heads(),
                                 **sel_kwargs)
    torch.testing.assert_close(paged_ref[0], by_tokens[0], rtol=1e-10, atol=1e-10)
    q = q.to(device)
    first = None
    for splits in (1, 3, 0):
        out, lse = decode(q, pools.k, pools.v, seqlens, block_table=pools.block_table, **pools.heads(), **sel_kwargs,
                          num_splits=splits)
        check_attention(out, lse, *by_tokens, dtype)
        if first is None:
            first = out, lse
        torch.testing.assert_close(out.float(), first[0].float(), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(lse, first[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_lserve_head_independent_of_other_roles(device, rng):
    """Turning kv head 1 from retrieval into streaming leaves kv heads 0 and 2 bit for bit unchanged."""
    dtype, head_dim, lengths, group = torch.bfloat16, 64, [333, 90], 2
    keys = randn((2, 333, 3, head_dim), dtype, rng).to(device)
    values = randn((2, 333, 3, head_dim), dtype, rng).to(device)
    q = randn((2, 1, 6, head_dim), dtype, rng).to(device)
    outputs = []
    for roles in ("rrs", "rss"):
        pools = LServePools(roles, lengths, head_dim, dtype, 64, 128, rng).to(device)
        pools.prefill(keys, values, lengths)
        outputs.append(decode(q, pools.k, pools.v, int32(lengths, device), block_table=pools.block_table,
                              **pools.heads(), num_splits=1))
    keep = [0, 1, 4, 5]  # query heads of kv heads 0 and 2
    assert torch.equal(outputs[0][0][:, :, keep], outputs[1][0][:, :, keep])
    assert torch.equal(outputs[0][1][:, keep], outputs[1][1][:, keep])
    assert not torch.equal(outputs[0][0][:, :, 2:4], outputs[1][0][:, :, 2:4])


# ---------------------------------------------------------------------------------------------
# int8 caches

INT8_BOUND = 3e-2  # ‖out − out_unquantised‖ / ‖out_unquantised‖ with scales absmax / 127


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["paged", "lserve"])
def test_int8_decode(device, layout, rng):
    """int8 pools match the reference on the dequantised values, and the quantised attention stays
    within INT8_BOUND of attention over the unquantised keys/values."""
    dtype, head_dim, lengths = torch.bfloat16, 128, [200, 513]
    keys = randn((2, 513, 2, head_dim), dtype, rng)
    values = randn((2, 513, 2, head_dim), dtype, rng)
    k_scale, v_scale = keys.float().abs().max().item() / 127, values.float().abs().max().item() / 127
    q = randn((2, 1, 8, head_dim), dtype, rng)
    seqlens = int32(lengths, device)
    if layout == "paged":
        k_cache, v_cache, table = paged_cache(2, 9, 64, 2, head_dim, torch.int8, rng)
        extra = dict(block_table=table.to(device), k_scale=k_scale, v_scale=v_scale)
        k_cache, v_cache = to(device, k_cache, v_cache)
        append(k_cache, v_cache, keys[:1, :200].to(device), values[:1, :200].to(device), int32([0], device),
               extra["block_table"][:1], k_scale=k_scale, v_scale=v_scale)
        append(k_cache, v_cache, keys[1:].to(device), values[1:].to(device), int32([0], device),
               extra["block_table"][1:], k_scale=k_scale, v_scale=v_scale)
        visible = lserve_visible("rr", 4, lengths, 0, 0)
    else:
        pools = LServePools("rs", lengths, head_dim, dtype, 64, 128, rng, kv_dtype=torch.int8).to(device)
        pools.k_scale, pools.v_scale = k_scale, v_scale
        pools.prefill(keys.to(device), values.to(device), lengths)
        k_cache, v_cache = pools.k, pools.v
        extra = dict(block_table=pools.block_table, **pools.heads())
        visible = lserve_visible("rs", 4, lengths, 64, 128)
    out, lse = decode(q.to(device), k_cache, v_cache, seqlens, **extra)
    check_attention(out, lse, *decode_reference(q, k_cache, v_cache, seqlens, **extra), dtype)
    unquantised, _ = attention_over_tokens(q, keys, values, visible, 1.0 / math.sqrt(head_dim))
    assert rel_err(out.cpu(), unquantised) < INT8_BOUND


# ---------------------------------------------------------------------------------------------
# Append


def rotary_tables(rows, rotary_dim, dtype, gen):
    angles = torch.rand((rows, rotary_dim // 2), generator=gen, dtype=torch.float64) * 2 * math.pi
    return angles.cos().to(dtype), angles.sin().to(dtype)


APPEND_CASES = {
    # page size (or layout), D, S_new, starts, rotary (dim, interleaved, table dtype)
    "page16": (16, 64, 5, [0, 13, 40], None),
    "page64-long": (64, 128, 150, [3, 64], None),
    "contiguous": ("contiguous", 64, 7, [0, 20], None),
    "batch-idx": ("batch_idx", 128, 9, [4, 50], None),
    "rotary-neox": (16, 128, 20, [1, 30], (128, False, torch.float32)),
    "rotary-gptj-partial": (64, 128, 33, [60, 0], (64, True, torch.float32)),
    "rotary-neox-partial-kdtype-table": (32, 256, 6, [31, 2], (96, False, "k's dtype")),
}


def append_case_inputs(case, dtype, gen):
    layout, head_dim, seqlen_new, starts, rotary = APPEND_CASES[case]
    batch, heads = len(starts), 2
    capacity = max(starts) + seqlen_new
    kwargs = {}
    if layout in ("contiguous", "batch_idx"):
        rows = batch + 1 if layout == "batch_idx" else batch
        k_cache = randn((rows, capacity + 5, heads, head_dim), dtype, gen)
        v_cache = randn((rows, capacity + 5, heads, head_dim), dtype, gen)
        if layout == "batch_idx":
            kwargs["cache_batch_idx"] = torch.randperm(rows, generator=gen)[:batch].int()
    else:
        k_cache, v_cache, kwargs["block_table"] = paged_cache(batch, -(-capacity // layout), layout, heads, head_dim,
                                                              dtype, gen)
    k = randn((batch, seqlen_new, heads, head_dim), dtype, gen)
    v = randn((batch, seqlen_new, heads, head_dim), dtype, gen)
    if rotary is not None:
        rotary_dim, interleaved, table_dtype = rotary
        table_dtype = dtype if table_dtype == "k's dtype" else table_dtype
        kwargs["rotary_cos"], kwargs["rotary_sin"] = rotary_tables(capacity + 3, rotary_dim, table_dtype, gen)
        kwargs["rotary_interleaved"] = interleaved
    return k_cache, v_cache, k, v, int32(starts), kwargs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", APPEND_CASES)
def test_append_matches_reference(device, dtype, case, rng):
    """Tokens land at their pages and slots (everything else untouched), k rotated at its position."""
    k_cache, v_cache, k, v, seqlens, kwargs = append_case_inputs(case, dtype, rng)
    ref_k, ref_v, _, _ = reference.paged_kv_append(k_cache, v_cache, k, v, seqlens, **kwargs)
    k_cache, v_cache, k, v, seqlens = to(device, k_cache, v_cache, k, v, seqlens)
    kwargs = {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in kwargs.items()}
    append(k_cache, v_cache, k, v, seqlens, **kwargs)
    assert torch.equal(v_cache.cpu().double(), ref_v)
    if "rotary_cos" in kwargs:
        assert rel_err(k_cache.cpu(), ref_k) < REL_TOL[dtype]
        # Rounding to the dtype moves each element by at most half a unit.
        assert torch.allclose(k_cache.cpu().double(), ref_k, rtol=2 ** -7, atol=1e-6)
    else:
        assert torch.equal(k_cache.cpu().double(), ref_k)


def logical_page_stats(keys, lengths, pools):
    """min/max over each logical page's tokens, recomputed from scratch; yields
    (physical page, logical index, head, min, max) for every logical page that holds tokens."""
    for b, length in enumerate(lengths):
        for h, slot in enumerate(pools.kv_head_slot.tolist()):
            if slot < 0:
                continue
            for first in range(0, length, 16):
                tokens = keys[b, first : min(first + 16, length), h].double()
                physical = int(pools.block_table[b, first // LSERVE_PAGE])
                yield physical, (first % LSERVE_PAGE) // 16, slot, tokens.amin(0), tokens.amax(0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_dtype", [None, torch.int8], ids=["bf16-pool", "int8-pool"])
@pytest.mark.parametrize("rotary", [False, True], ids=["no-rope", "rope"])
def test_append_stats_equal_recomputation(device, kv_dtype, rotary, rng):
    """After several appends of awkward sizes (a logical page continued, pages reset, one token at
    a time), every logical page's min/max equals a recomputation over its keys, and the stats of
    pages no token reached keep their old values."""
    dtype, head_dim, roles, lengths = torch.bfloat16, 64, "rsr", [0, 0]
    chunks = [20, 1, 30, 13, 64, 3]
    total = sum(chunks)
    pools = LServePools(roles, [total, total], head_dim, dtype, 64, 64, rng, kv_dtype=kv_dtype).to(device)
    untouched_before = pools.k_min.clone()
    keys = randn((2, total, 3, head_dim), dtype, rng)
    values = randn((2, total, 3, head_dim), dtype, rng)
    extra = {}
    if rotary:
        cos, sin = rotary_tables(total, head_dim, torch.float32, rng)
        extra = dict(rotary_cos=cos.to(device), rotary_sin=sin.to(device), rotary_interleaved=False)
        positions = torch.arange(total)[None, :].expand(2, -1)
        rotated = reference.rope(keys, cos, sin, positions, False).to(dtype)  # the key in k's dtype
    else:
        rotated = keys
    for chunk in chunks:
        pools.append(keys[:, lengths[0] : lengths[0] + chunk].to(device),
                     values[:, lengths[0] : lengths[0] + chunk].to(device), lengths, **extra)
        lengths = [length + chunk for length in lengths]
        touched = torch.zeros(pools.k_min.shape[:3], dtype=torch.bool)
        for physical, logical, slot, k_min, k_max in logical_page_stats(rotated, lengths, pools):
            touched[physical, logical, slot] = True
            got_min, got_max = pools.k_min[physical, logical, slot].cpu(), pools.k_max[physical, logical, slot].cpu()
            if rotary:  # the kernel's fp32 rotation may round the other way at a dtype boundary
                torch.testing.assert_close(got_min.double(), k_min, rtol=2 ** -7, atol=1e-6)
                torch.testing.assert_close(got_max.double(), k_max, rtol=2 ** -7, atol=1e-6)
            else:
                assert torch.equal(got_min.double(), k_min) and torch.equal(got_max.double(), k_max)
        assert torch.equal(pools.k_min.cpu()[~touched], untouched_before.cpu()[~touched])


@pytest.mark.parametrize("device", DEVICES)
def test_ring_keeps_sink_and_newest_pages(device, rng):
    """A long append in uneven chunks leaves each ring slot with exactly one page: the sink pages
    and the local/64 + 1 newest pages, each token at its slot; the pools equal the reference's."""
    dtype, head_dim, sink, local = torch.float16, 64, 128, 128
    total = 1000
    keys = randn((1, total, 2, head_dim), dtype, rng)
    values = randn((1, total, 2, head_dim), dtype, rng)
    pools = LServePools("sr", [total], head_dim, dtype, sink, local, rng).to(device)
    ref_k_ring, ref_v_ring = pools.k_ring.cpu().double(), pools.v_ring.cpu().double()
    length = 0
    for chunk in (300, 1, 250, 64, 385):
        k, v = keys[:, length : length + chunk], values[:, length : length + chunk]
        _, _, ref_k_ring, ref_v_ring = reference.paged_kv_append(
            pools.k.cpu(), pools.v.cpu(), k, v, int32([length]), block_table=pools.block_table.cpu(),
            kv_head_slot=pools.kv_head_slot.cpu(), k_ring=ref_k_ring, v_ring=ref_v_ring,
            ring_table=pools.ring_table.cpu(), sink=sink, local=local)
        pools.append(k.to(device), v.to(device), [length])
        length += chunk
        assert torch.equal(pools.k_ring.cpu().double(), ref_k_ring)
        assert torch.equal(pools.v_ring.cpu().double(), ref_v_ring)
    sink_pages, local_pages = sink // LSERVE_PAGE, local // LSERVE_PAGE + 1
    newest = (total - 1) // LSERVE_PAGE
    kept = list(range(sink_pages)) + list(range(newest - local_pages + 1, newest + 1))
    assert len(kept) == pools.ring_pages
    for page in kept:
        slot = page if page < sink_pages else sink_pages + (page - sink_pages) % local_pages
        ring_page = int(pools.ring_table[0, slot])
        tokens = range(page * LSERVE_PAGE, min(total, (page + 1) * LSERVE_PAGE))
        assert torch.equal(pools.k_ring[ring_page, : len(tokens), 0].cpu(), keys[0, tokens.start : tokens.stop, 0])


@pytest.mark.parametrize("device", DEVICES)
def test_int8_append_stores_quantisation(device, rng):
    """An int8 pool holds round-half-away(x / scale) clamped to [-127, 127] (clamping exercised by a
    scale below absmax / 127); the stats hold the unquantised keys."""
    dtype, head_dim = torch.bfloat16, 128
    k_cache, v_cache, table = paged_cache(2, 3, 64, 2, head_dim, torch.int8, rng)
    k_min = torch.zeros((k_cache.shape[0], 4, 2, head_dim))
    k_max = torch.zeros_like(k_min)
    k = randn((2, 70, 2, head_dim), dtype, rng) * 3
    v = randn((2, 70, 2, head_dim), dtype, rng)
    seqlens = int32([10, 64])
    k_scale, v_scale = 5.0 / 127, 4.0 / 127
    ref_k, ref_v, _, _ = reference.paged_kv_append(k_cache, v_cache, k, v, seqlens, block_table=table,
                                                   k_scale=k_scale, v_scale=v_scale)
    k_cache, v_cache, table, k_min, k_max = to(device, k_cache, v_cache, table, k_min, k_max)
    append(k_cache, v_cache, k.to(device), v.to(device), seqlens.to(device), table, None, k_min, k_max,
           k_scale=k_scale, v_scale=v_scale)
    assert (ref_k.abs() == 127).any(), "the test must clamp some elements"
    for got, ref, x, scale in ((k_cache, ref_k, k, k_scale), (v_cache, ref_v, v, v_scale)):
        diff = (got.cpu().double() - ref).abs()
        assert diff.max() <= 1
        # Only a value within float rounding of a half-integer may round the other way.
        scaled = (x.double() / scale).abs()
        near_half = ((scaled - scaled.floor()) - 0.5).abs() < 1e-4
        assert (diff > 0).sum() <= near_half.sum()
    # Logical page 1 of sequence 0 (tokens 16..31, written from its first token): the unquantised keys.
    physical = int(table[0, 0])
    for stats, reduce in ((k_min, torch.amin), (k_max, torch.amax)):
        expected = reduce(k[0, 6:22].double(), 0)
        assert torch.equal(stats[physical, 1].cpu().double(), expected)


# ---------------------------------------------------------------------------------------------
# Bad input

SETUP = """
import torch, tkpy
bf = torch.bfloat16
q = torch.randn(2, 1, 4, 64, dtype=bf)
kc = torch.randn(6, 16, 2, 64, dtype=bf)
vc = torch.randn(6, 16, 2, 64, dtype=bf)
table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
lens = torch.tensor([20, 40], dtype=torch.int32)
k = torch.randn(2, 3, 2, 64, dtype=bf)
v = torch.randn(2, 3, 2, 64, dtype=bf)
def dec(q=q, kc=kc, vc=vc, table=table, lens=lens, batch_idx=None, slot=None, kr=None, vr=None, rt=None, sink=0,
        local=0, pi=None, pc=None, hb=None, ks=1.0, vs=1.0, wl=-1, wr=-1, cap=0.0, splits=0):
    return torch.ops.tkpy.decode_attention(q, kc, vc, lens, block_table=table, cache_batch_idx=batch_idx,
                                           kv_head_slot=slot, k_ring=kr, v_ring=vr, ring_table=rt, sink=sink,
                                           local=local, page_indices=pi, page_counts=pc, head_bits=hb, k_scale=ks,
                                           v_scale=vs, softmax_scale=0.125, window_left=wl, window_right=wr,
                                           softcap=cap, num_splits=splits)
def app(kc=kc, vc=vc, k=k, v=v, table=table, lens=lens, batch_idx=None, kmin=None, kmax=None, cos=None, sin=None,
        ks=1.0, vs=1.0, slot=None, kr=None, vr=None, rt=None, sink=0, local=0):
    torch.ops.tkpy.kv_append_(kc, vc, k, v, lens, block_table=table, cache_batch_idx=batch_idx, k_min=kmin,
                              k_max=kmax, rotary_cos=cos, rotary_sin=sin, k_scale=ks, v_scale=vs, kv_head_slot=slot,
                              k_ring=kr, v_ring=vr, ring_table=rt, sink=sink, local=local)
ls_q = torch.randn(1, 1, 4, 64, dtype=bf)
ls_kc = torch.randn(4, 64, 1, 64, dtype=bf)
ls_vc = torch.randn(4, 64, 1, 64, dtype=bf)
ls_table = torch.tensor([[0, 1]], dtype=torch.int32)
ls_lens = torch.tensor([100], dtype=torch.int32)
ls_slot = torch.tensor([0, -1], dtype=torch.int32)
ls_ring = torch.randn(3, 64, 1, 64, dtype=bf)
ls_v_ring = torch.randn(3, 64, 1, 64, dtype=bf)
ls_rt = torch.tensor([[0, 1, 2]], dtype=torch.int32)
def lserve(q=ls_q, lens=ls_lens, slot=ls_slot, rt=ls_rt, sink=64, local=64, pi=None, pc=None, hb=None, kr=ls_ring,
           vr=ls_v_ring):
    return dec(q=q, kc=ls_kc, vc=ls_vc, table=ls_table, lens=lens, slot=slot, kr=kr, vr=vr, rt=rt, sink=sink,
               local=local, pi=pi, pc=pc, hb=hb)
sel = torch.tensor([[[0], [0]]], dtype=torch.int32)
cnt = torch.tensor([[1, 0]], dtype=torch.int32)
"""

BAD_CALLS = {
    # decode
    "dec(table=torch.tensor([[0, 9, 2], [3, 4, 5]], dtype=torch.int32))": r"block_table\[0, 1\] = 9 is outside",
    "dec(table=torch.tensor([[0, -1, 2], [3, 4, 5]], dtype=torch.int32))": r"block_table\[0, 1\] = -1 is outside",
    "dec(lens=torch.tensor([20, 49], dtype=torch.int32))": r"seqlens\[1\] = 49 is outside \[0, 48\]",
    "dec(lens=torch.tensor([-1, 4], dtype=torch.int32))": r"seqlens\[0\] = -1",
    "dec(lens=torch.tensor([20, 40]))": r"seqlens to be int32, got Long",
    "dec(kc=kc.half(), vc=vc.half())": r"k_cache to have q's dtype BFloat16 or int8, got Half",
    "dec(vc=vc.half())": r"v_cache to have q's dtype",
    "dec(q=q.float())": r"q to be bfloat16 or float16, got Float",
    "dec(q=q[0])": r"q to be 4-D",
    "dec(q=torch.randn(2, 1, 4, 96, dtype=bf))": r"head_dim 64, 128 or 256, got 96",
    "dec(q=torch.randn(2, 1, 3, 64, dtype=bf))": r"multiple of the kv heads",
    "dec(q=torch.randn(1, 1, 66, 64, dtype=bf), kc=kc[:, :, :1], vc=vc[:, :, :1], table=table[:1], lens=lens[:1])":
        r"at most 32 query heads per kv head",
    "dec(table=table[:1])": r"block_table int32 \[batch=2",
    "dec(table=table.long())": r"block_table int32",
    "dec(vc=vc[:, :, :1])": r"k_cache and v_cache of one shape",
    "dec(kc=kc[:, :8], vc=vc[:, :8])": r"multiple of 16",
    "dec(kc=kc[..., :32], vc=vc[..., :32])": r"k_cache with head_dim 64",
    "dec(kc=kc.transpose(2, 3), vc=vc.transpose(2, 3))": r"contiguous last dim|head_dim",
    "dec(batch_idx=torch.tensor([0, 1], dtype=torch.int32))": r"cache_batch_idx .*with block_table pass None",
    "dec(kc=kc[:1], vc=vc[:1], table=None, lens=torch.tensor([5, 6], dtype=torch.int32))":
        r"at least batch=2 rows",
    "dec(kc=kc[:2, :, :, :].reshape(2, 16, 2, 64), vc=vc[:2], table=None, lens=torch.tensor([5, 6], dtype=torch.int32), "
    "batch_idx=torch.tensor([0, 5], dtype=torch.int32))":
        r"cache_batch_idx\[1\] = 5 is outside",
    "dec(splits=65)": r"num_splits in \[0, 64\]",
    "dec(splits=-1)": r"num_splits in \[0, 64\]",
    "dec(cap=-1.0)": r"softcap finite and >= 0",
    "dec(wl=-2)": r"window sizes must be >= -1",
    "dec(ks=0.5)": r"k_scale/v_scale dequantise an int8 cache",
    "dec(kc=kc.to(torch.int8), vc=vc.to(torch.int8), ks=0.0)": r"int8 cache needs k_scale, v_scale finite and > 0",
    "dec(kr=kc)": r"pass kv_head_slot",
    "dec(pi=sel)": r"pass kv_head_slot too",
    # LServe decode
    "lserve(q=torch.randn(1, 2, 4, 64, dtype=bf))": r"one query row per sequence, got seqlen_q = 2",
    "dec(slot=torch.tensor([0, -1], dtype=torch.int32), kr=kc, vr=vc, rt=table, sink=64, local=64)":
        r"page_size 64",
    "lserve(sink=32)": r"multiples of 64",
    "lserve(local=-64)": r"multiples of 64",
    "lserve(rt=torch.tensor([[0, 1]], dtype=torch.int32))": r"ring_table of shape",
    "lserve(rt=torch.tensor([[0, 1, 7]], dtype=torch.int32))": r"ring_table\[0, 2\] = 7 is outside",
    "lserve(slot=torch.tensor([0, -2], dtype=torch.int32))": r"kv_head_slot\[1\] = -2 names streaming head 1",
    "lserve(slot=torch.tensor([1, -1], dtype=torch.int32))": r"kv_head_slot\[0\] = 1 names a retrieval head",
    "lserve(kr=ls_ring[:, :32], vr=ls_v_ring[:, :32])": r"k_ring of shape",
    "lserve(kr=ls_ring.half(), vr=ls_v_ring.half())": r"k_ring to have k_cache's dtype",
    "lserve(pi=sel)": r"page_indices, page_counts and head_bits together",
    "lserve(pi=torch.tensor([[[5], [0]]], dtype=torch.int32), pc=cnt, hb=sel)": r"page_indices\[0, 0, 0\] = 5",
    "lserve(pi=torch.tensor([[[1, 0], [0, 0]]], dtype=torch.int32), pc=torch.tensor([[2, 0]], dtype=torch.int32), "
    "hb=torch.zeros(1, 2, 2, dtype=torch.int32))": r"ascending",
    "lserve(pi=sel, pc=torch.tensor([[2, 0]], dtype=torch.int32), hb=sel)": r"page_counts\[0, 0\] = 2",
    "lserve(pi=sel, pc=cnt, hb=sel[:, :1])": r"head_bits of shape",
    # append
    "app(lens=torch.tensor([20, 46], dtype=torch.int32))": r"seqlens\[1\] = 46 plus 3 new tokens must fit in \[0, 48\]",
    "app(table=torch.tensor([[0, 1, 2], [3, 4, 6]], dtype=torch.int32))": r"block_table\[1, 2\] = 6 is outside",
    "app(k=k.half())": r"k and v of one dtype",
    "app(k=k.half(), v=v.half())": r"k_cache to have k's dtype Half or int8",
    "app(k=k[:, :, :1], v=v[:, :, :1])": r"k/v with 2 heads",
    "app(k=k[0], v=v[0])": r"4-D",
    "app(kmin=torch.zeros(6, 1, 2, 64))": r"both k_min and k_max",
    "app(kmin=torch.zeros(6, 2, 2, 64), kmax=torch.zeros(6, 2, 2, 64))": r"k_min float32 \[num_pages, page_size/16",
    "app(kmin=torch.zeros(6, 1, 2, 64, dtype=bf), kmax=torch.zeros(6, 1, 2, 64, dtype=bf))": r"k_min float32",
    "app(cos=torch.ones(64, 40), sin=torch.ones(64, 40))": r"rotary_dim <= head_dim 64",
    "app(cos=torch.ones(42, 8), sin=torch.ones(42, 8))": r"positions up to 42 but rotary_cos/sin have 42 rows",
    "app(cos=torch.ones(64, 8), sin=torch.ones(64, 4))": r"rotary_cos and rotary_sin of one shape",
    "app(cos=torch.ones(64, 8))": r"both rotary_cos and rotary_sin",
    "app(kc=kc.to(torch.int8), vc=vc.to(torch.int8), ks=-1.0)": r"int8 cache needs k_scale, v_scale finite",
    "app(kc=kc[:, :, :1].expand(6, 16, 2, 64), vc=vc[:, :, :1].expand(6, 16, 2, 64))": r"share memory",
}


@pytest.mark.parametrize("call", BAD_CALLS)
def test_bad_input_clear_error(call):
    env = {}
    exec(SETUP, env)
    with pytest.raises(ValueError, match=BAD_CALLS[call]):  # the raw ops: ValueError for a refused argument
        exec(call, env)


def test_bad_input_never_crashes():
    assert_bad_calls_survive(SETUP, list(BAD_CALLS))


def test_fake_shapes():
    """The Meta kernels (torch.compile's fakes) give the outputs' shapes and dtypes."""
    with torch.device("meta"):
        q = torch.empty(3, 2, 8, 64, dtype=torch.bfloat16)
        cache = torch.empty(10, 16, 2, 64, dtype=torch.bfloat16)
        table = torch.empty(3, 4, dtype=torch.int32)
        seqlens = torch.empty(3, dtype=torch.int32)
        out, lse = torch.ops.tkpy.decode_attention(q, cache, cache.clone(), seqlens, block_table=table, window_right=0)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert lse.shape == (3, 8, 2) and lse.dtype == torch.float32
        k = torch.empty(3, 5, 2, 64, dtype=torch.bfloat16)
        torch.ops.tkpy.kv_append_(cache, cache.clone(), k, k, seqlens, block_table=table)


def test_decode_refuses_backward():
    q = torch.randn(1, 1, 2, 64, dtype=torch.bfloat16, requires_grad=True)
    cache = torch.randn(1, 16, 2, 64, dtype=torch.bfloat16)
    out, _ = decode(q, cache, cache.clone(), int32([10]), block_table=int32([[0]]))
    with pytest.raises(NotImplementedError, match="inference-only: it has no backward"):
        out.float().sum().backward()


# ---------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.gpu
@pytest.mark.sanitizer
def test_gpu_small_decode_and_append(rng):
    """A small LServe append + decode with splits (run under compute-sanitizer by scripts/gpu_run.py check)."""
    dtype, lengths = torch.bfloat16, [70, 130]
    keys = randn((2, 130, 2, 64), dtype, rng)
    values = randn((2, 130, 2, 64), dtype, rng)
    q = randn((2, 1, 4, 64), dtype, rng)
    pools = LServePools("rs", lengths, 64, dtype, 64, 64, rng).to("cuda")
    pools.prefill(keys.cuda(), values.cuda(), lengths)
    seqlens = int32(lengths, "cuda")
    expected = attention_over_tokens(q, keys, values, lserve_visible("rs", 2, lengths, 64, 64), 0.125)
    out, lse = decode(q.cuda(), pools.k, pools.v, seqlens, block_table=pools.block_table, **pools.heads(),
                      num_splits=2)
    check_attention(out, lse, *expected, dtype)


@pytest.mark.gpu
def test_gpu_decode_deterministic(rng):
    q, k_cache, v_cache, seqlens, kwargs = dense_case_inputs("page64-gqa4", torch.bfloat16, rng)
    q, k_cache, v_cache, seqlens, table = to("cuda", q, k_cache, v_cache, seqlens, kwargs["block_table"])
    first = decode(q, k_cache, v_cache, seqlens, block_table=table, num_splits=3)
    again = decode(q, k_cache, v_cache, seqlens, block_table=table, num_splits=3)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_padding_rows_may_share_a_scratch_page():
    """The runtime's CUDA-graph warm-up appends one token for every padding row into scratch page 0;
    an append whose rows share a page is therefore accepted (the page's content is unspecified)."""
    cache = torch.randn(4, 16, 2, 64).bfloat16()
    values = torch.randn(4, 16, 2, 64).bfloat16()
    before = cache.clone()
    new = torch.randn(3, 1, 2, 64).bfloat16()
    torch.ops.tkpy.kv_append_(cache, values, new, new.clone(), int32([0, 0, 0]), block_table=int32([[0], [0], [0]]))
    # Rows are written in parallel: token 0 of page 0 holds some mix of the rows; nothing else moves.
    assert torch.equal(cache[1:], before[1:]) and torch.equal(cache[0, 1:], before[0, 1:])

"""LServe decode (tkpy.lserve) against python/tkpy/reference.py (float64).

Page stats kept by appends equal a recomputation; the page score upper-bounds every q·k of its
page; the selection equals the reference's (size, newest page, per query head, per-kv-head union
lists and head bits); a context within the budget gives exactly the dense result; the reuse
interval and the reset; streaming heads equal dense attention over sink ∪ local through their
ring; INT8 KV within derived bounds; GQA; empty pools; bad input; torch.compile of a decode step.

Every expected value comes from the tokens of each sequence kept as plain lists by the test.
"""

import math
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tkpy import flash_attn_with_kvcache, reference
from tkpy.lserve import LServeCache, LServeConfig, PageSelector, page_scores, select_pages, sparse_decode

from helpers import REL_TOL, assert_bad_call_raises, assert_bad_calls_survive, poison_cuda_allocator, randn, rel_err
from test_attention import DEVICES

PAGE, LOGICAL = 64, 16
SMALL = LServeConfig(sink=64, local=128, token_budget=256, reuse_interval=3)  # ring of 1 + 2 + 1 pages


def ring_slot(page, config):
    """DESIGN.md §5: sink pages stay put, later pages rotate through local/64 + 1 slots."""
    sink_pages, local_pages = config.sink // PAGE, config.local // PAGE + 1
    return page if page < sink_pages else sink_pages + (page - sink_pages) % local_pages


class Layer:
    """One layer's LServeCache with its sequences, plus every token of each sequence as a list.

    Pages of the sequences are scattered over a shuffled pool; ring slots are shuffled too.
    """

    def __init__(self, lens, streaming, group, head_dim, config, gen, device, dtype=torch.bfloat16, room=130,
                 data=None):
        self.batch, self.config, self.device, self.dtype = len(lens), config, device, dtype
        self.streaming, self.group, self.heads_kv = list(streaming), group, len(streaming)
        self.gen = gen
        max_pages = -(-(max(lens) + room) // PAGE)
        num_pages = self.batch * max_pages + 2
        self.block_table = torch.randperm(num_pages, generator=gen)[: self.batch * max_pages].view(
            self.batch, max_pages).to(torch.int32).to(device)
        self.cache = LServeCache(num_pages, self.batch + 1, streaming, head_dim, dtype, config, device)
        slots = torch.randperm(self.batch + 1, generator=gen)[: self.batch].to(torch.int32).to(device)
        self.ring_table = self.cache.ring_table(slots)
        self.data = data or (lambda shape: randn(shape, dtype, gen))
        self.keys = [self.data((0, self.heads_kv, head_dim)) for _ in lens]
        self.values = [self.data((0, self.heads_kv, head_dim)) for _ in lens]
        self.lens = torch.zeros(self.batch, dtype=torch.int32, device=device)
        for b, n in enumerate(lens):  # prefill, one sequence at a time (each its own length)
            if n:
                self.append([b], self.data((1, n, self.heads_kv, head_dim)), self.data((1, n, self.heads_kv, head_dim)))

    @property
    def heads_q(self):
        return self.heads_kv * self.group

    def append(self, rows, k, v, rotary=None, interleaved=False, rotated_k=None):
        """Append k, v ``[len(rows), S_new, Hkv, D]`` to sequences ``rows``; ``rotated_k`` is what the
        token lists record (the keys after RoPE), default k."""
        rows_t = torch.tensor(rows, device=self.device)
        cos, sin = (None, None) if rotary is None else (t.to(self.device) for t in rotary)
        self.cache.append(k.to(self.device), v.to(self.device), self.block_table[rows_t], self.ring_table[rows_t],
                          self.lens[rows_t], cos, sin, interleaved)
        recorded = k if rotated_k is None else rotated_k
        for i, b in enumerate(rows):
            self.keys[b] = torch.cat([self.keys[b], recorded[i].cpu().to(self.keys[b].dtype)])
            self.values[b] = torch.cat([self.values[b], v[i].cpu()])
        self.lens[rows_t] += k.shape[1]

    def step(self):
        """A decode step's append of one token to every sequence."""
        shape = (self.batch, 1, self.heads_kv, self.cache.head_dim)
        self.append(list(range(self.batch)), self.data(shape), self.data(shape))

    def query(self):
        return randn((self.batch, 1, self.heads_q, self.cache.head_dim), self.dtype, self.gen, self.device)

    def reference_selection(self, q, budget):
        """bool ``[Hq, n_pages]`` per sequence from the reference stats and scores of the token lists."""
        result = []
        for b in range(self.batch):
            k_min, k_max = reference.page_stats(self.keys[b])
            scores = reference.page_scores(q[b, 0].cpu(), k_min, k_max)
            result.append(reference.select_pages(scores, self.keys[b].shape[0], budget))
        return result

    def visible_tokens(self, b, h, pages=None):
        """Tokens query head h of sequence b attends: sink ∪ local for a streaming head, the tokens
        of ``pages`` (default all) for a retrieval head."""
        length = self.keys[b].shape[0]
        if self.streaming[h // self.group]:
            return [t for t in range(length) if t < self.config.sink or t >= length - self.config.local]
        return [t for t in range(length) if pages is None or t // PAGE in pages]

    def expected(self, q, pages_of=None, keys=None, values=None, scale=None):
        """float64 out ``[B, 1, Hq, D]``, lse ``[B, Hq, 1]``; ``pages_of(b, h)`` lists a retrieval
        head's pages (None: all)."""
        keys = self.keys if keys is None else keys
        values = self.values if values is None else values
        head_dim = q.shape[-1]
        scale = 1 / math.sqrt(head_dim) if scale is None else scale
        out = torch.zeros(self.batch, 1, self.heads_q, head_dim, dtype=torch.float64)
        lse = torch.full((self.batch, self.heads_q, 1), float("-inf"), dtype=torch.float64)
        for b in range(self.batch):
            for h in range(self.heads_q):
                tokens = self.visible_tokens(b, h, None if pages_of is None else pages_of(b, h))
                if not tokens:
                    continue
                kv = h // self.group
                k = keys[b][tokens, kv].double()
                scores = k @ q[b, 0, h].cpu().double() * scale
                lse[b, h, 0] = torch.logsumexp(scores, 0)
                out[b, 0, h] = torch.softmax(scores, 0) @ values[b][tokens, kv].double()
        return out, lse


def check_decode(out, lse, expected, dtype=torch.bfloat16):
    ref_out, ref_lse = expected
    assert out.dtype == dtype and out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    err = rel_err(out.cpu(), ref_out)
    assert err < REL_TOL[dtype], f"relative error {err:.3g} >= {REL_TOL[dtype]:.1g}"
    torch.testing.assert_close(lse.cpu().double(), ref_lse, rtol=1e-3, atol=1e-3)


def stored_stats(layer, b, kv_head):
    """The cache's (k_min, k_max) of sequence b's logical pages for a retrieval kv head."""
    slot = int(layer.cache.kv_head_slot[kv_head])
    n_logical = -(-layer.keys[b].shape[0] // LOGICAL)
    pages = [int(layer.block_table[b, l // 4]) for l in range(n_logical)]
    k_min = torch.stack([layer.cache.stats.k_min[p, l % 4, slot] for l, p in enumerate(pages)])
    k_max = torch.stack([layer.cache.stats.k_max[p, l % 4, slot] for l, p in enumerate(pages)])
    return k_min.cpu().double(), k_max.cpu().double()


# ---------------------------------------------------------------------------------------------
# Config


def test_config_defaults_are_design_md():
    c = LServeConfig()
    assert (c.static_sparsity, c.sink, c.local, c.prefill_sink, c.prefill_local) == (0.5, 128, 256, 128, 8192)
    assert (c.token_budget, c.reuse_interval, c.kv_dtype, c.k_scale, c.v_scale) == (4096, 4, None, None, None)
    assert c.ring_pages == 128 // 64 + 256 // 64 + 1
    with pytest.raises(Exception):
        c.sink = 64  # frozen


@pytest.mark.parametrize("kwargs,message", [
    ({"sink": 100}, "sink must be a multiple of 64"),
    ({"sink": -64}, "sink must be a multiple of 64"),
    ({"local": 0}, "local must be a multiple of 64"),
    ({"local": 200}, "local must be a multiple of 64"),
    ({"token_budget": 0}, "token_budget must be >= 1"),
    ({"reuse_interval": 0}, "reuse_interval must be >= 1"),
    ({"static_sparsity": 1.5}, r"static_sparsity must be in \[0, 1\]"),
    ({"prefill_local": 0}, "prefill_local >= 1"),
    ({"kv_dtype": torch.float32}, "kv_dtype must be None"),
    ({"kv_dtype": torch.int8}, "INT8 KV needs a static k_scale"),
    ({"kv_dtype": torch.int8, "k_scale": 0.1, "v_scale": -1.0}, "v_scale > 0"),
    ({"kv_dtype": torch.int8, "k_scale": float("nan"), "v_scale": 1.0}, "k_scale > 0"),
    ({"kv_dtype": torch.int8, "k_scale": 1e39, "v_scale": 1.0}, "k_scale > 0"),  # inf as float32
    ({"kv_dtype": torch.int8, "k_scale": 0.1, "v_scale": 1e-46}, "v_scale > 0"),  # 0 as float32
    ({"local": 2**40}, "local must be at most"),
    ({"token_budget": 2**70}, "token_budget must be at most"),
    ({"k_scale": 0.1}, "for kv_dtype=torch.int8 only"),
    ({"sink": 64.0}, "sink must be an int"),
])
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        LServeConfig(**kwargs)


# ---------------------------------------------------------------------------------------------
# Page stats and scores


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rotary", [None, "gptj", "neox"])
@pytest.mark.parametrize("kv_dtype", [None, torch.int8])
def test_incremental_stats_equal_a_recomputation(device, rotary, kv_dtype, rng):
    """Stats after a prefill and appends of 1, 1, 1, 30, 17 and 70 tokens (crossing logical and
    physical pages) equal the reference's min/max over each logical page's (rotated,
    pre-quantisation) keys."""
    config = LServeConfig(sink=64, local=128, kv_dtype=kv_dtype, k_scale=0.04 if kv_dtype else None,
                          v_scale=0.04 if kv_dtype else None)
    layer = Layer([37, 5, 64], [False, True, False], 2, 64, config, rng, device, room=130)
    angles = torch.rand(512, 32, generator=rng, dtype=torch.float64) * 6.3
    table = (angles.cos().float(), angles.sin().float())
    for count in (1, 1, 1, 30, 17, 70):
        k = randn((3, count, 3, 64), torch.bfloat16, rng)
        v = randn((3, count, 3, 64), torch.bfloat16, rng)
        if rotary is None:
            layer.append([0, 1, 2], k, v)
        else:
            positions = layer.lens.cpu().long()[:, None] + torch.arange(count)
            rotated = torch.stack([reference.rope(k[b], *table, positions[b], rotary == "gptj") for b in range(3)])
            layer.append([0, 1, 2], k, v, table, rotary == "gptj", rotated_k=rotated)
        for b in range(3):
            for h in (0, 2):
                expected = reference.page_stats(layer.keys[b][:, h : h + 1])
                got = stored_stats(layer, b, h)
                # The op rotates in fp32 and rounds to bf16, the reference rotates in float64 and
                # rounds: at a bf16 rounding boundary the two may differ by one bf16 ulp (2^-7).
                rtol, atol = (2 ** -7, 1e-6) if rotary else (0.0, 0.0)
                torch.testing.assert_close(got[0], expected[0][:, 0], rtol=rtol, atol=atol)
                torch.testing.assert_close(got[1], expected[1][:, 0], rtol=rtol, atol=atol)


@settings(max_examples=25, deadline=None)
@given(length=st.integers(1, 400), group=st.sampled_from([1, 2, 4]), spread=st.floats(0.01, 30.0),
       seed=st.integers(0, 2**31 - 1))
def test_score_upper_bounds_every_key_of_its_page(length, group, spread, seed):
    gen = torch.Generator().manual_seed(seed)
    layer = Layer([length], [False, False], group, 64, SMALL, gen, "cpu", room=1,
                  data=lambda shape: (torch.randn(shape, generator=gen) * spread).to(torch.bfloat16))
    q = randn((1, 1, layer.heads_q, 64), torch.bfloat16, gen) * spread
    scores = page_scores(q, layer.cache.stats, layer.block_table, layer.lens)  # [1, Hq, max_pages]
    n_pages = -(-length // PAGE)
    assert torch.isneginf(scores[0, :, n_pages:]).all()
    k_min, k_max = reference.page_stats(layer.keys[0])
    expected = reference.page_scores(q[0, 0], k_min, k_max)
    torch.testing.assert_close(scores[0, :, :n_pages].double(), expected, rtol=1e-5, atol=1e-5 * spread**2)
    for h in range(layer.heads_q):
        dots = layer.keys[0][:, h // group].double() @ q[0, 0, h].double()
        for p in range(n_pages):
            best = dots[p * PAGE : (p + 1) * PAGE].max().item()
            bound = scores[0, h, p].item()
            assert bound >= best - 1e-5 * (1 + abs(best)), (h, p, bound, best)
            assert expected[h, p].item() >= best - 1e-9 * (1 + abs(best))


# ---------------------------------------------------------------------------------------------
# Selection


def check_selection_lists(selection, layer):
    """page_indices / page_counts / head_bits restate `selected` (union per kv head, ascending, bits)."""
    selected = selection.selected.cpu()
    for b in range(layer.batch):
        for g in range(layer.heads_kv):
            heads = range(g * layer.group, (g + 1) * layer.group)
            union = sorted({p for h in heads for p in selected[b, h].nonzero().flatten().tolist()})
            count = int(selection.page_counts[b, g])
            assert selection.page_indices[b, g, :count].tolist() == union
            for i, p in enumerate(union):
                bits = int(selection.head_bits[b, g, i]) & 0xFFFFFFFF
                assert bits == sum(1 << j for j, h in enumerate(heads) if selected[b, h, p])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("budget", [256, 200, 100, 64 * 7])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_selection_matches_reference(device, budget, group, rng):
    lens = [900, 256, 257, 64 * 7 + 1, 30]
    layer = Layer(lens, [False, True], group, 64, SMALL, rng, device, room=1)
    q = layer.query()
    selection = select_pages(q, layer.cache.stats, layer.block_table, layer.lens, budget)
    expected = layer.reference_selection(q, budget)
    for b, length in enumerate(lens):
        n_pages = -(-length // PAGE)
        got = selection.selected[b].cpu()
        assert not got[:, n_pages:].any()
        for h in range(layer.heads_q):
            if layer.streaming[h // group]:
                assert not got[h].any(), "streaming heads select nothing"
                continue
            assert got[h, :n_pages].tolist() == expected[b][h].tolist(), (b, h)
            size = n_pages if length <= budget else min(max(3, budget // PAGE), n_pages)
            assert int(got[h].sum()) == size and got[h, n_pages - 1], "selection size and newest page"
    check_selection_lists(selection, layer)


def test_selection_with_no_retrieval_head_is_empty(rng):
    layer = Layer([300, 70], [True, True], 2, 64, SMALL, rng, "cpu", room=1)
    selection = select_pages(layer.query(), layer.cache.stats, layer.block_table, layer.lens, 128)
    assert not selection.selected.any() and not selection.page_counts.any()


# ---------------------------------------------------------------------------------------------
# Sparse decode


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_context_within_budget_is_exactly_dense(device, group, head_dim, rng):
    """Every length within the budget: the selection is every page and sparse_decode gives the
    dense paged decode's bits (flash_attn_with_kvcache over the same pool)."""
    config = LServeConfig(sink=64, local=128, token_budget=300)
    layer = Layer([300, 1, 129, 64], [False, False], group, head_dim, config, rng, device, room=1)
    q = layer.query()
    selection = select_pages(q, layer.cache.stats, layer.block_table, layer.lens, config.token_budget)
    pages = (layer.lens.long()[:, None] + PAGE - 1) // PAGE > torch.arange(layer.block_table.shape[1], device=device)
    assert torch.equal(selection.selected, pages[:, None, :].expand_as(selection.selected))
    if device == "cuda":
        poison_cuda_allocator()
    sparse, sparse_lse = sparse_decode(q, layer.cache, layer.block_table, layer.ring_table, layer.lens, selection,
                                       num_splits=1, return_softmax_lse=True)
    dense, dense_lse = flash_attn_with_kvcache(q, layer.cache.k, layer.cache.v, cache_seqlens=layer.lens,
                                               block_table=layer.block_table, num_splits=1, return_softmax_lse=True)
    assert torch.equal(sparse, dense) and torch.equal(sparse_lse, dense_lse)
    check_decode(sparse, sparse_lse, layer.expected(q))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("streaming", [(False, True), (True, False, False, True), (False, False)])
def test_sparse_decode_matches_reference(device, group, streaming, rng):
    """Mixed heads over decode steps: retrieval heads over the reference's selection (equal to the
    one select_pages makes), streaming heads over sink ∪ local."""
    layer = Layer([700, 250, 1, 400], streaming, group, 64, SMALL, rng, device)
    for step in range(3):
        layer.step()
        q = layer.query()
        selection = select_pages(q, layer.cache.stats, layer.block_table, layer.lens, SMALL.token_budget)
        expected_pages = layer.reference_selection(q, SMALL.token_budget)
        for b in range(layer.batch):
            for h in range(layer.heads_q):
                if not streaming[h // group]:
                    n_pages = expected_pages[b].shape[1]
                    assert selection.selected[b, h, :n_pages].cpu().tolist() == expected_pages[b][h].tolist()
        if device == "cuda":
            poison_cuda_allocator()
        out, lse = sparse_decode(q, layer.cache, layer.block_table, layer.ring_table, layer.lens, selection,
                                 num_splits=(0, 1, 3)[step], return_softmax_lse=True)
        pages_of = lambda b, h: set(expected_pages[b][h].nonzero().flatten().tolist())  # noqa: E731
        check_decode(out, lse, layer.expected(q, pages_of))


@pytest.mark.parametrize("device", DEVICES)
def test_streaming_heads_equal_dense_attention_over_sink_and_local(device, rng):
    """Only streaming heads (an empty retrieval pool): the ring wraps many times over long
    contexts and decode steps that cross page boundaries."""
    layer = Layer([1000, 64 * 5 - 2, 190, 3], [True, True], 4, 128, SMALL, rng, device)
    assert layer.cache.k.shape[2] == 0 and layer.cache.k_ring.shape[0] == 5 * SMALL.ring_pages
    for step in range(4):
        layer.step()
        q = layer.query()
        if device == "cuda":
            poison_cuda_allocator()
        out, lse = sparse_decode(q, layer.cache, layer.block_table, layer.ring_table, layer.lens,
                                 return_softmax_lse=True, num_splits=step)
        check_decode(out, lse, layer.expected(q))
        # The same as the reference's dense attention over exactly those tokens.
        b = 0
        tokens = layer.visible_tokens(b, 0)
        assert len(tokens) == SMALL.sink + SMALL.local
        ref_out, _ = reference.attention(q[b : b + 1].cpu(), layer.keys[b][None, tokens], layer.values[b][None, tokens])
        assert rel_err(out[b : b + 1].cpu(), ref_out) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
def test_reuse_interval_and_reset(device, rng):
    """PageSelector recomputes at step % interval == 0 only (a reused selection ignores the new q,
    and decode with it stays right as the newest page moves on), and after reset()."""
    layer = Layer([640, 900], [False, True, False], 2, 64, SMALL, rng, device)
    selector = PageSelector.from_config(SMALL)
    assert (selector.token_budget, selector.reuse_interval) == (256, 3)
    first = None
    for step in range(7):
        layer.step()
        q = layer.query()
        fresh = select_pages(q, layer.cache.stats, layer.block_table, layer.lens, 256)
        selection = selector(step, q, layer.cache.stats, layer.block_table, layer.lens)
        if step % 3 == 0:
            assert all(torch.equal(a, b) for a, b in zip(selection, fresh)), f"step {step} recomputes"
            first = selection
        else:
            assert selection is first, f"step {step} reuses the selection of step {step - step % 3}"
        if step % 3 == 2:
            assert not torch.equal(selection.selected, fresh.selected), "a new q would select other pages"
        # Reused or not, the kernel reads the listed pages plus the current newest page.
        out = sparse_decode(q, layer.cache, layer.block_table, layer.ring_table, layer.lens, selection)
        newest = [(int(n) - 1) // PAGE for n in layer.lens]
        pages_of = lambda b, h: set(selection.selected[b, h].nonzero().flatten().tolist()) | {newest[b]}  # noqa: E731
        check_decode(out, torch.zeros(2, 6, 1), (layer.expected(q, pages_of)[0], torch.zeros(2, 6, 1, dtype=torch.float64)))
    layer.step()
    q = layer.query()
    selector.reset()  # a prefill
    assert selector.selection is None
    again = selector(7, q, layer.cache.stats, layer.block_table, layer.lens)
    assert again is not first and torch.equal(again.selected, select_pages(q, layer.cache.stats, layer.block_table, layer.lens, 256).selected)


# ---------------------------------------------------------------------------------------------
# INT8 KV


def stored_dequantized(layer, b, kv_head):
    """Keys and values of sequence b that the cache holds for one kv head, dequantised, as float64
    ``[L, D]`` (NaN for a streaming head's tokens the ring no longer keeps)."""
    cache, length = layer.cache, layer.keys[b].shape[0]
    slot = int(cache.kv_head_slot[kv_head])
    k = torch.full((length, cache.head_dim), float("nan"), dtype=torch.float64)
    v = k.clone()
    for t in range(length):
        if slot >= 0:
            page = int(layer.block_table[b, t // PAGE])
            k[t], v[t] = cache.k[page, t % PAGE, slot].cpu().double(), cache.v[page, t % PAGE, slot].cpu().double()
        elif t in layer.visible_tokens(b, kv_head * layer.group):
            page = int(layer.ring_table[b, ring_slot(t // PAGE, layer.config)])
            k[t], v[t] = (cache.k_ring[page, t % PAGE, -1 - slot].cpu().double(),
                          cache.v_ring[page, t % PAGE, -1 - slot].cpu().double())
    return k * cache.k_scale, v * cache.v_scale


def int8_layer(device, rng):
    """A layer whose static scales come from calibration data of the same distribution, so that
    |x| <= 127·scale holds for every token (no clamping)."""
    k_scale, v_scale = 4.0 / 127, 3.0 / 127
    config = LServeConfig(sink=64, local=128, token_budget=256, kv_dtype=torch.int8, k_scale=k_scale, v_scale=v_scale)
    clip = lambda shape, bound: randn(shape, torch.float32, rng).clamp(-bound, bound).to(torch.bfloat16)  # noqa: E731
    layer = Layer([500, 200, 70], [False, True, False, False], 2, 64, config, rng, device,
                  data=lambda shape: clip(shape, 3.0))
    layer.step()
    return layer


@pytest.mark.parametrize("device", DEVICES)
def test_int8_storage_error_is_at_most_half_a_step(device, rng):
    """Round to nearest: |x - scale·round(x/scale)| <= scale/2, plus the fp32 rounding of x/scale
    (|x/scale| <= 127, so at most 127·2^-23 steps; we allow scale·2^-16)."""
    layer = int8_layer(device, rng)
    assert layer.cache.k.dtype == torch.int8 and layer.cache.k_ring.dtype == torch.int8
    for b in range(layer.batch):
        for g in range(layer.heads_kv):
            k, v = stored_dequantized(layer, b, g)
            kept = ~torch.isnan(k[:, 0])
            assert kept.sum() == (layer.keys[b].shape[0] if not layer.streaming[g] else len(layer.visible_tokens(b, g * 2)))
            k_err = (k[kept] - layer.keys[b][kept, g].double()).abs().max().item()
            v_err = (v[kept] - layer.values[b][kept, g].double()).abs().max().item()
            assert k_err <= layer.cache.k_scale * (0.5 + 2**-16), (b, g, k_err)
            assert v_err <= layer.cache.v_scale * (0.5 + 2**-16), (b, g, v_err)


@pytest.mark.parametrize("device", DEVICES)
def test_int8_decode_error_bounds(device, rng):
    """Against attention over the dequantised stored K/V: bf16's REL_TOL. Against the unquantised
    data, per element: key errors of at most s_k/2 move every score by at most
    eps = scale·||q||_1·s_k/2, so each softmax weight moves by a factor within [e^-2eps, e^2eps] and
    |Σ(p'-p)v'| <= (e^2eps - 1)·max|v'|; value errors add at most s_v/2; bf16 output rounding adds
    2^-8·max|v'|."""
    layer = int8_layer(device, rng)
    q = layer.query()
    selection = select_pages(q, layer.cache.stats, layer.block_table, layer.lens, 256)
    out = sparse_decode(q, layer.cache, layer.block_table, layer.ring_table, layer.lens, selection).cpu().double()
    # Stats come from the pre-quantisation keys, so the selection is the reference's.
    expected_pages = layer.reference_selection(q, 256)
    pages_of = lambda b, h: set(expected_pages[b][h].nonzero().flatten().tolist())  # noqa: E731
    stored = [[stored_dequantized(layer, b, g) for g in range(layer.heads_kv)] for b in range(layer.batch)]
    keys = [torch.stack([stored[b][g][0] for g in range(layer.heads_kv)], dim=1) for b in range(layer.batch)]
    values = [torch.stack([stored[b][g][1] for g in range(layer.heads_kv)], dim=1) for b in range(layer.batch)]
    dequantized_ref, _ = layer.expected(q, pages_of, keys, values)
    assert rel_err(out, dequantized_ref) < REL_TOL[torch.bfloat16]

    exact_ref, _ = layer.expected(q, pages_of)
    scale = 1 / math.sqrt(64)
    for b in range(layer.batch):
        for h in range(layer.heads_q):
            eps = scale * q[b, 0, h].double().abs().sum().item() * layer.cache.k_scale / 2
            v_max = values[b][:, h // 2].nan_to_num(0).abs().max().item()
            bound = (math.exp(2 * eps) - 1) * v_max + layer.cache.v_scale / 2 + 2**-8 * v_max
            err = (out[b, 0, h] - exact_ref[b, 0, h]).abs().max().item()
            assert err <= bound, (b, h, err, bound)


# ---------------------------------------------------------------------------------------------
# Bad input


SETUP = textwrap.dedent(
    """
    import torch
    from tkpy.lserve import LServeCache, LServeConfig, select_pages, sparse_decode
    config = LServeConfig(sink=64, local=128, token_budget=128)
    cache = LServeCache(8, 2, [False, True], 64, torch.bfloat16, config)
    bt = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    rt = cache.ring_table(torch.tensor([1, 0], dtype=torch.int32))
    lens = torch.tensor([100, 150], dtype=torch.int32)
    k = torch.randn(2, 1, 2, 64).bfloat16()
    v = torch.randn(2, 1, 2, 64).bfloat16()
    q = torch.randn(2, 1, 4, 64).bfloat16()
    cache.append(torch.randn(2, 100, 2, 64).bfloat16(), torch.randn(2, 100, 2, 64).bfloat16(), bt, rt,
                 torch.zeros(2, dtype=torch.int32))
    sel = select_pages(q, cache.stats, bt, lens, 128)
    """
)

BAD_CALLS = [
    ("sparse_decode(q, cache, torch.tensor([[0, 1, 2], [3, 8, 5]], dtype=torch.int32), rt, lens)",
     r"block_table\[1, 1\] = 8 is outside the pool's 8 pages"),
    ("cache.append(k, v, torch.tensor([[0, 1, 9], [3, 4, 5]], dtype=torch.int32), rt, torch.tensor([150, 1], dtype=torch.int32))",
     r"block_table\[0, 2\] = 9 is outside the pool"),
    ("sparse_decode(q, cache, bt, rt, torch.tensor([100, 193], dtype=torch.int32))", r"cache_seqlens\[1\] = 193 is outside \[0, 192\]"),
    ("cache.append(k, v, bt, rt, torch.tensor([192, 0], dtype=torch.int32))", r"cache_seqlens\[0\] = 192 plus 1 new tokens must fit in \[0, 192\]"),
    ("sparse_decode(q, cache, bt, rt + 8, lens)", r"ring_table\[0, 0\] = \d+ is outside the ring pool's 8 pages"),
    ("sparse_decode(q, cache, bt, rt[:, :2], lens)", r"ring_table of shape \[batch, sink/64 \+ local/64 \+ 1\] = \[2, 4\], got \[2, 2\]"),
    ("sparse_decode(q.half(), cache, bt, rt, lens)", "q must have the cache's model dtype"),
    ("cache.append(k.half(), v.half(), bt, rt, lens)", "k must have the cache's model dtype"),
    ("sparse_decode(q.expand(2, 2, 4, 64), cache, bt, rt, lens)", "takes one query row per sequence, got seqlen_q = 2"),
    ("sparse_decode(q, cache, bt.long(), rt, lens)", "expected block_table int32"),
    ("sparse_decode(q, cache, bt, rt, lens.long())", "expected cache_seqlens to be int32"),
    ("sparse_decode(q, cache.k, bt, rt, lens)", "cache must be an LServeCache"),
    ("sparse_decode(q, cache, bt, rt, lens, selection=sel.selected)", "selection must be a PageSelection"),
    ("sparse_decode(q, cache, bt, rt, lens, sel._replace(page_counts=sel.page_counts[:1], page_indices=sel.page_indices[:1]))",
     r"expected page_indices of shape \[batch, heads_kv, max_selected\] = \[2, 2, \d+\], got \[1, 2, \d+\]"),
    ("select_pages(q, cache.stats, bt, lens, 0)", "token_budget must be an int >= 1"),
    ("select_pages(q[:, :, :3], cache.stats, bt, lens, 128)", "multiple of the 2 kv heads"),
    ("select_pages(q[..., :32], cache.stats, bt, lens, 128)", "head_dim=32"),
    ("select_pages(q.expand(2, 3, 4, 64), cache.stats, bt, lens, 128)", "q must be a Tensor"),
    ("select_pages(q, cache.k, bt, lens, 128)", "stats must be a PageStats"),
    ("select_pages(q, cache.stats, bt[:1], lens, 128)", r"block_table must be \[batch=2"),
    ("select_pages(q, cache.stats, bt, lens.long(), 128)", "cache_seqlens must be an int32"),
    ("LServeCache(8, 2, [False, True], 96, torch.bfloat16, config)", "head_dim must be one of"),
    ("LServeCache(8, 2, [False, True], 64, torch.float32, config)", "dtype must be torch.bfloat16"),
    ("LServeCache(0, 2, [False, True], 64, torch.bfloat16, config)", "num_pages must be an int >= 1"),
    ("LServeCache(8, 2, [0, 1], 64, torch.bfloat16, config)", "kv_head_streaming must be a non-empty list of bools"),
    ("LServeCache(8, 2, [], 64, torch.bfloat16, config)", "kv_head_streaming"),
    ("cache.ring_table(torch.tensor([2], dtype=torch.int32))", r"slots must be in \[0, 2\)"),
    ("LServeConfig(sink=96)", "sink must be a multiple of 64"),
]


@pytest.mark.parametrize("code,message", BAD_CALLS, ids=[c[:80] for c, _ in BAD_CALLS])
def test_bad_input_raises_clear_error(code, message):
    assert_bad_call_raises(SETUP, code, message)


def test_bad_input_never_crashes_the_process():
    assert_bad_calls_survive(SETUP, [code for code, _ in BAD_CALLS])


# ---------------------------------------------------------------------------------------------
# torch.compile and CUDA graphs


def test_decode_step_compiles_fullgraph(rng):
    """select_pages + sparse_decode traced whole (no host sync, no graph break) give eager's bits."""
    torch._dynamo.reset()
    layer = Layer([700, 90, 333], [True, False, False, True], 2, 64, SMALL, rng, "cpu")
    q = layer.query()

    def decode_step(q, lens):
        selection = select_pages(q, layer.cache.stats, layer.block_table, lens, SMALL.token_budget)
        out, lse = sparse_decode(q * 1.0, layer.cache, layer.block_table, layer.ring_table, lens, selection,
                                 return_softmax_lse=True)
        return out * 2, lse, selection.page_indices

    eager = decode_step(q, layer.lens)
    compiled = torch.compile(decode_step, fullgraph=True)(q, layer.lens)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


@pytest.mark.gpu
def test_cuda_graph_decode_step(rng):
    """append + select_pages + sparse_decode captured once and replayed on new data."""
    layer = Layer([700, 90], [True, False], 4, 128, SMALL, rng, "cuda")
    shape = (2, 1, 2, 128)
    k, v, q = randn(shape, torch.bfloat16, rng, "cuda"), randn(shape, torch.bfloat16, rng, "cuda"), layer.query()
    lens = layer.lens.clone()

    def step():
        layer.cache.append(k, v, layer.block_table, layer.ring_table, lens)
        selection = select_pages(q, layer.cache.stats, layer.block_table, lens + 1, 256)
        return sparse_decode(q, layer.cache, layer.block_table, layer.ring_table, lens + 1, selection)

    step()  # warm-up outside the capture (writes the same token again below)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for t in (q, k, v):
        t.copy_(torch.randn(t.shape, generator=rng).to(t.dtype))
    expected = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, expected)


def test_cache_without_page_stats_stores_and_decodes_the_same(rng):
    """page_stats=False (a cache only read densely) writes the same pools and gives the same
    dense-plus-ring decode as a cache with stats; page selection refuses it by name."""
    config = LServeConfig(sink=64, local=128)
    k, v = (randn((2, 100, 2, 64), torch.bfloat16, rng) for _ in range(2))
    q = randn((2, 1, 8, 64), torch.bfloat16, rng)
    table = torch.randperm(9, generator=rng)[:8].view(2, 4).to(torch.int32)
    lens = torch.full((2,), 100, dtype=torch.int32)
    caches = [LServeCache(9, 2, [False, True], 64, torch.bfloat16, config, page_stats=keep) for keep in (True, False)]
    outs = []
    for cache in caches:
        ring = cache.ring_table(torch.arange(2, dtype=torch.int32))
        cache.append(k, v, table, ring, torch.zeros(2, dtype=torch.int32))
        outs.append(sparse_decode(q, cache, table, ring, lens))
    assert caches[0].stats is not None and caches[1].stats is None
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v_ring, caches[1].v_ring)
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(TypeError, match="page_stats=False"):
        select_pages(q, caches[1].stats, table, lens)

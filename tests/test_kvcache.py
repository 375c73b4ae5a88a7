"""tkpy.flash_attn_with_kvcache against python/tkpy/reference.py (float64).

Paged and contiguous caches (with cache_batch_idx), appends with and without rotary (GPT-J and
neox pairs, partial rotary), causal / local windows / softcap, Sq > 1, GQA, head dims, num_splits
and the lse; the cache after an append (new tokens where they belong, nothing else touched); the
flash-attn 2 signature; bad input. The expected values come from the tokens of each sequence kept
as plain lists by the test, never from the cache the code under test wrote.
"""

import inspect
import math
import textwrap

import pytest
import torch

from tkpy import flash_attn_with_kvcache, reference

from helpers import assert_bad_call_raises, assert_bad_calls_survive, poison_cuda_allocator, randn
from test_attention import DEVICES, LSE_TOL, check_attention

FLASH_ATTN_SIGNATURE = [
    ("q", inspect.Parameter.empty), ("k_cache", inspect.Parameter.empty), ("v_cache", inspect.Parameter.empty),
    ("k", None), ("v", None), ("rotary_cos", None), ("rotary_sin", None), ("cache_seqlens", None),
    ("cache_batch_idx", None), ("cache_leftpad", None), ("block_table", None), ("softmax_scale", None),
    ("causal", False), ("window_size", (-1, -1)), ("softcap", 0.0), ("rotary_interleaved", True),
    ("alibi_slopes", None), ("num_splits", 0), ("return_softmax_lse", False),
]


def test_signature_is_flash_attn_2s():
    params = inspect.signature(flash_attn_with_kvcache).parameters.values()
    assert [(p.name, p.default) for p in params] == FLASH_ATTN_SIGNATURE
    assert all(p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)


class Cache:
    """A KV cache filled with random old tokens, and those tokens as per-sequence lists.

    Paged (``page_size`` given): pages of every sequence are scattered over a shuffled pool with
    spare pages. Contiguous: ``rows`` cache rows, sequence b in row ``batch_idx[b]``. Every slot
    the sequences do not own holds random data too, so a kernel that reads past a sequence's end
    cannot pass by reading zeros.
    """

    def __init__(self, lens, capacity, heads_kv, head_dim, dtype, gen, device, page_size=None, rows=None):
        batch = len(lens)
        self.lens, self.page_size = lens, page_size
        self.keys = [randn((n, heads_kv, head_dim), dtype, gen) for n in lens]
        self.values = [randn((n, heads_kv, head_dim), dtype, gen) for n in lens]
        self.block_table = self.batch_idx = None
        if page_size is not None:
            max_pages = -(-capacity // page_size)
            num_pages = batch * max_pages + 3
            pool = torch.randperm(num_pages, generator=gen)[: batch * max_pages]
            self.block_table = pool.view(batch, max_pages).to(torch.int32)
            shape = (num_pages, page_size, heads_kv, head_dim)
        else:
            rows = batch if rows is None else rows
            self.batch_idx = torch.randperm(rows, generator=gen)[:batch].to(torch.int32)
            shape = (rows, capacity, heads_kv, head_dim)
        self.k_cache = randn(shape, dtype, gen)
        self.v_cache = randn(shape, dtype, gen)
        for b in range(batch):
            for t in range(lens[b]):
                self.k_cache[self.where(b, t)] = self.keys[b][t]
                self.v_cache[self.where(b, t)] = self.values[b][t]
        for name in ("k_cache", "v_cache", "block_table", "batch_idx"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))

    def where(self, b, t):
        """Index of token t of sequence b in the cache."""
        if self.block_table is not None:
            return int(self.block_table[b, t // self.page_size]), t % self.page_size
        return int(self.batch_idx[b]), t


def rotary_table(rows, rotary_dim, gen):
    angles = torch.rand(rows, rotary_dim // 2, generator=gen, dtype=torch.float64) * 2 * math.pi
    return angles.cos().float(), angles.sin().float()


def expected_attention(cache, q, k_new, v_new, rotary, interleaved, causal, window, softcap, scale):
    """float64 out ``[B, Sq, Hq, D]`` and lse ``[B, Hq, Sq]`` over each sequence's token list."""
    outs, lses = [], []
    seqlen_q = q.shape[1]
    capacity = cache.k_cache.shape[1] * (cache.block_table.shape[1] if cache.block_table is not None else 1)
    left, right = window[0], 0 if causal else window[1]
    progressive = 0 <= left < capacity or 0 <= right < capacity  # flash-attn's rule for q's positions
    for b, old in enumerate(cache.lens):
        keys, values, q_b = cache.keys[b].double(), cache.values[b].double(), q[b].cpu().double()
        if k_new is not None:
            new = k_new[b].cpu()
            positions = torch.arange(old, old + new.shape[0])
            if rotary is not None:
                # Rotated keys are stored in the cache's dtype and the rotated q is a tensor of q's
                # dtype: both are rounded once after the rotation.
                new = reference.rope(new, *rotary, positions, interleaved).to(q.dtype)
                q_positions = old + (torch.arange(seqlen_q) if progressive else torch.zeros(seqlen_q, dtype=torch.long))
                q_b = reference.rope(q_b, *rotary, q_positions, interleaved).to(q.dtype).double()
            keys = torch.cat([keys, new.double()])
            values = torch.cat([values, v_new[b].cpu().double()])
        out, lse = reference.attention(q_b[None], keys[None], values[None], causal, window, softcap, scale)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.stack(outs), torch.stack(lses)


# lens, capacity, page_size (None: contiguous), rows, Sq, S_new (0: no append), Hq, Hkv, D, rotary
# (None, "gptj", "neox", "neox_partial"), causal, window, softcap, softmax_scale, int seqlens
CASES = {
    "paged_decode": ([0, 17, 100], 128, 16, None, 1, 1, 4, 2, 64, None, False, (-1, -1), 0.0, None, False),
    "paged_no_append": ([5, 64, 33], 96, 32, None, 1, 0, 4, 4, 64, None, False, (-1, -1), 0.0, None, False),
    "paged_gptj_sq3_causal": ([9, 0, 70], 96, 16, None, 3, 3, 8, 2, 64, "gptj", True, (-1, -1), 0.0, None, False),
    "paged_neox_partial": ([31, 47], 64, 16, None, 2, 2, 4, 1, 128, "neox_partial", True, (-1, -1), 0.0, None, False),
    "paged_gptj_noncausal": ([12, 40], 64, 16, None, 2, 2, 2, 2, 64, "gptj", False, (-1, -1), 0.0, None, False),
    "paged_window_softcap": ([60, 25], 80, 16, None, 4, 4, 4, 2, 64, "neox", False, (7, 2), 5.0, 0.2, False),
    "paged_page64_mqa8": ([130, 1], 192, 64, None, 1, 1, 8, 1, 128, None, False, (-1, -1), 0.0, None, False),
    "paged_d256_int_seqlens": ([20, 20], 48, 16, None, 2, 2, 4, 2, 256, "gptj", True, (-1, -1), 0.0, None, True),
    "contiguous": ([5, 0, 30], 40, None, None, 1, 1, 4, 2, 64, None, False, (-1, -1), 0.0, None, False),
    "contiguous_batch_idx_rotary": ([8, 19], 33, None, 4, 2, 2, 4, 2, 64, "gptj", True, (-1, -1), 0.0, None, False),
    "contiguous_sq4_no_append_causal": ([9, 12], 16, None, 3, 4, 0, 2, 1, 128, None, True, (-1, -1), 0.0, None, False),
    "contiguous_window_left": ([50, 37], 60, None, None, 3, 3, 4, 4, 64, "neox", True, (5, -1), 0.0, None, False),
    "contiguous_int_seqlens_softcap": ([7, 7], 20, None, None, 1, 1, 8, 2, 64, None, False, (-1, -1), 2.0, None, True),
}


def rotary_for(kind, capacity, head_dim, gen):
    if kind is None:
        return None, True
    rotary_dim = head_dim // 2 if kind == "neox_partial" else head_dim
    return rotary_table(capacity + 8, rotary_dim, gen), kind == "gptj"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(device, dtype, case, rng):
    (lens, capacity, page_size, rows, seqlen_q, seqlen_new, heads_q, heads_kv, head_dim, rotary_kind, causal, window,
     softcap, scale, int_seqlens) = CASES[case]
    if int_seqlens:
        assert len(set(lens)) == 1
    cache = Cache(lens, capacity, heads_kv, head_dim, dtype, rng, device, page_size, rows)
    q = randn((len(lens), seqlen_q, heads_q, head_dim), dtype, rng, device)
    k_new = randn((len(lens), seqlen_new, heads_kv, head_dim), dtype, rng, device) if seqlen_new else None
    v_new = randn((len(lens), seqlen_new, heads_kv, head_dim), dtype, rng, device) if seqlen_new else None
    rotary, interleaved = rotary_for(rotary_kind, capacity, head_dim, rng)
    expected = expected_attention(cache, q, k_new, v_new, rotary, interleaved, causal, window, softcap, scale)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    inputs_before = [t.clone() for t in (q, seqlens) + ((k_new, v_new) if k_new is not None else ())]
    if device == "cuda":
        poison_cuda_allocator()
    out, lse = flash_attn_with_kvcache(
        q, cache.k_cache, cache.v_cache, k_new, v_new,
        rotary_cos=None if rotary is None else rotary[0].to(device),
        rotary_sin=None if rotary is None else rotary[1].to(device),
        cache_seqlens=lens[0] if int_seqlens else seqlens,
        cache_batch_idx=cache.batch_idx, block_table=cache.block_table, softmax_scale=scale, causal=causal,
        window_size=window, softcap=softcap, rotary_interleaved=interleaved, return_softmax_lse=True,
    )
    # The op rotates q and k in fp32 and the reference in float64, each then rounding to q's dtype: a
    # value near a rounding boundary lands one ulp apart (2^-8 relative in bf16), which moves a score
    # by up to about 2^-8 * scale * sum |q_d k_d|. Over 300 seeds that reached 8.5e-4 in lse (one CI
    # run saw 1.1e-3, over the shared 1e-3 bound), against 5e-7 without rotary.
    check_attention(out, lse, *expected, dtype, lse_tol=LSE_TOL if rotary is None else 1e-2)
    after = (q, seqlens) + ((k_new, v_new) if k_new is not None else ())
    assert all(torch.equal(a, b) for a, b in zip(after, inputs_before)), "q, cache_seqlens, k and v are not modified"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["paged", "contiguous"])
@pytest.mark.parametrize("rotary_kind", [None, "gptj", "neox_partial"])
def test_append_writes_only_the_new_tokens(device, layout, rotary_kind, rng):
    """New tokens land at cache_seqlens + i (rotated when asked, rounded once to the cache's dtype)
    and every other slot of the cache keeps its bits."""
    lens, capacity, heads_kv, head_dim = [3, 30, 0], 48, 2, 64
    cache = Cache(lens, capacity, heads_kv, head_dim, torch.bfloat16, rng, device,
                  16 if layout == "paged" else None, 4 if layout == "contiguous" else None)
    k_new = randn((3, 5, heads_kv, head_dim), torch.bfloat16, rng, device)
    v_new = randn((3, 5, heads_kv, head_dim), torch.bfloat16, rng, device)
    q = randn((3, 1, 4, head_dim), torch.bfloat16, rng, device)
    rotary, interleaved = rotary_for(rotary_kind, capacity, head_dim, rng)
    k_before, v_before = cache.k_cache.cpu().clone(), cache.v_cache.cpu().clone()
    flash_attn_with_kvcache(
        q, cache.k_cache, cache.v_cache, k_new, v_new,
        rotary_cos=None if rotary is None else rotary[0].to(device),
        rotary_sin=None if rotary is None else rotary[1].to(device),
        cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=device), cache_batch_idx=cache.batch_idx,
        block_table=cache.block_table, rotary_interleaved=interleaved,
    )
    k_after, v_after = cache.k_cache.cpu(), cache.v_cache.cpu()
    written = torch.zeros(k_after.shape[:2], dtype=torch.bool)
    for b, old in enumerate(lens):
        new_k = k_new[b].cpu()
        if rotary is not None:
            new_k = reference.rope(new_k, *rotary, torch.arange(old, old + 5), interleaved)
        for i in range(5):
            slot = cache.where(b, old + i)
            written[slot] = True
            torch.testing.assert_close(k_after[slot].double(), new_k[i].double(), rtol=2**-8, atol=1e-6)
            assert torch.equal(v_after[slot], v_new[b, i].cpu())
    assert torch.equal(k_after[~written], k_before[~written]) and torch.equal(v_after[~written], v_before[~written])


@pytest.mark.parametrize("device", DEVICES)
def test_long_context_any_num_splits(device, rng):
    """Split-KV: auto and forced split counts all match the reference over 1000+ tokens."""
    lens, heads_q, heads_kv, head_dim = [1500, 700, 1], 8, 2, 128
    cache = Cache(lens, 1536, heads_kv, head_dim, torch.bfloat16, rng, device, page_size=64)
    q = randn((3, 1, heads_q, head_dim), torch.bfloat16, rng, device)
    expected = expected_attention(cache, q, None, None, None, True, False, (-1, -1), 0.0, None)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    for num_splits in (0, 1, 3, 7, 64):
        if device == "cuda":
            poison_cuda_allocator()
        out, lse = flash_attn_with_kvcache(q, cache.k_cache, cache.v_cache, cache_seqlens=seqlens,
                                           block_table=cache.block_table, num_splits=num_splits,
                                           return_softmax_lse=True)
        check_attention(out, lse, *expected, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_window_edges_are_bounded_by_the_capacity(device, rng):
    """flash-attn's mha_fwd_kvcache makes an edge at or past seqlen_k (the capacity) unbounded, then
    gives the open edge of a one-sided window seqlen_k: with no append and Sq > capacity + 1 the
    first queries see fewer keys than an unbounded edge would show them."""
    capacity, lens = 16, [16, 10]
    cache = Cache(lens, capacity, 2, 64, torch.bfloat16, rng, device, rows=3)
    q = randn((2, capacity + 8, 4, 64), torch.bfloat16, rng, device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    for window, effective in (((2, -1), (2, capacity)), ((-1, capacity + 3), (-1, -1)), ((3, 40), (3, capacity))):
        out, lse = flash_attn_with_kvcache(q, cache.k_cache, cache.v_cache, cache_seqlens=seqlens,
                                           cache_batch_idx=cache.batch_idx, window_size=window,
                                           return_softmax_lse=True)
        expected = expected_attention(cache, q, None, None, None, True, False, effective, 0.0, None)
        check_attention(out, lse, *expected, torch.bfloat16)


def test_default_cache_seqlens_is_the_whole_cache(rng):
    cache = Cache([24, 24], 24, 2, 64, torch.float16, rng, "cpu", rows=3)
    q = randn((2, 1, 2, 64), torch.float16, rng)
    out = flash_attn_with_kvcache(q, cache.k_cache, cache.v_cache, cache_batch_idx=cache.batch_idx)
    out_again, lse = flash_attn_with_kvcache(q, cache.k_cache, cache.v_cache, cache_batch_idx=cache.batch_idx,
                                             return_softmax_lse=True)
    check_attention(out_again, lse, *expected_attention(cache, q, None, None, None, True, False, (-1, -1), 0.0, None),
                    torch.float16)
    assert torch.equal(out, out_again)


SETUP = textwrap.dedent(
    """
    import torch
    from tkpy import flash_attn_with_kvcache
    q = torch.randn(2, 1, 4, 64).bfloat16()
    kc = torch.randn(6, 16, 2, 64).bfloat16()     # paged: 6 pages of 16 tokens
    vc = torch.randn(6, 16, 2, 64).bfloat16()
    bt = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    kn = torch.randn(2, 1, 2, 64).bfloat16()
    vn = torch.randn(2, 1, 2, 64).bfloat16()
    lens = torch.tensor([10, 47], dtype=torch.int32)
    cc = torch.randn(3, 20, 2, 64).bfloat16()     # contiguous: 3 rows of 20 tokens
    cos = torch.ones(64, 32)
    sin = torch.zeros(64, 32)
    """
)

BAD_CALLS = [
    ("flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=torch.tensor([[0, 1, 2], [3, 9, 5]], dtype=torch.int32))",
     r"block_table\[1, 1\] = 9 is outside the pool's 6 pages"),
    ("flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=torch.tensor([[0, 1, 2], [3, -1, 5]], dtype=torch.int32))",
     r"block_table\[1, 1\] = -1 is outside the pool"),
    ("flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=torch.tensor([10, 48], dtype=torch.int32), block_table=bt)",
     r"cache_seqlens\[1\] = 48 plus 1 new tokens must fit in \[0, 48\].*block_table's 3 columns x page_size 16"),
    ("flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([10, -1], dtype=torch.int32), block_table=bt)",
     r"cache_seqlens\[1\] = -1 is outside \[0, 48\]"),
    ("flash_attn_with_kvcache(q, kc, vc, cache_seqlens=49, block_table=bt)", r"cache_seqlens\[0\] = 49 is outside \[0, 48\]"),
    ("flash_attn_with_kvcache(q, cc, cc.clone(), cache_seqlens=3, cache_batch_idx=torch.tensor([0, 3], dtype=torch.int32))",
     r"cache_batch_idx\[1\] = 3 is outside the cache's 3 rows"),
    ("flash_attn_with_kvcache(q, kc.half(), vc, cache_seqlens=lens, block_table=bt)", "k_cache must have q's dtype"),
    ("flash_attn_with_kvcache(q, kc, vc.half(), cache_seqlens=lens, block_table=bt)", "expected v_cache to have q's dtype BFloat16 or int8, got Half"),
    ("flash_attn_with_kvcache(q, kc, vc, kn.half(), vn.half(), cache_seqlens=lens, block_table=bt)", "dtype"),
    ("flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens.long(), block_table=bt)", "expected cache_seqlens to be int32, got Long"),
    ("flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens[:1], block_table=bt)", r"expected cache_seqlens of shape \[batch\] = \[2\], got \[1\]"),
    ("flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=bt.long())", r"expected block_table int32 \[batch=2, max_pages >= 1\], got Long"),
    ("flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=bt[0])", "block_table must be 2-D"),
    ("flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=bt, cache_batch_idx=lens)",
     "cache_batch_idx picks rows of a contiguous cache; with block_table pass None"),
    ("flash_attn_with_kvcache(q, kc, vc, kn, vn, block_table=bt)", "appending k/v needs cache_seqlens"),
    ("flash_attn_with_kvcache(q, kc, vc, kn, None, cache_seqlens=lens, block_table=bt)", "pass both k and v"),
    ("flash_attn_with_kvcache(q, kc, vc, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lens, block_table=bt)",
     "rotary_cos/rotary_sin rotate the appended keys: they need k and v"),
    ("flash_attn_with_kvcache(q, kc, vc, kn, vn, rotary_cos=cos, cache_seqlens=lens, block_table=bt)",
     "pass both rotary_cos and rotary_sin"),
    ("flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=bt, cache_leftpad=lens)",
     "cache_leftpad is not implemented"),
    ("flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=bt, alibi_slopes=torch.ones(4))",
     "alibi_slopes are not implemented"),
    ("flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=bt, window_size=(-2, 0))",
     "window_size entries must be >= -1"),
    ("flash_attn_with_kvcache(q[0], kc, vc, cache_seqlens=lens, block_table=bt)", "q must be 4-D"),
    ("flash_attn_with_kvcache(q, kc[0], vc, cache_seqlens=lens, block_table=bt)", "k_cache must be 4-D"),
    ("flash_attn_with_kvcache(q, kc, vc, cache_seqlens=1.5, block_table=bt)", "cache_seqlens must be an int"),
    ("flash_attn_with_kvcache(q.float(), kc.float(), vc.float(), cache_seqlens=lens, block_table=bt)", "bfloat16 or float16"),
]


@pytest.mark.parametrize("code,message", BAD_CALLS, ids=[c[:80] for c, _ in BAD_CALLS])
def test_bad_input_raises_clear_error(code, message):
    assert_bad_call_raises(SETUP, code, message)


def test_bad_input_never_crashes_the_process():
    assert_bad_calls_survive(SETUP, [code for code, _ in BAD_CALLS])


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay(rng):
    """A decode step with an append, captured once and replayed on new data (no host sync inside)."""
    cache = Cache([40, 100], 128, 2, 128, torch.bfloat16, rng, "cuda", page_size=64)
    seqlens = torch.tensor([40, 100], dtype=torch.int32, device="cuda")
    q, k_new, v_new = (randn((2, 1, h, 128), torch.bfloat16, rng, "cuda") for h in (8, 2, 2))
    cos, sin = (t.cuda() for t in rotary_table(256, 128, rng))

    def step():
        return flash_attn_with_kvcache(q, cache.k_cache, cache.v_cache, k_new, v_new, cos, sin, seqlens,
                                       block_table=cache.block_table, causal=True)

    step()  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for t in (q, k_new, v_new):
        t.copy_(torch.randn(t.shape, generator=rng).to(t.dtype))
    seqlens.copy_(torch.tensor([41, 7], dtype=torch.int32))
    expected = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, expected)

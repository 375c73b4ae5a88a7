"""Hostile calls of tkpy's ops and public functions, run by tests/test_hostile_ops.py in a guarded
worker process (a crash or a hang there fails the case instead of the test session).

Each case takes a valid call, breaks one thing (a dtype, a rank, a size past int32, an aliased
in-place output, a non-finite scalar, an index out of range, out of order or repeated) and expects
a refusal: an exception that names the broken argument, with every input exactly as it was.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch

import tkpy
from tkpy import riflex, rope
from tkpy.lserve import LServeCache, LServeConfig

BF16 = torch.bfloat16
HUGE = 2**31 + 8  # one past what the kernels' int32 indices address, rounded to keep TMA's rules
# A refusal is one of these; anything else (a RuntimeError from inside a kernel, an IndexError) is
# a crash of another kind.
REFUSALS = (ValueError, TypeError, NotImplementedError)
# Inputs above this many elements are stride-0 views (no memory of their own): not snapshotted.
_SNAPSHOT_LIMIT = 1 << 24


def randn(*shape, dtype=BF16):
    return torch.randn(*shape).to(dtype)


def int32(values):
    return torch.tensor(values, dtype=torch.int32)


def huge_view(shape, dim, dtype=BF16):
    """A tensor of `shape` with dim `dim` stretched to HUGE elements by a stride-0 expand."""
    small = list(shape)
    small[dim] = 1
    big = list(shape)
    big[dim] = HUGE
    return randn(*small, dtype=dtype).expand(*big)


@dataclass
class Call:
    """fn(**args); `meta` says whether the same call on meta tensors (torch.compile's fakes) must
    be refused alike: shape, dtype and scalar rules, not values or aliasing."""

    fn: Callable
    args: dict
    meta: bool = True
    inputs: dict = field(default_factory=dict)  # tensors the call may write besides args (a cache's pools)


# ---- valid calls --------------------------------------------------------------------------------

def attention():
    return Call(torch.ops.tkpy.attention_forward,
                dict(q=randn(1, 16, 4, 64), k=randn(1, 16, 2, 64), v=randn(1, 16, 2, 64), softmax_scale=None,
                     window_left=-1, window_right=-1, softcap=0.0))


def varlen():
    return Call(torch.ops.tkpy.attention_forward,
                dict(q=randn(24, 2, 64), k=randn(24, 2, 64), v=randn(24, 2, 64), cu_seqlens_q=int32([0, 10, 24]),
                     cu_seqlens_k=int32([0, 10, 24]), max_seqlen_q=14, max_seqlen_k=14))


def block_sparse():
    # 2 sequences of 256 tokens (2 x 2 blocks); head 0 block-sparse, head 1 streaming, head 2 dense.
    cu = int32([0, 256, 512])
    return Call(torch.ops.tkpy.block_sparse_attention_forward,
                dict(q=randn(512, 3, 64), k=randn(512, 3, 64), v=randn(512, 3, 64), cu_seqlens_q=cu,
                     cu_seqlens_k=cu.clone(), head_mask_type=int32([1, -1, 0]),
                     streaming_info=int32([0, 0, 1, 1, 0, 0]), sparse_index=int32([0, -1, -1]), max_seqlen_q=256,
                     max_seqlen_k=256, block_indices=int32([[[[0, 1], [0, 1]]], [[[1, 0], [0, 1]]]]),
                     block_counts=int32([[[2, 1]], [[1, 2]]]), softmax_scale=None, is_causal=True))


def decode():
    return Call(torch.ops.tkpy.decode_attention,
                dict(q=randn(2, 1, 4, 64), k_cache=randn(6, 16, 2, 64), v_cache=randn(6, 16, 2, 64),
                     cache_seqlens=int32([20, 40]), block_table=int32([[0, 1, 2], [3, 4, 5]]), num_splits=0))


def append():
    return Call(torch.ops.tkpy.kv_append_,
                dict(k_cache=randn(6, 16, 2, 64), v_cache=randn(6, 16, 2, 64), k=randn(2, 3, 2, 64),
                     v=randn(2, 3, 2, 64), cache_seqlens=int32([20, 30]), block_table=int32([[0, 1, 2], [3, 4, 5]]),
                     k_min=torch.randn(6, 1, 2, 64), k_max=torch.randn(6, 1, 2, 64)))


def append_contiguous():
    return Call(torch.ops.tkpy.kv_append_,
                dict(k_cache=randn(4, 32, 2, 64), v_cache=randn(4, 32, 2, 64), k=randn(2, 3, 2, 64),
                     v=randn(2, 3, 2, 64), cache_seqlens=int32([5, 9]), cache_batch_idx=int32([3, 1])))


def rope_1d():
    angles = torch.randn(32, 32)
    return Call(torch.ops.tkpy.apply_rope_,
                dict(q=randn(2, 8, 4, 64), k=randn(2, 8, 2, 64), cos=angles.cos(), sin=angles.sin(),
                     positions=torch.randint(0, 32, (2, 8)), interleaved=False))


def rope_3d():
    return Call(torch.ops.tkpy.apply_rope_3d_,
                dict(q=randn(1, 24, 2, 64), k=randn(1, 24, 2, 64), grid_thw=[2, 3, 4],
                     freqs_t=torch.randn(2, 8, 2), freqs_h=torch.randn(3, 12, 2), freqs_w=torch.randn(4, 12, 2)))


def gemm():
    return Call(torch.ops.tkpy.gemm, dict(a=randn(16, 32), b=randn(32, 24), trans_b=False))


def flash_attn_func():
    return Call(tkpy.flash_attn_func, dict(q=randn(1, 16, 4, 64), k=randn(1, 16, 2, 64), v=randn(1, 16, 2, 64)))


def flash_attn_varlen_func():
    cu = int32([0, 10, 24])
    return Call(tkpy.flash_attn_varlen_func, dict(q=randn(24, 2, 64), k=randn(24, 2, 64), v=randn(24, 2, 64),
                                                  cu_seqlens_q=cu, cu_seqlens_k=cu.clone(), max_seqlen_q=14,
                                                  max_seqlen_k=14))


def kvcache_append():
    """flash_attn_with_kvcache appending k/v: the cache must be unchanged by a refused call."""
    return Call(tkpy.flash_attn_with_kvcache,
                dict(q=randn(2, 1, 4, 64), k_cache=randn(6, 16, 2, 64), v_cache=randn(6, 16, 2, 64),
                     k=randn(2, 1, 2, 64), v=randn(2, 1, 2, 64), cache_seqlens=int32([20, 30]),
                     block_table=int32([[0, 1, 2], [3, 4, 5]])), meta=False)


def block_sparse_attn_func():
    cu = int32([0, 256])
    return Call(tkpy.block_sparse_attn_func,
                dict(q=randn(256, 2, 64), k=randn(256, 2, 64), v=randn(256, 2, 64), cu_seqlens_q=cu,
                     cu_seqlens_k=cu.clone(), head_mask_type=int32([1, 0]), streaming_info=int32([0, 0, 0, 0]),
                     base_blockmask=torch.tensor([[[[True, False], [True, True]]]]), max_seqlen_q_=256,
                     max_seqlen_k_=256, p_dropout=0.0, is_causal=True), meta=False)


def token_streaming_attn_func():
    cu = int32([0, 200])
    return Call(tkpy.token_streaming_attn_func,
                dict(q=randn(200, 2, 64), k=randn(200, 2, 64), v=randn(200, 2, 64), cu_seqlens_q=cu,
                     cu_seqlens_k=cu.clone(), head_mask_type=int32([-1, 0]), streaming_info=int32([4, 32, 0, 0]),
                     max_seqlen_q=200, max_seqlen_k=200), meta=False)


def public_rope():
    angles = torch.randn(16, 32)
    return Call(rope.apply_rope_, dict(q=randn(1, 8, 4, 64), k=randn(1, 8, 2, 64), cos=angles.cos(),
                                       sin=angles.sin()), meta=False)


def riflex_embed():
    return Call(riflex.get_1d_rotary_pos_embed_riflex, dict(dim=16, pos=12, theta=10000.0, k=4, L_test=12),
                meta=False)


def append_lserve():
    """The raw append with LServe's streaming heads (kv head 1 streams into a ring)."""
    cache = LServeCache(8, 2, [False, True], 64, BF16, LServeConfig(sink=64, local=64))
    return Call(torch.ops.tkpy.kv_append_,
                dict(k_cache=cache.k, v_cache=cache.v, k=randn(2, 3, 2, 64), v=randn(2, 3, 2, 64),
                     cache_seqlens=int32([10, 70]), block_table=int32([[1, 2], [3, 4]]),
                     **cache.ring_arguments(cache.ring_table(int32([0, 1])))))


def kvcache_rotary():
    """flash_attn_with_kvcache appending one token and rotating 4 causal queries with it."""
    angles = torch.randn(32, 32)
    return Call(tkpy.flash_attn_with_kvcache,
                dict(q=randn(2, 4, 4, 64), k_cache=randn(6, 16, 2, 64), v_cache=randn(6, 16, 2, 64),
                     k=randn(2, 1, 2, 64), v=randn(2, 1, 2, 64), rotary_cos=angles.cos(), rotary_sin=angles.sin(),
                     cache_seqlens=int32([20, 26]), block_table=int32([[0, 1, 2], [3, 4, 5]]), causal=True),
                meta=False)


def select_pages():
    cache = LServeCache(8, 2, [False, True], 64, BF16, LServeConfig(sink=64, local=64))
    cache.stats.k_min.copy_(torch.randn(cache.stats.k_min.shape))
    cache.stats.k_max.copy_(cache.stats.k_min + torch.rand(cache.stats.k_min.shape))
    return Call(tkpy.lserve.select_pages, dict(q=randn(2, 1, 4, 64), stats=cache.stats,
                                               block_table=int32([[1, 2], [3, 4]]), cache_seqlens=int32([100, 70]),
                                               token_budget=64), meta=False)


def head_pattern():
    return Call(tkpy.lserve.HeadPattern, dict(streaming_mask=torch.tensor([[True, False]]).numpy(),
                                              num_query_heads=4), meta=False)


def latent_frames():
    return Call(riflex.latent_frames, dict(num_frames=17, temporal_compression=4), meta=False)


def rope_3d_freqs():
    return Call(riflex.rope_3d_freqs, dict(split=riflex.axis_split("wan", 128), grid_thw=(3, 2, 2)), meta=False)


def public_rope_3d():
    q = randn(1, 24, 2, 64)
    return Call(rope.apply_rope_3d_, dict(q=q, k=None, grid_thw=(2, 3, 4), freqs_t=torch.randn(2, 8, 2),
                                          freqs_h=torch.randn(3, 12, 2), freqs_w=torch.randn(4, 12, 2)), meta=False)


def lserve_append():
    cache = LServeCache(8, 2, [False, True], 64, BF16, LServeConfig(sink=64, local=64))
    for pool in (cache.k, cache.v, cache.k_ring, cache.v_ring):
        pool.copy_(torch.randn(pool.shape))
    call = Call(cache.append, dict(k=randn(2, 3, 2, 64), v=randn(2, 3, 2, 64), block_table=int32([[1, 2], [3, 4]]),
                                   ring_table=cache.ring_table(int32([0, 1])), cache_seqlens=int32([10, 70])),
                meta=False)
    call.inputs = {"cache.k": cache.k, "cache.v": cache.v, "cache.k_ring": cache.k_ring, "cache.v_ring": cache.v_ring,
                   "cache.k_min": cache.stats.k_min, "cache.k_max": cache.stats.k_max}
    return call


# ---- the mutations ------------------------------------------------------------------------------

def _set(**changes):
    def mutate(a):
        a.update({name: change(a) if callable(change) else change for name, change in changes.items()})
    return mutate


def _overlapping_rope(a):
    # q heads 0-3 and k heads 2-5 of one buffer: heads 2 and 3 are in both (strided views).
    buf = randn(2, 8, 6, 64)
    a["q"], a["k"] = buf[:, :, 0:4], buf[:, :, 2:6]


def _cos_inside_q(a):
    # The table rows are q's own memory (q's dtype, which the op accepts for tables).
    flat = a["q"].view(-1, 32)
    a["cos"], a["sin"] = flat[:32], flat[32:64]


def _k_inside_cache(a):
    a["k"] = a["k_cache"][:2, 1:4]


# name -> (valid call, mutation, text the refusal must contain, meta variant applies)
CASES = {
    # int32 truncation of sizes
    "attention/k_seq_past_int32": (attention, _set(k=lambda a: huge_view((1, 16, 2, 64), 1),
                                                   v=lambda a: huge_view((1, 16, 2, 64), 1)), "k has a dim of"),
    "attention/heads_past_int32": (attention, _set(q=lambda a: huge_view((1, 16, 4, 64), 2),
                                                   k=lambda a: huge_view((1, 16, 2, 64), 2),
                                                   v=lambda a: huge_view((1, 16, 2, 64), 2)), "q has a dim of"),
    "varlen/max_seqlen_q_past_int32": (varlen, _set(max_seqlen_q=2**31 + 5), "max_seqlen_q"),
    "varlen/max_seqlen_k_negative": (varlen, _set(max_seqlen_k=-1), "max_seqlen_k"),
    "block_sparse/max_seqlen_k_past_int32": (block_sparse, _set(max_seqlen_k=2**32 + 256), "max_seqlen_k"),
    "decode/heads_past_int32": (decode, _set(q=lambda a: huge_view((2, 1, 4, 64), 2)), "q has a dim of"),
    "rope_3d/grid_past_int32": (rope_3d, _set(grid_thw=[2**31, 2**31, 2**31]), "grid_thw"),
    "gemm/n_past_int32": (gemm, _set(b=lambda a: huge_view((32, 24), 1)), "b has a dim of"),
    # dtypes and ranks (the fakes refuse them too)
    "attention/q_float64": (attention, _set(q=lambda a: a["q"].double()), "q"),
    "decode/head_dim_48": (decode, _set(q=lambda a: randn(2, 1, 4, 48), k_cache=lambda a: randn(6, 16, 2, 48),
                                        v_cache=lambda a: randn(6, 16, 2, 48)), "head_dim"),
    "rope/q_int": (rope_1d, _set(q=lambda a: a["q"].to(torch.int32), k=None), "q"),
    "gemm/k_mismatch": (gemm, _set(b=lambda a: randn(24, 24)), "K differ"),
    "gemm/a_rank3": (gemm, _set(a=lambda a: a["a"][None]), "a"),
    "flash_attn_func/head_dim_0": (flash_attn_func, _set(q=lambda a: randn(1, 16, 4, 0), k=lambda a: randn(1, 16, 2, 0),
                                                         v=lambda a: randn(1, 16, 2, 0)), "head_dim"),
    "kvcache/head_dim_0": (kvcache_append, _set(q=lambda a: randn(2, 1, 4, 0)), "head_dim"),
    "varlen/empty_cu_seqlens": (varlen, _set(cu_seqlens_q=lambda a: int32([]), cu_seqlens_k=lambda a: int32([])),
                                "cu_seqlens_q"),
    # non-finite or out-of-range scalars
    **{f"attention/softmax_scale={s}": (attention, _set(softmax_scale=s), "softmax_scale")
       for s in (math.nan, math.inf, 0.0, -0.125)},
    **{f"attention/softcap={s}": (attention, _set(softcap=s), "softcap") for s in (math.inf, math.nan, -1.0)},
    "attention/window_-2": (attention, _set(window_left=-2), "window"),
    **{f"decode/softmax_scale={s}": (decode, _set(softmax_scale=s), "softmax_scale") for s in (math.nan, -1.0)},
    "decode/softcap=inf": (decode, _set(softcap=math.inf), "softcap"),
    "decode/num_splits=-1": (decode, _set(num_splits=-1), "num_splits"),
    "block_sparse/softmax_scale=nan": (block_sparse, _set(softmax_scale=math.nan), "softmax_scale"),
    "flash_attn_func/softmax_scale=nan": (flash_attn_func, _set(softmax_scale=math.nan), "softmax_scale"),
    "flash_attn_func/softcap=inf": (flash_attn_func, _set(softcap=math.inf), "softcap"),
    "flash_attn_func/dropout": (flash_attn_func, _set(dropout_p=0.1), "dropout_p"),
    **{f"riflex/theta={t}": (riflex_embed, _set(theta=t), "theta") for t in (0.0, -10000.0, math.nan, math.inf)},
    "riflex/L_test=nan": (riflex_embed, _set(L_test=math.nan), "L_test"),
    # aliasing of in-place outputs
    "append/k_cache_is_v_cache": (append, _set(v_cache=lambda a: a["k_cache"]), "k_cache and v_cache share memory"),
    "append/k_min_is_k_max": (append, _set(k_max=lambda a: a["k_min"]), "k_min and k_max share memory"),
    "append/k_inside_k_cache": (append, _k_inside_cache, "k_cache and k share memory"),
    "append/expanded_cache": (append, _set(k_cache=lambda a: a["k_cache"][:, :1].expand(6, 16, 2, 64)), "k_cache"),
    "decode/k_cache_is_v_cache": (decode, _set(v_cache=lambda a: a["k_cache"]), "k_cache and v_cache share memory"),
    "rope/q_k_overlap_strided": (rope_1d, _overlapping_rope, "q and k share memory"),
    "rope/cos_inside_q": (rope_1d, _cos_inside_q, "q and cos share memory"),
    "public_rope/q_is_k": (public_rope, _set(k=lambda a: a["q"]), "q and k share memory"),
    # index values: range, order, duplicates
    "block_sparse/count_past_key_blocks": (block_sparse, _set(block_counts=lambda a: int32([[[2, 3]], [[1, 2]]])),
                                           "block_counts[0, 0, 1] = 3"),
    "block_sparse/count_negative": (block_sparse, _set(block_counts=lambda a: int32([[[2, 1]], [[-1, 2]]])),
                                    "block_counts[1, 0, 0] = -1"),
    "block_sparse/duplicate_block": (block_sparse,
                                     _set(block_indices=lambda a: int32([[[[0, 1], [0, 0]]], [[[1, 0], [0, 1]]]]),
                                          block_counts=lambda a: int32([[[2, 2]], [[1, 2]]])), "block_indices[0, 0, 1]"),
    "block_sparse/descending_blocks": (block_sparse,
                                       _set(block_indices=lambda a: int32([[[[1, 0], [0, 1]]], [[[1, 0], [0, 1]]]])),
                                       "block_indices[0, 0, 0]"),
    "block_sparse/block_past_key_blocks": (block_sparse,
                                           _set(block_indices=lambda a: int32([[[[0, 2], [0, 1]]], [[[1, 0], [0, 1]]]])),
                                           "block_indices[0, 0, 0]"),
    "block_sparse/head_type_2": (block_sparse, _set(head_mask_type=lambda a: int32([1, 2, 0])), "head_mask_type[1]"),
    "block_sparse/streaming_info_negative": (block_sparse, _set(streaming_info=lambda a: int32([0, 0, -1, 1, 0, 0])),
                                             "streaming_info"),
    "block_sparse/sparse_index_misnumbered": (block_sparse, _set(sparse_index=lambda a: int32([1, -1, -1])),
                                              "sparse_index"),
    "varlen/cu_seqlens_descending": (varlen, _set(cu_seqlens_q=lambda a: int32([0, 14, 10])), "cu_seqlens_q"),
    "decode/page_out_of_pool": (decode, _set(block_table=lambda a: int32([[0, 1, 2], [3, 9, 5]])), "block_table[1, 1]"),
    "decode/length_past_capacity": (decode, _set(cache_seqlens=lambda a: int32([20, 49])), "cache_seqlens[1]"),
    "append/cache_row_out_of_cache": (append_contiguous, _set(cache_batch_idx=lambda a: int32([1, 4])),
                                      "cache_batch_idx[1] = 4"),
    "rope/position_past_table": (rope_1d, _set(positions=lambda a: torch.full((2, 8), 32)), "positions"),
    # public functions that write: nothing changes before the refusal
    "kvcache/num_splits=-1": (kvcache_append, _set(num_splits=-1), "num_splits"),
    "kvcache/softcap=-1": (kvcache_append, _set(softcap=-1.0), "softcap"),
    "kvcache/too_many_heads_per_kv_head": (kvcache_append, _set(q=lambda a: randn(2, 1, 66, 64)),
                                           "query heads per kv head"),
    "kvcache/softmax_scale=nan": (kvcache_append, _set(softmax_scale=math.nan), "softmax_scale"),
    "kvcache/unwritten_page_out_of_pool": (kvcache_append, _set(block_table=lambda a: int32([[0, 1, 2], [9, 4, 5]])),
                                           "block_table[1, 0]"),
    "block_sparse_attn_func/int_blockmask": (block_sparse_attn_func,
                                             _set(base_blockmask=lambda a: a["base_blockmask"].int()), "base_blockmask"),
    "block_sparse_attn_func/head_type_5": (block_sparse_attn_func, _set(head_mask_type=lambda a: int32([1, 5])),
                                           "head_mask_type"),
    "token_streaming/negative_local": (token_streaming_attn_func, _set(streaming_info=lambda a: int32([4, -32, 0, 0])),
                                       "streaming_info"),
    "lserve_append/negative_length": (lserve_append, _set(cache_seqlens=lambda a: int32([10, -3])),
                                      "cache_seqlens[1]"),
    "lserve_append/k_float": (lserve_append, _set(k=lambda a: a["k"].float()), "k"),
    # found by an independent probe
    "kvcache/q_rotated_past_the_tables": (kvcache_rotary, _set(cache_seqlens=lambda a: int32([20, 30])), "positions"),
    "decode/int8_scale_inf_as_float32": (decode, _set(k_cache=lambda a: a["k_cache"].to(torch.int8),
                                                      v_cache=lambda a: a["v_cache"].to(torch.int8), v_scale=1e39),
                                         "v_scale"),
    "append/int8_scale_zero_as_float32": (append, _set(k_cache=lambda a: a["k_cache"].to(torch.int8),
                                                       v_cache=lambda a: a["v_cache"].to(torch.int8), k_scale=1e-46,
                                                       k_min=None, k_max=None), "k_scale"),
    "riflex/theta_zero_as_float32": (riflex_embed, _set(theta=1e-320), "theta"),
    "append_lserve/kv_head_slot_repeated": (append_lserve, _set(kv_head_slot=lambda a: int32([0, 0])),
                                            "kv_head_slot names slot 0 for two kv heads"),
    "select_pages/page_out_of_pool": (select_pages, _set(block_table=lambda a: int32([[1, 99], [3, 4]])),
                                      "block_table[0]"),
    "select_pages/length_negative": (select_pages, _set(cache_seqlens=lambda a: int32([100, -70])),
                                     "cache_seqlens[1]"),
    "select_pages/q_float64": (select_pages, _set(q=lambda a: a["q"].double()), "q must be bfloat16"),
    "head_pattern/sink_past_int32": (head_pattern, _set(sink=2**31), "sink"),
    "head_pattern/sink_float": (head_pattern, _set(sink=1.5), "sink"),
    "latent_frames/compression_0": (latent_frames, _set(temporal_compression=0), "temporal_compression"),
    "latent_frames/num_frames_nan": (latent_frames, _set(num_frames=math.nan), "num_frames"),
    "rope_3d_freqs/two_axes": (rope_3d_freqs, _set(grid_thw=(3, 2)), "grid_thw"),
    "public_rope_3d/fractional_grid": (public_rope_3d, _set(grid_thw=(2.5, 3, 4)), "grid_thw"),
    "flash_attn_func/q_none": (flash_attn_func, _set(q=None), "q must be a Tensor"),
    "flash_attn_func/softcap_string": (flash_attn_func, _set(softcap="0.5"), "softcap"),
    "flash_attn_varlen_func/fractional_max_seqlen": (flash_attn_varlen_func, _set(max_seqlen_q=14.5),
                                                     "max_seqlen_q"),
    "kvcache/num_splits_none": (kvcache_append, _set(num_splits=None), "num_splits"),
}

# Mutations whose meta variant cannot apply: values (meta tensors have none) and aliasing (the
# meta copies do not share storage).
VALUE_OR_ALIAS = ("share memory", "block_counts[", "block_indices[", "head_mask_type[", "streaming_info",
                  "sparse_index", "cu_seqlens_q", "block_table", "cache_seqlens[", "cache_batch_idx", "positions",
                  "expanded_cache", "kv_head_slot names")


def _to_meta(x):
    if not isinstance(x, torch.Tensor):
        return x
    extent = x.storage_offset() + sum((n - 1) * s for n, s in zip(x.shape, x.stride())) + 1 if x.numel() else 0
    return torch.empty(extent, dtype=x.dtype, device="meta").as_strided(x.shape, x.stride(), x.storage_offset())


def _snapshot(tensors: dict) -> dict:
    return {name: t.clone() for name, t in tensors.items()
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel() <= _SNAPSHOT_LIMIT}


def run_case(name: str, on_meta: bool, seed: int) -> dict:
    """Build case `name`, call it (on meta tensors if `on_meta`) and describe what happened."""
    try:
        torch.manual_seed(seed)
        build, mutate, _, = CASES[name][:3]
        call = build()
        mutate(call.args)
        args = {k: _to_meta(v) for k, v in call.args.items()} if on_meta else call.args
        watched = {**call.args, **call.inputs}
        before = _snapshot(watched)
        try:
            call.fn(**args)
        except REFUSALS as exc:
            changed = [n for n, t in before.items() if not torch.equal(t, watched[n])]
            return {"refused": True, "type": type(exc).__name__, "message": str(exc), "changed": changed}
        except Exception as exc:  # a refusal of the wrong kind: report it, with where it came from
            return {"refused": False, "type": type(exc).__name__, "message": traceback.format_exc()}
        return {"refused": False, "type": None, "message": "the call was accepted"}
    except Exception:
        return {"refused": False, "type": "setup", "message": traceback.format_exc()}


# ---- property checks (hypothesis), run whole inside the worker ----------------------------------

def _elements(t: torch.Tensor) -> set:
    """The storage offsets of t's elements, by enumeration: the brute-force truth."""
    index = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):
        index = index[..., None] + torch.arange(size) * stride
    return set((index + t.storage_offset()).flatten().tolist())


def overlap_is_exact() -> None:
    """apply_rope_ refuses q and k exactly when some element lies in both: strided views sliced
    from one buffer in random ways, against enumeration of their elements."""
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(st.data())
    def check(data):
        heads = data.draw(st.integers(2, 6))
        seq = data.draw(st.integers(1, 4))
        buf = torch.randn(2, seq, heads, 2, 16)  # [B, S, H, 2, D]: a pair of heads per slot
        def view():
            h0 = data.draw(st.integers(0, heads - 1))
            h1 = data.draw(st.integers(h0 + 1, heads))
            step = data.draw(st.integers(1, 2))
            half = data.draw(st.integers(0, 1))
            return buf[:, :, h0:h1:step, half]
        q, k = view(), view()
        shared = bool(_elements(q) & _elements(k))
        angles = torch.randn(seq, 8)
        try:
            rope.apply_rope_(q, k, angles.cos(), angles.sin())
            refused = False
        except tkpy.ArgumentError as exc:
            assert "q and k share memory" in str(exc), str(exc)
            refused = True
        assert refused == shared, f"q {q.shape} {q.stride()} +{q.storage_offset()}, k {k.shape} {k.stride()} " \
                                  f"+{k.storage_offset()}: shared={shared}, refused={refused}"

    check()


def block_lists_are_checked() -> None:
    """Random block_counts and block_indices: refused, naming them, exactly when a count is
    outside [0, KB] or a list's first `count` entries are not distinct ascending blocks of
    [0, KB); accepted lists give the float64 reference of the same blocks."""
    from hypothesis import given, settings, strategies as st
    from tkpy import reference

    key_blocks = 3

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(st.lists(st.integers(-1, key_blocks + 1), min_size=2 * key_blocks, max_size=2 * key_blocks),
           st.lists(st.integers(-1, key_blocks + 1), min_size=2, max_size=2))
    def check(entries, counts):
        indices = int32(entries).view(1, 1, 2, key_blocks)
        valid = all(0 <= c <= key_blocks and all(0 <= x < key_blocks for x in entries[r * key_blocks:][:c])
                    and all(a < b for a, b in zip(entries[r * key_blocks:][:c], entries[r * key_blocks + 1:][:c - 1]))
                    for r, c in enumerate(counts))
        torch.manual_seed(0)
        q, k, v = (randn(256, 1, 64) for _ in range(3))
        cu = int32([0, 256])
        kc = int32([0, 384])
        k, v = randn(384, 1, 64), randn(384, 1, 64)
        args = dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=kc, head_mask_type=int32([1]),
                    streaming_info=int32([0, 0]), sparse_index=int32([0]), max_seqlen_q=256, max_seqlen_k=384,
                    block_indices=indices, block_counts=int32(counts).view(1, 1, 2), softmax_scale=None,
                    is_causal=False)
        try:
            out, _ = torch.ops.tkpy.block_sparse_attention_forward(**args)
        except ValueError as exc:
            assert not valid, f"valid lists {entries} {counts} refused: {exc}"
            assert "block_counts" in str(exc) or "block_indices" in str(exc), str(exc)
            return
        assert valid, f"invalid lists {entries} {counts} accepted"
        mask = torch.zeros(1, 1, 2, key_blocks, dtype=torch.bool)
        for r, c in enumerate(counts):
            mask[0, 0, r, entries[r * key_blocks:][:c]] = True
        ref, _ = reference.block_sparse_attention(q, k, v, cu, kc, int32([1]), int32([0, 0]), mask)
        error = reference.relative_error(out, ref)
        assert error < reference.REL_TOL[BF16], f"{entries} {counts}: relative error {error}"

    check()


def scalars_are_checked() -> None:
    """Any float for softmax_scale and softcap: refused, naming it, exactly when it is not finite
    or out of range; accepted ones give a finite output."""
    from hypothesis import given, settings, strategies as st

    @settings(max_examples=80, deadline=None, derandomize=True)
    @given(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["softmax_scale", "softcap"]))
    def check(value, name):
        torch.manual_seed(0)
        q, k, v = randn(1, 8, 2, 64), randn(1, 8, 2, 64), randn(1, 8, 2, 64)
        as_float32 = torch.tensor(value, dtype=torch.float64).float().item()  # what the kernels use
        valid = math.isfinite(as_float32) and (as_float32 > 0 if name == "softmax_scale" else value == 0 or as_float32 > 0)
        try:
            out = tkpy.flash_attn_func(q, k, v, **{name: value})
        except tkpy.ArgumentError as exc:
            assert not valid and name in str(exc), f"{name}={value}: {exc}"
            return
        assert valid, f"{name}={value} accepted"
        assert out.isfinite().all() or name == "softmax_scale", f"{name}={value}: non-finite output"

    check()


def huge_streaming_windows_are_exact() -> None:
    """streaming_info near INT32_MAX (a sink or local window wider than any sequence) sees every
    causal key, as the float64 reference says: no overflow in the block plans."""
    from tkpy import reference

    big = 2**31 - 1
    torch.manual_seed(0)
    cu = int32([0, 300])
    q, k, v = randn(300, 4, 64), randn(300, 4, 64), randn(300, 4, 64)
    for exact in (False, True):
        info = int32([big, 0, 0, big, big, big, 1, big])
        out = tkpy.block_streaming_attn_func(q, k, v, cu, cu, int32([-1] * 4), info, 300, 300, 0.0) if not exact \
            else tkpy.token_streaming_attn_func(q, k, v, cu, cu, int32([-1] * 4), info, 300, 300)
        ref, _ = reference.block_sparse_attention(q, k, v, cu, cu, int32([-1] * 4), info, None, is_causal=True,
                                                  exact_streaming=exact)
        error = reference.relative_error(out, ref)
        assert error < reference.REL_TOL[BF16], f"exact={exact}: relative error {error}"


PROPERTIES = {f.__name__: f for f in (overlap_is_exact, block_lists_are_checked, scalars_are_checked,
                                      huge_streaming_windows_are_exact)}


def run_property(name: str) -> str:
    """Run property `name`; '' when it holds, else its failure."""
    try:
        PROPERTIES[name]()
        return ""
    except BaseException:  # hypothesis' falsifying examples arrive as assorted exceptions
        return traceback.format_exc()


def run_valid(builder: str) -> str:
    """The unbroken call of a builder: it must run ('' when it does)."""
    try:
        torch.manual_seed(0)
        call = globals()[builder]()
        call.fn(**call.args)
        return ""
    except BaseException:
        return traceback.format_exc()


BUILDERS = sorted({case[0].__name__ for case in CASES.values()})


def crash_for_test() -> None:
    """Dies the way a segfault in native code would, for the guard's own test."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)

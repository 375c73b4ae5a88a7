"""tkpy.runtime's batched prefill: every prompt's keys and values go into the cache through one
``kv_append_`` per layer, and prompts of different lengths store and generate exactly what each
prompt stores and generates alone.

The one append pads each prompt to whole 64-token pages. What no query may see is checked against
a per-prompt reference, appended prompt by prompt through :meth:`tkpy.lserve.LServeCache.append`
into caches of its own; the visible tokens are the ones DESIGN.md §5 gives a decode query: every
prompt token of a retrieval head, and the sink and local tokens of a streaming head.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tkpy.lserve import LServeCache
from tkpy.runtime import LLM, LServeConfig
from tkpy.runtime.request import Request

PAGE, LOGICAL_PAGE = 64, 16
# Shorter than a page, just over two pages, a whole number of pages, and long enough that a
# streaming ring (3 pages with the windows below) wraps around twice.
LENGTHS = (5, 130, 192, 400)


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def write_pattern(path: Path, layers: int, kv_heads: int) -> str:
    gates = np.random.default_rng(0).uniform(size=(layers, kv_heads))
    path.write_text("\n".join("\t".join(f"{g:.6f}" for g in row) for row in gates) + "\n")
    return str(path)


def small_windows(tmp_path) -> LServeConfig:
    """Half of tiny-random's (layer, kv head) pairs streaming, with windows and a token budget far
    below the prompts, and a fresh page selection every step (so batching cannot change when)."""
    return LServeConfig(static_sparsity=0.5, pattern=write_pattern(tmp_path / "tiny.tsv", 4, 2), sink=64, local=64,
                        prefill_sink=64, prefill_local=128, token_budget=128, reuse_interval=1)


def tiny(lserve=None, max_batch_size=len(LENGTHS)) -> LLM:
    llm = LLM("tiny-random", device="cpu", dtype=torch.float16, lserve=lserve, max_batch_size=max_batch_size,
              max_seq_len=448, progress=False)
    with torch.no_grad():
        for layer in llm.model.layers:
            # Random init gives nearly uniform attention, under which a wrong key would barely move
            # the logits: sharpen it.
            layer.attn.qkv.weight[:layer.attn.q_size + layer.attn.kv_size] *= 8
    return llm


class CountAppends(TorchDispatchMode):
    """Records the k shape of every kv_append_ op, whichever Python function issued it."""

    def __init__(self):
        super().__init__()
        self.k_shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "kv_append_" in func.name():
            named = dict(zip((a.name for a in func._schema.arguments), args)) | kwargs
            self.k_shapes.append(tuple(named["k"].shape))
        return func(*args, **kwargs)


@pytest.mark.parametrize("mode", ["dense", "lserve"])
def test_prefill_appends_every_prompt_in_one_call_per_layer(mode, tmp_path):
    llm = tiny(small_windows(tmp_path) if mode == "lserve" else None)
    prompts = [prompt(n, i) for i, n in enumerate(LENGTHS)]
    with CountAppends() as appends:
        llm.generate(prompts, max_new_tokens=1)  # a prefill and no decode step
    rows = sum(math.ceil(n / PAGE) for n in LENGTHS)
    assert appends.k_shapes == [(rows, PAGE, llm.config.num_kv_heads, llm.config.head_dim)] * llm.config.num_layers


def prefill_recording_keys(llm: LLM, prompts: list[list[int]]):
    """Prefill the prompts as one batch; returns the requests and each layer's packed k and v."""
    backend = llm.runner.backend
    recorded = {}
    attention = backend.attention

    def recording(layer, q, k, v):
        recorded[layer] = (k.clone(), v.clone())
        return attention(layer, q, k, v)

    requests = [Request(list(p), len(p), 1) for p in prompts]
    for request in requests:
        llm.paging.reserve(request)
    backend.attention = recording
    try:
        with torch.inference_mode():
            llm.runner.prefill(requests)
    finally:
        del backend.attention
    return requests, recorded


def per_prompt_reference(cache: LServeCache, lserve, k, v, lengths, block_table, ring_table) -> LServeCache:
    """A cache like ``cache`` (zeroed), filled by one append per prompt."""
    reference = LServeCache(cache.num_pages, cache.max_seqs, cache.kv_head_streaming.tolist(), cache.head_dim,
                            cache.dtype, lserve, cache.device)
    start = 0
    for b, length in enumerate(lengths):
        reference.append(k[None, start:start + length], v[None, start:start + length], block_table[b:b + 1],
                         ring_table[b:b + 1], torch.zeros(1, dtype=torch.int32))
        start += length
    return reference


def ring_slot(page: torch.Tensor, cache: LServeCache) -> torch.Tensor:
    """DESIGN.md §5: sink pages keep their slot, later pages rotate through the other slots."""
    sink_pages, window_pages = cache.sink // PAGE, cache.local // PAGE + 1
    return torch.where(page < sink_pages, page, sink_pages + (page - sink_pages) % window_pages)


def visible(cache: LServeCache, block_row: torch.Tensor, ring_row: torch.Tensor, length: int) -> dict:
    """What the decode query after a ``length``-token prompt reads of it: every token of the
    retrieval heads with the stats of their logical pages, and the streaming heads' ring tokens in
    ``[0, sink)`` and the newest ``local`` (DESIGN.md §5)."""
    t = torch.arange(length)
    logical = torch.arange(math.ceil(length / LOGICAL_PAGE))
    pages, logical_pages = block_row[t // PAGE].long(), block_row[logical // (PAGE // LOGICAL_PAGE)].long()
    seen = {"k": cache.k[pages, t % PAGE], "v": cache.v[pages, t % PAGE],
            "k_min": cache.stats.k_min[logical_pages, logical % 4], "k_max": cache.stats.k_max[logical_pages, logical % 4]}
    ring_t = t[(t < cache.sink) | (t >= length + 1 - cache.local)]
    ring_pages = ring_row[ring_slot(ring_t // PAGE, cache)].long()
    seen.update(k_ring=cache.k_ring[ring_pages, ring_t % PAGE], v_ring=cache.v_ring[ring_pages, ring_t % PAGE])
    return seen


def test_ragged_prefill_stores_what_per_prompt_appends_store(tmp_path):
    lserve = small_windows(tmp_path)
    llm = tiny(lserve)
    prompts = [prompt(n, 10 + i) for i, n in enumerate(LENGTHS)]
    requests, recorded = prefill_recording_keys(llm, prompts)
    block_table = llm.paging.block_table(requests, torch.device("cpu"))
    ring_table = llm.runner.backend.ring_table(llm.paging.slot_ids(requests, torch.device("cpu")))
    checked_ring = False
    for layer, cache in enumerate(llm.runner.backend.caches):
        reference = per_prompt_reference(cache, lserve, *recorded[layer], LENGTHS, block_table, ring_table)
        for b, length in enumerate(LENGTHS):
            ours = visible(cache, block_table[b], ring_table[b], length)
            theirs = visible(reference, block_table[b], ring_table[b], length)
            for name in ours:
                assert torch.equal(ours[name], theirs[name]), f"layer {layer}, prompt of {length} tokens: {name}"
            checked_ring |= cache.num_streaming_heads > 0 and length > cache.sink + cache.local + PAGE
    assert checked_ring  # a wrapped ring of a streaming head was compared


def test_one_append_writes_each_ring_page_of_a_prompt_once(tmp_path):
    # The rows of one append are written in parallel: two rows writing the same ring page of a
    # prompt would race (the CPU's order may hide it from the test above; a GPU's does not).
    llm = tiny(small_windows(tmp_path))
    requests = [Request(prompt(n, i), n, 1) for i, n in enumerate(LENGTHS)]
    for request in requests:
        llm.paging.reserve(request)
    backend = llm.runner.backend
    cpu = torch.device("cpu")
    plan = backend.plan_prefill(list(LENGTHS), llm.paging.block_table(requests, cpu), llm.paging.slot_ids(requests, cpu))
    scratch = backend.ring_table(torch.zeros(1, dtype=torch.int32))[0]
    written = [int(ring_row[ring_slot(seqlen // PAGE, backend.caches[0])])
               for ring_row, seqlen in zip(plan.row_ring_table, plan.row_seqlens) if not torch.equal(ring_row, scratch)]
    assert len(written) < len(plan.row_seqlens)  # the 400-token prompt's overwritten pages go to scratch
    assert len(set(written)) == len(written), written


@pytest.mark.parametrize("mode", ["dense", "lserve"])
def test_ragged_batch_generates_what_each_prompt_generates_alone(mode, tmp_path):
    llm = tiny(small_windows(tmp_path) if mode == "lserve" else None)
    prompts = [prompt(n, 20 + i) for i, n in enumerate(LENGTHS)]
    alone = [llm.generate(p, max_new_tokens=12)[0].token_ids for p in prompts]
    together = [g.token_ids for g in llm.generate(prompts, max_new_tokens=12)]
    assert together == alone
    # The prefill's logits of each prompt's last token, batched and alone.
    requests = [Request(list(p), len(p), 1) for p in prompts]
    for request in requests:
        llm.paging.reserve(request)
    with torch.inference_mode():
        batched = llm.runner.prefill(requests)
    for request in requests:
        llm.paging.release(request)
    for row, p in zip(batched, prompts):
        torch.testing.assert_close(row, llm.prefill_logits(p)[-1], atol=2e-3, rtol=0)

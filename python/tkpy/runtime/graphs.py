"""CUDA graphs of the decode step: one per batch size, captured on first use.

A decode step is dozens of small launches per layer; replaying them as one graph removes the
launch overhead that dominates at small batch. Inputs are copied into static buffers (sliced per
batch size) before each replay. With LServe a batch size gets two graphs, captured back to back:
one that recomputes every layer's page selection and one that reuses it. The reuse graph reads
the very tensors the recompute graph writes, because the per-layer :class:`PageSelector` returns
its cached selection (allocated during the first capture, in that graph's private memory pool)
while the second is captured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .llm import LLM

__all__ = ["DecodeGraphs"]


class DecodeGraphs:
    def __init__(self, llm: "LLM", max_batch_size: int):
        self.llm = llm
        device = llm.device
        self.tokens = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        self.cache_seqlens = torch.zeros(max_batch_size, dtype=torch.int32, device=device)
        # Row 0 everywhere is the scratch page and the scratch ring slot: what a capture's warm-up
        # writes into, so capturing never touches a live sequence's cache.
        self.block_table = torch.zeros(max_batch_size, llm.pages_per_seq, dtype=torch.int32, device=device)
        self.ring_table = llm.cache.ring_table(torch.zeros(max_batch_size, dtype=torch.int32, device=device))
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _inputs(self, batch_size: int):
        return (self.tokens[:batch_size], self.cache_seqlens[:batch_size], self.block_table[:batch_size],
                self.ring_table[:batch_size])

    def _capture(self, batch_size: int) -> None:
        self.tokens.zero_()
        self.cache_seqlens.zero_()
        self.block_table.zero_()
        self.ring_table.copy_(self.llm.cache.ring_table(torch.zeros_like(self.cache_seqlens)))
        inputs = self._inputs(batch_size)
        lserve = self.llm.cache.lserve is not None
        # Warm up on a side stream (lazy library initialisation must not happen during capture).
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.llm.decode_step(*inputs, step=0)
        torch.cuda.current_stream().wait_stream(stream)
        for recompute in ((True, False) if lserve else (True,)):
            graph = torch.cuda.CUDAGraph()
            # An explicit capture stream on the model's device: torch.cuda.graph's default one is
            # made once per process, on whichever device was current then.
            with torch.cuda.graph(graph, stream=stream):
                # step 0 recomputes the selection, step 1 reuses the one cached just before.
                logits = self.llm.decode_step(*inputs, step=0 if recompute else 1)
            self.graphs[batch_size, recompute] = graph, logits

    def run(self, tokens, cache_seqlens, block_table, ring_table, step: int) -> torch.Tensor:
        """float32 ``[B, vocab]`` logits of one decode step (a view of the graph's output buffer)."""
        batch_size = tokens.shape[0]
        lserve = self.llm.cache.lserve
        recompute = lserve is None or step % lserve.reuse_interval == 0
        # Capture on the model's device even when another one is current (LLM(device="cuda:1")):
        # streams, synchronize and the capture itself follow the current device.
        with torch.cuda.device(self.llm.device):
            if (batch_size, recompute) not in self.graphs:
                self._capture(batch_size)
            for static, value in zip(self._inputs(batch_size), (tokens, cache_seqlens, block_table, ring_table)):
                static.copy_(value)
            graph, logits = self.graphs[batch_size, recompute]
            graph.replay()
        return logits

"""CUDA graphs of a decode step: one per batch size, captured on first use.

A decode step is dozens of small launches per layer; replaying them as one graph removes the
launch overhead that dominates at small batch. Inputs are copied into static buffers (sliced per
batch size) before each replay. With page selection (LServe) a batch size gets two graphs,
captured back to back: one that recomputes every layer's page selection and one that reuses it.
The reuse graph reads the very tensors the recompute graph writes, because the per-layer
:class:`~tkpy.lserve.PageSelector` returns its cached selection (allocated during the first
capture, in that graph's private memory pool) while the second is captured.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["DecodeGraphs", "DecodeStep"]

# (tokens int64 [B], cache_seqlens int32 [B], block_table int32 [B, max_pages],
#  ring_table int32 [B, ring_pages], step) -> float32 logits [B, vocab], on device tensors only.
DecodeStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


class DecodeGraphs:
    """Replays ``step`` through CUDA graphs.

    Parameters
    ----------
    step : DecodeStep
        One decode step; it allocates nothing it keeps and syncs nothing, so it can be captured.
    max_batch_size, max_pages : int
        Rows and block-table columns of the static inputs.
    scratch_ring : int32 Tensor ``[ring_pages]``
        The ring pages of the scratch slot. Row 0 everywhere is the scratch page and the scratch
        ring: what a capture's warm-up writes into, so capturing never touches a live sequence.
    reuse_interval : int, optional
        Steps a page selection is reused (step ``s`` recomputes it when ``s % reuse_interval == 0``);
        None when the step selects no pages (dense), which then needs one graph per batch size.
    """

    def __init__(self, step: DecodeStep, max_batch_size: int, max_pages: int, scratch_ring: torch.Tensor,
                 reuse_interval: Optional[int]):
        self.step, self.reuse_interval = step, reuse_interval
        self.device = scratch_ring.device
        self.scratch_ring = scratch_ring
        self.tokens = torch.zeros(max_batch_size, dtype=torch.int64, device=self.device)
        self.cache_seqlens = torch.zeros(max_batch_size, dtype=torch.int32, device=self.device)
        self.block_table = torch.zeros(max_batch_size, max_pages, dtype=torch.int32, device=self.device)
        self.ring_table = scratch_ring.expand(max_batch_size, -1).clone()
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _inputs(self, batch_size: int):
        return (self.tokens[:batch_size], self.cache_seqlens[:batch_size], self.block_table[:batch_size],
                self.ring_table[:batch_size])

    def _capture(self, batch_size: int) -> None:
        self.tokens.zero_()
        self.cache_seqlens.zero_()
        self.block_table.zero_()
        self.ring_table.copy_(self.scratch_ring.expand_as(self.ring_table))
        inputs = self._inputs(batch_size)
        # Warm up on a side stream (lazy library initialisation must not happen during capture).
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.step(*inputs, 0)
        torch.cuda.current_stream().wait_stream(stream)
        for recompute in ((True, False) if self.reuse_interval is not None else (True,)):
            graph = torch.cuda.CUDAGraph()
            # An explicit capture stream on the model's device: torch.cuda.graph's default one is
            # made once per process, on whichever device was current then.
            with torch.cuda.graph(graph, stream=stream):
                # step 0 recomputes the selection, step 1 reuses the one cached just before.
                logits = self.step(*inputs, 0 if recompute else 1)
            self.graphs[batch_size, recompute] = graph, logits

    def _recomputes(self, step: int) -> bool:
        return self.reuse_interval is None or step % self.reuse_interval == 0

    def captured(self, batch_size: int, step: int) -> bool:
        """Whether the graph that decode step ``step`` of ``batch_size`` rows replays exists."""
        return (batch_size, self._recomputes(step)) in self.graphs

    def run(self, tokens, cache_seqlens, block_table, ring_table, step: int) -> torch.Tensor:
        """float32 ``[B, vocab]`` logits of one decode step (a view of the graph's output buffer)."""
        batch_size = tokens.shape[0]
        recompute = self._recomputes(step)
        # Capture on the model's device even when another one is current (LLM(device="cuda:1")):
        # streams, synchronize and the capture itself follow the current device.
        with torch.cuda.device(self.device):
            if (batch_size, recompute) not in self.graphs:
                self._capture(batch_size)
            for static, value in zip(self._inputs(batch_size), (tokens, cache_seqlens, block_table, ring_table)):
                static.copy_(value)
            graph, logits = self.graphs[batch_size, recompute]
            graph.replay()
        return logits

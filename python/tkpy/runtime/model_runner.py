"""The model runner: turns a batch of requests into a forward pass and returns its logits.

A prefill packs the prompts into one pass; a decode step feeds each request's newest token,
eagerly or, on a GPU, through CUDA graphs of :meth:`ModelRunner.decode_step`.
"""

from __future__ import annotations

import torch

from .attention import AttentionBackend
from .graphs import DecodeGraphs
from .model import Transformer
from .paging import Paging
from .request import Request

__all__ = ["ModelRunner"]


class ModelRunner:
    def __init__(self, model: Transformer, backend: AttentionBackend, paging: Paging, max_batch_size: int,
                 cuda_graphs: bool):
        self.model, self.backend, self.paging = model, backend, paging
        self.device = backend.device
        # Decode steps since the batch last changed: a page selection is reused for some steps.
        self.step = 0
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda":
            scratch_ring = backend.ring_table(torch.zeros(1, dtype=torch.int32, device=self.device))[0]
            reuse_interval = None if backend.lserve is None else backend.lserve.reuse_interval
            self.graphs = DecodeGraphs(self.decode_step, max_batch_size, paging.max_pages, scratch_ring, reuse_interval)

    def captures_next(self, batch_size: int) -> bool:
        """Whether the next decode step of ``batch_size`` requests captures a CUDA graph first."""
        return self.graphs is not None and not self.graphs.captured(batch_size, self.step)

    def batch_changed(self) -> None:
        """A prefill or a finished request: page selections cached for the old rows are stale."""
        self.backend.reset_selection()
        self.step = 0

    def prefill_hidden(self, requests: list[Request]) -> torch.Tensor:
        """Run the prompts packed into one pass: hidden states ``[T, hidden]``, prompt after prompt."""
        tokens = torch.tensor([t for r in requests for t in r.tokens[:r.prompt_len]], device=self.device)
        self.backend.plan_prefill([r.prompt_len for r in requests], self.paging.block_table(requests, self.device),
                                  self.paging.slot_ids(requests, self.device))
        self.batch_changed()
        return self.model(tokens, self.backend)

    def prefill(self, requests: list[Request]) -> torch.Tensor:
        """float32 ``[B, vocab]``: the logits after each prompt's last token."""
        hidden = self.prefill_hidden(requests)
        return self.model.logits(hidden[self.backend.metadata.cu_seqlens[1:].long() - 1])

    def decode(self, requests: list[Request]) -> torch.Tensor:
        """float32 ``[B, vocab]``: feed each request's newest token."""
        tokens = torch.tensor([r.tokens[-1] for r in requests], device=self.device)
        cache_seqlens = torch.tensor([len(r.tokens) - 1 for r in requests], dtype=torch.int32, device=self.device)
        block_table = self.paging.block_table(requests, self.device)
        ring_table = self.backend.ring_table(self.paging.slot_ids(requests, self.device))
        step, self.step = self.step, self.step + 1
        if self.graphs is not None:
            return self.graphs.run(tokens, cache_seqlens, block_table, ring_table, step)
        return self.decode_step(tokens, cache_seqlens, block_table, ring_table, step)

    def decode_step(self, tokens, cache_seqlens, block_table, ring_table, step: int) -> torch.Tensor:
        """One decode step on device tensors only (what a CUDA graph captures)."""
        self.backend.plan_decode(cache_seqlens, block_table, ring_table, step)
        return self.model.logits(self.model(tokens, self.backend))

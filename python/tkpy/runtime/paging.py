"""Paged KV memory: the pool pages and the streaming-ring slot each request holds, and the block
tables that address them."""

from __future__ import annotations

import math

import torch

from ..lserve.config import PAGE_TOKENS
from .request import Request

__all__ = ["PAGE_TOKENS", "PageAllocator", "Paging"]


class PageAllocator:
    """Hands out ids ``1 .. count - 1``. Id 0 is never handed out: it is the scratch page (and
    scratch ring slot) that padding rows and CUDA-graph warm-ups write into.

    Ids never handed out are a counter, not a list, so a pool of any size costs nothing until it is
    used. Ids given back are handed out again before unused ones: the last batch given back first,
    in its own order.
    """

    def __init__(self, count: int, what: str = "pages"):
        self.count, self.what = count, what
        self._next_unused = 1  # ids from here to count - 1 were never handed out
        self._freed: list[int] = []  # each batch reversed: pop() returns the last batch's first id

    @property
    def num_free(self) -> int:
        return len(self._freed) + self.count - self._next_unused

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"out of KV {self.what}: asked for {n}, {self.num_free} free")
        reused = [self._freed.pop() for _ in range(min(n, len(self._freed)))]
        fresh = range(self._next_unused, self._next_unused + n - len(reused))
        self._next_unused = fresh.stop
        return reused + list(fresh)

    def free(self, ids: list[int]) -> None:
        self._freed.extend(reversed(ids))


class Paging:
    """A pool of ``num_pages`` pages (each ``PAGE_TOKENS`` tokens of every layer's KV) for requests
    of up to ``max_seq_len`` tokens, and one streaming-ring slot per request of a batch of up to
    ``max_batch_size``.

    A request reserves every page it can need when it is admitted, so a running batch can never
    run out of pages halfway through.
    """

    def __init__(self, max_batch_size: int, max_seq_len: int, num_pages: int):
        self.max_pages = math.ceil(max_seq_len / PAGE_TOKENS)  # block-table columns
        # +1: page 0 and ring slot 0 are scratch (PageAllocator never hands them out).
        self.pages = PageAllocator(num_pages + 1, "pages")
        self.slots = PageAllocator(max_batch_size + 1, "ring slots")

    @staticmethod
    def pages_needed(request: Request) -> int:
        # The last generated token is never fed back, so the cache holds at most len - 1 tokens.
        return math.ceil((request.prompt_len + request.max_new_tokens - 1) / PAGE_TOKENS)

    def fits(self, request: Request) -> bool:
        return self.pages.num_free >= self.pages_needed(request) and self.slots.num_free > 0

    def reserve(self, request: Request) -> None:
        request.pages = self.pages.allocate(self.pages_needed(request))
        request.slot = self.slots.allocate(1)[0]

    def release(self, request: Request) -> None:
        self.pages.free(request.pages)
        self.slots.free([request.slot])
        request.pages = []

    def block_table(self, requests: list[Request], device: torch.device) -> torch.Tensor:
        """int32 ``[B, max_pages]``: each request's pages, padded with the scratch page."""
        rows = [r.pages + [0] * (self.max_pages - len(r.pages)) for r in requests]
        return torch.tensor(rows, dtype=torch.int32, device=device)

    @staticmethod
    def slot_ids(requests: list[Request], device: torch.device) -> torch.Tensor:
        """int32 ``[B]``: each request's ring slot."""
        return torch.tensor([r.slot for r in requests], dtype=torch.int32, device=device)

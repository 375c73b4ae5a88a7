"""The scheduler: requests in, batches out.

Waiting requests are admitted oldest first, while the batch has a place, the pool has pages for
their whole length, and the step's prompts stay within ``max_prefill_tokens`` (the first one is
admitted whatever its length). A step prefills the requests just admitted; when none was admitted,
it decodes one token of every running request. A request that ends, or is aborted, gives its pages
back at once, so a waiting one can take its place at the next step.
"""

from __future__ import annotations

from collections import deque

from .paging import Paging
from .request import Request

__all__ = ["Scheduler"]


class Scheduler:
    def __init__(self, paging: Paging, max_batch_size: int, max_prefill_tokens: int):
        self.paging, self.max_batch_size, self.max_prefill_tokens = paging, max_batch_size, max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> tuple[list[Request], bool]:
        """The requests of the next step, and whether that step is their prefill."""
        admitted, prompt_tokens = [], 0
        while (self.waiting and len(self.running) + len(admitted) < self.max_batch_size
               and self.paging.fits(self.waiting[0])
               and (not admitted or prompt_tokens + self.waiting[0].prompt_len <= self.max_prefill_tokens)):
            request = self.waiting.popleft()
            self.paging.reserve(request)
            admitted.append(request)
            prompt_tokens += request.prompt_len
        if admitted:
            self.running += admitted
            return admitted, True
        return list(self.running), False

    def postprocess(self, requests: list[Request], next_tokens: list[int]) -> list[Request]:
        """Append each request's next token; release and return the requests that ended."""
        for request, token in zip(requests, next_tokens):
            request.tokens.append(token)
            request.stop.check(request)
        finished = [r for r in self.running if r.finish_reason is not None]
        for request in finished:
            self.running.remove(request)
            self.paging.release(request)
        return finished

    def abort(self, request: Request) -> bool:
        """Take a request out, waiting or running, and give back its pages. True when it was
        running: the batch then changed."""
        if request.finish_reason is None:
            request.finish_reason = "abort"
        if request in self.waiting:
            self.waiting.remove(request)
            return False
        if request in self.running:
            self.running.remove(request)
            self.paging.release(request)
            return True
        return False

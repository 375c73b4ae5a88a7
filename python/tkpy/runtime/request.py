"""One request's state, when it stops, its result, the timing of a generate call, and sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Callable, Optional

import torch

from ..errors import ArgumentError

__all__ = ["Generation", "Request", "Sampling", "StopRule", "TextStream", "Timing", "check_sampling", "sample",
           "sample_rows"]


@dataclass
class Generation:
    """One prompt's result. ``token_ids`` are the generated tokens, ending with the stop token or
    EOS that ended them (as transformers returns them); ``text`` is their decoding without special
    tokens, cut before a stop string."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS, a stop token or a stop string), "length", or "abort"


@dataclass
class Timing:
    """Wall time of the last :meth:`LLM.generate`, split into prefill and decode steps.

    A step's time runs from its launch to its sampled tokens on the host. Warm-up is not in it
    (:class:`LLM` warms up when it is built), nor is a decode step that captured a CUDA graph:
    such steps and their time are counted apart, in ``capture_steps`` and ``capture_seconds``.
    """

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    capture_steps: int = 0
    capture_seconds: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    def summary(self) -> str:
        """One line saying what was measured."""
        line = (f"prefill: {self.prefill_tokens} prompt tokens in {self.prefill_seconds:.3f} s "
                f"({self.prefill_tokens_per_s:.1f} tokens/s); decode: {self.decode_tokens} tokens in "
                f"{self.decode_seconds:.3f} s ({self.decode_tokens_per_s:.1f} tokens/s)")
        if self.capture_steps:
            line += (f"; not counted: {self.capture_steps} decode steps that captured CUDA graphs "
                     f"({self.capture_seconds:.3f} s)")
        return line + "; after warm-up"


@dataclass(frozen=True)
class Sampling:
    """How a request picks its next token: greedy at temperature 0, else nucleus sampling with
    ``top_p``, drawing from ``generator`` (None: torch's default one)."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: Optional[torch.Generator] = None


@dataclass(frozen=True)
class StopRule:
    """When a request ends: at a stop token id (the model's EOS ones included), at a stop string in
    its decoded text (the text is cut before it), or after ``max_new_tokens``."""

    token_ids: frozenset[int]
    texts: tuple[str, ...] = ()
    decode: Optional[Callable[[list[int]], str]] = None  # generated token ids -> text (for ``texts``)

    def check(self, request: Request) -> None:
        """Set ``request.finish_reason`` (and ``text`` for a stop string) once it has ended."""
        if request.tokens[-1] in self.token_ids:
            request.finish_reason = "stop"
        elif self.texts:
            text = self.decode(request.generated)
            cut = min((i for i in (text.find(s) for s in self.texts) if i >= 0), default=-1)
            if cut >= 0:
                request.finish_reason, request.text = "stop", text[:cut]
        if request.finish_reason is None and len(request.generated) >= request.max_new_tokens:
            request.finish_reason = "length"


@dataclass(eq=False)  # a request is itself, not its contents: two equal prompts are two requests
class Request:
    tokens: list[int]  # prompt, then generated tokens
    prompt_len: int
    max_new_tokens: int
    pages: list[int] = field(default_factory=list)
    slot: int = 0
    finish_reason: Optional[str] = None  # "stop", "length", or "abort" (taken out before its end)
    text: Optional[str] = None  # set when a stop string cut the text
    stop: StopRule = field(default_factory=lambda: StopRule(frozenset()))
    sampling: Sampling = Sampling()

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]


class TextStream:
    """A request's text as it grows, handed out in pieces that are final: never part of a UTF-8
    character still incomplete (decoded as U+FFFD), never the start of a stop string that the
    next tokens may complete. Once the request ended, the rest of its final text.

    ``decode`` is the tokenizer's (token ids -> text); the pieces concatenate to the text that
    :class:`Generation` holds.
    """

    def __init__(self, request: Request, decode: Callable[[list[int]], str]):
        self.request, self.decode, self.sent = request, decode, 0

    def next_piece(self) -> str:
        request = self.request
        if request.finish_reason is not None:
            text = request.text if request.text is not None else self.decode(request.generated)
            end = len(text)
        else:
            text = self.decode(request.generated)
            end = len(text.rstrip("\ufffd"))
            # Hold back the longest suffix that may begin a stop string.
            end -= max((k for stop in request.stop.texts for k in range(1, min(len(stop) - 1, end) + 1)
                        if text.endswith(stop[:k], 0, end)), default=0)
        piece = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece


def _is_finite(value) -> bool:
    if not isinstance(value, Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond any float
        return False


def check_sampling(temperature: float, top_p: float, caller: str = "sample") -> None:
    """Refuse sampling arguments that have no meaning, rather than answer wrongly: a top_p <= 0
    would mask every token, a NaN or infinite temperature every probability."""
    if not _is_finite(temperature) or temperature < 0:
        raise ArgumentError(f"{caller}: temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if not isinstance(top_p, Real) or isinstance(top_p, bool) or not 0 < top_p <= 1:  # also false for NaN
        raise ArgumentError(f"{caller}: top_p must be a number in (0, 1], got {top_p!r}")


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """int64 ``[B]`` next tokens from float32 ``[B, vocab]`` logits: greedy at temperature 0, else
    nucleus sampling."""
    check_sampling(temperature, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    # Shifted so that the best logit is 0 before the division: a tiny temperature then sends the
    # others to -inf (probability 0), where dividing first would overflow the best to inf, and
    # softmax(inf - inf) is NaN. Below the dtype's smallest normal number the temperature would
    # round to 0 (and 0 / 0 is NaN); every such temperature is greedy anyway.
    temperature = max(temperature, torch.finfo(logits.dtype).tiny)
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        sorted_probs.masked_fill_((sorted_probs.cumsum(-1) - sorted_probs) >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    # argmax(p / E) with E ~ Exp(1) draws from p, without torch.multinomial's host sync.
    return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(-1)


def sample_rows(logits: torch.Tensor, requests: list) -> torch.Tensor:
    """int64 ``[B]`` next tokens, row ``i`` drawn as ``requests[i].sampling`` says. Rows that sample
    alike are drawn together (one group in :meth:`LLM.generate`, a few in a server's batch)."""
    groups: dict[tuple, list[int]] = {}
    for row, request in enumerate(requests):
        s = request.sampling
        groups.setdefault((s.temperature, s.top_p, id(s.generator)), []).append(row)
    if len(groups) == 1:
        s = requests[0].sampling
        return sample(logits, s.temperature, s.top_p, s.generator)
    tokens = torch.empty(len(requests), dtype=torch.int64, device=logits.device)
    for rows in groups.values():
        s = requests[rows[0]].sampling
        index = torch.tensor(rows, device=logits.device)
        tokens[index] = sample(logits[index], s.temperature, s.top_p, s.generator)
    return tokens

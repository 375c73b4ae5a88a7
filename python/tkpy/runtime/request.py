"""One request's state, when it stops, its result, the timing of a generate call, and sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Callable, Optional

import torch

from ..errors import ArgumentError

__all__ = ["Generation", "Request", "StopRule", "Timing", "check_sampling", "sample"]


@dataclass
class Generation:
    """One prompt's result. ``token_ids`` are the generated tokens, ending with the stop token or
    EOS that ended them (as transformers returns them); ``text`` is their decoding without special
    tokens, cut before a stop string."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS, a stop token or a stop string) or "length"


@dataclass
class Timing:
    """Wall time of the last :meth:`LLM.generate`, split into prefill and decode."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class Request:
    tokens: list[int]  # prompt, then generated tokens
    prompt_len: int
    max_new_tokens: int
    pages: list[int] = field(default_factory=list)
    slot: int = 0
    finish_reason: Optional[str] = None
    text: Optional[str] = None  # set when a stop string cut the text

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]


@dataclass(frozen=True)
class StopRule:
    """When a request ends: at a stop token id (the model's EOS ones included), at a stop string in
    its decoded text (the text is cut before it), or after ``max_new_tokens``."""

    token_ids: frozenset[int]
    texts: tuple[str, ...]
    decode: Callable[[list[int]], str]  # generated token ids -> text

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

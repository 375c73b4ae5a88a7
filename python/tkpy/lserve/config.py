"""LServe's knobs for one model: static sparsity, streaming windows, token budget, reuse, KV dtype."""

from __future__ import annotations

from dataclasses import dataclass
from os import PathLike
from typing import Optional, Union

import torch

from ..errors import ArgumentError
from ..validation import positive_as_float32
from .head_pattern import HeadPattern

__all__ = ["LServeConfig", "PAGE_TOKENS", "LOGICAL_PAGE_TOKENS"]

# A physical KV page and the logical pages (page-stats granularity) inside it (DESIGN.md §5).
PAGE_TOKENS = 64
LOGICAL_PAGE_TOKENS = 16
# Windows and budgets in tokens: the kernels hold them in int32 (decode caps sink and local at 2^30).
MAX_TOKENS = 2**30


@dataclass(frozen=True, slots=True)
class LServeConfig:
    """Everything LServe needs besides the model's shapes.

    Parameters
    ----------
    static_sparsity : float in [0, 1]
        Fraction of (layer, kv head) pairs made streaming by the DuoAttention pattern.
    pattern : str or PathLike, optional
        DuoAttention ``full_attention_heads.tsv`` (see :meth:`head_pattern`).
    sink, local : int
        Decode streaming window in tokens, multiples of 64 (``local >= 64``): a streaming head sees
        ``[0, sink)`` and the newest ``local`` tokens, the current one included.
    prefill_sink, prefill_local : int
        Prefill streaming window in tokens (``tkpy.token_streaming_attn_func``).
    token_budget : int
        Tokens a retrieval head reads per decode step once the context is longer: the top
        ``max(3, token_budget // 64) - 1`` pages by score plus the newest page.
    reuse_interval : int
        A page selection is recomputed every ``reuse_interval`` decode steps.
    kv_dtype : None or torch.int8
        None stores K/V in the model's dtype; ``torch.int8`` is per-tensor symmetric INT8.
    k_scale, v_scale : float, optional
        INT8 only, and then required: the static per-tensor scales (value = stored · scale), e.g.
        ``max|k| / 127`` measured on calibration data.
    """

    static_sparsity: float = 0.5
    pattern: Optional[Union[str, PathLike]] = None
    sink: int = 128
    local: int = 256
    prefill_sink: int = 128
    prefill_local: int = 8192
    token_budget: int = 4096
    reuse_interval: int = 4
    kv_dtype: Optional[torch.dtype] = None
    k_scale: Optional[float] = None
    v_scale: Optional[float] = None

    def __post_init__(self):
        if self.pattern is not None and not isinstance(self.pattern, (str, PathLike)):
            raise TypeError(f"LServeConfig: pattern must be a path (str or PathLike), "
                            f"got {type(self.pattern).__name__}")
        if not isinstance(self.static_sparsity, (int, float)) or not 0.0 <= self.static_sparsity <= 1.0:
            raise ArgumentError(f"LServeConfig: static_sparsity must be in [0, 1], got {self.static_sparsity!r}")
        for name in ("sink", "local", "prefill_sink", "prefill_local", "token_budget", "reuse_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"LServeConfig: {name} must be an int, got {type(value).__name__}")
            if value > MAX_TOKENS:
                raise ArgumentError(f"LServeConfig: {name} must be at most {MAX_TOKENS} (the kernels' windows), "
                                    f"got {value}")
        if self.sink < 0 or self.sink % PAGE_TOKENS:
            raise ArgumentError(f"LServeConfig: sink must be a multiple of {PAGE_TOKENS} tokens >= 0, got {self.sink}")
        if self.local < PAGE_TOKENS or self.local % PAGE_TOKENS:
            raise ArgumentError(f"LServeConfig: local must be a multiple of {PAGE_TOKENS} tokens >= {PAGE_TOKENS}, got {self.local}")
        if self.prefill_sink < 0 or self.prefill_local < 1:
            raise ArgumentError(
                f"LServeConfig: expected prefill_sink >= 0 and prefill_local >= 1 tokens, got "
                f"{self.prefill_sink} and {self.prefill_local}"
            )
        if self.token_budget < 1:
            raise ArgumentError(f"LServeConfig: token_budget must be >= 1 token, got {self.token_budget}")
        if self.reuse_interval < 1:
            raise ArgumentError(f"LServeConfig: reuse_interval must be >= 1 step, got {self.reuse_interval}")
        if self.kv_dtype not in (None, torch.int8):
            raise ArgumentError(f"LServeConfig: kv_dtype must be None (the model's dtype) or torch.int8, got {self.kv_dtype}")
        if self.kv_dtype == torch.int8:
            for name in ("k_scale", "v_scale"):
                value = getattr(self, name)
                if not positive_as_float32(value):
                    raise ArgumentError(f"LServeConfig: INT8 KV needs a static {name} > 0, finite as the kernels' "
                                        f"float32, got {value!r}")
        elif self.k_scale is not None or self.v_scale is not None:
            raise ArgumentError("LServeConfig: k_scale/v_scale are for kv_dtype=torch.int8 only")

    def head_pattern(self, num_query_heads: int, seed: int = 0) -> HeadPattern:
        """The streaming heads of every layer from :attr:`pattern`, at :attr:`static_sparsity`, with
        the prefill window (``prefill_sink``, ``prefill_local``)."""
        if self.pattern is None:
            raise ArgumentError("LServeConfig.head_pattern: no pattern file was given (pattern=None)")
        return HeadPattern.load(self.pattern, num_query_heads, self.static_sparsity, self.prefill_sink,
                                self.prefill_local, seed)

    @property
    def ring_pages(self) -> int:
        """Pages of one sequence's streaming ring: ``sink/64 + local/64 + 1``."""
        return self.sink // PAGE_TOKENS + self.local // PAGE_TOKENS + 1

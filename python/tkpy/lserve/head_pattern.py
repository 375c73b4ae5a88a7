"""Which heads are streaming: DuoAttention gate values turned into Block-Sparse-Attention inputs.

A DuoAttention pattern file holds one row per layer and one tab-separated gate in [0, 1] per KV
head; a high gate marks a retrieval (dense) head. :meth:`HeadPattern.load` applies LServe's global
quantile rule (DESIGN.md §5) and the pattern then hands out, per layer, the ``head_mask_type`` and
``streaming_info`` tensors that ``tkpy.block_sparse_attn_func`` and its siblings take.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Union

import numpy as np
import torch

from ..errors import ArgumentError

__all__ = ["HeadPattern"]

# Block-Sparse-Attention counts non-exact streaming windows in blocks of this many tokens.
BLOCK_TOKENS = 128
# DuoAttention's tie breaker: small enough not to reorder distinct gates, large enough to split ties.
TIE_NOISE = 1e-6
# Trained gates overshoot [0, 1] a little (the released Llama-3-Gradient and Mistral patterns go
# down to -2.4e-4) and DuoAttention clips them on load; a value further out means a wrong file.
GATE_SLACK = 1e-3

DENSE, STREAMING = 0, -1
# Head counts and windows end up in int32 tensors.
MAX_TOKENS = 2**31 - 1


def _read_gates(path: Union[str, PathLike]) -> np.ndarray:
    """Parse a pattern file into float64 ``[num_layers, num_kv_heads]`` clipped to [0, 1].

    Gates within ``GATE_SLACK`` of [0, 1] are clipped; anything else raises, naming the line.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ArgumentError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows: list[list[float]] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        row = []
        for column, token in enumerate(line.strip().split("\t"), start=1):
            try:
                gate = float(token)
            except ValueError:
                raise ArgumentError(f"{path}:{line_no}: column {column}: {token!r} is not a number") from None
            if not -GATE_SLACK <= gate <= 1.0 + GATE_SLACK:  # also false for NaN
                raise ArgumentError(f"{path}:{line_no}: column {column}: gate {token!r} is not in [0, 1]")
            row.append(min(max(gate, 0.0), 1.0))
        if rows and len(row) != len(rows[0]):
            raise ArgumentError(
                f"{path}:{line_no}: expected {len(rows[0])} tab-separated gates (one per KV head, as in "
                f"the first row), got {len(row)}"
            )
        rows.append(row)
    if not rows:
        raise ArgumentError(f"{path}: no gate rows (expected one row per layer)")
    return np.array(rows, dtype=np.float64)


@dataclass(frozen=True, eq=False)
class HeadPattern:
    """Per-layer head types of a model: each KV head is dense (retrieval) or streaming.

    Parameters
    ----------
    streaming_mask : bool array-like ``[num_layers, num_kv_heads]``
        True where the KV head is streaming. Stored as a read-only ``np.ndarray`` copy.
    num_query_heads : int
        Query heads per layer; a multiple of ``num_kv_heads`` (GQA groups of equal size).
    sink, local : int
        Streaming window in tokens (DESIGN.md §5 prefill defaults: 128 and 8192). The local window
        includes the query's own position.
    exact_streaming : bool
        True: ``streaming_info`` counts tokens. False: it counts 128-token blocks, so ``sink`` and
        ``local`` must be multiples of 128.
    """

    streaming_mask: np.ndarray = field(repr=False)
    num_query_heads: int
    sink: int = 128
    local: int = 8192
    exact_streaming: bool = True

    def __post_init__(self):
        try:
            mask = np.array(self.streaming_mask)
        except ValueError:
            raise ArgumentError("streaming_mask: expected a bool [num_layers, num_kv_heads] array, got rows of "
                                "different lengths") from None
        if mask.dtype != np.bool_ or mask.ndim != 2 or mask.size == 0:
            raise ArgumentError(
                f"streaming_mask: expected a non-empty bool [num_layers, num_kv_heads] array, "
                f"got dtype {mask.dtype} and shape {mask.shape}"
            )
        mask.setflags(write=False)
        object.__setattr__(self, "streaming_mask", mask)
        for name in ("num_query_heads", "sink", "local"):
            _check_int(name, getattr(self, name))
        if not isinstance(self.exact_streaming, bool):
            raise TypeError(f"exact_streaming must be a bool, got {type(self.exact_streaming).__name__}")
        if self.num_query_heads <= 0 or self.num_query_heads % self.num_kv_heads:
            raise ArgumentError(
                f"num_query_heads must be a positive multiple of num_kv_heads={self.num_kv_heads} "
                f"(GQA), got {self.num_query_heads}"
            )
        if self.sink < 0 or self.local < 1:
            raise ArgumentError(f"expected sink >= 0 and local >= 1 tokens, got sink={self.sink}, local={self.local}")
        if not self.exact_streaming and (self.sink % BLOCK_TOKENS or self.local % BLOCK_TOKENS):
            raise ArgumentError(
                f"block streaming (exact_streaming=False) counts {BLOCK_TOKENS}-token blocks: sink and "
                f"local must be multiples of {BLOCK_TOKENS}, got sink={self.sink}, local={self.local}"
            )

    @classmethod
    def load(
        cls,
        path: Union[str, PathLike],
        num_query_heads: int,
        static_sparsity: float = 0.5,
        sink: int = 128,
        local: int = 8192,
        seed: int = 0,
        exact_streaming: bool = True,
    ) -> "HeadPattern":
        """Read a DuoAttention ``full_attention_heads.tsv`` and pick the streaming heads.

        The rule is DuoAttention's: add uniform noise in ``[0, 1e-6)`` from
        ``np.random.default_rng(seed)`` to the gates (so tied gates split deterministically),
        take ``threshold = np.quantile(noisy, static_sparsity)`` over all layers × KV heads at
        once, and make ``noisy >= threshold`` dense and the rest streaming. With N heads in all,
        ``ceil((N - 1) · static_sparsity)`` heads end up streaming.

        ``static_sparsity=0`` gives no streaming head. ``static_sparsity=1`` makes *every* head
        streaming, as DuoAttention does (its threshold becomes 2): the bare quantile would be the
        maximum and would keep one head dense, so asking for full sparsity would not give it.

        Parameters
        ----------
        path : str or PathLike
            Pattern file: one row per layer, one tab-separated gate in [0, 1] per KV head. Gates
            less than 1e-3 outside [0, 1] are clipped, as DuoAttention's loader does.
        num_query_heads : int
            Query heads per layer (the file only knows KV heads).
        static_sparsity : float in [0, 1]
            Fraction of (layer, KV head) pairs to make streaming.
        sink, local, exact_streaming
            As in :class:`HeadPattern`.
        seed : int
            Seed of the tie-breaking noise; the same seed gives the same pattern.
        """
        if isinstance(static_sparsity, bool) or not isinstance(static_sparsity, numbers.Real) \
                or not 0.0 <= static_sparsity <= 1.0:  # also false for NaN
            raise ArgumentError(f"static_sparsity must be in [0, 1] (a number), got {static_sparsity!r}")
        _check_int("seed", seed, low=0)
        gates = _read_gates(path)
        noisy = gates + np.random.default_rng(seed).uniform(0.0, TIE_NOISE, size=gates.shape)
        if static_sparsity == 1.0:
            streaming = np.ones(gates.shape, dtype=bool)
        else:
            streaming = noisy < np.quantile(noisy, static_sparsity)
        return cls(streaming, num_query_heads, sink, local, exact_streaming)

    @property
    def num_layers(self) -> int:
        return self.streaming_mask.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.streaming_mask.shape[1]

    @property
    def sparsity(self) -> float:
        """Achieved fraction of streaming heads over all layers (the same for KV and query heads)."""
        return float(self.streaming_mask.mean())

    def head_mask_type(self, layer: int, device: Union[torch.device, str, None] = None) -> torch.Tensor:
        """int32 ``[num_query_heads]``: 0 for a dense head, -1 for a streaming head.

        Each KV head's type is repeated over its GQA group: query head ``h`` takes KV head
        ``h // (num_query_heads // num_kv_heads)``.
        """
        kv_types = np.where(self.streaming_mask[self._check_layer(layer)], STREAMING, DENSE)
        group = self.num_query_heads // self.num_kv_heads
        return torch.tensor(np.repeat(kv_types, group), dtype=torch.int32, device=device)

    def streaming_info(self, layer: int, device: Union[torch.device, str, None] = None) -> torch.Tensor:
        """int32 ``[2 * num_query_heads]``: ``(sink, local)`` for every query head, interleaved.

        In tokens when ``exact_streaming``, else in 128-token blocks. Dense heads carry the pair
        too; the kernels read it only for heads whose ``head_mask_type`` is -1.
        """
        self._check_layer(layer)
        unit = 1 if self.exact_streaming else BLOCK_TOKENS
        pair = [self.sink // unit, self.local // unit]
        return torch.tensor(pair * self.num_query_heads, dtype=torch.int32, device=device)

    def _check_layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 0 <= layer < self.num_layers:
            raise ArgumentError(f"layer must be in [0, {self.num_layers}), got {layer!r} (an int is needed)")
        return layer


def _check_int(name: str, value, low: int = 0, high: int = MAX_TOKENS) -> None:
    """An int (not a bool, a float or a string) in [low, high]; sizes above MAX_TOKENS would not
    fit the int32 tensors they end up in."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        raise ArgumentError(f"{name} must be an int in [{low}, {high}], got {value!r}")

"""tkpy's dense attention as a Hugging Face transformers attention implementation.

::

    import tkpy.integrations.transformers as tkpy_transformers

    tkpy_transformers.register()
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16, attn_implementation="tkpy")

:func:`register` adds ``"tkpy"`` to two registries of transformers (written against 5.x):

- ``AttentionInterface``: :func:`tkpy_attention_forward`, which every attention layer of a model
  that follows transformers' attention interface calls instead of eager attention.
- ``AttentionMaskInterface``: transformers' flash-attention mask builder. For a name without a mask
  builder transformers builds no mask at all, so padding would be dropped silently. With it, the
  layers get what ``flash_attention_2`` gets: None when no token is padding, else the 2-D padding
  mask.

The semantics are those of ``flash_attention_2``: padding runs as varlen sequences, as do
sequences packed into one row (``position_ids`` that restart, or explicit ``cu_seq_lens_*``);
sliding windows and logit softcapping map to flash-attn's ``window_size`` and ``softcap``. What
tkpy cannot do (dropout, attention sinks, position bias, paged caches, custom 4-D masks, float32)
raises an error instead of being ignored.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from tkpy.attention import flash_attn_func, flash_attn_varlen_func
from tkpy.errors import ArgumentError

__all__ = ["NAME", "register", "tkpy_attention_forward"]

NAME = "tkpy"
_UNSUPPORTED = {
    "s_aux": "attention sinks (s_aux)",
    "position_bias": "an additive position bias",
    "cache": "transformers' paged attention cache (continuous batching)",
}


def register() -> str:
    """Register tkpy's attention under the name ``"tkpy"``; calling again changes nothing.

    Returns
    -------
    str
        ``"tkpy"``, the value for ``attn_implementation``.
    """
    AttentionInterface.register(NAME, tkpy_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    return NAME


def tkpy_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of one transformers layer with :func:`tkpy.flash_attn_func` or its varlen form.

    Parameters
    ----------
    module : torch.nn.Module
        The attention layer; its ``is_causal`` (default True) applies when ``is_causal`` is None.
    query : Tensor ``[B, Hq, Sq, D]``, bf16 or fp16, D in {64, 128, 256}
    key, value : Tensor ``[B, Hkv, Sk, D]``, ``Hq % Hkv == 0``
        Not repeated for GQA: tkpy reads each kv head once per query-head group. With a cache, the
        queries are the last Sq of the Sk positions.
    attention_mask : bool Tensor ``[B, L]``, ``Sq <= L <= Sk``, or None
        The padding mask from transformers' flash-attention mask builder; True marks a real token.
        Key slots past L (an unfilled static cache) are ignored. Padded queries give 0.
    dropout : float
        Must be 0.0 (``model.eval()``, or training with attention dropout off): tkpy has no dropout.
    scaling : float, optional
        Softmax scale, default ``1 / sqrt(D)``.
    sliding_window : int, optional
        A query sees itself and the ``sliding_window - 1`` tokens before it (and as many after,
        when not causal).
    softcap : float, optional
        ``softcap · tanh(s / softcap)`` on the scaled scores.
    is_causal : bool, optional
        Overrides ``module.is_causal``.
    **kwargs
        ``position_ids`` (``[1, S]`` restarting at each packed sequence) or ``cu_seq_lens_q``,
        ``cu_seq_lens_k``, ``max_length_q``, ``max_length_k`` select packed varlen attention, as
        for ``flash_attention_2``; the model's other keyword arguments are not used here.

    Returns
    -------
    (attn_output, None)
        ``attn_output`` is ``[B, Sq, Hq, D]`` in the query's dtype; tkpy returns no attention weights.

    Raises
    ------
    ValueError
        For a float32 model or a mask that is not a 2-D padding mask.
    NotImplementedError
        For dropout, attention sinks, position bias, a paged cache, or padding with gaps under a
        sliding window.
    """
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"attn_implementation='tkpy' does not support {what}; use 'eager' or 'sdpa'")
    if query.dtype not in (torch.bfloat16, torch.float16):
        raise ArgumentError(
            f"attn_implementation='tkpy' needs a bfloat16 or float16 model, got {query.dtype} activations; "
            "load it with dtype=torch.bfloat16"
        )
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                       or sliding_window < 1):
        raise ArgumentError(f"attn_implementation='tkpy': sliding_window must be an int >= 1 (the query and the "
                            f"sliding_window - 1 tokens before it), got {sliding_window!r}")
    window = (-1, -1) if sliding_window is None else (sliding_window - 1, sliding_window - 1)
    options = dict(dropout_p=dropout, softmax_scale=scaling, causal=causal, window_size=window, softcap=softcap or 0.0)
    # tkpy's layout: [B, S, H, D]. These are views; the op reads strided tensors.
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))

    if attention_mask is not None:
        return _padded_attention(q, k, v, attention_mask, options), None
    packed = _packed_seqlens(q, k, kwargs)
    if packed is not None:
        cu_q, cu_k, max_q, max_k = packed
        out = flash_attn_varlen_func(_tokens(q), _tokens(k), _tokens(v), cu_q, cu_k, max_q, max_k, **options)
        return out.view(q.shape), None
    return flash_attn_func(q, k, v, **options), None


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, S, H, D]`` -> ``[B·S, H, D]``."""
    return x.reshape(-1, *x.shape[2:])


def _cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def _padded_attention(q, k, v, mask: torch.Tensor, options: dict) -> torch.Tensor:
    """Attention over the real tokens of each row as varlen sequences, scattered back into ``[B, Sq, Hq, D]``.

    tkpy aligns causal masks and windows bottom-right, so query i of a row sees its real keys up to
    rank ``i + n_k - n_q``. The queries being the row's last Sq positions, that is exactly the keys
    at or before the query's own position, wherever the padding lies. Key slots past the mask's
    length (an unfilled static cache) are never gathered.
    """
    batch, seqlen_q = q.shape[:2]
    if mask.dim() != 2 or mask.shape[0] != batch or not seqlen_q <= mask.shape[1] <= k.shape[1] \
            or mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ArgumentError(
            f"attn_implementation='tkpy' takes transformers' 2-D padding mask (bool or 0/1 integers) [batch={batch}, "
            f"kv_len] with {seqlen_q} <= kv_len <= {k.shape[1]}; got an attention_mask {mask.dtype} of shape "
            f"{tuple(mask.shape)} (a custom 4-D or float mask needs attn_implementation='eager' or 'sdpa')"
        )
    mask = mask.bool()
    if options["window_size"] != (-1, -1):
        # Windows count positions, and varlen counts real tokens: they agree only where the real
        # tokens of a row are contiguous.
        starts = mask[:, :1].sum(-1) + (mask[:, 1:] & ~mask[:, :-1]).sum(-1)
        if bool((starts > 1).any()):
            raise NotImplementedError("attn_implementation='tkpy': a sliding window with gaps in the padding mask")
    q_mask = mask[:, -seqlen_q:]
    q_lengths, k_lengths = q_mask.sum(-1, dtype=torch.int32), mask.sum(-1, dtype=torch.int32)
    # (row, position) of each real token, row-major: the packed order of varlen.
    q_real, k_real = q_mask.nonzero(as_tuple=True), mask.nonzero(as_tuple=True)
    out = flash_attn_varlen_func(
        q[q_real], k[k_real], v[k_real],
        _cu_seqlens(q_lengths), _cu_seqlens(k_lengths), int(q_lengths.max()), int(k_lengths.max()),
        **options,
    )
    padded = out.new_zeros(batch, seqlen_q, *out.shape[1:])
    padded[q_real] = out
    return padded


def _packed_seqlens(q: torch.Tensor, k: torch.Tensor, kwargs: dict) -> Optional[tuple]:
    """``(cu_seqlens_q, cu_seqlens_k, max_q, max_k)`` of packed sequences, or None for plain batches.

    As ``flash_attention_2`` does: explicit ``cu_seq_lens_*`` and ``max_length_*``, else a batch of
    one row whose ``position_ids`` are not one increasing run, where each sequence starts at the
    smallest position id.
    """
    names = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    given = [name for name in names if kwargs.get(name) is not None]
    if given and len(given) < len(names):
        raise ArgumentError(f"attn_implementation='tkpy': packed sequences need all of {names}, got only {given}")
    if given:
        cu_q, cu_k, max_q, max_k = (kwargs[name] for name in names)
        return cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k)
    position_ids = kwargs.get("position_ids")
    seqlen = q.shape[1]
    if position_ids is None or position_ids.shape != (1, seqlen) or q.shape[0] != 1 or k.shape[1] != seqlen:
        return None
    positions = position_ids[0]
    first = positions.min()
    if torch.equal(positions, torch.arange(seqlen, device=positions.device, dtype=positions.dtype) + first):
        return None
    starts = positions == first
    starts[0] = True  # the row's first token always opens a sequence
    starts = starts.nonzero().squeeze(1)
    lengths = torch.diff(starts, append=starts.new_tensor([seqlen])).to(torch.int32)
    cu = _cu_seqlens(lengths)
    longest = int(lengths.max())
    return cu, cu, longest, longest

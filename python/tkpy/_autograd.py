"""Autograd of tkpy's attention forwards: each forward op's backward is its backward op.

Registered with ``torch.library.register_autograd``, so ``torch.compile`` traces forward and
backward (each backward op has its Meta kernel as its fake, like the forwards). The forward saves
its inputs, ``out`` and ``lse``; the backward never recomputes the forward. A gradient of ``lse``
(when a loss uses it) is taken too: it only shifts each row's delta. Decode attention stays
inference-only.
"""

from __future__ import annotations

import torch

from . import _ops  # noqa: F401  (loads torch.ops.tkpy)

# The forward arguments after q, k, v that each backward op takes, in order (the backward ops'
# schemas: csrc/torch_bindings.cpp).
_DENSE_OPTIONS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "softmax_scale", "window_left",
                  "window_right", "softcap", "deterministic")
_SPARSE_OPTIONS = ("cu_seqlens_q", "cu_seqlens_k", "head_mask_type", "streaming_info", "sparse_index", "max_seqlen_q",
                   "max_seqlen_k", "block_indices", "block_counts", "softmax_scale", "is_causal", "exact_streaming",
                   "deterministic")


def _setup(options):
    def setup_context(ctx, inputs, output):
        q, k, v, *rest = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = dict(zip(options, rest))
    return setup_context


def _backward(op: str, options):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = getattr(torch.ops.tkpy, op)(grad_out.contiguous(), q, k, v, out, lse,
                                                 None if grad_lse is None else grad_lse.contiguous(), **ctx.options)
        return (dq, dk, dv) + (None,) * len(options)
    return backward


def _refuse_decode(ctx, grad_out, grad_lse):
    raise NotImplementedError("tkpy decode attention (flash_attn_with_kvcache, tkpy.lserve.sparse_decode) is "
                              "inference-only: it has no backward. Train with flash_attn_func / flash_attn_varlen_func.")


torch.library.register_autograd("tkpy::attention_forward", _backward("attention_backward", _DENSE_OPTIONS),
                                setup_context=_setup(_DENSE_OPTIONS))
torch.library.register_autograd("tkpy::block_sparse_attention_forward",
                                _backward("block_sparse_attention_backward", _SPARSE_OPTIONS),
                                setup_context=_setup(_SPARSE_OPTIONS))
torch.library.register_autograd("tkpy::decode_attention", _refuse_decode)

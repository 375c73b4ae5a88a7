"""Autograd of tkpy's attention forwards: each forward op's backward is its backward op.

Registered with ``torch.library.register_autograd``, so ``torch.compile`` traces forward and
backward (each backward op has its Meta kernel as its fake, like the forwards). The forward saves
its inputs, ``out`` and ``lse``, and the tensors that describe its masks (so that autograd notices
when one is changed in place before the backward); the backward never recomputes the forward. A
gradient of ``lse`` (when a loss uses it) is taken too: it only shifts each row's delta.
``torch.use_deterministic_algorithms(True)`` makes every backward deterministic. There is no
double backward (its request is refused), and decode attention stays inference-only.
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
_TENSOR_OPTIONS = ("cu_seqlens_q", "cu_seqlens_k", "head_mask_type", "streaming_info", "sparse_index", "block_indices",
                   "block_counts")


def _setup(options):
    def setup_context(ctx, inputs, output):
        q, k, v, *rest = inputs
        given = dict(zip(options, rest))
        masks = [name for name in options if name in _TENSOR_OPTIONS]
        ctx.save_for_backward(q, k, v, *output, *(given[name] for name in masks))
        ctx.masks = masks
        ctx.options = {name: value for name, value in given.items() if name not in _TENSOR_OPTIONS}
        ctx.set_materialize_grads(False)  # a loss on out alone leaves lse's gradient None, not zeros
    return setup_context


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t as the backward ops take it: contiguous, 16-byte aligned, with the strides of a fresh tensor.
    Autograd hands out gradients that are none of these (an expand, an empty tensor's zero strides,
    a slice of a concatenation's gradient)."""
    if t.is_contiguous() and t.numel() > 0 and t.storage_offset() * t.element_size() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _backward(op: str, options):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, *masks = ctx.saved_tensors
        kwargs = dict(ctx.options, **dict(zip(ctx.masks, masks)))
        kwargs["deterministic"] = bool(kwargs["deterministic"]) or torch.are_deterministic_algorithms_enabled()
        dout = _aligned(grad_out) if grad_out is not None else torch.zeros_like(out)
        dlse = _aligned(grad_lse) if grad_lse is not None else None
        dq, dk, dv = getattr(torch.ops.tkpy, op)(dout, q, k, v, out, lse, dlse, **kwargs)
        return (dq, dk, dv) + (None,) * len(options)
    return backward


def _refuse(what: str):
    def refuse(ctx, *grads):
        raise NotImplementedError(what)
    return refuse


torch.library.register_autograd("tkpy::attention_forward", _backward("attention_backward", _DENSE_OPTIONS),
                                setup_context=_setup(_DENSE_OPTIONS))
torch.library.register_autograd("tkpy::block_sparse_attention_forward",
                                _backward("block_sparse_attention_backward", _SPARSE_OPTIONS),
                                setup_context=_setup(_SPARSE_OPTIONS))
_NO_DOUBLE_BACKWARD = ("tkpy attention has no double backward (a gradient of its gradients, e.g. a gradient penalty, "
                       "or torch.autograd.grad(..., create_graph=True) then a second grad)")
torch.library.register_autograd("tkpy::attention_backward", _refuse(_NO_DOUBLE_BACKWARD))
torch.library.register_autograd("tkpy::block_sparse_attention_backward", _refuse(_NO_DOUBLE_BACKWARD))
torch.library.register_autograd("tkpy::decode_attention", _refuse(
    "tkpy decode attention (flash_attn_with_kvcache, tkpy.lserve.sparse_decode) is inference-only: it has no "
    "backward. Train with flash_attn_func / flash_attn_varlen_func."))

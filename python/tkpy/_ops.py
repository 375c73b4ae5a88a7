"""Loads the compiled ops (``torch.ops.tkpy.*``) and registers their fake implementations.

Fake (meta) implementations let ``torch.compile(fullgraph=True)`` trace through every op. The
in-place RoPE ops return nothing, so their fakes only check what can be checked without data;
the others also give their outputs' shapes.
"""

from __future__ import annotations

import torch

from .errors import ArgumentError

try:
    from . import _C  # noqa: F401  (static initialisers register torch.ops.tkpy)
except ImportError as exc:  # pragma: no cover - only hit on a broken install
    raise ImportError(
        "tkpy's compiled extension tkpy._C failed to load. Build it with "
        "`pip install --no-build-isolation -e .` (or `make test`), against the torch you import. "
        f"Original error: {exc}"
    ) from exc


def cuda_compiled() -> bool:
    """True when this build of tkpy contains CUDA kernels."""
    return bool(_C.cuda_enabled)


def call(op: str, *args):
    """``torch.ops.tkpy.<op>(*args)``, with a refused argument (the bindings' ValueError) raised as
    :class:`ArgumentError`, so that it is also a RuntimeError like flash-attn's."""
    try:
        return getattr(torch.ops.tkpy, op)(*args)
    except ArgumentError:
        raise
    except ValueError as exc:
        raise ArgumentError(str(exc)) from None


def _check_same_device(op: str, q: torch.Tensor, **others) -> None:
    # The compiled kernels check this too; the fakes repeat it so that a traced graph (and a call
    # on meta tensors) fails the same way instead of passing silently.
    for name, t in others.items():
        if t is not None and t.device != q.device:
            raise ArgumentError(f"{op}: expected {name} on q's device {q.device}, got {t.device}")


@torch.library.register_fake("tkpy::apply_rope_")
def _apply_rope_fake(q, k, cos, sin, positions=None, interleaved=False):
    _check_same_device("apply_rope_", q, k=k, cos=cos, sin=sin, positions=positions)


@torch.library.register_fake("tkpy::apply_rope_3d_")
def _apply_rope_3d_fake(q, k, grid_thw, freqs_t, freqs_h, freqs_w):
    _check_same_device("apply_rope_3d_", q, k=k, freqs_t=freqs_t, freqs_h=freqs_h, freqs_w=freqs_w)


@torch.library.register_fake("tkpy::gemm")
def _gemm_fake(a, b, trans_b=False):
    _check_same_device("gemm", a, b=b)
    if a.dim() != 2 or b.dim() != 2:
        raise ArgumentError(f"gemm: expected 2-D a and b, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a.new_empty((a.shape[0], b.shape[0] if trans_b else b.shape[1]))


@torch.library.register_fake("tkpy::attention_forward")
def _attention_forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                            window_left, window_right, softcap):
    _check_same_device("attention_forward", q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if cu_seqlens_q is None:  # q [B, Sq, Hq, D] -> lse [B, Hq, Sq]
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
    else:  # q [total_q, Hq, D] -> lse [Hq, total_q]
        lse_shape = (q.shape[1], q.shape[0])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.register_fake("tkpy::block_sparse_attention_forward")
def _block_sparse_attention_forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, head_mask_type, streaming_info,
                                         sparse_index, block_indices, block_counts, max_seqlen_q, max_seqlen_k,
                                         softmax_scale, is_causal, exact_streaming):
    _check_same_device("block_sparse_attention_forward", q, k=k, v=v, cu_seqlens_q=cu_seqlens_q,
                       cu_seqlens_k=cu_seqlens_k, head_mask_type=head_mask_type, streaming_info=streaming_info,
                       sparse_index=sparse_index, block_indices=block_indices, block_counts=block_counts)
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.register_fake("tkpy::decode_attention")
def _decode_attention_fake(q, k_cache, v_cache, block_table, seqlens, cache_batch_idx, kv_head_slot, k_ring, v_ring,
                           ring_table, sink, local, page_indices, page_counts, head_bits, k_scale, v_scale,
                           softmax_scale, window_left, window_right, softcap, num_splits):
    _check_same_device("decode_attention", q, k_cache=k_cache, v_cache=v_cache, block_table=block_table,
                       seqlens=seqlens, cache_batch_idx=cache_batch_idx, kv_head_slot=kv_head_slot, k_ring=k_ring,
                       v_ring=v_ring, ring_table=ring_table, page_indices=page_indices, page_counts=page_counts,
                       head_bits=head_bits)
    if q.dim() != 4:
        raise ArgumentError(f"decode_attention: expected q to be 4-D [batch, seqlen_q, heads_q, head_dim], got {tuple(q.shape)}")
    # q [B, Sq, Hq, D] -> out like q, lse [B, Hq, Sq]
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.register_fake("tkpy::kv_append_")
def _kv_append_fake(k_cache, v_cache, k, v, block_table, seqlens, cache_batch_idx, k_min, k_max, rotary_cos,
                    rotary_sin, rotary_interleaved, k_scale, v_scale, kv_head_slot, k_ring, v_ring, ring_table, sink,
                    local):
    _check_same_device("kv_append_", k, k_cache=k_cache, v_cache=v_cache, v=v, block_table=block_table,
                       seqlens=seqlens, cache_batch_idx=cache_batch_idx, k_min=k_min, k_max=k_max,
                       rotary_cos=rotary_cos, rotary_sin=rotary_sin, kv_head_slot=kv_head_slot, k_ring=k_ring,
                       v_ring=v_ring, ring_table=ring_table)


def _attention_backward(ctx, grad_out, grad_lse):
    raise NotImplementedError(
        "tkpy attention: backward is not implemented; tkpy's attention functions (flash_attn_func, "
        "flash_attn_varlen_func, flash_attn_with_kvcache, block_sparse_attn_func, the streaming "
        "variants and tkpy.lserve.sparse_decode) are forward-only (inference). Use flash-attn or torch SDPA for training."
    )


torch.library.register_autograd("tkpy::attention_forward", _attention_backward)
torch.library.register_autograd("tkpy::block_sparse_attention_forward", _attention_backward)
torch.library.register_autograd("tkpy::decode_attention", _attention_backward)

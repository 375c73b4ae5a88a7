"""Rotary position embeddings: out of place and differentiable for training, in place for inference.

:func:`apply_rope` and :func:`apply_rope_3d` return rotated copies of q and k and have a backward;
:func:`apply_rope_` and :func:`apply_rope_3d_` rotate q and k in place and record none. All of them rotate
in one fused pass over q and k (a CUDA kernel with 16-byte accesses on the GPU, an ATen-parallel loop
on the CPU), the functional ones over contiguous copies, and compute in fp32 whatever the storage
dtype.

A rotation's transpose is the rotation by −θ, so the backward is the same fused op run on the
gradients with sin negated. The tables (cos, sin, freqs_*) and positions are constants: they get no
gradient, and a table that requires grad is refused (while autograd records) rather than silently
given none.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _ops
from .errors import ArgumentError

__all__ = ["apply_rope", "apply_rope_", "apply_rope_3d", "apply_rope_3d_", "as_cos_sin_table"]

# The functional ops' kernels: one per device this build has kernels for, so that
# `python -m tkpy info` reports them as it reports the compiled ops.
_DEVICES = ("cpu", "cuda") if _ops.cuda_compiled() else ("cpu",)


def as_cos_sin_table(freqs: torch.Tensor, name: str = "freqs") -> torch.Tensor:
    """View a per-axis table as float32 ``[L, d/2, 2]`` of (cos, sin) pairs.

    Accepts complex ``[L, d/2]`` (``torch.polar`` output, as RIFLEx and Wan build it) or a real
    ``[L, d/2, 2]`` table, and never copies a float32 table.
    """
    if not isinstance(freqs, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(freqs).__name__}")
    if freqs.is_complex():
        if freqs.dtype != torch.complex64:
            freqs = freqs.to(torch.complex64)
        return torch.view_as_real(freqs.resolve_conj())
    return freqs


def _refuse_recorded(fn: str, functional: str, q, k) -> None:
    """The in-place ops record no backward: under autograd a gradient through them would silently
    skip the rotation's transpose."""
    if not torch.is_grad_enabled():
        return
    for name, t in (("q", q), ("k", k)):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ArgumentError(f"{fn}: {name} requires grad, but {fn} rotates in place and records no backward "
                                f"(its gradient would pass unrotated); use tkpy.rope.{functional} to train, or "
                                f"run under torch.no_grad() / torch.inference_mode()")


def apply_rope_(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: Optional[torch.Tensor] = None,
    interleaved: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Rotate ``q`` and ``k`` in place by the angles in ``cos``/``sin``.

    For inference: it records no backward, so autograd would pass a gradient through it unrotated.
    Train with :func:`apply_rope`.

    Parameters
    ----------
    q : Tensor ``[B, S, Hq, D]`` or ``[T, Hq, D]``
        bf16, fp16 or fp32; the last dim contiguous, other strides free (views are fine).
    k : Tensor ``[B, S, Hk, D]`` or ``[T, Hk, D]``, or None
        Same dtype, device and token dims as ``q``; any head count.
    cos, sin : Tensor ``[max_pos, R/2]``
        float32 or q's dtype. ``R = 2 · cos.shape[1] <= D`` dims are rotated (partial rotary);
        the rest are left alone.
    positions : int32/int64 Tensor ``[B, S]``, ``[S]`` or ``[T]``, optional
        Row of ``cos``/``sin`` for each token; default ``arange(S)`` for every batch.
        On the CPU an out-of-range position raises; on CUDA (checked without a host sync) it
        turns that token's rotated dims into NaN, so it can never pass as a right answer.
    interleaved : bool
        False: neox style, dim ``i`` pairs with ``i + R/2``. True: GPT-J style, ``2i`` with ``2i+1``.

    Returns
    -------
    (q, k) : the same tensors, rotated. Raises ArgumentError when autograd is recording and q or k
    requires grad: its gradient would come back unrotated.
    """
    _refuse_recorded("apply_rope_", "apply_rope", q, k)
    _ops.call("apply_rope_", q, k, cos, sin, positions, interleaved)
    return q, k


def apply_rope_3d_(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    grid_thw: Sequence[int],
    freqs_t: torch.Tensor,
    freqs_h: torch.Tensor,
    freqs_w: torch.Tensor,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """3D RoPE for video-DiT tokens laid out in (t, h, w) order, in place.

    No ``[S, D]`` table is built: each token's angles are gathered from the three per-axis tables.
    For inference: it records no backward, so autograd would pass a gradient through it unrotated.
    Train with :func:`apply_rope_3d`.

    Parameters
    ----------
    q : Tensor ``[B, S, Hq, D]``, ``S = T·H·W``
        bf16, fp16 or fp32; the last dim contiguous.
    k : Tensor ``[B, S, Hk, D]`` or None
    grid_thw : (T, H, W)
    freqs_t, freqs_h, freqs_w : Tensor
        complex ``[Lt >= T, dt/2]``, ``[Lh >= H, dh/2]``, ``[Lw >= W, dw/2]`` (e.g. from
        :func:`tkpy.riflex.rope_3d_freqs`), or float32 ``[L, d/2, 2]`` (cos, sin) tables.
        Dims ``[0, dt)`` rotate with t, ``[dt, dt+dh)`` with h, ``[dt+dh, dt+dh+dw)`` with w,
        as interleaved pairs (CogVideoX, HunyuanVideo and Wan all use this layout). Dims past
        ``dt+dh+dw <= D`` are left alone.

    Returns
    -------
    (q, k) : the same tensors, rotated. Raises ArgumentError when autograd is recording and q or k
    requires grad: its gradient would come back unrotated.
    """
    _refuse_recorded("apply_rope_3d_", "apply_rope_3d", q, k)
    _ops.call("apply_rope_3d_", q, k, _grid("apply_rope_3d_", grid_thw), *_cos_sin_tables(freqs_t, freqs_h, freqs_w))
    return q, k


def apply_rope(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: Optional[torch.Tensor] = None,
    interleaved: bool = False,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Rotated copies of ``q`` and ``k``, differentiable with respect to both.

    For training; arguments and checks as in :func:`apply_rope_` (the messages name it), except
    that q and k may be any views, even one tensor: they are only read, into new tensors.
    The backward rotates the gradients by −θ in one fused pass (the same op with ``-sin``).
    ``cos``, ``sin`` and ``positions`` get no gradient; a table that requires grad is refused.

    Returns
    -------
    (q_rot, k_rot) : new contiguous tensors of q's and k's shapes and dtype (k_rot None without k).
    """
    rotated = _ops.call("rope", q, k, cos, sin, positions, interleaved)
    return rotated[0], rotated[1] if k is not None else None


def apply_rope_3d(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    grid_thw: Sequence[int],
    freqs_t: torch.Tensor,
    freqs_h: torch.Tensor,
    freqs_w: torch.Tensor,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Rotated copies of video-DiT ``q`` and ``k`` (3D RoPE), differentiable with respect to both.

    For training; arguments as in :func:`apply_rope_3d_`, q and k may be any views. The backward
    rotates the gradients by −θ in one fused pass (the same op with each table's sin negated).
    The ``freqs_*`` tables get no gradient; one that requires grad is refused.

    Returns
    -------
    (q_rot, k_rot) : new contiguous tensors of q's and k's shapes and dtype (k_rot None without k).
    """
    grid = _grid("apply_rope_3d", grid_thw)
    rotated = _ops.call("rope_3d", q, k, grid, *_cos_sin_tables(freqs_t, freqs_h, freqs_w))
    return rotated[0], rotated[1] if k is not None else None


def _grid(op: str, grid_thw: Sequence[int]) -> list[int]:
    return [_ops.int_arg(f"{op}: grid_thw[{i}]", x) for i, x in enumerate(grid_thw)]


def _cos_sin_tables(freqs_t, freqs_h, freqs_w) -> list[torch.Tensor]:
    return [as_cos_sin_table(f, name) for f, name in ((freqs_t, "freqs_t"), (freqs_h, "freqs_h"), (freqs_w, "freqs_w"))]


def _copies(q: torch.Tensor, k: Optional[torch.Tensor]) -> list[torch.Tensor]:
    # Contiguous copies: a view of a fused qkv, or the same tensor as q and k, becomes two tensors
    # the in-place op may rotate.
    return [x.clone(memory_format=torch.contiguous_format) for x in (q, k) if x is not None]


def _rope_copies(q, k, cos, sin, positions, interleaved):
    out = _copies(q, k)
    torch.ops.tkpy.apply_rope_(out[0], out[1] if k is not None else None, cos, sin, positions, interleaved)
    return out


def _rope_3d_copies(q, k, grid_thw, freqs_t, freqs_h, freqs_w):
    out = _copies(q, k)
    torch.ops.tkpy.apply_rope_3d_(out[0], out[1] if k is not None else None, grid_thw, freqs_t, freqs_h, freqs_w)
    return out


@torch.library.custom_op("tkpy::rope", mutates_args=(), device_types=_DEVICES)
def _rope(q: torch.Tensor, k: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
          positions: Optional[torch.Tensor], interleaved: bool) -> list[torch.Tensor]:
    """[q_rot] or [q_rot, k_rot]: a list, since a custom op cannot return an optional tensor."""
    return _rope_copies(q, k, cos, sin, positions, interleaved)


@torch.library.custom_op("tkpy::rope_3d", mutates_args=(), device_types=_DEVICES)
def _rope_3d(q: torch.Tensor, k: Optional[torch.Tensor], grid_thw: list[int], freqs_t: torch.Tensor,
             freqs_h: torch.Tensor, freqs_w: torch.Tensor) -> list[torch.Tensor]:
    """[q_rot] or [q_rot, k_rot] of 3D RoPE with float32 ``[L, d/2, 2]`` (cos, sin) tables."""
    return _rope_3d_copies(q, k, grid_thw, freqs_t, freqs_h, freqs_w)


# The fakes run the real code on fake tensors: the copies, then the in-place op's Meta kernel, which
# makes the same checks as a real call, so a trace refuses what eager refuses.
_rope.register_fake(_rope_copies)
_rope_3d.register_fake(_rope_3d_copies)


def _refuse_tables_requiring_grad(op: str, tables: dict) -> None:
    # Autograd would take the missing gradient of a table as zero: a silently wrong answer.
    for name, table in tables.items():
        if table is not None and table.requires_grad:
            raise ArgumentError(f"{op}: {name} requires grad, but the RoPE tables are constants and get no "
                                f"gradient; pass {name}.detach()")


def _setup_rope(ctx, inputs, output):
    q, k, cos, sin, positions, interleaved = inputs
    _refuse_tables_requiring_grad("apply_rope", {"cos": cos, "sin": sin})
    # Without positions only the first S rows are read, so only they need negating for the backward.
    if positions is None:
        cos, sin = cos[: q.shape[-3]], sin[: q.shape[-3]]
    ctx.save_for_backward(cos, sin, positions)
    ctx.interleaved = interleaved


def _rope_backward(ctx, grads):
    cos, sin, positions = ctx.saved_tensors
    # Through the op itself, so that the backward is differentiable too (it is linear in grads).
    rotated = torch.ops.tkpy.rope(grads[0], grads[1] if len(grads) > 1 else None, cos, -sin, positions,
                                  ctx.interleaved)
    return rotated[0], rotated[1] if len(grads) > 1 else None, None, None, None, None


def _setup_rope_3d(ctx, inputs, output):
    q, k, grid_thw, *tables = inputs
    _refuse_tables_requiring_grad("apply_rope_3d", dict(zip(("freqs_t", "freqs_h", "freqs_w"), tables)))
    ctx.grid_thw = grid_thw
    ctx.save_for_backward(*(table[:rows] for table, rows in zip(tables, grid_thw)))


def _rope_3d_backward(ctx, grads):
    # (cos, sin) -> (cos, -sin) in the rows the grid reads, by device ops only (no host tensor to
    # copy over, which would sync and break CUDA graph capture).
    conjugates = [torch.stack((table[..., 0], -table[..., 1]), dim=-1) for table in ctx.saved_tensors]
    rotated = torch.ops.tkpy.rope_3d(grads[0], grads[1] if len(grads) > 1 else None, ctx.grid_thw, *conjugates)
    return rotated[0], rotated[1] if len(grads) > 1 else None, None, None, None, None


_rope.register_autograd(_rope_backward, setup_context=_setup_rope)
_rope_3d.register_autograd(_rope_3d_backward, setup_context=_setup_rope_3d)

"""Loads the compiled ops (``torch.ops.tkpy.*``), calls them, and refuses their backward.

Each op's fake implementation for ``torch.compile(fullgraph=True)`` is its Meta kernel, registered
by the binding itself (csrc/torch_bindings.cpp): the same checks as a real call, no launch.
"""

from __future__ import annotations

from typing import Optional

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


def call(op: str, *args, **kwargs):
    """``torch.ops.tkpy.<op>(*args, **kwargs)``, with a refused argument (the bindings' ValueError)
    raised as :class:`ArgumentError`, so that it is also a RuntimeError like flash-attn's."""
    try:
        return getattr(torch.ops.tkpy, op)(*args, **kwargs)
    except ArgumentError:
        raise
    except ValueError as exc:
        raise ArgumentError(str(exc)) from None


def optional_float(x) -> Optional[float]:
    """An optional float argument (softmax_scale) as the schemas take it."""
    return None if x is None else float(x)


def _attention_backward(ctx, grad_out, grad_lse):
    raise NotImplementedError(
        "tkpy attention: backward is not implemented; tkpy's attention functions (flash_attn_func, "
        "flash_attn_varlen_func, flash_attn_with_kvcache, block_sparse_attn_func, the streaming "
        "variants and tkpy.lserve.sparse_decode) are forward-only (inference). Use flash-attn or torch SDPA for training."
    )


torch.library.register_autograd("tkpy::attention_forward", _attention_backward)
torch.library.register_autograd("tkpy::block_sparse_attention_forward", _attention_backward)
torch.library.register_autograd("tkpy::decode_attention", _attention_backward)

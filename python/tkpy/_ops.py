"""Loads the compiled ops (``torch.ops.tkpy.*``) and calls them; _autograd.py gives them their backward.

Each op's fake implementation for ``torch.compile(fullgraph=True)`` is its Meta kernel, registered
by the binding itself (csrc/torch_bindings.cpp): the same checks as a real call, no launch.
"""

from __future__ import annotations

import contextlib
import numbers
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


# What each schema type accepts from Python (bool is an int to Python, never one here).
_ACCEPTS = {
    "Tensor": lambda x: isinstance(x, torch.Tensor),
    "int": lambda x: isinstance(x, numbers.Integral) and not isinstance(x, bool),
    "float": lambda x: isinstance(x, numbers.Real) and not isinstance(x, bool),
    "bool": lambda x: isinstance(x, bool),
}


def _check_types(op: str, args: tuple, kwargs: dict) -> None:
    """A TypeError naming the argument for a value the schema cannot take (None for a Tensor, a
    string for a float), instead of the dispatcher's RuntimeError from deep inside torch."""
    arguments = getattr(torch.ops.tkpy, op).default._schema.arguments
    given = {**dict(zip((a.name for a in arguments), args)), **kwargs}
    for argument in arguments:
        if argument.name not in given:
            continue
        kind = str(argument.type)
        optional = kind.startswith("Optional[")
        base = kind[len("Optional["):-1] if optional else kind
        value = given[argument.name]
        if base in _ACCEPTS and not (optional and value is None) and not _ACCEPTS[base](value):
            raise TypeError(f"{op}: {argument.name} must be {'None or ' if optional else ''}a {base}, "
                            f"got {type(value).__name__}")


def call(op: str, *args, **kwargs):
    """``torch.ops.tkpy.<op>(*args, **kwargs)``, with a refused argument (the bindings' ValueError)
    raised as :class:`ArgumentError`, so that it is also a RuntimeError like flash-attn's, and an
    argument of the wrong Python type as a TypeError that names it."""
    if not torch.compiler.is_compiling():  # a trace sees fake tensors and symbolic sizes
        _check_types(op, args, kwargs)
    try:
        return getattr(torch.ops.tkpy, op)(*args, **kwargs)
    except ArgumentError:
        raise
    except ValueError as exc:
        raise ArgumentError(str(exc)) from None


def attention_kernel() -> str:
    """The Hopper attention forward kernel CUDA calls run: ``"pipelined"`` (FlashAttention-3's
    overlaps; the default) or ``"baseline"``. TKPY_ATTENTION_KERNEL chooses it, read once per
    process, unless :func:`use_attention_kernel` overrides it. Raises ValueError, naming the
    variable, when TKPY_ATTENTION_KERNEL names no kernel."""
    return _C.attention_kernel()


@contextlib.contextmanager
def use_attention_kernel(name: Optional[str]):
    """Run CUDA attention calls inside the block on kernel ``name`` (``"baseline"``,
    ``"pipelined"``, or None for TKPY_ATTENTION_KERNEL's choice); the previous choice comes back
    after. Process-wide, for tests and benchmarks that compare the two kernels; under CUDA graphs
    the kernel is fixed when the graph is captured."""
    if name not in ("baseline", "pipelined", None):
        raise ValueError(f"use_attention_kernel: expected 'baseline', 'pipelined' or None, got {name!r}")
    previous = _C.set_attention_kernel(name)
    try:
        yield
    finally:
        _C.set_attention_kernel(previous)


def float_arg(name: str, x) -> float:
    """A float argument as the schemas take it: a real number (a Python, numpy or 0-d torch one),
    or a TypeError naming the argument. Its range is the op's to check."""
    if isinstance(x, bool) or not isinstance(x, (numbers.Real, torch.Tensor)) or \
            (isinstance(x, torch.Tensor) and (x.numel() != 1 or x.is_complex())):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    return float(x)


def optional_float(name: str, x) -> Optional[float]:
    """An optional float argument (softmax_scale): None or :func:`float_arg`."""
    return None if x is None else float_arg(name, x)


def bool_arg(name: str, x) -> bool:
    """A bool flag as the schemas take it (Python or numpy bools, 0-d bool tensors), or a TypeError
    naming the argument."""
    if isinstance(x, torch.Tensor) and x.numel() == 1 and x.dtype == torch.bool:
        return bool(x)
    if type(x).__module__ == "numpy" and type(x).__name__ in ("bool", "bool_"):  # numpy.bool_, without importing numpy
        return bool(x)
    if not isinstance(x, (bool, numbers.Integral)) or x not in (0, 1):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__} {x!r}")
    return bool(x)


def int_arg(name: str, x) -> int:
    """An int argument as the schemas take it: an integer (not a bool, a float or a string), or a
    TypeError naming the argument."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(x).__name__} {x!r}")
    return int(x)

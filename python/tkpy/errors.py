"""The error tkpy raises when it refuses a call because of its arguments."""

from __future__ import annotations

__all__ = ["ArgumentError"]


class ArgumentError(ValueError, RuntimeError):
    """A call refused for its arguments: a shape, dtype, device, value or combination that tkpy does
    not accept. The message names the function and the argument.

    It is a ValueError, Python's convention for a bad argument, and a RuntimeError, what flash-attn
    and Block-Sparse-Attention raise from their C++ checks, so code written for either catches it.
    The compiled ops themselves (``torch.ops.tkpy.*``) raise ValueError for a refused argument and
    RuntimeError for a failed launch; the Python functions turn the former into ArgumentError.
    """

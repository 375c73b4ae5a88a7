"""LServe: static (streaming heads) and dynamic (page selection) sparsity for long-context serving."""

from .head_pattern import HeadPattern

__all__ = ["HeadPattern"]

"""LServe: static (streaming heads) and dynamic (page selection) sparsity for long-context serving."""

from .cache import LServeCache, PageStats
from .config import LServeConfig
from .decode import sparse_decode
from .head_pattern import HeadPattern
from .selection import PageSelection, PageSelector, page_scores, select_pages

__all__ = [
    "HeadPattern",
    "LServeCache",
    "LServeConfig",
    "PageSelection",
    "PageSelector",
    "PageStats",
    "page_scores",
    "select_pages",
    "sparse_decode",
]

"""Where the project's shared data (DuoAttention head patterns) lives, for the benchmarks and tests.

The data is not part of the package. ``$TKPY_SHARED_DATA`` names its folder (the one that holds
``duo_attention/``); without it, a source checkout finds the folder next to itself, at
``<repo>/../shared/data``. An installed package has no such neighbour, so it needs the variable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

SHARED_DATA_ENV = "TKPY_SHARED_DATA"

_PACKAGE = Path(__file__).resolve().parent


def shared_data_dir() -> Optional[Path]:
    """``$TKPY_SHARED_DATA`` if set, else ``<repo>/../shared/data`` in a source checkout, else None.

    The folder is not checked for existence: a file in it is, by :func:`shared_data_file`.
    """
    if os.environ.get(SHARED_DATA_ENV):
        return Path(os.environ[SHARED_DATA_ENV])
    # A source checkout is <repo>/python/tkpy with <repo>/pyproject.toml; site-packages is not.
    repo = _PACKAGE.parents[1]
    if _PACKAGE.parent.name == "python" and (repo / "pyproject.toml").is_file():
        return repo.parent / "shared" / "data"
    return None


def shared_data_file(relative: str) -> Path:
    """The file ``relative`` (e.g. ``"duo_attention/<model>.full_attention_heads.tsv"``) in :func:`shared_data_dir`.

    Raises
    ------
    FileNotFoundError
        When the file is absent, naming the path looked at and ``TKPY_SHARED_DATA``.
    """
    folder, hint = shared_data_dir(), f"set {SHARED_DATA_ENV} to the folder that holds {relative.split('/')[0]}/"
    if folder is None:
        raise FileNotFoundError(
            f"shared data file {relative!r}: {hint} (tkpy at {_PACKAGE} is not in a source checkout, "
            "so there is no <repo>/../shared/data to look in)"
        )
    path = folder / relative
    if not path.is_file():
        found_by = f"${SHARED_DATA_ENV}"
        if not os.environ.get(SHARED_DATA_ENV):
            found_by = f"the source checkout, as {SHARED_DATA_ENV} is unset"
        raise FileNotFoundError(f"shared data file not found: {path} (folder from {found_by}); {hint}")
    return path


def duo_attention_pattern(model: str) -> Path:
    """DuoAttention's released head gates for ``model`` (e.g. ``"Meta-Llama-3.1-8B-Instruct"``), a TSV of
    layers x KV heads; FileNotFoundError (:func:`shared_data_file`) when absent."""
    return shared_data_file(f"duo_attention/{model}.full_attention_heads.tsv")

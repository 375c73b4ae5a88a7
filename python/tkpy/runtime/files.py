"""The files of a checkpoint folder, read as untrusted input: a name the checkpoint gives must resolve
inside the folder, and a file that does not parse is named in the error."""

from __future__ import annotations

import json
from pathlib import Path, PurePath

from ..errors import ArgumentError

__all__ = ["MAX_JSON_BYTES", "read_json_object", "resolve_inside"]

# config.json, generation_config.json and the shard index are read whole; the largest released
# ones are well under a megabyte, so a bigger file is not one of them.
MAX_JSON_BYTES = 64 << 20


def _allowed_roots(folder: Path) -> tuple[Path, ...]:
    """Where the files of ``folder`` may live: the folder itself and, for a snapshot in the Hugging
    Face hub cache (``models--org--name/snapshots/<revision>``), that repository's ``blobs``
    folder, which every file of a snapshot is a link into."""
    folder = folder.resolve()
    if folder.parent.name == "snapshots":
        return folder, folder.parent.parent / "blobs"
    return (folder,)


def resolve_inside(folder: Path, name, what: str) -> Path:
    """``folder / name``, refused unless ``name`` is a relative path that stays inside the folder
    once links are followed. ``what`` says where the name comes from, for the error."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ArgumentError(f"{what}: expected a file name, got {name!r}")
    if PurePath(name).is_absolute() or ".." in PurePath(name).parts:
        raise ArgumentError(f"{what}: {name!r} is not a plain name inside the model folder {folder}")
    path = folder / name
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in _allowed_roots(folder)):
        raise ArgumentError(f"{what}: {name!r} leads outside the model folder {folder} (to {resolved})")
    return path


def read_json_object(path: Path) -> dict:
    """Parse a JSON file that must hold one object; any failure names the file."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ArgumentError(f"{path}: {size} bytes is too large for a checkpoint JSON file (at most {MAX_JSON_BYTES})")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ArgumentError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise ArgumentError(f"{path}: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and an integer with too many digits
        raise ArgumentError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ArgumentError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value

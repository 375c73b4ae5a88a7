"""The files the GPU run harness shares between its parts: the journal (``journal.jsonl``) and the
failure files (``failures/<test>.txt``). The pytest plugin writes them while tests run,
``gpu_run.py`` when a test takes its whole process down, and ``summarize_gpu_run.py`` reads them.
Standard library only."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

JOURNAL = "journal.jsonl"
FAILURES = "failures"


def append_event(folder: Path, event: str, **fields) -> None:
    """One journal line, fsync'd, so that a run killed at any point keeps every line it wrote."""
    with (folder / JOURNAL).open("a") as handle:
        handle.write(json.dumps({"t": round(time.time(), 3), "event": event, **fields}) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_events(folder: Path) -> list[dict]:
    """The journal's events, skipping a last line cut by a kill."""
    path = folder / JOURNAL
    events = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def failure_path(folder: Path, test: str) -> Path:
    """failures/<test id with unsafe characters replaced>.txt, its folder created."""
    (folder / FAILURES).mkdir(exist_ok=True)
    return folder / FAILURES / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', test)[:180]}.txt"


def failure_header(test: str, kind: str, seed: str, worker: str, headline: str = "") -> str:
    """The lines every failure file starts with; summarize_gpu_run.py reads test, kind and headline."""
    return f"test: {test}\nkind: {kind}\nseed: {seed}\nworker: {worker}\n" + (headline + "\n" if headline else "")

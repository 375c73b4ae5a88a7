"""``python -m tkpy bench``: a front end over the benchmark cases of a tkpy source checkout.

The cases are not part of the package: they live in the checkout's ``benchmarks/`` folder, where
the pytest-benchmark suite (``pytest benchmarks``) runs them too. ``--suite DIR`` names that
folder; without it, ``./benchmarks``, else the checkout that this package runs from (an editable
install). The other arguments go to the suite's front end, ``benchmarks/cli.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

_CHECKOUT_SUITE = Path(__file__).resolve().parents[3] / "benchmarks"  # <checkout>/python/tkpy/bench/


def _find_suite(requested: Optional[Path]) -> Optional[Path]:
    candidates = [requested] if requested else [Path("benchmarks"), _CHECKOUT_SUITE]
    return next((path.resolve() for path in candidates if (path / "cli.py").is_file()), None)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--suite", type=Path)
    known, rest = parser.parse_known_args(argv)
    suite = _find_suite(known.suite)
    if suite is None:
        looked = known.suite or f"./benchmarks and {_CHECKOUT_SUITE}"
        print(f"tkpy bench: no benchmark cases (cli.py) in {looked}: run it from a tkpy source checkout, or pass "
              "--suite DIR, the checkout's benchmarks/ folder", file=sys.stderr)
        return 2
    sys.path.insert(0, str(suite))
    import cli

    return cli.main(rest)

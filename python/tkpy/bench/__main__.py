"""``python -m tkpy.bench``: the same as ``python -m tkpy bench``."""

import sys

from .cli import main

sys.exit(main())

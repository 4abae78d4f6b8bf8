"""``python -m ryzanstein ...``: the same as the ``ryzanstein`` command (for a venv without its script)."""

import sys

from ryzanstein.cli import main

sys.exit(main())

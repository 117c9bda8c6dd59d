"""``python -m jsoftmax`` — the same command line as the ``jsoftmax`` script."""

from __future__ import annotations

import sys

from jsoftmax._cli import main

if __name__ == "__main__":
    sys.exit(main())

"""The performance benchmark table; the same code as ``jsoftmax bench``.

Usage::

    python benchmarks/bench.py            # full shapes, 7 interleaved pairs per row
    python benchmarks/bench.py --quick    # smaller shapes, under a minute
    python benchmarks/bench.py --json results.json
"""

from __future__ import annotations

import sys

from jsoftmax._cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))

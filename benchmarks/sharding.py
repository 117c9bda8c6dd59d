"""The per-layout table of the fused loss under ``jax.jit`` + ``NamedSharding``.

Prints, for data-parallel, FSDP, vocabulary-parallel and 2-D layouts (both weight
layouts) on 8 simulated CPU devices (mesh ``data=2 x model=4``), ``N=4096, D=512,
V=65536`` float32: the naive path's and the fused loss's per-device temporary memory
(explicit and auto sharding modes) and the largest all-gather as a fraction of the head.
The same as ``jsoftmax bench --sharding``; the code is ``jsoftmax/_bench_sharding.py``.

    python benchmarks/sharding.py            # memory and collectives (~30 s on 2 cores)
    python benchmarks/sharding.py --pairs 3  # and fused/naive time ratios (minutes)
"""

from __future__ import annotations

import argparse
import sys

from jsoftmax import _bench_sharding

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=0, help="interleaved timing pairs")
    args = parser.parse_args()
    sys.exit(_bench_sharding.main(pairs=args.pairs))

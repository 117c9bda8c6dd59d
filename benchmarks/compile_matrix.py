"""The README's compile table: every kernel at production shapes, compiled for real targets.

Runs the real device compilers on this machine (no accelerator needed): libtpu for TPU
v4 / v5e / v5p / v6e, XLA's CUDA pipeline with Triton and ptxas for H100 and A100 (the
``[aot]`` extra). Prints the compiler's temporary memory (MiB) per case and target as a
markdown table, then the status table (kernels x targets) and the wall time. The same
cases are asserted by ``pytest -m aot`` (tests/test_aot.py).

Usage::

    pip install -e ".[aot]"
    python benchmarks/compile_matrix.py                 # all targets, ~4 minutes
    python benchmarks/compile_matrix.py --targets "TPU v5e" H100
    python benchmarks/compile_matrix.py --json matrix.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jsoftmax.kernels import _aot  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="*", help="target names (default: all)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    reason = _aot.missing()
    if reason is not None:
        print(f"compile matrix: {reason}")
        return 1
    targets = [_aot.TARGETS_BY_NAME[t] for t in args.targets] if args.targets else _aot.TARGETS
    start = time.perf_counter()
    results = _aot.compile_matrix(_aot.matrix_cases(), targets)
    seconds = time.perf_counter() - start
    print("Temporary memory (MiB) of the compiled forward + backward program, from each")
    print("target compiler's memory_analysis(); 'exceeds HBM': the shape's inputs and")
    print("outputs alone fill that device, and its compiler refuses it.")
    print()
    print(_aot.markdown_table(results))
    print()
    print(_aot.status_table(results))
    print()
    print(f"{len(results)} compiles in {seconds:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=1)
    return 0 if all(r.status != "FAIL" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

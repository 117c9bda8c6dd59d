"""TPU benchmark of the Pallas kernels (``jsoftmax.kernels``) against XLA: one short script.

For each row: correctness first (the kernel route against jsoftmax's XLA route at the
benchmark shape, values and gradients), then interleaved timing (the method: jit,
warm-up, rounds of pallas / xla / naive, median of the per-round ratios) and the
compiler's temporary memory of each route. Prints the README's table (markdown).

Routes: ``pallas`` the kernel (``impl="pallas"`` or ``jsoftmax.kernels``), ``xla``
jsoftmax's XLA path (what ``impl="auto"`` runs until a kernel is measured faster here,
see ``jsoftmax/_impl.py``), ``naive`` the textbook composition (``jax.nn``, ``h @ W`` +
optax). A ratio below 1 in every row of a kernel, on each TPU generation, is what lets
``impl="auto"`` pick it (add the pair to ``jsoftmax._impl.MEASURED_WINS``).

Usage::

    python benchmarks/tpu_kernels.py                 # on a TPU: a few minutes
    python benchmarks/tpu_kernels.py --quick         # smaller shapes
    python benchmarks/tpu_kernels.py --json out.json
    python benchmarks/tpu_kernels.py --allow-cpu     # smoke test: tiny shapes, interpreter

Exit status 1 when a kernel disagrees with XLA. To add a benchmark (e.g. a new kernel),
append a ``_kernel_bench.Bench`` in :func:`benches`.
"""

from __future__ import annotations

import os
import sys

import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _kernel_bench as kb  # noqa: E402


def benches(size: str, cpu: bool) -> list[kb.Bench]:
    f32, bf16 = jnp.float32, jnp.bfloat16
    if size == "tiny":
        return [
            kb.softmax_forward_bench(64, 1000, f32),
            kb.softmax_bench(64, 1000, f32),
            kb.cross_entropy_bench(64, 1000, f32),
            kb.linear_cross_entropy_bench(64, 64, 1000, f32),
        ]
    if size == "quick":
        return [
            kb.softmax_bench(1024, 32768, f32),
            kb.cross_entropy_bench(1024, 32768, bf16),
            kb.linear_cross_entropy_bench(2048, 512, 32768, bf16),
        ]
    # v5e has 16 GiB of HBM: every row's inputs, outputs and gradients stay under 8 GiB.
    return [
        kb.softmax_bench(16384, 4096, f32),  # one column block: a single pass
        kb.softmax_forward_bench(4096, 32768, f32),
        kb.softmax_bench(4096, 32768, f32),  # two passes per row
        kb.softmax_bench(1024, 262144, bf16, log=True),  # 256k vocabulary
        kb.cross_entropy_bench(4096, 32768, f32),
        kb.cross_entropy_bench(8192, 131072, bf16),
        kb.cross_entropy_bench(4096, 262144, bf16, label_smoothing=0.1, z_loss=1e-4),
        kb.linear_cross_entropy_bench(8192, 4096, 131072, bf16),
        kb.linear_cross_entropy_bench(8192, 4096, 131072, bf16, layout="vd"),
    ]


if __name__ == "__main__":
    sys.exit(kb.main(benches, sys.argv[1:], platform="tpu", doc=__doc__))

"""GPU benchmark of the Pallas kernels (``jsoftmax.kernels``) against XLA: one short script.

For each row: correctness first (the kernel route against jsoftmax's XLA route at the
benchmark shape, values and gradients), then interleaved timing (the method: jit,
warm-up, rounds of pallas / xla / naive, median of the per-round ratios) and the
compiler's temporary memory of each route. Prints the README's table (markdown).

Routes: ``pallas`` the kernel (``impl="pallas"`` or ``jsoftmax.kernels``), ``xla``
jsoftmax's XLA path (what ``impl="auto"`` runs until a kernel is measured faster here,
see ``jsoftmax/_impl.py``), ``naive`` the textbook composition (``jax.nn``, ``h @ W`` +
optax). A ratio below 1 in every row of a kernel, on each GPU generation, is what lets
``impl="auto"`` pick it (add the pair to ``jsoftmax._impl.MEASURED_WINS``).

Usage::

    python benchmarks/gpu_kernels.py                 # on a GPU: a few minutes
    python benchmarks/gpu_kernels.py --quick         # smaller shapes
    python benchmarks/gpu_kernels.py --json out.json
    python benchmarks/gpu_kernels.py --allow-cpu     # smoke test: tiny shapes, interpreter

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
    return [
        kb.softmax_bench(16384, 4096, f32),  # one pass: a row is one register tile
        kb.softmax_forward_bench(4096, 32768, f32),
        kb.softmax_bench(4096, 32768, f32),  # the performance table's shape: two passes per row
        kb.softmax_bench(1024, 262144, bf16, log=True),  # 256k vocabulary
        kb.cross_entropy_bench(4096, 32768, f32),
        kb.cross_entropy_bench(8192, 131072, bf16),
        kb.cross_entropy_bench(4096, 262144, bf16, label_smoothing=0.1, z_loss=1e-4),
        kb.linear_cross_entropy_bench(8192, 4096, 131072, bf16),
        kb.linear_cross_entropy_bench(8192, 4096, 131072, bf16, layout="vd"),
        kb.linear_cross_entropy_bench(8192, 4096, 131072, bf16, reduction="none"),
        # Gradient filtering where it can pay (a trained-LM-like softmax) and where it
        # cannot (random weights: nothing to skip, the filter's overhead only).
        kb.linear_cross_entropy_bench(8192, 4096, 131072, bf16, peaked=True, filter_eps="auto"),
        kb.linear_cross_entropy_bench(8192, 4096, 131072, bf16, filter_eps="auto"),
    ]


if __name__ == "__main__":
    sys.exit(kb.main(benches, sys.argv[1:], platform="gpu", doc=__doc__))

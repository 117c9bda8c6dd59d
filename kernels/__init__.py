"""Pallas kernels for jsoftmax, installed as ``jsoftmax.kernels``.

All functions work on the last axis of 2-D inputs (callers reshape), accept any row
length (columns are tiled with an online max/sum-exp), handle shapes that are not block
multiples with masked edge tiles, and carry ``jax.custom_vjp`` rules with their own
backward kernels.

* :func:`softmax`, :func:`log_softmax` -- ``(N, C) -> (N, C)``.
* :func:`cross_entropy` -- ``(N, C)`` logits, ``(N,)`` labels -> ``(N,)`` float32 loss.
* :func:`linear_cross_entropy` -- ``hidden @ weight (+ bias)`` fused with the loss; the
  ``(N, V)`` logits are never materialised.
* :func:`lowering_report` -- lowers every kernel for ``cuda``/``tpu`` from any host.

``interpret=None`` (default) compiles with Mosaic on TPU and Triton on CUDA/ROCm, and runs
the Pallas interpreter on CPU; the choice is made per platform at lowering time.
"""

from ._cross_entropy import cross_entropy as cross_entropy
from ._linear_cross_entropy import linear_cross_entropy as linear_cross_entropy
from ._lowering import lowering_report as lowering_report
from ._softmax import log_softmax as log_softmax
from ._softmax import softmax as softmax

__all__ = [
    "cross_entropy",
    "linear_cross_entropy",
    "log_softmax",
    "lowering_report",
    "softmax",
]

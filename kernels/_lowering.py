"""Cross-platform lowering check of every kernel, for ``jsoftmax doctor`` and the tests.

Lowering (``jax.jit(f).trace(*args).lower(lowering_platforms=(p,))``) runs the Pallas
front end and the platform's kernel lowering (Pallas -> Mosaic IR for ``tpu``,
Pallas -> Triton IR for ``cuda``) on any host, CPU included. It does not run the
device compilers that come after (libtpu's Mosaic passes, Triton -> PTX), which need
the device's own software stack.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ._cross_entropy import cross_entropy
from ._linear_cross_entropy import linear_cross_entropy
from ._softmax import log_softmax, softmax

_S = jax.ShapeDtypeStruct


def _cases() -> dict[str, tuple[Callable[..., Any], Callable[..., Any], tuple[Any, ...]]]:
    """``kernel -> (forward fn, backward fn, abstract args)`` on small ragged shapes.

    The widths exceed one column tile so the multi-tile (online) paths are lowered.
    """
    x = _S((5, 9000), jnp.bfloat16)
    labels = _S((5,), jnp.int32)
    h, w, b = _S((5, 40), jnp.float32), _S((300, 40), jnp.float32), _S((300,), jnp.float32)

    def vjp_of(f):
        return lambda x: jax.vjp(f, x)[1](x)[0]

    def ce(x, y):
        return cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-4)

    def lce(h, w, b, y):
        return linear_cross_entropy(
            h, w, y, linear_bias=b, weight_layout="vd", label_smoothing=0.1, logit_softcap=30.0
        )

    def ce_bwd(x, y):
        return jax.grad(lambda x: ce(x, y).sum())(x)

    def lce_bwd(h, w, b, y):
        return jax.grad(lambda h, w, b: lce(h, w, b, y).sum(), argnums=(0, 1, 2))(h, w, b)

    return {
        "softmax": (softmax, vjp_of(softmax), (x,)),
        "log_softmax": (log_softmax, vjp_of(log_softmax), (x,)),
        "cross_entropy": (ce, ce_bwd, (x, labels)),
        "linear_cross_entropy": (lce, lce_bwd, (h, w, b, labels)),
    }


def lowering_report(*, platforms: Sequence[str] = ("cuda", "tpu")) -> list[dict[str, Any]]:
    """Lower every kernel, forward and backward, for each platform; report what failed.

    Runs on any host (no accelerator needed) in a few seconds: small shapes, abstract
    arguments, no compilation or execution.

    Args:
      platforms: lowering platforms, e.g. ``("cuda", "tpu")``.

    Returns:
      One dict per kernel x direction x platform with keys ``kernel`` (``"softmax"``,
      ``"log_softmax"``, ``"cross_entropy"``, ``"linear_cross_entropy"``),
      ``direction`` (``"fwd"`` or ``"bwd"``; ``"bwd"`` lowers the whole vjp),
      ``platform``, ``ok`` (bool) and ``error`` (``None`` or ``"Type: message"``).

    Examples:
      >>> from jsoftmax import kernels
      >>> all(r["ok"] for r in kernels.lowering_report(platforms=("tpu",)))
      True
    """
    if isinstance(platforms, str):
        platforms = (platforms,)
    report = []
    for kernel, (fwd, bwd, args) in _cases().items():
        for direction, fn in (("fwd", fwd), ("bwd", bwd)):
            for platform in platforms:
                try:
                    jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))
                except Exception as e:  # noqa: BLE001 -- the report is the error handler
                    message = str(e).strip().splitlines()
                    error = f"{type(e).__name__}: {message[0] if message else ''}"[:500]
                    ok = False
                else:
                    ok, error = True, None
                report.append(
                    dict(kernel=kernel, direction=direction, platform=platform, ok=ok, error=error)
                )
    return report

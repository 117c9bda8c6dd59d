"""What ``impl="auto"`` runs: the one place for that rule.

A Pallas kernel is chosen automatically on a platform only when it is *proven* there:

1. it compiles for every target of that platform in the compile matrix (the ``aot``
   tests: ``jsoftmax.kernels._aot``, H100/A100 for ``cuda``, TPU v4/v5e/v5p/v6e for
   ``tpu``), and
2. it has been measured faster than the XLA path on that hardware
   (``benchmarks/gpu_kernels.py`` / ``benchmarks/tpu_kernels.py``: interleaved pairs,
   median ratio below 1 at the README's shapes, on every generation measured).

Until both hold, ``"auto"`` means the XLA path. No device measurement exists yet, so
:data:`MEASURED_WINS` is empty and ``"auto"`` is XLA everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

# (kernel, platform) pairs proven as described above; platform is "cuda" or "tpu"
# (jax.lax.platform_dependent's names). To add one: run the device benchmark on the
# platform's hardware, put the measured table (device, shapes, ratios) in the README's
# kernel section, and add the pair here with a comment naming that table. The choice is
# then made per platform at lowering time, so a program lowered for another platform
# keeps the XLA path.
MEASURED_WINS: frozenset[tuple[str, str]] = frozenset()


def auto_platforms(kernel: str) -> tuple[str, ...]:
    """The platforms on which ``impl="auto"`` runs ``kernel``'s Pallas kernel."""
    return tuple(sorted(p for k, p in MEASURED_WINS if k == kernel))


def _kernels_importable() -> bool:
    try:
        from jsoftmax import kernels  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_auto(kernel: str, supported: bool) -> str:
    """``impl="auto"`` as ``"xla"`` or, when some platform has a proven win, ``"auto"``."""
    if supported and auto_platforms(kernel) and _kernels_importable():
        return "auto"
    return "xla"


def run_auto(kernel: str, *, pallas: Callable[[], Any], xla: Callable[[], Any]) -> Any:
    """``pallas()`` on the platforms of :func:`auto_platforms`, ``xla()`` elsewhere.

    Decided at lowering time (``jax.lax.platform_dependent``), so cross-platform lowering
    from any host picks per platform.
    """
    branches = dict.fromkeys(auto_platforms(kernel), pallas)
    if not branches:
        return xla()
    return jax.lax.platform_dependent(default=xla, **branches)

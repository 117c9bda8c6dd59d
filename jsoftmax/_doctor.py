"""``jsoftmax doctor``: what this installation will do on this machine.

Prints the versions (jsoftmax, JAX, jaxlib, optax, Python), the default backend and its
devices, how the Pallas kernels will run here (compiled Mosaic on TPU, compiled Triton on
CUDA/ROCm, Pallas' interpreter otherwise — numerically the same, much slower), which
optional extras are importable, and a lowering check: every kernel, forward and backward,
lowered for ``cuda`` and ``tpu`` from this machine via ``jsoftmax.kernels.lowering_report``
(lowering needs no accelerator, so a CPU-only machine can check both). With the ``[aot]``
extra installed it also shows the compile matrix: every kernel, forward and backward,
compiled by the real compilers for H100, A100 and TPU v4/v5e/v5p/v6e (small shapes; the
production-shape matrix is ``pytest -m aot``); without it, how to get it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time
from typing import Any

import jax

import jsoftmax as jsm

# How `jsoftmax.kernels` runs with `interpret=None` on each JAX backend.
_KERNEL_MODE = {
    "tpu": "compiled (Mosaic TPU)",
    "gpu": "compiled (Triton)",
    "cuda": "compiled (Triton)",
    "rocm": "compiled (Triton)",
}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def kernel_mode(backend: str | None = None) -> str:
    """How the Pallas kernels run with ``interpret=None`` on ``backend`` (default: JAX's)."""
    backend = jax.default_backend() if backend is None else backend
    return _KERNEL_MODE.get(
        backend, f"interpreted (Pallas interpreter; no compiled kernels on {backend})"
    )


def environment() -> list[tuple[str, str]]:
    """``(key, value)`` lines describing the installation and the machine."""
    devices = jax.devices()
    kinds = sorted({getattr(d, "device_kind", d.platform) for d in devices})
    lines = [
        ("jsoftmax", jsm.__version__),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("jax / jaxlib", f"{jax.__version__} / {_version('jaxlib')}"),
        ("optax", _version("optax")),
        ("backend", jax.default_backend()),
        ("devices", f"{len(devices)} x {', '.join(kinds)} ({devices[0].platform})"),
        ("CPU cores visible", str(os.cpu_count())),
        ("x64 enabled", str(jax.config.jax_enable_x64)),
        ("kernels run", kernel_mode()),
    ]
    for dist, purpose in (
        ("scikit-learn", "demo"),
        ("tqdm", "demo/bench progress"),
        ("matplotlib", "reliability_diagram, notebooks"),
    ):
        lines.append((f"{dist} ({purpose})", _version(dist)))
    return lines


def lowering_table(report: list[dict[str, Any]]) -> str:
    """The lowering report as a table: one row per kernel/direction, one column per platform."""
    platforms = sorted({r["platform"] for r in report})
    keys: list[tuple[str, str]] = []
    for r in report:
        k = (r["kernel"], r["direction"])
        if k not in keys:
            keys.append(k)
    status = {(r["kernel"], r["direction"], r["platform"]): r for r in report}
    head = ["kernel", "direction", *platforms]
    body = []
    errors = []
    for kernel, direction in keys:
        cells = [kernel, direction]
        for p in platforms:
            r = status.get((kernel, direction, p))
            if r is None:
                cells.append("-")
            elif r["ok"]:
                cells.append("ok")
            else:
                cells.append("FAIL")
                errors.append(f"{kernel} {direction} on {p}: {r.get('error') or 'unknown error'}")
        body.append(cells)
    if not body:
        return "(no kernels reported)"
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    out = [fmt(head), "  ".join("-" * w for w in widths), *(fmt(b) for b in body)]
    if errors:
        out += ["", "errors:"] + [f"  {e.splitlines()[0][:300]}" for e in errors]
    return "\n".join(out)


def main(args: Any) -> int:
    """Entry point of ``jsoftmax doctor`` (``args`` from the argparse sub-parser)."""
    lines = environment()
    width = max(len(k) for k, _ in lines)
    print("jsoftmax doctor")
    print()
    for k, v in lines:
        print(f"  {k.ljust(width)}  {v}")
    print()
    if args.no_lowering:
        print("Pallas lowering check: skipped (--no-lowering)")
        return 0
    try:
        from jsoftmax.kernels import lowering_report
    except ImportError as e:
        print(f"Pallas lowering check: n/a (jsoftmax.kernels.lowering_report unavailable: {e})")
        return 0
    print("Pallas lowering check (lowered from this machine, not run):")
    start = time.perf_counter()
    report = lowering_report(platforms=("cuda", "tpu"))
    print(lowering_table(report))
    n_ok = sum(bool(r["ok"]) for r in report)
    print()
    print(f"{n_ok}/{len(report)} lowerings ok in {time.perf_counter() - start:.1f} s")
    compiled_ok = True
    if not getattr(args, "no_compile", False):
        print()
        compiled_ok = compile_matrix()
    return 0 if n_ok == len(report) and compiled_ok else 1


def compile_matrix() -> bool:
    """Print the compile matrix (targets x kernels) or how to get it; ``False`` on failures."""
    from jsoftmax.kernels import _aot

    reason = _aot.missing()
    if reason is not None and all(_aot.missing(t.platform) for t in _aot.TARGETS):
        print(f"Compile matrix (real GPU/TPU compilers): not available: {reason}.")
        return True
    print("Compile matrix (real GPU/TPU compilers, small shapes, forward + backward):")
    start = time.perf_counter()
    results = _aot.compile_matrix(_aot.doctor_cases())
    print(_aot.status_table(results))
    if reason is not None:
        print(f"(partial: {reason})")
    n_ok = sum(r.status == "ok" and r.n_kernels > 0 for r in results)
    print()
    print(f"{n_ok}/{len(results)} compiles ok in {time.perf_counter() - start:.1f} s")
    return n_ok == len(results)

"""Shared machinery of the device benchmarks (``gpu_kernels.py``, ``tpu_kernels.py``).

A benchmark is a :class:`Bench`: a name, a shape label, a function making the inputs and
one jitted program per route -- ``pallas`` (the kernel), ``xla`` (jsoftmax's own XLA
path, what ``impl="auto"`` runs today) and ``naive`` (the textbook composition, e.g.
``h @ W`` + optax). :func:`run` first checks the pallas route against the xla route at
the benchmark shape (values and gradients), then times the routes interleaved
(``P X N P X N ...`` after warm-up, median of the per-round ratios) and
reads each program's temporary memory from ``compile().memory_analysis()``.

To add a benchmark (say a new kernel), append a :class:`Bench` to the list a script
builds; nothing else changes.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROUTES = ("pallas", "xla", "naive")


@dataclasses.dataclass
class Bench:
    """One row: ``programs[route](*make())``; every program returns a pytree of arrays.

    ``tol`` is the relative tolerance (to the largest magnitude of each output) of the
    pallas-vs-xla check.
    """

    name: str
    shape: str
    make: Callable[[], tuple[Any, ...]]
    programs: dict[str, Callable[..., Any]]
    tol: float = 2e-2


def _timer(fn, args):
    def run():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - t0

    return run


def temp_bytes(fn, args) -> int:
    analysis = fn.lower(*args).compile().memory_analysis()
    return int(getattr(analysis, "temp_size_in_bytes", -1)) if analysis is not None else -1


def max_error(a, b) -> float:
    """Largest |a - b| over all outputs, relative to each output's largest |b|."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if np.isnan(x).any() or np.isnan(y).any():
            return float("nan")
        scale = max(float(np.max(np.abs(y))), 1e-30)
        worst = max(worst, float(np.max(np.abs(x - y))) / scale)
    return worst


def run(benches: Sequence[Bench], pairs: int) -> list[dict[str, Any]]:
    rows = []
    for b in benches:
        args = b.make()
        progs = {r: jax.jit(f) for r, f in b.programs.items()}
        err = max_error(progs["pallas"](*args), progs["xla"](*args))
        ok = bool(err <= b.tol)
        row = dict(bench=b.name, shape=b.shape, max_rel_error=err, correct=ok)
        timers = {r: _timer(p, args) for r, p in progs.items()}
        for t in timers.values():  # compile and warm up
            t(), t()
        times: dict[str, list[float]] = {r: [] for r in timers}
        for _ in range(pairs):
            for r, t in timers.items():
                times[r].append(t())
        for r in timers:
            row[f"{r}_ms"] = 1e3 * statistics.median(times[r])
            row[f"{r}_temp_mib"] = temp_bytes(progs[r], args) / 2**20
        for base in ("xla", "naive"):
            if base in times:
                ratios = [a / c for a, c in zip(times["pallas"], times[base], strict=True)]
                row[f"pallas/{base}"] = statistics.median(ratios)
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(row) -> str:
    status = "ok" if row["correct"] else f"MISMATCH (max rel err {row['max_rel_error']:.2e})"
    times = "  ".join(f"{r} {row[f'{r}_ms']:.3f} ms" for r in ROUTES if f"{r}_ms" in row)
    return f"{row['bench']} {row['shape']}: {status}; {times}"


def markdown(rows: Sequence[dict[str, Any]], device: str) -> str:
    """The README's table: times, ratios (< 1: the kernel is faster), temp memory."""
    lines = [
        f"Device: {device}; jax {jax.__version__}. Ratio = median over interleaved rounds "
        "of pallas time / baseline time (< 1: the kernel is faster).",
        "",
        "| benchmark | shape | pallas ms | xla ms | naive ms | pallas/xla | pallas/naive "
        "| temp MiB pallas / xla / naive | matches xla |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        cell = lambda k, fmt, r=r: fmt.format(r[k]) if k in r else "-"
        temps = " / ".join(cell(f"{x}_temp_mib", "{:.0f}") for x in ROUTES)
        lines.append(
            f"| {r['bench']} | {r['shape']} | {cell('pallas_ms', '{:.3f}')} "
            f"| {cell('xla_ms', '{:.3f}')} | {cell('naive_ms', '{:.3f}')} "
            f"| {cell('pallas/xla', '{:.2f}')} | {cell('pallas/naive', '{:.2f}')} | {temps} "
            f"| {'yes' if r['correct'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(build: Callable[[str, bool], list[Bench]], argv, *, platform: str, doc: str) -> int:
    """Command line shared by the device scripts; exit status 1 on a correctness mismatch."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes")
    parser.add_argument("--pairs", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run on CPU with tiny shapes (interpreter mode; checks the script, not speed)",
    )
    args = parser.parse_args(argv)
    backend = jax.default_backend()
    wanted = {"gpu": ("gpu", "cuda", "rocm"), "tpu": ("tpu",)}[platform]
    if backend not in wanted:
        if not (backend == "cpu" and args.allow_cpu):
            print(f"No {platform.upper()} found (JAX backend: {backend}); this benchmark times")
            print("compiled kernels there. Pass --allow-cpu for a smoke test.")
            return 0
        args.pairs = min(args.pairs, 2)
    size = "tiny" if backend == "cpu" else "quick" if args.quick else "full"
    device = f"{jax.devices()[0].device_kind} ({backend})"
    print(f"jax {jax.__version__}, device: {device}", flush=True)
    rows = run(build(size, backend == "cpu"), args.pairs)
    print()
    print(markdown(rows, device))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, rows=rows), f, indent=2)
    return 0 if all(r["correct"] for r in rows) else 1


# ------------------------------------------------------------- standard benchmark rows


def softmax_bench(n: int, c: int, dtype: Any, *, log: bool = False) -> Bench:
    import jsoftmax as jsm
    from jsoftmax import kernels

    kernel = kernels.log_softmax if log else kernels.softmax
    ours = jsm.log_softmax if log else jsm.softmax
    naive = jax.nn.log_softmax if log else jax.nn.softmax

    def vjp_of(f):
        def run(x, g):
            y, vjp = jax.vjp(f, x)
            return y, vjp(g)[0]

        return run

    def make():
        x = (3 * jax.random.normal(jax.random.key(0), (n, c), jnp.float32)).astype(dtype)
        g = jax.random.normal(jax.random.key(1), (n, c), jnp.float32).astype(dtype)
        return x, g

    name = ("log_softmax" if log else "softmax") + " fwd+vjp"
    progs = dict(pallas=vjp_of(kernel), xla=vjp_of(ours), naive=vjp_of(naive))
    return Bench(name, f"({n}, {c}) {jnp.dtype(dtype).name}", make, progs)


def softmax_forward_bench(n: int, c: int, dtype: Any) -> Bench:
    """Softmax forward; ``naive`` is an elementwise pass (one read, one write: the same
    bytes as a copy, the floor for any softmax), so ``pallas/naive`` is the inverse of the
    fraction of copy bandwidth reached (the target is >= 70 %)."""
    import jsoftmax as jsm
    from jsoftmax import kernels

    def make():
        return ((3 * jax.random.normal(jax.random.key(0), (n, c), jnp.float32)).astype(dtype),)

    progs = dict(pallas=kernels.softmax, xla=jsm.softmax, naive=lambda x: -x)
    return Bench("softmax fwd (naive = copy)", f"({n}, {c}) {jnp.dtype(dtype).name}", make, progs)


def cross_entropy_bench(n: int, c: int, dtype: Any, **options: Any) -> Bench:
    import optax

    import jsoftmax as jsm

    def route(impl):
        return jax.value_and_grad(lambda z, y: jsm.cross_entropy(z, y, impl=impl, **options))

    def naive(z, y):
        return optax.softmax_cross_entropy_with_integer_labels(z.astype(jnp.float32), y).mean()

    def make():
        z = (3 * jax.random.normal(jax.random.key(0), (n, c), jnp.float32)).astype(dtype)
        return z, jax.random.randint(jax.random.key(1), (n,), 0, c)

    progs = dict(pallas=route("pallas"), xla=route("xla"), naive=jax.value_and_grad(naive))
    label = f"({n}, {c}) {jnp.dtype(dtype).name}" + "".join(f" {k}={v}" for k, v in options.items())
    return Bench("cross_entropy fwd+bwd", label, make, progs)


def lm_head_inputs(n: int, d: int, v: int, dtype: Any, layout: str = "dv", peaked: bool = False):
    """Hidden states, projection and labels of an LM head.

    Random weights give a near-uniform softmax, where gradient filtering cannot skip
    anything. ``peaked`` gives a trained-LM-like one instead: logits ~ 4·N(0, 1) plus a
    Zipf-like prior, so per token a few dozen classes carry the mass, and the label is
    drawn from the model's own distribution.
    """
    h = jax.random.normal(jax.random.key(0), (n, d), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (d, v), jnp.float32) / np.sqrt(d)
    y = jax.random.randint(jax.random.key(2), (n,), 0, v)
    if peaked:
        w = w * 4.0 - 1.5 * jnp.log1p(jnp.arange(v, dtype=jnp.float32))[None, :] / np.sqrt(d)
        y = jnp.argmax(h @ w + jax.random.gumbel(jax.random.key(3), (n, v)), axis=1)
    w = w if layout == "dv" else w.T
    return h.astype(dtype), w.astype(dtype), y


def linear_cross_entropy_bench(
    n: int,
    d: int,
    v: int,
    dtype: Any,
    layout: str = "dv",
    *,
    peaked: bool = False,
    filter_eps: Any = None,
    reduction: str = "mean",
) -> Bench:
    """``value_and_grad`` w.r.t. hidden and weight of the mean loss.

    ``reduction="mean"`` lets the kernel compute its gradient in the forward (three
    matmuls); ``"none"`` (per-token losses, ``.mean()`` outside) needs four.
    ``filter_eps`` turns on gradient filtering in the kernel (``peaked`` inputs are where
    it pays).
    """
    import optax

    import jsoftmax as jsm

    def route(impl):
        kw = dict(weight_layout=layout, impl=impl)
        if impl == "pallas" and filter_eps is not None:
            kw["filter_eps"] = filter_eps

        def loss(h, w, y):
            if reduction == "none":
                return jsm.linear_cross_entropy(h, w, y, reduction="none", **kw).mean()
            return jsm.linear_cross_entropy(h, w, y, **kw)

        return jax.value_and_grad(loss, argnums=(0, 1))

    def naive(h, w, y):
        # bf16 logits from one matmul, then XLA's cross-entropy: the textbook program.
        wt = w if layout == "dv" else w.T
        return optax.softmax_cross_entropy_with_integer_labels(h @ wt, y).mean()

    progs = dict(
        pallas=route("pallas"), xla=route("xla"), naive=jax.value_and_grad(naive, argnums=(0, 1))
    )
    shape = f"N={n} D={d} V={v} {jnp.dtype(dtype).name} {layout}"
    shape += " peaked" if peaked else ""
    shape += f" filter_eps={filter_eps}" if filter_eps is not None else ""
    shape += " per-token" if reduction == "none" else ""
    return Bench(
        "linear_cross_entropy fwd+bwd",
        shape,
        lambda: lm_head_inputs(n, d, v, dtype, layout, peaked),
        progs,
        tol=3e-2,
    )

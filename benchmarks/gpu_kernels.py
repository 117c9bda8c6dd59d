"""GPU benchmark of the Pallas kernels (``jsoftmax.kernels``) against XLA.

What it measures (PERF.md's method: jit, warm-up, A/B interleaved, median of the
per-pair time ratios; memory from ``compile().memory_analysis()``):

1. softmax forward, as a fraction of a device memory copy of the same bytes (one read,
   one write: the floor for any softmax) -- PERF.md's target is >= 70 %;
2. softmax forward + vjp against ``jax.nn.softmax``;
3. cross-entropy forward + backward (``value_and_grad`` of the mean) against XLA's
   fused ``optax.softmax_cross_entropy_with_integer_labels``;
4. linear cross-entropy ``value_and_grad`` w.r.t. hidden and weight: the kernel with
   ``reduction="mean"`` (gradient in the forward), with gradient filtering, and per-row
   (``.mean()`` outside), each checked against the float32-loss naive path and timed
   against the naive path (``h @ W`` in bf16, then optax) and the chunked pure-XLA path
   (time and temporary memory; ``--peaked`` for a trained-LM-like softmax).

The expected numbers (from bytes and FLOPs) are in the README's kernel section.

Usage::

    python benchmarks/gpu_kernels.py                 # on a GPU (or TPU)
    python benchmarks/gpu_kernels.py --quick         # smaller shapes
    python benchmarks/gpu_kernels.py --json out.json
    python benchmarks/gpu_kernels.py --allow-cpu     # smoke test: tiny shapes, interpreter
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jsoftmax as jsm
from jsoftmax import kernels


def _timer(fn, *args):
    def run():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - t0

    return run


def interleaved(a, b, pairs: int) -> tuple[float, float, float]:
    """``(median t_a, median t_b, median of t_a/t_b)`` over ``pairs`` A/B pairs."""
    a(), b(), a(), b()  # compile and warm up
    ta, tb = [], []
    for _ in range(pairs):
        ta.append(a())
        tb.append(b())
    ratios = [x / y for x, y in zip(ta, tb, strict=True)]
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def temp_bytes(fn, *args) -> int:
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    return int(getattr(analysis, "temp_size_in_bytes", -1)) if analysis is not None else -1


def _vjp_fn(f):
    @jax.jit
    def run(x, g):
        y, vjp = jax.vjp(f, x)
        return y, vjp(g)[0]

    return run


def bench_softmax(shapes, pairs, rows):
    key = jax.random.key(0)
    for n, c, dtype in shapes:
        x = (jax.random.normal(key, (n, c), jnp.float32) * 3).astype(dtype)
        g = jax.random.normal(jax.random.key(1), (n, c), jnp.float32).astype(dtype)
        nbytes = 2 * x.size * x.dtype.itemsize  # one read + one write
        copy = jax.jit(lambda x: -x)  # an elementwise pass: the same bytes as a copy
        ours = jax.jit(kernels.softmax)
        t_ours, t_copy, ratio = interleaved(_timer(ours, x), _timer(copy, x), pairs)
        rows.append(
            dict(
                bench="softmax fwd vs copy",
                shape=f"({n}, {c}) {jnp.dtype(dtype).name}",
                ours_ms=1e3 * t_ours,
                base_ms=1e3 * t_copy,
                ratio=ratio,
                note=f"{1 / ratio:.0%} of copy bandwidth; {nbytes / t_ours / 1e9:.0f} GB/s",
            )
        )
        a, b = _vjp_fn(kernels.softmax), _vjp_fn(jax.nn.softmax)
        t_a, t_b, ratio = interleaved(_timer(a, x, g), _timer(b, x, g), pairs)
        rows.append(
            dict(
                bench="softmax fwd+vjp vs jax.nn",
                shape=f"({n}, {c}) {jnp.dtype(dtype).name}",
                ours_ms=1e3 * t_a,
                base_ms=1e3 * t_b,
                ratio=ratio,
                note="",
            )
        )


def bench_cross_entropy(shapes, pairs, rows):
    for n, c, dtype in shapes:
        x = (jax.random.normal(jax.random.key(0), (n, c), jnp.float32) * 3).astype(dtype)
        y = jax.random.randint(jax.random.key(1), (n,), 0, c)
        ours = jax.jit(jax.value_and_grad(lambda x, y: kernels.cross_entropy(x, y).mean()))
        xla = jax.jit(
            jax.value_and_grad(
                lambda x, y: optax.softmax_cross_entropy_with_integer_labels(x, y).mean()
            )
        )
        t_a, t_b, ratio = interleaved(_timer(ours, x, y), _timer(xla, x, y), pairs)
        mem_a, mem_b = temp_bytes(ours, x, y), temp_bytes(xla, x, y)
        rows.append(
            dict(
                bench="CE fwd+bwd vs XLA (optax)",
                shape=f"({n}, {c}) {jnp.dtype(dtype).name}",
                ours_ms=1e3 * t_a,
                base_ms=1e3 * t_b,
                ratio=ratio,
                note=f"temp {mem_a / 2**20:.0f} vs {mem_b / 2**20:.0f} MiB",
            )
        )


def _lce_inputs(n, d, v, dtype, peaked):
    """Hidden states, weight and labels; ``peaked`` gives a trained-LM-like softmax (most
    mass on a few classes per token) instead of the near-uniform one of random weights."""
    h = jax.random.normal(jax.random.key(0), (n, d), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (d, v), jnp.float32) / np.sqrt(d)
    y = jax.random.randint(jax.random.key(2), (n,), 0, v)
    if peaked:
        # Logits ~ 4·N(0, 1) plus a Zipf-like prior: per token a few dozen classes carry
        # the mass; the label is one of the likely classes.
        w = w * 4.0 - 1.5 * jnp.log1p(jnp.arange(v, dtype=jnp.float32))[None, :] / np.sqrt(d)
        y = jnp.argmax(h @ w + jax.random.gumbel(jax.random.key(3), (n, v)), axis=1)
    return h.astype(dtype), w.astype(dtype), y


def _skip_fraction(h, w, y, eps, tile=(128, 128), rows=1024):
    """Fraction of (tile) gradient tiles the filter would skip, on the first ``rows`` tokens."""
    z = jnp.dot(h[:rows], w, preferred_element_type=jnp.float32)
    p = jax.nn.softmax(z, axis=1)
    d = jnp.abs(p - jax.nn.one_hot(y[:rows], w.shape[1]))
    r, c = min(tile[0], d.shape[0]), min(tile[1], d.shape[1])
    d = d[: d.shape[0] // r * r, : d.shape[1] // c * c]
    big = jnp.max(d.reshape(d.shape[0] // r, r, d.shape[1] // c, c), axis=(1, 3)) >= eps
    return 1.0 - float(jnp.mean(big))


LCE_PATHS = {
    # The naive path: bf16 logits from one matmul, then XLA's cross-entropy (in bf16, or
    # upcast to float32 as PyTorch's `F.cross_entropy(logits.float())` does).
    "naive": lambda h, w, y: optax.softmax_cross_entropy_with_integer_labels(h @ w, y).mean(),
    "naive f32 loss": lambda h, w, y: optax.softmax_cross_entropy_with_integer_labels(
        (h @ w).astype(jnp.float32), y
    ).mean(),
    "xla chunked": lambda h, w, y: jsm.linear_cross_entropy(h, w, y, impl="xla"),
    "kernel mean": lambda h, w, y: kernels.linear_cross_entropy(h, w, y, reduction="mean"),
    "kernel mean filter=auto": lambda h, w, y: kernels.linear_cross_entropy(
        h, w, y, reduction="mean", filter_eps="auto"
    ),
    "kernel none, then .mean()": lambda h, w, y: kernels.linear_cross_entropy(h, w, y).mean(),
}


def bench_linear_cross_entropy(shapes, pairs, rows, peaked=False):
    """``value_and_grad`` (hidden, weight) of the mean loss: the kernel paths against the
    naive path and the chunked pure-XLA path."""
    for n, d, v, dtype in shapes:
        h, w, y = _lce_inputs(n, d, v, dtype, peaked)
        shape = f"N={n} D={d} V={v} {jnp.dtype(dtype).name}"

        paths = {
            name: jax.jit(jax.value_and_grad(f, argnums=(0, 1))) for name, f in LCE_PATHS.items()
        }
        # Correctness at the benchmark shape: every path against the float32-loss naive one.
        ref_loss, (ref_dh, ref_dw) = paths["naive f32 loss"](h, w, y)

        def err(a, b):
            a, b = a.astype(jnp.float32), b.astype(jnp.float32)
            return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

        eps = float(jnp.finfo(dtype).eps) / 32
        note_skip = f"; filter skips ~{_skip_fraction(h, w, y, eps):.0%} of 128x128 tiles"
        for name in ("kernel mean", "kernel mean filter=auto", "kernel none, then .mean()"):
            ours = paths[name]
            loss, (dh, dw) = ours(h, w, y)
            check = (
                f"|dloss| {abs(float(loss) - float(ref_loss)):.1e}, "
                f"rel err dh {err(dh, ref_dh):.1e} dW {err(dw, ref_dw):.1e}"
            )
            for base in ("naive", "xla chunked"):
                base_fn = paths[base]
                t_a, t_b, ratio = interleaved(
                    _timer(ours, h, w, y), _timer(base_fn, h, w, y), pairs
                )
                mem_a, mem_b = temp_bytes(ours, h, w, y), temp_bytes(base_fn, h, w, y)
                rows.append(
                    dict(
                        bench=f"LCE v&g {name} vs {base}",
                        shape=shape,
                        ours_ms=1e3 * t_a,
                        base_ms=1e3 * t_b,
                        ratio=ratio,
                        note=f"temp {mem_a / 2**20:.0f} vs {mem_b / 2**20:.0f} MiB; {check}"
                        + (note_skip if "filter" in name else ""),
                    )
                )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes")
    parser.add_argument("--pairs", type=int, default=7, help="A/B pairs per row (default 7)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument(
        "--peaked",
        action="store_true",
        help="linear CE on a trained-LM-like (peaked) softmax, where gradient filtering skips",
    )
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run on CPU with tiny shapes (interpreter mode; checks the script, not speed)",
    )
    args = parser.parse_args(argv)

    backend = jax.default_backend()
    if backend == "cpu" and not args.allow_cpu:
        print("No GPU/TPU found (JAX backend: cpu). This benchmark times compiled kernels;")
        print("run it on a GPU machine, or pass --allow-cpu for a smoke test.")
        return 0

    f32, bf16 = jnp.float32, jnp.bfloat16
    if backend == "cpu":
        args.pairs = min(args.pairs, 2)
        softmax_shapes = [(64, 1000, f32), (8, 20000, f32)]
        ce_shapes = [(64, 1000, f32)]
        lce_shapes = [(64, 64, 1000, f32)]
    elif args.quick:
        softmax_shapes = [(4096, 4096, f32), (1024, 32768, f32)]
        ce_shapes = [(1024, 32768, f32)]
        lce_shapes = [(2048, 1024, 32768, bf16)]
    else:
        softmax_shapes = [
            (16384, 4096, f32),  # one pass: a row is one register tile
            (4096, 32768, f32),  # PERF.md's shape: two passes over each row
            (1024, 262144, bf16),  # 256k vocabulary
        ]
        ce_shapes = [(4096, 32768, f32), (8192, 50257, bf16), (2048, 262144, bf16)]
        lce_shapes = [(8192, 4096, 131072, bf16)]  # the README's roofline shape

    print(f"jax {jax.__version__}, device: {jax.devices()[0].device_kind} ({backend})")
    rows: list[dict] = []
    bench_softmax(softmax_shapes, args.pairs, rows)
    bench_cross_entropy(ce_shapes, args.pairs, rows)
    bench_linear_cross_entropy(lce_shapes, args.pairs, rows, peaked=args.peaked)

    header = f"{'benchmark':46} {'shape':28} {'ours ms':>9} {'base ms':>9} {'ratio':>6}  note"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['bench']:46} {r['shape']:28} {r['ours_ms']:9.3f} {r['base_ms']:9.3f} "
            f"{r['ratio']:6.2f}  {r['note']}"
        )
    print("ratio = median over pairs of (ours / baseline) time; < 1 means ours is faster.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(jax.devices()[0]), rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

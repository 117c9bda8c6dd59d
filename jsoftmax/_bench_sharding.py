"""The per-layout table: the fused loss under ``jax.jit`` + ``NamedSharding``, per device.

On 8 simulated CPU devices (``--xla_force_host_platform_device_count=8``), mesh
``data=2 x model=4``, ``value_and_grad`` w.r.t. ``(hidden, head)`` of the mean
cross-entropy at ``N=4096, D=512, V=65536`` float32, for each layout a user writes:

* data-parallel: tokens on ``("data", "model")``, head replicated;
* FSDP: tokens on ``("data", "model")``, head's ``D`` on ``("data", "model")``;
* vocabulary-parallel: tokens replicated, head's vocabulary on ``model``;
* 2-D: tokens on ``data``, vocabulary on ``model``, head ``(D, V)`` (``"dv"``) and a tied
  embedding ``(V, D)`` (``"vd"``);
* 2-D + FSDP: the same with the head's ``D`` on ``data`` too.

Columns (the compiled programs' ``memory_analysis()`` and HLO; nothing is run unless
``time`` is asked for): the naive ``h @ W`` + ``log_softmax`` + gather temp bytes per
device, the fused temp bytes per device in explicit mode (mesh axes ``AxisType.Explicit``)
and in the default auto mode (with ``axis_name="model"`` where the head is sharded on the
vocabulary), the largest all-gather as a fraction of the head (fused explicit / fused
auto / naive), and optionally the fused/naive time ratio (median of interleaved pairs).

JAX fixes its device count when it starts, so :func:`main` runs :func:`table` in a fresh
interpreter with the flag set (``python -m jsoftmax._bench_sharding``); ``jsoftmax bench
--sharding`` and ``benchmarks/sharding.py`` call it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

MiB = 2**20
N, D, V = 4096, 512, 65536
TINY = (256, 64, 2048)  # tests of the command
DEVICES = 8

# (name, hidden spec, head spec, weight layout); specs as tuples of mesh axes entries.
LAYOUTS: tuple[tuple[str, tuple, tuple, str], ...] = (
    ("data-parallel", (("data", "model"), None), (None, None), "dv"),
    ("FSDP", (("data", "model"), None), (("data", "model"), None), "dv"),
    ("vocabulary-parallel", (None, None), (None, "model"), "dv"),
    ("2-D", ("data", None), (None, "model"), "dv"),
    ("2-D, tied (V, D)", ("data", None), ("model", None), "vd"),
    ("2-D + FSDP", ("data", None), ("data", "model"), "dv"),
)


@dataclasses.dataclass(frozen=True)
class Row:
    layout: str
    hidden_spec: str
    head_spec: str
    naive_temp: int
    explicit_temp: int
    auto_temp: int
    explicit_gather: float
    auto_gather: float
    naive_gather: float
    time_ratio: float | None = None


def largest_all_gather(hlo: str, head_elements: int) -> float:
    """The largest all-gather in a compiled program, as a fraction of the head."""
    biggest = 0
    for shape in re.findall(r"= \w+\[([0-9,]+)\][^=]*? all-gather\(", hlo):
        biggest = max(biggest, int(np.prod([int(s) for s in shape.split(",")])))
    return biggest / head_elements


def _spec_text(spec: tuple) -> str:
    def entry(e):
        if e is None:
            return "None"
        return repr(e) if isinstance(e, str) else "(" + ", ".join(map(repr, e)) + ")"

    return "P(" + ", ".join(entry(e) for e in spec) + ")"


def _vocab_sharded(w_spec: tuple, layout: str) -> bool:
    return w_spec[1 if layout == "dv" else 0] is not None


def table(n: int = N, d: int = D, v: int = V, pairs: int = 0) -> list[Row]:
    """Compile every layout (needs :data:`DEVICES` devices); time ``pairs`` pairs if > 0."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jsoftmax as jsm
    from jsoftmax import _compat

    if jax.device_count() < DEVICES:
        raise RuntimeError(f"{DEVICES} devices needed, {jax.device_count()} found")

    def naive(layout):
        def loss(h, w, y):
            logits = h @ w if layout == "dv" else h @ w.T
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

        return loss

    def fused(layout, **kw):
        return lambda h, w, y: jsm.linear_cross_entropy(h, w, y, weight_layout=layout, **kw)

    rng = np.random.default_rng(0)
    h = rng.normal(size=(n, d)).astype(np.float32)
    w_dv = (rng.normal(size=(d, v)) / np.sqrt(d)).astype(np.float32)
    y = rng.integers(0, v, n).astype(np.int32)

    def mesh(axis_type):
        return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)

    def compile_(mesh_, fn, arrays):
        with _compat.set_mesh(mesh_):
            step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
            return step, step.lower(*arrays).compile()

    rows = []
    for name, h_spec, w_spec, layout in LAYOUTS:
        w = w_dv if layout == "dv" else np.ascontiguousarray(w_dv.T)
        specs = (P(*h_spec), P(*w_spec), P(h_spec[0]))

        def put(m, arrays=(h, w, y), specs=specs):
            return tuple(
                jax.device_put(a, NamedSharding(m, s)) for a, s in zip(arrays, specs, strict=True)
            )

        explicit, auto = mesh(AxisType.Explicit), mesh(AxisType.Auto)
        kw = dict(axis_name="model") if _vocab_sharded(w_spec, layout) else {}
        args_auto = put(auto)
        _, c_exp = compile_(explicit, fused(layout), put(explicit))
        f_auto, c_auto = compile_(auto, fused(layout, **kw), args_auto)
        b_auto, c_naive = compile_(auto, naive(layout), args_auto)
        temp = lambda c: int(c.memory_analysis().temp_size_in_bytes)  # noqa: E731
        gather = lambda c: largest_all_gather(c.as_text(), d * v)  # noqa: E731
        ratio = None
        if pairs > 0:
            ratio = _time_ratio(c_auto, c_naive, args_auto, pairs)
        print(
            f"  {name}: compiled{'' if ratio is None else ', timed'}", file=sys.stderr, flush=True
        )
        rows.append(
            Row(
                name,
                _spec_text(h_spec),
                _spec_text(w_spec),
                temp(c_naive),
                temp(c_exp),
                temp(c_auto),
                gather(c_exp),
                gather(c_auto),
                gather(c_naive),
                ratio,
            )
        )
    return rows


def _time_ratio(a, b, args, pairs: int) -> float:
    import jax

    def once(f):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        return time.perf_counter() - t

    once(a), once(b)
    ratios = []
    for i in range(pairs):
        if i % 2:
            tb, ta = once(b), once(a)
        else:
            ta, tb = once(a), once(b)
        ratios.append(ta / tb)
    return statistics.median(ratios)


def format_table(rows: list[Row]) -> str:
    timed = any(r.time_ratio is not None for r in rows)
    head = [
        "layout",
        "hidden",
        "head",
        "naive temp / device",
        "fused explicit",
        "fused auto",
        "largest all-gather / head (explicit, auto, naive)",
    ] + (["time fused / naive (auto)"] if timed else [])
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    for r in rows:
        cells = [
            r.layout,
            f"`{r.hidden_spec}`",
            f"`{r.head_spec}`",
            f"{r.naive_temp / MiB:,.1f} MiB",
            f"{r.explicit_temp / MiB:,.1f} MiB",
            f"{r.auto_temp / MiB:,.1f} MiB",
            f"{r.explicit_gather:.3g}, {r.auto_gather:.3g}, {r.naive_gather:.3g}",
        ]
        if timed:
            cells.append("-" if r.time_ratio is None else f"{r.time_ratio:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=0)
    parser.add_argument("--shape", type=int, nargs=3, default=(N, D, V))
    args = parser.parse_args(argv)
    import jax

    import jsoftmax as jsm

    start = time.perf_counter()
    rows = table(*args.shape, pairs=args.pairs)
    n, d, v = args.shape
    print(
        f"jsoftmax bench --sharding — {datetime.date.today().isoformat()}, jax {jax.__version__}, "
        f"jsoftmax {jsm.__version__}, {DEVICES} simulated {jax.default_backend()} devices "
        f"({os.cpu_count()} cores, {platform.machine()}), mesh data=2 x model=4"
    )
    print(f"value_and_grad of the mean cross-entropy in (hidden, head), N={n} D={d} V={v} f32")
    print()
    print(format_table(rows))
    print()
    print(
        "temp = compiled temporary buffers per device (memory_analysis); naive = h @ W, "
        "log_softmax, gather (auto mode); all-gather = the largest in the compiled HLO, "
        "in head elements."
    )
    print(f"measured in {time.perf_counter() - start:.0f} s")
    return 0


def main(pairs: int = 0, shape: tuple[int, int, int] | None = None) -> int:
    """Run the table in a fresh interpreter with 8 simulated CPU devices; its exit code."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={DEVICES}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "jsoftmax._bench_sharding", "--pairs", str(pairs)]
    if shape is not None:
        cmd += ["--shape", *map(str, shape)]
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))


__all__: list[Any] = ["LAYOUTS", "Row", "format_table", "largest_all_gather", "main", "table"]

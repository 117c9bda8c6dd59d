"""``impl="pallas"`` and ``jsoftmax.kernels`` on sharded inputs under ``jax.jit``.

A ``pallas_call`` has no partitioning rule: the partitioner would give every device the
whole logits (or head). In the explicit sharding mode (``AxisType.Explicit``) the layout
is in the inputs' types, so the kernels run per row shard under ``shard_map``: the same
value and gradients as on one device, no all-gather of the operands in the compiled
program, and the ``pallas_call`` traced at the local row count. A sharded class axis (or
head) is a clear error. In the default auto mode the layout is unknown at trace time:
the documented fallback is a gather, which a user ``shard_map`` avoids. Runs on the 8
simulated CPU devices (see conftest); the kernels run in Pallas' interpreter there.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jsoftmax as jsm
from jsoftmax import _compat, kernels

N, C, D = 16, 256, 32

# The logits' (or hidden states') spec; the per-row operands follow the rows.
ROWS = {"rows_data": P("data", None), "rows_data_model": P(("data", "model"), None)}
SHARDS = {"rows_data": 2, "rows_data_model": 8}


def mesh_of(axis_type):
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)


def problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, C)).astype(np.float32) * 3
    y = rng.integers(0, C, N).astype(np.int32)
    y[:3] = -100
    h = rng.normal(size=(N, D)).astype(np.float32)
    w = (rng.normal(size=(D, C)) / 4).astype(np.float32)
    sw = rng.uniform(0.5, 2.0, N).astype(np.float32)
    cw = rng.uniform(0.5, 2.0, C).astype(np.float32)
    return x, y, h, w, sw, cw


# Each route: (scalar objective of (first, second, labels, row weights), the argnums to
# differentiate, whether the first operand is hidden states with a head second).
def _softmax(x, w, y, sw):
    return jnp.sum(kernels.softmax(x) * jnp.cos(x))


def _log_softmax(x, w, y, sw):
    return jnp.sum(kernels.log_softmax(x) * jnp.cos(x))


def _kernel_ce(x, w, y, sw):
    return jnp.sum(kernels.cross_entropy(x, y, label_smoothing=0.1) * sw)


def _kernel_linear_ce(h, w, y, sw):
    return kernels.linear_cross_entropy(h, w, y, sample_weight=sw, reduction="mean", z_loss=1e-3)


def _kernel_linear_ce_none(h, w, y, sw):
    return jnp.sum(kernels.linear_cross_entropy(h, w, y, label_smoothing=0.1) * sw)


def _jsm_linear_ce(h, w, y, sw):
    return jsm.linear_cross_entropy(h, w, y, sample_weight=sw, z_loss=1e-3, impl="pallas")


def _jsm_ce(x, cw, y, sw):
    return jsm.cross_entropy(x, y, weight=cw, sample_weight=sw, impl="pallas")


def _jsm_ce_none(x, cw, y, sw):
    return jnp.sum(jsm.cross_entropy(x, y, z_loss=1e-3, reduction="none", impl="pallas"))


ROUTES = {
    "kernels.softmax": (_softmax, (0,), "x"),
    "kernels.log_softmax": (_log_softmax, (0,), "x"),
    "kernels.cross_entropy": (_kernel_ce, (0, 3), "x"),
    "kernels.linear_cross_entropy": (_kernel_linear_ce, (0, 1, 3), "h"),
    "kernels.linear_cross_entropy_none": (_kernel_linear_ce_none, (0, 1, 3), "h"),
    "jsm.linear_cross_entropy": (_jsm_linear_ce, (0, 1, 3), "h"),
    "jsm.cross_entropy": (_jsm_ce, (0, 1, 3), "x"),
    "jsm.cross_entropy_none": (_jsm_ce_none, (0,), "x"),
}


def route_args(route):
    x, y, h, w, sw, cw = problem()
    kind = ROUTES[route][2]
    return (h, w, y, sw) if kind == "h" else (x, cw, y, sw)


def place(mesh, args, first_spec, second_spec=None):
    rows = first_spec[0]
    second_spec = P() if second_spec is None else second_spec
    specs = (first_spec, second_spec, P(rows), P(rows))
    return tuple(
        jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs, strict=True)
    )


def all_gathers(hlo: str) -> list[int]:
    """Element counts of every all-gather result in a compiled program."""
    shapes = re.findall(r"= \w+\[([0-9,]*)\][^=]*? all-gather\(", hlo)
    return [int(np.prod([int(s) for s in shape.split(",") if s])) for shape in shapes]


def pallas_row_counts(jaxpr) -> list[int]:
    """The row count of the first operand of every Mosaic-style ``pallas_call`` (the one
    run here, in the interpreter) in a nested jaxpr. The Triton branch is left out: it
    runs the fused loss over row chunks padded to a power of two."""
    out = []
    for eqn in jaxpr.eqns:
        mosaic = "dimension_semantics" in str(eqn.params.get("compiler_params"))
        if eqn.primitive.name == "pallas_call" and mosaic:
            out.append(eqn.invars[0].aval.shape[0])
        for p in eqn.params.values():
            for sub in p if isinstance(p, tuple | list) else (p,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    out += pallas_row_counts(sub)
    return out


@pytest.mark.parametrize("layout", list(ROWS))
@pytest.mark.parametrize("route", list(ROUTES))
def test_explicit_rows_run_per_shard(route, layout):
    if route.startswith("jsm.cross_entropy") and jax.__version_info__ < (0, 7):
        pytest.skip("jsm.cross_entropy on explicitly sharded rows needs jax >= 0.7")
    fn, argnums, _ = ROUTES[route]
    args = route_args(route)
    grad = jax.value_and_grad(fn, argnums=argnums)
    ref_value, ref_grads = jax.jit(grad)(*args)
    mesh = mesh_of(AxisType.Explicit)
    with _compat.set_mesh(mesh):
        sharded = place(mesh, args, ROWS[layout])
        step = jax.jit(grad)
        value, grads = step(*sharded)
        hlo = step.lower(*sharded).compile().as_text()
        jaxpr = jax.make_jaxpr(grad)(*sharded).jaxpr
    # The same float32 arithmetic, sums split over shards in another order.
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-5 * np.max(np.abs(r)))
    # Nothing the size of a row block (let alone the logits or the head) is gathered.
    assert max(all_gathers(hlo), default=0) < min(C, D), all_gathers(hlo)
    # Forward and backward kernels traced at the local row count.
    rows = pallas_row_counts(jaxpr)
    assert rows and set(rows) == {N // SHARDS[layout]}, rows
    assert grads[0].sharding.spec == sharded[0].sharding.spec


@pytest.mark.parametrize("route", [r for r in ROUTES if ROUTES[r][2] == "x"])
def test_explicit_class_axis_sharded_is_an_error(route):
    fn = ROUTES[route][0]
    mesh = mesh_of(AxisType.Explicit)
    with _compat.set_mesh(mesh):
        sharded = place(mesh, route_args(route), P(None, "model"))
        with pytest.raises(ValueError, match="no cross-shard logsumexp"):
            jax.jit(fn)(*sharded)


@pytest.mark.parametrize("fn", [_kernel_linear_ce, _jsm_linear_ce])
@pytest.mark.parametrize("head", [P(None, "model"), P("data", None)])
def test_explicit_sharded_head_is_an_error(fn, head):
    """On V (no cross-shard logsumexp) or on D (FSDP: the kernel would need it gathered)."""
    mesh = mesh_of(AxisType.Explicit)
    with _compat.set_mesh(mesh):
        sharded = place(mesh, route_args("kernels.linear_cross_entropy"), P("data", None), head)
        with pytest.raises(ValueError, match="needs? the whole head on every device"):
            jax.jit(fn)(*sharded)


def _lowered(fn, x, platform):
    return jax.jit(fn).trace(x).lower(lowering_platforms=(platform,)).as_text()


def test_auto_mode_runs_whole_unless_inside_shard_map():
    """The documented fallback in the default auto mode, where the layout is unknown at
    trace time: the kernel is traced on the whole array. Lowered for CUDA, the Triton
    call's grid covers every row (the partitioner replicates its operand: a gather);
    for TPU, JAX refuses to partition a Mosaic kernel. Inside the user's ``shard_map``
    (``check_vma=False``: a ``pallas_call`` has no varying-axes type) it runs per shard.
    (On CPU the interpreter's plain ops are partitioned like any XLA code.)"""
    x = problem()[0]
    mesh = mesh_of(AxisType.Auto)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    per_shard = jax.shard_map(
        kernels.softmax,
        mesh=mesh,
        in_specs=P("data", None),
        out_specs=P("data", None),
        check_vma=False,
    )
    assert set(pallas_row_counts(jax.make_jaxpr(kernels.softmax)(xs).jaxpr)) == {N}
    assert set(pallas_row_counts(jax.make_jaxpr(per_shard)(xs).jaxpr)) == {N // 2}

    def triton_grid(text):
        return [int(g) for g in re.findall(r"grid_x = (\d+)", text)]

    whole = triton_grid(_lowered(kernels.softmax, xs, "cuda"))
    local = triton_grid(_lowered(per_shard, xs, "cuda"))
    assert whole and local and whole == [2 * g for g in local], (whole, local)
    with pytest.raises(NotImplementedError, match="cannot be automatically partitioned"):
        _lowered(kernels.softmax, xs, "tpu")
    assert "tpu_custom_call" in _lowered(per_shard, xs, "tpu")
    np.testing.assert_allclose(jax.jit(per_shard)(xs), jax.nn.softmax(x), rtol=1e-5, atol=1e-7)


def test_unsharded_inputs_take_the_plain_path():
    """Lists and NumPy arrays (no JAX type yet) are not mistaken for sharded inputs."""
    h, w = np.ones((2, 4), np.float32), np.ones((4, 8), np.float32)
    loss = kernels.linear_cross_entropy(h, w, [1, 2], sample_weight=[1.0, 2.0], reduction="sum")
    np.testing.assert_allclose(loss, 3 * np.log(8), rtol=1e-6)
    np.testing.assert_allclose(kernels.cross_entropy(h, [1, 2]), [np.log(4)] * 2, rtol=1e-6)

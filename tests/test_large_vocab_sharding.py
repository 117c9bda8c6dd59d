"""Vocab-parallel ``linear_cross_entropy`` on the 8 simulated CPU devices (see conftest).

Two routes: ``jax.shard_map`` with ``axis_name`` (Megatron-style: each device holds a
vocabulary slice of ``weight``), and plain ``jax.jit`` over ``NamedSharding`` inputs
(tokens data-parallel, weight vocab-sharded), where XLA's partitioner decides.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _references import rel_err
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jsoftmax as jsm

N_SHARDS = 4
V_LOCAL = 37  # ragged against chunk_size=16 inside every shard
V = N_SHARDS * V_LOCAL


def make_inputs(rng, n=24, d=8, layout="dv"):
    h = rng.normal(size=(n, d)).astype(np.float32)
    w = (rng.normal(size=(d, V) if layout == "dv" else (V, d)) / 2).astype(np.float32)
    y = rng.integers(0, V, size=n).astype(np.int32)
    y[:3] = -100
    y[3 : 3 + N_SHARDS] = np.arange(N_SHARDS) * V_LOCAL + V_LOCAL - 1  # last class of each shard
    b = rng.normal(size=(V,)).astype(np.float32)
    cw = rng.uniform(0.3, 2.0, size=(V,)).astype(np.float32)
    sw = rng.uniform(0.5, 1.5, size=(n,)).astype(np.float32)
    return h, w, y, b, cw, sw


OPTIONS = dict(label_smoothing=0.1, z_loss=1e-2, logit_softcap=5.0, chunk_size=16)


@pytest.mark.parametrize(
    "layout, reduction", [("dv", "mean"), ("vd", "none"), ("dv", "sum")]
)  # fmt: skip
def test_shard_map_matches_single_device(layout, reduction, rng):
    h, w, y, b, cw, sw = make_inputs(rng, layout=layout)
    mesh = Mesh(np.array(jax.devices()[:N_SHARDS]), ("v",))
    w_spec = P(None, "v") if layout == "dv" else P("v", None)
    kw = dict(OPTIONS, weight_layout=layout, reduction=reduction, return_lse=True)
    cot = rng.normal(size=y.shape).astype(np.float32) if reduction == "none" else 1.0

    def parallel(h, w, b, cw):
        f = lambda h, w, b, cw, y, sw: jsm.linear_cross_entropy(  # noqa: E731
            h, w, y, linear_bias=b, weight=cw, sample_weight=sw, axis_name="v", **kw
        )
        loss, lse = jax.shard_map(
            f, mesh=mesh, in_specs=(P(), w_spec, P("v"), P("v"), P(), P()), out_specs=P()
        )(h, w, b, cw, y, sw)
        return jnp.sum(cot * loss), (loss, lse)

    def single(h, w, b, cw):
        loss, lse = jsm.linear_cross_entropy(
            h, w, y, linear_bias=b, weight=cw, sample_weight=sw, **kw
        )
        return jnp.sum(cot * loss), (loss, lse)

    (val, (loss, lse)), grads = jax.jit(jax.value_and_grad(parallel, (0, 1, 2, 3), has_aux=True))(
        h, w, b, cw
    )
    (rval, (rloss, rlse)), rgrads = jax.jit(jax.value_and_grad(single, (0, 1, 2, 3), has_aux=True))(
        h, w, b, cw
    )
    np.testing.assert_allclose(val, rval, rtol=1e-5)
    np.testing.assert_allclose(loss, rloss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, rlse, rtol=1e-6)
    for name, g, rg in zip(
        ("hidden", "linear_weight", "linear_bias", "weight"), grads, rgrads, strict=True
    ):
        assert rel_err(g, rg) < 1e-5, name


def test_shard_map_data_and_vocab_mesh(rng):
    """Tokens over 'data', vocabulary over 'v' (2 x 4 devices); global class weights."""
    h, w, y, b, cw, _ = make_inputs(rng, n=32, layout="vd")
    mesh = Mesh(np.array(jax.devices()).reshape(2, N_SHARDS), ("data", "v"))
    kw = dict(OPTIONS, weight_layout="vd", reduction="sum")

    def parallel(h, w, b):
        def local(h, w, b, y, cw):
            # `cw` is the whole (V,) vector here, replicated: also accepted.
            part = jsm.linear_cross_entropy(h, w, y, linear_bias=b, weight=cw, axis_name="v", **kw)
            return jax.lax.psum(part, "data")

        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P("data"), P("v", None), P("v"), P("data"), P()),
            out_specs=P(),
        )(h, w, b, y, cw)

    def single(h, w, b):
        return jsm.linear_cross_entropy(h, w, y, linear_bias=b, weight=cw, **kw)

    val, grads = jax.jit(jax.value_and_grad(parallel, (0, 1, 2)))(h, w, b)
    rval, rgrads = jax.jit(jax.value_and_grad(single, (0, 1, 2)))(h, w, b)
    np.testing.assert_allclose(val, rval, rtol=1e-5)
    for g, rg in zip(grads, rgrads, strict=True):
        assert rel_err(g, rg) < 1e-5


def test_shard_map_bad_label_is_nan(rng):
    h, w, y, *_ = make_inputs(rng)
    y[5] = V  # one past the *global* vocabulary; V_LOCAL..V-1 are fine
    mesh = Mesh(np.array(jax.devices()[:N_SHARDS]), ("v",))
    f = jax.shard_map(
        lambda h, w, y: jsm.linear_cross_entropy(h, w, y, axis_name="v", reduction="none"),
        mesh=mesh,
        in_specs=(P(), P(None, "v"), P()),
        out_specs=P(),
    )
    per = np.asarray(jax.jit(f)(h, w, y))
    assert np.isnan(per[5]) and np.isfinite(np.delete(per, 5)).all()


def _all_gather_shapes(hlo_text):
    shapes = []
    for line in hlo_text.splitlines():
        m = re.search(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", line)
        if m:
            shapes.append(tuple(int(x) for x in m.group(1).split(",") if x))
    return shapes


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_jit_named_sharding_route(reduction, rng):
    n, d = 64, 8
    h, w, y, *_ = make_inputs(rng, n=n, d=d)
    mesh = Mesh(np.array(jax.devices()).reshape(2, N_SHARDS), ("data", "model"))
    hs = jax.device_put(h, NamedSharding(mesh, P("data", None)))
    ws = jax.device_put(w, NamedSharding(mesh, P(None, "model")))
    ys = jax.device_put(y, NamedSharding(mesh, P("data")))

    def loss(h, w, y):
        return jnp.sum(jsm.linear_cross_entropy(h, w, y, reduction=reduction, chunk_size=16))

    f = jax.jit(jax.value_and_grad(loss, (0, 1)))
    val, grads = f(hs, ws, ys)
    rval, rgrads = jax.jit(jax.value_and_grad(loss, (0, 1)))(h, w, y)
    np.testing.assert_allclose(val, rval, rtol=1e-5)
    for g, rg in zip(grads, rgrads, strict=True):
        assert rel_err(g, rg) < 1e-5
    shapes = _all_gather_shapes(f.lower(hs, ws, ys).compile().as_text())
    # Whatever XLA gathers (the (D, V) weight, per-token vectors), never (N, V) logits.
    assert all(int(np.prod(s)) < n * V // 2 for s in shapes), shapes


@pytest.mark.parametrize("check_vma, w_spec", [(True, P()), (False, P(None, "v"))])
def test_shard_map_rejects_weight_not_sharded_over_axis(check_vma, w_spec, rng):
    """A replicated weight (or check_vma=False, where sharding is invisible) would give
    wrong numbers, so it is a clear error instead."""
    h, w, y, *_ = make_inputs(rng)
    mesh = Mesh(np.array(jax.devices()[:N_SHARDS]), ("v",))
    f = jax.shard_map(
        lambda h, w, y: jsm.linear_cross_entropy(h, w, y, axis_name="v"),
        mesh=mesh,
        in_specs=(P(), w_spec, P()),
        out_specs=P(),
        check_vma=check_vma,
    )
    with pytest.raises(ValueError, match="does not vary over `axis_name`"):
        f(h, w, y)


# ------------------------------------------------------- per-token statistics (issue 12)


def _stats_objective(s, cots):
    return sum(jnp.sum(c * getattr(s, f)) for f, c in cots.items())


@pytest.mark.parametrize("layout, data_axis, top_k", [("dv", False, 40), ("vd", True, 3)])
def test_shard_map_stats_match_single_device(layout, data_axis, top_k, rng):
    """Global arg-max (ties across shards: first index) and top-k (k = 40 > V_LOCAL: each
    shard has fewer than k candidates), entropy from the shards' sums, gradients."""
    n = 16
    h, w, y, b, *_ = make_inputs(rng, n=n, layout=layout)

    # Row 0's best class copied into a later shard (the first copy must win), row 1's
    # into an earlier one (the copy must win): exact ties across shards.
    def copy_best(row, shift, avoid):
        z = h @ (w if layout == "dv" else w.T) + b
        src = int(np.argmax(z[row]))
        dst = next(d for d in ((src + shift + i) % V for i in range(V)) if d not in avoid)
        if layout == "dv":
            w[:, dst] = w[:, src]
        else:
            w[dst] = w[src]
        b[dst] = b[src]
        return min(src, dst)

    first0 = copy_best(0, 2 * V_LOCAL, ())
    first1 = copy_best(1, V - V_LOCAL, (first0, *np.flatnonzero(b == b[first0])))
    kw = dict(weight_layout=layout, logit_softcap=5.0, temperature=1.3, top_k=top_k)
    cots = {
        "lse": rng.normal(size=(n,)),
        "label_logprob": rng.normal(size=(n,)),
        "entropy": rng.normal(size=(n,)),
        "topk_logprobs": rng.normal(size=(n, top_k)),
    }
    cots = {k: v.astype(np.float32) for k, v in cots.items()}
    if data_axis:
        mesh = Mesh(np.array(jax.devices()).reshape(2, N_SHARDS), ("data", "v"))
        tok = P("data")
    else:
        mesh = Mesh(np.array(jax.devices()[:N_SHARDS]), ("v",))
        tok = P()
    w_spec = P(None, "v") if layout == "dv" else P("v", None)

    def parallel(h, w, b):
        f = lambda h, w, b, y: jsm.linear_softmax_stats(  # noqa: E731
            h, w, y, linear_bias=b, axis_name="v", chunk_size=16, **kw
        )
        s = jax.shard_map(f, mesh=mesh, in_specs=(tok, w_spec, P("v"), tok), out_specs=tok)(
            h, w, b, y
        )
        return _stats_objective(s, cots), s

    def single(h, w, b):
        s = jsm.linear_softmax_stats(h, w, y, linear_bias=b, chunk_size=16, **kw)
        return _stats_objective(s, cots), s

    (_, s), grads = jax.jit(jax.value_and_grad(parallel, (0, 1, 2), has_aux=True))(h, w, b)
    (_, r), rgrads = jax.jit(jax.value_and_grad(single, (0, 1, 2), has_aux=True))(h, w, b)
    for f in ("lse", "label_logprob", "entropy", "topk_logprobs"):
        np.testing.assert_allclose(getattr(s, f), getattr(r, f), rtol=2e-5, atol=2e-5, err_msg=f)
    for f in ("argmax", "correct", "topk_indices"):
        np.testing.assert_array_equal(getattr(s, f), getattr(r, f), err_msg=f)
    assert s.argmax[:2].tolist() == [first0, first1]
    for name, g, rg in zip(("hidden", "linear_weight", "linear_bias"), grads, rgrads, strict=True):
        assert rel_err(g, rg) < 1e-5, name


def test_shard_map_return_stats(rng):
    """linear_cross_entropy(return_stats=True) under axis_name: the same statistics."""
    h, w, y, b, *_ = make_inputs(rng)
    mesh = Mesh(np.array(jax.devices()[:N_SHARDS]), ("v",))
    f = jax.shard_map(
        lambda h, w, b, y: jsm.linear_cross_entropy(
            h, w, y, linear_bias=b, axis_name="v", return_stats=True, top_k=2, **OPTIONS
        ),
        mesh=mesh,
        in_specs=(P(), P(None, "v"), P("v"), P()),
        out_specs=P(),
    )
    loss, s = jax.jit(f)(h, w, b, y)
    rloss, r = jsm.linear_cross_entropy(
        h, w, y, linear_bias=b, return_stats=True, top_k=2, **OPTIONS
    )
    np.testing.assert_allclose(loss, rloss, rtol=1e-5)
    for name in jsm.SoftmaxStats._fields:
        np.testing.assert_allclose(getattr(s, name), getattr(r, name), rtol=2e-5, err_msg=name)

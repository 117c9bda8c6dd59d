"""The fused LM-head functions under plain ``jax.jit`` with sharded inputs.

A user lays the head and the batch out with ``NamedSharding`` (data-parallel, FSDP,
vocabulary-parallel, 2-D) and never writes ``shard_map``: every fused function must give
the single-device value and gradients, keep the head sharded (no all-gather of more than
a quarter of it in the compiled program) and use at most half the naive path's
per-device temporary memory. Runs on the 8 simulated CPU devices (see conftest), in the
explicit sharding mode (``AxisType.Explicit``: shardings visible at trace time) and the
default auto mode.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jsoftmax as jsm
from jsoftmax import _compat

N, D, V, D_T, K = 128, 16, 2048, 8, 4
CHUNK = 64

# (hidden spec, head spec in the "dv" layout): the layouts a user writes.
LAYOUTS = {
    "data_parallel": (P("data"), P()),
    "fsdp": (P("data"), P("data", None)),
    "vocab_parallel": (P(), P(None, "model")),
    "2d": (P("data"), P(None, "model")),
    "2d_fsdp": (P("data"), P("data", "model")),
}


def mesh_of(mode):
    types = (AxisType.Explicit if mode == "explicit" else AxisType.Auto,) * 2
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=types)


def problem(seed=0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(N, D)).astype(np.float32)
    w = (rng.normal(size=(D, V)) / 4).astype(np.float32)
    b = (rng.normal(size=(V,)) / 4).astype(np.float32)
    ht = rng.normal(size=(N, D_T)).astype(np.float32)
    wt = (rng.normal(size=(D_T, V)) / 4).astype(np.float32)
    y = rng.integers(0, V, N).astype(np.int32)
    y[:3] = -100
    teacher = jax.nn.log_softmax(ht @ wt)
    tv, ti = jax.lax.top_k(teacher, K)
    return h, w, b, ht, wt, y, np.asarray(tv), np.asarray(ti)


def _stats_objective(s):
    return jnp.sum(0.7 * s.label_logprob + 0.3 * s.entropy) + jnp.sum(s.topk_logprobs)


# Each: loss(h, w, b, ht, wt, y, tv, ti, **kw) -> scalar, differentiated in h and w; `kw`
# is `axis_name` where the test passes it.
def _ce(h, w, b, ht, wt, y, tv, ti, **kw):
    return jsm.linear_cross_entropy(
        h, w, y, linear_bias=b, chunk_size=CHUNK, label_smoothing=0.1, z_loss=1e-3, **kw
    )


def _ce_stats(h, w, b, ht, wt, y, tv, ti, **kw):
    loss, s = jsm.linear_cross_entropy(
        h, w, y, linear_bias=b, chunk_size=CHUNK, return_stats=True, top_k=2, **kw
    )
    return loss + _stats_objective(s)


def _stats(h, w, b, ht, wt, y, tv, ti, **kw):
    s = jsm.linear_softmax_stats(h, w, y, linear_bias=b, chunk_size=CHUNK, top_k=3, **kw)
    return _stats_objective(s)


def _kl(h, w, b, ht, wt, y, tv, ti, **kw):
    return jsm.linear_kl_divergence(h, w, ht, wt, y, chunk_size=CHUNK, **kw)


def _jsd(h, w, b, ht, wt, y, tv, ti, **kw):
    return jsm.linear_jsd(h, w, ht, wt, y, chunk_size=CHUNK, **kw)


def _topk(h, w, b, ht, wt, y, tv, ti, **kw):
    return jsm.linear_topk_kl_divergence(h, w, tv, ti, y, chunk_size=CHUNK, **kw)


FUNCTIONS = {
    "linear_cross_entropy": _ce,
    "linear_cross_entropy_stats": _ce_stats,
    "linear_softmax_stats": _stats,
    "linear_kl_divergence": _kl,
    "linear_jsd": _jsd,
    "linear_topk_kl_divergence": _topk,
}


def naive(fn):
    """The materialised-logits step that ``fn`` replaces (the memory baseline)."""

    def student_logp(h, w, b):
        return jax.nn.log_softmax(h @ w + b)

    def cross_entropy(h, w, b, ht, wt, y, tv, ti):
        keep = y != -100
        nll = -jnp.take_along_axis(student_logp(h, w, b), jnp.where(keep, y, 0)[:, None], 1)
        return jnp.sum(jnp.where(keep, nll[:, 0], 0.0)) / jnp.sum(keep)

    def two_heads(h, w, b, ht, wt, y, tv, ti):
        lp_t = jax.nn.log_softmax(ht @ wt)
        return jnp.mean(jnp.sum(jnp.exp(lp_t) * (lp_t - student_logp(h, w, 0.0)), axis=-1))

    def top_k(h, w, b, ht, wt, y, tv, ti):
        lq = jnp.take_along_axis(student_logp(h, w, 0.0), ti, 1)
        return jnp.mean(jnp.sum(jnp.exp(tv) * (tv - lq), axis=-1))

    if fn in ("linear_kl_divergence", "linear_jsd"):
        return two_heads
    return top_k if fn == "linear_topk_kl_divergence" else cross_entropy


def sharded_args(mesh, layout, args):
    h_spec, w_spec = LAYOUTS[layout]
    tok = h_spec[0] if len(h_spec) else None
    specs = (
        P(tok, None), P(*w_spec) if len(w_spec) else P(None, None),
        P(w_spec[1] if len(w_spec) > 1 else None), P(tok, None),
        P(None, w_spec[1] if len(w_spec) > 1 else None), P(tok), P(tok, None), P(tok, None),
    )  # fmt: skip
    return tuple(
        jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs, strict=True)
    )


def gathered_head_fraction(hlo: str) -> float:
    """The largest all-gather in the compiled program, as a fraction of the head."""
    biggest = 0
    for shape in re.findall(r"= \w+\[([0-9,]+)\][^=]*? all-gather\(", hlo):
        biggest = max(biggest, int(np.prod([int(s) for s in shape.split(",")])))
    return biggest / (D * V)


@pytest.mark.parametrize("mode", ["explicit", "auto"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("fn", list(FUNCTIONS))
def test_jit_sharded_matches_single_device(fn, layout, mode):
    args = problem()
    f = FUNCTIONS[fn]
    ref_value, ref_grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(*args)
    if mode == "auto" and LAYOUTS[layout][1][-1:] == ("model",):
        # The default mode hides the head's sharding at trace time: `axis_name` names it.
        f = functools.partial(f, axis_name="model")
    grad = jax.value_and_grad(f, argnums=(0, 1))
    mesh = mesh_of(mode)
    with _compat.set_mesh(mesh):
        sharded = sharded_args(mesh, layout, args)
        step = jax.jit(grad)
        value, grads = step(*sharded)
        compiled = step.lower(*sharded).compile()
    # The naive baseline in the default mode (its indexing needs no sharding annotations).
    auto = mesh_of("auto")
    naive_step = jax.jit(jax.value_and_grad(naive(fn), argnums=(0, 1)))
    naive_compiled = naive_step.lower(*sharded_args(auto, layout, args)).compile()
    naive_temp = naive_compiled.memory_analysis().temp_size_in_bytes
    # The same float32 arithmetic in another order (sums split over shards): a few ulps
    # of the largest term; 1e-5 relative to the largest entry bounds it with margin.
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-5 * np.max(np.abs(r)))
    # The head stays sharded: no all-gather of more than a quarter of it.
    assert gathered_head_fraction(compiled.as_text()) <= 0.25
    assert grads[1].sharding.spec == sharded[1].sharding.spec or mode == "auto"
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= naive_temp / 2, (temp, naive_temp)


def _ce_args(mesh, h_spec, w_spec, seed=1, n=N, v=V):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, D)).astype(np.float32)
    w = (rng.normal(size=(D, v)) / 4).astype(np.float32)
    y = rng.integers(0, v, n).astype(np.int32)
    y[:5] = -100
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    return (h, w, y), (put(h, h_spec), put(w, w_spec), put(y, P(h_spec[0])))


@pytest.mark.parametrize(
    "options",
    [
        dict(reduction="none"),
        dict(reduction="sum", sample_weight=True),
        dict(normalizer=1000.0),
        dict(filter_eps=2.0**-12),
        dict(vocab_order=True, weight=True),
        dict(return_lse=True),
    ],
    ids=["none", "sum_sample_weight", "normalizer", "filter_eps", "vocab_order", "lse"],
)
def test_options_keep_working_in_2d_layout(options):
    """filter_eps, vocab_order, normalizer, reductions: the same numbers when sharded."""
    mesh = mesh_of("explicit")
    (h, w, y), sharded = _ce_args(mesh, P("data", None), P(None, "model"))
    kw = dict(options)
    extra = {}
    if kw.pop("sample_weight", False):
        extra["sample_weight"] = np.linspace(0.5, 1.5, N).astype(np.float32)
    if kw.pop("weight", False):
        extra["weight"] = np.linspace(0.5, 2.0, V).astype(np.float32)
    if kw.pop("vocab_order", False):
        order = np.random.default_rng(2).permutation(V).astype(np.int32)
        kw["vocab_order"] = order
        w = w[:, order]
        sharded = (sharded[0], jax.device_put(w, NamedSharding(mesh, P(None, "model"))), sharded[2])

    def f(h, w, y, **more):
        out = jsm.linear_cross_entropy(h, w, y, chunk_size=CHUNK, **kw, **extra, **more)
        out = out[0] + jnp.sum(out[1]) if isinstance(out, tuple) else out
        return jnp.sum(out * jnp.linspace(0.5, 1.5, out.size).reshape(out.shape))

    ref_value, ref_grads = jax.value_and_grad(f, argnums=(0, 1))(h, w, y)
    with _compat.set_mesh(mesh):
        value, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(*sharded)
    # float32 sums in another order: 1e-5 of the largest entry (see the test above).
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-5 * np.max(np.abs(r)))


def test_bad_label_poisons_when_sharded():
    """A bad label is NaN in value and gradient on the placed path too. (``jsm.checked``
    cannot see through a placed ``shard_map`` on this JAX: checkify's shard_map rule
    rejects explicit-mode meshes; the scaling guide says so.)"""
    mesh = mesh_of("explicit")
    (_, _, y), (hs, ws, _) = _ce_args(mesh, P("data", None), P(None, "model"))
    y[7] = V + 3
    bad = jax.device_put(y, NamedSharding(mesh, P("data")))
    f = lambda h, w, y: jsm.linear_cross_entropy(h, w, y, chunk_size=CHUNK)  # noqa: E731
    with _compat.set_mesh(mesh):
        value, (gh, gw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(hs, ws, bad)
    assert np.isnan(value) and np.isnan(np.asarray(gh)).any() and np.isnan(np.asarray(gw)).any()


def test_auto_mode_without_axis_name_is_the_documented_fallback():
    """Default mode, head sharded on the vocabulary, no `axis_name`: the partitioner gathers
    the head (what the scaling guide says); naming the axis keeps it sharded."""
    mesh = mesh_of("auto")
    _, args = _ce_args(mesh, P("data", None), P(None, "model"))

    def compiled(**kw):
        f = lambda h, w, y: jsm.linear_cross_entropy(h, w, y, chunk_size=CHUNK, **kw)  # noqa: E731
        with _compat.set_mesh(mesh):
            return jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile()

    assert gathered_head_fraction(compiled().as_text()) == 1.0
    assert gathered_head_fraction(compiled(axis_name="model").as_text()) == 0.0


def test_wrong_use_is_a_clear_error():
    mesh = mesh_of("auto")
    # A mesh axis that does not divide the vocabulary.
    _, (hs, ws, ys) = _ce_args(mesh, P("data", None), P(), v=V + 2)
    with _compat.set_mesh(mesh), pytest.raises(ValueError, match="not divisible by its mesh axes"):
        jax.jit(lambda h, w, y: jsm.linear_cross_entropy(h, w, y, axis_name="model"))(hs, ws, ys)
    # `axis_name` naming an axis of no mesh.
    with pytest.raises(ValueError, match="nor of the mesh in context"):
        jsm.linear_cross_entropy(hs, ws, ys, axis_name="nope")
    # Explicit mode: `axis_name` must agree with the head's sharding.
    mesh = mesh_of("explicit")
    _, (hs, ws, ys) = _ce_args(mesh, P("data", None), P(None, "model"))
    with _compat.set_mesh(mesh), pytest.raises(ValueError, match="sharded on the vocabulary over"):
        jax.jit(lambda h, w, y: jsm.linear_cross_entropy(h, w, y, axis_name="data"))(hs, ws, ys)


def test_shard_map_with_axis_name_keeps_working_inside_jit():
    """Code that already wraps the loss in shard_map and passes axis_name is unchanged."""
    mesh = mesh_of("explicit")
    (h, w, y), (hs, ws, ys) = _ce_args(mesh, P("data", None), P(None, "model"))

    def local(h, w, y):
        den = jax.lax.psum(jsm.loss_denominator(y), "data")
        loss = jsm.linear_cross_entropy(
            h, w, y, axis_name="model", normalizer=den, chunk_size=CHUNK
        )
        return jax.lax.psum(loss, "data")

    f = jax.shard_map(
        local, mesh=mesh, in_specs=(P("data"), P(None, "model"), P("data")), out_specs=P()
    )
    with _compat.set_mesh(mesh):
        value = jax.jit(f)(hs, ws, ys)
    np.testing.assert_allclose(value, jsm.linear_cross_entropy(h, w, y), rtol=1e-5)


@pytest.mark.parametrize("mode", ["explicit", "auto"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tied_embedding_layout(layout, mode):
    """weight_layout="vd" (a (V, D) tied embedding), sharded the same way transposed."""
    h_spec, w_spec = LAYOUTS[layout]
    w_spec = P(*reversed(tuple(w_spec) + (None,) * (2 - len(w_spec))))
    mesh = mesh_of(mode)
    (h, w, y), (hs, _, ys) = _ce_args(mesh, P(*h_spec, None), P())
    wt = np.ascontiguousarray(w.T)
    ws = jax.device_put(wt, NamedSharding(mesh, w_spec))
    kw = dict(axis_name="model") if mode == "auto" and "model" in tuple(w_spec) else {}

    def f(h, w, y, **more):
        loss, s = jsm.linear_cross_entropy(
            h, w, y, weight_layout="vd", chunk_size=CHUNK, return_stats=True, **more
        )
        return loss + jnp.sum(s.entropy)

    ref_value, ref_grads = jax.value_and_grad(f, argnums=(0, 1))(h, wt, y)
    with _compat.set_mesh(mesh):
        step = jax.jit(jax.value_and_grad(functools.partial(f, **kw), argnums=(0, 1)))
        value, grads = step(hs, ws, ys)
        hlo = step.lower(hs, ws, ys).compile().as_text()
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-5 * np.max(np.abs(r)))
    assert gathered_head_fraction(hlo) <= 0.25


@pytest.mark.parametrize(
    "name",
    ["cross_entropy", "cross_entropy_weighted", "softmax", "log_softmax", "logsumexp"],
)
def test_xla_route_on_class_sharded_logits(name):
    """Materialised logits sharded on both axes in explicit mode: the XLA route gives the
    single-device numbers without gathering the logits (the label entry is a masked sum)."""
    if name.startswith("cross_entropy") and jax.__version_info__ < (0, 7):
        pytest.skip("cross_entropy on explicitly class-sharded logits needs jax >= 0.7")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 256)).astype(np.float32)
    y = rng.integers(0, 256, 16).astype(np.int32)
    y[0] = -100
    cw = rng.uniform(0.5, 2.0, 256).astype(np.float32)
    cot = rng.normal(size=x.shape).astype(np.float32)
    fns = {
        "cross_entropy": lambda x, y: jsm.cross_entropy(x, y, label_smoothing=0.1, z_loss=1e-3),
        "cross_entropy_weighted": lambda x, y: jsm.cross_entropy(x, y, weight=cw),
        "softmax": lambda x, y: jnp.sum(jsm.softmax(x) * cot),
        "log_softmax": lambda x, y: jnp.sum(jsm.log_softmax(x) * cot),
        "logsumexp": lambda x, y: jnp.sum(jsm.logsumexp(x) * cot[:, 0]),
    }
    f = jax.value_and_grad(fns[name])
    ref_value, ref_grad = f(x, y)
    mesh = mesh_of("explicit")
    with _compat.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("data", "model")))
        ys = jax.device_put(y, NamedSharding(mesh, P("data")))
        step = jax.jit(f)
        value, grad = step(xs, ys)
        hlo = step.lower(xs, ys).compile().as_text()
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=1e-5 * np.max(np.abs(ref_grad)))
    assert "all-gather(" not in hlo

"""Tests for jsoftmax/_softmax.py: softmax, log_softmax, logsumexp, hardmax, softmax2d."""

import contextlib
import functools
import io

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _references import (
    np_log_softmax,
    np_log_softmax_vjp,
    np_softmax,
    np_softmax_vjp,
    output_rounding_tol,
    rel_err,
)
from hypothesis import given
from hypothesis import strategies as st
from jax.ad_checkpoint import print_saved_residuals
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jsoftmax as jsm

INF = np.inf
FAMILY = (jsm.softmax, jsm.log_softmax, jsm.logsumexp)


# ----------------------------------------------------------------- float64 references
# (tests/_references.py: np_log_softmax, np_softmax)
ref_log_softmax = np_log_softmax
ref_softmax = np_softmax


# -------------------------------------------------------------------- worked examples


def test_softmax_worked_example():
    out = jsm.softmax(jnp.array([-3.0, 2.0, -1.0, 0.0]))
    np.testing.assert_allclose(out, [0.0057, 0.8390, 0.0418, 0.1135], atol=5e-5)
    assert out.dtype == jnp.float32


def test_log_softmax_worked_example_matches_float64():
    x = np.array([[2.0, 0.5, 6.0], [0.1, 0.0, 3.0]])
    out = jax.jit(jsm.log_softmax)(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(out, ref_log_softmax(x), rtol=1e-6, atol=1e-6)
    # explicit numbers for the first row: log softmax([2, 0.5, 6])
    np.testing.assert_allclose(out[0], [-4.0221553, -5.5221553, -0.0221553], atol=1e-5)


def test_logsumexp_and_hardmax_small_cases():
    np.testing.assert_allclose(jsm.logsumexp(jnp.array([0.0, 0.0])), np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(
        jsm.logsumexp(jnp.array([1.0, 2.0]), weight=jnp.array([2.0, 0.0])),
        1 + np.log(2),
        rtol=1e-6,
    )
    np.testing.assert_array_equal(jsm.hardmax(jnp.array([1.0, 3.0, 3.0, -1.0])), [0, 1, 0, 0])
    np.testing.assert_array_equal(
        jsm.hardmax(jnp.array([[1, 5], [7, 2]]), axis=0), [[0, 1], [1, 0]]
    )


# --------------------------------------------------------------------- never NaN


EDGE_ROWS = {
    "all_neg_inf": [-INF, -INF, -INF, -INF],
    "huge": [1e30, -1e30, 1e30, 0.0],
    "huge_neg": [-1e30, -1e30, -1e30, -1e30],
    "one_pos_inf": [1.0, INF, -INF, 2.0],
    "two_pos_inf": [INF, 0.0, INF, -INF],
    "mixed_neg_inf": [-INF, 3.0, -INF, 1.0],
}


@pytest.mark.parametrize("name", sorted(EDGE_ROWS))
def test_edge_rows_finite_values_and_grads(name):
    x = jnp.array([EDGE_ROWS[name], [0.5, -0.5, 1.0, 2.0]], jnp.float32)
    p = jsm.softmax(x)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(
        np.sum(p, -1), [0.0 if name == "all_neg_inf" else 1.0, 1.0], atol=1e-6
    )
    lp = jsm.log_softmax(x)
    assert not np.any(np.isnan(lp))
    np.testing.assert_allclose(np.exp(lp), p, atol=1e-6)
    g = jax.random.normal(jax.random.key(0), x.shape)
    for f in FAMILY:
        loss = lambda x, f=f: jnp.sum(
            jnp.where(jnp.isfinite(f(x)), f(x), 0.0) * g[..., : f(x).shape[-1]]
        )
        grad = jax.jit(jax.grad(loss))(x)
        assert np.all(np.isfinite(grad)), (f.__name__, grad)
        _, tangent = jax.jvp(f, (x,), (g,))
        assert np.all(np.isfinite(tangent)), (f.__name__, tangent)


def test_pos_inf_mass_is_split_evenly():
    np.testing.assert_allclose(jsm.softmax(jnp.array(EDGE_ROWS["two_pos_inf"])), [0.5, 0, 0.5, 0])
    np.testing.assert_allclose(
        jsm.log_softmax(jnp.array(EDGE_ROWS["one_pos_inf"])), [-INF, 0.0, -INF, -INF]
    )
    assert jsm.logsumexp(jnp.array(EDGE_ROWS["one_pos_inf"])) == INF


def test_huge_logits_match_reference():
    x = np.array([1e30, -1e30, 1e30, 0.0])
    np.testing.assert_allclose(jsm.softmax(jnp.asarray(x, jnp.float32)), [0.5, 0, 0.5, 0])
    np.testing.assert_allclose(jsm.logsumexp(jnp.asarray(x, jnp.float32)), 1e30, rtol=1e-6)
    np.testing.assert_allclose(
        jsm.softmax(jnp.asarray(x, jnp.bfloat16)).astype(np.float32), [0.5, 0, 0.5, 0]
    )


def test_empty_rows_are_zero_with_zero_gradient_where_jax_nn_gives_nan():
    x = jnp.array([[-INF, -INF, -INF], [1.0, 2.0, 3.0]])
    assert np.all(np.isnan(jax.nn.softmax(x)[0]))  # the bug users switch for
    np.testing.assert_array_equal(jsm.softmax(x)[0], [0, 0, 0])
    np.testing.assert_array_equal(jsm.log_softmax(x)[0], [-INF, -INF, -INF])
    assert jsm.logsumexp(x)[0] == -INF
    cot = jnp.ones_like(x)
    for f in (jsm.softmax, jsm.log_softmax):
        _, vjp = jax.vjp(f, x)
        np.testing.assert_array_equal(vjp(cot)[0][0], [0, 0, 0])
    np.testing.assert_array_equal(jax.grad(lambda x: jsm.logsumexp(x)[0])(x), np.zeros((2, 3)))


@pytest.mark.parametrize("kind", ["where", "weights", "neg_inf"])
def test_fully_masked_rows_in_every_spelling(kind):
    x = jnp.array([[0.3, -1.2, 2.0], [1.0, 2.0, 3.0]])
    kw, xx = {}, x
    if kind == "where":
        kw["where"] = jnp.array([[False, False, False], [True, True, True]])
    elif kind == "weights":
        kw["weight"] = jnp.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    else:
        xx = x.at[0].set(-INF)
    p = jsm.softmax(xx, **kw)
    np.testing.assert_array_equal(p[0], 0.0)
    np.testing.assert_allclose(p[1], ref_softmax(np.asarray(x[1])), rtol=1e-6)
    for f in FAMILY:
        grad = jax.grad(
            lambda x, f=f: jnp.sum(jnp.where(jnp.isfinite(y := f(x, **kw)), y, 0) ** 2)
        )(xx)
        assert np.all(np.isfinite(grad))
        np.testing.assert_array_equal(grad[0], 0.0)
        # second order through the custom rules stays finite too
        hess = jax.hessian(lambda r, f=f: jnp.sum(jnp.where(jnp.isfinite(y := f(r, **kw)), y, 0)))(
            xx
        )
        assert np.all(np.isfinite(hess))


def test_masked_entries_get_exactly_zero_and_no_gradient():
    x = jnp.array([1.0, 2.0, 3.0, 4.0])
    where = jnp.array([True, False, True, False])
    p = jsm.softmax(x, where=where)
    np.testing.assert_array_equal(p[jnp.array([1, 3])], 0.0)
    np.testing.assert_allclose(p[jnp.array([0, 2])], ref_softmax(np.array([1.0, 3.0])), rtol=1e-6)
    # cotangent on a masked output must not leak into admissible inputs
    cot = jnp.array([0.0, 5.0, 0.0, -7.0])
    for f in (jsm.softmax, jsm.log_softmax):
        _, vjp = jax.vjp(lambda x, f=f: f(x, where=where), x)
        np.testing.assert_allclose(vjp(cot)[0], 0.0, atol=1e-7)


# ----------------------------------------------------------- hypothesis properties


def rows(min_side=1, max_side=6, min_dims=1, max_dims=3):
    return hnp.arrays(
        np.float64,
        hnp.array_shapes(
            min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side
        ),
        elements=st.floats(-30, 30, allow_nan=False, width=32),
    )


@st.composite
def array_and_axis(draw, **kw):
    x = draw(rows(**kw))
    axis = draw(st.integers(-x.ndim, x.ndim - 1))
    return x, axis


@given(array_and_axis(), st.sampled_from(["float32", "bfloat16", "float16"]))
def test_rows_sum_to_one_and_match_float64(xa, dtype):
    x, axis = xa
    tol = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-3}[dtype]
    xd = jnp.asarray(x, dtype)
    p = jax.jit(jsm.softmax, static_argnums=1)(xd, axis)
    assert p.dtype == xd.dtype
    np.testing.assert_allclose(
        np.sum(np.asarray(p, np.float64), axis), 1.0, atol=tol * x.shape[axis]
    )
    ref = ref_softmax(np.asarray(xd.astype(jnp.float32), np.float64), axis=axis)
    np.testing.assert_allclose(np.asarray(p, np.float64), ref, atol=tol)
    lse = jsm.logsumexp(xd, axis)
    assert lse.dtype == xd.dtype
    ref_lse = np.log(np.sum(np.exp(np.asarray(xd.astype(jnp.float32), np.float64)), axis))
    np.testing.assert_allclose(np.asarray(lse, np.float64), ref_lse, rtol=tol, atol=tol)


@given(array_and_axis(), st.floats(-1e4, 1e4))
def test_shift_invariance(xa, c):
    x, axis = xa
    x = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(jsm.softmax(x + c, axis), jsm.softmax(x, axis), atol=2e-3)
    np.testing.assert_allclose(
        jsm.log_softmax(x + c, axis), jsm.log_softmax(x, axis), atol=2e-3 * (1 + abs(c) / 1e3)
    )


@given(array_and_axis())
def test_log_softmax_is_log_of_softmax(xa):
    x, axis = xa
    x = jnp.asarray(x, jnp.float32)
    p, lp = jsm.softmax(x, axis), jsm.log_softmax(x, axis)
    finite = p > 1e-30
    np.testing.assert_allclose(np.log(p)[finite], lp[finite], atol=1e-5)


@given(array_and_axis(min_dims=1), st.data())
def test_weights_equal_adding_log_weights(xa, data):
    x, axis = xa
    c = x.shape[axis]
    w = np.asarray(data.draw(hnp.arrays(np.float64, (c,), elements=st.floats(0.01, 100))))
    shape = [1] * x.ndim
    shape[axis] = c
    shifted = x + np.log(w).reshape(shape)
    xj = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(
        jsm.softmax(xj, axis, weight=w), ref_softmax(shifted, axis=axis), atol=1e-5
    )
    np.testing.assert_allclose(
        jsm.logsumexp(xj, axis, weight=w),
        np.log(np.sum(np.exp(shifted), axis)),
        rtol=1e-5,
        atol=1e-5,
    )


@given(array_and_axis(), st.floats(0.05, 20.0))
def test_temperature_equals_dividing_logits(xa, t):
    x, axis = xa
    xj = jnp.asarray(x, jnp.float32)
    for f, ref in ((jsm.softmax, ref_softmax), (jsm.log_softmax, ref_log_softmax)):
        np.testing.assert_allclose(
            f(xj, axis, temperature=t), ref(x / t, axis=axis), atol=1e-4, rtol=1e-5
        )
        traced = jax.jit(lambda x, t, f=f: f(x, axis, temperature=t))(xj, jnp.float32(t))
        np.testing.assert_allclose(traced, ref(x / t, axis=axis), atol=1e-4, rtol=1e-5)


@given(array_and_axis(max_side=4), st.data())
def test_where_matches_reference(xa, data):
    x, axis = xa
    where = data.draw(hnp.arrays(np.bool_, x.shape))
    xj = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(
        jsm.softmax(xj, axis, where=where), ref_softmax(x, axis=axis, where=where), atol=1e-6
    )
    lp = jsm.log_softmax(xj, axis, where=where)
    ref = ref_log_softmax(x, axis=axis, where=where)
    np.testing.assert_array_equal(np.isneginf(lp), np.isneginf(ref))
    np.testing.assert_allclose(lp[np.isfinite(ref)], ref[np.isfinite(ref)], atol=1e-5)


# --------------------------------------------------------------- gradient checks


@pytest.mark.parametrize("f", [jsm.softmax, jsm.log_softmax, jsm.logsumexp])
@pytest.mark.parametrize("kw", [{}, {"axis": 0}, {"where": "mask"}, {"weight": "w"}])
def test_check_grads_float64_both_modes_order_2(x64, f, kw):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5)) * 2, jnp.float64)
    kw = dict(kw)
    if kw.get("where") == "mask":
        kw["where"] = jnp.array([True, False, True, True, False])
    if kw.get("weight") == "w":
        kw["weight"] = jnp.array([0.5, 1.0, 2.0, 3.0, 0.25])
    fn = functools.partial(f, **kw)
    if "where" in kw and f is jsm.log_softmax:
        fn = lambda x: jnp.where(kw["where"], functools.partial(f, **kw)(x), 0.0)  # noqa: E731
    check_grads(fn, (x,), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("f", [jsm.softmax, jsm.log_softmax])
def test_check_grads_temperature_and_weights(x64, f):
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 6)), jnp.float64)
    w = jnp.asarray(np.random.default_rng(3).uniform(0.2, 3.0, size=6), jnp.float64)
    check_grads(lambda t: f(x, temperature=t), (jnp.float64(0.7),), order=2, modes=("fwd", "rev"))
    check_grads(lambda w: f(x, weight=w), (w,), order=2, modes=("fwd", "rev"))
    check_grads(
        lambda x, t, w: f(x, temperature=t, weight=w),
        (x, jnp.float64(1.7), w),
        order=1,
        modes=("fwd", "rev"),
    )
    check_grads(lambda w: jsm.logsumexp(x, weight=w), (w,), order=2, modes=("fwd", "rev"))


def test_temperature_gradient_matches_autodiff_of_division():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(8, 10)) * 3, jnp.float32)
    y = jnp.asarray(np.random.default_rng(5).integers(0, 10, 8))
    nll = lambda lp: -jnp.mean(jnp.take_along_axis(lp, y[:, None], axis=-1))  # noqa: E731
    ours = jax.grad(lambda t: nll(jsm.log_softmax(x, temperature=t)))(1.3)
    ref = jax.grad(lambda t: nll(jax.nn.log_softmax(x / t)))(1.3)
    np.testing.assert_allclose(ours, ref, rtol=1e-5)
    ours = jax.grad(lambda t: jnp.sum(jsm.softmax(x, temperature=t) ** 2))(0.8)
    ref = jax.grad(lambda t: jnp.sum(jax.nn.softmax(x / t) ** 2))(0.8)
    np.testing.assert_allclose(ours, ref, rtol=1e-5)


def test_gradients_match_jax_nn_on_finite_input():
    x = jnp.asarray(np.random.default_rng(6).normal(size=(5, 7)) * 4, jnp.float32)
    g = jnp.asarray(np.random.default_rng(7).normal(size=(5, 7)), jnp.float32)
    for ours, theirs in ((jsm.softmax, jax.nn.softmax), (jsm.log_softmax, jax.nn.log_softmax)):
        a = jax.vjp(ours, x)[1](g)[0]
        b = jax.vjp(theirs, x)[1](g)[0]
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            jax.jvp(ours, (x,), (g,))[1], jax.jvp(theirs, (x,), (g,))[1], rtol=1e-5, atol=1e-6
        )
    np.testing.assert_allclose(
        jax.grad(lambda x: jnp.sum(jsm.logsumexp(x) * g[:, 0]))(x),
        jax.grad(lambda x: jnp.sum(jax.nn.logsumexp(x, -1) * g[:, 0]))(x),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_gradients_keep_dtype_and_are_accurate(dtype):
    x32 = jnp.asarray(np.random.default_rng(8).normal(size=(4, 33)) * 3, jnp.float32)
    g32 = jnp.asarray(np.random.default_rng(12).normal(size=(4, 33)), jnp.float32)
    x, g = x32.astype(dtype), g32.astype(dtype)
    # float64 VJPs of the rounded inputs, from the formulas.
    x64, g64 = np.asarray(x, np.float64), np.asarray(g, np.float64)
    refs = {"softmax": np_softmax_vjp(x64, g64), "log_softmax": np_log_softmax_vjp(x64, g64)}
    for ours, theirs in ((jsm.softmax, jax.nn.softmax), (jsm.log_softmax, jax.nn.log_softmax)):
        grad = jax.vjp(ours, x)[1](g)[0]
        assert grad.dtype == dtype
        ref = refs[ours.__name__]
        baseline = jax.vjp(theirs, x)[1](g)[0]
        # float32 inside, one rounding to the half dtype on output (one ulp, 2u relative:
        # output_rounding_tol); never worse than jax.nn's own half-precision result.
        tol = max(1.5 * rel_err(baseline, ref), output_rounding_tol(dtype))
        assert rel_err(grad, ref) < tol


def test_residuals_are_minimal():
    """Reverse mode saves the output for softmax, and only inputs otherwise (no exp(x) copy)."""
    x = jnp.ones((4, 16))

    def residuals(f):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            print_saved_residuals(f, x)
        return [line for line in buf.getvalue().splitlines() if line.strip()]

    sm = residuals(jsm.softmax)
    assert len(sm) == 1 and "f32[4,16]" in sm[0] and "argument" not in sm[0], sm
    for f in (jsm.log_softmax, jsm.logsumexp):
        res = residuals(f)
        big = [r for r in res if "[4,16]" in r]
        assert big == [r for r in res if "from the argument x" in r] and len(big) == 1, res


def test_jit_vmap_grad_compose():
    x = jnp.asarray(np.random.default_rng(9).normal(size=(3, 4, 5)), jnp.float32)
    for f in FAMILY:
        a = jax.jit(jax.vmap(f))(x)
        np.testing.assert_allclose(a, f(x), rtol=1e-6)
        g1 = jax.vmap(jax.grad(lambda r, f=f: jnp.sum(jnp.sin(f(r)))))(x)
        g2 = jax.grad(lambda x, f=f: jnp.sum(jnp.sin(f(x))))(x)
        np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-7)
    t = jnp.array([0.5, 1.0, 2.0])
    vt = jax.vmap(lambda t: jsm.softmax(x[0], temperature=t))(t)
    np.testing.assert_allclose(vt[2], ref_softmax(np.asarray(x[0], np.float64) / 2.0), rtol=1e-5)


# --------------------------------------------------------------------- sharding


def test_sharded_inputs_and_shard_map():
    devices = np.array(jax.devices()[:8])
    assert devices.size == 8, "conftest must provide 8 simulated CPU devices"
    mesh = jax.sharding.Mesh(devices.reshape(4, 2), ("data", "model"))
    x = jnp.asarray(np.random.default_rng(10).normal(size=(16, 24)), jnp.float32)
    xs = jax.device_put(x, NamedSharding(mesh, P("data", "model")))
    for f in FAMILY:
        out = jax.jit(f)(xs)
        np.testing.assert_allclose(out, f(x), rtol=1e-6, atol=1e-6)
        grad = jax.jit(jax.grad(lambda x, f=f: jnp.sum(f(x) ** 2)))(xs)
        np.testing.assert_allclose(
            grad, jax.grad(lambda x, f=f: jnp.sum(f(x) ** 2))(x), rtol=1e-5, atol=1e-6
        )
    # inside shard_map the class axis is local to each shard
    sm = jax.shard_map(
        lambda b: jsm.log_softmax(b, where=b > -1.0),
        mesh=mesh,
        in_specs=P("data", None),
        out_specs=P("data", None),
    )
    np.testing.assert_allclose(jax.jit(sm)(x), jsm.log_softmax(x, where=x > -1.0), rtol=1e-6)


# ------------------------------------------------------------------ bad input


def test_bad_input_errors_name_the_argument():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="axis"):
        jsm.softmax(x, axis=2)
    with pytest.raises(TypeError, match="where"):
        jsm.softmax(x, where=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="where"):
        jsm.log_softmax(x, where=jnp.ones((4,), bool))
    for t in (0.0, -1.0, 0):
        with pytest.raises(ValueError, match="temperature"):
            jsm.softmax(x, temperature=t)
    with pytest.raises(ValueError, match="temperature"):
        jsm.softmax(x, temperature=jnp.ones(2))
    with pytest.raises(ValueError, match="weight"):
        jsm.softmax(x, weight=jnp.ones(4))
    with pytest.raises(ValueError, match=r"weight.*\(2, 2\)"):
        jsm.logsumexp(x, weight=jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="softmax2d"):
        jsm.softmax2d(jnp.ones((2, 3)))
    with pytest.raises(TypeError, match="axis"):
        jsm.hardmax(x, axis=1.0)
    with pytest.raises(ValueError, match="repeats"):
        jsm.hardmax(x, axis=(0, -2))


def test_traced_non_positive_temperature_poisons_instead_of_lying():
    f = jax.jit(lambda t: jsm.softmax(jnp.array([1.0, 2.0]), temperature=t))
    for t in (0.0, -1.0):
        assert np.all(np.isnan(f(jnp.float32(t))))
    np.testing.assert_allclose(f(jnp.float32(1.0)), ref_softmax(np.array([1.0, 2.0])), rtol=1e-6)


# ------------------------------------------------------------ hardmax, softmax2d


def test_hardmax_ties_dtype_and_zero_gradient():
    x = jnp.array([[2.0, 2.0, 1.0], [0.0, -1.0, 5.0]], jnp.bfloat16)
    h = jsm.hardmax(x)
    assert h.dtype == jnp.bfloat16
    np.testing.assert_array_equal(h.astype(jnp.float32), [[1, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(
        jax.grad(lambda x: jnp.sum(jsm.hardmax(x) * x))(x.astype(jnp.float32)),
        [[1, 0, 0], [0, 0, 1]],
    )  # only the product rule's x-term
    np.testing.assert_array_equal(
        jax.grad(lambda x: jnp.sum(jsm.hardmax(x) ** 2))(x.astype(jnp.float32)), 0.0
    )


def np_hardmax(x, axes):
    """One-hot of the joint arg-max over ``axes`` (numpy; ties are absent in the draws)."""
    k = len(axes)
    xt = np.moveaxis(x, axes, range(-k, 0))
    flat = xt.reshape(*xt.shape[: x.ndim - k], -1)
    out = np.zeros_like(flat)
    np.put_along_axis(out, flat.argmax(-1)[..., None], 1.0, -1)
    return np.moveaxis(out.reshape(xt.shape), range(-k, 0), axes)


@pytest.mark.parametrize("axis", [(0, 2), (2, 0), (-1,), (1, 2), (0, 1, 2)])
def test_hardmax_over_a_tuple_of_axes(axis):
    """One 1 per joint slice, at the first arg-max in row-major order over `axis` sorted
    as given; without ties, the one-hot of numpy's joint arg-max."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 4, 5)).astype(np.float32)
    h = np.asarray(jsm.hardmax(x, axis=axis))
    axes = tuple(a % 3 for a in axis)
    np.testing.assert_array_equal(h.sum(axis=axes), 1.0)
    np.testing.assert_array_equal(h, np_hardmax(x, axes))
    # Ties: the first maximum in the order of `axis` wins.
    t = np.zeros((2, 2), np.float32)
    first = np.asarray(jsm.hardmax(t, axis=(1, 0)))
    np.testing.assert_array_equal(first, [[1, 0], [0, 0]])
    t[0, 1] = t[1, 0] = 1.0
    np.testing.assert_array_equal(jsm.hardmax(t, axis=(0, 1)), [[0, 1], [0, 0]])
    np.testing.assert_array_equal(jsm.hardmax(t, axis=(1, 0)), [[0, 0], [1, 0]])


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 4, 5)])
def test_softmax2d_is_softmax_over_channels(shape):
    x = jnp.asarray(np.random.default_rng(11).normal(size=shape), jnp.float32)
    out = jsm.softmax2d(x)
    np.testing.assert_allclose(out, ref_softmax(np.asarray(x, np.float64), axis=-3), rtol=1e-5)
    np.testing.assert_allclose(np.sum(out, axis=-3), 1.0, rtol=1e-6)

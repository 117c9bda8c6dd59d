"""Tests for jsoftmax/_distill.py: KL and generalized JSD, on logits and between LM heads.

The references materialise the logits and apply the definitions directly in float64
(numpy for values, plain ``jax.nn.log_softmax`` autodiff for gradients).
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _references import assert_memory_fraction, load_golden, np_log_softmax, rel_err, sum_tol
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jsoftmax as jsm
from jsoftmax import _compat

# ------------------------------------------------------------------------ references


def np_divergence(student, teacher, kind="forward", beta=0.5, temperature=1.0):
    """Per-row divergence in float64 numpy, from the definitions (0·log 0 = 0)."""
    lq = np_log_softmax(np.asarray(student, np.float64) / temperature)
    lp = np_log_softmax(np.asarray(teacher, np.float64) / temperature)
    p, q = np.exp(lp), np.exp(lq)

    def kl(a, la, lb):
        with np.errstate(invalid="ignore"):
            return np.sum(np.where(a > 0, a * (la - lb), 0.0), axis=-1)

    if kind == "forward" or (kind == "jsd" and beta == 0.0):
        return kl(p, lp, lq)
    if kind == "reverse" or (kind == "jsd" and beta == 1.0):
        return kl(q, lq, lp)
    m = beta * p + (1 - beta) * q
    with np.errstate(divide="ignore"):
        lm = np.log(m)
    return beta * kl(p, lp, lm) + (1 - beta) * kl(q, lq, lm)


def head_logits(h, w, b, layout, softcap):
    z = h @ (w if layout == "dv" else w.T)
    if b is not None:
        z = z + b
    if softcap is not None:
        z = softcap * jnp.tanh(z / softcap)
    return z


def naive_linear(hs, ws, ht, wt, labels=None, *, kind="forward", beta=0.5, temperature=1.0,
                 weight_layout="dv", student_bias=None, teacher_bias=None, logit_softcap=None,
                 ignore_index=-100, reduction="mean", normalizer=None):  # fmt: skip
    """The materialised computation (plain jax autodiff), for values and gradients."""
    zs = head_logits(hs, ws, student_bias, weight_layout, logit_softcap) / temperature
    zt = head_logits(ht, wt, teacher_bias, weight_layout, logit_softcap) / temperature
    zt = jax.lax.stop_gradient(zt)
    lq, lp = jax.nn.log_softmax(zs), jax.nn.log_softmax(zt)
    q, p = jnp.exp(lq), jnp.exp(lp)
    if kind == "forward":
        per = jnp.sum(p * (lp - lq), -1)
    elif kind == "reverse":
        per = jnp.sum(q * (lq - lp), -1)
    else:
        lm = jnp.log(beta * p + (1 - beta) * q)
        per = beta * jnp.sum(p * (lp - lm), -1) + (1 - beta) * jnp.sum(q * (lq - lm), -1)
    keep = jnp.ones(per.shape, bool) if labels is None else labels != ignore_index
    per = jnp.where(keep, per, 0.0)
    if reduction == "none":
        return per
    if reduction == "sum":
        return jnp.sum(per)
    den = jnp.sum(keep) if normalizer is None else normalizer
    return jnp.sum(per) / den


def ours(kind, *args, beta=0.5, **kw):
    if kind == "jsd":
        return jsm.linear_jsd(*args, beta=beta, **kw)
    return jsm.linear_kl_divergence(*args, direction=kind, **kw)


def make_heads(rng, n=12, ds=6, dt=9, v=45, layout="dv", scale=1.0, dtype=np.float64):
    hs = rng.normal(size=(n, ds))
    ht = rng.normal(size=(n, dt))
    ws = rng.normal(size=(ds, v) if layout == "dv" else (v, ds)) * scale / math.sqrt(ds)
    wt = rng.normal(size=(dt, v) if layout == "dv" else (v, dt)) * 1.5 * scale / math.sqrt(dt)
    return tuple(np.asarray(a, dtype) for a in (hs, ws, ht, wt))


# ------------------------------------------------------------------ materialised logits


def test_hand_computed_values():
    s = jnp.array([[0.0, math.log(3.0)]])  # q = (1/4, 3/4)
    t = jnp.array([[0.0, 0.0]])  # p = (1/2, 1/2)
    fwd = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    rev = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    m = (0.375, 0.625)
    js = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
        0.25 * math.log(0.25 / m[0]) + 0.75 * math.log(0.75 / m[1])
    )
    np.testing.assert_allclose(jsm.kl_divergence(s, t), [fwd], rtol=1e-6)
    np.testing.assert_allclose(jsm.kl_divergence(s, t, direction="reverse"), [rev], rtol=1e-6)
    np.testing.assert_allclose(jsm.jsd(s, t), [js], rtol=1e-6)


@settings(max_examples=5)
@given(
    st.integers(1, 4), st.integers(2, 9), st.floats(0.3, 4.0), st.integers(0, 2**31 - 1)
)  # fmt: skip
def test_forward_kl_matches_optax(rows, classes, temperature, seed):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(rows, classes)).astype(np.float32) * 3
    t = rng.normal(size=(rows, classes)).astype(np.float32) * 3
    ref = optax.losses.kl_divergence(
        jax.nn.log_softmax(s / temperature), jax.nn.softmax(t / temperature)
    )
    out = jsm.kl_divergence(s, t, temperature=temperature)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(out, np_divergence(s, t, temperature=temperature), atol=1e-5)


def test_masked_classes_and_empty_rows_are_finite():
    """``where=False`` / ``-inf`` classes add 0·log 0 = 0; an empty row is 0 with zero
    gradient, where optax gives NaN."""
    s = jnp.array([[1.0, -jnp.inf, 0.5], [0.3, 2.0, -1.0], [-jnp.inf] * 3])
    t = jnp.array([[0.5, -jnp.inf, 1.0], [1.0, 0.2, 3.0], [-jnp.inf] * 3])
    where = jnp.array([[True, True, True], [True, False, True], [True, True, True]])
    fns = [
        lambda s, t: jsm.kl_divergence(s, t, where=where),
        lambda s, t: jsm.kl_divergence(s, t, where=where, direction="reverse"),
        lambda s, t: jsm.jsd(s, t, where=where, beta=0.3),
    ]
    sm = np.where(where, s, -np.inf)
    tm = np.where(where, t, -np.inf)
    refs = [
        np_divergence(sm, tm),
        np_divergence(sm, tm, "reverse"),
        np_divergence(sm, tm, "jsd", 0.3),
    ]
    for fn, ref in zip(fns, refs, strict=True):
        out = fn(s, t)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-7)
        assert out[2] == 0.0
        gs, gt = jax.grad(lambda s, t, fn=fn: jnp.sum(fn(s, t)), (0, 1))(s, t)
        assert np.isfinite(gs).all() and np.isfinite(gt).all()
        assert (gs[2] == 0).all() and (gt[2] == 0).all()
        assert gs[0, 1] == 0 and gs[1, 1] == 0
    # optax is NaN on the -inf class (0 · -inf) where ours is finite:
    lq = jax.nn.log_softmax(s[:1])
    assert np.isnan(optax.losses.kl_divergence(lq, jax.nn.softmax(t[:1]))).all()
    assert np.isfinite(jsm.kl_divergence(s[:1], t[:1])).all()


def test_gradients_match_naive_and_axis(x64):
    rng = np.random.default_rng(1)
    s = rng.normal(size=(5, 3, 7))
    t = rng.normal(size=(5, 3, 7))
    for kind, beta in [("forward", None), ("reverse", None), ("jsd", 0.5), ("jsd", 0.8)]:
        if kind == "jsd":
            fn = lambda s, t, b=beta: jsm.jsd(s, t, beta=b, temperature=1.7, axis=1)  # noqa: E731
        else:
            fn = lambda s, t, k=kind: jsm.kl_divergence(s, t, direction=k, temperature=1.7, axis=1)  # noqa: E731
        ref = np_divergence(np.moveaxis(s, 1, -1), np.moveaxis(t, 1, -1), kind, beta or 0.5, 1.7)
        np.testing.assert_allclose(fn(s, t), ref, rtol=1e-12)
        # Second order (reverse over reverse) once; first order for the others.
        order = 2 if beta == 0.8 else 1
        check_grads(fn, (s, t), order=order, modes=["rev"] if order == 2 else ["rev", "fwd"])


def test_jsd_end_points_and_bounds(rng):
    s = rng.normal(size=(6, 11)).astype(np.float32) * 2
    t = rng.normal(size=(6, 11)).astype(np.float32) * 2
    np.testing.assert_allclose(jsm.jsd(s, t, beta=0.0), jsm.kl_divergence(s, t), rtol=1e-6)
    np.testing.assert_allclose(
        jsm.jsd(s, t, beta=1.0), jsm.kl_divergence(s, t, direction="reverse"), rtol=1e-6
    )
    half = jsm.jsd(s, t)
    assert (half >= 0).all() and (half <= math.log(2) + 1e-6).all()
    np.testing.assert_allclose(half, jsm.jsd(t, s), rtol=1e-5)  # symmetric at β = 1/2
    np.testing.assert_allclose(jsm.jsd(s, s), 0.0, atol=1e-6)


def naive_divergence(s, t, temperature, kind="forward", beta=0.5):
    """Σ over rows of the divergence, plain jax.nn in the inputs' dtype (run it in float64)."""
    lq, lp = jax.nn.log_softmax(s / temperature), jax.nn.log_softmax(t / temperature)
    q, p = jnp.exp(lq), jnp.exp(lp)
    if kind == "forward":
        return jnp.sum(p * (lp - lq))
    if kind == "reverse":
        return jnp.sum(q * (lq - lp))
    lm = jnp.log(beta * p + (1 - beta) * q)
    return beta * jnp.sum(p * (lp - lm)) + (1 - beta) * jnp.sum(q * (lq - lm))


def test_traced_temperature_and_bf16(rng):
    s = rng.normal(size=(4, 33)) * 3
    t = rng.normal(size=(4, 33)) * 3
    sb, tb = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
    s64, t64 = np.asarray(sb, np.float64), np.asarray(tb, np.float64)  # the rounded inputs
    for fn, kind in ((jsm.jsd, "jsd"), (jsm.kl_divergence, "forward")):
        out = jax.jit(lambda s, t, T, fn=fn: fn(s, t, temperature=T))(sb, tb, 2.0)
        assert out.dtype == jnp.float32
        ref = np_divergence(s64, t64, kind, 0.5, 2.0)
        # float32 accumulation over 33 classes of terms up to ~|log p| <= 20 in size:
        # γ_33·20 absolute per row (sum_tol), on the bfloat16 inputs as rounded.
        np.testing.assert_allclose(out, ref, rtol=0, atol=sum_tol(33) * 20)


@pytest.mark.parametrize("kind, beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.3)])
def test_temperature_gradient_matches_float64(kind, beta, x64):
    """d/dT of the divergence against plain jax.nn autodiff in float64 (second order too)."""
    rng = np.random.default_rng(4)
    s, t = rng.normal(size=(2, 5, 9)) * 2

    def ours(s, t, T):
        if kind == "jsd":
            return jnp.sum(jsm.jsd(s, t, beta=beta, temperature=T))
        return jnp.sum(jsm.kl_divergence(s, t, direction=kind, temperature=T))

    def ref(s, t, T):
        return naive_divergence(s, t, T, kind, beta)

    for T in (0.7, 2.0):
        g = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(s, t, T)
        rg = jax.grad(ref, argnums=(0, 1, 2))(s, t, T)
        assert abs(float(rg[2])) > 1e-3  # a real dependence on T
        # float64 on both sides: agreement to many digits (γ_9 in float64 is 1e-15; the
        # divergence's conditioning costs a few more).
        for a, b in zip(g, rg, strict=True):
            assert rel_err(a, b) < 1e-10
        h = jax.grad(jax.grad(ours, argnums=2), argnums=2)(s, t, T)
        rh = jax.grad(jax.grad(ref, argnums=2), argnums=2)(s, t, T)
        assert rel_err(h, rh) < 1e-10


Z23 = np.zeros((2, 3))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: jsm.kl_divergence(Z23, np.zeros((2, 4))), ValueError, "does not match"),
        (lambda: jsm.kl_divergence(Z23, Z23, direction="up"), ValueError, "direction"),
        (lambda: jsm.jsd(Z23, Z23, beta=1.5), ValueError, "beta"),
        (lambda: jsm.jsd(Z23, Z23, temperature=0.0), ValueError, "temperature"),
        (lambda: jsm.kl_divergence(np.zeros(()), np.zeros(())), ValueError, "class axis"),
    ],
)  # fmt: skip
def test_materialised_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------- linear (chunked)

KINDS = [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.5), ("jsd", 0.2)]
GRID = [
    # layout, biases, temperature, softcap, chunk_size, ignored
    ("dv", False, 1.0, None, 16, False),
    ("vd", True, 2.0, None, 7, True),
    ("dv", True, 0.7, 3.0, 45, True),
    ("vd", False, 1.0, 2.5, None, False),
    ("dv", True, 1.5, None, 13, True),
]


# Every grid row once (cycling through the divergences); the full product is slow.
FAST = [k + g for k, g in zip(KINDS + KINDS[:1], GRID, strict=True)]
FULL = [k + g for k in KINDS for g in GRID if k + g not in FAST]


@pytest.mark.parametrize(
    "kind, beta, layout, biases, temperature, softcap, chunk, ignored",
    FAST + [pytest.param(*c, marks=pytest.mark.slow) for c in FULL],
)
def test_linear_matches_naive_float64(kind, beta, layout, biases, temperature, softcap, chunk,
                                      ignored, x64):  # fmt: skip
    # A fixed seed per case (zlib.crc32: the same in every process, unlike hash() of str).
    rng = np.random.default_rng(zlib.crc32(f"{kind}-{beta}-{layout}-{chunk}".encode()))
    hs, ws, ht, wt = make_heads(rng, layout=layout, scale=2.0)
    v = 45
    bs = rng.normal(size=v) if biases else None
    bt = rng.normal(size=v) if biases else None
    labels = rng.integers(0, v, size=hs.shape[0])
    if ignored:
        labels[[1, 4, 5]] = -100
    kw = dict(weight_layout=layout, temperature=temperature, logit_softcap=softcap)
    for reduction in ("mean", "none"):
        cot = rng.normal(size=hs.shape[0]) if reduction == "none" else 1.0

        def f(hs, ws, bs, ht, wt, bt, reduction=reduction, cot=cot):
            out = ours(kind, hs, ws, ht, wt, labels, beta=beta, student_bias=bs, teacher_bias=bt,
                       chunk_size=chunk, reduction=reduction, **kw)  # fmt: skip
            return jnp.sum(cot * out)

        def g(hs, ws, bs, ht, wt, bt, reduction=reduction, cot=cot):
            out = naive_linear(hs, ws, ht, wt, labels, kind=kind, beta=beta, student_bias=bs,
                               teacher_bias=bt, reduction=reduction, **kw)  # fmt: skip
            return jnp.sum(cot * out)

        argnums = (0, 1, 2) if biases else (0, 1)
        val, grads = jax.jit(jax.value_and_grad(f, argnums))(hs, ws, bs, ht, wt, bt)
        rval, rgrads = jax.value_and_grad(g, argnums)(hs, ws, bs, ht, wt, bt)
        np.testing.assert_allclose(val, rval, rtol=1e-10)
        for a, b in zip(grads, rgrads, strict=True):
            assert rel_err(a, b) < 1e-10
    # and the numpy definition on the materialised logits, per token
    zs = head_logits(hs, ws, bs, layout, softcap)
    zt = head_logits(ht, wt, bt, layout, softcap)
    ref = np_divergence(zs, zt, kind, beta, temperature)
    ref = np.where(labels == -100, 0.0, ref)
    per = ours(kind, hs, ws, ht, wt, labels, beta=beta, student_bias=bs, teacher_bias=bt,
               chunk_size=chunk, reduction="none", **kw)  # fmt: skip
    np.testing.assert_allclose(per, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind, beta", KINDS)
def test_linear_check_grads(kind, beta, x64):
    rng = np.random.default_rng(3)
    hs, ws, ht, wt = make_heads(rng, n=4, ds=3, dt=4, v=10)
    bs = rng.normal(size=10)

    def f(hs, ws, bs):
        return ours(kind, hs, ws, ht, wt, beta=beta, student_bias=bs, chunk_size=4,
                    temperature=1.3, logit_softcap=4.0)  # fmt: skip

    check_grads(f, (hs, ws, bs), order=1, modes=["rev"])


@pytest.mark.parametrize(
    "dtype, kind, beta",
    [
        (jnp.bfloat16, "forward", 0.5),
        (jnp.bfloat16, "jsd", 0.5),
        pytest.param(jnp.float32, "forward", 0.5, marks=pytest.mark.slow),
        pytest.param(jnp.float32, "jsd", 0.5, marks=pytest.mark.slow),
    ],
)
def test_linear_low_precision_against_float64(dtype, kind, beta, rng):
    hs, ws, ht, wt = make_heads(rng, n=32, ds=16, dt=24, v=301, scale=3.0, dtype=np.float32)
    args = [jnp.asarray(a, dtype) for a in (hs, ws, ht, wt)]
    f = lambda *a: ours(kind, *a, beta=beta, chunk_size=64)  # noqa: E731
    val, grads = jax.value_and_grad(f, (0, 1))(*args)
    assert val.dtype == jnp.float32 and grads[0].dtype == dtype
    with _compat.enable_x64(True):
        a64 = [np.asarray(a, np.float64) for a in args]
        rval, rgrads = jax.value_and_grad(
            lambda *a: naive_linear(*a, kind=kind, beta=beta), (0, 1)
        )(*a64)
    tol = 1e-5 if dtype == jnp.float32 else 1e-3
    np.testing.assert_allclose(val, rval, rtol=tol)
    gtol = 1e-5 if dtype == jnp.float32 else 2e-2
    for a, b in zip(grads, rgrads, strict=True):
        assert rel_err(a, b) < gtol


def test_teacher_gets_zero_gradient(rng):
    hs, ws, ht, wt = make_heads(rng, dtype=np.float32)
    for kind in ("forward", "reverse", "jsd"):
        g = jax.grad(lambda ht, wt, k=kind: ours(k, hs, ws, ht, wt), (0, 1))(ht, wt)
        assert all((np.asarray(x) == 0).all() for x in g)


def test_masked_vocabulary_and_empty_rows(rng, x64):
    """-inf biases mask classes out of both heads (0·log 0 = 0); a token whose every class
    is masked in both heads contributes 0 with a zero gradient."""
    hs, ws, ht, wt = make_heads(rng, n=5, v=20)
    b = np.zeros(20)
    b[[3, 7, 19]] = -np.inf
    for kind, beta in KINDS[:3]:
        f = lambda hs, ws, b=b, k=kind, be=beta: ours(  # noqa: E731
            k, hs, ws, ht, wt, beta=be, student_bias=b, teacher_bias=b, chunk_size=6,
            reduction="none",
        )  # fmt: skip
        out = f(hs, ws)
        zs, zt = hs @ ws + b, ht @ wt + b
        np.testing.assert_allclose(out, np_divergence(zs, zt, kind, beta), rtol=1e-9)
        grads = jax.grad(lambda hs, ws, f=f: jnp.sum(f(hs, ws)), (0, 1))(hs, ws)
        assert all(np.isfinite(g).all() for g in grads)
        assert (grads[1][:, [3, 7, 19]] == 0).all()
        full = np.full(20, -np.inf)
        out = f(hs, ws, b=full)
        assert (np.asarray(out) == 0).all()
        grads = jax.grad(lambda hs, ws, f=f, b=full: jnp.sum(f(hs, ws, b=b)), (0, 1))(hs, ws)
        assert all((np.asarray(g) == 0).all() for g in grads)


def test_all_ignored_batch_and_normalizer(rng):
    hs, ws, ht, wt = make_heads(rng, dtype=np.float32)
    labels = np.full(hs.shape[0], -100)
    for kind in ("forward", "reverse", "jsd"):
        val, grads = jax.value_and_grad(
            lambda hs, ws, k=kind: ours(k, hs, ws, ht, wt, labels), (0, 1)
        )(hs, ws)
        assert val == 0.0 and all((np.asarray(g) == 0).all() for g in grads)
    labels = rng.integers(0, 45, size=hs.shape[0])
    labels[:3] = -100
    total = jsm.linear_kl_divergence(hs, ws, ht, wt, labels, reduction="sum")
    for n in (7.0, jnp.float32(20.0)):
        out = jsm.linear_kl_divergence(hs, ws, ht, wt, labels, normalizer=n)
        np.testing.assert_allclose(out, total / float(n), rtol=1e-6)
    mean = jsm.linear_kl_divergence(hs, ws, ht, wt, labels)
    np.testing.assert_allclose(mean, total / 9, rtol=1e-6)
    den = jsm.loss_denominator(labels)
    np.testing.assert_allclose(
        jsm.linear_jsd(hs, ws, ht, wt, labels, normalizer=den),
        jsm.linear_jsd(hs, ws, ht, wt, labels),
        rtol=1e-6,
    )


def test_bad_label_poisons_its_token(rng):
    hs, ws, ht, wt = make_heads(rng, dtype=np.float32)
    labels = rng.integers(0, 45, size=hs.shape[0])
    labels[2] = 45
    per = np.asarray(jsm.linear_kl_divergence(hs, ws, ht, wt, labels, reduction="none"))
    assert np.isnan(per[2]) and np.isfinite(np.delete(per, 2)).all()
    g = jax.grad(lambda hs: jsm.linear_jsd(hs, ws, ht, wt, labels))(hs)
    assert np.isnan(g).any()
    with pytest.raises(Exception, match="label"):
        jsm.checked(jsm.linear_kl_divergence)(hs, ws, ht, wt, labels)
    # Only bad labels and ignored ones: the mean is NaN, not the empty batch's 0.
    labels = np.full(hs.shape[0], -100)
    labels[1] = 45
    for fn in (jsm.linear_kl_divergence, jsm.linear_jsd):
        assert np.isnan(fn(hs, ws, ht, wt, labels))


def test_batch_shape_jit_and_vmap(rng):
    hs, ws, ht, wt = make_heads(rng, n=12, dtype=np.float32)
    per = jsm.linear_jsd(hs, ws, ht, wt, reduction="none", chunk_size=8)
    per3 = jax.jit(lambda *a: jsm.linear_jsd(*a, reduction="none", chunk_size=8))(
        hs.reshape(3, 4, -1), ws, ht.reshape(3, 4, -1), wt
    )
    np.testing.assert_allclose(per3, per.reshape(3, 4), rtol=1e-6)
    vm = jax.vmap(lambda h, t: jsm.linear_jsd(h, ws, t, wt, reduction="none", chunk_size=8))(
        hs.reshape(3, 4, -1), ht.reshape(3, 4, -1)
    )
    np.testing.assert_allclose(vm, per.reshape(3, 4), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(direction="sideways"), ValueError, "direction"),
        (dict(weight_layout="xy"), ValueError, "weight_layout"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=jnp.float32(2.0)), TypeError, "temperature"),
        (dict(logit_softcap=0.0), ValueError, "logit_softcap"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(normalizer=4.0, reduction="sum"), ValueError, "normalizer"),
        (dict(teacher_weight=np.zeros((9, 44), np.float32)), ValueError, "vocabularies"),
        (dict(teacher_hidden=np.zeros((11, 9), np.float32)), ValueError, "tokens"),
        (dict(student_weight=np.zeros((5, 45), np.float32)), ValueError, "does not match"),
        (dict(labels=np.zeros(12, np.float32)), TypeError, "integers"),
        (dict(student_bias=np.zeros(44, np.float32)), ValueError, "linear_bias"),
    ],
)  # fmt: skip
def test_linear_bad_input(kwargs, exc, match, rng):
    hs, ws, ht, wt = make_heads(rng, dtype=np.float32)
    args = dict(student_hidden=hs, student_weight=ws, teacher_hidden=ht, teacher_weight=wt)
    for k in list(kwargs):
        if k in args:
            args[k] = kwargs.pop(k)
    with pytest.raises(exc, match=match):
        jsm.linear_kl_divergence(**args, **kwargs)
    with pytest.raises(ValueError, match="beta"):
        jsm.linear_jsd(hs, ws, ht, wt, beta=-0.1)


# ------------------------------------------------------------------- vocab-parallel


@pytest.mark.parametrize(
    "kind, layout, reduction",
    [
        ("jsd", "dv", "sum"),
        pytest.param("forward", "dv", "mean", marks=pytest.mark.slow),
        pytest.param("reverse", "vd", "none", marks=pytest.mark.slow),
    ],
)
def test_shard_map_matches_single_device(kind, layout, reduction, rng):
    n_shards, v_local = 4, 23  # ragged against chunk_size=8 in every shard
    v = n_shards * v_local
    hs, ws, ht, wt = make_heads(rng, n=16, v=v, layout=layout, scale=2.0, dtype=np.float32)
    bs = rng.normal(size=v).astype(np.float32)
    bt = rng.normal(size=v).astype(np.float32)
    labels = rng.integers(0, v, size=16)
    labels[:3] = -100
    mesh = Mesh(np.array(jax.devices()[:n_shards]), ("v",))
    w_spec = P(None, "v") if layout == "dv" else P("v", None)
    kw = dict(weight_layout=layout, reduction=reduction, chunk_size=8, temperature=1.5,
              logit_softcap=4.0)  # fmt: skip
    cot = rng.normal(size=16).astype(np.float32) if reduction == "none" else 1.0

    def parallel(hs, ws, bs):
        def local(hs, ws, bs, ht, wt, bt, y):
            return ours(kind, hs, ws, ht, wt, y, student_bias=bs, teacher_bias=bt,
                        axis_name="v", **kw)  # fmt: skip

        out = jax.shard_map(
            local, mesh=mesh, in_specs=(P(), w_spec, P("v"), P(), w_spec, P("v"), P()),
            out_specs=P(),
        )(hs, ws, bs, ht, wt, bt, labels)  # fmt: skip
        return jnp.sum(cot * out)

    def single(hs, ws, bs):
        out = ours(kind, hs, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt, **kw)
        return jnp.sum(cot * out)

    val, grads = jax.jit(jax.value_and_grad(parallel, (0, 1, 2)))(hs, ws, bs)
    rval, rgrads = jax.jit(jax.value_and_grad(single, (0, 1, 2)))(hs, ws, bs)
    np.testing.assert_allclose(val, rval, rtol=1e-5)
    for g, rg in zip(grads, rgrads, strict=True):
        assert rel_err(g, rg) < 1e-5


# ----------------------------------------------------------------- PyTorch fixtures


def _torch_cases():
    return [(meta["name"], case) for meta, case in load_golden("torch_distill_golden")]


@pytest.mark.parametrize("name, case", _torch_cases())
def test_matches_torch_kl_div(name, case):
    """``F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)`` (PyTorch 2.13)
    on the materialised student/teacher logits, and its gradient w.r.t. the student's
    hidden states and weight through ``hs @ ws / T``."""
    t = float(case["temperature"])
    hs, ws, ht, wt = (case[k] for k in ("hs", "ws", "ht", "wt"))
    direction = "forward" if "forward" in name else "reverse"
    per = jsm.kl_divergence(hs @ ws, ht @ wt, direction=direction, temperature=t)
    np.testing.assert_allclose(per, case["per_row"], rtol=1e-5, atol=1e-6)
    f = lambda hs, ws: jsm.linear_kl_divergence(  # noqa: E731
        hs, ws, ht, wt, case["labels"], direction=direction, temperature=t, chunk_size=32
    )
    val, (gh, gw) = jax.value_and_grad(f, (0, 1))(hs, ws)
    np.testing.assert_allclose(val, case["loss"], rtol=1e-5)
    assert rel_err(gh, case["grad_hs"]) < 1e-5
    assert rel_err(gw, case["grad_ws"]) < 1e-5


def test_torch_fixtures_present():
    assert len(_torch_cases()) >= 2


# --------------------------------------------------------------------- memory


@pytest.mark.parametrize("fn", ["linear_kl_divergence", "linear_jsd"])
def test_memory_is_an_eighth_of_naive(fn):
    n, d, v = 2048, 512, 65536
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((n, d), (d, v), (n, d), (d, v))]
    kind = "jsd" if fn == "linear_jsd" else "forward"
    assert_memory_fraction(
        lambda *a: ours(kind, *a), lambda *a: naive_linear(*a, kind=kind), args,
        naive_at_least=n * v * 4,
    )  # fmt: skip


# --------------------------------------------------------------- sparse top-k teacher


def naive_topk(hs, ws, lp, idx, labels=None, *, temperature=1.0, remainder="bucket", bias=None,
               weight_layout="dv", logit_softcap=None):  # fmt: skip
    """The definition on the student's materialised log-probabilities."""
    zs = head_logits(hs, ws, bias, weight_layout, logit_softcap) / temperature
    lq = jnp.take_along_axis(jax.nn.log_softmax(zs), idx, axis=-1)
    p = jnp.exp(lp)
    if remainder == "renormalize":
        lp = lp - jnp.log(jnp.sum(p, -1, keepdims=True))
        per = jnp.sum(jnp.exp(lp) * (lp - lq), -1)
    else:
        r = 1.0 - jnp.sum(p, -1)
        q_out = 1.0 - jnp.sum(jnp.exp(lq), -1)
        per = jnp.sum(p * (lp - lq), -1) + jnp.where(r > 0, r * jnp.log(r / q_out), 0.0)
    keep = jnp.ones(per.shape, bool) if labels is None else labels != -100
    return jnp.sum(jnp.where(keep, per, 0.0)) / jnp.sum(keep)


@pytest.mark.parametrize(
    "remainder, layout, k, softcap",
    [
        ("bucket", "dv", 5, None),
        ("renormalize", "vd", 7, 3.0),
        pytest.param("bucket", "vd", 1, 2.0, marks=pytest.mark.slow),
    ],
)  # fmt: skip
def test_topk_teacher_matches_naive_float64(remainder, layout, k, softcap, rng, x64):
    hs, ws, ht, wt = make_heads(rng, layout=layout, scale=2.0)
    bias = rng.normal(size=45)
    labels = rng.integers(0, 45, size=hs.shape[0])
    labels[[0, 6]] = -100
    top = jsm.linear_softmax_stats(ht, wt, weight_layout=layout, top_k=k, temperature=1.5)
    lp, idx = top.topk_logprobs, top.topk_indices
    kw = dict(temperature=1.5, remainder=remainder, weight_layout=layout, logit_softcap=softcap)

    def f(hs, ws, b):
        return jsm.linear_topk_kl_divergence(
            hs, ws, lp, idx, labels, student_bias=b, chunk_size=16, **kw
        )

    val, grads = jax.value_and_grad(f, (0, 1, 2))(hs, ws, bias)
    rval, rgrads = jax.value_and_grad(
        lambda hs, ws, b: naive_topk(hs, ws, lp, idx, labels, bias=b, **kw), (0, 1, 2)
    )(hs, ws, bias)
    np.testing.assert_allclose(val, rval, rtol=1e-10)
    for a, b in zip(grads, rgrads, strict=True):
        assert rel_err(a, b) < 1e-9


def test_topk_teacher_full_k_is_forward_kl(rng, x64):
    """k = V leaves no tail: both remainders give the full forward KL."""
    hs, ws, ht, wt = make_heads(rng, n=6, v=20)
    top = jsm.linear_softmax_stats(ht, wt, top_k=20, temperature=2.0)
    full = jsm.linear_kl_divergence(hs, ws, ht, wt, temperature=2.0)
    for remainder in ("bucket", "renormalize"):
        out = jsm.linear_topk_kl_divergence(
            hs, ws, top.topk_logprobs, top.topk_indices, temperature=2.0, remainder=remainder
        )
        np.testing.assert_allclose(out, full, rtol=1e-9)
    # k = V - 1: the tail is one class, so the bucket is still exact.
    top = jsm.linear_softmax_stats(ht, wt, top_k=19, temperature=2.0)
    out = jsm.linear_topk_kl_divergence(
        hs, ws, top.topk_logprobs, top.topk_indices, temperature=2.0
    )
    np.testing.assert_allclose(out, full, rtol=1e-7)


def test_topk_teacher_edge_cases(rng):
    hs, ws, ht, wt = make_heads(rng, n=6, v=20, dtype=np.float32)
    top = jsm.linear_softmax_stats(ht, wt, top_k=4)
    lp, idx = np.array(top.topk_logprobs), np.array(top.topk_indices)
    lp[1, 2:] = -np.inf  # fewer than k entries: padding contributes 0
    idx[3, 0] = 20  # out of range: that token is NaN
    per = np.asarray(jsm.linear_topk_kl_divergence(hs, ws, lp, idx, reduction="none"))
    assert np.isnan(per[3]) and np.isfinite(np.delete(per, 3)).all()
    labels = np.full(6, -100)
    val, g = jax.value_and_grad(lambda h: jsm.linear_topk_kl_divergence(h, ws, lp, idx, labels))(hs)
    assert val == 0.0 and (np.asarray(g) == 0).all()
    with pytest.raises(ValueError, match="remainder"):
        jsm.linear_topk_kl_divergence(hs, ws, lp, idx, remainder="drop")
    with pytest.raises(ValueError, match="teacher_logprobs"):
        jsm.linear_topk_kl_divergence(hs, ws, lp[:, 0], idx[:, 0])
    with pytest.raises(TypeError, match="teacher_indices"):
        jsm.linear_topk_kl_divergence(hs, ws, lp, lp)

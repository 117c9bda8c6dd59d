"""Tests for jsoftmax/_losses.py: PyTorch parity, deviations, properties, gradients."""

from __future__ import annotations

import functools
import io
from contextlib import redirect_stdout

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _references import load_golden, np_cross_entropy, ref_cross_entropy, sum_tol
from hypothesis import given
from hypothesis import strategies as st
from jax.ad_checkpoint import print_saved_residuals
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jsoftmax as jsm
from jsoftmax import _compat, _losses

# Jitted entry points: one compilation per test instead of one per primitive (eager
# dispatch compiles every op separately, which dominates small tests).
ce = jax.jit(
    jsm.cross_entropy,
    static_argnames=(
        "axis",
        "ignore_index",
        "label_smoothing",
        "z_loss",
        "reduction",
        "axis_name",
        "impl",
    ),
)
nll = jax.jit(jsm.nll_loss, static_argnames=("axis", "ignore_index", "reduction"))
focal = jax.jit(jsm.focal_loss, static_argnames=("gamma", "axis", "ignore_index", "reduction"))
bce = jax.jit(jsm.binary_cross_entropy_with_logits, static_argnames=("reduction",))

REDUCTIONS = ("mean", "sum", "none")


# ------------------------------------------------------------------ references


def vg(f, argnums=0):
    """``jax.value_and_grad`` under ``jax.jit``: one compilation instead of one per op."""
    return jax.jit(jax.value_and_grad(f, argnums=argnums))


def value_and_vjp(f, args, cot):
    """``f(*args)`` and its VJP with cotangent ``cot``, in one jitted computation."""

    @jax.jit
    def run(args, cot):
        out, vjp = jax.vjp(f, *args)
        return out, vjp(jnp.asarray(cot, out.dtype))

    return run(tuple(args), cot)


GOLDEN_CASES = load_golden("torch_golden")


# ------------------------------------------------------------- PyTorch parity


def _call_golden(meta, a):
    """The jsoftmax call matching a golden case, as ``f(x, second_input) -> loss``."""
    kind, red = meta["kind"], meta["reduction"]
    w = a.get("weight")
    if kind == "ce":
        return lambda x, y: ce(
            x,
            y,
            axis=meta["axis"],
            weight=w,
            ignore_index=meta["ignore_index"],
            label_smoothing=meta["label_smoothing"],
            reduction=red,
        )
    if kind == "ce_soft":
        return lambda x, q: ce(
            x,
            q,
            axis=meta["axis"],
            weight=w,
            label_smoothing=meta["label_smoothing"],
            reduction=red,
        )
    if kind == "nll":
        # LogSoftmax + NLLLoss, differentiated through both, against PyTorch's pair.
        return lambda x, y: nll(
            jsm.log_softmax(x, axis=meta["axis"]), y, axis=meta["axis"], weight=w, reduction=red
        )
    return lambda x, t: bce(x, t, weight=w, pos_weight=a.get("pos_weight"), reduction=red)


@pytest.mark.parametrize("meta,a", GOLDEN_CASES, ids=[m["name"] for m, _ in GOLDEN_CASES])
def test_matches_torch_golden(meta, a):
    f = _call_golden(meta, a)
    second = a["targets"] if meta["kind"] == "bce" else a["labels"]
    diff_second = meta["kind"] in ("ce_soft", "bce")
    argnums = (0, 1) if diff_second else (0,)
    if diff_second:
        loss, grads = value_and_vjp(f, (a["x"], second), a["cotangent"])
    else:
        loss, grads = value_and_vjp(lambda x: f(x, second), (a["x"],), a["cotangent"])
    assert loss.dtype == jnp.float32
    assert loss.shape == a["loss"].shape
    np.testing.assert_allclose(loss, a["loss"], rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(grads[0], a["grad_x"], rtol=2e-5, atol=1e-6)
    if len(argnums) == 2:
        name = "grad_targets" if meta["kind"] == "bce" else "grad_labels"
        np.testing.assert_allclose(grads[1], a[name], rtol=2e-5, atol=1e-6)


def test_golden_grid_covers_options():
    kinds = {(m["kind"], m["reduction"]) for m, _ in GOLDEN_CASES}
    for kind in ("ce", "ce_soft", "nll", "bce"):
        assert {(kind, r) for r in REDUCTIONS} <= kinds
    ce = [m for m, _ in GOLDEN_CASES if m["kind"] in ("ce", "ce_soft")]
    assert any(m["axis"] == 1 for m in ce)  # PyTorch's (N, C, d1, ...) layout
    assert any(m["label_smoothing"] > 0 and "weight" in m["arrays"] for m in ce)
    assert any(m["ignore_index"] == 1 for m in ce if m["kind"] == "ce")


@pytest.mark.parametrize("meta,a", [c for c in GOLDEN_CASES if c[0]["kind"] == "nll"][:2])
def test_log_softmax_nll_equals_cross_entropy(meta, a):
    w = a.get("weight")
    ce_out = vg(lambda x: ce(x, a["labels"], axis=meta["axis"], weight=w))(a["x"])
    nll_out = vg(
        lambda x: nll(
            jax.nn.log_softmax(x, axis=meta["axis"]), a["labels"], axis=meta["axis"], weight=w
        )
    )(a["x"])
    np.testing.assert_allclose(ce_out[0], nll_out[0], rtol=1e-6)
    np.testing.assert_allclose(ce_out[1], nll_out[1], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------- hand-made exact values


def test_small_values_by_hand():
    logits = jnp.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    lse = np.log(np.exp([2.0, 0.5, -1.0]).sum()), np.log(np.exp([0.0, 1.0, 3.0]).sum())
    l0, l1 = lse[0] - 2.0, lse[1] - 3.0
    np.testing.assert_allclose(ce(logits, jnp.array([0, 2])), (l0 + l1) / 2, 1e-6)
    # PyTorch's weighted mean: Σ w_y l / Σ w_y.
    w = jnp.array([1.0, 2.0, 3.0])
    out = ce(logits, jnp.array([0, 2]), weight=w)
    np.testing.assert_allclose(out, (1 * l0 + 3 * l1) / 4, rtol=1e-6)
    # sample_weight multiplies numerator and denominator.
    out = ce(logits, jnp.array([0, 2]), weight=w, sample_weight=jnp.array([2.0, 0.5]))
    np.testing.assert_allclose(out, (2 * l0 + 1.5 * l1) / (2 + 1.5), rtol=1e-6)
    none = ce(logits, jnp.array([0, -100]), reduction="none")
    np.testing.assert_allclose(none, [l0, 0.0], rtol=1e-6)
    # z-loss: + λ lse² per non-ignored position.
    z = ce(logits, jnp.array([0, -100]), z_loss=0.5, reduction="sum")
    np.testing.assert_allclose(z, l0 + 0.5 * lse[0] ** 2, rtol=1e-6)


def test_soft_labels_equal_one_hot():
    logits = jax.random.normal(jax.random.key(0), (6, 7))
    y = jnp.arange(6) % 7
    w = jnp.linspace(0.5, 2.0, 7)
    soft = ce(logits, jax.nn.one_hot(y, 7), weight=w, reduction="none")
    hard = ce(logits, y, weight=w, reduction="none")
    np.testing.assert_allclose(soft, hard, rtol=1e-6)
    # ...but the soft "mean" divides by the number of positions (PyTorch), not Σ w_y.
    soft_mean = ce(logits, jax.nn.one_hot(y, 7), weight=w)
    np.testing.assert_allclose(soft_mean, hard.sum() / 6, rtol=1e-6)


def test_any_class_axis_matches_last_axis():
    x = jax.random.normal(jax.random.key(1), (3, 5, 4, 2))
    y = jax.random.randint(jax.random.key(2), (3, 4, 2), 0, 5).at[0, 0, 0].set(-100)
    w = jnp.linspace(0.2, 2.0, 5)
    kw = dict(weight=w, label_smoothing=0.2, z_loss=1e-3)
    a = vg(lambda x: ce(x, y, axis=1, **kw))(x)
    b = vg(lambda x: ce(jnp.moveaxis(x, 1, -1), y, **kw))(x)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------ deviations


@pytest.mark.parametrize("case", ["all_ignored", "all_zero_weight", "zero_weight_smoothing"])
def test_empty_mean_is_zero_with_zero_grad(case):
    x = jax.random.normal(jax.random.key(3), (4, 5))
    y = jnp.array([1, 1, 1, 1])
    kw = {}
    if case == "all_ignored":
        y = jnp.full((4,), -100)
    else:
        kw["weight"] = jnp.array([1.0, 0.0, 1.0, 1.0, 1.0])
    if case == "zero_weight_smoothing":
        kw["label_smoothing"] = 0.3  # numerator > 0, denominator 0: PyTorch gives inf
    loss, g = vg(lambda x: ce(x, y, **kw))(x)
    assert loss == 0.0 and loss.dtype == jnp.float32
    assert np.all(np.asarray(g) == 0.0)
    kw.pop("label_smoothing", None)
    loss, g = vg(lambda x: nll(jax.nn.log_softmax(x), y, **kw))(x)
    assert loss == 0.0 and np.all(np.asarray(g) == 0.0)


@pytest.mark.parametrize("bad_label", [-1, 5, 17])
def test_bad_label_poisons_loss_and_gradient(bad_label):
    x = jax.random.normal(jax.random.key(4), (3, 5))
    y = jnp.array([0, bad_label, 2])
    per = ce(x, y, reduction="none")
    assert np.isnan(per[1]) and np.all(np.isfinite(per[jnp.array([0, 2])]))
    for red in ("mean", "sum"):
        assert np.isnan(ce(x, y, reduction=red))
        assert np.isnan(nll(jax.nn.log_softmax(x), y, reduction=red))
        assert np.isnan(focal(x, y, reduction=red))
    g = jax.jit(jax.grad(lambda x: ce(x, y, reduction="sum")))(x)
    assert np.all(np.isnan(g[1])) and np.all(np.isfinite(g[jnp.array([0, 2])]))
    # Zero weights or sample weights cannot hide the poison.
    w = jnp.zeros(5)
    assert np.isnan(ce(x, y, weight=w))
    assert np.isnan(ce(x, y, sample_weight=jnp.array([1.0, 0.0, 1.0])))


def test_optax_is_silently_wrong_for_label_minus_one():
    x = jnp.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    y = jnp.array([0, -1])
    theirs = optax.losses.softmax_cross_entropy_with_integer_labels(x, y).mean()
    assert np.isfinite(theirs)  # a plausible number, computed from a label that is not there
    assert np.isnan(ce(x, y))


def test_label_on_masked_class_is_nan():
    x = jax.random.normal(jax.random.key(5), (3, 4))
    where = jnp.array([True, True, False, True])
    per = ce(x, jnp.array([0, 2, 3]), where=where, reduction="none")
    assert np.isnan(per[1]) and np.all(np.isfinite(per[jnp.array([0, 2])]))
    soft = jnp.array([[0.5, 0.5, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0], [0, 0, 0, 1.0]])
    per = ce(x, soft, where=where, reduction="none")
    assert np.isnan(per[1]) and np.all(np.isfinite(per[jnp.array([0, 2])]))


def test_fully_masked_rows_are_harmless_when_unused():
    x = jnp.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    where = jnp.array([[True, True, True], [False, False, False]])
    q = jnp.array([[0.2, 0.3, 0.5], [0.0, 0.0, 0.0]])  # the empty row has no target
    y = jnp.array([2, -100])  # ... or is ignored
    for labels in (q, y):
        per, g = value_and_vjp(
            lambda x, labels=labels: ce(
                x, labels, where=where, label_smoothing=0.1, z_loss=0.1, reduction="none"
            ),
            (x,),
            jnp.ones(2),
        )
        assert per[1] == 0.0 and np.isfinite(per[0])
        assert np.all(np.asarray(g[0][1]) == 0.0) and np.all(np.isfinite(g[0]))


def test_where_drops_classes_from_the_normaliser():
    x = jax.random.normal(jax.random.key(6), (5, 6))
    y = jnp.array([0, 1, 3, 5, 3])
    keep = jnp.array([0, 1, 3, 5])
    where = jnp.zeros(6, bool).at[keep].set(True)
    y_small = jnp.searchsorted(keep, y)
    for kw in (dict(), dict(label_smoothing=0.3), dict(z_loss=0.01)):
        masked = vg(lambda x, kw=kw: ce(x, y, where=where, **kw))(x)
        small = vg(lambda x, kw=kw: ce(x[:, keep], y_small, **kw))(x)
        np.testing.assert_allclose(masked[0], small[0], rtol=1e-6)
        np.testing.assert_allclose(masked[1], small[1], rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------ dtypes, jit, vmap


def test_half_precision_dtypes():
    x = jax.random.normal(jax.random.key(7), (8, 33)) * 4
    y = jax.random.randint(jax.random.key(8), (8,), 0, 33)
    for dt in (jnp.bfloat16, jnp.float16):
        xh = x.astype(dt)
        loss, g = vg(lambda x: ce(x, y, label_smoothing=0.1))(xh)
        assert loss.dtype == jnp.float32 and g.dtype == dt
        ref = jax.jit(ref_cross_entropy, static_argnames="label_smoothing")
        np.testing.assert_allclose(loss, ref(xh.astype(jnp.float32), y, label_smoothing=0.1), 2e-6)
    out = jax.eval_shape(lambda x: (nll(x, y), focal(x, y), bce(x, x > 0)), x.astype(jnp.float16))
    assert all(o.dtype == jnp.float32 for o in out)


def test_float64(x64):
    x = jax.random.normal(jax.random.key(9), (4, 6), jnp.float64)
    y = jnp.array([0, 5, -100, 2])
    loss, g = vg(lambda x: ce(x, y, label_smoothing=0.1))(x)
    assert loss.dtype == jnp.float64 and g.dtype == jnp.float64
    np.testing.assert_allclose(loss, ref_cross_entropy(x, y, label_smoothing=0.1), rtol=1e-13)


def test_jit_and_vmap():
    x = jax.random.normal(jax.random.key(10), (3, 4, 7))
    y = jax.random.randint(jax.random.key(11), (3, 4), 0, 7).at[1, 2].set(-100)
    w = jnp.linspace(0.5, 1.5, 7)
    f = lambda x, y: ce(x, y, weight=w, label_smoothing=0.1)
    eager = jnp.stack([f(x[i], y[i]) for i in range(3)])
    np.testing.assert_allclose(jax.jit(jax.vmap(f))(x, y), eager, rtol=1e-6)
    ge = jnp.stack([jax.jit(jax.grad(f))(x[i], y[i]) for i in range(3)])
    np.testing.assert_allclose(jax.jit(jax.vmap(jax.grad(f)))(x, y), ge, rtol=1e-6, atol=1e-8)
    for g in (nll, focal):
        np.testing.assert_allclose(
            jax.jit(jax.vmap(g))(x, y), jnp.stack([g(x[i], y[i]) for i in range(3)]), rtol=1e-6
        )


# ------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(label_smoothing=0.2, z_loss=0.05),
        dict(label_smoothing=0.1, where=np.array([True, False, True, True, True])),
        dict(label_smoothing=0.3, soft=True),
    ],
    ids=["plain", "smooth_z", "where", "soft"],
)
def test_check_grads_float64(x64, kw):
    kw = dict(kw)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 5)))
    w = jnp.asarray(rng.uniform(0.5, 2.0, 5))
    sw = jnp.asarray(rng.uniform(0.5, 2.0, 4))
    soft = kw.pop("soft", False)
    labels = jnp.asarray(rng.dirichlet(np.ones(5), 4)) if soft else jnp.array([0, 2, -100, 4])
    for red in ("mean", "none"):
        # Gradients flow to the logits, the class weights, the sample weights and (soft)
        # the label probabilities.
        def f(x, w, sw, *q, red=red):
            return ce(x, q[0] if soft else labels, weight=w, sample_weight=sw, reduction=red, **kw)

        args = (x, w, sw, labels) if soft else (x, w, sw)
        check_grads(jax.jit(f), args, order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_check_grads_other_losses_float64(x64):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 5)))
    y = jnp.array([0, 2, -100, 4])
    w = jnp.asarray(rng.uniform(0.5, 2.0, 5))
    check_grads(lambda x, w: nll(x, y, weight=w), (x, w), order=1, modes=["rev"])
    check_grads(lambda x: focal(x, y, gamma=1.5, alpha=w), (x,), order=1, modes=["rev"])
    check_grads(lambda x: focal(x, y, gamma=0.5), (x,), order=1, modes=["rev"])
    t = jnp.asarray(rng.uniform(size=(4, 5)))
    check_grads(
        lambda x, t: bce(x, t, weight=w, pos_weight=w[::-1]),
        (x, t),
        order=1,
        modes=["rev"],
    )


@pytest.mark.parametrize("mode", ["exp", "lse"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(label_smoothing=0.25, z_loss=0.1),
        dict(label_smoothing=0.1, where=np.arange(6) != 3, sample_weight=np.linspace(0.0, 2, 5)),
        dict(soft=True, label_smoothing=0.2, z_loss=0.01),
    ],
    ids=["plain", "smooth_z", "where_sw", "soft"],
)
def test_none_reduction_random_cotangent(x64, monkeypatch, mode, kw):
    """Per-position cotangents (the "none" bug class) against float64 autodiff of the formulas."""
    monkeypatch.setattr(_losses, "_RESIDUAL", mode)
    kw = dict(kw)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(5, 6)) * 3)
    w = jnp.asarray(rng.uniform(0.5, 2.0, 6))
    if kw.pop("soft", False):
        labels = jnp.asarray(rng.dirichlet(np.ones(6), 5))
    else:
        labels = jnp.array([0, 2, -100, 5, 1])
    cot = jnp.asarray(rng.normal(size=5))
    out, grads = value_and_vjp(
        lambda x, w: jsm.cross_entropy(x, labels, weight=w, reduction="none", **kw), (x, w), cot
    )
    ref, ref_grads = value_and_vjp(
        lambda x, w: ref_cross_entropy(x, labels, weight=w, reduction="none", **kw), (x, w), cot
    )
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_residuals_hold_at_most_one_class_sized_array():
    x = jnp.zeros((8, 16))
    y = jnp.zeros(8, jnp.int32)

    def saved(mode, **kw):
        _losses._RESIDUAL, old = mode, _losses._RESIDUAL
        try:
            buf = io.StringIO()
            with redirect_stdout(buf):
                print_saved_residuals(lambda x: jsm.cross_entropy(x, y, **kw), x)
        finally:
            _losses._RESIDUAL = old
        lines = [ln for ln in buf.getvalue().splitlines() if "[8,16]" in ln]
        return [ln for ln in lines if "from the argument" not in ln]

    for kw in (dict(), dict(label_smoothing=0.1, z_loss=1e-3, weight=jnp.ones(16))):
        assert len(saved("exp", **kw)) == 1  # exp(z - max): the gradient-sized array
        assert saved("lse", **kw) == []  # per-position logsumexp only
    # The default on CPU for float32 is the single-exp residual; for bf16 it stores nothing.
    assert _losses._residual_mode(jnp.float32) == "exp"
    assert _losses._residual_mode(jnp.bfloat16) == "lse"


def test_compiled_temp_memory_not_above_optax():
    shape = (256, 4096)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    y = jax.ShapeDtypeStruct(shape[:1], jnp.int32)

    def temp(f):
        c = jax.jit(vg(f)).lower(x, y).compile()
        return c.memory_analysis().temp_size_in_bytes

    ours = temp(lambda x, y: ce(x, y))
    theirs = temp(lambda x, y: optax.losses.softmax_cross_entropy_with_integer_labels(x, y).mean())
    assert ours <= theirs


# ---------------------------------------------------------------- properties


@given(
    x=hnp.arrays(np.float32, (4, 7), elements=st.floats(-30, 30, width=32)),
    neg=hnp.arrays(np.bool_, (4, 7)),
    label=hnp.arrays(np.int64, (4,), elements=st.integers(0, 6)),
    ignored=hnp.arrays(np.bool_, (4,)),
    eps=st.sampled_from([0.0, 0.2]),
    lam=st.sampled_from([0.0, 1e-2]),
)
def test_finite_for_finite_and_neg_inf_masked_inputs(x, neg, label, ignored, eps, lam):
    neg[np.arange(4), label] = False  # labels point at admissible classes
    x = np.where(neg, -np.inf, x).astype(np.float32)
    y = np.where(ignored, -100, label)
    q = jax.nn.softmax(jnp.asarray(x), axis=-1)  # soft labels, zero where x = -inf
    loss, g = _finite_case(x, y, q, eps, lam)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(g))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _finite_case(x, y, q, eps, lam):
    def losses(x):
        return jnp.stack(
            [
                ce(x, y, label_smoothing=eps, z_loss=lam),
                focal(x, y, gamma=0.5),
                ce(x, q, label_smoothing=eps, z_loss=lam),
            ]
        )

    out, vjp = jax.vjp(losses, x)
    return out, vjp(jnp.ones(3))[0]


@given(
    x=hnp.arrays(np.float32, (4, 6), elements=st.floats(-20, 20, width=32)),
    y=hnp.arrays(np.int64, (4,), elements=st.integers(-1, 5)),
    reduction=st.sampled_from(REDUCTIONS),
)
def test_focal_gamma_zero_is_cross_entropy(x, y, reduction):
    y = np.where(y < 0, -100, y)
    a = focal(x, y, gamma=0.0, reduction=reduction)
    b = ce(x, y, reduction=reduction)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@given(
    x=hnp.arrays(np.float64, (3, 7), elements=st.floats(-50, 50)),
    y=hnp.arrays(np.int64, (3,), elements=st.integers(0, 6)),
    eps=st.floats(0.0, 1.0),
    lam=st.floats(0.0, 0.1),
    shift=st.sampled_from([0.0, 1e3]),
)
def test_smoothing_and_z_loss_match_float64_reference(x, y, eps, lam, shift):
    w = np.linspace(0.3, 2.0, 7)
    with _compat.enable_x64(True):
        ref = ref_cross_entropy(x + shift, y, weight=w, label_smoothing=eps, z_loss=lam)
    got = ce((x + shift).astype(np.float32), y, weight=w, label_smoothing=eps, z_loss=lam)
    # float32 inputs: the error is that of rounding the logits (|x|·2^-24 per logit,
    # lse² amplifies it by 2·lse) plus float32 accumulation.
    scale = 1 + np.max(np.abs(x + shift))
    tol = 4e-7 * scale * (1 + 2 * lam * scale) * 7
    assert abs(float(got) - float(ref)) <= tol + 2e-6 * abs(float(ref))


@given(
    x=hnp.arrays(np.float32, (4, 64), elements=st.floats(-40, 40, width=32)),
    y=hnp.arrays(np.int64, (4,), elements=st.integers(0, 63)),
)
def test_bf16_logits_give_float32_accurate_losses(x, y):
    xb = jnp.asarray(x).astype(jnp.bfloat16)
    got = ce(xb, y, reduction="none", label_smoothing=0.1, z_loss=1e-3)
    with _compat.enable_x64(True):
        want = ref_cross_entropy(
            np.asarray(xb.astype(jnp.float32), np.float64),
            y,
            reduction="none",
            label_smoothing=0.1,
            z_loss=1e-3,
        )
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


# ---------------------------------------------------------- vocab-parallel (shard_map)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(weight="full", label_smoothing=0.1, z_loss=1e-2),
        dict(weight="shard", where=True),
        dict(soft=True, label_smoothing=0.2),
    ],
    ids=["plain", "weight_smooth_z", "shard_weight_where", "soft"],
)
def test_axis_name_equals_unsharded(kw):
    kw = dict(kw)
    mesh = jax.make_mesh((8,), ("v",))  # the 8 simulated CPU devices of conftest
    rng = np.random.default_rng(3)
    n, c = 6, 32
    x = jnp.asarray(rng.normal(size=(n, c)) * 3, jnp.float32)
    y = jnp.asarray(rng.integers(0, c, n)).at[1].set(-100)
    cot = jnp.asarray(rng.normal(size=n), jnp.float32)
    full_w = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
    extra_specs, extra_args, ref_kw = [], [], {}
    weight = kw.pop("weight", None)
    if weight is not None:
        extra_specs.append(P("v") if weight == "shard" else P())
        extra_args.append(full_w)
        ref_kw["weight"] = full_w
    where = kw.pop("where", None)
    if where is not None:
        mask = jnp.asarray(rng.uniform(size=c) < 0.8).at[y].set(True)
        extra_specs.append(P("v"))
        extra_args.append(mask)
        ref_kw["where"] = mask
    if kw.pop("soft", False):
        y = jax.nn.softmax(jnp.asarray(rng.normal(size=(n, c)), jnp.float32))
        label_spec = P(None, "v")
    else:
        label_spec = P()

    def local(x, y, *extra):
        extra = dict(zip([k for k in ("weight", "where") if k in ref_kw], extra, strict=True))
        return ce(x, y, axis_name="v", reduction="none", **kw, **extra)

    sm = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(None, "v"), label_spec, *extra_specs),
            out_specs=P(),
        )
    )
    put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))  # noqa: E731
    args = [put(a, s) for a, s in zip([y, *extra_args], [label_spec, *extra_specs], strict=True)]
    got, (g_got,) = value_and_vjp(lambda x: sm(x, *args), (put(x, P(None, "v")),), cot)
    want, (g_want,) = value_and_vjp(lambda x: ce(x, y, reduction="none", **kw, **ref_kw), (x,), cot)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(g_got, g_want, rtol=2e-5, atol=1e-7)


def test_axis_name_bad_label_is_nan():
    mesh = jax.make_mesh((8,), ("v",))
    x = jnp.zeros((3, 16))
    y = jnp.array([0, 16, 15])
    sm = jax.shard_map(
        lambda x, y: ce(x, y, axis_name="v", reduction="none"),
        mesh=mesh,
        in_specs=(P(None, "v"), P()),
        out_specs=P(),
    )
    out = sm(jax.device_put(x, NamedSharding(mesh, P(None, "v"))), y)
    np.testing.assert_allclose(out[jnp.array([0, 2])], np.log(16.0), rtol=1e-6)
    assert np.isnan(out[1])


# -------------------------------------------------------------------- impl switch


def test_impl_switch():
    x = jax.random.normal(jax.random.key(12), (4, 6))
    y = jnp.array([0, 1, 2, 3])
    # What "auto" dispatches to is tested in tests/test_impl.py (the lowered programs);
    # here each route's value against the float64 reference, not against each other.
    want, _ = np_cross_entropy(x, y)
    for impl in ("auto", "xla", "pallas"):
        # float32: γ_6 (sum_tol) relative to |lse| + |z_y|, a few times the loss here.
        np.testing.assert_allclose(ce(x, y, impl=impl), want, rtol=sum_tol(6) * 4)
    with pytest.raises(ValueError, match="impl"):
        ce(x, y, impl="cuda")
    with pytest.raises(ValueError, match="probability labels"):
        ce(x, jax.nn.softmax(x), impl="pallas")
    with pytest.raises(ValueError, match="`where`"):
        ce(x, y, where=x > 0, impl="pallas")
    with pytest.raises(ValueError, match="label smoothing"):
        ce(x, y, weight=jnp.ones(6), label_smoothing=0.1, impl="pallas")


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda x, y: jsm.cross_entropy(x, y[:3]), ValueError, r"`labels` has shape \(3,\)"),
        (lambda x, y: jsm.cross_entropy(x, y.astype(jnp.float32)), ValueError, r"\(4, 6\)"),
        (lambda x, y: jsm.cross_entropy(x, y > 0), TypeError, "integers"),
        (lambda x, y: jsm.cross_entropy(x, y, weight=jnp.ones(5)), ValueError, r"`weight`.*\(5,\)"),
        (lambda x, y: jsm.cross_entropy(x, y, reduction="avg"), ValueError, "reduction"),
        (lambda x, y: jsm.cross_entropy(x, y, label_smoothing=1.5), ValueError, "label_smoothing"),
        (lambda x, y: jsm.cross_entropy(x, y, z_loss=-1.0), ValueError, "z_loss"),
        (lambda x, y: jsm.cross_entropy(x, y, z_loss=jnp.float32(1)), TypeError, "z_loss"),
        (lambda x, y: jsm.cross_entropy(x, y, axis=2), ValueError, "axis"),
        (
            lambda x, y: jsm.cross_entropy(x, y, sample_weight=jnp.ones(3)),
            ValueError,
            "sample_weight",
        ),
        (lambda x, y: jsm.cross_entropy(x, y, where=jnp.ones(6)), TypeError, "where"),
        (lambda x, y: jsm.cross_entropy(x, y, ignore_index=1.0), TypeError, "ignore_index"),
        (lambda x, y: jsm.cross_entropy(x[0, 0], y[0]), ValueError, "class axis"),
        (lambda x, y: jsm.nll_loss(x, y[None]), ValueError, "labels"),
        (lambda x, y: jsm.nll_loss(x, y, weight=jnp.ones((6, 1))), ValueError, "weight"),
        (lambda x, y: jsm.focal_loss(x, y, gamma=-1.0), ValueError, "gamma"),
        (lambda x, y: jsm.focal_loss(x, y, alpha=jnp.ones(4)), ValueError, "alpha"),
        (lambda x, y: jsm.binary_cross_entropy_with_logits(x, x[:2]), ValueError, "`labels`"),
        (
            lambda x, y: jsm.binary_cross_entropy_with_logits(x, x, pos_weight=jnp.ones(5)),
            ValueError,
            "pos_weight",
        ),
        (lambda x, y: jsm.class_weights(jnp.ones((2, 2))), ValueError, "counts"),
        (lambda x, y: jsm.class_weights(jnp.ones(3), method="log"), ValueError, "method"),
        (lambda x, y: jsm.logit_adjust(x, jnp.ones(5)), ValueError, "class_priors"),
    ],
)
def test_bad_input_raises_at_trace_time(call, exc, match):
    x = jnp.zeros((4, 6))
    y = jnp.array([0, 1, 2, 3])
    with pytest.raises(exc, match=match):
        call(x, y)
    with pytest.raises(exc, match=match):
        jax.jit(call)(x, y)


def test_uint8_labels():
    x = jax.random.normal(jax.random.key(13), (3, 300))
    y = jnp.array([0, 255, 7], jnp.uint8)
    np.testing.assert_allclose(ce(x, y), ce(x, y.astype(jnp.int32)), rtol=1e-7)


# ------------------------------------------------------------------ BCE / focal


def test_bce_is_stable_for_large_logits():
    x = jnp.array([-200.0, -30.0, 0.0, 30.0, 200.0, jnp.inf, -jnp.inf])
    t = jnp.array([1.0, 1.0, 0.5, 0.0, 0.0, 1.0, 0.0])
    per = bce(x, t, reduction="none")
    np.testing.assert_allclose(per, [200.0, 30.0, np.log(2.0), 30.0, 200.0, 0.0, 0.0], rtol=1e-6)
    g = jax.grad(lambda x: bce(x, t))(x)
    assert np.all(np.isfinite(g))


def test_focal_values():
    x = jnp.array([[4.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    y = jnp.array([0, 1])
    p = jax.nn.softmax(x)[jnp.arange(2), y]
    want = -((1 - p) ** 2) * jnp.log(p)
    np.testing.assert_allclose(focal(x, y, reduction="none"), want, rtol=1e-5)
    alpha = jnp.array([0.25, 0.5, 1.0])
    got = focal(x, y.at[0].set(-100), alpha=alpha)
    np.testing.assert_allclose(got, 0.5 * want[1], rtol=1e-5)  # mean over non-ignored positions
    np.testing.assert_allclose(
        focal(x, y, alpha=0.25, reduction="sum"), 0.25 * want.sum(), rtol=1e-5
    )


# ------------------------------------------------------ class weights, logit adjust


def test_class_weights(x64):
    counts = jnp.array([100.0, 10.0, 1.0, 0.0])
    w = jsm.class_weights(counts, normalize=False)
    np.testing.assert_allclose(w, [0.01, 0.1, 1.0, 0.0])
    w = jsm.class_weights(counts)
    np.testing.assert_allclose(w, np.array([0.01, 0.1, 1.0, 0.0]) * 4 / 1.11, rtol=1e-12)
    w = jsm.class_weights(counts, method="inverse_sqrt", normalize=False)
    np.testing.assert_allclose(w, [0.1, 1 / np.sqrt(10), 1.0, 0.0], rtol=1e-12)
    b = 0.99
    w = jsm.class_weights(counts, method="effective_number", beta=b, normalize=False)
    want = [(1 - b) / (1 - b**n) for n in (100, 10, 1)] + [0.0]
    np.testing.assert_allclose(w, want, rtol=1e-12)
    assert np.isnan(jsm.class_weights(jnp.array([1.0, -2.0]))).all()
    with pytest.raises(ValueError, match="beta"):
        jsm.class_weights(counts, method="effective_number", beta=1.0)


def test_logit_adjust():
    z = jnp.array([[1.0, 2.0, 3.0]])
    pri = jnp.array([0.5, 0.3, 0.2])
    np.testing.assert_allclose(jsm.logit_adjust(z, pri, tau=2.0), z + 2 * jnp.log(pri), rtol=1e-6)
    x = jnp.zeros((2, 3, 4))
    out = jsm.logit_adjust(x, pri, axis=1)
    np.testing.assert_allclose(out[1, :, 2], jnp.log(pri), rtol=1e-6)
    assert jsm.logit_adjust(x.astype(jnp.bfloat16), pri, axis=1).dtype == jnp.bfloat16
    g = jax.grad(lambda t: jsm.logit_adjust(z, pri, tau=t).sum())(1.0)
    np.testing.assert_allclose(g, jnp.log(pri).sum(), rtol=1e-6)


def test_logit_adjust_gradient_in_tau_at_zero(x64):
    z = jnp.array([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    pri = jnp.array([0.5, 0.3, 0.2])
    for tau in (0.0, 1.0, -0.5):
        g = jax.grad(lambda t: jsm.logit_adjust(z, pri, tau=t).sum())(tau)
        np.testing.assert_allclose(g, 2 * jnp.log(pri).sum(), rtol=1e-12)
        check_grads(lambda t, z: jsm.logit_adjust(z, pri, tau=t), (tau, z), order=2)


def test_logit_adjust_zero_and_negative_priors():
    z = jnp.zeros((1, 3))
    pri = jnp.array([0.5, 0.5, 0.0])
    np.testing.assert_array_equal(jsm.logit_adjust(z, pri, tau=0.0), z)
    assert jsm.logit_adjust(z, pri, tau=1.0)[0, 2] == -jnp.inf
    assert jsm.logit_adjust(z, pri, tau=-1.0)[0, 2] == jnp.inf
    g = jax.grad(lambda t: jsm.logit_adjust(z, pri, tau=t)[0, :2].sum())(0.0)
    np.testing.assert_allclose(g, 2 * np.log(0.5), rtol=1e-6)
    assert np.isnan(jsm.logit_adjust(z, jnp.array([0.5, -0.1, 0.6]), tau=0.0)[0, 1])
    with pytest.raises(ValueError, match="`tau` must be finite"):
        jsm.logit_adjust(z, pri, tau=float("inf"))


# ---------------------------------------------------------- normalizer / denominator


def _den_cases():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, (4, 6)).astype(np.int32)
    y[rng.uniform(size=y.shape) < 0.3] = -100
    return jnp.asarray(rng.normal(size=(4, 6, 5)), jnp.float32), jnp.asarray(y), rng


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("sampled", [False, True])
def test_loss_denominator_is_the_mean_denominator(weighted, sampled):
    x, y, rng = _den_cases()
    w = jnp.asarray(rng.uniform(0.2, 2.0, 5), jnp.float32) if weighted else None
    sw = jnp.asarray(rng.uniform(0.0, 1.0, y.shape), jnp.float32) if sampled else None
    den = jsm.loss_denominator(y, weight=w, sample_weight=sw)
    for fn, scores in ((jsm.cross_entropy, x), (jsm.nll_loss, jax.nn.log_softmax(x))):
        kw = dict(weight=w, sample_weight=sw)
        mean = fn(scores, y, **kw)
        np.testing.assert_allclose(fn(scores, y, reduction="sum", **kw) / den, mean, rtol=1e-6)
        np.testing.assert_allclose(fn(scores, y, normalizer=den, **kw), mean, rtol=1e-6)
    if not weighted:  # focal's alpha is not a normaliser: its denominator has no weight
        focal = jsm.focal_loss(x, y, sample_weight=sw)
        np.testing.assert_allclose(
            jsm.focal_loss(x, y, sample_weight=sw, reduction="sum") / den, focal, rtol=1e-6
        )


def test_loss_denominator_bad_labels_and_edges():
    assert np.isnan(jsm.loss_denominator(jnp.array([0, -3])))
    assert np.isnan(jsm.loss_denominator(jnp.array([0, 3]), weight=jnp.ones(3)))
    assert jsm.loss_denominator(jnp.array([0, 3])) == 2.0  # C is unknown without weight
    assert jsm.loss_denominator(jnp.full((2, 3), -100)) == 0.0
    assert jsm.loss_denominator(jnp.zeros((0,), jnp.int32)) == 0.0
    assert jsm.loss_denominator(jnp.array([1, 7]), ignore_index=7) == 1.0
    with pytest.raises(TypeError, match="integers"):
        jsm.loss_denominator(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="`sample_weight`"):
        jsm.loss_denominator(jnp.array([0, 1]), sample_weight=jnp.ones(3))


def test_micro_batches_with_global_normalizer_equal_the_big_batch():
    """Mean-of-means over micro-batches with different valid counts is not the big mean;
    summing each micro-batch's loss with the global denominator is, exactly."""
    x, y, _ = _den_cases()
    y = y.at[0].set(-100).at[1, :5].set(-100)  # very different valid counts per row
    big = jsm.cross_entropy(x, y)
    parts = [(x[i], y[i]) for i in range(x.shape[0])]
    mean_of_means = sum(jsm.cross_entropy(xi, yi) for xi, yi in parts) / len(parts)
    assert abs(float(mean_of_means) - float(big)) > 1e-2
    den = sum(jsm.loss_denominator(yi) for _, yi in parts)
    exact = sum(jsm.cross_entropy(xi, yi, normalizer=den) for xi, yi in parts)
    np.testing.assert_allclose(exact, big, rtol=1e-6)
    g_big = jax.grad(lambda x: jsm.cross_entropy(x, y))(x)
    part_grad = jax.grad(lambda xi, yi: jsm.cross_entropy(xi, yi, normalizer=den))
    g_parts = jnp.stack([part_grad(xi, yi) for xi, yi in parts])
    np.testing.assert_allclose(g_parts, g_big, rtol=1e-5, atol=1e-7)


def test_label_on_neg_inf_logit_is_bad_like_a_where_mask():
    """-inf masks a class exactly as where=False does: both poison with NaN, not +inf."""
    x = jnp.array([[-jnp.inf, 1.0, 2.0], [1.0, 2.0, 3.0], [-jnp.inf, -jnp.inf, -jnp.inf]])
    y = jnp.array([0, 2, 1])
    where = jnp.isfinite(x)
    for f in (jsm.cross_entropy, jsm.focal_loss):
        per = f(x, y, reduction="none")
        assert np.isnan(per[0]) and np.isnan(per[2]) and np.isfinite(per[1])
    np.testing.assert_array_equal(
        np.isnan(jsm.cross_entropy(jnp.where(where, x, 0.0), y, where=where, reduction="none")),
        [True, False, True],
    )
    # a label on an admissible class of a partly -inf row is fine, with a finite gradient
    y_ok = jnp.array([1, 2, -100])
    np.testing.assert_allclose(
        jsm.cross_entropy(x, y_ok, reduction="none")[:2],
        [np.log1p(np.e), np.log(np.exp([1, 2, 3]).sum()) - 3],
        rtol=1e-6,
    )
    grad = jax.grad(lambda x: jsm.cross_entropy(x, y_ok))(x)
    assert np.all(np.isfinite(grad)) and np.all(grad[2] == 0)
    with pytest.raises(Exception, match=r"bad label 0 at position \(0,\)"):
        jsm.checked(lambda x, y: jsm.cross_entropy(x, y))(x, y)

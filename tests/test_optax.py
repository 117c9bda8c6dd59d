"""``jsoftmax.optax``: parity with optax where optax is finite, the limit where it is NaN.

Every parity test runs both implementations under ``jax.jit`` on the same random
inputs (every axis, tuple axes, with and without ``where``) and compares values and
vector-Jacobian products with a random cotangent: equal wherever optax's numbers are
finite, equal infinities where optax's loss is infinite, and finite where optax's
are NaN. Float64 references and hand-computed numbers pin the edge cases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import jsoftmax as jsm
from jsoftmax import optax as jox

OL = optax.losses
INF = np.inf


# --------------------------------------------------------------------------- helpers


def assert_like_optax(ours, ref, *, rtol=2e-5, atol=2e-6, is_grad=False):
    """Equal where ``ref`` is finite or +inf; never NaN where ``ref`` is NaN or -inf.

    Gradients must be finite everywhere. A value may be +inf where optax's is NaN: that
    is a genuinely infinite loss (label mass on a -inf logit) that optax also poisons
    with ``0 · -inf`` from another class. optax's -inf (an integer label on a masked
    class of an otherwise empty row) is 0 here. The float64 references pin both down.
    """
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert ours.dtype == ref.dtype, (ours.dtype, ref.dtype)
    fin = np.isfinite(ref)
    np.testing.assert_allclose(ours[fin], ref[fin], rtol=rtol, atol=atol)
    if is_grad:
        assert np.isfinite(ours).all(), ours
    else:
        pos = ref == INF
        np.testing.assert_array_equal(ours[pos], ref[pos])
        assert not np.isnan(ours[~fin]).any(), ours[~fin]


def value_and_vjp(fn, *args, argnums=(0,)):
    """jit(fn) value and the vjp of a fixed random cotangent w.r.t. ``argnums``."""

    def run(*args):
        diff = [args[i] for i in argnums]

        def f(*diff_args):
            full = list(args)
            for i, a in zip(argnums, diff_args, strict=True):
                full[i] = a
            return fn(*full)

        out, vjp = jax.vjp(f, *diff)
        ct = jax.random.uniform(jax.random.key(7), out.shape, out.dtype, 0.5, 1.5)
        return out, vjp(ct)

    return jax.jit(run)(*args)


def check_against_optax(
    ours_fn, optax_fn, *args, argnums=(0,), class_axes=None, rtol=2e-5, atol=2e-6
):
    """Values and vjps against optax; with ``class_axes``, rows whose optax value is NaN
    or -inf (meaningless there) only need finite gradients."""
    out, grads = value_and_vjp(ours_fn, *args, argnums=argnums)
    ref_out, ref_grads = value_and_vjp(optax_fn, *args, argnums=argnums)
    assert_like_optax(out, ref_out, rtol=rtol, atol=atol)
    for g, rg in zip(grads, ref_grads, strict=True):
        rg = np.array(rg)
        if class_axes is not None:
            bad = np.isnan(ref_out) | (np.asarray(ref_out) == -INF)
            rg[np.broadcast_to(np.expand_dims(bad, class_axes), rg.shape)] = np.nan
        assert_like_optax(g, rg, rtol=rtol, atol=atol, is_grad=True)
    return out, ref_out


def random_logits(rng, shape, *, neg_inf=False):
    x = rng.normal(size=shape).astype(np.float32) * 2
    if neg_inf:
        x[rng.random(shape) < 0.25] = -INF
        x.reshape(-1, shape[-1])[0] = -INF  # an all -inf (padding) slice
    return x


def batch_mask(rng, shape):
    m = rng.random(shape) < 0.75
    m.reshape(-1)[0] = False  # at least one fully masked example
    return m


# --------------------------------------------------------------- explicit numbers


def test_docstring_numbers_match_optax_and_float64():
    logits = np.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]], np.float32)
    labels = np.array([0, 1])
    onehot = np.eye(3, dtype=np.float32)[labels]
    x64 = logits.astype(np.float64)
    ref = np.log(np.exp(x64).sum(-1)) - x64[np.arange(2), labels]
    np.testing.assert_allclose(ref, [0.2761297, 2.951799], rtol=1e-6)
    for ours in (
        jox.softmax_cross_entropy(logits, onehot),
        jox.safe_softmax_cross_entropy(logits, onehot),
        jox.softmax_cross_entropy_with_integer_labels(logits, labels),
    ):
        np.testing.assert_allclose(ours, ref, rtol=1e-6)
        assert ours.dtype == jnp.float32


def test_optax_safe_softmax_cross_entropy_cases():
    # The cases of optax's own SafeSoftmaxCrossEntropyTest, with their expected numbers.
    ys = np.array(
        [[10, 1, -2], [1, 4, 0.2], [-INF, 0, 0], [-INF, 0, 0], [-INF, 0, -INF]], np.float32
    )
    ts = np.array([[0, 1, 0], [1, 0, 0], [0, 0.5, 0.5], [0.4, 0.3, 0.3], [0, 1, 0]], np.float32)
    expected = [9.00013, 3.0696733, 0.693147, INF, 0.0]
    for fn in (jox.safe_softmax_cross_entropy, jox.softmax_cross_entropy):
        np.testing.assert_allclose(jax.jit(fn)(ys, ts), expected, atol=1e-4)
        g = jax.jit(jax.grad(lambda x, fn=fn: fn(x, ts).sum()))(ys)
        assert np.isfinite(g).all()
        # d/dx = p · Σq - q; at the -inf class p = 0, so the gradient there is -q.
        np.testing.assert_allclose(g[3], [-0.4, 0.2, 0.2], atol=1e-6)


# ------------------------------------------------------- float64 numpy references


def _expand_where(where, shape, axes):
    if where is None:
        return np.ones(shape, bool)
    where = np.asarray(where)
    if where.ndim != len(shape):
        where = np.expand_dims(where, axes)
    return np.broadcast_to(where, shape)


def np_softmax_cross_entropy(x, q, axes, where):
    """The math in float64: empty rows 0, ``0 · log 0 = 0``, label mass on -inf → inf."""
    x, q = np.broadcast_arrays(np.float64(x), np.float64(q))
    incl = _expand_where(where, x.shape, axes)
    adm = incl & (x > -INF)
    m = np.max(np.where(adm, x, -INF), axis=axes, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = m + np.log(np.sum(np.where(adm, np.exp(x - m), 0.0), axis=axes, keepdims=True))
        terms = np.where(incl & (q != 0), q * (x - lse), 0.0)
    loss = -terms.sum(axis=axes)
    return np.where(adm.any(axis=axes), loss, 0.0)


def np_integer_cross_entropy(x, y, axes, where):
    x = np.float64(x)
    incl = _expand_where(where, x.shape, axes)
    batch = tuple(a for a in range(x.ndim) if a not in axes)
    flat = [x.shape[a] for a in batch] + [-1]
    x = np.transpose(x, batch + axes).reshape(flat)
    incl = np.transpose(incl, batch + axes).reshape(flat)
    adm = incl & (x > -INF)
    m = np.max(np.where(adm, x, -INF), axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    c = x.shape[-1]
    x_label = np.take_along_axis(x, (y % c)[..., None], axis=-1)[..., 0]  # -1: last class
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = m[..., 0] + np.log(np.sum(np.where(adm, np.exp(x - m), 0.0), axis=-1))
        return np.where(adm.any(axis=-1), lse - x_label, 0.0)


# ---------------------------------------------------------------- parity: softmax CE

# (shape, axis, where kind, with -inf logits); the full cross product runs under `slow`.
SOFT_CASES = [
    ((6, 5), -1, None, True),
    ((6, 5), -1, "logit", True),
    ((6, 5), -1, "example", False),
    ((6, 5), 0, "logit", True),
    ((3, 4, 5), 1, "example", True),
    ((3, 4, 5), (0, 2), "logit", True),
    ((3, 4, 5), (2, 1), "example", False),
    ((3, 4, 5), None, None, True),
]
SOFT_AXES = [((6, 5), -1), ((6, 5), 0), ((3, 4, 5), 1), ((3, 4, 5), (0, 2)), ((3, 4, 5), (2, 1))]
SOFT_SWEEP = [
    (s, a, w, n)
    for s, a in SOFT_AXES + [((3, 4, 5), None)]
    for w in (None, "logit", "example")
    for n in (False, True)
    if not (w == "example" and a is None) and (s, a, w, n) not in SOFT_CASES
]


def _soft_case(rng, shape, axis, where_kind, neg_inf):
    axes = tuple(range(len(shape))) if axis is None else axis
    axes = tuple(a % len(shape) for a in np.atleast_1d(axes))
    batch_shape = tuple(n for i, n in enumerate(shape) if i not in axes)
    x = random_logits(rng, shape, neg_inf=neg_inf)
    q = rng.random(shape).astype(np.float32)
    q = q / q.sum(axis=axes, keepdims=True)
    if neg_inf:
        # label 0 on most -inf classes (optax: NaN), label > 0 on a few (loss +inf).
        q[(x == -INF) & (rng.random(shape) < 0.8)] = 0.0
    where = None
    if where_kind == "logit":
        where = rng.random(shape) < 0.7
    elif where_kind == "example":
        where = batch_mask(rng, batch_shape)

    def ours(x, q):
        return jox.softmax_cross_entropy(x, q, axis=axis, where=where)

    def ref(x, q):
        return OL.softmax_cross_entropy(x, q, axis=axis, where=where)

    out, ref_out = check_against_optax(ours, ref, x, q, argnums=(0, 1))
    assert out.shape == batch_shape
    np.testing.assert_allclose(
        out, np_softmax_cross_entropy(x, q, axes, where), rtol=1e-5, atol=1e-6
    )
    return out, ref_out


@pytest.mark.parametrize("shape,axis,where_kind,neg_inf", SOFT_CASES)
def test_softmax_cross_entropy_matches_optax(rng, shape, axis, where_kind, neg_inf):
    out, ref_out = _soft_case(rng, shape, axis, where_kind, neg_inf)
    if neg_inf and where_kind is None:
        assert np.isnan(ref_out).any()  # the point of this module


@pytest.mark.slow
@pytest.mark.parametrize("shape,axis,where_kind,neg_inf", SOFT_SWEEP)
def test_softmax_cross_entropy_matches_optax_sweep(rng, shape, axis, where_kind, neg_inf):
    _soft_case(rng, shape, axis, where_kind, neg_inf)


def test_safe_softmax_cross_entropy_matches_optax(rng):
    x = random_logits(rng, (8, 7), neg_inf=True)
    q = rng.random((8, 7)).astype(np.float32)
    q[x == -INF] = 0.0
    q[0] = 1 / 7  # the all -inf row: optax NaN
    q /= q.sum(-1, keepdims=True)
    out, ref_out = check_against_optax(
        jox.safe_softmax_cross_entropy, OL.safe_softmax_cross_entropy, x, q, argnums=(0, 1)
    )
    assert np.isnan(ref_out[0]) and out[0] == 0.0  # the all -inf row
    np.testing.assert_allclose(
        out, np_softmax_cross_entropy(x, q, (1,), None), rtol=1e-5, atol=1e-6
    )


def test_soft_labels_broadcast_like_optax(rng):
    x = random_logits(rng, (4, 6))
    q = rng.dirichlet(np.ones(6)).astype(np.float32)  # one target for every row
    check_against_optax(jox.softmax_cross_entropy, OL.softmax_cross_entropy, x, q, argnums=(0, 1))


# ---------------------------------------------------------- parity: integer labels

INT_CASES = [
    ((6, 5), -1, None, True),
    ((6, 5), -1, "logit", True),
    ((6, 5), -1, "example", True),
    ((6, 5), 0, "logit", False),
    ((3, 4, 5), 1, "example", True),
    ((2, 3, 4, 5), (1, 3), None, False),
    ((2, 3, 4, 5), (3, 2), "logit", True),
    ((2, 3, 4, 5), (-4, -3, -1), "example", False),
]
INT_AXES = [
    ((6, 5), -1),
    ((6, 5), 0),
    ((3, 4, 5), 1),
    ((2, 3, 4, 5), (1, 3)),
    ((2, 3, 4, 5), (3, 2)),
    ((2, 3, 4, 5), (-4, -3, -1)),
]
INT_SWEEP = [
    (s, a, w, n)
    for s, a in INT_AXES
    for w in (None, "logit", "example")
    for n in (False, True)
    if (s, a, w, n) not in INT_CASES
]


def _int_case(rng, shape, axis, where_kind, neg_inf):
    axes = tuple(a % len(shape) for a in np.atleast_1d(axis))
    batch_shape = tuple(n for i, n in enumerate(shape) if i not in axes)
    n_classes = int(np.prod([shape[a] for a in axes]))
    x = random_logits(rng, shape, neg_inf=neg_inf)
    y = rng.integers(-n_classes, n_classes, size=batch_shape)  # negatives count from the end
    where = None
    if where_kind == "logit":
        where = rng.random(shape) < 0.7
    elif where_kind == "example":
        where = batch_mask(rng, batch_shape)

    def ours(x, y):
        return jox.softmax_cross_entropy_with_integer_labels(x, y, axis=axis, where=where)

    def ref(x, y):
        return OL.softmax_cross_entropy_with_integer_labels(x, y, axis=axis, where=where)

    out, ref_out = check_against_optax(ours, ref, x, y, class_axes=axes)
    assert out.shape == batch_shape
    np.testing.assert_allclose(
        out, np_integer_cross_entropy(x, y, axes, where), rtol=1e-5, atol=1e-6
    )
    return out, ref_out


@pytest.mark.parametrize("shape,axis,where_kind,neg_inf", INT_CASES)
def test_integer_labels_match_optax(rng, shape, axis, where_kind, neg_inf):
    out, ref_out = _int_case(rng, shape, axis, where_kind, neg_inf)
    if neg_inf and where_kind is None:
        assert np.isnan(ref_out).any()


@pytest.mark.slow
@pytest.mark.parametrize("shape,axis,where_kind,neg_inf", INT_SWEEP)
def test_integer_labels_match_optax_sweep(rng, shape, axis, where_kind, neg_inf):
    _int_case(rng, shape, axis, where_kind, neg_inf)


def test_integer_labels_agree_with_soft_one_hot(rng):
    x = random_logits(rng, (16, 9), neg_inf=True)
    y = rng.integers(0, 9, 16)
    y[x[np.arange(16), y] == -INF] = 0
    x[np.arange(16), 0] = 0.0  # every label class is admissible (finite loss)

    @jax.jit
    def both(x):
        hard = lambda x: jox.softmax_cross_entropy_with_integer_labels(x, y).sum()  # noqa: E731
        soft = lambda x: jox.softmax_cross_entropy(x, jax.nn.one_hot(y, 9)).sum()  # noqa: E731
        return jax.value_and_grad(hard)(x), jax.value_and_grad(soft)(x)

    (a, ga), (b, gb) = both(x)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(ga, gb, atol=1e-6)


def test_out_of_range_labels_poison_like_optax():
    x = jnp.array([[0.0, 2.0, 1.0]] * 4)
    y = jnp.array([-1, -3, 3, -100])  # -1, -3 count from the end (optax), the rest are bad
    (out, ref), (g,) = value_and_vjp(
        lambda x: jnp.stack(
            [
                jox.softmax_cross_entropy_with_integer_labels(x, y),
                jax.lax.stop_gradient(OL.softmax_cross_entropy_with_integer_labels(x, y)),
            ]
        ),
        x,
    )
    np.testing.assert_allclose(out[:2], ref[:2], rtol=1e-6)
    lse = np.log(np.exp([0.0, 2.0, 1.0]).sum())
    np.testing.assert_allclose(out[:2], [lse - 1.0, lse - 0.0], rtol=1e-6)
    assert np.isnan(out[2:]).all()  # bad input stays visible, as in optax
    assert np.isfinite(g).all()


# -------------------------------------------------------------- parity: sigmoid losses


def sigmoid_inputs(rng, shape):
    """Logits with ±inf and ±1e4; hard {0, 1} labels in the first half, soft in the rest."""
    x = (rng.normal(size=shape) * 4).astype(np.float32)
    x.reshape(-1)[:6] = [INF, -INF, INF, -INF, 1e4, -1e4]
    y = rng.random(shape).astype(np.float32)
    half = shape[0] // 2
    y[:half] = y[:half] < 0.5
    y.reshape(-1)[:6] = [1, 0, 0, 1, 1, 1]
    return x, y


def test_sigmoid_binary_cross_entropy_matches_optax(rng):
    x, y = sigmoid_inputs(rng, (8, 6))
    out, ref = check_against_optax(
        jox.sigmoid_binary_cross_entropy, OL.sigmoid_binary_cross_entropy, x, y, argnums=(0, 1)
    )
    np.testing.assert_array_equal(out.reshape(-1)[:4], [0, 0, INF, INF])
    assert np.isnan(ref.reshape(-1)[:2]).all()


@pytest.mark.parametrize("alpha,gamma", [(None, 2.0), (0.25, 0.5), (0.75, 0.0)])
def test_sigmoid_focal_loss_matches_optax(rng, alpha, gamma):
    x, y = sigmoid_inputs(rng, (8, 6))

    def ours(x, y):
        return jox.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma)

    def ref(x, y):
        return OL.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma)

    out, _ = check_against_optax(ours, ref, x, y, argnums=(0, 1), rtol=5e-5)
    np.testing.assert_array_equal(out.reshape(-1)[:4], [0, 0, INF, INF])


def test_sigmoid_losses_at_infinity_have_limit_gradients():
    x = jnp.array([INF, INF, -INF, -INF, INF])
    y = jnp.array([1.0, 0.0, 0.0, 1.0, 0.5])

    @jax.jit
    def grads(x):
        return [
            jax.grad(lambda x, f=f, kw=kw: f(x, y, **kw).sum())(x)
            for f, kw in [
                (jox.sigmoid_binary_cross_entropy, {}),
                (jox.sigmoid_focal_loss, {"alpha": 0.25}),
                (OL.sigmoid_focal_loss, {"alpha": 0.25}),
            ]
        ]

    g_bce, g_fl, g_ref = grads(x)
    np.testing.assert_array_equal(g_bce, [0, 1, 0, -1, 0.5])  # σ(x) - y
    # α_t (1 - p_t)^γ (σ(x) - y): the term with d(1 - p_t)^γ/dx vanishes at ±inf.
    np.testing.assert_allclose(g_fl, [0, 0.75, 0, -0.25, 0.5 * 0.25 * 0.5], rtol=1e-6)
    assert np.isnan(g_ref).all()  # optax: NaN for every infinite logit


# ------------------------------------------------ where optax is NaN: ours is finite

# (name, our function, args, expected loss, expected gradient w.r.t. logits)
L2 = float(np.log(2.0))
E = float(np.log1p(np.e))  # log(1 + e)
S = 1 / (1 + np.e)  # softmax([0, 1])[0]
NAN_CASES = [
    (
        "all -inf row (padding), integer label",
        jox.softmax_cross_entropy_with_integer_labels,
        OL.softmax_cross_entropy_with_integer_labels,
        ([[-INF, -INF, -INF]], [1]),
        {},
        [0.0],
        [[0, 0, 0]],
    ),
    (
        "where keeps only -inf logits",
        jox.softmax_cross_entropy_with_integer_labels,
        OL.softmax_cross_entropy_with_integer_labels,
        ([[-INF, -INF, 1.0]], [0]),
        {"where": np.array([[True, True, False]])},
        [0.0],
        [[0, 0, 0]],
    ),
    (
        "+inf logit on the label: mass split among the +inf entries",
        jox.softmax_cross_entropy_with_integer_labels,
        OL.softmax_cross_entropy_with_integer_labels,
        ([[INF, 0.0, INF]], [2]),
        {},
        [L2],
        [[0.5, 0, -0.5]],
    ),
    (
        "-inf logit with label 0 (0 log 0 = 0)",
        jox.softmax_cross_entropy,
        OL.softmax_cross_entropy,
        ([[0.0, -INF, 1.0]], [[0.5, 0.0, 0.5]]),
        {},
        [E - 0.5],
        [[S - 0.5, 0, 0.5 - S]],
    ),
    (
        "all -inf row, soft labels",
        jox.softmax_cross_entropy,
        OL.softmax_cross_entropy,
        ([[-INF, -INF, -INF]], [[0.2, 0.3, 0.5]]),
        {},
        [0.0],
        [[0, 0, 0]],
    ),
    (
        "all -inf row, safe variant",
        jox.safe_softmax_cross_entropy,
        OL.safe_softmax_cross_entropy,
        ([[-INF, -INF, -INF]], [[1.0, 0.0, 0.0]]),
        {},
        [0.0],
        [[0, 0, 0]],
    ),
    (
        "+inf logits, soft labels on them",
        jox.softmax_cross_entropy,
        OL.softmax_cross_entropy,
        ([[INF, 0.0, INF]], [[0.5, 0.0, 0.5]]),
        {},
        [L2],
        [[0, 0, 0]],
    ),
    (
        "sigmoid BCE at ±inf with the matching label",
        jox.sigmoid_binary_cross_entropy,
        OL.sigmoid_binary_cross_entropy,
        ([INF, -INF], [1.0, 0.0]),
        {},
        [0.0, 0.0],
        [0, 0],
    ),
    (
        "sigmoid focal loss at ±inf with the matching label",
        jox.sigmoid_focal_loss,
        OL.sigmoid_focal_loss,
        ([INF, -INF], [1.0, 0.0]),
        {"gamma": 0.0},
        [0.0, 0.0],
        [0, 0],
    ),
]


@pytest.mark.parametrize(
    "ours_fn,optax_fn,args,kw,loss,grad", [c[1:] for c in NAN_CASES], ids=[c[0] for c in NAN_CASES]
)
def test_finite_where_optax_is_nan(ours_fn, optax_fn, args, kw, loss, grad):
    x = jnp.asarray(args[0], jnp.float32)
    lab = jnp.asarray(args[1])

    argnums = (0, 1) if lab.dtype.kind == "f" else (0,)

    def total(fn):
        return jax.jit(jax.value_and_grad(lambda x, lab: fn(x, lab, **kw).sum(), argnums))

    ref = optax_fn(x, lab, **kw)
    ours = jax.jit(lambda x, lab: ours_fn(x, lab, **kw))(x, lab)
    # Side by side: optax's loss (or its gradient) is NaN; ours is the limit.
    ref_v, ref_g = total(optax_fn)(x, lab)
    assert np.isnan(ref).any() or np.isnan(ref_v) or np.isnan(ref_g[0]).any()
    np.testing.assert_allclose(ours, loss, atol=1e-6)
    _, grads = total(ours_fn)(x, lab)
    np.testing.assert_allclose(grads[0], grad, atol=1e-6)
    assert all(np.isfinite(g).all() for g in grads)


def test_genuinely_infinite_loss_is_inf_like_optax():
    # Label mass on a class of probability 0: +inf in math, in optax and here, while the
    # gradient stays finite and equal to optax's.
    x = jnp.array([[0.0, -INF, 1.0]])
    q = jnp.array([[0.5, 0.2, 0.3]])
    y = jnp.array([1])

    @jax.jit
    def run(x):
        fns = [
            lambda m, x: m.softmax_cross_entropy(x, q),
            lambda m, x: m.safe_softmax_cross_entropy(x, q),
            lambda m, x: m.softmax_cross_entropy_with_integer_labels(x, y),
        ]
        return [
            [jax.value_and_grad(lambda x, f=f, m=m: f(m, x).sum())(x) for m in (jox, OL)]
            for f in fns
        ]

    for (out, g), (ref, ref_g) in run(x):
        assert out == INF and ref == INF
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, ref_g, atol=1e-6)
    # d/dx = p · Σq - q, also at the -inf class (p = 0 there).
    p = np.exp([0.0, 1.0]) / np.exp([0.0, 1.0]).sum()
    np.testing.assert_allclose(run(x)[0][0][1][0], [p[0] - 0.5, -0.2, p[1] - 0.3], atol=1e-6)


def test_label_on_a_masked_class_follows_optax():
    # optax's semantics, kept: `where` removes a class from the computation. Soft labels
    # on it drop out of the sum; an integer label on it is scored with its raw logit.
    # The second row keeps only a -inf logit: it is empty (0 here; optax: -inf).
    x = jnp.array([[0.0, 2.0, 1.0], [-INF, 2.0, 1.0]])
    where = jnp.array([[True, False, True], [True, False, False]])
    q = jnp.array([[0.5, 0.2, 0.3]] * 2)
    y = jnp.array([1, 1])

    @jax.jit
    def run(x):
        return (
            jox.softmax_cross_entropy(x, q, where=where),
            jox.softmax_cross_entropy_with_integer_labels(x, y, where=where),
            OL.softmax_cross_entropy_with_integer_labels(x, y, where=where),
        )

    soft, hard, ref = run(x)
    lse = float(np.log(1 + np.e))
    np.testing.assert_allclose(soft, [0.5 * lse + 0.3 * (lse - 1.0), 0.0], rtol=1e-6)
    np.testing.assert_allclose(hard, [lse - 2.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(hard[0], ref[0], rtol=1e-6)
    assert ref[1] == -INF


# ----------------------------------------------------------------- derivatives


@pytest.mark.parametrize("name", ["soft", "integer", "integer_tuple_axes", "bce", "focal"])
def test_check_grads_second_order_both_modes(x64, rng, name):
    # Finite differences against the custom_jvp rules: first and second order, forward
    # and reverse mode, with a class mask and a zero label (the 0 · log 0 branch).
    x = rng.normal(size=(3, 5))
    q = rng.dirichlet(np.ones(5), size=3)
    q[0, 1] = 0.0
    y = np.array([0, 2, 4])
    where = rng.random((3, 5)) < 0.7
    where[:, [0, 2, 4]] = True
    z = rng.normal(size=(4, 3)) * 3
    t = rng.random((4, 3))
    fn, args = {
        "soft": (lambda x, q: jox.softmax_cross_entropy(x, q, where=where), (x, q)),
        "integer": (
            lambda x: jox.softmax_cross_entropy_with_integer_labels(x, y, where=where),
            (x,),
        ),
        "integer_tuple_axes": (
            lambda x: jox.softmax_cross_entropy_with_integer_labels(
                x.reshape(3, 1, 5), y, axis=(2, 1)
            ),
            (x,),
        ),
        "bce": (jox.sigmoid_binary_cross_entropy, (z, t)),
        "focal": (lambda z, t: jox.sigmoid_focal_loss(z, t, alpha=0.3, gamma=1.5), (z, t)),
    }[name]
    # The sigmoid losses have no custom rule (plain autodiff): first order suffices.
    order = 1 if name in ("bce", "focal") else 2
    check_grads(jax.jit(fn), args, order=order, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)


def test_hessian_finite_on_masked_and_padded_rows():
    x = jnp.array([[0.0, -INF, 1.0, 2.0], [-INF] * 4, [1.0, 2.0, 3.0, 4.0]])
    where = jnp.array([True, True, False])
    q = jnp.array([[0.5, 0.0, 0.25, 0.25]] * 3)
    y = jnp.array([0, 1, 3])
    for f in (
        lambda x: jox.softmax_cross_entropy(x, q, where=where).sum(),
        lambda x: jox.softmax_cross_entropy_with_integer_labels(x, y, where=where).sum(),
    ):
        h = jax.jit(jax.hessian(f))(x)
        assert np.isfinite(h).all()
        # Padded and masked rows contribute nothing, to any order.
        np.testing.assert_array_equal(h[1:, :, 1:, :], 0.0)


def test_jvp_matches_vjp_on_padded_batch(rng):
    x = random_logits(rng, (5, 6), neg_inf=True)
    y = rng.integers(0, 6, 5)
    t = rng.normal(size=(5, 6)).astype(np.float32)
    f = lambda x: jox.softmax_cross_entropy_with_integer_labels(x, y)  # noqa: E731
    tan = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,))[1])(x, t)
    g = jax.jit(jax.grad(lambda x: f(x).sum()))(x)
    np.testing.assert_allclose(tan, (g * t).sum(-1), rtol=1e-5, atol=1e-6)
    assert np.isfinite(tan).all()


def test_vmap_matches_batched(rng):
    x = random_logits(rng, (6, 5), neg_inf=True)
    y = rng.integers(0, 5, 6)
    q = jax.nn.one_hot(y, 5)
    for f, lab in [
        (jox.softmax_cross_entropy_with_integer_labels, y),
        (jox.softmax_cross_entropy, q),
        (jox.sigmoid_focal_loss, q),
    ]:
        both = jax.jit(lambda x, lab, f=f: (jax.vmap(f)(x, lab), f(x, lab)))
        np.testing.assert_allclose(*both(x, lab), rtol=1e-6)


# ------------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_dtypes_like_optax_and_accurate(rng, dtype):
    x32 = rng.normal(size=(8, 10)).astype(np.float32) * 3
    x = jnp.asarray(x32, dtype)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    y = rng.integers(0, 10, 8)
    q = jax.nn.one_hot(y, 10, dtype=dtype)
    ref = np.log(np.exp(x64).sum(-1)) - x64[np.arange(8), y]
    names = [
        "softmax_cross_entropy_with_integer_labels",
        "softmax_cross_entropy",
        "safe_softmax_cross_entropy",
        "sigmoid_binary_cross_entropy",
        "sigmoid_focal_loss",
    ]

    @jax.jit
    def run(x):
        outs = {}
        for name in names:
            lab = y if "integer" in name else q
            f = lambda x, name=name, lab=lab: getattr(jox, name)(x, lab)  # noqa: E731
            outs[name] = (f(x), jax.grad(lambda x, f=f: f(x).astype(jnp.float32).sum())(x))
        return outs

    outs = run(x)
    for name in names:
        lab = y if "integer" in name else q
        out, g = outs[name]
        assert out.dtype == jax.eval_shape(getattr(OL, name), x, lab).dtype == dtype
        assert g.dtype == dtype
        if name in names[:3]:
            # Accumulated in float32: only the final rounding to the half dtype remains.
            np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=1e-2, atol=1e-2)


def test_soft_labels_promote_like_optax():
    x = jnp.zeros((2, 3), jnp.bfloat16)
    q = jnp.full((2, 3), 1 / 3, jnp.float32)
    assert jox.softmax_cross_entropy(x, q).dtype == OL.softmax_cross_entropy(x, q).dtype
    np.testing.assert_allclose(jox.softmax_cross_entropy(x, q), np.log(3), rtol=1e-6)


# ------------------------------------------------------------------- bad input


def test_bad_input_raises_at_trace_time():
    x = jnp.zeros((4, 3))
    with pytest.raises(TypeError, match="logits"):
        jox.softmax_cross_entropy_with_integer_labels(
            jnp.zeros((4, 3), jnp.int32), jnp.zeros(4, int)
        )
    with pytest.raises(TypeError, match="labels"):
        jox.softmax_cross_entropy_with_integer_labels(x, jnp.zeros(4))
    with pytest.raises(ValueError, match=r"labels.*\(5,\)"):
        jox.softmax_cross_entropy_with_integer_labels(x, jnp.zeros(5, int))
    with pytest.raises(ValueError, match="axis"):
        jox.softmax_cross_entropy_with_integer_labels(x, jnp.zeros(4, int), axis=2)
    with pytest.raises(TypeError, match="axis"):
        jox.softmax_cross_entropy_with_integer_labels(x, jnp.zeros(4, int), axis=None)
    with pytest.raises(ValueError, match="where"):
        jox.softmax_cross_entropy(x, x, where=jnp.ones((4, 2), bool))
    with pytest.raises(TypeError, match="where"):
        jox.softmax_cross_entropy(x, x, where=jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="labels"):
        jox.softmax_cross_entropy(x, jnp.zeros((4, 2)))
    with pytest.raises(TypeError, match="logits"):
        jox.sigmoid_binary_cross_entropy(jnp.zeros(3, jnp.int32), jnp.zeros(3))
    with pytest.raises(TypeError, match="logits"):
        jox.sigmoid_focal_loss(jnp.zeros(3, jnp.int32), jnp.zeros(3))


def test_signatures_match_optax():
    import inspect

    for name in jox.__all__:
        ours = inspect.signature(getattr(jox, name))
        ref = inspect.signature(getattr(OL, name))
        assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == [
            (p.name, p.kind, p.default) for p in ref.parameters.values()
        ], name
    assert jsm.optax is jox


# ------------------------------------------------------------------ memory


def test_integer_labels_keep_no_class_sized_buffer():
    # value_and_grad must not hold an (N, C) one-hot or probability matrix beyond the
    # gradient it returns: XLA's temp allocation stays far below one logits-sized array.
    n, c = 256, 4096
    x = jnp.zeros((n, c))
    y = jnp.zeros(n, jnp.int32)
    f = jax.value_and_grad(lambda x, y: jox.softmax_cross_entropy_with_integer_labels(x, y).mean())
    temp = jax.jit(f).lower(x, y).compile().memory_analysis().temp_size_in_bytes
    assert temp < x.nbytes // 8, temp

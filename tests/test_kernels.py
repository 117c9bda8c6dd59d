"""Numerics of the Pallas kernels in interpreter mode (CPU), against float64 references.

Every kernel exists in two styles (Mosaic/TPU and Triton/GPU, see ``kernels/_common.py``).
On CPU the public functions run the Mosaic-style kernel in Pallas' interpreter
("mosaic" below); the Triton-style kernel is run in the interpreter through the private
``backend="gpu"`` configuration ("triton"), so both kernel bodies are checked here.
Lowering for the real platforms is checked in ``test_kernels_lowering.py``.

Shapes are small (the interpreter is slow) but always ragged against the blocks and
spanning several row and column tiles, so the online (multi-tile) paths and the edge
masks are exercised.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _references import (
    np_log_softmax,
    np_log_softmax_vjp,
    np_softmax,
    np_softmax_vjp,
    rel_err,
)

import jsoftmax as jsm
from jsoftmax import kernels as K
from jsoftmax.kernels import _common as cm
from jsoftmax.kernels import _cross_entropy as ce_mod
from jsoftmax.kernels import _linear_cross_entropy as lce_mod
from jsoftmax.kernels import _softmax as sm_mod

NEG_INF = -np.inf


# ------------------------------------------------------------------ float64 references


# (tests/_references.py; the kernels work on the last of two axes)
softmax_ref = np_softmax
log_softmax_ref = np_log_softmax
softmax_grad_ref = np_softmax_vjp
log_softmax_grad_ref = np_log_softmax_vjp


def ce_ref(z, y, g, *, ignore_index=-100, eps=0.0, lam=0.0):
    """Per-row loss and logits gradient (cotangent ``g`` per row), float64."""
    z = np.asarray(z, np.float64)
    n, c = z.shape
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    p = np.exp(z - lse[:, None])
    loss, grad = np.zeros(n), np.zeros((n, c))
    for i in range(n):
        if y[i] == ignore_index:
            continue
        if not 0 <= y[i] < c:
            loss[i], grad[i] = np.nan, np.nan
            continue
        loss[i] = (
            (1 - eps) * (lse[i] - z[i, y[i]]) + eps * (lse[i] - z[i].mean()) + lam * lse[i] ** 2
        )
        d = p[i] * (1 + 2 * lam * lse[i]) - eps / c
        d[y[i]] -= 1 - eps
        grad[i] = g[i] * d
    return loss, grad


def filter_tiles_ref(z, y, g, tiles, filter_eps, *, eps=0.0, lam=0.0, ignore_index=-100):
    """Which ``tiles = (rows, cols)`` tiles of the logits gradient the filter keeps, float64.

    A tile is kept when one of its active rows (cotangent != 0 after ignore/poison) has
    ``|p (1 + 2λ lse) - target| >= filter_eps`` in it, its label in it, or a bad label.
    """
    n, c = z.shape
    m = z.max(axis=1, keepdims=True)
    lse = m + np.log(np.exp(z - m).sum(axis=1, keepdims=True))
    target = np.full((n, c), eps / c)
    ok = (y >= 0) & (y < c)
    target[np.arange(n)[ok], y[ok]] += 1 - eps
    d = np.exp(z - lse) * (1 + 2 * lam * lse) - target
    scale = np.where(y == ignore_index, 0.0, np.where(ok, g, np.nan))
    br, bc = tiles
    keep = np.zeros((-(-n // br), -(-c // bc)), bool)
    for i in range(keep.shape[0]):
        rows = slice(i * br, (i + 1) * br)
        act = scale[rows] != 0
        for j in range(keep.shape[1]):
            big = np.abs(d[rows, j * bc : (j + 1) * bc]) >= filter_eps
            label_here = (y[rows] >= j * bc) & (y[rows] < (j + 1) * bc)
            keep[i, j] = (act[:, None] & big).any() or (act & label_here).any()
            keep[i, j] |= bool(np.isnan(scale[rows]).any())
    return keep


def lce_ref(
    h, w, b, y, g, *, vd=False, eps=0.0, lam=0.0, cap=None, ignore_index=-100, keep=None,
    tiles=None,
):  # fmt: skip
    """Loss and (d_hidden, d_weight, d_bias) of the linear cross-entropy, float64; with
    ``keep`` (flags of :func:`filter_tiles_ref` for ``tiles``) skipped tiles' gradient is 0."""
    h = np.asarray(h, np.float64)
    w = np.asarray(w, np.float64)
    wdv = w.T if vd else w
    u = h @ wdv + (0.0 if b is None else np.asarray(b, np.float64))
    z = u if cap is None else cap * np.tanh(u / cap)
    loss, dz = ce_ref(z, y, g, ignore_index=ignore_index, eps=eps, lam=lam)
    if cap is not None:
        dz = dz * (1 - (z / cap) ** 2)
    if keep is not None:
        mask = np.repeat(np.repeat(keep, tiles[0], 0), tiles[1], 1)[: z.shape[0], : z.shape[1]]
        dz = np.where(mask, dz, 0.0)
    dw = h.T @ dz
    return loss, (dz @ wdv.T, dw.T if vd else dw, dz.sum(axis=0))


# ---------------------------------------------------------------- running both styles

STYLES = ("mosaic", "triton")


def run_softmax(x, *, log, style, block_rows=None, block_cols=None):
    """The (log-)softmax kernel of one style as a function of ``x``."""
    if style == "mosaic":
        fn = K.log_softmax if log else K.softmax
        f = lambda x: fn(x, block_rows=block_rows, block_cols=block_cols)
    else:
        cfg = cm.make_config(block_rows, block_cols, interpret=True, backend="gpu")
        f = lambda x: sm_mod._softmax_vjp(x, log, cfg)
    return f


def run_ce(style, *, block_rows=None, block_cols=None, **kw):
    if style == "mosaic":
        return lambda z, y: K.cross_entropy(
            z, y, block_rows=block_rows, block_cols=block_cols, **kw
        )
    cfg = cm.make_config(block_rows, block_cols, interpret=True, backend="gpu")

    def f(z, y):
        opts = cm.LossOptions(
            z.shape[1],
            kw.get("ignore_index", -100),
            kw.get("label_smoothing", 0.0),
            kw.get("z_loss", 0.0),
        )
        return ce_mod._cross_entropy_vjp(z, y.astype(jnp.int32)[:, None], opts, cfg)[:, 0]

    return f


def run_lce(style, *, block_rows=None, block_cols=None, block_d=None, chunk_rows=None, **kw):
    """``f(h, w, b, y, sample_weight=None)`` of one style; ``chunk_rows`` (GPU style only)
    splits the tokens into several chunks at small shapes."""
    if style == "mosaic":

        def f(h, w, b, y, sample_weight=None):
            return K.linear_cross_entropy(
                h, w, y, linear_bias=b, sample_weight=sample_weight, block_rows=block_rows,
                block_cols=block_cols, block_d=block_d, **kw,
            )  # fmt: skip

        return f
    cfg = cm.make_config(block_rows, block_cols, block_d, interpret=True, backend="gpu")

    def f(h, w, b, y, sample_weight=None):
        vd = kw.get("weight_layout", "dv") == "vd"
        st = lce_mod._Options(
            loss=cm.LossOptions(
                w.shape[0] if vd else w.shape[1],
                kw.get("ignore_index", -100),
                kw.get("label_smoothing", 0.0),
                kw.get("z_loss", 0.0),
            ),
            n_rows=h.shape[0],
            hidden=h.shape[1],
            vocab_major=vd,
            softcap=kw.get("logit_softcap"),
            has_bias=b is not None,
            compute_dtype=jnp.promote_types(h.dtype, w.dtype).name,
            filter_eps=kw.get("filter_eps"),
            chunk_rows=chunk_rows,
        )
        y = y.astype(jnp.int32)[:, None]
        return lce_mod._apply(h, w, b, y, sample_weight, kw.get("reduction", "none"), st, cfg)

    return f


def fwd_bwd(f, *args, ct):
    """``(f(*args), grads for cotangent ct)`` as one jitted computation.

    One compile per check: running the vjp eagerly would compile every primitive of the
    backward (and of the pure-JAX comparisons) separately, which dominates test time.
    """

    def run(args, ct):
        out, vjp = jax.vjp(f, *args)
        return out, vjp(ct)

    return jax.jit(run)(args, ct)


# --------------------------------------------------------------- softmax / log_softmax

# (style, shape, dtype, block_rows, block_cols): ragged in both axes, several tiles each.
SOFTMAX_CASES = [
    ("mosaic", (1, 7), jnp.float32, None, None),
    ("mosaic", (3, 1000), jnp.float32, 8, 128),
    ("mosaic", (17, 4099), jnp.float32, 8, 1024),
    ("mosaic", (17, 4099), jnp.bfloat16, None, 1024),
    ("triton", (3, 1000), jnp.float32, 2, 128),
    ("triton", (17, 4099), jnp.bfloat16, 4, 1024),
]


@pytest.mark.parametrize("style,shape,dtype,block_rows,block_cols", SOFTMAX_CASES)
def test_softmax_family_values_and_grads(style, shape, dtype, block_rows, block_cols, rng):
    x = jnp.asarray(rng.normal(size=shape) * 4, dtype)
    g = jnp.asarray(rng.normal(size=shape), dtype)
    xr = np.asarray(x.astype(jnp.float32), np.float64)
    gr = np.asarray(g.astype(jnp.float32), np.float64)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    for log, vref, gref, pure in (
        (False, softmax_ref, softmax_grad_ref, jsm.softmax),
        (True, log_softmax_ref, log_softmax_grad_ref, jsm.log_softmax),
    ):
        f = run_softmax(x, log=log, style=style, block_rows=block_rows, block_cols=block_cols)
        y, (dx,) = fwd_bwd(f, x, ct=g)
        assert y.dtype == dtype and dx.dtype == dtype and y.shape == shape
        assert rel_err(y, vref(xr)) < tol
        assert rel_err(dx, gref(xr, gr)) < 5 * tol
        # Same numbers as the pure-JAX path.
        y_p, (dx_p,) = fwd_bwd(pure, x, ct=g)
        assert rel_err(y, y_p) < tol
        assert rel_err(dx, dx_p) < 5 * tol
    if shape[0] == 1:
        # Hand-checked: softmax of (0, log 3) is (1/4, 3/4).
        y = run_softmax(x, log=False, style=style)(jnp.array([[0.0, np.log(3.0)]], dtype))
        np.testing.assert_allclose(np.asarray(y), [[0.25, 0.75]], rtol=1e-6)


@pytest.mark.parametrize("style", STYLES)
def test_softmax_family_neg_inf_rows(style, rng):
    # Row 0 all -inf (empty), row 1 partly -inf, with two column tiles of 128.
    x = rng.normal(size=(9, 200)).astype(np.float32)
    x[0] = NEG_INF
    x[1, ::3] = NEG_INF
    x[5, 150:] = NEG_INF  # -inf across a whole column tile's tail
    g = rng.normal(size=x.shape).astype(np.float32)
    for log in (False, True):
        f = run_softmax(x, log=log, style=style, block_rows=8, block_cols=128)
        y, (dx,) = fwd_bwd(f, jnp.asarray(x), ct=jnp.asarray(g))
        y, dx = np.asarray(y), np.asarray(dx)
        assert not np.isnan(y).any() and np.isfinite(dx).all()
        if log:
            assert np.all(y[0] == NEG_INF) and np.all(y[1, ::3] == NEG_INF)
            np.testing.assert_allclose(dx, log_softmax_grad_ref(x, g), atol=1e-6)
        else:
            assert np.all(y[0] == 0.0) and np.all(y[1, ::3] == 0.0)
            np.testing.assert_allclose(dx, softmax_grad_ref(x, g), atol=1e-6)
        np.testing.assert_array_equal(dx[0], 0.0)
        # Same as jsoftmax's semantics for -inf.
        pure = jsm.log_softmax if log else jsm.softmax
        y_p, (dx_p,) = fwd_bwd(pure, jnp.asarray(x), ct=jnp.asarray(g))
        np.testing.assert_allclose(y, np.asarray(y_p), atol=1e-6)
        np.testing.assert_allclose(dx, np.asarray(dx_p), atol=1e-6)


def test_softmax_256k_vocab(rng):
    # A 256k vocabulary row streams through 2048-wide tiles (128 of them).
    v = 262144
    x = rng.normal(size=(2, v)).astype(np.float32) * 5
    x[1, 1000] = 60.0  # one dominant entry in the middle of the row
    g = rng.normal(size=x.shape).astype(np.float32)
    y, (dx,) = fwd_bwd(K.log_softmax, jnp.asarray(x), ct=jnp.asarray(g))
    assert rel_err(y, log_softmax_ref(x)) < 1e-6
    assert rel_err(dx, log_softmax_grad_ref(x, g)) < 1e-5
    p = K.softmax(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(p).sum(axis=1), 1.0, rtol=1e-5)
    assert float(p[1, 1000]) > 0.99


def test_softmax_float64(x64, rng):
    x = jnp.asarray(rng.normal(size=(5, 300)) * 3, jnp.float64)
    g = jnp.asarray(rng.normal(size=(5, 300)), jnp.float64)
    y, (dx,) = fwd_bwd(lambda x: K.log_softmax(x, block_cols=128), x, ct=g)
    assert y.dtype == jnp.float64
    assert rel_err(y, log_softmax_ref(x)) < 1e-13
    assert rel_err(dx, log_softmax_grad_ref(x, g)) < 1e-12


def test_softmax_under_jit_grad_and_tall_input(rng):
    # Many short rows: the row axis is the one that is tiled (and ragged).
    x = jnp.asarray(rng.normal(size=(1000, 10)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 1000))

    @jax.jit
    def loss(x):
        return -jnp.mean(jnp.take_along_axis(K.log_softmax(x), y[:, None], axis=1))

    val, grad = jax.jit(jax.value_and_grad(loss))(x)
    ref = optax.softmax_cross_entropy_with_integer_labels(x, y).mean()
    np.testing.assert_allclose(float(val), float(ref), rtol=1e-6)
    ref_grad = jax.jit(
        jax.grad(lambda x: optax.softmax_cross_entropy_with_integer_labels(x, y).mean())
    )(x)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), atol=1e-7)


# ------------------------------------------------------------------------ cross-entropy

# (style, shape, dtype, options, block_rows, block_cols)
CE_CASES = [
    ("mosaic", (1, 5), jnp.float32, {}, None, None),
    ("mosaic", (17, 300), jnp.float32, {}, 8, 128),
    ("mosaic", (17, 300), jnp.float32, dict(label_smoothing=0.1, z_loss=1e-3), 8, 128),
    ("mosaic", (6, 1000), jnp.bfloat16, dict(label_smoothing=0.2), None, 256),
    ("mosaic", (5, 40), jnp.float32, dict(ignore_index=0, z_loss=0.01), None, None),
    ("triton", (17, 300), jnp.float32, dict(label_smoothing=0.1, z_loss=1e-3), 4, 128),
    ("triton", (6, 1000), jnp.bfloat16, {}, 2, 256),
]


@pytest.mark.parametrize("style,shape,dtype,opts,block_rows,block_cols", CE_CASES)
def test_cross_entropy_values_and_grads(style, shape, dtype, opts, block_rows, block_cols, rng):
    n, c = shape
    z = jnp.asarray(rng.normal(size=shape) * 3, dtype)
    y = rng.integers(0, c, n)
    ignore = opts.get("ignore_index", -100)
    if n >= 5:
        y[1] = ignore  # ignored row: loss 0, gradient 0
        y[3] = c + 2  # out of range: NaN loss (poison), NaN gradient row
        y[4] = -7 if ignore != -7 else -8
    g = rng.normal(size=n).astype(np.float32)
    f = run_ce(style, block_rows=block_rows, block_cols=block_cols, **opts)
    loss, (dz,) = fwd_bwd(lambda z: f(z, jnp.asarray(y)), z, ct=jnp.asarray(g))
    assert loss.dtype == jnp.float32 and loss.shape == (n,) and dz.dtype == dtype
    ref_loss, ref_grad = ce_ref(
        np.asarray(z.astype(jnp.float32)),
        y,
        g,
        ignore_index=ignore,
        eps=opts.get("label_smoothing", 0.0),
        lam=opts.get("z_loss", 0.0),
    )
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(ref_loss))
    ok = ~np.isnan(ref_loss)
    np.testing.assert_allclose(np.asarray(loss)[ok], ref_loss[ok], rtol=1e-5, atol=1e-5)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert rel_err(np.asarray(dz.astype(jnp.float32))[ok], ref_grad[ok]) < tol
    assert np.isnan(np.asarray(dz.astype(jnp.float32))[~ok]).all()
    if n >= 5:
        assert float(loss[1]) == 0.0 and np.all(np.asarray(dz[1]) == 0)


def test_cross_entropy_hand_checked_and_matches_optax(rng):
    z = jnp.log(jnp.array([[1.0, 3.0], [2.0, 2.0]]))
    np.testing.assert_allclose(
        np.asarray(K.cross_entropy(z, jnp.array([1, 0]))), [-np.log(0.75), np.log(2.0)], rtol=1e-6
    )
    # Smoothing 0.5 on 2 classes: 0.75·(-log p_y) + 0.25·(-log p_other).
    np.testing.assert_allclose(
        float(K.cross_entropy(z[:1], jnp.array([1]), label_smoothing=0.5)[0]),
        -0.75 * np.log(0.75) - 0.25 * np.log(0.25),
        rtol=1e-6,
    )
    x = jnp.asarray(rng.normal(size=(33, 700)) * 2, jnp.float32)
    y = jnp.asarray(rng.integers(0, 700, 33))
    ours = jax.jit(jax.value_and_grad(lambda x: K.cross_entropy(x, y).mean()))(x)
    ref = jax.jit(
        jax.value_and_grad(lambda x: optax.softmax_cross_entropy_with_integer_labels(x, y).mean())
    )(x)
    np.testing.assert_allclose(float(ours[0]), float(ref[0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ours[1]), np.asarray(ref[1]), atol=1e-8)


@pytest.mark.parametrize("style", STYLES)
def test_cross_entropy_neg_inf_logits(style, rng):
    z = rng.normal(size=(4, 200)).astype(np.float32)
    z[0] = NEG_INF  # empty row
    z[1, 5] = NEG_INF  # the label's logit is -inf
    z[2, ::2] = NEG_INF  # masked classes, label admissible
    y = np.array([3, 5, 7, 150])
    f = run_ce(style, block_cols=128)
    loss, (dz,) = fwd_bwd(lambda z: f(z, jnp.asarray(y)), jnp.asarray(z), ct=jnp.ones(4))
    loss, dz = np.asarray(loss), np.asarray(dz)
    assert loss[0] == np.inf and loss[1] == np.inf
    zm = z[2][z[2] > NEG_INF]
    np.testing.assert_allclose(loss[2], np.log(np.exp(zm).sum()) - z[2, 7], rtol=1e-5)
    # Gradients stay finite everywhere, zero at -inf entries but the label.
    assert np.isfinite(dz).all()
    assert np.all(dz[2, ::2] == 0.0)
    np.testing.assert_allclose(dz[0], -np.eye(200)[3], atol=0)


def test_cross_entropy_256k_vocab(rng):
    v = 262144
    z = rng.normal(size=(2, v)).astype(np.float32) * 3
    y = np.array([17, v - 1])
    g = np.array([1.0, -0.5], np.float32)
    f = lambda z: K.cross_entropy(z, jnp.asarray(y), z_loss=1e-4)
    loss, (dz,) = fwd_bwd(f, jnp.asarray(z), ct=jnp.asarray(g))
    ref_loss, ref_grad = ce_ref(z, y, g, lam=1e-4)
    np.testing.assert_allclose(np.asarray(loss), ref_loss, rtol=1e-6)
    assert rel_err(dz, ref_grad) < 1e-5


# ---------------------------------------------------------------- linear cross-entropy

# (style, (N, D, V), options, blocks): ragged N, D and V against the blocks everywhere.
LCE_CASES = [
    ("mosaic", (17, 24, 300), dict(weight_layout="dv"), False, dict(block_rows=8, block_cols=128)),
    (
        "mosaic",
        (9, 40, 131),
        dict(weight_layout="vd", label_smoothing=0.1, z_loss=1e-3, logit_softcap=3.0),
        True,
        dict(block_cols=128),
    ),
    (
        "triton",
        (17, 40, 131),
        dict(weight_layout="dv", label_smoothing=0.1, logit_softcap=3.0),
        True,
        dict(block_rows=16, block_cols=64, block_d=16, chunk_rows=16),  # 2 token chunks
    ),
    (
        "triton",
        (9, 24, 100),
        dict(weight_layout="vd", z_loss=1e-3),
        False,
        dict(block_cols=32, block_d=16),
    ),
]


@pytest.mark.parametrize("style,dims,opts,with_bias,blocks", LCE_CASES)
def test_linear_cross_entropy_values_and_grads(style, dims, opts, with_bias, blocks, rng):
    n, d, v = dims
    vd = opts["weight_layout"] == "vd"
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(v, d) if vd else (d, v)) * 0.4, jnp.float32)
    b = jnp.asarray(rng.normal(size=v), jnp.float32) if with_bias else None
    y = rng.integers(0, v, n)
    y[2] = -100
    y[4] = v  # out of range
    g = rng.normal(size=n).astype(np.float32)
    f = run_lce(style, **blocks, **opts)
    loss, (dh, dw, db) = fwd_bwd(lambda h, w, b: f(h, w, b, jnp.asarray(y)), h, w, b, ct=g)
    ref_loss, (rdh, rdw, rdb) = lce_ref(
        h,
        w,
        b,
        y,
        np.where(np.arange(n) == 4, 0.0, g),  # keep the NaN row out of the parameter grads
        vd=vd,
        eps=opts.get("label_smoothing", 0.0),
        lam=opts.get("z_loss", 0.0),
        cap=opts.get("logit_softcap"),
    )
    np.testing.assert_array_equal(np.isnan(loss), np.isnan(ref_loss))
    assert np.isnan(loss[4]) and float(loss[2]) == 0.0
    ok = ~np.isnan(ref_loss)
    np.testing.assert_allclose(np.asarray(loss)[ok], ref_loss[ok], rtol=1e-5)
    # The bad-label row's gradient is NaN by design (and so are the weight gradients it
    # feeds): compare d_hidden row-wise here and the parameter gradients on a clean batch.
    assert np.isnan(np.asarray(dh)[4]).all()
    assert rel_err(np.asarray(dh)[ok], rdh[ok]) < 1e-5
    y_clean = np.where(np.arange(n) == 4, 0, y)
    _, (dh, dw, db) = fwd_bwd(lambda h, w, b: f(h, w, b, jnp.asarray(y_clean)), h, w, b, ct=g)
    _, (rdh, rdw, rdb) = lce_ref(
        h,
        w,
        b,
        y_clean,
        g,
        vd=vd,
        eps=opts.get("label_smoothing", 0.0),
        lam=opts.get("z_loss", 0.0),
        cap=opts.get("logit_softcap"),
    )
    assert dw.shape == w.shape and dw.dtype == w.dtype
    assert rel_err(dh, rdh) < 1e-5
    assert rel_err(dw, rdw) < 1e-5
    if with_bias:
        assert db.shape == (v,) and rel_err(db, rdb) < 1e-5
    else:
        assert db is None


def test_linear_cross_entropy_matches_cross_entropy_kernel_bf16(rng):
    # bf16 activations and weights (as in training): same as the logits-materialising
    # cross-entropy kernel on the float32 logits, to bf16-matmul accuracy.
    n, d, v = 12, 64, 384
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(v, d)) * 0.2, jnp.bfloat16)
    y = jnp.asarray(rng.integers(0, v, n))

    def fused(h, w):
        return K.linear_cross_entropy(h, w, y, weight_layout="vd", label_smoothing=0.1).sum()

    def unfused(h, w):
        z = jnp.dot(h, w.T, preferred_element_type=jnp.float32)
        return K.cross_entropy(z, y, label_smoothing=0.1).sum()

    (l1, (dh1, dw1)) = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(h, w)
    (l2, (dh2, dw2)) = jax.jit(jax.value_and_grad(unfused, argnums=(0, 1)))(h, w)
    assert dh1.dtype == jnp.bfloat16 and dw1.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    assert rel_err(dh1.astype(jnp.float32), dh2.astype(jnp.float32)) < 2e-2
    assert rel_err(dw1.astype(jnp.float32), dw2.astype(jnp.float32)) < 2e-2


@pytest.mark.parametrize("style", STYLES)
def test_linear_cross_entropy_mean_with_sample_weight(style, rng):
    # The scalar reductions compute their gradient in the forward (both styles): check
    # value and all four gradients (sample_weight included) against float64.
    n, d, v = 20, 24, 150
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.4, jnp.float32)
    b = jnp.asarray(rng.normal(size=v), jnp.float32)
    sw = jnp.asarray(rng.uniform(0.5, 2.0, n), jnp.float32)
    y = rng.integers(0, v, n)
    y[3] = -100
    blocks = dict(block_rows=16, block_cols=64, block_d=16, chunk_rows=16)
    f = run_lce(style, reduction="mean", z_loss=1e-3, **(blocks if style == "triton" else {}))
    loss, grads = jax.jit(
        jax.value_and_grad(lambda *a: f(*a[:3], jnp.asarray(y), a[3]), argnums=(0, 1, 2, 3))
    )(h, w, b, sw)
    rows, _ = lce_ref(h, w, b, y, np.ones(n), lam=1e-3)
    den = float(np.sum(np.where(y != -100, sw, 0.0)))
    np.testing.assert_allclose(float(loss), float(np.sum(rows * sw)) / den, rtol=1e-6)
    _, ref = lce_ref(h, w, b, y, np.asarray(sw) / den, lam=1e-3)
    d_sw = rows / den - np.where(y != -100, float(np.sum(rows * sw)) / den**2, 0.0)
    for got, want in zip(grads, (*ref, d_sw), strict=True):
        assert rel_err(got, want) < 1e-5


def _filter_problem(rng):
    """Logits with a hot vocabulary tile (columns 0-127) and cold ones, for 16 x 128 tiles.

    Row 20 (row block 1) puts all but ~1e-5 of its mass on its label 300 (tile 2): every
    entry of tile (1, 2) is below the threshold, so only the never-drop-a-label rule keeps
    it.
    Rows 0 and 35 have labels in cold tile 1; row 5 is ignored.
    """
    n, d, v = 40, 24, 400
    h = rng.normal(size=(n, d))
    w = rng.normal(size=(d, v)) * 0.1
    h[:, 0] = 0.0
    h[20, 0] = 1.0
    w[0, 300] = 27.5  # p(label) ~ 1 - 1e-5: |p - 1| below 1e-4, float32 sees it to ~1 %
    b = np.where(np.arange(v) < 128, 3.0, -8.0)
    y = rng.integers(0, 128, n)
    y[0], y[35], y[20], y[5] = 200, 150, 300, -100
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return f32(h), f32(w), f32(b), y


@pytest.mark.parametrize("style", STYLES)
def test_linear_cross_entropy_gradient_filter(style, rng):
    h, w, b, y = _filter_problem(rng)
    n = h.shape[0]
    g = rng.uniform(0.5, 1.5, n).astype(np.float32)
    # No smoothing or z-loss here: they would make the label entries' |p - target| large
    # (and the label rule invisible); their targets are in the gradient tested above.
    opts = dict(filter_eps=1e-4)
    blocks = dict(block_rows=16, block_cols=128, block_d=16)
    if style == "triton":
        blocks["chunk_rows"] = 16
    per_row = run_lce(style, **blocks, **opts)
    mean = run_lce(style, reduction="mean", **blocks, **opts)
    yj = jnp.asarray(y)

    @jax.jit
    def run(h, w, b):
        loss, vjp = jax.vjp(lambda *p: per_row(*p, yj), h, w, b)
        return loss, vjp(jnp.asarray(g)), jax.grad(lambda *p: mean(*p, yj), (0, 1, 2))(h, w, b)

    loss, grads, mean_grads = run(h, w, b)
    u = np.asarray(h, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)
    keep = filter_tiles_ref(u, y, g, (16, 128), 1e-4)
    # Hot tile 0 kept everywhere; cold tiles 1-3 skipped unless a label is there.
    expected = np.zeros((3, 4), bool)
    expected[:, 0] = True
    expected[0, 1] = expected[2, 1] = expected[1, 2] = True
    np.testing.assert_array_equal(keep, expected)
    ref_loss, ref = lce_ref(h, w, b, y, g, keep=keep, tiles=(16, 128))
    np.testing.assert_allclose(np.asarray(loss), ref_loss, rtol=1e-6, atol=1e-6)  # exact loss
    for got, want in zip(grads, ref, strict=True):
        assert rel_err(got, want) < 1e-5
    # Tile (1, 2) is kept by its label alone: its d_weight columns are row block 1's part.
    assert rel_err(grads[1][:, 256:384], ref[1][:, 256:384]) < 3e-2
    assert np.abs(ref[1][:, 256:384]).max() > 0
    assert not np.asarray(grads[1][:, 384:]).any()  # all-cold tile 3: skipped everywhere
    den = np.sum(y != -100)
    _, ref_mean = lce_ref(h, w, b, y, np.ones(n) / den, keep=keep, tiles=(16, 128))
    for got, want in zip(mean_grads, ref_mean, strict=True):
        assert rel_err(got, want) < 1e-5


def test_filter_keep_rules():
    # The tile predicate on its own: 2 rows x 4 columns, tile columns [8, 12).
    eps = 1e-3
    rule = jax.jit(lambda *a: cm.filter_keep(*a, 8, 4, eps)[0, 0])

    def keep(changes=(), labels=(0, 1), scale=(1.0, 1.0), n_valid=4):
        d = np.full((2, 4), 1e-5, np.float32)
        for (i, j), value in changes:
            d[i, j] = value
        lab = np.asarray(labels, np.int32)[:, None]
        sc = np.asarray(scale, np.float32)[:, None]
        return float(rule(d, lab, sc, np.arange(4)[None] < n_valid))

    assert keep() == 0.0
    assert keep([((1, 2), -2e-3)]) == 1.0
    assert keep([((1, 2), np.nan)]) == 1.0  # NaN is never "small"
    assert keep(labels=(9, 1)) == 1.0  # a label in the tile keeps it, its |d| small or not
    assert keep(labels=(9, 1), scale=(0.0, 1.0)) == 0.0  # ... unless its row is ignored
    assert keep([((0, 0), 1.0)], scale=(0.0, 1.0)) == 0.0  # ignored rows do not count
    assert keep(scale=(np.nan, 1.0)) == 1.0  # a poisoned row keeps every tile
    assert keep([((0, 3), 1.0)], n_valid=3) == 0.0  # padding columns do not count


# ------------------------------------------------------------------------- bad input


def test_bad_input_raises_at_trace_time():
    x = jnp.zeros((4, 10))
    with pytest.raises(ValueError, match="2-D"):
        K.softmax(jnp.zeros(10))
    with pytest.raises(TypeError, match="complex|real"):
        K.log_softmax(jnp.zeros((2, 3), jnp.complex64))
    with pytest.raises(ValueError, match="block_cols"):
        K.softmax(x, block_cols=0)
    with pytest.raises(TypeError, match="interpret"):
        K.softmax(x, interpret="yes")
    with pytest.raises(TypeError, match="labels"):
        K.cross_entropy(x, jnp.zeros(4))
    with pytest.raises(ValueError, match="labels"):
        K.cross_entropy(x, jnp.zeros(5, jnp.int32))
    with pytest.raises(ValueError, match="label_smoothing"):
        K.cross_entropy(x, jnp.zeros(4, jnp.int32), label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss"):
        K.cross_entropy(x, jnp.zeros(4, jnp.int32), z_loss=-1.0)
    h, y = jnp.zeros((4, 8)), jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match=r"weight.*\(7, 16\)"):
        K.linear_cross_entropy(h, jnp.zeros((7, 16)), y)
    with pytest.raises(ValueError, match="weight_layout"):
        K.linear_cross_entropy(h, jnp.zeros((8, 16)), y, weight_layout="kn")
    with pytest.raises(ValueError, match="bias"):
        K.linear_cross_entropy(h, jnp.zeros((8, 16)), y, linear_bias=jnp.zeros(15))
    with pytest.raises(ValueError, match="logit_softcap"):
        K.linear_cross_entropy(h, jnp.zeros((8, 16)), y, logit_softcap=0.0)


def test_linear_cross_entropy_bad_options_raise():
    h, w, y = jnp.zeros((4, 8)), jnp.zeros((8, 16)), jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match="reduction"):
        K.linear_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match=r"sample_weight.*\(4,\)"):
        K.linear_cross_entropy(h, w, y, reduction="sum", sample_weight=jnp.ones(3))
    with pytest.raises(TypeError, match="filter_eps"):
        K.linear_cross_entropy(h, w, y, filter_eps=True)
    with pytest.raises(ValueError, match="filter_eps"):
        K.linear_cross_entropy(h, w, y, filter_eps=-1e-3)
    with pytest.raises(ValueError, match="filter_eps"):
        K.linear_cross_entropy(h, w, y, filter_eps="exact")
    # GPU tiles the Triton compiler would reject are refused when the GPU kernel is
    # lowered, before Triton runs; the TPU lowering (same keywords, its own tiles) is fine.
    S = jax.ShapeDtypeStruct
    args = S((4096, 512), jnp.bfloat16), S((512, 8192), jnp.bfloat16), S((4096,), jnp.int32)

    def lower(platform, **blocks):
        f = lambda h, w, y: K.linear_cross_entropy(h, w, y, **blocks)  # noqa: E731
        return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,))

    with pytest.raises(ValueError, match=r"Triton's limit of 1048576 \(2\*\*20\)"):
        lower("cuda", block_rows=1024, block_cols=2048)
    big = dict(block_rows=256, block_cols=256, block_d=256)
    with pytest.raises(ValueError, match="shared memory.*166912-byte per-block limit of A100"):
        lower("cuda", **big)
    lower("tpu", **big)


def test_compiled_mode_is_refused_on_cpu():
    # interpret=False asks for a compiled kernel; Pallas has none for CPU and says so.
    with pytest.raises(ValueError, match="interpret mode"):
        K.softmax(jnp.zeros((2, 3)), interpret=False)


# ------------------------------------------------------------------------ slow sweeps


@pytest.mark.slow
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("shape", [(33, 8193), (129, 257), (2, 50257), (300, 3)])
def test_sweep_default_blocks(style, shape, rng):
    """Default block sizes (which differ per style) on shapes that straddle them."""
    n, c = shape
    x = rng.normal(size=shape).astype(np.float32) * 3
    g = rng.normal(size=shape).astype(np.float32)
    for log, vref, gref in (
        (False, softmax_ref, softmax_grad_ref),
        (True, log_softmax_ref, log_softmax_grad_ref),
    ):
        y, (dx,) = fwd_bwd(run_softmax(x, log=log, style=style), jnp.asarray(x), ct=jnp.asarray(g))
        assert rel_err(y, vref(x)) < 1e-5 and rel_err(dx, gref(x, g)) < 5e-5
    y = rng.integers(0, c, n)
    gl = rng.normal(size=n).astype(np.float32)
    f = run_ce(style, label_smoothing=0.05, z_loss=1e-4)
    loss, (dz,) = fwd_bwd(lambda z: f(z, jnp.asarray(y)), jnp.asarray(x), ct=jnp.asarray(gl))
    ref_loss, ref_grad = ce_ref(x, y, gl, eps=0.05, lam=1e-4)
    np.testing.assert_allclose(np.asarray(loss), ref_loss, rtol=1e-5)
    assert rel_err(dz, ref_grad) < 5e-5


@pytest.mark.slow
@pytest.mark.parametrize("style", STYLES)
def test_linear_cross_entropy_default_blocks_large_vocab(style, rng):
    n, d, v = 40, 96, 5000
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.2, jnp.float32)
    b = jnp.asarray(rng.normal(size=v), jnp.float32)
    y = rng.integers(0, v, n)
    g = rng.normal(size=n).astype(np.float32)
    f = run_lce(style, logit_softcap=10.0, label_smoothing=0.1)
    loss, grads = fwd_bwd(lambda h, w, b: f(h, w, b, jnp.asarray(y)), h, w, b, ct=g)
    ref_loss, ref_grads = lce_ref(h, w, b, y, g, eps=0.1, cap=10.0)
    np.testing.assert_allclose(np.asarray(loss), ref_loss, rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        assert rel_err(got, want) < 1e-5

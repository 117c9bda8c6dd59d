"""Gradient filtering (``filter_eps``) and ``vocab_order`` of jsoftmax/_large_vocab/_filter.py.

The documented rule, checked here against a float64 reference that materialises the
logits: a ``(rows, chunk)`` tile of the logits gradient ``dz`` may lose its
``d_hidden``/``d_weight`` contributions only when every active token ``i`` of it has
``|dz_ic| < filter_eps·T_i`` (``T_i`` the token's target mass: its label and smoothing
cotangents) and no label in the chunk. So each dropped element is below
``filter_eps·T_i`` and ``|Δd_hidden_ik| <= filter_eps·T_i·Σ_{c dropped} |W_kc|``,
``|Δd_weight_kc| <= filter_eps·Σ_i T_i |h_ik|`` over the tokens dropped from column ``c``;
the loss value never changes.
"""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _references import np_cross_entropy, sum_tol, unit_roundoff
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jsoftmax as jsm
from jsoftmax import _compat
from jsoftmax._bench import lm_head_inputs
from jsoftmax._large_vocab import _filter as lv_filter

lce = jsm.linear_cross_entropy
ROWS, CHUNK = 32, 128  # filter tile of these tests


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(lv_filter, "FILTER_ROWS", ROWS)


@pytest.fixture(scope="module")
def lm():
    """A small LM-like head (Zipfian unigram bias, context mixture), frequency-sorted."""
    h, w, y, b, order = lm_head_inputs(256, 32, 2048, seed=1)
    inv = np.argsort(np.asarray(order))
    # Positions in the sorted vocabulary, so that tests can work without vocab_order.
    return h, w, jnp.asarray(inv[np.asarray(y)], jnp.int32), b[order]


def exact_logit_grad(h, w, y, b, opts):
    """float64 numpy ``dz = ∂loss/∂(h W + b)`` (before the soft cap), ``T_i``, and ``|dz|``'s parts.

    Written from the formula (``np_cross_entropy`` in tests/_references.py), no jsoftmax.
    """
    h, w, b = (np.asarray(a, np.float64) for a in (h, w, b))
    z = h @ w + b
    cap = opts.get("logit_softcap")
    zc = z if cap is None else cap * np.tanh(z / cap)
    kw = {k: opts[k] for k in ("weight", "sample_weight", "label_smoothing", "z_loss",
                                "reduction") if k in opts}  # fmt: skip
    _, dz = np_cross_entropy(zc, np.asarray(y), **kw)
    if cap is not None:
        dz = dz * (1 - np.tanh(z / cap) ** 2)
    n, v = z.shape
    eps = opts.get("label_smoothing", 0.0)
    cw = np.ones(v) if opts.get("weight") is None else np.asarray(opts["weight"], np.float64)
    sw = np.ones(n) if opts.get("sample_weight") is None else np.asarray(opts["sample_weight"])
    y = np.asarray(y)
    w_y = cw[y] * sw
    den = w_y.sum() if opts.get("reduction", "mean") == "mean" else 1.0
    unit = (w_y * (1 - eps) + sw * eps / v * np.abs(cw).sum()) / den
    # The size of dz's parts before they cancel (p_y - 1 near 0 is computed from p_y ~ 1):
    # what dz's rounding error is relative to (see `rounding`).
    p = np.exp(zc - zc.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.arange(v)[None, :] == y[:, None]
    mag = np.abs(dz) + np.abs(unit)[:, None] * (p + onehot)
    return dz, unit, mag


def exact_grads(dz, h, w):
    """float64 ``d_hidden``, ``d_weight``, ``d_bias`` from the logits' gradient (chain rule)."""
    h, w = np.asarray(h, np.float64), np.asarray(w, np.float64)
    return dz @ w.T, h.T @ dz, dz.sum(0)


def rounding(mag, h, w, dtype=np.float32):
    """Per-entry rounding allowance of the computed gradients against ``exact_grads``.

    Each entry is a sum of products ``dz_ic·W_kc`` (over the V classes) or ``h_ik·dz_ic``
    (over the N tokens), accumulated in float32: ``γ_n·Σ|terms|`` with n the sum's length,
    plus dz's own float32 error, relative to the size of its parts ``mag`` (its logits a
    D-term matmul, its normaliser a V-term sum), so γ over V + D + the sum's length.
    bfloat16 inputs: dz is rounded to bfloat16 before the matmuls (u per term) and the
    result once more on output (one ulp, 2u).
    """
    n, v, d = mag.shape[0], mag.shape[1], np.shape(h)[1]
    adz = mag
    ah, aw = np.abs(np.asarray(h, np.float64)), np.abs(np.asarray(w, np.float64))
    terms = (adz @ aw.T, ah.T @ adz, adz.sum(0))
    rel = [sum_tol(v + d + v), sum_tol(v + d + n), sum_tol(v + d + n)]
    if np.dtype(dtype).itemsize < 4:
        rel = [r + 3 * unit_roundoff(dtype) for r in rel]
    return [r * t for r, t in zip(rel, terms, strict=True)]


def skippable_tiles(dz, unit, y, eps, rows=ROWS, chunk=CHUNK):
    """The documented rule on the float64 reference: a bool (row blocks, chunks) map."""
    n, v = dz.shape
    nb, nc = -(-n // rows), -(-v // chunk)
    ok = np.zeros((nb, nc), bool)
    for r in range(nb):
        rs = slice(r * rows, (r + 1) * rows)
        act = unit[rs] != 0
        for c in range(nc):
            cs = slice(c * chunk, (c + 1) * chunk)
            small = np.all(np.abs(dz[rs, cs]) < eps * unit[rs, None], axis=1) | ~act
            label = act & (y[rs] >= c * chunk) & (y[rs] < (c + 1) * chunk)
            ok[r, c] = np.all(small & ~label)
    return ok


def bound(w, h, unit, ok, eps, rows=ROWS, chunk=CHUNK):
    """Per-element bounds on ``|Δd_hidden|``, ``|Δd_weight|``, ``|Δd_bias|`` (skippable tiles)."""
    n, v = h.shape[0], w.shape[1]
    drop = np.repeat(np.repeat(ok, rows, 0), chunk, 1)[:n, :v].astype(np.float64)
    aw, ah = np.abs(np.asarray(w, np.float64)), np.abs(np.asarray(h, np.float64))
    bh = eps * unit[:, None] * (drop @ aw.T)  # (n, D)
    bw = eps * (ah.T * unit[None, :]) @ drop  # (D, V)
    bb = eps * unit @ drop  # (V,)
    return bh, bw, bb


def grads(h, w, y, b, filter_eps, **opts):
    def loss(h, w, b):
        out = lce(h, w, y, linear_bias=b, chunk_size=CHUNK, filter_eps=filter_eps, **opts)
        return out.sum() if out.ndim else out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(h, w, b)


def assert_within(got, exact, allowed, what):
    err = np.abs(np.asarray(got, np.float64) - exact)
    worst = np.unravel_index(np.argmax(err - allowed), err.shape)
    assert np.all(err <= allowed), (
        f"{what}: |error| {err[worst]:.3g} > allowed {allowed[worst]:.3g} at {worst} "
        f"(exact {exact[worst]:.3g}, max |exact| {np.abs(exact).max():.3g})"
    )


def check_against_exact(h, w, y, b, opts, eps, g0, g1):
    """Unfiltered ``g0``: exact up to rounding; filtered ``g1``: within the documented bound.

    Returns the skippable-tile map of the reference.
    """
    dz, unit, mag = exact_logit_grad(h, w, y, b, opts)
    ok = skippable_tiles(dz, unit, np.asarray(y), eps)
    exact = exact_grads(dz, h, w)
    rnd = rounding(mag, h, w)
    bounds = bound(w, h, unit, ok, eps)
    for name, a, c, e, r, bd in zip(("d_hidden", "d_weight", "d_bias"), g0, g1, exact, rnd,
                                    bounds, strict=False):  # fmt: skip
        assert_within(a, e, r, f"unfiltered {name}")
        assert_within(c, e, bd + r, f"filtered {name}")
    return ok


OPTIONS = {
    "plain": dict(),
    "smoothing": dict(label_smoothing=0.05),
    "zloss-softcap": dict(z_loss=1e-3, logit_softcap=15.0),
    "class-sample-weights-sum": dict(weight="c", sample_weight="s", reduction="sum"),
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_filtered_gradients_within_bound_loss_identical(name, lm):
    h, w, y, b = lm
    opts = dict(OPTIONS[name])
    n, v = h.shape[0], w.shape[1]
    if opts.get("weight") == "c":
        opts["weight"] = jnp.linspace(0.5, 2.0, v)
        opts["sample_weight"] = jnp.linspace(0.2, 1.5, n)
    eps = 2.0**-10
    val0, g0 = grads(h, w, y, b, None, **opts)
    val1, g1 = grads(h, w, y, b, eps, **opts)
    assert np.array_equal(val0, val1)  # the value is never touched
    ok = check_against_exact(h, w, y, b, opts, eps, g0, g1)
    assert ok.mean() > 0.1, ok.mean()  # the case has something to skip
    for a, c in zip(g0, g1, strict=True):  # and filtering did drop something
        assert np.abs(np.asarray(c) - np.asarray(a)).max() > 0


def test_zero_threshold_is_exact(lm):
    h, w, y, b = lm
    val0, g0 = grads(h, w, y, b, None, label_smoothing=0.1, z_loss=1e-3)
    val1, g1 = grads(h, w, y, b, 0.0, label_smoothing=0.1, z_loss=1e-3)
    assert np.array_equal(val0, val1)
    for a, c in zip(g0, g1, strict=True):
        np.testing.assert_array_equal(a, c)


def test_smoothing_target_above_threshold_skips_nothing(lm):
    # Every class carries eps_smooth / V = 0.5 / 2048 = 2^-12 in its target: with a
    # threshold below that, no tile can be dropped and the gradients are exact.
    h, w, y, b = lm
    _, g0 = grads(h, w, y, b, None, label_smoothing=0.5)
    _, g1 = grads(h, w, y, b, 2.0**-13, label_smoothing=0.5)
    for a, c in zip(g0, g1, strict=True):
        np.testing.assert_array_equal(a, c)
    _, g2 = grads(h, w, y, b, 2.0**-10, label_smoothing=0.5)
    assert not np.array_equal(g0[1], g2[1])  # above it, tiles go


def test_label_in_negligible_tile_is_never_skipped():
    rng = np.random.default_rng(0)
    n, d, v = 64, 16, 512
    h = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, v)).astype(np.float32) * 0.1
    b = np.full((v,), -40.0, np.float32)
    b[:CHUNK] = 0.0  # all the mass in the first chunk: every other tile is negligible
    y = rng.integers(0, CHUNK, size=n).astype(np.int32)
    y[5] = 3 * CHUNK + 7  # a label with p ~ e^-40 in an otherwise skippable tile
    eps = 2.0**-12
    _, g0 = grads(h, w, jnp.asarray(y), b, None)
    _, g1 = grads(h, w, jnp.asarray(y), b, eps)
    dz, _, mag = exact_logit_grad(h, w, y, b, {})
    (_, dw, _), (rh, rw, _) = exact_grads(dz, h, w), rounding(mag, h, w)
    assert np.abs(dw[:, y[5]]).max() > 1e-3
    # The label's column and row are exact (up to rounding), filtered or not.
    for g in (g0, g1):
        assert_within(g[1][:, y[5]], dw[:, y[5]], rw[:, y[5]], "d_weight of the label")
        assert_within(g[0][5], exact_grads(dz, h, w)[0][5], rh[5], "d_hidden of its token")


def test_bad_label_is_poisoned_not_skipped(lm):
    h, w, y, b = lm
    y = y.at[3].set(5000)
    val, (dh, dw, _) = grads(h, w, y, b, 2.0**-10, reduction="none")
    assert np.isnan(val)
    assert np.all(np.isnan(dh[3])) and np.all(np.isfinite(dh[ROWS:]))
    assert np.all(np.isnan(dw))


def test_all_ignored_batch_is_zero_not_nan(lm):
    h, w, y, b = lm
    val, (dh, dw, db) = grads(h, w, jnp.full_like(y, -100), b, 2.0**-12)
    assert float(val) == 0.0
    for g in (dh, dw, db):
        assert np.all(g == 0)


def test_vmap_and_stats(lm):
    h, w, y, b = lm
    hb = jnp.stack([h[:128], h[128:]])
    yb = jnp.stack([y[:128], y[128:]])
    eps = 2.0**-12

    def f(fe):
        def loss(hb, w):
            per = jax.vmap(lambda h, y: lce(h, w, y, linear_bias=b, filter_eps=fe))(hb, yb)
            return per.sum()

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(hb, w)

    (v0, g0), (v1, g1) = f(None), f(eps)
    assert np.array_equal(v0, v1)
    # Each batch entry is a mean over its 128 tokens (T_i = 1/128); float64 reference of
    # the sum of the two means. The documented bound, with every token allowed to drop:
    # |Δd_weight_kc| < filter_eps·Σ_i T_i·|h_ik| (about 1e-3 here, against entries of 0.1).
    dz, _, mag = (np.concatenate(a) for a in zip(*(exact_logit_grad(hb[i], w, yb[i], b, {})
                                                  for i in range(2)), strict=True))  # fmt: skip
    _, dw, _ = exact_grads(dz, h, w)
    _, rw, _ = rounding(mag, h, w)
    bw = eps * np.abs(np.asarray(h, np.float64)).sum(0)[:, None] / 128
    assert bw.max() < 0.02 * np.abs(dw).max()  # the check has teeth
    assert_within(g0[1], dw, rw, "unfiltered d_weight")
    assert_within(g1[1], dw, bw + rw, "filtered d_weight")

    def rl(fe):
        def obj(h, w):
            s = jsm.linear_softmax_stats(h, w, y, linear_bias=b, chunk_size=CHUNK, filter_eps=fe)
            return jnp.sum(s.label_logprob) + 0.01 * jnp.sum(s.entropy)

        return jax.jit(jax.value_and_grad(obj, argnums=(0, 1)))(h, w)

    def rl_exact(h, w):  # float64, plain jax.nn on the materialised logits
        lp = jax.nn.log_softmax(h @ w + b.astype(jnp.float64))
        ent = -jnp.sum(jnp.exp(lp) * lp, axis=-1)
        return jnp.sum(jnp.take_along_axis(lp, y[:, None], -1)) + 0.01 * jnp.sum(ent)

    (v0, g0), (v1, g1) = rl(None), rl(eps)
    assert np.array_equal(v0, v1)
    assert not np.array_equal(g0[1], g1[1])
    with _compat.enable_x64(True):
        h64, w64 = (jnp.asarray(a, jnp.float64) for a in (h, w))
        ev, (eh, ew) = jax.value_and_grad(rl_exact, argnums=(0, 1))(h64, w64)
        # The same chain rule on dz = ∂obj/∂z, for the rounding allowance.
        dz = np.asarray(jax.grad(lambda z: rl_exact_z(z, y))(h64 @ w64 + b.astype(jnp.float64)))
    eh, ew = np.asarray(eh), np.asarray(ew)
    np.testing.assert_allclose(v0, ev, rtol=sum_tol(w.shape[1] + h.shape[1]) * 4)
    _, _, mag = exact_logit_grad(h, w, y, b, {})  # p + onehot: the parts' scale
    rh, rw, _ = rounding(np.abs(dz) + 1.01 * mag, h, w)
    # T_i = 1 + 0.01 here; the dropped elements are < 2^-12·T_i each.
    bh = eps * 1.01 * np.abs(np.asarray(w, np.float64)).sum(axis=1)[None, :]
    bw = eps * 1.01 * np.abs(np.asarray(h, np.float64)).sum(0)[:, None]
    for g, e, r, bd, what in ((g0[0], eh, rh, 0, "d_hidden"), (g0[1], ew, rw, 0, "d_weight"),
                              (g1[0], eh, rh, bh, "filtered d_hidden"),
                              (g1[1], ew, rw, bw, "filtered d_weight")):  # fmt: skip
        assert_within(g, e, bd + r, what)


def rl_exact_z(z, y):
    lp = jax.nn.log_softmax(z)
    ent = -jnp.sum(jnp.exp(lp) * lp, axis=-1)
    return jnp.sum(jnp.take_along_axis(lp, y[:, None], -1)) + 0.01 * jnp.sum(ent)


def test_vocab_parallel(lm):
    h, w, y, b = lm
    shards = 4
    mesh = Mesh(np.array(jax.devices()[:shards]), ("v",))
    eps = 2.0**-10

    def run(fe):
        def loss(h, w, b):
            f = lambda h, w, b, y: lce(  # noqa: E731
                h, w, y, linear_bias=b, chunk_size=CHUNK, axis_name="v", filter_eps=fe,
                label_smoothing=0.01,
            )  # fmt: skip
            return jax.shard_map(
                f, mesh=mesh, in_specs=(P(), P(None, "v"), P("v"), P()), out_specs=P()
            )(h, w, b, y)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(h, w, b)

    (v0, g0), (v1, g1) = run(None), run(eps)
    np.testing.assert_allclose(v1, v0, rtol=sum_tol(w.shape[1]))  # psum order
    # Shard boundaries are chunk boundaries (2048 / 4 = 4 chunks each): same tiles.
    check_against_exact(h, w, y, b, dict(label_smoothing=0.01), eps, g0[:2], g1[:2])
    assert np.abs(np.asarray(g1[1]) - np.asarray(g0[1])).max() > 0


# ------------------------------------------------------------------ vocabulary order


def test_vocab_order_keeps_caller_ids():
    rng = np.random.default_rng(3)
    n, d, v = 16, 8, 300
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    y = jnp.asarray(rng.integers(0, v, size=n), jnp.int32).at[2].set(-100)
    b = jnp.asarray(rng.normal(size=(v,)), jnp.float32)
    cw = jnp.linspace(0.5, 2.0, v)
    counts = jnp.asarray(rng.integers(0, 1000, size=v))
    order = jsm.vocab_order_from_counts(counts)
    assert np.all(np.diff(np.asarray(counts)[np.asarray(order)]) <= 0)
    ws = w[:, order]  # stored permuted once
    opts = dict(weight=cw, label_smoothing=0.1, reduction="none")

    def f(w, b, **kw):
        return jnp.sum(jnp.arange(n) * lce(h, w, y, linear_bias=b, **opts, **kw))

    v0, (dw0, db0) = jax.value_and_grad(f, argnums=(0, 1))(w, b)
    v1, (dw1, db1) = jax.value_and_grad(f, argnums=(0, 1))(ws, b, vocab_order=order)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    np.testing.assert_allclose(dw1, dw0[:, order], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(db1, db0, rtol=1e-5, atol=1e-7)  # caller ids
    s0 = jsm.linear_softmax_stats(h, w, y, linear_bias=b, top_k=4)
    s1 = jsm.linear_softmax_stats(h, ws, y, linear_bias=b, top_k=4, vocab_order=order)
    np.testing.assert_array_equal(s1.argmax, s0.argmax)
    np.testing.assert_array_equal(s1.topk_indices, s0.topk_indices)
    np.testing.assert_array_equal(s1.correct, s0.correct)
    np.testing.assert_allclose(s1.label_logprob, s0.label_logprob, rtol=1e-5)
    # Not a permutation: poison, like an out-of-range label.
    bad = order.at[0].set(order[1])
    assert np.isnan(lce(h, ws, y, vocab_order=bad))


def test_bad_static_inputs():
    h, w, y = jnp.ones((4, 3)), jnp.ones((3, 10)), jnp.zeros((4,), jnp.int32)
    with pytest.raises(ValueError, match="filter_eps"):
        lce(h, w, y, filter_eps="exact")
    with pytest.raises(TypeError, match="filter_eps"):
        lce(h, w, y, filter_eps=True)
    with pytest.raises(ValueError, match="filter_eps"):
        jsm.linear_softmax_stats(h, w, filter_eps=-1.0)
    with pytest.raises(ValueError, match="vocab_order"):
        lce(h, w, y, vocab_order=jnp.arange(9))
    with pytest.raises(TypeError, match="vocab_order"):
        lce(h, w, y, vocab_order=jnp.arange(10.0))
    with pytest.raises(ValueError, match="ignore_index"):
        lce(h, w, y, vocab_order=jnp.arange(10), ignore_index=3)


# --------------------------------------------------------------- the kernels' route


def test_pallas_route_filters_too(monkeypatch):
    from jsoftmax import kernels

    seen = []
    kernel = kernels.linear_cross_entropy

    def spy(*args, **kw):
        seen.append(kw.get("filter_eps"))
        return kernel(*args, **kw)

    monkeypatch.setattr(kernels, "linear_cross_entropy", spy)
    rng = np.random.default_rng(5)
    n, d, v = 16, 16, 512
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.1, jnp.float32)
    b = np.full((v,), -30.0, np.float32)
    b[:128] = 0.0
    y = jnp.asarray(rng.integers(0, 128, size=n), jnp.int32)

    def run(fe):
        def loss(h, w):
            return lce(h, w, y, linear_bias=b, impl="pallas", filter_eps=fe)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(h, w)

    (v0, g0), (v1, g1) = run(None), run(2.0**-12)
    assert seen == [None, 2.0**-12]  # the option reaches the kernel
    assert np.array_equal(v0, v1)
    # Every dropped element is ~e^-30 / n: the gradients are exact up to rounding, and
    # equally so with and without filtering.
    dz, _, mag = exact_logit_grad(h, w, y, b, {})
    for g in (g0, g1):
        for a, e, r, what in zip(g, exact_grads(dz, h, w), rounding(mag, h, w), "hw",
                                 strict=False):  # fmt: skip
            assert_within(a, e, r + 1e-12, f"d_{what}")


def test_bfloat16_auto(lm):
    from jsoftmax import _validate

    assert _validate.filter_eps("auto", jnp.bfloat16) == 2.0**-12
    assert _validate.filter_eps("auto", jnp.float32) == 2.0**-28
    h, w, y, b = lm
    hb, wb = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)

    def run(fe):
        def loss(h, w):
            return lce(h, w, y, linear_bias=b, chunk_size=CHUNK, filter_eps=fe)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(hb, wb)

    eps = 2.0**-10  # this small head has little below "auto"'s 2^-12
    (v0, (dh0, dw0)), (v1, (dh1, dw1)) = run(None), run(eps)
    assert v1.dtype == jnp.float32 and np.array_equal(v0, v1)
    assert dh1.dtype == jnp.bfloat16 and dw1.dtype == jnp.bfloat16
    assert not np.array_equal(dw0, dw1)
    h32, w32 = hb.astype(jnp.float32), wb.astype(jnp.float32)  # the inputs as rounded
    dz, unit, mag = exact_logit_grad(h32, w32, y, b, {})
    ok = skippable_tiles(dz, unit, np.asarray(y), eps)
    exact = exact_grads(dz, h32, w32)
    rnd = rounding(mag, h32, w32, jnp.bfloat16)
    bounds = bound(w32, h32, unit, ok, eps)
    for what, a, c, e, r, bd in zip("hw", (dh0, dw0), (dh1, dw1), exact, rnd, bounds,
                                    strict=False):  # fmt: skip
        assert_within(a, e, r, f"unfiltered d_{what}")
        assert_within(c, e, bd + r, f"filtered d_{what}")


@pytest.mark.slow
@hypothesis.settings(max_examples=6, deadline=None)
@hypothesis.given(
    scale=st.floats(0.5, 2.0),
    log2_eps=st.integers(-16, -6),
    smoothing=st.sampled_from([0.0, 1e-6]),
    seed=st.integers(0, 2**16),
)
def test_bound_holds_for_random_heads(scale, log2_eps, smoothing, seed):
    rng = np.random.default_rng(seed)
    n, d, v = 64, 8, 512
    h = jnp.asarray(rng.normal(size=(n, d)) * scale, jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    # Sorted-like: rarer to the right, the last chunks below e^-30 of the first whatever
    # the draw (|h W| <= 2·sqrt(8)·~4 < 30), so every example has tiles to skip.
    b = jnp.asarray(-np.linspace(0.0, 60.0, v), jnp.float32)
    y = jnp.asarray(rng.integers(0, v // 4, size=n), jnp.int32)
    eps, opts = 2.0**log2_eps, dict(label_smoothing=smoothing)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lv_filter, "FILTER_ROWS", ROWS)
        val0, g0 = grads(h, w, y, b, None, **opts)
        val1, g1 = grads(h, w, y, b, eps, **opts)
    assert np.array_equal(val0, val1)
    ok = check_against_exact(h, w, y, b, opts, eps, g0, g1)
    assert ok.any()  # the reference has skippable tiles ...
    assert np.abs(np.asarray(g1[1]) - np.asarray(g0[1])).max() > 0  # ... and they went

"""Tests for jsoftmax/_large_vocab/: linear_cross_entropy without materialised logits.

Every check compares against a float64 reference that *does* materialise the logits
(``hidden @ weight + bias``) and applies the documented cross-entropy formulas directly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _references import assert_memory_fraction, load_golden, ref_cross_entropy, rel_err, temp_bytes

import jsoftmax as jsm
from jsoftmax import _compat

lce = jsm.linear_cross_entropy


# ------------------------------------------------------------------------- reference


def reference(
    hidden,
    linear_weight,
    labels,
    *,
    linear_bias=None,
    weight_layout="dv",
    weight=None,
    sample_weight=None,
    ignore_index=-100,
    label_smoothing=0.0,
    z_loss=0.0,
    logit_softcap=None,
    reduction="mean",
):
    """``ref_cross_entropy`` (the documented formulas) on the materialised, soft-capped logits."""
    w = linear_weight if weight_layout == "dv" else linear_weight.T
    z = hidden @ w
    if linear_bias is not None:
        z = z + linear_bias
    if logit_softcap is not None:
        z = logit_softcap * jnp.tanh(z / logit_softcap)
    return ref_cross_entropy(
        z,
        labels,
        weight=weight,
        sample_weight=sample_weight,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        reduction=reduction,
    )


def numpy_reference(hidden, weight, labels, *, ignore_index=-100, reduction="mean"):
    """Plain-numpy float64 value (no JAX at all) for the simplest configuration."""
    z = np.asarray(hidden, np.float64) @ np.asarray(weight, np.float64)
    m = z.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
    y = np.asarray(labels)
    keep = y != ignore_index
    zy = np.take_along_axis(z, np.where(keep, y, 0)[..., None], -1)[..., 0]
    per = np.where(keep, lse - zy, 0.0)
    return per if reduction == "none" else per.sum() / max(keep.sum(), 1)


def make_case(rng, *, lead=(13,), d=8, v=50, layout="dv", ignore_frac=0.2, dtype=np.float64):
    hidden = rng.normal(size=(*lead, d))
    weight = rng.normal(size=(d, v) if layout == "dv" else (v, d)) / np.sqrt(d) * 2
    labels = rng.integers(0, v, size=lead)
    labels = np.where(rng.uniform(size=lead) < ignore_frac, -100, labels)
    return hidden.astype(dtype), weight.astype(dtype), labels.astype(np.int32)


# --------------------------------------------------------------- small explicit numbers


def test_hand_computed_value():
    h = jnp.array([[1.0, -1.0], [0.5, 2.0]])
    w = jnp.array([[1.0, 0.0, -1.0], [0.0, 1.0, 2.0]])
    y = jnp.array([0, 2])
    # logits [[1, -1, -3], [0.5, 2, 3.5]]: token 0 loses log(1 + e^-2 + e^-4),
    # token 1 loses log(e^-3 + e^-1.5 + 1).
    expected = (np.log1p(np.exp(-2) + np.exp(-4)) + np.log1p(np.exp(-3) + np.exp(-1.5))) / 2
    np.testing.assert_allclose(lce(h, w, y), expected, rtol=1e-6)
    np.testing.assert_allclose(lce(h, w.T, y, weight_layout="vd"), expected, rtol=1e-6)
    np.testing.assert_allclose(lce(h, w, y), 0.192122, atol=1e-6)
    np.testing.assert_allclose(
        lce(h, w, y, reduction="none"), numpy_reference(h, w, y, reduction="none"), rtol=1e-6
    )


def test_matches_numpy_reference_f32(rng):
    h, w, y = make_case(rng, lead=(40,), d=16, v=300, dtype=np.float32)
    got = jax.jit(lambda h, w: lce(h, w, y, chunk_size=64))(h, w)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, numpy_reference(h, w, y), rtol=2e-6)


# ------------------------------------------------------------- randomized option grid


def _grid(n_cases=14, seed=1234):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n_cases):
        v = int(rng.choice([37, 64, 130, 257]))
        cases.append(
            dict(
                lead=[(11,), (3, 5), (2, 2, 4), (1,)][i % 4],
                d=int(rng.choice([4, 8, 16])),
                v=v,
                # Chunks that do not divide V (ragged last chunk) and one that covers V.
                chunk_size=int(rng.choice([16, 24, 64, 1000])),
                layout=["dv", "vd"][i % 2],
                linear_bias=bool(rng.uniform() < 0.5),
                weight=bool(rng.uniform() < 0.4),
                sample_weight=bool(rng.uniform() < 0.4),
                label_smoothing=float(rng.choice([0.0, 0.0, 0.1, 0.3])),
                z_loss=float(rng.choice([0.0, 0.0, 1e-2])),
                logit_softcap=[None, None, 3.0][i % 3],
                reduction=["mean", "sum", "none"][i % 3],
                ignore_index=int(rng.choice([-100, 0])),
                # Cases 3 and 5 ("mean", "none"): every token ignored.
                ignore_frac=1.0 if i in (3, 5) else float(rng.choice([0.0, 0.3])),
            )
        )
    return cases


def _inputs(case, rng, dtype=np.float64):
    h, w, y = make_case(
        rng, lead=case["lead"], d=case["d"], v=case["v"], layout=case["layout"],
        ignore_frac=case["ignore_frac"], dtype=dtype,
    )  # fmt: skip
    y = np.where(y == -100, case["ignore_index"], y).astype(np.int32)
    v = case["v"]
    bias = rng.normal(size=(v,)).astype(dtype) if case["linear_bias"] else None
    cw = rng.uniform(0.2, 2.0, size=(v,)).astype(dtype) if case["weight"] else None
    sw = rng.uniform(0.5, 1.5, size=y.shape).astype(dtype) if case["sample_weight"] else None
    kw = dict(
        weight_layout=case["layout"], weight=cw, sample_weight=sw,
        ignore_index=case["ignore_index"], label_smoothing=case["label_smoothing"],
        z_loss=case["z_loss"], logit_softcap=case["logit_softcap"], reduction=case["reduction"],
    )  # fmt: skip
    return h, w, y, bias, kw


@pytest.mark.parametrize("case", _grid(), ids=lambda c: f"{c['layout']}-{c['reduction']}")
def test_grid_value_and_grads_float64(case, rng, x64):
    h, w, y, bias, kw = _inputs(case, rng)
    cot = rng.normal(size=y.shape) if case["reduction"] == "none" else np.array(1.7)

    def ours(h, w, b):
        return jnp.sum(cot * lce(h, w, y, linear_bias=b, chunk_size=case["chunk_size"], **kw))

    def ref(h, w, b):
        return jnp.sum(cot * reference(h, w, y, linear_bias=b, **kw))

    args = (h, w, bias)
    argnums = (0, 1, 2) if bias is not None else (0, 1)
    val, grads = jax.jit(jax.value_and_grad(ours, argnums=argnums))(*args)
    rval, rgrads = jax.jit(jax.value_and_grad(ref, argnums=argnums))(*args)
    if np.all(y == case["ignore_index"]) and case["reduction"] == "mean":
        rval = 0.0  # the library's rule: an all-ignored mean is 0.0, not PyTorch's NaN
        rgrads = jax.tree.map(jnp.zeros_like, rgrads)
    np.testing.assert_allclose(val, rval, rtol=1e-10, atol=1e-12)
    for g, rg in zip(grads, rgrads, strict=True):
        assert g.shape == rg.shape
        np.testing.assert_allclose(g, rg, rtol=1e-9, atol=1e-11)


def test_per_token_values_and_lse(rng, x64):
    h, w, y = make_case(rng, lead=(4, 6), d=8, v=101)
    kw = dict(label_smoothing=0.2, z_loss=1e-3, logit_softcap=4.0)
    loss, lse = lce(h, w, y, reduction="none", return_lse=True, chunk_size=32, **kw)
    assert loss.shape == y.shape and lse.shape == y.shape
    ref = jax.jit(lambda h, w: reference(h, w, y, reduction="none", **kw))
    np.testing.assert_allclose(loss, ref(h, w), rtol=1e-12)
    z = 4.0 * np.tanh(h @ w / 4.0)
    m = z.max(-1, keepdims=True)
    np.testing.assert_allclose(lse, (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0])
    mean, lse2 = lce(h, w, y, return_lse=True, chunk_size=32, **kw)
    np.testing.assert_allclose(mean, np.sum(ref(h, w)) / np.sum(y != -100), rtol=1e-12)
    np.testing.assert_allclose(lse2, lse, rtol=1e-12)


def test_return_lse_gradient_flows(rng, x64):
    """The returned lse is differentiable (e.g. a caller's own z-loss)."""
    h, w, y = make_case(rng, lead=(9,), d=8, v=70, ignore_frac=0.0)

    def ours(h, w):
        loss, lse = lce(h, w, y, return_lse=True, chunk_size=16)
        return loss + 0.3 * jnp.mean(lse**2)

    def ref(h, w):
        return reference(h, w, y) + 0.3 * jnp.mean(jax.nn.logsumexp(h @ w, axis=-1) ** 2)

    grads, rgrads = jax.jit(jax.grad(ours, (0, 1)))(h, w), jax.jit(jax.grad(ref, (0, 1)))(h, w)
    for g, rg in zip(grads, rgrads, strict=True):
        np.testing.assert_allclose(g, rg, rtol=1e-10, atol=1e-12)


def test_reduction_none_arbitrary_cotangent(rng, x64):
    """Per-token cotangents of both signs and zeros, through jax.vjp (a known bug area)."""
    h, w, y = make_case(rng, lead=(3, 7), d=8, v=90, layout="vd")
    cot = rng.normal(size=y.shape) * 5.0
    cot[0, :3] = 0.0
    kw = dict(weight_layout="vd", label_smoothing=0.1, z_loss=1e-2, reduction="none")

    @jax.jit
    def both(h, w):
        out, vjp = jax.vjp(lambda h, w: lce(h, w, y, chunk_size=20, **kw), h, w)
        rout, rvjp = jax.vjp(lambda h, w: reference(h, w, y, **kw), h, w)
        return out, rout, vjp(cot), rvjp(cot)

    out, rout, grads, rgrads = both(h, w)
    np.testing.assert_allclose(out, rout, rtol=1e-12)
    for g, rg in zip(grads, rgrads, strict=True):
        np.testing.assert_allclose(g, rg, rtol=1e-10, atol=1e-12)


def test_class_and_sample_weight_gradients(rng, x64):
    h, w, y = make_case(rng, lead=(12,), d=8, v=60)
    cw = rng.uniform(0.3, 2.0, size=(60,))
    sw = rng.uniform(0.5, 1.5, size=(12,))
    for reduction in ("mean", "none"):
        kw = dict(label_smoothing=0.25, z_loss=1e-2, reduction=reduction)

        def ours(cw, sw, kw=kw):
            out = lce(h, w, y, weight=cw, sample_weight=sw, chunk_size=16, **kw)
            return jnp.sum(out * jnp.arange(1.0, out.size + 1).reshape(out.shape))

        def ref(cw, sw, kw=kw):
            out = reference(h, w, y, weight=cw, sample_weight=sw, **kw)
            return jnp.sum(out * jnp.arange(1.0, out.size + 1).reshape(out.shape))

        g, rg = jax.jit(jax.grad(ours, (0, 1)))(cw, sw), jax.jit(jax.grad(ref, (0, 1)))(cw, sw)
        for a, b in zip(g, rg, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_all_ignored_batch_is_zero_with_zero_grads(rng):
    h, w, _ = make_case(rng, lead=(2, 5), d=8, v=40, dtype=np.float32)
    y = np.full((2, 5), -100, np.int32)
    for reduction in ("mean", "sum"):
        val, (gh, gw) = jax.value_and_grad(
            lambda h, w, r=reduction: lce(h, w, y, reduction=r, label_smoothing=0.1, z_loss=0.1),
            argnums=(0, 1),
        )(h, w)
        assert float(val) == 0.0
        assert not np.any(np.asarray(gh)) and not np.any(np.asarray(gw))
    assert not np.any(np.asarray(lce(h, w, y, reduction="none")))


def test_bad_labels_poison_their_position(rng):
    h, w, _ = make_case(rng, lead=(6,), d=8, v=40, dtype=np.float32)
    y = np.array([1, 40, 3, -100, -5, 39], np.int32)  # 40 and -5 are out of range
    per = np.asarray(lce(h, w, y, reduction="none"))
    assert np.isnan(per[[1, 4]]).all()
    assert np.isfinite(per[[0, 2, 3, 5]]).all() and per[3] == 0.0
    assert np.isnan(lce(h, w, y))
    # The gradient is poisoned as well (as `jsm.cross_entropy` does): NaN on the bad
    # tokens' hidden rows and, through the sum over tokens, in the weight gradient.
    gh, gw = (np.asarray(g) for g in jax.jit(jax.grad(lambda h, w: lce(h, w, y), (0, 1)))(h, w))
    assert np.isnan(gh[[1, 4]]).all() and np.isfinite(gh[[0, 2, 3, 5]]).all()
    assert np.isnan(gw).all()


def test_edge_shapes_and_checked(rng):
    w = rng.normal(size=(4, 10)).astype(np.float32)
    # One token, hidden of shape (D,) and a scalar label.
    h1 = rng.normal(size=(4,)).astype(np.float32)
    np.testing.assert_allclose(
        lce(h1, w, np.int32(3)), numpy_reference(h1[None], w, np.array([3])), rtol=1e-6
    )
    assert lce(h1, w, np.int32(3), reduction="none").shape == ()
    # An empty batch: mean 0, per-token (0,), zero gradient.
    h0, y0 = np.ones((0, 4), np.float32), np.zeros((0,), np.int32)
    assert float(lce(h0, w, y0)) == 0.0 and lce(h0, w, y0, reduction="none").shape == (0,)
    assert not np.any(jax.grad(lambda w: lce(h0, w, y0))(w))
    # jsm.checked names the first bad position instead of returning NaN.
    h = rng.normal(size=(3, 4)).astype(np.float32)
    bad = np.array([1, 12, -100], np.int32)
    with pytest.raises(Exception, match=r"bad label 12 at position \(1,\)"):
        jsm.checked(lambda: lce(h, w, bad))()


# ------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_low_precision_against_float64(dtype, layout, rng):
    h, w, y = make_case(rng, lead=(4, 16), d=32, v=515, layout=layout)
    b = rng.normal(size=(515,))
    kw = dict(weight_layout=layout, label_smoothing=0.1, z_loss=1e-3)
    hd, wd, bd = (jnp.asarray(a, dtype) for a in (h, w, b))

    def ours(h, w, b):
        return lce(h, w, y, linear_bias=b, chunk_size=128, **kw)

    val, grads = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2)))(hd, wd, bd)
    assert val.dtype == jnp.float32
    assert [g.dtype for g in grads] == [dtype] * 3
    with _compat.enable_x64(True):
        # Reference on the same (rounded) inputs, in float64.
        h64, w64, b64 = (np.asarray(a, np.float64) for a in (hd, wd, bd))
        rval, rgrads = jax.jit(
            jax.value_and_grad(lambda h, w, b: reference(h, w, y, linear_bias=b, **kw), (0, 1, 2))
        )(h64, w64, b64)
    # float32 accumulation: the value is float32-accurate even for bfloat16 inputs;
    # bfloat16 gradients carry bfloat16 rounding (dz is rounded before the matmuls).
    assert rel_err(val, rval) < 1e-6
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for g, rg in zip(grads, rgrads, strict=True):
        assert rel_err(g, rg) < tol


def test_mixed_dtypes_bf16_hidden_f32_weight(rng):
    h, w, y = make_case(rng, lead=(8,), d=16, v=100, dtype=np.float32)
    hb = jnp.asarray(h, jnp.bfloat16)
    gh, gw = jax.jit(jax.grad(lambda h, w: lce(h, w, y, chunk_size=32), (0, 1)))(hb, w)
    assert gh.dtype == jnp.bfloat16 and gw.dtype == jnp.float32
    rgh, rgw = jax.jit(jax.grad(lambda h, w: reference(h, w, y), (0, 1)))(hb.astype(np.float32), w)
    assert rel_err(gw, rgw) < 1e-5 and rel_err(gh, rgh) < 1e-2


# ------------------------------------------------- transformations, host syncs, errors


def test_no_host_transfers_under_jit(rng):
    h, w, y = make_case(rng, lead=(16,), d=8, v=100, dtype=np.float32)
    args = [jax.device_put(a) for a in (h, w, y, rng.uniform(size=(16,)).astype(np.float32))]
    f = jax.jit(
        jax.value_and_grad(
            lambda h, w, y, s: lce(h, w, y, sample_weight=s, label_smoothing=0.1, chunk_size=24),
            argnums=(0, 1),
        )
    )
    jax.block_until_ready(f(*args))
    with jax.transfer_guard("disallow"):
        jax.block_until_ready(f(*args))
        jax.block_until_ready(jax.jit(lambda h, w, y: lce(h, w, y, reduction="none"))(*args[:3]))


def test_vmap_matches_loop(rng):
    h, w, y = make_case(rng, lead=(3, 10), d=8, v=64, dtype=np.float32)
    f = lambda h, y: lce(h, w, y, chunk_size=20)  # noqa: E731
    batched = jax.vmap(f)(h, y)
    np.testing.assert_allclose(batched, [f(h[i], y[i]) for i in range(3)], rtol=1e-6)
    gb = jax.vmap(jax.grad(lambda h, y: f(h, y)))(h, y)
    np.testing.assert_allclose(gb[1], jax.grad(f)(h[1], y[1]), rtol=1e-6)


def test_matches_jsm_cross_entropy(rng):
    """Same numbers as the materialised `jsm.cross_entropy` of `hidden @ weight + bias`."""
    h, w, y = make_case(rng, lead=(5, 7), d=16, v=130, dtype=np.float32)
    b = rng.normal(size=(130,)).astype(np.float32)
    cw = rng.uniform(0.2, 2.0, size=(130,)).astype(np.float32)
    sw = rng.uniform(0.5, 1.5, size=y.shape).astype(np.float32)
    for reduction in ("mean", "sum", "none"):
        kw = dict(sample_weight=sw, label_smoothing=0.1, z_loss=1e-2, reduction=reduction)

        def ours(h, w, kw=kw):
            return jnp.sum(lce(h, w, y, linear_bias=b, weight=cw, chunk_size=48, **kw))

        def theirs(h, w, kw=kw):
            return jnp.sum(jsm.cross_entropy(h @ w + b, y, weight=cw, **kw))

        v, g = jax.jit(jax.value_and_grad(ours, (0, 1)))(h, w)
        rv, rg = jax.jit(jax.value_and_grad(theirs, (0, 1)))(h, w)
        np.testing.assert_allclose(v, rv, rtol=1e-5)
        for a, r in zip(g, rg, strict=True):
            assert rel_err(a, r) < 1e-5


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(hidden=np.ones((4, 3))), ValueError, "does not match `hidden`"),
        (dict(linear_weight=np.ones((8,))), ValueError, "must be 2-D"),
        (dict(labels=np.ones((4,))), TypeError, "`labels` must be integers"),
        (dict(labels=np.ones((5,), np.int32)), ValueError, "`labels` has shape"),
        (dict(linear_bias=np.ones((9,))), ValueError, r"`linear_bias` must have shape \(10,\)"),
        (dict(weight=np.ones((7,))), ValueError, r"`weight` must have shape \(10,\)"),
        (dict(sample_weight=np.ones((3,))), ValueError, "`sample_weight` of shape"),
        (dict(weight_layout="xy"), ValueError, "`weight_layout`"),
        (dict(reduction="avg"), ValueError, "`reduction`"),
        (dict(impl="cuda"), ValueError, "`impl`"),
        (dict(label_smoothing=1.5), ValueError, "`label_smoothing`"),
        (dict(z_loss=-1.0), ValueError, "`z_loss`"),
        (dict(logit_softcap=0.0), ValueError, "`logit_softcap`"),
        (dict(chunk_size=0), ValueError, "`chunk_size`"),
        (dict(label_smoothing=jnp.array(0.1)), TypeError, "`label_smoothing`"),
        (dict(impl="pallas", return_lse=True), ValueError, "impl='pallas' does not support"),
        (dict(axis_name="v"), ValueError, "not a mesh axis of an enclosing"),
        (
            dict(impl="pallas", weight=np.ones((10,)), label_smoothing=0.1),
            ValueError,
            "impl='pallas' does not support",
        ),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = dict(
        hidden=np.ones((4, 8)), linear_weight=np.ones((8, 10)), labels=np.zeros((4,), np.int32)
    )
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        lce(args.pop("hidden"), args.pop("linear_weight"), args.pop("labels"), **args)


# ------------------------------------------------------------------------ memory


def test_memory_is_an_eighth_of_naive():
    """Target: N=2048, D=512, V=65536 f32, value_and_grad w.r.t. hidden and weight."""
    n, d, v = 2048, 512, 65536
    h = jax.ShapeDtypeStruct((n, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    y = jax.ShapeDtypeStruct((n,), jnp.int32)

    def naive(h, w, y):
        return optax.losses.softmax_cross_entropy_with_integer_labels(h @ w, y).mean()

    # The naive path does hold the (N, V) logits.
    assert_memory_fraction(lambda h, w, y: lce(h, w, y), naive, (h, w, y), naive_at_least=n * v * 4)


def test_large_bf16_case_compiles_under_two_gib():
    """N=8192, D=1024, V=131072 with bfloat16 weights: lowered and compiled, never run."""
    h = jax.ShapeDtypeStruct((8192, 1024), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((1024, 131072), jnp.bfloat16)
    y = jax.ShapeDtypeStruct((8192,), jnp.int32)
    temp = temp_bytes(lambda h, w, y: lce(h, w, y), h, w, y)
    assert temp < 2 * 2**30, temp / 2**30


# -------------------------------------------------------- PyTorch 2.13 parity


def _torch_linear_cases():
    return load_golden("torch_linear_golden")


@pytest.mark.parametrize("meta, a", _torch_linear_cases(), ids=lambda c: c.get("name", ""))
def test_matches_torch_linear_cross_entropy(meta, a):
    """``F.linear_cross_entropy`` (PyTorch 2.13, ``(V, D)`` weight) in value and gradients.

    Fixtures from tests/fixtures/make_torch_linear_golden.py; torch is not needed here.
    """
    kw = dict(
        weight=a.get("weight"),
        ignore_index=meta["ignore_index"],
        label_smoothing=meta["label_smoothing"],
        reduction=meta["reduction"],
        weight_layout="vd",
    )
    args = [a["hidden"], a["linear_weight"]] + ([a["linear_bias"]] if "linear_bias" in a else [])

    @jax.jit
    def run(args, cot):
        f = lambda h, w, b=None: lce(h, w, a["labels"], linear_bias=b, chunk_size=8, **kw)
        out, vjp = jax.vjp(f, *args)
        return out, vjp(jnp.asarray(cot, out.dtype))

    loss, grads = run(tuple(args), a["cotangent"])
    np.testing.assert_allclose(loss, a["loss"], rtol=2e-5, atol=2e-6)
    names = ("grad_hidden", "grad_linear_weight", "grad_linear_bias")
    for g, name in zip(grads, names, strict=False):
        np.testing.assert_allclose(g, a[name], rtol=2e-4, atol=2e-6, err_msg=name)


def test_normalizer_and_loss_denominator(rng):
    """`normalizer=` replaces the mean's denominator, which `loss_denominator` reproduces;
    a Python number <= 0 is refused, a traced 0 is the all-ignored convention."""
    h, w, y = make_case(rng, lead=(3, 7), d=8, v=50, dtype=np.float32)
    cw = rng.uniform(0.3, 2.0, size=(50,)).astype(np.float32)
    sw = rng.uniform(0.5, 1.5, size=y.shape).astype(np.float32)
    kw = dict(weight=cw, sample_weight=sw, label_smoothing=0.1, chunk_size=16)

    @jax.jit
    def run(h, w, n):
        den = jsm.loss_denominator(y, weight=cw, sample_weight=sw)
        zero = jax.value_and_grad(lambda h: lce(h, w, y, normalizer=n, **kw))(h)
        return lce(h, w, y, **kw), lce(h, w, y, normalizer=den, **kw), zero

    mean, with_den, (zero, g_zero) = run(h, w, jnp.float32(0.0))
    np.testing.assert_allclose(with_den, mean, rtol=1e-6)
    assert float(zero) == 0.0 and not np.any(np.asarray(g_zero))
    for bad in (0, -2.0):
        with pytest.raises(ValueError, match="`normalizer` must be finite and > 0"):
            lce(h, w, y, normalizer=bad)

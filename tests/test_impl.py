"""``impl=`` of the public losses: what ``"auto"`` picks, and ``"pallas"`` == ``"xla"``.

* ``impl="auto"`` runs a Pallas kernel only where it is proven (``jsoftmax._impl``):
  lowered for ``cuda`` and ``tpu`` from this host, the program holds no Pallas kernel,
  while ``impl="pallas"`` does (so the inspection has teeth), and an entry in the table
  of measured wins switches exactly that platform.
* ``impl="pallas"`` (the kernels in Pallas' interpreter on this CPU host) gives the value
  *and* gradient of ``impl="xla"`` for every option it accepts, bad labels included
  (NaN loss and NaN gradient on both routes). Shapes are small: the interpreter is slow.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _references import output_rounding_tol, sum_tol

import jsoftmax as jsm
from jsoftmax import _impl

S = jax.ShapeDtypeStruct
KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


def lce(h, w, y, b=None, **kw):
    """``jsm.linear_cross_entropy`` with the bias passed by keyword (one place to rename)."""
    return jsm.linear_cross_entropy(h, w, y, linear_bias=b, **kw)


def lowered(fn, args, platform):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def ce_program(impl):
    def f(z, y):
        return jax.value_and_grad(lambda z: jsm.cross_entropy(z, y, impl=impl))(z)

    return f, (S((8, 300), jnp.float32), S((8,), jnp.int32))


def lce_program(impl):
    def f(h, w, y):
        return jax.value_and_grad(lambda h, w: lce(h, w, y, impl=impl), argnums=(0, 1))(h, w)

    return f, (S((8, 32), jnp.float32), S((32, 300), jnp.float32), S((8,), jnp.int32))


PROGRAMS = {"cross_entropy": ce_program, "linear_cross_entropy": lce_program}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("kernel", sorted(PROGRAMS))
def test_auto_lowers_to_xla_and_pallas_to_the_kernel(kernel, platform):
    assert _impl.MEASURED_WINS == frozenset()  # no device measurement yet
    auto = lowered(*PROGRAMS[kernel]("auto"), platform)
    assert KERNEL_CALL[platform] not in auto
    assert "jsoftmax" not in auto
    pallas = lowered(*PROGRAMS[kernel]("pallas"), platform)
    assert KERNEL_CALL[platform] in pallas


@pytest.mark.parametrize("kernel", sorted(PROGRAMS))
def test_a_measured_win_switches_exactly_its_platform(kernel, monkeypatch):
    monkeypatch.setattr(_impl, "MEASURED_WINS", frozenset({(kernel, "tpu")}))
    fn, args = PROGRAMS[kernel]("auto")
    assert KERNEL_CALL["tpu"] in lowered(fn, args, "tpu")
    assert KERNEL_CALL["cuda"] not in lowered(fn, args, "cuda")
    if kernel != "cross_entropy":
        return
    # On this CPU host the default (XLA) branch runs, with the XLA result.
    concrete = [jnp.ones(a.shape, a.dtype) if a.dtype != jnp.int32 else jnp.arange(8) for a in args]
    want = jax.jit(PROGRAMS[kernel]("xla")[0])(*concrete)
    got = jax.jit(fn)(*concrete)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)


# ------------------------------------------------------------ pallas == xla (interpreter)


def assert_same(pallas, xla, n_terms):
    """Equal values/gradients up to the routes' rounding, NaN exactly where the other has NaN.

    Both routes take the same inputs and accumulate in float32, so a float32 result differs
    by at most γ_n·max|ref| (``sum_tol``: n the terms of the longest sum, the classes, plus
    the hidden size for the LM head). A result in a half-precision dtype (the gradient of
    bfloat16 inputs) is then rounded once on each route, one ulp apart at most:
    ``output_rounding_tol``·|ref| per entry on top. (Not ``atol = rtol``: that would let
    every entry below the tolerance itself go unchecked.)
    """

    def check(a, b):
        dtype = np.asarray(a).dtype
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        finite = np.isfinite(b)
        scale = np.abs(b[finite]).max() if finite.any() else 0.0
        rtol = output_rounding_tol(dtype) if dtype.itemsize < 4 else 0.0
        np.testing.assert_allclose(a, b, rtol=rtol, atol=sum_tol(n_terms) * scale)

    jax.tree.map(check, pallas, xla)


def ce_inputs(dtype, n=6, c=300, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    z = (3 * jax.random.normal(k1, (n, c))).astype(dtype)
    y = jax.random.randint(k2, (n,), 0, c)
    return z, y


CE_CASES = {
    "plain-mean-bf16": (jnp.bfloat16, dict()),
    "weights-sum": (jnp.float32, dict(weight="w", sample_weight="s", reduction="sum")),
    "smoothing-zloss-none": (
        jnp.float32,
        dict(label_smoothing=0.1, z_loss=1e-3, reduction="none"),
    ),
    "ignore-mean-normalizer-bf16": (
        jnp.bfloat16,
        dict(ignore_index=7, sample_weight="s", normalizer=4.0),
    ),
}


@pytest.mark.parametrize("name", sorted(CE_CASES))
def test_cross_entropy_pallas_equals_xla(name):
    dtype, opts = CE_CASES[name]
    z, y = ce_inputs(dtype)
    opts = dict(opts)
    if opts.get("weight") == "w":
        opts["weight"] = jnp.linspace(0.5, 2.0, z.shape[1])
    if opts.get("sample_weight") == "s":
        opts["sample_weight"] = jnp.array([1.0, 0.5, 2.0, 0.0, 1.0, 3.0])
    if "ignore_index" in opts:
        y = y.at[1].set(7).at[4].set(7)
    ct = jnp.linspace(-1.0, 2.0, z.shape[0])

    def run(impl):
        def loss(z, sw):
            kw = dict(opts, sample_weight=sw) if "sample_weight" in opts else opts
            out = jsm.cross_entropy(z, y, impl=impl, **kw)
            return jnp.sum(out * ct) if out.ndim else out

        sw = opts.get("sample_weight")
        argnums = (0, 1) if sw is not None else 0
        return jax.jit(jax.value_and_grad(loss, argnums=argnums))(z, sw)

    assert_same(run("pallas"), run("xla"), n_terms=z.shape[1])


def test_cross_entropy_bad_labels_poison_on_both_routes():
    # (A bad label under "mean" makes every gradient NaN through the denominator; the
    # equality tests cover "mean". "none" shows the poison stays on its own rows.)
    reduction = "none"
    z, y = ce_inputs(jnp.float32)
    z = z.at[2, 5].set(-jnp.inf)
    # Out of range (too large, negative), and a label on a -inf logit.
    y = y.at[0].set(300).at[1].set(-3).at[2].set(5)
    w = jnp.linspace(0.5, 2.0, z.shape[1])

    def run(impl):
        def loss(z, w):
            out = jsm.cross_entropy(z, y, weight=w, impl=impl, reduction=reduction)
            return out.sum()

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(z, w)

    (value, (dz, dw)), (value_x, (dz_x, dw_x)) = run("pallas"), run("xla")
    assert_same((value, dz), (value_x, dz_x), n_terms=z.shape[1])
    assert np.isnan(value)
    assert np.all(np.isnan(dz[:3])) and np.all(np.isfinite(dz[3:]))
    # The class weights' gradient is poisoned on both routes (which entries carry the
    # NaN depends on how each route indexes a bad label's weight).
    assert np.any(np.isnan(dw)) and np.any(np.isnan(dw_x))


def lce_inputs(layout, dtype, bias, n=6, d=16, v=200, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    h = jax.random.normal(k[0], (n, d)).astype(dtype)
    w = (jax.random.normal(k[1], (d, v)) / np.sqrt(d)).astype(dtype)
    if layout == "vd":
        w = w.T
    b = (0.1 * jax.random.normal(k[2], (v,))).astype(dtype) if bias else None
    y = jax.random.randint(k[3], (n,), 0, v)
    return h, w, b, y


LCE_CASES = {
    "vd-bias-all-options-sum": (
        "vd",
        jnp.float32,
        True,
        dict(label_smoothing=0.1, z_loss=1e-3, logit_softcap=5.0, reduction="sum"),
    ),
    "dv-class-sample-weights-none": (
        "dv",
        jnp.float32,
        True,
        dict(weight="c", sample_weight="s", reduction="none"),
    ),
    "vd-ignore-normalizer-bf16": (
        "vd",
        jnp.bfloat16,
        False,
        dict(ignore_index=7, z_loss=1e-3, normalizer=3.0),
    ),
}


@pytest.mark.parametrize("name", sorted(LCE_CASES))
def test_linear_cross_entropy_pallas_equals_xla(name):
    layout, dtype, bias, opts = LCE_CASES[name]
    h, w, b, y = lce_inputs(layout, dtype, bias)
    opts = dict(opts, weight_layout=layout)
    if opts.get("weight") == "c":
        opts["weight"] = jnp.linspace(0.5, 2.0, 200)
    if opts.get("sample_weight") == "s":
        opts["sample_weight"] = jnp.array([1.0, 0.5, 2.0, 0.0, 1.0, 3.0])
    if "ignore_index" in opts:
        y = y.at[1].set(7).at[4].set(7)
    ct = jnp.linspace(-1.0, 2.0, h.shape[0])

    def run(impl):
        def loss(h, w, b):
            out = lce(h, w, y, b, impl=impl, **opts)
            return jnp.sum(out * ct) if out.ndim else out

        argnums = (0, 1, 2) if bias else (0, 1)
        return jax.jit(jax.value_and_grad(loss, argnums=argnums))(h, w, b)

    assert_same(run("pallas"), run("xla"), n_terms=200 + h.shape[1])  # V + D


def test_linear_cross_entropy_bad_labels_poison_on_both_routes():
    h, w, b, y = lce_inputs("dv", jnp.float32, True)
    y = y.at[0].set(200).at[1].set(-3)

    def run(impl):
        def loss(h, w, b):
            return lce(h, w, y, b, impl=impl, reduction="none").sum()

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(h, w, b)

    pallas, xla = run("pallas"), run("xla")
    assert_same(pallas, xla, n_terms=200 + h.shape[1])
    value, (dh, dw, db) = pallas
    assert np.isnan(value)
    assert np.all(np.isnan(dh[:2])) and np.all(np.isfinite(dh[2:]))
    assert np.all(np.isnan(dw)) and np.all(np.isnan(db))

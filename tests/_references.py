"""References and tolerances shared by the tests, independent of the code under test.

float64 numpy references written from the documented formulas, a plain-jnp cross-entropy
(autodiff gives its gradient; run it under float64), the error measure, the dtype
tolerance table with its derivation, the PyTorch golden-fixture loader, and the compiled
memory measure.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def ref_cross_entropy(
    x,
    y,
    *,
    axis=-1,
    weight=None,
    sample_weight=None,
    ignore_index=-100,
    label_smoothing=0.0,
    z_loss=0.0,
    where=None,
    reduction="mean",
):
    """Plain-jnp cross-entropy from the documented formulas (autodiff gives its gradient)."""
    x = jnp.asarray(x)
    x = jnp.moveaxis(x, axis, -1)
    c = x.shape[-1]
    u = x
    if where is not None:
        mask = jnp.moveaxis(jnp.broadcast_to(where, jnp.moveaxis(x, -1, axis).shape), axis, -1)
        u = jnp.where(mask, x, -jnp.inf)
    lse = jax.nn.logsumexp(u, axis=-1)
    adm = u > -jnp.inf
    # -log p is +inf at masked classes; keep those out of products (0 * inf) explicitly.
    lp = jnp.where(adm, u - lse[..., None], 0.0)
    cnt = jnp.sum(adm, axis=-1)
    w = jnp.ones(c, x.dtype) if weight is None else jnp.asarray(weight, x.dtype)
    eps = label_smoothing
    y = jnp.asarray(y)
    if jnp.issubdtype(y.dtype, jnp.floating):
        q = jnp.moveaxis(y, axis, -1)
        qt = (1 - eps) * q + jnp.where(adm, eps / cnt[..., None], 0.0)
        per = -jnp.sum(jnp.where(qt > 0, w * qt * lp, 0.0), axis=-1) + z_loss * lse**2
        den = jnp.ones_like(per)
    else:
        valid = y != ignore_index
        yc = jnp.where(valid, y, 0)
        lp_y = jnp.take_along_axis(lp, yc[..., None], axis=-1)[..., 0]
        wy = w[yc]
        smooth = -jnp.sum(jnp.where(adm, w * lp, 0.0), axis=-1) / cnt
        per = (1 - eps) * wy * -lp_y + eps * smooth + z_loss * wy * lse**2
        per = jnp.where(valid, per, 0.0)
        den = jnp.where(valid, wy, 0.0)
    if sample_weight is not None:
        per = per * sample_weight
        den = den * sample_weight
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / den.sum()


# ------------------------------------------------------------------ error measures


def rel_err(a, b):
    """``‖a - b‖ / ‖b‖`` in float64 (Frobenius norms over all entries)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


# ------------------------------------------------------------ tolerances, derived
#
# U[dtype] is the unit roundoff u = eps / 2 (round to nearest): one rounding of an exact
# value to that dtype moves it by at most u relative. Everything below is built from it.
U = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,  # 8 significand bits
}


def unit_roundoff(dtype) -> float:
    return U[np.dtype(dtype).name]


def sum_tol(n: int, dtype="float32") -> float:
    """Relative error bound of a sum of ``n`` terms accumulated in ``dtype``.

    Higham's γ_n = n·u / (1 - n·u) for recursive summation (a blocked or pairwise sum,
    what XLA emits, is within this too). Used for the logsumexp / softmax sums, which every
    route accumulates in float32 whatever the input dtype.
    """
    nu = n * unit_roundoff(dtype)
    return nu / (1 - nu)


def output_rounding_tol(dtype) -> float:
    """Relative difference of two results rounded to ``dtype`` from nearby float32 values.

    Each is within u of its float32 value; when those straddle a rounding boundary, the
    two outputs are one ulp = 2u apart.
    """
    return 2 * unit_roundoff(dtype)


# ---------------------------------------------------------------- float64 references


def np_log_softmax(x, axis=-1, where=None, temperature=1.0, weight=None):
    """float64 numpy log-softmax; inadmissible entries -inf, an empty slice all -inf."""
    u = np.asarray(x, np.float64) / temperature
    if weight is not None:
        with np.errstate(divide="ignore"):
            u = u + np.log(np.asarray(weight, np.float64))
    if where is not None:
        u = np.where(where, u, -np.inf)
    m = np.max(u, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    s = np.sum(np.exp(u - m), axis=axis, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return u - m - np.log(np.where(s > 0, s, 1.0))


def np_softmax(x, axis=-1, **kw):
    return np.exp(np_log_softmax(x, axis=axis, **kw))


def np_softmax_vjp(x, g, axis=-1):
    """float64 VJP of softmax from the formula ``y·(g - Σ g·y)``."""
    y, g = np_softmax(x, axis=axis), np.asarray(g, np.float64)
    return y * (g - np.sum(g * y, axis=axis, keepdims=True))


def np_log_softmax_vjp(x, g, axis=-1):
    """float64 VJP of log-softmax, ``g - softmax·Σ g``; -inf entries are constants (0)."""
    x = np.asarray(x, np.float64)
    adm = x > -np.inf
    g = np.where(adm, np.asarray(g, np.float64), 0.0)
    return np.where(adm, g - np_softmax(x, axis=axis) * g.sum(axis=axis, keepdims=True), 0.0)


def np_logsumexp(x, axis=-1):
    """float64 numpy logsumexp (-inf for an empty or all -inf slice)."""
    u = np.asarray(x, np.float64)
    m = np.max(u, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(m + np.log(np.sum(np.exp(u - m), axis=axis, keepdims=True)), axis)


def np_cross_entropy(logits, labels, *, weight=None, sample_weight=None, ignore_index=-100,
                     label_smoothing=0.0, z_loss=0.0, reduction="mean"):  # fmt: skip
    """float64 numpy cross-entropy with integer labels over the last axis (PyTorch's rule).

    ``mean`` divides by the summed weights of the kept positions (0.0 when there are
    none, jsoftmax's documented deviation). Returns ``(loss, dlogits)``: the gradient of
    the returned value (for ``"none"``: of its sum) with respect to the logits, written
    out from the formula (no autodiff): ``w_y·(p - onehot) + ε·(w̄·p - w/C) + 2λ·w_y·lse·p``
    per kept position, scaled like the value.
    """
    z = np.asarray(logits, np.float64)
    n, c = z.shape
    y = np.asarray(labels)
    cw = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    sw = np.ones(n) if sample_weight is None else np.asarray(sample_weight, np.float64)
    keep = y != ignore_index
    yc = np.where(keep, y, 0)
    lp = np_log_softmax(z)
    p = np.exp(lp)
    lse = np_logsumexp(z)
    wy = np.where(keep, cw[yc], 0.0) * sw
    eps = label_smoothing
    smooth = -(lp * cw).sum(-1) / c
    per = wy * (1 - eps) * -lp[np.arange(n), yc] + eps * sw * np.where(keep, smooth, 0.0)
    per = per + z_loss * wy * lse**2
    onehot = np.zeros_like(z)
    onehot[np.arange(n), yc] = 1.0
    d = wy[:, None] * (1 - eps) * (p - onehot)
    d += (eps * sw * keep)[:, None] * (p * cw.sum() / c - cw / c)
    d += (2 * z_loss * wy * lse)[:, None] * p
    if reduction == "none":
        return per, d
    if reduction == "sum":
        return per.sum(), d
    den = wy.sum()
    if den == 0:
        return 0.0, np.zeros_like(z)
    return per.sum() / den, d / den


# --------------------------------------------------------------------- fixtures


def load_golden(name):
    """The cases of ``tests/fixtures/<name>.npz``: a list of ``(meta, arrays)``.

    The files hold one ``__meta__`` JSON list (each entry with ``name`` and ``arrays``)
    and the arrays as ``<case name>/<array name>``; made offline with PyTorch by the
    ``make_*.py`` scripts beside them.
    """
    data = np.load(FIXTURES / f"{name}.npz")
    if "__meta__" not in data.files:  # one group per case name, no metadata
        names = sorted({k.split("/")[0] for k in data.files})
        return [({"name": n}, {k.split("/", 1)[1]: data[k] for k in data.files
                               if k.startswith(n + "/")}) for n in names]  # fmt: skip
    meta = json.loads(str(data["__meta__"]))
    return [(m, {k: data[f"{m['name']}/{k}"] for k in m["arrays"]}) for m in meta]


# ----------------------------------------------------------------------- memory


def temp_bytes(f, *args, argnums=(0, 1)):
    """Compiled temporary memory of ``jit(value_and_grad(f, argnums))`` on ``args``.

    The compiler's ``memory_analysis().temp_size_in_bytes``: deterministic, and
    ``jax.ShapeDtypeStruct`` arguments suffice (nothing is allocated or run).
    """
    fn = jax.value_and_grad(f, argnums=argnums) if argnums is not None else f
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def assert_memory_fraction(ours, naive, args, *, argnums=(0, 1), factor=8, naive_at_least=0):
    """``value_and_grad(ours)`` needs at most ``1/factor`` of ``naive``'s temporary memory.

    ``naive_at_least``: the bytes the naive program must hold (e.g. its ``(N, V)``
    logits), so that the comparison is against a program that does materialise them.
    """
    ours_t = temp_bytes(ours, *args, argnums=argnums)
    naive_t = temp_bytes(naive, *args, argnums=argnums)
    assert naive_t >= naive_at_least, (naive_t, naive_at_least)
    assert ours_t * factor <= naive_t, (ours_t, naive_t)

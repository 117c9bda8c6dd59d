"""Shared numerics: the one place for upcasting, masking, the online max/sum-exp combine
and the ``"mean"`` reduction's division. Everything else in ``jsoftmax`` and
``jsoftmax.kernels`` calls these helpers instead of re-deriving them (argument checks
live in ``_validate.py``).

Conventions used throughout the package:

* Reductions accumulate in float32 (float64 for float64 input); results are cast
  back to the input dtype by the caller.
* A class that is masked out (``where=False``), has weight 0 or has logit ``-inf``
  is *inadmissible*: it gets probability exactly 0 and log-probability ``-inf``.
* A row with no admissible class is *empty*: its max is taken as 0 so that no
  ``-inf - -inf`` (NaN) is ever formed.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jsoftmax import _compat

# --------------------------------------------------------------------------- dtypes


def acc_dtype(dtype: Any) -> jnp.dtype:
    """The accumulation dtype for ``dtype``: float64 stays float64, else float32."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def upcast(x: jax.Array) -> jax.Array:
    """``x`` in its accumulation dtype (see :func:`acc_dtype`)."""
    return x.astype(acc_dtype(x.dtype))


def loss_dtype(dtype: Any) -> jnp.dtype:
    """Losses come back in float32 for half-precision inputs, float64 for float64."""
    return acc_dtype(dtype)


# ------------------------------------------------------------------------- numerics


def masked_logits(
    x: jax.Array,
    *,
    where: jax.Array | None = None,
    temperature: jax.Array | float | None = None,
    weight: jax.Array | None = None,
) -> jax.Array:
    """Effective logits ``u = x/T + log w`` in the accumulation dtype, ``-inf`` where inadmissible.

    A zero weight or ``where=False`` makes a class inadmissible even when its logit is
    ``+inf`` (so no ``inf - inf``). A negative weight gives NaN (``log`` of a negative),
    which poisons the row instead of being silently ignored.
    """
    u = upcast(x)
    if isinstance(temperature, float):
        u = u / temperature
    elif temperature is not None:
        # A traced T cannot be checked at trace time: T <= 0 poisons the row with NaN
        # (x / -T would be a silently plausible wrong answer).
        t = jnp.asarray(temperature, u.dtype)
        u = jnp.where(t > 0, u / t, jnp.nan)
    if weight is not None:
        w = weight.astype(u.dtype)
        u = jnp.where(w == 0, -jnp.inf, u + jnp.log(w))
    if where is not None:
        u = jnp.where(where, u, -jnp.inf)
    return u


def stable_shift(
    u: jax.Array, axis: int | tuple[int, ...]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Shift ``u`` by its (stop-gradient) row max, resolving the two infinite cases.

    Returns ``(shifted, m, posinf)`` with ``keepdims`` shapes for ``m`` and ``posinf``:

    * a row containing ``+inf`` splits its mass evenly among the ``+inf`` entries: they
      become 0 and every other entry ``-inf``;
    * an empty row (max ``-inf``) uses ``m = 0`` so ``shifted`` stays ``-inf``, and
      ``exp(shifted)`` sums to exactly 0.
    """
    m = jnp.max(u, axis=axis, keepdims=True)
    posinf = m == jnp.inf
    u = jnp.where(posinf, jnp.where(u == jnp.inf, 0.0, -jnp.inf), u)
    m = jax.lax.stop_gradient(jnp.where(_compat.isfinite(m), m, 0.0))
    return u - m, m, posinf


def safe_log(s: jax.Array) -> jax.Array:
    """``log(s)`` for a sum-of-exps, with an empty sum giving 0 instead of ``-inf``."""
    return jnp.log(jnp.where(s > 0, s, 1.0))


def online_combine(
    m_a: jax.Array, s_a: jax.Array, m_b: jax.Array, s_b: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Merge two partial ``(max, Σ exp(x - max))`` pairs into one.

    The running-max trick behind every chunked/online logsumexp (Milakov & Gimelshein
    2018). Safe when either side is empty (max ``-inf``, sum 0): no ``-inf - -inf``.
    """
    m = jnp.maximum(m_a, m_b)
    m_safe = jnp.where(_compat.isfinite(m), m, 0.0)
    s = s_a * jnp.exp(jnp.where(s_a > 0, m_a - m_safe, 0.0)) + s_b * jnp.exp(
        jnp.where(s_b > 0, m_b - m_safe, 0.0)
    )
    return m, s


def finish_logsumexp(m: jax.Array, s: jax.Array) -> jax.Array:
    """``m + log s`` with an empty row (``s == 0``) giving ``-inf``."""
    m_safe = jnp.where(_compat.isfinite(m), m, 0.0)
    return jnp.where(s > 0, m_safe + jnp.log(jnp.where(s > 0, s, 1.0)), -jnp.inf)


def mean_of(total: jax.Array, den: jax.Array, normalizer: Any = None) -> jax.Array:
    """``total / den``: the ``reduction="mean"`` of every loss.

    A denominator of 0 (every position ignored, or all their weights 0) gives 0.0 with a
    zero gradient instead of NaN, so a fully padded batch cannot poison a training run;
    a NaN denominator (a bad label) is not 0, so the poison still shows. ``normalizer``
    (see ``_validate.normalizer``) replaces ``den``: the caller's global denominator, e.g.
    summed over micro-batches or devices; a negative one poisons the result.
    """
    if normalizer is not None:
        n = jnp.asarray(normalizer, total.dtype)
        den = jnp.where(n < 0, jnp.nan, n)
    zero = den == 0
    return jnp.where(zero, 0.0, total / jnp.where(zero, 1.0, den))


# --------------------------------------------------------------------- bad-label poison


@jax.custom_vjp
def poison_cotangent(x: jax.Array, bad: jax.Array) -> jax.Array:
    """Identity whose cotangent is NaN at ``bad`` positions.

    A position with a bad label gets a NaN loss *and* poisons the gradient, on every
    route (XLA or Pallas kernel). Multiplying by NaN is not enough: the coefficient
    there is often 0 (``where(bad, nan, loss)`` has a zero gradient at ``bad``), and XLA
    rewrites ``x * convert(mask)`` as a select, which drops ``0 * NaN``.
    """
    del bad
    return x


def _poison_fwd(x, bad):
    return x, bad


def _poison_bwd(bad, ct):
    return jnp.where(bad, jnp.nan, ct), None


poison_cotangent.defvjp(_poison_fwd, _poison_bwd)


# ------------------------------------------------------------- log-space helpers

_LN2 = 0.6931471805599453


def log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 - e^x)`` for ``x <= 0``, accurate over the whole range.

    ``log(-expm1(x))`` near 0 (where ``1 - e^x`` cancels) and ``log1p(-e^x)`` below
    ``-ln 2`` (where ``expm1`` loses the small ``e^x``), Mächler's switch (2012, "Accurately
    computing log(1 - exp(-|a|))"). Each branch sees a safe argument, so neither
    produces a NaN gradient that ``jnp.where`` would then multiply by zero.
    ``x = 0`` gives ``-inf``; callers that need a finite value clamp first.
    """
    near = x > -_LN2
    return jnp.where(
        near,
        jnp.log(-jnp.expm1(jnp.where(near, x, -1.0))),
        jnp.log1p(-jnp.exp(jnp.where(near, -1.0, x))),
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def saturate(x: jax.Array, hi: float) -> jax.Array:
    """``min(x, hi)`` whose derivative is 1 everywhere (a straight-through clamp).

    Keeps ``exp(x)`` finite (``hi = 80``: ``e^80 ≈ 5.5e34``, far from float32's
    ``3.4e38`` even after a few factors), while the gradient keeps its sign and its
    saturated size instead of dropping to 0 beyond the clamp.
    """
    return jnp.minimum(x, hi)


@saturate.defjvp
def _saturate_jvp(hi, primals, tangents):
    (x,), (dx,) = primals, tangents
    return jnp.minimum(x, hi), dx

"""Shared numerics: the one place for upcasting, masking, argument checks and the
online max/sum-exp combine. Everything else in ``jsoftmax`` and ``jsoftmax.kernels``
calls these helpers instead of re-deriving them.

Conventions used throughout the package:

* Reductions accumulate in float32 (float64 for float64 input); results are cast
  back to the input dtype by the caller.
* A class that is masked out (``where=False``), has weight 0 or has logit ``-inf``
  is *inadmissible*: it gets probability exactly 0 and log-probability ``-inf``.
* A row with no admissible class is *empty*: its max is taken as 0 so that no
  ``-inf - -inf`` (NaN) is ever formed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jsoftmax import _compat

Axis = int | Sequence[int]

REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------- dtypes


def acc_dtype(dtype: Any) -> jnp.dtype:
    """The accumulation dtype for ``dtype``: float64 stays float64, else float32."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def as_float(x: ArrayLike, name: str = "x") -> jax.Array:
    """``x`` as an inexact array; integers and bools become float32 (like ``jax.nn``)."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"`{name}` must be real, got dtype {x.dtype}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x


def upcast(x: jax.Array) -> jax.Array:
    """``x`` in its accumulation dtype (see :func:`acc_dtype`)."""
    return x.astype(acc_dtype(x.dtype))


def loss_dtype(dtype: Any) -> jnp.dtype:
    """Losses come back in float32 for half-precision inputs, float64 for float64."""
    return acc_dtype(dtype)


# ------------------------------------------------------------------ argument checks


def normalize_axis(axis: Axis, ndim: int, name: str = "axis") -> tuple[int, ...]:
    """Normalise an int or tuple ``axis`` against ``ndim``; ``ValueError`` when out of range."""
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = []
    for a in axes:
        if not isinstance(a, (int, np.integer)):
            raise TypeError(f"`{name}` must be an int or a tuple of ints, got {axis!r}.")
        if not -ndim <= a < ndim:
            raise ValueError(f"`{name}`={axis} is out of range for an input of rank {ndim}.")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"`{name}`={axis} repeats an axis.")
    return tuple(out)


def single_axis(axis: int, ndim: int, name: str = "axis") -> int:
    """Normalise a single int ``axis`` (losses and kernels take one class axis)."""
    if not isinstance(axis, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {axis!r}.")
    return normalize_axis(axis, ndim, name)[0]


def check_broadcast(arr: jax.Array, shape: tuple[int, ...], name: str) -> None:
    """``ValueError`` naming ``name`` unless ``arr`` broadcasts to ``shape``."""
    try:
        out = jnp.broadcast_shapes(arr.shape, shape)
    except ValueError:
        out = None
    if out != tuple(shape):
        raise ValueError(
            f"`{name}` of shape {arr.shape} does not broadcast to the input shape {shape}."
        )


def check_where(where: ArrayLike | None, shape: tuple[int, ...]) -> jax.Array | None:
    """Validate a boolean mask ``where`` against ``shape``."""
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"`where` must be a boolean mask, got dtype {where.dtype}.")
    check_broadcast(where, shape, "where")
    return where


def expand_class_vector(
    vec: ArrayLike | None, shape: tuple[int, ...], axis: Axis, name: str
) -> jax.Array | None:
    """Place a per-class vector along ``axis`` so that it broadcasts against ``shape``.

    A 1-D ``vec`` of length ``C`` (or 1) is laid along the (single) class axis, which is
    what "weights broadcastable along ``axis``" means for e.g. an ``(N, C, H, W)`` input
    with ``axis=1``. Any other rank must broadcast to ``shape`` by numpy rules.
    """
    if vec is None:
        return None
    vec = jnp.asarray(vec)
    if not jnp.issubdtype(vec.dtype, jnp.floating):
        vec = vec.astype(jnp.float32)
    axes = normalize_axis(axis, len(shape))
    if vec.ndim == 1 and len(axes) == 1 and len(shape) > 1:
        (a,) = axes
        if vec.shape[0] not in (1, shape[a]):
            raise ValueError(
                f"`{name}` has length {vec.shape[0]} but the class axis {a} of the input "
                f"{shape} has {shape[a]} entries."
            )
        vec = vec.reshape((-1,) + (1,) * (len(shape) - 1 - a))
    check_broadcast(vec, shape, name)
    return vec


def check_temperature(temperature: ArrayLike) -> jax.Array | float | None:
    """``None`` for the static default 1.0, else a scalar; Python numbers must be > 0.

    A traced temperature cannot be checked at trace time; a non-positive value then
    yields NaN/inf outputs (poison) rather than a silently plausible number.
    """
    if isinstance(temperature, (bool, np.bool_)):
        raise TypeError("`temperature` must be a positive number, got a bool.")
    if isinstance(temperature, (int, float, np.integer, np.floating)):
        if not temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {temperature}.")
        return None if float(temperature) == 1.0 else float(temperature)
    t = jnp.asarray(temperature)
    if t.ndim != 0:
        raise ValueError(f"`temperature` must be a scalar, got shape {t.shape}.")
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.float32)
    return t


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}.")
    return reduction


def check_integer_labels(labels: ArrayLike, batch_shape: tuple[int, ...], name: str = "labels"):
    """Integer labels whose shape is the logits' shape without the class axis."""
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"`{name}` must be integers, got dtype {labels.dtype}.")
    if labels.shape != tuple(batch_shape):
        raise ValueError(
            f"`{name}` has shape {labels.shape}; expected {tuple(batch_shape)} "
            "(the logits' shape without the class axis)."
        )
    return labels


# ------------------------------------------------------------------------- numerics


def masked_logits(
    x: jax.Array,
    *,
    where: jax.Array | None = None,
    temperature: jax.Array | float | None = None,
    weights: jax.Array | None = None,
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
    if weights is not None:
        w = weights.astype(u.dtype)
        u = jnp.where(w == 0, -jnp.inf, u + jnp.log(w))
    if where is not None:
        u = jnp.where(where, u, -jnp.inf)
    return u


def stable_shift(u: jax.Array, axis: Axis) -> tuple[jax.Array, jax.Array, jax.Array]:
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

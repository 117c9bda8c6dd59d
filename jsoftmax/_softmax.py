"""The stable softmax family: softmax, log_softmax, logsumexp, hardmax, softmax2d.

Derivatives are ``jax.custom_jvp`` rules written in terms of the *output* only, so
forward mode (``jax.jvp``) works directly and reverse mode (``jax.grad``), which JAX
derives by linearising and transposing the rule, saves nothing but the output as a
residual: ``p`` for softmax, ``exp(log p)`` for log-softmax. ``logsumexp`` keeps its
input and its (per-row) result and recomputes the softmax in the backward pass under
``jax.checkpoint`` instead of storing a copy of ``exp(x)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from jsoftmax import _numerics as num
from jsoftmax import _validate as check
from jsoftmax._validate import Axis


def _is_zero(t) -> bool:
    return t is None or isinstance(t, SymbolicZero)


def _prepare(x, axis, where, temperature, weight):
    """Validate arguments; return ``(x, axes, where, t, w)`` ready for the cores."""
    x = check.float_array(x)
    axes = check.axes(axis, x.ndim)
    where = check.where(where, x.shape)
    t = check.temperature(temperature)
    w = check.class_vector_along(weight, x.shape, axes, "weight")
    return x, axes, where, t, w


def _forward(x, t, w, where, axes):
    """``(shifted, log s, posinf)``: the shared body of every member of the family."""
    u = num.masked_logits(x, where=where, temperature=t, weight=w)
    shifted, m, posinf = num.stable_shift(u, axes)
    s = jnp.sum(jnp.exp(shifted), axis=axes, keepdims=True)
    return shifted, s, m, posinf


def _logit_tangent(x, t, w, tx, tt, tw, log_p):
    """Tangent of the effective logits ``u = x/T + log w`` (up to a per-row constant).

    The temperature term uses ``x/T = log p - log w + const`` so that no copy of ``x``
    is needed: the per-row constant cancels in ``t_p = p (t_u - Σ p t_u)``.
    """
    acc = num.acc_dtype(x.dtype)
    tu = jnp.zeros((), acc)
    if not _is_zero(tx):
        tu = tx.astype(acc) if t is None else tx.astype(acc) / t
    if w is not None and not _is_zero(tw):
        tw = tw.astype(acc)
        tu = tu + jnp.where(w > 0, tw / jnp.where(w > 0, w, 1), 0.0)
    if t is not None and not _is_zero(tt):
        v = log_p
        if w is not None:
            v = v - jnp.log(jnp.where(w > 0, w, 1).astype(acc))
        tu = tu - (tt.astype(acc) / t) * v
    return tu


# ------------------------------------------------------------------------- softmax


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _softmax(x, t, w, where, axes):
    shifted, s, _, _ = _forward(x, t, w, where, axes)
    return (jnp.exp(shifted) * (1.0 / jnp.where(s > 0, s, 1.0))).astype(x.dtype)


def _softmax_jvp(axes, primals, tangents):
    x, t, w, where = primals
    tx, tt, tw, _ = tangents
    p = _softmax(x, t, w, where, axes)
    acc = num.acc_dtype(x.dtype)
    p32 = p.astype(acc)
    log_p = jnp.where(p32 > 0, jnp.log(jnp.where(p32 > 0, p32, 1.0)), 0.0)
    tu = _logit_tangent(x, t, w, tx, tt, tw, log_p)
    pt = p32 * tu
    tp = pt - p32 * jnp.sum(pt, axis=axes, keepdims=True)
    return p, tp.astype(p.dtype)


_softmax.defjvp(_softmax_jvp, symbolic_zeros=True)


def softmax(
    x: ArrayLike,
    axis: Axis = -1,
    *,
    where: ArrayLike | None = None,
    temperature: ArrayLike = 1.0,
    weight: ArrayLike | None = None,
) -> jax.Array:
    r"""Numerically stable (weighted, masked, tempered) softmax.

    .. math::
        p_i = \frac{w_i \exp(x_i / T)}{\sum_j w_j \exp(x_j / T)}

    over ``axis``, computed as ``exp(u - max u)`` with ``u = x/T + log w`` in float32
    (float64 for float64 input). Inadmissible entries (``where=False``, ``w=0`` or
    ``x=-inf``) get exactly 0. A row with no admissible entry returns all zeros and a
    zero gradient (``jax.nn.softmax`` returns NaN there). A row with ``+inf`` entries
    splits its mass among them (evenly without weights).

    Args:
      x: scores of any float dtype (integers are promoted to float32).
      axis: the class axis, or a tuple of axes.
      where: boolean mask broadcastable to ``x``; ``False`` entries are excluded.
      temperature: positive scalar ``T``; may be a traced array, and ``jax.grad``
        flows to it. A Python number ``<= 0`` is a ``ValueError``.
      weight: non-negative per-class weights; a 1-D array of length ``C`` is laid
        along ``axis``, other shapes must broadcast to ``x``. Weight 0 acts as a mask.
        Differentiable where ``w > 0`` (the gradient at exactly ``w = 0`` is taken as 0).

    Returns:
      Probabilities with the shape and dtype of ``x``.

    Examples:
      >>> import jsoftmax as jsm
      >>> jsm.softmax(jnp.array([-3.0, 2.0, -1.0, 0.0])).round(4)
      Array([0.0057, 0.839 , 0.0418, 0.1135], dtype=float32)
      >>> jsm.softmax(jnp.array([-jnp.inf, -jnp.inf]))  # jax.nn.softmax gives NaN
      Array([0., 0.], dtype=float32)
    """
    x, axes, where, t, w = _prepare(x, axis, where, temperature, weight)
    return _softmax(x, t, w, where, axes)


# --------------------------------------------------------------------- log_softmax


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _log_softmax(x, t, w, where, axes):
    shifted, s, _, _ = _forward(x, t, w, where, axes)
    return (shifted - num.safe_log(s)).astype(x.dtype)


def _log_softmax_jvp(axes, primals, tangents):
    x, t, w, where = primals
    tx, tt, tw, _ = tangents
    lp = _log_softmax(x, t, w, where, axes)
    keep = lambda a: None if _is_zero(a) else a  # noqa: E731
    return lp, _log_softmax_tangent(x, t, w, where, keep(tx), keep(tt), keep(tw), axes)


@functools.partial(jax.checkpoint, static_argnums=(7,), prevent_cse=False)
def _log_softmax_tangent(x, t, w, where, tx, tt, tw, axes):
    # Checkpointed: reverse mode keeps no (N, C) residual beyond the inputs and
    # recomputes p = softmax(x) in the backward pass. Inside one jit the recomputation
    # is the same expression as the forward's exp(u - max u), which XLA shares, so
    # forward + backward cost one exp per element.
    shifted, s, _, _ = _forward(x, t, w, where, axes)
    p = jnp.exp(shifted) * (1.0 / jnp.where(s > 0, s, 1.0))
    admissible = shifted > -jnp.inf
    log_p = None if tt is None else jnp.where(admissible, shifted - num.safe_log(s), 0.0)
    tu = _logit_tangent(x, t, w, tx, tt, tw, log_p)
    # p = 0 on inadmissible entries, so their input tangents drop out of the sum;
    # the output mask keeps the (constant) -inf outputs at zero tangent.
    tlp = tu - jnp.sum(p * tu, axis=axes, keepdims=True)
    return jnp.where(admissible, tlp, 0.0).astype(x.dtype)


_log_softmax.defjvp(_log_softmax_jvp, symbolic_zeros=True)


def log_softmax(
    x: ArrayLike,
    axis: Axis = -1,
    *,
    where: ArrayLike | None = None,
    temperature: ArrayLike = 1.0,
    weight: ArrayLike | None = None,
) -> jax.Array:
    r"""Numerically stable log-softmax, the log of :func:`softmax`.

    .. math::
        \log p_i = u_i - \log \sum_j e^{u_j}, \qquad u = x / T + \log w

    computed as ``(u - max u) - log Σ exp(u - max u)`` in float32. Inadmissible
    entries (``where=False``, ``w = 0``, ``x = -inf``) are ``-inf``; an empty row is
    all ``-inf`` with zero gradient, never NaN.

    Args:
      x: scores of any float dtype.
      axis: the class axis, or a tuple of axes.
      where: boolean mask broadcastable to ``x``.
      temperature: positive scalar ``T`` (traced or static, differentiable).
      weight: non-negative per-class weights, as in :func:`softmax`.

    Returns:
      Log-probabilities with the shape and dtype of ``x``.

    Examples:
      >>> import jsoftmax as jsm
      >>> jsm.log_softmax(jnp.array([2.0, 0.5, 6.0]))
      Array([-4.0221553 , -5.5221553 , -0.02215516], dtype=float32)
    """
    x, axes, where, t, w = _prepare(x, axis, where, temperature, weight)
    return _log_softmax(x, t, w, where, axes)


# ----------------------------------------------------------------------- logsumexp


def _lse_forward(x, w, where, axes):
    shifted, s, m, posinf = _forward(x, None, w, where, axes)
    lse = jnp.where(posinf, jnp.inf, num.finish_logsumexp(m, s))
    return lse


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _logsumexp(x, w, where, axes):
    return _lse_forward(x, w, where, axes).astype(x.dtype)


@functools.partial(jax.checkpoint, static_argnums=(3,), prevent_cse=False)
def _lse_tangent(x, w, where, axes, tx, tw):
    # Under jax.checkpoint the softmax below is recomputed in the backward pass from
    # (x, w, where), so reverse mode saves no (N, C) copy of exp(x).
    p = _softmax(x, None, w, where, axes).astype(num.acc_dtype(x.dtype))
    tu = _logit_tangent(x, None, w, tx, None, tw, None)
    return jnp.sum(jnp.where(p > 0, p * tu, 0.0), axis=axes, keepdims=True)


def _logsumexp_jvp(axes, primals, tangents):
    x, w, where = primals
    tx, tw, _ = tangents
    lse = _logsumexp(x, w, where, axes)
    if _is_zero(tx):
        tx = jnp.zeros_like(x)
    if w is not None and _is_zero(tw):
        tw = jnp.zeros_like(w)
    return lse, _lse_tangent(x, w, where, axes, tx, tw).astype(lse.dtype)


_logsumexp.defjvp(_logsumexp_jvp, symbolic_zeros=True)


def logsumexp(
    x: ArrayLike,
    axis: Axis = -1,
    *,
    where: ArrayLike | None = None,
    weight: ArrayLike | None = None,
    keepdims: bool = False,
) -> jax.Array:
    r"""Numerically stable (weighted, masked) log-sum-exp.

    .. math::
        \operatorname{lse}(x) = \log \sum_i w_i e^{x_i}
          = m + \log \sum_i w_i e^{x_i - m}, \quad m = \max_i x_i

    An empty row (all masked, all ``-inf`` or all weights 0) gives ``-inf`` with zero
    gradient; a row containing ``+inf`` gives ``+inf``.

    Args:
      x: scores of any float dtype.
      axis: the reduced axis, or a tuple of axes.
      where: boolean mask broadcastable to ``x``; ``False`` entries are left out.
      weight: non-negative per-class weights (1-D of length ``C`` is laid along ``axis``).
      keepdims: keep the reduced axes with size 1.

    Returns:
      The log-sum-exp in the dtype of ``x``.

    Examples:
      >>> import jsoftmax as jsm
      >>> jsm.logsumexp(jnp.array([1e30, 1e30]))
      Array(1.e+30, dtype=float32)
    """
    x = check.float_array(x)
    axes = check.axes(axis, x.ndim)
    where = check.where(where, x.shape)
    w = check.class_vector_along(weight, x.shape, axes, "weight")
    out = _logsumexp(x, w, where, axes)
    return out if keepdims else jnp.squeeze(out, axis=axes)


# ------------------------------------------------------------------ hardmax, 2-D


def hardmax(x: ArrayLike, axis: Axis = -1) -> jax.Array:
    r"""One-hot of the arg-max along ``axis`` (first index on ties), the zero-temperature softmax.

    .. math::
        h_i = [\, i = \min \arg\max_j x_j \,]

    With a tuple of axes the arg-max is taken over their joint slice, ties broken by the
    first index in row-major order over those axes (as ``jnp.argmax`` of the flattened
    slice), matching ``softmax(x / T, axis)`` as ``T -> 0``.

    Args:
      x: scores.
      axis: the class axis, or a tuple of axes.

    Returns:
      A one-hot array with the shape and dtype of ``x`` (float32 for integer input);
      its gradient is zero.

    Examples:
      >>> import jsoftmax as jsm
      >>> jsm.hardmax(jnp.array([1.0, 3.0, 3.0]))
      Array([0., 1., 0.], dtype=float32)
      >>> jsm.hardmax(jnp.array([[1.0, 2.0], [5.0, 0.0]]), axis=(0, 1))
      Array([[0., 0.],
             [1., 0.]], dtype=float32)
    """
    x = check.float_array(x)
    axes = check.axes(axis, x.ndim)
    batch = tuple(a for a in range(x.ndim) if a not in axes)
    moved = jnp.transpose(jax.lax.stop_gradient(x), batch + axes)
    flat = moved.reshape(moved.shape[: len(batch)] + (-1,))
    idx = jnp.argmax(flat, axis=-1, keepdims=True)
    hot = jax.lax.broadcasted_iota(idx.dtype, flat.shape, flat.ndim - 1) == idx
    hot = hot.reshape(moved.shape)
    return jnp.transpose(hot, tuple(np.argsort(batch + axes))).astype(x.dtype)


def softmax2d(x: ArrayLike) -> jax.Array:
    r"""Softmax over the channel axis of ``(C, H, W)`` or ``(N, C, H, W)`` (``torch.nn.Softmax2d``).

    .. math::
        p_{c,h,w} = e^{x_{c,h,w}} / \sum_{c'} e^{x_{c',h,w}}

    Args:
      x: a rank-3 or rank-4 array; the channel axis is ``-3``.

    Returns:
      Probabilities over channels, same shape and dtype.

    Raises:
      ValueError: for any other rank.

    Examples:
      >>> import jsoftmax as jsm
      >>> jsm.softmax2d(jnp.zeros((2, 1, 1)))[:, 0, 0]
      Array([0.5, 0.5], dtype=float32)
    """
    x = check.float_array(x)
    if x.ndim not in (3, 4):
        raise ValueError(
            f"softmax2d expects a (C, H, W) or (N, C, H, W) input, got shape {x.shape}."
        )
    return softmax(x, axis=-3)

"""Drop-in replacements for optax's classification losses that never return NaN.

Same names, argument names, defaults, output shapes and dtypes as ``optax.losses``
(checked against optax 0.2.8), and the same values and gradients wherever optax's
are finite. Where optax produces NaN these return the mathematical limit instead:

* an *empty* row (every class masked by ``where``, or every logit ``-inf``, e.g. a
  padded position) has loss 0 and zero gradient, as optax already does for rows
  masked by ``where``;
* a class with logit ``-inf`` and label 0 contributes ``0 · log 0 = 0``;
* a class with logit ``-inf`` and label mass > 0 makes the loss ``+inf`` (as in
  optax and in math: the model gives the target probability 0), while the gradient
  stays finite and equal to optax's;
* ``+inf`` logits follow :func:`jsoftmax.softmax`: the row's mass is split evenly
  among its ``+inf`` entries;
* the sigmoid losses at ``±inf`` logits give their limits (0 or ``+inf``) with
  finite gradients.

Kept exactly as optax has them: ``where`` removes classes from the computation (soft
label mass on a masked class drops out of the sum; an integer label on a masked class
is scored with its raw logit), negative integer labels count from the end, and a label
outside ``[-C, C)`` gives NaN (bad input stays visible). Half-precision inputs are
accumulated in float32 and the result is returned in optax's dtype.

Usage: replace ``optax.losses.X`` with ``jsoftmax.optax.X``::

    import jsoftmax.optax as losses
    loss = losses.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

The gradients come from ``jax.custom_jvp`` rules (so ``jax.jvp``, ``jax.grad`` and
higher orders work) whose tangent is recomputed under ``jax.checkpoint`` from the
inputs and the per-row log-sum-exp, so reverse mode keeps no ``(N, C)`` residual;
the integer-label loss never builds a one-hot matrix.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import jax.scipy.special
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from jsoftmax import _numerics as num
from jsoftmax import _validate as check

__all__ = [
    "safe_softmax_cross_entropy",
    "sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
]


# ------------------------------------------------------------------------- helpers


def _is_zero(t) -> bool:
    return t is None or isinstance(t, SymbolicZero)


def _check_float_logits(logits: ArrayLike) -> jax.Array:
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"`logits` must be a floating-point array, got dtype {logits.dtype}.")
    return logits


def _prepare_where(
    where: ArrayLike | None, ndim: int, axes: tuple[int, ...], shape: tuple[int, ...]
) -> jax.Array | None:
    """optax's rule: a ``where`` of lower rank than the logits is a per-example mask."""
    if where is None:
        return None
    where = jnp.asarray(where)
    if where.ndim != ndim:
        where = jnp.expand_dims(where, axes)
    return check.where(where, shape)


def _row_stats(x, where, axes):
    """``(shifted, s, m, posinf)`` of the masked logits in the accumulation dtype."""
    u = num.masked_logits(x, where=where)
    shifted, m, posinf = num.stable_shift(u, axes)
    s = jnp.sum(jnp.exp(shifted), axis=axes, keepdims=True)
    return shifted, s, m, posinf


def _reshift(x, where, m, posinf):
    """Recompute ``stable_shift``'s output from its per-row results (no max pass)."""
    u = num.masked_logits(x, where=where)
    return jnp.where(posinf, jnp.where(u == jnp.inf, 0.0, -jnp.inf), u - m)


def _times(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a · b`` with ``0 · ±inf = 0`` (the ``0 log 0 = 0`` convention), NaN-free gradients."""
    return a * jnp.where((a == 0) & jnp.isinf(b), 0.0, b)


# -------------------------------------------------------- soft-label cross-entropy


def _soft_ce_forward(x, q, where, axes):
    """``(loss, s, m, posinf)``: the loss with ``keepdims`` and the per-row statistics."""
    shifted, s, m, posinf = _row_stats(x, where, axes)
    log_p = shifted - num.safe_log(s)
    qa = q.astype(log_p.dtype)
    keep = qa != 0  # 0 · log 0 = 0; label mass on a -inf class gives +inf
    if where is not None:
        keep = keep & where  # optax leaves masked classes out of the sum
    loss = -jnp.sum(jnp.where(keep, qa * log_p, 0.0), axis=axes, keepdims=True)
    loss = jnp.where(s > 0, loss, 0.0)  # empty row: nothing to score
    return loss, s, m, posinf


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _soft_ce(x, q, where, axes):
    loss = _soft_ce_forward(x, q, where, axes)[0]
    return jnp.squeeze(loss, axes).astype(x.dtype)


@functools.partial(jax.checkpoint, static_argnums=(8,), prevent_cse=False)
def _soft_ce_tangent(x, q, where, m, log_s, posinf, tx, tq, axes):
    # d/dx_c = p_c · Σ_k q_k - q_c over the classes ``where`` keeps (also at a -inf
    # logit, where p_c = 0: optax's finite gradient); d/dq_c = -log p_c, taken as 0 on
    # inadmissible classes (math: +inf) so that no gradient is ever infinite.
    # Checkpointed: reverse mode recomputes p from x and the per-row (m, log s).
    acc = num.acc_dtype(x.dtype)
    log_p = _reshift(x, where, m, posinf) - log_s
    qa = q.astype(acc)
    incl = jnp.ones((), bool) if where is None else where
    out = jnp.zeros(m.shape, acc)
    if tx is not None:
        total = jnp.sum(jnp.where(incl, qa, 0.0), axis=axes, keepdims=True)
        coef = jnp.where(incl, jnp.exp(log_p) * total - qa, 0.0)
        out = out + jnp.sum(coef * tx.astype(acc), axis=axes, keepdims=True)
    if tq is not None:
        coef = jnp.where(incl & (log_p > -jnp.inf), -log_p, 0.0)
        out = out + jnp.sum(coef * tq.astype(acc), axis=axes, keepdims=True)
    return out


def _soft_ce_jvp(axes, primals, tangents):
    x, q, where = primals
    tx, tq, _ = tangents
    # The primal goes through the custom_jvp function again so that differentiating
    # this rule (second order, forward over forward) uses the rule, not the kinks of
    # the forward's `where`s; under jit XLA merges the two identical forward passes.
    out = _soft_ce(x, q, where, axes)
    _, s, m, posinf = _row_stats(x, where, axes)
    keep = lambda t: None if _is_zero(t) else t  # noqa: E731
    t = _soft_ce_tangent(x, q, where, m, num.safe_log(s), posinf, keep(tx), keep(tq), axes)
    t = jnp.where(s > 0, t, 0.0)
    return out, jnp.squeeze(t, axes).astype(out.dtype)


_soft_ce.defjvp(_soft_ce_jvp, symbolic_zeros=True)


def _soft_cross_entropy(logits, labels, axis, where):
    x = _check_float_logits(logits)
    q = jnp.asarray(labels)
    if jnp.issubdtype(q.dtype, jnp.complexfloating):
        raise TypeError(f"`labels` must be real, got dtype {q.dtype}.")
    try:
        shape = jnp.broadcast_shapes(x.shape, q.shape)
    except ValueError:
        raise ValueError(
            f"`labels` of shape {q.shape} does not broadcast with `logits` of shape {x.shape}."
        ) from None
    dtype = jnp.result_type(x, q)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = x.dtype
    x = jnp.broadcast_to(x.astype(dtype), shape)
    q = jnp.broadcast_to(q.astype(dtype), shape)
    axes = tuple(range(x.ndim)) if axis is None else check.axes(axis, x.ndim)
    where = _prepare_where(where, x.ndim, axes, shape)
    return _soft_ce(x, q, where, axes)


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] | None = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy with soft labels, as ``optax.losses.softmax_cross_entropy``.

    .. math::
        \ell = -\sum_{c} q_c \log \frac{e^{x_c}}{\sum_k e^{x_k}}

    over ``axis``, where the sum and the normaliser run over the classes ``where``
    keeps. Equal to optax's value and gradient wherever those are finite; where optax
    gives NaN this gives the limit: ``q_c = 0`` at ``x_c = -inf`` contributes
    ``0 · log 0 = 0`` (as ``optax.losses.safe_softmax_cross_entropy``), an empty row
    (all masked or all ``-inf``) gives 0 with zero gradient, ``+inf`` logits share
    the mass evenly. Label mass on a ``-inf`` logit is a loss of ``+inf`` (as in
    optax) with a finite gradient. Gradients with respect to ``labels`` are
    ``-log p``, taken as 0 on masked and ``-inf`` classes.

    Args:
      logits: unnormalised log-probabilities, e.g. ``(batch, num_classes)``.
      labels: target distributions, broadcastable to ``logits``.
      axis: the class axis, a tuple of axes, or ``None`` for all axes.
      where: boolean mask of the elements to include, of ``logits.shape`` or of the
        batch shape (a per-example mask, expanded along ``axis`` as in optax).

    Returns:
      The per-example loss, ``logits``' shape without ``axis``, in the promoted dtype
      of ``logits`` and ``labels``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax.optax as losses
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> with jnp.printoptions(precision=4):
      ...     print(losses.softmax_cross_entropy(logits, labels))
      [0.2761 2.9518]
      >>> logits = jnp.array([0.0, 0.0, -jnp.inf])  # a class masked with -inf
      >>> losses.softmax_cross_entropy(logits, jnp.array([0.5, 0.5, 0.0]))  # optax: nan
      Array(0.6931472, dtype=float32)

    References:
      Bridle, `Probabilistic Interpretation of Feedforward Classification Network
      Outputs <https://doi.org/10.1007/978-3-642-76153-9_28>`_, 1990.
    """
    return _soft_cross_entropy(logits, labels, axis, where)


def safe_softmax_cross_entropy(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
    r"""Softmax cross-entropy with ``0 · log 0 = 0``, as optax's ``safe_softmax_cross_entropy``.

    .. math::
        \ell = -\sum_{c:\, q_c \neq 0} q_c \log \operatorname{softmax}(x)_c

    over the last axis. With ``jsoftmax.optax`` this is the same function as
    :func:`softmax_cross_entropy` with ``axis=-1``; it exists so that code calling
    optax's name keeps working. Unlike optax's, an all ``-inf`` row gives 0 (not NaN).

    Args:
      logits: unnormalised log-probabilities, ``(..., num_classes)``.
      labels: target distributions broadcastable to ``logits``.

    Returns:
      The per-example loss with shape ``logits.shape[:-1]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax.optax as losses
      >>> logits = jnp.array([[-jnp.inf, 0.0, 0.0], [-jnp.inf, -jnp.inf, -jnp.inf]])
      >>> labels = jnp.array([[0.0, 0.5, 0.5], [1.0, 0.0, 0.0]])
      >>> with jnp.printoptions(precision=4):
      ...     print(losses.safe_softmax_cross_entropy(logits, labels))
      [0.6931 0.    ]
    """
    return _soft_cross_entropy(logits, labels, -1, None)


# ------------------------------------------------------ integer-label cross-entropy


def _label_hit(labels, shape, axis):
    """Boolean "class == label" along ``axis``, fused into its consumer (never stored)."""
    c = shape[axis]
    labels = jnp.expand_dims(jnp.where(labels < 0, labels + c, labels), axis)
    return jax.lax.broadcasted_iota(labels.dtype, shape, axis) == labels


def _int_ce_forward(x, labels, where, axis):
    """``(loss, s, m, posinf)``: the loss with ``keepdims`` and the per-row statistics."""
    shifted, s, m, posinf = _row_stats(x, where, axis)
    idx = jnp.expand_dims(labels, axis)
    # optax scores the label's raw logit (even a masked one); an out-of-range label
    # gathers NaN (mode "fill"), which poisons that position as bad input should.
    x_label = jnp.take_along_axis(num.upcast(x), idx, axis=axis, mode="fill")
    log_s = num.safe_log(s)
    loss = (m + log_s) - x_label
    # A +inf row: the label's share is 1/k if it is one of the k +inf entries, else 0.
    s_label = jnp.take_along_axis(shifted, idx, axis=axis, mode="fill")
    loss = jnp.where(posinf, log_s - s_label, loss)
    loss = jnp.where(s > 0, loss, 0.0)  # empty row: nothing to score
    return loss, s, m, posinf


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _int_ce(x, labels, where, axis):
    loss = _int_ce_forward(x, labels, where, axis)[0]
    return jnp.squeeze(loss, axis).astype(x.dtype)


@functools.partial(jax.checkpoint, static_argnums=(7,), prevent_cse=False)
def _int_ce_tangent(x, labels, where, m, log_s, posinf, tx, axis):
    # d/dx = softmax(x) - onehot(label); the one-hot is an iota comparison fused into
    # the elementwise expression, and p is recomputed from the per-row (m, log s).
    acc = num.acc_dtype(x.dtype)
    p = jnp.exp(_reshift(x, where, m, posinf) - log_s)
    coef = p - _label_hit(labels, x.shape, axis).astype(acc)
    return jnp.sum(coef * tx.astype(acc), axis=axis, keepdims=True)


def _int_ce_jvp(axis, primals, tangents):
    x, labels, where = primals
    tx = tangents[0]
    loss, s, m, posinf = _int_ce_forward(x, labels, where, axis)
    out = jnp.squeeze(loss, axis).astype(x.dtype)
    if _is_zero(tx):
        return out, jnp.zeros_like(out)
    t = _int_ce_tangent(x, labels, where, m, num.safe_log(s), posinf, tx, axis)
    t = jnp.where(s > 0, t, 0.0)
    return out, jnp.squeeze(t, axis).astype(out.dtype)


_int_ce.defjvp(_int_ce_jvp, symbolic_zeros=True)


def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy with integer labels, as optax's function of the same name.

    .. math::
        \ell = \log \sum_{k} e^{x_k} - x_y

    with the log-sum-exp over the classes ``where`` keeps. Equal to optax's value and
    gradient wherever those are finite; an empty row (all masked or all ``-inf``) gives
    0 with zero gradient instead of NaN, a label on a ``-inf`` logit gives ``+inf``
    (as optax) with a finite gradient, and ``+inf`` logits share the mass evenly.
    Like optax, a label on a class masked by ``where`` is scored with that class's
    raw logit, negative labels count from the end (``-1`` is the last class), and a
    label outside ``[-C, C)`` gives NaN. No one-hot ``(N, C)`` matrix is built: the
    gradient ``softmax(x) - onehot(y)`` is one fused elementwise pass.

    Args:
      logits: unnormalised log-probabilities, e.g. ``(batch, num_classes)``.
      labels: integer class indices with ``logits``' shape without ``axis``.
      axis: the class axis, or a tuple of axes; with a tuple, the classes are the
        flattened slice over those axes (in the given order) and a label is a flat
        index into it (``jnp.ravel_multi_index``).
      where: boolean mask of the classes to include, of ``logits.shape`` or of the
        batch shape (a per-example mask, expanded along ``axis`` as in optax).

    Returns:
      The per-example loss, ``labels``' shape, in ``logits``' dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax.optax as losses
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> with jnp.printoptions(precision=4):
      ...     print(losses.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1])))
      [0.2761 2.9518]
      >>> padded = jnp.full((1, 3), -jnp.inf)  # optax: nan
      >>> losses.softmax_cross_entropy_with_integer_labels(padded, jnp.array([0]))
      Array([0.], dtype=float32)
    """
    x = _check_float_logits(logits)
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"`labels` must be integers, got dtype {labels.dtype}.")
    if isinstance(axis, (tuple, list)):
        axes = check.axes(tuple(axis), x.ndim)
    elif isinstance(axis, int):
        axes = (check.single_axis(axis, x.ndim),)
    else:
        raise TypeError(f"`axis` must be an int or a tuple of ints, got {axis!r}.")
    where = _prepare_where(where, x.ndim, axes, x.shape)
    if len(axes) > 1:
        # Classes are the flattened slice over `axes` in the given order (optax's rule).
        batch = tuple(a for a in range(x.ndim) if a not in axes)
        flat = [x.shape[a] for a in batch] + [-1]
        if where is not None:
            where = jnp.broadcast_to(where, x.shape)
            where = jnp.transpose(where, batch + axes).reshape(flat)
        x = jnp.transpose(x, batch + axes).reshape(flat)
        axis_ = x.ndim - 1
    else:
        axis_ = axes[0]
    batch_shape = x.shape[:axis_] + x.shape[axis_ + 1 :]
    try:
        labels = jnp.broadcast_to(labels, batch_shape)
    except ValueError:
        raise ValueError(
            f"`labels` has shape {labels.shape}; expected {batch_shape} (the logits' shape "
            f"{jnp.shape(logits)} without the class axis {axis})."
        ) from None
    return _int_ce(x, labels, where, axis_)


# ------------------------------------------------------------------ sigmoid losses


def sigmoid_binary_cross_entropy(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
    r"""Element-wise sigmoid cross-entropy, as ``optax.losses.sigmoid_binary_cross_entropy``.

    .. math::
        \ell = -y \log \sigma(x) - (1 - y) \log (1 - \sigma(x))

    computed with ``log σ(x)`` and ``log σ(-x)``. Equal to optax wherever optax is
    finite; at ``x = ±inf`` with the matching hard label (optax: NaN) the loss is 0,
    and every gradient is finite: ``σ(x) - y`` with respect to ``logits``; with respect
    to ``labels`` it is ``-x`` at finite logits and taken as 0 at ``±inf``.

    Args:
      logits: logits of the positive class (any shape).
      labels: targets in ``[0, 1]`` broadcastable to ``logits`` (cast to its dtype).

    Returns:
      The element-wise loss, broadcast shape, ``logits``' dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax.optax as losses
      >>> x, y = jnp.array([0.0, jnp.inf]), jnp.array([1.0, 1.0])  # optax: [0.6931, nan]
      >>> with jnp.printoptions(precision=4):
      ...     print(losses.sigmoid_binary_cross_entropy(x, y))
      [0.6931 0.    ]

    References:
      Goodfellow et al., `Deep Learning
      <http://www.deeplearningbook.org/contents/prob.html>`_, 2016.
    """
    x = _check_float_logits(logits)
    dtype = x.dtype
    y = jnp.asarray(labels).astype(dtype)
    acc = num.acc_dtype(dtype)
    x, y = jnp.broadcast_arrays(x.astype(acc), y.astype(acc))
    return _bce(x, _freeze_at_inf(x, y)).astype(dtype)


def _freeze_at_inf(x: jax.Array, y: jax.Array) -> jax.Array:
    """``y`` with no gradient where ``x`` is infinite (there ``∂ℓ/∂y = ∓x`` is infinite)."""
    return jnp.where(jnp.isfinite(x), y, jax.lax.stop_gradient(y))


def _bce(x: jax.Array, y: jax.Array) -> jax.Array:
    return -_times(y, jax.nn.log_sigmoid(x)) - _times(1.0 - y, jax.nn.log_sigmoid(-x))


def sigmoid_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: ArrayLike | None = None,
    gamma: ArrayLike = 2.0,
) -> jax.Array:
    r"""Sigmoid focal loss, as ``optax.losses.sigmoid_focal_loss``.

    .. math::
        \ell = -\alpha_t (1 - p_t)^\gamma \log p_t, \quad
        1 - p_t = (1 - y)\,\sigma(x) + y\,\sigma(-x), \quad
        \alpha_t = \alpha y + (1 - \alpha)(1 - y)

    with the modulating factor computed in log space (as optax does since 0.2.5), so
    soft labels in ``[0, 1]`` work. Equal to optax wherever optax is finite; at
    ``x = ±inf`` the value is its limit (0 or ``+inf``) and the gradient with respect
    to ``logits`` is finite (optax: NaN), namely ``α_t (1 - p_t)^γ (σ(x) - y)``; the
    gradient with respect to ``labels`` is taken as 0 at ``±inf`` logits.

    Args:
      logits: logits of the positive class (any shape).
      labels: targets in ``[0, 1]`` broadcastable to ``logits``.
      alpha: optional weight of the positive class in ``(0, 1)``.
      gamma: focusing exponent ``γ >= 0``.

    Returns:
      The element-wise loss, broadcast shape, ``logits``' dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax.optax as losses
      >>> x, y = jnp.array([0.0, -jnp.inf]), jnp.array([1.0, 0.0])  # optax: [0.1733, nan]
      >>> with jnp.printoptions(precision=4):
      ...     print(losses.sigmoid_focal_loss(x, y))
      [0.1733 0.    ]

    References:
      Lin et al., `Focal Loss for Dense Object Detection
      <https://arxiv.org/abs/1708.02002>`_, 2017.
    """
    x = _check_float_logits(logits)
    dtype = x.dtype
    y = jnp.asarray(labels).astype(dtype)
    acc = num.acc_dtype(dtype)
    x, y = jnp.broadcast_arrays(x.astype(acc), y.astype(acc))
    y = _freeze_at_inf(x, y)
    ce = _bce(x, y)
    finite = jnp.isfinite(x)
    # At finite x: log(1 - p_t) exactly as optax computes it (same value and gradient).
    xf = jnp.where(finite, x, 0.0)
    log_1m_pt = jax.scipy.special.logsumexp(
        jnp.stack([jax.nn.log_sigmoid(xf), jax.nn.log_sigmoid(-xf)], axis=-1),
        axis=-1,
        b=jnp.stack([1.0 - y, y], axis=-1),
    )
    # At x = ±inf: the limit 1 - p_t = 1 - y (or y), held constant: the term
    # ce · d(1 - p_t)^γ/dx is 0 · inf there and its limit is 0.
    limit = jax.lax.stop_gradient(jnp.log(jnp.where(x > 0, 1.0 - y, y)))
    log_1m_pt = jnp.where(finite, log_1m_pt, limit)
    gamma = jnp.asarray(gamma)
    # (1 - p_t)^γ with 0^0 = 1 and 0^γ = 0 (optax: exp(γ · -inf), NaN at γ = 0).
    empty = log_1m_pt == -jnp.inf
    weight = jnp.where(
        empty,
        (gamma == 0).astype(x.dtype),
        jnp.exp(gamma * jnp.where(empty, 0.0, log_1m_pt)),
    )
    loss = _times(weight, ce)
    if alpha is not None:
        loss = (alpha * y + (1.0 - alpha) * (1.0 - y)) * loss
    return loss.astype(dtype)

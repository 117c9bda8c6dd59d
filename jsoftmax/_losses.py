"""Classification losses with PyTorch semantics: cross-entropy, NLL, BCE-with-logits, focal.

``cross_entropy`` and ``nll_loss`` reproduce ``torch.nn.functional.cross_entropy`` /
``nll_loss`` (class weights with PyTorch's weighted mean, label smoothing with weights,
soft targets, ``ignore_index``, any class axis) with a few documented deviations (a fully
ignored batch gives 0, bad labels give NaN). Both carry a ``jax.custom_vjp``.

The cross-entropy derivative is cheap enough to produce in the forward pass: with
``e = exp(z - max z)`` and ``s = Σ e``, ``∂l/∂z = α·e/s - β·onehot(y) - γ·w·[admissible]``
for per-position scalars ``α, β, γ``. The forward pass therefore keeps either ``e`` (one
``exp`` per element in total; residual mode ``"exp"``) or only the per-position
logsumexp and recomputes ``e`` in the backward pass (residual mode ``"lse"``: nothing
``(N, C)``-sized is stored besides the inputs). The backward pass multiplies by the
per-position cotangent, so ``reduction="none"`` with any cotangent is exact, and the
reductions themselves are plain JAX outside the ``custom_vjp`` (so ``sample_weight`` and
the weighted-mean denominator are differentiated by JAX itself).

Bad labels are caught in two ways: the loss *and the gradient* of a bad
position are NaN, and a ``checkify.debug_check`` (see ``_checks.py``) names the first
bad position when the caller uses ``jsoftmax.checked``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jsoftmax import _compat, _impl
from jsoftmax import _numerics as num
from jsoftmax import _validate as check
from jsoftmax._checks import label_check

IMPLS = ("auto", "xla", "pallas")
CLASS_WEIGHT_METHODS = ("inverse", "inverse_sqrt", "effective_number")

# Which (N, C) residual the cross-entropy forward pass keeps: "exp" stores exp(z - max)
# (one exp per element for forward + backward; the best trade on CPU, where exp
# throughput is the cost), "lse" stores nothing of size (N, C) besides the inputs and
# recomputes exp in the backward pass (less memory traffic: the better trade where
# bandwidth is the cost, and for half-precision inputs, whose float32 exp would be
# twice their size). "auto" decides per call from the dtype and the backend.
_RESIDUAL = "auto"


# ------------------------------------------------------------------------ helpers


def _batch_axes(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != axis)


def _along(vec: jax.Array, ndim: int, axis: int) -> jax.Array:
    """Lay a per-class vector along ``axis`` of a rank-``ndim`` array."""
    return vec.reshape((-1,) + (1,) * (ndim - 1 - axis))


# ---------------------------------------------------------------- class-axis sharding


def _axis_size(axis_name: Hashable | None) -> int:
    return 1 if axis_name is None else lax.axis_size(axis_name)


def _local_labels(y: jax.Array, c_local: int, axis_name: Hashable | None):
    """``(local index, owned)``: a global label as an index into this shard's classes."""
    if axis_name is None:
        return y, None
    yl = y - lax.axis_index(axis_name) * c_local
    return yl, (yl >= 0) & (yl < c_local)


def _gather_label(values: jax.Array, idx: jax.Array, owned, axis_name, axis=None):
    """Entry of ``values`` at each label; under ``axis_name`` only the owning shard adds it.

    With ``axis=None`` ``values`` is a per-class vector indexed by ``idx``; otherwise it
    is taken along ``axis`` with ``idx`` in keepdims layout.
    """
    c = values.shape[0 if axis is None else axis]
    idx = jnp.clip(idx, 0, c - 1)
    if axis is None and _compat.explicit_spec(idx) is not None:
        # Explicitly sharded labels: a replicated vector gathered per shard (JAX asks
        # for the output sharding; it is the labels').
        mesh = _compat.explicit_spec(idx)[0]
        values = _compat.reshard(values, NamedSharding(mesh, P()))
        v = values.at[idx].get(out_sharding=jax.typeof(idx).sharding)
    elif axis is None:
        v = values[idx]
    elif _class_axis_sharded(values, axis):
        # Explicitly sharded classes: a masked sum partitions (a gather along a sharded
        # axis has no sharding rule in explicit mode); one compare and add per entry.
        hit = lax.broadcasted_iota(idx.dtype, values.shape, axis % values.ndim) == idx
        v = jnp.sum(jnp.where(hit, values, jnp.zeros((), values.dtype)), axis=axis, keepdims=True)
    else:
        v = jnp.take_along_axis(values, idx, axis=axis, mode="clip")
    if axis_name is not None:
        v = lax.psum(jnp.where(owned, v, jnp.zeros((), v.dtype)), axis_name)
    return v


def _class_axis_sharded(values: jax.Array, axis: int) -> bool:
    """Whether ``values``' class ``axis`` carries an explicit sharding (explicit mode)."""
    found = _compat.explicit_spec(values)
    return found is not None and found[1][axis % values.ndim] is not None


def _csum(v: jax.Array, axis: int, axis_name: Hashable | None) -> jax.Array:
    s = jnp.sum(v, axis=axis, keepdims=True)
    return s if axis_name is None else lax.psum(s, axis_name)


# ------------------------------------------------------------- cross-entropy core


class _CE(NamedTuple):
    """Static configuration of the cross-entropy core (hashable)."""

    axis: int
    ignore_index: int
    smoothing: float
    z_loss: float
    soft: bool
    residual: str
    axis_name: Hashable | None


def _smoothing_terms(cfg: _CE, u: jax.Array, wk):
    """``(adm, γ)``: admissible classes and the per-position smoothing mass ``ε / C_adm``.

    Smoothing spreads ``ε`` uniformly over the admissible classes (not masked, logit not
    ``-inf``). Without masks that is PyTorch's ``ε / C``; with masks no mass lands on a
    class that cannot be predicted, which would make the loss infinite.
    """
    adm = u > -jnp.inf
    cnt = _csum(adm.astype(u.dtype), cfg.axis, cfg.axis_name)
    gam = cfg.smoothing / jnp.where(cnt > 0, cnt, 1.0)
    return adm, gam


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ce_core(cfg: _CE, x, t, w, where, bad):
    """Per-position cross-entropy (accumulation dtype), keepdims layout along ``cfg.axis``."""
    return _ce_fwd(cfg, x, t, w, where, bad)[0]


def _ce_fwd(cfg: _CE, x, t, w, where, bad):
    a, eps, lam, name = cfg.axis, cfg.smoothing, cfg.z_loss, cfg.axis_name
    c_local = x.shape[a]
    u = num.masked_logits(x, where=where)
    acc = u.dtype
    m = jnp.max(u, axis=a, keepdims=True)
    if name is not None:
        m = lax.pmax(m, name)
    # An empty row (every class masked) keeps m = 0 so that no -inf - -inf is formed.
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    z = u - m
    e = jnp.exp(z)
    s = _csum(e, a, name)
    nonempty = s > 0
    log_s = jnp.log(jnp.where(nonempty, s, 1.0))
    lse_safe = jnp.where(nonempty, m + log_s, 0.0)
    wk = None if w is None else _along(w.astype(acc), x.ndim, a)
    bad_k = jnp.expand_dims(bad, a)
    gam = None

    if cfg.soft:
        q = t.astype(acc)
        if eps > 0:
            adm, gam = _smoothing_terms(cfg, u, wk)
            q = (1.0 - eps) * q + jnp.where(adm, gam, 0.0)
        wq = q if wk is None else q * wk
        big_q = _csum(wq, a, name)
        # wq == 0 on a -inf logit contributes 0 (not 0 * inf); wq > 0 there gives +inf,
        # the true cross-entropy of a target the model cannot produce.
        cross = _csum(jnp.where(wq == 0, 0.0, wq * z), a, name)
        loss = big_q * log_s - cross
        alpha = big_q
        if lam > 0:
            # An empty row (every class masked; its target must be all zero) has no
            # normaliser to regularise: its z-term is 0, not lse² = inf.
            loss = loss + lam * lse_safe**2
            alpha = alpha + 2.0 * lam * lse_safe
        rowmask = jnp.where(bad_k, jnp.nan, 1.0).astype(acc)
        loss = jnp.where(bad_k, jnp.nan, loss)
        aux = (alpha, big_q)
    else:
        yk = jnp.expand_dims(t, a)
        valid = yk != cfg.ignore_index
        yl, owned = _local_labels(yk, c_local, name)
        nll = log_s - _gather_label(z, yl, owned, name, axis=a)
        wy = 1.0 if w is None else _gather_label(w.astype(acc), yl, owned, name)
        loss = (1.0 - eps) * wy * nll
        alpha = (1.0 - eps) * wy * jnp.ones_like(nll)
        if eps > 0:
            adm, gam = _smoothing_terms(cfg, u, wk)
            zs = jnp.where(adm, z, 0.0)
            if wk is None:
                big_w = _csum(adm.astype(acc), a, name)
                cross = _csum(zs, a, name)
            else:
                big_w = _csum(jnp.where(adm, wk, 0.0), a, name)
                cross = _csum(wk * zs, a, name)
            # Σ_adm w_c (lse - z_c) as a sum of non-negative terms (no cancellation).
            loss = loss + gam * (big_w * log_s - cross)
            alpha = alpha + gam * big_w
        if lam > 0:
            loss = loss + lam * wy * lse_safe**2
            alpha = alpha + 2.0 * lam * wy * lse_safe
        rowmask = jnp.where(bad_k, jnp.nan, valid.astype(acc))
        loss = jnp.where(bad_k, jnp.nan, jnp.where(valid, loss, 0.0))
        aux = (alpha, yl, owned, valid, nll, wy)

    keep_e = cfg.residual == "exp"
    res = (x, t, w, where, m, log_s, lse_safe, rowmask, gam, aux, e if keep_e else None)
    return loss, res


def _ce_bwd(cfg: _CE, res, g):
    x, t, w, where, m, log_s, lse_safe, rowmask, gam, aux, e = res
    a, eps, lam = cfg.axis, cfg.smoothing, cfg.z_loss
    acc = m.dtype
    c_local = x.shape[a]
    gk = g.astype(acc) * rowmask  # 0 at ignored positions, NaN at bad ones
    wk = None if w is None else _along(w.astype(acc), x.ndim, a)
    s_inv = jnp.exp(-log_s)

    def probs_times(coef):
        # p * coef with p = softmax, from the stored exp or recomputed from the inputs.
        if e is not None:
            return e * (coef * s_inv)
        z = num.masked_logits(x, where=where) - m
        return jnp.exp(z - log_s) * coef

    need_z = eps > 0 or cfg.soft
    z = num.masked_logits(x, where=where) - m if need_z else None
    adm = None if z is None else z > -jnp.inf

    if cfg.soft:
        alpha, big_q = aux
        q = t.astype(acc)
        if eps > 0:
            q = (1.0 - eps) * q + jnp.where(adm, gam, 0.0)
        wq = q if wk is None else q * wk
        dx = probs_times(gk * alpha) - gk * wq
        nll_c = jnp.where(adm, log_s - z, 0.0)  # -log p_c; its +inf at masked classes is cut
        dq = (gk * (1.0 - eps)) * (nll_c if wk is None else wk * nll_c)
        dw = None
        if w is not None:
            dw = jnp.sum(gk * jnp.where(q == 0, 0.0, q * nll_c), axis=_batch_axes(x.ndim, a))
        return dx.astype(x.dtype), dq.astype(t.dtype), _cast(dw, w), None, None

    alpha, yl, owned, valid, nll, wy = aux
    beta = gk * (1.0 - eps) * wy
    dx = probs_times(gk * alpha)
    if eps > 0:
        dx = dx - (gk * gam) * jnp.where(adm, 1.0 if wk is None else wk, 0.0)
    # The one-hot term as an in-place scatter of one value per position (a compare-and-
    # select over every element would cost a full pass); labels of other shards and
    # ignored positions (label possibly out of range) are dropped.
    dx = _scatter_label(dx, yl, -beta, a, drop=~valid if owned is None else ~(valid & owned))
    dw = None
    if w is not None:
        per = (1.0 - eps) * nll
        if lam > 0:
            per = per + lam * lse_safe**2
        per = jnp.where(valid, gk * per, 0.0)
        hit = valid if owned is None else valid & owned
        idx = jnp.where(hit, yl, c_local)  # out-of-range rows are dropped by the scatter
        if _compat.explicit_spec(idx) is None:
            dw = jnp.zeros((c_local,), acc).at[idx.reshape(-1)].add(per.reshape(-1), mode="drop")
        else:
            # Explicitly sharded positions: a scatter across shards has no sharding rule;
            # the one-hot form is a reduction over the positions, which partitions.
            onehot = idx[..., None] == lax.broadcasted_iota(idx.dtype, (c_local,), 0)
            dw = jnp.sum(jnp.where(onehot, per[..., None], 0.0), axis=tuple(range(idx.ndim)))
        if eps > 0:
            smooth = (gk * gam) * jnp.where(adm, log_s - z, 0.0)
            dw = dw + jnp.sum(smooth, axis=_batch_axes(x.ndim, a))
    return dx.astype(x.dtype), None, _cast(dw, w), None, None


def _scatter_label(dx, yk, values, axis, drop):
    """``dx`` plus ``values`` at each position's label along ``axis`` (keepdims ``yk``)."""
    c = dx.shape[axis]
    if _class_axis_sharded(dx, axis):
        # Explicitly sharded classes: the masked form of the scatter (see _gather_label).
        hit = (lax.broadcasted_iota(yk.dtype, dx.shape, axis % dx.ndim) == yk) & ~drop
        return dx + jnp.where(hit, values.astype(dx.dtype), jnp.zeros((), dx.dtype))
    idx = [lax.broadcasted_iota(yk.dtype, yk.shape, d) for d in range(dx.ndim)]
    idx[axis] = jnp.where(drop, c, yk)
    return dx.at[tuple(idx)].add(values.astype(dx.dtype), mode="drop")


def _cast(dw, w):
    return None if dw is None else dw.astype(w.dtype)


_ce_core.defvjp(_ce_fwd, _ce_bwd)


def _residual_mode(dtype: Any) -> str:
    if _RESIDUAL != "auto":
        return _RESIDUAL
    half = num.acc_dtype(dtype) != jnp.dtype(dtype)
    return "exp" if not half and jax.default_backend() == "cpu" else "lse"


# --------------------------------------------------------------------- reductions


def _reduce(
    per: jax.Array, den_terms: jax.Array | None, sw, reduction: str, normalizer=None
) -> jax.Array:
    """Apply ``sample_weight`` and the reduction (``mean``: see ``_numerics.mean_of``).

    ``den_terms`` are the per-position denominator weights (``w_y`` at kept positions, 0
    at ignored ones, NaN at bad ones) or ``None`` for a count of all positions; a
    ``normalizer`` replaces their sum.
    """
    if sw is not None:
        per = per * sw.astype(per.dtype)
    if reduction == "none":
        return per
    total = jnp.sum(per)
    if reduction == "sum":
        return total
    den = None
    if normalizer is None:
        if den_terms is None:
            den_terms = jnp.ones_like(per)
        if sw is not None:
            den_terms = den_terms * sw.astype(per.dtype)
        den = jnp.sum(jnp.broadcast_to(den_terms, per.shape))
    return num.mean_of(total, den, normalizer)


def _int_label_masks(
    labels, ignore_index, n_classes, where, x_shape, axis, axis_name, loss_name, logits=None
) -> tuple[jax.Array, jax.Array]:
    """``(valid, bad)`` per position; emits the label debug check.

    With ``logits`` given, a label whose logit is ``-inf`` is bad too: ``-inf`` masks a
    class exactly as ``where=False`` does, so both get the same NaN poison
    instead of one giving NaN and the other ``+inf``.
    """
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= n_classes))
    expected = f"0 <= label < {n_classes} or label == ignore_index ({ignore_index})"
    if where is not None or logits is not None:
        yl, owned = _local_labels(jnp.expand_dims(labels, axis), x_shape[axis], axis_name)
    if where is not None:
        mask = jnp.broadcast_to(where, x_shape).astype(jnp.int32)
        on = _gather_label(mask, yl, owned, axis_name, axis=axis)
        bad = bad | (valid & (jnp.squeeze(on, axis) == 0))
        expected += ", on a class that `where` allows"
    if logits is not None:
        # Gather the label's logit (N values) and compare, rather than gathering from a
        # full-size comparison of the logits.
        z_y = _gather_label(logits, yl, owned, axis_name, axis=axis)
        bad = bad | (valid & (jnp.squeeze(z_y, axis) == -jnp.inf))
        expected += ", whose logit is not -inf"
    if axis_name is None:
        label_check(bad, labels, loss=loss_name, expected=expected)
    return valid, bad


# ------------------------------------------------------------------- cross-entropy


def _choose_impl(impl: str, unsupported: list[str]) -> str:
    check.choice(impl, "impl", IMPLS)
    if impl == "xla":
        return "xla"
    if impl == "pallas":
        if unsupported:
            raise ValueError(
                f"impl='pallas' does not support {', '.join(unsupported)}; "
                "use impl='xla' (or 'auto', which falls back to it)."
            )
        return "pallas"
    # "auto": the Pallas kernel only where it is proven (compiled and measured faster).
    return _impl.resolve_auto("cross_entropy", supported=not unsupported)


_PALLAS_CLASS_SHARDED = (
    "impl='pallas' with the logits sharded along the class axis (mesh axes {axes}): the "
    "kernels have no cross-shard logsumexp. Shard the logits over their other (row) "
    "dimensions only, or use impl='xla' inside `jax.shard_map` with `axis_name` naming "
    "those axes (vocab-parallel, no gather)."
)


def _pallas_layout(x, labels, axis):
    """``(mesh, logits spec)`` where the inputs are explicitly sharded, else ``None``.

    Checked before any other work on the logits: a sharded class axis is an error for
    the kernels (their logsumexp is per device).
    """
    found = _compat.explicit_spec(x)
    if found is None:
        found = _compat.explicit_spec(labels)
        if found is not None:
            found = (found[0], (*found[1][:axis], None, *found[1][axis:]))
    if found is not None and found[1][axis] is not None:
        entry = found[1][axis]
        axes = entry if isinstance(entry, tuple) else (entry,)
        raise ValueError(_PALLAS_CLASS_SHARDED.format(axes=axes))
    return found


def _pallas_rows(layout, x, labels, weight, axis, ignore_index, eps, lam, acc):
    """The kernel's per-position losses (times ``w_y``); per row shard under a layout.

    In explicit sharding mode a ``pallas_call`` cannot be partitioned (it would need
    every operand whole), so the rows run under ``shard_map`` on the logits' layout,
    and the class weights are picked there too (a gather of a replicated vector by
    sharded labels has no sharding rule).
    """
    local = functools.partial(
        _kernel_rows, axis=axis, ignore_index=ignore_index, eps=eps, lam=lam, acc=acc
    )
    if layout is None:
        return local(x, labels, weight)
    mesh, spec = layout
    x_spec, row_spec = P(*spec), P(*spec[:axis], *spec[axis + 1 :])
    args = [(x, x_spec), (labels, row_spec)] + ([] if weight is None else [(weight, P())])
    xs = [_compat.reshard(a, NamedSharding(mesh, sp)) for a, sp in args]
    # check_vma=False: a pallas_call's outputs carry no varying-axes type; shard_map
    # then sums the class weights' cotangent over the shards itself.
    smap = jax.shard_map(
        lambda *a: local(*a, *([None] * (3 - len(a)))),
        mesh=mesh,
        in_specs=tuple(sp for _, sp in args),
        out_specs=row_spec,
        check_vma=False,
    )
    return smap(*xs)


def _kernel_rows(x, labels, weight, axis, ignore_index, eps, lam, acc):
    from jsoftmax.kernels import cross_entropy as kernel_cross_entropy

    c = x.shape[axis]
    x2 = jnp.moveaxis(x, axis, -1).reshape(-1, c)
    rows = kernel_cross_entropy(
        x2, labels.reshape(-1), ignore_index=ignore_index, label_smoothing=eps, z_loss=lam
    )
    per = rows.reshape(labels.shape).astype(acc)
    if weight is not None:
        per = per * weight.astype(acc)[jnp.clip(labels, 0, c - 1)]
    return per


def cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int = -1,
    weight: ArrayLike | None = None,
    sample_weight: ArrayLike | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    where: ArrayLike | None = None,
    reduction: str = "mean",
    normalizer: ArrayLike | None = None,
    axis_name: Hashable | None = None,
    impl: str = "auto",
) -> jax.Array:
    r"""Softmax cross-entropy with PyTorch's semantics, for integer or probability labels.

    With ``p = softmax(logits)`` over ``axis``, class weights ``w`` and smoothing ``ε``,
    the loss of a position with integer label ``y`` is

    .. math::
        l = (1-ε)\, w_y (-\log p_y) + \frac{ε}{C} \sum_c w_c (-\log p_c)
            + λ\, w_y \operatorname{lse}(z)^2

    and with probability labels ``q`` it is
    :math:`l = -\sum_c w_c \tilde q_c \log p_c + λ \operatorname{lse}(z)^2`,
    :math:`\tilde q = (1-ε) q + ε / C`. ``reduction="mean"`` divides the
    (``sample_weight``-weighted) sum by :math:`\sum_i s_i w_{y_i}` over non-ignored
    positions (PyTorch's weighted mean), or by :math:`\sum_i s_i` for probability labels.

    Differences from ``torch.nn.functional.cross_entropy``:

    * ``mean`` over a batch whose denominator is 0 (every position ignored, or all their
      weights 0) is ``0.0`` with a zero gradient, not NaN.
    * A bad label (``< 0`` or ``>= C`` and not ``ignore_index``, or on a class masked by
      ``where`` or by a ``-inf`` logit) makes that position's loss and its logits'
      gradient NaN (PyTorch raises on CPU); ``jsoftmax.checked`` turns it into an error
      naming the position.
    * Extras: ``sample_weight``, ``z_loss``, ``where``, ``axis_name``. With ``where``
      (or ``-inf`` logits) label smoothing spreads ``ε`` over the admissible classes only
      (``C`` is their count). The z-loss of a position is weighted by ``w_y`` like the
      rest of it, so ``mean`` stays a weighted mean.
    * The gradient with respect to ``weight`` is computed (PyTorch does not implement it);
      the one with respect to probability labels is 0 at masked classes (it is +inf).

    Args:
      logits: scores, any float dtype, class axis ``axis``. PyTorch's ``(N, C, d1, ...)``
        layout is ``axis=1``.
      labels: integer class indices with the logits' shape minus the class axis, or float
        class probabilities with exactly the logits' shape.
      axis: the class axis.
      weight: per-class weights, shape ``(C,)``.
      sample_weight: per-position weights, broadcastable to the integer-label shape;
        multiplied into the numerator and the denominator of ``mean`` (and into
        ``"none"``'s output).
      ignore_index: integer label whose positions contribute nothing (loss, gradient and
        denominator). Integer labels only.
      label_smoothing: ``ε`` in ``[0, 1]`` (a Python number).
      z_loss: ``λ >= 0``, adds ``λ·logsumexp(logits)²`` per non-ignored position (PaLM).
      where: boolean class mask broadcastable to ``logits``; masked classes are left out
        of the normaliser. A label on a masked class is bad input.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      normalizer: optional denominator for ``reduction="mean"`` in place of the local one
        (a positive Python number, or a traced scalar, e.g. the ``psum`` over devices or
        the sum over an accumulation step's micro-batches of :func:`loss_denominator`),
        so that a mean over several micro-batches or devices is the exact global mean. A
        traced 0 gives 0.0 (as an all-ignored batch), a traced negative value NaN.
      axis_name: inside ``shard_map``, the mesh axis over which ``logits`` (and ``where``)
        are sharded along the class axis; the loss is then the global one (global max by
        ``pmax``, sum-exp by ``psum``, the label picked on the shard that owns it).
        ``labels`` hold global class ids; ``weight`` may be the full ``(C,)`` vector or
        this shard's slice.
      impl: ``"xla"`` (pure JAX), ``"pallas"`` (``jsoftmax.kernels.cross_entropy`` per
        row; integer labels without ``where``/``axis_name``; ``weight`` only without
        label smoothing) or ``"auto"``: the kernel only on a platform where it is proven
        -- compiled for every target in the compile matrix *and* measured faster than
        XLA on that hardware. No device measurement exists yet, so ``"auto"`` is
        ``"xla"`` on every platform for now.

    Returns:
      A scalar for ``"mean"``/``"sum"``, else the per-position losses (labels' shape for
      integer labels, the logits' shape minus the class axis for probabilities). Float32
      for float32/bfloat16/float16 logits, float64 for float64. Gradients have the
      logits' dtype.

    Raises:
      ValueError, TypeError: at trace time, for shapes, dtypes or options that do not fit.

    Examples:
      >>> import jsoftmax as jsm
      >>> logits = jnp.array([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
      >>> jsm.cross_entropy(logits, jnp.array([0, 2]))
      Array(0.20557..., dtype=float32)
      >>> jsm.cross_entropy(logits, jnp.array([0, -100]), reduction="none")
      Array([0.24131..., 0.        ], dtype=float32)

    References:
      Szegedy et al. 2016, "Rethinking the Inception Architecture" (label smoothing),
      https://arxiv.org/abs/1512.00567. Chowdhery et al. 2022, "PaLM" (z-loss),
      https://arxiv.org/abs/2204.02311.
    """
    x, a = check.logits(logits, axis)
    labels, soft = check.labels_kind(labels, x.shape, a)
    batch = x.shape[:a] + x.shape[a + 1 :]
    ignore_index = check.ignore_index(ignore_index)
    eps = check.static_number(label_smoothing, "label_smoothing", lo=0.0, hi=1.0)
    lam = check.static_number(z_loss, "z_loss", lo=0.0)
    reduction = check.reduction(reduction)
    normalizer = check.normalizer(normalizer, reduction)
    where = check.where(where, x.shape)
    sw = check.sample_weight(sample_weight, batch)
    c_local = x.shape[a]
    n_classes = c_local * _axis_size(axis_name)
    lengths = (c_local,) if axis_name is None else (n_classes, c_local)
    weight = check.class_vector(weight, lengths)

    unsupported = []
    if soft:
        unsupported.append("probability labels")
    if where is not None:
        unsupported.append("`where`")
    if axis_name is not None:
        unsupported.append("`axis_name`")
    if weight is not None and eps > 0:
        unsupported.append("`weight` with label smoothing")
    if x.dtype == jnp.float64:
        unsupported.append("float64 logits")
    impl = _choose_impl(impl, unsupported)
    layout = _pallas_layout(x, labels, a) if impl == "pallas" else None

    # Per-class weights: the full vector for the denominator's w_y, this shard's slice for
    # the core.
    w_local = weight
    if weight is not None and axis_name is not None and weight.shape[0] != c_local:
        w_local = lax.dynamic_slice_in_dim(weight, lax.axis_index(axis_name) * c_local, c_local)

    acc = num.loss_dtype(x.dtype)
    if soft:
        bad = jnp.zeros(batch, bool)
        if where is not None:
            stray = _csum(jnp.where(where, 0, (labels != 0).astype(jnp.int32)), a, axis_name)
            bad = jnp.squeeze(stray, a) > 0
            if axis_name is None:
                label_check(
                    bad,
                    jnp.squeeze(stray, a),
                    loss="cross_entropy",
                    expected="no probability mass on classes masked by `where` "
                    "(the label shown is the number of such classes)",
                )
        cfg = _CE(a, ignore_index, eps, lam, True, _residual_mode(x.dtype), axis_name)
        per = jnp.squeeze(_ce_core(cfg, x, labels, w_local, where, bad), a)
        den = jnp.where(bad, jnp.nan, 1.0).astype(acc)
        return _reduce(per, den, sw, reduction, normalizer)

    labels = check.widen_labels(labels)
    valid, bad = _int_label_masks(
        labels, ignore_index, n_classes, where, x.shape, a, axis_name, "cross_entropy", logits=x
    )

    def pallas_rows():
        per = _pallas_rows(layout, x, labels, weight, a, ignore_index, eps, lam, acc)
        # A bad label poisons the loss *and* the gradient, as on the XLA route.
        per = num.poison_cotangent(per, bad)
        return jnp.where(bad, jnp.nan, per)

    def xla_rows():
        cfg = _CE(a, ignore_index, eps, lam, False, _residual_mode(x.dtype), axis_name)
        return jnp.squeeze(_ce_core(cfg, x, labels, w_local, where, bad), a)

    if impl == "pallas":
        per = pallas_rows()
    elif impl == "auto":
        per = _impl.run_auto("cross_entropy", pallas=pallas_rows, xla=xla_rows)
    else:
        per = xla_rows()
    den = _den_terms(weight, labels, valid, bad, c_local, axis_name, acc)
    return _reduce(per, den, sw, reduction, normalizer)


def _den_terms(weight, labels, valid, bad, c_local, axis_name, acc):
    """Per-position denominator weights: ``w_y`` (1 without weights), 0 ignored, NaN bad."""
    if weight is None:
        wy = jnp.ones(labels.shape, acc)
    elif axis_name is not None and weight.shape[0] == c_local and _axis_size(axis_name) > 1:
        yl, owned = _local_labels(labels, c_local, axis_name)
        wy = _gather_label(weight.astype(acc), yl, owned, axis_name)
    else:
        wy = _gather_label(weight.astype(acc), labels, None, None)
    return jnp.where(bad, jnp.nan, jnp.where(valid, wy, 0.0))


def loss_denominator(
    labels: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    sample_weight: ArrayLike | None = None,
    ignore_index: int = -100,
) -> jax.Array:
    r"""The denominator that ``reduction="mean"`` divides by, for integer labels.

    .. math::
        d = \sum_i s_i\, w_{y_i}\, [y_i \ne \text{ignore\_index}]

    (``w ≡ 1`` without ``weight``, ``s ≡ 1`` without ``sample_weight``): exactly the
    local denominator of :func:`cross_entropy`, :func:`nll_loss` and
    :func:`linear_cross_entropy` with the same arguments, and, without ``weight``, of
    :func:`focal_loss`. Summed over the micro-batches of an accumulation step, or
    ``jax.lax.psum``-ed over data-parallel devices, and passed back as ``normalizer=``,
    it makes the mean of each piece add up to the mean over the whole batch, even when
    the pieces hold different numbers of valid tokens. Computed on device (no host sync).
    A label ``< 0`` that is not ``ignore_index``, or ``>= len(weight)``, makes the result
    NaN, as it makes the loss NaN.

    Args:
      labels: integer labels of any shape.
      weight: optional per-class weights, shape ``(C,)``.
      sample_weight: optional per-position weights broadcastable to ``labels``.
      ignore_index: label value that is left out.

    Returns:
      A float32 scalar (float64 if a weight is float64).

    Examples:
      >>> import jsoftmax as jsm
      >>> y = jnp.array([[0, 2, -100], [1, -100, -100]])
      >>> jsm.loss_denominator(y)
      Array(3., dtype=float32)
      >>> jsm.loss_denominator(y, weight=jnp.array([1.0, 2.0, 0.5]))
      Array(3.5, dtype=float32)
    """
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"`labels` must be integers, got dtype {labels.dtype} (with probability labels "
            "the mean divides by the number of positions, or the sum of `sample_weight`)."
        )
    labels = check.widen_labels(labels)
    ignore_index = check.ignore_index(ignore_index)
    sw = check.sample_weight(sample_weight, labels.shape)
    acc = jnp.float32
    weight = check.class_vector(weight, None)
    n_classes = None
    if weight is not None:
        n_classes = weight.shape[0]
        acc = num.acc_dtype(weight.dtype)
    if sw is not None:
        acc = jnp.promote_types(acc, num.acc_dtype(sw.dtype))
    valid = labels != ignore_index
    bad = valid & (labels < 0)
    if n_classes is not None:
        bad = bad | (valid & (labels >= n_classes))
    den = _den_terms(weight, labels, valid, bad, n_classes, None, acc)
    if sw is not None:
        den = den * sw.astype(acc)
    return jnp.sum(jnp.broadcast_to(den, labels.shape))


# ------------------------------------------------------------------------ NLL loss


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _nll_core(axis, ignore_index, lp, y, w, bad):
    return _nll_fwd(axis, ignore_index, lp, y, w, bad)[0]


def _nll_fwd(axis, ignore_index, lp, y, w, bad):
    acc = num.acc_dtype(lp.dtype)
    yk = jnp.expand_dims(y, axis)
    valid = yk != ignore_index
    lp_y = _gather_label(lp.astype(acc), yk, None, None, axis=axis)
    wy = 1.0 if w is None else _gather_label(w.astype(acc), yk, None, None)
    bad_k = jnp.expand_dims(bad, axis)
    loss = jnp.where(bad_k, jnp.nan, jnp.where(valid, -wy * lp_y, 0.0))
    rowmask = jnp.where(bad_k, jnp.nan, valid.astype(acc))
    return loss, (lp, yk, w, rowmask, valid, lp_y, wy)


def _nll_bwd(axis, ignore_index, res, g):
    lp, yk, w, rowmask, valid, lp_y, wy = res
    gk = g.astype(rowmask.dtype) * rowmask
    dlp = _scatter_label(jnp.zeros(lp.shape, gk.dtype), yk, -gk * wy, axis, drop=~valid)
    dlp = dlp.astype(lp.dtype)
    dw = None
    if w is not None:
        c = lp.shape[axis]
        idx = jnp.where(valid, yk, c)
        per = jnp.where(valid, -gk * lp_y, 0.0)
        dw = jnp.zeros((c,), per.dtype).at[idx.reshape(-1)].add(per.reshape(-1), mode="drop")
        dw = dw.astype(w.dtype)
    return dlp, None, dw, None


_nll_core.defvjp(_nll_fwd, _nll_bwd)


def nll_loss(
    log_probs: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int = -1,
    weight: ArrayLike | None = None,
    sample_weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: ArrayLike | None = None,
) -> jax.Array:
    r"""Negative log-likelihood of integer labels given log-probabilities (``torch`` semantics).

    .. math::
        l_i = -w_{y_i} \log p_{i, y_i}, \qquad
        \text{mean} = \frac{\sum_i s_i l_i}{\sum_i s_i w_{y_i}}

    over non-ignored positions (``s`` = ``sample_weight``). ``nll_loss(log_softmax(z))``
    equals ``cross_entropy(z)``. As in :func:`cross_entropy`, an all-ignored ``mean`` is
    0 with zero gradient, and a label ``< 0`` or ``>= C`` (not ``ignore_index``) gives
    NaN for that position and its gradient.

    Args:
      log_probs: log-probabilities, class axis ``axis`` (e.g. from ``log_softmax``).
      labels: integer labels with the shape of ``log_probs`` minus the class axis.
      axis: the class axis (``axis=1`` for PyTorch's ``(N, C, d1, ...)``).
      weight: per-class weights, shape ``(C,)``.
      sample_weight: per-position weights, in numerator and denominator of ``mean``.
      ignore_index: label value to skip.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      normalizer: optional denominator for ``reduction="mean"`` in place of the local one
        (a positive Python number, or a traced scalar, e.g. the ``psum`` over devices or
        the sum over an accumulation step's micro-batches of :func:`loss_denominator`),
        so that a mean over several micro-batches or devices is the exact global mean. A
        traced 0 gives 0.0 (as an all-ignored batch), a traced negative value NaN.

    Returns:
      The loss: float32 for float32/half inputs, float64 for float64; per-position for
      ``"none"``. The gradient has the dtype of ``log_probs``.

    Examples:
      >>> import jsoftmax as jsm
      >>> lp = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]))
      >>> jsm.nll_loss(lp, jnp.array([0, 2]), weight=jnp.array([1.0, 1.0, 3.0]))
      Array(0.44079..., dtype=float32)
    """
    lp, a = check.logits(log_probs, axis, "log_probs")
    batch = lp.shape[:a] + lp.shape[a + 1 :]
    labels = check.integer_labels(labels, batch)
    ignore_index = check.ignore_index(ignore_index)
    reduction = check.reduction(reduction)
    normalizer = check.normalizer(normalizer, reduction)
    sw = check.sample_weight(sample_weight, batch)
    c = lp.shape[a]
    weight = check.class_vector(weight, c)
    labels = check.widen_labels(labels)
    valid, bad = _int_label_masks(labels, ignore_index, c, None, lp.shape, a, None, "nll_loss")
    per = jnp.squeeze(_nll_core(a, ignore_index, lp, labels, weight, bad), a)
    acc = num.loss_dtype(lp.dtype)
    den = _den_terms(weight, labels, valid, bad, c, None, acc)
    return _reduce(per, den, sw, reduction, normalizer)


# ---------------------------------------------------------------- binary (sigmoid)


def _mul0(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a * b`` with ``0 * inf = 0`` (a target of 0 on an infinite logit costs nothing)."""
    return jnp.where((a == 0) & jnp.isinf(b), 0.0, a * b)


def binary_cross_entropy_with_logits(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    pos_weight: ArrayLike | None = None,
    reduction: str = "mean",
) -> jax.Array:
    r"""Sigmoid cross-entropy on logits, as PyTorch's ``binary_cross_entropy_with_logits``.

    .. math::
        l = w \left[ p_w\, t \,\operatorname{softplus}(-x)
            + (1 - t)\, \operatorname{softplus}(x) \right]

    using ``-log σ(x) = softplus(-x)`` and ``-log(1-σ(x)) = softplus(x)``, which are
    finite and accurate for any finite ``x`` (no ``log(sigmoid(x))``). ``mean`` is the
    plain mean over all elements (weights are not a denominator, as in PyTorch).

    Args:
      logits: scores ``x``, any float dtype.
      labels: target probabilities ``t`` in ``[0, 1]`` with exactly the shape of ``logits``
        (PyTorch's ``target``).
      weight: rescaling weight broadcastable to ``logits``.
      pos_weight: weight of the positive term, broadcastable to ``logits`` (a ``(C,)``
        vector weights each class of the last axis, as in PyTorch).
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
      The loss (float32 for float32/half inputs, float64 for float64); elementwise for
      ``"none"``.

    Examples:
      >>> import jsoftmax as jsm
      >>> jsm.binary_cross_entropy_with_logits(jnp.array([2.0, -1.0]), jnp.array([1.0, 0.0]))
      Array(0.22009..., dtype=float32)
    """
    x = check.float_array(logits, "logits")
    t = check.float_array(labels, "labels")
    if t.shape != x.shape:
        raise ValueError(f"`labels` must have the shape of `logits` {x.shape}, got {t.shape}.")
    reduction = check.reduction(reduction)
    acc = num.loss_dtype(x.dtype)
    xa, ta = x.astype(acc), t.astype(acc)
    pos = jax.nn.softplus(-xa)
    neg = jax.nn.softplus(xa)
    if pos_weight is not None:
        pw = check.float_array(pos_weight, "pos_weight")
        check.broadcastable(pw, x.shape, "pos_weight")
        pos_t = _mul0(ta * pw.astype(acc), pos)
    else:
        pos_t = _mul0(ta, pos)
    per = pos_t + _mul0(1.0 - ta, neg)
    if weight is not None:
        w = check.float_array(weight, "weight")
        check.broadcastable(w, x.shape, "weight")
        per = per * w.astype(acc)
    if reduction == "none":
        return per
    return jnp.sum(per) if reduction == "sum" else jnp.mean(per)


# --------------------------------------------------------------------------- focal


def focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    gamma: float = 2.0,
    alpha: ArrayLike | None = None,
    axis: int = -1,
    sample_weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: ArrayLike | None = None,
) -> jax.Array:
    r"""Multi-class (softmax) focal loss of Lin et al. 2017.

    .. math::
        l_i = -\alpha_{y_i} (1 - p_{i, y_i})^{\gamma} \log p_{i, y_i}

    The factor ``(1-p)^γ`` down-weights easy, well-classified positions. ``mean``
    divides by the number of non-ignored positions — ``α`` re-scales the loss, it is not
    a normaliser (unlike ``cross_entropy``'s ``weight``) — so ``gamma=0, alpha=None``
    equals :func:`cross_entropy` for every reduction. Built on the cross-entropy core, so
    ignored positions, bad labels (NaN) and the memory-light gradient behave the same.

    Args:
      logits: scores, class axis ``axis``.
      labels: integer labels, the logits' shape minus the class axis.
      gamma: focusing parameter ``γ >= 0`` (a Python number).
      alpha: ``None``, a scalar, or per-class weights of shape ``(C,)`` (the paper's
        name; it scales the loss but is not part of ``mean``'s denominator).
      axis: the class axis.
      sample_weight: per-position weights, broadcastable to the label shape; multiplied
        into the numerator and the denominator of ``mean``.
      ignore_index: label value to skip.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      normalizer: optional denominator for ``reduction="mean"`` in place of the local
        count of non-ignored positions (see :func:`cross_entropy`;
        ``loss_denominator(labels, sample_weight=...)`` computes the local one).

    Returns:
      The loss (float32 for float32/half inputs, float64 for float64).

    Examples:
      >>> import jsoftmax as jsm
      >>> logits = jnp.array([[4.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
      >>> jsm.focal_loss(logits, jnp.array([0, 1]), gamma=2.0, reduction="none")
      Array([4.4923...e-05, 2.3867...e-01], dtype=float32)

    References:
      Lin et al. 2017, "Focal Loss for Dense Object Detection",
      https://arxiv.org/abs/1708.02002.
    """
    x, a = check.logits(logits, axis)
    batch = x.shape[:a] + x.shape[a + 1 :]
    labels = check.integer_labels(labels, batch)
    ignore_index = check.ignore_index(ignore_index)
    g = check.static_number(gamma, "gamma", lo=0.0)
    reduction = check.reduction(reduction)
    normalizer = check.normalizer(normalizer, reduction)
    sw = check.sample_weight(sample_weight, batch)
    c = x.shape[a]
    acc = num.loss_dtype(x.dtype)
    labels = check.widen_labels(labels)
    valid, bad = _int_label_masks(
        labels, ignore_index, c, None, x.shape, a, None, "focal_loss", logits=x
    )
    cfg = _CE(a, ignore_index, 0.0, 0.0, False, _residual_mode(x.dtype), None)
    nll = jnp.squeeze(_ce_core(cfg, x, labels, None, None, bad), a)
    per = nll
    if g > 0:
        # 1 - p_y = -expm1(-nll), accurate when p_y is near 1. The base is kept away from
        # 0 under `where` so that the derivative of base**γ (infinite at 0 for γ < 1)
        # never meets the 0 of the unselected branch.
        base = -jnp.expm1(-nll)
        pos = base > 0
        mod = jnp.where(pos, jnp.where(pos, base, 1.0) ** g, 0.0)
        # A label on a -inf logit: l = +inf, and d l / d nll -> 1 (mod -> 1, mod' -> 0);
        # written out so that mod' * nll is never 0 * inf.
        inf = jnp.isinf(nll)
        per = jnp.where(inf, nll, mod * jnp.where(inf, 0.0, nll))
    if alpha is not None:
        alpha = check.float_array(alpha, "alpha")
        if alpha.ndim == 0:
            per = per * alpha.astype(acc)
        else:
            alpha = check.class_vector(alpha, c, "alpha")
            per = per * alpha.astype(acc)[jnp.clip(labels, 0, c - 1)]
    den = jnp.where(bad, jnp.nan, valid.astype(acc))
    return _reduce(per, den, sw, reduction, normalizer)


# ------------------------------------------------------------- class imbalance tools


def class_weights(
    counts: ArrayLike,
    *,
    method: str = "inverse",
    beta: float = 0.999,
    normalize: bool = True,
) -> jax.Array:
    r"""Per-class weights from class counts, for ``cross_entropy(weight=...)``.

    * ``"inverse"``: :math:`w_c = 1 / n_c`
    * ``"inverse_sqrt"``: :math:`w_c = 1 / \sqrt{n_c}`
    * ``"effective_number"``: :math:`w_c = (1 - β) / (1 - β^{n_c})` (Cui et al. 2019)

    A class with count 0 gets weight 0 (it never occurs as a label, and an infinite weight
    would poison the normalisation); a negative count gives NaN.

    Args:
      counts: non-negative class counts, shape ``(C,)``.
      method: one of ``"inverse"``, ``"inverse_sqrt"``, ``"effective_number"``.
      beta: ``β`` in ``[0, 1)`` for ``"effective_number"``.
      normalize: rescale so that the weights sum to ``C``.

    Returns:
      Weights of shape ``(C,)``, float32 (float64 for float64 counts).

    Examples:
      >>> import jsoftmax as jsm
      >>> jsm.class_weights(jnp.array([100, 10, 1]))
      Array([0.02702703, 0.2702703 , 2.7027028 ], dtype=float32)

    References:
      Cui et al. 2019, "Class-Balanced Loss Based on Effective Number of Samples",
      https://arxiv.org/abs/1901.05555.
    """
    check.choice(method, "method", CLASS_WEIGHT_METHODS)
    n = check.float_array(counts, "counts")
    if n.ndim != 1:
        raise ValueError(f"`counts` must have shape (C,), got {n.shape}.")
    n = num.upcast(n)
    present = n > 0
    safe = jnp.where(present, n, 1.0)
    if method == "inverse":
        w = 1.0 / safe
    elif method == "inverse_sqrt":
        w = lax.rsqrt(safe)
    else:
        b = check.static_number(beta, "beta", lo=0.0, hi=1.0, hi_open=True)
        # (1 - β) / (1 - β^n) with 1 - β^n = -expm1(n·log β): accurate for β near 1.
        w = (1.0 - b) / -jnp.expm1(safe * math.log(b)) if b > 0 else jnp.ones_like(safe)
    w = jnp.where(present, w, 0.0)
    w = jnp.where(n < 0, jnp.nan, w)
    if normalize:
        total = jnp.sum(w)
        # A NaN total (negative count) is not 0, so it poisons every weight.
        w = w * (n.shape[0] / jnp.where(total == 0, 1.0, total))
    return w


def logit_adjust(
    logits: ArrayLike,
    class_priors: ArrayLike,
    *,
    tau: ArrayLike = 1.0,
    axis: int = -1,
) -> jax.Array:
    r"""Logit adjustment for long-tailed labels (Menon et al. 2021): ``logits + τ·log π``.

    .. math::
        \tilde z_c = z_c + τ \log π_c

    Training with ``cross_entropy(logit_adjust(z, π), y)`` is the logit-adjusted loss,
    which makes the plain arg-max of ``z`` balanced-error optimal at test time. The
    post-hoc variant (adjust a model trained with plain cross-entropy) is
    ``logit_adjust(z, π, tau=-τ)``. A prior of 0 gives ``-inf`` for ``τ > 0`` (the class
    is impossible).

    Args:
      logits: scores, class axis ``axis``.
      class_priors: class frequencies ``π`` (need not sum to 1; a constant factor only
        shifts every logit equally), shape ``(C,)`` or broadcastable to ``logits``.
      tau: scale ``τ`` of the log-prior (a scalar, may be traced; ``jax.grad`` flows to
        it, also at ``τ = 0``). Not a softmax temperature, hence the paper's name.
      axis: the class axis.

    Returns:
      Adjusted logits with the shape and dtype of ``logits``.

    Examples:
      >>> import jsoftmax as jsm
      >>> jsm.logit_adjust(jnp.zeros(3), jnp.array([0.5, 0.25, 0.25]))
      Array([-0.6931472, -1.3862944, -1.3862944], dtype=float32)

    References:
      Menon et al. 2021, "Long-tail learning via logit adjustment",
      https://arxiv.org/abs/2007.07314.
    """
    x = check.float_array(logits, "logits")
    a = check.single_axis(axis, x.ndim)
    pri = check.class_vector_along(class_priors, x.shape, a, "class_priors")
    if check.is_static_number(tau):
        tau = check.static_number(tau, "tau")
    tau = jnp.asarray(tau)
    if tau.ndim != 0:
        raise ValueError(f"`tau` must be a scalar, got shape {tau.shape}.")
    acc = num.acc_dtype(x.dtype)
    pri = num.upcast(pri).astype(acc)
    tau = tau.astype(acc)
    positive = pri > 0
    # τ·log π where π > 0: differentiable in τ everywhere, τ = 0 included (d/dτ = log π).
    shift = tau * jnp.log(jnp.where(positive, pri, 1.0))
    # A zero prior: -inf for τ > 0, +inf for τ < 0, untouched at τ = 0. Written with the
    # sign of τ (zero derivative) so that no 0·inf reaches the gradient.
    impossible = jnp.where(positive | (tau == 0), 0.0, -jnp.sign(tau) * jnp.inf)
    # A negative prior is not a probability: poison instead of a plausible number.
    shift = jnp.where(pri < 0, jnp.nan, shift + impossible)
    return (x.astype(acc) + shift).astype(x.dtype)

"""Distillation losses: KL divergence and generalized Jensen-Shannon divergence.

``kl_divergence`` / ``jsd`` work on materialised logits (plain autodiff through
:func:`jsoftmax.log_softmax`). ``linear_kl_divergence`` / ``linear_jsd`` take the
student's and the teacher's hidden states and output projections and never hold either
``(N, V)`` logits: they reuse the chunked vocabulary sweep of the ``_large_vocab`` package
(tiles, chunk loop, softcap chain, gradient matmuls, vocab-parallel offsets).

Forward and reverse KL need one sweep: for the weighting head ``a`` (the teacher for
forward KL) and the other head ``b``, the online pass carries both running maxima and
sum-exps plus ``A = Σ_c e^{u_ac - m_a}(u_ac - u_bc)`` (rescaled with ``a``'s sum), and
``KL(a‖b) = A/S_a - lse_a + lse_b``. The JSD needs both logsumexps before it can form
the mixture ``M``, so it sweeps twice. The ``custom_vjp`` keeps the inputs and the
per-token logsumexps (and the divergence) and recomputes each chunk in the backward
pass; the teacher's inputs get a zero cotangent.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jsoftmax import _numerics as num
from jsoftmax import _validate as check
from jsoftmax._large_vocab import _api as api
from jsoftmax._large_vocab import _core as core
from jsoftmax._large_vocab import _sharding as sharding
from jsoftmax._large_vocab import _tiles as tiles
from jsoftmax._softmax import log_softmax

_DIRECTIONS = ("forward", "reverse")


# ------------------------------------------------------------------ shared pieces


def _beta(beta: Any) -> float:
    return check.static_number(beta, "beta", lo=0.0, hi=1.0)


def _kind(direction: str | None, beta: float | None) -> str:
    """``"forward"``, ``"reverse"`` or ``"jsd"``: JSD_0 is forward KL, JSD_1 reverse KL."""
    if beta is None:
        return direction
    if beta == 0.0:
        return "forward"
    if beta == 1.0:
        return "reverse"
    return "jsd"


def _p_log_ratio(p, log_p, log_q):
    """``p·(log p - log q)`` with ``0·log 0 = 0`` and no NaN in either gradient branch."""
    return p * jnp.where(p > 0, log_p - log_q, 0.0)


def _log_mixture(log_p, log_q, beta):
    """``log(β·p + (1-β)·q)`` from log-probabilities (``-inf`` where both are 0)."""
    return jnp.logaddexp(math.log(beta) + log_p, math.log1p(-beta) + log_q)


# ------------------------------------------------------------ materialised logits


def _materialised(student_logits, teacher_logits, kind, beta, temperature, axis, where):
    s, ax = check.logits(student_logits, axis, "student_logits")
    t = check.float_array(teacher_logits, "teacher_logits")
    if t.shape != s.shape:
        raise ValueError(
            f"`teacher_logits` of shape {t.shape} does not match `student_logits` of "
            f"shape {s.shape}."
        )
    check.temperature(temperature)
    where = check.where(where, s.shape)
    acc = num.acc_dtype(jnp.result_type(s.dtype, t.dtype))
    log_q = log_softmax(s.astype(acc), ax, where=where, temperature=temperature)
    log_p = log_softmax(t.astype(acc), ax, where=where, temperature=temperature)
    q, p = jnp.exp(log_q), jnp.exp(log_p)
    if kind == "forward":
        terms = _p_log_ratio(p, log_p, log_q)
    elif kind == "reverse":
        terms = _p_log_ratio(q, log_q, log_p)
    else:
        log_m = _log_mixture(log_p, log_q, beta)
        terms = beta * _p_log_ratio(p, log_p, log_m) + (1.0 - beta) * _p_log_ratio(q, log_q, log_m)
    return jnp.sum(terms, axis=ax)


def kl_divergence(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    direction: str = "forward",
    temperature: ArrayLike = 1.0,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Per-row KL divergence between the teacher's and the student's softmax.

    With ``p = softmax(teacher_logits / T)`` and ``q = softmax(student_logits / T)``
    over ``axis``,

    .. math::
        \mathrm{forward:}\ \mathrm{KL}(p\,\|\,q) = \sum_c p_c(\log p_c - \log q_c),
        \qquad
        \mathrm{reverse:}\ \mathrm{KL}(q\,\|\,p) = \sum_c q_c(\log q_c - \log p_c).

    Forward KL is the usual distillation loss: PyTorch's
    ``F.kl_div(log_q, log_p, log_target=True)`` summed over classes, and
    ``optax.losses.kl_divergence(log_q, p)``. Reverse KL is mode seeking (MiniLLM).
    Classes with probability 0 contribute ``0·log 0 = 0``: ``-inf`` logits and
    ``where=False`` classes are fine, and a row with no admissible class gives 0 with a
    zero gradient (optax returns NaN there). A class the weighting distribution
    covers but the other does not gives ``+inf``, the true value.

    Returns one value per row, like ``optax.losses.kl_divergence``: reduce (and mask
    padding tokens) yourself. The loss is *not* multiplied by ``T²``; Hinton et al.'s
    ``T²`` factor (which keeps the gradient's scale independent of ``T``) is the
    caller's choice. Both arguments are differentiated; wrap the teacher in
    ``jax.lax.stop_gradient`` for distillation.

    Args:
      student_logits: student scores, any float dtype, class axis ``axis``.
      teacher_logits: teacher scores of the same shape.
      direction: ``"forward"`` (``KL(teacher‖student)``) or ``"reverse"``
        (``KL(student‖teacher)``).
      temperature: ``T > 0`` dividing both heads' logits (static or traced).
      axis: the class axis.
      where: optional boolean mask broadcastable to the logits; masked classes are
        excluded from both distributions.

    Returns:
      The divergence per row, shape of the logits without ``axis``, float32 (float64
      for float64 inputs).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax as jsm
      >>> s = jnp.array([[1.0, 2.0, 0.0], [0.0, 0.0, -jnp.inf]])
      >>> t = jnp.array([[2.0, 1.0, 0.0], [1.0, 0.0, -jnp.inf]])
      >>> [round(v, 4) for v in jsm.kl_divergence(s, t).tolist()]
      [0.4205, 0.1109]
      >>> [round(v, 4) for v in jsm.kl_divergence(s, t, direction="reverse").tolist()]
      [0.4205, 0.1201]

    References:
      Hinton et al. 2015, "Distilling the Knowledge in a Neural Network",
      https://arxiv.org/abs/1503.02531 ; Gu et al. 2024, "MiniLLM",
      https://arxiv.org/abs/2306.08543 (reverse KL).
    """
    check.choice(direction, "direction", _DIRECTIONS)
    return _materialised(student_logits, teacher_logits, direction, None, temperature, axis, where)


def jsd(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    beta: float = 0.5,
    temperature: ArrayLike = 1.0,
    axis: int = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Per-row generalized Jensen-Shannon divergence between teacher and student.

    Liger-Kernel's definition (``LigerJSD`` / ``LigerFusedLinearJSD``), with the
    teacher ``P = softmax(teacher_logits / T)`` and the student
    ``Q = softmax(student_logits / T)``:

    .. math::
        \mathrm{JSD}_\beta = \beta\,\mathrm{KL}(P\,\|\,M) + (1-\beta)\,\mathrm{KL}(Q\,\|\,M),
        \qquad M = \beta P + (1-\beta) Q.

    ``beta=0.5`` is the symmetric JSD (at most ``log 2``). As in Liger, the end points
    are special-cased: ``beta=0`` is the forward ``KL(P‖Q)`` and ``beta=1`` the reverse
    ``KL(Q‖P)`` (the formula itself vanishes there), i.e. ``jsd(s, t, beta=0)`` equals
    ``kl_divergence(s, t)``. Masking, ``0·log 0`` and empty rows as in
    :func:`kl_divergence`; not multiplied by ``T²``; both arguments are differentiated.

    Args:
      student_logits: student scores, any float dtype, class axis ``axis``.
      teacher_logits: teacher scores of the same shape.
      beta: ``β`` in ``[0, 1]``, a Python number.
      temperature: ``T > 0`` dividing both heads' logits (static or traced).
      axis: the class axis.
      where: optional boolean mask broadcastable to the logits.

    Returns:
      The divergence per row, shape of the logits without ``axis``, float32 (float64
      for float64 inputs).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax as jsm
      >>> s = jnp.array([[1.0, 2.0, 0.0]])
      >>> t = jnp.array([[2.0, 1.0, 0.0]])
      >>> round(float(jsm.jsd(s, t)[0]), 4)
      0.101
      >>> round(float(jsm.jsd(s, t, beta=0.0)[0]), 4)  # forward KL
      0.4205

    References:
      Agarwal et al. 2024, "On-Policy Distillation of Language Models" (GKD),
      https://arxiv.org/abs/2306.13649 ; Liger-Kernel's ``LigerJSD``,
      https://github.com/linkedin/Liger-Kernel .
    """
    beta = _beta(beta)
    kind = _kind(None, beta)
    return _materialised(student_logits, teacher_logits, kind, beta, temperature, axis, where)


# ---------------------------------------------------------- chunked vocabulary core


@dataclasses.dataclass(frozen=True)
class _Div:
    """Static configuration of the chunked divergence."""

    kind: str  # "forward" | "reverse" | "jsd"
    beta: float
    s: tiles._Config  # the student's tiles (its compute dtype)
    t: tiles._Config  # the teacher's tiles (same layout, chunk, softcap, temperature)


def _tiles(dc, hs, ws, bs, ht, wt, bt, start, size):
    """The chunk's scaled logits ``u = z / T`` of both heads, and the student's ``z``."""
    zs = tiles._tile_logits(
        hs,
        tiles._weight_chunk(ws, dc.s, start, size),
        tiles._vocab_slice(bs, dc.s, start, size),
        dc.s,
    )
    zt = tiles._tile_logits(
        ht,
        tiles._weight_chunk(wt, dc.t, start, size),
        tiles._vocab_slice(bt, dc.t, start, size),
        dc.t,
    )
    return tiles._scaled(zs, dc.s), tiles._scaled(zt, dc.t), zs


def _alpha(m, m_new, s):
    """Rescaling factor of a partial sum-exp from shift ``m`` to ``m_new`` (0 if empty)."""
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    return jnp.where(s > 0, jnp.exp(jnp.where(s > 0, m - m_safe, 0.0)), 0.0), m_safe


def _sweep_lse(dc, hs, ws, bs, ht, wt, bt):
    """Sweep 1: both heads' logsumexps of ``u`` and, for a KL, ``A`` (see module doc).

    The maxima are of ``u``; ``A`` is carried with the weighting head's sum.
    """
    n = hs.shape[0]
    acc = dc.s.acc_dtype
    v_local = ws.shape[dc.s.vocab_axis]
    need_a = dc.kind != "jsd"

    def body(carry, start, size):
        ms, ss, mt, st, a = carry
        us, ut, _ = _tiles(dc, hs, ws, bs, ht, wt, bt, start, size)
        ms_new = jnp.maximum(ms, jnp.max(us, axis=1))
        mt_new = jnp.maximum(mt, jnp.max(ut, axis=1))
        al_s, ms_safe = _alpha(ms, ms_new, ss)
        al_t, mt_safe = _alpha(mt, mt_new, st)
        es = jnp.exp(us - ms_safe[:, None])
        et = jnp.exp(ut - mt_safe[:, None])
        ss = al_s * ss + jnp.sum(es, axis=1)
        st = al_t * st + jnp.sum(et, axis=1)
        if need_a:
            # e == 0 where the weighting head's u = -inf: that class adds 0, not 0·inf.
            if dc.kind == "forward":
                a = al_t * a + jnp.sum(jnp.where(et > 0, et * (ut - us), 0.0), axis=1)
            else:
                a = al_s * a + jnp.sum(jnp.where(es > 0, es * (us - ut), 0.0), axis=1)
        return ms_new, ss, mt_new, st, a

    neg = jnp.full((n,), -jnp.inf, acc)
    zero = jnp.zeros((n,), acc)
    init = sharding._as_varying((neg, zero, neg, zero, zero), sharding._vma(hs, ws, bs, ht, wt, bt))
    ms, ss, mt, st, a = tiles._loop(v_local, dc.s.chunk, body, init)
    if dc.s.axis_name is not None:
        # Megatron-style: one pmax per head, then one stacked psum of the rescaled sums.
        ms_all = lax.pmax(ms, dc.s.axis_name)
        mt_all = lax.pmax(mt, dc.s.axis_name)
        al_s, _ = _alpha(ms, ms_all, ss)
        al_t, _ = _alpha(mt, mt_all, st)
        a = (al_t if dc.kind == "forward" else al_s) * a
        ss, st, a = lax.psum(jnp.stack([al_s * ss, al_t * st, a]), dc.s.axis_name)
        ms, mt = ms_all, mt_all
    lse_s = num.finish_logsumexp(ms, ss)
    lse_t = num.finish_logsumexp(mt, st)
    div = None
    if need_a:
        la, lb, sa = (lse_t, lse_s, st) if dc.kind == "forward" else (lse_s, lse_t, ss)
        # KL(a‖b) = E_a[u_a - u_b] - lse_a + lse_b; an empty weighting row gives 0.
        div = jnp.where(sa > 0, a / jnp.where(sa > 0, sa, 1.0) - la + lb, 0.0)
    return lse_s, lse_t, div


def _log_probs(us, ut, lse_s, lse_t):
    """Chunk log-probabilities of both heads; an empty row stays ``-inf`` (no NaN)."""
    ls = us - jnp.where(jnp.isfinite(lse_s), lse_s, 0.0)[:, None]
    lt = ut - jnp.where(jnp.isfinite(lse_t), lse_t, 0.0)[:, None]
    return ls, lt


def _sweep_jsd(dc, hs, ws, bs, ht, wt, bt, lse_s, lse_t):
    """Sweep 2 of the JSD: ``KL(P‖M)`` and ``KL(Q‖M)`` per token."""
    n = hs.shape[0]
    acc = dc.s.acc_dtype
    v_local = ws.shape[dc.s.vocab_axis]

    def body(carry, start, size):
        kp, kq = carry
        us, ut, _ = _tiles(dc, hs, ws, bs, ht, wt, bt, start, size)
        lq, lp = _log_probs(us, ut, lse_s, lse_t)
        lm = _log_mixture(lp, lq, dc.beta)
        kp = kp + jnp.sum(_p_log_ratio(jnp.exp(lp), lp, lm), axis=1)
        kq = kq + jnp.sum(_p_log_ratio(jnp.exp(lq), lq, lm), axis=1)
        return kp, kq

    zero = jnp.zeros((n,), acc)
    init = sharding._as_varying((zero, zero), sharding._vma(hs, ws, bs, ht, wt, bt, lse_s, lse_t))
    kp, kq = tiles._loop(v_local, dc.s.chunk, body, init)
    if dc.s.axis_name is not None:
        kp, kq = lax.psum(jnp.stack([kp, kq]), dc.s.axis_name)
    return kp, kq


def _div_forward(dc, hs, ws, bs, ht, wt, bt):
    """Per-token divergence and the backward pass's residual statistics."""
    lse_s, lse_t, div = _sweep_lse(dc, hs, ws, bs, ht, wt, bt)
    kq = None
    if dc.kind == "jsd":
        kp, kq = _sweep_jsd(dc, hs, ws, bs, ht, wt, bt, lse_s, lse_t)
        div = dc.beta * kp + (1.0 - dc.beta) * kq
    # Both heads empty (every class masked by -inf biases): 0, not 0 - (-inf) + (-inf).
    empty = ~jnp.isfinite(lse_s) & ~jnp.isfinite(lse_t)
    div = jnp.where(empty, 0.0, div)
    return div, (lse_s, lse_t, div if dc.kind == "reverse" else kq)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _divergence(dc, hs, ws, bs, ht, wt, bt):
    return _div_forward(dc, hs, ws, bs, ht, wt, bt)[0]


def _divergence_fwd(dc, hs, ws, bs, ht, wt, bt):
    div, stats = _div_forward(dc, hs, ws, bs, ht, wt, bt)
    return div, (hs, ws, bs, ht, wt, bt, stats)


def _divergence_bwd(dc, res, g):
    """Recompute each chunk; ``∂/∂u_s`` of the divergence with ``q = softmax(u_s)``:

    forward ``q - p``; reverse ``q (log q - log p - KL)``; JSD
    ``(1-β) q (log q - log M - KL(q‖M))``. The teacher gets a zero cotangent.
    """
    hs, ws, bs, ht, wt, bt, (lse_s, lse_t, extra) = res
    cfg = dc.s
    v_local = ws.shape[cfg.vocab_axis]
    acc = cfg.acc_dtype
    g = g.astype(acc)

    def body(carry, start, size):
        dh, dw, db = carry
        us, ut, zs = _tiles(dc, hs, ws, bs, ht, wt, bt, start, size)
        lq, lp = _log_probs(us, ut, lse_s, lse_t)
        q = jnp.exp(lq)
        if dc.kind == "forward":
            du = q - jnp.exp(lp)
        elif dc.kind == "reverse":
            du = jnp.where(q > 0, q * (lq - lp - extra[:, None]), 0.0)
        else:
            lm = _log_mixture(lp, lq, dc.beta)
            du = (1.0 - dc.beta) * jnp.where(q > 0, q * (lq - lm - extra[:, None]), 0.0)
        dz = tiles._softcap_chain(tiles._scaled(du * g[:, None], cfg), zs, cfg)
        dz_c = dz.astype(cfg.compute_dtype)
        w_c = tiles._weight_chunk(ws, cfg, start, size)
        dh = dh + tiles._hidden_grad(dz_c, w_c, cfg)
        dw_c = tiles._weight_grad_chunk(tiles._weight_grad(hs, dz_c, cfg), cfg)
        # Summed over the token shards chunk by chunk, as in the core's backward sweep.
        dw_c = sharding._sum_over_copies(dw_c, ws).astype(dw.dtype)
        dw = lax.dynamic_update_slice_in_dim(dw, dw_c, start, cfg.vocab_axis)
        if db is not None:
            db = lax.dynamic_update_slice_in_dim(db, jnp.sum(dz, 0).astype(db.dtype), start, 0)
        return dh, dw, db

    init = (
        jnp.zeros(hs.shape, acc),
        jnp.zeros(ws.shape, ws.dtype),
        None if bs is None else jnp.zeros(bs.shape, bs.dtype),
    )
    init = sharding._as_varying(init, sharding._vma(hs, ws, bs, ht, wt, bt, lse_s, lse_t, extra, g))
    init = (
        init[0],
        sharding._as_varying(jnp.zeros(ws.shape, ws.dtype), sharding._vma(ws)),
        init[2],
    )
    dh, dw, db = tiles._loop(v_local, cfg.chunk, body, init)
    dh = sharding._sum_over_copies(dh, hs).astype(hs.dtype)
    dw, db = sharding._sum_over_copies(dw, ws), sharding._sum_over_copies(db, bs)
    zeros = lambda x: None if x is None else jnp.zeros_like(x)  # noqa: E731
    return dh, dw, db, zeros(ht), zeros(wt), zeros(bt)


_divergence.defvjp(_divergence_fwd, _divergence_bwd)


# ------------------------------------------------------------------ public functions


class _Statics(NamedTuple):
    kind: str
    beta: float
    layout: str
    temperature: float
    softcap: float | None
    ignore_index: int
    reduction: str
    chunk_size: int | None
    axis_name: Any
    # Set by a placement (see _large_vocab/_sharding.py): the weights' D axes, the tokens'.
    fsdp_axes: Any = None
    token_axes: Any = None


def _statics(kind, beta, temperature, weight_layout, logit_softcap, ignore_index, reduction,
             normalizer, chunk_size, axis_name):  # fmt: skip
    check.choice(weight_layout, "weight_layout", api._LAYOUTS)
    reduction = check.reduction(reduction)
    statics = _Statics(
        kind=kind,
        beta=beta,
        layout=weight_layout,
        temperature=check.static_number(temperature, "temperature", lo=0.0, lo_open=True),
        softcap=check.static_number(
            logit_softcap, "logit_softcap", lo=0.0, lo_open=True, optional=True
        ),
        ignore_index=check.ignore_index(ignore_index),
        reduction=reduction,
        chunk_size=check.static_int(chunk_size, "chunk_size", minimum=1, optional=True),
        axis_name=sharding._axis(axis_name),
    )
    return statics, check.normalizer(normalizer, reduction)


@functools.partial(jax.jit, static_argnums=(0,))
def _linear_divergence(st, hs, ws, ht, wt, labels, bs, bt, normalizer):
    fn = "linear_jsd" if st.beta is not None else "linear_kl_divergence"
    pl = (
        None
        if st.token_axes is not None
        else sharding.placement(hs, ws, st.layout, st.axis_name, wt)
    )
    if pl is not None:
        api._check_inputs(fn, hs, ws, labels, bs, st.layout, None, st.ignore_index)
        api._check_inputs(fn, ht, wt, None, bt, st.layout, None, st.ignore_index)
        pl.check_divides(hs, ws, st.layout)
        pl.check_divides(ht, wt, st.layout)
        local = st._replace(
            axis_name=pl.vocab_axis_name, fsdp_axes=pl.fsdp_axes, token_axes=pl.token_axes
        )
        tok, head, vec = pl.token_spec(), pl.head_spec(st.layout), pl.vocab_spec()
        out = tok if st.reduction == "none" else P()
        return sharding.place(
            pl, functools.partial(_linear_divergence, local),
            (hs, ws, ht, wt, labels, bs, bt, normalizer),
            (tok, head, tok, head, tok, vec, vec, P()), out,
        )  # fmt: skip
    ax, fsdp = st.axis_name, st.fsdp_axes
    stu = api._check_inputs(fn, hs, ws, labels, bs, st.layout, ax, st.ignore_index, fsdp)
    tea = api._check_inputs(fn, ht, wt, None, bt, st.layout, ax, st.ignore_index, fsdp)
    if tea.batch_shape != stu.batch_shape:
        raise ValueError(
            f"`teacher_hidden` of shape {ht.shape} has tokens {tea.batch_shape}, but "
            f"`student_hidden` of shape {hs.shape} has {stu.batch_shape}."
        )
    if tea.v_local != stu.v_local:
        raise ValueError(
            f"`teacher_weight` of shape {wt.shape} and `student_weight` of shape {ws.shape} "
            f"have different vocabularies ({tea.v_local} and {stu.v_local})."
        )
    acc = jnp.promote_types(stu.acc, tea.acc)
    cfg_s = api._make_config(
        stu, st.layout, st.chunk_size, st.softcap, st.axis_name, need_zw=False,
        temperature=st.temperature, fsdp_axes=st.fsdp_axes,
    )  # fmt: skip
    cfg_s = dataclasses.replace(cfg_s, acc_dtype=jnp.dtype(acc))
    cfg_t = dataclasses.replace(cfg_s, compute_dtype=jnp.dtype(tea.compute))
    beta = 0.0 if st.beta is None else st.beta
    dc = _Div(kind=st.kind, beta=beta, s=cfg_s, t=cfg_t)
    # The teacher is a fixed target: stop_gradient makes that explicit for any caller.
    ht2, wt2, bt2 = jax.tree.map(lax.stop_gradient, (tea.h2, tea.linear_weight, tea.linear_bias))
    div = _divergence(
        dc, stu.h2.astype(cfg_s.compute_dtype), stu.linear_weight, stu.linear_bias,
        ht2.astype(cfg_t.compute_dtype), wt2, bt2,
    )  # fmt: skip
    if stu.keep is None:
        base = jnp.ones(div.shape, acc)
        per_token = div
    else:
        base = stu.keep.astype(acc)
        # A label outside [0, V): NaN value and a NaN gradient (the cotangent reaching
        # `div` there is 0, which poison_cotangent replaces).
        div = num.poison_cotangent(div, stu.bad)
        per_token = jnp.where(stu.bad, jnp.nan, jnp.where(stu.keep, div, 0.0))
    if st.reduction == "none":
        return per_token.reshape(stu.batch_shape)
    bad = jnp.zeros(base.shape, bool) if stu.keep is None else stu.bad
    total = jnp.sum(per_token)
    return api._reduce(total, base, None, st.reduction, normalizer, bad, st.token_axes)


def linear_kl_divergence(
    student_hidden: ArrayLike,
    student_weight: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_weight: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    direction: str = "forward",
    temperature: float = 1.0,
    weight_layout: str = "dv",
    student_bias: ArrayLike | None = None,
    teacher_bias: ArrayLike | None = None,
    logit_softcap: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: ArrayLike | None = None,
    chunk_size: int | None = None,
    axis_name: Any = None,
) -> jax.Array:
    r"""KL divergence between two language-model heads, without materialising logits.

    Equal to ``kl_divergence(z_s, z_t, direction=..., temperature=T)`` on the logits
    ``z = c·tanh((h W + b)/c)`` of each head (``c = logit_softcap``; plain ``h W + b``
    without it; the temperature divides after the soft cap), i.e. per token

    .. math::
        \mathrm{forward:}\ \sum_c p_c(\log p_c - \log q_c), \qquad
        \mathrm{reverse:}\ \sum_c q_c(\log q_c - \log p_c),

    with teacher ``p = softmax(z_t/T)`` and student ``q = softmax(z_s/T)``, reduced
    over the tokens whose label is not ``ignore_index``. Neither head's ``(N, V)``
    logits exist: one sweep over the vocabulary in chunks carries both heads' running
    maxima and sums of exponentials and ``Σ_c e^{u_c - m}(u_c - u'_c)`` of the
    weighting head, so ``KL = A/S - lse + lse'``. The ``custom_vjp`` recomputes the
    chunks in the backward pass and returns gradients for the student's hidden states,
    weight and bias; the teacher's inputs get a zero gradient (``stop_gradient``
    semantics: the teacher is a fixed target). The loss is not multiplied by ``T²``
    (multiply it yourself for Hinton-style distillation).

    Args:
      student_hidden: ``(..., D_s)`` student activations, any float dtype.
      student_weight: the student's projection, ``(D_s, V)`` with
        ``weight_layout="dv"`` or ``(V, D_s)`` with ``"vd"``. With ``axis_name``, this
        device's vocabulary shard.
      teacher_hidden: ``(..., D_t)`` teacher activations with the same tokens
        (``D_t`` may differ from ``D_s``).
      teacher_weight: the teacher's projection in the same layout, same vocabulary.
      labels: optional integer ids of the token shape: only used to drop tokens whose
        label is ``ignore_index`` (0 loss, not counted by ``"mean"``). A label outside
        ``[0, V)`` that is not ``ignore_index`` poisons that token (NaN), as in
        :func:`jsoftmax.linear_cross_entropy`. Without labels every token counts.
      direction: ``"forward"`` (``KL(teacher‖student)``) or ``"reverse"``.
      temperature: ``T > 0``, a Python number.
      weight_layout: ``"dv"`` or ``"vd"`` (both heads).
      student_bias: optional ``(V,)`` bias of the student head; ``-inf`` entries mask
        vocabulary entries out.
      teacher_bias: optional ``(V,)`` bias of the teacher head.
      logit_softcap: optional ``c > 0`` applied to both heads (Gemma 2).
      ignore_index: label value of tokens that contribute nothing.
      reduction: ``"mean"`` (over the counted tokens; 0.0 with zero gradient when none
        is), ``"sum"`` or ``"none"`` (per token).
      normalizer: optional denominator for ``"mean"`` in place of the local count
        (see :func:`jsoftmax.loss_denominator`).
      chunk_size: vocabulary entries per chunk (``None``: about 16 MiB per tile).
      axis_name: mesh axis (or axes) over which both weights and biases are sharded
        along the vocabulary, inside ``jax.shard_map``: the divergence is over the
        whole vocabulary.
        Under ``jax.jit`` with explicitly sharded inputs (``AxisType.Explicit``) the
        layout is read from their types and ``axis_name`` is not needed; in the default
        auto mode, name the mesh axes (of ``jax.set_mesh``'s mesh) that hold the
        vocabulary, and the library places the vocab-parallel ``shard_map`` itself (see
        the scaling-out guide).

    Returns:
      The loss, float32 (float64 for float64 inputs): a scalar, or per token with
      ``reduction="none"``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax as jsm
      >>> hs = jnp.array([[1.0, -1.0], [0.5, 2.0]])  # student: 2 tokens, D = 2
      >>> ws = jnp.array([[1.0, 0.0, -1.0], [0.0, 1.0, 2.0]])  # (D, V), V = 3
      >>> ht = jnp.array([[0.5, 1.0, 0.0], [1.0, 1.0, -1.0]])  # teacher: D = 3
      >>> wt = jnp.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
      >>> round(float(jsm.linear_kl_divergence(hs, ws, ht, wt)), 4)
      1.3129
      >>> per_token = jsm.linear_kl_divergence(hs, ws, ht, wt, reduction="none")
      >>> [round(v, 4) for v in per_token.tolist()]
      [1.2617, 1.364]
      >>> round(float(jsm.linear_kl_divergence(hs, ws, ht, wt, jnp.array([0, -100]))), 4)
      1.2617

    References:
      Hinton et al. 2015, "Distilling the Knowledge in a Neural Network",
      https://arxiv.org/abs/1503.02531 ; Wijmans et al. 2025, "Cut Your Losses in
      Large-Vocabulary Language Models", https://arxiv.org/abs/2411.09009 .
    """
    check.choice(direction, "direction", _DIRECTIONS)
    st, normalizer = _statics(
        direction, None, temperature, weight_layout, logit_softcap, ignore_index, reduction,
        normalizer, chunk_size, axis_name,
    )  # fmt: skip
    return _linear_divergence(
        st, student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
        student_bias, teacher_bias, normalizer,
    )  # fmt: skip


def linear_jsd(
    student_hidden: ArrayLike,
    student_weight: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_weight: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    weight_layout: str = "dv",
    student_bias: ArrayLike | None = None,
    teacher_bias: ArrayLike | None = None,
    logit_softcap: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: ArrayLike | None = None,
    chunk_size: int | None = None,
    axis_name: Any = None,
) -> jax.Array:
    r"""Generalized JSD between two language-model heads, without materialising logits.

    Equal to :func:`jsoftmax.jsd` on the two heads' logits (Liger-Kernel's
    ``LigerFusedLinearJSD``): with teacher ``P`` and student ``Q``,

    .. math::
        \mathrm{JSD}_\beta = \beta\,\mathrm{KL}(P\,\|\,M) + (1-\beta)\,\mathrm{KL}(Q\,\|\,M),
        \qquad M = \beta P + (1-\beta) Q,

    per token; ``beta=0`` is the forward and ``beta=1`` the reverse KL (Liger's end
    points, computed by :func:`linear_kl_divergence`'s single sweep). Otherwise two
    sweeps over the vocabulary: both logsumexps first, then the two divergences to the
    mixture. Gradients for the student's hidden states, weight and bias, recomputed
    chunk by chunk; zero for the teacher. Not multiplied by ``T²``. Every other
    argument as in :func:`linear_kl_divergence`.

    Args:
      student_hidden: ``(..., D_s)`` student activations.
      student_weight: ``(D_s, V)`` (``"dv"``) or ``(V, D_s)`` (``"vd"``).
      teacher_hidden: ``(..., D_t)`` teacher activations.
      teacher_weight: the teacher's projection in the same layout.
      labels: optional integer ids; tokens labelled ``ignore_index`` are dropped.
      beta: ``β`` in ``[0, 1]``, a Python number.
      temperature: ``T > 0``, a Python number, dividing both heads' logits.
      weight_layout: ``"dv"`` or ``"vd"``.
      student_bias: optional ``(V,)`` bias of the student head.
      teacher_bias: optional ``(V,)`` bias of the teacher head.
      logit_softcap: optional ``c > 0`` applied to both heads.
      ignore_index: label value of tokens that contribute nothing.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      normalizer: optional denominator for ``"mean"``.
      chunk_size: vocabulary entries per chunk.
      axis_name: vocab-parallel mesh axis (or axes), inside ``jax.shard_map``, or under
        ``jax.jit`` as in :func:`jsoftmax.linear_kl_divergence`.

    Returns:
      The loss, float32 (float64 for float64 inputs): a scalar, or per token with
      ``reduction="none"``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax as jsm
      >>> hs = jnp.array([[1.0, -1.0], [0.5, 2.0]])
      >>> ws = jnp.array([[1.0, 0.0, -1.0], [0.0, 1.0, 2.0]])
      >>> ht = jnp.array([[0.5, 1.0, 0.0], [1.0, 1.0, -1.0]])
      >>> wt = jnp.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
      >>> round(float(jsm.linear_jsd(hs, ws, ht, wt)), 4)
      0.308
      >>> round(float(jsm.linear_jsd(hs, ws, ht, wt, beta=0.0)), 4)  # forward KL
      1.3129

    References:
      Agarwal et al. 2024, "On-Policy Distillation of Language Models" (GKD),
      https://arxiv.org/abs/2306.13649 ; Liger-Kernel's ``LigerFusedLinearJSD``,
      https://github.com/linkedin/Liger-Kernel .
    """
    beta = _beta(beta)
    st, normalizer = _statics(
        _kind(None, beta), beta, temperature, weight_layout, logit_softcap, ignore_index,
        reduction, normalizer, chunk_size, axis_name,
    )  # fmt: skip
    return _linear_divergence(
        st, student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
        student_bias, teacher_bias, normalizer,
    )  # fmt: skip


# ------------------------------------------------------------ sparse (top-k) teacher

_REMAINDERS = ("bucket", "renormalize")


class _SparseStatics(NamedTuple):
    layout: str
    temperature: float
    softcap: float | None
    remainder: str
    ignore_index: int
    reduction: str
    chunk_size: int | None
    # Set by a placement (see _large_vocab/_sharding.py).
    axis_name: Any = None
    fsdp_axes: Any = None
    token_axes: Any = None


@functools.partial(jax.jit, static_argnums=(0,))
def _linear_topk_kl(st, hs, ws, teacher_logprobs, teacher_indices, labels, bs, normalizer):
    fn = "linear_topk_kl_divergence"
    pl = None if st.token_axes is not None else sharding.placement(hs, ws, st.layout, st.axis_name)
    if pl is not None:
        api._check_inputs(fn, hs, ws, labels, bs, st.layout, None, st.ignore_index)
        pl.check_divides(hs, ws, st.layout)
        local = st._replace(
            axis_name=pl.vocab_axis_name, fsdp_axes=pl.fsdp_axes, token_axes=pl.token_axes
        )
        tok = pl.token_spec()
        out = tok if st.reduction == "none" else P()
        return sharding.place(
            pl, functools.partial(_linear_topk_kl, local),
            (hs, ws, teacher_logprobs, teacher_indices, labels, bs, normalizer),
            (tok, pl.head_spec(st.layout), tok, tok, tok, pl.vocab_spec(), P()), out,
        )  # fmt: skip
    ax = st.axis_name
    stu = api._check_inputs(fn, hs, ws, labels, bs, st.layout, ax, st.ignore_index, st.fsdp_axes)
    lp = check.float_array(teacher_logprobs, "teacher_logprobs")
    if lp.ndim != len(stu.batch_shape) + 1 or lp.shape[:-1] != stu.batch_shape:
        raise ValueError(
            f"`teacher_logprobs` of shape {lp.shape} must be the tokens {stu.batch_shape} "
            "plus one axis of k teacher entries."
        )
    idx = check.widen_labels(check.integer_labels(teacher_indices, lp.shape, "teacher_indices"))
    n_rows, k = stu.h2.shape[0], lp.shape[-1]
    cfg = api._make_config(
        stu, st.layout, st.chunk_size, st.softcap, st.axis_name, need_zw=False,
        temperature=st.temperature, fsdp_axes=st.fsdp_axes,
    )  # fmt: skip
    acc = cfg.acc_dtype
    h2 = stu.h2.astype(cfg.compute_dtype)
    idx = idx.reshape(n_rows, k)
    bad_idx = jnp.any((idx < 0) | (idx >= stu.n_vocab), axis=1)
    idx = jnp.clip(idx, 0, stu.n_vocab - 1)
    # One sweep gives the logsumexp and the logits at the teacher's k indices (the k
    # "label columns" of each row), so no (D, rows, k) gather of the weight's columns.
    out = core._stats(cfg, h2, stu.linear_weight, stu.linear_bias, None, idx)
    lse, u_k = out.lse, tiles._scaled(out.zy, cfg)
    lq = u_k - jnp.where(jnp.isfinite(lse), lse, 0.0)[:, None]
    lp = lax.stop_gradient(lp.reshape(n_rows, k).astype(acc))
    p = jnp.exp(lp)
    if st.remainder == "renormalize":
        log_mass = jnp.log(jnp.maximum(jnp.sum(p, axis=1), jnp.finfo(acc).tiny))
        lp = lp - log_mass[:, None]
        div = jnp.sum(_p_log_ratio(jnp.exp(lp), lp, lq), axis=1)
    else:
        # The teacher's mass outside its top k against the student's mass outside them:
        # the KL between the two distributions coarsened to k + 1 buckets.
        r = jnp.maximum(1.0 - jnp.sum(p, axis=1), 0.0)
        q_in = jnp.exp(jax.nn.logsumexp(jnp.where(p > 0, lq, -jnp.inf), axis=1))
        q_out = jnp.maximum(1.0 - q_in, jnp.finfo(acc).tiny)
        div = jnp.sum(_p_log_ratio(p, lp, lq), axis=1)
        div = div + _p_log_ratio(r, jnp.log(jnp.where(r > 0, r, 1.0)), jnp.log(q_out))
    keep = jnp.ones((n_rows,), bool) if stu.keep is None else stu.keep
    # A bad teacher index matters only on a token that counts.
    bad = bad_idx & keep if stu.bad is None else (bad_idx & keep) | stu.bad
    div = num.poison_cotangent(div, bad)
    per_token = jnp.where(bad, jnp.nan, jnp.where(keep, div, 0.0))
    if st.reduction == "none":
        return per_token.reshape(stu.batch_shape)
    total = jnp.sum(per_token)
    return api._reduce(total, keep.astype(acc), None, st.reduction, normalizer, bad, st.token_axes)


def linear_topk_kl_divergence(
    student_hidden: ArrayLike,
    student_weight: ArrayLike,
    teacher_logprobs: ArrayLike,
    teacher_indices: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    temperature: float = 1.0,
    remainder: str = "bucket",
    weight_layout: str = "dv",
    student_bias: ArrayLike | None = None,
    logit_softcap: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: ArrayLike | None = None,
    chunk_size: int | None = None,
    axis_name: Any = None,
) -> jax.Array:
    r"""Forward KL from a sparse teacher (its top-k log-probabilities) to a student head.

    Distillation without running the teacher every step: its ``k`` largest
    log-probabilities per token and their indices are cached once (e.g. from
    :func:`jsoftmax.linear_softmax_stats` with ``top_k=k``). With the student's
    ``log q = log_softmax(z/T)`` (``z = c·tanh((h W + b)/c)``; its logsumexp by the
    chunked sweep, so the ``(N, V)`` logits never exist, and the ``k`` logits by a gather
    of ``k`` weight columns per token), teacher entries ``p_j = exp(teacher_logprobs_j)``
    at ``K`` = ``teacher_indices`` and the teacher's remaining mass ``r = 1 - Σ_j p_j``:

    .. math::
        \mathrm{bucket:}\ \sum_{j \in K} p_j(\log p_j - \log q_j)
            + r\,(\log r - \log(1 - \textstyle\sum_{j \in K} q_j)),
        \qquad
        \mathrm{renormalize:}\ \sum_{j \in K} \hat p_j(\log \hat p_j - \log q_j),\
        \hat p = p / \textstyle\sum_K p.

    ``remainder="bucket"`` (default) handles the mass outside the top k explicitly: the
    teacher's tail ``r`` is matched against the student's tail as one extra class, which
    is the exact KL between the two distributions coarsened to ``k + 1`` buckets (a lower
    bound of the full KL, equal to it when ``k = V``). ``"renormalize"`` drops the tail
    and renormalises the teacher's top k to sum to 1 (the student is not renormalised).
    The teacher inputs get no gradient. Not multiplied by ``T²``; the teacher's
    log-probabilities must be at the same temperature (``linear_softmax_stats`` takes
    one). Teacher indices must be distinct per token; ``-inf`` log-probabilities (fewer
    than k entries) contribute 0.

    Args:
      student_hidden: ``(..., D)`` student activations.
      student_weight: ``(D, V)`` (``"dv"``) or ``(V, D)`` (``"vd"``).
      teacher_logprobs: ``(..., k)`` the teacher's log-probabilities.
      teacher_indices: ``(..., k)`` their integer vocabulary indices; one outside
        ``[0, V)`` poisons that token (NaN) unless its label is ``ignore_index``.
      labels: optional integer ids; tokens labelled ``ignore_index`` are dropped.
      temperature: ``T > 0``, a Python number, dividing the student's logits.
      remainder: ``"bucket"`` or ``"renormalize"``, see above.
      weight_layout: ``"dv"`` or ``"vd"``.
      student_bias: optional ``(V,)`` bias of the student head.
      logit_softcap: optional ``c > 0`` applied to the student's logits.
      ignore_index: label value of tokens that contribute nothing.
      reduction: ``"mean"``, ``"sum"`` or ``"none"``.
      normalizer: optional denominator for ``"mean"``.
      chunk_size: vocabulary entries per chunk of the student's logsumexp sweep.
      axis_name: mesh axis (or axes) over which ``student_weight`` (and
        ``student_bias``) are sharded along the vocabulary, inside ``jax.shard_map``;
        the teacher's indices stay global ids.
        Under ``jax.jit`` with explicitly sharded inputs (``AxisType.Explicit``) the
        layout is read from their types and ``axis_name`` is not needed; in the default
        auto mode, name the mesh axes (of ``jax.set_mesh``'s mesh) that hold the
        vocabulary, and the library places the vocab-parallel ``shard_map`` itself (see
        the scaling-out guide).

    Returns:
      The loss, float32 (float64 for float64 inputs): a scalar, or per token with
      ``reduction="none"``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax as jsm
      >>> hs = jnp.array([[1.0, -1.0], [0.5, 2.0]])
      >>> ws = jnp.array([[1.0, 0.0, -1.0], [0.0, 1.0, 2.0]])
      >>> ht = jnp.array([[0.5, 1.0, 0.0], [1.0, 1.0, -1.0]])
      >>> wt = jnp.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
      >>> top = jsm.linear_softmax_stats(ht, wt, top_k=3)  # cached offline
      >>> kl = jsm.linear_topk_kl_divergence(hs, ws, top.topk_logprobs, top.topk_indices)
      >>> round(float(kl), 4)  # k = V: the full forward KL
      1.3129
      >>> top1 = jsm.linear_softmax_stats(ht, wt, top_k=1)  # one entry + the tail
      >>> kl1 = jsm.linear_topk_kl_divergence(hs, ws, top1.topk_logprobs, top1.topk_indices)
      >>> round(float(kl1), 4)
      0.8561
    """
    check.choice(remainder, "remainder", _REMAINDERS)
    check.choice(weight_layout, "weight_layout", api._LAYOUTS)
    reduction = check.reduction(reduction)
    st = _SparseStatics(
        layout=weight_layout,
        temperature=check.static_number(temperature, "temperature", lo=0.0, lo_open=True),
        softcap=check.static_number(
            logit_softcap, "logit_softcap", lo=0.0, lo_open=True, optional=True
        ),
        remainder=remainder,
        ignore_index=check.ignore_index(ignore_index),
        reduction=reduction,
        chunk_size=check.static_int(chunk_size, "chunk_size", minimum=1, optional=True),
        axis_name=sharding._axis(axis_name),
    )
    normalizer = check.normalizer(normalizer, reduction)
    return _linear_topk_kl(
        st, student_hidden, student_weight, teacher_logprobs, teacher_indices, labels,
        student_bias, normalizer,
    )  # fmt: skip

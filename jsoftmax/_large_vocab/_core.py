"""The chunked core: one forward sweep over the vocabulary for every per-token
statistic, and its ``custom_vjp`` backward sweep.

Only per-token statistics are kept -- the logsumexp (``lse``, by an online
max/sum-exp through ``_numerics.online_combine``), the label logit ``z_y``, for label
smoothing ``Σ_c w_c z_c``, and on request the entropy, arg-max and top-k. The backward
pass keeps the inputs plus ``lse`` as residuals and recomputes each chunk's logits,
producing ``d_hidden`` (accumulated) and ``d_weight`` (written chunk by chunk) with the
softmax ``exp(z - lse)`` of that chunk only. Forward: one matmul and one ``exp`` per
logit; backward: three matmuls and one ``exp``. A schedule that computes the gradients
during the forward pass (token chunks across the whole vocabulary) was measured and
dropped: it needs a float32 ``(D, V)`` accumulator (more than 1/8 of the naive memory
at N=2048, V=65536) and its small-K ``d_weight`` updates made it slower on this CPU.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jsoftmax import _numerics as num
from jsoftmax._large_vocab._filter import _bounded_filter, _Filter, _filter_unit, _filtered_loop
from jsoftmax._large_vocab._sharding import (
    _as_varying,
    _gather_over,
    _global_stats,
    _shard_offset,
    _sum_over_copies,
    _vma,
)
from jsoftmax._large_vocab._tiles import (
    _add_label_cotangent,
    _hidden_grad,
    _label_logits,
    _loop,
    _rescale,
    _scaled,
    _softcap_chain,
    _tile_logits,
    _vocab_slice,
    _weight_chunk,
    _weight_grad,
    _weight_grad_chunk,
)

# Index of a top-k slot that no vocabulary entry has filled yet: larger than every real
# index, so that it loses every tie in `_merge_top_k` (value -inf sorts last as well).
_NO_INDEX = jnp.iinfo(jnp.int32).max


class _Core(NamedTuple):
    """Per-token outputs of the chunked core (``None`` where ``_Config`` does not ask).

    With ``u = z / T`` (``z`` the soft-capped logits, ``T = cfg.temperature``):
    ``lse = log Σ_c exp(u_c)``; ``zy = z_y`` (not divided by ``T``); ``zw = Σ_c w_c z_c``;
    ``entropy = -Σ_c p_c log p_c`` of ``p = softmax(u)``; ``argmax`` the first index of the
    row maximum; ``top_z``/``top_i`` the ``top_k`` largest ``z`` (descending, ties by
    lower index) and their global indices.
    """

    lse: jax.Array
    zy: jax.Array | None
    zw: jax.Array | None
    entropy: jax.Array | None
    argmax: jax.Array | None
    top_z: jax.Array | None
    top_i: jax.Array | None


def _merge_top_k(values, indices, k):
    """The ``k`` largest ``values`` per row (descending, ties to the lower index)."""
    neg, idx = lax.sort((-values, indices), dimension=1, num_keys=2)
    return -neg[:, :k], idx[:, :k]


def _core_forward(cfg, h, w, b, cw, y, row_max=False):
    """One sweep over the vocabulary chunks: every statistic of ``_Core`` at once.

    ``row_max=True`` also returns each row's largest logit per chunk, ``(rows, chunks)``,
    which bounds the filtered backward's tiles before it recomputes them.
    """
    n_rows = h.shape[0]
    v_local = w.shape[cfg.vocab_axis]
    acc = cfg.acc_dtype
    offset = _shard_offset(cfg, v_local)
    y_local = None if y is None else y - offset

    def body(carry, start, size):
        m, s, zy, zw, t, am, tz, ti, rm = carry
        z = _tile_logits(
            h, _weight_chunk(w, cfg, start, size), _vocab_slice(b, cfg, start, size), cfg
        )
        if y is not None:
            zy = zy + _label_logits(z, y_local, start, size)
        if cfg.need_zw:
            cw_c = _vocab_slice(cw, cfg, start, size)
            zw = zw + (jnp.sum(z, axis=1) if cw_c is None else z @ cw_c.astype(acc))
        m_c = jnp.max(z, axis=1)
        if rm is not None:
            rm = lax.dynamic_update_slice_in_dim(rm, m_c[:, None], start // cfg.chunk, 1)
        if am is not None:
            # Strictly greater: an equal maximum in a later chunk keeps the first index.
            first = jnp.argmax(z, axis=1).astype(jnp.int32) + (start + offset)
            am = jnp.where(m_c > m, first, am)
        if tz is not None:
            vz, vi = lax.top_k(z, min(cfg.top_k, size))
            vi = vi.astype(jnp.int32) + (start + offset)
            tz, ti = _merge_top_k(
                jnp.concatenate([tz, vz], axis=1), jnp.concatenate([ti, vi], axis=1), cfg.top_k
            )
        m_new = jnp.maximum(m, m_c)
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        s, t = _rescale(m, m_safe, s, t, cfg)
        d = _scaled(z - m_safe[:, None], cfg)
        e = jnp.exp(d)
        s = s + jnp.sum(e, axis=1)
        if t is not None:
            # e == 0 where z = -inf (d = -inf): that entry adds nothing, not 0·(-inf).
            t = t + jnp.sum(jnp.where(e > 0, e * d, 0.0), axis=1)
        return m_new, s, zy, zw, t, am, tz, ti, rm

    zeros = jnp.zeros((n_rows,), acc)
    init = (
        jnp.full((n_rows,), -jnp.inf, acc),
        zeros,
        zeros if y is None else jnp.zeros(y.shape, acc),
        zeros,
        zeros if cfg.need_entropy else None,
        jnp.zeros((n_rows,), jnp.int32) if cfg.need_argmax else None,
        jnp.full((n_rows, cfg.top_k), -jnp.inf, acc) if cfg.top_k else None,
        jnp.full((n_rows, cfg.top_k), _NO_INDEX, jnp.int32) if cfg.top_k else None,
        jnp.full((n_rows, -(-v_local // cfg.chunk)), -jnp.inf, acc) if row_max else None,
    )
    init = _as_varying(init, _vma(h, w, b, cw, y_local, offset))
    m, s, zy, zw, t, am, tz, ti, rm = _loop(v_local, cfg.chunk, body, init)
    if cfg.axis_name is not None:
        m_local = m
    m, s, zy, zw, t = _global_stats(cfg, m, s, zy, zw, t)
    if cfg.axis_name is not None:
        if am is not None:
            # The first global index among the shards that hold the global maximum.
            am = lax.pmin(jnp.where(m_local == m, am, _NO_INDEX), cfg.axis_name)
        if tz is not None:
            tz, ti = _merge_top_k(*_gather_over(cfg, tz, ti), cfg.top_k)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    lse = jnp.where(s > 0, _scaled(m_safe, cfg) + num.safe_log(s), -jnp.inf)
    ent = None
    if t is not None:
        # H = lse - Σ p u = log s - t/s: both terms >= 0 (t <= 0), so no cancellation.
        ent = jnp.where(s > 0, num.safe_log(s) - t / jnp.where(s > 0, s, 1.0), 0.0)
    core = _Core(lse, None if y is None else zy, zw if cfg.need_zw else None, ent, am, tz, ti)
    return (core, rm) if row_max else core


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stats(cfg, h, w, b, cw, y):
    return _core_forward(cfg, h, w, b, cw, y)


def _stats_fwd(cfg, h, w, b, cw, y):
    if _bounded_filter(cfg, cw):
        out, row_max = _core_forward(cfg, h, w, b, cw, y, row_max=True)
    else:
        out, row_max = _core_forward(cfg, h, w, b, cw, y), None
    return out, (h, w, b, cw, y, out.lse, out.entropy, out.top_i, row_max)


def _stats_bwd(cfg, res, cts):
    """One recomputing sweep for every differentiable output together.

    With ``p = softmax(u)``, ``u = z/T``: ``∂lse/∂u = p``, ``∂H/∂u = -p (u - lse + H)``,
    ``∂z_y/∂z = onehot(y)``, ``∂(Σ w z)/∂z = w``, ``∂top_z/∂z = onehot(top_i)``.
    """
    h, w, b, cw, y, lse, ent, top_i, row_max = res
    v_local = w.shape[cfg.vocab_axis]
    acc = cfg.acc_dtype
    offset = _shard_offset(cfg, v_local)
    y_local = None if y is None else y - offset
    top_local = None if top_i is None else top_i - offset
    g_lse = cts.lse
    # An empty row (lse = -inf) has p = 0 everywhere: shift by 0 so exp gives 0, not NaN.
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    mean_u = None if ent is None else lse_safe - ent  # Σ p u

    def tile(rs, start, size, w_c, b_c, cw_c):
        """Logits ``z`` and gradient ``dz`` (w.r.t. the uncapped logits) of rows ``rs``."""
        z = _tile_logits(h[rs], w_c, b_c, cfg)
        u = _scaled(z, cfg)
        p = jnp.exp(u - lse_safe[rs, None])
        coef = g_lse[rs, None]
        if ent is not None:
            coef = coef - cts.entropy[rs, None] * jnp.where(p > 0, u - mean_u[rs, None], 0.0)
        dz = _scaled(p * coef, cfg)
        if y is not None:
            dz = _add_label_cotangent(dz, y_local[rs], cts.zy[rs], start, size)
        if cfg.need_zw:
            g_zw = cts.zw[rs]
            dz = dz + (g_zw[:, None] if cw_c is None else g_zw[:, None] * cw_c.astype(acc))
        if top_local is not None:
            cols = start + lax.broadcasted_iota(jnp.int32, (1, size, 1), 1)
            hits = cols == top_local[rs, None, :]
            dz = dz + jnp.sum(jnp.where(hits, cts.top_z[rs, None, :], 0.0), axis=2)
        return z, _softcap_chain(dz, z, cfg)

    def body(carry, start, size):
        dh, dw, db, dcw = carry
        w_c = _weight_chunk(w, cfg, start, size)
        cw_c = _vocab_slice(cw, cfg, start, size) if cfg.need_zw else None
        z, dz = tile(slice(None), start, size, w_c, _vocab_slice(b, cfg, start, size), cw_c)
        if dcw is not None and cfg.need_zw:
            dcw = lax.dynamic_update_slice_in_dim(dcw, (cts.zw @ z).astype(dcw.dtype), start, 0)
        dz_c = dz.astype(cfg.compute_dtype)
        dh = dh + _hidden_grad(dz_c, w_c, cfg)
        dw_c = _weight_grad_chunk(_weight_grad(h, dz_c, cfg), cfg)
        # Summed over the token shards chunk by chunk (a replicated head's data-parallel
        # all-reduce), so no whole partial (D, V) gradient is ever held as a temporary.
        dw_c = _sum_over_copies(dw_c, w).astype(dw.dtype)
        dw = lax.dynamic_update_slice_in_dim(dw, dw_c, start, cfg.vocab_axis)
        if db is not None:
            db = lax.dynamic_update_slice_in_dim(db, jnp.sum(dz, 0).astype(db.dtype), start, 0)
        return dh, dw, db, dcw

    init = (
        jnp.zeros(h.shape, acc),
        jnp.zeros(w.shape, w.dtype),
        None if b is None else jnp.zeros(b.shape, b.dtype),
        None if cw is None else jnp.zeros(cw.shape, cw.dtype),
    )
    float_cts = [c for c in (cts.lse, cts.zy, cts.zw, cts.entropy, cts.top_z) if c is not None]
    vma = _vma(h, w, b, cw, y_local, lse, ent, top_local, row_max, *float_cts)
    init = _as_varying(init, vma)
    # The weight's gradient is typed like the weight: each chunk is summed over the token
    # shards before it is written (see `body`).
    init = (init[0], _as_varying(jnp.zeros(w.shape, w.dtype), _vma(w)), *init[2:])
    if cfg.filter_eps is None:
        dh, dw, db, dcw = _loop(v_local, cfg.chunk, body, init)
    else:
        flt = _Filter(
            unit=_filter_unit(cfg, cts, cw, v_local), y_local=y_local, top_local=top_local,
            g_top=cts.top_z, row_max=row_max, lse=lse_safe, g_lse=g_lse,
            g_zw=cts.zw if cfg.need_zw else None, vma=vma,
        )  # fmt: skip
        dh, dw, db, dcw = _filtered_loop(cfg, flt, tile, h, w, b, cw, cts, init)
    dh = _sum_over_copies(dh, h).astype(h.dtype)
    dw, db, dcw = (_sum_over_copies(c, p) for c, p in ((dw, w), (db, b), (dcw, cw)))
    return dh, dw, db, dcw, None


_stats.defvjp(_stats_fwd, _stats_bwd)

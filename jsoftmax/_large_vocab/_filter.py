"""Gradient filtering of the backward sweep (``filter_eps``, Cut Cross-Entropy's).

A ``(rows, chunk)`` tile of the logits gradient whose every element is below
``filter_eps`` times its token's gradient scale skips its ``d_hidden``/``d_weight``
matmuls; where the forward's per-row chunk maxima bound the tile, it is not even
recomputed. The bound and its proof are in the large-vocabulary guide.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jsoftmax import _validate as check
from jsoftmax._large_vocab._sharding import _as_varying, _sum_over_copies
from jsoftmax._large_vocab._tiles import (
    _hidden_grad,
    _loop,
    _vocab_slice,
    _weight_chunk,
    _weight_grad,
    _weight_grad_chunk,
)

# Tokens per row block of a filtered backward tile: each (rows, chunk) block of the
# logits gradient decides on its own whether its d_hidden/d_weight matmuls run. Smaller
# blocks skip more on language-model logits (measured in docs/performance.md) but cost a
# `lax.cond` and a smaller matmul each.
FILTER_ROWS = 128


def _filter_option(filter_eps):
    """``filter_eps`` checked now (a clear error at the call), resolved per dtype later."""
    check.filter_eps(filter_eps, jnp.float32)
    return filter_eps


def _bounded_filter(cfg, cw):
    """Whether a tile's gradient can be bounded before recomputing it (see ``_pre_skip``).

    For the loss's statistics (``lse``, ``z_y``, ``Σ_c z_c``) every element is at most
    ``|g_lse| p + |g_zw|`` off the label column, and ``p <= exp(max_c z - lse)``: the
    forward's per-row chunk maxima bound it. Not for the entropy and top-k (other
    factors) nor for class-weighted smoothing, whose ``weight`` gradient ``Σ_i g_zw z``
    needs every logit.
    """
    return (
        cfg.filter_eps is not None
        and not cfg.need_entropy
        and cfg.top_k == 0
        and cfg.temperature == 1.0
        and not (cfg.need_zw and cw is not None)
    )


class _Filter(NamedTuple):
    """Per-token arrays the filtered backward needs (``None`` where not used)."""

    unit: jax.Array  # T_i, see _filter_unit
    y_local: jax.Array | None
    top_local: jax.Array | None
    g_top: jax.Array | None
    row_max: jax.Array | None  # (rows, chunks) forward maxima, for _pre_skip
    lse: jax.Array
    g_lse: jax.Array
    g_zw: jax.Array | None
    vma: frozenset


def _filter_unit(cfg, cts, cw, v_local):
    """Per-token gradient scale ``T_i`` against which ``filter_eps`` is measured.

    ``T_i`` is the mass of the token's target terms: ``|g_zy| + |g_zw|·Σ_c |w_c|`` (the
    label's and label smoothing's cotangents; for a cross-entropy token, its weight
    ``sample_weight_i·w_{y_i}`` times the reduction's factor) plus the entropy's and the
    top-k's cotangents; the cotangent of ``lse`` when nothing else reaches the token.
    So ``dz / T`` is Cut Cross-Entropy's ``p(1 + 2λ lse) - target`` for a cross-entropy
    token. ``T = 0`` marks a token without gradient (ignored, or zero cotangent).
    """
    acc = cfg.acc_dtype
    unit = jnp.zeros(cts.lse.shape, acc)
    if cts.zy is not None:
        g_zy = jnp.abs(cts.zy)
        unit = unit + (g_zy if g_zy.ndim == 1 else jnp.sum(g_zy, axis=1))
    if cfg.need_zw:
        w_abs = jnp.asarray(v_local, acc) if cw is None else jnp.sum(jnp.abs(cw.astype(acc)))
        if cfg.axis_name is not None:
            w_abs = lax.psum(w_abs, cfg.axis_name)
        unit = unit + jnp.abs(cts.zw) * w_abs
    if cts.entropy is not None:
        unit = unit + jnp.abs(cts.entropy)
    if cts.top_z is not None:
        unit = unit + jnp.sum(jnp.abs(cts.top_z), axis=1)
    return jnp.where(unit > 0, unit, jnp.abs(cts.lse))


def _must_keep(flt, rs, start, size):
    """Rows ``rs`` whose label (or differentiated top-k index) lies in the chunk."""
    active = flt.unit[rs] != 0
    keep = jnp.zeros(active.shape, bool)
    if flt.y_local is not None:
        y = flt.y_local[rs]
        inside = (y >= start) & (y < start + size)
        keep = active & (inside if inside.ndim == 1 else jnp.any(inside, axis=1))
    if flt.top_local is not None:
        t = flt.top_local[rs]
        keep = keep | jnp.any((t >= start) & (t < start + size) & (flt.g_top[rs] != 0), axis=1)
    return keep


def _skippable(dz, flt, rs, start, size, cfg):
    """Whether a ``(rows, chunk)`` tile's ``d_hidden``/``d_weight`` matmuls may be skipped.

    Only when every element of its logits gradient ``dz`` (the one actually applied:
    class/sample weights, z-loss and soft-cap factors included) is ``< filter_eps·T_i``
    on its active tokens (``T_i != 0``), none of them has its label (or a differentiated
    top-k index) in the chunk, and none is poisoned: a NaN ``dz`` or ``T`` fails ``<``.
    """
    unit = flt.unit[rs]
    small = jnp.all(jnp.abs(dz) < cfg.filter_eps * unit[:, None], axis=1) | (unit == 0)
    return jnp.all(small & ~_must_keep(flt, rs, start, size))


def _pre_skip(flt, rs, start, size, cfg):
    """``_skippable`` decided from the forward's chunk maxima, before any recomputation.

    ``|dz_ic| <= |g_lse,i|·exp(max_c z_ic - lse_i) + |g_zw,i|`` off the label column (the
    soft-cap factor is at most 1), so a tile where that bound is ``< filter_eps·T_i`` for
    every active token (and no label lies in it) needs neither its logits nor its
    matmuls; equal to the exact test up to the smoothing term and rounding.
    """
    unit = flt.unit[rs]
    p_max = jnp.exp(flt.row_max[rs, start // cfg.chunk] - flt.lse[rs])
    bound = jnp.abs(flt.g_lse[rs]) * p_max
    if flt.g_zw is not None:
        bound = bound + jnp.abs(flt.g_zw[rs])
    small = (bound < cfg.filter_eps * unit) | (unit == 0)
    return jnp.all(small & ~_must_keep(flt, rs, start, size))


def _filtered_loop(cfg, flt, tile, h, w, b, cw, cts, init):
    """The backward sweep with gradient filtering, ``(rows, chunk)`` tile by tile.

    Each tile recomputes its logits and gradient, adds the cheap bias / class-weight
    gradient sums, and runs its two matmuls under a ``lax.cond`` on ``_skippable``.
    Where ``_bounded_filter`` holds, ``_pre_skip`` is decided first for every tile of a
    chunk: a chunk with no skippable tile takes one chunk-wide step (as without
    filtering: no per-tile overhead where filtering cannot help), otherwise each tile
    sits under a ``lax.cond`` on it, so a skipped tile costs no recomputation either.
    """
    n = h.shape[0]
    acc = cfg.acc_dtype
    blocks = [slice(r, min(r + cfg.filter_rows, n)) for r in range(0, n, cfg.filter_rows)]
    bounded = flt.row_max is not None

    def body(carry, start, size):
        dh_blocks, dw, db, dcw = carry
        w_c = _weight_chunk(w, cfg, start, size)
        b_c = _vocab_slice(b, cfg, start, size)
        cw_c = _vocab_slice(cw, cfg, start, size) if cfg.need_zw else None
        d_shape = (h.shape[1], size) if cfg.layout == "dv" else (size, h.shape[1])
        sums = (
            jnp.zeros(d_shape, acc),
            None if db is None else jnp.zeros((size,), acc),
            None if dcw is None or not cfg.need_zw else jnp.zeros((size,), acc),
        )
        state = (dh_blocks, *_as_varying(sums, flt.vma))

        def sums_of(z, dz, rs, db_c, dcw_c):
            db_c = None if db_c is None else db_c + jnp.sum(dz, 0)
            dcw_c = None if dcw_c is None else dcw_c + cts.zw[rs] @ z
            return db_c, dcw_c

        def whole(dh_blocks, dw_c, db_c, dcw_c):
            # Every tile kept: one chunk-wide step, as without filtering.
            z, dz = tile(slice(None), start, size, w_c, b_c, cw_c)
            dz_c = dz.astype(cfg.compute_dtype)
            dh = _hidden_grad(dz_c, w_c, cfg)
            dh_blocks = tuple(dh_b + dh[rs] for rs, dh_b in zip(blocks, dh_blocks, strict=True))
            return (
                dh_blocks,
                dw_c + _weight_grad(h, dz_c, cfg),
                *sums_of(z, dz, slice(None), db_c, dcw_c),
            )

        def tiled(dh_blocks, dw_c, db_c, dcw_c, pre=None):
            out = []
            for k, (rs, dh_b) in enumerate(zip(blocks, dh_blocks, strict=True)):

                def matmuls(dh_b, dw_c, dz_c, rs=rs):
                    dh_b = dh_b + _hidden_grad(dz_c, w_c, cfg)
                    return dh_b, dw_c + _weight_grad(h[rs], dz_c, cfg)

                def work(dh_b, dw_c, db_c, dcw_c, rs=rs, matmuls=matmuls):
                    z, dz = tile(rs, start, size, w_c, b_c, cw_c)
                    db_c, dcw_c = sums_of(z, dz, rs, db_c, dcw_c)
                    skip = _skippable(dz, flt, rs, start, size, cfg)
                    dz_c = dz.astype(cfg.compute_dtype)
                    keep = lambda a, b, _: (a, b)  # noqa: E731
                    dh_b, dw_c = lax.cond(skip, keep, matmuls, dh_b, dw_c, dz_c)
                    return dh_b, dw_c, db_c, dcw_c

                tile_state = (dh_b, dw_c, db_c, dcw_c)
                if pre is None:
                    tile_state = work(*tile_state)
                else:
                    tile_state = lax.cond(pre[k], lambda *a: a, work, *tile_state)
                dh_b, dw_c, db_c, dcw_c = tile_state
                out.append(dh_b)
            return tuple(out), dw_c, db_c, dcw_c

        if bounded:
            pre = [_pre_skip(flt, rs, start, size, cfg) for rs in blocks]
            any_skip = functools.reduce(jnp.logical_or, pre)
            state = lax.cond(any_skip, functools.partial(tiled, pre=pre), whole, *state)
        else:
            state = tiled(*state)
        dh_blocks, dw_c, db_c, dcw_c = state
        dw_c = _sum_over_copies(_weight_grad_chunk(dw_c, cfg), w)  # as in _core's sweep
        dw = lax.dynamic_update_slice_in_dim(dw, dw_c.astype(dw.dtype), start, cfg.vocab_axis)
        if db is not None:
            db = lax.dynamic_update_slice_in_dim(db, db_c.astype(db.dtype), start, 0)
        if dcw_c is not None:
            dcw = lax.dynamic_update_slice_in_dim(dcw, dcw_c.astype(dcw.dtype), start, 0)
        return dh_blocks, dw, db, dcw

    dh, dw, db, dcw = init
    carry = (tuple(dh[rs] for rs in blocks), dw, db, dcw)
    dh_blocks, dw, db, dcw = _loop(w.shape[cfg.vocab_axis], cfg.chunk, body, carry)
    return jnp.concatenate(dh_blocks, axis=0), dw, db, dcw

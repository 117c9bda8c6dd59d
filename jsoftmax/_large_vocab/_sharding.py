"""Vocabulary parallelism inside ``jax.shard_map``: shard offsets, the collectives that
combine per-shard statistics, and the varying-axes bookkeeping of cotangents.

With ``axis_name`` the core runs on a vocabulary shard: one ``pmax`` for the row max,
then one stacked ``psum`` of the rescaled sum-exp, the label logit (nonzero on the
owning shard only) and the smoothing sum (Megatron-LM's vocab-parallel cross-entropy);
``d_hidden`` is ``psum``-ed over the vocabulary axis, ``d_weight`` stays local. Which
cotangents need a ``psum`` is read from shard_map's varying-axes types
(``check_vma=True``, the default), so a data axis works too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jsoftmax import _compat
from jsoftmax._large_vocab._tiles import _rescale


def _axis(axis_name):
    return tuple(axis_name) if isinstance(axis_name, list) else axis_name


def _shard_offset(cfg, v_local):
    if cfg.axis_name is None:
        return 0
    return lax.axis_index(cfg.axis_name) * v_local


def _vma(*arrays) -> frozenset:
    """Mesh axes (inside ``shard_map``) over which any of ``arrays`` varies."""
    out = frozenset()
    for a in arrays:
        if a is not None:
            out |= _compat.vma(a)
    return out


def _as_varying(tree, vma):
    """Mark a loop's initial carry as varying over ``vma``, like the values the loop adds.

    Under ``shard_map``'s varying-axes typing a loop carry must keep its type; zeros
    start out invariant while per-shard chunk results vary over the vocabulary axis.
    """

    def cast(x):
        missing = tuple(a for a in vma if a not in _vma(x))
        return _compat.pvary(x, missing) if missing else x

    return jax.tree.map(cast, tree)


def _sum_over_copies(ct, primal):
    """Cotangent of ``primal`` from a per-shard partial one, inside ``shard_map``.

    Where the primal is the same on every shard of a mesh axis but its partial
    cotangent differs per shard, every copy fed a different part of the loss, so the
    whole cotangent is the sum over that axis: ``d_hidden`` summed over the vocabulary
    axis (Megatron's backward all-reduce), ``d_weight`` over a data axis that the
    weight is replicated on. Outside ``shard_map`` nothing varies and this is a no-op.
    """
    if ct is None:
        return None
    extra = tuple(a for a in _vma(ct) if a not in _vma(primal))
    return lax.psum(ct, extra) if extra else ct


def _global_stats(cfg, m, s, zy, zw, t=None):
    """Combine per-shard ``(max, sum-exp, z_y, Σ w z, t)`` over the vocabulary axis.

    One ``pmax`` for the max, then a single stacked ``psum`` of the rescaled sums and
    the additive statistics (only the owning shard has a nonzero ``z_y``).
    """
    if cfg.axis_name is None:
        return m, s, zy, zw, t
    m_all = lax.pmax(m, cfg.axis_name)
    m_safe = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
    s, t = _rescale(m, m_safe, s, t, cfg)
    parts = [s, zy, zw] + ([] if t is None else [t])
    summed = lax.psum(jnp.stack(parts), cfg.axis_name)
    return m_all, summed[0], summed[1], summed[2], (None if t is None else summed[3])


def _gather_over(cfg, *arrays):
    """Every shard's ``(rows, k)`` candidates side by side: ``(rows, n_shards·k)``.

    Each shard places its block at its own offset in zeros and one ``psum`` adds the
    blocks (exact: every other term is 0). Unlike ``all_gather``, the sum is typed as
    the same on every shard, so the result can leave ``shard_map`` replicated.
    """
    n_shards = lax.psum(1, cfg.axis_name)  # a Python int: the size of the axis (or axes)
    index = lax.axis_index(cfg.axis_name)
    out = []
    for a in arrays:
        k = a.shape[1]
        full = jnp.zeros((a.shape[0], n_shards * k), a.dtype)
        out.append(lax.dynamic_update_slice_in_dim(full, a, index * k, axis=1))
    return lax.psum(tuple(out), cfg.axis_name)


def _label_weights(cw, y, keep, cfg):
    """``w_{y_i}`` from this shard's slice of the class weights, summed over the shards."""
    v_local = cw.shape[0]
    y_local = y - _shard_offset(cfg, v_local)
    here = keep & (y_local >= 0) & (y_local < v_local)
    w_y = jnp.where(here, cw[jnp.clip(y_local, 0, v_local - 1)], 0.0).astype(cfg.acc_dtype)
    return lax.psum(w_y, cfg.axis_name)

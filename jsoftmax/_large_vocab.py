"""Linear cross-entropy for large vocabularies, without materialising the logits.

``linear_cross_entropy(hidden, weight, labels)`` equals
``cross_entropy(hidden @ weight + bias, labels)`` but never holds the ``(N, V)``
logits, their softmax or their gradient: the vocabulary is scanned in chunks and
only per-token statistics are kept — the logsumexp (``lse``, by an online max/sum-exp
through ``_numerics.online_combine``), the label logit ``z_y`` and, for label
smoothing, ``Σ_c w_c z_c``. Every loss option is a per-token combination of those
three numbers, applied outside the chunked core, so autodiff of that combination
handles weights, reductions and per-token cotangents.

The core's ``custom_vjp`` keeps the inputs plus ``lse`` as residuals and recomputes
each chunk's logits in the backward pass, producing ``d_hidden`` (accumulated) and
``d_weight`` (written chunk by chunk) with the softmax ``exp(z - lse)`` of that chunk
only. Forward: one matmul and one ``exp`` per logit; backward: three matmuls and one
``exp``. A schedule that computes the gradients during the forward pass (token
chunks across the whole vocabulary, three matmuls in all) was measured and dropped:
it needs a float32 ``(D, V)`` accumulator (more than 1/8 of the naive memory at
N=2048, V=65536) and its small-K ``d_weight`` updates made it slower on this CPU
(see the README section).

With ``axis_name`` the core runs on a vocabulary shard inside ``shard_map``: one
``pmax`` for the row max, then one stacked ``psum`` of the rescaled sum-exp, the
label logit (nonzero on the owning shard only) and the smoothing sum (Megatron-LM's
vocab-parallel cross-entropy); ``d_hidden`` is ``psum``-ed over the vocabulary axis,
``d_weight`` stays local. Which cotangents need a ``psum`` is read from shard_map's
varying-axes types (``check_vma=True``, the default), so a data axis works too.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _compat, _impl
from jsoftmax import _numerics as num
from jsoftmax import _validate as check
from jsoftmax._checks import label_check

_LAYOUTS = ("dv", "vd")
_IMPLS = ("auto", "xla", "pallas")

# Bytes of one float32 logits tile (rows x cols) when `chunk_size` is None: large
# enough that each matmul keeps both cores busy, small next to the naive (N, V)
# logits (e.g. 512 MiB at N=2048, V=65536). Three or four such tiles are live at once.
_TILE_BYTES = 16 * 2**20
_MIN_CHUNK = 128
# Tokens per row block of a filtered backward tile: each (rows, chunk) block of the
# logits gradient decides on its own whether its d_hidden/d_weight matmuls run. Smaller
# blocks skip more on language-model logits (measured in docs/performance.md) but cost a
# `lax.cond` and a smaller matmul each.
_FILTER_ROWS = 128


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static configuration shared by the forward and backward passes."""

    layout: str  # "dv": weight is (D, V); "vd": weight is (V, D)
    chunk: int  # vocabulary entries per chunk (vocabulary schedule)
    softcap: float | None
    axis_name: Any  # None, or the mesh axis (axes) the vocabulary is sharded over
    need_zw: bool  # whether Σ_c w_c z_c is needed (label smoothing)
    compute_dtype: Any
    acc_dtype: Any
    # Per-token statistics beyond the loss's (linear_softmax_stats / return_stats):
    temperature: float = 1.0  # the statistics are of softmax(z / temperature)
    need_entropy: bool = False
    need_argmax: bool = False
    top_k: int = 0
    # Gradient filtering (backward only): threshold and rows per filtered tile.
    filter_eps: float | None = None
    filter_rows: int = 0

    @property
    def vocab_axis(self) -> int:
        return 1 if self.layout == "dv" else 0


# ---------------------------------------------------------------------- tile helpers


def _vocab_slice(arr, cfg, start, size):
    """Columns ``[start, start + size)`` of a per-vocabulary array (weight, bias, ...)."""
    if arr is None:
        return None
    axis = cfg.vocab_axis if arr.ndim == 2 else 0
    if isinstance(start, int) and start == 0 and size == arr.shape[axis]:
        return arr
    return lax.dynamic_slice_in_dim(arr, start, size, axis)


def _tile_logits(h, w, b, cfg):
    """``softcap(h @ w + b)`` for one tile, accumulated in float32 (float64 for f64)."""
    contract = 0 if cfg.layout == "dv" else 1
    x = lax.dot_general(
        h,
        w.astype(cfg.compute_dtype),
        (((1,), (contract,)), ((), ())),
        preferred_element_type=cfg.acc_dtype,
    )
    if b is not None:
        x = x + b.astype(cfg.acc_dtype)
    if cfg.softcap is not None:
        x = cfg.softcap * jnp.tanh(x / cfg.softcap)
    return x


def _softcap_chain(dz, z, cfg):
    """Chain rule through ``z = s·tanh(x/s)``: ``dz/dx = 1 - (z/s)²``, from the output."""
    if cfg.softcap is None:
        return dz
    t = z / cfg.softcap
    return dz * (1.0 - t * t)


def _hidden_grad(dz, w, cfg):
    """``dz @ wᵀ`` (rows, D) for either layout, without transposing ``w``."""
    contract = 1 if cfg.layout == "dv" else 0
    return lax.dot_general(
        dz, w.astype(cfg.compute_dtype), (((1,), (contract,)), ((), ())),
        preferred_element_type=cfg.acc_dtype,
    )  # fmt: skip


def _weight_grad(h, dz, cfg):
    """``hᵀ dz`` in the weight's layout: (D, cols) for "dv", (cols, D) for "vd"."""
    a, b = (h, dz) if cfg.layout == "dv" else (dz, h)
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=cfg.acc_dtype)


def _label_hits(y_local, start, size):
    """Boolean (rows, size) tile: where column ``start + j`` is the row's label."""
    cols = start + lax.broadcasted_iota(jnp.int32, (1, size), 1)
    return cols == y_local[:, None]


def _shard_offset(cfg, v_local):
    if cfg.axis_name is None:
        return 0
    return lax.axis_index(cfg.axis_name) * v_local


def _loop(total, chunk, body, carry):
    """``carry = body(carry, start, size)`` over ``[0, total)`` in static-size chunks.

    The full chunks run in one ``fori_loop``; a ragged remainder gets its own
    statically shaped step, so no input is ever padded or copied.
    """
    n_full, rem = divmod(total, chunk)
    if n_full == 1:
        carry = body(carry, 0, chunk)
    elif n_full > 1:
        carry = lax.fori_loop(0, n_full, lambda i, c: body(c, i * chunk, chunk), carry)
    if rem:
        carry = body(carry, n_full * chunk, rem)
    return carry


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


# ---------------------------------------------- vocabulary schedule (online logsumexp)

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


def _scaled(x, cfg):
    """``x / T``; the identity when the temperature is the default 1."""
    return x if cfg.temperature == 1.0 else x / cfg.temperature


def _merge_top_k(values, indices, k):
    """The ``k`` largest ``values`` per row (descending, ties to the lower index)."""
    neg, idx = lax.sort((-values, indices), dimension=1, num_keys=2)
    return -neg[:, :k], idx[:, :k]


def _rescale(m, m_safe, s, t, cfg):
    """``(s, t)`` taken from shift ``m`` to shift ``m_safe`` (``m <= m_safe``).

    ``s = Σ exp((z-m)/T)`` scales by ``α = exp((m - m_safe)/T)``; the entropy's
    ``t = Σ exp((z-m)/T)·(z-m)/T`` becomes ``α·(t + (m - m_safe)/T · s)``. An empty
    partial sum (``s == 0``, ``m`` maybe ``-inf``) stays exactly 0.
    """
    shift = _scaled(jnp.where(s > 0, m - m_safe, 0.0), cfg)
    alpha = jnp.where(s > 0, jnp.exp(shift), 0.0)
    if t is not None:
        t = alpha * (t + shift * s)
    return alpha * s, t


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
            h, _vocab_slice(w, cfg, start, size), _vocab_slice(b, cfg, start, size), cfg
        )
        if y is not None:
            zy = zy + jnp.sum(jnp.where(_label_hits(y_local, start, size), z, 0.0), axis=1)
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
        zeros,
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
            dz = dz + jnp.where(_label_hits(y_local[rs], start, size), cts.zy[rs, None], 0.0)
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
        w_c = _vocab_slice(w, cfg, start, size)
        cw_c = _vocab_slice(cw, cfg, start, size) if cfg.need_zw else None
        z, dz = tile(slice(None), start, size, w_c, _vocab_slice(b, cfg, start, size), cw_c)
        if dcw is not None and cfg.need_zw:
            dcw = lax.dynamic_update_slice_in_dim(dcw, (cts.zw @ z).astype(dcw.dtype), start, 0)
        dz_c = dz.astype(cfg.compute_dtype)
        dh = dh + _hidden_grad(dz_c, w_c, cfg)
        dw_c = _weight_grad(h, dz_c, cfg).astype(dw.dtype)
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


# ------------------------------------------------------------------ gradient filtering


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
        unit = unit + jnp.abs(cts.zy)
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
        keep = active & (y >= start) & (y < start + size)
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
        w_c = _vocab_slice(w, cfg, start, size)
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


# ------------------------------------------------------------------- public function


def _default_chunk(n_rows: int, v_local: int) -> int:
    """Vocabulary chunk so that one float32 ``(n_rows, chunk)`` tile is ~``_TILE_BYTES``."""
    chunk = _TILE_BYTES // (4 * max(n_rows, 1))
    chunk = max(_MIN_CHUNK, chunk // _MIN_CHUNK * _MIN_CHUNK)
    return min(chunk, v_local)


def _label_weights(cw, y, keep, cfg):
    """``w_{y_i}`` from this shard's slice of the class weights, summed over the shards."""
    v_local = cw.shape[0]
    y_local = y - _shard_offset(cfg, v_local)
    here = keep & (y_local >= 0) & (y_local < v_local)
    w_y = jnp.where(here, cw[jnp.clip(y_local, 0, v_local - 1)], 0.0).astype(cfg.acc_dtype)
    return lax.psum(w_y, cfg.axis_name)


def _pallas_unsupported(axis_name, return_lse, has_weight, label_smoothing, dtypes, stats=False):
    """Why the Pallas kernel cannot serve this call (``None`` when it can)."""
    if any(jnp.dtype(d) == jnp.float64 for d in dtypes):
        return "float64 inputs (the kernels compute in float32)"
    if axis_name is not None:
        return "`axis_name` (vocab-parallel) is only implemented by impl='xla'"
    if return_lse:
        return "`return_lse=True` is only implemented by impl='xla'"
    if stats:
        return "`return_stats=True` is only implemented by impl='xla'"
    if has_weight and label_smoothing > 0:
        return (
            "`weight` with `label_smoothing` needs a class-weighted smoothing sum "
            "the kernel does not compute"
        )
    return None


class SoftmaxStats(NamedTuple):
    r"""Per-token statistics of ``p = softmax(u)`` from :func:`linear_softmax_stats`.

    Every field has the token shape ``hidden.shape[:-1]`` (``top_k`` fields one more
    axis of length ``top_k``); a field is ``None`` when not asked for (no ``labels``, or
    ``top_k=0``). Floats are float32 (float64 for float64 inputs).

    Attributes:
      lse: ``log Σ_c exp(u_c)``. Differentiable.
      label_logprob: ``log p_y = u_y - lse``; 0 (with zero gradient) where the label is
        ``ignore_index``; NaN for a label outside ``[0, V)``, with a NaN gradient
        wherever that value is used. Differentiable.
      entropy: ``H = -Σ_c p_c log p_c`` in nats. Differentiable.
      argmax: int32 index of the largest logit (the first one on ties, like
        ``jnp.argmax``).
      correct: bool, ``argmax == label``; ``False`` where the label is ignored or bad.
      topk_logprobs: the ``top_k`` largest ``log p_c``, descending. Differentiable.
      topk_indices: their int32 class indices (lower index first on ties).
    """

    lse: jax.Array
    label_logprob: jax.Array | None
    entropy: jax.Array
    argmax: jax.Array
    correct: jax.Array | None
    topk_logprobs: jax.Array | None
    topk_indices: jax.Array | None


def _finish_stats(core, cfg, inp, order=None):
    """The public :class:`SoftmaxStats` from the core's raw per-token outputs.

    With a vocabulary ``order`` the core's indices are positions in the permuted
    vocabulary (as are the labels ``inp.y``); the returned indices are the caller's ids.
    """
    lse = core.lse
    label_logprob = correct = None
    if inp.y is not None:
        # A bad label: NaN value, and a NaN gradient wherever that log-prob is used.
        lp = _scaled(core.zy, cfg) - _poison_if_used(lse, inp.bad)
        label_logprob = jnp.where(inp.keep | inp.bad, lp, 0.0)
        correct = inp.keep & (core.argmax == inp.y)
    topk_logprobs = None
    if core.top_z is not None:
        # A -inf logit (masked by the bias) is log p = -inf, also in an all-masked row.
        finite = core.top_z > -jnp.inf
        lp = _scaled(core.top_z, cfg) - jnp.where(finite, lse[:, None], 0.0)
        topk_logprobs = jnp.where(finite, lp, -jnp.inf)
    shape = inp.batch_shape

    def token(x, extra=()):
        return None if x is None else x.reshape(shape + extra)

    argmax, top_i = core.argmax, core.top_i
    if order is not None:
        argmax = order[argmax]
        if top_i is not None:
            top_i = order[top_i]
    k = (cfg.top_k,)
    return SoftmaxStats(
        token(lse), token(label_logprob), token(core.entropy), token(argmax),
        token(correct), token(topk_logprobs, k), token(top_i, k),
    )  # fmt: skip


# ------------------------------------------------------------------ vocabulary order


def _filter_option(filter_eps):
    """``filter_eps`` checked now (a clear error at the call), resolved per dtype later."""
    check.filter_eps(filter_eps, jnp.float32)
    return filter_eps


def _reorder(order, labels, bias, weight, linear_weight, layout, axis_name, ignore_index):
    """Caller-id inputs moved to the positions of a permuted vocabulary.

    ``linear_weight`` is stored permuted (column ``j`` holds the caller's class
    ``order[j]``); labels become positions ``inv[y]``, and the per-class vectors (bias,
    class weights; given in caller ids) are gathered as ``vec[order]`` -- ``O(V)`` work,
    whose gradient scatters back to caller ids. Under ``axis_name`` each shard keeps its
    slice of the gathered vectors. An ``order`` that is not a permutation of ``[0, V)``
    poisons every non-ignored token like an out-of-range label (no host sync).
    """
    v_local = linear_weight.shape[1 if layout == "dv" else 0]
    n_shards = 1 if axis_name is None else lax.psum(1, axis_name)
    n_vocab = v_local * n_shards
    order = check.vocab_order(order, n_vocab)
    if 0 <= ignore_index < n_vocab:
        raise ValueError(
            f"`vocab_order` needs an `ignore_index` outside [0, {n_vocab}) (got "
            f"{ignore_index}): a permuted label could collide with it."
        )
    inv = (
        jnp.full((n_vocab,), -1, jnp.int32)
        .at[order]
        .set(jnp.arange(n_vocab, dtype=jnp.int32), mode="drop")
    )
    is_perm = jnp.all(inv >= 0)
    if labels is not None:
        y = check.widen_labels(jnp.asarray(labels))
        real = (y != ignore_index) & (y >= 0) & (y < n_vocab)
        pos = jnp.where(real, inv[jnp.clip(y, 0, n_vocab - 1)].astype(y.dtype), y)
        # n_vocab is out of range: the bad-label path poisons value and gradient.
        labels = jnp.where(is_perm | (y == ignore_index), pos, n_vocab).astype(y.dtype)

    def gather(vec, name, local):
        if vec is None:
            return None
        vec = check.class_vector(vec, n_vocab, name)[order]
        if local and n_shards > 1:
            vec = lax.dynamic_slice_in_dim(vec, lax.axis_index(axis_name) * v_local, v_local)
        return vec

    # Class weights may stay whole under axis_name (the loss slices them itself).
    return order, labels, gather(bias, "linear_bias", True), gather(weight, "weight", False)


def vocab_order_from_counts(counts: ArrayLike) -> jax.Array:
    r"""A vocabulary order by decreasing frequency, for ``vocab_order=``.

    ``order = argsort(-counts)`` (stable: equal counts keep increasing ids), so that
    ``order[j]`` is the id of the ``j``-th most frequent class. Store the projection
    permuted once with it -- ``linear_weight[:, order]`` for a ``(D, V)`` weight,
    ``linear_weight[order]`` for ``(V, D)`` -- and train that array: rare classes then
    sit together in whole vocabulary chunks, which gradient filtering can skip.

    Args:
      counts: ``(V,)`` non-negative class (token) counts or frequencies.

    Returns:
      ``(V,)`` int32 permutation of ``[0, V)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax as jsm
      >>> jsm.vocab_order_from_counts(jnp.array([5, 40, 0, 40, 7])).tolist()
      [1, 3, 4, 0, 2]
    """
    counts = check.float_array(jnp.asarray(counts, dtype=jnp.result_type(float)), "counts")
    if counts.ndim != 1:
        raise ValueError(f"`counts` must be 1-D (one entry per class), got shape {counts.shape}.")
    return jnp.argsort(-counts, stable=True).astype(jnp.int32)


def linear_softmax_stats(
    hidden: ArrayLike,
    linear_weight: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    weight_layout: str = "dv",
    linear_bias: ArrayLike | None = None,
    temperature: float = 1.0,
    logit_softcap: float | None = None,
    top_k: int = 0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    axis_name: Any = None,
    filter_eps: float | str | None = None,
    vocab_order: ArrayLike | None = None,
) -> SoftmaxStats:
    r"""Per-token softmax statistics of a linear layer, without materialising the logits.

    For the sampler's distribution over the vocabulary, with ``z = c·tanh((h W + b)/c)``
    (``c = logit_softcap``; plain ``h W + b`` without it) and ``u = z / T``
    (``T = temperature``, applied after the soft cap, as a sampler does),

    .. math::
        \mathrm{lse}_i = \log\sum_c e^{u_{ic}}, \qquad
        \log p_{i y_i} = u_{i y_i} - \mathrm{lse}_i, \qquad
        H_i = -\sum_c p_{ic}\log p_{ic} = \mathrm{lse}_i - \sum_c p_{ic}\,u_{ic},

    plus the arg-max, whether it equals the label, and the ``top_k`` largest
    log-probabilities with their indices — all in one sweep over the vocabulary in
    chunks (an online max / sum-exp that also carries ``Σ_c e^{u_c - m}(u_c - m)`` for
    the entropy, a running arg-max and a running top-k), so the ``(N, V)`` logits never
    exist. What reinforcement-learning objectives (GRPO, PPO: ``log π(y)`` of sampled
    tokens and the policy's entropy), training metrics (accuracy, z-loss monitoring)
    and top-k distillation need from a language-model head.

    Reverse-mode differentiable in ``hidden``, ``linear_weight`` and ``linear_bias``
    through ``lse``, ``label_logprob``, ``entropy`` and ``topk_logprobs``, for any
    cotangents, with one ``custom_vjp`` whose backward pass recomputes the logits chunk
    by chunk (``∂H/∂u_c = -p_c (\log p_c + H)``); the integer outputs carry none.

    With ``temperature != 1`` the statistics are of ``softmax(z/T)``, so ``lse`` is
    ``logsumexp(z/T)``, not the cross-entropy's ``logsumexp(z)``;
    ``linear_cross_entropy(..., return_stats=True)`` returns these statistics at
    ``T = 1`` from the loss's own sweep.

    Args:
      hidden: ``(..., D)`` activations, any float dtype.
      linear_weight: ``(D, V)`` with ``weight_layout="dv"`` or ``(V, D)`` with
        ``"vd"`` (a tied embedding table), used as is. With ``axis_name``, this
        device's vocabulary shard.
      labels: optional integer ids of shape ``hidden.shape[:-1]`` (e.g. the sampled
        tokens); without them ``label_logprob`` and ``correct`` are ``None``. A label
        outside ``[0, V)`` that is not ``ignore_index`` gives a NaN ``label_logprob``
        (and gradient); :func:`jsoftmax.checked` names it instead.
      weight_layout: ``"dv"`` or ``"vd"``, see ``linear_weight``.
      linear_bias: optional ``(V,)`` bias (sharded like ``linear_weight``); ``-inf``
        entries mask vocabulary entries out (probability 0).
      temperature: ``T > 0``, a Python number (fixed at trace time).
      logit_softcap: optional ``c > 0`` (Gemma 2), applied before the temperature.
      top_k: a small Python int ``0 <= top_k <= V``: also return the ``top_k`` largest
        log-probabilities (of ``p``, not raw logits: what sampling and distillation
        use) and their indices.
      ignore_index: label value whose ``label_logprob`` is 0 and ``correct`` False.
      chunk_size: vocabulary entries per chunk, as in
        :func:`jsoftmax.linear_cross_entropy`.
      axis_name: mesh axis (or axes) over which ``linear_weight`` and ``linear_bias``
        are sharded along the vocabulary, inside ``jax.shard_map``: the statistics are
        over the whole vocabulary (global arg-max and top-k, entropy from the shards'
        sums); labels and indices are global.
      filter_eps: gradient filtering of the backward pass, as in
        :func:`jsoftmax.linear_cross_entropy`; here ``T_i`` sums the magnitudes of the
        cotangents of the token's ``label_logprob``, ``entropy`` and ``topk_logprobs``.
      vocab_order: a permuted ``linear_weight``'s order, as in
        :func:`jsoftmax.linear_cross_entropy`; ``argmax`` and ``topk_indices`` are
        returned in the caller's ids.

    Returns:
      A :class:`jsoftmax.SoftmaxStats` of per-token arrays.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax as jsm
      >>> h = jnp.array([[1.0, -1.0], [0.5, 2.0]])  # 2 tokens, D = 2
      >>> w = jnp.array([[1.0, 0.0, -1.0], [0.0, 1.0, 2.0]])  # (D, V), V = 3
      >>> s = jsm.linear_softmax_stats(h, w, jnp.array([0, 1]), top_k=2)
      >>> [round(v, 4) for v in s.label_logprob.tolist()]
      [-0.1429, -1.7413]
      >>> [round(v, 4) for v in s.entropy.tolist()]
      [0.4411, 0.6216]
      >>> s.argmax.tolist(), s.correct.tolist()
      ([0, 2], [True, False])
      >>> s.topk_indices.tolist()
      [[0, 1], [2, 1]]
      >>> hot = jsm.linear_softmax_stats(h, w, temperature=2.0)  # a sampler's T
      >>> hot.label_logprob is None, round(float(hot.entropy[0]), 4)
      (True, 0.8324)

    References:
      Wijmans et al. 2025, "Cut Your Losses in Large-Vocabulary Language Models",
      https://arxiv.org/abs/2411.09009 (chunked log-probabilities without logits);
      Shao et al. 2024, "DeepSeekMath" (GRPO), https://arxiv.org/abs/2402.03300.
    """
    check.choice(weight_layout, "weight_layout", _LAYOUTS)
    statics = _StatsStatics(
        layout=weight_layout,
        ignore_index=check.ignore_index(ignore_index),
        temperature=check.static_number(temperature, "temperature", lo=0.0, lo_open=True),
        softcap=check.static_number(
            logit_softcap, "logit_softcap", lo=0.0, lo_open=True, optional=True
        ),
        top_k=check.static_int(top_k, "top_k", minimum=0),
        chunk_size=check.static_int(chunk_size, "chunk_size", minimum=1, optional=True),
        axis_name=_axis(axis_name),
        filter_eps=_filter_option(filter_eps),
        filter_rows=_FILTER_ROWS,
    )
    return _linear_softmax_stats(statics, hidden, linear_weight, labels, linear_bias, vocab_order)


class _StatsStatics(NamedTuple):
    layout: str
    ignore_index: int
    temperature: float
    softcap: float | None
    top_k: int
    chunk_size: int | None
    axis_name: Any
    filter_eps: float | str | None = None
    filter_rows: int = 0


@functools.partial(jax.jit, static_argnums=(0,))
def _linear_softmax_stats(st, hidden, linear_weight, labels, linear_bias, vocab_order):
    order = None
    if vocab_order is not None:
        order, labels, linear_bias, _ = _reorder(
            vocab_order, labels, linear_bias, None, linear_weight, st.layout, st.axis_name,
            st.ignore_index,
        )  # fmt: skip
    inp = _check_inputs(
        "linear_softmax_stats", hidden, linear_weight, labels, linear_bias, st.layout,
        st.axis_name, st.ignore_index,
    )  # fmt: skip
    if st.top_k > inp.n_vocab:
        raise ValueError(f"`top_k`={st.top_k} is larger than the vocabulary ({inp.n_vocab}).")
    cfg = _make_config(
        inp, st.layout, st.chunk_size, st.softcap, st.axis_name, need_zw=False,
        temperature=st.temperature, need_entropy=True, need_argmax=True, top_k=st.top_k,
        filter_eps=st.filter_eps, filter_rows=st.filter_rows,
    )  # fmt: skip
    h2 = inp.h2.astype(cfg.compute_dtype)
    core = _stats(cfg, h2, inp.linear_weight, inp.linear_bias, None, inp.y)
    return _finish_stats(core, cfg, inp, order)


def linear_cross_entropy(
    hidden: ArrayLike,
    linear_weight: ArrayLike,
    labels: ArrayLike,
    *,
    linear_bias: ArrayLike | None = None,
    weight_layout: str = "dv",
    weight: ArrayLike | None = None,
    sample_weight: ArrayLike | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    reduction: str = "mean",
    normalizer: ArrayLike | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
    axis_name: Any = None,
    return_lse: bool = False,
    return_stats: bool = False,
    top_k: int = 0,
    filter_eps: float | str | None = None,
    vocab_order: ArrayLike | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array] | tuple[jax.Array, SoftmaxStats]:
    r"""Cross-entropy of a linear layer's logits, without materialising the logits.

    Equal to ``cross_entropy(hidden @ linear_weight + linear_bias, labels, ...)``: with
    logits ``z = c·tanh((h W + b)/c)`` (``c = logit_softcap``; plain ``h W + b`` without it),
    ``lse_i = log Σ_c exp(z_ic)`` and per-class weights ``w``,

    .. math::
        l_i = (1-ε)\,w_{y_i}(\mathrm{lse}_i - z_{i y_i})
              + \frac{ε}{V}\sum_c w_c(\mathrm{lse}_i - z_{ic})
              + λ\,w_{y_i}\mathrm{lse}_i^2

    times ``sample_weight_i`` (``w ≡ 1`` without ``weight``; the z-loss is weighted
    like the label term, as in :func:`jsoftmax.cross_entropy`), 0 where
    ``labels == ignore_index``; ``"mean"`` divides the sum by ``Σ_i sample_weight_i·w_{y_i}``
    over non-ignored tokens (PyTorch's weighted mean) and is 0.0 (zero gradient) when
    that is 0. The vocabulary is
    processed in tiles with an online logsumexp, so peak memory is a few
    ``(tokens, chunk_size)`` tiles instead of the ``(tokens, V)`` logits and their
    gradient. Reverse-mode differentiable in ``hidden``, ``linear_weight``,
    ``linear_bias``, ``weight`` and ``sample_weight``, for any cotangent (also per-token
    ones with ``reduction="none"``). The argument names follow PyTorch 2.13's
    ``torch.nn.functional.linear_cross_entropy``.

    Args:
      hidden: ``(..., D)`` activations, any float dtype.
      linear_weight: the output projection, ``(D, V)`` (a Flax ``Dense`` kernel) with
        ``weight_layout="dv"``, or ``(V, D)`` (a tied embedding table) with
        ``weight_layout="vd"`` — used as is, never transposed or copied. With
        ``axis_name``, this device's vocabulary shard.
      labels: integer class ids of shape ``hidden.shape[:-1]``. A label outside
        ``[0, V)`` that is not ``ignore_index`` makes that token's loss (and the
        gradient) NaN; :func:`jsoftmax.checked` names it instead.
      linear_bias: optional ``(V,)`` bias (sharded like ``linear_weight``).
      weight_layout: ``"dv"`` or ``"vd"``, see ``linear_weight``.
      weight: optional ``(V,)`` per-class weights, as in :func:`jsoftmax.cross_entropy`.
        Under ``axis_name``, this shard's slice or the whole ``(V,)`` vector.
      sample_weight: optional per-token weights of shape ``labels.shape``,
        multiplied into the numerator and the denominator of ``"mean"``.
      ignore_index: label value that contributes nothing.
      label_smoothing: ``ε`` in ``[0, 1]`` (PyTorch's formula, class weights included).
      z_loss: ``λ >= 0``; adds ``λ·w_y·lse²`` per non-ignored token (PaLM).
      logit_softcap: optional ``c > 0``; logits become ``c·tanh(z/c)`` (Gemma 2).
      reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-token, shape of ``labels``).
      normalizer: optional denominator for ``reduction="mean"`` in place of the local
        one (see :func:`jsoftmax.cross_entropy` and :func:`jsoftmax.loss_denominator`).
      chunk_size: vocabulary entries per chunk; ``None`` picks one so that a float32
        ``(tokens, chunk_size)`` tile is about 16 MiB. A ``V`` that is not a multiple
        is fine (the last chunk is smaller).
      impl: ``"xla"`` (pure JAX), ``"pallas"`` (``jsoftmax.kernels``) or ``"auto"``:
        the kernel only on a platform where it is proven -- compiled for every target
        in the compile matrix *and* measured faster than XLA on that hardware. No
        device measurement exists yet, so ``"auto"`` is ``"xla"`` on every platform
        for now.
      axis_name: mesh axis name (or tuple of names) over which ``linear_weight`` (and
        ``linear_bias``, ``weight``) are sharded along the vocabulary, inside
        ``jax.shard_map``; the result is the loss over the whole vocabulary. Labels
        are global class ids.
      return_lse: also return the per-token logsumexp (float32, shape of
        ``labels``), e.g. for monitoring or a custom z-loss.
      return_stats: also return a :class:`jsoftmax.SoftmaxStats` of per-token
        statistics (logsumexp, label log-probability, entropy, arg-max, accuracy) of
        ``softmax(z)``, computed in the same sweep over the vocabulary as the loss (see
        :func:`jsoftmax.linear_softmax_stats`; here the temperature is 1, so
        ``stats.lse`` is the loss's own logsumexp and, without options,
        ``-stats.label_logprob`` the per-token loss). Differentiable like the loss, in
        the same backward sweep. Not together with ``return_lse`` (``stats.lse`` is it).
      top_k: with ``return_stats``, also the ``top_k`` largest log-probabilities per
        token and their indices (a small Python int; 0 for none).
      filter_eps: gradient filtering (Cut Cross-Entropy's): ``None`` (exact, the
        default), a Python float ``>= 0``, or ``"auto"`` (the compute dtype's epsilon /
        32: ``2**-12`` for bfloat16, ``2**-28`` for float32). The backward pass skips
        the ``d_hidden``/``d_weight`` matmuls of a ``(128 tokens, chunk)`` tile when
        every element of its logits gradient is below ``filter_eps·T_i`` for each
        token ``i`` (``T_i`` the token's weight in the loss), unless a token's label
        lies in the tile. The loss value never changes; the error bound is in the
        large-vocabulary guide. On ``impl="pallas"`` the kernel's own tiles filter.
      vocab_order: optional ``(V,)`` integer permutation: ``linear_weight`` is stored
        permuted, its column (``"dv"``; row for ``"vd"``) ``j`` being the caller's
        class ``vocab_order[j]`` (e.g. :func:`jsoftmax.vocab_order_from_counts`, so that
        rare classes share chunks that filtering skips). ``labels``, ``weight``,
        ``linear_bias`` and the returned indices stay in the caller's ids; the
        ``linear_weight`` gradient comes back in the stored (permuted) layout. Under
        ``axis_name``, ``linear_bias`` and ``weight`` must then be whole ``(V,)``
        vectors. An order that is not a permutation makes the loss NaN.

    Returns:
      The loss (float32 for half-precision inputs, float64 for float64): a scalar,
      or per-token with ``reduction="none"``; with ``return_lse=True`` a pair
      ``(loss, lse)``; with ``return_stats=True`` a pair ``(loss, stats)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax as jsm
      >>> h = jnp.array([[1.0, -1.0], [0.5, 2.0]])  # 2 tokens, D = 2
      >>> w = jnp.array([[1.0, 0.0, -1.0], [0.0, 1.0, 2.0]])  # (D, V), V = 3
      >>> y = jnp.array([0, 2])
      >>> round(float(jsm.linear_cross_entropy(h, w, y)), 4)
      0.1921
      >>> round(float(jsm.linear_cross_entropy(h, w.T, y, weight_layout="vd")), 4)
      0.1921
      >>> per_token = jsm.linear_cross_entropy(h, w, y, reduction="none")
      >>> [round(v, 4) for v in per_token.tolist()]
      [0.1429, 0.2413]
      >>> order = jnp.array([2, 0, 1])  # the weight stored permuted; labels unchanged
      >>> loss = jsm.linear_cross_entropy(
      ...     h, w[:, order], y, vocab_order=order, filter_eps=2.0**-12)
      >>> round(float(loss), 4)
      0.1921

    References:
      Wijmans et al. 2025, "Cut Your Losses in Large-Vocabulary Language Models",
      https://arxiv.org/abs/2411.09009 ; Shoeybi et al. 2019, "Megatron-LM",
      https://arxiv.org/abs/1909.08053 (vocab-parallel cross-entropy).
    """
    check.choice(weight_layout, "weight_layout", _LAYOUTS)
    check.choice(impl, "impl", _IMPLS)
    reduction = check.reduction(reduction)
    eps = check.static_number(label_smoothing, "label_smoothing", lo=0.0, hi=1.0)
    top_k = check.static_int(top_k, "top_k", minimum=0)
    if return_lse and return_stats:
        raise ValueError(
            "`return_lse=True` and `return_stats=True` together: the statistics hold the "
            "logsumexp as `stats.lse`; pass only `return_stats=True`."
        )
    if top_k and not return_stats:
        raise ValueError("`top_k` selects statistics: it needs `return_stats=True`.")
    dtypes = [jnp.result_type(a) for a in (hidden, linear_weight) if hasattr(a, "dtype")]
    why_not = _pallas_unsupported(
        axis_name, return_lse, weight is not None, eps, dtypes, stats=bool(return_stats)
    )
    if impl == "pallas" and why_not is not None:
        raise ValueError(f"impl='pallas' does not support this call: {why_not}.")
    if impl == "auto":
        # The kernel only where it is proven (compiled and measured faster): jsoftmax._impl.
        impl = _impl.resolve_auto("linear_cross_entropy", supported=why_not is None)
    statics = _Statics(
        layout=weight_layout,
        ignore_index=check.ignore_index(ignore_index),
        eps=eps,
        lam=check.static_number(z_loss, "z_loss", lo=0.0),
        softcap=check.static_number(
            logit_softcap, "logit_softcap", lo=0.0, lo_open=True, optional=True
        ),
        reduction=reduction,
        chunk_size=check.static_int(chunk_size, "chunk_size", minimum=1, optional=True),
        impl=impl,
        axis_name=_axis(axis_name),
        return_lse=bool(return_lse),
        return_stats=bool(return_stats),
        top_k=top_k,
        filter_eps=_filter_option(filter_eps),
        filter_rows=_FILTER_ROWS,
    )
    normalizer = check.normalizer(normalizer, reduction)
    # Jitted so that eager calls compile the chunk loops once instead of dispatching
    # them op by op; inside an outer jit or shard_map this is inlined.
    return _linear_cross_entropy(
        statics, hidden, linear_weight, labels, linear_bias, weight, sample_weight, normalizer,
        vocab_order,
    )  # fmt: skip


class _Statics(NamedTuple):
    """The hashable (static) options of one call."""

    layout: str
    ignore_index: int
    eps: float
    lam: float
    softcap: float | None
    reduction: str
    chunk_size: int | None
    impl: str
    axis_name: Any
    return_lse: bool
    return_stats: bool = False
    top_k: int = 0
    filter_eps: float | str | None = None
    filter_rows: int = 0


def _axis(axis_name):
    return tuple(axis_name) if isinstance(axis_name, list) else axis_name


class _Inputs(NamedTuple):
    """Checked, flattened inputs shared by the loss and the statistics."""

    h2: jax.Array  # (n_rows, D), hidden's dtype
    linear_weight: jax.Array
    linear_bias: jax.Array | None
    y: jax.Array | None  # (n_rows,) widened labels
    keep: jax.Array | None  # valid label in [0, V)
    bad: jax.Array | None  # not ignore_index and outside [0, V)
    batch_shape: tuple[int, ...]
    v_local: int
    n_vocab: int
    compute: Any
    acc: Any


def _check_inputs(fn, hidden, linear_weight, labels, linear_bias, layout, axis_name, ignore_index):
    """Shapes, dtypes, the mesh axis and the labels of a call, checked at trace time."""
    hidden = check.float_array(hidden, "hidden")
    linear_weight = check.float_array(linear_weight, "linear_weight")
    if hidden.ndim < 1:
        raise ValueError("`hidden` must have at least one dimension (..., D), got a scalar.")
    if linear_weight.ndim != 2:
        raise ValueError(f"`linear_weight` must be 2-D, got shape {linear_weight.shape}.")
    d_model = hidden.shape[-1]
    v_local, d_weight = linear_weight.shape[::-1] if layout == "dv" else linear_weight.shape
    if d_weight != d_model:
        expected = f"({d_model}, V)" if layout == "dv" else f"(V, {d_model})"
        raise ValueError(
            f"`linear_weight` of shape {linear_weight.shape} does not match `hidden` of shape "
            f"{hidden.shape}: expected {expected} for weight_layout={layout!r}."
        )
    if v_local == 0:
        raise ValueError(f"`linear_weight` of shape {linear_weight.shape} has an empty vocabulary.")
    batch_shape = hidden.shape[:-1]
    if labels is not None:
        labels = check.integer_labels(labels, batch_shape)
    n_vocab = v_local
    if axis_name is not None:
        try:
            n_vocab = v_local * lax.axis_size(axis_name)
        except NameError as err:
            raise ValueError(
                f"`axis_name`={axis_name!r} is not a mesh axis of an enclosing "
                "`jax.shard_map` (vocab-parallel mode needs one)."
            ) from err
        axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)
        if not all(a in _vma(linear_weight) for a in axes):
            raise ValueError(
                f"`linear_weight` does not vary over `axis_name`={axis_name!r}: vocab-parallel "
                "mode needs `linear_weight` sharded over the vocabulary on that mesh axis "
                "(in_specs), inside a `jax.shard_map` with check_vma=True (the default)."
            )
    linear_bias = check.class_vector(linear_bias, v_local, "linear_bias")
    n_rows = math.prod(batch_shape)
    compute = jnp.result_type(hidden.dtype, linear_weight.dtype)
    acc = num.acc_dtype(compute)
    h2 = hidden.reshape(n_rows, d_model)
    y = keep = bad = None
    if labels is not None:
        y = check.widen_labels(labels.reshape(n_rows))
        valid = y != ignore_index
        bad = valid & ((y < 0) | (y >= n_vocab))
        keep = valid & ~bad
        # checkify cannot carry errors out of shard_map.
        if axis_name is None:
            label_check(
                bad.reshape(batch_shape), labels, loss=fn,
                expected=f"0 <= label < {n_vocab} or label == ignore_index ({ignore_index})",
            )  # fmt: skip
    return _Inputs(
        h2, linear_weight, linear_bias, y, keep, bad, batch_shape, v_local, n_vocab, compute, acc
    )


def _make_config(
    inp, layout, chunk_size, softcap, axis_name, filter_eps=None, filter_rows=0, **stats
):
    n_rows = inp.h2.shape[0]
    eps = check.filter_eps(filter_eps, inp.compute)
    chunk = chunk_size if chunk_size is not None else _default_chunk(n_rows, inp.v_local)
    return _Config(
        filter_eps=eps,
        filter_rows=max(1, min(filter_rows, n_rows) if filter_rows else n_rows),
        layout=layout,
        chunk=min(int(chunk), inp.v_local),
        softcap=softcap,
        axis_name=axis_name,
        compute_dtype=jnp.dtype(inp.compute),
        acc_dtype=jnp.dtype(inp.acc),
        **stats,
    )


@functools.partial(jax.jit, static_argnums=(0,))
def _linear_cross_entropy(
    st, hidden, linear_weight, labels, linear_bias, weight, sample_weight, normalizer,
    vocab_order=None,
):  # fmt: skip
    (weight_layout, ignore_index, eps, lam, softcap, reduction, chunk_size, impl, axis_name,
     return_lse, return_stats, top_k, filter_eps, filter_rows) = st  # fmt: skip
    order = None
    if vocab_order is not None:
        order, labels, linear_bias, weight = _reorder(
            vocab_order, labels, linear_bias, weight, linear_weight, weight_layout, axis_name,
            ignore_index,
        )  # fmt: skip
    inp = _check_inputs(
        "linear_cross_entropy", hidden, linear_weight, labels, linear_bias, weight_layout,
        axis_name, ignore_index,
    )  # fmt: skip
    h2, linear_weight, linear_bias, y, keep, bad, batch_shape, v_local, n_vocab, _, acc = inp
    if top_k > n_vocab:
        raise ValueError(f"`top_k`={top_k} is larger than the vocabulary ({n_vocab}).")
    # Under `axis_name` the class weights may be this shard's slice or the whole vector.
    weight = check.class_vector(weight, (v_local, n_vocab))
    sample_weight = check.sample_weight(sample_weight, batch_shape)
    n_rows = h2.shape[0]
    sw = None
    if sample_weight is not None:
        sw = jnp.broadcast_to(sample_weight, batch_shape).reshape(n_rows).astype(acc)

    if impl in ("pallas", "auto"):

        def pallas():
            return _pallas_route(
                h2, linear_weight, y, linear_bias, weight, sw, keep, bad, batch_shape,
                weight_layout, ignore_index, eps, lam, softcap, reduction, normalizer,
                chunk_size, acc, filter_eps,
            )  # fmt: skip

        if impl == "pallas":
            return pallas()
        args = (hidden, linear_weight, labels, linear_bias, weight, sample_weight, normalizer)
        # `args` are already in the permuted vocabulary: no second reordering.
        xla = lambda: _linear_cross_entropy(st._replace(impl="xla"), *args)
        return _impl.run_auto("linear_cross_entropy", pallas=pallas, xla=xla)

    cfg = _make_config(
        inp, weight_layout, chunk_size, softcap, axis_name, need_zw=eps > 0,
        need_entropy=return_stats, need_argmax=return_stats, top_k=top_k,
        filter_eps=filter_eps, filter_rows=filter_rows,
    )  # fmt: skip
    h2 = h2.astype(cfg.compute_dtype)

    # l_i = γ_i (lse − z_y) + δ_i (Σ_c w_c lse − Σ_c w_c z_c) + β_i lse²: the loss formula
    # written with the three per-token statistics of the chunked core.
    base = keep.astype(acc) if sw is None else jnp.where(keep, sw, 0.0)
    w_y, w_sum = None, float(n_vocab)
    if weight is not None and weight.shape[0] == n_vocab:
        # The whole vector (also under axis_name): w_y and Σ w need no collective.
        w_y = jnp.where(keep, weight[jnp.clip(y, 0, n_vocab - 1)], 0.0).astype(acc)
        w_sum = jnp.sum(weight.astype(acc))
        if n_vocab != v_local:
            offset = lax.axis_index(axis_name) * v_local
            weight = lax.dynamic_slice_in_dim(weight, offset, v_local)
    elif weight is not None:
        w_y = _label_weights(weight, y, keep, cfg)
        w_sum = lax.psum(jnp.sum(weight.astype(acc)), axis_name)
    gamma = base * (1.0 - eps) if w_y is None else base * (1.0 - eps) * w_y
    delta = base * (eps / n_vocab)

    core = _stats(cfg, h2, linear_weight, linear_bias, weight, y)
    lse_out, zy, zw = core.lse, core.zy, core.zw
    lse = _poison_cotangent(lse_out, bad)
    per_token = gamma * (lse - zy)
    if cfg.need_zw:
        per_token = per_token + delta * (w_sum * lse - zw)
    if lam > 0:
        # z-loss weighted like the label term (w_y·λ·lse²), as jsm.cross_entropy does.
        per_token = per_token + (base if w_y is None else base * w_y) * lam * lse * lse
    # Poison, not a silently plausible number, for a label outside [0, V).
    per_token = jnp.where(bad, jnp.nan, per_token)
    if reduction == "none":
        loss = per_token.reshape(batch_shape)
    else:
        loss = _reduce(jnp.sum(per_token), base, w_y, reduction, normalizer, bad)
    if return_lse:
        return loss, lse_out.reshape(batch_shape)
    if return_stats:
        return loss, _finish_stats(core, cfg, inp, order)
    return loss


_poison_cotangent = num.poison_cotangent


@jax.custom_vjp
def _poison_if_used(x, bad):
    """NaN at ``bad`` positions, with a NaN cotangent there where the incoming one is nonzero.

    A caller that uses the NaN value gets a NaN gradient (as from the loss); one that
    masks the position out of its objective (``jnp.where``) gets the gradient of what
    it kept.
    """
    return jnp.where(bad, jnp.nan, x)


def _poison_if_used_fwd(x, bad):
    return _poison_if_used(x, bad), bad


def _poison_if_used_bwd(bad, ct):
    return jnp.where(bad & (ct != 0), jnp.nan, ct), None


_poison_if_used.defvjp(_poison_if_used_fwd, _poison_if_used_bwd)


def _reduce(total, base, w_y, reduction, normalizer, bad):
    if reduction == "sum":
        return total
    den = None
    if normalizer is None:
        den = jnp.sum(base if w_y is None else base * w_y)
        # A batch of nothing but bad labels is NaN, not the empty batch's 0.
        den = jnp.where((den == 0) & jnp.any(bad), jnp.nan, den)
    return num.mean_of(total, den, normalizer)


def _pallas_route(
    h2, linear_weight, y, linear_bias, weight, sw, keep, bad, batch_shape, layout,
    ignore_index, eps, lam, softcap, reduction, normalizer, chunk_size, acc, filter_eps=None,
):  # fmt: skip
    """The loss from ``jsoftmax.kernels``; class/sample weights and the reduction here.

    The kernel's row loss is ``(1-ε)(lse − z_y) + ε/V Σ_c (lse − z_c) + λ lse²``; without
    smoothing (the only case routed here with class weights) ``cross_entropy``'s
    weighted row loss is exactly ``w_y`` times it. For ``"mean"``/``"sum"`` the kernel
    reduces with per-row weights ``w_i / den``, which lets it compute the gradient in its
    forward pass (three matmuls, no recomputation); a bad label's row weight is NaN, so
    the loss and the whole gradient are poisoned. ``chunk_size`` is the XLA path's; the
    kernels choose their own tiles.
    """
    del chunk_size
    from jsoftmax import kernels  # lazily: kernels are optional at import time

    kw = dict(
        linear_bias=linear_bias, weight_layout=layout, ignore_index=ignore_index,
        label_smoothing=eps, z_loss=lam, logit_softcap=softcap, filter_eps=filter_eps,
    )  # fmt: skip
    base = keep.astype(acc) if sw is None else jnp.where(keep, sw, 0.0)
    w_y = None
    if weight is not None:
        w_y = jnp.where(keep, weight[jnp.clip(y, 0, weight.shape[0] - 1)], 0.0)
        w_y = w_y.astype(acc)
    weight_i = base if w_y is None else base * w_y
    if reduction == "none":
        per_row = kernels.linear_cross_entropy(h2, linear_weight, y, **kw).astype(acc)
        per_row = _poison_cotangent(per_row, bad)
        per_token = jnp.where(bad, jnp.nan, jnp.where(keep, per_row * weight_i, 0.0))
        return per_token.reshape(batch_shape)
    if reduction == "mean":
        den = None if normalizer is not None else jnp.sum(weight_i)
        weight_i = num.mean_of(weight_i, den, normalizer)
    row_weight = jnp.where(bad, jnp.nan, weight_i)
    loss = kernels.linear_cross_entropy(
        h2, linear_weight, y, sample_weight=row_weight, reduction="sum", **kw
    )
    return loss.astype(acc)

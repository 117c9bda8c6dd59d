"""Fused linear + cross-entropy: ``loss_i = CE(h_i · W + b, y_i)`` without the logits.

The ``(N, V)`` logits never reach HBM: each ``(rows, vocab)`` tile of logits is made by a
matmul in the kernel, folded into an online logsumexp (plus the label logit and, with
label smoothing, the logit sum), and dropped. Only ``lse`` (one float per row) is saved
for the backward, which recomputes each logits tile and turns it into

* ``d_hidden`` -- per row block, accumulated over the vocabulary tiles;
* ``d_weight`` (and ``d_bias``) -- per vocabulary block, accumulated over the row tiles;

two kernels, each owning its output tile, so no atomics and deterministic results.

Backends:

* Mosaic TPU: grid ``(row_blocks, vocab_blocks)`` (``(vocab_blocks, row_blocks)`` for
  ``d_weight``) with the reduction axis ``"arbitrary"``; the whole hidden dimension is in
  each block (MXU matmuls of ``(rows, D) x (D, vocab)``), accumulators in VMEM scratch.
* Triton GPU: a program per row block (per vocabulary block for ``d_weight``) looping
  over vocabulary (row) tiles, and inside each over ``block_d`` chunks of the hidden
  dimension with ``tl.dot``; gradients accumulate in float32 in the output buffer owned by
  the program (read-modify-write of its own rows/columns, no atomics) and are cast once.

``logit_softcap = s`` replaces each logit ``z`` by ``s·tanh(z/s)`` (Gemma 2) before the
loss; its derivative ``1 - (z'/s)²`` is applied in the backward tiles.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.typing import ArrayLike

from jsoftmax import _validate as check
from jsoftmax._compat import plgpu

from . import _common as cm

# TPU VMEM budget for one kernel's blocks, double buffers and accumulators: below the
# 16 MiB default scoped VMEM limit of v4/v5e (v5p/v6e have more).
_TPU_VMEM_BUDGET = 12 * 2**20
_TPU_BLOCK_CANDIDATES = (
    (512, 256),
    (512, 128),
    (256, 256),
    (256, 128),
    (128, 128),
    (64, 128),
    (32, 128),
    (16, 128),
    (8, 128),
)
# Triton tiles (tl.dot needs every dimension >= 16), as (rows, vocab, hidden chunk).
# Programs over row blocks (forward, d_hidden) keep 64 rows so that a batch of 8k rows
# still fills ~128 SMs, and take 128-wide vocabulary tiles: the d_hidden kernel's
# read-modify-write traffic on its float32 rows scales as 1/block_cols. Programs over
# vocabulary blocks (d_weight) swap them: their accumulator traffic scales as 1/block_rows.
_GPU_BLOCKS_ROW_MAJOR = (64, 128, 32)
_GPU_BLOCKS_VOCAB_MAJOR = (128, 64, 32)

_NN = (((1,), (0,)), ((), ()))  # (m, k) x (k, n)
_NT = (((1,), (1,)), ((), ()))  # (m, k) x (n, k)
_TN = (((0,), (0,)), ((), ()))  # (k, m) x (k, n)


@dataclasses.dataclass(frozen=True)
class _Options:
    """Static options of one linear cross-entropy call."""

    loss: cm.LossOptions
    n_rows: int
    hidden: int
    vocab_major: bool  # weight stored (V, D) (tied embedding) instead of (D, V)
    softcap: float | None
    has_bias: bool
    compute_dtype: str  # matmul operand dtype (promotion of hidden and weight)


# ---------------------------------------------------------------- per-tile math


def _cap(z: jax.Array, st: _Options) -> jax.Array:
    return z if st.softcap is None else st.softcap * jnp.tanh(z / st.softcap)


def _tile_grad(z, lse, labels, scale, cols, valid, st: _Options) -> jax.Array:
    """Loss gradient w.r.t. the *uncapped* logits tile, 0 at padding columns."""
    dz = cm.ce_grad(z, lse, labels, scale, cols, valid, st.loss)
    if st.softcap is not None:
        # d(s·tanh(u/s))/du = 1 - tanh² = 1 - (z/s)² with z the capped logit.
        dz = dz * (1.0 - jnp.square(z / st.softcap))
    # Padding columns may hold garbage (NaN) logits; 0·NaN must not leak.
    return jnp.where(valid, dz, 0.0)


# ---------------------------------------------------------- Mosaic (TPU) kernels


def _tpu_logits(h_ref, w_ref, b_ref, st: _Options) -> jax.Array:
    cdt = jnp.dtype(st.compute_dtype)
    h = h_ref[...].astype(cdt)
    w = w_ref[...].astype(cdt)
    z = jax.lax.dot_general(
        h, w, _NT if st.vocab_major else _NN, preferred_element_type=jnp.float32
    )
    if b_ref is not None:
        z = z + b_ref[...].astype(jnp.float32)
    return _cap(z, st)


def _split_refs(refs, st: _Options, n_row_inputs: int):
    """``(h, w, b or None, row inputs..., rest...)`` from the flat kernel refs."""
    h_ref, w_ref, *refs = refs
    b_ref = refs.pop(0) if st.has_bias else None
    return h_ref, w_ref, b_ref, refs[:n_row_inputs], refs[n_row_inputs:]


def _fwd_kernel_tpu(*refs, st: _Options, block_cols: int):
    h_ref, w_ref, b_ref, (lab_ref,), (loss_ref, lse_ref, *stat_refs) = _split_refs(refs, st, 1)
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        init = cm.ce_init(jnp.float32, stat_refs[0].shape[0])
        for ref, value in zip(stat_refs, init, strict=True):
            ref[...] = value

    z = _tpu_logits(h_ref, w_ref, b_ref, st)
    labels = lab_ref[...]
    cols = cm.col_ids(z.shape, j * block_cols)
    stats = tuple(ref[...] for ref in stat_refs)
    stats = cm.ce_update(stats, z, labels, cols, cols < st.loss.n_classes, st.loss)
    for ref, value in zip(stat_refs, stats, strict=True):
        ref[...] = value

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        loss, lse = cm.ce_finish(tuple(ref[...] for ref in stat_refs), labels, st.loss)
        loss_ref[...] = loss
        lse_ref[...] = lse


def _tpu_masked_weight(w_ref, j, block_cols: int, st: _Options) -> jax.Array:
    """The weight tile, with padding vocabulary entries zeroed (0·NaN would poison)."""
    w = w_ref[...].astype(jnp.dtype(st.compute_dtype))
    if st.loss.n_classes % block_cols:
        axis = 0 if st.vocab_major else 1
        vocab = j * block_cols + jax.lax.broadcasted_iota(jnp.int32, w.shape, axis)
        w = jnp.where(vocab < st.loss.n_classes, w, 0)
    return w


def _dh_kernel_tpu(*refs, st: _Options, block_cols: int):
    h_ref, w_ref, b_ref, (lab_ref, lse_ref, g_ref), (dh_ref, acc_ref) = _split_refs(refs, st, 3)
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

    z = _tpu_logits(h_ref, w_ref, b_ref, st)
    labels = lab_ref[...]
    cols = cm.col_ids(z.shape, j * block_cols)
    scale = cm.ce_row_scale(g_ref[...], labels, st.loss)
    dz = _tile_grad(z, lse_ref[...], labels, scale, cols, cols < st.loss.n_classes, st)
    w = _tpu_masked_weight(w_ref, j, block_cols, st)
    acc_ref[...] += jax.lax.dot_general(
        dz.astype(w.dtype), w, _NN if st.vocab_major else _NT, preferred_element_type=jnp.float32
    )

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        dh_ref[...] = acc_ref[...].astype(dh_ref.dtype)


def _dw_kernel_tpu(*refs, st: _Options, block_rows: int, block_cols: int):
    h_ref, w_ref, b_ref, (lab_ref, lse_ref, g_ref), rest = _split_refs(refs, st, 3)
    if st.has_bias:
        dw_ref, db_ref, acc_ref, bacc_ref = rest
    else:
        (dw_ref, acc_ref), db_ref, bacc_ref = rest, None, None
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)
        if bacc_ref is not None:
            bacc_ref[...] = jnp.zeros(bacc_ref.shape, bacc_ref.dtype)

    z = _tpu_logits(h_ref, w_ref, b_ref, st)
    labels = lab_ref[...]
    cols = cm.col_ids(z.shape, j * block_cols)
    valid = cols < st.loss.n_classes
    h = h_ref[...].astype(jnp.dtype(st.compute_dtype))
    if st.n_rows % block_rows:
        # Padding rows hold garbage: drop them from the sums over rows.
        rows_ok = cm.row_ids((z.shape[0], 1), i * block_rows) < st.n_rows
        valid = valid & rows_ok
        h = jnp.where(rows_ok, h, 0)
    scale = cm.ce_row_scale(g_ref[...], labels, st.loss)
    dz = _tile_grad(z, lse_ref[...], labels, scale, cols, valid, st)
    # Contract over the rows (dimension 0 of both): a transposed-LHS matmul, which
    # Mosaic's matmul canonicalisation handles; the accumulator already has the weight's
    # layout, so nothing is transposed at the end.
    dz_c = dz.astype(h.dtype)
    a, b = (dz_c, h) if st.vocab_major else (h, dz_c)
    acc_ref[...] += jax.lax.dot_general(a, b, _TN, preferred_element_type=jnp.float32)
    if bacc_ref is not None:
        bacc_ref[...] += jnp.sum(dz, axis=0, keepdims=True)

    @pl.when(i == pl.num_programs(1) - 1)
    def _finish():
        dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)
        if db_ref is not None:
            db_ref[...] = bacc_ref[...].astype(db_ref.dtype)


# ---------------------------------------------------------- Triton (GPU) kernels


def _gpu_logits(h_ref, w_ref, b_ref, r0, v0, rows_ok, st: _Options, br, bv, bd):
    """One ``(br, bv)`` float32 logits tile, contracting the hidden dim in ``bd`` chunks."""
    cdt = jnp.dtype(st.compute_dtype)
    vocab_ok_r = cm.row_ids((bv, 1), v0) < st.loss.n_classes
    vocab_ok_c = cm.col_ids((1, bv), v0) < st.loss.n_classes

    def body(k, z):
        d0 = k * bd
        d_ok_c = cm.col_ids((1, bd), d0) < st.hidden
        h = plgpu.load(
            h_ref.at[pl.ds(r0, br), pl.ds(d0, bd)], mask=rows_ok & d_ok_c, other=0.0
        ).astype(cdt)
        if st.vocab_major:
            w = plgpu.load(
                w_ref.at[pl.ds(v0, bv), pl.ds(d0, bd)], mask=vocab_ok_r & d_ok_c, other=0.0
            )
            dims = _NT
        else:
            d_ok_r = cm.row_ids((bd, 1), d0) < st.hidden
            w = plgpu.load(
                w_ref.at[pl.ds(d0, bd), pl.ds(v0, bv)], mask=d_ok_r & vocab_ok_c, other=0.0
            )
            dims = _NN
        return z + jax.lax.dot_general(h, w.astype(cdt), dims, preferred_element_type=jnp.float32)

    z = jax.lax.fori_loop(0, cm.cdiv(st.hidden, bd), body, jnp.zeros((br, bv), jnp.float32))
    if b_ref is not None:
        b = plgpu.load(b_ref.at[pl.ds(0, 1), pl.ds(v0, bv)], mask=vocab_ok_c, other=0.0)
        z = z + b.astype(jnp.float32)
    return _cap(z, st)


def _gpu_rows(lab_ref, r0, br, st: _Options, *more_refs):
    """Row mask and the per-row inputs (labels, then e.g. lse and g) of a row tile."""
    rows_ok = cm.row_ids((br, 1), r0) < st.n_rows
    idx = (pl.ds(r0, br), pl.ds(0, 1))
    labels = plgpu.load(lab_ref.at[idx], mask=rows_ok, other=st.loss.ignore_index)
    more = [plgpu.load(ref.at[idx], mask=rows_ok, other=0.0) for ref in more_refs]
    return rows_ok, labels, more


def _gpu_accumulate(ref, idx, mask, value, sync: bool):
    """``ref[idx] += value`` on a window this program owns (no other program writes it)."""
    plgpu.store(ref.at[idx], plgpu.load(ref.at[idx], mask=mask, other=0.0) + value, mask=mask)
    if sync:
        # Make the stores visible to every thread of the program before the next read
        # (the interpreter runs a program as one sequential computation: no barrier).
        plgpu.debug_barrier()


def _gpu_zero(ref, rows, cols, n_rows, n_cols, br, bc, sync: bool):
    """Zero a ``rows x cols`` window of a float32 output, in ``(br, bc)`` tiles."""
    r0, c0, nr, nc = rows[0], cols[0], rows[1], cols[1]

    def row_body(a, carry):
        rr = r0 + a * br
        rows_ok = cm.row_ids((br, 1), rr) < n_rows

        def col_body(b, carry):
            cc = c0 + b * bc
            mask = rows_ok & (cm.col_ids((1, bc), cc) < n_cols)
            zeros = jnp.zeros((br, bc), ref.dtype)
            plgpu.store(ref.at[pl.ds(rr, br), pl.ds(cc, bc)], zeros, mask=mask)
            return carry

        return jax.lax.fori_loop(0, cm.cdiv(nc, bc), col_body, carry)

    jax.lax.fori_loop(0, cm.cdiv(nr, br), row_body, 0)
    if sync:
        plgpu.debug_barrier()


def _fwd_kernel_gpu(*refs, st: _Options, br: int, bv: int, bd: int):
    h_ref, w_ref, b_ref, (lab_ref,), (loss_ref, lse_ref) = _split_refs(refs, st, 1)
    r0 = pl.program_id(0) * br
    rows_ok, labels, _ = _gpu_rows(lab_ref, r0, br, st)

    def body(jv, stats):
        v0 = jv * bv
        z = _gpu_logits(h_ref, w_ref, b_ref, r0, v0, rows_ok, st, br, bv, bd)
        cols = cm.col_ids((1, bv), v0)
        return cm.ce_update(stats, z, labels, cols, cols < st.loss.n_classes, st.loss)

    n_v = cm.cdiv(st.loss.n_classes, bv)
    stats = jax.lax.fori_loop(0, n_v, body, cm.ce_init(jnp.float32, br))
    loss, lse = cm.ce_finish(stats, labels, st.loss)
    idx = (pl.ds(r0, br), pl.ds(0, 1))
    plgpu.store(loss_ref.at[idx], loss, mask=rows_ok)
    plgpu.store(lse_ref.at[idx], lse, mask=rows_ok)


def _dh_kernel_gpu(*refs, st: _Options, br: int, bv: int, bd: int, sync: bool):
    h_ref, w_ref, b_ref, (lab_ref, lse_ref, g_ref), (dh_ref,) = _split_refs(refs, st, 3)
    cdt = jnp.dtype(st.compute_dtype)
    r0 = pl.program_id(0) * br
    rows_ok, labels, (lse, g) = _gpu_rows(lab_ref, r0, br, st, lse_ref, g_ref)
    scale = cm.ce_row_scale(g, labels, st.loss)
    _gpu_zero(dh_ref, (r0, br), (0, st.hidden), st.n_rows, st.hidden, br, bd, sync)

    def v_body(jv, carry):
        v0 = jv * bv
        z = _gpu_logits(h_ref, w_ref, b_ref, r0, v0, rows_ok, st, br, bv, bd)
        cols = cm.col_ids((1, bv), v0)
        valid = cols < st.loss.n_classes
        dz = _tile_grad(z, lse, labels, scale, cols, valid, st).astype(cdt)

        def d_body(k, carry):
            d0 = k * bd
            d_ok_c = cm.col_ids((1, bd), d0) < st.hidden
            if st.vocab_major:
                mask = (cm.row_ids((bv, 1), v0) < st.loss.n_classes) & d_ok_c
                w = plgpu.load(w_ref.at[pl.ds(v0, bv), pl.ds(d0, bd)], mask=mask, other=0.0)
                dims = _NN
            else:
                mask = (cm.row_ids((bd, 1), d0) < st.hidden) & valid
                w = plgpu.load(w_ref.at[pl.ds(d0, bd), pl.ds(v0, bv)], mask=mask, other=0.0)
                dims = _NT
            contrib = jax.lax.dot_general(
                dz, w.astype(cdt), dims, preferred_element_type=jnp.float32
            )
            idx = (pl.ds(r0, br), pl.ds(d0, bd))
            _gpu_accumulate(dh_ref, idx, rows_ok & d_ok_c, contrib, sync)
            return carry

        return jax.lax.fori_loop(0, cm.cdiv(st.hidden, bd), d_body, carry)

    jax.lax.fori_loop(0, cm.cdiv(st.loss.n_classes, bv), v_body, 0)


def _dw_kernel_gpu(*refs, st: _Options, br: int, bv: int, bd: int, sync: bool):
    h_ref, w_ref, b_ref, (lab_ref, lse_ref, g_ref), rest = _split_refs(refs, st, 3)
    dw_ref, db_ref = (rest[0], rest[1]) if st.has_bias else (rest[0], None)
    cdt = jnp.dtype(st.compute_dtype)
    v0 = pl.program_id(0) * bv
    cols = cm.col_ids((1, bv), v0)
    valid = cols < st.loss.n_classes
    if st.vocab_major:
        _gpu_zero(dw_ref, (v0, bv), (0, st.hidden), st.loss.n_classes, st.hidden, bv, bd, sync)
    else:
        _gpu_zero(dw_ref, (0, st.hidden), (v0, bv), st.hidden, st.loss.n_classes, bd, bv, sync)

    def r_body(ir, db):
        r0 = ir * br
        rows_ok, labels, (lse, g) = _gpu_rows(lab_ref, r0, br, st, lse_ref, g_ref)
        z = _gpu_logits(h_ref, w_ref, b_ref, r0, v0, rows_ok, st, br, bv, bd)
        scale = cm.ce_row_scale(g, labels, st.loss)
        dz = _tile_grad(z, lse, labels, scale, cols, valid & rows_ok, st)
        dz_c = dz.astype(cdt)

        def d_body(k, carry):
            d0 = k * bd
            d_ok_c = cm.col_ids((1, bd), d0) < st.hidden
            h = plgpu.load(
                h_ref.at[pl.ds(r0, br), pl.ds(d0, bd)], mask=rows_ok & d_ok_c, other=0.0
            ).astype(cdt)
            if st.vocab_major:
                contrib = jax.lax.dot_general(dz_c, h, _TN, preferred_element_type=jnp.float32)
                idx = (pl.ds(v0, bv), pl.ds(d0, bd))
                mask = (cm.row_ids((bv, 1), v0) < st.loss.n_classes) & d_ok_c
            else:
                contrib = jax.lax.dot_general(h, dz_c, _TN, preferred_element_type=jnp.float32)
                idx = (pl.ds(d0, bd), pl.ds(v0, bv))
                mask = (cm.row_ids((bd, 1), d0) < st.hidden) & valid
            _gpu_accumulate(dw_ref, idx, mask, contrib, sync)
            return carry

        jax.lax.fori_loop(0, cm.cdiv(st.hidden, bd), d_body, 0)
        return db + jnp.sum(dz, axis=0, keepdims=True)

    db = jax.lax.fori_loop(0, cm.cdiv(st.n_rows, br), r_body, jnp.zeros((1, bv), jnp.float32))
    if db_ref is not None:
        plgpu.store(db_ref.at[pl.ds(0, 1), pl.ds(v0, bv)], db, mask=valid)


# ------------------------------------------------------------- pallas_call wrappers


def _tpu_blocks(st: _Options, itemsize: int, cfg: cm.Config) -> tuple[int, int]:
    """Row and vocabulary blocks whose buffers fit :data:`_TPU_VMEM_BUDGET`.

    Larger row blocks come first: every row block streams the whole weight once, so the
    row block sets the matmul's arithmetic intensity.
    """
    d = cm.round_up(st.hidden, 128)
    sub = max(8, 32 // itemsize)

    def vmem(br, bv):
        blocks = 2 * (br * d + d * bv + max(br, bv) * d) * itemsize  # double-buffered
        return blocks + max(br, bv) * d * 4 + 4 * br * bv * 4  # accumulator, z temporaries

    br, bv = next(
        ((r, v) for r, v in _TPU_BLOCK_CANDIDATES if vmem(r, v) <= _TPU_VMEM_BUDGET), (8, 128)
    )
    br = cm.tpu_block(st.n_rows, cfg.block_rows, br, sub)
    bv = cm.tpu_block(st.loss.n_classes, cfg.block_cols, bv, 128)
    return br, bv


def _gpu_blocks(st: _Options, cfg: cm.Config, defaults) -> tuple[int, int, int]:
    br = cm.gpu_block(st.n_rows, cfg.block_rows, defaults[0], minimum=16)
    bv = cm.gpu_block(st.loss.n_classes, cfg.block_cols, defaults[1], minimum=16)
    bd = cm.gpu_block(st.hidden, cfg.block_d, defaults[2], minimum=16)
    return br, bv, bd


def _operands(hidden, weight, bias, st: _Options):
    return [hidden, weight] + ([bias.reshape(1, -1)] if st.has_bias else [])


def _tpu_specs(st: _Options, br: int, bv: int, vocab_first: bool):
    """BlockSpecs of (h, w, [b], row inputs) for a grid ordered (rows, vocab) or reverse."""

    def order(f):
        return (lambda j, i: f(i, j)) if vocab_first else f

    specs = [pl.BlockSpec((br, st.hidden), order(lambda i, j: (i, 0)))]
    if st.vocab_major:
        specs.append(pl.BlockSpec((bv, st.hidden), order(lambda i, j: (j, 0))))
    else:
        specs.append(pl.BlockSpec((st.hidden, bv), order(lambda i, j: (0, j))))
    if st.has_bias:
        specs.append(pl.BlockSpec((1, bv), order(lambda i, j: (0, j))))
    row_spec = pl.BlockSpec((br, 1), order(lambda i, j: (i, 0)))
    return specs, row_spec


def _fwd_tpu(hidden, weight, bias, labels, *, st, cfg, interpret):
    br, bv = _tpu_blocks(st, max(hidden.dtype.itemsize, weight.dtype.itemsize), cfg)
    specs, row_spec = _tpu_specs(st, br, bv, vocab_first=False)
    return pl.pallas_call(
        functools.partial(_fwd_kernel_tpu, st=st, block_cols=bv),
        grid=(cm.cdiv(st.n_rows, br), cm.cdiv(st.loss.n_classes, bv)),
        in_specs=specs + [row_spec],
        out_specs=[row_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct((st.n_rows, 1), jnp.float32)] * 2,
        scratch_shapes=[pltpu.VMEM((br, 1), jnp.float32)] * 4,
        compiler_params=cm.tpu_params("parallel", "arbitrary"),
        interpret=interpret,
        name="jsoftmax_linear_cross_entropy_fwd",
    )(*_operands(hidden, weight, bias, st), labels)


def _dh_tpu(hidden, weight, bias, labels, lse, g, *, st, cfg, interpret):
    br, bv = _tpu_blocks(st, max(hidden.dtype.itemsize, weight.dtype.itemsize), cfg)
    specs, row_spec = _tpu_specs(st, br, bv, vocab_first=False)
    return pl.pallas_call(
        functools.partial(_dh_kernel_tpu, st=st, block_cols=bv),
        grid=(cm.cdiv(st.n_rows, br), cm.cdiv(st.loss.n_classes, bv)),
        in_specs=specs + [row_spec] * 3,
        out_specs=pl.BlockSpec((br, st.hidden), lambda i, j: (i, 0)),
        out_shape=jax.ShapeDtypeStruct(hidden.shape, hidden.dtype),
        scratch_shapes=[pltpu.VMEM((br, st.hidden), jnp.float32)],
        compiler_params=cm.tpu_params("parallel", "arbitrary"),
        interpret=interpret,
        name="jsoftmax_linear_cross_entropy_dh",
    )(*_operands(hidden, weight, bias, st), labels, lse, g)


def _dw_tpu(hidden, weight, bias, labels, lse, g, *, st, cfg, interpret):
    br, bv = _tpu_blocks(st, max(hidden.dtype.itemsize, weight.dtype.itemsize), cfg)
    specs, row_spec = _tpu_specs(st, br, bv, vocab_first=True)
    if st.vocab_major:
        dw_spec = pl.BlockSpec((bv, st.hidden), lambda j, i: (j, 0))
    else:
        dw_spec = pl.BlockSpec((st.hidden, bv), lambda j, i: (0, j))
    out_specs = [dw_spec]
    out_shape = [jax.ShapeDtypeStruct(weight.shape, weight.dtype)]
    scratch = [pltpu.VMEM((bv, st.hidden) if st.vocab_major else (st.hidden, bv), jnp.float32)]
    if st.has_bias:
        out_specs.append(pl.BlockSpec((1, bv), lambda j, i: (0, j)))
        out_shape.append(jax.ShapeDtypeStruct((1, st.loss.n_classes), bias.dtype))
        scratch.append(pltpu.VMEM((1, bv), jnp.float32))
    out = pl.pallas_call(
        functools.partial(_dw_kernel_tpu, st=st, block_rows=br, block_cols=bv),
        grid=(cm.cdiv(st.loss.n_classes, bv), cm.cdiv(st.n_rows, br)),
        in_specs=specs + [row_spec] * 3,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=cm.tpu_params("parallel", "arbitrary"),
        interpret=interpret,
        name="jsoftmax_linear_cross_entropy_dw",
    )(*_operands(hidden, weight, bias, st), labels, lse, g)
    return (out[0], out[1].reshape(-1)) if st.has_bias else (out[0], None)


def _gpu_call(kernel, st, cfg, grid, out_shape, interpret, name, *args, accumulates=True):
    defaults = _GPU_BLOCKS_VOCAB_MAJOR if kernel is _dw_kernel_gpu else _GPU_BLOCKS_ROW_MAJOR
    br, bv, bd = _gpu_blocks(st, cfg, defaults)
    extra = dict(sync=not interpret) if accumulates else {}
    return pl.pallas_call(
        functools.partial(kernel, st=st, br=br, bv=bv, bd=bd, **extra),
        grid=grid(br, bv),
        out_shape=out_shape,
        # Matmul tiles: 8 warps for a 64x128 tile (about 32 accumulator registers each).
        compiler_params=cm.gpu_params(br * bv // 2, num_stages=2),
        interpret=interpret,
        name=name,
    )(*args)


def _fwd_gpu(hidden, weight, bias, labels, *, st, cfg, interpret):
    return _gpu_call(
        _fwd_kernel_gpu,
        st,
        cfg,
        lambda br, bv: (cm.cdiv(st.n_rows, br),),
        [jax.ShapeDtypeStruct((st.n_rows, 1), jnp.float32)] * 2,
        interpret,
        "jsoftmax_linear_cross_entropy_fwd",
        *_operands(hidden, weight, bias, st),
        labels,
        accumulates=False,
    )


def _dh_gpu(hidden, weight, bias, labels, lse, g, *, st, cfg, interpret):
    dh = _gpu_call(
        _dh_kernel_gpu,
        st,
        cfg,
        lambda br, bv: (cm.cdiv(st.n_rows, br),),
        jax.ShapeDtypeStruct(hidden.shape, jnp.float32),
        interpret,
        "jsoftmax_linear_cross_entropy_dh",
        *_operands(hidden, weight, bias, st),
        labels,
        lse,
        g,
    )
    return dh.astype(hidden.dtype)


def _dw_gpu(hidden, weight, bias, labels, lse, g, *, st, cfg, interpret):
    out_shape = [jax.ShapeDtypeStruct(weight.shape, jnp.float32)]
    if st.has_bias:
        out_shape.append(jax.ShapeDtypeStruct((1, st.loss.n_classes), jnp.float32))
    out = _gpu_call(
        _dw_kernel_gpu,
        st,
        cfg,
        lambda br, bv: (cm.cdiv(st.loss.n_classes, bv),),
        out_shape,
        interpret,
        "jsoftmax_linear_cross_entropy_dw",
        *_operands(hidden, weight, bias, st),
        labels,
        lse,
        g,
    )
    dw = out[0].astype(weight.dtype)
    return (dw, out[1].reshape(-1).astype(bias.dtype)) if st.has_bias else (dw, None)


def _run(cfg, tpu, gpu, st, *args):
    return cm.dispatch(
        cfg, functools.partial(tpu, st=st, cfg=cfg), functools.partial(gpu, st=st, cfg=cfg), *args
    )


# --------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _linear_ce_vjp(hidden, weight, bias, labels, st, cfg):
    return _run(cfg, _fwd_tpu, _fwd_gpu, st, hidden, weight, bias, labels)[0]


def _linear_ce_vjp_fwd(hidden, weight, bias, labels, st, cfg):
    loss, lse = _run(cfg, _fwd_tpu, _fwd_gpu, st, hidden, weight, bias, labels)
    # One float per row besides the inputs: the logits are recomputed tile by tile.
    return loss, (hidden, weight, bias, labels, lse)


def _linear_ce_vjp_bwd(st, cfg, res, g):
    hidden, weight, bias, labels, lse = res
    g = g.astype(jnp.float32)
    dh = _run(cfg, _dh_tpu, _dh_gpu, st, hidden, weight, bias, labels, lse, g)
    dw, db = _run(cfg, _dw_tpu, _dw_gpu, st, hidden, weight, bias, labels, lse, g)
    return dh, dw, db, None


_linear_ce_vjp.defvjp(_linear_ce_vjp_fwd, _linear_ce_vjp_bwd)


def _check_inputs(hidden, linear_weight, linear_bias, labels, weight_layout):
    check.choice(weight_layout, "weight_layout", ("dv", "vd"))
    hidden = check.matrix(hidden, "hidden")
    linear_weight = check.matrix(linear_weight, "linear_weight")
    n, d = hidden.shape
    wd, v = linear_weight.shape if weight_layout == "dv" else linear_weight.shape[::-1]
    if wd != d:
        want = "(D, V)" if weight_layout == "dv" else "(V, D)"
        raise ValueError(
            f"`linear_weight` of shape {linear_weight.shape} does not match `hidden` of shape "
            f"{hidden.shape}: with weight_layout={weight_layout!r} it must be {want} with D = {d}."
        )
    linear_bias = check.class_vector(linear_bias, v, "linear_bias")
    return hidden, linear_weight, linear_bias, cm.check_labels(labels, n), v


def linear_cross_entropy(
    hidden: ArrayLike,
    linear_weight: ArrayLike,
    labels: ArrayLike,
    *,
    linear_bias: ArrayLike | None = None,
    weight_layout: str = "dv",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    block_rows: int | None = None,
    block_cols: int | None = None,
    block_d: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Per-row cross-entropy of ``hidden @ linear_weight + linear_bias``, logits never stored.

    ``z = h W + b`` (``z ← s·tanh(z/s)`` with ``logit_softcap = s``), then per row
    ``l_i = (1-ε)(lse_i - z_{i,y_i}) + ε(lse_i - mean_c z_{i,c}) + λ lse_i²``. The matmul
    is fused with an online logsumexp over vocabulary tiles; the backward recomputes the
    logits tile by tile for ``d_hidden``, ``d_weight`` and ``d_bias``. No ``(N, V)``
    array is ever written to memory.

    Args:
      hidden: ``(N, D)`` floating array.
      linear_weight: ``(D, V)`` (a Flax ``Dense`` kernel), or ``(V, D)`` with
        ``weight_layout="vd"`` (a tied embedding table, used without a transposed copy).
      labels: ``(N,)`` integer labels in ``[0, V)``.
      linear_bias: optional ``(V,)`` bias.
      weight_layout: ``"dv"`` or ``"vd"``.
      ignore_index: label value whose rows get loss 0 and zero gradient.
      label_smoothing: ``ε`` in ``[0, 1]`` (static Python float).
      z_loss: ``λ >= 0`` (static Python float).
      logit_softcap: ``None`` or ``s > 0`` (static Python float).
      block_rows: rows per tile (``None``: chosen per backend to fit VMEM / registers).
      block_cols: vocabulary entries per tile.
      block_d: hidden-dimension chunk of the GPU kernels' matmuls (the TPU kernels keep
        the whole hidden dimension in VMEM and ignore it).
      interpret: see :func:`jsoftmax.kernels.softmax`.

    Returns:
      ``(N,)`` float32 per-row loss: 0 at ``ignore_index`` rows, NaN at labels outside
      ``[0, V)``. Gradients come back in the dtypes of ``hidden``, ``linear_weight`` and
      ``linear_bias``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jsoftmax import kernels
      >>> h = jnp.array([[1.0, 0.0]]); w = jnp.array([[0.0, jnp.log(3.0)], [0.0, 0.0]])
      >>> kernels.linear_cross_entropy(h, w, jnp.array([1])).round(4)  # -log(3/4)
      Array([0.2877], dtype=float32)

    References:
      Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models",
      https://arxiv.org/abs/2411.09009; Gemma Team 2024, "Gemma 2" (logit soft-capping),
      https://arxiv.org/abs/2408.00118.
    """
    hidden, weight, bias, labels, v = _check_inputs(
        hidden, linear_weight, linear_bias, labels, weight_layout
    )
    ignore_index, eps, lam = cm.check_loss_options(ignore_index, label_smoothing, z_loss)
    logit_softcap = check.static_number(
        logit_softcap, "logit_softcap", lo=0.0, lo_open=True, optional=True
    )
    st = _Options(
        loss=cm.LossOptions(v, ignore_index, eps, lam),
        n_rows=hidden.shape[0],
        hidden=hidden.shape[1],
        vocab_major=weight_layout == "vd",
        softcap=logit_softcap,
        has_bias=bias is not None,
        compute_dtype=jnp.promote_types(hidden.dtype, weight.dtype).name,
    )
    cfg = cm.make_config(block_rows, block_cols, block_d, interpret=interpret)
    return _linear_ce_vjp(hidden, weight, bias, labels, st, cfg).reshape(-1)

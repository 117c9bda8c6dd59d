"""Per-row softmax cross-entropy with integer labels, forward and backward kernels.

Forward: one pass over each row's column tiles accumulates the running max and
sum-exp, the label's logit (picked by a compare-and-sum, no gather) and, with label
smoothing, the sum of the logits; the last tile turns them into the loss and the row's
logsumexp. Only ``lse`` (one float per row) is saved for the backward.

Backward: one fully parallel pass, ``dz = g · (p (1 + 2λ lse) - (1-ε)[c = y] - ε/C)``
with ``p = exp(z - lse)`` recomputed per tile: the logits are read once and their
gradient written once (the floor for a fused cross-entropy: 2 reads + 1 write in all).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.typing import ArrayLike

from jsoftmax import _numerics as num
from jsoftmax import _validate as check
from jsoftmax._compat import plgpu

from . import _common as cm

# ---------------------------------------------------------- Mosaic (TPU) kernels


def _fwd_kernel_tpu(
    x_ref, lab_ref, loss_ref, lse_ref, m_ref, s_ref, zy_ref, zs_ref, *, opts, block_cols
):
    j = pl.program_id(1)
    stat_refs = (m_ref, s_ref, zy_ref, zs_ref)

    @pl.when(j == 0)
    def _init():
        for ref, value in zip(stat_refs, cm.ce_init(m_ref.dtype, m_ref.shape[0]), strict=True):
            ref[...] = value

    z = x_ref[...].astype(m_ref.dtype)
    labels = lab_ref[...]
    cols = cm.col_ids(z.shape, j * block_cols)
    stats = tuple(ref[...] for ref in stat_refs)
    stats = cm.ce_update(stats, z, labels, cols, cols < opts.n_classes, opts)
    for ref, value in zip(stat_refs, stats, strict=True):
        ref[...] = value

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        loss, lse = cm.ce_finish(tuple(ref[...] for ref in stat_refs), labels, opts)
        loss_ref[...] = loss.astype(loss_ref.dtype)
        lse_ref[...] = lse.astype(lse_ref.dtype)


def _bwd_kernel_tpu(x_ref, lab_ref, lse_ref, g_ref, dx_ref, *, opts, block_cols):
    j = pl.program_id(1)
    lse = lse_ref[...]
    z = x_ref[...].astype(lse.dtype)
    labels = lab_ref[...]
    cols = cm.col_ids(z.shape, j * block_cols)
    scale = cm.ce_row_scale(g_ref[...], labels, opts)
    dz = cm.ce_grad(z, lse, labels, scale, cols, cols < opts.n_classes, opts)
    dx_ref[...] = dz.astype(dx_ref.dtype)


# ---------------------------------------------------------- Triton (GPU) kernels


def _row_window(n_rows: int, block_rows: int, r0):
    rows = (pl.ds(r0, block_rows), pl.ds(0, 1))
    return rows, cm.row_ids((block_rows, 1), r0) < n_rows


def _fwd_kernel_gpu(
    x_ref, lab_ref, loss_ref, lse_ref, *, opts, acc, n_rows, block_rows, block_cols
):
    r0 = pl.program_id(0) * block_rows
    rows, rows_ok = _row_window(n_rows, block_rows, r0)
    labels = plgpu.load(lab_ref.at[rows], mask=rows_ok, other=opts.ignore_index)

    def body(j, stats):
        c0 = j * block_cols
        cols = cm.col_ids((1, block_cols), c0)
        valid = cols < opts.n_classes
        idx = (pl.ds(r0, block_rows), pl.ds(c0, block_cols))
        z = plgpu.load(x_ref.at[idx], mask=rows_ok & valid, other=-jnp.inf).astype(acc)
        return cm.ce_update(stats, z, labels, cols, valid, opts)

    n_chunks = cm.cdiv(opts.n_classes, block_cols)
    stats = jax.lax.fori_loop(0, n_chunks, body, cm.ce_init(acc, block_rows))
    loss, lse = cm.ce_finish(stats, labels, opts)
    plgpu.store(loss_ref.at[rows], loss.astype(loss_ref.dtype), mask=rows_ok)
    plgpu.store(lse_ref.at[rows], lse.astype(lse_ref.dtype), mask=rows_ok)


def _bwd_kernel_gpu(
    x_ref, lab_ref, lse_ref, g_ref, dx_ref, *, opts, n_rows, block_rows, block_cols
):
    r0 = pl.program_id(0) * block_rows
    c0 = pl.program_id(1) * block_cols
    rows, rows_ok = _row_window(n_rows, block_rows, r0)
    labels = plgpu.load(lab_ref.at[rows], mask=rows_ok, other=opts.ignore_index)
    lse = plgpu.load(lse_ref.at[rows], mask=rows_ok, other=0.0)
    scale = cm.ce_row_scale(plgpu.load(g_ref.at[rows], mask=rows_ok, other=0.0), labels, opts)
    cols = cm.col_ids((1, block_cols), c0)
    valid = cols < opts.n_classes
    idx = (pl.ds(r0, block_rows), pl.ds(c0, block_cols))
    mask = rows_ok & valid
    z = plgpu.load(x_ref.at[idx], mask=mask, other=-jnp.inf).astype(lse.dtype)
    dz = cm.ce_grad(z, lse, labels, scale, cols, valid, opts)
    plgpu.store(dx_ref.at[idx], dz.astype(dx_ref.dtype), mask=mask)


# ------------------------------------------------------------- pallas_call wrappers


def _fwd_tpu(logits, labels, *, opts, block_rows, block_cols, interpret):
    n, c = logits.shape
    br, bc = cm.tpu_row_blocks(n, c, logits.dtype, block_rows, block_cols)
    acc = num.acc_dtype(logits.dtype)
    row, tile = ((br, 1), acc, (n, 1)), ((br, bc), logits.dtype, (n, c))
    cm.check_tpu_vmem(
        "cross_entropy (forward)",
        dict(block_rows=br, block_cols=bc),
        [tile, ((br, 1), jnp.int32, (n, 1)), row, row],
        [row[:2]] * 4,
        interpret,
    )
    row_spec = pl.BlockSpec((br, 1), lambda i, j: (i, 0))
    return pl.pallas_call(
        functools.partial(_fwd_kernel_tpu, opts=opts, block_cols=bc),
        grid=(cm.cdiv(n, br), cm.cdiv(c, bc)),
        in_specs=[pl.BlockSpec((br, bc), lambda i, j: (i, j)), row_spec],
        out_specs=[row_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct((n, 1), acc)] * 2,
        scratch_shapes=[pltpu.VMEM((br, 1), acc)] * 4,
        compiler_params=cm.tpu_params("parallel", "arbitrary"),
        interpret=interpret,
        name="jsoftmax_cross_entropy_fwd",
    )(logits, labels)


def _bwd_tpu(logits, labels, lse, g, *, opts, block_rows, block_cols, interpret):
    n, c = logits.shape
    br, bc = cm.tpu_row_blocks(n, c, logits.dtype, block_rows, block_cols)
    row, tile = ((br, 1), lse.dtype, (n, 1)), ((br, bc), logits.dtype, (n, c))
    cm.check_tpu_vmem(
        "cross_entropy (backward)",
        dict(block_rows=br, block_cols=bc),
        [tile, ((br, 1), jnp.int32, (n, 1)), row, row, tile],
        [],
        interpret,
    )
    row_spec = pl.BlockSpec((br, 1), lambda i, j: (i, 0))
    tile_spec = pl.BlockSpec((br, bc), lambda i, j: (i, j))
    return pl.pallas_call(
        functools.partial(_bwd_kernel_tpu, opts=opts, block_cols=bc),
        grid=(cm.cdiv(n, br), cm.cdiv(c, bc)),
        in_specs=[tile_spec, row_spec, row_spec, row_spec],
        out_specs=tile_spec,
        out_shape=jax.ShapeDtypeStruct((n, c), logits.dtype),
        compiler_params=cm.tpu_params("parallel", "parallel"),
        interpret=interpret,
        name="jsoftmax_cross_entropy_bwd",
    )(logits, labels, lse, g)


def _fwd_gpu(logits, labels, *, opts, block_rows, block_cols, interpret):
    n, c = logits.shape
    br, bc = cm.gpu_row_blocks(n, c, block_rows, block_cols)
    cm.check_triton("cross_entropy", dict(block_rows=br, block_cols=bc), [(br, bc)], interpret)
    acc = num.acc_dtype(logits.dtype)
    return pl.pallas_call(
        functools.partial(
            _fwd_kernel_gpu, opts=opts, acc=acc, n_rows=n, block_rows=br, block_cols=bc
        ),
        grid=(cm.cdiv(n, br),),
        out_shape=[jax.ShapeDtypeStruct((n, 1), acc)] * 2,
        compiler_params=cm.gpu_params(br * bc),
        interpret=interpret,
        name="jsoftmax_cross_entropy_fwd",
    )(logits, labels)


def _bwd_gpu(logits, labels, lse, g, *, opts, block_rows, block_cols, interpret):
    n, c = logits.shape
    br, bc = cm.gpu_row_blocks(n, c, block_rows, block_cols)
    cm.check_triton("cross_entropy", dict(block_rows=br, block_cols=bc), [(br, bc)], interpret)
    return pl.pallas_call(
        functools.partial(_bwd_kernel_gpu, opts=opts, n_rows=n, block_rows=br, block_cols=bc),
        grid=(cm.cdiv(n, br), cm.cdiv(c, bc)),
        out_shape=jax.ShapeDtypeStruct((n, c), logits.dtype),
        compiler_params=cm.gpu_params(br * bc),
        interpret=interpret,
        name="jsoftmax_cross_entropy_bwd",
    )(logits, labels, lse, g)


def _forward(logits, labels, opts, cfg):
    kw = dict(opts=opts, block_rows=cfg.block_rows, block_cols=cfg.block_cols)
    return cm.dispatch(
        cfg,
        functools.partial(_fwd_tpu, **kw),
        functools.partial(_fwd_gpu, **kw),
        logits,
        labels,
    )


def _backward(logits, labels, lse, g, opts, cfg):
    kw = dict(opts=opts, block_rows=cfg.block_rows, block_cols=cfg.block_cols)
    return cm.dispatch(
        cfg,
        functools.partial(_bwd_tpu, **kw),
        functools.partial(_bwd_gpu, **kw),
        logits,
        labels,
        lse,
        g,
    )


# --------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _cross_entropy_vjp(logits, labels, opts, cfg):
    return _forward(logits, labels, opts, cfg)[0]


def _cross_entropy_vjp_fwd(logits, labels, opts, cfg):
    loss, lse = _forward(logits, labels, opts, cfg)
    # Residuals: the inputs and one logsumexp per row -- never the (N, C) probabilities.
    return loss, (logits, labels, lse)


def _cross_entropy_vjp_bwd(opts, cfg, res, g):
    logits, labels, lse = res
    return _backward(logits, labels, lse, g.astype(lse.dtype), opts, cfg), None


_cross_entropy_vjp.defvjp(_cross_entropy_vjp_fwd, _cross_entropy_vjp_bwd)


def cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    block_rows: int | None = None,
    block_cols: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Per-row softmax cross-entropy with integer labels, as a fused Pallas kernel.

    ``l_i = (1-ε)(lse_i - z_{i,y_i}) + ε(lse_i - mean_c z_{i,c}) + λ lse_i²`` with
    ``lse_i = logsumexp_c z_{i,c}`` -- PyTorch's unweighted label smoothing plus PaLM's
    z-loss. The forward reads each logit once (online logsumexp over column tiles); the
    backward reads it once more and writes its gradient once. Reduction and class
    weights are the caller's (``jsoftmax.cross_entropy(..., impl="pallas")``).

    Args:
      logits: ``(rows, classes)`` floating array (any float dtype; float32 accumulation).
      labels: ``(rows,)`` integer class indices.
      ignore_index: label value whose rows get loss 0 and zero gradient.
      label_smoothing: ``ε`` in ``[0, 1]`` (a static Python float).
      z_loss: ``λ >= 0`` (a static Python float).
      block_rows: rows per tile; see :func:`jsoftmax.kernels.softmax`.
      block_cols: columns per tile; see :func:`jsoftmax.kernels.softmax`.
      interpret: see :func:`jsoftmax.kernels.softmax`.

    Block overrides that a device compiler would reject raise ``ValueError`` before it
    runs; see :func:`jsoftmax.kernels.softmax` for the limits and how the target is
    chosen.

    Returns:
      ``(rows,)`` float32 per-row loss (float64 for float64 logits): 0 where
      ``labels == ignore_index``, NaN where a label is outside ``[0, classes)`` (its
      gradient row is NaN too), ``+inf`` where the label's logit is ``-inf``. The logits
      gradient has the logits' dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jsoftmax import kernels
      >>> z = jnp.log(jnp.array([[1.0, 3.0], [1.0, 1.0]]))
      >>> kernels.cross_entropy(z, jnp.array([1, -100])).round(4)  # -log(3/4), ignored row
      Array([0.2877, 0.    ], dtype=float32)

    References:
      Szegedy et al. 2016, "Rethinking the Inception Architecture" (label smoothing),
      https://arxiv.org/abs/1512.00567; Chowdhery et al. 2022, "PaLM" (z-loss),
      https://arxiv.org/abs/2204.02311.
    """
    logits = check.matrix(logits, "logits")
    n, c = logits.shape
    labels = cm.check_labels(labels, n)
    ignore_index, eps, lam = cm.check_loss_options(ignore_index, label_smoothing, z_loss)
    opts = cm.LossOptions(c, ignore_index, eps, lam)
    cfg = cm.make_config(block_rows, block_cols, interpret=interpret)
    placed = cm.row_sharding("cross_entropy", {"logits": logits}, {"labels": labels})
    if placed is None:
        return _cross_entropy_vjp(logits, labels, opts, cfg).reshape(n)
    mesh, rows = placed
    fn = functools.partial(_local_rows, opts=opts, cfg=cfg)
    specs = (cm.rows_spec(rows, 1), cm.rows_spec(rows, 1))
    return cm.per_row_shard(mesh, fn, (logits, labels), specs, cm.rows_spec(rows))


def _local_rows(logits, labels, *, opts, cfg):
    return _cross_entropy_vjp(logits, labels, opts, cfg).reshape(logits.shape[0])

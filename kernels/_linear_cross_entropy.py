"""Fused linear + cross-entropy: ``loss_i = CE(h_i · W + b, y_i)`` without the logits.

The full ``(N, V)`` logits never reach HBM. Only ``lse`` (one float per row) is saved for
the backward of a per-row loss; a scalar loss (``reduction="sum"``/``"mean"``) computes its
gradient in the forward, so its backward only scales it.

Backends:

* Mosaic TPU (this file): each ``(rows, vocab)`` tile of logits is made by an MXU matmul
  (the whole hidden dimension in each block), folded into an online logsumexp (plus the
  label logit and, with label smoothing, the logit sum) and dropped. Grid ``(row_blocks,
  vocab_blocks)`` with the reduction axis ``"arbitrary"``; the backward recomputes each
  tile for ``d_hidden`` (per row block, accumulated over vocabulary tiles) and, in a
  second kernel on grid ``(vocab_blocks, row_blocks)``, for ``d_weight``/``d_bias``; each
  kernel owns its output tile (no atomics), accumulators in VMEM scratch.
* GPU (``_linear_cross_entropy_gpu.py``): chunks of tokens whose logits are one XLA
  (cuBLAS) matmul, reduced and turned into their gradient by Triton kernels, with the
  ``d_hidden``/``d_weight`` matmuls in XLA -- or, with gradient filtering, in block-sparse
  Triton matmuls. The design and its arithmetic are in that module's docstring.

``logit_softcap = s`` replaces each logit ``z`` by ``s·tanh(z/s)`` (Gemma 2) before the
loss; its derivative ``1 - (z'/s)²`` is applied in the backward tiles. ``filter_eps``
skips the backward work of tiles whose gradient is negligible (:func:`._common.filter_keep`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jsoftmax import _compat
from jsoftmax import _validate as check

from . import _common as cm
from . import _linear_cross_entropy_gpu as gpu

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
    filter_eps: float | None = None  # gradient filtering threshold (None: exact)
    chunk_rows: int | None = None  # GPU: tokens per chunk (None: from the memory budget)


# ---------------------------------------------------------------- per-tile math


def _tile_grad(z, lse, labels, scale, cols, valid, st: _Options, col_start, block_cols):
    """``(dz, keep)``: the loss gradient w.r.t. the *uncapped* logits tile (0 at padding
    columns) and, with gradient filtering, whether the tile's work must be done (a scalar
    bool; ``None`` without filtering). See :func:`._common.filter_keep`.

    ``scale`` must be 0 at padding rows (their garbage must not keep a tile).
    """
    d = cm.ce_grad(z, lse, labels, 1.0, cols, valid, st.loss)
    # Padding columns may hold garbage (NaN) logits; 0·NaN must not leak.
    dz = jnp.where(valid, cm.softcap_grad(d * scale, z, st.softcap), 0.0)
    if st.filter_eps is None:
        return dz, None
    keep = cm.filter_keep(d, labels, scale, valid, col_start, block_cols, st.filter_eps)
    return dz, keep[0, 0] > 0


def _when(keep, body):
    """``body()``, under ``pl.when(keep)`` when the tile is predicated by the filter."""
    if keep is None:
        body()
    else:
        pl.when(keep)(body)


# ---------------------------------------------------------- Mosaic (TPU) kernels


def _tpu_logits(h_ref, w_ref, b_ref, st: _Options) -> jax.Array:
    cdt = jnp.dtype(st.compute_dtype)
    h = h_ref[...].astype(cdt)
    w = w_ref[...].astype(cdt)
    z = jax.lax.dot_general(
        h, w, cm.NT if st.vocab_major else cm.NN, preferred_element_type=jnp.float32
    )
    if b_ref is not None:
        z = z + b_ref[...].astype(jnp.float32)
    return cm.softcap(z, st.softcap)


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


def _dh_kernel_tpu(*refs, st: _Options, block_rows: int, block_cols: int):
    h_ref, w_ref, b_ref, (lab_ref, lse_ref, g_ref), (dh_ref, acc_ref) = _split_refs(refs, st, 3)
    i, j = pl.program_id(0), pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

    z = _tpu_logits(h_ref, w_ref, b_ref, st)
    labels = lab_ref[...]
    cols = cm.col_ids(z.shape, j * block_cols)
    scale = cm.ce_row_scale(g_ref[...], labels, st.loss)
    if st.n_rows % block_rows:
        # Padding rows hold garbage; their output rows are dropped, but their scale must
        # not keep a tile the filter would let go.
        scale = jnp.where(cm.row_ids(scale.shape, i * block_rows) < st.n_rows, scale, 0.0)
    valid = cols < st.loss.n_classes
    dz, keep = _tile_grad(
        z, lse_ref[...], labels, scale, cols, valid, st, j * block_cols, block_cols
    )

    def accumulate():
        w = _tpu_masked_weight(w_ref, j, block_cols, st)
        dims = cm.NN if st.vocab_major else cm.NT
        acc_ref[...] += jax.lax.dot_general(
            dz.astype(w.dtype), w, dims, preferred_element_type=jnp.float32
        )

    _when(keep, accumulate)

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
    scale = cm.ce_row_scale(g_ref[...], labels, st.loss)
    if st.n_rows % block_rows:
        # Padding rows hold garbage: drop them from the sums over rows (and the filter).
        rows_ok = cm.row_ids((z.shape[0], 1), i * block_rows) < st.n_rows
        valid = valid & rows_ok
        h = jnp.where(rows_ok, h, 0)
        scale = jnp.where(rows_ok, scale, 0.0)
    dz, keep = _tile_grad(
        z, lse_ref[...], labels, scale, cols, valid, st, j * block_cols, block_cols
    )

    def accumulate():
        # Contract over the rows (dimension 0 of both): a transposed-LHS matmul, which
        # Mosaic's matmul canonicalisation handles; the accumulator already has the
        # weight's layout, so nothing is transposed at the end.
        dz_c = dz.astype(h.dtype)
        a, b = (dz_c, h) if st.vocab_major else (h, dz_c)
        acc_ref[...] += jax.lax.dot_general(a, b, cm.TN, preferred_element_type=jnp.float32)
        if bacc_ref is not None:
            bacc_ref[...] += jnp.sum(dz, axis=0, keepdims=True)

    _when(keep, accumulate)

    @pl.when(i == pl.num_programs(1) - 1)
    def _finish():
        dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)
        if db_ref is not None:
            db_ref[...] = bacc_ref[...].astype(db_ref.dtype)


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


def _tpu_check(kernel: str, st: _Options, br: int, bv: int, hidden, weight, bias, interpret):
    """VMEM lower bound of one of the three Mosaic kernels (see ``cm.check_tpu_vmem``)."""
    n, d, v, f32 = st.n_rows, st.hidden, st.loss.n_classes, jnp.float32
    w_block = ((bv, d), weight.dtype, (v, d)) if st.vocab_major else ((d, bv), weight.dtype, (d, v))
    b_block = ((1, bv), None if bias is None else bias.dtype, (1, v))
    row = ((br, 1), f32, (n, 1))
    ins = [((br, d), hidden.dtype, (n, d)), w_block, ((br, 1), jnp.int32, (n, 1))]
    ins += [b_block] if st.has_bias else []
    if kernel == "forward":
        buffers, scratch = ins + [row, row], [row[:2]] * 4
    elif kernel == "d_hidden":
        buffers = ins + [row, row, ((br, d), hidden.dtype, (n, d))]
        scratch = [((br, d), f32)]
    else:
        buffers = ins + [row, row, w_block] + ([b_block] if st.has_bias else [])
        scratch = [(w_block[0], f32)] + ([((1, bv), f32)] if st.has_bias else [])
    blocks = dict(block_rows=br, block_cols=bv, hidden=d)
    cm.check_tpu_vmem(f"linear_cross_entropy ({kernel})", blocks, buffers, scratch, interpret)


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
    _tpu_check("forward", st, br, bv, hidden, weight, bias, interpret)
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
    _tpu_check("d_hidden", st, br, bv, hidden, weight, bias, interpret)
    specs, row_spec = _tpu_specs(st, br, bv, vocab_first=False)
    return pl.pallas_call(
        functools.partial(_dh_kernel_tpu, st=st, block_rows=br, block_cols=bv),
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
    _tpu_check("d_weight", st, br, bv, hidden, weight, bias, interpret)
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


def _bwd_tpu(hidden, weight, bias, labels, lse, g, *, st, cfg, interpret):
    dh = _dh_tpu(hidden, weight, bias, labels, lse, g, st=st, cfg=cfg, interpret=interpret)
    dw, db = _dw_tpu(hidden, weight, bias, labels, lse, g, st=st, cfg=cfg, interpret=interpret)
    return dh, dw, db


def _fused_tpu(hidden, weight, bias, labels, row_weight, *, st, cfg, interpret):
    """Per-row loss and the gradient of ``sum_i row_weight_i l_i``: the forward kernel,
    then the two gradient kernels with ``row_weight`` as the cotangent."""
    kw = dict(st=st, cfg=cfg, interpret=interpret)
    loss, lse = _fwd_tpu(hidden, weight, bias, labels, **kw)
    g = row_weight.reshape(-1, 1).astype(jnp.float32)
    return (loss, *_bwd_tpu(hidden, weight, bias, labels, lse, g, **kw))


def _run(cfg, tpu, gpu, st, *args):
    return cm.dispatch(
        cfg, functools.partial(tpu, st=st, cfg=cfg), functools.partial(gpu, st=st, cfg=cfg), *args
    )


# --------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _linear_ce_vjp(hidden, weight, bias, labels, st, cfg):
    return _run(cfg, _fwd_tpu, gpu.forward, st, hidden, weight, bias, labels)[0]


def _linear_ce_vjp_fwd(hidden, weight, bias, labels, st, cfg):
    loss, lse = _run(cfg, _fwd_tpu, gpu.forward, st, hidden, weight, bias, labels)
    # One float per row besides the inputs: the logits are recomputed in the backward.
    return loss, (hidden, weight, bias, labels, lse)


def _linear_ce_vjp_bwd(st, cfg, res, g):
    hidden, weight, bias, labels, lse = res
    g = g.astype(jnp.float32)
    dh, dw, db = _run(cfg, _bwd_tpu, gpu.backward, st, hidden, weight, bias, labels, lse, g)
    return dh, dw, db, None


_linear_ce_vjp.defvjp(_linear_ce_vjp_fwd, _linear_ce_vjp_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _linear_ce_sum_vjp(hidden, weight, bias, labels, row_weight, st, cfg):
    loss = _run(cfg, _fwd_tpu, gpu.forward, st, hidden, weight, bias, labels)[0]
    return jnp.sum(loss[:, 0] * row_weight)


def _linear_ce_sum_vjp_fwd(hidden, weight, bias, labels, row_weight, st, cfg):
    # The loss is a scalar, so its gradient is known up to the cotangent's scale now:
    # compute it while the logits are at hand (no recomputation in the backward).
    args = (hidden, weight, bias, labels, row_weight)
    loss, dh, dw, db = _run(cfg, _fused_tpu, gpu.fused, st, *args)
    return jnp.sum(loss[:, 0] * row_weight), (dh, dw, db, loss[:, 0])


def _linear_ce_sum_vjp_bwd(st, cfg, res, g):
    dh, dw, db, loss = res

    def scaled(x):
        return None if x is None else (g * x.astype(jnp.float32)).astype(x.dtype)

    return scaled(dh), scaled(dw), scaled(db), None, g * loss


_linear_ce_sum_vjp.defvjp(_linear_ce_sum_vjp_fwd, _linear_ce_sum_vjp_bwd)


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


def _row_weights(sample_weight, labels, n: int, reduction: str, ignore_index: int):
    """Per-row weights of the loss: ``sample_weight`` (or 1), divided for ``"mean"`` by
    their sum over non-ignored rows (PyTorch's weighted mean; 0 when all are ignored)."""
    if sample_weight is None:
        if reduction == "none":
            return None
        w = jnp.ones((n,), jnp.float32)
    else:
        w = jnp.asarray(sample_weight)
        if not (jnp.issubdtype(w.dtype, jnp.floating) or jnp.issubdtype(w.dtype, jnp.integer)):
            raise TypeError(f"`sample_weight` must be a real array, got dtype {w.dtype}.")
        if w.shape != (n,):
            raise ValueError(
                f"`sample_weight` must have shape ({n},) (one per row), got {w.shape}."
            )
        w = w.astype(jnp.float32)
    if reduction == "mean":
        den = jnp.sum(jnp.where(labels[:, 0] != ignore_index, w, 0.0))
        w = jnp.where(den != 0, w / jnp.where(den != 0, den, 1.0), 0.0)
    return w


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
    sample_weight: ArrayLike | None = None,
    reduction: str = "none",
    filter_eps: float | str | None = None,
    block_rows: int | None = None,
    block_cols: int | None = None,
    block_d: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Cross-entropy of ``hidden @ linear_weight + linear_bias``, logits never stored.

    ``z = h W + b`` (``z ← s·tanh(z/s)`` with ``logit_softcap = s``), then per row
    ``l_i = (1-ε)(lse_i - z_{i,y_i}) + ε(lse_i - mean_c z_{i,c}) + λ lse_i²``, weighted
    ``w_i l_i`` by ``sample_weight`` and reduced: ``"none"`` (per row), ``"sum"``
    (``Σ_i w_i l_i``) or ``"mean"`` (``Σ_i w_i l_i / Σ_{i not ignored} w_i``, 0 when every
    row is ignored). No ``(N, V)`` array is written to memory: on TPU the logits exist
    tile by tile in VMEM; on GPU chunk by chunk (at most 512 MiB). The scalar reductions
    compute their gradient in the forward (three matmuls per token); ``"none"``
    recomputes the logits in the backward (four).

    Gradient filtering (``filter_eps``, Cut Cross-Entropy's): the backward skips every
    ``(block_rows, block_cols)`` tile of logits whose gradient ``|p - target|`` is below
    ``filter_eps`` for all its non-ignored rows, unless one of those rows has its label
    in the tile (a label is never dropped; with label smoothing the target of every class
    is ``ε/V``, of the label ``1 - ε + ε/V``). The loss itself is always exact.

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
      sample_weight: optional ``(N,)`` per-row weights (differentiable).
      reduction: ``"none"``, ``"sum"`` or ``"mean"``.
      filter_eps: ``None`` (exact gradients), a static float ``>= 0``, or ``"auto"``
        (the compute dtype's epsilon / 32: ``2**-12`` for bfloat16).
      block_rows: rows per tile (``None``: chosen per backend); on GPU also the row tile
        of the gradient matmuls and of the filter.
      block_cols: vocabulary entries per tile.
      block_d: hidden-dimension tile of the GPU's block-sparse gradient matmuls (the TPU
        kernels keep the whole hidden dimension in VMEM and ignore it).
      interpret: see :func:`jsoftmax.kernels.softmax`.

    Block overrides that a device compiler would reject raise ``ValueError`` before it
    runs: on TPU, blocks (the whole hidden dimension per block) whose double buffers and
    accumulators exceed the scoped VMEM (see :func:`jsoftmax.kernels.softmax` for how the
    target is chosen); on GPU, when the program is lowered for CUDA/ROCm, a gradient tile
    above Triton's 2^20 elements per tensor, or block-sparse matmul tiles whose two
    pipeline stages exceed the 166912 bytes of shared memory per block of an A100 (the
    smaller supported GPU). The GPU check happens at lowering because the same block
    keywords size the TPU tiles, which have other limits.

    Returns:
      float32: ``(N,)`` per-row losses for ``"none"`` (0 at ``ignore_index`` rows), else a
      scalar; NaN where a label is outside ``[0, V)`` (and in the gradient). Gradients
      come back in the dtypes of ``hidden``, ``linear_weight`` and ``linear_bias``.

    Raises:
      ValueError: for mismatched shapes, bad options, or GPU tiles beyond Triton's
        2**20 elements per tensor or the shared memory of the smaller supported GPU.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jsoftmax import kernels
      >>> h = jnp.array([[1.0, 0.0]]); w = jnp.array([[0.0, jnp.log(3.0)], [0.0, 0.0]])
      >>> kernels.linear_cross_entropy(h, w, jnp.array([1])).round(4)  # -log(3/4)
      Array([0.2877], dtype=float32)
      >>> kernels.linear_cross_entropy(h, w, jnp.array([1]), reduction="mean").round(4)
      Array(0.2877, dtype=float32)

    References:
      Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models",
      https://arxiv.org/abs/2411.09009 (gradient filtering); Hsu et al. 2024, "Liger
      Kernel" (gradients in the forward of a chunked loss), https://arxiv.org/abs/2410.10989;
      Gemma Team 2024, "Gemma 2" (logit soft-capping), https://arxiv.org/abs/2408.00118.
    """
    hidden, weight, bias, labels, v = _check_inputs(
        hidden, linear_weight, linear_bias, labels, weight_layout
    )
    ignore_index, eps, lam = cm.check_loss_options(ignore_index, label_smoothing, z_loss)
    logit_softcap = check.static_number(
        logit_softcap, "logit_softcap", lo=0.0, lo_open=True, optional=True
    )
    reduction = check.reduction(reduction)
    compute_dtype = jnp.promote_types(hidden.dtype, weight.dtype)
    st = _Options(
        loss=cm.LossOptions(v, ignore_index, eps, lam),
        n_rows=hidden.shape[0],
        hidden=hidden.shape[1],
        vocab_major=weight_layout == "vd",
        softcap=logit_softcap,
        has_bias=bias is not None,
        compute_dtype=compute_dtype.name,
        filter_eps=check.filter_eps(filter_eps, compute_dtype),
    )
    cfg = cm.make_config(block_rows, block_cols, block_d, interpret=interpret)
    placed = _row_placement(hidden, weight, bias, labels, sample_weight, weight_layout)
    if placed is not None:
        return _apply_per_shard(
            *placed, hidden, weight, bias, labels, sample_weight, reduction, st, cfg
        )
    return _apply(hidden, weight, bias, labels, sample_weight, reduction, st, cfg)


def _row_placement(hidden, weight, bias, labels, sample_weight, weight_layout):
    """``(mesh, rows)`` where the tokens are explicitly sharded (see ``cm.row_sharding``).

    The head must be whole on every device: a sharded one is an error, never gathered.
    """
    for name, x in (("linear_weight", weight), ("linear_bias", bias)):
        got = None if x is None else _compat.explicit_spec(x)
        if got is None:
            continue
        vocab_dim = 1 if (weight_layout == "dv" and name == "linear_weight") else 0
        for dim, entry in enumerate(got[1]):
            if entry is not None:
                what = "vocabulary dimension" if dim == vocab_dim else "hidden dimension D"
                axes = cm.entry_axes(entry)
                kernel = "linear_cross_entropy"
                raise ValueError(cm.HEAD_SHARDED.format(kernel=kernel, axes=axes, what=what))
    rows_of = {"labels": labels, "sample_weight": sample_weight}
    return cm.row_sharding("linear_cross_entropy", {"hidden": hidden}, rows_of)


def _apply_per_shard(mesh, rows, hidden, weight, bias, labels, sample_weight, reduction, st, cfg):
    """:func:`_apply` on each token shard; the head replicated, the sums ``psum``-ed.

    The per-row weights (with ``"mean"``'s global denominator) are computed over all
    rows first, so each shard's weighted sum is its part of the global loss.
    """
    n = st.n_rows
    axes = cm.entry_axes(rows)
    local = dataclasses.replace(st, n_rows=n // math.prod(mesh.shape[a] for a in axes))
    if reduction == "none":
        row_weight = None
        if sample_weight is not None:
            row_weight = _row_weights(sample_weight, labels, n, "none", st.loss.ignore_index)

        def fn(h, w, b, y, rw):
            return _apply(h, w, b, y, rw, "none", local, cfg)

        out = cm.rows_spec(rows)
    else:
        row_weight = _row_weights(sample_weight, labels, n, reduction, st.loss.ignore_index)

        def fn(h, w, b, y, rw):
            return jax.lax.psum(_linear_ce_sum_vjp(h, w, b, y, rw, local, cfg), axes)

        out = P()
    whole = P(*([None] * weight.ndim))
    specs = (cm.rows_spec(rows, 1), whole, P(None), cm.rows_spec(rows, 1), cm.rows_spec(rows))
    return cm.per_row_shard(mesh, fn, (hidden, weight, bias, labels, row_weight), specs, out)


def _apply(hidden, weight, bias, labels, sample_weight, reduction, st: _Options, cfg):
    """The loss for validated inputs (``labels`` as an ``(N, 1)`` int32 column)."""
    n = st.n_rows
    row_weight = _row_weights(sample_weight, labels, n, reduction, st.loss.ignore_index)
    if reduction == "none":
        loss = _linear_ce_vjp(hidden, weight, bias, labels, st, cfg).reshape(n)
        return loss if sample_weight is None else loss * row_weight
    return _linear_ce_sum_vjp(hidden, weight, bias, labels, row_weight, st, cfg)

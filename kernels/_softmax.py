"""Tiled softmax / log-softmax over the last axis of a matrix, forward and backward.

Rows are tiled *and* columns are tiled, with an online (running) max and sum-exp, so a
row of any length (a 256k vocabulary) streams through a fixed-size tile:

* forward: pass 1 accumulates ``(max, Σ exp)`` per row, pass 2 writes
  ``exp(x - lse)`` (softmax) or ``x - lse`` (log-softmax). When the row fits one column
  tile the two passes collapse into one (one read, one write).
* backward, from the saved output ``y`` only: pass 1 accumulates ``d = Σ g·p``
  (softmax) or ``d = Σ g`` over admissible entries (log-softmax), pass 2 writes
  ``p (g - d)`` or ``g - p d`` -- with ``-inf`` (inadmissible) entries getting exactly 0,
  as in :func:`jsoftmax.softmax`.

Statistics accumulate in float32 (float64 for float64 input); outputs keep the input
dtype. A row of all ``-inf`` gives zeros (softmax) / ``-inf`` (log-softmax) and a zero
gradient, never NaN. ``+inf`` entries are not supported (they come out NaN).
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

# ---------------------------------------------------------------- per-tile math


def _emit_forward(x: jax.Array, lse: jax.Array, *, log: bool) -> jax.Array:
    return x - lse if log else jnp.exp(x - lse)


def _backward_stat(y: jax.Array, g: jax.Array, valid: jax.Array | None, *, log: bool) -> jax.Array:
    """Per-row partial of ``Σ g·p`` (softmax) or ``Σ g`` over admissible entries (log)."""
    keep = y > -jnp.inf if log else None
    if valid is not None:
        keep = valid if keep is None else keep & valid
    t = g if log else g * y
    if keep is not None:
        t = jnp.where(keep, t, 0.0)
    return jnp.sum(t, axis=1, keepdims=True)


def _emit_backward(y: jax.Array, g: jax.Array, d: jax.Array, *, log: bool) -> jax.Array:
    if log:
        # -inf entries are constants of the row (masked classes): exactly zero gradient.
        return jnp.where(y > -jnp.inf, g - jnp.exp(y) * d, 0.0)
    return y * (g - d)


# ---------------------------------------------------------- Mosaic (TPU) kernels


def _fwd_kernel_tpu(x_ref, o_ref, m_ref, s_ref, *, log: bool, n_cols: int, block_cols: int):
    phase, j = pl.program_id(1), pl.program_id(2)
    last_phase = pl.num_programs(1) - 1
    x = x_ref[...].astype(m_ref.dtype)
    if n_cols % block_cols:
        x = jnp.where(cm.col_ids(x.shape, j * block_cols) < n_cols, x, -jnp.inf)

    @pl.when((phase == 0) & (j == 0))
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, m_ref.dtype)
        s_ref[...] = jnp.zeros(s_ref.shape, s_ref.dtype)

    @pl.when(phase == 0)
    def _accumulate():
        m, s = cm.online_update(m_ref[...], s_ref[...], x)
        m_ref[...] = m
        s_ref[...] = s

    # With a single column block there is a single phase: the stats just written are final.
    @pl.when(phase == last_phase)
    def _emit():
        lse = cm.safe_lse(m_ref[...], s_ref[...])
        o_ref[...] = _emit_forward(x, lse, log=log).astype(o_ref.dtype)


def _bwd_kernel_tpu(y_ref, g_ref, dx_ref, d_ref, *, log: bool, n_cols: int, block_cols: int):
    phase, j = pl.program_id(1), pl.program_id(2)
    last_phase = pl.num_programs(1) - 1
    y = y_ref[...].astype(d_ref.dtype)
    g = g_ref[...].astype(d_ref.dtype)
    valid = None
    if n_cols % block_cols:
        valid = cm.col_ids(y.shape, j * block_cols) < n_cols

    @pl.when((phase == 0) & (j == 0))
    def _init():
        d_ref[...] = jnp.zeros(d_ref.shape, d_ref.dtype)

    @pl.when(phase == 0)
    def _accumulate():
        d_ref[...] += _backward_stat(y, g, valid, log=log)

    @pl.when(phase == last_phase)
    def _emit():
        dx_ref[...] = _emit_backward(y, g, d_ref[...], log=log).astype(dx_ref.dtype)


# ---------------------------------------------------------- Triton (GPU) kernels


def _gpu_tiles(n_rows: int, n_cols: int, block_rows: int, block_cols: int):
    """``tile(j) -> (index, mask)`` for column chunk ``j`` of this program's row block."""
    r0 = pl.program_id(0) * block_rows
    rows_ok = cm.row_ids((block_rows, 1), r0) < n_rows

    def tile(j):
        c0 = j * block_cols
        mask = rows_ok & (cm.col_ids((1, block_cols), c0) < n_cols)
        return (pl.ds(r0, block_rows), pl.ds(c0, block_cols)), mask

    return tile


def _fwd_kernel_gpu(x_ref, o_ref, *, log: bool, acc, n_rows, n_cols, block_rows, block_cols):
    tile = _gpu_tiles(n_rows, n_cols, block_rows, block_cols)
    n_chunks = cm.cdiv(n_cols, block_cols)

    def load(j):
        idx, mask = tile(j)
        return plgpu.load(x_ref.at[idx], mask=mask, other=-jnp.inf).astype(acc)

    def store(j, x, lse):
        idx, mask = tile(j)
        plgpu.store(o_ref.at[idx], _emit_forward(x, lse, log=log).astype(o_ref.dtype), mask=mask)

    init = (jnp.full((block_rows, 1), -jnp.inf, acc), jnp.zeros((block_rows, 1), acc))
    if n_chunks == 1:
        # The whole row is one register tile: read once, write once.
        x = load(0)
        store(0, x, cm.safe_lse(*cm.online_update(*init, x)))
        return
    m, s = jax.lax.fori_loop(0, n_chunks, lambda j, c: cm.online_update(*c, load(j)), init)
    lse = cm.safe_lse(m, s)

    def write(j, carry):
        store(j, load(j), lse)
        return carry

    jax.lax.fori_loop(0, n_chunks, write, 0)


def _bwd_kernel_gpu(
    y_ref, g_ref, dx_ref, *, log: bool, acc, n_rows, n_cols, block_rows, block_cols
):
    tile = _gpu_tiles(n_rows, n_cols, block_rows, block_cols)
    n_chunks = cm.cdiv(n_cols, block_cols)

    def load(j):
        idx, mask = tile(j)
        # Padding reads as y = -inf (log) / 0 (softmax) and g = 0: it adds nothing to d.
        y = plgpu.load(y_ref.at[idx], mask=mask, other=-jnp.inf if log else 0.0)
        g = plgpu.load(g_ref.at[idx], mask=mask, other=0.0)
        return y.astype(acc), g.astype(acc)

    def store(j, y, g, d):
        idx, mask = tile(j)
        plgpu.store(
            dx_ref.at[idx], _emit_backward(y, g, d, log=log).astype(dx_ref.dtype), mask=mask
        )

    if n_chunks == 1:
        y, g = load(0)
        store(0, y, g, _backward_stat(y, g, None, log=log))
        return
    d = jax.lax.fori_loop(
        0,
        n_chunks,
        lambda j, d: d + _backward_stat(*load(j), None, log=log),
        jnp.zeros((block_rows, 1), acc),
    )

    def write(j, carry):
        store(j, *load(j), d)
        return carry

    jax.lax.fori_loop(0, n_chunks, write, 0)


# ------------------------------------------------------------- pallas_call wrappers


def _tpu_call(kernel, inputs, out_dtype, n_scratch, *, block_rows, block_cols, interpret):
    """The two-phase Mosaic grid ``(row_blocks, phases, col_blocks)`` shared by fwd and bwd.

    Phase 0 accumulates per-row statistics in VMEM scratch, phase 1 writes the output.
    During phase 0 the output block index stays at column block 0, so nothing is written
    back before phase 1 fills it. One column block means one phase (a single pass).
    """
    n, c = inputs[0].shape
    br, bc = cm.tpu_row_blocks(n, c, inputs[0].dtype, block_rows, block_cols)
    n_col_blocks = cm.cdiv(c, bc)
    phases = 1 if n_col_blocks == 1 else 2
    acc = num.acc_dtype(inputs[0].dtype)
    cm.check_tpu_vmem(
        "softmax",
        dict(block_rows=br, block_cols=bc),
        [((br, bc), x.dtype, (n, c)) for x in inputs] + [((br, bc), out_dtype, (n, c))],
        [((br, 1), acc)] * n_scratch,
        interpret,
    )
    return pl.pallas_call(
        functools.partial(kernel, n_cols=c, block_cols=bc),
        grid=(cm.cdiv(n, br), phases, n_col_blocks),
        in_specs=[pl.BlockSpec((br, bc), lambda i, p, j: (i, j))] * len(inputs),
        out_specs=pl.BlockSpec((br, bc), lambda i, p, j: (i, j * p)),
        out_shape=jax.ShapeDtypeStruct((n, c), out_dtype),
        scratch_shapes=[pltpu.VMEM((br, 1), acc)] * n_scratch,
        compiler_params=cm.tpu_params("parallel", "arbitrary", "arbitrary"),
        interpret=interpret,
        name="jsoftmax_softmax",
    )(*inputs)


def _gpu_call(kernel, inputs, out_dtype, *, block_rows, block_cols, interpret):
    n, c = inputs[0].shape
    br, bc = cm.gpu_row_blocks(n, c, block_rows, block_cols)
    cm.check_triton("softmax", dict(block_rows=br, block_cols=bc), [(br, bc)], interpret)
    return pl.pallas_call(
        functools.partial(
            kernel,
            acc=num.acc_dtype(inputs[0].dtype),
            n_rows=n,
            n_cols=c,
            block_rows=br,
            block_cols=bc,
        ),
        grid=(cm.cdiv(n, br),),
        out_shape=jax.ShapeDtypeStruct((n, c), out_dtype),
        compiler_params=cm.gpu_params(br * bc),
        interpret=interpret,
        name="jsoftmax_softmax",
    )(*inputs)


def _fwd_tpu(x, *, log, block_rows, block_cols, interpret):
    kernel = functools.partial(_fwd_kernel_tpu, log=log)
    return _tpu_call(
        kernel, [x], x.dtype, 2, block_rows=block_rows, block_cols=block_cols, interpret=interpret
    )


def _fwd_gpu(x, *, log, block_rows, block_cols, interpret):
    kernel = functools.partial(_fwd_kernel_gpu, log=log)
    return _gpu_call(
        kernel, [x], x.dtype, block_rows=block_rows, block_cols=block_cols, interpret=interpret
    )


def _bwd_tpu(y, g, *, log, block_rows, block_cols, interpret):
    kernel = functools.partial(_bwd_kernel_tpu, log=log)
    return _tpu_call(
        kernel,
        [y, g],
        y.dtype,
        1,
        block_rows=block_rows,
        block_cols=block_cols,
        interpret=interpret,
    )


def _bwd_gpu(y, g, *, log, block_rows, block_cols, interpret):
    kernel = functools.partial(_bwd_kernel_gpu, log=log)
    return _gpu_call(
        kernel, [y, g], y.dtype, block_rows=block_rows, block_cols=block_cols, interpret=interpret
    )


def _forward(x: jax.Array, log: bool, cfg: cm.Config) -> jax.Array:
    blocks = dict(log=log, block_rows=cfg.block_rows, block_cols=cfg.block_cols)
    return cm.dispatch(
        cfg, functools.partial(_fwd_tpu, **blocks), functools.partial(_fwd_gpu, **blocks), x
    )


def _backward(y: jax.Array, g: jax.Array, log: bool, cfg: cm.Config) -> jax.Array:
    blocks = dict(log=log, block_rows=cfg.block_rows, block_cols=cfg.block_cols)
    return cm.dispatch(
        cfg, functools.partial(_bwd_tpu, **blocks), functools.partial(_bwd_gpu, **blocks), y, g
    )


# --------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _softmax_vjp(x: jax.Array, log: bool, cfg: cm.Config) -> jax.Array:
    return _forward(x, log, cfg)


def _softmax_vjp_fwd(x, log, cfg):
    y = _forward(x, log, cfg)
    # The output is the only residual (no copy of x, no exp(x)).
    return y, y


def _softmax_vjp_bwd(log, cfg, y, g):
    return (_backward(y, g.astype(y.dtype), log, cfg),)


_softmax_vjp.defvjp(_softmax_vjp_fwd, _softmax_vjp_bwd)


def _placed(x: jax.Array, log: bool, cfg: cm.Config) -> jax.Array:
    """The kernel per row shard where ``x`` is explicitly sharded (see ``cm.row_sharding``)."""
    placed = cm.row_sharding("log_softmax" if log else "softmax", {"x": x}, {})
    if placed is None:
        return _softmax_vjp(x, log, cfg)
    mesh, rows = placed
    spec = cm.rows_spec(rows, 1)
    fn = functools.partial(_softmax_vjp, log=log, cfg=cfg)
    return cm.per_row_shard(mesh, fn, (x,), (spec,), spec)


def _prepare(x: ArrayLike) -> jax.Array:
    return check.matrix(x, "x")


def softmax(
    x: ArrayLike,
    *,
    block_rows: int | None = None,
    block_cols: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Softmax over the last axis of a matrix, as a tiled Pallas kernel.

    ``p_ij = exp(x_ij - m_i) / Σ_k exp(x_ik - m_i)`` with the row max ``m_i`` and the sum
    accumulated online over column tiles, so rows of any length (a 256k vocabulary) work.

    Args:
      x: ``(rows, classes)`` floating array. ``-inf`` entries get probability 0; a row
        of all ``-inf`` gives zeros and a zero gradient. ``+inf`` is not supported.
      block_rows: rows per tile (``None``: chosen per backend). Rounded up to the
        backend's legal tile: a multiple of 8 (16 for 16-bit dtypes) on TPU, a power of
        two on GPU.
      block_cols: columns per tile (``None``: the whole row when short, else 2048 on TPU
        and 8192 on GPU). Multiple of 128 on TPU, power of two on GPU.
      interpret: ``None``: compiled on GPU/TPU, Pallas interpreter on CPU (chosen at
        lowering time per platform). ``True``: always the interpreter.

    Block sizes: the defaults compile for every target of the compile matrix (H100,
    A100, TPU v4/v5e/v5p/v6e). An override the device compiler would reject raises
    ``ValueError`` naming the limit, before the compiler runs: a Triton tile above 2^20
    elements; TPU blocks whose double buffers and scratch alone exceed the scoped VMEM
    (16 MiB on v4/v5e/v5p, 32 MiB on v6e; the compiler's temporaries come on top, so it
    may still refuse blocks close to the limit). Alignment is never an error: sizes are
    rounded up as described above. The generation is not known at trace time on every
    path, so the check uses the device's limits when running on a TPU/GPU, and the most
    restrictive supported target of each backend on a host without one (the program may
    be lowered for any); the other accelerator's kernel is not checked on a GPU/TPU host.

    Returns:
      The probabilities, same shape and dtype as ``x`` (float32 accumulation).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jsoftmax import kernels
      >>> kernels.softmax(jnp.array([[0.0, jnp.log(3.0)]]))
      Array([[0.25, 0.75]], dtype=float32)
    """
    x = _prepare(x)
    return _placed(x, False, cm.make_config(block_rows, block_cols, interpret=interpret))


def log_softmax(
    x: ArrayLike,
    *,
    block_rows: int | None = None,
    block_cols: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Log-softmax over the last axis of a matrix, as a tiled Pallas kernel.

    ``y_ij = x_ij - logsumexp_k x_ik`` with the logsumexp accumulated online over column
    tiles. The backward pass uses only the output: ``dx = g - exp(y) Σ g`` over
    admissible entries, and exactly 0 at ``-inf`` entries (masked classes).

    Args:
      x: ``(rows, classes)`` floating array. A row of all ``-inf`` gives ``-inf`` and a
        zero gradient. ``+inf`` is not supported.
      block_rows: rows per tile; see :func:`softmax`.
      block_cols: columns per tile; see :func:`softmax`.
      interpret: see :func:`softmax`.

    Returns:
      The log-probabilities, same shape and dtype as ``x``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jsoftmax import kernels
      >>> kernels.log_softmax(jnp.array([[0.0, 0.0]]))
      Array([[-0.6931472, -0.6931472]], dtype=float32)
    """
    x = _prepare(x)
    return _placed(x, True, cm.make_config(block_rows, block_cols, interpret=interpret))

"""Linear cross-entropy on GPUs: token chunks, XLA matmuls, Triton loss and gradient tiles.

The GPU half of :func:`jsoftmax.kernels.linear_cross_entropy` (the TPU half and the public
wrapper are in ``_linear_cross_entropy.py``). Designed from the bytes and FLOPs of an
H100 at ``N = 8192`` tokens, ``D = 4096``, ``V = 131072``, bfloat16: one ``h @ W`` is
8.8 TFLOP (~13 ms at the ~70 % of the 989 TFLOP/s peak a tuned GEMM reaches), one pass
over the bf16 ``(N, V)`` logits is 2.1 GB (~0.7 ms at 3 TB/s). The loss and gradient need
three such matmuls (logits, ``d_hidden``, ``d_weight``) -- the naive path's three cuBLAS
calls -- and everything else is passes. Whatever recomputes logits (a fourth matmul) or
accumulates float32 gradients tile by tile in memory (the previous design: ~0.5 TB of
read-modify-write at this shape) cannot match that. Hence:

* **The matmuls are XLA dots** (cuBLAS-grade after autotuning), and there are three, not
  four, per token for a scalar loss (``reduction="sum"``/``"mean"``): its gradient is
  computed in the *forward*, chunk by chunk, while the chunk's logits are at hand; the
  backward only scales it by the incoming scalar cotangent. A per-row loss
  (``reduction="none"``) cannot know its cotangent in the forward, so its backward
  recomputes each chunk's logits (four matmuls).
* **The logits exist one chunk of ``C`` tokens at a time** (``C x V`` in the compute
  dtype -- rounded like the naive path's bf16 logits -- at most 512 MiB; 256 MiB at the
  shape above, 1/15 of the naive program's temporaries). A Triton kernel reduces a chunk
  to the loss and ``lse`` (one read, the vocabulary split over programs so that a chunk
  fills the GPU); a second one overwrites the chunk with its gradient ``dz`` (one read,
  one write). Bias, soft-capping, label smoothing and z-loss are applied in these tiles.
  That is three passes over the logits where XLA's cross-entropy makes four (six with a
  float32 loss).
* **``d_weight`` accumulates over the ``N / C`` chunks in the weight's dtype inside the
  matmul** (``dW <- dW + h_c^T dz_c``, a GEMM with beta = 1; one rounding per chunk): no
  float32 ``(D, V)`` buffer exists. ``d_hidden`` of a chunk is complete after one matmul.
* **Gradient filtering** (``filter_eps``): the gradient kernel also flags each
  ``(block_rows, block_cols)`` tile that matters (:func:`._common.filter_keep`; skipped
  tiles are zeroed); ``d_hidden`` and ``d_weight`` then come from two block-sparse Triton
  matmuls that loop only over flagged tiles (flag lists compacted by XLA), so skipped
  tiles cost neither FLOPs nor bytes. Those matmuls run at roughly 0.8x XLA's speed and
  their ``d_weight`` read-modify-write is not hidden, so filtering pays once about a
  third of the tiles are skipped (a trained LM's softmax: about half, per Cut
  Cross-Entropy's timings); on a near-uniform softmax it is slower than exact.

Kernel bodies come first, then their ``pallas_call`` wrappers, then the chunk loops that
:mod:`._linear_cross_entropy` dispatches to.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.interpreters import mlir

from jsoftmax import _numerics as num
from jsoftmax._compat import plgpu

from . import _common as cm

# A chunk's logits (C x V in the compute dtype) stay below this: 256 MiB at V = 131072
# bf16, 500 MiB at V = 256000 -- 1/16 of what the leanest naive program (bf16 logits and
# their bf16 gradient) holds. C is capped at 1024 rows, where the d_weight GEMM (its
# contraction length is C, and it re-reads and re-writes d_weight: beta = 1) still does
# ~450 FLOP per byte, above an H100's ~230 FLOP/B ridge.
CHUNK_BYTES = 512 * 2**20
MAX_CHUNK_ROWS = 1024
# Gradient tile (rows, vocabulary) -- also the filtering granularity -- and the hidden
# tile of the block-sparse matmuls: 128 x 128 x 128 bf16 operands, 8 warps (two Hopper
# warpgroups), two pipeline stages of 64 KiB.
GPU_TILES = (128, 128, 128)
GEMM_WARPS = 8
GEMM_STAGES = 2
# Statistics kernel: 16 rows x 1024 vocabulary entries per step, the vocabulary split so
# that a chunk launches at least this many programs (a few waves on 108-132 SMs).
STATS_TILE = (16, 1024)
STATS_MIN_PROGRAMS = 512
# Limits checked before the compiler sees a block-size override (kernels/_common.py):
# Triton's elements per tensor, and the shared memory per block of the smaller supported
# GPU (A100), since the target is only known when the program is compiled.
TRITON_MAX_ELEMENTS = cm.TRITON_MAX_ELEMENTS
SMEM_LIMIT_BYTES = cm.GPU_MOST_RESTRICTIVE.shared_memory


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static chunking and tiling of one call (see :func:`plan`)."""

    chunk: int  # rows per chunk, a multiple of br
    n_chunks: int
    br: int  # gradient tile rows (filter granularity, sparse-matmul row tile)
    bv: int  # gradient tile vocabulary entries
    bd: int  # hidden tile of the sparse matmuls
    sr: int  # statistics kernel rows per program
    sc: int  # statistics kernel vocabulary entries per step
    span: int  # vocabulary entries per statistics program (a multiple of sc)
    splits: int  # statistics programs along the vocabulary


def _smem_bytes(br: int, bv: int, bd: int, itemsize: int) -> int:
    """Shared memory of the block-sparse matmuls: the larger one's two operand tiles.

    Measured against the compiler (A100 target, bf16 and float32): the request is exactly
    this, e.g. 196608 bytes for (128, 256, 256) bf16 or (128, 256, 64) float32, and every
    configuration at or under the limit compiled.
    """
    return max(br * bv + bv * bd, br * bd + br * bv) * itemsize


def blocks_problem(br: int, bv: int, bd: int, itemsize: int) -> str | None:
    """Why a tile configuration cannot compile on the GPU (the limit it breaks), or None.

    The limits are ``kernels._common.limits("gpu")``'s: the device's own on a GPU host,
    the most restrictive supported GPU (A100) on a host without one.
    """
    lim = cm.limits("gpu")
    if lim is None:
        return None
    for name, elems in (
        ("block_rows x block_cols", br * bv),
        ("block_cols x block_d", bv * bd),
        ("block_rows x block_d", br * bd),
    ):
        if elems > TRITON_MAX_ELEMENTS:
            return (
                f"GPU linear_cross_entropy tiles: {name} = {elems} elements exceeds Triton's "
                f"limit of {TRITON_MAX_ELEMENTS} (2**20) elements per tensor."
            )
    smem = _smem_bytes(br, bv, bd, itemsize)
    if smem > lim.shared_memory:
        return (
            f"GPU linear_cross_entropy tiles (block_rows={br}, block_cols={bv}, "
            f"block_d={bd}) need {smem} bytes of shared memory for the gradient matmuls, "
            f"above the {lim.shared_memory}-byte per-block limit of {lim.name}."
        )
    return None


# `platform_dependent` traces the GPU branch on every host, also where it is never lowered
# (TPU, or the CPU interpreter), and the block keywords size the TPU tiles too. So a tile
# configuration the GPU cannot compile is reported when the GPU branch is *lowered*: an
# identity primitive whose CUDA/ROCm lowering raises the ValueError, before Triton runs.
_tile_error_p = jax.extend.core.Primitive("jsoftmax_gpu_tile_error")
_tile_error_p.def_impl(lambda x, *, message: x)
_tile_error_p.def_abstract_eval(lambda x, *, message: x)


def _raise_tile_error(ctx, x, *, message):
    raise ValueError(message)


for _platform in ("cuda", "rocm"):
    mlir.register_lowering(_tile_error_p, _raise_tile_error, platform=_platform)
mlir.register_lowering(_tile_error_p, lambda ctx, x, *, message: [x])


def plan(st: Any, cfg: cm.Config, itemsize: int) -> Plan:
    """Chunk size and tiles for ``st`` (static options) and ``cfg`` (block overrides)."""
    n, d, v = st.n_rows, st.hidden, st.loss.n_classes
    br = cm.gpu_block(n, cfg.block_rows, GPU_TILES[0], minimum=16)
    bv = cm.gpu_block(v, cfg.block_cols, GPU_TILES[1], minimum=16)
    bd = cm.gpu_block(d, cfg.block_d, GPU_TILES[2], minimum=16)
    if cfg.block_d is None:
        # The default hidden tile shrinks until the matmuls' operand tiles fit (float32, or
        # larger row / vocabulary tiles).
        while bd > 16 and _smem_bytes(br, bv, bd, itemsize) > SMEM_LIMIT_BYTES:
            bd //= 2
    rows = st.chunk_rows or min(MAX_CHUNK_ROWS, CHUNK_BYTES // (v * itemsize))
    rows = max(br, rows // br * br)
    n_chunks = cm.cdiv(n, rows)
    chunk = cm.round_up(cm.cdiv(n, n_chunks), br)
    sr = min(STATS_TILE[0], br)
    sc = cm.gpu_block(v, None, STATS_TILE[1])
    tiles = cm.cdiv(v, sc)
    splits = min(tiles, max(1, cm.cdiv(STATS_MIN_PROGRAMS, chunk // sr)))
    span = cm.cdiv(tiles, splits) * sc
    return Plan(chunk, n_chunks, br, bv, bd, sr, sc, span, cm.cdiv(v, span))


def _acc(st: Any) -> jnp.dtype:
    return num.acc_dtype(st.compute_dtype)


# ----------------------------------------------------------------------- kernel bodies


def _epilogue(z, b_ref, c0, bc, valid, st):
    """Bias and soft-cap of a float logits tile whose first vocabulary entry is ``c0``."""
    if b_ref is not None:
        b = plgpu.load(b_ref.at[pl.ds(0, 1), pl.ds(c0, bc)], mask=valid, other=0.0)
        z = z + b.astype(z.dtype)
    return cm.softcap(z, st.softcap)


def _row_refs(refs, st):
    """``(bias ref or None, rest)`` from the flat refs that follow the logits."""
    return (refs[0], refs[1:]) if st.has_bias else (None, refs)


def _stats_kernel(z_ref, *refs, st, p: Plan):
    """Partial ``(max, sum-exp, label logit, logit sum)`` of ``sr`` rows over one
    vocabulary span, in ``sc``-wide steps (one read of the logits)."""
    b_ref, (lab_ref, *out_refs) = _row_refs(refs, st)
    r0 = pl.program_id(0) * p.sr
    c_start = pl.program_id(1) * p.span
    labels = plgpu.load(lab_ref.at[pl.ds(r0, p.sr), pl.ds(0, 1)])

    def body(t, stats):
        c0 = c_start + t * p.sc
        cols = cm.col_ids((1, p.sc), c0)
        valid = cols < st.loss.n_classes
        mask = jnp.broadcast_to(valid, (p.sr, p.sc))
        z = plgpu.load(z_ref.at[pl.ds(r0, p.sr), pl.ds(c0, p.sc)], mask=mask, other=0.0)
        z = _epilogue(z.astype(_acc(st)), b_ref, c0, p.sc, valid, st)
        return cm.ce_update(stats, z, labels, cols, valid, st.loss)

    stats = jax.lax.fori_loop(0, p.span // p.sc, body, cm.ce_init(_acc(st), p.sr))
    idx = (pl.ds(r0, p.sr), pl.ds(pl.program_id(1), 1))
    for ref, value in zip(out_refs, stats, strict=True):
        plgpu.store(ref.at[idx], value)


def _grad_kernel(z_ref, *refs, st, p: Plan):
    """One ``(br, bv)`` tile: logits -> ``dz`` in place; its filter flag; its bias sums."""
    b_ref, (lab_ref, lse_ref, g_ref, dz_ref, *rest) = _row_refs(refs, st)
    flag_ref = rest.pop(0) if st.filter_eps is not None else None
    db_ref = rest.pop(0) if st.has_bias else None
    i, j = pl.program_id(0), pl.program_id(1)
    r0, v0 = i * p.br, j * p.bv
    rows = (pl.ds(r0, p.br), pl.ds(0, 1))
    labels = plgpu.load(lab_ref.at[rows])
    lse = plgpu.load(lse_ref.at[rows])
    scale = cm.ce_row_scale(plgpu.load(g_ref.at[rows]), labels, st.loss)
    cols = cm.col_ids((1, p.bv), v0)
    valid = cols < st.loss.n_classes
    mask = jnp.broadcast_to(valid, (p.br, p.bv))
    idx = (pl.ds(r0, p.br), pl.ds(v0, p.bv))
    z = plgpu.load(z_ref.at[idx], mask=mask, other=0.0).astype(lse.dtype)
    z = _epilogue(z, b_ref, v0, p.bv, valid, st)
    d = cm.ce_grad(z, lse, labels, 1.0, cols, valid, st.loss)
    dz = jnp.where(valid, cm.softcap_grad(d * scale, z, st.softcap), 0.0)
    if flag_ref is not None:
        keep = cm.filter_keep(d, labels, scale, valid, v0, p.bv, st.filter_eps)
        plgpu.store(flag_ref.at[pl.ds(i, 1), pl.ds(j, 1)], keep.astype(jnp.int32))
        dz = jnp.where(keep > 0, dz, 0.0)
    plgpu.store(dz_ref.at[idx], dz.astype(dz_ref.dtype), mask=mask)
    if db_ref is not None:
        sums = jnp.sum(dz, axis=0, keepdims=True)
        plgpu.store(db_ref.at[pl.ds(i, 1), pl.ds(v0, p.bv)], sums, mask=valid)


def _sparse_dh_kernel(cnt_ref, idx_ref, dz_ref, w_ref, dh_ref, *, st, p: Plan):
    """``d_hidden[rows, d-tile] = sum over flagged vocabulary tiles of dz @ W^T``."""
    i, k = pl.program_id(0), pl.program_id(1)
    r0, d0 = i * p.br, k * p.bd
    v, hid = st.loss.n_classes, st.hidden
    d_ok_c = cm.col_ids((1, p.bd), d0) < hid
    cdt = jnp.dtype(st.compute_dtype)

    def body(t, acc):
        v0 = idx_ref[i, t] * p.bv
        v_ok_c = cm.col_ids((1, p.bv), v0) < v
        dz = plgpu.load(
            dz_ref.at[pl.ds(r0, p.br), pl.ds(v0, p.bv)],
            mask=jnp.broadcast_to(v_ok_c, (p.br, p.bv)),
            other=0.0,
        )
        if st.vocab_major:  # W is (V, D)
            mask = (cm.row_ids((p.bv, 1), v0) < v) & d_ok_c
            w = plgpu.load(w_ref.at[pl.ds(v0, p.bv), pl.ds(d0, p.bd)], mask=mask, other=0.0)
            dims = cm.NN
        else:  # W is (D, V)
            mask = (cm.row_ids((p.bd, 1), d0) < hid) & v_ok_c
            w = plgpu.load(w_ref.at[pl.ds(d0, p.bd), pl.ds(v0, p.bv)], mask=mask, other=0.0)
            dims = cm.NT
        return acc + jax.lax.dot_general(
            dz.astype(cdt), w.astype(cdt), dims, preferred_element_type=jnp.float32
        )

    acc = jax.lax.fori_loop(0, cnt_ref[i], body, jnp.zeros((p.br, p.bd), jnp.float32))
    out = (pl.ds(r0, p.br), pl.ds(d0, p.bd))
    plgpu.store(
        dh_ref.at[out], acc.astype(dh_ref.dtype), mask=jnp.broadcast_to(d_ok_c, (p.br, p.bd))
    )


def _sparse_dw_kernel(cnt_ref, idx_ref, h_ref, dz_ref, _dw_in_ref, dw_ref, *, st, p: Plan):
    """``d_weight[d-tile, v-tile] += sum over flagged row tiles of h^T @ dz`` (in place;
    a tile no row block flagged is not touched)."""
    k, j = pl.program_id(0), pl.program_id(1)
    d0, v0 = k * p.bd, j * p.bv
    v, hid = st.loss.n_classes, st.hidden
    cdt = jnp.dtype(st.compute_dtype)
    d_ok_c = cm.col_ids((1, p.bd), d0) < hid
    v_ok_c = cm.col_ids((1, p.bv), v0) < v
    n = cnt_ref[j]

    def body(t, acc):
        r0 = idx_ref[j, t] * p.br
        rows = pl.ds(r0, p.br)
        h = plgpu.load(
            h_ref.at[rows, pl.ds(d0, p.bd)], mask=jnp.broadcast_to(d_ok_c, (p.br, p.bd)), other=0
        ).astype(cdt)
        dz = plgpu.load(
            dz_ref.at[rows, pl.ds(v0, p.bv)], mask=jnp.broadcast_to(v_ok_c, (p.br, p.bv)), other=0
        ).astype(cdt)
        a, b = (dz, h) if st.vocab_major else (h, dz)
        return acc + jax.lax.dot_general(a, b, cm.TN, preferred_element_type=jnp.float32)

    shape = (p.bv, p.bd) if st.vocab_major else (p.bd, p.bv)
    acc = jax.lax.fori_loop(0, n, body, jnp.zeros(shape, jnp.float32))

    @pl.when(n > 0)
    def _update():
        if st.vocab_major:
            idx = (pl.ds(v0, p.bv), pl.ds(d0, p.bd))
            mask = (cm.row_ids((p.bv, 1), v0) < v) & d_ok_c
        else:
            idx = (pl.ds(d0, p.bd), pl.ds(v0, p.bv))
            mask = (cm.row_ids((p.bd, 1), d0) < hid) & v_ok_c
        old = plgpu.load(dw_ref.at[idx], mask=mask, other=0.0).astype(jnp.float32)
        plgpu.store(dw_ref.at[idx], (old + acc).astype(dw_ref.dtype), mask=mask)


# ------------------------------------------------------------- pallas_call wrappers


def _stats_call(z, linear_bias, labels, *, st, p: Plan, interpret):
    """``(loss, lse)`` of one chunk of logits, each ``(chunk, 1)``."""
    c = z.shape[0]
    acc = _acc(st)
    parts = pl.pallas_call(
        functools.partial(_stats_kernel, st=st, p=p),
        grid=(c // p.sr, p.splits),
        out_shape=[jax.ShapeDtypeStruct((c, p.splits), acc)] * 4,
        compiler_params=cm.gpu_params(p.sr * p.sc),
        interpret=interpret,
        name="jsoftmax_linear_cross_entropy_stats",
    )(z, *([linear_bias] if st.has_bias else []), labels)
    m, s, zy, zsum = parts
    # Merge the vocabulary splits (an empty split has max -inf and sum 0).
    m_all = jnp.max(m, axis=1, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
    s_all = jnp.sum(jnp.where(s > 0, s * jnp.exp(m - m_safe), 0.0), axis=1, keepdims=True)
    stats = (m_all, s_all, jnp.sum(zy, 1, keepdims=True), jnp.sum(zsum, 1, keepdims=True))
    return cm.ce_finish(stats, labels, st.loss)


def _grad_call(z, linear_bias, labels, lse, g, *, st, p: Plan, interpret):
    """``(dz in z's buffer, tile flags or None, bias partial sums or None)``."""
    c, v = z.shape
    grid = (c // p.br, cm.cdiv(v, p.bv))
    out_shape = [jax.ShapeDtypeStruct(z.shape, z.dtype)]
    if st.filter_eps is not None:
        out_shape.append(jax.ShapeDtypeStruct(grid, jnp.int32))
    if st.has_bias:
        out_shape.append(jax.ShapeDtypeStruct((grid[0], v), jnp.float32))
    out = pl.pallas_call(
        functools.partial(_grad_kernel, st=st, p=p),
        grid=grid,
        out_shape=out_shape,
        input_output_aliases={0: 0},
        compiler_params=cm.gpu_params(p.br * p.bv),
        interpret=interpret,
        name="jsoftmax_linear_cross_entropy_grad",
    )(z, *([linear_bias] if st.has_bias else []), labels, lse, g)
    dz, *rest = out
    flags = rest.pop(0) if st.filter_eps is not None else None
    db = rest.pop(0) if st.has_bias else None
    return dz, flags, db


def _gemm_params() -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=GEMM_WARPS, num_stages=GEMM_STAGES)


def _sparse_grads(h_c, dz, flags, linear_weight, dw, *, st, p: Plan, hidden_dtype, interpret):
    """``(d_hidden of the chunk, d_weight + this chunk's part)`` over flagged tiles only."""
    c = dz.shape[0]
    keep = flags > 0
    # Flagged tiles first, in order: per row block for d_hidden, per vocabulary tile for
    # d_weight; the kernels loop over the first `count` entries.
    cnt_rows = jnp.sum(keep, axis=1, dtype=jnp.int32)
    idx_rows = jnp.argsort(~keep, axis=1, stable=True).astype(jnp.int32)
    cnt_cols = jnp.sum(keep, axis=0, dtype=jnp.int32)
    idx_cols = jnp.argsort(~keep.T, axis=1, stable=True).astype(jnp.int32)
    dh = pl.pallas_call(
        functools.partial(_sparse_dh_kernel, st=st, p=p),
        grid=(c // p.br, cm.cdiv(st.hidden, p.bd)),
        out_shape=jax.ShapeDtypeStruct((c, st.hidden), hidden_dtype),
        compiler_params=_gemm_params(),
        interpret=interpret,
        name="jsoftmax_linear_cross_entropy_dh",
    )(cnt_rows, idx_rows, dz, linear_weight)
    dw = pl.pallas_call(
        functools.partial(_sparse_dw_kernel, st=st, p=p),
        grid=(cm.cdiv(st.hidden, p.bd), flags.shape[1]),
        out_shape=jax.ShapeDtypeStruct(dw.shape, dw.dtype),
        input_output_aliases={4: 0},
        compiler_params=_gemm_params(),
        interpret=interpret,
        name="jsoftmax_linear_cross_entropy_dw",
    )(cnt_cols, idx_cols, h_c, dz, dw)
    return dh, dw


# ---------------------------------------------------------------------- chunk loops


def _logits(h_c, linear_weight, st):
    """One chunk's logits ``h_c @ W`` in the compute dtype (an XLA dot: cuBLAS on GPU)."""
    dims = cm.NT if st.vocab_major else cm.NN
    cdt = jnp.dtype(st.compute_dtype)
    return jax.lax.dot_general(h_c, linear_weight, dims, preferred_element_type=cdt)


def _dense_grads(h_c, dz, linear_weight, dw, st, hidden_dtype):
    """XLA dots: ``d_hidden`` of the chunk and ``d_weight + h_c^T dz`` (beta = 1 GEMM)."""
    # The update is rounded to the weight's dtype before the add: XLA then fuses the add
    # into the GEMM's epilogue (an float32 update would be a (D, V) float32 buffer).
    if st.vocab_major:  # W (V, D): dh = dz W, dW += dz^T h
        dh = jax.lax.dot_general(dz, linear_weight, cm.NN, preferred_element_type=hidden_dtype)
        upd = jax.lax.dot_general(dz, h_c, cm.TN, preferred_element_type=dw.dtype)
    else:  # W (D, V): dh = dz W^T, dW += h^T dz
        dh = jax.lax.dot_general(dz, linear_weight, cm.NT, preferred_element_type=hidden_dtype)
        upd = jax.lax.dot_general(h_c, dz, cm.TN, preferred_element_type=dw.dtype)
    return dh, dw + upd


def _chunked(x, p: Plan, fill):
    """``(n, ...)`` -> ``(n_chunks, chunk, ...)``, padded with ``fill`` rows."""
    pad = p.n_chunks * p.chunk - x.shape[0]
    if pad:
        x = jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], fill, x.dtype)])
    return x.reshape((p.n_chunks, p.chunk) + x.shape[1:])


def _setup(hidden, linear_weight, linear_bias, st, cfg):
    cdt = jnp.dtype(st.compute_dtype)
    p = plan(st, cfg, cdt.itemsize)
    problem = blocks_problem(p.br, p.bv, p.bd, cdt.itemsize)
    if problem is not None:
        if cfg.backend == "gpu":  # this style was asked for: fail now
            raise ValueError(problem)
        hidden = _tile_error_p.bind(hidden, message=problem)
    b = None if linear_bias is None else linear_bias.reshape(1, -1)
    return p, hidden.astype(cdt), linear_weight.astype(cdt), b


def forward(hidden, linear_weight, linear_bias, labels, *, st, cfg, interpret):
    """Per-row ``(loss, lse)``, each ``(N, 1)``: one logits matmul and one read per chunk."""
    p, h, w, b = _setup(hidden, linear_weight, linear_bias, st, cfg)

    def body(_, xs):
        h_c, y_c = xs
        return None, _stats_call(_logits(h_c, w, st), b, y_c, st=st, p=p, interpret=interpret)

    xs = (_chunked(h, p, 0), _chunked(labels, p, st.loss.ignore_index))
    _, (loss, lse) = jax.lax.scan(body, None, xs)
    n = st.n_rows
    return loss.reshape(-1, 1)[:n], lse.reshape(-1, 1)[:n]


def _grads(hidden, linear_weight, linear_bias, labels, g, lse, *, st, cfg, interpret):
    """Gradients for per-row cotangents ``g``; ``lse=None`` computes it per chunk too
    (and returns the per-row loss), else it is the forward's."""
    p, h, w, b = _setup(hidden, linear_weight, linear_bias, st, cfg)
    hdt, wdt = hidden.dtype, linear_weight.dtype

    def body(carry, xs):
        dw, db = carry
        h_c, y_c, g_c, *lse_c = xs
        z = _logits(h_c, w, st)
        if lse is None:
            loss_c, lse_c = _stats_call(z, b, y_c, st=st, p=p, interpret=interpret)
        else:
            (lse_c,), loss_c = lse_c, None
        dz, flags, db_c = _grad_call(z, b, y_c, lse_c, g_c, st=st, p=p, interpret=interpret)
        if flags is None:
            dh_c, dw = _dense_grads(h_c, dz, w, dw, st, hdt)
        else:
            dh_c, dw = _sparse_grads(
                h_c, dz, flags, w, dw, st=st, p=p, hidden_dtype=hdt, interpret=interpret
            )
        if db is not None:
            db = db + jnp.sum(db_c, axis=0)
        return (dw, db), (dh_c, loss_c)

    xs = [
        _chunked(h, p, 0),
        _chunked(labels, p, st.loss.ignore_index),
        _chunked(g.reshape(-1, 1).astype(jnp.float32), p, 0),
    ]
    if lse is not None:
        xs.append(_chunked(lse, p, 0))
    db0 = jnp.zeros((st.loss.n_classes,), jnp.float32) if linear_bias is not None else None
    (dw, db), (dh, loss) = jax.lax.scan(body, (jnp.zeros(linear_weight.shape, wdt), db0), xs)
    n = st.n_rows
    dh = dh.reshape(-1, st.hidden)[:n]
    db = None if db is None else db.astype(linear_bias.dtype)
    loss = None if loss is None else loss.reshape(-1, 1)[:n]
    return loss, dh, dw, db


def backward(hidden, linear_weight, linear_bias, labels, lse, g, *, st, cfg, interpret):
    """``(d_hidden, d_weight, d_bias or None)`` for per-row cotangents ``g``: the logits
    of each chunk are recomputed (the fourth matmul of a per-row loss)."""
    kw = dict(st=st, cfg=cfg, interpret=interpret)
    _, dh, dw, db = _grads(hidden, linear_weight, linear_bias, labels, g, lse, **kw)
    return dh, dw, db


def fused(hidden, linear_weight, linear_bias, labels, row_weight, *, st, cfg, interpret):
    """``(per-row loss (N, 1), d_hidden, d_weight, d_bias)`` of ``sum_i row_weight_i l_i``
    in one sweep: three matmuls per token (the gradient of a scalar loss, in its forward)."""
    kw = dict(st=st, cfg=cfg, interpret=interpret)
    return _grads(hidden, linear_weight, linear_bias, labels, row_weight, None, **kw)

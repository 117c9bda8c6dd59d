"""Shared plumbing for the Pallas kernels: configuration, block sizes, backend dispatch,
and the per-tile cross-entropy math used by both cross-entropy kernels.

Every kernel in this package exists in two styles that share their per-tile math:

* **Mosaic TPU style** -- a grid ``(row_blocks, ..., col_blocks)`` whose column axis is
  ``"arbitrary"`` (sequential), running statistics in VMEM scratch, ragged edge tiles
  masked with ``broadcasted_iota`` against the true width. Blocks respect the (8, 128)
  vector tile (16 rows for 16-bit dtypes).
* **Triton GPU style** -- a grid over row blocks, a ``lax.fori_loop`` over column chunks
  inside the kernel, masked ``plgpu.load``/``plgpu.store`` on ``ref.at[pl.ds(...)]``
  windows; every tile is a power of two (Triton's requirement).

:func:`dispatch` picks one per platform with ``jax.lax.platform_dependent`` so a single
traced function lowers to Mosaic for ``tpu`` and to Triton for ``cuda``/``rocm``; on any
other platform (CPU) the Mosaic-style kernel runs in Pallas' interpreter.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from jsoftmax import _compat
from jsoftmax import _numerics as num
from jsoftmax import _validate as check
from jsoftmax._compat import plgpu

BACKENDS = ("tpu", "gpu")

# --------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class Config:
    """Static (hashable) kernel options, carried through ``custom_vjp`` as a nondiff arg.

    ``backend`` forces one kernel style (``"tpu"`` or ``"gpu"``) regardless of the
    platform; ``None`` (the public default) dispatches per platform. Forcing a style
    with ``interpret=True`` is how the tests check both styles' numerics on CPU.
    """

    block_rows: int | None = None
    block_cols: int | None = None
    block_d: int | None = None
    interpret: bool | None = None
    backend: str | None = None


def make_config(
    block_rows: Any = None,
    block_cols: Any = None,
    block_d: Any = None,
    interpret: Any = None,
    backend: str | None = None,
) -> Config:
    """Validate the user-facing kernel keywords and bundle them into a :class:`Config`."""
    blocks = {
        name: check.static_int(value, name, minimum=1, optional=True)
        for name, value in (
            ("block_rows", block_rows),
            ("block_cols", block_cols),
            ("block_d", block_d),
        )
    }
    if interpret is not None and not isinstance(interpret, (bool, np.bool_)):
        raise TypeError(f"`interpret` must be True, False or None, got {interpret!r}.")
    check.choice(backend, "backend", (*BACKENDS, None))
    return Config(
        **blocks,
        interpret=None if interpret is None else bool(interpret),
        backend=backend,
    )


def check_labels(labels: Any, n_rows: int) -> jax.Array:
    """Integer labels of shape ``(n_rows,)``, returned as an ``(n_rows, 1)`` int32 column."""
    labels = check.integer_labels(labels, (n_rows,))
    return labels.astype(jnp.int32).reshape(n_rows, 1)


def check_loss_options(
    ignore_index: Any, label_smoothing: Any, z_loss: Any
) -> tuple[int, float, float]:
    """Static cross-entropy hyperparameters (Python numbers; they shape the kernel)."""
    return (
        check.ignore_index(ignore_index),
        check.static_number(label_smoothing, "label_smoothing", lo=0.0, hi=1.0),
        check.static_number(z_loss, "z_loss", lo=0.0),
    )


# ----------------------------------------------------------------------- block sizes


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def next_pow2(a: int) -> int:
    return 1 << max(0, int(a) - 1).bit_length()


def sublanes(dtype: Any) -> int:
    """Rows of one TPU vector tile: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit dtypes."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def tpu_block(n: int, requested: int | None, default: int, align: int) -> int:
    """A Mosaic-legal block along a dimension of size ``n``.

    Mosaic needs the two minor block dimensions to be multiples of the vector tile
    (``align``) or equal to the whole dimension; a requested size is rounded up to
    ``align`` and a block that would cover ``n`` becomes exactly ``n``.
    """
    b = round_up(default if requested is None else requested, align)
    return n if b >= n else b


def gpu_block(n: int, requested: int | None, default: int, minimum: int = 1) -> int:
    """A Triton-legal (power-of-two) block along a dimension of size ``n``.

    Never larger than ``n`` rounded up to a power of two (so a 3-row input does not get a
    64-row tile), never smaller than ``minimum`` (16 where ``tl.dot`` needs it).
    """
    b = next_pow2(default if requested is None else requested)
    return max(minimum, min(b, next_pow2(n)))


def gpu_num_warps(tile_elems: int) -> int:
    """Warps for a Triton program streaming ``tile_elems`` elements per step.

    About 8-16 elements per thread keeps the tile in registers without spilling.
    """
    return int(min(16, max(4, tile_elems // 512)))


# Row-wise kernels (softmax, cross-entropy). A TPU block holds 256k elements (1 MiB in
# float32): with double-buffered inputs and output that is a few MiB of VMEM, inside the
# 16 MiB default scoped limit of every TPU generation.
TPU_BLOCK_ELEMS = 1 << 18
# Rows up to this many columns are one column block (the forward is then single-pass).
TPU_SINGLE_PASS_COLS = 8192
TPU_COL_BLOCK = 2048
# Elements per Triton program step; rows up to this long stay in registers (one pass).
GPU_TILE_ELEMS = 8192
# Short rows are stacked until a program streams at least this many elements.
GPU_MIN_TILE = 2048


def tpu_row_blocks(n: int, c: int, dtype: Any, block_rows: int | None, block_cols: int | None):
    """``(block_rows, block_cols)`` for a row-wise Mosaic kernel on an ``(n, c)`` input."""
    default_cols = c if c <= TPU_SINGLE_PASS_COLS else TPU_COL_BLOCK
    bc = tpu_block(c, block_cols, default_cols, 128)
    sub = sublanes(dtype)
    default_rows = max(sub, min(1024, TPU_BLOCK_ELEMS // round_up(bc, 128)))
    return tpu_block(n, block_rows, default_rows, sub), bc


def gpu_row_blocks(n: int, c: int, block_rows: int | None, block_cols: int | None):
    """``(block_rows, block_cols)`` (powers of two) for a row-wise Triton kernel."""
    bc = gpu_block(c, block_cols, GPU_TILE_ELEMS)
    br = gpu_block(n, block_rows, max(1, GPU_MIN_TILE // bc))
    return br, bc


def tpu_params(*semantics: str) -> pltpu.CompilerParams:
    return pltpu.CompilerParams(dimension_semantics=semantics)


def gpu_params(tile_elems: int, num_stages: int = 1) -> plgpu.CompilerParams:
    # Passing Triton's params is what selects the Triton lowering over Mosaic GPU.
    return plgpu.CompilerParams(num_warps=gpu_num_warps(tile_elems), num_stages=num_stages)


# ------------------------------------------------------------ compiler limits (checked)
#
# Limits of the device compilers, found by compiling for each target with the real
# compilers (jsoftmax.kernels._aot; the `aot` tests re-check that each refused block
# configuration is indeed rejected by the compiler). A block configuration that breaks
# one is refused with a ValueError at trace time, before the compiler is reached.

# Triton verifies every tensor against this ("Maximum allowed number of elements is
# 1048576"), on every GPU.
TRITON_MAX_ELEMENTS = 1 << 20


@dataclasses.dataclass(frozen=True)
class TpuLimits:
    """Scoped VMEM a Mosaic kernel may allocate (blocks, their double buffers, scratch)."""

    name: str
    vmem: int


@dataclasses.dataclass(frozen=True)
class GpuLimits:
    """Shared memory one Triton program may use (the per-block opt-in maximum)."""

    name: str
    shared_memory: int


MIB = 2**20
# Scoped VMEM limit per generation, keyed by jax's device_kind. v5e/v5p/v6e report it in
# their errors ("Scoped allocation with size 16.12M and limit 16.00M"; 32.00M on v6e);
# v4 has 16 MiB of VMEM per TensorCore in all ("Used 20.36M of 16.00M vmem").
TPU_LIMITS = {
    "TPU v4": TpuLimits("TPU v4", 16 * MIB),
    "TPU v5 lite": TpuLimits("TPU v5e", 16 * MIB),
    "TPU v5": TpuLimits("TPU v5p", 16 * MIB),
    "TPU v6 lite": TpuLimits("TPU v6e", 32 * MIB),
}
# Shared memory per block with opt-in, by compute capability (CUDA C++ Programming
# Guide, "Technical Specifications per Compute Capability"); the compiler reports the
# same number ("Shared memory size limit exceeded: requested 196608, available: 166912").
GPU_LIMITS = {
    (8, 0): GpuLimits("sm_80 (A100)", 166912),
    (8, 6): GpuLimits("sm_86", 101376),
    (8, 7): GpuLimits("sm_87", 166912),
    (8, 9): GpuLimits("sm_89", 101376),
    (9, 0): GpuLimits("sm_90 (H100)", 232448),
}
# The most restrictive *supported* target of each backend (those of the compile matrix:
# TPU v4/v5e/v5p/v6e, A100/H100), used when the device is not known at trace time.
TPU_MOST_RESTRICTIVE = TpuLimits("TPU v4/v5e/v5p (most restrictive supported TPU)", 16 * MIB)
GPU_MOST_RESTRICTIVE = GpuLimits("A100 (most restrictive supported GPU)", 166912)

_ACCELERATOR = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}


@functools.cache
def limits(style: str) -> TpuLimits | GpuLimits | None:
    """The limits that compiled kernels of ``style`` (``"tpu"``/``"gpu"``) are checked against.

    The target generation is not known at trace time on every path: ``jax.jit`` traces
    every branch of ``lax.platform_dependent``, and a program lowered from a CPU host
    (``lower(lowering_platforms=...)``, ahead-of-time compilation) may be compiled for
    any generation. So:

    * on a host whose JAX backend is this style's accelerator: that device's limits
      (from ``device_kind`` / ``compute_capability``; an unknown generation gets the
      most restrictive supported one);
    * on a host without an accelerator (CPU): the most restrictive supported target of
      the style, since the call may be lowered for any of them;
    * on a host with the *other* accelerator: ``None`` -- not checked (that branch is
      only traced, not compiled, unless the program is explicitly lowered for the
      other platform, in which case its compiler reports any violation).
    """
    host = _ACCELERATOR.get(jax.default_backend())
    fallback = TPU_MOST_RESTRICTIVE if style == "tpu" else GPU_MOST_RESTRICTIVE
    if host is None:
        return fallback
    if host != style:
        return None
    device = jax.devices()[0]
    if style == "tpu":
        return TPU_LIMITS.get(getattr(device, "device_kind", ""), fallback)
    try:
        major, minor = (int(p) for p in str(device.compute_capability).split(".")[:2])
    except (AttributeError, ValueError):
        return fallback
    return GPU_LIMITS.get((major, minor), fallback)


def _padded_bytes(shape: tuple[int, ...], dtype: Any) -> int:
    """Bytes of a VMEM buffer: the two minor dims padded to the (sublanes, 128) tile."""
    *major, rows, cols = (1, *shape) if len(shape) == 1 else shape
    size = round_up(rows, sublanes(dtype)) * round_up(cols, 128) * jnp.dtype(dtype).itemsize
    return int(np.prod(major, dtype=np.int64)) * size


def _describe(blocks: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in blocks.items())


def check_tpu_vmem(
    kernel: str,
    blocks: dict[str, int],
    buffers: list[tuple[tuple[int, ...], Any, tuple[int, ...]]],
    scratch: list[tuple[tuple[int, ...], Any]],
    interpret: bool,
) -> None:
    """Refuse blocks whose VMEM *lower bound* exceeds the scoped VMEM limit.

    The bound counts what Mosaic must allocate before any temporary: every pipelined
    block (``buffers``: ``(block shape, dtype, array shape)`` of inputs and outputs)
    twice (double buffering) -- once when the block is the whole array (its index never
    changes: measured, such a block is not double-buffered) -- plus the scratch, each
    padded to the vector tile. The compiler's temporaries (about one float32 tile) come
    on top, so a configuration under the bound may still be refused by the compiler; one
    over it never compiles.
    """
    lim = None if interpret else limits("tpu")
    if lim is None:
        return
    need = sum(
        (1 if tuple(s) == tuple(full) else 2) * _padded_bytes(s, d) for s, d, full in buffers
    )
    need += sum(_padded_bytes(s, d) for s, d in scratch)
    if need > lim.vmem:
        raise ValueError(
            f"{kernel}: blocks ({_describe(blocks)}) need at least {need / MIB:.2f} MiB of "
            f"TPU VMEM (double-buffered blocks plus scratch), above the {lim.vmem / MIB:.0f} "
            f"MiB scoped VMEM limit of {lim.name}. Use smaller blocks (or None)."
        )


def check_triton(
    kernel: str, blocks: dict[str, int], tiles: list[tuple[int, ...]], interpret: bool
) -> None:
    """Refuse tiles Triton rejects: more than 2^20 elements per tensor.

    (The shared memory of pipelined matmul tiles is checked by the GPU linear
    cross-entropy itself, when it is lowered for CUDA.)
    """
    lim = None if interpret else limits("gpu")
    if lim is None:
        return
    for tile in tiles:
        if int(np.prod(tile)) > TRITON_MAX_ELEMENTS:
            raise ValueError(
                f"{kernel}: blocks ({_describe(blocks)}) make a {tile[0]}x{tile[1]} tile of "
                f"{int(np.prod(tile))} elements; Triton allows at most {TRITON_MAX_ELEMENTS} "
                "(2^20) elements per tensor. Use smaller blocks (or None)."
            )


# --------------------------------------------------------------------- sharded inputs
#
# A pallas_call has no partitioning rule: under jax.jit with sharded operands the
# partitioner would replicate them (gather the whole logits or head onto every device),
# and in explicit mode pallas_call refuses non-manual mesh axes. So where an operand's
# type carries an explicit sharding, the kernel runs per row shard inside shard_map. The
# spec is read through jsoftmax._compat, the JAX-version shim the kernels already import
# (explicit sharding types exist only on newer JAX); nothing else of jsoftmax/ is needed.

CLASS_SHARDED = (
    "{kernel}: `{name}` is sharded over mesh axes {axes} along a dimension the kernel "
    "needs whole ({what}): the kernels have no cross-shard logsumexp. Shard only the rows "
    "(e.g. PartitionSpec('data', None)), or use jsoftmax's impl='xla', which partitions "
    "the class axis without gathering it."
)
HEAD_SHARDED = (
    "{kernel}: `linear_weight` is sharded over mesh axes {axes} on its {what}: the "
    "kernel needs the whole head on every device (no cross-shard logsumexp, no FSDP "
    "gather). Replicate the head and shard the tokens, or use "
    "jsoftmax.linear_cross_entropy(impl='xla'), which runs vocabulary-parallel and "
    "gathers an FSDP head one chunk at a time."
)


entry_axes = _compat.entry_axes


def row_sharding(kernel: str, whole: dict[str, Any], rows_of: dict[str, Any]):
    """``(mesh, rows)`` for a row-wise kernel on explicitly sharded inputs, or ``None``.

    ``whole`` maps names to 2-D ``(rows, cols)`` operands whose columns the kernel needs
    whole, ``rows_of`` to ``(rows,)`` operands; ``rows`` is the spec entry of the row
    dimension (taken from the first sharded operand; the others are resharded to it).
    Raises ``ValueError`` where a column dimension is sharded.
    """
    found = None
    for name, x in whole.items():
        got = None if x is None else _compat.explicit_spec(x)
        if got is None:
            continue
        if got[1][1] is not None:
            what = "the hidden dimension D" if name == "hidden" else "the class axis"
            raise ValueError(
                CLASS_SHARDED.format(
                    kernel=kernel, name=name, axes=entry_axes(got[1][1]), what=what
                )
            )
        found = found or got
    for x in rows_of.values():
        got = None if x is None else _compat.explicit_spec(x)
        found = found or got
    if found is None:
        return None
    mesh, spec = found
    rows = spec[0]
    n = next(iter(whole.values())).shape[0]
    shards = int(np.prod([mesh.shape[a] for a in entry_axes(rows)]))
    if n % shards:
        raise ValueError(
            f"{kernel}: {n} rows are not divisible by their {shards} shards (mesh axes "
            f"{entry_axes(rows)}): each device must hold an equal slice."
        )
    return mesh, rows


def per_row_shard(mesh: Any, fn: Callable[..., Any], args: tuple, in_specs: tuple, out_specs):
    """``fn(*args)`` on each row shard, under ``shard_map`` over ``mesh``.

    ``None`` arguments are closed over; the others are first resharded to ``in_specs``
    (a no-op where they already have it; otherwise the partitioner's cheapest move of
    the small row operands, never of a whole-column operand, which the caller checked).
    """
    # check_vma=False: a pallas_call's out_shape carries no varying-axes type (JAX asks
    # for one under check_vma=True). Without the check, shard_map's transpose sums the
    # cotangents of replicated inputs (the head) over the row shards itself.
    return _compat.shard_map_args(fn, mesh, args, in_specs, out_specs, check_vma=False)


def rows_spec(rows: Any, extra: int = 0) -> P:
    """The spec of a row-major operand with ``extra`` trailing unsharded dimensions."""
    return P(rows, *([None] * extra))


# --------------------------------------------------------------------------- dispatch


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def dispatch(cfg: Config, tpu: Callable[..., Any], gpu: Callable[..., Any], *args: Any) -> Any:
    """Run ``tpu(*args, interpret=...)`` or ``gpu(*args, interpret=...)`` by platform.

    * ``cfg.backend`` set: that style only; ``interpret=None`` then means "interpret
      when the default backend is CPU" (decided at trace time).
    * ``interpret=True``: the Mosaic-style kernel in the interpreter, on any platform.
    * ``interpret=None``: compiled Mosaic on TPU, compiled Triton on CUDA/ROCm, the
      Mosaic-style kernel in the interpreter anywhere else -- chosen at lowering time,
      so cross-platform lowering from a CPU host picks the right kernel.
    * ``interpret=False``: compiled everywhere; on CPU this fails at lowering with
      Pallas' own "interpret mode only" error.
    """
    if cfg.backend is not None:
        fn = tpu if cfg.backend == "tpu" else gpu
        interpret = _on_cpu() if cfg.interpret is None else cfg.interpret
        return fn(*args, interpret=interpret)
    if cfg.interpret:
        return tpu(*args, interpret=True)
    compiled_tpu = functools.partial(tpu, interpret=False)
    compiled_gpu = functools.partial(gpu, interpret=False)
    default = functools.partial(tpu, interpret=True) if cfg.interpret is None else compiled_gpu
    return jax.lax.platform_dependent(
        *args, tpu=compiled_tpu, cuda=compiled_gpu, rocm=compiled_gpu, default=default
    )


# ------------------------------------------------------------------ in-kernel helpers


def col_ids(shape: tuple[int, ...], start: Any) -> jax.Array:
    """Global column index of every element of a tile whose first column is ``start``."""
    return start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)


def row_ids(shape: tuple[int, ...], start: Any) -> jax.Array:
    """Global row index of every element of a tile whose first row is ``start``."""
    return start + jax.lax.broadcasted_iota(jnp.int32, shape, 0)


def online_update(m: jax.Array, s: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Fold a tile ``x`` (invalid entries already ``-inf``) into running ``(max, sum-exp)``.

    One ``exp`` per element: the tile is summed relative to its own max, then merged
    with :func:`jsoftmax._numerics.online_combine` (a few per-row ``exp`` s).
    """
    mb = jnp.max(x, axis=1, keepdims=True)
    mb_safe = jnp.where(mb == -jnp.inf, 0.0, mb)
    sb = jnp.sum(jnp.exp(x - mb_safe), axis=1, keepdims=True)
    return num.online_combine(m, s, mb, sb)


def safe_lse(m: jax.Array, s: jax.Array) -> jax.Array:
    """``logsumexp`` from running stats, with an empty row (all ``-inf``) giving 0.

    Every entry of an empty row is ``-inf``, so ``x - 0`` is still ``-inf`` and
    ``exp(x - 0)`` is exactly 0: softmax rows of zeros, log-softmax rows of ``-inf``,
    with no ``-inf - -inf``. (A ``+inf`` entry gives ``lse = +inf`` and NaN at that entry:
    ``+inf`` logits are not supported by the kernels.)
    """
    lse = num.finish_logsumexp(m, s)
    return jnp.where(lse == -jnp.inf, 0.0, lse)


# ----------------------------------------------- per-tile cross-entropy math (shared)


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """Static cross-entropy hyperparameters shared by both cross-entropy kernels."""

    n_classes: int
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0


def ce_init(acc: Any, n: int) -> tuple[jax.Array, ...]:
    """Initial running stats ``(max, sum-exp, label logit, logit sum)`` for ``n`` rows."""
    return (
        jnp.full((n, 1), -jnp.inf, acc),
        jnp.zeros((n, 1), acc),
        jnp.zeros((n, 1), acc),
        jnp.zeros((n, 1), acc),
    )


def ce_update(
    stats: tuple[jax.Array, ...],
    z: jax.Array,
    labels: jax.Array,
    cols: jax.Array,
    valid: jax.Array,
    opts: LossOptions,
) -> tuple[jax.Array, ...]:
    """Fold one logits tile into the cross-entropy running stats.

    ``z`` is the float tile, ``cols`` its global column ids, ``valid`` marks real
    (non-padding) columns; ``labels`` is the ``(rows, 1)`` label column. The label logit
    is picked with a compare-and-sum (no gather, no one-hot in memory); the logit sum is
    only kept when label smoothing needs it.
    """
    m, s, zy, zsum = stats
    z = jnp.where(valid, z, -jnp.inf)
    m, s = online_update(m, s, z)
    zy = zy + jnp.sum(jnp.where(cols == labels, z, 0.0), axis=1, keepdims=True)
    if opts.label_smoothing > 0.0:
        zsum = zsum + jnp.sum(jnp.where(valid, z, 0.0), axis=1, keepdims=True)
    return m, s, zy, zsum


def ce_finish(
    stats: tuple[jax.Array, ...], labels: jax.Array, opts: LossOptions
) -> tuple[jax.Array, jax.Array]:
    """Per-row ``(loss, lse)`` from the running stats.

    ``loss = (1-ε)(lse - z_y) + ε(lse - mean_c z_c) + λ lse²`` (PyTorch's unweighted
    smoothing plus PaLM's z-loss); 0 where ``labels == ignore_index``; NaN where the
    label is outside ``[0, C)`` (bad input must not give a plausible number). A label on
    a ``-inf`` logit costs ``+inf`` (also in an all ``-inf`` row, where ``lse - z_y``
    would otherwise be NaN).
    """
    m, s, zy, zsum = stats
    lse = num.finish_logsumexp(m, s)
    nll = jnp.where(zy == -jnp.inf, jnp.inf, lse - zy)
    loss = nll
    eps, lam = opts.label_smoothing, opts.z_loss
    if eps > 0.0:
        zmean = zsum / opts.n_classes
        smooth = jnp.where(zmean == -jnp.inf, jnp.inf, lse - zmean)
        loss = (1.0 - eps) * nll + eps * smooth
    if lam > 0.0:
        loss = loss + lam * lse * lse
    in_range = (labels >= 0) & (labels < opts.n_classes)
    loss = jnp.where(in_range, loss, jnp.nan)
    loss = jnp.where(labels == opts.ignore_index, 0.0, loss)
    return loss, lse


def ce_row_scale(g: jax.Array, labels: jax.Array, opts: LossOptions) -> jax.Array:
    """The per-row factor of the logits gradient: the cotangent, 0 at ignored rows, NaN
    at out-of-range labels (the loss there is NaN, so its gradient is poisoned too)."""
    in_range = (labels >= 0) & (labels < opts.n_classes)
    g = jnp.where(in_range, g, jnp.nan)
    return jnp.where(labels == opts.ignore_index, 0.0, g)


def ce_grad(
    z: jax.Array,
    lse: jax.Array,
    labels: jax.Array,
    scale: jax.Array,
    cols: jax.Array,
    valid: jax.Array,
    opts: LossOptions,
) -> jax.Array:
    """Gradient of the per-row loss w.r.t. one logits tile, times the row ``scale``.

    ``dL/dz_c = p_c (1 + 2λ lse) - (1-ε)[c = y] - ε/C`` with ``p_c = exp(z_c - lse)``;
    padding columns get exactly 0. An empty row (``lse = -inf``) has ``p = 0`` and a
    finite gradient.
    """
    lse_safe = jnp.where(lse == -jnp.inf, 0.0, lse)
    p = jnp.exp(jnp.where(valid, z, -jnp.inf) - lse_safe)
    if opts.z_loss > 0.0:
        p = p * (1.0 + 2.0 * opts.z_loss * lse_safe)
    d = p - jnp.where(cols == labels, 1.0 - opts.label_smoothing, 0.0)
    if opts.label_smoothing > 0.0:
        d = d - opts.label_smoothing / opts.n_classes
    return jnp.where(valid, d * scale, 0.0)


# ------------------------------------------- linear cross-entropy tiles (shared)

# dot_general dimension numbers: (m, k) x (k, n), (m, k) x (n, k), (k, m) x (k, n).
NN = (((1,), (0,)), ((), ()))
NT = (((1,), (1,)), ((), ()))
TN = (((0,), (0,)), ((), ()))


def softcap(z: jax.Array, cap: float | None) -> jax.Array:
    """``cap·tanh(z/cap)`` (Gemma 2's logit soft-capping); ``z`` itself when ``cap`` is None."""
    return z if cap is None else cap * jnp.tanh(z / cap)


def softcap_grad(dz: jax.Array, capped: jax.Array, cap: float | None) -> jax.Array:
    """``dz`` times ``d(cap·tanh(u/cap))/du = 1 - (capped/cap)²``, from the capped logits."""
    return dz if cap is None else dz * (1.0 - jnp.square(capped / cap))


def filter_keep(
    d: jax.Array,
    labels: jax.Array,
    scale: jax.Array,
    valid: jax.Array,
    col_start: Any,
    block_cols: int,
    eps: float,
) -> jax.Array:
    """Whether a ``(rows, cols)`` gradient tile must be applied, as a ``(1, 1)`` float 0/1.

    ``d`` is the unscaled logits gradient ``p(1 + 2λ lse) - target`` of the tile and
    ``scale`` the per-row factor (0 at ignored rows, NaN at bad labels). The tile may be
    skipped only when, over its active rows (``scale != 0``), every ``|d| < eps`` *and*
    no row's label lies in the tile's columns (a label's own term is never dropped) *and*
    no row is poisoned (NaN). ``~(|d| < eps)`` keeps NaN entries.
    """
    active = scale != 0
    big = active & valid & ~(jnp.abs(d) < eps)
    in_tile = (labels >= col_start) & (labels < col_start + block_cols)
    row_flag = active & (in_tile | jnp.isnan(scale))
    hit = jnp.maximum(
        jnp.max(jnp.where(big, 1.0, 0.0), axis=1, keepdims=True), jnp.where(row_flag, 1.0, 0.0)
    )
    return jnp.max(hit, axis=0, keepdims=True)

"""Per-tile math of the chunked vocabulary sweeps: the static configuration, one tile's
logits and gradients, the chunk loop and the online-logsumexp rescaling.

Everything here works on one ``(rows, chunk)`` tile or on per-row statistics; the
sweeps that use it are in ``_core.py`` (forward, backward), ``_filter.py`` (the
filtered backward) and ``jsoftmax/_distill.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax import lax

# Bytes of one float32 logits tile (rows x cols) when `chunk_size` is None: large
# enough that each matmul keeps both cores busy, small next to the naive (N, V)
# logits (e.g. 512 MiB at N=2048, V=65536). Three or four such tiles are live at once.
_TILE_BYTES = 16 * 2**20


_MIN_CHUNK = 128


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
    # Mesh axes over which the weight's D dimension is sharded (FSDP), inside a
    # shard_map the library placed itself: each chunk is all-gathered on use and its
    # gradient reduce-scattered back, so no more than one chunk of the head is whole.
    fsdp_axes: Any = None

    @property
    def vocab_axis(self) -> int:
        return 1 if self.layout == "dv" else 0

    @property
    def model_axis(self) -> int:
        return 0 if self.layout == "dv" else 1


def _vocab_slice(arr, cfg, start, size):
    """Columns ``[start, start + size)`` of a per-vocabulary array (weight, bias, ...)."""
    if arr is None:
        return None
    axis = cfg.vocab_axis if arr.ndim == 2 else 0
    if isinstance(start, int) and start == 0 and size == arr.shape[axis]:
        return arr
    return lax.dynamic_slice_in_dim(arr, start, size, axis)


def _weight_chunk(w, cfg, start, size):
    """The weight's chunk ``[start, start + size)`` with its whole D dimension.

    Under FSDP (``cfg.fsdp_axes``) this device holds a D-slice: the chunk is
    all-gathered over those axes, one ``(D, chunk)`` block at a time.
    """
    w_c = _vocab_slice(w, cfg, start, size)
    if cfg.fsdp_axes is None:
        return w_c
    return lax.all_gather(w_c, cfg.fsdp_axes, axis=cfg.model_axis, tiled=True)


def _weight_grad_chunk(dw_c, cfg):
    """A chunk's whole-D weight gradient, brought back to this device's D-slice.

    Under FSDP the tokens of every device reach every D-slice: one reduce-scatter sums
    the devices' contributions and leaves each its own slice (the FSDP backward).
    """
    if cfg.fsdp_axes is None:
        return dw_c
    return lax.psum_scatter(dw_c, cfg.fsdp_axes, scatter_dimension=cfg.model_axis, tiled=True)


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


def _label_logits(z, y_local, start, size):
    """The tile's logits at each row's label: ``(rows,)``, or ``(rows, k)`` for ``k``
    label columns per row (a sparse teacher's indices); 0 where outside the tile."""
    if y_local.ndim == 1:
        return jnp.sum(jnp.where(_label_hits(y_local, start, size), z, 0.0), axis=1)
    j = y_local - start
    vals = jnp.take_along_axis(z, jnp.clip(j, 0, size - 1), axis=1)
    return jnp.where((j >= 0) & (j < size), vals, 0.0)


def _add_label_cotangent(dz, y_local, g, start, size):
    """``dz`` plus the cotangent ``g`` of :func:`_label_logits` (same shapes as it)."""
    if y_local.ndim == 1:
        return dz + jnp.where(_label_hits(y_local, start, size), g[:, None], 0.0)
    j = y_local - start
    rows = lax.broadcasted_iota(jnp.int32, j.shape, 0)
    return dz.at[rows, jnp.clip(j, 0, size - 1)].add(jnp.where((j >= 0) & (j < size), g, 0.0))


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


def _scaled(x, cfg):
    """``x / T``; the identity when the temperature is the default 1."""
    return x if cfg.temperature == 1.0 else x / cfg.temperature


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


def _default_chunk(n_rows: int, v_local: int) -> int:
    """Vocabulary chunk so that one float32 ``(n_rows, chunk)`` tile is ~``_TILE_BYTES``."""
    chunk = _TILE_BYTES // (4 * max(n_rows, 1))
    chunk = max(_MIN_CHUNK, chunk // _MIN_CHUNK * _MIN_CHUNK)
    return min(chunk, v_local)

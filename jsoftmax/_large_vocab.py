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
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _compat
from jsoftmax import _numerics as num
from jsoftmax._checks import label_check

_LAYOUTS = ("dv", "vd")
_IMPLS = ("auto", "xla", "pallas")

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


def _global_stats(cfg, m, s, zy, zw):
    """Combine per-shard ``(max, sum-exp, z_y, Σ w z)`` over the vocabulary axis.

    One ``pmax`` for the max, then a single stacked ``psum`` of the rescaled sums and
    the two additive statistics (only the owning shard has a nonzero ``z_y``).
    """
    if cfg.axis_name is None:
        return m, s, zy, zw
    m_all = lax.pmax(m, cfg.axis_name)
    m_safe = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
    s = jnp.where(s > 0, s * jnp.exp(jnp.where(s > 0, m - m_safe, 0.0)), 0.0)
    s, zy, zw = lax.psum(jnp.stack([s, zy, zw]), cfg.axis_name)
    return m_all, s, zy, zw


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


def _stats_forward(cfg, h, w, b, cw, y):
    """Per-token ``(lse, z_y, Σ_c w_c z_c)`` by an online logsumexp over vocab chunks."""
    n_rows = h.shape[0]
    v_local = w.shape[cfg.vocab_axis]
    acc = cfg.acc_dtype
    y_local = y - _shard_offset(cfg, v_local)

    def body(carry, start, size):
        m, s, zy, zw = carry
        z = _tile_logits(
            h, _vocab_slice(w, cfg, start, size), _vocab_slice(b, cfg, start, size), cfg
        )
        zy = zy + jnp.sum(jnp.where(_label_hits(y_local, start, size), z, 0.0), axis=1)
        if cfg.need_zw:
            cw_c = _vocab_slice(cw, cfg, start, size)
            zw = zw + (jnp.sum(z, axis=1) if cw_c is None else z @ cw_c.astype(acc))
        m_c = jnp.max(z, axis=1)
        s_c = jnp.sum(jnp.exp(z - jnp.where(jnp.isfinite(m_c), m_c, 0.0)[:, None]), axis=1)
        m, s = num.online_combine(m, s, m_c, s_c)
        return m, s, zy, zw

    zeros = jnp.zeros((n_rows,), acc)
    init = (jnp.full((n_rows,), -jnp.inf, acc), zeros, zeros, zeros)
    init = _as_varying(init, _vma(h, w, b, cw, y_local))
    m, s, zy, zw = _loop(v_local, cfg.chunk, body, init)
    m, s, zy, zw = _global_stats(cfg, m, s, zy, zw)
    return num.finish_logsumexp(m, s), zy, zw


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stats(cfg, h, w, b, cw, y):
    return _stats_forward(cfg, h, w, b, cw, y)


def _stats_fwd(cfg, h, w, b, cw, y):
    out = _stats_forward(cfg, h, w, b, cw, y)
    return out, (h, w, b, cw, y, out[0])


def _stats_bwd(cfg, res, cts):
    h, w, b, cw, y, lse = res
    g_lse, g_zy, g_zw = cts
    v_local = w.shape[cfg.vocab_axis]
    acc = cfg.acc_dtype
    y_local = y - _shard_offset(cfg, v_local)

    def body(carry, start, size):
        dh, dw, db, dcw = carry
        w_c = _vocab_slice(w, cfg, start, size)
        z = _tile_logits(h, w_c, _vocab_slice(b, cfg, start, size), cfg)
        dz = g_lse[:, None] * jnp.exp(z - lse[:, None])
        dz = dz + jnp.where(_label_hits(y_local, start, size), g_zy[:, None], 0.0)
        if cfg.need_zw:
            cw_c = _vocab_slice(cw, cfg, start, size)
            dz = dz + (g_zw[:, None] if cw_c is None else g_zw[:, None] * cw_c.astype(acc))
            if dcw is not None:
                dcw = lax.dynamic_update_slice_in_dim(dcw, (g_zw @ z).astype(dcw.dtype), start, 0)
        dz = _softcap_chain(dz, z, cfg)
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
    init = _as_varying(init, _vma(h, w, b, cw, y_local, lse, g_lse, g_zy, g_zw))
    dh, dw, db, dcw = _loop(v_local, cfg.chunk, body, init)
    dh = _sum_over_copies(dh, h).astype(h.dtype)
    dw, db, dcw = (_sum_over_copies(c, p) for c, p in ((dw, w), (db, b), (dcw, cw)))
    return dh, dw, db, dcw, None


_stats.defvjp(_stats_fwd, _stats_bwd)


# ------------------------------------------------------------------- public function


def _check_scalar(value, name, *, low, high=None, none_ok=False):
    if value is None and none_ok:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"`{name}` must be a Python number, got {type(value).__name__}.")
    value = float(value)
    ok = value > low if none_ok else value >= low
    if not ok or (high is not None and value > high) or not math.isfinite(value):
        bound = (
            f"> {low}" if none_ok else f"in [{low}, {high}]" if high is not None else f">= {low}"
        )
        raise ValueError(f"`{name}` must be {bound}, got {value}.")
    return value


def _per_vocab(arr, name, lengths):
    if arr is None:
        return None
    arr = num.as_float(arr, name)
    if arr.ndim != 1 or arr.shape[0] not in lengths:
        expected = " or ".join(f"({n},)" for n in sorted(set(lengths)))
        raise ValueError(
            f"`{name}` has shape {arr.shape}; expected {expected} for a weight of "
            "vocabulary size (per shard) "
            f"{lengths[0]}."
        )
    return arr


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


def _pallas_unsupported(axis_name, return_lse, has_class_weight, label_smoothing, dtypes):
    """Why the Pallas kernel cannot serve this call (``None`` when it can)."""
    if any(jnp.dtype(d) == jnp.float64 for d in dtypes):
        return "float64 inputs (the kernels compute in float32)"
    if axis_name is not None:
        return "`axis_name` (vocab-parallel) is only implemented by impl='xla'"
    if return_lse:
        return "`return_lse=True` is only implemented by impl='xla'"
    if has_class_weight and label_smoothing > 0:
        return (
            "`class_weight` with `label_smoothing` needs a class-weighted smoothing sum "
            "the kernel does not compute"
        )
    return None


def _have_kernel() -> bool:
    try:
        from jsoftmax import kernels
    except ImportError:
        return False
    return hasattr(kernels, "linear_cross_entropy")


def linear_cross_entropy(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    weight_layout: str = "dv",
    class_weight: ArrayLike | None = None,
    sample_weight: ArrayLike | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    impl: str = "auto",
    axis_name: Any = None,
    return_lse: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Cross-entropy of a linear layer's logits, without materialising the logits.

    Equal to ``cross_entropy(hidden @ weight + bias, labels, ...)``: with logits
    ``z = c·tanh((h W + b)/c)`` (``c = logit_softcap``; plain ``h W + b`` without it),
    ``lse_i = log Σ_c exp(z_ic)`` and per-class weights ``w``,

    .. math::
        l_i = (1-ε)\,w_{y_i}(\mathrm{lse}_i - z_{i y_i})
              + \frac{ε}{V}\sum_c w_c(\mathrm{lse}_i - z_{ic})
              + λ\,w_{y_i}\mathrm{lse}_i^2

    times ``sample_weight_i`` (``w ≡ 1`` without ``class_weight``; the z-loss is weighted
    like the label term, as in :func:`jsoftmax.cross_entropy`), 0 where
    ``labels == ignore_index``; ``"mean"`` divides the sum by ``Σ_i sample_weight_i·w_{y_i}``
    over non-ignored tokens (PyTorch's weighted mean) and is 0.0 (zero gradient) when
    that is 0. The vocabulary is
    processed in tiles with an online logsumexp, so peak memory is a few
    ``(tokens, chunk_size)`` tiles instead of the ``(tokens, V)`` logits and their
    gradient. Reverse-mode differentiable in ``hidden``, ``weight``, ``bias``,
    ``class_weight`` and ``sample_weight``, for any cotangent (also per-token ones
    with ``reduction="none"``).

    Args:
      hidden: ``(..., D)`` activations, any float dtype.
      weight: the output projection, ``(D, V)`` (a Flax ``Dense`` kernel) with
        ``weight_layout="dv"``, or ``(V, D)`` (a tied embedding table) with
        ``weight_layout="vd"`` — used as is, never transposed or copied. With
        ``axis_name``, this device's vocabulary shard.
      labels: integer class ids of shape ``hidden.shape[:-1]``. A label outside
        ``[0, V)`` that is not ``ignore_index`` makes that token's loss (and the
        gradient) NaN; :func:`jsoftmax.checked` names it instead.
      bias: optional ``(V,)`` bias (sharded like ``weight``).
      weight_layout: ``"dv"`` or ``"vd"``, see ``weight``.
      class_weight: optional ``(V,)`` per-class weights, ``cross_entropy``'s
        ``weight`` argument (renamed here because ``weight`` is the matrix). Under
        ``axis_name``, this shard's slice or the whole ``(V,)`` vector.
      sample_weight: optional per-token weights of shape ``labels.shape``,
        multiplied into the numerator and the denominator of ``"mean"``.
      ignore_index: label value that contributes nothing.
      label_smoothing: ``ε`` in ``[0, 1]`` (PyTorch's formula, class weights included).
      z_loss: ``λ >= 0``; adds ``λ·w_y·lse²`` per non-ignored token (PaLM).
      logit_softcap: optional ``c > 0``; logits become ``c·tanh(z/c)`` (Gemma 2).
      reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-token, shape of ``labels``).
      chunk_size: vocabulary entries per chunk; ``None`` picks one so that a float32
        ``(tokens, chunk_size)`` tile is about 16 MiB. A ``V`` that is not a multiple
        is fine (the last chunk is smaller).
      impl: ``"xla"`` (pure JAX), ``"pallas"`` (``jsoftmax.kernels``) or ``"auto"``
        (``"pallas"`` on TPU when the options allow, else ``"xla"``; on GPU the
        kernel is opt-in, see the README's kernel notes).
      axis_name: mesh axis name (or tuple of names) over which ``weight`` (and
        ``bias``, ``class_weight``) are sharded along the vocabulary, inside
        ``jax.shard_map``; the result is the loss over the whole vocabulary. Labels
        are global class ids.
      return_lse: also return the per-token logsumexp (float32, shape of
        ``labels``), e.g. for monitoring or a custom z-loss.

    Returns:
      The loss (float32 for half-precision inputs, float64 for float64): a scalar,
      or per-token with ``reduction="none"``; with ``return_lse=True`` a pair
      ``(loss, lse)``.

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

    References:
      Wijmans et al. 2025, "Cut Your Losses in Large-Vocabulary Language Models",
      https://arxiv.org/abs/2411.09009 ; Shoeybi et al. 2019, "Megatron-LM",
      https://arxiv.org/abs/1909.08053 (vocab-parallel cross-entropy).
    """
    if weight_layout not in _LAYOUTS:
        raise ValueError(f"`weight_layout` must be one of {_LAYOUTS}, got {weight_layout!r}.")
    if not isinstance(ignore_index, (int, np.integer)) or isinstance(ignore_index, bool):
        raise TypeError(f"`ignore_index` must be an int, got {ignore_index!r}.")
    num.check_reduction(reduction)
    if impl not in _IMPLS:
        raise ValueError(f"`impl` must be one of {_IMPLS}, got {impl!r}.")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer))
        or chunk_size < 1
    ):  # fmt: skip
        raise ValueError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}.")
    eps = _check_scalar(label_smoothing, "label_smoothing", low=0.0, high=1.0)
    dtypes = [jnp.result_type(a) for a in (hidden, weight) if hasattr(a, "dtype")]
    why_not = _pallas_unsupported(axis_name, return_lse, class_weight is not None, eps, dtypes)
    if impl == "pallas" and why_not is not None:
        raise ValueError(f"impl='pallas' does not support this call: {why_not}.")
    if impl == "auto":
        # The fused kernel is the TPU path. On GPUs the chunked XLA path keeps cuBLAS
        # matmuls and the same O(N·chunk) memory; the Triton kernel's bytes/FLOPs
        # estimate is 2-4x slower there (README, "Pallas kernels"), so it stays opt-in.
        on_tpu = jax.default_backend() == "tpu"
        impl = "pallas" if on_tpu and why_not is None and _have_kernel() else "xla"
    statics = _Statics(
        layout=weight_layout,
        ignore_index=int(ignore_index),
        eps=eps,
        lam=_check_scalar(z_loss, "z_loss", low=0.0),
        softcap=_check_scalar(logit_softcap, "logit_softcap", low=0.0, none_ok=True),
        reduction=reduction,
        chunk_size=None if chunk_size is None else int(chunk_size),
        impl=impl,
        axis_name=tuple(axis_name) if isinstance(axis_name, list) else axis_name,
        return_lse=bool(return_lse),
    )
    # Jitted so that eager calls compile the chunk loops once instead of dispatching
    # them op by op; inside an outer jit or shard_map this is inlined.
    return _linear_cross_entropy(statics, hidden, weight, labels, bias, class_weight, sample_weight)


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


@functools.partial(jax.jit, static_argnums=(0,))
def _linear_cross_entropy(st, hidden, weight, labels, bias, class_weight, sample_weight):
    (weight_layout, ignore_index, eps, lam, softcap, reduction, chunk_size, impl, axis_name,
     return_lse) = st  # fmt: skip
    hidden = num.as_float(hidden, "hidden")
    weight = num.as_float(weight, "weight")
    if hidden.ndim < 1:
        raise ValueError("`hidden` must have at least one dimension (..., D), got a scalar.")
    if weight.ndim != 2:
        raise ValueError(f"`weight` must be 2-D, got shape {weight.shape}.")
    d_model = hidden.shape[-1]
    v_local, d_weight = weight.shape[::-1] if weight_layout == "dv" else weight.shape
    if d_weight != d_model:
        expected = f"({d_model}, V)" if weight_layout == "dv" else f"(V, {d_model})"
        raise ValueError(
            f"`weight` of shape {weight.shape} does not match `hidden` of shape "
            f"{hidden.shape}: expected {expected} for weight_layout={weight_layout!r}."
        )
    if v_local == 0:
        raise ValueError(f"`weight` of shape {weight.shape} has an empty vocabulary.")
    batch_shape = hidden.shape[:-1]
    labels = num.check_integer_labels(labels, batch_shape)
    n_vocab = v_local
    if axis_name is not None:
        try:
            n_vocab = v_local * lax.axis_size(axis_name)
        except NameError as err:
            raise ValueError(
                f"`axis_name`={axis_name!r} is not a mesh axis of an enclosing "
                "`jax.shard_map` (vocab-parallel mode needs one)."
            ) from err
    if axis_name is not None:
        axes = axis_name if isinstance(axis_name, tuple) else (axis_name,)
        if not all(a in _vma(weight) for a in axes):
            raise ValueError(
                f"`weight` does not vary over `axis_name`={axis_name!r}: vocab-parallel mode "
                "needs `weight` sharded over the vocabulary on that mesh axis (in_specs), "
                "inside a `jax.shard_map` with check_vma=True (the default)."
            )
    bias = _per_vocab(bias, "bias", (v_local,))
    # Under `axis_name` the class weights may be this shard's slice or the whole vector.
    class_weight = _per_vocab(class_weight, "class_weight", (v_local, n_vocab))
    if sample_weight is not None:
        sample_weight = num.as_float(sample_weight, "sample_weight")
        num.check_broadcast(sample_weight, batch_shape, "sample_weight")

    n_rows = math.prod(batch_shape)

    compute = jnp.result_type(hidden.dtype, weight.dtype)
    acc = num.acc_dtype(compute)
    h2 = hidden.reshape(n_rows, d_model)
    y = labels.reshape(n_rows)
    if y.dtype.itemsize < 4 or jnp.issubdtype(y.dtype, jnp.unsignedinteger):
        y = y.astype(jnp.int32)  # signed, so that ignore_index = -100 compares correctly
    sw = None
    if sample_weight is not None:
        sw = jnp.broadcast_to(sample_weight, batch_shape).reshape(n_rows).astype(acc)

    valid = y != ignore_index
    bad = valid & ((y < 0) | (y >= n_vocab))
    keep = valid & ~bad
    # checkify cannot carry errors out of shard_map.
    if axis_name is None:
        label_check(
            bad.reshape(batch_shape), labels, loss="linear_cross_entropy",
            expected=f"0 <= label < {n_vocab} or label == ignore_index ({ignore_index})",
        )  # fmt: skip

    if impl == "pallas":
        return _pallas_route(
            h2, weight, y, bias, class_weight, sw, keep, bad, batch_shape, weight_layout,
            ignore_index, eps, lam, softcap, reduction, chunk_size, acc,
        )  # fmt: skip

    chunk = chunk_size if chunk_size is not None else _default_chunk(n_rows, v_local)
    chunk = min(int(chunk), v_local)
    cfg = _Config(
        layout=weight_layout,
        chunk=chunk,
        softcap=softcap,
        axis_name=axis_name,
        need_zw=eps > 0,
        compute_dtype=jnp.dtype(compute),
        acc_dtype=jnp.dtype(acc),
    )
    h2 = h2.astype(compute)

    # l_i = γ_i (lse − z_y) + δ_i (Σ_c w_c lse − Σ_c w_c z_c) + β_i lse²: SPEC §2's formula
    # written with the three per-token statistics of the chunked core.
    base = keep.astype(acc) if sw is None else jnp.where(keep, sw, 0.0)
    w_y, w_sum = None, float(n_vocab)
    if class_weight is not None and class_weight.shape[0] == n_vocab:
        # The whole vector (also under axis_name): w_y and Σ w need no collective.
        w_y = jnp.where(keep, class_weight[jnp.clip(y, 0, n_vocab - 1)], 0.0).astype(acc)
        w_sum = jnp.sum(class_weight.astype(acc))
        if n_vocab != v_local:
            offset = lax.axis_index(axis_name) * v_local
            class_weight = lax.dynamic_slice_in_dim(class_weight, offset, v_local)
    elif class_weight is not None:
        w_y = _label_weights(class_weight, y, keep, cfg)
        w_sum = lax.psum(jnp.sum(class_weight.astype(acc)), axis_name)
    gamma = base * (1.0 - eps) if w_y is None else base * (1.0 - eps) * w_y
    delta = base * (eps / n_vocab)

    lse_out, zy, zw = _stats(cfg, h2, weight, bias, class_weight, y)
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
        loss = _reduce(jnp.sum(per_token), base, w_y, reduction)
    if return_lse:
        return loss, lse_out.reshape(batch_shape)
    return loss


@jax.custom_vjp
def _poison_cotangent(x, bad):
    """Identity whose cotangent is NaN at ``bad`` positions.

    A token with a bad label gets a NaN loss *and* poisons the gradient (as
    ``cross_entropy`` does). Multiplying by NaN is not enough: its coefficient there is
    0, and XLA rewrites ``x * convert(mask)`` as a select, which drops ``0 * NaN``.
    """
    del bad
    return x


def _poison_fwd(x, bad):
    return x, bad


def _poison_bwd(bad, ct):
    return jnp.where(bad, jnp.nan, ct), None


_poison_cotangent.defvjp(_poison_fwd, _poison_bwd)


def _reduce(total, base, w_y, reduction):
    if reduction == "sum":
        return total
    den = jnp.sum(base if w_y is None else base * w_y)
    return jnp.where(den > 0, total / jnp.where(den > 0, den, 1.0), 0.0)


def _pallas_route(
    h2, weight, y, bias, class_weight, sw, keep, bad, batch_shape, layout,
    ignore_index, eps, lam, softcap, reduction, chunk_size, acc,
):  # fmt: skip
    """Per-token losses from ``jsoftmax.kernels``; weights and reduction applied here.

    The kernel's row loss is ``(1-ε)(lse − z_y) + ε/V Σ_c (lse − z_c) + λ lse²``; without
    smoothing (the only case routed here with class weights) ``cross_entropy``'s
    weighted row loss is exactly ``w_y`` times it.
    """
    from jsoftmax import kernels  # lazily: kernels are optional at import time

    per_row = kernels.linear_cross_entropy(
        h2, weight, y, bias=bias, weight_layout=layout, ignore_index=ignore_index,
        label_smoothing=eps, z_loss=lam, logit_softcap=softcap, block_cols=chunk_size,
    ).astype(acc)  # fmt: skip
    base = keep.astype(acc) if sw is None else jnp.where(keep, sw, 0.0)
    w_y = None
    if class_weight is not None:
        w_y = jnp.where(keep, class_weight[jnp.clip(y, 0, class_weight.shape[0] - 1)], 0.0)
        w_y = w_y.astype(acc)
    weight_i = base if w_y is None else base * w_y
    per_row = _poison_cotangent(per_row, bad)
    per_token = jnp.where(bad, jnp.nan, jnp.where(keep, per_row * weight_i, 0.0))
    if reduction == "none":
        return per_token.reshape(batch_shape)
    return _reduce(jnp.sum(per_token), base, w_y, reduction)

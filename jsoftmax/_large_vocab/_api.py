"""The public large-vocabulary functions: argument checks, vocabulary order, and the
loss written with the core's per-token statistics.

Every loss option is a per-token combination of the core's three statistics (``lse``,
``z_y``, ``Σ_c w_c z_c``), applied outside the chunked core, so autodiff of that
combination handles class and sample weights, reductions and per-token cotangents.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jsoftmax import _impl
from jsoftmax import _numerics as num
from jsoftmax import _validate as check
from jsoftmax._checks import label_check
from jsoftmax._large_vocab import _filter
from jsoftmax._large_vocab._core import _stats
from jsoftmax._large_vocab._filter import _filter_option
from jsoftmax._large_vocab._sharding import (
    _axis,
    _label_weights,
    _vma,
    place,
    placement,
)
from jsoftmax._large_vocab._softmax_stats import SoftmaxStats, _finish_stats
from jsoftmax._large_vocab._tiles import _MIN_CHUNK, _Config, _default_chunk

_LAYOUTS = ("dv", "vd")


_IMPLS = ("auto", "xla", "pallas")


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
        Under ``jax.jit`` with explicitly sharded inputs (``AxisType.Explicit``) the
        layout is read from their types and ``axis_name`` is not needed; in the default
        auto mode, name the mesh axes (of ``jax.set_mesh``'s mesh) that hold the
        vocabulary, and the library places the vocab-parallel ``shard_map`` itself (see
        the scaling-out guide).
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
        filter_rows=_filter.FILTER_ROWS,
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
    fsdp_axes: Any = None  # set by a placement (see _sharding.Placement)


@functools.partial(jax.jit, static_argnums=(0,))
def _linear_softmax_stats(st, hidden, linear_weight, labels, linear_bias, vocab_order):
    pl = placement(hidden, linear_weight, st.layout, st.axis_name)
    if pl is not None:
        _check_inputs(
            "linear_softmax_stats", hidden, linear_weight, labels, linear_bias, st.layout,
            None, st.ignore_index, order_given=vocab_order is not None,
        )  # fmt: skip
        pl.check_divides(hidden, linear_weight, st.layout)
        local = st._replace(axis_name=pl.vocab_axis_name, fsdp_axes=pl.fsdp_axes)
        args = (hidden, linear_weight, labels, linear_bias, vocab_order)
        bias_spec = P() if vocab_order is not None else pl.vocab_spec()
        in_specs = (pl.token_spec(), pl.head_spec(st.layout), pl.token_spec(), bias_spec, P())
        fn = functools.partial(_linear_softmax_stats, local)
        return place(pl, fn, args, in_specs, pl.token_spec())
    order = None
    if vocab_order is not None:
        order, labels, linear_bias, _ = _reorder(
            vocab_order, labels, linear_bias, None, linear_weight, st.layout, st.axis_name,
            st.ignore_index,
        )  # fmt: skip
    inp = _check_inputs(
        "linear_softmax_stats", hidden, linear_weight, labels, linear_bias, st.layout,
        st.axis_name, st.ignore_index, fsdp_axes=st.fsdp_axes,
    )  # fmt: skip
    if st.top_k > inp.n_vocab:
        raise ValueError(f"`top_k`={st.top_k} is larger than the vocabulary ({inp.n_vocab}).")
    cfg = _make_config(
        inp, st.layout, st.chunk_size, st.softcap, st.axis_name, need_zw=False,
        temperature=st.temperature, need_entropy=True, need_argmax=True, top_k=st.top_k,
        filter_eps=st.filter_eps, filter_rows=st.filter_rows, fsdp_axes=st.fsdp_axes,
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
        Under ``jax.jit`` with explicitly sharded inputs (``AxisType.Explicit``) the
        layout is read from their types and ``axis_name`` is not needed; in the default
        auto mode, name the mesh axes (of ``jax.set_mesh``'s mesh) that hold the
        vocabulary, and the library places the vocab-parallel ``shard_map`` itself (see
        the scaling-out guide).
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
        filter_rows=_filter.FILTER_ROWS,
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
    # Set by a placement (see _sharding.Placement): the weight's D axes, the tokens' axes.
    fsdp_axes: Any = None
    token_axes: Any = None


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


def _check_inputs(
    fn, hidden, linear_weight, labels, linear_bias, layout, axis_name, ignore_index,
    fsdp_axes=None, order_given=False,
):  # fmt: skip
    """Shapes, dtypes, the mesh axis and the labels of a call, checked at trace time.

    ``fsdp_axes``: the weight holds a ``D``-slice per device (a placement's FSDP);
    ``order_given``: labels are caller ids of a ``vocab_order`` (checked after reordering).
    """
    hidden = check.float_array(hidden, "hidden")
    linear_weight = check.float_array(linear_weight, "linear_weight")
    if hidden.ndim < 1:
        raise ValueError("`hidden` must have at least one dimension (..., D), got a scalar.")
    if linear_weight.ndim != 2:
        raise ValueError(f"`linear_weight` must be 2-D, got shape {linear_weight.shape}.")
    d_model = hidden.shape[-1]
    v_local, d_weight = linear_weight.shape[::-1] if layout == "dv" else linear_weight.shape
    if fsdp_axes is not None:
        d_weight = d_weight * lax.axis_size(fsdp_axes)
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
        if axis_name is None and fsdp_axes is None and not order_given:
            label_check(
                bad.reshape(batch_shape), labels, loss=fn,
                expected=f"0 <= label < {n_vocab} or label == ignore_index ({ignore_index})",
            )  # fmt: skip
    return _Inputs(
        h2, linear_weight, linear_bias, y, keep, bad, batch_shape, v_local, n_vocab, compute, acc
    )


def _make_config(
    inp, layout, chunk_size, softcap, axis_name, filter_eps=None, filter_rows=0,
    fsdp_axes=None, **stats,
):  # fmt: skip
    n_rows = inp.h2.shape[0]
    eps = check.filter_eps(filter_eps, inp.compute)
    chunk = chunk_size if chunk_size is not None else _default_chunk(n_rows, inp.v_local)
    if chunk_size is None and fsdp_axes is not None:
        # Each chunk of a D-sharded head is gathered whole: keep it a small part of the head.
        chunk = min(chunk, max(_MIN_CHUNK, inp.v_local // _FSDP_PARTS))
    return _Config(
        filter_eps=eps,
        filter_rows=max(1, min(filter_rows, n_rows) if filter_rows else n_rows),
        layout=layout,
        chunk=min(int(chunk), inp.v_local),
        softcap=softcap,
        axis_name=axis_name,
        fsdp_axes=fsdp_axes,
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
     return_lse, return_stats, top_k, filter_eps, filter_rows, fsdp_axes,
     token_axes) = st  # fmt: skip
    pl = (
        None
        if token_axes is not None
        else placement(hidden, linear_weight, weight_layout, axis_name)
    )
    if pl is not None:
        return _placed_cross_entropy(
            pl, st, hidden, linear_weight, labels, linear_bias, weight, sample_weight,
            normalizer, vocab_order,
        )  # fmt: skip
    order = None
    if vocab_order is not None:
        order, labels, linear_bias, weight = _reorder(
            vocab_order, labels, linear_bias, weight, linear_weight, weight_layout, axis_name,
            ignore_index,
        )  # fmt: skip
    inp = _check_inputs(
        "linear_cross_entropy", hidden, linear_weight, labels, linear_bias, weight_layout,
        axis_name, ignore_index, fsdp_axes=fsdp_axes,
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
                chunk_size, acc, filter_eps, token_axes,
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
        filter_eps=filter_eps, filter_rows=filter_rows, fsdp_axes=fsdp_axes,
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
        loss = _reduce(jnp.sum(per_token), base, w_y, reduction, normalizer, bad, token_axes)
    if return_lse:
        return loss, lse_out.reshape(batch_shape)
    if return_stats:
        return loss, _finish_stats(core, cfg, inp, order)
    return loss


_poison_cotangent = num.poison_cotangent


def _reduce(total, base, w_y, reduction, normalizer, bad, token_axes=None):
    """``"sum"``/``"mean"`` of the per-token losses; over every shard of ``token_axes``."""
    total = _over_tokens(total, token_axes)
    if reduction == "sum":
        return total
    den = None
    if normalizer is None:
        den = _over_tokens(jnp.sum(base if w_y is None else base * w_y), token_axes)
        any_bad = _over_tokens(jnp.sum(bad.astype(jnp.int32)), token_axes) > 0
        # A batch of nothing but bad labels is NaN, not the empty batch's 0.
        den = jnp.where((den == 0) & any_bad, jnp.nan, den)
    return num.mean_of(total, den, normalizer)


def _over_tokens(x, token_axes):
    """``x`` summed over the token shards of a placement (the identity without one)."""
    return x if token_axes is None else lax.psum(x, token_axes)


def _placed_cross_entropy(
    pl, st, hidden, linear_weight, labels, linear_bias, weight, sample_weight, normalizer,
    vocab_order,
):  # fmt: skip
    """``linear_cross_entropy`` on explicitly sharded inputs, one shard per device.

    The vocabulary axes become ``axis_name`` (vocab-parallel), the weight's ``D`` axes
    gather one chunk at a time, and the reduction sums over the token axes.
    """
    _check_inputs(
        "linear_cross_entropy", hidden, linear_weight, labels, linear_bias, st.layout, None,
        st.ignore_index, order_given=vocab_order is not None,
    )  # fmt: skip
    pl.check_divides(hidden, linear_weight, st.layout)
    if st.impl == "pallas" and (pl.vocab or pl.fsdp):
        what = "the vocabulary" if pl.vocab else "D (FSDP)"
        raise ValueError(_PALLAS_HEAD_SHARDED.format(what=what, axes=pl.vocab or pl.fsdp))
    local = st._replace(
        axis_name=pl.vocab_axis_name, fsdp_axes=pl.fsdp_axes, token_axes=pl.token_axes
    )
    if sample_weight is not None:
        sample_weight = jnp.broadcast_to(sample_weight, jnp.shape(labels))
    args = (
        hidden, linear_weight, labels, linear_bias, weight, sample_weight, normalizer,
        vocab_order,
    )  # fmt: skip
    bias_spec = P() if vocab_order is not None else pl.vocab_spec()
    tok = pl.token_spec()
    in_specs = (tok, pl.head_spec(st.layout), tok, bias_spec, P(), tok, P(), P())
    out = tok if st.reduction == "none" else P()
    if st.return_lse or st.return_stats:
        out = (out, tok)
    # A pallas_call's outputs carry no varying-axes type: no check around the kernels.
    fn = functools.partial(_linear_cross_entropy, local)
    return place(pl, fn, args, in_specs, out, check_vma=st.impl != "pallas")


# A D-sharded (FSDP) head is all-gathered one vocabulary chunk at a time; by default a
# chunk is at most 1/_FSDP_PARTS of the head, whatever the number of tokens.
_FSDP_PARTS = 8

_PALLAS_HEAD_SHARDED = (
    "impl='pallas' with `linear_weight` sharded on {what} (mesh axes {axes}): the kernels "
    "need the whole head on every device (no cross-shard logsumexp, no FSDP gather). Use "
    "impl='xla' (vocab-parallel, an FSDP head gathered one chunk at a time), or replicate "
    "the head (the kernels then run on each token shard)."
)


def _pallas_route(
    h2, linear_weight, y, linear_bias, weight, sw, keep, bad, batch_shape, layout,
    ignore_index, eps, lam, softcap, reduction, normalizer, chunk_size, acc, filter_eps=None,
    token_axes=None,
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
        den = None if normalizer is not None else _over_tokens(jnp.sum(weight_i), token_axes)
        weight_i = num.mean_of(weight_i, den, normalizer)
    row_weight = jnp.where(bad, jnp.nan, weight_i)
    loss = kernels.linear_cross_entropy(
        h2, linear_weight, y, sample_weight=row_weight, reduction="sum", **kw
    )
    return _over_tokens(loss.astype(acc), token_axes)

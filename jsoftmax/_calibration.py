"""Calibration and open-set recognition: temperature scaling, ECE, reliability diagrams,
maximum-softmax-probability and energy scores, and prediction with rejection.

Softmax outputs are typically over-confident and have no way to say "none of the above".
Temperature scaling (Guo et al. 2017) fixes the first with one scalar fitted on held-out
data; the maximum softmax probability (Hendrycks & Gimpel 2017) and the energy score
(Liu et al. 2020) turn a classifier's logits into a score for the second. Everything here
except :func:`reliability_diagram` (which draws with matplotlib) is pure and jittable.

Label conventions shared by :func:`fit_temperature`, :func:`expected_calibration_error`
and :func:`reliability_diagram`:

* positions whose label equals ``ignore_index`` (default ``-100``, as in the losses) are
  left out of the statistic and its denominator;
* any other label outside ``[0, C)``, or a label on a class the row gives probability 0
  (a ``-inf``-masked logit), is bad input that can only be seen at run time: the result
  is NaN (poison that shows up) instead of a silently plausible number.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jsoftmax import _numerics as num
from jsoftmax import _softmax as sm
from jsoftmax import _validate as check

SCORES = ("msp", "energy")

# fit_temperature searches T in [1e-4, 1e4]: wide enough for any sane model, narrow
# enough that z/T stays finite in float32 for logits up to ~1e30.
_DEFAULT_BOUNDS = (1e-4, 1e4)


# --------------------------------------------------------------------- shared checks


def _check_logits_labels(
    logits: ArrayLike, labels: ArrayLike, axis: int
) -> tuple[jax.Array, jax.Array, int]:
    """Float logits with a class axis, integer labels of the logits' shape without it."""
    logits, a = check.logits(logits, axis)
    batch_shape = logits.shape[:a] + logits.shape[a + 1 :]
    labels = check.integer_labels(labels, batch_shape)
    return logits, labels, a


def _flat_labels(logits, labels, axis, ignore_index):
    """``(valid, bad, x, y)``: logits as upcast ``(n, C)`` rows, labels as ``(n,)``.

    ``valid`` marks positions that count (not ignored, label in range, probability > 0);
    ``bad`` is True when any non-ignored label is out of range or on a zero-probability
    class. ``y`` is clipped into range so that gathers at invalid positions are safe.
    """
    x = num.upcast(jnp.moveaxis(logits, axis, -1))
    c = x.shape[-1]
    x = x.reshape(-1, c)
    y = labels.reshape(-1)
    counted = y != ignore_index
    in_range = (y >= 0) & (y < c)
    y_safe = jnp.where(in_range, y, 0)
    # A label's class has probability 0 at every temperature iff log p_y = -inf at T = 1.
    lp_y = jnp.take_along_axis(sm.log_softmax(x), y_safe[:, None], axis=-1)[:, 0]
    valid = counted & in_range & (lp_y > -jnp.inf)
    bad = jnp.any(counted & ~valid)
    return valid, bad, x, y_safe


# ------------------------------------------------------------------ temperature fit


def fit_temperature(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    init: ArrayLike = 1.0,
    max_iter: int = 100,
    axis: int = -1,
    ignore_index: int = -100,
    bounds: tuple[float, float] = _DEFAULT_BOUNDS,
) -> jax.Array:
    r"""Fit the temperature ``T > 0`` that minimises the NLL of ``softmax(logits / T)``.

    Temperature scaling (Guo et al. 2017), the one-parameter post-hoc calibration:

    .. math::
        \hat T = \arg\min_{T > 0} \; -\frac{1}{n} \sum_{i} \log
            \operatorname{softmax}(z_i / T)_{y_i}

    over the non-ignored positions ``i``. The search runs over ``s = log T`` (so ``T``
    stays positive) with safeguarded Newton steps: the first and second derivatives come
    from ``jax.grad`` / ``jax.jvp`` through :func:`jsoftmax.log_softmax`'s ``temperature``
    argument, and a bisection step is taken whenever Newton would leave the bracket known
    to hold the minimum or is not shrinking fast enough. In ``β = 1/T`` the objective is
    convex, so its ``s``-derivative changes sign once and the bracket always converges:
    any ``init`` inside ``bounds`` reaches the same minimiser. The loop is a
    ``lax.while_loop`` that stops once a step is below ``1e-5`` in ``log T`` (``1e-10``
    for float64) or after ``max_iter`` steps, so the function is jittable but not
    reverse-differentiable with respect to its inputs.

    Degenerate data are clamped, not failed: if every prediction is already right with a
    margin the NLL keeps falling as ``T → 0``, and the result is a small temperature at
    which the NLL has already underflowed to 0 (every such ``T`` is optimal in floating
    point), at least ``bounds[0]``; if the logits predict worse than uniform the NLL falls
    as ``T → ∞`` and the result is ``bounds[1]``. When the NLL does not depend on ``T``
    (all logits of every row equal, or every position ignored) ``init`` is returned.

    Args:
      logits: uncalibrated scores ``(..., C)`` (class axis at ``axis``), typically a
        held-out validation set. ``-inf`` entries (masked classes) are allowed.
      labels: integer labels with the shape of ``logits`` minus the class axis.
      init: starting temperature, a positive scalar (clipped into ``bounds``).
      max_iter: the most Newton/bisection steps (a static Python int ``>= 1``).
      axis: the class axis.
      ignore_index: label value of positions to leave out (as in the losses).
      bounds: ``(T_min, T_max)``, static positive floats bounding the search.

    Returns:
      The fitted temperature, a scalar in float32 (float64 for float64 logits). NaN when a
      non-ignored label is out of ``[0, C)`` or points at a ``-inf`` (masked) logit, or
      when the logits contain NaN. Calibrated probabilities are then
      ``jsm.softmax(logits, temperature=T)``.

    Examples:
      >>> import jsoftmax as jsm
      >>> z = jnp.array([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [4.0, 0.0]])
      >>> y = jnp.array([0, 1, 1, 0])  # one confident mistake in four
      >>> T = jsm.fit_temperature(z, y)
      >>> bool(T > 1.0)  # the over-confident logits get softened
      True

    References:
      Guo, Pleiss, Sun, Weinberger. "On Calibration of Modern Neural Networks", ICML 2017.
      https://arxiv.org/abs/1706.04599
    """
    logits, labels, a = _check_logits_labels(logits, labels, axis)
    max_iter = check.static_int(max_iter, "max_iter", minimum=1)
    t_min, t_max = (float(b) for b in bounds)
    if not 0 < t_min < t_max < math.inf:
        raise ValueError(f"`bounds` must satisfy 0 < T_min < T_max < inf, got {bounds}.")
    if check.is_static_number(init):
        check.static_number(init, "init", lo=0.0, lo_open=True)
    init = jnp.asarray(init)
    if init.ndim != 0:
        raise ValueError(f"`init` must be a scalar, got shape {init.shape}.")

    ignore_index = check.ignore_index(ignore_index)
    return _fit_temperature(logits, labels, init, a, ignore_index, int(max_iter), t_min, t_max)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7))
def _fit_temperature(logits, labels, init, axis, ignore_index, max_iter, t_min, t_max):
    # Jitted as a whole so that eager calls compile once per shape instead of op by op.
    valid, bad, x, y = _flat_labels(logits, labels, axis, ignore_index)
    dtype = x.dtype
    n = jnp.maximum(jnp.sum(valid), 1).astype(dtype)
    tol = 1e-10 if dtype == jnp.float64 else 1e-5
    s_min, s_max = math.log(t_min), math.log(t_max)

    def nll(s):
        lp = sm.log_softmax(x, temperature=jnp.exp(s))
        lp_y = jnp.take_along_axis(lp, y[:, None], axis=-1)[:, 0]
        return -jnp.sum(jnp.where(valid, lp_y, 0.0)) / n

    grad_nll = jax.grad(nll)

    def derivatives(s):
        # Forward-over-reverse: d/ds and d²/ds² of the NLL in one pass over the logits.
        return jax.jvp(grad_nll, (s,), (jnp.ones_like(s),))

    # The NLL is independent of T when every counted row has all its admissible logits
    # equal; rounding would still give a tiny nonzero slope there, so detect it exactly.
    admissible = x > -jnp.inf
    row_min = jnp.min(jnp.where(admissible, x, jnp.inf), axis=-1)
    flat = jnp.all(~valid | (jnp.max(x, axis=-1) == row_min))

    s0 = jnp.clip(jnp.log(init.astype(dtype)), s_min, s_max)
    lo0, hi0 = jnp.asarray(s_min, dtype), jnp.asarray(s_max, dtype)
    state = (jnp.int32(0), s0, lo0, hi0, hi0 - lo0, flat)

    def cond(state):
        i, *_, done = state
        return (i < max_iter) & ~done

    def body(state):
        # Safeguarded Newton ("rtsafe"): the derivatives are evaluated only here, so the
        # compiled program holds one copy of the forward-over-reverse pass.
        i, s, lo, hi, dx_old, _ = state
        g, h = derivatives(s)
        # The s-derivative is negative left of the minimiser and positive right of it.
        lo = jnp.where(g < 0, s, lo)
        hi = jnp.where(g > 0, s, hi)
        newton = s - g / jnp.where(h > 0, h, 1.0)
        slow = 2 * jnp.abs(g) > jnp.abs(dx_old * h)
        bisect = (h <= 0) | (newton <= lo) | (newton >= hi) | slow
        stationary = g == 0
        s_new = jnp.where(stationary, s, jnp.where(bisect, 0.5 * (lo + hi), newton))
        dx = s_new - s
        return i + 1, s_new, lo, hi, dx, stationary | (jnp.abs(dx) < tol)

    s = jax.lax.while_loop(cond, body, state)[1]
    poison = bad | jnp.any(jnp.isnan(x))
    s = jnp.where(flat, s0, jnp.clip(s, s_min, s_max))
    return jnp.where(poison, jnp.nan, jnp.exp(s))


# ------------------------------------------------------------- calibration error


def _bin_statistics(logits, labels, axis, n_bins, ignore_index):
    """Per-bin ``(count, Σ correct, Σ confidence)`` over equal-width confidence bins.

    Bin ``b`` holds confidences in ``(b/M, (b+1)/M]`` (the first bin also holds 0), the
    convention of Guo et al.'s reference code. Returns the three ``(M,)`` arrays and the
    ``bad``-label flag.
    """
    valid, bad, x, y = _flat_labels(logits, labels, axis, ignore_index)
    p = sm.softmax(x)
    conf = jnp.max(p, axis=-1)
    # The prediction is the arg-max of the logits (as in predict_with_rejection): nearly
    # tied logits can round to tied probabilities, whose arg-max would then differ.
    correct = (jnp.argmax(x, axis=-1) == y).astype(conf.dtype)
    b = jnp.clip(jnp.ceil(conf * n_bins).astype(jnp.int32) - 1, 0, n_bins - 1)
    w = valid.astype(conf.dtype)
    count = jax.ops.segment_sum(w, b, num_segments=n_bins)
    acc_sum = jax.ops.segment_sum(w * correct, b, num_segments=n_bins)
    conf_sum = jax.ops.segment_sum(w * conf, b, num_segments=n_bins)
    return count, acc_sum, conf_sum, bad


_bin_statistics_jit = jax.jit(_bin_statistics, static_argnums=(2, 3, 4))


def expected_calibration_error(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    n_bins: int = 15,
    axis: int = -1,
    ignore_index: int = -100,
) -> jax.Array:
    r"""Expected calibration error with equal-width confidence bins.

    With confidence ``c_i = max_k softmax(z_i)_k``, correctness ``a_i = [argmax z_i = y_i]``
    and ``M`` bins ``B_b = {i : c_i ∈ (b/M, (b+1)/M]}``:

    .. math::
        \mathrm{ECE} = \sum_{b=0}^{M-1} \frac{|B_b|}{n}
            \left| \frac{1}{|B_b|}\sum_{i \in B_b} a_i - \frac{1}{|B_b|}\sum_{i \in B_b} c_i \right|

    over the ``n`` non-ignored positions; empty bins contribute 0. Computed with
    ``segment_sum`` over the bin index (no Python loop over bins), so it is jittable for a
    static ``n_bins``. Apply a fitted temperature first (``logits / T``) to measure the
    calibrated model.

    Args:
      logits: scores ``(..., C)`` with the class axis at ``axis``.
      labels: integer labels with the shape of ``logits`` minus the class axis.
      n_bins: the number of equal-width bins ``M`` on ``[0, 1]`` (static int ``>= 1``).
      axis: the class axis.
      ignore_index: label value of positions to leave out.

    Returns:
      The ECE, a scalar in ``[0, 1]`` (float32, float64 for float64 logits); 0 when every
      position is ignored; NaN when a non-ignored label is out of ``[0, C)`` or on a
      ``-inf`` (masked) logit.

    Examples:
      >>> import jsoftmax as jsm
      >>> z = jnp.log(jnp.array([[0.9, 0.1], [0.9, 0.1]]))
      >>> ece = jsm.expected_calibration_error(z, jnp.array([0, 1]))  # conf 0.9, acc 0.5
      >>> round(float(ece), 4)
      0.4

    References:
      Guo, Pleiss, Sun, Weinberger. "On Calibration of Modern Neural Networks", ICML 2017.
      https://arxiv.org/abs/1706.04599

      Naeini, Cooper, Hauskrecht. "Obtaining Well Calibrated Probabilities Using Bayesian
      Binning", AAAI 2015.
    """
    logits, labels, a = _check_logits_labels(logits, labels, axis)
    n_bins = check.static_int(n_bins, "n_bins", minimum=1)
    return _expected_calibration_error(logits, labels, a, n_bins, check.ignore_index(ignore_index))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _expected_calibration_error(logits, labels, axis, n_bins, ignore_index):
    count, acc_sum, conf_sum, bad = _bin_statistics(logits, labels, axis, n_bins, ignore_index)
    # |B_b|/n · |acc_b - conf_b| = |Σ a_i - Σ c_i| / n: no division by empty bins.
    ece = jnp.sum(jnp.abs(acc_sum - conf_sum)) / jnp.maximum(jnp.sum(count), 1.0)
    return jnp.where(bad, jnp.nan, ece)


def reliability_diagram(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    n_bins: int = 15,
    ax=None,
    axis: int = -1,
    ignore_index: int = -100,
):
    r"""Draw a reliability diagram: per-bin accuracy against confidence (Guo et al. 2017).

    For each of ``n_bins`` equal-width confidence bins (as in
    :func:`expected_calibration_error`) a bar of height ``acc_b`` is drawn at the bin,
    the gap to the bin's mean confidence ``conf_b`` is shaded, and the diagonal
    ``acc = conf`` marks perfect calibration; the ECE is shown in the title. Bars below
    the diagonal mean over-confidence. Empty bins have no bar (height 0).

    This is the one function here that reads values back to the host (it draws); it is
    not jittable. matplotlib is an optional dependency: ``pip install 'jsoftmax[plot]'``.

    Args:
      logits: scores ``(..., C)`` with the class axis at ``axis``.
      labels: integer labels with the shape of ``logits`` minus the class axis.
      n_bins: the number of equal-width bins on ``[0, 1]``.
      ax: a matplotlib ``Axes`` to draw into; a new figure is made when ``None``.
      axis: the class axis.
      ignore_index: label value of positions to leave out.

    Returns:
      The matplotlib ``Axes``. ``ax.containers[0]`` holds the accuracy bars (one per bin,
      in bin order), ``ax.containers[1]`` the gap bars.

    Raises:
      ImportError: when matplotlib is not installed (names the ``jsoftmax[plot]`` extra).

    Examples:
      >>> import jsoftmax as jsm
      >>> z = jnp.log(jnp.array([[0.9, 0.1], [0.3, 0.7], [0.55, 0.45]]))
      >>> ax = jsm.reliability_diagram(z, jnp.array([0, 1, 1]), n_bins=5)
      >>> [float(r.get_height()) for r in ax.containers[0]]  # the 0.55 bin is wrong
      [0.0, 0.0, 0.0, 1.0, 1.0]

    References:
      Guo, Pleiss, Sun, Weinberger. "On Calibration of Modern Neural Networks", ICML 2017.
      https://arxiv.org/abs/1706.04599

      DeGroot, Fienberg. "The Comparison and Evaluation of Forecasters", 1983.
    """
    logits, labels, a = _check_logits_labels(logits, labels, axis)
    n_bins = check.static_int(n_bins, "n_bins", minimum=1)
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - exercised by a test that hides matplotlib
        raise ImportError(
            "reliability_diagram needs matplotlib, an optional dependency of jsoftmax: "
            "install it with `pip install 'jsoftmax[plot]'`."
        ) from e

    ignore_index = check.ignore_index(ignore_index)
    stats = _bin_statistics_jit(logits, labels, a, n_bins, ignore_index)
    count, acc_sum, conf_sum, bad = (np.asarray(v, dtype=np.float64) for v in stats)
    total = max(count.sum(), 1.0)
    ece = np.nan if bad else float(np.abs(acc_sum - conf_sum).sum() / total)
    nonempty = count > 0
    safe = np.where(nonempty, count, 1.0)
    acc = np.where(nonempty, acc_sum / safe, 0.0)
    conf = np.where(nonempty, conf_sum / safe, 0.0)

    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4.5))
    width = 1.0 / n_bins
    left = np.arange(n_bins) * width
    ax.bar(left, acc, width=width, align="edge", color="#3b75af", edgecolor="black",
           linewidth=0.6, label="Accuracy")  # fmt: skip
    # Gap bars span from acc_b to conf_b (hatched red), only for non-empty bins.
    ax.bar(left, np.where(nonempty, conf - acc, 0.0), bottom=acc, width=width, align="edge",
           color="#d62728", alpha=0.3, edgecolor="#d62728", hatch="//", linewidth=0.6,
           label="Gap")  # fmt: skip
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="Perfect calibration")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("Confidence")
    ax.set_ylabel("Accuracy")
    ax.set_title(f"Reliability diagram (ECE = {ece:.4f})")
    ax.legend(loc="upper left")
    return ax


# ------------------------------------------------------------ open-set recognition


def max_softmax_probability(
    logits: ArrayLike, *, temperature: ArrayLike = 1.0, axis: int = -1
) -> jax.Array:
    r"""Maximum softmax probability, the baseline out-of-distribution score.

    .. math::
        \mathrm{MSP}(z) = \max_k \operatorname{softmax}(z / T)_k

    Higher means more confident / more in-distribution (Hendrycks & Gimpel 2017). A row
    with no admissible class (all ``-inf`` or masked) scores 0.

    Args:
      logits: scores ``(..., C)`` with the class axis at ``axis``.
      temperature: positive scalar ``T`` (may be traced, e.g. from
        :func:`fit_temperature`).
      axis: the class axis.

    Returns:
      Scores in ``[1/C, 1]`` with the shape of ``logits`` minus the class axis, in the
      dtype of ``logits``.

    Examples:
      >>> import jsoftmax as jsm
      >>> msp = jsm.max_softmax_probability(jnp.array([[2.0, 0.0], [0.0, 0.0]]))
      >>> [round(float(v), 4) for v in msp]
      [0.8808, 0.5]

    References:
      Hendrycks, Gimpel. "A Baseline for Detecting Misclassified and Out-of-Distribution
      Examples in Neural Networks", ICLR 2017. https://arxiv.org/abs/1610.02136
    """
    logits, a = check.logits(logits, axis)
    return jnp.max(sm.softmax(logits, axis=a, temperature=temperature), axis=a)


def energy_score(logits: ArrayLike, *, temperature: ArrayLike = 1.0, axis: int = -1) -> jax.Array:
    r"""The free energy of the logits, an out-of-distribution score.

    .. math::
        E(z; T) = -T \cdot \log \sum_k e^{z_k / T}

    Sign convention (Liu et al. 2020): **lower energy = more in-distribution**; large
    logits give very negative energy. Use ``-energy_score`` where a higher-is-more-normal
    score is needed (e.g. for an AUROC against in-distribution labels). A row with no
    admissible class (all ``-inf``) has energy ``+inf``: no evidence for any class.

    Args:
      logits: scores ``(..., C)`` with the class axis at ``axis``.
      temperature: positive scalar ``T`` (may be traced).
      axis: the class axis.

    Returns:
      Energies with the shape of ``logits`` minus the class axis, in the dtype of
      ``logits``.

    Examples:
      >>> import jsoftmax as jsm
      >>> jsm.energy_score(jnp.array([[5.0, 0.0], [0.0, 0.0]]))
      Array([-5.0067153, -0.6931472], dtype=float32)

    References:
      Liu, Wang, Owens, Li. "Energy-based Out-of-distribution Detection", NeurIPS 2020.
      https://arxiv.org/abs/2010.03759
    """
    logits, a = check.logits(logits, axis)
    t = check.temperature(temperature)
    if t is None:
        return -sm.logsumexp(logits, axis=a)
    x = num.upcast(logits)
    t = jnp.asarray(t, x.dtype)
    # -inf logits go through `where`, not through x/t: d(x/t)/dt = -x/t² would be +inf
    # there and turn the (zero-weighted) temperature gradient into NaN.
    finite = ~jnp.isneginf(x)
    u = jnp.where(finite, x, 0.0) / t
    lse = sm.logsumexp(u, axis=a, where=finite)
    # An empty row's energy is +inf; keep -inf out of the product so that its (zero)
    # cotangent does not meet an infinite partial derivative (0·inf = NaN).
    empty = lse == -jnp.inf
    energy = -t * jnp.where(empty, 0.0, lse)
    return jnp.where(empty, jnp.inf, energy).astype(logits.dtype)


def predict_with_rejection(
    logits: ArrayLike,
    *,
    threshold: ArrayLike,
    score: str = "msp",
    temperature: ArrayLike = 1.0,
    reject_label: int = -1,
    axis: int = -1,
) -> jax.Array:
    r"""Arg-max prediction that answers ``reject_label`` ("unknown") for doubtful inputs.

    .. math::
        \hat y = \begin{cases}
            \text{reject\_label} & \text{if } \mathrm{MSP}(z; T) < \tau
              \ (\texttt{score="msp"}) \text{ or } E(z; T) > \tau \ (\texttt{score="energy"}) \\
            \arg\max_k z_k & \text{otherwise}
        \end{cases}

    A score exactly at the threshold is accepted. The arg-max ignores ``temperature``
    (it does not change the ranking); the score uses it. A row with no admissible class
    is always rejected (MSP 0, energy ``+inf``) unless the threshold says otherwise
    (``τ <= 0`` for MSP).

    Args:
      logits: scores ``(..., C)`` with the class axis at ``axis``.
      threshold: the score threshold ``τ`` (scalar or broadcastable to the batch shape;
        may be traced). Typically chosen on known-class validation data, e.g. the 5 %
        quantile of their MSP so that 95 % of known inputs are kept.
      score: ``"msp"`` (:func:`max_softmax_probability`, reject below ``τ``) or
        ``"energy"`` (:func:`energy_score`, reject above ``τ``).
      temperature: positive scalar ``T`` passed to the score.
      reject_label: the label returned for rejected inputs (default ``-1``).
      axis: the class axis.

    Returns:
      int32 predictions with the shape of ``logits`` minus the class axis.

    Raises:
      ValueError: for an unknown ``score``.

    Examples:
      >>> import jsoftmax as jsm
      >>> z = jnp.array([[4.0, 0.0, 0.0], [0.1, 0.0, 0.2]])
      >>> jsm.predict_with_rejection(z, threshold=0.5)
      Array([ 0, -1], dtype=int32)

    References:
      Hendrycks, Gimpel. "A Baseline for Detecting Misclassified and Out-of-Distribution
      Examples in Neural Networks", ICLR 2017. https://arxiv.org/abs/1610.02136

      Liu, Wang, Owens, Li. "Energy-based Out-of-distribution Detection", NeurIPS 2020.
      https://arxiv.org/abs/2010.03759
    """
    check.choice(score, "score", SCORES)
    logits, a = check.logits(logits, axis)
    threshold = jnp.asarray(threshold)
    batch_shape = logits.shape[:a] + logits.shape[a + 1 :]
    check.broadcastable(threshold, batch_shape, "threshold")
    if score == "msp":
        unknown = max_softmax_probability(logits, temperature=temperature, axis=a) < threshold
    else:
        unknown = energy_score(logits, temperature=temperature, axis=a) > threshold
    pred = jnp.argmax(logits, axis=a).astype(jnp.int32)
    reject_label = check.static_int(reject_label, "reject_label")
    return jnp.where(unknown, jnp.int32(reject_label), pred)

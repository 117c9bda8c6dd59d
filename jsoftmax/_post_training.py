"""Post-training losses: preference (DPO family) and policy-gradient (GRPO/PPO family).

The losses take log-probabilities, whatever computed them: per-sequence sums or
length-averages for the preference losses, per-token values for the policy-gradient
loss. :func:`linear_token_logprobs` gives the per-token log-probabilities of sampled
tokens straight from the hidden states and the LM head through
:func:`jsoftmax.linear_softmax_stats`, so no ``(B·T, V)`` logits exist on either path;
:func:`sequence_logprobs` turns them into the per-sequence values.

Every formula is written in a form that stays finite where training ends up:
log-sigmoids instead of ``log(sigmoid(.))``; ORPO's ``log(1 - e^c)`` through
``_numerics.log1mexp`` with an analytic derivative that stays finite as ``c → 0⁻``
(the product of a vanishing sigmoid and an exploding ``1/(1 - e^c)`` is formed in log
space); the k3 KL estimator as ``expm1(d) - d`` and importance ratios from log-ratios
that saturate at ``e^80`` (``_numerics.saturate``) instead of overflowing. Padded
tokens are replaced before any arithmetic, so junk values there (``-inf``, NaN) give
neither a NaN value nor a NaN gradient. The metrics trainers log come from the same
pass, under ``stop_gradient``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jsoftmax import _numerics as num
from jsoftmax import _validate as check
from jsoftmax._large_vocab import linear_softmax_stats

_DPO_TYPES = ("sigmoid", "robust", "hinge", "ipo")
_GRPO_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
_IS_LEVELS = ("token", "sequence")
# Log-ratios (and the KL estimator's ref - logps) saturate here: e^80 ≈ 5.5e34 leaves
# float32 (max 3.4e38) room for the advantage, β and the sums; see `_numerics.saturate`.
_MAX_LOG_RATIO = 80.0


class PreferenceMetrics(NamedTuple):
    r"""What preference trainers log, per pair, from :func:`dpo_loss`, :func:`simpo_loss`
    and :func:`orpo_loss` with ``return_metrics=True``.

    Every field has the pairs' shape and carries no gradient (``stop_gradient``); take
    ``.mean()`` to log it (or ``psum`` the sums across devices first).

    Attributes:
      chosen_rewards: the implicit reward of the chosen answer: ``β·(c - c_ref)`` for
        DPO, ``β·c`` for SimPO and ORPO (as TRL logs them).
      rejected_rewards: the same for the rejected answer.
      reward_margin: ``chosen_rewards - rejected_rewards``.
      reward_accuracy: 1.0 where ``chosen_rewards > rejected_rewards``, else 0.0.
    """

    chosen_rewards: jax.Array
    rejected_rewards: jax.Array
    reward_margin: jax.Array
    reward_accuracy: jax.Array


class GRPOMetrics(NamedTuple):
    r"""What policy-gradient trainers log, from :func:`grpo_loss` with ``return_metrics=True``.

    Scalars, means over the tokens the mask keeps (weighted by the mask), with no
    gradient; 0.0 when the mask keeps nothing. With ``importance_sampling_level=
    "sequence"`` each token carries its sequence's ratio.

    Attributes:
      clip_fraction_low: share of tokens whose ratio is below ``1 - ε_low`` with a
        negative advantage (the clipped branch is active there).
      clip_fraction_high: share with the ratio above ``1 + ε_high`` and a positive
        advantage.
      clip_fraction: the sum of the two (the regions are disjoint).
      mean_kl: mean k3 KL estimate ``e^{d} - d - 1``, ``d = ref - logps``; ``None``
        without ``ref_logps``.
      mean_ratio: mean importance ratio ``ρ``.
    """

    clip_fraction_low: jax.Array
    clip_fraction_high: jax.Array
    clip_fraction: jax.Array
    mean_kl: jax.Array | None
    mean_ratio: jax.Array


# ------------------------------------------------------------------ shared pieces


def _pairs(arrays: dict[str, ArrayLike]) -> tuple[list[jax.Array], Any]:
    """The per-pair inputs as arrays of one shape, upcast to the accumulation dtype."""
    names = list(arrays)
    first = check.float_array(arrays[names[0]], names[0])
    out = [first] + [check.same_shape(arrays[n], first.shape, n, names[0]) for n in names[1:]]
    acc = num.acc_dtype(jnp.result_type(*(a.dtype for a in out)))
    return [a.astype(acc) for a in out], acc


def _reduce(losses: jax.Array, reduction: str) -> jax.Array:
    if reduction == "none":
        return losses
    total = jnp.sum(losses)
    if reduction == "sum":
        return total
    return num.mean_of(total, jnp.asarray(losses.size, losses.dtype))


def _smoothed_sigmoid(u: jax.Array, eps: float) -> jax.Array:
    """``-(1-ε)·logσ(u) - ε·logσ(-u)``: the pair's label flipped with probability ``ε``."""
    loss = -jax.nn.log_sigmoid(u)
    if eps:
        loss = (1.0 - eps) * loss - eps * jax.nn.log_sigmoid(-u)
    return loss


def _preference_metrics(chosen_rewards, rejected_rewards):
    c, r = jax.lax.stop_gradient(chosen_rewards), jax.lax.stop_gradient(rejected_rewards)
    return PreferenceMetrics(c, r, c - r, (c > r).astype(c.dtype))


def _positive_beta(beta: Any) -> float:
    return check.static_number(beta, "beta", lo=0.0, lo_open=True)


# ------------------------------------------------------------------ preference losses


def dpo_loss(
    chosen_logps: ArrayLike,
    rejected_logps: ArrayLike,
    ref_chosen_logps: ArrayLike,
    ref_rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    return_metrics: bool = False,
) -> jax.Array | tuple[jax.Array, PreferenceMetrics]:
    r"""Direct preference optimisation and its variants, on per-sequence log-probabilities.

    With ``c, r`` the policy's log-probabilities of the chosen and rejected answers
    (summed over their tokens), ``c_ref, r_ref`` the reference model's,
    ``h = (c - r) - (c_ref - r_ref)`` and ``u = β·h``:

    .. math::
        \mathrm{sigmoid:}\ -(1-ε)\log σ(u) - ε\log σ(-u) \qquad
        \mathrm{robust:}\ \frac{-(1-ε)\log σ(u) + ε\log σ(-u)}{1-2ε}

    .. math::
        \mathrm{hinge:}\ \max(0, 1 - u) \qquad
        \mathrm{ipo:}\ \Bigl(h - \frac{1}{2β}\Bigr)^2

    ``"sigmoid"`` is DPO, with ``label_smoothing = ε > 0`` conservative DPO (the pair's
    label is wrong with probability ``ε``); ``"robust"`` is the unbiased robust-DPO
    estimator under the same noise model; ``"hinge"`` is SLiC's hinge on the DPO
    margin; ``"ipo"`` is IPO's squared loss (``h`` is not multiplied by ``β`` there:
    ``β`` is IPO's ``τ``). These are the formulas of TRL's ``DPOTrainer`` for the same
    ``loss_type`` names. Log-sigmoids are evaluated directly, so a margin of ``±1e4``
    gives the exact finite loss and gradient, not ``inf``/NaN.

    The four inputs may come from anywhere: :func:`sequence_logprobs` of
    :func:`linear_token_logprobs` (no logits), log-softmax of logits, a cached
    reference. All four are differentiated; compute the reference's under
    ``jax.lax.stop_gradient`` (or outside the gradient).

    Args:
      chosen_logps: the policy's log-probability of each chosen answer, any shape
        (one entry per pair).
      rejected_logps: the policy's log-probability of each rejected answer.
      ref_chosen_logps: the reference model's log-probability of each chosen answer.
      ref_rejected_logps: the reference model's log-probability of each rejected answer.
      beta: ``β > 0``, the strength of the implicit KL penalty (IPO's ``τ``), a Python
        number.
      loss_type: ``"sigmoid"``, ``"robust"``, ``"hinge"`` or ``"ipo"``.
      label_smoothing: ``ε``, the probability that a pair's preference is flipped;
        ``[0, 0.5]`` for ``"sigmoid"``, ``[0, 0.5)`` for ``"robust"`` (it divides by
        ``1 - 2ε``); must be 0 for ``"hinge"`` and ``"ipo"``.
      reduction: ``"mean"`` (over pairs; 0.0 for no pairs), ``"sum"`` or ``"none"``.
      return_metrics: also return a :class:`jsoftmax.PreferenceMetrics` of the
        implicit rewards ``β·(c - c_ref)``, ``β·(r - r_ref)``.

    Returns:
      The loss (a scalar, or per pair for ``"none"``), float32 (float64 for float64
      inputs); with ``return_metrics`` the tuple ``(loss, metrics)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax as jsm
      >>> c, r = jnp.array([-10.0, -12.0]), jnp.array([-14.0, -11.0])
      >>> c_ref, r_ref = jnp.array([-11.0, -12.0]), jnp.array([-13.0, -12.0])
      >>> round(float(jsm.dpo_loss(c, r, c_ref, r_ref, beta=0.5)), 4)
      0.6437
      >>> loss, m = jsm.dpo_loss(c, r, c_ref, r_ref, beta=0.5, return_metrics=True)
      >>> m.chosen_rewards.tolist(), m.reward_accuracy.tolist()
      ([0.5, 0.0], [1.0, 0.0])
      >>> jsm.dpo_loss(c, r, c_ref, r_ref, loss_type="ipo", reduction="none").tolist()
      [9.0, 36.0]

    References:
      Rafailov et al. 2023, "Direct Preference Optimization",
      https://arxiv.org/abs/2305.18290 ; Mitchell 2023, "A Note on DPO with Noisy
      Preferences & Relationship to IPO" (cDPO),
      https://ericmitchell.ai/cdpo.pdf ; Chowdhury et al. 2024, "Provably Robust DPO",
      https://arxiv.org/abs/2403.00409 ; Zhao et al. 2023, "SLiC-HF",
      https://arxiv.org/abs/2305.10425 (hinge) ; Azar et al. 2023, "A General
      Theoretical Paradigm to Understand Learning from Human Preferences" (IPO),
      https://arxiv.org/abs/2310.12036 .
    """
    beta = _positive_beta(beta)
    check.loss_type(loss_type, _DPO_TYPES)
    if loss_type in ("sigmoid", "robust"):
        eps = check.label_smoothing(label_smoothing, hi=0.5, hi_open=loss_type == "robust")
    else:
        eps = check.label_smoothing(label_smoothing, hi=0.5)
        if eps != 0.0:
            raise ValueError(
                f"`label_smoothing` is only defined for loss_type 'sigmoid' and 'robust'; "
                f"got {eps} with loss_type={loss_type!r}."
            )
    reduction = check.reduction(reduction)
    (c, r, c_ref, r_ref), _ = _pairs(
        {
            "chosen_logps": chosen_logps,
            "rejected_logps": rejected_logps,
            "ref_chosen_logps": ref_chosen_logps,
            "ref_rejected_logps": ref_rejected_logps,
        }
    )
    h = (c - r) - (c_ref - r_ref)
    u = beta * h
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(u, eps)
    elif loss_type == "robust":
        losses = (-(1.0 - eps) * jax.nn.log_sigmoid(u) + eps * jax.nn.log_sigmoid(-u)) / (
            1.0 - 2.0 * eps
        )
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - u)
    else:
        losses = jnp.square(h - 1.0 / (2.0 * beta))
    loss = _reduce(losses, reduction)
    if not return_metrics:
        return loss
    return loss, _preference_metrics(beta * (c - c_ref), beta * (r - r_ref))


def simpo_loss(
    chosen_logps: ArrayLike,
    rejected_logps: ArrayLike,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    return_metrics: bool = False,
) -> jax.Array | tuple[jax.Array, PreferenceMetrics]:
    r"""SimPO: a reference-free preference loss on length-averaged log-probabilities.

    With ``c, r`` the policy's *mean* per-token log-probabilities of the chosen and
    rejected answers (``sequence_logprobs(..., average=True)``) and
    ``u = β·(c - r) - γ``:

    .. math::
        \ell = -(1-ε)\log σ(u) - ε\log σ(-u),

    ``γ`` the target reward margin; ``ε`` smooths the label as in :func:`dpo_loss`'s
    ``"sigmoid"``. TRL's ``CPOTrainer(loss_type="simpo")`` writes the same with
    ``γ/β`` as its ``simpo_gamma`` ratio inside ``β·(·)``.

    Args:
      chosen_logps: the policy's length-averaged log-probability of each chosen
        answer, any shape (one entry per pair).
      rejected_logps: the same for each rejected answer.
      beta: ``β > 0``, the reward scale, a Python number.
      gamma: ``γ``, the target reward margin, a finite Python number.
      label_smoothing: ``ε`` in ``[0, 0.5]``.
      reduction: ``"mean"`` (over pairs), ``"sum"`` or ``"none"``.
      return_metrics: also return a :class:`jsoftmax.PreferenceMetrics` with the
        rewards ``β·c``, ``β·r``.

    Returns:
      The loss (a scalar, or per pair for ``"none"``), float32 (float64 for float64
      inputs); with ``return_metrics`` the tuple ``(loss, metrics)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax as jsm
      >>> c, r = jnp.array([-0.5, -1.0]), jnp.array([-1.5, -0.75])
      >>> [round(v, 4) for v in jsm.simpo_loss(c, r, reduction="none").tolist()]
      [0.2014, 1.3133]

    References:
      Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
      Reward", https://arxiv.org/abs/2405.14734 .
    """
    beta = _positive_beta(beta)
    gamma = check.static_number(gamma, "gamma")
    eps = check.label_smoothing(label_smoothing, hi=0.5)
    reduction = check.reduction(reduction)
    (c, r), _ = _pairs({"chosen_logps": chosen_logps, "rejected_logps": rejected_logps})
    loss = _reduce(_smoothed_sigmoid(beta * (c - r) - gamma, eps), reduction)
    if not return_metrics:
        return loss
    return loss, _preference_metrics(beta * c, beta * r)


def _clamp_below_zero(x: jax.Array) -> jax.Array:
    """``min(x, -tiny)``: a log-probability of exactly 0 (or a rounding-positive one)."""
    return jnp.minimum(x, -jnp.finfo(x.dtype).tiny)


def _log_odds_parts(c, r):
    c, r = _clamp_below_zero(c), _clamp_below_zero(r)
    l1c, l1r = num.log1mexp(c), num.log1mexp(r)
    return (c - r) - (l1c - l1r), l1c, l1r


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _orpo_per_pair(c, r, beta):
    log_odds, _, _ = _log_odds_parts(c, r)
    return -beta * jax.nn.log_sigmoid(log_odds)


@_orpo_per_pair.defjvp
def _orpo_per_pair_jvp(beta, primals, tangents):
    """``∂ℓ/∂c = -β σ(-x)/(1 - e^c)``, ``∂ℓ/∂r = β σ(-x)/(1 - e^r)``, ``x`` the log-odds.

    As ``c → 0⁻`` the first factor vanishes and the second explodes, while the product
    tends to ``-β e^r/(1 - e^r)``: formed as ``exp(log σ(-x) - log(1 - e^c))``, it stays
    finite and right, where plain autodiff gives ``0·inf`` or an underflowed 0.
    """
    c, r = primals
    dc, dr = tangents
    log_odds, l1c, l1r = _log_odds_parts(c, r)
    log_sig_neg = jax.nn.log_sigmoid(-log_odds)
    gc = -beta * jnp.exp(log_sig_neg - l1c)
    gr = beta * jnp.exp(log_sig_neg - l1r)
    return -beta * jax.nn.log_sigmoid(log_odds), gc * dc + gr * dr


def orpo_loss(
    chosen_logps: ArrayLike,
    rejected_logps: ArrayLike,
    *,
    beta: float = 0.1,
    reduction: str = "mean",
    return_metrics: bool = False,
) -> jax.Array | tuple[jax.Array, PreferenceMetrics]:
    r"""ORPO's odds-ratio term, on length-averaged log-probabilities.

    With ``c, r`` the policy's *mean* per-token log-probabilities of the chosen and
    rejected answers (``sequence_logprobs(..., average=True)``),

    .. math::
        x = \log\frac{\mathrm{odds}(c)}{\mathrm{odds}(r)}
          = (c - r) - \bigl(\log(1 - e^{c}) - \log(1 - e^{r})\bigr),
        \qquad \ell = -β\log σ(x).

    Only the odds-ratio term: ORPO's full objective adds the chosen answers' NLL
    (``-c``, or :func:`jsoftmax.linear_cross_entropy` on the chosen tokens), which the
    caller adds. ``β`` is ORPO's ``λ`` (TRL's ``ORPOTrainer`` ``beta``).

    The hand-written ``log(1 - exp(c))`` is ``-inf`` once the model is sure of the
    chosen answer (``c → 0⁻``); here ``log(1 - e^c)`` is computed with ``log1mexp``
    and the derivative analytically in log space, so value and gradient stay finite and
    converge to their limits (the loss to 0, ``∂ℓ/∂c`` to ``-β e^r/(1 - e^r)``). A
    log-probability of exactly 0, or a positive one from rounding, is taken as
    ``-tiny`` (the dtype's smallest normal number) for both the value and the
    gradient.

    Args:
      chosen_logps: the policy's length-averaged log-probability (``<= 0``) of each
        chosen answer, any shape (one entry per pair).
      rejected_logps: the same for each rejected answer.
      beta: ``β > 0`` (ORPO's ``λ``), a Python number.
      reduction: ``"mean"`` (over pairs), ``"sum"`` or ``"none"``.
      return_metrics: also return a :class:`jsoftmax.PreferenceMetrics` with the
        rewards ``β·c``, ``β·r``.

    Returns:
      The loss (a scalar, or per pair for ``"none"``), float32 (float64 for float64
      inputs); with ``return_metrics`` the tuple ``(loss, metrics)``.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import jsoftmax as jsm
      >>> c, r = jnp.array([-0.5, 0.0]), jnp.array([-1.0, -1.0])
      >>> [round(v, 4) for v in jsm.orpo_loss(c, r, reduction="none").tolist()]
      [0.032, 0.0]
      >>> g = jax.grad(lambda c: jsm.orpo_loss(c, r, reduction="sum"))(c)
      >>> [round(v, 4) for v in g.tolist()]  # finite at c = 0: -β e^r / (1 - e^r)
      [-0.0697, -0.0582]

    References:
      Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
      Model", https://arxiv.org/abs/2403.07691 ; Mächler 2012, "Accurately Computing
      ``log(1 - exp(-|a|))``" (``log1mexp``).
    """
    beta = _positive_beta(beta)
    reduction = check.reduction(reduction)
    (c, r), _ = _pairs({"chosen_logps": chosen_logps, "rejected_logps": rejected_logps})
    loss = _reduce(_orpo_per_pair(c, r, beta), reduction)
    if not return_metrics:
        return loss
    return loss, _preference_metrics(beta * c, beta * r)


# ------------------------------------------------------------- policy-gradient loss


# 1/k! for k = 2..9: the series of e^d - 1 - d, to float32 precision for |d| < 1/2.
_K3_SERIES = tuple(1.0 / math.factorial(k) for k in range(2, 10))


def _k3(d: jax.Array) -> jax.Array:
    """The k3 KL estimator ``e^d - d - 1``, accurate to a few ulp for every ``d <= 80``.

    ``expm1(d) - d`` for ``|d| >= 1/2``; below, where that difference cancels (at
    ``d = 1e-4`` it keeps 3 digits in float32), the Taylor series ``Σ_{k>=2} d^k/k!``
    to ``k = 9`` (truncation < 3e-9 relative). ``d`` saturates at 80: exact up to there,
    then the value and slope at 80.
    """
    d = num.saturate(d, _MAX_LOG_RATIO)
    small = jnp.abs(d) < 0.5
    x = jnp.where(small, d, 0.0)  # the series never sees a large d (no inf in its branch)
    series = jnp.zeros_like(x)
    for coef in reversed(_K3_SERIES):
        series = coef + x * series
    y = jnp.where(small, 1.0, d)
    return jnp.where(small, x * x * series, jnp.expm1(y) - y)


def grpo_loss(
    logps: ArrayLike,
    old_logps: ArrayLike,
    advantages: ArrayLike,
    mask: ArrayLike,
    *,
    ref_logps: ArrayLike | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    normalizer: ArrayLike | None = None,
    return_metrics: bool = False,
) -> jax.Array | tuple[jax.Array, GRPOMetrics]:
    r"""The clipped policy-gradient loss of GRPO, PPO, DAPO, Dr. GRPO and GSPO.

    Per token ``t`` of sequence ``i``, with ``A_i`` the advantage (or ``A_{it}``),

    .. math::
        ρ_{it} = e^{\log π(y_{it}) - \log π_{old}(y_{it})}, \qquad
        \ell_{it} = -\min\bigl(ρ_{it} A_i,\ \mathrm{clip}(ρ_{it}, 1-ε_{low}, 1+ε_{high}) A_i\bigr)
                    + β\,(e^{d_{it}} - d_{it} - 1),

    ``d = \log π_{ref} - \log π`` (Schulman's k3 estimator of ``KL(π‖π_ref)``, only
    with ``β > 0``). With ``importance_sampling_level="sequence"`` (GSPO) every token of
    sequence ``i`` uses ``ρ_i = exp(mean_t (\log π - \log π_{old}))`` over the tokens
    the mask keeps. The aggregation ``loss_type``, with ``m`` the mask:

    * ``"grpo"``: ``mean_i ( Σ_t m ℓ / max(Σ_t m, 1) )``, each sequence's masked mean,
      then the mean over all ``B`` sequences (DeepSeekMath);
    * ``"bnpo"``: ``Σ m ℓ / Σ m``, over the tokens this call keeps;
    * ``"dr_grpo"``: ``Σ m ℓ / (B · max_completion_length)`` (Dr. GRPO's constant);
    * ``"dapo"``: ``Σ m ℓ / normalizer``, the number of kept tokens across all
      micro-batches and devices of the step (DAPO's token-level mean); without
      ``normalizer``, this call's own count (then equal to ``"bnpo"``).

    These are TRL's ``GRPOTrainer`` definitions for the same names (``epsilon``,
    ``epsilon_high``, ``beta``, ``importance_sampling_level``). A fully masked sequence
    adds nothing (and counts in ``"grpo"``'s ``B``); a batch with nothing kept gives 0.0
    with a zero gradient; whatever the inputs hold at masked tokens (padding, ``-inf``)
    never reaches the value or the gradient.

    **Numerics.** The ratio comes from the log-ratio, which saturates at 80
    (``ρ <= e^80 ≈ 5.5e34``) with its gradient kept at the saturated slope; likewise
    the KL term is ``expm1(d) - d`` (a Taylor series for ``|d| < 1/2``, where that
    difference cancels), exact to float32 rounding for ``d <= 80`` (``≈ 5.5e34`` at 80,
    finite in float32) and held at its value and slope at 80 beyond, where
    ``exp(ref - logps)`` written by hand overflows from ``d ≈ 88.7``.

    Args:
      logps: ``(B, T)`` per-token log-probabilities of the sampled tokens under the
        policy being trained (e.g. :func:`linear_token_logprobs`).
      old_logps: ``(B, T)`` the same under the policy that sampled them; pass
        ``jax.lax.stop_gradient(logps)`` for one update per generation (then ``ρ = 1``
        in value, with the policy gradient).
      advantages: ``(B,)`` per-sequence advantages (e.g. group-normalised rewards), or
        ``(B, T)`` per-token ones (PPO with GAE).
      mask: ``(B, T)`` which tokens count: bool, 0/1 or float weights.
      ref_logps: ``(B, T)`` per-token log-probabilities under the reference policy;
        needed when ``beta > 0``.
      beta: ``β >= 0``, the KL coefficient, a Python number.
      epsilon_low: ``ε_low`` in ``[0, 1]``, the lower clip range.
      epsilon_high: ``ε_high >= 0``, the upper clip range (DAPO's clip-higher);
        ``None`` for ``ε_low``.
      loss_type: ``"dapo"``, ``"grpo"``, ``"bnpo"`` or ``"dr_grpo"``, see above.
      importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO).
      max_completion_length: the constant of ``"dr_grpo"``, a Python int; ``None`` for
        the padded length ``T``. Only with ``loss_type="dr_grpo"``.
      normalizer: the global token count of ``"dapo"`` (e.g. the ``psum`` over devices
        of ``mask.sum()``, summed over micro-batches): a positive number or a scalar
        array (0 gives 0.0). Only with ``loss_type="dapo"``.
      return_metrics: also return a :class:`jsoftmax.GRPOMetrics` (clip fractions,
        mean KL, mean ratio) from the same pass.

    Returns:
      The scalar loss, float32 (float64 for float64 inputs); with ``return_metrics``
      the tuple ``(loss, metrics)``.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import jsoftmax as jsm
      >>> logps = jnp.array([[-1.0, -2.0, 0.0], [-0.5, -0.7, -0.9]])
      >>> old = jnp.array([[-1.2, -1.5, 0.0], [-0.5, -0.2, -0.9]])
      >>> adv = jnp.array([1.0, -0.5])
      >>> mask = jnp.array([[True, True, False], [True, True, True]])
      >>> round(float(jsm.grpo_loss(logps, old, adv, mask)), 4)
      -0.0813
      >>> loss, m = jsm.grpo_loss(logps, old, adv, mask, loss_type="grpo",
      ...                         return_metrics=True)
      >>> round(float(loss), 4), round(float(m.clip_fraction_high), 4)
      (-0.2183, 0.2)

    References:
      Shao et al. 2024, "DeepSeekMath" (GRPO), https://arxiv.org/abs/2402.03300 ;
      Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
      https://arxiv.org/abs/1707.06347 ; Yu et al. 2025, "DAPO",
      https://arxiv.org/abs/2503.14476 ; Liu et al. 2025, "Understanding R1-Zero-Like
      Training: A Critical Perspective" (Dr. GRPO), https://arxiv.org/abs/2503.20783 ;
      Zheng et al. 2025, "Group Sequence Policy Optimization" (GSPO),
      https://arxiv.org/abs/2507.18071 ; Schulman 2020, "Approximating KL Divergence"
      (k3), http://joschu.net/blog/kl-approx.html .
    """
    check.loss_type(loss_type, _GRPO_TYPES)
    check.choice(importance_sampling_level, "importance_sampling_level", _IS_LEVELS)
    beta = check.static_number(beta, "beta", lo=0.0)
    eps_low = check.static_number(epsilon_low, "epsilon_low", lo=0.0, hi=1.0)
    eps_high = check.static_number(epsilon_high, "epsilon_high", lo=0.0, optional=True)
    eps_high = eps_low if eps_high is None else eps_high
    max_len = check.static_int(max_completion_length, "max_completion_length", minimum=1,
                               optional=True)  # fmt: skip
    if max_len is not None and loss_type != "dr_grpo":
        raise ValueError(
            f"`max_completion_length` is the constant of loss_type='dr_grpo'; got "
            f"loss_type={loss_type!r}."
        )
    if normalizer is not None and loss_type != "dapo":
        raise ValueError(
            f"`normalizer` is the global token count of loss_type='dapo'; got "
            f"loss_type={loss_type!r}."
        )
    normalizer = check.normalizer(normalizer, "mean")

    lp = check.float_array(logps, "logps")
    if lp.ndim != 2:
        raise ValueError(f"`logps` must have shape (B, T) (sequences, tokens), got {lp.shape}.")
    shape = lp.shape
    old = check.same_shape(old_logps, shape, "old_logps", "logps")
    m = check.token_mask(mask, shape, "logps")
    adv = check.float_array(advantages, "advantages")
    if adv.shape not in (shape[:1], shape):
        raise ValueError(
            f"`advantages` has shape {adv.shape}; expected {shape[:1]} (one per sequence) "
            f"or {shape} (one per token), from `logps` of shape {shape}."
        )
    if beta > 0.0 and ref_logps is None:
        raise ValueError("`ref_logps` is needed for the KL term when `beta` > 0.")
    ref = None if ref_logps is None else check.same_shape(ref_logps, shape, "ref_logps", "logps")

    dtypes = [a.dtype for a in (lp, old, adv) + (() if ref is None else (ref,))]
    acc = num.acc_dtype(jnp.result_type(*dtypes))
    keep = m != 0
    m = m.astype(acc)
    # Masked tokens are replaced before any arithmetic: junk there (-inf, NaN) must reach
    # neither the value nor, through the untaken branch of a `where`, the gradient.
    lp = jnp.where(keep, lp.astype(acc), 0.0)
    old = jnp.where(keep, old.astype(acc), 0.0)
    adv = adv.astype(acc)
    if adv.ndim == 1:
        adv = adv[:, None]
    adv = jnp.where(keep, adv, 0.0)

    log_ratio = lp - old
    if importance_sampling_level == "sequence":
        count = jnp.sum(m, axis=1, keepdims=True)
        log_ratio = jnp.sum(m * log_ratio, axis=1, keepdims=True) / jnp.maximum(count, 1.0)
        log_ratio = jnp.broadcast_to(log_ratio, shape)
    ratio = jnp.exp(num.saturate(log_ratio, _MAX_LOG_RATIO))
    clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    kl = None
    if ref is not None:
        kl = jnp.where(keep, _k3(jnp.where(keep, ref.astype(acc), 0.0) - lp), 0.0)
        if beta > 0.0:
            per_token = per_token + beta * kl
    per_token = m * per_token

    if loss_type == "grpo":
        per_seq = jnp.sum(per_token, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        loss = jnp.mean(per_seq)
    elif loss_type == "dr_grpo":
        loss = jnp.sum(per_token) / (shape[0] * (max_len or shape[1]))
    else:
        loss = num.mean_of(jnp.sum(per_token), jnp.sum(m), normalizer)
    if not return_metrics:
        return loss

    sg = jax.lax.stop_gradient
    ratio, adv, m = sg(ratio), sg(adv), sg(m)
    total = jnp.sum(m)

    def mean(x):
        return num.mean_of(jnp.sum(m * x), total)

    low = ((ratio < 1.0 - eps_low) & (adv < 0)).astype(acc)
    high = ((ratio > 1.0 + eps_high) & (adv > 0)).astype(acc)
    metrics = GRPOMetrics(
        clip_fraction_low=mean(low),
        clip_fraction_high=mean(high),
        clip_fraction=mean(low + high),
        mean_kl=None if kl is None else mean(sg(kl)),
        mean_ratio=mean(ratio),
    )
    return loss, metrics


# ------------------------------------------------------- log-probabilities from a head


def linear_token_logprobs(
    hidden: ArrayLike,
    linear_weight: ArrayLike,
    labels: ArrayLike,
    *,
    mask: ArrayLike | None = None,
    linear_bias: ArrayLike | None = None,
    weight_layout: str = "dv",
    temperature: float = 1.0,
    logit_softcap: float | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    axis_name: Any = None,
    filter_eps: float | str | None = None,
    vocab_order: ArrayLike | None = None,
) -> jax.Array:
    r"""Per-token log-probabilities of given tokens under an LM head, without the logits.

    ``log p(y_t) = u_{t y_t} - \log Σ_c e^{u_{tc}}`` with ``u = z / T`` and
    ``z = c·tanh((h W + b)/c)`` (``c = logit_softcap``), the distribution a sampler at
    temperature ``T`` draws from, so the log-probabilities of a rollout sampled at
    ``T`` match the sampler's. Computed by :func:`jsoftmax.linear_softmax_stats` in
    vocabulary chunks: neither the ``(B·T, V)`` logits nor their gradient exist, in the
    forward or the backward pass. The inputs of the post-training losses: feed them to
    :func:`grpo_loss` per token, or through :func:`sequence_logprobs` to
    :func:`dpo_loss`, :func:`simpo_loss` and :func:`orpo_loss`. For a frozen reference
    head, call it under ``jax.lax.stop_gradient`` (or outside the gradient).

    Reverse-mode differentiable in ``hidden``, ``linear_weight`` and ``linear_bias``.
    ``filter_eps`` skips the backward's negligible vocabulary tiles with the bound of
    :func:`jsoftmax.linear_cross_entropy`, where each token's target mass ``T_i`` is
    the magnitude of the loss's cotangent of its log-probability (the large-vocabulary
    guide states the bound).

    Args:
      hidden: ``(..., D)`` activations, e.g. ``(B, T, D)``, any float dtype.
      linear_weight: ``(D, V)`` with ``weight_layout="dv"``, ``(V, D)`` with ``"vd"``.
      labels: integer token ids of shape ``hidden.shape[:-1]`` (the sampled tokens).
      mask: optional bool (or 0/1) array of the labels' shape: where it is False the
        label is not looked at (padding may hold any id) and the log-probability is 0
        with a zero gradient.
      linear_bias: optional ``(V,)`` bias.
      weight_layout: ``"dv"`` or ``"vd"``.
      temperature: the sampler's ``T > 0``, a Python number.
      logit_softcap: optional ``c > 0``, applied before the temperature.
      ignore_index: label value treated as masked.
      chunk_size: vocabulary entries per chunk, as in
        :func:`jsoftmax.linear_cross_entropy`.
      axis_name: the mesh axis over which the head is sharded along the vocabulary,
        inside ``jax.shard_map``.
      filter_eps: gradient filtering, as in :func:`jsoftmax.linear_cross_entropy`.
      vocab_order: a permuted ``linear_weight``'s order, as in
        :func:`jsoftmax.linear_cross_entropy`.

    Returns:
      The log-probabilities, the labels' shape, float32 (float64 for float64 inputs).

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import jsoftmax as jsm
      >>> h = jax.random.normal(jax.random.key(0), (2, 3, 4))  # (B, T, D)
      >>> w = jax.random.normal(jax.random.key(1), (4, 10))  # (D, V)
      >>> tokens = jnp.array([[1, 2, 3], [4, 5, 0]])
      >>> mask = jnp.array([[True, True, True], [True, True, False]])
      >>> lp = jsm.linear_token_logprobs(h, w, tokens, mask=mask, temperature=0.7)
      >>> ref = jnp.take_along_axis(jax.nn.log_softmax(h @ w / 0.7), tokens[..., None], -1)
      >>> bool(jnp.allclose(lp, jnp.where(mask, ref[..., 0], 0.0), atol=1e-5))
      True

    References:
      Wijmans et al. 2025, "Cut Your Losses in Large-Vocabulary Language Models",
      https://arxiv.org/abs/2411.09009 .
    """
    ignore_index = check.ignore_index(ignore_index)
    labels = jnp.asarray(labels)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != labels.shape:
            raise ValueError(
                f"`mask` has shape {mask.shape}; expected {labels.shape}, the shape of `labels`."
            )
        keep = mask.astype(bool)
        if jnp.issubdtype(labels.dtype, jnp.integer):
            labels = jnp.where(keep, check.widen_labels(labels), ignore_index)
    stats = linear_softmax_stats(
        hidden,
        linear_weight,
        labels,
        weight_layout=weight_layout,
        linear_bias=linear_bias,
        temperature=temperature,
        logit_softcap=logit_softcap,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        axis_name=axis_name,
        filter_eps=filter_eps,
        vocab_order=vocab_order,
    )
    return stats.label_logprob


def sequence_logprobs(logps: ArrayLike, mask: ArrayLike, *, average: bool = False) -> jax.Array:
    r"""Per-sequence log-probabilities from per-token ones: the masked sum or mean.

    ``Σ_t m_t \log p_t`` (DPO's ``\log π(y|x)``), or with ``average=True`` that sum over
    ``Σ_t m_t`` (the length-normalised log-probability of SimPO and ORPO). A sequence
    whose mask keeps nothing gives 0 (with a zero gradient), never NaN; masked tokens'
    values (``-inf``, NaN) are not read.

    Args:
      logps: ``(..., T)`` per-token log-probabilities (e.g. :func:`linear_token_logprobs`).
      mask: the same shape: bool, 0/1 or float weights.
      average: divide by the kept-token count instead of summing.

    Returns:
      ``logps.shape[:-1]``, float32 (float64 for float64 inputs).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax as jsm
      >>> lp = jnp.array([[-1.0, -2.0, -jnp.inf], [-0.5, -0.5, -0.5]])
      >>> mask = jnp.array([[1, 1, 0], [1, 1, 1]])
      >>> jsm.sequence_logprobs(lp, mask).tolist()
      [-3.0, -1.5]
      >>> jsm.sequence_logprobs(lp, mask, average=True).tolist()
      [-1.5, -0.5]
    """
    lp = check.float_array(logps, "logps")
    if lp.ndim == 0:
        raise ValueError("`logps` must have a token axis (the last one), got a scalar.")
    m = check.token_mask(mask, lp.shape, "logps")
    lp = lp.astype(num.acc_dtype(lp.dtype))
    m = m.astype(lp.dtype)
    total = jnp.sum(m * jnp.where(m != 0, lp, 0.0), axis=-1)
    if not average:
        return total
    return num.mean_of(total, jnp.sum(m, axis=-1))

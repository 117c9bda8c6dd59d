"""Tests for jsoftmax/_post_training.py: preference and policy-gradient losses.

Every reference below is written here from the papers' formulas, in float64 (jax with
x64 enabled, so that ``jax.grad`` of the reference gives the float64 gradient) and in a
different shape from the library code: per-sequence loops over the kept tokens, the
textbook ``log σ(u) = -log(1 + e^{-u})`` and ``e^d - d - 1``, no masking tricks.

Tolerances: the library computes in float32. A value is a handful of float32 operations
on O(1)..O(100) inputs, so ``rtol=1e-5`` (about 80 ulp) covers rounding; gradients go
through one more multiply and a division by the token count, ``rtol=1e-5, atol=1e-7``.
The fused path (chunked logsumexp against a materialised ``log_softmax``) differs by
float32 summation order over the vocabulary: ``rtol=2e-5`` on values, relative
Frobenius error ``< 1e-5`` on gradients.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jsoftmax as jsm
from jsoftmax import _compat
from jsoftmax._bench import lm_head_inputs

RTOL, ATOL = 1e-5, 1e-7


def f64(x):
    return np.asarray(x, np.float64)


def rel_err(a, b):
    a, b = f64(a), f64(b)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


# ------------------------------------------------------------------------ references


def ref_log_sigmoid(u):
    # log σ(u) = -log(1 + e^{-u}), written so that float64 does not overflow either way.
    return jnp.where(u >= 0, -jnp.log1p(jnp.exp(-u)), u - jnp.log1p(jnp.exp(u)))


def ref_dpo_pair(c, r, cr, rr, beta, loss_type, eps):
    """Per-pair DPO-family loss (Rafailov 2023; cDPO; Chowdhury 2024; SLiC; Azar 2023)."""
    h = (c - r) - (cr - rr)
    u = beta * h
    if loss_type == "sigmoid":
        return -(1 - eps) * ref_log_sigmoid(u) - eps * ref_log_sigmoid(-u)
    if loss_type == "robust":
        return (-(1 - eps) * ref_log_sigmoid(u) + eps * ref_log_sigmoid(-u)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return jnp.maximum(0.0, 1.0 - u)
    return (h - 1 / (2 * beta)) ** 2


def ref_simpo_pair(c, r, beta, gamma, eps):
    u = beta * (c - r) - gamma
    return -(1 - eps) * ref_log_sigmoid(u) - eps * ref_log_sigmoid(-u)


def ref_orpo_pair(c, r, beta):
    """Hong 2024: odds(p) = p / (1 - p) with p = e^c."""
    log_odds = (c - r) - (jnp.log(-jnp.expm1(c)) - jnp.log(-jnp.expm1(r)))
    return -beta * ref_log_sigmoid(log_odds)


def reduce_ref(per, reduction):
    return {"none": per, "sum": jnp.sum(per), "mean": jnp.mean(per)}[reduction]


def ref_grpo(lp, old, adv, mask, ref=None, *, beta=0.0, el=0.2, eh=None, loss_type="dapo",
             level="token", max_len=None, normalizer=None):  # fmt: skip
    """TRL-style GRPO from DeepSeekMath / DAPO / Dr. GRPO / GSPO, one sequence at a time.

    ``mask`` is a numpy bool array (static); the kept tokens are gathered per sequence.
    """
    eh = el if eh is None else eh
    mask = np.asarray(mask, bool)
    b, t = mask.shape
    seq_sums, seq_counts = [], []
    for i in range(b):
        idx = np.nonzero(mask[i])[0]
        if idx.size == 0:
            seq_sums.append(jnp.zeros(()))
            seq_counts.append(0)
            continue
        lpi, oldi = lp[i, idx], old[i, idx]
        a = adv[i] if adv.ndim == 1 else adv[i, idx]
        if level == "token":
            rho = jnp.exp(lpi - oldi)
        else:
            rho = jnp.exp(jnp.mean(lpi - oldi)) * jnp.ones(idx.size)
        loss = -jnp.minimum(rho * a, jnp.clip(rho, 1 - el, 1 + eh) * a)
        if beta > 0:
            d = ref[i, idx] - lpi
            loss = loss + beta * (jnp.exp(d) - d - 1)
        seq_sums.append(jnp.sum(loss))
        seq_counts.append(idx.size)
    total = sum(seq_sums)
    if loss_type == "grpo":
        return sum(s / max(n, 1) for s, n in zip(seq_sums, seq_counts, strict=True)) / b
    if loss_type == "dr_grpo":
        return total / (b * (max_len or t))
    den = sum(seq_counts) if normalizer is None else normalizer
    return total / den if den else total * 0.0


# ----------------------------------------------------------------------- helpers


def pairs(rng, n=6, scale=3.0):
    c = -rng.uniform(5, 30, n)
    r = -rng.uniform(5, 30, n)
    cr = c + rng.normal(0, scale, n)
    rr = r + rng.normal(0, scale, n)
    return [a.astype(np.float32) for a in (c, r, cr, rr)]


def check_value_and_grad(ours, ref, args, *, rtol=RTOL, atol=ATOL):
    """``ours`` (float32) against ``ref`` (float64 jax), value and gradient in every arg."""
    argnums = tuple(range(len(args)))
    val, grads = jax.jit(jax.value_and_grad(ours, argnums))(
        *[jnp.asarray(a, jnp.float32) for a in args]
    )
    with _compat.enable_x64(True):
        rval, rgrads = jax.jit(jax.value_and_grad(ref, argnums))(
            *[jnp.asarray(f64(a)) for a in args]
        )
        rval, rgrads = f64(rval), [f64(g) for g in rgrads]
    np.testing.assert_allclose(f64(val), rval, rtol=rtol, atol=atol)
    for g, rg in zip(grads, rgrads, strict=True):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(f64(g), rg, rtol=rtol, atol=atol)
    return val, grads


# ------------------------------------------------------------------- DPO family


DPO_CASES = [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.5), ("robust", 0.0),
             ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)]  # fmt: skip


# Every loss type with "mean"; the other reductions on two types by default, all in slow.
DPO_GRID = [
    pytest.param(lt, eps, red, marks=() if red == "mean" or (lt, eps) in DPO_CASES[1::5] else
                 pytest.mark.slow)
    for lt, eps in DPO_CASES
    for red in ("mean", "sum", "none")
]  # fmt: skip


@pytest.mark.parametrize("loss_type,eps,reduction", DPO_GRID)
def test_dpo_matches_reference(loss_type, eps, reduction):
    args = pairs(np.random.default_rng(1))
    beta = 0.3

    def ours(*a):
        out = jsm.dpo_loss(*a, beta=beta, loss_type=loss_type, label_smoothing=eps,
                           reduction=reduction)  # fmt: skip
        return jnp.sum(out * jnp.arange(1, out.size + 1)) if reduction == "none" else out

    def ref(*a):
        out = reduce_ref(ref_dpo_pair(*a, beta, loss_type, eps), reduction)
        return jnp.sum(out * jnp.arange(1, out.size + 1)) if reduction == "none" else out

    check_value_and_grad(ours, ref, args)


def test_dpo_metrics_are_the_implicit_rewards():
    c, r, cr, rr = pairs(np.random.default_rng(2))
    loss, m = jsm.dpo_loss(c, r, cr, rr, beta=0.2, return_metrics=True)
    assert isinstance(m, jsm.PreferenceMetrics)
    np.testing.assert_allclose(m.chosen_rewards, 0.2 * (f64(c) - f64(cr)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.rejected_rewards, 0.2 * (f64(r) - f64(rr)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.reward_margin, m.chosen_rewards - m.rejected_rewards, atol=1e-6)
    np.testing.assert_array_equal(m.reward_accuracy, f64(m.chosen_rewards > m.rejected_rewards))
    assert float(loss) == float(jsm.dpo_loss(c, r, cr, rr, beta=0.2))
    # The metrics carry no gradient.
    g = jax.grad(lambda c: jnp.sum(jsm.dpo_loss(c, r, cr, rr, return_metrics=True)[1][0]))(c)
    assert np.all(g == 0)


def test_dpo_large_margins_stay_finite():
    # u = ±1e4: log σ(u) by hand is log(0) = -inf on one side.
    c = jnp.array([0.0, -1e5])
    r = jnp.array([-1e5, 0.0])
    z = jnp.zeros(2)
    val, g = jax.value_and_grad(lambda c: jsm.dpo_loss(c, r, z, z, reduction="sum"))(c)
    np.testing.assert_allclose(val, 1e4, rtol=1e-6)  # -log σ(-1e4) = 1e4
    np.testing.assert_allclose(g, [0.0, -0.1], atol=1e-7)


def test_label_smoothing_half_is_symmetric_with_minimum_log2():
    u = jnp.linspace(-5.0, 5.0, 11)
    z = jnp.zeros_like(u)
    loss = jsm.dpo_loss(u, z, z, z, beta=1.0, label_smoothing=0.5, reduction="none")
    np.testing.assert_allclose(loss, loss[::-1], rtol=1e-6)
    np.testing.assert_allclose(loss[5], math.log(2.0), rtol=1e-7)
    assert np.all(loss >= math.log(2.0) - 1e-7)
    simpo = jsm.simpo_loss(u, z, beta=1.0, gamma=0.0, label_smoothing=0.5, reduction="none")
    np.testing.assert_allclose(simpo, loss, rtol=1e-7)


@given(st.floats(-50, 50), st.floats(0.01, 20), st.floats(0.01, 5),
       st.sampled_from([0.0, 0.1, 0.3]))  # fmt: skip
def test_dpo_sigmoid_shape_in_the_margin(h, dh, beta, eps):
    # ε = 0: strictly decreasing in the margin u = β·h. ε > 0 (cDPO): decreasing up to
    # u* = log((1-ε)/ε), where the loss has its minimum, then increasing -- conservative
    # DPO stops pushing the margin once it is that large.
    z = jnp.zeros(3)
    u_star = math.log((1 - eps) / eps) if eps else math.inf
    c = jnp.array([h, h + dh, u_star / beta if eps else 0.0], jnp.float32)
    loss = jsm.dpo_loss(c, z, z, z, beta=beta, label_smoothing=eps, reduction="none")
    lo, hi = float(loss[0]), float(loss[1])
    if beta * (h + dh) <= u_star:
        assert hi <= lo
    elif beta * h >= u_star:
        assert hi >= lo
    if eps:
        assert float(loss[2]) <= min(lo, hi) + 1e-6


@given(st.floats(0.05, 5))
def test_ipo_is_minimised_at_half_inverse_beta(beta):
    z = jnp.zeros(3)
    target = 1 / (2 * beta)
    h = jnp.array([target - 0.5, target, target + 0.5], jnp.float32)
    loss = jsm.dpo_loss(h, z, z, z, beta=beta, loss_type="ipo", reduction="none")
    np.testing.assert_allclose(loss, [0.25, 0.0, 0.25], atol=1e-4 * max(1, target))


@pytest.mark.parametrize("eps", [0.0, 0.5])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_simpo_matches_reference(eps, reduction):
    rng = np.random.default_rng(3)
    c, r = (-rng.uniform(0.05, 3, 8).astype(np.float32) for _ in range(2))

    def ours(c, r):
        out = jsm.simpo_loss(c, r, beta=2.5, gamma=0.7, label_smoothing=eps, reduction=reduction)
        return jnp.sum(out * jnp.arange(1, 9)) if reduction == "none" else out

    def ref(c, r):
        out = reduce_ref(ref_simpo_pair(c, r, 2.5, 0.7, eps), reduction)
        return jnp.sum(out * jnp.arange(1, 9)) if reduction == "none" else out

    check_value_and_grad(ours, ref, (c, r))
    _, m = jsm.simpo_loss(c, r, beta=2.5, return_metrics=True)
    np.testing.assert_allclose(m.chosen_rewards, 2.5 * f64(c), rtol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_orpo_matches_reference(reduction):
    rng = np.random.default_rng(4)
    c = -rng.uniform(1e-3, 4, 8).astype(np.float32)
    r = -rng.uniform(1e-3, 4, 8).astype(np.float32)

    def ours(c, r):
        out = jsm.orpo_loss(c, r, beta=0.25, reduction=reduction)
        return jnp.sum(out * jnp.arange(1, 9)) if reduction == "none" else out

    def ref(c, r):
        out = reduce_ref(ref_orpo_pair(c, r, 0.25), reduction)
        return jnp.sum(out * jnp.arange(1, 9)) if reduction == "none" else out

    check_value_and_grad(ours, ref, (c, r))


def test_orpo_chosen_logprob_near_zero():
    # c -> 0⁻: log(1 - e^c) -> -inf; the loss -> 0 and ∂ℓ/∂c -> -β e^r / (1 - e^r).
    beta, r = 0.1, -1.3
    cs = [-1e-2, -1e-5, -1e-8, -1e-20, -1e-37, -1e-44, 0.0, 1e-7]
    c = jnp.array(cs, jnp.float32)
    rr = jnp.full_like(c, r)
    val, (gc, gr) = jax.value_and_grad(
        lambda c, r: jnp.sum(jsm.orpo_loss(c, r, beta=beta, reduction="none") * 1.0), (0, 1)
    )(c, rr)
    per = jsm.orpo_loss(c, rr, beta=beta, reduction="none")
    assert np.all(np.isfinite(per)) and np.all(np.isfinite(gc)) and np.all(np.isfinite(gr))
    with _compat.enable_x64(True):
        for i, ci in enumerate(cs[:4]):  # float64 reference where it is representable
            cv = jnp.float64(ci)
            ref_v, (ref_gc, ref_gr) = jax.value_and_grad(
                lambda c, r: ref_orpo_pair(c, r, beta), (0, 1)
            )(cv, jnp.float64(r))
            np.testing.assert_allclose(per[i], ref_v, rtol=1e-5, atol=1e-12)
            np.testing.assert_allclose(gc[i], ref_gc, rtol=1e-5)
            np.testing.assert_allclose(gr[i], ref_gr, rtol=1e-5, atol=1e-12)
    # The limit, at c = 0 (clamped to -tiny) and beyond.
    limit = -beta * math.exp(r) / (1 - math.exp(r))
    # exp of a difference of two ~-87 float32 logs: ~87 ulp of the exponent, 5e-6 relative.
    np.testing.assert_allclose(gc[3:], limit, rtol=1e-5)
    assert np.all(per[3:] < 1e-15)


def test_orpo_metrics_and_nll_composition():
    c, r = jnp.array([-0.2, -1.0]), jnp.array([-0.9, -0.1])
    loss, m = jsm.orpo_loss(c, r, beta=0.5, return_metrics=True)
    np.testing.assert_allclose(m.chosen_rewards, [-0.1, -0.5], rtol=1e-6)
    np.testing.assert_array_equal(m.reward_accuracy, [1.0, 0.0])


# ------------------------------------------------------------------- GRPO family


def grpo_inputs(seed=0, b=4, t=7, spread=0.3):
    rng = np.random.default_rng(seed)
    lp = -rng.uniform(0.01, 4, (b, t)).astype(np.float32)
    old = (lp + rng.normal(0, spread, (b, t))).astype(np.float32)
    ref = (lp + rng.normal(0, 0.5, (b, t))).astype(np.float32)
    adv = rng.normal(0, 1, b).astype(np.float32)
    lengths = rng.integers(1, t + 1, b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    return lp, old, adv, mask, ref


GRPO_OPTIONS = {
    "dapo": dict(),
    "grpo": dict(loss_type="grpo"),
    "bnpo": dict(loss_type="bnpo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "dr_grpo-len": dict(loss_type="dr_grpo", max_completion_length=16),
    "dapo-normalizer": dict(normalizer=40.0),
    "kl": dict(beta=0.04),
    "clip-higher": dict(epsilon_low=0.2, epsilon_high=0.28, beta=0.1, loss_type="grpo"),
    "gspo": dict(importance_sampling_level="sequence", loss_type="grpo"),
    "gspo-kl-dapo": dict(importance_sampling_level="sequence", beta=0.02),
}
REF_NAMES = dict(loss_type="loss_type", max_completion_length="max_len", normalizer="normalizer",
                 beta="beta", epsilon_low="el", epsilon_high="eh",
                 importance_sampling_level="level")  # fmt: skip


def ref_kwargs(opts):
    return {REF_NAMES[k]: v for k, v in opts.items()}


# bnpo equals dapo without a normalizer, dr_grpo's default length is covered by its
# explicit one; those and the GSPO + KL + DAPO combination run in the slow suite.
SLOW_GRPO = {"bnpo", "dr_grpo", "gspo-kl-dapo"}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in SLOW_GRPO else n
        for n in sorted(GRPO_OPTIONS)
    ],
)
def test_grpo_matches_reference(name):
    opts = GRPO_OPTIONS[name]
    lp, old, adv, mask, ref = grpo_inputs(seed=5, spread=0.4)

    def ours(lp, old, adv, ref):
        return jsm.grpo_loss(lp, old, adv, mask, ref_logps=ref, **opts)

    def reference(lp, old, adv, ref):
        return ref_grpo(lp, old, adv, mask, ref, **ref_kwargs(opts))

    check_value_and_grad(ours, reference, (lp, old, adv, ref))


def test_grpo_at_ratio_one_is_the_policy_gradient():
    # old_logps = stop_gradient(logps): ρ = 1 and ∂loss/∂logp_it = -A_i·m_it / N (DAPO),
    # -A_i·m_it / (B·n_i) (GRPO), REINFORCE with a baseline.
    lp, _, adv, mask, _ = grpo_inputs(seed=16)
    n_i = mask.sum(1, keepdims=True)
    for loss_type, want in (
        ("dapo", -adv[:, None] * mask / mask.sum()),
        ("grpo", -adv[:, None] * mask / (mask.shape[0] * n_i)),
    ):
        g = jax.grad(lambda lp, lt=loss_type: jsm.grpo_loss(lp, jax.lax.stop_gradient(lp), adv,
                                                            mask, loss_type=lt))(lp)  # fmt: skip
        np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-9)


def test_dapo_normalizer_makes_micro_batches_exact():
    # Two micro-batches, each divided by the step's total token count, sum to the
    # full batch's DAPO loss (and gradient); their own local means would not.
    lp, old, adv, mask, ref = grpo_inputs(seed=17, b=6)
    total = float(mask.sum())

    def full(lp):
        return jsm.grpo_loss(lp, old, adv, mask, ref_logps=ref, beta=0.1)

    def micro(lp, normalizer):
        parts = [slice(0, 2), slice(2, 6)]
        return sum(jsm.grpo_loss(lp[s], old[s], adv[s], mask[s], ref_logps=ref[s], beta=0.1,
                                 normalizer=normalizer) for s in parts)  # fmt: skip

    v_full, g_full = jax.value_and_grad(full)(lp)
    v_micro, g_micro = jax.value_and_grad(micro)(lp, total)
    np.testing.assert_allclose(v_micro, v_full, rtol=1e-6)
    np.testing.assert_allclose(g_micro, g_full, rtol=1e-6, atol=1e-9)
    assert abs(float(micro(lp, None)) - float(v_full)) > 1e-3 * abs(float(v_full))


def test_robust_and_sigmoid_agree_without_smoothing():
    args = pairs(np.random.default_rng(18))
    np.testing.assert_allclose(
        jsm.dpo_loss(*args, loss_type="robust", reduction="none"),
        jsm.dpo_loss(*args, loss_type="sigmoid", reduction="none"),
        rtol=1e-7,
    )


def test_grpo_per_token_advantages_and_float_mask():
    lp, old, _, mask, ref = grpo_inputs(seed=6)
    adv = np.random.default_rng(7).normal(size=lp.shape).astype(np.float32)

    def ours(lp, adv):
        return jsm.grpo_loss(lp, old, adv, mask.astype(np.float32), loss_type="bnpo")

    check_value_and_grad(ours, lambda lp, adv: ref_grpo(lp, f64(old), adv, mask,
                                                        loss_type="bnpo"), (lp, adv))  # fmt: skip


def test_grpo_fully_masked_sequence_contributes_nothing():
    lp, old, adv, mask, ref = grpo_inputs(seed=8)
    mask[1] = False
    junk = lp.copy()
    junk[1] = -np.inf  # padding may hold anything
    old_j = old.copy()
    old_j[1] = np.nan
    ref_j = ref.copy()
    ref_j[1] = np.inf
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        kw = dict(loss_type=loss_type, beta=0.05)

        def ours(lp, old, ref, kw=kw):
            return jsm.grpo_loss(lp, old, adv, mask, ref_logps=ref, **kw)

        vg = jax.jit(jax.value_and_grad(ours, (0, 1, 2)))
        (val, grads), (clean, clean_grads) = vg(junk, old_j, ref_j), vg(lp, old, ref)
        assert np.isfinite(val) and float(val) == float(clean)
        for g, cg in zip(grads, clean_grads, strict=True):
            assert np.all(np.isfinite(g)) and np.all(g[1] == 0)
            np.testing.assert_array_equal(g, cg)
        with _compat.enable_x64(True):
            want = ref_grpo(f64(lp), f64(old), f64(adv), mask, f64(ref), beta=0.05,
                            loss_type=loss_type)  # fmt: skip
        np.testing.assert_allclose(val, want, rtol=RTOL)
    # Nothing kept at all: 0.0, zero gradient.
    none = np.zeros_like(mask)
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        val, g = jax.value_and_grad(jsm.grpo_loss)(junk, old_j, adv, none, loss_type=loss_type)
        assert float(val) == 0.0 and np.all(g == 0)


def test_grpo_zero_advantages():
    lp, old, _, mask, ref = grpo_inputs(seed=9, spread=3.0)
    adv = np.zeros(lp.shape[0], np.float32)
    val, g = jax.value_and_grad(jsm.grpo_loss)(lp, old, adv, mask)
    assert float(val) == 0.0 and np.all(g == 0)
    # With a KL term only the KL remains.
    check_value_and_grad(
        lambda lp: jsm.grpo_loss(lp, old, adv, mask, ref_logps=ref, beta=0.1),
        lambda lp: ref_grpo(lp, f64(old), f64(adv), mask, f64(ref), beta=0.1),
        (lp,),
    )


@pytest.mark.parametrize("log_ratio", [-30.0, -5.0, 5.0, 30.0, 79.0])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_grpo_ratios_far_outside_the_clip_range(log_ratio, sign):
    lp, old, _, mask, _ = grpo_inputs(seed=10)
    old = (lp - log_ratio).astype(np.float32)
    adv = np.full(lp.shape[0], sign, np.float32)
    # rtol: ρ = e^{30} comes from exp of a float32 difference (abs error ~1e-6 in the
    # exponent, so ~3e-5 relative at |log ρ| = 30 and ~1e-4 at 79).
    tol = 2e-6 * abs(log_ratio) + RTOL
    check_value_and_grad(
        lambda lp, old: jsm.grpo_loss(lp, old, adv, mask, loss_type="grpo"),
        lambda lp, old: ref_grpo(lp, old, f64(adv), mask, loss_type="grpo"),
        (lp, old),
        rtol=tol,
    )


def test_grpo_ratio_beyond_e80_saturates_finite():
    lp = np.zeros((1, 3), np.float32)
    old = np.array([[-100.0, -85.0, 0.0]], np.float32)
    adv = np.array([-2.0], np.float32)
    mask = np.ones((1, 3), bool)
    val, g = jax.value_and_grad(jsm.grpo_loss)(lp, old, adv, mask)
    assert np.isfinite(val) and np.all(np.isfinite(g))
    # Held at e^80 (value and slope) instead of overflowing.
    np.testing.assert_allclose(val, (2 * 2 * math.exp(80) + 2) / 3, rtol=1e-5)
    np.testing.assert_allclose(g[0, :2], 2 * math.exp(80) / 3, rtol=1e-5)


@pytest.mark.parametrize("d", [-80.0, -20.0, -0.3, -1e-3, 1e-6, 1e-4, 0.49, 0.51, 20.0, 80.0])
def test_kl_term_exact_where_representable(d):
    lp = np.full((1, 2), -5.0, np.float32)
    ref = (lp + np.float32(d)).astype(np.float32)
    d32 = f64(ref - lp)  # the float32 difference the loss sees
    mask = np.ones((1, 2), bool)
    adv = np.zeros(1, np.float32)
    val, g = jax.value_and_grad(lambda lp: jsm.grpo_loss(lp, lp, adv, mask, ref_logps=ref,
                                                         beta=1.0))(lp)  # fmt: skip
    want = np.mean(np.expm1(d32) - d32)  # e^d - d - 1 in float64
    np.testing.assert_allclose(val, want, rtol=2e-6)
    # ∂/∂logps of (e^d - d - 1) = 1 - e^d, over the 2 tokens.
    np.testing.assert_allclose(g, (1 - np.exp(d32)) / 2, rtol=2e-6, atol=1e-12)
    _, m = jsm.grpo_loss(lp, lp, adv, mask, ref_logps=ref, return_metrics=True)
    np.testing.assert_allclose(m.mean_kl, want, rtol=2e-6)


def test_kl_term_beyond_80_is_finite():
    lp = np.array([[-100.0, -200.0]], np.float32)
    ref = np.zeros((1, 2), np.float32)
    val, g = jax.value_and_grad(
        lambda lp: jsm.grpo_loss(lp, lp, np.zeros(1), np.ones((1, 2)), ref_logps=ref, beta=1.0)
    )(lp)
    assert np.isfinite(val) and np.all(np.isfinite(g))
    np.testing.assert_allclose(val, math.expm1(80) - 80, rtol=1e-6)
    np.testing.assert_allclose(g, (1 - math.exp(80)) / 2, rtol=1e-6)


def test_grpo_metrics():
    lp, old, adv, mask, ref = grpo_inputs(seed=11, spread=0.5)
    _, m = jsm.grpo_loss(lp, old, adv, mask, ref_logps=ref, epsilon_high=0.3,
                         return_metrics=True)  # fmt: skip
    rho = np.exp(f64(lp) - f64(old))
    a = np.broadcast_to(f64(adv)[:, None], lp.shape)
    low = (rho < 0.8) & (a < 0)
    high = (rho > 1.3) & (a > 0)
    d = f64(ref) - f64(lp)
    np.testing.assert_allclose(m.clip_fraction_low, low[mask].mean(), rtol=1e-6)
    np.testing.assert_allclose(m.clip_fraction_high, high[mask].mean(), rtol=1e-6)
    np.testing.assert_allclose(m.clip_fraction, (low | high)[mask].mean(), rtol=1e-6)
    np.testing.assert_allclose(m.mean_ratio, rho[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(m.mean_kl, (np.exp(d) - d - 1)[mask].mean(), rtol=1e-5)
    assert 0 < float(m.clip_fraction) < 1
    _, m0 = jsm.grpo_loss(lp, old, adv, mask, return_metrics=True)
    assert m0.mean_kl is None
    # GSPO: every token carries its sequence's ratio.
    _, ms = jsm.grpo_loss(lp, old, adv, mask, importance_sampling_level="sequence",
                          return_metrics=True)  # fmt: skip
    seq = np.array([np.exp(np.mean((f64(lp) - f64(old))[i][mask[i]])) for i in range(4)])
    np.testing.assert_allclose(ms.mean_ratio, (seq[:, None] * mask).sum() / mask.sum(), rtol=1e-5)


def test_grpo_jit_vmap_bfloat16():
    lp, old, adv, mask, ref = grpo_inputs(seed=12)
    f = jax.jit(lambda lp, old, adv, mask: jsm.grpo_loss(lp, old, adv, mask, loss_type="grpo"))
    want = ref_grpo(f64(lp), f64(old), f64(adv), mask, loss_type="grpo")
    np.testing.assert_allclose(f(lp, old, adv, mask), want, rtol=RTOL)
    stacked = [np.stack([x, x[::-1]]) for x in (lp, old, adv, mask)]
    out = jax.vmap(f)(*stacked)
    np.testing.assert_allclose(out[0], want, rtol=RTOL)
    args = [lp[::-1], old[::-1], adv[::-1], mask[::-1]]
    np.testing.assert_allclose(out[1], ref_grpo(*map(f64, args[:3]), args[3], loss_type="grpo"),
                               rtol=RTOL)  # fmt: skip
    # bfloat16 inputs: computed in float32 from the rounded inputs, float32 out.
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (lp, old, adv)]
    val, g = jax.value_and_grad(jsm.grpo_loss)(bf[0], bf[1], bf[2], mask, loss_type="grpo")
    assert val.dtype == jnp.float32 and g.dtype == jnp.bfloat16
    want = ref_grpo(*(f64(np.asarray(x, np.float32)) for x in bf), mask, loss_type="grpo")
    np.testing.assert_allclose(val, want, rtol=1e-5, atol=1e-6)
    c, r, cr, rr = (jnp.asarray(x, jnp.bfloat16) for x in pairs(np.random.default_rng(0)))
    out = jsm.dpo_loss(c, r, cr, rr)
    assert out.dtype == jnp.float32
    want = np.mean(ref_dpo_pair(*(f64(np.asarray(x, np.float32)) for x in (c, r, cr, rr)),
                                0.1, "sigmoid", 0.0))  # fmt: skip
    np.testing.assert_allclose(out, want, rtol=1e-5)
    vm = jax.vmap(lambda c, r: jsm.orpo_loss(c, r, reduction="none"))
    np.testing.assert_allclose(vm(jnp.full((2, 3), -0.5), jnp.full((2, 3), -1.0)), 0.032, atol=1e-4)


def test_float64_stays_float64(x64):
    lp, old, adv, mask, _ = grpo_inputs(seed=13)
    assert jsm.grpo_loss(f64(lp), f64(old), f64(adv), mask).dtype == jnp.float64
    assert jsm.dpo_loss(*map(f64, pairs(np.random.default_rng(1)))).dtype == jnp.float64
    assert jsm.sequence_logprobs(f64(lp), mask).dtype == jnp.float64


def test_sequence_logprobs():
    lp = np.array([[-1.0, -2.0, -np.inf], [-0.5, np.nan, -0.5], [-1.0, -1.0, -1.0]], np.float32)
    mask = np.array([[1, 1, 0], [1, 0, 1], [0, 0, 0]], bool)
    np.testing.assert_array_equal(jsm.sequence_logprobs(lp, mask), [-3.0, -1.0, 0.0])
    np.testing.assert_array_equal(jsm.sequence_logprobs(lp, mask, average=True), [-1.5, -0.5, 0.0])
    g = jax.grad(lambda lp: jnp.sum(jsm.sequence_logprobs(lp, mask, average=True)))(lp)
    np.testing.assert_array_equal(g, [[0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0, 0]])


# ------------------------------------------------------------------ invalid input


def test_invalid_inputs_name_the_argument():
    c, r, cr, rr = pairs(np.random.default_rng(0))
    lp, old, adv, mask, ref = grpo_inputs()
    value_errors = [
        (lambda: jsm.dpo_loss(c, r, cr, rr, beta=0.0), "beta"),
        (lambda: jsm.dpo_loss(c, r, cr, rr, beta=-1.0, loss_type="ipo"), "beta"),
        (lambda: jsm.simpo_loss(c, r, beta=0.0), "beta"),
        (lambda: jsm.orpo_loss(c, r, beta=-0.1), "beta"),
        (lambda: jsm.dpo_loss(c, r, cr, rr, label_smoothing=0.6), "label_smoothing"),
        (lambda: jsm.dpo_loss(c, r, cr, rr, label_smoothing=-0.1), "label_smoothing"),
        (lambda: jsm.dpo_loss(c, r, cr, rr, loss_type="robust", label_smoothing=0.5),
         "label_smoothing"),
        (lambda: jsm.dpo_loss(c, r, cr, rr, loss_type="hinge", label_smoothing=0.1),
         "label_smoothing"),
        (lambda: jsm.simpo_loss(c, r, label_smoothing=0.7), "label_smoothing"),
        (lambda: jsm.dpo_loss(c, r, cr, rr, loss_type="kto"), "loss_type"),
        (lambda: jsm.dpo_loss(c, r[:3], cr, rr), "rejected_logps"),
        (lambda: jsm.dpo_loss(c, r, cr, rr[:, None]), "ref_rejected_logps"),
        (lambda: jsm.orpo_loss(c, r[:2]), "rejected_logps"),
        (lambda: jsm.dpo_loss(c, r, cr, rr, reduction="avg"), "reduction"),
        (lambda: jsm.grpo_loss(lp, old, adv, mask, loss_type="ppo"), "loss_type"),
        (lambda: jsm.grpo_loss(lp, old, adv, mask, importance_sampling_level="seq"),
         "importance_sampling_level"),
        (lambda: jsm.grpo_loss(lp, old[:, :3], adv, mask), "old_logps"),
        (lambda: jsm.grpo_loss(lp, old, adv[:2], mask), "advantages"),
        (lambda: jsm.grpo_loss(lp, old, adv, mask[:, :2]), "mask"),
        (lambda: jsm.grpo_loss(lp, old, adv, mask, ref_logps=ref[:2], beta=0.1), "ref_logps"),
        (lambda: jsm.grpo_loss(lp, old, adv, mask, beta=0.1), "ref_logps"),
        (lambda: jsm.grpo_loss(lp[0], old[0], adv, mask[0]), "logps"),
        (lambda: jsm.grpo_loss(lp, old, adv, mask, beta=-0.1, ref_logps=ref), "beta"),
        (lambda: jsm.grpo_loss(lp, old, adv, mask, epsilon_low=1.5), "epsilon_low"),
        (lambda: jsm.grpo_loss(lp, old, adv, mask, epsilon_high=-0.1), "epsilon_high"),
        (lambda: jsm.grpo_loss(lp, old, adv, mask, epsilon_low=math.nan), "epsilon_low"),
        (lambda: jsm.grpo_loss(lp, old, adv, mask, normalizer=0.0), "normalizer"),
        (lambda: jsm.grpo_loss(lp, old, adv, mask, loss_type="grpo", normalizer=10.0),
         "normalizer"),
        (lambda: jsm.grpo_loss(lp, old, adv, mask, max_completion_length=0,
                               loss_type="dr_grpo"), "max_completion_length"),
        (lambda: jsm.grpo_loss(lp, old, adv, mask, max_completion_length=64),
         "max_completion_length"),
        (lambda: jsm.sequence_logprobs(lp, mask[:, :2]), "mask"),
        (lambda: jsm.linear_token_logprobs(jnp.ones((2, 3, 4)), jnp.ones((4, 5)),
                                           jnp.zeros((2, 3), int), mask=jnp.ones((2, 2))),
         "mask"),
    ]  # fmt: skip
    for call, name in value_errors:
        with pytest.raises(ValueError, match=f"`{name}`"):
            call()
    type_errors = [
        (lambda: jsm.dpo_loss(c, r, cr, rr, beta=jnp.array(0.1)), "beta"),
        (lambda: jsm.simpo_loss(c, r, gamma="0.5"), "gamma"),
        (lambda: jsm.dpo_loss(c, r, cr, rr, label_smoothing=True), "label_smoothing"),
        (lambda: jsm.grpo_loss(lp, old, adv, mask, max_completion_length=8.0,
                               loss_type="dr_grpo"), "max_completion_length"),
        (lambda: jsm.grpo_loss(lp, old, adv, mask, epsilon_high=jnp.array(0.3)), "epsilon_high"),
    ]  # fmt: skip
    for call, name in type_errors:
        with pytest.raises(TypeError, match=f"`{name}`"):
            call()


def test_traced_normalizer():
    lp, old, adv, mask, _ = grpo_inputs(seed=14)
    f = jax.jit(lambda n: jsm.grpo_loss(lp, old, adv, mask, normalizer=n))
    total = float(jsm.grpo_loss(lp, old, adv, mask, loss_type="dr_grpo", max_completion_length=1))
    total *= lp.shape[0]
    np.testing.assert_allclose(f(jnp.float32(50.0)), total / 50, rtol=1e-6)
    assert float(f(jnp.float32(0.0))) == 0.0


# ------------------------------------------------------------ fused with the head


def head(seed=0, b=3, t=6, d=16, v=300, dtype=np.float32):
    rng = np.random.default_rng(seed)
    h = rng.normal(0, 1, (b, t, d)).astype(dtype)
    w = rng.normal(0, 0.5, (d, v)).astype(dtype)
    y = rng.integers(0, v, (b, t)).astype(np.int32)
    lengths = rng.integers(1, t + 1, b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    y[~mask] = -1  # padding holds an id the head does not have
    return h, w, y, mask


def naive_token_logprobs(h, w, y, mask, temperature=1.0):
    logits = jnp.einsum("btd,dv->btv", h, w) / temperature
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.maximum(y, 0)[..., None], -1)[..., 0]
    return jnp.where(mask, lp, 0.0)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_token_logprobs_are_the_samplers(temperature, x64):
    # A sampler at temperature T draws from softmax(z / T): the log-probabilities must be
    # log_softmax(z / T)[token], here in float64 on materialised logits.
    h, w, y, mask = head(seed=1)
    ours = jsm.linear_token_logprobs(f64(h), f64(w), y, mask=mask, temperature=temperature,
                                     chunk_size=128)  # fmt: skip
    logits = np.einsum("btd,dv->btv", f64(h), f64(w)) / temperature
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    want = np.take_along_axis(logits, np.maximum(y, 0)[..., None], -1)[..., 0] - lse
    np.testing.assert_allclose(ours, np.where(mask, want, 0.0), rtol=1e-12, atol=1e-12)


def test_token_logprobs_match_sampled_frequencies():
    # The empirical frequencies of jax.random.categorical at T = 0.5 match exp(logp).
    rng = np.random.default_rng(2)
    h = rng.normal(0, 1, (1, 1, 8)).astype(np.float32)
    w = rng.normal(0, 1, (8, 6)).astype(np.float32)
    t = 0.5
    z = (h @ w)[0, 0] / t
    draws = np.asarray(jax.random.categorical(jax.random.key(0), z, shape=(40000,)))
    freq = np.bincount(draws, minlength=6) / draws.size
    lp = jsm.linear_token_logprobs(np.repeat(h, 6, 1), w, np.arange(6)[None], temperature=t)
    np.testing.assert_allclose(np.exp(lp[0]), freq, atol=0.01)


def test_fused_grpo_equals_naive():
    h, w, y, mask = head(seed=3)
    rng = np.random.default_rng(4)
    old = jnp.where(mask, naive_token_logprobs(h, w, y, mask, 0.8) + rng.normal(0, 0.2, y.shape),
                    0.0)  # fmt: skip
    adv = rng.normal(size=h.shape[0]).astype(np.float32)
    ref_w = w + rng.normal(0, 0.05, w.shape).astype(np.float32)
    opts = dict(beta=0.05, epsilon_high=0.28, loss_type="grpo")

    def fused(h, w):
        lp = jsm.linear_token_logprobs(h, w, y, mask=mask, temperature=0.8, chunk_size=128)
        ref = jax.lax.stop_gradient(
            jsm.linear_token_logprobs(h, ref_w, y, mask=mask, temperature=0.8)
        )
        return jsm.grpo_loss(lp, old, adv, mask, ref_logps=ref, **opts)

    def naive(h, w):
        lp = naive_token_logprobs(h, w, y, mask, 0.8)
        ref = jax.lax.stop_gradient(naive_token_logprobs(h, ref_w, y, mask, 0.8))
        return jsm.grpo_loss(lp, old, adv, mask, ref_logps=ref, **opts)

    (v1, g1), (v0, g0) = (jax.jit(jax.value_and_grad(f, (0, 1)))(h, w) for f in (fused, naive))
    np.testing.assert_allclose(v1, v0, rtol=2e-5)
    for a, b in zip(g1, g0, strict=True):
        assert rel_err(a, b) < 1e-5


def test_fused_dpo_equals_naive():
    # Chosen and rejected answers in one batch (2B rows), a frozen reference head.
    h, w, y, mask = head(seed=5, b=4)
    ref_w = w * 0.9

    def make(token_logprobs):
        def loss(h, w):
            lp = token_logprobs(h, w, y, mask)
            ref = jax.lax.stop_gradient(token_logprobs(h, ref_w, y, mask))
            seq, seq_ref = jsm.sequence_logprobs(lp, mask), jsm.sequence_logprobs(ref, mask)
            per_pair = jsm.dpo_loss(seq[:2], seq[2:], seq_ref[:2], seq_ref[2:], beta=0.2)
            avg = jsm.sequence_logprobs(lp, mask, average=True)
            return (per_pair + jsm.simpo_loss(avg[:2], avg[2:])
                    + jsm.orpo_loss(avg[:2], avg[2:]))  # fmt: skip

        return jax.jit(jax.value_and_grad(loss, (0, 1)))

    fused = make(lambda h, w, y, m: jsm.linear_token_logprobs(h, w, y, mask=m, chunk_size=128))
    (v1, g1), (v0, g0) = fused(h, w), make(naive_token_logprobs)(h, w)
    np.testing.assert_allclose(v1, v0, rtol=2e-5)
    for a, b in zip(g1, g0, strict=True):
        assert rel_err(a, b) < 1e-5


def test_fused_filter_eps_keeps_its_bound():
    # The documented bound of filter_eps with T_i = |∂loss/∂logp_i|:
    # |Δd_hidden_ik| <= eps·T_i·Σ_c |W_kc|, |Δd_weight_kc| <= eps·Σ_i T_i·|h_ik|.
    hh, w, y, b, order = lm_head_inputs(256, 32, 1024, seed=1)
    inv = np.argsort(np.asarray(order))
    y = jnp.asarray(inv[np.asarray(y)], jnp.int32).reshape(8, 32)
    b = b[order]
    h = hh.reshape(8, 32, -1)
    rng = np.random.default_rng(6)
    mask = np.arange(32)[None, :] < rng.integers(8, 33, 8)[:, None]
    adv = rng.normal(size=8).astype(np.float32)
    eps = 2.0**-10

    def run(fe):
        def loss(h, w):
            lp = jsm.linear_token_logprobs(h, w, y, mask=mask, linear_bias=b, chunk_size=128,
                                           filter_eps=fe)  # fmt: skip
            old = jax.lax.stop_gradient(lp) + 0.1 * jnp.asarray(mask, jnp.float32)
            return jsm.grpo_loss(lp, old, adv, mask, loss_type="grpo")

        return jax.jit(jax.value_and_grad(loss, (0, 1)))(h, w)

    (v0, (dh0, dw0)), (v1, (dh1, dw1)) = run(None), run(eps)
    assert np.array_equal(v0, v1)
    # T_i from the loss's float64 reference, as a function of the per-token log-probs.
    lp = jsm.linear_token_logprobs(h, w, y, mask=mask, linear_bias=b)
    with _compat.enable_x64(True):
        lp64 = f64(lp)
        old64 = lp64 + 0.1 * mask
        unit = np.abs(f64(jax.grad(lambda lp: ref_grpo(lp, old64, f64(adv), mask,
                                                       loss_type="grpo"))(lp64)))  # fmt: skip
    unit = unit.reshape(-1)
    hf, wf = f64(h).reshape(-1, f64(h).shape[-1]), f64(w)
    bound_h = eps * unit[:, None] * np.abs(wf).sum(axis=1)[None, :]
    bound_w = eps * (np.abs(hf) * unit[:, None]).sum(axis=0)[:, None]
    err_h = np.abs(f64(dh1) - f64(dh0)).reshape(-1, hf.shape[1])
    err_w = np.abs(f64(dw1) - f64(dw0))
    assert err_w.max() > 0  # filtering dropped something
    assert np.all(err_h <= bound_h + 1e-6 * np.abs(f64(dh0)).max())
    assert np.all(err_w <= bound_w + 1e-6 * np.abs(f64(dw0)).max())


def test_token_logprobs_masked_padding_and_ignore_index():
    h, w, y, mask = head(seed=7)
    per = jsm.linear_token_logprobs(h, w, y, mask=mask)
    assert np.all(np.isfinite(per)) and np.all(per[~mask] == 0)
    g = jax.grad(lambda h: jnp.sum(jsm.linear_token_logprobs(h, w, y, mask=mask)))(h)
    assert np.all(g[~mask] == 0) and np.all(np.isfinite(g))
    # Without a mask, an id outside the vocabulary is a bad label: NaN, as documented.
    assert np.isnan(jsm.linear_token_logprobs(h, w, y)[~mask]).all()
    # vd layout (tied embedding) and a bias.
    bias = np.linspace(-1, 1, w.shape[1]).astype(np.float32)
    a = jsm.linear_token_logprobs(h, w.T, y, mask=mask, weight_layout="vd", linear_bias=bias)
    logits = jnp.einsum("btd,dv->btv", h, w) + bias
    want = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.maximum(y, 0)[..., None], -1)
    np.testing.assert_allclose(a, np.where(mask, want[..., 0], 0.0), rtol=2e-5, atol=2e-6)


def test_fused_vocab_parallel_equals_single_device():
    # The head sharded along the vocabulary over 4 devices (axis_name inside shard_map):
    # the same per-token log-probabilities and GRPO gradients as on one device.
    h, w, y, mask = head(seed=8, v=512)
    adv = np.random.default_rng(9).normal(size=h.shape[0]).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()[:4]), ("v",))

    def loss(h, w, sharded):
        if sharded:
            f = lambda h, w: jsm.linear_token_logprobs(  # noqa: E731
                h, w, y, mask=mask, axis_name="v", temperature=0.8
            )
            lp = jax.shard_map(f, mesh=mesh, in_specs=(P(), P(None, "v")), out_specs=P())(h, w)
        else:
            lp = jsm.linear_token_logprobs(h, w, y, mask=mask, temperature=0.8)
        old = jax.lax.stop_gradient(lp) - 0.1 * jnp.asarray(mask, jnp.float32)
        return jsm.grpo_loss(lp, old, adv, mask)

    (v1, g1), (v0, g0) = (
        jax.jit(jax.value_and_grad(lambda h, w, s=s: loss(h, w, s), (0, 1)))(h, w)
        for s in (True, False)
    )
    np.testing.assert_allclose(v1, v0, rtol=2e-5)
    for a, b in zip(g1, g0, strict=True):
        assert rel_err(a, b) < 1e-5


def test_orpo_custom_derivative_both_modes(x64):
    # ORPO's derivative is a custom_jvp: check_grads in float64, first and second order,
    # forward and reverse mode.
    rng = np.random.default_rng(10)
    c, r = -rng.uniform(0.1, 2, 4), -rng.uniform(0.1, 2, 4)
    check_grads(lambda c, r: jsm.orpo_loss(c, r, beta=0.3), (c, r), order=2, modes=("fwd", "rev"))


@pytest.mark.slow
def test_forward_and_reverse_mode(x64):
    # The rest is plain autodiff: second order, both modes, away from kinks (clip, hinge).
    rng = np.random.default_rng(10)
    c, r = -rng.uniform(0.1, 2, 4), -rng.uniform(0.1, 2, 4)
    check_grads(lambda c, r: jsm.simpo_loss(c, r, label_smoothing=0.1), (c, r), order=2)
    cr, rr = c + 0.1, r - 0.2
    check_grads(lambda c, r: jsm.dpo_loss(c, r, cr, rr, loss_type="robust", label_smoothing=0.2),
                (c, r), order=2)  # fmt: skip
    lp, old, adv, mask, ref = (x if x.dtype == bool else f64(x) for x in grpo_inputs(seed=15))
    check_grads(
        lambda lp: jsm.grpo_loss(lp, lp - 0.01, adv, mask, ref_logps=ref, beta=0.1),
        (lp,), order=2, modes=("fwd", "rev"),
    )  # fmt: skip


# ------------------------------------------------- memory, compiled for one TPU v5p chip


@pytest.mark.aot
def test_grpo_step_memory_on_tpu_v5p():
    # A GRPO step on 16 sequences x 1024 tokens, D=4096, V=151936 (a Qwen-size head),
    # bf16 hidden states and head; value and gradient in both. Compiled deviceless by
    # libtpu for one v5p chip: the fused path's temporary memory is at most 1/32 of the
    # materialised-logits path's (which alone exceeds a 16 GiB v5e chip).
    from jsoftmax._bench import grpo_step, grpo_step_shapes
    from jsoftmax.kernels import _aot

    reason = _aot.missing("tpu")
    if reason is not None:
        pytest.skip(reason)
    target = _aot.TARGETS_BY_NAME["TPU v5p"]
    shapes = grpo_step_shapes(16, 1024, 4096, 151936, jnp.bfloat16)
    args = [_aot.abstract(target, s.shape, s.dtype) for s in shapes]
    temp, peak = {}, {}
    for fused in (True, False):
        mem = jax.jit(grpo_step(fused)).lower(*args).compile().memory_analysis()
        temp[fused] = mem.temp_size_in_bytes
        peak[fused] = temp[fused] + mem.argument_size_in_bytes + mem.output_size_in_bytes
    gib = {k: (temp[k] / 2**30, peak[k] / 2**30) for k in temp}
    print(f"v5p GRPO step temp: fused {gib[True][0]:.3f} GiB, naive {gib[False][0]:.2f} GiB "
          f"({temp[False] / temp[True]:.1f}x); with arguments and outputs "
          f"{gib[True][1]:.2f} / {gib[False][1]:.2f} GiB")  # fmt: skip
    assert peak[False] > 16 * 2**30  # the naive step does not fit a 16 GiB v5e chip
    assert temp[True] * 32 <= temp[False]

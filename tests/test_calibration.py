"""Tests for jsoftmax/_calibration.py: temperature scaling, ECE, reliability diagrams and
open-set scores.

References are float64 numpy; planted-parameter tests draw labels from a known model so
the optimum is known in advance.
"""

import io
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _references import np_log_softmax, np_softmax, unit_roundoff

import jsoftmax as jsm

fit = jsm.fit_temperature  # jitted inside: one compile per shape and dtype
# Thresholds and temperatures are traced: one compile per (shape, score).
pwr = jax.jit(jsm.predict_with_rejection, static_argnames=("score", "reject_label", "axis"))
ece_jit = jax.jit(
    jsm.expected_calibration_error, static_argnames=("n_bins", "axis", "ignore_index")
)


# ------------------------------------------------------------------------ helpers


def np_nll(logits, labels, T=1.0):
    lp = np_log_softmax(np.asarray(logits, np.float64) / T)
    return -np.mean(lp[np.arange(len(labels)), labels])


def np_ece(logits, labels, n_bins):
    """Guo et al.'s loop over bins (lo, hi], written independently of the library."""
    p = np.exp(np_log_softmax(logits))
    conf, pred = p.max(-1), p.argmax(-1)
    acc = (pred == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        in_bin = (conf > lo) & (conf <= hi) if b > 0 else (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(acc[in_bin].mean() - conf[in_bin].mean())
    return ece


def sample_labels(z, rng):
    """Labels drawn from softmax(z) row by row (Gumbel-max trick)."""
    return np.argmax(z + rng.gumbel(size=z.shape), axis=-1)


def auroc(pos_scores, neg_scores):
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U)."""
    pos = np.asarray(pos_scores, np.float64)[:, None]
    neg = np.asarray(neg_scores, np.float64)[None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


@pytest.fixture(scope="module")
def planted():
    """True logits z (N=20000, C=10) and labels drawn from softmax(z)."""
    rng = np.random.default_rng(1234)
    z = 2.0 * rng.normal(size=(20000, 10))
    return z, sample_labels(z, rng)


# ------------------------------------------------------------------ fit_temperature


@pytest.mark.parametrize("t_star", [0.5, 2.0, 4.0])
def test_fit_temperature_recovers_planted_temperature(planted, t_star):
    # The observed logits are z·T*: softmax(observed / T*) is the model the labels came
    # from, so T* minimises the expected NLL and the fit must land on it.
    z, y = planted
    logits = z * t_star
    T = float(fit(jnp.asarray(logits, jnp.float32), jnp.asarray(y)))
    assert abs(T / t_star - 1) < 0.05, T
    # ... and it is the minimiser of the sample NLL, not just near T*: a float64 numpy
    # NLL is larger 0.2 % away on either side.
    assert np_nll(logits, y, T) < np_nll(logits, y, T * 1.002)
    assert np_nll(logits, y, T) < np_nll(logits, y, T / 1.002)


@pytest.mark.parametrize("init", [1e-4, 0.01, 0.3, 100.0, 1e4])
def test_fit_temperature_converges_from_any_init(planted, init):
    z, y = planted
    logits, labels = jnp.asarray(z * 3.0, jnp.float32), jnp.asarray(y)
    ref = float(fit(logits, labels, init=1.0))
    assert float(fit(logits, labels, init=init)) == pytest.approx(ref, rel=1e-4)


def test_fit_temperature_converges_within_a_few_steps(planted):
    # Safeguarded Newton: ten steps suffice from far away (T=100 against T*≈3).
    z, y = planted
    logits, labels = jnp.asarray(z * 3.0, jnp.float32), jnp.asarray(y)
    ref = float(fit(logits, labels))
    assert float(fit(logits, labels, init=100.0, max_iter=10)) == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("t_star", [3.0, 0.5])
def test_fit_temperature_lowers_heldout_nll_and_ece(planted, t_star):
    # Over-confident (T*=3) and under-confident (T*=0.5) models, fitted on one half and
    # evaluated on the other.
    z, y = planted
    logits = z * t_star
    cal, test = slice(0, 10000), slice(10000, None)
    T = float(fit(jnp.asarray(logits[cal], jnp.float32), jnp.asarray(y[cal])))
    nll_before, nll_after = np_nll(logits[test], y[test]), np_nll(logits[test], y[test], T)
    ece_before = np_ece(logits[test], y[test], 15)
    ece_after = float(jsm.expected_calibration_error(logits[test] / T, y[test]))
    assert nll_after < nll_before - 0.1, (nll_before, nll_after)
    assert ece_before > 0.1
    assert ece_after < 0.02
    # The held-out NLL after scaling is within 0.5 % of the oracle's (T = T*).
    assert nll_after < 1.005 * np_nll(logits[test], y[test], t_star)


def test_fit_temperature_invariant_to_row_shifts(planted, x64):
    z, y = planted
    rng = np.random.default_rng(7)
    shift = rng.uniform(-1e3, 1e3, size=(len(z), 1))
    T = float(jsm.fit_temperature(z * 2.0, y))
    T_shifted = float(jsm.fit_temperature(z * 2.0 + shift, y))
    assert T_shifted == pytest.approx(T, rel=1e-8)


def test_fit_temperature_invariant_to_row_shifts_float32(planted):
    z, y = planted
    shift = np.random.default_rng(8).uniform(-10, 10, size=(len(z), 1))
    T = float(fit(jnp.asarray(z * 2.0, jnp.float32), jnp.asarray(y)))
    T_shifted = float(fit(jnp.asarray(z * 2.0 + shift, jnp.float32), jnp.asarray(y)))
    assert T_shifted == pytest.approx(T, rel=1e-4)


def test_fit_temperature_float64_matches_float32_and_keeps_dtype(planted, x64):
    z, y = planted
    T64 = jsm.fit_temperature(z * 2.0, y)
    T32 = jsm.fit_temperature(jnp.asarray(z * 2.0, jnp.float32), y)
    T16 = jsm.fit_temperature(jnp.asarray(z * 2.0, jnp.bfloat16), y)
    assert T64.dtype == jnp.float64 and T32.dtype == jnp.float32 and T16.dtype == jnp.float32
    assert float(T32) == pytest.approx(float(T64), rel=1e-5)
    # bfloat16 logits carry ~3 significant digits; the fit still lands within 1 %.
    assert float(T16) == pytest.approx(float(T64), rel=1e-2)


def test_fit_temperature_jit_traced_init_vmap_and_eager_agree(planted):
    z, y = planted
    logits, labels = jnp.asarray(z * 2.0, jnp.float32), jnp.asarray(y)
    eager = jsm.fit_temperature(logits, labels)
    jitted = jax.jit(lambda l, t, i: jsm.fit_temperature(l, t, init=i))(logits, labels, 5.0)
    assert float(jitted) == pytest.approx(float(eager), rel=1e-5)
    # vmap over two data sets (one planted at 2, the other at 0.5 relative to it).
    stacked = jnp.stack([logits, logits / 4.0])
    both = jax.vmap(jsm.fit_temperature)(stacked, jnp.stack([labels, labels]))
    np.testing.assert_allclose(np.asarray(both), [float(eager), float(eager) / 4.0], rtol=1e-4)


def test_fit_temperature_class_axis(planted):
    z, y = planted
    logits, labels = jnp.asarray(z * 2.0, jnp.float32), jnp.asarray(y)
    ref = float(fit(logits, labels))
    # (N, C) → (C, N) with axis=0, and a (100, 200, C) batch with the default axis.
    assert float(fit(logits.T, labels, axis=0)) == pytest.approx(ref, rel=1e-5)
    assert float(fit(logits.reshape(100, 200, 10), labels.reshape(100, 200))) == pytest.approx(
        ref, rel=1e-5
    )


def test_fit_temperature_ignored_positions_do_not_count(planted):
    z, y = planted
    logits, labels = z * 2.0, y
    ref = float(fit(jnp.asarray(logits, jnp.float32), jnp.asarray(labels)))
    # Append 1000 confidently wrong rows, all ignored: the fit must not move.
    junk = 50.0 * np.eye(10)[np.arange(1000) % 10]
    padded = jnp.asarray(np.concatenate([logits, junk]), jnp.float32)
    ignored = jnp.asarray(np.concatenate([labels, np.full(1000, -100)]))
    assert float(fit(padded, ignored)) == pytest.approx(ref, rel=1e-5)
    custom = jnp.asarray(np.concatenate([labels, np.full(1000, -1)]))
    assert float(fit(padded, custom, ignore_index=-1)) == pytest.approx(ref, rel=1e-5)


def test_fit_temperature_masked_classes(planted):
    z, y = planted
    logits, labels = z * 2.0, y
    n = len(y)
    ref = float(fit(jnp.asarray(logits, jnp.float32), jnp.asarray(labels)))
    # A -inf column (a masked class nobody is labelled with) changes nothing.
    masked = np.concatenate([logits, np.full((n, 1), -np.inf)], axis=1)
    assert float(fit(jnp.asarray(masked, jnp.float32), jnp.asarray(labels))) == pytest.approx(
        ref, rel=1e-5
    )
    # Per-row masks: hide one random non-label class per row (logits become -inf).
    rng = np.random.default_rng(3)
    hide = (labels + rng.integers(1, 10, size=n)) % 10
    holey = logits.copy()
    holey[np.arange(n), hide] = -np.inf
    T = float(fit(jnp.asarray(holey, jnp.float32), jnp.asarray(labels)))
    # Still the minimiser of the (float64 numpy) NLL of the masked logits.
    assert np_nll(holey, labels, T) < np_nll(holey, labels, T * 1.002)
    assert np_nll(holey, labels, T) < np_nll(holey, labels, T / 1.002)


@pytest.mark.parametrize(
    "case", ["label_out_of_range", "negative_label", "label_on_masked_class", "nan_logit"]
)
def test_fit_temperature_bad_runtime_values_poison(case):
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [1.0, 1.0, -np.inf]], np.float32)
    labels = np.array([0, 1, 1])
    if case == "label_out_of_range":
        labels[1] = 3
    elif case == "negative_label":
        labels[1] = -2
    elif case == "label_on_masked_class":
        labels[2] = 2
    else:
        logits[0, 1] = np.nan
    assert np.isnan(float(fit(jnp.asarray(logits), jnp.asarray(labels))))
    # The same data without the defect is fine.
    clean = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [1.0, 1.0, -np.inf]], np.float32)
    assert np.isfinite(float(fit(jnp.asarray(clean), jnp.array([0, 1, 1]))))


def test_fit_temperature_degenerate_data_hits_bounds_or_returns_init():
    # Every prediction right → the NLL falls as T → 0: a small T where it is 0 already.
    z = np.array([[3.0, 0.0], [0.0, 2.0], [1.0, -1.0]], np.float32)
    t_small = float(fit(jnp.asarray(z), jnp.array([0, 1, 0])))
    assert 1e-4 <= t_small < 0.02
    assert np_nll(z, np.array([0, 1, 0]), t_small) < 1e-30
    # Every prediction wrong → the best model is uniform, T → ∞: the upper bound.
    assert float(fit(jnp.asarray(z), jnp.array([1, 0, 1]))) == pytest.approx(1e4, rel=1e-3)
    b = fit(jnp.asarray(z), jnp.array([1, 0, 1]), bounds=(0.1, 10.0))
    assert float(b) == pytest.approx(10.0, rel=1e-3)
    # NLL independent of T (constant rows; everything ignored) → init comes back.
    assert float(fit(jnp.zeros((3, 2)), jnp.array([0, 1, 1]), init=2.5)) == pytest.approx(2.5)
    shifted = jnp.asarray(np.array([[1.0, 1.0], [-5.0, -5.0], [2.0, -np.inf]], np.float32))
    assert float(fit(shifted, jnp.array([0, 1, 0]), init=2.5)) == pytest.approx(2.5)
    assert float(fit(jnp.asarray(z), jnp.full(3, -100), init=0.7)) == pytest.approx(0.7)


def test_fit_temperature_bad_arguments():
    z, y = jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match="labels"):
        jsm.fit_temperature(z, jnp.zeros(5, jnp.int32))
    with pytest.raises(TypeError, match="labels"):
        jsm.fit_temperature(z, jnp.zeros(4))
    with pytest.raises(ValueError, match="logits"):
        jsm.fit_temperature(jnp.zeros(()), jnp.zeros((), jnp.int32))
    with pytest.raises(ValueError, match="init"):
        jsm.fit_temperature(z, y, init=0.0)
    with pytest.raises(ValueError, match="init"):
        jsm.fit_temperature(z, y, init=jnp.ones(2))
    with pytest.raises(ValueError, match="max_iter"):
        jsm.fit_temperature(z, y, max_iter=0)
    with pytest.raises(ValueError, match="bounds"):
        jsm.fit_temperature(z, y, bounds=(1.0, 0.5))
    with pytest.raises(ValueError, match="axis"):
        jsm.fit_temperature(z, y, axis=2)


# ------------------------------------------------------------------------------ ECE


@pytest.mark.parametrize("n_bins", [1, 5, 15, 40])
def test_ece_matches_numpy_loop(n_bins, x64):
    rng = np.random.default_rng(n_bins)
    logits = rng.normal(size=(3000, 7)) * rng.uniform(0.2, 4.0, size=(3000, 1))
    labels = rng.integers(0, 7, size=3000)
    labels[:1000] = logits[:1000].argmax(-1)  # some accuracy, so bins differ
    want = np_ece(logits, labels, n_bins)
    assert float(jsm.expected_calibration_error(logits, labels, n_bins=n_bins)) == pytest.approx(
        want, rel=1e-10, abs=1e-12
    )
    got32 = ece_jit(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), n_bins=n_bins)
    assert got32.dtype == jnp.float32
    assert float(got32) == pytest.approx(want, abs=2e-3)


def test_ece_hand_made_example():
    # (confidence, correct): (0.55, 1), (0.65, 0), (0.75, 1), (0.85, 1), (0.95, 0) and an
    # ignored row. Bins of width 0.2: (0.4, 0.6] → |1 - 0.55|·1/5; (0.6, 0.8] →
    # |0.5 - 0.7|·2/5; (0.8, 1] → |0.5 - 0.9|·2/5. ECE = (0.45 + 0.4 + 0.8)/5 = 0.33.
    conf = np.array([0.55, 0.65, 0.75, 0.85, 0.95, 0.99])
    logits = np.log(np.stack([conf, 1 - conf], axis=1))
    labels = np.array([0, 1, 0, 0, 1, -100])
    ece = jsm.expected_calibration_error(jnp.asarray(logits, jnp.float32), labels, n_bins=5)
    assert float(ece) == pytest.approx(0.33, abs=1e-6)
    # One bin: |accuracy - mean confidence| = |3/5 - 0.75| = 0.15.
    one = jsm.expected_calibration_error(jnp.asarray(logits, jnp.float32), labels, n_bins=1)
    assert float(one) == pytest.approx(0.15, abs=1e-6)


def test_ece_near_zero_for_calibrated_model_and_large_for_overconfident(planted):
    z, y = planted  # labels drawn from softmax(z): calibrated by construction
    ece = float(ece_jit(jnp.asarray(z, jnp.float32), jnp.asarray(y)))
    # Sampling noise of a 15-bin ECE at n=20000 is about sqrt(15/n)·0.4 ≈ 0.011.
    assert ece < 0.02
    assert float(ece_jit(jnp.asarray(3.0 * z, jnp.float32), jnp.asarray(y))) > 0.15


def test_ece_axis_batch_ignore_and_bad_labels():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(4, 50, 6)).astype(np.float32)
    labels = rng.integers(0, 6, size=(4, 50))
    ref = float(jsm.expected_calibration_error(logits.reshape(-1, 6), labels.reshape(-1)))
    assert float(jsm.expected_calibration_error(logits, labels)) == pytest.approx(ref, rel=1e-6)
    moved = np.moveaxis(logits, -1, 1)  # (4, 6, 50), PyTorch layout
    assert float(jsm.expected_calibration_error(moved, labels, axis=1)) == pytest.approx(
        ref, rel=1e-6
    )
    # Ignored positions are dropped from numerator and denominator.
    sub = float(jsm.expected_calibration_error(logits[:2], labels[:2]))
    masked = labels.copy()
    masked[2:] = -100
    assert float(jsm.expected_calibration_error(logits, masked)) == pytest.approx(sub, rel=1e-6)
    assert float(jsm.expected_calibration_error(logits, np.full((4, 50), -100))) == 0.0
    # Bad labels poison.
    bad = labels.copy()
    bad[1, 3] = 6
    assert np.isnan(float(jsm.expected_calibration_error(logits, bad)))
    holey = logits.copy()
    holey[0, 0, labels[0, 0]] = -np.inf
    assert np.isnan(float(jsm.expected_calibration_error(holey, labels)))
    with pytest.raises(ValueError, match="n_bins"):
        jsm.expected_calibration_error(logits, labels, n_bins=0)
    with pytest.raises(TypeError, match="n_bins"):
        jsm.expected_calibration_error(logits, labels, n_bins=2.5)
    with pytest.raises(ValueError, match="labels"):
        jsm.expected_calibration_error(logits, labels[:, :3])


# ------------------------------------------------------------------ open-set scores


def test_msp_and_energy_match_numpy(x64):
    rng = np.random.default_rng(11)
    z = rng.normal(size=(30, 8)) * 3
    for T in (1.0, 0.3, 2.5):
        p = np.exp(np_log_softmax(z / T))
        np.testing.assert_allclose(
            jsm.max_softmax_probability(z, temperature=T), p.max(-1), rtol=1e-12
        )
        lse = np.log(np.sum(np.exp(z / T), axis=-1))
        np.testing.assert_allclose(jsm.energy_score(z, temperature=T), -T * lse, rtol=1e-12)
    # Class axis 0 and a traced temperature under jit.
    f = jax.jit(lambda x, t: (jsm.max_softmax_probability(x, temperature=t, axis=0),
                              jsm.energy_score(x, temperature=t, axis=0)))  # fmt: skip
    msp, energy = f(z.T, 2.5)
    np.testing.assert_allclose(msp, np.exp(np_log_softmax(z / 2.5)).max(-1), rtol=1e-12)
    np.testing.assert_allclose(energy, -2.5 * np.log(np.exp(z / 2.5).sum(-1)), rtol=1e-12)


def test_energy_sign_convention_and_float32_stability():
    z = jnp.array([[10.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    e = np.asarray(jsm.energy_score(z))
    # Lower energy = more in-distribution: the confident row has the lowest energy.
    assert e[0] < e[1] < e[2]
    assert e[2] == pytest.approx(-np.log(3.0), rel=1e-6)
    # Shifting a row by c shifts its energy by -c (no overflow at 1e4 in float32).
    np.testing.assert_allclose(jsm.energy_score(z + 1e4), e - 1e4, rtol=1e-6)
    assert jsm.energy_score(z.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_scores_with_masked_and_empty_rows_and_gradients():
    z = jnp.array([[2.0, -jnp.inf, 0.0], [-jnp.inf, -jnp.inf, -jnp.inf]])
    msp = np.asarray(jsm.max_softmax_probability(z))
    energy = np.asarray(jsm.energy_score(z, temperature=0.5))
    assert msp[0] == pytest.approx(1 / (1 + np.exp(-2.0)), rel=1e-6) and msp[1] == 0.0
    assert energy[0] == pytest.approx(-0.5 * np.log(np.exp(4.0) + 1.0), rel=1e-6)
    assert energy[1] == np.inf  # no admissible class: maximally "unknown"
    # Gradients w.r.t. the logits and the temperature stay finite on the masked row.
    energy0 = lambda x, t: jsm.energy_score(x, temperature=t)[0]
    g_z, g_t = jax.jit(jax.grad(energy0, argnums=(0, 1)))(z, 0.5)
    assert np.all(np.isfinite(g_z)) and np.isfinite(g_t)
    msp_sum = lambda x, t: jsm.max_softmax_probability(x, temperature=t).sum()
    gm_z, gm_t = jax.jit(jax.grad(msp_sum, argnums=(0, 1)))(z, 0.5)
    assert np.all(np.isfinite(gm_z)) and np.isfinite(gm_t)
    # dE/dT = -lse(z/T) + Σ p·z/T = -H(softmax(z/T)), the negated entropy.
    p = np.array([np.exp(4.0), 1.0]) / (np.exp(4.0) + 1.0)
    assert float(g_t) == pytest.approx(float(np.sum(p * np.log(p))), rel=1e-5)
    # Energy gradient w.r.t. z is -softmax(z/T).
    # float32 softmax of 3 entries: a few u = 6e-8 relative.
    np.testing.assert_allclose(g_z[0], -np_softmax(np.asarray(z[0]) / 0.5), rtol=1e-6)
    # MSP = p_k, k the arg-max: d/dz_j = p_k·(δ_jk - p_j)/T, d/dT = p_k·(Σ p_j z_j - z_k)/T²,
    # in float64 numpy on the admissible classes. float32: p carries u absolute (entries
    # <= 1), the product with (δ - p) another u, then / T: 4u/T absolute (1 - p cancels).
    zf, t = np.array([2.0, 0.0]), 0.5
    pf = np_softmax(zf / t)
    np.testing.assert_allclose(
        gm_z[0, [0, 2]],
        pf[0] * (np.array([1.0, 0.0]) - pf) / t,
        rtol=0,
        atol=4 * unit_roundoff(np.float32) / t,
    )
    assert gm_z[0, 1] == 0 and np.all(gm_z[1] == 0)
    assert float(gm_t) == pytest.approx(pf[0] * (pf @ zf - zf[0]) / t**2, rel=1e-5)


def test_predict_with_rejection_hand_made():
    z = jnp.array([[4.0, 0.0, 0.0], [0.1, 0.0, 0.2], [0.0, 3.0, 0.0], [-jnp.inf] * 3])
    # MSP: [0.9479, 0.3672, 0.9094, 0]; reject below the threshold.
    np.testing.assert_array_equal(pwr(z, threshold=0.5), [0, -1, 1, -1])
    np.testing.assert_array_equal(pwr(z, threshold=0.93, reject_label=99), [0, 99, 99, 99])
    # A score exactly at the threshold is kept.
    msp1 = jsm.max_softmax_probability(z[1:2])
    assert int(pwr(z[1:2], threshold=msp1[0])[0]) == 2
    # Energy: [-4.0363, -1.1975, -3.0969, +inf]; reject above the threshold.
    np.testing.assert_array_equal(pwr(z, threshold=-3.5, score="energy"), [0, -1, -1, -1])
    np.testing.assert_array_equal(pwr(z, threshold=-2.0, score="energy"), [0, -1, 1, -1])
    # The temperature changes the score, not the arg-max: at T=4 the MSPs are
    # [0.576, 0.349, 0.514], so row 2 (MSP 0.909 at T=1) is now rejected.
    np.testing.assert_array_equal(pwr(z[:3], threshold=0.55, temperature=4.0), [0, -1, -1])
    np.testing.assert_array_equal(pwr(z[:3], threshold=0.55), [0, -1, 1])
    # Traced threshold under jit, class axis 0.
    f = jax.jit(lambda x, t: jsm.predict_with_rejection(x, threshold=t, axis=0))
    out = f(z[:3].T, 0.5)
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(out, [0, -1, 1])


def test_predict_with_rejection_bad_arguments():
    z = jnp.zeros((3, 4))
    with pytest.raises(ValueError, match="score"):
        jsm.predict_with_rejection(z, threshold=0.5, score="entropy")
    with pytest.raises(ValueError, match="threshold"):
        jsm.predict_with_rejection(z, threshold=jnp.ones(4))
    with pytest.raises(ValueError, match="temperature"):
        jsm.predict_with_rejection(z, threshold=0.5, temperature=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        jsm.energy_score(z, temperature=0.0)


def test_open_set_rejection_on_gaussian_blobs():
    # Two known classes at (±4, 0), a classifier fitted on them (softmax regression, full
    # gradient descent with weight decay), and an unseen third blob at (0, 4). The linear
    # model's scores see only the discriminative direction x₁, where the unknown blob sits
    # on the decision boundary: low MSP, high energy.
    rng = np.random.default_rng(2024)
    n = 500
    means = np.array([[-4.0, 0.0], [4.0, 0.0]])

    def blobs():
        x = np.concatenate([rng.normal(size=(n, 2)) + m for m in means]).astype(np.float32)
        return jnp.asarray(x), jnp.asarray(np.repeat([0, 1], n))

    x_train, y_train = blobs()

    def loss(params):
        w, b = params
        lp = jsm.log_softmax(x_train @ w + b)
        return -jnp.mean(jnp.take_along_axis(lp, y_train[:, None], axis=-1)) + 1e-2 * jnp.sum(w**2)

    @jax.jit
    def train():
        def step(params, _):
            grads = jax.grad(loss)(params)
            return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads), None

        return jax.lax.scan(step, (jnp.zeros((2, 2)), jnp.zeros(2)), None, length=300)[0]

    w, b = train()
    x_known, y_known = blobs()
    x_unknown = jnp.asarray(rng.normal(size=(n, 2)) + np.array([0.0, 4.0]), jnp.float32)
    z_known, z_unknown = x_known @ w + b, x_unknown @ w + b
    assert float(jnp.mean(jnp.argmax(z_known, -1) == y_known)) > 0.99

    msp_k, msp_u = jsm.max_softmax_probability(z_known), jsm.max_softmax_probability(z_unknown)
    e_k, e_u = jsm.energy_score(z_known), jsm.energy_score(z_unknown)
    # Knowns should score higher MSP and lower energy (measured: 0.996 for both).
    assert auroc(msp_k, msp_u) > 0.95
    assert auroc(-e_k, -e_u) > 0.95

    # Thresholds at the 95 % true-positive rate on the known data (the usual protocol).
    for score, thr in [("msp", np.quantile(msp_k, 0.05)), ("energy", np.quantile(e_k, 0.95))]:
        pred_k = np.asarray(jsm.predict_with_rejection(z_known, threshold=thr, score=score))
        pred_u = np.asarray(jsm.predict_with_rejection(z_unknown, threshold=thr, score=score))
        kept = pred_k != -1
        assert kept.mean() >= 0.94, score
        assert np.mean(pred_k[kept] == np.asarray(y_known)[kept]) > 0.99, score
        assert np.mean(pred_u == -1) > 0.9, score  # measured: 0.986


# ---------------------------------------------------------------- reliability diagram


def test_reliability_diagram_bars_and_png_content():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(9)
    z = 3.0 * rng.normal(size=(4000, 5))
    y = sample_labels(z / 3.0, rng)  # over-confident by a factor 3
    n_bins = 10
    fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
    try:
        out = jsm.reliability_diagram(z.astype(np.float32), y, n_bins=n_bins, ax=ax)
        assert out is ax

        # Bar heights read back from the Axes equal per-bin accuracies from numpy.
        p = np.exp(np_log_softmax(z))
        conf, correct = p.max(-1), p.argmax(-1) == y
        b = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
        acc_bars, gap_bars = ax.containers[0], ax.containers[1]
        assert len(acc_bars) == n_bins and len(gap_bars) == n_bins
        for k in range(n_bins):
            in_bin = b == k
            want_acc = correct[in_bin].mean() if in_bin.any() else 0.0
            want_conf = conf[in_bin].mean() if in_bin.any() else 0.0
            assert acc_bars[k].get_height() == pytest.approx(want_acc, abs=1e-6)
            assert acc_bars[k].get_x() == pytest.approx(k / n_bins)
            # The gap bar spans from the accuracy up (or down) to the mean confidence.
            assert gap_bars[k].get_y() == pytest.approx(want_acc, abs=1e-6)
            assert gap_bars[k].get_y() + gap_bars[k].get_height() == pytest.approx(
                want_conf, abs=1e-5
            )
        ece = np_ece(z, y, n_bins)
        assert f"ECE = {ece:.4f}" in ax.get_title()
        # Over-confident: the top bin's accuracy is well below its confidence.
        assert acc_bars[-1].get_height() < 0.9

        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        buf.seek(0)
        img = mpimg.imread(buf, format="png")[..., :3]
        h, w_px = img.shape[:2]
        # Plot area in pixels (origin at the bottom-left for matplotlib, top-left in the image).
        x0, y0, x1, y1 = ax.get_window_extent().extents
        area = img[int(h - y1) + 2 : int(h - y0) - 2, int(x0) + 2 : int(x1) - 2]
        non_white = np.any(area < 0.95, axis=-1).mean()
        assert non_white > 0.15, non_white
        # The accuracy bars' blue (#3b75af) fills a good part of the plot area.
        blue = np.all(np.abs(area - np.array([0x3B, 0x75, 0xAF]) / 255) < 0.06, axis=-1).mean()
        assert blue > 0.05, blue
    finally:
        plt.close(fig)


def test_reliability_diagram_makes_its_own_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = np.log(np.array([[0.9, 0.1], [0.3, 0.7], [0.55, 0.45]]))
    ax = jsm.reliability_diagram(z, np.array([0, 1, 1]), n_bins=5)
    try:
        heights = [r.get_height() for r in ax.containers[0]]
        np.testing.assert_allclose(heights, [0, 0, 0, 1, 1])
        assert ax.get_xlabel() == "Confidence" and ax.get_ylabel() == "Accuracy"
    finally:
        plt.close(ax.figure)


def test_reliability_diagram_without_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"jsoftmax\[plot\]"):
        jsm.reliability_diagram(np.zeros((2, 3)), np.array([0, 1]))


def test_importing_jsoftmax_does_not_import_matplotlib():
    code = "import sys, jsoftmax; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0

"""``jsoftmax bench``: the performance table, measured now on this machine.

Method: every function is ``jax.jit``-compiled once through
``jax.jit(f).lower(*args).compile()`` — the compiled object is both timed and asked for
its ``memory_analysis()`` (temporary, argument and output bytes; deterministic). Timing
warms both functions up, then runs candidate and baseline interleaved, alternating which
goes first in each pair (A B, B A, ...) so that slow drifts of a shared machine cancel,
calls ``jax.block_until_ready`` on every result, and reports the median of the per-pair
time ratios (candidate / baseline; below 1 means jsoftmax is faster) with their range.

Rows:

* ``softmax`` / ``log_softmax`` forward + ``vjp`` with a random cotangent against
  ``jax.nn.softmax`` / ``jax.nn.log_softmax``, ``(4096, 32768)`` float32;
* ``cross_entropy`` (integer labels, mean) ``value_and_grad`` against
  ``optax.losses.softmax_cross_entropy_with_integer_labels(...).mean()``, same shape;
* ``linear_cross_entropy`` ``value_and_grad`` w.r.t. hidden and weight against
  ``h @ W`` followed by the optax loss, ``N=2048, D=512, V=65536`` float32;
* the same at ``N=8192, D=1024, V=131072`` with bfloat16 hidden and weight: compiled
  temporary memory only (lowered and compiled, never run);
* ``linear_softmax_stats``: ``value_and_grad`` w.r.t. hidden and weight of the RL-style
  objective ``Σ log p(y) + 0.01·Σ H`` against the same from materialised ``h @ W``
  (``jax.nn.log_softmax``), at the linear cross-entropy row's shape;
* ``linear_cross_entropy`` with ``filter_eps=2**-12`` and ``vocab_order`` on a synthetic
  language-model head (``lm_head_inputs``: Zipfian unigram bias, ~3 nats per token,
  weight stored in frequency order) against ``h @ W + b`` followed by the optax loss,
  and on random logits of standard deviation 3 (``random_head_inputs``, where nothing
  can be skipped) against the same call with ``filter_eps=None``; both at the linear
  cross-entropy row's shape.
* ``linear_kl_divergence`` (forward KL) and ``linear_jsd`` (``β = 0.5``):
  ``value_and_grad`` w.r.t. the student's hidden states and weight against the same
  divergence from both heads' materialised logits (teacher under ``stop_gradient``), at
  the linear cross-entropy row's shape (the teacher has the same ``D``).
* ``grpo_loss`` (DAPO aggregation, ``β = 0.04`` KL to a cached reference) on
  :func:`jsoftmax.linear_token_logprobs`: ``value_and_grad`` w.r.t. hidden states and
  head of one GRPO step on ``B`` sequences of ``T = 128`` tokens (``B·T = N`` of the
  linear cross-entropy row) against the same loss on the materialised ``(B, T, V)``
  logits (``log_softmax`` in float32, a gather).

``--quick`` uses smaller shapes and 5 pairs (under a minute on 2 cores); its rows are
labelled "quick" and do not stand in for the full-size numbers.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jsoftmax as jsm

MiB = 2**20


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Shapes of one benchmark mode."""

    label: str
    rows: int  # softmax / cross-entropy batch
    classes: int  # softmax / cross-entropy classes
    lce: tuple[int, int, int]  # linear cross-entropy N, D, V (timed)
    lce_big: tuple[int, int, int]  # linear cross-entropy N, D, V (bf16, memory only)
    pairs: int


FULL = Sizes("full", 4096, 32768, (2048, 512, 65536), (8192, 1024, 131072), pairs=7)
QUICK = Sizes("quick", 1024, 8192, (512, 256, 16384), (8192, 1024, 131072), pairs=5)
# Only for the command-line tests: seconds, not numbers anyone should quote.
TINY = Sizes("tiny", 64, 512, (64, 32, 1024), (256, 64, 65536), pairs=3)


@dataclasses.dataclass
class Row:
    """One measured line of the table (``None`` where not measured or not available)."""

    name: str
    shape: str
    baseline: str
    target: str
    available: bool = True
    time_ratio: float | None = None
    time_ratio_range: tuple[float, float] | None = None
    cand_ms: float | None = None
    base_ms: float | None = None
    cand_temp: int | None = None
    base_temp: int | None = None
    cand_args: int | None = None
    cand_out: int | None = None
    met: bool | None = None
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Case:
    """A row to measure: ``build()`` returns ``(candidate, baseline, args)`` or ``None``."""

    name: str
    shape: str
    baseline: str
    target: str
    build: Callable[[], tuple[Callable, Callable, tuple] | None]
    timed: bool = True
    check: Callable[[Row], bool] | None = None


# --------------------------------------------------------------------------- cases


def _fwd_vjp(fn):
    """``(x, g) -> (fn(x), vjp(g))``: forward output and input cotangent, both kept."""

    def f(x, g):
        y, pullback = jax.vjp(fn, x)
        return y, pullback(g)[0]

    return f


def _softmax_case(name: str, sizes: Sizes) -> Case:
    shape = (sizes.rows, sizes.classes)

    def build():
        k1, k2 = jax.random.split(jax.random.PRNGKey(0))
        x = 3.0 * jax.random.normal(k1, shape, jnp.float32)
        g = jax.random.normal(k2, shape, jnp.float32)
        ours = getattr(jsm, name)
        return _fwd_vjp(ours), _fwd_vjp(getattr(jax.nn, name)), (x, g)

    return Case(
        f"{name} fwd+vjp",
        f"{shape} f32",
        f"jax.nn.{name}",
        "time <= 1.0x",
        build,
        check=lambda r: r.time_ratio <= 1.0,
    )


def _cross_entropy_case(sizes: Sizes) -> Case:
    shape = (sizes.rows, sizes.classes)

    def build():
        ce = getattr(jsm, "cross_entropy", None)
        if ce is None:
            return None
        k1, k2 = jax.random.split(jax.random.PRNGKey(1))
        z = 3.0 * jax.random.normal(k1, shape, jnp.float32)
        y = jax.random.randint(k2, shape[:1], 0, shape[1])
        ours = jax.value_and_grad(lambda z, y: ce(z, y))
        base = jax.value_and_grad(
            lambda z, y: optax.losses.softmax_cross_entropy_with_integer_labels(z, y).mean()
        )
        return ours, base, (z, y)

    return Case(
        "cross_entropy value_and_grad",
        f"{shape} f32",
        "optax int-label CE .mean()",
        "time <= 0.8x, temp <= 1x",
        build,
        check=lambda r: r.time_ratio <= 0.8 and r.cand_temp <= r.base_temp,
    )


def _naive_linear_ce(h, w, y):
    return optax.losses.softmax_cross_entropy_with_integer_labels(
        (h @ w).astype(jnp.float32), y
    ).mean()


def _lce_inputs(n, d, v, dtype, seed):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    h = jax.random.normal(k1, (n, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(k2, (d, v), jnp.float32) / np.sqrt(d)).astype(dtype)
    y = jax.random.randint(k3, (n,), 0, v)
    return h, w, y


def _linear_ce_pair():
    """``value_and_grad`` w.r.t. hidden and weight of ours and of the naive loss."""
    lce = getattr(jsm, "linear_cross_entropy", None)
    if lce is None:
        return None
    ours = jax.value_and_grad(lambda h, w, y: lce(h, w, y), argnums=(0, 1))
    return ours, jax.value_and_grad(_naive_linear_ce, argnums=(0, 1))


def _linear_ce_case(sizes: Sizes) -> Case:
    n, d, v = sizes.lce

    def build():
        pair = _linear_ce_pair()
        return None if pair is None else (*pair, _lce_inputs(n, d, v, jnp.float32, 2))

    return Case(
        "linear_cross_entropy v&g (h, W)",
        f"N={n} D={d} V={v} f32",
        "h @ W, then optax CE",
        "temp <= 1/8x, time <= 1.15x",
        build,
        check=lambda r: r.cand_temp * 8 <= r.base_temp and r.time_ratio <= 1.15,
    )


def _linear_ce_big_case(sizes: Sizes) -> Case:
    n, d, v = sizes.lce_big

    def build():
        pair = _linear_ce_pair()
        if pair is None:
            return None
        ours, base = pair
        # Shape-only arguments: the arrays (and the naive logits) are never allocated.
        args = (
            jax.ShapeDtypeStruct((n, d), jnp.bfloat16),
            jax.ShapeDtypeStruct((d, v), jnp.bfloat16),
            jax.ShapeDtypeStruct((n,), jnp.int32),
        )
        return ours, base, args

    return Case(
        "linear_cross_entropy v&g (h, W)",
        f"N={n} D={d} V={v} bf16",
        "h @ W, then optax CE",
        "temp < 2 GiB (compile only)",
        build,
        timed=False,
        check=lambda r: r.cand_temp < 2 * 1024 * MiB,
    )


# Gradient filtering: a head whose softmax looks like a trained language model's.
FILTER_EPS = 2.0**-12  # Cut Cross-Entropy's bfloat16 default, passed explicitly
_ZIPF = 1.1  # unigram frequency of the r-th most frequent token ∝ r**-1.1
_CONTEXT = 8  # candidate tokens mixed into each hidden state
_STRENGTH = 14.0  # hidden-state scale: ~3 nats of per-token entropy at V=65536


def lm_head_inputs(n: int, d: int, v: int, seed: int = 0):
    """A synthetic language-model head ``(h, w_sorted, labels, bias, order)``.

    Unigram frequencies are Zipfian, ``q_r ∝ r^-1.1`` over ranks ``r = 1..V``, assigned to
    the caller's token ids by a random permutation. The bias is ``log q`` (the unigram
    prior a trained head learns), ``W`` has independent ``N(0, 1/D)`` entries, and each
    hidden state is ``20·Σ_k c_k W[:, t_k]``: ``K = 8`` context tokens ``t_k`` drawn from
    ``q``, mixed with Dirichlet(1) weights ``c``. The logits ``h W + b`` then have ~3 nats
    of entropy per token (about 3.0 at ``N=2048, D=512, V=65536``) and put their mass on
    frequent tokens and on each token's context; the labels are sampled from
    ``softmax(h W + b)`` (a calibrated model). The weight is returned stored in
    frequency order (``w[:, order]``, ``order = vocab_order_from_counts(q)``); labels
    and bias keep the caller's ids.
    """
    rng = np.random.default_rng(seed)
    q_rank = np.arange(1, v + 1, dtype=np.float64) ** -_ZIPF
    q_rank /= q_rank.sum()
    ids = rng.permutation(v)  # ids[r]: the caller's id of the rank-r token
    q = np.empty(v)
    q[ids] = q_rank
    w = (rng.standard_normal((d, v)) / np.sqrt(d)).astype(np.float32)
    ctx = rng.choice(v, size=(n, _CONTEXT), p=q)
    mix = rng.dirichlet(np.ones(_CONTEXT), size=n)
    h = (_STRENGTH * np.einsum("nk,nkd->nd", mix, w.T[ctx])).astype(np.float32)
    bias = np.log(q).astype(np.float32)
    keys = jax.random.split(jax.random.PRNGKey(seed), -(-n // 256))
    rows = []
    for i, key in enumerate(keys):  # sampled in row blocks: no (N, V) array at once
        z = jnp.asarray(h[i * 256 : (i + 1) * 256]) @ jnp.asarray(w) + jnp.asarray(bias)
        rows.append(jax.random.categorical(key, z))
    labels = jnp.concatenate(rows).astype(jnp.int32)
    order = jsm.vocab_order_from_counts(jnp.asarray(q))
    w_sorted = jnp.asarray(w)[:, order]
    return jnp.asarray(h), w_sorted, labels, jnp.asarray(bias), order


def random_head_inputs(n: int, d: int, v: int, seed: int = 0):
    """Random logits of standard deviation 3 (``h ~ N(0, 1)``, ``W ~ N(0, 9/D)``, uniform
    labels, zero bias, identity order): every tile holds probabilities far above any
    useful threshold, so filtering can skip nothing and only its checks cost."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    h = jax.random.normal(k1, (n, d), jnp.float32)
    w = jax.random.normal(k2, (d, v), jnp.float32) * (3.0 / np.sqrt(d))
    y = jax.random.randint(k3, (n,), 0, v)
    return h, w, y, jnp.zeros((v,), jnp.float32), jnp.arange(v, dtype=jnp.int32)


def _filtered_lce(filter_eps):
    def loss(h, w, y, b, order):
        return jsm.linear_cross_entropy(
            h, w, y, linear_bias=b, vocab_order=order, filter_eps=filter_eps
        )

    return jax.value_and_grad(loss, argnums=(0, 1))


def _naive_linear_ce_bias(h, w, y, b, order):
    """``h @ W + b`` then optax, on the frequency-sorted weight (labels moved to it)."""
    pos = jnp.zeros(order.shape, jnp.int32).at[order].set(jnp.arange(order.shape[0]))
    logits = h @ w + b[order]
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, pos[y]).mean()


def _filter_case(sizes: Sizes) -> Case:
    n, d, v = sizes.lce

    def build():
        ours = _filtered_lce(FILTER_EPS)
        base = jax.value_and_grad(_naive_linear_ce_bias, argnums=(0, 1))
        return ours, base, lm_head_inputs(n, d, v)

    return Case(
        "linear_cross_entropy filter_eps=2^-12 v&g (h, W)",
        f"N={n} D={d} V={v} f32, LM-like ~3 nats, sorted",
        "h @ W + b, then optax CE",
        "temp <= 1/8x, time <= 0.75x",
        build,
        check=lambda r: r.cand_temp * 8 <= r.base_temp and r.time_ratio <= 0.75,
    )


def _filter_random_case(sizes: Sizes) -> Case:
    n, d, v = sizes.lce

    def build():
        return _filtered_lce(FILTER_EPS), _filtered_lce(None), random_head_inputs(n, d, v)

    return Case(
        "linear_cross_entropy filter_eps=2^-12 v&g (h, W)",
        f"N={n} D={d} V={v} f32, random logits (std 3)",
        "the same with filter_eps=None",
        "time <= 1.05x",
        build,
        check=lambda r: r.time_ratio <= 1.05,
    )


def _rl_objective(label_logprob, entropy):
    return jnp.sum(label_logprob) + 0.01 * jnp.sum(entropy)


def _naive_softmax_stats_objective(h, w, y):
    logp = jax.nn.log_softmax((h @ w).astype(jnp.float32), axis=-1)
    label_logprob = jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return _rl_objective(label_logprob, entropy)


def _linear_stats_case(sizes: Sizes) -> Case:
    n, d, v = sizes.lce

    def build():
        stats = getattr(jsm, "linear_softmax_stats", None)
        if stats is None:
            return None

        def objective(h, w, y):
            s = stats(h, w, y)
            return _rl_objective(s.label_logprob, s.entropy)

        ours = jax.value_and_grad(objective, argnums=(0, 1))
        base = jax.value_and_grad(_naive_softmax_stats_objective, argnums=(0, 1))
        return ours, base, _lce_inputs(n, d, v, jnp.float32, 3)

    return Case(
        "linear_softmax_stats v&g (h, W)",
        f"N={n} D={d} V={v} f32",
        "h @ W, log_softmax: Σ log p_y + 0.01 Σ H",
        "temp <= 1/8x, time <= 1.2x",
        build,
        check=lambda r: r.cand_temp * 8 <= r.base_temp and r.time_ratio <= 1.2,
    )


def _naive_distill(kind):
    """The loss from materialised ``(N, V)`` logits of both heads (teacher held fixed)."""

    def loss(hs, ws, ht, wt):
        zs = (hs @ ws).astype(jnp.float32)
        zt = jax.lax.stop_gradient((ht @ wt).astype(jnp.float32))
        if kind == "jsd":
            return jnp.mean(jsm.jsd(zs, zt))
        return jnp.mean(jsm.kl_divergence(zs, zt))

    return loss


def _distill_case(sizes: Sizes, kind: str) -> Case:
    n, d, v = sizes.lce
    fn = "linear_jsd" if kind == "jsd" else "linear_kl_divergence"

    def build():
        ours_fn = getattr(jsm, fn, None)
        if ours_fn is None:
            return None
        ours = jax.value_and_grad(lambda hs, ws, ht, wt: ours_fn(hs, ws, ht, wt), (0, 1))
        base = jax.value_and_grad(_naive_distill(kind), (0, 1))
        hs, ws, _ = _lce_inputs(n, d, v, jnp.float32, 4)
        ht, wt, _ = _lce_inputs(n, d, v, jnp.float32, 5)
        return ours, base, (hs, ws, ht, 1.5 * wt)

    what = "JSD(β=0.5)" if kind == "jsd" else "KL(teacher‖student)"
    return Case(
        f"{fn} v&g (h_s, W_s)",
        f"N={n} D={d} V={v} f32",
        f"both heads' logits, then {what}",
        "temp <= 1/8x, time <= 1.2x",
        build,
        check=lambda r: r.cand_temp * 8 <= r.base_temp and r.time_ratio <= 1.2,
    )


# Post-training: one GRPO step from the hidden states, fused against materialised logits.
GRPO_BETA = 0.04


def grpo_step(fused: bool) -> Callable:
    """``value_and_grad`` in ``(hidden, kernel)`` of a GRPO loss (DAPO aggregation, KL to
    a cached reference) on ``(B, T, D)`` hidden states and a ``(D, V)`` head: through
    :func:`jsoftmax.linear_token_logprobs` (``fused=True``) or through the materialised
    ``(B, T, V)`` logits, ``jax.nn.log_softmax`` in float32 and a gather."""

    def token_logprobs(h, w, y, mask):
        if fused:
            return jsm.linear_token_logprobs(h, w, y, mask=mask)
        z = jnp.einsum("btd,dv->btv", h, w).astype(jnp.float32)
        lp = jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), y[..., None], axis=-1)[..., 0]
        return jnp.where(mask, lp, 0.0)

    def loss(h, w, y, mask, old_logps, advantages, ref_logps):
        lp = token_logprobs(h, w, y, mask)
        return jsm.grpo_loss(lp, old_logps, advantages, mask, ref_logps=ref_logps,
                             beta=GRPO_BETA)  # fmt: skip

    return jax.value_and_grad(loss, argnums=(0, 1))


def grpo_step_args(b: int, t: int, d: int, v: int, dtype: Any, seed: int = 0) -> tuple:
    """Concrete inputs of :func:`grpo_step`: a padded batch of sampled tokens."""
    key = jax.random.split(jax.random.key(seed), 6)
    h = jax.random.normal(key[0], (b, t, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(key[1], (d, v), jnp.float32) / np.sqrt(d)).astype(dtype)
    y = jax.random.randint(key[2], (b, t), 0, v, jnp.int32)
    lengths = jax.random.randint(key[3], (b, 1), t // 2, t + 1)
    mask = jnp.arange(t)[None, :] < lengths
    old = jnp.where(mask, -jnp.log(float(v)) + 0.1 * jax.random.normal(key[4], (b, t)), 0.0)
    adv = jax.random.normal(key[5], (b,), jnp.float32)
    return h, w, y, mask, old, adv, old - 0.05


def grpo_step_shapes(b: int, t: int, d: int, v: int, dtype: Any) -> tuple:
    """Shape-only arguments of :func:`grpo_step` (nothing is allocated)."""
    sds = jax.ShapeDtypeStruct
    f32 = jnp.float32
    return (sds((b, t, d), dtype), sds((d, v), dtype), sds((b, t), jnp.int32),
            sds((b, t), jnp.bool_), sds((b, t), f32), sds((b,), f32), sds((b, t), f32))  # fmt: skip


def _grpo_case(sizes: Sizes) -> Case:
    n, d, v = sizes.lce
    t = min(n, 128)
    b = n // t

    def build():
        if getattr(jsm, "grpo_loss", None) is None:
            return None
        return grpo_step(True), grpo_step(False), grpo_step_args(b, t, d, v, jnp.float32, 6)

    return Case(
        "grpo_loss v&g (h, W), linear_token_logprobs",
        f"B={b} T={t} D={d} V={v} f32",
        "h @ W, log_softmax, gather, grpo_loss",
        "temp <= 1/8x, time <= 1.2x",
        build,
        check=lambda r: r.cand_temp * 8 <= r.base_temp and r.time_ratio <= 1.2,
    )


def cases(sizes: Sizes) -> list[Case]:
    """The benchmark rows for one mode, in table order."""
    return [
        _softmax_case("softmax", sizes),
        _softmax_case("log_softmax", sizes),
        _cross_entropy_case(sizes),
        _linear_ce_case(sizes),
        _linear_ce_big_case(sizes),
        _linear_stats_case(sizes),
        _filter_case(sizes),
        _filter_random_case(sizes),
        _distill_case(sizes, "forward"),
        _distill_case(sizes, "jsd"),
        _grpo_case(sizes),
    ]


# ----------------------------------------------------------------------- measuring


def _compile(fn, args):
    return jax.jit(fn).lower(*args).compile()


def _timed_call(compiled, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - start


def interleaved_ratios(a, b, args, pairs: int, tick: Callable[[], None] = lambda: None):
    """Per-pair time ratios ``t_a / t_b`` and the raw times (seconds), after warm-up.

    Each pair runs both functions back to back, alternating which runs first.
    """
    for _ in range(2):  # warm-up: first calls pay for allocation and thread start-up
        _timed_call(a, args)
        _timed_call(b, args)
    ratios, ta, tb = [], [], []
    for i in range(pairs):
        if i % 2 == 0:
            t_a = _timed_call(a, args)
            t_b = _timed_call(b, args)
        else:
            t_b = _timed_call(b, args)
            t_a = _timed_call(a, args)
        ratios.append(t_a / t_b)
        ta.append(t_a)
        tb.append(t_b)
        tick()
    return ratios, ta, tb


def measure(case: Case, pairs: int, tick: Callable[[], None] = lambda: None) -> Row:
    """Compile, measure memory and (for timed cases) time one case."""
    row = Row(case.name, case.shape, case.baseline, case.target)
    built = case.build()
    if built is None:
        row.available = False
        row.note = "function not available"
        return row
    ours, base, args = built
    c_ours = _compile(ours, args)
    tick()
    c_base = _compile(base, args)
    tick()
    m_ours, m_base = c_ours.memory_analysis(), c_base.memory_analysis()
    row.cand_temp, row.base_temp = m_ours.temp_size_in_bytes, m_base.temp_size_in_bytes
    row.cand_args, row.cand_out = m_ours.argument_size_in_bytes, m_ours.output_size_in_bytes
    if case.timed:
        ratios, ta, tb = interleaved_ratios(c_ours, c_base, args, pairs, tick)
        row.time_ratio = statistics.median(ratios)
        row.time_ratio_range = (min(ratios), max(ratios))
        row.cand_ms = 1e3 * statistics.median(ta)
        row.base_ms = 1e3 * statistics.median(tb)
    else:
        row.note = "compiled, not run"
    if case.check is not None:
        row.met = bool(case.check(row))
    return row


# ------------------------------------------------------------------------ printing


def _bytes(b: int | None) -> str:
    """Human-readable size (binary units)."""
    if b is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", MiB), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:,.1f} {unit}"
    return f"{b} B"


def format_table(rows: list[Row], sizes: Sizes) -> str:
    """The rows as a Markdown table."""
    head = [
        "what",
        "shape",
        "baseline",
        f"time ratio (median of {sizes.pairs}) [range]",
        "ms ours / base",
        "temp ours / base",
        "temp ratio",
        "args / out (ours)",
        "target",
        "met" if sizes.label == "full" else "met*",
    ]
    lines = []
    for r in rows:
        if not r.available:
            cells = [r.name, r.shape, r.baseline, *["n/a"] * 5, r.target, "n/a"]
        else:
            if r.time_ratio is None:
                t, ms = "not run", "-"
            else:
                lo, hi = r.time_ratio_range
                t = f"{r.time_ratio:.2f}x [{lo:.2f}-{hi:.2f}]"
                ms = f"{r.cand_ms:,.1f} / {r.base_ms:,.1f}"
            # A ratio of two near-empty scratch buffers says nothing; show it from 1 MiB up.
            if max(r.cand_temp, r.base_temp) < MiB:
                ratio = "both < 1 MiB"
            elif r.base_temp == 0:
                ratio = "base 0"
            else:
                ratio = f"{r.cand_temp / r.base_temp:.3g}x"
            cells = [
                r.name,
                r.shape,
                r.baseline,
                t,
                ms,
                f"{_bytes(r.cand_temp)} / {_bytes(r.base_temp)}",
                ratio,
                f"{_bytes(r.cand_args)} / {_bytes(r.cand_out)}",
                r.target,
                {True: "yes", False: "NO", None: "-"}[r.met],
            ]
        lines.append(cells)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(c) + " |" for c in lines]
    return "\n".join(out)


def environment() -> dict[str, Any]:
    """Where the numbers were measured."""
    dev = jax.devices()[0]
    return {
        "date": datetime.date.today().isoformat(),
        "jax": jax.__version__,
        "jsoftmax": jsm.__version__,
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }


class _Progress:
    """tqdm when installed (the ``demo`` extra), otherwise a silent counter."""

    def __init__(self, total: int, enabled: bool):
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, unit="step", file=sys.stderr, leave=False)
            except ModuleNotFoundError:
                pass

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description(text)

    def tick(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def run_bench(sizes: Sizes, *, pairs: int | None = None, progress: bool = True) -> list[Row]:
    """Measure every row of :func:`cases` for ``sizes``."""
    if pairs is not None:
        sizes = dataclasses.replace(sizes, pairs=pairs)
    todo = cases(sizes)
    total = sum(2 + (sizes.pairs if c.timed else 0) for c in todo)
    bar = _Progress(total, progress)
    rows = []
    try:
        for case in todo:
            bar.describe(f"{case.name} {case.shape}")
            rows.append(measure(case, sizes.pairs, bar.tick))
    finally:
        bar.close()
    return rows


def main(args: Any) -> int:
    """Entry point of ``jsoftmax bench`` (``args`` from the argparse sub-parser)."""
    if getattr(args, "sharding", False):
        # The per-layout table needs 8 devices: a fresh interpreter (JAX is started here).
        from . import _bench_sharding

        if args.pairs is not None and args.pairs < 0:
            raise SystemExit("--pairs must be >= 0")
        return _bench_sharding.main(
            pairs=args.pairs or 0, shape=_bench_sharding.TINY if args.tiny else None
        )
    sizes = TINY if args.tiny else QUICK if args.quick else FULL
    if args.pairs is not None:
        if args.pairs < 1:
            raise SystemExit("--pairs must be >= 1")
        sizes = dataclasses.replace(sizes, pairs=args.pairs)
    env = environment()
    start = time.perf_counter()
    rows = run_bench(sizes, progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    print(
        f"jsoftmax bench ({sizes.label} mode) — {env['date']}, jax {env['jax']}, "
        f"{env['backend']} ({env['device']}, {env['cpu_count']} cores visible)"
    )
    if sizes.label != "full":
        print(
            f"NOTE: {sizes.label} mode uses smaller shapes and fewer pairs than the full run; the "
            "targets are stated for the full shapes, so met* is indicative only."
        )
    print()
    print(format_table(rows, sizes))
    print()
    print(
        "time ratio = ours / baseline (< 1: jsoftmax faster), median over interleaved pairs; "
        "temp = compiled temporary buffers (memory_analysis)."
    )
    print(f"measured in {elapsed:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "mode": sizes.label,
                    "pairs": sizes.pairs,
                    "environment": env,
                    "seconds": elapsed,
                    "rows": [dataclasses.asdict(r) for r in rows],
                },
                f,
                indent=2,
            )
    return 0

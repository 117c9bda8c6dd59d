"""Tests for ``linear_softmax_stats`` and ``linear_cross_entropy(return_stats=True)``.

Every statistic is compared with the naive float64 computation from the materialised
logits ``softcap(h @ W + b) / T`` (values, and gradients of the differentiable ones for
random cotangents).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _references import (
    assert_memory_fraction,
    np_cross_entropy,
    ref_cross_entropy,
    rel_err,
    sum_tol,
)

import jsoftmax as jsm
from jsoftmax import _compat

stats_fn = jsm.linear_softmax_stats
FLOAT_FIELDS = ("lse", "label_logprob", "entropy", "topk_logprobs")


def naive_stats(h, w, labels=None, *, layout="dv", bias=None, temperature=1.0, softcap=None,
                top_k=0, ignore_index=-100):  # fmt: skip
    """The statistics from the materialised logits, with jax.nn / lax ops only."""
    z = h @ (w if layout == "dv" else w.T)
    if bias is not None:
        z = z + bias
    if softcap is not None:
        z = softcap * jnp.tanh(z / softcap)
    lp = jax.nn.log_softmax(z / temperature, axis=-1)
    p = jnp.exp(lp)
    out = dict(
        lse=jax.nn.logsumexp(z / temperature, axis=-1),
        entropy=-jnp.sum(jnp.where(p > 0, p * lp, 0.0), axis=-1),
        argmax=jnp.argmax(z, axis=-1),
    )
    if labels is not None:
        keep = labels != ignore_index
        lab = jnp.take_along_axis(lp, jnp.where(keep, labels, 0)[..., None], -1)[..., 0]
        out["label_logprob"] = jnp.where(keep, lab, 0.0)
        out["correct"] = keep & (out["argmax"] == labels)
    if top_k:
        out["topk_logprobs"], out["topk_indices"] = jax.lax.top_k(lp, top_k)
    return out


def _grid(n_cases=6, seed=7):
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n_cases):
        cases.append(
            dict(
                lead=[(11,), (3, 5), (2, 2, 3), (1,)][i % 4],
                d=int(rng.choice([4, 8])),
                v=int(rng.choice([37, 64, 130])),
                chunk_size=int(rng.choice([16, 24, 1000])),  # ragged last chunk, or one
                layout=["dv", "vd"][i % 2],
                bias=i % 4 in (1, 2),
                temperature=[1.0, 0.7, 1.9][i % 3],
                softcap=[None, 3.0][(i // 2) % 2],
                top_k=[0, 1, 5][i % 3],
                labels=i != 3,
                ignore_frac=[0.0, 0.3, 1.0][i % 3],
            )
        )
    return cases


def _case_inputs(case, rng):
    lead, d, v = case["lead"], case["d"], case["v"]
    h = rng.normal(size=(*lead, d))
    w = rng.normal(size=(d, v) if case["layout"] == "dv" else (v, d)) * 2 / np.sqrt(d)
    b = rng.normal(size=(v,)) if case["bias"] else None
    y = None
    if case["labels"]:
        y = rng.integers(0, v, size=lead).astype(np.int32)
        y = np.where(rng.uniform(size=lead) < case["ignore_frac"], -100, y).astype(np.int32)
    return h, w, b, y


@pytest.mark.parametrize("case", _grid(), ids=lambda c: f"{c['layout']}-T{c['temperature']}")
def test_grid_values_and_grads_float64(case, rng, x64):
    h, w, b, y = _case_inputs(case, rng)
    opts = dict(temperature=case["temperature"], top_k=case["top_k"])
    ours_kw = dict(opts, weight_layout=case["layout"], logit_softcap=case["softcap"])
    ref_kw = dict(opts, layout=case["layout"], softcap=case["softcap"])
    fields = [f for f in FLOAT_FIELDS if f != "label_logprob" or y is not None]
    fields = [f for f in fields if f != "topk_logprobs" or case["top_k"]]
    shape = h.shape[:-1]
    cots = {
        f: rng.normal(size=shape + ((case["top_k"],) if f[:4] == "topk" else ())) for f in fields
    }

    def ours(h, w, b):
        s = stats_fn(h, w, y, linear_bias=b, chunk_size=case["chunk_size"], **ours_kw)
        return sum(jnp.sum(cots[f] * getattr(s, f)) for f in fields), s._asdict()

    def ref(h, w, b):
        s = naive_stats(h, w, y, bias=b, **ref_kw)
        return sum(jnp.sum(cots[f] * s[f]) for f in fields), s

    argnums = (0, 1, 2) if b is not None else (0, 1)
    (_, got), grads = jax.jit(jax.value_and_grad(ours, argnums, has_aux=True))(h, w, b)
    (_, want), rgrads = jax.jit(jax.value_and_grad(ref, argnums, has_aux=True))(h, w, b)
    for name, value in got.items():
        if name not in want:
            assert value is None, name
            continue
        assert value.shape == want[name].shape, name
        if value.dtype == jnp.float64:
            np.testing.assert_allclose(value, want[name], rtol=1e-12, atol=1e-12, err_msg=name)
        else:
            np.testing.assert_array_equal(value, want[name], err_msg=name)
    assert got["argmax"].dtype == jnp.int32
    for g, rg in zip(grads, rgrads, strict=True):
        np.testing.assert_allclose(g, rg, rtol=1e-10, atol=1e-11)


def test_bf16_inputs_against_float64(rng):
    layout = "vd"  # both layouts are in the float64 grid
    n, d, v = 48, 32, 515
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.bfloat16)
    w = rng.normal(size=(d, v) if layout == "dv" else (v, d)) / np.sqrt(d) * 3
    w = jnp.asarray(w, jnp.bfloat16)
    b = jnp.asarray(rng.normal(size=(v,)), jnp.bfloat16)
    y = rng.integers(0, v, size=n).astype(np.int32)
    kw = dict(temperature=0.8, top_k=4)

    def objective(s):
        return jnp.sum(s["label_logprob"]) + 0.3 * jnp.sum(s["entropy"]) + jnp.mean(s["lse"])

    def ours(h, w, b):
        s = stats_fn(h, w, y, linear_bias=b, weight_layout=layout, chunk_size=128, **kw)
        return objective(s._asdict()), s

    (_, s), grads = jax.jit(jax.value_and_grad(ours, (0, 1, 2), has_aux=True))(h, w, b)
    assert [s.lse.dtype, s.entropy.dtype, s.label_logprob.dtype] == [jnp.float32] * 3
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
    with _compat.enable_x64(True):
        # Reference on the same (rounded) inputs, in float64.
        h64, w64, b64 = (np.asarray(a, np.float64) for a in (h, w, b))

        def ref(h, w, b):
            r = naive_stats(h, w, y, layout=layout, bias=b, **kw)
            return objective(r), r

        (_, r), rgrads = jax.jit(jax.value_and_grad(ref, (0, 1, 2), has_aux=True))(h64, w64, b64)
        r = jax.tree.map(np.asarray, r)
    # float32 accumulation: values float32-accurate; gradients carry bf16 rounding.
    for f in FLOAT_FIELDS:
        assert rel_err(getattr(s, f), r[f]) < 2e-6, f
    np.testing.assert_array_equal(s.argmax, r["argmax"])
    np.testing.assert_array_equal(s.topk_indices, r["topk_indices"])
    for g, rg in zip(grads, rgrads, strict=True):
        assert rel_err(g, rg) < 2e-2


def test_ties_take_the_first_index(rng):
    """Duplicate columns within a chunk and across chunks: first index, like jnp.argmax,
    and lax.top_k's lower-index-first order."""
    d, v = 6, 50
    w = rng.normal(size=(d, v)).astype(np.float32)
    h = rng.normal(size=(9, d)).astype(np.float32)
    best = np.argmax(h @ w, axis=1)
    # Copy each row's best column to a later one in the same chunk and in a later chunk,
    # and to an earlier one for row 0 (which then must win).
    for col in {int(c) for c in best}:
        w[:, 49] = w[:, col]
    w[:, 3] = w[:, best[0]]
    w[:, 40] = w[:, best[1]]
    z = h @ w
    for chunk in (8, 50):  # ties across chunks, and within one chunk
        s = stats_fn(h, w, top_k=6, chunk_size=chunk)
        np.testing.assert_array_equal(s.argmax, np.argmax(z, axis=1))
        _, idx = jax.lax.top_k(jnp.asarray(z), 6)
        np.testing.assert_array_equal(s.topk_indices, idx)
    # All-equal logits: index 0 and 0..k-1.
    s = stats_fn(np.zeros((2, d), np.float32), w, top_k=3, chunk_size=16)
    assert s.argmax.tolist() == [0, 0] and s.topk_indices.tolist() == [[0, 1, 2]] * 2
    np.testing.assert_allclose(s.entropy, np.log(v), rtol=1e-6)


def test_ignored_and_bad_labels(rng):
    h = rng.normal(size=(6, 8)).astype(np.float32)
    w = rng.normal(size=(8, 40)).astype(np.float32)
    y = np.array([1, 40, 3, -100, -5, 39], np.int32)  # 40 and -5 are out of range
    s = stats_fn(h, w, y, chunk_size=16)
    lp = np.asarray(s.label_logprob)
    assert np.isnan(lp[[1, 4]]).all() and lp[3] == 0.0 and np.isfinite(lp[[0, 2, 5]]).all()
    assert not np.asarray(s.correct)[[1, 3, 4]].any()
    assert np.isfinite(s.entropy).all() and np.isfinite(s.lse).all()

    keep = np.array([1, 0, 1, 0, 0, 1], bool)
    objectives = (
        lambda s: jnp.sum(s.label_logprob),
        lambda s: jnp.sum(jnp.where(keep, s.label_logprob, 0.0)),
        lambda s: jnp.sum(s.entropy),
    )

    @jax.jit
    def all_grads(h, w):
        return [jax.grad(lambda h, w, f=f: f(stats_fn(h, w, y, chunk_size=16)), (0, 1))(h, w)
                for f in objectives]  # fmt: skip

    (gh, gw), (gh_kept, _), (gh_ent, gw_ent) = jax.tree.map(np.asarray, all_grads(h, w))
    # The log-prob of a bad label poisons the gradient (NaN in its hidden row and in W)...
    assert np.isnan(gh[[1, 4]]).all() and np.isfinite(gh[[0, 2, 3, 5]]).all()
    assert np.isnan(gw).all()
    # ...unless masked out of the objective; an ignored position passes no gradient, and
    # the entropy does not depend on the labels.
    assert not np.any(gh_kept[3]) and np.isfinite(gh_kept).all()
    assert np.isfinite(gh_ent).all() and np.isfinite(gw_ent).all()
    with pytest.raises(Exception, match=r"linear_softmax_stats: bad label 40 at position \(1,\)"):
        jsm.checked(lambda: stats_fn(h, w, y))()


def test_masked_vocabulary_and_empty_rows(rng):
    """-inf bias entries get probability 0; a row with no admissible entry is empty:
    lse -inf, entropy 0, top-k log-probs -inf, finite (zero) gradients — never NaN."""
    h = rng.normal(size=(5, 4)).astype(np.float32)
    w = rng.normal(size=(4, 30)).astype(np.float32)
    b = np.where(np.arange(30) % 3 == 0, -np.inf, 0.0).astype(np.float32)
    y = np.array([1, 2, 4, 5, 7], np.int32)
    empty = np.full((30,), -np.inf, np.float32)

    def obj(h, w, b):
        s = stats_fn(h, w, y, linear_bias=b, top_k=3, chunk_size=8)
        return jnp.sum(s.label_logprob + s.entropy + s.lse) + jnp.sum(s.topk_logprobs), s

    @jax.jit
    def run(h, w, b):
        masked = jax.value_and_grad(obj, (0, 1, 2), has_aux=True)(h, w, b)
        s_empty = stats_fn(h, w, linear_bias=empty, top_k=2, chunk_size=8)
        ent = lambda h: jnp.sum(stats_fn(h, w, linear_bias=empty, chunk_size=8).entropy)  # noqa: E731
        return masked, s_empty, jax.grad(ent)(h), naive_stats(h, w, y, bias=b, top_k=3)

    ((_, got), grads), s, g_empty, want = run(h, w, b)
    for f in FLOAT_FIELDS:
        np.testing.assert_allclose(getattr(got, f), want[f], rtol=2e-6, atol=1e-6, err_msg=f)
    for g in grads:
        assert np.isfinite(g).all()
    assert np.all(s.lse == -np.inf) and not np.any(s.entropy)
    assert np.all(s.topk_logprobs == -np.inf) and not np.any(s.argmax)
    assert not np.any(g_empty)


def test_labels_none_and_shapes(rng):
    h = rng.normal(size=(2, 3, 8)).astype(np.float32)
    w = rng.normal(size=(8, 20)).astype(np.float32)
    s = stats_fn(h, w)
    assert s.label_logprob is None and s.correct is None and s.topk_logprobs is None
    assert s.lse.shape == s.entropy.shape == s.argmax.shape == (2, 3)
    s = stats_fn(h[0, 0], w, np.int32(4), top_k=2)
    assert s.label_logprob.shape == () and s.topk_indices.shape == (2,)


def _while_count(compiled_text):
    return len(re.findall(r"\bwhile\(", compiled_text))


def test_return_stats_from_the_loss_sweep(rng):
    """Same numbers as linear_softmax_stats; same loss; one `while` over the vocabulary
    chunks in the compiled forward pass (no second sweep); gradients through both."""
    h = rng.normal(size=(12, 8)).astype(np.float32)
    w = rng.normal(size=(8, 100)).astype(np.float32)
    y = rng.integers(0, 100, size=12).astype(np.int32)
    y[0] = -100
    kw = dict(label_smoothing=0.1, z_loss=1e-3, logit_softcap=5.0, chunk_size=16)
    fwd = jax.jit(lambda h, w: jsm.linear_cross_entropy(h, w, y, return_stats=True, top_k=3, **kw))
    compiled = fwd.lower(h, w).compile()
    assert _while_count(compiled.as_text()) == 1, _while_count(compiled.as_text())
    loss, s = compiled(h, w)
    # Against float64 references on the materialised logits (jax.nn / numpy), not against
    # the library's other entry points.
    with _compat.enable_x64(True):
        h64, w64 = np.asarray(h, np.float64), np.asarray(w, np.float64)
        ref = jax.tree.map(np.asarray, naive_stats(h64, w64, y, softcap=5.0, top_k=3))
        zc = 5.0 * np.tanh(h64 @ w64 / 5.0)
        ref_loss, _ = np_cross_entropy(zc, y, label_smoothing=0.1, z_loss=1e-3)

        def combined_ref(h, w):
            r = naive_stats(h, w, y, softcap=5.0, top_k=3)
            zc = 5.0 * jnp.tanh(h @ w / 5.0)
            loss = ref_cross_entropy(zc, y, label_smoothing=0.1, z_loss=1e-3)
            return loss + 0.1 * jnp.sum(r["entropy"]) - 0.2 * jnp.sum(r["topk_logprobs"][:, 0])

        rg = jax.grad(combined_ref, (0, 1))(h64, w64)
    # float32 accumulation of a D-term matmul and a V-term sum: γ_{D+V} (sum_tol) relative
    # to the sizes involved (|logits|, |lse| <= ~15 here).
    tol = sum_tol(8 + 100) * 15
    np.testing.assert_allclose(loss, ref_loss, rtol=0, atol=tol)
    for f in jsm.SoftmaxStats._fields:
        got, want = np.asarray(getattr(s, f)), ref.get(f)
        if f == "correct":
            want = (ref["argmax"] == y) & (y != -100)
        if want is None:
            continue
        if np.issubdtype(got.dtype, np.floating):
            np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=f)
        else:
            np.testing.assert_array_equal(got, want, err_msg=f)

    def combined(h, w, stats_call):
        loss, s = stats_call(h, w)
        return loss + 0.1 * jnp.sum(s.entropy) - 0.2 * jnp.sum(s.topk_logprobs[:, 0])

    g = jax.jit(jax.grad(lambda h, w: combined(h, w, fwd), (0, 1)))(h, w)
    for a, b in zip(g, rg, strict=True):
        # The same float32 error, relative to the gradient's scale.
        assert rel_err(a, b) < tol


def test_no_host_transfers(rng):
    h = rng.normal(size=(3, 10, 8)).astype(np.float32)
    w = rng.normal(size=(8, 64)).astype(np.float32)
    y = rng.integers(0, 64, size=(3, 10)).astype(np.int32)
    f = jax.jit(
        jax.value_and_grad(
            lambda h, w, y: jnp.sum(stats_fn(h, w, y, top_k=2, chunk_size=24).entropy), (0, 1)
        )
    )
    args = [jax.device_put(a) for a in (h, w, y)]
    jax.block_until_ready(f(*args))
    with jax.transfer_guard("disallow"):
        jax.block_until_ready(f(*args))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(temperature=0.0), ValueError, "`temperature` must be finite and > 0"),
        (dict(temperature=float("inf")), ValueError, "`temperature`"),
        (dict(temperature=jnp.array(2.0)), TypeError, "`temperature` must be a Python number"),
        (dict(top_k=11), ValueError, r"`top_k`=11 is larger than the vocabulary \(10\)"),
        (dict(top_k=-1), ValueError, "`top_k` must be >= 0"),
        (dict(top_k=2.0), TypeError, "`top_k` must be a Python int"),
        (dict(logit_softcap=-1.0), ValueError, "`logit_softcap`"),
        (dict(labels=np.ones((4,))), TypeError, "`labels` must be integers"),
        (dict(linear_bias=np.ones((9,))), ValueError, r"`linear_bias` must have shape \(10,\)"),
        (dict(weight_layout="vd"), ValueError, "does not match `hidden`"),
        (dict(axis_name="v"), ValueError, "not a mesh axis of an enclosing"),
    ],
)
def test_bad_input(kwargs, exc, match):
    args = dict(hidden=np.ones((4, 8)), linear_weight=np.ones((8, 10)), labels=None)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        stats_fn(args.pop("hidden"), args.pop("linear_weight"), args.pop("labels"), **args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(return_stats=True, return_lse=True), "`return_lse=True` and `return_stats=True`"),
        (dict(top_k=2), "`top_k` selects statistics: it needs `return_stats=True`"),
        (dict(return_stats=True, top_k=11), r"`top_k`=11 is larger than the vocabulary"),
        (dict(return_stats=True, impl="pallas"), "impl='pallas' does not support"),
    ],
)
def test_bad_input_return_stats(kwargs, match):
    h, w, y = np.ones((4, 8)), np.ones((8, 10)), np.zeros((4,), np.int32)
    with pytest.raises(ValueError, match=match):
        jsm.linear_cross_entropy(h, w, y, **kwargs)


def test_memory_is_an_eighth_of_naive():
    """The performance target: value_and_grad of label_logprob.sum() + 0.01 * entropy.sum() w.r.t.
    hidden and weight, N=2048, D=512, V=65536 float32 — compiled, never run."""
    n, d, v = 2048, 512, 65536
    args = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )

    def ours(h, w, y):
        s = stats_fn(h, w, y)
        return jnp.sum(s.label_logprob) + 0.01 * jnp.sum(s.entropy)

    def naive(h, w, y):
        s = naive_stats(h, w, y)
        return jnp.sum(s["label_logprob"]) + 0.01 * jnp.sum(s["entropy"])

    assert_memory_fraction(ours, naive, args, naive_at_least=n * v * 4)

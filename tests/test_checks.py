"""Tests for jsoftmax/_checks.py: ``checked`` names the first bad label, NaN otherwise."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify

import jsoftmax as jsm

X = jax.random.normal(jax.random.key(0), (2, 3, 5))
Y = jnp.array([[0, 1, 2], [3, 4, -100]])


def _raises(fn, *args, position, label):
    with pytest.raises(checkify.JaxRuntimeError) as info:
        fn(*args)
    msg = str(info.value)
    assert f"bad label {label} at position {position}" in msg, msg
    return msg


def test_checked_names_first_bad_position_and_value():
    y = Y.at[1, 0].set(7).at[1, 2].set(-3)  # two bad labels; (1, 0) comes first
    msg = _raises(jsm.checked(jsm.cross_entropy), X, y, position="(1, 0)", label=7)
    assert "0 <= label < 5" in msg and "ignore_index (-100)" in msg


def test_checked_with_jit_inside_and_outside():
    f = jax.jit(lambda x, y: jsm.cross_entropy(x, y, label_smoothing=0.1))
    y = Y.at[0, 2].set(5)
    # Tracing f first (without checks) must not let the cached trace skip them later.
    assert np.isnan(f(X, y))
    _raises(jsm.checked(f), X, y, position="(0, 2)", label=5)
    # A checkified function can itself be jitted: that is where the checks live.
    _raises(jsm.checked(jax.jit(jsm.cross_entropy)), X, y, position="(0, 2)", label=5)
    # Valid input: same value as the unchecked call.
    np.testing.assert_allclose(jsm.checked(f)(X, Y), f(X, Y), rtol=1e-7)


def test_checked_under_grad_and_vmap():
    y = Y.at[1, 1].set(-1)
    grad = jax.jit(jax.grad(lambda x, y: jsm.cross_entropy(x, y)))
    _raises(jsm.checked(grad), X, y, position="(1, 1)", label=-1)
    per_row = jax.vmap(lambda x, y: jsm.cross_entropy(x, y))
    with pytest.raises(checkify.JaxRuntimeError, match="bad label -1"):
        jsm.checked(per_row)(X, y)
    g = jsm.checked(grad)(X, Y)
    assert np.all(np.isfinite(g))


def test_checked_masked_class_and_other_losses():
    where = jnp.array([True, True, False, True, True])
    msg = _raises(
        jsm.checked(lambda x, y: jsm.cross_entropy(x, y, where=where)),
        X,
        Y,
        position="(0, 2)",
        label=2,
    )
    assert "`where` allows" in msg
    y = Y.at[0, 1].set(9)
    _raises(jsm.checked(jsm.nll_loss), jax.nn.log_softmax(X), y, position="(0, 1)", label=9)
    _raises(jsm.checked(jsm.focal_loss), X, y, position="(0, 1)", label=9)
    # A 1-D batch gives a 1-tuple.
    _raises(jsm.checked(jsm.cross_entropy), X[0], jnp.array([0, 5, 1]), position="(1,)", label=5)


def test_checked_soft_labels_on_masked_class():
    where = jnp.array([True, True, False, True, True])
    q = jax.nn.softmax(X)  # mass everywhere, including the masked class
    with pytest.raises(checkify.JaxRuntimeError, match=re.escape("at position (0, 0)")):
        jsm.checked(lambda x, q: jsm.cross_entropy(x, q, where=where))(X, q)


def test_unchecked_bad_label_is_nan_and_optax_is_finite():
    y = Y.at[0, 0].set(-1)
    assert np.isnan(jsm.cross_entropy(X, y))
    # optax reads label -1 as "no class": a finite, plausible, wrong number.
    theirs = optax.losses.softmax_cross_entropy_with_integer_labels(X, jnp.where(y < 0, -1, y))
    assert np.all(np.isfinite(theirs))


def test_checked_passes_through_outputs():
    f = jsm.checked(lambda x, y: (jsm.cross_entropy(x, y), {"n": y.size}))
    loss, aux = f(X, Y)
    assert aux == {"n": 6}
    np.testing.assert_allclose(loss, jsm.cross_entropy(X, Y), rtol=1e-7)


def test_empty_batch_is_not_an_error():
    logits, labels = jnp.ones((0, 5)), jnp.zeros((0,), jnp.int32)
    assert jsm.cross_entropy(logits, labels) == 0.0
    assert jsm.cross_entropy(logits, labels, reduction="none").shape == (0,)
    assert jsm.checked(jsm.cross_entropy)(logits, labels) == 0.0
    np.testing.assert_array_equal(jax.grad(jsm.cross_entropy)(logits, labels), logits * 0)

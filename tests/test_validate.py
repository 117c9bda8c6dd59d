"""Tests for jsoftmax/_validate.py: one validator per concept, and the naming rule.

The naming rule of the public API: per-class weights are ``weight`` everywhere (outside
``jsoftmax.optax``, which keeps optax's names), per-position weights ``sample_weight``,
targets ``labels``, the LM-head projection ``linear_weight``/``linear_bias``; options
are keyword-only (the softmax family keeps ``jax.nn``'s positional ``axis``).
"""

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jsoftmax as jsm
from jsoftmax import _validate as check
from jsoftmax import kernels

# ---------------------------------------------------------------- the naming rule

FORBIDDEN = {
    "targets": "labels",
    "target": "labels",
    "class_weight": "weight",
    "class_weights": "weight",
    "weights": "weight",
    "bias": "linear_bias",
    "sample_weights": "sample_weight",
}
# Leading positional parameters each family may take; everything else is keyword-only.
# The distillation losses take two heads' inputs, named by role (student_*, teacher_*);
# the post-training losses take log-probabilities (and GRPO its advantages and mask).
POSITIONAL_OK = {"x", "axis", "logits", "log_probs", "labels", "hidden", "linear_weight",
                 "counts", "class_priors", "fn",
                 "student_logits", "teacher_logits", "student_hidden", "student_weight",
                 "teacher_hidden", "teacher_weight", "teacher_logprobs",
                 "teacher_indices",
                 "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                 "logps", "old_logps", "advantages", "mask"}  # fmt: skip


def _public_functions(module, names):
    for name in names:
        obj = getattr(module, name)
        if inspect.isfunction(obj) or callable(obj) and hasattr(obj, "__wrapped__"):
            yield f"{module.__name__}.{name}", inspect.signature(obj)


def _public_api():
    top = [n for n in dir(jsm) if not n.startswith("_") and callable(getattr(jsm, n))]
    yield from _public_functions(jsm, top)
    yield from _public_functions(kernels, kernels.__all__)


def test_public_signatures_follow_the_naming_rule():
    seen = 0
    for qualname, sig in _public_api():
        seen += 1
        for p in sig.parameters.values():
            assert p.name not in FORBIDDEN, (
                f"{qualname}: parameter `{p.name}` should be `{FORBIDDEN[p.name]}`"
            )
            if p.kind is p.POSITIONAL_OR_KEYWORD:
                assert p.name in POSITIONAL_OK, (
                    f"{qualname}: option `{p.name}` should be keyword-only"
                )
    assert seen >= 25  # the walk reached the whole API (it would pass vacuously otherwise)


def test_per_class_weights_are_called_weight():
    # Every loss that takes per-class weights takes them as `weight` (focal's paper name
    # `alpha` is its documented exception), and the LM head's matrix is `linear_weight`.
    for fn in (jsm.cross_entropy, jsm.nll_loss, jsm.linear_cross_entropy, jsm.softmax,
               jsm.log_softmax, jsm.logsumexp, jsm.loss_denominator):  # fmt: skip
        assert "weight" in inspect.signature(fn).parameters, fn.__name__
    for fn in (jsm.linear_cross_entropy, kernels.linear_cross_entropy):
        params = list(inspect.signature(fn).parameters)
        assert params[:3] == ["hidden", "linear_weight", "labels"]
        assert "linear_bias" in params


def test_optax_dropins_keep_optax_names():
    for name in ("softmax_cross_entropy", "softmax_cross_entropy_with_integer_labels",
                 "sigmoid_binary_cross_entropy", "sigmoid_focal_loss"):  # fmt: skip
        ours = list(inspect.signature(getattr(jsm.optax, name)).parameters)
        theirs = list(inspect.signature(getattr(optax.losses, name)).parameters)
        assert ours == theirs, name


# ------------------------------------------------------- the same check everywhere


def _call_each_loss(**kw):
    x = jnp.zeros((2, 3))
    y = jnp.array([0, 1])
    h, w = jnp.ones((2, 4)), jnp.ones((4, 3))
    return [
        lambda: jsm.cross_entropy(x, y, **kw),
        lambda: jsm.linear_cross_entropy(h, w, y, **kw),
        lambda: kernels.cross_entropy(x, y, **kw),
        lambda: kernels.linear_cross_entropy(h, w, y, **kw),
    ]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(z_loss=math.inf), "`z_loss` must be finite and >= 0"),
        (dict(z_loss=-1.0), "`z_loss` must be finite and >= 0"),
        (dict(z_loss=math.nan), "`z_loss`"),
        (dict(label_smoothing=1.5), r"`label_smoothing` must be finite and in \[0.0, 1.0\]"),
        (dict(label_smoothing=math.inf), "`label_smoothing`"),
    ],
)
def test_static_hyperparameters_are_refused_identically(kw, match):
    for call in _call_each_loss(**kw):
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize("value", [jnp.array(0.1), True, "0.1"])
def test_static_hyperparameters_must_be_python_numbers(value):
    for call in _call_each_loss(label_smoothing=value):
        with pytest.raises(TypeError, match="`label_smoothing` must be a Python number"):
            call()


@pytest.mark.parametrize("value", [1.5, True, "x"])
def test_ignore_index_is_a_python_int_everywhere(value):
    calls = _call_each_loss(ignore_index=value) + [
        lambda: jsm.nll_loss(jnp.zeros((2, 3)), jnp.array([0, 1]), ignore_index=value),
        lambda: jsm.focal_loss(jnp.zeros((2, 3)), jnp.array([0, 1]), ignore_index=value),
        lambda: jsm.fit_temperature(jnp.zeros((2, 3)), jnp.array([0, 1]), ignore_index=value),
        lambda: jsm.loss_denominator(jnp.array([0, 1]), ignore_index=value),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="`ignore_index` must be a Python int"):
            call()


def test_reduction_is_checked_everywhere():
    x, y = jnp.zeros((2, 3)), jnp.array([0, 1])
    calls = [
        lambda: jsm.cross_entropy(x, y, reduction="avg"),
        lambda: jsm.nll_loss(x, y, reduction="avg"),
        lambda: jsm.focal_loss(x, y, reduction="avg"),
        lambda: jsm.binary_cross_entropy_with_logits(x, x, reduction="avg"),
        lambda: jsm.linear_cross_entropy(jnp.ones((2, 4)), jnp.ones((4, 3)), y, reduction="avg"),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"`reduction` must be one of \('mean'"):
            call()


def test_class_vectors_are_checked_everywhere():
    x, y = jnp.zeros((2, 3)), jnp.array([0, 1])
    calls = [
        lambda: jsm.cross_entropy(x, y, weight=jnp.ones(4)),
        lambda: jsm.nll_loss(x, y, weight=jnp.ones(4)),
        lambda: jsm.linear_cross_entropy(jnp.ones((2, 4)), jnp.ones((4, 3)), y, weight=jnp.ones(4)),
        lambda: jsm.loss_denominator(y, weight=jnp.ones((3, 1))),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"`weight` must have shape \((3|C),\)"):
            call()


def test_labels_are_widened_before_comparison():
    # uint8 labels compared with ignore_index=-100 would wrap around; every loss widens.
    y8 = jnp.array([0, 2], jnp.uint8)
    assert check.widen_labels(y8).dtype == jnp.int32
    assert check.widen_labels(jnp.array([1], jnp.int32)).dtype == jnp.int32
    x = jnp.array([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0]])
    np.testing.assert_allclose(
        jsm.cross_entropy(x, y8), jsm.cross_entropy(x, y8.astype(jnp.int32)), rtol=1e-6
    )


def test_static_number_messages():
    with pytest.raises(ValueError, match=r"`a` must be finite and in \[0.0, 1.0\)"):
        check.static_number(1.0, "a", lo=0.0, hi=1.0, hi_open=True)
    with pytest.raises(ValueError, match=r"`a` must be finite and > 0.0"):
        check.static_number(0.0, "a", lo=0.0, lo_open=True)
    with pytest.raises(ValueError, match="`a` must be finite"):
        check.static_number(math.inf, "a")
    assert check.static_number(None, "a", optional=True) is None
    assert check.static_number(np.float32(0.5), "a", lo=0.0) == 0.5


def test_axes_validator():
    assert check.axes((0, -1), 3) == (0, 2)
    assert check.single_axis(-1, 2) == 1
    with pytest.raises(ValueError, match="repeats"):
        check.axes((1, -2), 3)
    with pytest.raises(ValueError, match="out of range"):
        check.axes(3, 3)
    with pytest.raises(TypeError, match="an int or a tuple"):
        check.axes(1.0, 3)
    with pytest.raises(ValueError, match="at least one axis"):
        check.axes((), 3)
    with pytest.raises(TypeError, match="must be an int"):
        check.single_axis((0,), 3)


# ------------------------------------------------------------------- normalizer


def test_normalizer_validation():
    x, y = jnp.zeros((2, 3)), jnp.array([0, 1])
    for bad in (0, 0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="`normalizer` must be finite and > 0"):
            jsm.cross_entropy(x, y, normalizer=bad)
    with pytest.raises(ValueError, match="reduction='mean'"):
        jsm.cross_entropy(x, y, normalizer=2.0, reduction="sum")
    with pytest.raises(ValueError, match="must be a scalar"):
        jsm.nll_loss(x, y, normalizer=jnp.ones(2))
    with pytest.raises(TypeError, match="`normalizer`"):
        jsm.focal_loss(x, y, normalizer=True)


def test_traced_normalizer_zero_and_negative():
    x = jnp.array([[2.0, 0.0, 1.0], [0.0, 1.0, 3.0]])
    y = jnp.array([0, 2])

    def loss(x, n):
        return jsm.cross_entropy(x, y, normalizer=n)

    value, grad = jax.jit(jax.value_and_grad(loss))(x, jnp.float32(0.0))
    assert value == 0.0 and not np.any(grad) and np.all(np.isfinite(grad))
    assert np.isnan(jax.jit(loss)(x, jnp.float32(-1.0)))
    total = jsm.cross_entropy(x, y, reduction="sum")
    np.testing.assert_allclose(jax.jit(loss)(x, jnp.float32(4.0)), total / 4.0, rtol=1e-6)

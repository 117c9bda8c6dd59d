"""End-to-end: a small MLP trained inside ``jax.jit`` with ``optax.adamw`` and
``optax.MultiSteps`` (gradient accumulation over 2 micro-batches) on scikit-learn's
digits, once with optax's loss and once with ``jsoftmax.optax``'s: the loss curves must
agree to float32 tolerance. Then a padded batch, where optax's loss turns every
parameter into NaN and ours trains exactly like optax with a ``where`` mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jsoftmax as jsm
from jsoftmax import optax as jox

STEPS = 40  # micro-batches; MultiSteps(every_k=2) applies 20 AdamW updates
BATCH = 64
N_BATCHES = 10  # the loop cycles over 640 training images
HIDDEN = 32


@functools.lru_cache(maxsize=1)
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))[: N_BATCHES * BATCH]
    x = (x[order] / 16.0).astype(np.float32).reshape(N_BATCHES, BATCH, 64)
    y = y[order].astype(np.int32).reshape(N_BATCHES, BATCH)
    idx = np.arange(STEPS) % N_BATCHES
    return x[idx], y[idx]


def init_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "w1": jax.random.normal(k1, (64, HIDDEN)) * 0.3,
        "b1": jnp.zeros(HIDDEN),
        "w2": jax.random.normal(k2, (HIDDEN, 10)) * 0.3,
        "b2": jnp.zeros(10),
    }


def mlp(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


@functools.partial(jax.jit, static_argnums=0)
def train(batch_loss, xs, ys):
    """Scan over micro-batches; returns the final parameters and the per-step losses."""
    opt = optax.MultiSteps(optax.adamw(1e-2, weight_decay=1e-4), every_k_schedule=2)
    params = init_params()

    def step(carry, batch):
        params, state = carry
        loss, grads = jax.value_and_grad(batch_loss)(params, *batch)
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss

    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), (xs, ys))
    return params, losses


@functools.cache  # one function object per loss: `train` compiles once
def per_example(loss_name, module):
    """A batch loss ``mean_i loss(mlp(x)_i, y_i)`` built from ``module.<loss_name>``."""
    fn = getattr(module, loss_name)
    if loss_name == "softmax_cross_entropy_with_integer_labels":
        return lambda p, x, y: fn(mlp(p, x), y).mean()
    targets = lambda y: optax.smooth_labels(jax.nn.one_hot(y, 10), 0.1)  # noqa: E731
    if loss_name == "softmax_cross_entropy":
        return lambda p, x, y: fn(mlp(p, x), targets(y)).mean()
    # sigmoid losses: ten independent one-vs-rest problems
    return lambda p, x, y: fn(mlp(p, x), targets(y)).sum(-1).mean()


@pytest.mark.parametrize(
    "loss_name",
    [
        "softmax_cross_entropy_with_integer_labels",
        "softmax_cross_entropy",
        pytest.param("sigmoid_focal_loss", marks=pytest.mark.slow),
        pytest.param("sigmoid_binary_cross_entropy", marks=pytest.mark.slow),
    ],
)
def test_same_loss_curve_as_optax(loss_name):
    xs, ys = digits()
    params_ref, ref = train(per_example(loss_name, optax.losses), xs, ys)
    params, ours = train(per_example(loss_name, jox), xs, ys)
    ref, ours = np.asarray(ref), np.asarray(ours)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # The run actually learns: 20 AdamW updates cut the loss by more than half.
    assert ours[-N_BATCHES:].mean() < 0.5 * ours[:2].mean(), ours


def test_padded_batch_trains_where_optax_diverges_to_nan():
    # The last 16 rows of every micro-batch are padding, masked with an additive -inf
    # bias (as attention masks are): optax's NaN gradient flows into every parameter.
    xs, ys = digits()
    valid = np.arange(BATCH) < BATCH - 16
    vs = np.broadcast_to(valid, ys.shape)

    def padded(module):
        def loss(p, x, y, v):
            logits = mlp(p, x) + jnp.where(v, 0.0, -jnp.inf)[:, None]
            return module.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        return loss

    def optax_masked(p, x, y, v):
        # The optax way to get the same thing: a per-example `where` mask.
        return optax.losses.softmax_cross_entropy_with_integer_labels(mlp(p, x), y, where=v).mean()

    run = jax.jit(
        lambda loss, xs, ys, vs: train(lambda p, x, yv: loss(p, x, *yv), xs, (ys, vs)),
        static_argnums=0,
    )
    params_nan, curve_nan = run(padded(optax.losses), xs, ys, vs)
    params, curve = run(padded(jox), xs, ys, vs)
    _, curve_ref = run(optax_masked, xs, ys, vs)
    assert np.isnan(curve_nan).all()
    assert all(np.isnan(leaf).all() for leaf in jax.tree.leaves(params_nan))
    assert np.isfinite(curve).all()
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))
    np.testing.assert_allclose(curve, curve_ref, rtol=2e-5, atol=1e-6)


def test_library_losses_plug_into_the_same_loop():
    # The idiom from the README: jsm.cross_entropy with `reduction="none"` is a per-example
    # optax-style loss; without options it trains exactly like the drop-in.
    xs, ys = digits()
    ce = functools.partial(jsm.cross_entropy, reduction="none")
    _, curve = train(lambda p, x, y: ce(mlp(p, x), y).mean(), xs, ys)
    _, curve_ref = train(per_example("softmax_cross_entropy_with_integer_labels", jox), xs, ys)
    np.testing.assert_allclose(curve, curve_ref, rtol=2e-5, atol=1e-6)
    # With the library's options (class weights, smoothing, z-loss) use its own reduction
    # (PyTorch's weighted mean) directly as the batch loss.
    w = jnp.linspace(0.5, 1.5, 10)
    ce_opts = functools.partial(jsm.cross_entropy, weight=w, label_smoothing=0.1, z_loss=1e-4)
    _, curve = train(lambda p, x, y: ce_opts(mlp(p, x), y), xs, ys)
    curve = np.asarray(curve)
    assert np.isfinite(curve).all()
    assert curve[-N_BATCHES:].mean() < 0.6 * curve[:2].mean(), curve


# ------------------------------------------ exact means across micro-batches and devices
#
# Each accumulation step holds K micro-batches with *different* numbers of valid tokens
# (the rest is padding, label -100). The big-batch loss is the mean over all valid
# tokens of the step; the mean of the micro-batch means is not, unless every micro-batch
# is divided by the step's global denominator (`normalizer=`).

K = 2  # micro-batches (or devices) per step
N_STEPS = 6
VALID = (64, 11)  # valid tokens per micro-batch, by position in the step


def lm_head_data():
    xs, ys = digits()
    xs, ys = xs[: N_STEPS * K], np.array(ys[: N_STEPS * K])
    for i in range(len(ys)):
        ys[i, VALID[i % K] :] = -100
    return jnp.asarray(xs), jnp.asarray(ys)


def lm_head_loss(params, x, y, normalizer=None):
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return jsm.linear_cross_entropy(
        hidden, params["w2"], y, linear_bias=params["b2"], normalizer=normalizer
    )


def _run(step_fn, opt, batches):
    params = init_params()

    def step(carry, batch):
        params, state = carry
        grads = step_fn(params, *batch)
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), batches)
    return params


def _max_rel_diff(a, b):
    return max(
        float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@functools.lru_cache(maxsize=1)
def big_batch_params():
    xs, ys = lm_head_data()
    big = (xs.reshape(N_STEPS, K * BATCH, 64), ys.reshape(N_STEPS, K * BATCH))
    return _run(jax.grad(lm_head_loss), optax.adam(1e-2), big)


def test_multisteps_with_global_normalizer_equals_big_batch():
    xs, ys = lm_head_data()
    # The denominator of each accumulation step, computed on device from all K
    # micro-batches' labels, handed to each of them.
    dens = jax.vmap(jsm.loss_denominator)(ys.reshape(N_STEPS, K * BATCH))
    dens = jnp.repeat(dens, K)
    # use_grad_mean=False: MultiSteps sums the K gradients; each is already divided by
    # the step's denominator, so the sum is the big-batch gradient.
    exact_opt = optax.MultiSteps(optax.adam(1e-2), every_k_schedule=K, use_grad_mean=False)
    exact = jax.jit(lambda: _run(jax.grad(lm_head_loss), exact_opt, (xs, ys, dens)))()
    naive_opt = optax.MultiSteps(optax.adam(1e-2), every_k_schedule=K)
    naive = jax.jit(lambda: _run(jax.grad(lm_head_loss), naive_opt, (xs, ys)))()
    big = big_batch_params()
    assert _max_rel_diff(exact, big) < 5e-5, _max_rel_diff(exact, big)
    assert _max_rel_diff(naive, big) > 1e-2, _max_rel_diff(naive, big)


def test_data_parallel_with_psum_normalizer_equals_big_batch():
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    xs, ys = lm_head_data()
    # One step's K micro-batches become its K devices' shards of the global batch.
    xs, ys = xs.reshape(N_STEPS, K * BATCH, 64), ys.reshape(N_STEPS, K * BATCH)
    mesh = Mesh(np.array(jax.devices()[:K]), ("data",))

    def data_parallel(local_loss):
        return jax.shard_map(
            local_loss, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P()
        )

    @data_parallel
    def exact_loss(params, x, y):
        den = jax.lax.psum(jsm.loss_denominator(y), "data")  # on device, no host sync
        return jax.lax.psum(lm_head_loss(params, x, y, normalizer=den), "data")

    @data_parallel
    def naive_loss(params, x, y):
        return jax.lax.pmean(lm_head_loss(params, x, y), "data")

    exact = jax.jit(lambda: _run(jax.grad(exact_loss), optax.adam(1e-2), (xs, ys)))()
    naive = jax.jit(lambda: _run(jax.grad(naive_loss), optax.adam(1e-2), (xs, ys)))()
    big = big_batch_params()
    assert _max_rel_diff(exact, big) < 5e-5, _max_rel_diff(exact, big)
    assert _max_rel_diff(naive, big) > 1e-2, _max_rel_diff(naive, big)

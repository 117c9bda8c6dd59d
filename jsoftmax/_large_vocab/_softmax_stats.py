"""The per-token statistics a caller receives (:class:`SoftmaxStats`), finished from the
core's raw outputs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jsoftmax._large_vocab._tiles import _scaled


class SoftmaxStats(NamedTuple):
    r"""Per-token statistics of ``p = softmax(u)`` from :func:`linear_softmax_stats`.

    Every field has the token shape ``hidden.shape[:-1]`` (``top_k`` fields one more
    axis of length ``top_k``); a field is ``None`` when not asked for (no ``labels``, or
    ``top_k=0``). Floats are float32 (float64 for float64 inputs).

    Attributes:
      lse: ``log Σ_c exp(u_c)``. Differentiable.
      label_logprob: ``log p_y = u_y - lse``; 0 (with zero gradient) where the label is
        ``ignore_index``; NaN for a label outside ``[0, V)``, with a NaN gradient
        wherever that value is used. Differentiable.
      entropy: ``H = -Σ_c p_c log p_c`` in nats. Differentiable.
      argmax: int32 index of the largest logit (the first one on ties, like
        ``jnp.argmax``).
      correct: bool, ``argmax == label``; ``False`` where the label is ignored or bad.
      topk_logprobs: the ``top_k`` largest ``log p_c``, descending. Differentiable.
      topk_indices: their int32 class indices (lower index first on ties).
    """

    lse: jax.Array
    label_logprob: jax.Array | None
    entropy: jax.Array
    argmax: jax.Array
    correct: jax.Array | None
    topk_logprobs: jax.Array | None
    topk_indices: jax.Array | None


def _finish_stats(core, cfg, inp, order=None):
    """The public :class:`SoftmaxStats` from the core's raw per-token outputs.

    With a vocabulary ``order`` the core's indices are positions in the permuted
    vocabulary (as are the labels ``inp.y``); the returned indices are the caller's ids.
    """
    lse = core.lse
    label_logprob = correct = None
    if inp.y is not None:
        # A bad label: NaN value, and a NaN gradient wherever that log-prob is used.
        lp = _scaled(core.zy, cfg) - _poison_if_used(lse, inp.bad)
        label_logprob = jnp.where(inp.keep | inp.bad, lp, 0.0)
        correct = inp.keep & (core.argmax == inp.y)
    topk_logprobs = None
    if core.top_z is not None:
        # A -inf logit (masked by the bias) is log p = -inf, also in an all-masked row.
        finite = core.top_z > -jnp.inf
        lp = _scaled(core.top_z, cfg) - jnp.where(finite, lse[:, None], 0.0)
        topk_logprobs = jnp.where(finite, lp, -jnp.inf)
    shape = inp.batch_shape

    def token(x, extra=()):
        return None if x is None else x.reshape(shape + extra)

    argmax, top_i = core.argmax, core.top_i
    if order is not None:
        argmax = order[argmax]
        if top_i is not None:
            top_i = order[top_i]
    k = (cfg.top_k,)
    return SoftmaxStats(
        token(lse), token(label_logprob), token(core.entropy), token(argmax),
        token(correct), token(topk_logprobs, k), token(top_i, k),
    )  # fmt: skip


@jax.custom_vjp
def _poison_if_used(x, bad):
    """NaN at ``bad`` positions, with a NaN cotangent there where the incoming one is nonzero.

    A caller that uses the NaN value gets a NaN gradient (as from the loss); one that
    masks the position out of its objective (``jnp.where``) gets the gradient of what
    it kept.
    """
    return jnp.where(bad, jnp.nan, x)


def _poison_if_used_fwd(x, bad):
    return _poison_if_used(x, bad), bad


def _poison_if_used_bwd(bad, ct):
    return jnp.where(bad & (ct != 0), jnp.nan, ct), None


_poison_if_used.defvjp(_poison_if_used_fwd, _poison_if_used_bwd)

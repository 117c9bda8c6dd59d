"""Plain-jnp references shared by the loss tests (written from the documented formulas)."""

import jax
import jax.numpy as jnp


def ref_cross_entropy(
    x,
    y,
    *,
    axis=-1,
    weight=None,
    sample_weight=None,
    ignore_index=-100,
    label_smoothing=0.0,
    z_loss=0.0,
    where=None,
    reduction="mean",
):
    """Plain-jnp cross-entropy from the documented formulas (autodiff gives its gradient)."""
    x = jnp.asarray(x)
    x = jnp.moveaxis(x, axis, -1)
    c = x.shape[-1]
    u = x
    if where is not None:
        mask = jnp.moveaxis(jnp.broadcast_to(where, jnp.moveaxis(x, -1, axis).shape), axis, -1)
        u = jnp.where(mask, x, -jnp.inf)
    lse = jax.nn.logsumexp(u, axis=-1)
    adm = u > -jnp.inf
    # -log p is +inf at masked classes; keep those out of products (0 * inf) explicitly.
    lp = jnp.where(adm, u - lse[..., None], 0.0)
    cnt = jnp.sum(adm, axis=-1)
    w = jnp.ones(c, x.dtype) if weight is None else jnp.asarray(weight, x.dtype)
    eps = label_smoothing
    y = jnp.asarray(y)
    if jnp.issubdtype(y.dtype, jnp.floating):
        q = jnp.moveaxis(y, axis, -1)
        qt = (1 - eps) * q + jnp.where(adm, eps / cnt[..., None], 0.0)
        per = -jnp.sum(jnp.where(qt > 0, w * qt * lp, 0.0), axis=-1) + z_loss * lse**2
        den = jnp.ones_like(per)
    else:
        valid = y != ignore_index
        yc = jnp.where(valid, y, 0)
        lp_y = jnp.take_along_axis(lp, yc[..., None], axis=-1)[..., 0]
        wy = w[yc]
        smooth = -jnp.sum(jnp.where(adm, w * lp, 0.0), axis=-1) / cnt
        per = (1 - eps) * wy * -lp_y + eps * smooth + z_loss * wy * lse**2
        per = jnp.where(valid, per, 0.0)
        den = jnp.where(valid, wy, 0.0)
    if sample_weight is not None:
        per = per * sample_weight
        den = den * sample_weight
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / den.sum()

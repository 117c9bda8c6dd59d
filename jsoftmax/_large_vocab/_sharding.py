"""Vocabulary parallelism inside ``jax.shard_map``: shard offsets, the collectives that
combine per-shard statistics, and the varying-axes bookkeeping of cotangents.

With ``axis_name`` the core runs on a vocabulary shard: one ``pmax`` for the row max,
then one stacked ``psum`` of the rescaled sum-exp, the label logit (nonzero on the
owning shard only) and the smoothing sum (Megatron-LM's vocab-parallel cross-entropy);
``d_hidden`` is ``psum``-ed over the vocabulary axis, ``d_weight`` stays local. Which
cotangents need a ``psum`` is read from shard_map's varying-axes types
(``check_vma=True``, the default), so a data axis works too.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jsoftmax import _compat
from jsoftmax._large_vocab._tiles import _rescale


def _axis(axis_name):
    return tuple(axis_name) if isinstance(axis_name, list) else axis_name


def _shard_offset(cfg, v_local):
    if cfg.axis_name is None:
        return 0
    return lax.axis_index(cfg.axis_name) * v_local


def _vma(*arrays) -> frozenset:
    """Mesh axes (inside ``shard_map``) over which any of ``arrays`` varies."""
    out = frozenset()
    for a in arrays:
        if a is not None:
            out |= _compat.vma(a)
    return out


def _as_varying(tree, vma):
    """Mark a loop's initial carry as varying over ``vma``, like the values the loop adds.

    Under ``shard_map``'s varying-axes typing a loop carry must keep its type; zeros
    start out invariant while per-shard chunk results vary over the vocabulary axis.
    """

    def cast(x):
        missing = tuple(a for a in vma if a not in _vma(x))
        return _compat.pvary(x, missing) if missing else x

    return jax.tree.map(cast, tree)


def _sum_over_copies(ct, primal):
    """Cotangent of ``primal`` from a per-shard partial one, inside ``shard_map``.

    Where the primal is the same on every shard of a mesh axis but its partial
    cotangent differs per shard, every copy fed a different part of the loss, so the
    whole cotangent is the sum over that axis: ``d_hidden`` summed over the vocabulary
    axis (Megatron's backward all-reduce), ``d_weight`` over a data axis that the
    weight is replicated on. Outside ``shard_map`` nothing varies and this is a no-op.
    """
    if ct is None:
        return None
    extra = tuple(a for a in _vma(ct) if a not in _vma(primal))
    return lax.psum(ct, extra) if extra else ct


def _global_stats(cfg, m, s, zy, zw, t=None):
    """Combine per-shard ``(max, sum-exp, z_y, Σ w z, t)`` over the vocabulary axis.

    One ``pmax`` for the max, then a single stacked ``psum`` of the rescaled sums and
    the additive statistics (only the owning shard has a nonzero ``z_y``).
    """
    if cfg.axis_name is None:
        return m, s, zy, zw, t
    m_all = lax.pmax(m, cfg.axis_name)
    m_safe = jnp.where(jnp.isfinite(m_all), m_all, 0.0)
    s, t = _rescale(m, m_safe, s, t, cfg)
    if zy.ndim > 1:  # k label columns per row: their own psum
        zy = lax.psum(zy, cfg.axis_name)
        s, zw, t = _global_sums(cfg, s, zw, t)
        return m_all, s, zy, zw, t
    parts = [s, zy, zw] + ([] if t is None else [t])
    summed = lax.psum(jnp.stack(parts), cfg.axis_name)
    return m_all, summed[0], summed[1], summed[2], (None if t is None else summed[3])


def _global_sums(cfg, s, zw, t):
    parts = [s, zw] + ([] if t is None else [t])
    summed = lax.psum(jnp.stack(parts), cfg.axis_name)
    return summed[0], summed[1], (None if t is None else summed[2])


def _gather_over(cfg, *arrays):
    """Every shard's ``(rows, k)`` candidates side by side: ``(rows, n_shards·k)``.

    Each shard places its block at its own offset in zeros and one ``psum`` adds the
    blocks (exact: every other term is 0). Unlike ``all_gather``, the sum is typed as
    the same on every shard, so the result can leave ``shard_map`` replicated.
    """
    n_shards = lax.psum(1, cfg.axis_name)  # a Python int: the size of the axis (or axes)
    index = lax.axis_index(cfg.axis_name)
    out = []
    for a in arrays:
        k = a.shape[1]
        full = jnp.zeros((a.shape[0], n_shards * k), a.dtype)
        out.append(lax.dynamic_update_slice_in_dim(full, a, index * k, axis=1))
    return lax.psum(tuple(out), cfg.axis_name)


def _label_weights(cw, y, keep, cfg):
    """``w_{y_i}`` from this shard's slice of the class weights, summed over the shards."""
    v_local = cw.shape[0]
    y_local = y - _shard_offset(cfg, v_local)
    here = keep & (y_local >= 0) & (y_local < v_local)
    w_y = jnp.where(here, cw[jnp.clip(y_local, 0, v_local - 1)], 0.0).astype(cfg.acc_dtype)
    return lax.psum(w_y, cfg.axis_name)


# ------------------------------------------- placement under jax.jit with sharded inputs


_entry_axes = _compat.entry_axes


def _joined(axes: tuple):
    """A tuple of mesh axes as one spec entry / ``axis_name``: ``None`` when empty."""
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


class Placement(NamedTuple):
    """How the library runs a fused function on sharded inputs, one shard per device.

    ``tokens`` are the spec entries of the token dimensions (``hidden.shape[:-1]``),
    ``vocab`` the mesh axes of the weight's vocabulary dimension (the vocab-parallel
    ``axis_name``), ``fsdp`` those of its ``D`` dimension (chunks gathered on use).
    """

    mesh: Any
    tokens: tuple
    vocab: tuple
    fsdp: tuple

    @property
    def vocab_axis_name(self):
        return _joined(self.vocab)

    @property
    def fsdp_axes(self):
        return _joined(self.fsdp)

    @property
    def token_axes(self):
        return _joined(tuple(a for e in self.tokens for a in _entry_axes(e)))

    def token_spec(self, extra: int = 0) -> P:
        """The spec of a per-token array with ``extra`` trailing unsharded dimensions."""
        return P(*self.tokens, *([None] * extra))

    def head_spec(self, layout: str) -> P:
        d, v = _joined(self.fsdp), _joined(self.vocab)
        return P(d, v) if layout == "dv" else P(v, d)

    def vocab_spec(self) -> P:
        return P(_joined(self.vocab))

    def size(self, axes) -> int:
        """The number of shards over mesh ``axes`` (a spec entry)."""
        return math.prod(self.mesh.shape[a] for a in _entry_axes(axes))

    def check_divides(self, hidden, linear_weight, layout: str) -> None:
        """A clear error where a mesh axis does not divide the dimension it shards."""
        vocab_dim = 1 if layout == "dv" else 0
        dims = [("the vocabulary of `linear_weight`", linear_weight.shape[vocab_dim], self.vocab)]
        dims.append(("`linear_weight`'s D", linear_weight.shape[1 - vocab_dim], self.fsdp))
        for i, entry in enumerate(self.tokens):
            dims.append((f"dimension {i} of `hidden`", hidden.shape[i], _entry_axes(entry)))
        for what, n, axes in dims:
            if axes and n % self.size(axes):
                raise ValueError(
                    f"{what} ({n}) is not divisible by its mesh axes {axes} "
                    f"({self.size(axes)} shards): each device must hold an equal slice."
                )


def explicit_placement(hidden, linear_weight, layout: str, *others) -> Placement | None:
    """The placement of a call whose inputs are sharded in explicit mode, or ``None``.

    ``None`` (nothing to place) when neither ``hidden``, ``linear_weight`` nor ``others``
    (a second head's inputs) carries an explicit sharding. A mesh axis that shards both
    the tokens and the vocabulary would mix different tokens in the vocab-parallel
    sums, so the tokens are gathered over it (the hidden states are the small operand).
    """
    # (mesh, spec) where an input's type carries an explicit sharding (_compat.explicit_spec).
    found = [
        None if x is None else _compat.explicit_spec(x) for x in (hidden, linear_weight, *others)
    ]
    if all(f is None for f in found):
        return None
    mesh = next(f[0] for f in found if f is not None)
    h_spec = found[0][1] if found[0] else (None,) * jnp.ndim(hidden)
    w_spec = found[1][1] if found[1] else (None, None)
    vocab_dim = 1 if layout == "dv" else 0
    vocab = _entry_axes(w_spec[vocab_dim])
    fsdp = _entry_axes(w_spec[1 - vocab_dim])
    tokens = tuple(_joined(tuple(a for a in _entry_axes(e) if a not in vocab)) for e in h_spec[:-1])
    return Placement(mesh, tokens, vocab, fsdp)


def _inside_shard_map(axis_name) -> bool:
    """Whether ``axis_name`` is bound by an enclosing ``jax.shard_map`` (manual axes)."""
    try:
        lax.axis_size(axis_name)
    except NameError:
        return False
    return True


def _context_mesh(*arrays):
    """The mesh a call runs on: ``jax.set_mesh``'s, else one read off the inputs' types."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = None if get is None else get()
    if mesh is not None and not mesh.empty:
        return mesh
    for x in arrays:
        mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
        if mesh is not None and not mesh.empty:
            return mesh
    return None


def placement(hidden, linear_weight, layout: str, axis_name, *others) -> Placement | None:
    """How to run a fused call under ``jax.jit``: a :class:`Placement`, or ``None`` (as is).

    * inside ``jax.shard_map`` with ``axis_name`` bound: ``None``, the caller's own
      vocab-parallel code path;
    * explicitly sharded inputs: the layout of their types (:func:`explicit_placement`);
    * the default auto mode with ``axis_name`` naming mesh axes of the mesh in context
      (``jax.set_mesh``): the vocabulary on those axes and the tokens on the others;
    * otherwise ``None``: the partitioner decides (data-parallel and FSDP heads stay
      sharded that way; a vocabulary-sharded head needs ``axis_name`` in auto mode).
    """
    if axis_name is not None and _inside_shard_map(axis_name):
        return None
    pl = explicit_placement(hidden, linear_weight, layout, *others)
    if axis_name is None:
        return pl
    vocab = _entry_axes(axis_name)
    if pl is not None:
        if set(pl.vocab) != set(vocab):
            raise ValueError(
                f"`axis_name`={axis_name!r}, but `linear_weight` is sharded on the vocabulary "
                f"over mesh axes {pl.vocab}: pass the axes of its sharding (or omit "
                "`axis_name`: explicitly sharded inputs carry their layout)."
            )
        return pl
    mesh = _context_mesh(hidden, linear_weight, *others)
    if mesh is None or not all(a in mesh.axis_names for a in vocab):
        raise ValueError(
            f"`axis_name`={axis_name!r} is not a mesh axis of an enclosing `jax.shard_map`, "
            "nor of the mesh in context: call the loss inside `jax.shard_map` "
            "(vocab-parallel mode), or under `jax.set_mesh(mesh)` with `axis_name` naming "
            "the mesh axes the vocabulary is sharded over."
        )
    others_axes = tuple(a for a in mesh.axis_names if a not in vocab and mesh.shape[a] > 1)
    n_token_dims = jnp.ndim(hidden) - 1
    tokens = [None] * n_token_dims
    shards = math.prod(mesh.shape[a] for a in others_axes)
    if n_token_dims and others_axes and jnp.shape(hidden)[0] % shards == 0:
        tokens[0] = _joined(others_axes)
    return Placement(mesh, tuple(tokens), vocab, ())


def place(pl: Placement, fn, args: tuple, in_specs: tuple, out_specs, check_vma: bool = True):
    """``fn(*args)`` run per shard under ``jax.shard_map`` on ``pl.mesh`` (see
    :func:`jsoftmax._compat.shard_map_args`); ``in_specs`` has one entry per argument."""
    return _compat.shard_map_args(fn, pl.mesh, args, in_specs, out_specs, check_vma=check_vma)

"""The one place for differences between the supported JAX versions.

The oldest supported set is pinned in ``.ci/oldest.txt`` and declared as the floor in
``pyproject.toml``; CI runs the whole suite on it and on the newest release. Code that
needs an API younger than the floor goes through a helper here instead of testing the
JAX version at the call site, so dropping an old version means deleting a branch here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

_JAX = jax.__version_info__


def vma(x: jax.Array) -> frozenset:
    """Mesh axes (inside ``shard_map``) over which ``x`` varies; empty outside.

    Read from the abstract value: ``aval.vma`` up to jax 0.8, ``aval.mat.varying`` since.
    """
    aval = jax.typeof(x)
    axes = getattr(aval, "vma", None)
    if axes is None:
        axes = getattr(getattr(aval, "mat", None), "varying", frozenset())
    return frozenset(axes)


if hasattr(lax, "pcast"):  # jax >= 0.8.2

    def pvary(x: jax.Array, axes: Sequence[Hashable]) -> jax.Array:
        """Mark ``x`` as varying over the mesh ``axes`` (no data movement)."""
        return lax.pcast(x, tuple(axes), to="varying")

else:

    def pvary(x: jax.Array, axes: Sequence[Hashable]) -> jax.Array:
        """Mark ``x`` as varying over the mesh ``axes`` (no data movement)."""
        return lax.pvary(x, tuple(axes))


def explicit_axes(mesh) -> tuple:
    """The mesh axes in JAX's explicit sharding mode (``AxisType.Explicit``); () if none.

    Their shardings are part of an array's type, visible at trace time.
    """
    axis_type = getattr(jax.sharding, "AxisType", None)
    types = getattr(mesh, "axis_types", None)
    if axis_type is None or types is None:
        return ()
    return tuple(n for n, t in zip(mesh.axis_names, types, strict=True) if t == axis_type.Explicit)


def reshard(x: jax.Array, sharding) -> jax.Array:
    """``jax.sharding.reshard`` (``jax.experimental.shard.reshard`` before jax 0.7)."""
    fn = getattr(jax.sharding, "reshard", None)
    if fn is None:
        from jax.experimental.shard import reshard as fn
    return fn(x, sharding)


def set_mesh(mesh):
    """``jax.set_mesh`` (``jax.sharding.use_mesh`` before jax 0.7): a context manager."""
    fn = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
    return fn(mesh)


def unsharded(x: jax.Array) -> jax.Array:
    """``x`` replicated, where its type carries an explicit sharding; else ``x`` itself.

    For the small index arrays of the label checks, whose flat indexing is not defined
    on explicitly sharded dimensions.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or getattr(mesh, "empty", True) or not explicit_axes(mesh):
        return x
    if all(e is None for e in sharding.spec):
        return x
    return reshard(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def entry_axes(entry) -> tuple:
    """The mesh axes of one ``PartitionSpec`` entry (``None``, a name or a tuple)."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple | list) else (entry,)


def explicit_spec(x) -> tuple | None:
    """``(mesh, spec)`` of ``x`` where its type carries an explicit sharding, else ``None``.

    In JAX's explicit sharding mode (mesh axes of ``AxisType.Explicit``) an array's type
    holds its ``PartitionSpec``, visible at trace time; ``spec`` is padded with ``None``
    to ``x.ndim`` entries. ``None`` in the default auto mode, inside ``shard_map`` (manual
    axes), on a JAX without explicit sharding, for an array replicated everywhere, and for
    what is not a JAX value yet (a list).
    """
    try:
        sharding = getattr(jax.typeof(x), "sharding", None)
    except TypeError:
        return None
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or getattr(mesh, "empty", True):
        return None
    explicit = set(explicit_axes(mesh))
    spec = tuple(sharding.spec) + (None,) * (jnp.ndim(x) - len(sharding.spec))
    named = [a for e in spec if e is not None for a in (e if isinstance(e, tuple) else (e,))]
    if not any(a in explicit for a in named):
        return None
    return mesh, spec


def shard_map_args(f, mesh, args: tuple, in_specs: tuple, out_specs, *, check_vma=True):
    """``f(*args)`` per shard under :func:`shard_map` on ``mesh``; one spec per argument.

    ``None`` arguments are closed over (shard_map takes arrays only). On a mesh with
    explicit axes the inputs are first resharded to ``in_specs`` (shard_map requires
    them to match; a no-op where they do, else the partitioner's cheapest move).
    """
    live = [i for i, a in enumerate(args) if a is not None]

    def local(*xs):
        full = list(args)
        for i, x in zip(live, xs, strict=True):
            full[i] = x
        return f(*full)

    specs = tuple(in_specs[i] for i in live)
    explicit = bool(explicit_axes(mesh))
    xs = [
        reshard(args[i], jax.sharding.NamedSharding(mesh, spec)) if explicit else args[i]
        for i, spec in zip(live, specs, strict=True)
    ]
    smap = shard_map(local, mesh=mesh, in_specs=specs, out_specs=out_specs, check_vma=check_vma)
    return smap(*xs)


def shard_map(f, *, mesh, in_specs, out_specs, check_vma: bool = True):
    """``jax.shard_map`` with the varying-axes checks on (the library's collectives rely
    on them to tell which cotangents to sum); off only around Pallas kernels, whose
    outputs carry no varying-axes type (shard_map then sums replicated inputs'
    cotangents itself)."""
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)


if _JAX >= (0, 8, 2):
    isfinite = jnp.isfinite
else:

    def isfinite(x: jax.Array) -> jax.Array:
        """``jnp.isfinite`` for floats, spelled so that Pallas' Triton lowering accepts it.

        Triton lowering has no rule for ``is_finite`` before jax 0.8.2; ``|x| < inf`` is
        the same predicate (False for ±inf and NaN) from primitives it does lower.
        """
        return jnp.abs(x) < jnp.inf


if hasattr(jax, "enable_x64"):  # jax >= 0.8
    enable_x64 = jax.enable_x64
else:

    @contextlib.contextmanager
    def enable_x64(new_val: bool = True):
        """Context manager that enables (or disables) float64 in its body."""
        from jax.experimental import enable_x64 as _enable_x64

        with _enable_x64(new_val):
            yield


# ------------------------------------------------------------------ Pallas (kernels/)


class _TritonRefLoads:
    """``jax.experimental.pallas.triton`` plus its ``load``/``store`` for jax < 0.7.2.

    Those two arrived in 0.7.2 as thin wrappers of ``pl.load(ref, None, ...)`` and
    ``pl.store(ref, None, ...)`` (the same primitives, indexing taken from a
    ``ref.at[...]`` view); before that the generic ones are the only spelling.
    """

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    @staticmethod
    def load(ref, *, mask=None, other=None, **kwargs):
        from jax.experimental import pallas as pl

        return pl.load(ref, None, mask=mask, other=other, **kwargs)

    @staticmethod
    def store(ref, val, *, mask=None, **kwargs):
        from jax.experimental import pallas as pl

        pl.store(ref, None, val, mask=mask, **kwargs)


def __getattr__(name: str):
    # Lazy so that importing jsoftmax does not import Pallas; only kernels/ needs it.
    if name == "plgpu":
        from jax.experimental.pallas import triton

        module = triton if hasattr(triton, "load") else _TritonRefLoads(triton)
        globals()["plgpu"] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

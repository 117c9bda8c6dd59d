"""Argument validation: one validator per concept, used by every module and the kernels.

Every public function checks its arguments with these helpers at trace time, so the same
mistake gets the same error message everywhere (``z_loss=inf`` is refused by every loss,
a ``weight`` of the wrong length names the class axis the same way, ...). Values that
can only be seen at run time (a label out of range, a traced temperature <= 0) are not
checked here: they poison the result with NaN (see ``_checks.py``).

Import as ``from jsoftmax import _validate as check`` and call ``check.reduction(...)``,
``check.static_number(...)``, ...
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

Axis = int | Sequence[int]

REDUCTIONS = ("mean", "sum", "none")

_INT_TYPES = (int, np.integer)
_NUMBER_TYPES = (int, float, np.integer, np.floating)


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def is_static_number(value: Any) -> bool:
    """Whether ``value`` is a Python/numpy number (not a bool), i.e. known at trace time."""
    return isinstance(value, _NUMBER_TYPES) and not _is_bool(value)


# ------------------------------------------------------------------ static options


def choice(value: Any, name: str, options: Sequence[Any]) -> Any:
    """``value`` if it is one of ``options``, else a ``ValueError`` listing them."""
    if not isinstance(value, str | int | type(None)) or value not in tuple(options):
        raise ValueError(f"`{name}` must be one of {tuple(options)}, got {value!r}.")
    return value


def reduction(value: Any) -> str:
    """One of ``"mean"``, ``"sum"``, ``"none"``."""
    return choice(value, "reduction", REDUCTIONS)


def loss_type(value: Any, options: Sequence[str]) -> str:
    """The variant of a loss family (``loss_type="sigmoid"``, ``"dapo"``, ...)."""
    return choice(value, "loss_type", options)


def label_smoothing(value: Any, *, hi: float = 1.0, hi_open: bool = False) -> float:
    """A smoothing probability ``ε`` in ``[0, hi]`` (``[0, hi)`` with ``hi_open``).

    The softmax losses allow ``[0, 1]``; the preference losses flip the pair's label with
    probability ``ε`` and allow ``[0, 0.5]`` (``[0, 0.5)`` where they divide by ``1 - 2ε``).
    """
    return static_number(value, "label_smoothing", lo=0.0, hi=hi, hi_open=hi_open)


def static_number(
    value: Any,
    name: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    optional: bool = False,
) -> float | None:
    """A finite Python number in the interval given by ``lo``/``hi`` (closed unless ``*_open``).

    Hyperparameters such as ``label_smoothing`` or ``z_loss`` select code paths at trace
    time, so they must be concrete numbers; ``inf`` and ``nan`` are refused everywhere.
    ``optional=True`` lets ``None`` through (returned as ``None``).
    """
    if value is None and optional:
        return None
    if not is_static_number(value):
        raise TypeError(
            f"`{name}` must be a Python number (it is fixed at trace time), "
            f"got {type(value).__name__}."
        )
    value = float(value)
    low_ok = lo is None or (value > lo if lo_open else value >= lo)
    high_ok = hi is None or (value < hi if hi_open else value <= hi)
    if not (math.isfinite(value) and low_ok and high_ok):
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        if lo is not None and hi is not None:
            bound = f"in {left}{lo}, {hi}{right}"
        elif lo is not None:
            bound = f"{'>' if lo_open else '>='} {lo}"
        elif hi is not None:
            bound = f"{'<' if hi_open else '<='} {hi}"
        else:
            bound = "finite"
        if lo is not None or hi is not None:
            bound = f"finite and {bound}"
        raise ValueError(f"`{name}` must be {bound}, got {value}.")
    return value


def static_int(
    value: Any, name: str, *, minimum: int | None = None, optional: bool = False
) -> int | None:
    """A Python int ``>= minimum`` (sizes, counts, block shapes), or ``None`` if optional."""
    if value is None and optional:
        return None
    if _is_bool(value) or not isinstance(value, _INT_TYPES):
        what = "a Python int" + (" or None" if optional else "")
        raise TypeError(f"`{name}` must be {what}, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    return int(value)


def ignore_index(value: Any) -> int:
    """The label value that marks positions to skip: a Python int."""
    if _is_bool(value) or not isinstance(value, _INT_TYPES):
        raise TypeError(f"`ignore_index` must be a Python int, got {value!r}.")
    return int(value)


def filter_eps(value: Any, compute_dtype: Any) -> float | None:
    """The static gradient-filtering threshold: ``None`` (exact), a float ``>= 0``, or
    ``"auto"`` -- the compute dtype's machine epsilon / 32 (``2**-12`` for bfloat16,
    ``2**-28`` for float32), Cut Cross-Entropy's default."""
    if value is None:
        return None
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"`filter_eps` must be None, a float >= 0 or 'auto', got {value!r}.")
        return float(jnp.finfo(compute_dtype).eps) / 32.0
    if not is_static_number(value):
        raise TypeError(
            f"`filter_eps` must be None, a Python float or 'auto' (it is static), got {value!r}."
        )
    return static_number(value, "filter_eps", lo=0.0)


def temperature(value: ArrayLike, name: str = "temperature") -> jax.Array | float | None:
    """A positive scalar temperature: ``None`` for the static default 1.0.

    A Python number must be finite and > 0. A traced scalar cannot be checked at trace
    time; the callers poison the output (NaN) when it is <= 0 instead of returning a
    silently flipped distribution.
    """
    if _is_bool(value):
        raise TypeError(f"`{name}` must be a positive number, got a bool.")
    if is_static_number(value):
        t = static_number(value, name, lo=0.0, lo_open=True)
        return None if t == 1.0 else t
    t = jnp.asarray(value)
    if t.ndim != 0:
        raise ValueError(f"`{name}` must be a scalar, got shape {t.shape}.")
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.float32)
    return t


def normalizer(value: ArrayLike | None, reduction: str) -> jax.Array | float | None:
    """The denominator that replaces ``reduction="mean"``'s own, or ``None``.

    A Python number must be finite and > 0. A traced scalar is used as is: 0 gives the
    all-ignored convention (a loss of 0.0 with zero gradient), a negative value poisons
    the loss (NaN). Only meaningful with ``reduction="mean"``.
    """
    if value is None:
        return None
    if reduction != "mean":
        raise ValueError(
            f"`normalizer` divides the sum of a reduction='mean' loss; got "
            f"reduction={reduction!r}. Use reduction='sum' and divide yourself, or 'mean'."
        )
    if _is_bool(value):
        raise TypeError("`normalizer` must be a positive number or a scalar array, got a bool.")
    if is_static_number(value):
        return static_number(value, "normalizer", lo=0.0, lo_open=True)
    n = jnp.asarray(value)
    if n.ndim != 0:
        raise ValueError(f"`normalizer` must be a scalar, got shape {n.shape}.")
    if not jnp.issubdtype(n.dtype, jnp.floating):
        n = n.astype(jnp.float32)
    return n


# ------------------------------------------------------------------------- axes


def axes(axis: Axis, ndim: int, name: str = "axis") -> tuple[int, ...]:
    """Normalise an int or tuple ``axis`` against ``ndim``; ``ValueError`` when out of range."""
    items = (axis,) if isinstance(axis, _INT_TYPES) and not _is_bool(axis) else axis
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError(f"`{name}` must be an int or a tuple of ints, got {axis!r}.") from None
    out = []
    for a in items:
        if _is_bool(a) or not isinstance(a, _INT_TYPES):
            raise TypeError(f"`{name}` must be an int or a tuple of ints, got {axis!r}.")
        if not -ndim <= a < ndim:
            raise ValueError(f"`{name}`={axis} is out of range for an input of rank {ndim}.")
        out.append(int(a) % ndim)
    if not out:
        raise ValueError(f"`{name}` must name at least one axis, got {axis!r}.")
    if len(set(out)) != len(out):
        raise ValueError(f"`{name}`={axis} repeats an axis.")
    return tuple(out)


def single_axis(axis: int, ndim: int, name: str = "axis") -> int:
    """Normalise a single int ``axis`` (losses and kernels take one class axis)."""
    if _is_bool(axis) or not isinstance(axis, _INT_TYPES):
        raise TypeError(f"`{name}` must be an int, got {axis!r}.")
    return axes(axis, ndim, name)[0]


# ----------------------------------------------------------------------- arrays


def float_array(x: ArrayLike, name: str = "x") -> jax.Array:
    """``x`` as a real floating array; integers and bools become float32 (like ``jax.nn``)."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"`{name}` must be real, got dtype {x.dtype}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x


def logits(x: ArrayLike, axis: int, name: str = "logits") -> tuple[jax.Array, int]:
    """Float scores with a class axis: ``(x, normalised axis)``."""
    x = float_array(x, name)
    if x.ndim == 0:
        raise ValueError(f"`{name}` must have a class axis, got a scalar.")
    return x, single_axis(axis, x.ndim)


def matrix(x: ArrayLike, name: str) -> jax.Array:
    """A non-empty 2-D floating array (the kernels' rows x columns)."""
    x = float_array(x, name)
    if x.ndim != 2:
        raise ValueError(
            f"`{name}` must be 2-D (rows, columns); got shape {x.shape}. "
            "The kernels work on the last axis of a matrix: reshape first."
        )
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"`{name}` must have at least one row and one column, got {x.shape}.")
    return x


def broadcastable(arr: jax.Array, shape: tuple[int, ...], name: str) -> None:
    """``ValueError`` naming ``name`` unless ``arr`` broadcasts to ``shape``."""
    try:
        out = jnp.broadcast_shapes(arr.shape, tuple(shape))
    except ValueError:
        out = None
    if out != tuple(shape):
        raise ValueError(
            f"`{name}` of shape {arr.shape} does not broadcast to the input shape {tuple(shape)}."
        )


def where(mask: ArrayLike | None, shape: tuple[int, ...]) -> jax.Array | None:
    """A boolean mask broadcastable to ``shape`` (``where=False`` excludes an entry)."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"`where` must be a boolean mask, got dtype {mask.dtype}.")
    broadcastable(mask, shape, "where")
    return mask


def sample_weight(sw: ArrayLike | None, batch_shape: tuple[int, ...]) -> jax.Array | None:
    """Per-position weights broadcastable to the (integer-)label shape ``batch_shape``."""
    if sw is None:
        return None
    sw = float_array(sw, "sample_weight")
    broadcastable(sw, batch_shape, "sample_weight")
    return sw


def class_vector(
    vec: ArrayLike | None, lengths: int | Sequence[int] | None, name: str = "weight"
) -> jax.Array | None:
    """A 1-D per-class vector (one entry per class) whose length is one of ``lengths``.

    Under vocab-parallel sharding a vector may be the whole ``(C,)`` one or this shard's
    slice, hence several allowed lengths; ``None`` allows any length.
    """
    if vec is None:
        return None
    vec = float_array(vec, name)
    if lengths is None:
        lengths = vec.shape[:1] if vec.ndim == 1 else ("C",)
    allowed = (lengths,) if isinstance(lengths, _INT_TYPES) else tuple(dict.fromkeys(lengths))
    if vec.ndim != 1 or vec.shape[0] not in allowed:
        want = " or ".join(f"({k},)" for k in allowed)
        raise ValueError(f"`{name}` must have shape {want} (one entry per class), got {vec.shape}.")
    return vec


def class_vector_along(
    vec: ArrayLike | None, shape: tuple[int, ...], axis: Axis, name: str = "weight"
) -> jax.Array | None:
    """A per-class vector placed along ``axis`` so that it broadcasts against ``shape``.

    A 1-D ``vec`` of length ``C`` (or 1) is laid along the (single) class axis, which is
    what "weights broadcastable along ``axis``" means for e.g. an ``(N, C, H, W)`` input
    with ``axis=1``. Any other rank must broadcast to ``shape`` by numpy rules.
    """
    if vec is None:
        return None
    vec = float_array(vec, name)
    ax = axes(axis, len(shape))
    if vec.ndim == 1 and len(ax) == 1 and len(shape) > 1:
        (a,) = ax
        if vec.shape[0] not in (1, shape[a]):
            raise ValueError(
                f"`{name}` has length {vec.shape[0]} but the class axis {a} of the input "
                f"{tuple(shape)} has {shape[a]} entries."
            )
        vec = vec.reshape((-1,) + (1,) * (len(shape) - 1 - a))
    broadcastable(vec, shape, name)
    return vec


# ----------------------------------------------------------------------- labels


def integer_labels(
    labels: ArrayLike, batch_shape: tuple[int, ...], name: str = "labels"
) -> jax.Array:
    """Integer labels whose shape is the logits' shape without the class axis."""
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"`{name}` must be integers, got dtype {labels.dtype}.")
    if labels.shape != tuple(batch_shape):
        raise ValueError(
            f"`{name}` has shape {labels.shape}; expected {tuple(batch_shape)} "
            "(the logits' shape without the class axis)."
        )
    return labels


def same_shape(x: ArrayLike, shape: tuple[int, ...], name: str, like: str) -> jax.Array:
    """A float array of exactly ``shape``, the shape of the argument called ``like``."""
    x = float_array(x, name)
    if x.shape != tuple(shape):
        raise ValueError(
            f"`{name}` has shape {x.shape}; expected {tuple(shape)}, the shape of `{like}`."
        )
    return x


def token_mask(mask: ArrayLike, shape: tuple[int, ...], like: str) -> jax.Array:
    """A per-token mask of exactly ``shape`` (bool, 0/1 or float weights), as a float array."""
    mask = jnp.asarray(mask)
    if jnp.issubdtype(mask.dtype, jnp.complexfloating):
        raise TypeError(f"`mask` must be boolean or real, got dtype {mask.dtype}.")
    return same_shape(mask, shape, "mask", like)


def vocab_order(order: ArrayLike, n_vocab: int) -> jax.Array:
    """A ``(V,)`` integer permutation array (its values are checked at run time)."""
    order = jnp.asarray(order)
    if not jnp.issubdtype(order.dtype, jnp.integer):
        raise TypeError(f"`vocab_order` must be integers, got dtype {order.dtype}.")
    if order.shape != (n_vocab,):
        raise ValueError(
            f"`vocab_order` must have shape ({n_vocab},) (a permutation of the vocabulary), "
            f"got {order.shape}."
        )
    return order.astype(jnp.int32)


def widen_labels(labels: jax.Array) -> jax.Array:
    """Labels as a signed integer type wide enough to compare with ``ignore_index`` and ``C``.

    ``uint8`` labels compared with ``ignore_index=-100`` would wrap around; narrow types
    cannot hold a 256k vocabulary.
    """
    if labels.dtype.itemsize < 4 or jnp.issubdtype(labels.dtype, jnp.unsignedinteger):
        return labels.astype(jnp.int32)
    return labels


def labels_kind(labels: ArrayLike, shape: tuple[int, ...], axis: int) -> tuple[jax.Array, bool]:
    """``(labels, soft)``: integer class indices, or float probabilities of ``shape``."""
    labels = jnp.asarray(labels)
    batch = shape[:axis] + shape[axis + 1 :]
    if jnp.issubdtype(labels.dtype, jnp.floating):
        if labels.shape != tuple(shape):
            raise ValueError(
                f"float `labels` are class probabilities and must have the logits' shape "
                f"{tuple(shape)}, got {labels.shape}; integer class labels have shape {batch}."
            )
        return labels, True
    return integer_labels(labels, batch), False

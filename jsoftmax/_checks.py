"""Run-time input checks: NaN poison by default, an error naming the culprit on request.

A label that is out of range or points at a masked class can only be seen at run time.
Without help the losses return NaN for that position (see ``jsoftmax/_losses.py``), which
shows up but does not say where it came from. :func:`checked` runs a function with the
losses' label checks turned into an error that names the first bad position and value.

How it works: every loss always emits a ``checkify.debug_check`` for its labels. Outside
``checkify`` that primitive lowers to nothing (XLA removes the predicate), so ordinary
calls pay nothing and the same jitted function can be traced once and used both ways;
:func:`checked` wraps the function in ``checkify.checkify``, which turns those checks
into a returned error value, and raises it. Emitting the check unconditionally (rather
than behind a flag read at trace time) matters because ``jax.jit`` caches traces: a flag
would be ignored by a function that was traced before ``checked`` was applied.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from jsoftmax import _compat


def label_check(bad: jax.Array, labels: jax.Array, *, loss: str, expected: str) -> None:
    """Emit a debug check that no position of ``bad`` is set.

    Under :func:`checked` the error reads like
    ``cross_entropy: bad label 7 at position (1, 3); expected ...``. Outside ``checkify``
    the check is a no-op.

    Args:
      bad: boolean array with the shape of ``labels``; ``True`` marks a bad position.
      labels: the integer labels, for the value in the message.
      loss: name of the calling loss, for the message.
      expected: what a valid label is, for the message.
    """
    bad = _compat.unsharded(jnp.asarray(bad))
    labels = _compat.unsharded(jnp.asarray(labels))
    if bad.size == 0:  # an empty batch has no label to check (and argmax needs one)
        return
    if bad.ndim == 0:
        bad = bad[None]
        labels = jnp.asarray(labels)[None]
    flat = jnp.argmax(bad.reshape(-1))
    position = jnp.unravel_index(flat, bad.shape)
    value = labels.reshape(-1)[flat]
    names = {f"i{k}": p for k, p in enumerate(position)}
    where = ", ".join("{" + name + "}" for name in names)
    if len(names) == 1:
        where += ","
    # Braces in `expected` would be read as format fields by checkify.
    expected = expected.replace("{", "{{").replace("}", "}}")
    checkify.debug_check(
        ~jnp.any(bad),
        f"{loss}: bad label {{label}} at position ({where}); expected {expected}.",
        label=value,
        **names,
    )


def checked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Return ``fn`` with the losses' run-time label checks turned into an error.

    By default a bad label (``< 0`` or ``>= C`` and not ``ignore_index``, or on a class
    masked out by ``where``) makes that position's loss NaN. Inside ``checked(fn)`` the
    same call raises instead, naming the first bad position (an index tuple into the
    labels) and the bad value. ``fn`` may be jitted or not, and may call the losses under
    ``jax.grad``/``jax.vmap``; the checks cost nothing when ``checked`` is not used.
    Apply ``checked`` outermost: the error is raised on the host, so ``checked(jax.jit(f))``
    works but ``jax.jit(checked(f))`` cannot raise (use ``checkify`` directly there).

    Losses called with ``axis_name=`` inside ``shard_map`` are not checked this way (the
    NaN poison still applies), because ``checkify`` cannot carry errors out of
    ``shard_map`` on this JAX version.

    Args:
      fn: any function that calls ``jsoftmax`` losses.

    Returns:
      A function with the signature of ``fn`` that returns ``fn``'s result, or raises
      ``jax.experimental.checkify.JaxRuntimeError`` (a ``ValueError``) on the first
      failed check.

    Examples:
      >>> import jsoftmax as jsm
      >>> f = jsm.checked(jsm.cross_entropy)
      >>> f(jnp.zeros((2, 3)), jnp.array([0, 3]))  # doctest: +IGNORE_EXCEPTION_DETAIL
      Traceback (most recent call last):
        ...
      JaxRuntimeError: cross_entropy: bad label 3 at position (1,); ...
    """
    checked_fn = checkify.checkify(fn, errors=checkify.user_checks)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        err, out = checked_fn(*args, **kwargs)
        err.throw()
        return out

    return wrapper

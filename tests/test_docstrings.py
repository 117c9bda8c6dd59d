"""Every public docstring's ``Examples:`` block runs and prints what it says."""

import doctest
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsoftmax as jsm
import jsoftmax.kernels
import jsoftmax.optax

PUBLIC = [
    (f"jsoftmax.{name}", getattr(jsm, name))
    for name in sorted(dir(jsm))
    if not name.startswith("_") and inspect.isfunction(getattr(jsm, name))
] + [
    (f"jsoftmax.{mod.__name__.split('.')[-1]}.{name}", getattr(mod, name))
    for mod in (jsoftmax.optax, jsoftmax.kernels)
    for name in sorted(getattr(mod, "__all__", dir(mod)))
    if not name.startswith("_") and callable(getattr(mod, name, None))
]


def test_every_public_function_has_a_documented_example():
    missing = [name for name, fn in PUBLIC if ">>>" not in (fn.__doc__ or "")]
    assert not missing, f"no doctest example in: {missing}"


@pytest.mark.parametrize("name,fn", PUBLIC, ids=[n for n, _ in PUBLIC])
def test_docstring_examples(name, fn):
    globs = {"jax": jax, "jnp": jnp, "np": np, "jsm": jsm, "jsoftmax": jsoftmax}
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    # jitted kernels wrap the documented Python function
    for test in finder.find(getattr(fn, "__wrapped__", fn), name, globs=globs):
        runner.run(test)
    assert runner.failures == 0, f"{runner.failures} failing example(s) in {name}'s docstring"

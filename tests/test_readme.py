"""The README's Python examples run, in order, as a user would paste them.

The examples name a few arrays they do not build (``hidden``, ``kernel``, ...); the
namespace below provides them at small shapes. A statement may raise only where the line
after it is a comment naming that exception (``# JaxRuntimeError: ...``).
"""

from __future__ import annotations

import ast
import pathlib
import re

import jax
import jax.numpy as jnp
import pytest

README = pathlib.Path(__file__).parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def namespace() -> dict:
    k = jax.random.split(jax.random.key(0), 8)
    n, d, v, c = 16, 8, 40, 6
    return {
        "hidden": jax.random.normal(k[0], (n, d)),
        "kernel": jax.random.normal(k[1], (d, v)) * 0.1,
        "embed_table": jax.random.normal(k[2], (v, d)) * 0.1,
        "tokens": jax.random.randint(k[3], (n,), 0, v),
        "teacher_hidden": jax.random.normal(k[4], (n, 2 * d)),
        "teacher_kernel": jax.random.normal(k[5], (2 * d, v)) * 0.1,
        "teacher_logits2d": jax.random.normal(k[6], (n, c)),
        "sampled": jax.random.randint(k[4], (n,), 0, v),
        "logits2d": jax.random.normal(k[5], (n, c)),
        "int_labels": jax.random.randint(k[6], (n,), 0, c),
        "val_logits": 3.0 * jax.random.normal(k[7], (64, c)),
        "val_labels": jnp.arange(64) % c,
        "test_logits": 3.0 * jax.random.normal(k[0], (64, c)),
        "test_labels": jnp.arange(64) % c,
    }


def test_readme_has_examples():
    assert len(python_blocks()) >= 6


def test_readme_examples_run():
    ns = namespace()
    for block in python_blocks():
        lines = block.splitlines()
        for stmt in ast.parse(block).body:
            code = compile(ast.Module(body=[stmt], type_ignores=[]), "README.md", "exec")
            after = lines[stmt.end_lineno] if stmt.end_lineno < len(lines) else ""
            expected = re.match(r"\s*# (\w+Error):", after)
            if expected is None:
                exec(code, ns)
                continue
            with pytest.raises(Exception) as info:
                exec(code, ns)
            assert type(info.value).__name__ == expected.group(1)

"""The installed (non-editable) package holds every module of the source tree.

An editable install imports from the tree and hides a subpackage missing from
``[tool.setuptools] packages``; ``pip install .`` (the README's main command) would then
ship a package that fails at import. The list is checked against the tree here.
"""

from __future__ import annotations

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_subpackage_is_declared():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = set(config["packages"])
    dirs = {name: ROOT / config.get("package-dir", {}).get(name, name.replace(".", "/"))
            for name in declared}  # fmt: skip
    found = set()
    for name, path in dirs.items():
        for init in path.rglob("__init__.py"):
            rel = init.parent.relative_to(path).parts
            if "__pycache__" not in rel:
                found.add(".".join((name, *rel)))
    assert found <= declared, f"not in [tool.setuptools] packages: {sorted(found - declared)}"

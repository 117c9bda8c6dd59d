"""Sphinx configuration for the jsoftmax documentation.

Build with ``sphinx-build -W -b html docs docs/_build/html`` (warnings are errors, as in
CI). The example notebooks in ``examples/`` are rendered with myst-nb. When the test
suite has already executed them (``tests/test_notebooks.py`` writes executed copies to
``build/executed-notebooks/``), those copies are rendered as they are; otherwise the
build executes the notebooks itself.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jsoftmax  # noqa: E402

project = "jsoftmax"
author = "the jsoftmax authors"
copyright = "2026, the jsoftmax authors"
release = jsoftmax.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    # Ships MathJax with the site (formulas render offline, e.g. in CI's browser check).
    "sphinx-mathjax-offline",
]

# --- API reference from the docstrings (Google style, as in optax and flax).
autosummary_generate = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
add_module_names = False
# The Examples sections are doctests (run by tests/test_docstrings.py); keep them as code.
napoleon_custom_sections = [("References", "notes_style")]

# --- Markdown pages and notebooks.
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "jupyter_execute"]

# Notebooks: copy the executed versions from the test run when present, else execute.
_EXECUTED = pathlib.Path(
    os.environ.get("JSOFTMAX_EXECUTED_NOTEBOOKS", ROOT / "build" / "executed-notebooks")
)
_NB_DIR = pathlib.Path(__file__).parent / "examples"
_NB_DIR.mkdir(exist_ok=True)
_all_executed = True
for nb in sorted((ROOT / "examples").glob("*.ipynb")):
    executed = _EXECUTED / nb.name
    fresh = executed.exists() and executed.stat().st_mtime >= nb.stat().st_mtime
    _all_executed &= fresh
    shutil.copyfile(executed if fresh else nb, _NB_DIR / nb.name)
nb_execution_mode = "off" if _all_executed else "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_merge_streams = True

# --- HTML.
html_theme = "sphinx_book_theme"
html_title = f"jsoftmax {release}"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": True,
    "home_page_in_toc": True,
}
html_static_path: list[str] = []

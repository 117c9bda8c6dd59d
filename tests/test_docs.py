"""Checks on the built documentation site (``docs/``).

These run after the site is built (``.ci/run`` builds it with warnings as errors, then
runs ``pytest -m docs``); they are deselected from the default run because they need
the built pages and, for the screenshots, a headless Chromium
(``apt-get install chromium``). Build locally with::

    pip install -e ".[docs]"
    sphinx-build -W -b html docs docs/_build/html
    python -m pytest -m docs
"""

from __future__ import annotations

import html
import os
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest

import jsoftmax
import jsoftmax.optax
from jsoftmax import kernels

pytestmark = pytest.mark.docs

ROOT = pathlib.Path(__file__).resolve().parents[1]
HTML = pathlib.Path(os.environ.get("JSOFTMAX_DOCS_HTML", ROOT / "docs" / "_build" / "html"))
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


@pytest.fixture(scope="module")
def site() -> pathlib.Path:
    if not (HTML / "index.html").exists():
        pytest.fail(
            f"no built documentation at {HTML}: run `sphinx-build -W -b html docs "
            "docs/_build/html` first (or set JSOFTMAX_DOCS_HTML)."
        )
    return HTML


def _public(module, names=None):
    names = names if names is not None else getattr(module, "__all__", dir(module))
    return sorted(n for n in names if not n.startswith("_") and callable(getattr(module, n, None)))


def _reference_text(site: pathlib.Path) -> str:
    pages = sorted((site / "api").rglob("*.html"))
    assert pages, "the API reference has no pages"
    return "\n".join(html.unescape(p.read_text(encoding="utf-8")) for p in pages)


@pytest.mark.parametrize("module", [jsoftmax, jsoftmax.optax, kernels], ids=lambda m: m.__name__)
def test_every_public_name_has_a_reference_entry(site, module):
    text = _reference_text(site)
    names = _public(module)
    assert len(names) >= 5
    missing = [n for n in names if not re.search(rf'id="{re.escape(module.__name__)}\.{n}"', text)]
    assert not missing, f"{module.__name__}: no API reference entry for {missing}"


def test_reference_pages_show_docstring_sections(site):
    page = (site / "api" / "generated" / "jsoftmax.cross_entropy.html").read_text("utf-8")
    for heading in ("Parameters", "Returns", "Examples"):
        assert heading in page, heading
    assert "math" in page  # the formula is rendered as math, not as raw text


def test_notebooks_are_rendered_with_outputs(site):
    pages = sorted((site / "examples").glob("*.html"))
    assert len(pages) == len(list((ROOT / "examples").glob("*.ipynb")))
    for page in pages:
        text = page.read_text("utf-8")
        assert "all checks passed" in text, f"{page.name}: rendered without its outputs"
        source = (ROOT / "examples" / f"{page.stem}.ipynb").read_text("utf-8")
        if "plt.show()" in source:  # a notebook that draws shows its figures
            assert "<img" in text, f"{page.name}: its figures are missing"


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail(
            "headless Chromium is needed for the screenshot checks: apt-get install chromium"
        )
    return exe


@pytest.mark.parametrize(
    "page, title",
    [("index.html", "jsoftmax"), ("api/generated/jsoftmax.cross_entropy.html", "cross_entropy")],
)
def test_page_renders_in_a_real_browser(site, tmp_path, page, title):
    exe = _chromium()
    url = (site / page).as_uri()
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run(
        [exe, *CHROMIUM_FLAGS, *profile, "--dump-dom", url],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert f"<title>{title}" in dom or re.search(rf"<title>[^<]*{re.escape(title)}", dom)
    assert re.search(rf"<h1[^>]*>.*{re.escape(title)}", dom, re.S), "page heading missing"

    shot = tmp_path / "shot.png"
    subprocess.run(
        [exe, *CHROMIUM_FLAGS, *profile, "--window-size=1280,900", f"--screenshot={shot}", url],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (900, 1280)
    # Not blank: a rendered page has text (dark pixels) on a light background and many
    # distinct colours; a blank or error page is nearly uniform.
    gray = pixels.mean(axis=-1)
    assert gray.std() > 0.05
    assert (gray < 0.5).mean() > 0.005
    assert len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 50

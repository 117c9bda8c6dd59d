"""Execute every notebook in ``examples/`` and check it is committed without outputs.

Each notebook ends with a cell of ``assert`` statements on its key results, so running it
to completion is the test. The executed notebooks are saved to ``build/executed-notebooks/``
(or ``$JSOFTMAX_EXECUTED_NOTEBOOKS``), where the documentation build picks them up instead
of running every notebook a second time. The kernel is this interpreter (a kernelspec written to a
temporary ``JUPYTER_PATH`` entry), so a fresh ``pip install -e ".[test]"`` venv tests its
own jsoftmax, whatever other ``python3`` kernels the user has installed.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
EXECUTED = pathlib.Path(
    os.environ.get("JSOFTMAX_EXECUTED_NOTEBOOKS", ROOT / "build" / "executed-notebooks")
)
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
KERNEL = "jsoftmax-test-python"

EXPECTED = {
    "01_softmax_basics.ipynb",
    "02_imbalanced_classification.ipynb",
    "03_large_vocab_lm.ipynb",
    "04_calibration_open_set.ipynb",
    "05_rl_token_logprobs.ipynb",
    "06_distillation.ipynb",
    "07_flax_nnx_lm.ipynb",
    "08_equinox_digits.ipynb",
    "09_post_training.ipynb",
}


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A kernelspec for ``sys.executable`` and a clean environment for the kernel."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jsoftmax tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", str(root) + os.pathsep + os.environ.get("JUPYTER_PATH", ""))
    # The notebooks run as a user would: one CPU device (conftest simulates 8 for the
    # sharding tests), matplotlib's inline backend (figures become image outputs, which the
    # docs render; no window is opened), and no GPU probing.
    mp.setenv(
        "XLA_FLAGS",
        os.environ.get("XLA_FLAGS", "")
        .replace("--xla_force_host_platform_device_count=8", "")
        .strip(),
    )
    mp.setenv("JAX_PLATFORMS", "cpu")
    mp.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    mp.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    yield
    mp.undo()


def test_all_notebooks_present():
    assert {p.name for p in NOTEBOOKS} == EXPECTED


def test_network_libraries_are_example_extras_only():
    # Notebooks 07 and 08 train Flax NNX and Equinox models; jsoftmax itself needs neither.
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {r.split(">")[0].split("=")[0].split("[")[0].strip() for r in reqs}
    assert not {"flax", "equinox"} & names(project["dependencies"])
    for extra in ("test", "docs"):
        assert {"flax", "equinox"} <= names(project["optional-dependencies"][extra]), extra
    code = (
        "import sys, jsoftmax, jsoftmax.optax, jsoftmax.kernels; "
        "sys.exit(bool({'flax', 'equinox'} & set(sys.modules)))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: a code cell has saved outputs"
            assert cell.execution_count is None, f"{path.name}: saved execution count"
    assert nb.cells[-1].cell_type == "code" and "assert" in nb.cells[-1].source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_env):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=300,
        resources={"metadata": {"path": str(EXAMPLES)}},
    )
    client.execute()  # raises CellExecutionError (with the traceback) on any failing cell
    last = nb.cells[-1]
    text = "".join(o.get("text", "") for o in last.outputs if o.output_type == "stream")
    assert "all checks passed" in text
    EXECUTED.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, EXECUTED / path.name)

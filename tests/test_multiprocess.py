"""Two JAX processes on this machine train one step of a tiny LM with the fused loss.

Each process runs ``tests/_multiprocess_worker.py`` (two CPU devices each, collectives
over gloo, coordinator on 127.0.0.1): the batch is sharded on ``data`` across the
processes and the LM head on ``model`` (the vocabulary) inside each. The loss and the
gradients of every parameter must equal a single-process float64 reference that
materialises the logits, and the compiled step must not gather the head.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsoftmax import _compat

sys.path.insert(0, str(Path(__file__).parent))
import _multiprocess_worker as worker  # noqa: E402

WORKER = Path(__file__).parent / "_multiprocess_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference():
    """Loss and gradients in float64 with the logits materialised (a naive formula)."""
    params, inputs, labels = worker.make_problem()
    with _compat.enable_x64():
        p64 = {k: jnp.asarray(v, jnp.float64) for k, v in params.items()}

        def loss_fn(p):
            logits = worker.hidden_states(p, inputs) @ p["head"]
            logp = jax.nn.log_softmax(logits, axis=-1)
            keep = labels != -100
            nll = -jnp.take_along_axis(logp, np.where(keep, labels, 0)[..., None], -1)[..., 0]
            return jnp.sum(jnp.where(keep, nll, 0.0)) / jnp.sum(keep)

        loss, grads = jax.value_and_grad(loss_fn)(p64)
        return float(loss), {k: np.asarray(v) for k, v in grads.items()}


@pytest.mark.parametrize("mode", ["explicit", "auto"])
def test_two_processes_match_single_process_float64(mode, tmp_path):
    port = _free_port()
    env = {**os.environ, **worker.ENV}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(port), str(tmp_path), mode],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out)
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-4000:]
    ref_loss, ref_grads = _reference()
    for i in range(2):
        res = np.load(tmp_path / f"result_{i}.npz")
        assert not res["head_gathered"], "the compiled step all-gathers the whole head"
        # float32 rounding of a 64-class softmax and two small matmuls: ~1e-6 relative.
        np.testing.assert_allclose(res["loss"], ref_loss, rtol=2e-6)
        for k, g in ref_grads.items():
            scale = np.max(np.abs(g))
            np.testing.assert_allclose(res[f"grad_{k}"], g, rtol=0, atol=2e-6 * scale)

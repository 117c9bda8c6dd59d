"""One process of the two-process training test (tests/test_multiprocess.py).

Run as ``python _multiprocess_worker.py PROCESS_ID PORT OUT_DIR MODE``: joins a
two-process JAX cluster on 127.0.0.1 (CPU collectives over gloo, two CPU devices per
process), takes one jitted training step of a tiny LM whose loss is
``jsm.linear_cross_entropy`` with the batch on ``data`` (across the processes) and the
vocabulary on ``model`` (within each), and writes the loss and the whole gradients
(gathered from both processes) to ``OUT_DIR/result_PROCESS_ID.npz``. ``MODE`` is
``explicit`` (mesh axes of ``AxisType.Explicit``) or ``auto`` (the default mode).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jsoftmax as jsm
from jsoftmax import _compat

# Two CPU devices per process. The test starts this file with these variables set (this
# module is also imported by the test, where they must not change the session's devices).
ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}

# The tiny LM's sizes and data: shared with the test, which builds the reference.
BATCH, SEQ, D_MODEL, VOCAB = 8, 6, 16, 64


def make_problem(seed: int = 0):
    """Parameters and a batch of the tiny LM, in float32 numpy (the same in every process)."""
    rng = np.random.default_rng(seed)
    params = {
        "embed": (rng.normal(size=(VOCAB, D_MODEL)) / 2).astype(np.float32),
        "w1": (rng.normal(size=(D_MODEL, D_MODEL)) / 4).astype(np.float32),
        "head": (rng.normal(size=(D_MODEL, VOCAB)) / 4).astype(np.float32),
    }
    tokens = rng.integers(0, VOCAB, size=(BATCH, SEQ + 1)).astype(np.int32)
    inputs, labels = tokens[:, :-1], tokens[:, 1:].copy()
    labels[0, :2] = -100  # some ignored positions
    return params, inputs, labels


def hidden_states(params, inputs):
    """The LM's last hidden layer: an embedding and one tanh layer.

    The embedding is a one-hot product, which partitions the same way in both sharding
    modes (an indexed gather needs an explicit output sharding in explicit mode).
    """
    one_hot = jax.nn.one_hot(inputs, VOCAB, dtype=params["embed"].dtype)
    return jnp.tanh(one_hot @ params["embed"] @ params["w1"])


def main(process_id: int, port: int, out_dir: str, mode: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    axis_type = jax.sharding.AxisType.Explicit if mode == "explicit" else jax.sharding.AxisType.Auto
    # Devices are ordered by process: `data` spans the two processes, `model` stays inside.
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(axis_type,) * 2)
    params, inputs, labels = make_problem()
    shardings = {
        "embed": P(),
        "w1": P(),
        "head": P(None, "model"),  # vocabulary-parallel head
    }

    def put(x, spec):
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])

    params = {k: put(v, shardings[k]) for k, v in params.items()}
    inputs, labels = put(inputs, P("data")), put(labels, P("data"))

    # Explicit mode reads the head's layout from its type; the default auto mode is told
    # which mesh axis holds the vocabulary.
    kw = {} if mode == "explicit" else {"axis_name": "model"}

    def loss_fn(params, inputs, labels):
        h = hidden_states(params, inputs)
        return jsm.linear_cross_entropy(h, params["head"], labels, chunk_size=8, **kw)

    with _compat.set_mesh(mesh):
        step = jax.jit(jax.value_and_grad(loss_fn))
        loss, grads = step(params, inputs, labels)
        hlo = step.lower(params, inputs, labels).compile().as_text()
    gathered = {k: multihost_utils.process_allgather(g, tiled=True) for k, g in grads.items()}
    head_gathered = any(
        "all-gather(" in line and f"[{D_MODEL},{VOCAB}]" in line for line in hlo.splitlines()
    )
    np.savez(
        os.path.join(out_dir, f"result_{process_id}.npz"),
        loss=np.asarray(multihost_utils.process_allgather(loss, tiled=True)),
        head_gathered=head_gathered,
        **{f"grad_{k}": np.asarray(v) for k, v in gathered.items()},
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])

"""Block overrides the device compilers would reject are refused at trace time.

The limits themselves are checked against the real compilers by the ``aot`` tests
(tests/test_aot.py); here: which limits apply on which host, and that the public kernels
raise a ``ValueError`` naming the limit (tracing only, abstract shapes: fast).
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import pytest

from jsoftmax import kernels as K
from jsoftmax.kernels import _common as cm

S = jax.ShapeDtypeStruct


def trace(fn, *args):
    return jax.jit(fn).trace(*args)


def limits_on(monkeypatch, backend, device):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(jax, "devices", lambda *a: [device])
    return cm.limits.__wrapped__


def test_a_cpu_host_checks_both_backends_against_the_most_restrictive_target():
    assert jax.default_backend() == "cpu"
    assert cm.limits("tpu") == cm.TPU_MOST_RESTRICTIVE
    assert cm.limits("gpu") == cm.GPU_MOST_RESTRICTIVE
    assert cm.TPU_MOST_RESTRICTIVE.vmem == min(t.vmem for t in cm.TPU_LIMITS.values())
    supported = (cm.GPU_LIMITS[(8, 0)], cm.GPU_LIMITS[(9, 0)])  # A100, H100
    assert cm.GPU_MOST_RESTRICTIVE.shared_memory == min(g.shared_memory for g in supported)


def test_an_accelerator_host_uses_its_device_and_skips_the_other_backend(monkeypatch):
    limits = limits_on(monkeypatch, "tpu", types.SimpleNamespace(device_kind="TPU v6 lite"))
    assert limits("tpu").vmem == 32 * 2**20 and limits("gpu") is None
    limits = limits_on(monkeypatch, "tpu", types.SimpleNamespace(device_kind="TPU v9"))
    assert limits("tpu") == cm.TPU_MOST_RESTRICTIVE
    limits = limits_on(monkeypatch, "gpu", types.SimpleNamespace(compute_capability="9.0"))
    assert limits("gpu").shared_memory == 232448 and limits("tpu") is None
    limits = limits_on(monkeypatch, "gpu", types.SimpleNamespace(compute_capability="12.0"))
    assert limits("gpu") == cm.GPU_MOST_RESTRICTIVE


def test_triton_element_limit_is_refused(monkeypatch):
    # On this host both backends are checked; the TPU kernel would refuse these blocks
    # too (VMEM), so check the GPU rule alone.
    gpu_only = lambda style: cm.GPU_MOST_RESTRICTIVE if style == "gpu" else None
    monkeypatch.setattr(cm, "limits", gpu_only)
    x = S((64, 262144), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"softmax: .*at most 1048576 \(2\^20\) elements"):
        trace(lambda x: K.softmax(x, block_rows=16, block_cols=131072), x)
    with pytest.raises(ValueError, match="at most 1048576"):
        trace(
            lambda x, y: K.cross_entropy(x, y, block_rows=16, block_cols=131072),
            x,
            S((64,), jnp.int32),
        )
    # The interpreter has no such limit.
    trace(lambda x: K.softmax(x, block_rows=16, block_cols=131072, interpret=True), x)


def test_tpu_vmem_limit_is_refused():
    x = S((1024, 65536), jnp.float32)
    with pytest.raises(ValueError, match=r"16\.12 MiB of TPU VMEM.*16 MiB scoped VMEM limit"):
        trace(lambda x: K.log_softmax(x, block_rows=128, block_cols=8192), x)
    trace(lambda x: K.log_softmax(x, block_rows=64, block_cols=8192), x)  # 8.06 MiB


def test_gpu_shared_memory_limit_is_refused():
    # The GPU linear cross-entropy's block-sparse gradient matmuls: (128x256 + 256x256)
    # bf16 operand tiles need 196608 bytes, above the A100's 166912; refused when the
    # program is lowered for CUDA (the same keywords size TPU tiles).
    h, w, y = S((512, 1024), jnp.bfloat16), S((1024, 4096), jnp.bfloat16), S((512,), jnp.int32)

    def lower(**blocks):
        f = lambda h, w, y: K.linear_cross_entropy(h, w, y, reduction="mean", **blocks)  # noqa: E731
        return jax.jit(f).trace(h, w, y).lower(lowering_platforms=("cuda",))

    limit = cm.GPU_MOST_RESTRICTIVE.shared_memory
    with pytest.raises(ValueError, match=f"196608 bytes of shared memory.*{limit}-byte"):
        lower(block_rows=128, block_cols=256, block_d=256)
    lower(block_rows=128, block_cols=256, block_d=128)  # 131072 bytes: fits

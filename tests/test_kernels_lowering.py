"""Every kernel, forward and backward, lowers for ``cuda`` (Triton) and ``tpu`` (Mosaic).

Runs on this CPU-only machine: ``jax.jit(f).trace(*args).lower(lowering_platforms=(p,))``
runs the Pallas front end and the platform's kernel lowering. A kernel that fails to
lower is a failing test. Lowering is cheap, so the shapes are many and real-sized
(ragged against every block, a 256k vocabulary, GPT-2's 50257, a 4096-wide hidden).

Each test also checks the lowered module holds the expected number of kernels of the
right kind (``tpu_custom_call`` for Mosaic, ``__gpu$xla.gpu.triton`` for Triton), so a
silent fallback to something else would fail.
"""

import jax
import jax.numpy as jnp
import pytest

from jsoftmax import kernels as K

S = jax.ShapeDtypeStruct
PLATFORMS = ("cuda", "tpu")
KERNEL_CALL = {"tpu": "@tpu_custom_call(", "cuda": "@__gpu$xla.gpu.triton("}


def lower_text(fn, args, platform):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def assert_kernels(text, platform, count):
    assert text.count(KERNEL_CALL[platform]) == count, text[:2000]


# ------------------------------------------------------------------ softmax family

SOFTMAX_SHAPES = [
    ((1, 5), jnp.float16, {}),
    ((17, 300), jnp.float32, {}),
    ((3, 1000), jnp.float32, dict(block_rows=8, block_cols=128)),
    ((1000, 10), jnp.float32, {}),
    ((17, 4099), jnp.bfloat16, dict(block_cols=1024)),
    ((64, 50257), jnp.bfloat16, {}),
    ((8, 32768), jnp.float32, {}),
    ((4, 262144), jnp.bfloat16, {}),
]


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("shape,dtype,blocks", SOFTMAX_SHAPES)
def test_softmax_family_lowers(shape, dtype, blocks, log, platform):
    fn = K.log_softmax if log else K.softmax
    f = lambda x: fn(x, **blocks)
    x = S(shape, dtype)
    assert_kernels(lower_text(f, (x,), platform), platform, 1)
    bwd = lambda x: jax.vjp(f, x)[1](x)[0]
    assert_kernels(lower_text(bwd, (x,), platform), platform, 2)


# -------------------------------------------------------------------- cross-entropy

CE_SHAPES = [
    ((1, 5), jnp.float32, {}),
    ((17, 300), jnp.float32, dict(label_smoothing=0.1, z_loss=1e-4)),
    ((3, 1000), jnp.bfloat16, dict(block_rows=16, block_cols=128, ignore_index=0)),
    ((1000, 10), jnp.float32, dict(z_loss=1e-3)),
    ((64, 50257), jnp.bfloat16, {}),
    ((4, 262144), jnp.bfloat16, dict(label_smoothing=0.1)),
]


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("shape,dtype,opts", CE_SHAPES)
def test_cross_entropy_lowers(shape, dtype, opts, platform):
    f = lambda z, y: K.cross_entropy(z, y, **opts)
    args = (S(shape, dtype), S(shape[:1], jnp.int32))
    assert_kernels(lower_text(f, args, platform), platform, 1)
    bwd = lambda z, y: jax.grad(lambda z: f(z, y).sum())(z)
    assert_kernels(lower_text(bwd, args, platform), platform, 2)


# ------------------------------------------------------------- linear cross-entropy

LCE_CASES = [
    # (N, D, V), dtype, layout, with bias, options
    ((17, 40, 131), jnp.float32, "dv", False, {}),
    ((17, 40, 131), jnp.float32, "vd", True, dict(logit_softcap=30.0, label_smoothing=0.1)),
    ((5, 24, 300), jnp.float32, "dv", True, dict(block_rows=8, block_cols=128, block_d=16)),
    ((64, 512, 50257), jnp.bfloat16, "vd", False, dict(z_loss=1e-4)),
    ((64, 512, 50257), jnp.bfloat16, "dv", True, dict(logit_softcap=30.0)),
    ((256, 4096, 32000), jnp.bfloat16, "dv", False, {}),
    ((8, 100, 262144), jnp.bfloat16, "vd", False, dict(label_smoothing=0.1)),
]


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("dims,dtype,layout,with_bias,opts", LCE_CASES)
def test_linear_cross_entropy_lowers(dims, dtype, layout, with_bias, opts, platform):
    n, d, v = dims
    h = S((n, d), dtype)
    w = S((v, d) if layout == "vd" else (d, v), dtype)
    b = S((v,), jnp.float32) if with_bias else None
    y = S((n,), jnp.int32)
    f = lambda h, w, b, y: K.linear_cross_entropy(
        h, w, y, linear_bias=b, weight_layout=layout, **opts
    )
    assert_kernels(lower_text(f, (h, w, b, y), platform), platform, 1)
    argnums = (0, 1, 2) if with_bias else (0, 1)
    bwd = lambda h, w, b, y: jax.grad(lambda *p: f(*p, y).sum(), argnums=argnums)(h, w, b)
    # Forward, d_hidden and d_weight(+d_bias) kernels.
    assert_kernels(lower_text(bwd, (h, w, b, y), platform), platform, 3)


# ------------------------------------------------------------------ lowering_report


def test_lowering_report_all_ok():
    report = K.lowering_report()
    kernels = ("softmax", "log_softmax", "cross_entropy", "linear_cross_entropy")
    assert len(report) == len(kernels) * 2 * 2
    assert {(r["kernel"], r["direction"], r["platform"]) for r in report} == {
        (k, dr, p) for k in kernels for dr in ("fwd", "bwd") for p in ("cuda", "tpu")
    }
    for r in report:
        assert set(r) == {"kernel", "direction", "platform", "ok", "error"}
        assert r["ok"] is True and r["error"] is None, r


def test_lowering_report_records_failures(monkeypatch):
    # A kernel that fails to lower is reported (ok False, "Type: message"), not raised.
    from jsoftmax.kernels import _lowering

    def broken(x):
        raise NotImplementedError("no lowering for this op\nsecond line")

    x = S((2, 3), jnp.float32)
    monkeypatch.setattr(_lowering, "_cases", lambda: {"broken": (broken, broken, (x,))})
    report = K.lowering_report(platforms="tpu")
    assert report == [
        dict(
            kernel="broken",
            direction=d,
            platform="tpu",
            ok=False,
            error="NotImplementedError: no lowering for this op",
        )
        for d in ("fwd", "bwd")
    ]

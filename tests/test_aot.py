"""The compile matrix: every kernel, forward and backward, compiled by the real compilers.

Deviceless ahead-of-time compilation (``jsoftmax.kernels._aot``) runs libtpu's compiler
for TPU v4 / v5e / v5p / v6e and XLA's CUDA pipeline with Triton and ``ptxas`` for H100
and A100 on this CPU-only machine, at production shapes. For every case x target:

* a program whose arguments and outputs fit the device must compile, contain its Pallas
  kernels, and fit the device memory by the compiler's own ``memory_analysis()``;
* a shape that cannot fit (its arguments and outputs alone fill the HBM) must be refused
  by that compiler for HBM -- so the memory check has teeth.

Each checked block limit is exercised with an override that the kernels refuse before the
compiler, and the same override with the checks off is rejected by the real compiler (the
rule is not made up).

Needs the ``[aot]`` extra; skipped (with the reason) without it, except when the ``CI``
environment variable is set, where a missing compiler fails. Marker ``aot``, not in the
default run: ``pytest -m aot``.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import pytest

from jsoftmax.kernels import _aot

pytestmark = pytest.mark.aot

TARGETS = [pytest.param(t, id=t.name.replace(" ", "-")) for t in _aot.TARGETS]
_CACHE: dict[str, list[_aot.Result]] = {}


def need(platform: str) -> None:
    """Skip without the compilers, except in CI (``CI`` set), where that is a failure.

    A developer without the ``[aot]`` extra gets a skip with the reason; the CI ``aot``
    phase installs the extra, so a missing compiler there means the phase compiled
    nothing and must not pass.
    """
    reason = _aot.missing(platform)
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but the {platform} compiler is missing: {reason}")
    pytest.skip(f"{reason} (install the [aot] extra: pip install -e '.[aot]')")


def results(target: _aot.Target) -> list[_aot.Result]:
    """The matrix of one target, compiled once per session (shared by the assertions)."""
    if target.name not in _CACHE:
        _CACHE[target.name] = [_aot.run_case(c, target) for c in _aot.matrix_cases()]
    return _CACHE[target.name]


@pytest.mark.parametrize("target", TARGETS)
def test_every_kernel_compiles_and_fits(target):
    need(target.platform)
    cases = {c.name: c for c in _aot.matrix_cases()}
    failures = []
    for r in results(target):
        if r.too_big:
            # The shape cannot fit this device: its compiler must say so.
            if r.ok or "HBM" not in (r.error or ""):
                failures.append(f"{r.case}: {r.io} I/O bytes >= HBM, yet {r.error or 'ok'}")
        elif not r.ok:
            failures.append(f"{r.case}: {r.error}")
        elif r.n_kernels != cases[r.case].expected_kernels(target.platform):
            failures.append(f"{r.case}: {r.n_kernels} Pallas kernels compiled")
        elif r.peak > target.memory:
            failures.append(f"{r.case}: needs {r.peak} bytes of {target.memory}")
    assert not failures, "\n".join(failures)


def test_the_matrix_covers_every_kernel_option_and_shape():
    names = [c.name for c in _aot.matrix_cases()]
    for kernel in ("softmax", "log_softmax", "cross_entropy", "linear_cross_entropy"):
        assert any(n.startswith(kernel + " ") for n in names)
    for shape in ("(8192, 131072)", "(4096, 262144)"):
        for dtype in ("bf16", "f32"):
            for kernel in ("softmax", "log_softmax", "cross_entropy"):
                assert f"{kernel} {shape} {dtype}" in " | ".join(names)
    lce = [n for n in names if n.startswith("linear_cross_entropy")]
    for v in (131072, 256000):
        for layout in ("dv", "vd"):
            assert any(f"V={v} bf16 {layout}, bias [cap=30.0, ls=0.1" in n for n in lce)


@pytest.mark.parametrize(
    "refusal", [pytest.param(r, id=f"{r.target}-{r.case.kernel}") for r in _aot.refusal_cases()]
)
def test_refused_blocks_are_rejected_by_the_compiler_too(refusal):
    target = _aot.TARGETS_BY_NAME[refusal.target]
    need(target.platform)
    # On this CPU host both backends' kernels are traced and checked: isolate this one.
    other = "gpu" if target.platform == "tpu" else "tpu"
    with _aot.unchecked(other), pytest.raises(ValueError, match=refusal.ours):
        _aot.compile_case(refusal.case, target)
    with _aot.unchecked(), pytest.raises(Exception, match=refusal.compiler):
        _aot.compile_case(refusal.case, target)


def test_blocks_under_the_vmem_bound_compile():
    # Half the refused (128, 8192) float32 block: 8.06 MiB by the bound, and it compiles.
    target = _aot.TARGETS_BY_NAME["TPU v5e"]
    need(target.platform)
    case = _aot.softmax_case(1024, 65536, jnp.float32, block_rows=64, block_cols=8192)
    assert _aot.run_case(case, target).status == "ok"


def test_tables_render():
    need("tpu")
    target = _aot.TARGETS_BY_NAME["TPU v6e"]
    rs = results(target)
    table = _aot.markdown_table(rs)
    assert table.count("\n") == len(rs) + 1 and "TPU v6e" in table
    assert "FAIL" not in _aot.status_table(rs)


def test_doctor_shows_the_compile_matrix(capsys):
    from jsoftmax import _doctor

    need("tpu")
    need("cuda")
    assert _doctor.compile_matrix() is True
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("kernel "))
    assert header.split("  ")[0] == "kernel"
    for t in _aot.TARGETS:
        assert t.name in header
    assert "FAIL" not in out and "24/24 compiles ok" in out


# ------------------------------------------------- sharded: the fused loss on a TPU mesh

SHARDED_SHAPE = (8192, 4096, 131072)  # N, D, V; bfloat16 hidden and head


def _tpu_mesh(axis_type):
    """The 4 chips of a deviceless TPU v5e 2x2 as a ``data=2 x model=2`` mesh."""
    import jax
    import numpy as np

    target = _aot.TARGETS_BY_NAME["TPU v5e"]
    devices = np.array(_aot.devices(target)).reshape(2, 2)
    return jax.sharding.Mesh(devices, ("data", "model"), axis_types=(axis_type,) * 2)


def _compile_sharded(mesh, loss, h_spec, w_spec):
    """``jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))`` compiled for ``mesh``'s chips."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n, d, v = SHARDED_SHAPE
    on = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    args = (
        jax.ShapeDtypeStruct((n, d), jnp.bfloat16, sharding=on(h_spec)),
        jax.ShapeDtypeStruct((d, v), jnp.bfloat16, sharding=on(w_spec)),
        jax.ShapeDtypeStruct((n,), jnp.int32, sharding=on(P(h_spec[0]))),
    )
    with jax.set_mesh(mesh):  # the [aot] extra pins the newest jax
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()


def _naive_loss(h, w, y):
    """The materialised path: ``h @ W`` in bfloat16, ``log_softmax`` in float32, a gather."""
    import jax

    logp = jax.nn.log_softmax((h @ w).astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


_NAIVE_TEMP: dict[str, int] = {}
SHARDED = {
    # name: (mode, hidden spec, head spec, axis_name)
    "vocab_parallel": ("explicit", ("data", None), (None, "model"), None),
    "fsdp": ("explicit", (("data", "model"), None), (("data", "model"), None), None),
    "vocab_parallel_auto": ("auto", ("data", None), (None, "model"), "model"),
}


@pytest.mark.parametrize("case", list(SHARDED))
def test_sharded_fused_loss_compiles_for_a_tpu_mesh(case):
    """The fused loss under ``jax.jit`` + ``NamedSharding`` on a TPU v5e 2x2, compiled by
    libtpu: per-chip temp at most 1/8 of the naive path's, and the head never gathered
    (no all-gather of more than a quarter of it). The numbers are the scaling guide's."""
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    import jsoftmax as jsm
    from jsoftmax._bench_sharding import largest_all_gather

    need("tpu")
    mode, h_spec, w_spec, axis_name = SHARDED[case]
    kw = {} if axis_name is None else {"axis_name": axis_name}
    loss = lambda h, w, y: jsm.linear_cross_entropy(h, w, y, **kw)  # noqa: E731
    axis_type = AxisType.Explicit if mode == "explicit" else AxisType.Auto
    compiled = _compile_sharded(_tpu_mesh(axis_type), loss, P(*h_spec), P(*w_spec))
    # The naive path in the default mode (the same program for both vocab-parallel rows).
    key = repr((h_spec, w_spec))
    if key not in _NAIVE_TEMP:
        naive = _compile_sharded(_tpu_mesh(AxisType.Auto), _naive_loss, P(*h_spec), P(*w_spec))
        _NAIVE_TEMP[key] = int(naive.memory_analysis().temp_size_in_bytes)
    n, d, v = SHARDED_SHAPE
    temp = int(compiled.memory_analysis().temp_size_in_bytes)
    gathered = largest_all_gather(compiled.as_text(), d * v)
    print(f"{case}: temp {temp / 2**20:.1f} MiB / naive {_NAIVE_TEMP[key] / 2**20:.1f} MiB "
          f"per chip; largest all-gather {gathered:.4g} of the head")  # fmt: skip
    assert temp * 8 <= _NAIVE_TEMP[key], (temp, _NAIVE_TEMP[key])
    assert gathered <= 0.25

"""Ahead-of-time compilation of every kernel for real GPUs and TPUs, from any host.

Lowering (:mod:`._lowering`) stops before the device compilers. This module runs them:
the TPU compiler (libtpu) for TPU v4 / v5e / v5p / v6e, and XLA's CUDA pipeline with
Triton and ``ptxas`` for H100 (sm_90) and A100 (sm_80), on a CPU-only machine, through
``jax.experimental.topologies`` (a device description instead of a device). What they
catch and lowering cannot: Triton's per-tensor element limit, shared-memory and VMEM
exhaustion, layouts the TPU compiler rejects. The compiled executable also answers
``memory_analysis()`` with the target compiler's own byte counts.

It needs the ``[aot]`` extra (libtpu, jax-cuda12-plugin/pjrt, nvidia-cuda-nvcc-cu12, pinned
to the jax in use); :func:`missing` says what is absent. Used by the ``aot`` tests, by
``jsoftmax doctor`` (small shapes) and by ``benchmarks/compile_matrix.py`` (the README's
compile table).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.resources
import importlib.util
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._cross_entropy import cross_entropy
from ._linear_cross_entropy import linear_cross_entropy
from ._softmax import log_softmax, softmax

INSTALL_HINT = 'pip install "jsoftmax[aot]"'
KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}


@dataclasses.dataclass(frozen=True)
class Target:
    """One accelerator to compile for.

    ``spec`` is a ``jax.experimental.topologies`` topology name for TPUs and the name of
    a ``GpuTargetConfig`` file in ``jsoftmax/kernels/targets/`` for GPUs. ``memory`` is
    the device memory (HBM) per chip, in bytes, from the vendor's specification
    (``source``); a compiled program must fit it.
    """

    name: str
    platform: str  # "tpu" or "cuda"
    spec: str
    memory: int
    source: str


GB = 10**9
GIB = 2**30
TARGETS: tuple[Target, ...] = (
    Target("H100", "cuda", "h100_sxm.txtpb", 80 * GB, "NVIDIA H100 datasheet: 80 GB (SXM)"),
    Target("A100", "cuda", "a100_sxm4_80gb.txtpb", 80 * GB, "NVIDIA A100 datasheet: 80 GB SXM"),
    # TPU HBM per chip: Google Cloud TPU system architecture pages (v4, v5e, v5p, v6e).
    # v4 has 32 GiB per chip for its two TensorCores; the deviceless v4 topology compiles
    # for one TensorCore (no megacore), which gets half ("available HBM (15.25G)").
    Target("TPU v4", "tpu", "v4:2x2x1", 16 * GIB, "Cloud TPU v4: 32 GiB per 2-core chip"),
    Target("TPU v5e", "tpu", "v5e:2x2", 16 * GIB, "Cloud TPU v5e: 16 GiB HBM2 per chip"),
    Target("TPU v5p", "tpu", "v5p:2x2x1", 95 * GIB, "Cloud TPU v5p: 95 GiB HBM2e per chip"),
    Target("TPU v6e", "tpu", "v6e:2x2", 32 * GIB, "Cloud TPU v6e: 32 GiB HBM per chip"),
)
TARGETS_BY_NAME = {t.name: t for t in TARGETS}


def missing(platform: str | None = None) -> str | None:
    """What of the ``[aot]`` extra is absent (for ``platform`` or both), or ``None``."""
    need = []
    if platform in (None, "tpu") and not _has_module("libtpu"):
        need.append("libtpu")
    if platform in (None, "cuda"):
        if not _has_module("jax_plugins.xla_cuda12"):
            need.append("jax-cuda12-plugin")
        if _ptxas() is None:
            need.append("nvidia-cuda-nvcc-cu12 (ptxas)")
    if not need:
        return None
    return f"{', '.join(need)} not installed; `{INSTALL_HINT}` installs the compilers"


def _has_module(name: str) -> bool:
    # find_spec imports the parent packages: a missing ``jax_plugins`` raises, not None.
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _ptxas() -> str | None:
    spec = importlib.util.find_spec("nvidia")
    for root in spec.submodule_search_locations if spec is not None else ():
        candidate = os.path.join(root, "cuda_nvcc", "bin", "ptxas")
        if os.path.exists(candidate):
            return candidate
    return shutil.which("ptxas")


def target_config(target: Target) -> str:
    """The ``GpuTargetConfig`` text proto of a GPU target (package data)."""
    return (importlib.resources.files(__package__) / "targets" / target.spec).read_text()


def _register_cuda_compiler() -> None:
    """Make the CUDA plugin's compiler available on a host without a GPU driver.

    Unless ``JAX_PLATFORMS`` excludes CUDA, the plugin checks the CUDA runtime version
    when JAX starts; without a driver that check fails and the plugin registers nothing
    (JAX runs on CPU). Deviceless compilation needs no runtime, so register the plugin
    again with the check skipped. (JAX's plugin registry is private API: if it changes,
    ``get_topology_desc`` reports "topology not implemented for cuda" and ``JAX_PLATFORMS=cpu``
    is the workaround.)
    """
    from jax._src import xla_bridge

    if "cuda" in getattr(xla_bridge, "_topology_factories", {"cuda": None}):
        return
    import jax_plugins.xla_cuda12 as plugin

    key = "JAX_SKIP_CUDA_CONSTRAINTS_CHECK"
    saved = os.environ.get(key)
    os.environ[key] = "1"
    try:
        plugin.initialize()
    except Exception:  # noqa: BLE001 -- get_topology_desc then says what is missing
        pass
    finally:
        if saved is None:
            del os.environ[key]
        else:
            os.environ[key] = saved


def device(target: Target) -> Any:
    """A (deviceless) device of ``target``: compiling for it runs the real compiler."""
    return devices(target)[0]


@functools.cache
def devices(target: Target) -> tuple[Any, ...]:
    """All (deviceless) devices of ``target``'s topology: a TPU 2x2 has 4 chips, to lay a
    ``jax.sharding.Mesh`` over and compile sharded programs for."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        # libtpu takes a machine-wide lock unless told otherwise; a second process
        # compiling (pytest and a subprocess, two scripts) would get "ABORTED: Internal
        # error when accessing libtpu multi-process lockfile". Deviceless compilation
        # drives no TPU, so sharing is safe.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        topo = topologies.get_topology_desc(topology_name=target.spec, platform="tpu")
    else:
        jax.devices()  # plugins are discovered with the first backend
        _register_cuda_compiler()
        topo = topologies.get_topology_desc(
            topology_name="cuda",
            platform="cuda",
            target_config=target_config(target),
            topology="1x1x1",
        )
    return tuple(topo.devices)


def abstract(target: Target, shape: Sequence[int], dtype: Any) -> jax.ShapeDtypeStruct:
    """An argument placed on ``target``'s device (``jit`` compiles for its platform)."""
    sharding = jax.sharding.SingleDeviceSharding(device(target))
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


# --------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One program to compile: ``fn(*args)`` on abstract ``args`` (``(shape, dtype)`` or
    ``None``), forward and backward in one ``jax.jit`` (value and gradient together).

    ``kernels`` is how many Pallas kernels the compiled program must contain (a program
    that silently fell back to XLA would compile too): one number, or one per platform
    (``{"tpu": ..., "cuda": ...}``) where the two backends' designs differ.
    """

    kernel: str
    label: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kernels: int | dict[str, int]

    def expected_kernels(self, platform: str) -> int:
        return self.kernels[platform] if isinstance(self.kernels, dict) else self.kernels

    @property
    def name(self) -> str:
        return f"{self.kernel} {self.label}"


def _dt(dtype: Any) -> str:
    return {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}.get(
        jnp.dtype(dtype).name, jnp.dtype(dtype).name
    )


def softmax_case(n: int, c: int, dtype: Any, *, log: bool = False, **blocks: Any) -> Case:
    """``(y, dx)`` of (log-)softmax for a cotangent ``g``: the forward and backward kernels."""
    fn = log_softmax if log else softmax

    def run(x, g):
        y, vjp = jax.vjp(lambda x: fn(x, **blocks), x)
        return y, vjp(g)[0]

    label = f"({n}, {c}) {_dt(dtype)}" + _blocks_label(blocks)
    kernel = "log_softmax" if log else "softmax"
    return Case(kernel, label, run, (((n, c), dtype), ((n, c), dtype)), 2)


def cross_entropy_case(n: int, c: int, dtype: Any, **options: Any) -> Case:
    """``value_and_grad`` of the mean per-row loss w.r.t. the logits."""

    def run(z, y):
        return jax.value_and_grad(lambda z: cross_entropy(z, y, **options).mean())(z)

    label = f"({n}, {c}) {_dt(dtype)}" + _blocks_label(options)
    return Case("cross_entropy", label, run, (((n, c), dtype), ((n,), jnp.int32)), 2)


def linear_cross_entropy_case(
    n: int,
    d: int,
    v: int,
    dtype: Any,
    *,
    layout: str = "dv",
    bias: bool = False,
    grad: bool = True,
    reduction: str = "none",
    **options: Any,
) -> Case:
    """``value_and_grad`` of the mean loss w.r.t. hidden, weight (and bias); with
    ``grad=False`` the forward kernel alone.

    ``reduction="none"`` takes the mean of the per-row losses outside the kernel (the
    backward recomputes the logits); ``"mean"`` lets the kernel reduce, and so compute
    the gradient in its forward. On TPU both are the forward, ``d_hidden`` and
    ``d_weight`` kernels; on GPU the statistics and gradient kernels around XLA's
    matmuls, plus the two block-sparse gradient matmuls with ``filter_eps``.
    """
    argnums = (0, 1, 2) if bias else (0, 1)

    def run(h, w, b, y):
        def loss(h, w, b):
            out = linear_cross_entropy(
                h, w, y, linear_bias=b, weight_layout=layout, reduction=reduction, **options
            )
            return out.mean()

        return jax.value_and_grad(loss, argnums=argnums)(h, w, b) if grad else loss(h, w, b)

    w_shape = (d, v) if layout == "dv" else (v, d)
    b_arg = ((v,), jnp.float32) if bias else None
    extra = ", bias" if bias else ""
    extra += f", {reduction}" if reduction != "none" else ""
    label = f"N={n} D={d} V={v} {_dt(dtype)} {layout}{extra}" + _blocks_label(options)
    args = (((n, d), dtype), (w_shape, dtype), b_arg, ((n,), jnp.int32))
    if not grad:
        label += " (forward)"
        return Case("linear_cross_entropy", label, run, args, 1)
    gpu = 4 if options.get("filter_eps") is not None else 2
    return Case("linear_cross_entropy", label, run, args, {"tpu": 3, "cuda": gpu})


def _blocks_label(options: dict[str, Any]) -> str:
    short = {
        "label_smoothing": "ls",
        "z_loss": "z",
        "logit_softcap": "cap",
        "block_rows": "br",
        "block_cols": "bc",
        "block_d": "bd",
        "filter_eps": "filter",
    }
    parts = [f"{short.get(k, k)}={v}" for k, v in options.items()]
    return f" [{', '.join(parts)}]" if parts else ""


# Production shapes: a 128k and a 256k vocabulary at 2^30 logits (4 GiB in float32), and
# the LM-head of an 8k-token batch of a 4096-wide model. Ragged shapes (nothing a block
# multiple) exercise every edge mask.
_ROWWISE_SHAPES = ((8192, 131072), (4096, 262144))
_ROWWISE_RAGGED = ((1000, 50257), (37, 300001))
_LCE_SHAPES = ((8192, 4096, 131072), (8192, 4096, 256000))
_LCE_RAGGED = (1000, 1000, 50257)
_ALL_OPTIONS = dict(label_smoothing=0.1, z_loss=1e-4)


def matrix_cases() -> list[Case]:
    """The production compile matrix: every kernel, forward and backward, every option."""
    cases = []
    for n, c in _ROWWISE_SHAPES:
        for dtype in (jnp.bfloat16, jnp.float32):
            cases.append(softmax_case(n, c, dtype))
            cases.append(softmax_case(n, c, dtype, log=True))
            cases.append(cross_entropy_case(n, c, dtype, **_ALL_OPTIONS))
    cases.append(cross_entropy_case(*_ROWWISE_SHAPES[0], jnp.bfloat16))
    for n, c in _ROWWISE_RAGGED:
        cases.append(softmax_case(n, c, jnp.bfloat16))
        cases.append(softmax_case(n, c, jnp.float32, log=True))
        cases.append(cross_entropy_case(n, c, jnp.bfloat16, ignore_index=0, **_ALL_OPTIONS))
    for n, d, v in _LCE_SHAPES:
        for layout in ("dv", "vd"):
            cases.append(
                linear_cross_entropy_case(
                    n,
                    d,
                    v,
                    jnp.bfloat16,
                    layout=layout,
                    bias=True,
                    logit_softcap=30.0,
                    **_ALL_OPTIONS,
                )  # fmt: skip
            )
    cases.append(linear_cross_entropy_case(*_LCE_SHAPES[0], jnp.bfloat16))
    # The kernel-reduced loss (gradient in the forward), with and without filtering.
    for n, d, v in _LCE_SHAPES:
        cases.append(linear_cross_entropy_case(n, d, v, jnp.bfloat16, reduction="mean"))
    cases.append(
        linear_cross_entropy_case(
            *_LCE_SHAPES[0],
            jnp.bfloat16,
            bias=True,
            reduction="mean",
            filter_eps="auto",
            logit_softcap=30.0,
            **_ALL_OPTIONS,
        )  # fmt: skip
    )
    cases.append(linear_cross_entropy_case(*_LCE_RAGGED, jnp.float32, layout="vd", bias=True))
    cases.append(
        linear_cross_entropy_case(
            *_LCE_RAGGED, jnp.float32, layout="vd", bias=True, reduction="sum", filter_eps=1e-6
        )
    )
    return cases


def doctor_cases() -> list[Case]:
    """One small ragged case per kernel (seconds per target), for ``jsoftmax doctor``."""
    return [
        softmax_case(37, 9000, jnp.bfloat16),
        softmax_case(37, 9000, jnp.float32, log=True),
        cross_entropy_case(37, 9000, jnp.bfloat16, **_ALL_OPTIONS),
        linear_cross_entropy_case(
            37,
            200,
            9000,
            jnp.bfloat16,
            layout="vd",
            bias=True,
            logit_softcap=30.0,
            **_ALL_OPTIONS,
        ),  # fmt: skip
    ]


# ------------------------------------------------------------------------ compiling


@dataclasses.dataclass(frozen=True)
class Result:
    """The outcome of compiling one :class:`Case` for one :class:`Target`.

    Byte counts are the target compiler's ``memory_analysis()``: ``temp`` is the scratch
    the program allocates besides its arguments and outputs; ``peak`` is
    ``argument + output + temp - alias``, which must fit the device's memory.
    """

    target: str
    case: str
    kernel: str
    ok: bool
    error: str | None = None
    temp: int = 0
    argument: int = 0
    output: int = 0
    alias: int = 0
    n_kernels: int = 0
    io: int = 0
    memory: int = 0

    @property
    def peak(self) -> int:
        return self.argument + self.output + self.temp - self.alias

    @property
    def too_big(self) -> bool:
        """The arguments and outputs alone fill the device memory: no program can fit."""
        return self.io >= self.memory

    @property
    def status(self) -> str:
        """``ok``; ``exceeds HBM`` (a shape the device cannot hold, refused by its
        compiler); ``FAIL`` otherwise (a kernel that does not compile, or does not fit)."""
        if self.too_big and not self.ok and "HBM" in (self.error or ""):
            return "exceeds HBM"
        if self.ok and not self.too_big and self.peak <= self.memory:
            return "ok"
        return "FAIL"


_KEY_PHRASES = (
    "Maximum allowed number of elements",
    "Shared memory size limit exceeded",
    "Scoped allocation with size",
    "Ran out of memory",
    "exceeds available HBM",
)


def first_line(e: BaseException) -> str:
    """``Type: first line`` of an error; a bare heading ("Verification failed:") gets the
    sentence that names the limit appended."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    head = lines[0] if lines else ""
    if head.endswith(":") and len(lines) > 1:
        rest = " ".join(lines[1:])
        detail = lines[1]
        for phrase in _KEY_PHRASES:
            i = rest.find(phrase)
            if i >= 0:
                detail = rest[i:].split(". ")[0]
                break
        head = f"{head} {detail}"
    return f"{type(e).__name__}: {head}"[:300]


def io_bytes(case: Case) -> int:
    """Bytes of the program's arguments and outputs: what no compiler can avoid."""
    args = [None if a is None else jax.ShapeDtypeStruct(*a) for a in case.args]
    outs = jax.eval_shape(case.fn, *args)
    leaves = [a for a in args if a is not None] + jax.tree.leaves(outs)
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves)


def compile_case(case: Case, target: Target) -> Any:
    """``jax.jit(case.fn).lower(...).compile()`` for ``target``; raises what it raises."""
    args = [None if a is None else abstract(target, *a) for a in case.args]
    return jax.jit(case.fn).lower(*args).compile()


def run_case(case: Case, target: Target) -> Result:
    """Compile ``case`` for ``target`` and record the compiler's memory numbers (or error)."""
    sizes = dict(io=io_bytes(case), memory=target.memory)
    try:
        compiled = compile_case(case, target)
    except Exception as e:  # noqa: BLE001 -- the result records the error
        return Result(target.name, case.name, case.kernel, False, first_line(e), **sizes)
    mem = compiled.memory_analysis()
    return Result(
        target.name,
        case.name,
        case.kernel,
        ok=True,
        **sizes,
        temp=int(mem.temp_size_in_bytes),
        argument=int(mem.argument_size_in_bytes),
        output=int(mem.output_size_in_bytes),
        alias=int(mem.alias_size_in_bytes),
        n_kernels=compiled.as_text().count(KERNEL_CALL[target.platform]),
    )


def compile_matrix(cases: Iterable[Case], targets: Iterable[Target] = TARGETS) -> list[Result]:
    """:func:`run_case` for every case x target whose compiler is installed."""
    cases = list(cases)
    results = []
    for target in targets:
        if missing(target.platform) is None:
            results.extend(run_case(case, target) for case in cases)
    return results


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f}" if n < 10 * 2**20 else f"{n / 2**20:,.0f}"


def markdown_table(results: Sequence[Result]) -> str:
    """Temp memory (MiB) per case (rows) and target (columns), ``FAIL`` for errors."""
    targets = list(dict.fromkeys(r.target for r in results))
    cases = list(dict.fromkeys(r.case for r in results))
    by = {(r.case, r.target): r for r in results}
    lines = [
        "| case | " + " | ".join(targets) + " |",
        "|---|" + "---:|" * len(targets),
    ]
    for case in cases:
        cells = []
        for t in targets:
            r = by.get((case, t))
            cells.append("-" if r is None else mib(r.temp) if r.ok else r.status)
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def status_table(results: Sequence[Result]) -> str:
    """Kernels (rows) x targets (columns): ``ok`` or ``FAIL``; errors listed below."""
    targets = list(dict.fromkeys(r.target for r in results))
    kernels = list(dict.fromkeys(r.kernel for r in results))
    cell: dict[tuple[str, str], str] = {}
    errors = []
    for r in results:
        key = (r.kernel, r.target)
        if r.status == "ok" and r.n_kernels > 0:
            cell.setdefault(key, "ok")
        elif r.status != "exceeds HBM":
            cell[key] = "FAIL"
            why = r.error or (
                "compiled without a Pallas kernel" if r.ok and not r.n_kernels
                else f"needs {r.peak / GIB:.1f} GiB of {r.memory / GIB:.0f} GiB"
            )  # fmt: skip
            errors.append(f"{r.case} on {r.target}: {why}")
    head = ["kernel", *targets]
    body = [[k, *(cell.get((k, t), "-") for t in targets)] for k in kernels]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    out = [fmt(head), "  ".join("-" * w for w in widths), *(fmt(b) for b in body)]
    if errors:
        out += ["", "errors:", *(f"  {e}" for e in errors)]
    return "\n".join(out)


# ------------------------------------------------------- refused block configurations


@dataclasses.dataclass(frozen=True)
class Refusal:
    """A block override the kernels refuse (``ValueError`` matching ``ours``) and that the
    real compiler of ``target`` rejects too (an error containing ``compiler``)."""

    target: str
    case: Case
    ours: str
    compiler: str


def refusal_cases() -> list[Refusal]:
    """One override per checked limit, on the most restrictive target it is checked for."""
    f32, bf16 = jnp.float32, jnp.bfloat16
    return [
        # 16 x 131072 = 2^21 elements in one Triton tensor.
        Refusal(
            "H100",
            softmax_case(64, 262144, f32, block_rows=16, block_cols=131072),
            "at most 1048576",
            "Maximum allowed number of elements is 1048576",
        ),
        # The block-sparse gradient matmuls (filtered, kernel-reduced loss):
        # (128*256 + 256*256) bf16 = 196608 bytes > 166912 (A100 opt-in).
        Refusal(
            "A100",
            linear_cross_entropy_case(
                512,
                1024,
                4096,
                bf16,
                reduction="mean",
                filter_eps="auto",
                block_rows=128,
                block_cols=256,
                block_d=256,
            ),
            "196608 bytes of shared memory",
            "Shared memory size limit exceeded: requested 196608, available: 166912",
        ),
        # (128, 8192) float32 in and out, double-buffered, + scratch = 16.12 MiB > 16 MiB.
        Refusal(
            "TPU v5e",
            softmax_case(1024, 65536, f32, block_rows=128, block_cols=8192),
            "scoped VMEM limit",
            "Scoped allocation with size 16.12M and limit 16.00M",
        ),
        # A (512, 8192) bf16 hidden block double-buffered is 16 MiB by itself.
        Refusal(
            "TPU v4",
            linear_cross_entropy_case(
                1024, 8192, 512, bf16, grad=False, block_rows=512, block_cols=128
            ),
            "scoped VMEM limit",
            "Ran out of memory in memory space vmem",
        ),
    ]


@contextlib.contextmanager
def unchecked(*styles: str) -> Iterator[None]:
    """Switch the kernels' limit checks off for ``styles`` (``"tpu"``, ``"gpu"``; default
    both), e.g. to show the compiler rejects the same blocks, or to isolate one backend's
    rule (on a CPU host both backends' kernels are traced and checked).

    Traces made inside are dropped on exit (``jax.clear_caches``): a cached unchecked
    trace must not outlive the context.
    """
    from . import _common

    styles = styles or ("tpu", "gpu")
    saved = _common.limits
    _common.limits = lambda style: None if style in styles else saved(style)
    try:
        yield
    finally:
        _common.limits = saved
        jax.clear_caches()

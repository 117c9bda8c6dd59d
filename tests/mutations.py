"""Deliberate defects at jsoftmax's public API, and whether the family's own tests catch them.

Each mutation wraps one public function (``jsoftmax.<name>``) with a defect a user could
not tell from the outside without a correct reference:

* ``loss+0.1``: the loss 0.1 nats too high on one route (``impl="xla"`` or ``"pallas"``)
  and one input dtype (the gradient unchanged);
* ``grad*1.1``: the gradient with respect to one differentiable argument 10 % too large
  (temperature included), the value unchanged (a ``custom_jvp`` identity that scales the
  tangent, so forward and reverse mode both see it);
* ``filter-drops-head``: with ``filter_eps`` set, the LM head's (``linear_weight``'s)
  gradient dropped, entirely or for the first (most frequent) vocabulary chunk only;
* ``stats*1.01``: one statistic of ``linear_softmax_stats`` (or of
  ``linear_cross_entropy(return_stats=True)``) 1 % off.

Usage::

    python tests/mutations.py               # every mutation, a table; exit 1 if one survives
    python tests/mutations.py --quick       # one of each kind (what CI runs)
    python tests/mutations.py --list
    python tests/mutations.py NAME ...      # these only
    python tests/mutations.py --baseline    # also run the same files unmutated (must pass)

Each mutation runs its family's test files (``-x``, default markers, one process) with
``JSOFTMAX_MUTATION=<name>`` set; ``tests/conftest.py`` then calls :func:`apply` before
any test module is imported, so ``jsm.<fn>`` (and every alias a test module takes of it)
is the mutated function. A mutation is *caught* when pytest reports a failing test
(exit status 1); a collection or usage error is reported as such, not as caught.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import inspect
import os
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = "JSOFTMAX_MUTATION"


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    fn: str  # public name in jsoftmax
    make: Callable[[Callable], Callable]  # original function -> mutated function
    files: tuple[str, ...]  # the family's test files (under tests/)
    quick: bool = False  # part of the CI selection


# ------------------------------------------------------------------ defect builders


def _route(kw) -> str:
    return "pallas" if kw.get("impl") == "pallas" else "xla"


def _dtype_name(x) -> str:
    import numpy as np

    return np.dtype(getattr(x, "dtype", np.float32)).name


def _first_arg(fn, args, kw):
    return inspect.signature(fn).bind(*args, **kw).args[0]


def loss_offset(route: str, dtype: str, delta: float = 0.1):
    """The loss ``delta`` nats too high when called on ``route`` with ``dtype`` input."""

    def make(fn):
        @functools.wraps(fn)
        def mutated(*args, **kw):
            out = fn(*args, **kw)
            if _route(kw) != route or _dtype_name(_first_arg(fn, args, kw)) != dtype:
                return out
            if isinstance(out, tuple):  # return_lse / return_stats: the loss comes first
                return (out[0] + delta, *out[1:])
            return out + delta

        return mutated

    return make


def _scale_tangent(factor):
    """An identity whose derivative is ``factor`` (an array broadcast against x, or a number)."""
    import jax

    @jax.custom_jvp
    def ident(x):
        return x

    @ident.defjvp
    def _jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return x, t * factor(x) if callable(factor) else t * factor

    return ident


def _is_traced_float(x) -> bool:
    import jax
    import jax.numpy as jnp

    return isinstance(x, jax.core.Tracer) and jnp.issubdtype(x.dtype, jnp.inexact)


def grad_scale(arg: str, factor=1.1, *, when: Callable[[dict], bool] | None = None):
    """The derivative with respect to ``arg`` multiplied by ``factor`` (value unchanged).

    Applied only to a traced floating argument (one being differentiated or jitted), so a
    call with concrete inputs takes exactly the original code path.
    """

    def make(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def mutated(*args, **kw):
            bound = sig.bind(*args, **kw)
            if when is not None and not when(bound.arguments):
                return fn(*args, **kw)
            x = bound.arguments.get(arg)
            if x is not None and _is_traced_float(x):
                bound.arguments[arg] = _scale_tangent(factor)(x)
            return fn(*bound.args, **bound.kwargs)

        return mutated

    return make


def _filtering(a) -> bool:
    eps = a.get("filter_eps")
    return eps is not None and eps != 0


def _head_chunk_mask(chunk=128):
    """1 everywhere but the first ``chunk`` vocabulary entries of a (D, V) / (V, D) weight."""
    import jax.numpy as jnp

    def mask_for(layout):
        def mask(w):
            axis = 1 if layout == "dv" else 0
            keep = jnp.arange(w.shape[axis]) >= chunk
            return (keep[None, :] if axis == 1 else keep[:, None]).astype(w.dtype)

        return mask

    return mask_for


def filter_drops_head(first_chunk_only: bool):
    """With ``filter_eps`` set, the ``linear_weight`` gradient dropped (or its first chunk)."""

    def make(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def mutated(*args, **kw):
            bound = sig.bind(*args, **kw)
            a = bound.arguments
            x = a.get("linear_weight")
            if _filtering(a) and _is_traced_float(x):
                layout = a.get("weight_layout", "dv")
                factor = _head_chunk_mask()(layout) if first_chunk_only else 0.0
                a["linear_weight"] = _scale_tangent(factor)(x)
            return fn(*bound.args, **bound.kwargs)

        return mutated

    return make


def stats_scale(field: str, factor=1.01):
    """One field of the returned ``SoftmaxStats`` scaled by ``factor``."""

    def make(fn):
        @functools.wraps(fn)
        def mutated(*args, **kw):
            out = fn(*args, **kw)
            if isinstance(out, tuple) and not hasattr(out, "_fields"):
                loss, *rest = out
                if rest and hasattr(rest[-1], "_fields"):
                    s = rest[-1]
                    return (loss, *rest[:-1], s._replace(**{field: getattr(s, field) * factor}))
                return out
            if hasattr(out, "_fields"):
                return out._replace(**{field: getattr(out, field) * factor})
            return out

        return mutated

    return make


# ------------------------------------------------------------------------ the list

SOFTMAX = ("test_softmax.py",)
LOSSES = ("test_losses.py",)
IMPL = ("test_impl.py",)
LV = ("test_large_vocab.py",)
STATS = ("test_linear_softmax_stats.py",)
FILTER = ("test_filter.py",)
DISTILL = ("test_distill.py",)
CALIB = ("test_calibration.py",)


def _pallas(a):
    return a.get("impl") == "pallas"


def _xla(a):
    return a.get("impl", "auto") != "pallas"


def _mutations() -> list[Mutation]:
    ms = []
    # A loss 0.1 nats off, per route and dtype.
    for fn, files in (("cross_entropy", LOSSES), ("linear_cross_entropy", LV)):
        for route in ("xla", "pallas"):
            for dtype in ("float32", "bfloat16"):
                ms.append(
                    Mutation(
                        f"loss+0.1:{fn}:{route}:{dtype}",
                        fn,
                        loss_offset(route, dtype),
                        IMPL if route == "pallas" else files,
                        quick=(fn, route, dtype) == ("cross_entropy", "pallas", "bfloat16"),
                    )
                )
    for fn in ("kl_divergence", "jsd", "linear_kl_divergence", "linear_jsd"):
        for dtype in ("float32", "bfloat16"):
            off = loss_offset("xla", dtype)
            ms.append(Mutation(f"loss+0.1:{fn}:xla:{dtype}", fn, off, DISTILL))
    for fn in ("nll_loss", "focal_loss", "binary_cross_entropy_with_logits"):
        ms.append(Mutation(f"loss+0.1:{fn}:xla:float32", fn, loss_offset("xla", "float32"), LOSSES))

    # A gradient 10 % off in one differentiable argument.
    grads = [
        ("softmax", "x", SOFTMAX, None),
        ("softmax", "temperature", SOFTMAX, None),
        ("softmax", "weight", SOFTMAX, None),
        ("log_softmax", "x", SOFTMAX, None),
        ("log_softmax", "temperature", SOFTMAX, None),
        ("logsumexp", "x", SOFTMAX, None),
        ("cross_entropy", "logits", LOSSES, _xla),
        ("cross_entropy", "logits", IMPL, _pallas),
        ("cross_entropy", "weight", LOSSES, None),
        ("cross_entropy", "sample_weight", LOSSES, _xla),
        ("cross_entropy", "sample_weight", IMPL, _pallas),
        ("nll_loss", "log_probs", LOSSES, None),
        ("focal_loss", "logits", LOSSES, None),
        ("binary_cross_entropy_with_logits", "logits", LOSSES, None),
        ("linear_cross_entropy", "hidden", LV, _xla),
        ("linear_cross_entropy", "linear_weight", LV, _xla),
        ("linear_cross_entropy", "linear_bias", LV, _xla),
        ("linear_cross_entropy", "hidden", IMPL, _pallas),
        ("linear_cross_entropy", "linear_weight", IMPL, _pallas),
        ("linear_cross_entropy", "linear_bias", IMPL, _pallas),
        ("linear_softmax_stats", "hidden", STATS, None),
        ("linear_softmax_stats", "linear_weight", STATS, None),
        ("linear_softmax_stats", "linear_bias", STATS, None),
        ("kl_divergence", "student_logits", DISTILL, None),
        ("kl_divergence", "teacher_logits", DISTILL, None),
        ("kl_divergence", "temperature", DISTILL, None),
        ("jsd", "student_logits", DISTILL, None),
        ("jsd", "temperature", DISTILL, None),
        ("linear_kl_divergence", "student_hidden", DISTILL, None),
        ("linear_kl_divergence", "student_weight", DISTILL, None),
        ("linear_kl_divergence", "student_bias", DISTILL, None),
        ("linear_jsd", "student_hidden", DISTILL, None),
        ("linear_jsd", "student_weight", DISTILL, None),
        ("energy_score", "logits", CALIB, None),
        ("energy_score", "temperature", CALIB, None),
        ("max_softmax_probability", "temperature", CALIB, None),
    ]
    for fn, arg, files, when in grads:
        route = ":pallas" if when is _pallas else ""
        quick = (fn, arg) in {("kl_divergence", "temperature"), ("linear_cross_entropy", "hidden")}
        quick = quick and not route
        ms.append(Mutation(f"grad*1.1:{fn}:{arg}{route}", fn, grad_scale(arg, when=when), files,
                           quick=quick))  # fmt: skip

    # Gradient filtering that drops the head's weight gradient.
    for fn, files in (("linear_cross_entropy", FILTER), ("linear_softmax_stats", FILTER)):
        for first, tag in ((False, "all"), (True, "first-chunk")):
            ms.append(
                Mutation(
                    f"filter-drops-head:{fn}:{tag}",
                    fn,
                    filter_drops_head(first),
                    files,
                    quick=(fn, first) == ("linear_cross_entropy", True),
                )
            )

    # Statistics 1 % off.
    for field in ("lse", "entropy", "label_logprob", "topk_logprobs"):
        ms.append(Mutation(f"stats*1.01:linear_softmax_stats:{field}", "linear_softmax_stats",
                           stats_scale(field), STATS, quick=field == "entropy"))  # fmt: skip
        ms.append(Mutation(f"stats*1.01:linear_cross_entropy:{field}", "linear_cross_entropy",
                           stats_scale(field), STATS))  # fmt: skip
    return ms


MUTATIONS = {m.name: m for m in _mutations()}


def apply(name: str) -> None:
    """Replace ``jsoftmax.<fn>`` by its mutated version (called by tests/conftest.py)."""
    import jsoftmax

    try:
        m = MUTATIONS[name]
    except KeyError:
        raise SystemExit(
            f"{ENV}={name!r}: no such mutation (python tests/mutations.py --list)"
        ) from None
    setattr(jsoftmax, m.fn, m.make(getattr(jsoftmax, m.fn)))


# -------------------------------------------------------------------------- runner


def run_one(name: str | None, files, timeout: float) -> tuple[str, float, str]:
    """(outcome, seconds, first failing test) of one pytest run."""
    env = dict(os.environ)
    env.pop("PYTEST_ADDOPTS", None)  # the runner picks the markers and workers itself
    if name is not None:
        env[ENV] = name
    else:
        env.pop(ENV, None)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:xdist",
           "-p", "no:cacheprovider", *(f"tests/{f}" for f in files)]  # fmt: skip
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0, ""
    dt = time.perf_counter() - t0
    failed = re.findall(r"^FAILED (\S+)", proc.stdout, re.M)
    first = failed[0].split("::", 1)[-1] if failed else ""
    if proc.returncode == 1 and failed:
        return "failed", dt, first
    if proc.returncode == 0:
        return "passed", dt, ""
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return f"error (exit {proc.returncode})", dt, tail[0][:80]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="mutations to run (default: all)")
    p.add_argument("--quick", action="store_true", help="one of each kind (the CI selection)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--baseline", action="store_true", help="also run the files unmutated")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
    p.add_argument("-j", "--jobs", type=int, default=1, help="pytest runs at once")
    args = p.parse_args(argv)
    if args.list:
        for m in MUTATIONS.values():
            print(f"{m.name:55s} {' '.join(m.files)}{'  [quick]' if m.quick else ''}")
        return 0
    unknown = [n for n in args.names if n not in MUTATIONS]
    if unknown:
        p.error(f"unknown mutations: {unknown}")
    chosen = [MUTATIONS[n] for n in args.names] or [
        m for m in MUTATIONS.values() if m.quick or not args.quick
    ]
    bad = missed = 0
    if args.baseline:
        files = sorted({f for m in chosen for f in m.files})
        outcome, dt, first = run_one(None, files, args.timeout * 2)
        print(f"baseline (unmutated) {' '.join(files)}: {outcome} in {dt:.0f} s {first}")
        bad += outcome != "passed"
    print(f"{'mutation':55s} {'result':12s} {'time':>6s}  caught by")
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        runs = [pool.submit(run_one, m.name, m.files, args.timeout) for m in chosen]
        for m, run in zip(chosen, runs, strict=True):
            outcome, dt, first = run.result()
            caught = outcome == "failed"
            missed += not caught
            verdict = "caught" if caught else f"NOT CAUGHT ({outcome})"
            print(f"{m.name:55s} {verdict:12s} {dt:5.0f}s  {first}", flush=True)
    print(f"{len(chosen) - missed} of {len(chosen)} mutations caught")
    return 1 if bad or missed else 0


if __name__ == "__main__":
    sys.exit(main())

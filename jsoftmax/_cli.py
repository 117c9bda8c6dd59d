"""The ``jsoftmax`` command line: ``demo``, ``bench`` and ``doctor``.

Each subcommand lives in its own module, imported only when that subcommand runs, so
that ``jsoftmax --help`` stays instant and the demo's optional dependencies
(scikit-learn, tqdm) are needed only by the demo.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Import name -> distribution name of the demo's optional dependencies.
_EXTRAS = {"sklearn": "scikit-learn", "tqdm": "tqdm"}
_MISSING_EXTRA = (
    "`jsoftmax {cmd}` needs the optional dependency {mod!r}; install it with "
    '`pip install "jsoftmax[demo]"`.'
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and documentation)."""
    from jsoftmax import __version__

    parser = argparse.ArgumentParser(
        prog="jsoftmax",
        description="Stable softmax and cross-entropy for JAX: demo, benchmark and self-check.",
    )
    parser.add_argument("--version", action="version", version=f"jsoftmax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench,doctor}")

    from jsoftmax._demo import DEFAULTS

    demo = sub.add_parser(
        "demo",
        help="train a small classifier on long-tailed digits with plain, weighted, focal and "
        "logit-adjusted losses; print accuracy, worst-class recall and ECE",
        description="Train one MLP per loss on scikit-learn's digits made long-tailed "
        "(exponential profile, balanced validation/test splits) and print a table.",
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=DEFAULTS["seed"],
        help="data split, initialisation and shuffling seed (default: %(default)s)",
    )
    demo.add_argument(
        "--epochs",
        type=int,
        default=DEFAULTS["epochs"],
        help="training epochs per loss (default: %(default)s)",
    )
    demo.add_argument(
        "--imbalance",
        type=float,
        default=DEFAULTS["imbalance"],
        help="head-to-tail class ratio of the training split (default: %(default)s)",
    )
    demo.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Hidden knobs for fast tests and experiments.
    demo.add_argument("--n-max", type=int, default=DEFAULTS["n_max"], help=argparse.SUPPRESS)
    demo.add_argument("--hidden", type=int, default=DEFAULTS["hidden"], help=argparse.SUPPRESS)

    bench = sub.add_parser(
        "bench",
        help="measure the performance table now: time ratios against jax.nn/optax and compiled "
        "temporary memory",
        description="Time (interleaved, median of per-pair ratios) and compiled temporary "
        "memory of jsoftmax against jax.nn / optax baselines.",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="smaller shapes and fewer pairs (under a minute); labelled as such",
    )
    bench.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="interleaved timing pairs per row (default: 7, quick: 5)",
    )
    bench.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.add_argument(
        "--sharding",
        action="store_true",
        help="instead: the per-layout table of the fused loss under jax.jit + NamedSharding "
        "(data-parallel, FSDP, vocabulary-parallel, 2-D) on 8 simulated CPU devices, per-device "
        "temporary memory against the naive path; with --pairs, time ratios too",
    )
    bench.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)

    doctor = sub.add_parser(
        "doctor",
        help="JAX version, backend and devices; whether kernels run compiled or interpreted; "
        "Pallas lowering check for cuda and tpu; compile matrix with the [aot] extra",
        description="Report the environment, check that the Pallas kernels lower for "
        "cuda and tpu from this machine, and (with the [aot] extra) compile them with the "
        "real compilers for H100, A100 and TPU v4/v5e/v5p/v6e.",
    )
    doctor.add_argument(
        "--no-lowering", action="store_true", help="skip the (slower) lowering check"
    )
    doctor.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the compile matrix (real GPU/TPU compilers; needs the [aot] extra)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = {"demo": "jsoftmax._demo", "bench": "jsoftmax._bench", "doctor": "jsoftmax._doctor"}
    try:
        return int(importlib.import_module(module[args.command]).main(args) or 0)
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top in _EXTRAS:
            print(_MISSING_EXTRA.format(cmd=args.command, mod=_EXTRAS[top]), file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())

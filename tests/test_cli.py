"""The ``jsoftmax`` command line: ``--help``, ``demo``, ``bench`` and ``doctor``.

End-to-end checks of ``bench`` and ``doctor`` run ``python -m jsoftmax ...`` in a
subprocess (as a user would, one CPU device), and the installed console script's
``--help`` once; ``--help`` and the tiny ``demo`` run in-process through ``_cli.main``
(argument parsing to results, without a second interpreter's start-up and compiles). The
table/formatting helpers are tested with hand-made inputs so that their exact output is
pinned.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jsoftmax import _bench, _bench_sharding, _cli, _demo, _doctor

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Hidden demo knobs that keep a run to a few seconds: 1 epoch of a 16-unit MLP.
TINY_DEMO = ["demo", "--epochs", "1", "--hidden", "16", "--no-progress"]


def _env():
    env = dict(os.environ)
    # conftest simulates 8 CPU devices for the sharding tests; the CLI runs as users run it.
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    )
    env["JAX_PLATFORMS"] = "cpu"
    return env


def run_cli(*args, check=True, timeout=300):
    proc = subprocess.run(
        [sys.executable, "-m", "jsoftmax", *args],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"jsoftmax {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


# ------------------------------------------------------------------------ --help


def help_of(argv, capsys):
    """``jsoftmax <argv>`` in-process: (exit status, stdout); argparse exits on --help."""
    try:
        status = _cli.main(argv)
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().out


def test_help_lists_subcommands_and_hides_test_knobs(capsys):
    status, out = help_of(["--help"], capsys)
    assert status == 0 and "usage: jsoftmax" in out
    for cmd in ("demo", "bench", "doctor"):
        assert cmd in out
    # No subcommand: the help, and the usage-error status.
    status, out = help_of([], capsys)
    assert status == 2 and "usage: jsoftmax" in out
    status, out = help_of(["demo", "--help"], capsys)
    assert status == 0
    assert "--seed" in out and "--epochs" in out
    assert "--hidden" not in out and "--n-max" not in out


def test_console_script_installed():
    # `pip install` (the README's install step) puts the entry point beside the interpreter;
    # the one subprocess --help check: the installed script as a user runs it.
    script = pathlib.Path(sys.executable).parent / "jsoftmax"
    assert script.exists(), f"no console script at {script}: is jsoftmax pip-installed?"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=_env())
    assert proc.returncode == 0 and "doctor" in proc.stdout


def test_missing_extra_is_a_clear_message(monkeypatch, capsys):
    # `sys.modules[name] = None` makes `import name` raise ModuleNotFoundError.
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert _cli.main(TINY_DEMO) == 1
    err = capsys.readouterr().err
    assert "scikit-learn" in err or "sklearn" in err
    assert 'pip install "jsoftmax[demo]"' in err


# -------------------------------------------------------------------------- demo


def test_long_tailed_counts():
    np.testing.assert_array_equal(
        _demo.long_tailed_counts(100, 100.0), [100, 60, 36, 22, 13, 8, 5, 3, 2, 1]
    )
    np.testing.assert_array_equal(_demo.long_tailed_counts(10, 1.0), [10] * 10)
    with pytest.raises(ValueError, match="imbalance"):
        _demo.long_tailed_counts(10, 0.5)


def test_long_tailed_digits_splits():
    data = _demo.load_long_tailed_digits(seed=3)
    np.testing.assert_array_equal(data.counts, _demo.long_tailed_counts(100, 100.0))
    np.testing.assert_array_equal(np.bincount(data.y_test), [40] * 10)
    np.testing.assert_array_equal(np.bincount(data.y_val), [10] * 10)
    np.testing.assert_allclose(data.priors.sum(), 1.0, rtol=1e-6)
    assert data.x_train.shape == (250, 64) and data.x_train.dtype == np.float32
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    # Splits are disjoint: no test image is also a training image.
    train = {row.tobytes() for row in data.x_train}
    assert not any(row.tobytes() in train for row in data.x_test[data.y_test == 0])
    with pytest.raises(ValueError, match="n_max"):
        _demo.load_long_tailed_digits(n_max=500)


def test_format_table():
    row = {
        "method": "plain",
        "accuracy": 0.8,
        "balanced_accuracy": 0.79,
        "worst_recall": 0.025,
        "worst_class": 9,
        "ece": 0.1234,
        "ece_scaled": 0.05,
        "temperature": 1.5,
    }
    table = _demo.format_table([row])
    lines = table.splitlines()
    assert lines[0].split() == [
        "method",
        "acc",
        "bal.acc",
        "worst",
        "rec.",
        "ECE",
        "ECE",
        "(T)",
        "T",
    ]
    assert lines[2].split() == ["plain", "0.800", "0.790", "0.025", "(9)", "0.123", "0.050", "1.50"]


def test_demo_tiny_is_deterministic(tmp_path, capsys):
    # In-process, twice (the second run reuses the compilations): same table, same JSON.
    j1, j2 = tmp_path / "a.json", tmp_path / "b.json"
    outs = []
    for j in (j1, j2):
        assert _cli.main([*TINY_DEMO, "--seed", "1", "--json", str(j)]) == 0
        out = capsys.readouterr().out
        outs.append("\n".join(ln for ln in out.splitlines() if not ln.startswith("finished in")))
    out1, out2 = outs
    assert out1 == out2
    assert "worst rec." in out1 and "seed 1" in out1
    r1, r2 = json.loads(j1.read_text()), json.loads(j2.read_text())
    assert r1["rows"] == r2["rows"]
    names = [r["method"] for r in r1["rows"]]
    assert names[0] == "cross-entropy" and len(names) == 6
    assert any("class-weighted" in n for n in names)
    assert any("focal" in n for n in names)
    assert sum("logit" in n for n in names) == 2
    for r in r1["rows"]:
        for key in ("accuracy", "balanced_accuracy", "worst_recall", "ece", "ece_scaled"):
            assert 0.0 <= r[key] <= 1.0, (r["method"], key, r[key])
        assert r["temperature"] > 0
        assert r["worst_recall"] <= r["balanced_accuracy"]
    assert r1["train_counts"] == [100, 60, 36, 22, 13, 8, 5, 3, 2, 1]


# ------------------------------------------------------------------------- bench


def test_bench_tiny_json(tmp_path):
    path = tmp_path / "bench.json"
    proc = run_cli("bench", "--tiny", "--no-progress", "--json", str(path))
    assert "tiny mode" in proc.stdout
    result = json.loads(path.read_text())
    assert result["mode"] == "tiny" and result["pairs"] == 3
    rows = result["rows"]
    assert [r["name"].split()[0] for r in rows] == [
        "softmax",
        "log_softmax",
        "cross_entropy",
        "linear_cross_entropy",
        "linear_cross_entropy",
        "linear_softmax_stats",
        "linear_cross_entropy",  # filter_eps on an LM-like head, against the naive path
        "linear_cross_entropy",  # filter_eps on random logits, against filter_eps=None
        "linear_kl_divergence",
        "linear_jsd",
        "grpo_loss",  # a GRPO step on linear_token_logprobs, against materialised logits
    ]
    assert "LM-like" in rows[6]["shape"] and "random" in rows[7]["shape"]
    for r in rows:
        assert r["available"], f"{r['name']} is not available"
        assert r["cand_temp"] >= 0 and r["base_temp"] >= 0
    for r in rows[:4] + rows[5:]:
        assert r["time_ratio"] > 0 and r["cand_ms"] > 0 and r["base_ms"] > 0
    big = rows[4]
    assert big["time_ratio"] is None and big["note"] == "compiled, not run"
    # Even at the tiny shape the chunked loss keeps far less scratch than the naive one,
    # which holds the (N, V) logits and their gradient.
    assert big["cand_temp"] < big["base_temp"] / 2
    assert "| what |" in proc.stdout


def test_interleaved_ratios_alternate_and_count():
    calls = []

    def fake(tag):
        def f(*args):
            calls.append(tag)
            return np.zeros(())

        return f

    ticks = []
    ratios, ta, tb = _bench.interleaved_ratios(fake("a"), fake("b"), (), 4, lambda: ticks.append(1))
    assert len(ratios) == len(ta) == len(tb) == 4 and len(ticks) == 4
    # 2 warm-up pairs, then A B, B A, A B, B A.
    assert calls == ["a", "b", "a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]


def test_bench_sharding_tiny():
    """``bench --sharding``: the per-layout table, from a fresh 8-device interpreter."""
    proc = run_cli("bench", "--sharding", "--tiny")
    out = proc.stdout
    assert "8 simulated cpu devices" in out and "N=256 D=64 V=2048" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "MiB" in line]
    assert [r.split(" | ")[0][2:] for r in rows] == [name for name, *_ in _bench_sharding.LAYOUTS]
    vocab_sharded = {
        name
        for name, _, head, layout in _bench_sharding.LAYOUTS
        if head[1 if layout == "dv" else 0] is not None
    }
    for r in rows:
        cells = r.split(" | ")
        explicit, auto, _ = (float(x) for x in cells[6].rstrip(" |").split(", "))
        # Explicit mode never gathers more than a chunk of the head; auto mode keeps a
        # vocabulary-sharded head sharded (with `axis_name`).
        assert explicit <= 0.25, r
        if cells[0][2:] in vocab_sharded:
            assert auto <= 0.25, r


def test_largest_all_gather_reads_the_compiled_hlo():
    hlo = (
        "%ag = f32[64,512]{1,0} all-gather(f32[64,128]{1,0} %p), dimensions={1}\n"
        "%ag.1 = bf16[8,16]{1,0} all-gather(bf16[4,16]{1,0} %q), dimensions={0}\n"
    )
    assert _bench_sharding.largest_all_gather(hlo, 64 * 1024) == 0.5
    assert _bench_sharding.largest_all_gather("%x = f32[4] add(%a, %b)", 16) == 0


def test_bench_table_marks_unavailable_rows():
    sizes = _bench.TINY
    row = _bench.Row("f", "(1, 2)", "g", "time <= 1x", available=False)
    table = _bench.format_table([row], sizes)
    assert "| f | (1, 2) | g | n/a |" in table


# ------------------------------------------------------------------------ doctor


def test_lowering_table_formats_failures():
    report = [
        {"kernel": "softmax", "direction": "fwd", "platform": "cuda", "ok": True, "error": None},
        {
            "kernel": "softmax",
            "direction": "fwd",
            "platform": "tpu",
            "ok": False,
            "error": "boom\nsecond line",
        },
    ]
    table = _doctor.lowering_table(report)
    lines = table.splitlines()
    assert lines[0].split() == ["kernel", "direction", "cuda", "tpu"]
    assert lines[2].split() == ["softmax", "fwd", "ok", "FAIL"]
    assert "softmax fwd on tpu: boom" in table and "second line" not in table


def test_kernel_mode():
    assert _doctor.kernel_mode("cpu").startswith("interpreted")
    assert _doctor.kernel_mode("tpu") == "compiled (Mosaic TPU)"
    assert _doctor.kernel_mode("gpu") == "compiled (Triton)"


def test_doctor():
    # The compile matrix part (real compilers, needs the [aot] extra) is tested under the
    # `aot` marker (tests/test_aot.py); here the rest of the report.
    proc = run_cli("doctor", "--no-compile")
    out = proc.stdout
    assert "jax / jaxlib" in out and "backend" in out and "cpu" in out
    assert "interpreted" in out
    assert "Pallas lowering check (lowered from this machine, not run):" in out
    header = next(line for line in out.splitlines() if line.startswith("kernel "))
    assert header.split() == ["kernel", "direction", "cuda", "tpu"]
    assert "FAIL" not in out
    assert " lowerings ok in " in out


def test_doctor_says_how_to_get_the_compile_matrix(monkeypatch, capsys):
    from jsoftmax.kernels import _aot

    monkeypatch.setattr(_aot, "missing", lambda platform=None: "libtpu not installed; hint")
    assert _doctor.compile_matrix() is True
    out = capsys.readouterr().out
    assert "Compile matrix (real GPU/TPU compilers): not available: libtpu not installed" in out

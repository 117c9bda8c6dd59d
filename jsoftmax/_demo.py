"""``jsoftmax demo``: long-tailed classification with plain, weighted and adjusted losses.

The data set is scikit-learn's handwritten digits (1797 8x8 images, 10 classes, shipped
inside scikit-learn, so nothing is downloaded). The training split is made long-tailed
with an exponential profile: class ``c`` keeps ``n_max · ρ^(-c/9)`` images (``ρ = 100`` by
default: 100 images of "0" down to a single "9"). The validation split (used only to fit
the temperature) and the test split are balanced, so the test numbers measure how well
every class is recognised, not how well the head classes are.

One small MLP (64 → 128 → 10) is trained with optax (AdamW) for each loss below; all
models share the initialisation and the minibatch order, and are trained side by side in
one jitted ``lax.scan`` per epoch:

* plain cross-entropy (``jsm.cross_entropy``);
* class-weighted cross-entropy with inverse-frequency weights (``jsm.class_weights``);
* focal loss, ``γ = 2``, without and with ``α`` = the same class weights
  (``jsm.focal_loss``, Lin et al. 2017);
* the logit-adjusted loss (Menon et al. 2021): cross-entropy on
  ``jsm.logit_adjust(z, π, tau=1)``, prediction with the raw logits ``z``;
* post-hoc logit adjustment (Menon et al. 2021): the plain cross-entropy model, with the
  prediction made on ``z - log π`` (``jsm.logit_adjust(z, π, tau=-1)``) — no retraining.

The table reports accuracy, balanced accuracy (mean per-class recall; on the balanced
test split it equals accuracy, the last digit can differ by rounding), the worst per-class
recall, and the expected calibration error before and after temperature scaling
(``jsm.fit_temperature`` on the validation split, ``jsm.expected_calibration_error`` on
the test split). Everything is deterministic given ``--seed``.

The helpers (:func:`load_long_tailed_digits`, :func:`train_classifiers`,
:func:`evaluate`, ...) are reused by ``examples/02_imbalanced_classification.ipynb``
and ``examples/04_calibration_open_set.ipynb``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jsoftmax as jsm

N_CLASSES = 10

# Defaults of `jsoftmax demo`, chosen once (seed 0) and documented in the README; the
# imbalance ratio and split sizes follow the long-tailed CIFAR protocol (Cui et al. 2019)
# scaled down to what the 1797 digits allow.
DEFAULTS = dict(
    seed=0,
    imbalance=100.0,
    n_max=100,
    n_val_per_class=10,
    n_test_per_class=40,
    epochs=40,
    batch_size=32,
    learning_rate=3e-3,
    weight_decay=1e-4,
    hidden=128,
    gamma=2.0,
    tau=1.0,
)

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
Params = list[dict[str, jax.Array]]


# ---------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class LongTailedDigits:
    """Long-tailed training split plus balanced validation and test splits (numpy arrays).

    Features are pixel intensities scaled to ``[0, 1]`` (float32, shape ``(n, 64)``);
    labels are int32 in ``[0, 10)``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def counts(self) -> np.ndarray:
        """Training images per class."""
        return np.bincount(self.y_train, minlength=N_CLASSES)

    @property
    def priors(self) -> np.ndarray:
        """Training class frequencies ``π_c`` (float32, sums to 1)."""
        c = self.counts
        return (c / c.sum()).astype(np.float32)


def long_tailed_counts(n_max: int, imbalance: float, n_classes: int = N_CLASSES) -> np.ndarray:
    """Per-class counts ``round(n_max · imbalance^(-c/(C-1)))``, at least 1 each.

    Args:
      n_max: images of the most frequent class (class 0).
      imbalance: ratio between the most and the least frequent class (``>= 1``).
      n_classes: number of classes ``C``.

    Returns:
      int array ``(C,)``, non-increasing.

    Examples:
      >>> long_tailed_counts(100, 100.0).tolist()
      [100, 60, 36, 22, 13, 8, 5, 3, 2, 1]
    """
    if imbalance < 1:
        raise ValueError(f"`imbalance` must be >= 1, got {imbalance}.")
    c = np.arange(n_classes)
    return np.maximum(np.round(n_max * imbalance ** (-c / (n_classes - 1))), 1).astype(int)


def load_long_tailed_digits(
    *,
    seed: int = 0,
    imbalance: float = DEFAULTS["imbalance"],
    n_max: int = DEFAULTS["n_max"],
    n_val_per_class: int = DEFAULTS["n_val_per_class"],
    n_test_per_class: int = DEFAULTS["n_test_per_class"],
) -> LongTailedDigits:
    """scikit-learn's digits, split into long-tailed train and balanced val/test.

    For each class the images are shuffled with ``seed``; the first
    ``n_test_per_class`` go to test, the next ``n_val_per_class`` to validation and the
    next ``long_tailed_counts(n_max, imbalance)[c]`` to training (the rest is unused).

    Args:
      seed: shuffling seed.
      imbalance: head-to-tail ratio of the training split.
      n_max: training images of class 0.
      n_val_per_class: validation images per class.
      n_test_per_class: test images per class.

    Returns:
      a :class:`LongTailedDigits`.
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int32)
    counts = long_tailed_counts(n_max, imbalance)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in range(N_CLASSES):
        idx = rng.permutation(np.flatnonzero(y == c))
        need = n_test_per_class + n_val_per_class + counts[c]
        if need > idx.size:
            raise ValueError(
                f"class {c} has {idx.size} images, the splits ask for {need}; lower `n_max` "
                "or the per-class validation/test sizes."
            )
        parts["test"].append(idx[:n_test_per_class])
        parts["val"].append(idx[n_test_per_class : n_test_per_class + n_val_per_class])
        parts["train"].append(idx[n_test_per_class + n_val_per_class : need])
    sel = {k: np.concatenate(v) for k, v in parts.items()}
    return LongTailedDigits(
        x_train=x[sel["train"]],
        y_train=y[sel["train"]],
        x_val=x[sel["val"]],
        y_val=y[sel["val"]],
        x_test=x[sel["test"]],
        y_test=y[sel["test"]],
    )


# --------------------------------------------------------------------------- model


def init_mlp(key: jax.Array, sizes: Sequence[int]) -> Params:
    """He-initialised MLP parameters for layer widths ``sizes`` (input first)."""
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        key, sub = jax.random.split(key)
        w = jax.random.normal(sub, (fan_in, fan_out), jnp.float32) * np.sqrt(2.0 / fan_in)
        params.append({"w": w, "b": jnp.zeros((fan_out,), jnp.float32)})
    return params


def mlp_logits(params: Params, x: jax.Array) -> jax.Array:
    """ReLU MLP; the last layer is linear and returns the logits."""
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def train_classifiers(
    x: np.ndarray,
    y: np.ndarray,
    loss_fns: Sequence[LossFn],
    *,
    seed: int = 0,
    epochs: int = DEFAULTS["epochs"],
    batch_size: int = DEFAULTS["batch_size"],
    learning_rate: float = DEFAULTS["learning_rate"],
    weight_decay: float = DEFAULTS["weight_decay"],
    hidden: int = DEFAULTS["hidden"],
    n_classes: int | None = None,
    on_epoch: Callable[[int, np.ndarray], None] | None = None,
) -> list[Params]:
    """Train one MLP ``(features → hidden → classes)`` per loss, with AdamW.

    All models start from the same initialisation and see the same minibatches (same
    ``seed``), so the losses are compared on equal footing. They are trained side by
    side: one ``jax.vmap`` over the models of a ``lax.switch`` over the losses, inside
    one jitted ``lax.scan`` over the minibatches of an epoch — a single compilation for
    all losses. Each epoch reshuffles the data and drops the last incomplete minibatch.

    Args:
      x: features ``(n, d)``.
      y: integer labels ``(n,)``.
      loss_fns: each ``(logits (b, C), labels (b,)) -> scalar``, minimised per minibatch.
      seed: initialisation and shuffling seed.
      epochs: passes over the data.
      batch_size: minibatch size (clipped to ``n``).
      learning_rate: AdamW learning rate.
      weight_decay: AdamW decoupled weight decay.
      hidden: width of the hidden layer.
      n_classes: output width; defaults to ``max(y) + 1``.
      on_epoch: called after each epoch with ``(epoch, mean minibatch loss per model)``.

    Returns:
      the trained parameters of each model, in the order of ``loss_fns`` (use with
      :func:`mlp_logits`).
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.int32)
    n = x.shape[0]
    n_models = len(loss_fns)
    n_classes = int(np.max(np.asarray(y))) + 1 if n_classes is None else n_classes
    batch_size = min(batch_size, n)
    n_batches = n // batch_size
    key = jax.random.PRNGKey(seed)
    key, init_key = jax.random.split(key)
    params0 = init_mlp(init_key, (x.shape[1], hidden, n_classes))
    params = jax.tree.map(lambda a: jnp.stack([a] * n_models), params0)
    opt = optax.adamw(learning_rate, weight_decay=weight_decay)
    opt_state = jax.vmap(opt.init)(params)
    branches = [(lambda p, xb, yb, f=f: f(mlp_logits(p, xb), yb)) for f in loss_fns]

    def model_step(params, opt_state, which, xb, yb):
        objective = lambda p: jax.lax.switch(which, branches, p, xb, yb)
        loss, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    all_steps = jax.vmap(model_step, in_axes=(0, 0, 0, None, None))
    which = jnp.arange(n_models)

    @jax.jit
    def epoch(params, opt_state, key):
        order = jax.random.permutation(key, n)[: n_batches * batch_size]

        def step(carry, idx):
            params, opt_state, loss = all_steps(*carry, which, x[idx], y[idx])
            return (params, opt_state), loss

        (params, opt_state), losses = jax.lax.scan(
            step, (params, opt_state), order.reshape(n_batches, batch_size)
        )
        return params, opt_state, losses.mean(axis=0)

    for e in range(epochs):
        key, sub = jax.random.split(key)
        params, opt_state, loss = epoch(params, opt_state, sub)
        if on_epoch is not None:
            on_epoch(e, np.asarray(loss))
    return [jax.tree.map(lambda a, i=i: a[i], params) for i in range(n_models)]


def train_classifier(x: np.ndarray, y: np.ndarray, loss_fn: LossFn, **kwargs: Any) -> Params:
    """Train one MLP on ``loss_fn``; keyword arguments as :func:`train_classifiers`."""
    on_epoch = kwargs.pop("on_epoch", None)
    if on_epoch is not None:
        kwargs["on_epoch"] = lambda e, losses: on_epoch(e, float(losses[0]))
    return train_classifiers(x, y, [loss_fn], **kwargs)[0]


# ---------------------------------------------------------------------- evaluation


def per_class_recall(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Recall of each class (NaN for a class absent from ``labels``)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    out = np.full(n_classes, np.nan)
    for c in range(n_classes):
        m = labels == c
        if m.any():
            out[c] = np.mean(pred[m] == c)
    return out


def evaluate(
    val_logits: jax.Array, y_val: np.ndarray, test_logits: jax.Array, y_test: np.ndarray
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, worst-class recall and ECE before/after scaling.

    The temperature is fitted on the validation logits (``jsm.fit_temperature``) and
    applied to the test logits; both ECEs are measured on the test split.

    Returns:
      dict with ``accuracy``, ``balanced_accuracy``, ``worst_recall``, ``worst_class``,
      ``recall`` (per class), ``ece``, ``ece_scaled``, ``temperature``.
    """
    test_logits = jnp.asarray(test_logits)
    y_test = np.asarray(y_test)
    pred = np.asarray(jnp.argmax(test_logits, axis=-1))
    recall = per_class_recall(pred, y_test, test_logits.shape[-1])
    t = jsm.fit_temperature(jnp.asarray(val_logits), jnp.asarray(y_val))
    return {
        "accuracy": float(np.mean(pred == y_test)),
        "balanced_accuracy": float(np.nanmean(recall)),
        "worst_recall": float(np.nanmin(recall)),
        "worst_class": int(np.nanargmin(recall)),
        "recall": recall.tolist(),
        "ece": float(jsm.expected_calibration_error(test_logits, y_test)),
        "ece_scaled": float(jsm.expected_calibration_error(test_logits / t, y_test)),
        "temperature": float(t),
    }


# ------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the demo: a training loss and how logits are turned into predictions.

    ``short`` labels the method in the progress bar; ``trained_as`` names another
    method whose model is reused (no training of its own); ``adjust`` maps a model's
    logits to the logits used for prediction.
    """

    name: str
    short: str
    loss: LossFn | None = None
    trained_as: str | None = None
    adjust: Callable[[jax.Array], jax.Array] | None = None


def make_methods(
    counts: np.ndarray, *, gamma: float = DEFAULTS["gamma"], tau: float = DEFAULTS["tau"]
) -> list[Method]:
    """The demo's methods for training class counts ``counts``.

    Args:
      counts: training images per class.
      gamma: focal-loss focusing parameter.
      tau: logit-adjustment strength (Menon et al. use ``τ = 1``).

    Returns:
      list of :class:`Method`, plain cross-entropy first.
    """
    counts = jnp.asarray(counts, jnp.float32)
    priors = counts / jnp.sum(counts)
    weights = jsm.class_weights(counts, method="inverse")
    return [
        Method("cross-entropy", "ce", loss=lambda z, y: jsm.cross_entropy(z, y)),
        Method(
            "class-weighted CE",
            "wce",
            loss=lambda z, y: jsm.cross_entropy(z, y, weight=weights),
        ),
        Method(f"focal g={gamma:g}", "focal", loss=lambda z, y: jsm.focal_loss(z, y, gamma=gamma)),
        Method(
            f"focal g={gamma:g} + alpha",
            "focal+a",
            loss=lambda z, y: jsm.focal_loss(z, y, gamma=gamma, alpha=weights),
        ),
        Method(
            f"logit-adjusted loss t={tau:g}",
            "la-loss",
            loss=lambda z, y: jsm.cross_entropy(jsm.logit_adjust(z, priors, tau=tau), y),
        ),
        Method(
            f"post-hoc logit adj. t={tau:g}",
            "la-posthoc",
            trained_as="cross-entropy",
            adjust=lambda z: jsm.logit_adjust(z, priors, tau=-tau),
        ),
    ]


def run_demo(
    *,
    seed: int = DEFAULTS["seed"],
    epochs: int = DEFAULTS["epochs"],
    imbalance: float = DEFAULTS["imbalance"],
    n_max: int = DEFAULTS["n_max"],
    batch_size: int = DEFAULTS["batch_size"],
    learning_rate: float = DEFAULTS["learning_rate"],
    weight_decay: float = DEFAULTS["weight_decay"],
    hidden: int = DEFAULTS["hidden"],
    gamma: float = DEFAULTS["gamma"],
    tau: float = DEFAULTS["tau"],
    progress: bool = True,
) -> tuple[LongTailedDigits, list[dict[str, Any]]]:
    """Train every method of :func:`make_methods` and evaluate it.

    Returns:
      ``(data, rows)``: the data splits and one dict per method (``method`` plus the
      keys of :func:`evaluate`).
    """
    data = load_long_tailed_digits(seed=seed, imbalance=imbalance, n_max=n_max)
    methods = make_methods(data.counts, gamma=gamma, tau=tau)
    trained = [m for m in methods if m.loss is not None]

    from tqdm.auto import tqdm

    bar = tqdm(
        total=epochs,
        desc=f"training {len(trained)} models",
        unit="epoch",
        disable=not progress,
        file=sys.stderr,
        leave=False,
    )
    names = [m.name for m in trained]
    shorts = [m.short for m in trained]

    def on_epoch(e, losses):
        bar.set_postfix_str(
            "loss " + " ".join(f"{n}={v:.3f}" for n, v in zip(shorts, losses, strict=True)),
            refresh=False,
        )
        bar.update(1)

    params = train_classifiers(
        data.x_train,
        data.y_train,
        [m.loss for m in trained],
        seed=seed,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        hidden=hidden,
        n_classes=N_CLASSES,
        on_epoch=on_epoch,
    )
    models: dict[str, Params] = dict(zip(names, params, strict=True))
    bar.close()

    rows = []
    for m in methods:
        model = models[m.trained_as or m.name]
        z_val = mlp_logits(model, jnp.asarray(data.x_val))
        z_test = mlp_logits(model, jnp.asarray(data.x_test))
        if m.adjust is not None:
            z_val, z_test = m.adjust(z_val), m.adjust(z_test)
        rows.append({"method": m.name, **evaluate(z_val, data.y_val, z_test, data.y_test)})
    return data, rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The demo's result table as aligned plain text."""
    head = ("method", "acc", "bal.acc", "worst rec.", "ECE", "ECE (T)", "T")
    lines = []
    for r in rows:
        lines.append(
            (
                r["method"],
                f"{r['accuracy']:.3f}",
                f"{r['balanced_accuracy']:.3f}",
                f"{r['worst_recall']:.3f} ({r['worst_class']})",
                f"{r['ece']:.3f}",
                f"{r['ece_scaled']:.3f}",
                f"{r['temperature']:.2f}",
            )
        )
    widths = [max(len(h), *(len(li[i]) for li in lines)) for i, h in enumerate(head)]

    def fmt(cells):
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join((first, *rest))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(head), rule, *(fmt(li) for li in lines)])


def main(args: Any) -> int:
    """Entry point of ``jsoftmax demo`` (``args`` from the argparse sub-parser)."""
    start = time.perf_counter()
    data, rows = run_demo(
        seed=args.seed,
        epochs=args.epochs,
        imbalance=args.imbalance,
        n_max=args.n_max,
        hidden=args.hidden,
        progress=not args.no_progress,
    )
    counts = data.counts
    print(
        f"jsoftmax demo — long-tailed digits (seed {args.seed}, imbalance "
        f"{args.imbalance:g}:1, {args.epochs} epochs)"
    )
    print(f"train counts per class 0..9: {' '.join(str(int(c)) for c in counts)}")
    print(
        f"val {len(data.y_val)} / test {len(data.y_test)} images, balanced; "
        "T fitted on val, ECE on test (15 bins)"
    )
    print()
    print(format_table(rows))
    print()
    print("worst rec. = lowest per-class recall on test (class in parentheses)")
    elapsed = time.perf_counter() - start
    # Timing goes to stderr so that stdout is byte-identical across runs with one seed.
    print(f"finished in {elapsed:.1f} s", file=sys.stderr)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(
                {
                    "seed": args.seed,
                    "epochs": args.epochs,
                    "imbalance": args.imbalance,
                    "train_counts": counts.tolist(),
                    "rows": rows,
                    "seconds": elapsed,
                },
                f,
                indent=2,
            )
    return 0

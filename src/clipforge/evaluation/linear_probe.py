"""The CLIP paper's linear probe: L-BFGS logistic regression on frozen features, with the L2
strength chosen on a validation split (Radford et al. 2021, appendix A.3).

The caller embeds; features come in as [N, dim] numpy or torch arrays, used as given.
Choices, and why:

- **scikit-learn ``LogisticRegression``** (L-BFGS, multinomial for more than two classes,
  ``max_iter=1000``, other arguments at their defaults) is what OpenAI used (openai/CLIP#39).
  CLIP_benchmark trains a torch linear layer with AdamW instead, so its linear-probe figures
  are not the paper's protocol; its metric names are kept.
- **No feature standardisation**, as in the paper. Scaling the features by ``a`` is
  equivalent to scaling C by ``a**2`` (same optimum; the intercept is not penalised), and
  the sweep spans twelve decades of C, so the scale of the features is absorbed by the
  chosen C.
- **The C sweep.** The paper sweeps the L2 strength (scikit-learn's 1/C) over 96
  log-spaced steps in [1e-6, 1e6]; OpenAI made it affordable with a parametric binary
  search. Here C lives on the lattice ``10 ** (-6 + i / 8)``, ``i = 0..96`` (97 points, the
  paper's resolution): first the 7 points two decades apart, then four rounds that try the
  best point so far +-1, +-0.5, +-0.25 and +-0.125 decades. That is at most 15 fits instead
  of 97, and it finds the lattice optimum whenever validation accuracy is strictly unimodal
  in log C.
- **What "best" means.** Highest validation accuracy (the paper's criterion). Ties are
  common: small validation sets have coarse accuracies, and on easy data every C from 1e-6
  to 1e6 may be perfect. Tied C form plateaus; the middle of the widest one (in log C) is
  chosen, the C furthest from where accuracy falls off, rather than an end of the range.
  Lower validation log-loss settles what is still tied. (Breaking ties by log-loss alone
  would drive separable data to C = 1e6, where the loss keeps shrinking.)
- **The final model** is refit with the chosen C on train + validation, and scored on test,
  as in the paper. With no validation set, a stratified, seeded ``val_fraction`` of the
  training set is split off for the sweep.

Few-shot (``few_shot_probe``): k examples of each class are drawn per seed (nested: the
2-shot draw contains the 1-shot one, so curves over k vary only by k). C is chosen without
looking outside the k-shot sample, by stratified cross-validation over the shots
(``min(k, 5)`` folds, pooled validation accuracy). With k = 1 nothing is left to validate
on: a fixed C is used, ``one_shot_C / mean ||x||^2`` over the sample. By the scale
equivalence above this is the same model for any feature scale, and the default
``one_shot_C = 1`` (scikit-learn's default C for unit-norm features) sits between the
prototype classifier that C -> 0 tends to and the interpolating fit of C -> inf. Passing
``val_x, val_y`` instead selects C on that set for every k, OpenAI's protocol
(openai/CLIP#128: "the same validation set that we used for the full-data linear probe").
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from .metrics import classification_metrics

LOG10_C_MIN, LOG10_C_MAX = -6.0, 6.0
STEPS_PER_DECADE = 8  # lattice of 97 values of C, the paper's 96 steps
COARSE_STRIDE = 16  # lattice steps between coarse points: two decades, 7 points
MAX_FOLDS = 5

_LATTICE = 96


def _c_of(i: int) -> float:
    return float(10.0 ** (LOG10_C_MIN + i / STEPS_PER_DECADE))


def _features(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x).numpy()
    x = np.asarray(x)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty 2-D [N, dim] array, got {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers, got dtype {x.dtype}")
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise ValueError(f"{name} contain NaN or infinite values (first in row {bad})")
    return x


def _labels(y: Any, n: int, name: str) -> np.ndarray:
    y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if len(y) != n:
        raise ValueError(f"{len(y)} {name} for {n} feature rows")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must be integer class labels, got dtype {y.dtype}")
    return y


def _pair(x: Any, y: Any, what: str, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    features = _features(x, f"{what} features")
    if dim is not None and features.shape[1] != dim:
        raise ValueError(f"{what} features have dimension {features.shape[1]}, training "
                         f"features {dim}")
    return features, _labels(y, len(features), f"{what} labels")


def _encode(y: np.ndarray, classes: np.ndarray, what: str) -> np.ndarray:
    unknown = np.setdiff1d(y, classes)
    if len(unknown):
        raise ValueError(f"{what} labels {unknown[:10].tolist()} do not occur in the training "
                         "labels: a probe cannot learn a class it has no example of")
    return np.searchsorted(classes, y)


class _Fitter:
    """Fits one probe and counts fits and fits that stopped at ``max_iter``."""

    def __init__(self, max_iter: int):
        self.max_iter = max_iter
        self.fits = 0
        self.unconverged = 0

    def __call__(self, x: np.ndarray, y: np.ndarray, c: float) -> LogisticRegression:
        model = LogisticRegression(C=c, max_iter=self.max_iter, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x, y)
        self.fits += 1
        self.unconverged += int(np.max(model.n_iter_) >= self.max_iter)
        return model


def _scores(model: LogisticRegression, x: np.ndarray) -> np.ndarray:
    """Decision scores [N, classes] (not probabilities, which saturate into ties)."""
    scores = model.decision_function(x)
    if scores.ndim == 1:  # two classes: one score for the second class
        scores = np.stack([np.zeros_like(scores), scores], axis=1)
    return scores


def _accuracy_and_loss(model: LogisticRegression, x: np.ndarray, y: np.ndarray
                       ) -> tuple[int, float]:
    """Correct predictions and summed log-loss on encoded labels ``y``. The loss is the
    log-softmax of the decision scores in float64 (what ``predict_proba`` exponentiates), so a
    confident mistake costs its true size rather than a clipped one."""
    scores = _scores(model, x).astype(np.float64)
    correct = int((scores.argmax(axis=1) == y).sum())
    top = scores.max(axis=1)
    log_norm = top + np.log(np.exp(scores - top[:, None]).sum(axis=1))
    return correct, float((log_norm - scores[np.arange(len(y)), y]).sum())


def _choose(seen: dict[int, tuple[float, float]]) -> int:
    """The lattice index to pick among those evaluated, with their (accuracy, log-loss).

    Highest accuracy first. Where several C share it, they form plateaus (runs of
    consecutive evaluated C); the widest in log C wins, and within it the point nearest its
    middle: the C furthest from where accuracy falls off on either side. Lower log-loss, then
    the smaller C, settle what is still tied.
    """
    order = sorted(seen)
    top = max(accuracy for accuracy, _ in seen.values())
    runs: list[list[int]] = [[]]
    for i in order:
        if seen[i][0] == top:
            runs[-1].append(i)
        elif runs[-1]:
            runs.append([])
    runs = [run for run in runs if run]
    run = min(runs, key=lambda r: (r[0] - r[-1], min(seen[i][1] for i in r), r[0]))
    middle = (run[0] + run[-1]) / 2
    return min(run, key=lambda i: (abs(i - middle), seen[i][1], i))


def _sweep(evaluate: Callable[[float], tuple[float, float]]) -> tuple[float, list[dict]]:
    """Coarse-to-fine search of the lattice; ``evaluate(C)`` gives (accuracy, log-loss)."""
    seen: dict[int, tuple[float, float]] = {}

    def visit(i: int) -> None:
        if 0 <= i <= _LATTICE and i not in seen:
            seen[i] = evaluate(_c_of(i))

    for i in range(0, _LATTICE + 1, COARSE_STRIDE):
        visit(i)
    step = COARSE_STRIDE // 2
    while step >= 1:
        centre = _choose(seen)
        visit(centre - step)
        visit(centre + step)
        step //= 2
    table = [{"C": _c_of(i), "val_acc1": seen[i][0], "val_log_loss": seen[i][1]}
             for i in sorted(seen)]
    return _c_of(_choose(seen)), table


def _stratified_split(y: np.ndarray, classes: np.ndarray, fraction: float, seed: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of encoded labels ``y``: ``fraction`` of each class (at least one sample,
    never all) to validation, so every class is in both parts."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(len(classes)):
        members = rng.permutation(np.flatnonzero(y == c))
        if len(members) < 2:
            raise ValueError(f"class {classes[c]} has {len(members)} training sample: splitting "
                             "off a validation set needs at least 2 per class (or pass val_x, "
                             "val_y)")
        n_val = min(max(1, round(fraction * len(members))), len(members) - 1)
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _holdout_evaluator(fitter: _Fitter, x: np.ndarray, y: np.ndarray, vx: np.ndarray,
                       vy: np.ndarray) -> Callable[[float], tuple[float, float]]:
    def evaluate(c: float) -> tuple[float, float]:
        correct, loss = _accuracy_and_loss(fitter(x, y, c), vx, vy)
        return correct / len(vy), loss / len(vy)
    return evaluate


def _cv_evaluator(fitter: _Fitter, x: np.ndarray, y: np.ndarray, fold: np.ndarray
                  ) -> Callable[[float], tuple[float, float]]:
    def evaluate(c: float) -> tuple[float, float]:
        correct, loss = 0, 0.0
        for f in np.unique(fold):
            held = fold == f
            n, l_ = _accuracy_and_loss(fitter(x[~held], y[~held], c), x[held], y[held])
            correct, loss = correct + n, loss + l_
        return correct / len(y), loss / len(y)
    return evaluate


def _check_classes(y: np.ndarray) -> np.ndarray:
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError(f"the training labels hold {len(classes)} class; a probe needs at "
                         "least 2")
    return classes


def _finish(fitter: _Fitter, x: np.ndarray, y: np.ndarray, c: float, test_x: np.ndarray,
            test_y: np.ndarray) -> dict[str, Any]:
    model = fitter(x, y, c)
    metrics = classification_metrics(torch.from_numpy(_scores(model, test_x)),
                                      torch.from_numpy(test_y))
    return {"metrics": metrics, "C": c, "fits": fitter.fits, "unconverged": fitter.unconverged}


def linear_probe(train_x: Any, train_y: Any, test_x: Any, test_y: Any, val_x: Any = None,
                 val_y: Any = None, *, val_fraction: float = 0.2, C: float | None = None,
                 seed: int = 0, max_iter: int = 1000) -> dict[str, Any]:
    """Fit the paper's linear probe and score it on the test set.

    Returns ``{"metrics": {"acc1", "acc5", "mean_per_class_recall"}, "C", "fits",
    "unconverged", "val_acc1", "sweep", "n_train", "n_val", "n_test"}``: ``fits`` counts every
    ``LogisticRegression`` fit (the sweep and the final refit), ``unconverged`` those that
    stopped at ``max_iter``, ``sweep`` the validation accuracy and log-loss of each C tried.
    Labels are any integers; the classes are those of the training labels. With ``C`` given
    there is no sweep. Deterministic for a ``seed`` (which only drives the validation split).
    """
    x, y = _pair(train_x, train_y, "training")
    tx, ty = _pair(test_x, test_y, "test", x.shape[1])
    classes = _check_classes(y)
    y, ty = _encode(y, classes, "training"), _encode(ty, classes, "test")
    if (val_x is None) != (val_y is None):
        raise ValueError("give both val_x and val_y, or neither")
    if val_x is not None:
        vx, vy = _pair(val_x, val_y, "validation", x.shape[1])
        vy = _encode(vy, classes, "validation")
        fit_x, fit_y = x, y
    elif C is not None:  # nothing to select: no validation split
        fit_x, fit_y, vx, vy = x, y, x[:0], y[:0]
    else:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        train, val = _stratified_split(y, classes, val_fraction, seed)
        fit_x, fit_y, vx, vy = x[train], y[train], x[val], y[val]
    fitter = _Fitter(max_iter)
    result: dict[str, Any] = {}
    if C is None:
        C, sweep = _sweep(_holdout_evaluator(fitter, fit_x, fit_y, vx, vy))
        result["val_acc1"] = next(row["val_acc1"] for row in sweep if row["C"] == C)
        result["sweep"] = sweep
    elif not C > 0:
        raise ValueError(f"C must be positive, got {C}")
    all_x, all_y = np.concatenate([fit_x, vx]), np.concatenate([fit_y, vy])
    out = _finish(fitter, all_x, all_y, float(C), tx, ty)
    out.update(result)
    out.update(n_train=len(fit_y), n_val=len(vy), n_test=len(ty))
    return out


def few_shot_probe(train_x: Any, train_y: Any, test_x: Any, test_y: Any,
                   shots: Sequence[int] = (1, 2, 4, 8, 16), seeds: Sequence[int] = (0, 1, 2), *,
                   val_x: Any = None, val_y: Any = None, one_shot_C: float = 1.0,
                   max_iter: int = 1000) -> dict[int, dict[str, Any]]:
    """k-shot linear probes: for each k in ``shots`` and each seed, k training examples per
    class are drawn, C is chosen (see the module docstring) and the probe is scored on test.

    Returns ``{k: {"metrics": mean over seeds, "std": sample standard deviation over seeds
    (0 with one seed), "runs": [{"seed", "metrics", "C", "fits", "unconverged",
    "selection"}]}}``, ``metrics`` holding ``acc1``, ``acc5`` and ``mean_per_class_recall``.
    Deterministic for given seeds.
    """
    x, y = _pair(train_x, train_y, "training")
    tx, ty = _pair(test_x, test_y, "test", x.shape[1])
    classes = _check_classes(y)
    y, ty = _encode(y, classes, "training"), _encode(ty, classes, "test")
    shots, seeds = list(shots), list(seeds)
    if not shots or any(not isinstance(k, (int, np.integer)) or k < 1 for k in shots):
        raise ValueError(f"shots must be positive integers, got {shots}")
    if not seeds:
        raise ValueError("seeds is empty")
    if not one_shot_C > 0:
        raise ValueError(f"one_shot_C must be positive, got {one_shot_C}")
    counts = np.bincount(y, minlength=len(classes))
    if counts.min() < max(shots):
        c = int(np.argmin(counts))
        raise ValueError(f"class {classes[c]} has {counts[c]} training samples, fewer than "
                         f"k={max(shots)} shots")
    validation = None
    if (val_x is None) != (val_y is None):
        raise ValueError("give both val_x and val_y, or neither")
    if val_x is not None:
        vx, vy = _pair(val_x, val_y, "validation", x.shape[1])
        validation = (vx, _encode(vy, classes, "validation"))

    results: dict[int, dict[str, Any]] = {}
    for k in shots:
        runs = []
        for seed in seeds:
            pick, rank = _draw(y, len(classes), k, seed)
            runs.append({"seed": seed, **_few_shot_run(x[pick], y[pick], rank, tx, ty, k,
                                                       validation, one_shot_C, max_iter)})
        names = runs[0]["metrics"].keys()
        table = {name: np.array([run["metrics"][name] for run in runs]) for name in names}
        results[int(k)] = {
            "metrics": {name: float(v.mean()) for name, v in table.items()},
            "std": {name: float(v.std(ddof=1)) if len(v) > 1 else 0.0
                    for name, v in table.items()},
            "runs": runs,
        }
    return results


def _draw(y: np.ndarray, n_classes: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k indices per class, and each pick's position within its class's draw. One permutation
    per (seed, class), independent of k, so the draws are nested over k."""
    picks, ranks = [], []
    for c in range(n_classes):
        rng = np.random.default_rng([seed, c])
        members = rng.permutation(np.flatnonzero(y == c))[:k]
        picks.append(members)
        ranks.append(np.arange(k))
    return np.concatenate(picks), np.concatenate(ranks)


def _few_shot_run(x: np.ndarray, y: np.ndarray, rank: np.ndarray, tx: np.ndarray,
                  ty: np.ndarray, k: int, validation: tuple[np.ndarray, np.ndarray] | None,
                  one_shot_C: float, max_iter: int) -> dict[str, Any]:
    fitter = _Fitter(max_iter)
    if validation is not None:
        c, _ = _sweep(_holdout_evaluator(fitter, x, y, *validation))
        selection = "validation set"
    elif k == 1:
        c = one_shot_C / float(np.mean(np.sum(x.astype(np.float64) ** 2, axis=1)) or 1.0)
        selection = "fixed: one_shot_C / mean squared feature norm"
    else:
        folds = min(k, MAX_FOLDS)
        c, _ = _sweep(_cv_evaluator(fitter, x, y, rank % folds))
        selection = f"{folds}-fold cross-validation on the shots"
    return {**_finish(fitter, x, y, c, tx, ty), "selection": selection}

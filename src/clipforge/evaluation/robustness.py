"""Effective robustness, as the CLIP paper measures it, on the built-in dataset's suites.

A *suite* is a labelled image set (:data:`clipforge.data.synthetic.SUITES`): the training
distribution (seen and held-out compositions) and shift suites that training never shows.
Three kinds of classifier are scored on the same suites:

* **zero-shot CLIP**, per prompt language: class embeddings from the template ensemble (and
  from one prompt alone, the paper's ablation);
* **a linear probe on CLIP's image features**, fitted on labelled images of the training
  distribution (the paper's "adapt to ImageNet");
* **a supervised classifier**: the same image tower trained with cross-entropy on the class
  labels of the same images for the same budget (:mod:`clipforge.training.baseline`).

*Effective robustness* compares how much each loses from the training distribution (the seen
suite) to the shift suites: a classifier that learned the concepts rather than the renderer's
quirks loses little.  Also here: k-shot linear probes against zero-shot (at which k does the
probe catch up?), attribute binding with swapped hard negatives scored as SugarCrepe scores
(:mod:`.caption_selection`), and the plots of both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import inference
from ..fileio import atomic_file
from .caption_selection import selection_metrics
from .metrics import accuracy_at_k
from .zeroshot import ZeroShotClassifier

SHOTS: tuple[int, ...] = (1, 2, 4, 8, 16)


@dataclass
class Labelled:
    """Image features [N, dim] (any norm) and their class indices [N]."""

    features: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        self.labels = torch.as_tensor(self.labels, dtype=torch.long)
        if self.features.ndim != 2 or len(self.features) != len(self.labels):
            raise ValueError(f"features [N, dim] and labels [N] must match, got "
                             f"{tuple(self.features.shape)} and {tuple(self.labels.shape)}")

    @staticmethod
    def concat(parts: Sequence[Labelled]) -> Labelled:
        return Labelled(torch.cat([p.features for p in parts]),
                        torch.cat([p.labels for p in parts]))


def image_features(model, images: Sequence[Image.Image], batch_size: int = 128
                   ) -> torch.Tensor:
    """[N, dim] float32 unit-norm features of rendered images, through
    :func:`clipforge.inference.embed_pictures` (the one embedding path).  Labels are matched to
    features by position, so an image the model cannot take is an error, not a skip."""
    result = inference.embed_pictures(model, images, batch_size=batch_size, progress=False)
    _complete(result, len(images), "images")
    return torch.from_numpy(result.vectors)


def text_features(model, texts: Sequence[str]) -> torch.Tensor:
    """[N, dim] float32 unit-norm features of texts, through
    :func:`clipforge.inference.embed_texts` (long texts cut, keeping the end token)."""
    result = inference.embed_texts(model, texts, truncate=True, progress=False)
    _complete(result, len(texts), "texts")
    return torch.from_numpy(result.vectors)


def _complete(result: inference.Embeddings, count: int, what: str) -> None:
    if result.failures:
        item, reason = result.failures[0]
        raise ValueError(f"{len(result.failures)} of {count} {what} could not be embedded "
                         f"(item {item}: {reason})")


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return accuracy_at_k(logits, labels, ks=(1,))["acc1"]


def zero_shot(model, suites: Mapping[str, Labelled], classnames: Sequence[str],
              templates: Sequence[str]) -> dict[str, Any]:
    """Per suite: top-1 and top-5 with the template ensemble, top-1 with the first template
    alone; and, on every suite, how often the predicted class had the right colour and the
    right shape (classes are colour-major, ``shapes`` per colour)."""
    ensemble = ZeroShotClassifier.build(model, classnames, list(templates))
    single = ZeroShotClassifier.build(model, classnames, list(templates[:1]))
    result: dict[str, Any] = {}
    for name, suite in suites.items():
        logits = ensemble.logits(suite.features)
        accuracy = accuracy_at_k(logits, suite.labels, ks=(1, 5))
        result[name] = {"top1": accuracy["acc1"], "top5": accuracy["acc5"],
                        "one_prompt_top1": top1(single.logits(suite.features), suite.labels),
                        "predictions": logits.argmax(dim=-1)}
    return result


def attribute_accuracy(predictions: torch.Tensor, labels: torch.Tensor,
                       shapes: int) -> dict[str, float]:
    """How often the predicted class has the true colour, and the true shape (colour-major
    classes): a model that reads only colours gets the first right and the second at chance."""
    return {"colour": (predictions // shapes == labels // shapes).float().mean().item(),
            "shape": (predictions % shapes == labels % shapes).float().mean().item()}


# L2 strengths the probe chooses from (on a validation split of its training set).
PROBE_DECAYS: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
PROBE_VAL_FRACTION = 0.2
PROBE_MAX_ITER = 100


def _unit64(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.double(), dim=-1)


def fit_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, decay: float,
              max_iter: int = PROBE_MAX_ITER) -> torch.Tensor:
    """Multinomial logistic regression on unit-norm features, L2 strength ``decay`` (the bias
    is not penalised), by full-batch L-BFGS in float64: [dim + 1, classes] weights.

    The run's report fits dozens of probes (one per k, seed and strength); scikit-learn's
    L-BFGS (:mod:`.linear_probe`, the paper's protocol for ``clipforge eval``) takes minutes
    for that on 2 cores where this takes seconds.
    """
    x = torch.cat([_unit64(features), torch.ones(len(features), 1, dtype=torch.float64)], 1)
    weights = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], lr=1, max_iter=max_iter,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                                  tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weights, labels) \
            + decay * weights[:-1].pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weights.detach()


def probe_logits(weights: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    return _unit64(features) @ weights[:-1] + weights[-1]


def _split(labels: torch.Tensor, fraction: float, seed: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """A stratified, seeded train/validation split of indices."""
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique().tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = max(1, round(fraction * len(members))) if len(members) > 1 else 0
        val.append(members[:cut])
        train.append(members[cut:])
    return torch.cat(train), torch.cat(val)


def choose_decay(pool: Labelled, classes: int, seed: int = 0) -> dict[str, Any]:
    """The L2 strength of PROBE_DECAYS with the best validation top-1 (the weaker one among
    ties), on a stratified split of ``pool``."""
    train, val = _split(pool.labels, PROBE_VAL_FRACTION, seed)
    scores = {}
    for decay in PROBE_DECAYS:
        weights = fit_probe(pool.features[train], pool.labels[train], classes, decay)
        scores[decay] = top1(probe_logits(weights, pool.features[val]), pool.labels[val])
    best = max(PROBE_DECAYS, key=lambda d: (scores[d], -d))
    return {"decay": best, "validation_top1": {str(d): v for d, v in scores.items()}}


def probe(pool: Labelled, suites: Mapping[str, Labelled], classes: int,
          seed: int = 0) -> dict[str, Any]:
    """A linear probe fitted on all of ``pool`` with the chosen L2 strength, scored on every
    suite.  Returns ``{"decay", "validation_top1", suite: top1, ...}``."""
    chosen = choose_decay(pool, classes, seed)
    weights = fit_probe(pool.features, pool.labels, classes, chosen["decay"])
    return {**chosen, **{name: top1(probe_logits(weights, s.features), s.labels)
                         for name, s in suites.items()}}


def few_shot(pool: Labelled, test: Labelled, classes: int, decay: float,
             shots: Sequence[int] = SHOTS, seeds: Sequence[int] = (0, 1, 2)) -> dict[str, Any]:
    """k-shot linear probes: k examples of every class drawn from ``pool`` per seed (nested
    draws: the 2-shot sample holds the 1-shot one), fitted with the full probe's L2 strength
    (OpenAI's protocol, openai/CLIP#128), scored on ``test``: mean and standard deviation of
    top-1 over ``seeds`` for each k."""
    means, stds = [], []
    for k in shots:
        runs = []
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            picks = []
            for c in range(classes):
                members = torch.nonzero(pool.labels == c).flatten()
                if len(members) < k:
                    raise ValueError(f"class {c} has {len(members)} probe images, fewer than "
                                     f"k={k}")
                picks.append(members[torch.randperm(len(members), generator=generator)[:k]])
            pick = torch.cat(picks)
            weights = fit_probe(pool.features[pick], pool.labels[pick], classes, decay)
            runs.append(top1(probe_logits(weights, test.features), test.labels))
        means.append(float(np.mean(runs)))
        stds.append(float(np.std(runs, ddof=1)) if len(runs) > 1 else 0.0)
    return {"shots": [int(k) for k in shots], "seeds": list(seeds), "decay": decay,
            "top1": means, "std": stds}


def binding(model, image_features: torch.Tensor, positives: Sequence[str],
            negatives: Sequence[str]) -> dict[str, float]:
    """SugarCrepe's score for one caption and one hard negative per image: ``text_acc`` is how
    often the image prefers its caption (``acc`` is the same, ``image_acc`` is 1)."""
    texts = text_features(model, [t for pair in zip(positives, negatives) for t in pair])
    return selection_metrics(image_features[:, None, :], texts.view(len(positives), 2, -1))


def effective_robustness(accuracy: Mapping[str, float], shifts: Sequence[str],
                         reference: str = "seen") -> dict[str, float]:
    """In-distribution accuracy, the mean over the shift suites, and the drop between them
    (absolute, and as a fraction of the in-distribution accuracy)."""
    present = [accuracy[s] for s in shifts if accuracy.get(s) is not None]
    inside = accuracy[reference]
    mean = float(np.mean(present)) if present else float("nan")
    return {"in_distribution": inside, "shift_mean": mean, "drop": inside - mean,
            "relative_drop": (inside - mean) / inside if inside else float("nan")}


# --------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, destination: Path) -> None:
    with atomic_file(destination) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def plot_suites(series: Mapping[str, Mapping[str, float]], suites: Sequence[str],
                labels: Mapping[str, str], destination: str | Path, title: str) -> None:
    """Grouped bars: accuracy per suite (x) for each classifier (``series`` name -> suite ->
    accuracy); suites a classifier was not scored on are left out."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(7.5, 1.3 * len(suites)), 4.2))
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [k + (i - (len(series) - 1) / 2) * width for k, s in enumerate(suites)
              if values.get(s) is not None]
        ys = [100 * values[s] for s in suites if values.get(s) is not None]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=6, padding=1)
    ax.set_xticks(range(len(suites)), [labels.get(s, s) for s in suites], fontsize=8)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    # below the axis: inside it, the legend would hide bars
    ax.legend(fontsize=7, ncol=min(len(series), 5), loc="upper center",
              bbox_to_anchor=(0.5, -0.16), frameon=False)
    fig.tight_layout()
    _save(fig, Path(destination))
    plt.close(fig)


def plot_few_shot(curve: Mapping[str, Any], zero_shot_top1: Mapping[str, float],
                  destination: str | Path, title: str) -> None:
    """Linear-probe top-1 against k (log scale) with its spread over seeds, and a horizontal
    line per language at the zero-shot accuracy on the same test set."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    shots = curve["shots"]
    mean, std = np.array(curve["top1"]) * 100, np.array(curve["std"]) * 100
    ax.plot(shots, mean, "o-", color="black", label="k-shot linear probe")
    ax.fill_between(shots, mean - std, mean + std, color="black", alpha=0.12)
    for i, (language, value) in enumerate(zero_shot_top1.items()):
        ax.axhline(100 * value, color=f"C{i}", ls="--", lw=1.2, label=f"zero-shot ({language})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_xlabel("labelled examples per class (k)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 102)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    _save(fig, Path(destination))
    plt.close(fig)

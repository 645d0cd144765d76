"""Classification metrics with CLIP_benchmark's names: ``acc1``, ``acc5``,
``mean_per_class_recall``.

Every metric here is computed from the rank of the true class among the scores, with one tie
rule throughout: **among equal scores the lower class index ranks first**. That is what
``argmax`` does (``torch.argmax`` and ``numpy.argmax`` return the first maximum), so ``acc1``
always equals the accuracy of the argmax predictions that ``mean_per_class_recall`` scores.
``torch.topk``, which CLIP_benchmark uses, leaves the order of tied scores unspecified (on CPU
it is not even the index order), and scikit-learn's ``top_k_accuracy_score`` puts the *higher*
index first; with real-valued logits exact ties are rare, so all three agree in practice, but
only a fixed rule makes the result reproducible.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

# Rows of the [rows, classes] comparison done at once: bounds memory for very large N.
_ROW_CHUNK = 8192


def _as_logits(logits: Any) -> torch.Tensor:
    scores = torch.as_tensor(logits)
    if scores.ndim != 2:
        raise ValueError(f"logits must be a 2-D [N, classes] array, got {tuple(scores.shape)}")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"logits are empty (shape {tuple(scores.shape)})")
    if not (scores.is_floating_point() or scores.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"logits must be numbers, got dtype {scores.dtype}")
    if scores.is_floating_point() and torch.isnan(scores).any():
        raise ValueError("logits contain NaN")
    return scores


def _as_labels(labels: Any, n: int, num_classes: int | None, what: str = "labels") -> torch.Tensor:
    values = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if values.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {tuple(values.shape)}")
    if values.is_floating_point() or values.dtype == torch.bool or values.is_complex():
        raise ValueError(f"{what} must be integer class indices, got dtype {values.dtype}")
    if len(values) != n:
        raise ValueError(f"{len(values)} {what} for {n} samples")
    if n and values.min() < 0:
        raise ValueError(f"{what} must be >= 0, got {values.min().item()}")
    if n and num_classes is not None and values.max() >= num_classes:
        raise ValueError(f"{what} must be < {num_classes} (the number of classes), "
                         f"got {values.max().item()}")
    return values.long()


def true_class_rank(logits: Any, labels: Any) -> torch.Tensor:
    """0-based rank of each sample's true class among its scores (0: the top prediction).

    Rank = number of classes scoring strictly higher, plus the tied classes with a lower index.
    """
    scores = _as_logits(logits)
    target = _as_labels(labels, scores.shape[0], scores.shape[1]).to(scores.device)
    column = torch.arange(scores.shape[1], device=scores.device)
    ranks = []
    for start in range(0, scores.shape[0], _ROW_CHUNK):
        block = scores[start:start + _ROW_CHUNK]
        wanted = target[start:start + _ROW_CHUNK, None]
        true_score = block.gather(1, wanted)
        ahead = (block > true_score) | ((block == true_score) & (column < wanted))
        ranks.append(ahead.sum(dim=1))
    return torch.cat(ranks).cpu()


def accuracy_at_k(logits: Any, labels: Any, ks: Iterable[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy for each k: ``{"acc1": ..., "acc5": ...}``.

    A k at or above the number of classes gives 1.0, as in scikit-learn's
    ``top_k_accuracy_score`` (every class is in the top k); ``classification_metrics`` is where
    CLIP_benchmark's "no acc5 below 5 classes" rule lives.
    """
    ks = list(ks)
    if not ks or any(not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    rank = true_class_rank(logits, labels)
    return {f"acc{k}": (rank < k).double().mean().item() for k in ks}


def mean_per_class_recall(predictions: Any, labels: Any, num_classes: int | None = None) -> float:
    """Recall of each class present in ``labels``, averaged over those classes.

    This is scikit-learn's ``balanced_accuracy_score``, which CLIP_benchmark reports as
    ``mean_per_class_recall``: a predicted class absent from ``labels`` only counts as an error.
    ``predictions`` is either 1-D class indices or 2-D scores [N, classes], reduced by argmax
    (ties to the lower index). ``num_classes``, when given, bounds both.
    """
    values = torch.as_tensor(predictions) if isinstance(predictions, torch.Tensor) \
        else torch.as_tensor(np.asarray(predictions))
    if values.ndim == 2:
        scores = _as_logits(values)
        if num_classes is not None and scores.shape[1] != num_classes:
            raise ValueError(f"scores have {scores.shape[1]} classes, num_classes={num_classes}")
        num_classes = scores.shape[1]
        values = scores.argmax(dim=1)
    n = len(values)
    if n == 0:
        raise ValueError("no predictions")
    predicted = _as_labels(values.cpu(), n, num_classes, what="predictions")
    target = _as_labels(labels, n, num_classes).cpu()
    size = int(max(predicted.max().item(), target.max().item()) + 1)
    support = torch.bincount(target, minlength=size).double()
    correct = torch.bincount(target[predicted == target], minlength=size)
    present = support > 0
    return (correct.double()[present] / support[present]).mean().item()


def classification_metrics(logits: Any, labels: Any) -> dict[str, float]:
    """``{"acc1", "acc5", "mean_per_class_recall"}`` as CLIP_benchmark reports them.

    With fewer than 5 classes ``acc5`` is NaN, exactly as CLIP_benchmark does
    (``acc5 = float("nan")`` when ``len(classes) < 5``): a top-5 figure over at most 4 classes
    is 1.0 by construction and would read as a result. The key is always present, so results
    of different datasets share one schema. Note ``json.dumps`` writes NaN as the non-standard
    token ``NaN``.
    """
    scores = _as_logits(logits)
    ks: Sequence[int] = (1, 5) if scores.shape[1] >= 5 else (1,)
    result = accuracy_at_k(scores, labels, ks)
    result.setdefault("acc5", float("nan"))
    result["mean_per_class_recall"] = mean_per_class_recall(scores, labels)
    return {key: result[key] for key in ("acc1", "acc5", "mean_per_class_recall")}

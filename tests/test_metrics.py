"""Classification metrics against scikit-learn, CLIP_benchmark's formulas and hand-computed
cases, including the tie rule (lower class index first, as argmax)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

from clipforge.evaluation.metrics import (
    accuracy_at_k,
    classification_metrics,
    mean_per_class_recall,
    true_class_rank,
)


def random_case(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # A learnable-ish signal so that accuracies are neither 0 nor 1.
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g)
    logits[torch.arange(n), labels] += 1.0
    return logits, labels


def clip_benchmark_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """CLIP_benchmark's ``accuracy``: topk indices compared with the target."""
    predicted = logits.topk(k, 1, True, True)[1].t()
    return predicted.eq(labels.view(1, -1)).reshape(-1).float().sum().item() / len(labels)


@pytest.mark.parametrize("classes", [2, 5, 13, 100])
@pytest.mark.parametrize("seed", [0, 1])
def test_top_k_matches_sklearn_and_clip_benchmark(classes: int, seed: int) -> None:
    logits, labels = random_case(500, classes, seed)
    ks = [k for k in (1, 2, 5, 10) if k < classes]
    ours = accuracy_at_k(logits, labels, ks)
    # sklearn takes binary scores as one column, the margin of class 1
    scores = (logits[:, 1] - logits[:, 0]) if classes == 2 else logits
    for k in ks:
        reference = top_k_accuracy_score(labels.numpy(), scores.numpy(), k=k,
                                         labels=np.arange(classes))
        assert ours[f"acc{k}"] == pytest.approx(reference, abs=1e-12)
        assert ours[f"acc{k}"] == pytest.approx(clip_benchmark_accuracy(logits, labels, k),
                                                abs=1e-12)


def test_k_at_or_above_classes_is_perfect() -> None:
    logits, labels = random_case(50, 3, 0)
    assert accuracy_at_k(logits, labels, (3, 7)) == {"acc3": 1.0, "acc7": 1.0}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mean_per_class_recall_matches_balanced_accuracy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 12, 400)
    labels[labels == 3] = 4  # class 3 never occurs in the labels ...
    predicted = np.where(rng.random(400) < 0.6, labels, rng.integers(0, 12, 400))
    predicted[:5] = 3  # ... but is predicted: errors only, not a class of the average
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        reference = balanced_accuracy_score(labels, predicted)
    assert mean_per_class_recall(predicted, labels) == pytest.approx(reference, abs=1e-12)
    assert mean_per_class_recall(torch.from_numpy(predicted), torch.from_numpy(labels),
                                 num_classes=12) == pytest.approx(reference, abs=1e-12)


def test_mean_per_class_recall_from_logits_is_argmax() -> None:
    logits, labels = random_case(300, 7, 3)
    assert mean_per_class_recall(logits, labels) == pytest.approx(
        balanced_accuracy_score(labels.numpy(), logits.argmax(1).numpy()), abs=1e-12)


def test_hand_computed() -> None:
    logits = torch.tensor([[0.1, 0.7, 0.2],    # label 1: rank 0
                           [0.5, 0.3, 0.2],    # label 2: rank 2
                           [0.2, 0.5, 0.3],    # label 2: rank 1
                           [0.9, 0.05, 0.05]])  # label 0: rank 0
    labels = torch.tensor([1, 2, 2, 0])
    assert true_class_rank(logits, labels).tolist() == [0, 2, 1, 0]
    assert accuracy_at_k(logits, labels, (1, 2, 3)) == {"acc1": 0.5, "acc2": 0.75, "acc3": 1.0}
    # per class: class 0 1/1, class 1 1/1, class 2 0/2  ->  (1 + 1 + 0) / 3
    assert mean_per_class_recall(logits, labels) == pytest.approx(2 / 3)
    metrics = classification_metrics(logits, labels)
    assert list(metrics) == ["acc1", "acc5", "mean_per_class_recall"]
    assert metrics["acc1"] == 0.5 and math.isnan(metrics["acc5"])
    assert metrics["mean_per_class_recall"] == pytest.approx(2 / 3)


def test_ties_go_to_the_lower_class_index() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0],
                           [1.0, 1.0, 1.0],
                           [0.0, 2.0, 2.0],
                           [0.0, 2.0, 2.0]])
    labels = torch.tensor([0, 2, 1, 2])
    assert true_class_rank(logits, labels).tolist() == [0, 2, 0, 1]
    assert accuracy_at_k(logits, labels, (1, 2)) == {"acc1": 0.5, "acc2": 0.75}


def test_acc1_always_equals_argmax_accuracy() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (2000, 6), generator=g).float()  # ties everywhere
    labels = torch.randint(0, 6, (2000,), generator=g)
    acc1 = accuracy_at_k(logits, labels, (1,))["acc1"]
    assert acc1 == pytest.approx((logits.argmax(1) == labels).double().mean().item(), abs=1e-15)
    # and the ranks are deterministic, whatever torch.topk does with ties
    assert torch.equal(true_class_rank(logits, labels), true_class_rank(logits.clone(), labels))


def test_acc5_with_five_or_more_classes() -> None:
    logits, labels = random_case(200, 5, 4)
    metrics = classification_metrics(logits, labels)
    assert metrics["acc5"] == 1.0
    logits, labels = random_case(200, 20, 4)
    metrics = classification_metrics(logits.numpy(), labels.numpy())  # numpy in, too
    assert metrics["acc5"] == pytest.approx(
        top_k_accuracy_score(labels.numpy(), logits.numpy(), k=5, labels=np.arange(20)))
    assert all(isinstance(v, float) for v in metrics.values())


def test_large_n_in_row_chunks() -> None:
    logits, labels = random_case(20_000, 10, 5)  # more rows than one comparison chunk
    ours = accuracy_at_k(logits, labels, (1, 3))
    for k in (1, 3):
        assert ours[f"acc{k}"] == pytest.approx(
            top_k_accuracy_score(labels.numpy(), logits.numpy(), k=k), abs=1e-12)


def test_bad_input() -> None:
    logits, labels = random_case(10, 4, 0)
    with pytest.raises(ValueError, match="2-D"):
        accuracy_at_k(logits[0], labels)
    with pytest.raises(ValueError, match="9 labels for 10 samples"):
        accuracy_at_k(logits, labels[:9])
    with pytest.raises(ValueError, match="< 4"):
        accuracy_at_k(logits, torch.full((10,), 4))
    with pytest.raises(ValueError, match=">= 0"):
        accuracy_at_k(logits, torch.full((10,), -1))
    with pytest.raises(ValueError, match="integer"):
        accuracy_at_k(logits, labels.float())
    bad = logits.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        classification_metrics(bad, labels)
    with pytest.raises(ValueError, match="positive"):
        accuracy_at_k(logits, labels, (0,))
    with pytest.raises(ValueError, match="empty"):
        accuracy_at_k(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="no predictions"):
        mean_per_class_recall([], [])
    with pytest.raises(ValueError, match="num_classes"):
        mean_per_class_recall(logits, labels, num_classes=5)

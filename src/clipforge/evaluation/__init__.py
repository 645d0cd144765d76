"""Zero-shot classification, retrieval and linear-probe evaluation (``clipforge eval``).

The linear probe lives in :mod:`clipforge.evaluation.linear_probe` (``linear_probe``,
``few_shot_probe``); it is not re-exported here, where its name would hide the module.
"""

from .metrics import accuracy_at_k, classification_metrics, mean_per_class_recall
from .retrieval import retrieval_recall
from .zeroshot import ZeroShotClassifier

__all__ = ["ZeroShotClassifier", "accuracy_at_k", "classification_metrics",
           "mean_per_class_recall", "retrieval_recall"]

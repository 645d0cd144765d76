"""Zero-shot classification, retrieval and linear-probe evaluation (``clipforge eval``)."""

from .linear_probe import few_shot_probe, linear_probe
from .metrics import accuracy_at_k, classification_metrics, mean_per_class_recall
from .retrieval import retrieval_recall
from .zeroshot import ZeroShotClassifier

__all__ = ["ZeroShotClassifier", "accuracy_at_k", "classification_metrics", "few_shot_probe",
           "linear_probe", "mean_per_class_recall", "retrieval_recall"]

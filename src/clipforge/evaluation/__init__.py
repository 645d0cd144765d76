"""Zero-shot classification and retrieval evaluation."""

from .retrieval import retrieval_recall
from .zeroshot import ZeroShotClassifier, topk_accuracy

__all__ = ["ZeroShotClassifier", "retrieval_recall", "topk_accuracy"]

"""``--method tip-adapter`` and ``tip-adapter-f`` (Zhang et al., ECCV 2022): a cache model.

The training images' unit embeddings become the keys of a cache whose values are their labels
(:class:`~clipforge.classifier.CacheClassifier`); a test image's affinity to the keys votes for
their classes, on top of the zero-shot head.  ``tip-adapter`` trains nothing: with a handful of
labels per class it gains most of what training would, for the cost of embedding them once.
``tip-adapter-f`` then trains the keys alone (the head and the tower stay frozen) with
cross-entropy, as the paper's "-F" variant does, for a few more points.

With validation images, ``alpha`` (the cache's weight) and ``beta`` (its sharpness) are chosen
on them over the paper's grid (beta in [0.1, 7), 200 steps; alpha in [0.1, 3), 20 steps);
without, the paper's defaults stand.  Differences from the paper's code, said here so that they
are not mistaken for it: the cache holds each training image once, as the run reads it
(the paper caches ten randomly augmented views), and the head's scale is the model's own
temperature (the paper writes 100, which is OpenAI's).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ...classifier import CacheClassifier, LinearClassifier, cache_votes

log = logging.getLogger("clipforge.finetune")

INIT_ALPHA, INIT_BETA = 1.0, 5.5  # the paper's defaults (its section 4.1)
BETA_GRID = tuple(0.1 + i * (7 - 0.1) / 200 for i in range(200))
ALPHA_GRID = tuple(0.1 + i * (3 - 0.1) / 20 for i in range(20))


def build_cache(head: LinearClassifier, vectors: torch.Tensor, targets: torch.Tensor,
                alpha: float = INIT_ALPHA, beta: float = INIT_BETA) -> CacheClassifier:
    """The training-free cache: keys are the unit embeddings of the training images."""
    return CacheClassifier.from_head(head, F.normalize(vectors.float(), dim=-1), targets,
                                     alpha, beta)


def search(cache: CacheClassifier, vectors: torch.Tensor, targets: torch.Tensor
           ) -> tuple[CacheClassifier, float]:
    """The cache with the (alpha, beta) of the grid that classify the validation images best
    (the first best in the paper's order: beta outer, alpha inner), and that accuracy."""
    base = LinearClassifier.logits(cache, vectors)  # the head alone
    affinity = F.normalize(vectors.float(), dim=-1) @ cache.keys.t()
    best = (-1.0, cache.alpha, cache.beta)
    for beta in BETA_GRID:
        votes = cache_votes(affinity, cache.labels, len(cache.classnames), beta)
        for alpha in ALPHA_GRID:
            correct = ((base + alpha * votes).argmax(dim=-1) == targets).float().mean().item()
            if correct > best[0]:
                best = (correct, alpha, beta)
    accuracy, alpha, beta = best
    log.info("Tip-Adapter: alpha %.3f, beta %.3f give validation accuracy %.4f", alpha, beta,
             accuracy)
    return CacheClassifier.from_head(cache, cache.keys, cache.labels, alpha, beta), accuracy


class TrainedKeys(nn.Module):
    """Tip-Adapter-F: the cache's keys as a trainable parameter (the paper's ``adapter``, a
    linear layer initialised with the keys), the head fixed; trained on frozen embeddings."""

    def __init__(self, cache: CacheClassifier):
        super().__init__()
        self.keys = nn.Parameter(cache.keys.clone())
        self.register_buffer("head_weight", cache.weight.clone())
        self.register_buffer("head_bias", cache.bias.clone())
        self.register_buffer("labels", cache.labels.clone())
        self.alpha, self.beta, self.classes = cache.alpha, cache.beta, len(cache.classnames)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        image = F.normalize(vectors.float(), dim=-1)
        votes = cache_votes(image @ self.keys.t(), self.labels, self.classes, self.beta)
        return F.linear(image, self.head_weight, self.head_bias) + self.alpha * votes

    def loss(self, vectors: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(vectors), targets)

    def classifier(self, like: CacheClassifier) -> CacheClassifier:
        """The cache with the trained keys (``like``'s head, class names and info)."""
        return CacheClassifier.from_head(like, self.keys.detach(), self.labels, self.alpha,
                                         self.beta)

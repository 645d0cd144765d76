"""A model's own classifier: the class names and linear head a fine-tuned model carries.

``clipforge finetune`` (:mod:`clipforge.training.finetune`) writes a model directory whose
image tower was trained for a fixed set of classes; the head it was trained with is part of the
model, so :func:`clipforge.create_model` attaches it as ``model.classifier`` (None for a model
without one) and ``clipforge classify`` answers with those classes when given no ``--labels``.

How it is stored, without changing how a CLIP model is stored: the head's two tensors travel in
``model.safetensors`` under :data:`WEIGHT_KEYS` (so the weights and the head are written in one
atomic rename and can never come from two runs), and the class names, with how the head was
made, in :data:`CLASSIFIER_FILE` beside it.  The loader takes the head's tensors out of the state
dict before the key-by-key check of the CLIP weights (:func:`split_classifier`), so every reader
of CLIP weights (evaluation, index building, the server, ONNX export) sees a plain CLIP.

The head computes ``logits = W @ unit(image embedding) + b``.  Initialised from the zero-shot
classifier (``W`` = temperature x class embeddings, ``b`` = 0) it gives the zero-shot logits
exactly; this is the starting point of every fine-tuning method (WiSE-FT, FLYP, probes).

:class:`CacheClassifier` (Tip-Adapter, Zhang et al. 2022) adds a cache of the training images to
that head: ``logits += alpha * exp(-beta * (1 - image @ keys^T)) @ one_hot(labels)``.  Its keys,
labels, alpha and beta travel in the same weights file under :data:`CACHE_KEYS`, so the head and
its cache are always from one run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .fileio import atomic_file
from .weights.checkpoint import CheckpointError, StateDict, parse_json_object

CLASSIFIER_FILE = "classifier.json"
FORMAT = "clipforge-classifier"
PREFIX = "classifier."
WEIGHT_KEYS = (PREFIX + "weight", PREFIX + "bias")
CACHE_KEYS = (PREFIX + "cache_keys", PREFIX + "cache_labels", PREFIX + "cache_alpha",
              PREFIX + "cache_beta")


class LinearClassifier:
    """Class names and a linear head ``[classes, dim]`` (+ bias) over unit image embeddings,
    with the prediction methods of :class:`~clipforge.evaluation.zeroshot.ZeroShotClassifier`
    (``logits``, ``predict``, ``predict_proba``, ``topk``), so that code that classifies takes
    either.  ``info`` records how it was made (method, WiSE-FT alpha, templates...)."""

    probability = "softmax"  # trained with cross-entropy over the classes

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, classnames: Sequence[str],
                 info: Mapping[str, Any] | None = None):
        classnames = list(classnames)
        if weight.ndim != 2 or weight.shape[0] != len(classnames):
            raise ValueError(f"the head's weight must be [{len(classnames)}, dim] for "
                             f"{len(classnames)} classes, got {tuple(weight.shape)}")
        if tuple(bias.shape) != (len(classnames),):
            raise ValueError(f"the head's bias must be [{len(classnames)}], got "
                             f"{tuple(bias.shape)}")
        self.weight = weight.detach().float().cpu()
        self.bias = bias.detach().float().cpu()
        self.classnames = classnames
        self.info = dict(info or {})

    @classmethod
    def from_zeroshot(cls, zeroshot: Any, info: Mapping[str, Any] | None = None
                      ) -> LinearClassifier:
        """The head that gives a zero-shot classifier's logits: its unit class embeddings times
        its temperature, no bias (a SigLIP model's logit bias is the same for every class, so
        dropping it changes no softmax and no ranking)."""
        weight = zeroshot.class_embeddings.float() * zeroshot.logit_scale
        return cls(weight, torch.zeros(weight.shape[0]), zeroshot.classnames, info)

    # -- prediction ------------------------------------------------------------------------

    def logits(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, classes]`` of (any-norm) image embeddings."""
        image = F.normalize(torch.as_tensor(image_embeddings).float().cpu(), dim=-1)
        return F.linear(image, self.weight, self.bias)

    def predict(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """The most likely class index per image."""
        return self.logits(image_embeddings).argmax(dim=-1)

    def predict_proba(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """A softmax over the classes, as the head was trained."""
        return self.logits(image_embeddings).softmax(dim=-1)

    def topk(self, image_embeddings: torch.Tensor, k: int = 5
             ) -> list[list[tuple[str, float]]]:
        """Per image, the ``k`` most probable (class name, probability) pairs."""
        values, indices = self.predict_proba(image_embeddings).topk(
            min(k, len(self.classnames)), dim=-1)
        return [[(self.classnames[i], float(p)) for p, i in zip(vs.tolist(), ix.tolist())]
                for vs, ix in zip(values, indices)]

    # -- storage ---------------------------------------------------------------------------

    def state_dict(self) -> StateDict:
        """The head's tensors under the names they take in ``model.safetensors``."""
        return {WEIGHT_KEYS[0]: self.weight.contiguous(), WEIGHT_KEYS[1]: self.bias.contiguous()}

    def write_names(self, folder: str | Path) -> Path:
        """Write :data:`CLASSIFIER_FILE` (class names and ``info``) into ``folder``,
        atomically."""
        path = Path(folder) / CLASSIFIER_FILE
        document = {"format": FORMAT, "format_version": 1, "classnames": self.classnames,
                    "probability": self.probability, **self.info}
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n",
                           encoding="utf-8")
        return path


class CacheClassifier(LinearClassifier):
    """Tip-Adapter's classifier: the linear head plus a key-value cache of labelled images.

    A test image's affinity to each cached image, ``a = image @ keys^T`` (cosines when the keys
    are unit embeddings, as the training-free cache holds; Tip-Adapter-F trains the keys), is
    sharpened by ``exp(-beta * (1 - a))`` and votes for the cached image's class; ``alpha``
    weighs the votes against the head.  Without labelled images of its own, a class is still
    scored by the head: the cache only adds what the few labels know."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, classnames: Sequence[str],
                 keys: torch.Tensor, labels: torch.Tensor, alpha: float, beta: float,
                 info: Mapping[str, Any] | None = None):
        super().__init__(weight, bias, classnames, info)
        if keys.ndim != 2 or keys.shape[1] != self.weight.shape[1]:
            raise ValueError(f"the cache's keys must be [images, {self.weight.shape[1]}], got "
                             f"{tuple(keys.shape)}")
        if tuple(labels.shape) != (keys.shape[0],) or labels.is_floating_point():
            raise ValueError(f"the cache needs one integer label per key ({keys.shape[0]}), got "
                             f"{labels.dtype} {tuple(labels.shape)}")
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(self.classnames):
            raise ValueError(f"cache labels must lie in [0, {len(self.classnames)}), got "
                             f"{int(labels.min())}..{int(labels.max())}")
        self.keys = keys.detach().float().cpu()
        self.labels = labels.detach().long().cpu()
        self.alpha, self.beta = float(alpha), float(beta)

    @classmethod
    def from_head(cls, head: LinearClassifier, keys: torch.Tensor, labels: torch.Tensor,
                  alpha: float, beta: float) -> CacheClassifier:
        return cls(head.weight, head.bias, head.classnames, keys, labels, alpha, beta, head.info)

    def cache_logits(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """The cache's votes ``[N, classes]`` before ``alpha``."""
        image = F.normalize(torch.as_tensor(image_embeddings).float().cpu(), dim=-1)
        return cache_votes(image @ self.keys.t(), self.labels, len(self.classnames), self.beta)

    def logits(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        return super().logits(image_embeddings) + self.alpha * self.cache_logits(
            image_embeddings)

    def state_dict(self) -> StateDict:
        return super().state_dict() | dict(zip(CACHE_KEYS, (
            self.keys.contiguous(), self.labels.contiguous(),
            torch.tensor(self.alpha, dtype=torch.float64),  # the chosen values, not rounded
            torch.tensor(self.beta, dtype=torch.float64))))


def cache_votes(affinity: torch.Tensor, labels: torch.Tensor, classes: int, beta: float
                ) -> torch.Tensor:
    """Tip-Adapter's ``exp(-beta * (1 - affinity)) @ one_hot(labels)``, summed per class
    without building the one-hot matrix."""
    weights = torch.exp(-beta * (1 - affinity))
    votes = weights.new_zeros(affinity.shape[0], classes)
    return votes.index_add_(1, labels.to(affinity.device), weights)


def split_classifier(sd: StateDict) -> tuple[StateDict, StateDict]:
    """``(the CLIP tensors, the head's tensors)`` of a state dict: the loader checks the first
    against the architecture key by key and attaches the second."""
    clip = {k: v for k, v in sd.items() if not k.startswith(PREFIX)}
    head = {k: v for k, v in sd.items() if k.startswith(PREFIX)}
    return clip, head


def read_classifier(head: StateDict, folder: Path | None, source: str
                    ) -> LinearClassifier | None:
    """The classifier of a model whose weights held ``head`` (None if they held none), with
    its class names from ``folder``/:data:`CLASSIFIER_FILE`; a head without its names, or names
    that do not fit it, is an error naming the file."""
    if not head:
        return None
    if sorted(head) not in (sorted(WEIGHT_KEYS), sorted(WEIGHT_KEYS + CACHE_KEYS)):
        raise CheckpointError(f"weights from {source} hold classifier tensors "
                              f"{', '.join(sorted(head))}, expected {', '.join(WEIGHT_KEYS)} "
                              f"(and, with a Tip-Adapter cache, {', '.join(CACHE_KEYS)})")
    path = None if folder is None else folder / CLASSIFIER_FILE
    if path is None or not path.is_file():
        raise CheckpointError(f"weights from {source} hold a classifier head but its class "
                              f"names file {CLASSIFIER_FILE} is not beside them; copy the whole "
                              "model directory that `clipforge finetune` wrote")
    try:
        document = parse_json_object(path.read_bytes(), str(path))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    names = document.get("classnames")
    if document.get("format") != FORMAT or not isinstance(names, list) \
            or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path} is not a clipforge classifier file (it needs \"format\": "
                              f"\"{FORMAT}\" and a \"classnames\" list of strings)")
    info = {k: v for k, v in document.items()
            if k not in ("format", "format_version", "classnames", "probability")}
    try:
        linear = LinearClassifier(head[WEIGHT_KEYS[0]], head[WEIGHT_KEYS[1]], names, info)
        if CACHE_KEYS[0] not in head:
            return linear
        keys, labels, alpha, beta = (head[k] for k in CACHE_KEYS)
        return CacheClassifier.from_head(linear, keys, labels, float(alpha), float(beta))
    except ValueError as exc:
        raise CheckpointError(f"{path} names {len(names)} classes, which do not fit the head "
                              f"in {source}: {exc}") from None

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
    if sorted(head) != sorted(WEIGHT_KEYS):
        raise CheckpointError(f"weights from {source} hold classifier tensors "
                              f"{', '.join(sorted(head))}, expected {', '.join(WEIGHT_KEYS)}")
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
        return LinearClassifier(head[WEIGHT_KEYS[0]], head[WEIGHT_KEYS[1]], names, info)
    except ValueError as exc:
        raise CheckpointError(f"{path} names {len(names)} classes, which do not fit the head "
                              f"in {source}: {exc}") from None

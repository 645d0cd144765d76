"""Zero-shot classification: class embeddings from prompt templates (the paper's ensembling)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..inference import embed_texts
from ..model import CLIP


class ZeroShotClassifier:
    """Classes embedded through prompt templates: every prompt is embedded and normalised, the
    prompts of a class averaged, and the mean renormalised (prompt ensembling)."""

    def __init__(self, class_embeddings: torch.Tensor, classnames: Sequence[str],
                 logit_scale: float):
        self.class_embeddings = class_embeddings
        self.classnames = list(classnames)
        self.logit_scale = logit_scale

    @classmethod
    @torch.inference_mode()
    def build(cls, model: CLIP, classnames: Sequence[str], templates: Sequence[str],
              batch_size: int = 256) -> ZeroShotClassifier:
        if not classnames:
            raise ValueError("the class list is empty")
        if not templates or any("{}" not in t for t in templates):
            raise ValueError("templates must be a non-empty list of strings with one '{}'")
        prompts = [t.format(name) for name in classnames for t in templates]
        unique = list(dict.fromkeys(prompts))  # identical prompts are embedded once
        result = embed_texts(model, unique, batch_size=batch_size, truncate=True, progress=False)
        vectors = torch.from_numpy(result.vectors)
        row = {prompt: i for i, prompt in enumerate(unique)}
        index = torch.tensor([row[p] for p in prompts]).view(len(classnames), len(templates))
        class_embeddings = F.normalize(vectors[index].mean(dim=1), dim=-1)
        return cls(class_embeddings, classnames, model.logit_scale.exp().item())

    def logits(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities [N, classes] of (any-norm) image embeddings."""
        image = F.normalize(image_embeddings.float(), dim=-1)
        return self.logit_scale * image @ self.class_embeddings.t()

    def predict(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        return self.logits(image_embeddings).argmax(dim=-1)

    def predict_proba(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        return self.logits(image_embeddings).softmax(dim=-1)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of rows whose label is among the k highest logits."""
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1)
    return hits.float().mean().item()

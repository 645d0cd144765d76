"""Zero-shot classification: class embeddings from prompt templates (the paper's ensembling).

Every prompt ("a photo of a {}." filled with a class name) is embedded and normalised, the
prompts of a class averaged, and the mean renormalised.  Building ImageNet's classifier means
80,000 prompts; three things make that fast without changing the result beyond float32
round-off:

* identical prompts are embedded once;
* the prompts of one template share their tokens up to the class name ("<start> a bad photo of
  a"), and a causal text tower computes those positions the same way for every class, so each
  template's shared prefix runs once and only the rest of each prompt (about 4 of 10 tokens for
  ImageNet) runs per class (``CLIP.encode_text_with_prefix``);
* the remaining suffixes are batched by length, so almost no padding is computed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..fileio import atomic_file
from ..model import CLIP
from ..prompts import validate_templates
from ..text import get_tokenizer

Templates = Sequence[str] | Mapping[str, Sequence[str]]
# Suffix tokens per forward pass: large enough for efficient matrix products, small enough
# that activations stay in cache-friendly sizes.
TOKENS_PER_BATCH = 4096


def class_prompts(classnames: Sequence[str], templates: Templates) -> list[list[tuple[str, str]]]:
    """For each class, its (template, prompt) pairs.  ``templates`` is one list for every class
    or a mapping from class name to that class's own list (checked by
    :func:`clipforge.prompts.validate_templates`)."""
    classnames = list(classnames)
    if not classnames:
        raise ValueError("the class list is empty; give at least one class name")
    templates = validate_templates(templates)
    if isinstance(templates, dict):
        missing = [c for c in classnames if c not in templates]
        if missing:
            raise ValueError(f"per-class templates give none for {len(missing)} class(es), "
                             f"e.g. {missing[0]!r}")
        per_class = [templates[c] for c in classnames]
    else:
        per_class = [templates] * len(classnames)
    return [[(t, t.format(name)) for t in ts] for name, ts in zip(classnames, per_class)]


@torch.inference_mode()
def embed_prompts(model: CLIP, prompts_by_template: Mapping[str, Sequence[str]],
                  progress: bool = False) -> dict[str, torch.Tensor]:
    """Unit-norm float32 embeddings of prompts grouped by the template that made them.

    Within a group, the token prefix common to all prompts runs once; the suffixes run sorted
    by length in batches of about ``TOKENS_PER_BATCH`` tokens.  Prompts longer than the context
    are truncated, keeping their end-of-text token (as ``tokenize(..., truncate=True)``).
    """
    tokenizer = get_tokenizer()
    total = sum(len(p) for p in prompts_by_template.values())
    out: dict[str, torch.Tensor] = {}
    with tqdm(total=total, disable=not progress, unit="prompt", desc="prompts") as bar:
        for group in prompts_by_template.values():
            prompts = list(dict.fromkeys(p for p in group if p not in out))
            bar.update(len(group) - len(prompts))  # embedded already
            if not prompts:
                continue
            rows = tokenizer(prompts, context_length=model.context_length, truncate=True)
            eot = rows.argmax(dim=-1)
            same = (rows == rows[0]).all(dim=0).long().cumprod(dim=0).sum()
            shared = max(1, min(int(same), int(eot.min())))  # every suffix keeps its end token
            prefix = rows[0, :shared].to(model.device)
            suffixes = rows[:, shared:]
            for batch in _length_batches((eot + 1 - shared).tolist(), TOKENS_PER_BATCH):
                vectors = model.encode_text_with_prefix(prefix, suffixes[batch].to(model.device))
                vectors = F.normalize(vectors.float(), dim=-1).cpu()
                for i, vector in zip(batch, vectors):
                    out[prompts[i]] = vector
                bar.update(len(batch))
    return out


def _length_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices sorted by length (so each batch's attention pads little), cut into batches of
    about ``budget`` tokens: the projections and MLPs run on exactly those tokens."""
    batches: list[list[int]] = []
    batch: list[int] = []
    tokens = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if batch and (len(batch) + 1) * lengths[i] > budget:
            batches.append(batch)
            batch, tokens = [], 0
        batch.append(i)
        tokens += lengths[i]
    return [*batches, batch] if batch else batches


class ZeroShotClassifier:
    """Class embeddings [classes, dim] (unit rows) built from prompt templates, and the model's
    temperature: a classifier that needs no training."""

    def __init__(self, class_embeddings: torch.Tensor, classnames: Sequence[str],
                 logit_scale: float):
        if class_embeddings.ndim != 2 or class_embeddings.shape[0] != len(classnames):
            raise ValueError(f"class_embeddings must be [{len(classnames)}, dim], got "
                             f"{tuple(class_embeddings.shape)}")
        self.class_embeddings = class_embeddings
        self.classnames = list(classnames)
        self.logit_scale = float(logit_scale)

    @classmethod
    def build(cls, model: CLIP, classnames: Sequence[str], templates: Templates,
              progress: bool = False) -> ZeroShotClassifier:
        """Embed every class's prompts, normalise each, average per class and renormalise.

        ``templates`` is a list of format strings with one ``{}`` for every class, or a
        mapping from class name to that class's templates.
        """
        per_class = class_prompts(classnames, templates)
        groups: dict[str, list[str]] = {}
        for pairs in per_class:
            for template, prompt in pairs:
                groups.setdefault(template, []).append(prompt)
        vectors = embed_prompts(model, groups, progress=progress)
        means = torch.stack([torch.stack([vectors[p] for _, p in pairs]).mean(dim=0)
                             for pairs in per_class])
        return cls(F.normalize(means, dim=-1), classnames, model.logit_scale.exp().item())

    # -- saving and loading ----------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the class embeddings, class names and temperature as one safetensors file
        (written to a temporary file, then renamed)."""
        from safetensors.torch import save_file

        path = Path(path)
        metadata = {"classnames": json.dumps(self.classnames),
                    "logit_scale": repr(self.logit_scale), "format": "clipforge-zeroshot"}
        with atomic_file(path) as tmp:
            save_file({"class_embeddings": self.class_embeddings.contiguous()}, str(tmp),
                      metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ZeroShotClassifier:
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                embeddings = f.get_tensor("class_embeddings")
        except Exception as exc:  # safetensors raises several kinds for broken files
            raise ValueError(f"{path}: not a readable zero-shot classifier file ({exc})") from exc
        if metadata.get("format") != "clipforge-zeroshot":
            raise ValueError(f"{path}: not a zero-shot classifier written by "
                             "ZeroShotClassifier.save")
        return cls(embeddings, json.loads(metadata["classnames"]),
                   float(metadata["logit_scale"]))

    # -- prediction ------------------------------------------------------------------------

    def logits(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities [N, classes] of (any-norm) image embeddings."""
        image = F.normalize(image_embeddings.float(), dim=-1)
        return self.logit_scale * image @ self.class_embeddings.t()

    def predict(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """The most similar class index per image."""
        return self.logits(image_embeddings).argmax(dim=-1)

    def predict_proba(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Softmax over classes at the model's temperature."""
        return self.logits(image_embeddings).softmax(dim=-1)

    def topk(self, image_embeddings: torch.Tensor, k: int = 5
             ) -> list[list[tuple[str, float]]]:
        """Per image, the ``k`` most probable (class name, probability) pairs."""
        probs = self.predict_proba(image_embeddings)
        values, indices = probs.topk(min(k, probs.shape[1]), dim=-1)
        return [[(self.classnames[i], float(p)) for p, i in zip(vs.tolist(), ix.tolist())]
                for vs, ix in zip(values, indices)]


"""Zero-shot classification: class embeddings from prompt templates (the paper's ensembling).

This is clipforge's one place for zero-shot logic: the ``classify`` command, the server's
``/api/classify``, evaluation and the plots all classify through :class:`ZeroShotClassifier`,
which carries the model's temperature, its logit bias and how it forms probabilities (a softmax
over the classes, or a sigmoid per class for SigLIP-style models), so that probabilities are
the model's own wherever they are shown.

Every prompt ("a photo of a {}." filled with a class name) is tokenized by the model's own
tokenizer, embedded and normalised, the prompts of a class averaged, and the mean renormalised.
Building ImageNet's classifier means 80,000 prompts; three things make that fast without
changing the result beyond float32 round-off:

* identical prompts are embedded once;
* the prompts of one template share their tokens up to the class name ("<start> a bad photo of
  a"), and a causal text tower computes those positions the same way for every class, so each
  template's shared prefix runs once and only the rest of each prompt (about 4 of 10 tokens for
  ImageNet) runs per class (``CLIP.encode_text_with_prefix``; only where
  ``model.shares_prefixes``: other towers run each prompt whole);
* the remaining suffixes (or prompts) are batched by length, so almost no padding is computed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..encoder import Encoder
from ..fileio import atomic_file
from ..inference import token_lengths
from ..prompts import validate_templates

Templates = Sequence[str] | Mapping[str, Sequence[str]]
PROBABILITIES = ("softmax", "sigmoid")
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
def embed_prompts(model: Encoder, prompts_by_template: Mapping[str, Sequence[str]],
                  progress: bool = False) -> dict[str, torch.Tensor]:
    """Unit-norm float32 embeddings of prompts grouped by the template that made them.

    Prompts are tokenized by ``model.tokenizer``; those longer than the context are truncated,
    keeping their end-of-text token (as ``tokenize(..., truncate=True)``).  Where
    ``model.shares_prefixes``, the token prefix common to a group runs once and the suffixes
    run sorted by length in batches of about ``TOKENS_PER_BATCH`` tokens; otherwise each
    group's prompts run whole, batched by length the same way.
    """
    total = sum(len(p) for p in prompts_by_template.values())
    out: dict[str, torch.Tensor] = {}
    with tqdm(total=total, disable=not progress, unit="prompt", desc="prompts") as bar:
        for group in prompts_by_template.values():
            prompts = list(dict.fromkeys(p for p in group if p not in out))
            bar.update(len(group) - len(prompts))  # embedded already
            if not prompts:
                continue
            rows = model.tokenizer(prompts, truncate=True)
            embed = _with_shared_prefix if model.shares_prefixes else _whole
            for batch, vectors in embed(model, rows):
                for i, vector in zip(batch, F.normalize(vectors.float(), dim=-1).cpu()):
                    out[prompts[i]] = vector
                bar.update(len(batch))
    return out


def _with_shared_prefix(model: Encoder, rows: torch.Tensor):
    """(indices, embeddings) batches of ``rows`` whose common token prefix runs once (a causal
    tower pooled at the arg-max end token: ``model.shares_prefixes``)."""
    eot = rows.argmax(dim=-1)
    same = (rows == rows[0]).all(dim=0).long().cumprod(dim=0).sum()
    shared = max(1, min(int(same), int(eot.min())))  # every suffix keeps its end token
    prefix = rows[0, :shared].to(model.device)
    suffixes = rows[:, shared:]
    for batch in _length_batches((eot + 1 - shared).tolist(), TOKENS_PER_BATCH):
        yield batch, model.encode_text_with_prefix(prefix, suffixes[batch].to(model.device))


def _whole(model: Encoder, rows: torch.Tensor):
    """(indices, embeddings) batches of ``rows``, each prompt run whole."""
    lengths = token_lengths(rows, model.tokenizer.pad_id).tolist()
    for batch in _length_batches(lengths, TOKENS_PER_BATCH):
        yield batch, model.encode_text(rows[batch].to(model.device))


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
    """Class embeddings [classes, dim] (unit rows) built from prompt templates, with the model's
    temperature (``logit_scale``, the multiplier ``exp(model.logit_scale)``), its logit bias
    (None for a softmax model) and how it forms probabilities (``probability``: "softmax" over
    the classes, or "sigmoid" per class for a sigmoid-loss model such as SigLIP): a classifier
    that needs no training."""

    def __init__(self, class_embeddings: torch.Tensor, classnames: Sequence[str],
                 logit_scale: float, logit_bias: float | None = None,
                 probability: str = "softmax"):
        if class_embeddings.ndim != 2 or class_embeddings.shape[0] != len(classnames):
            raise ValueError(f"class_embeddings must be [{len(classnames)}, dim], got "
                             f"{tuple(class_embeddings.shape)}")
        if probability not in PROBABILITIES:
            raise ValueError(f"unknown probability {probability!r}; choose one of "
                             f"{', '.join(PROBABILITIES)}")
        self.class_embeddings = class_embeddings
        self.classnames = list(classnames)
        self.logit_scale = float(logit_scale)
        self.logit_bias = None if logit_bias is None else float(logit_bias)
        self.probability = probability

    @classmethod
    def build(cls, model: Encoder, classnames: Sequence[str], templates: Templates,
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
        bias = model.logit_bias
        return cls(F.normalize(means, dim=-1), classnames, _float32(model.logit_scale).exp().item(),
                   None if bias is None else _float32(bias).item(), model.config.probability)

    # -- saving and loading ----------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the class embeddings, class names, temperature, bias and probability kind as
        one safetensors file (written to a temporary file, then renamed)."""
        from safetensors.torch import save_file

        path = Path(path)
        metadata = {"classnames": json.dumps(self.classnames),
                    "logit_scale": repr(self.logit_scale), "format": "clipforge-zeroshot",
                    "probability": self.probability}
        if self.logit_bias is not None:
            metadata["logit_bias"] = repr(self.logit_bias)
        with atomic_file(path) as tmp:
            save_file({"class_embeddings": self.class_embeddings.contiguous()}, str(tmp),
                      metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ZeroShotClassifier:
        """A classifier :meth:`save` wrote (files from before the bias and probability kind
        were recorded read as softmax classifiers without a bias, which they were)."""
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
        bias = metadata.get("logit_bias")
        try:
            return cls(embeddings, json.loads(metadata["classnames"]),
                       float(metadata["logit_scale"]), None if bias is None else float(bias),
                       metadata.get("probability", "softmax"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: damaged zero-shot classifier metadata ({exc})") from None

    # -- prediction ------------------------------------------------------------------------

    def logits(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Scaled cosine similarities [N, classes] of (any-norm) image embeddings, plus the
        model's logit bias if it has one."""
        image = F.normalize(image_embeddings.float(), dim=-1)
        logits = self.logit_scale * image @ self.class_embeddings.t()
        return logits if self.logit_bias is None else logits + self.logit_bias

    def predict(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """The most similar class index per image."""
        return self.logits(image_embeddings).argmax(dim=-1)

    def predict_proba(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """Probabilities [N, classes] as the model gives them: a softmax over the classes at
        the model's temperature, or for a sigmoid-loss model an independent sigmoid per class
        (which need not sum to one)."""
        logits = self.logits(image_embeddings)
        return logits.sigmoid() if self.probability == "sigmoid" else logits.softmax(dim=-1)

    def topk(self, image_embeddings: torch.Tensor, k: int = 5
             ) -> list[list[tuple[str, float]]]:
        """Per image, the ``k`` most probable (class name, probability) pairs."""
        probs = self.predict_proba(image_embeddings)
        values, indices = probs.topk(min(k, probs.shape[1]), dim=-1)
        return [[(self.classnames[i], float(p)) for p, i in zip(vs.tolist(), ix.tolist())]
                for vs, ix in zip(values, indices)]


def _float32(value: object) -> torch.Tensor:
    """A 0-d tensor or array of any Encoder (its logit scale or bias) as a float32 tensor."""
    return torch.as_tensor(value).detach().float()

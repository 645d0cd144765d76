"""Ranking and scoring with CLIP: cosine similarity between an image and a text as a judgement.

* :func:`rank_images` -- order candidate images by their cosine similarity to one prompt, as
  DALL-E's samples were reranked by CLIP (the order is the same as by the scaled logits).
* :func:`clip_score` -- CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation
  Metric for Image Captioning"): ``w * max(cos(image, caption), 0)`` per image-caption pair.
* :func:`ref_clip_score` -- RefCLIPScore, the harmonic mean of CLIPScore and the caption's
  best (non-negative) cosine with human reference captions.

The scores follow the reference code (jmhessel/clipscore): ``w = 2.5`` and captions prefixed with
"A photo depicts " (``prefix=""`` turns that off).  Figures are comparable with the paper's only
for the same model (ViT-B/32 with OpenAI's weights).  Unlike the reference code, an over-long
caption is skipped and reported rather than silently cut (``truncate=True`` cuts it, as
the reference code does), and an unreadable image skips its pairs instead of stopping the run:
every item goes through :mod:`clipforge.inference`, which reports what it cannot embed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..encoder import Encoder
from ..inference import embed_images, embed_texts
from ..reading import find_images
from ..text import ContextLengthError

PREFIX = "A photo depicts "  # Hessel et al.'s prompt before every candidate and reference


class Ranking(NamedTuple):
    """Images with their cosine similarity to the prompt, best first, and the unreadable files
    with the reason.  Unpacks as ``ranked, skipped = rank_images(...)``."""

    ranked: list[tuple[str, float]]
    skipped: list[tuple[str, str]]


@dataclass
class PairScores:
    """One score per (image, caption) pair, in input order; ``nan`` where the pair was skipped,
    with ``skipped`` giving (pair index, reason)."""

    images: list[str]
    captions: list[str]
    scores: np.ndarray
    skipped: list[tuple[int, str]] = field(default_factory=list)

    @property
    def scored(self) -> int:
        return int(np.count_nonzero(~np.isnan(self.scores)))

    @property
    def mean(self) -> float:
        """Mean over the scored pairs (``nan`` when none could be scored)."""
        return float(np.nanmean(self.scores)) if self.scored else math.nan

    def rows(self) -> list[dict[str, Any]]:
        """JSON-ready rows: image, caption, and score or the reason it is missing."""
        reasons = dict(self.skipped)
        return [{"image": image, "caption": caption, "score": float(score)} if i not in reasons
                else {"image": image, "caption": caption, "score": None, "skipped": reasons[i]}
                for i, (image, caption, score) in enumerate(
                    zip(self.images, self.captions, self.scores, strict=True))]


def rank_images(model: Encoder, prompt: str, image_paths: Sequence[str | Path],
                batch_size: int = 32, *, truncate: bool = False, num_workers: int = 0,
                progress: bool = False) -> Ranking:
    """Order images (files, or folders searched for image files) by cosine similarity to
    ``prompt``, best first; ties keep input order.  Unreadable files are skipped and listed.

    An over-long prompt raises :class:`~clipforge.text.ContextLengthError` unless ``truncate``.
    """
    text = embed_texts(model, [prompt], truncate=truncate, progress=False)
    if text.failures:
        raise ContextLengthError(text.failures[0][1])
    images = embed_images(model, find_images(image_paths), batch_size=batch_size,
                          num_workers=num_workers, progress=progress)
    scores = images.vectors @ text.vectors[0]
    order = np.argsort(-scores, kind="stable")
    ranked = [(images.ids[i], float(scores[i])) for i in order]
    return Ranking(ranked, list(images.failures))


def _prefixed(prefix: str, caption: str) -> str:
    if prefix and not prefix.endswith(" "):
        prefix += " "  # as the reference code does
    return prefix + caption


class _Embedded:
    """Unit embeddings of distinct images and (prefixed) texts, each embedded once: a COCO image
    has five captions, and the same reference can serve many candidates."""

    def __init__(self, model: Encoder, image_paths: Sequence[str | Path], texts: Sequence[str],
                 truncate: bool, batch_size: int, num_workers: int, progress: bool):
        paths = list(dict.fromkeys(str(Path(p)) for p in image_paths))
        images = embed_images(model, paths, batch_size=batch_size, num_workers=num_workers,
                              progress=progress)
        self.image = dict(zip(images.ids, images.vectors, strict=True))
        self.image_error = dict(images.failures)
        unique = list(dict.fromkeys(texts))
        result = embed_texts(model, unique, batch_size=max(batch_size, 1), truncate=truncate,
                             progress=progress)
        self.text = {unique[int(i)]: v for i, v in zip(result.ids, result.vectors, strict=True)}
        self.text_error = {unique[int(i)]: reason for i, reason in result.failures}


def _check_pairs(image_paths: Sequence[str | Path], captions: Sequence[str]) -> None:
    if isinstance(image_paths, str | Path) or isinstance(captions, str):
        raise TypeError("image_paths and captions must be sequences, one item per pair, not a "
                        "single path or string")
    if len(image_paths) != len(captions):
        raise ValueError(f"{len(image_paths)} images but {len(captions)} captions: CLIPScore "
                         "needs exactly one caption per image (repeat an image for several)")


def _clip_s(w: float, image: np.ndarray, text: np.ndarray) -> float:
    return w * max(float(image @ text), 0.0)


def clip_score(model: Encoder, image_paths: Sequence[str | Path], captions: Sequence[str],
               w: float = 2.5, batch_size: int = 64, *, prefix: str = PREFIX,
               truncate: bool = False, num_workers: int = 0,
               progress: bool = False) -> PairScores:
    """CLIPScore of each (image, caption) pair: ``w * max(cos(E_image, E_caption), 0)``.

    Pairs whose image cannot be read or whose (prefixed) caption is longer than the model's
    context are skipped and reported, unless ``truncate`` cuts over-long captions.  ``.mean`` is
    the corpus-level score over the pairs scored.
    """
    _check_pairs(image_paths, captions)
    texts = [_prefixed(prefix, c) for c in captions]
    emb = _Embedded(model, image_paths, texts, truncate, batch_size, num_workers, progress)
    images = [str(Path(p)) for p in image_paths]
    scores = np.full(len(images), np.nan)
    skipped = []
    for i, (image, text) in enumerate(zip(images, texts, strict=True)):
        reason = emb.image_error.get(image) or emb.text_error.get(text)
        if reason:
            skipped.append((i, reason))
        else:
            scores[i] = _clip_s(w, emb.image[image], emb.text[text])
    return PairScores(images, list(captions), scores, skipped)


def ref_clip_score(model: Encoder, image_paths: Sequence[str | Path], captions: Sequence[str],
                   references: Sequence[Sequence[str]], w: float = 2.5, batch_size: int = 64,
                   *, prefix: str = PREFIX, truncate: bool = False, num_workers: int = 0,
                   progress: bool = False) -> tuple[PairScores, PairScores]:
    """(CLIPScore, RefCLIPScore) per pair; RefCLIPScore is the harmonic mean of CLIPScore and
    ``max(max_r cos(E_caption, E_r), 0)`` over the pair's references ``references[i]``.

    Over-long references are dropped (or cut with ``truncate``); a pair left with no usable
    reference is skipped in both results, so that both means are over the same pairs.
    """
    _check_pairs(image_paths, captions)
    if len(references) != len(captions):
        raise ValueError(f"{len(captions)} captions but {len(references)} reference lists: "
                         "give one list of reference captions per pair")
    if any(isinstance(refs, str) for refs in references):
        raise TypeError("references[i] must be a list of reference captions, not one string")
    texts = [_prefixed(prefix, c) for c in captions]
    refs = [[_prefixed(prefix, r) for r in pair_refs] for pair_refs in references]
    emb = _Embedded(model, image_paths, texts + [r for rs in refs for r in rs], truncate,
                    batch_size, num_workers, progress)
    images = [str(Path(p)) for p in image_paths]
    plain, combined = np.full(len(images), np.nan), np.full(len(images), np.nan)
    skipped = []
    for i, (image, text) in enumerate(zip(images, texts, strict=True)):
        usable = [emb.text[r] for r in refs[i] if r in emb.text]
        reason = emb.image_error.get(image) or emb.text_error.get(text)
        if not reason and not usable:
            reason = (f"no usable reference caption ({len(refs[i])} given"
                      + (", all longer than the context)" if refs[i] else ")"))
        if reason:
            skipped.append((i, reason))
            continue
        plain[i] = a = _clip_s(w, emb.image[image], emb.text[text])
        b = max(max(float(emb.text[text] @ r) for r in usable), 0.0)
        combined[i] = 2 * a * b / (a + b) if a + b > 0 else 0.0
    return (PairScores(images, list(captions), plain, list(skipped)),
            PairScores(images, list(captions), combined, list(skipped)))


def pairs_from_csv(path: str | Path, image_key: str = "filepath", caption_key: str = "title",
                   separator: str | None = None) -> tuple[list[Path], list[str]]:
    """Image paths and captions from a CSV/TSV with a header row, read as training reads them
    (:class:`~clipforge.data.sources.CsvCaptions`: relative paths resolve against the file's
    folder, a tab separates ``.tsv`` columns)."""
    from ..data.sources import CsvCaptions

    table = CsvCaptions(path, image_key=image_key, caption_key=caption_key, separator=separator)
    return [table.image_path(i) for i in range(len(table))], list(table.captions)

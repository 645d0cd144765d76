"""CLIP_benchmark's ``image_caption_selection`` task: SugarCrepe and Winoground.

Each instance holds I images and T captions, image i belonging with caption i (for the first
``min(I, T)``); the rest are hard negatives.  As CLIP_benchmark scores it
(``clip_benchmark.metrics.image_caption_selection``):

* ``text_acc``: every image's most similar caption is its own;
* ``image_acc``: every caption's most similar image is its own;
* ``acc``: both at once.

SugarCrepe has one image and two captions (the true one and a hard negative that swaps, replaces
or adds an attribute or object), so ``text_acc`` = ``acc`` is its score and ``image_acc`` is 1
by construction; Winoground has two images and two captions made of the same words, and its
text, image and group scores are ``text_acc``, ``image_acc`` and ``acc``.  Ties go to the
lower index, as ``torch.argmax`` breaks them in CLIP_benchmark.

Formats read (a file given to ``clipforge eval --task image_caption_selection``):

* SugarCrepe's annotation files (``swap_att.json`` ...): a JSON object of
  ``{id: {"filename", "caption", "negative_caption"}}``, the images (COCO val2017) found under
  the image folder given, the file's folder, or its ``val2017/`` or ``images/`` subfolder;
* Winoground's ``examples.jsonl`` (or a JSON list): records with ``image_0``, ``image_1``,
  ``caption_0`` and ``caption_1``; image names without a suffix get ``.png`` (the release's
  ``images/ex_0_img_0.png``).

An instance whose image is missing or unreadable, or whose captions are empty, is skipped and
reported; the rest are scored.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from .. import inference
from ..model import CLIP
from ..reading import BadItem, DataError, open_image_file, read_utf8

TASK = "image_caption_selection"
METRICS = ("image_acc", "text_acc", "acc")
IMAGE_FOLDERS = ("", "val2017", "images")  # where image names are looked up, beside the file
SUFFIXES = ("", ".png", ".jpg", ".jpeg")
# SugarCrepe's annotation files: a record of one of them is named as CLIP_benchmark names the
# dataset ("sugar_crepe/swap_att"), so that result tables from both tools line up.
SUGAR_CREPE_TASKS = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel",
                     "swap_att", "swap_obj")


@dataclass
class Instance:
    """Images (paths, or images already in memory) and captions; image i goes with caption i."""

    key: str
    images: list[Path | Image.Image]
    captions: list[str]


@dataclass
class SelectionData:
    name: str
    format: str
    instances: list[Instance]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def selection_metrics(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor
                      ) -> dict[str, float]:
    """``{"image_acc", "text_acc", "acc"}`` of instances embedded as [N, I, dim] images and
    [N, T, dim] captions (any norm), as CLIP_benchmark computes them."""
    if image_embeddings.ndim != 3 or text_embeddings.ndim != 3 or \
            image_embeddings.shape[0] != text_embeddings.shape[0]:
        raise ValueError(f"expected [N, images, dim] and [N, captions, dim], got "
                         f"{tuple(image_embeddings.shape)} and {tuple(text_embeddings.shape)}")
    if image_embeddings.shape[0] == 0:
        raise ValueError("no instance to score")
    images = F.normalize(image_embeddings.float(), dim=-1)
    texts = F.normalize(text_embeddings.float(), dim=-1)
    scores = images @ texts.transpose(1, 2)  # [N, I, T]
    matched = min(scores.shape[1], scores.shape[2])
    truth = torch.arange(matched)
    text_right = (scores.argmax(dim=2)[:, :matched] == truth).all(dim=1)
    image_right = (scores.argmax(dim=1)[:, :matched] == truth).all(dim=1)
    return {"image_acc": image_right.float().mean().item(),
            "text_acc": text_right.float().mean().item(),
            "acc": (text_right & image_right).float().mean().item()}


# --------------------------------------------------------------------------- reading

def load_selection(path: str | Path, image_root: str | Path | None = None) -> SelectionData:
    """Read a SugarCrepe or Winoground file (see the module docstring); images are checked
    when embedded, not here."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; give a SugarCrepe annotation file (e.g. "
                        "swap_att.json) or Winoground's examples.jsonl")
    if image_root is not None and not Path(image_root).is_dir():
        raise DataError(f"{image_root}: no such folder (the images of {path})")
    text = read_utf8(path, "annotation file")
    records = _parse(path, text)
    folders = [Path(image_root)] if image_root is not None else []
    folders += [path.parent / sub for sub in IMAGE_FOLDERS]
    if isinstance(records, dict):
        return _sugar_crepe(path, records, folders)
    return _winoground(path, records, folders)


def _parse(path: Path, text: str) -> dict | list:
    try:
        return json.loads(text)
    except json.JSONDecodeError as first:
        try:  # JSON lines
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise DataError(f"{path}: not JSON or JSON lines ({first})") from None


def _find(name: Any, folders: Sequence[Path]) -> Path | None:
    if not isinstance(name, str) or not name:
        return None
    for folder in folders:
        for suffix in SUFFIXES if not Path(name).suffix else ("",):
            candidate = folder / (name + suffix)
            if candidate.is_file():
                return candidate
    return None


def _instance(key: str, names: Sequence[Any], captions: Sequence[Any],
              folders: Sequence[Path], skipped: list[tuple[str, str]]) -> Instance | None:
    images = [_find(n, folders) for n in names]
    if not all(isinstance(c, str) and c.strip() for c in captions):
        skipped.append((key, "empty caption"))
        return None
    missing = [str(n) for n, found in zip(names, images) if found is None]
    if missing:
        skipped.append((key, f"missing image ({', '.join(missing)} not found in "
                             f"{', '.join(str(f) for f in folders)})"))
        return None
    return Instance(key, list(images), [c.strip() for c in captions])


def _sugar_crepe(path: Path, records: dict, folders: Sequence[Path]) -> SelectionData:
    skipped: list[tuple[str, str]] = []
    instances = []
    for key, record in records.items():
        if not isinstance(record, dict) or not {"filename", "caption",
                                                "negative_caption"} <= set(record):
            raise DataError(f"{path}: entry {key!r} lacks filename, caption or "
                            "negative_caption: not a SugarCrepe annotation file")
        found = _instance(str(key), [record["filename"]],
                          [record["caption"], record["negative_caption"]], folders, skipped)
        if found is not None:
            instances.append(found)
    name = f"sugar_crepe/{path.stem}" if path.stem in SUGAR_CREPE_TASKS else path.stem
    return SelectionData(name, "sugar_crepe", instances, skipped)


def _winoground(path: Path, records: list, folders: Sequence[Path]) -> SelectionData:
    keys = ("image_0", "image_1", "caption_0", "caption_1")
    skipped: list[tuple[str, str]] = []
    instances = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or not set(keys) <= set(record):
            raise DataError(f"{path}: record {i + 1} lacks one of {', '.join(keys)}: not "
                            "Winoground's examples.jsonl")
        key = str(record.get("id", i))
        found = _instance(key, [record["image_0"], record["image_1"]],
                          [record["caption_0"], record["caption_1"]], folders, skipped)
        if found is not None:
            instances.append(found)
    # the release's file is examples.jsonl; CLIP_benchmark calls the dataset "winoground"
    name = "winoground" if path.stem == "examples" else path.stem
    return SelectionData(name, "winoground", instances, skipped)


# --------------------------------------------------------------------------- scoring

def _open(image: Path | Image.Image) -> Image.Image:
    return image if isinstance(image, Image.Image) else open_image_file(image).convert("RGB")


def _placed(result: inference.Embeddings, count: int) -> torch.Tensor:
    """[count, dim] float32 rows of ``result`` at their input positions (zeros where an item
    failed), so that rows can be grouped by instance."""
    rows = torch.zeros(count, result.vectors.shape[1])
    rows[[int(i) for i in result.ids]] = torch.from_numpy(result.vectors)
    return rows


def _embed(model: CLIP, batch: Sequence[Instance], pictures: Sequence[Image.Image],
           batch_size: int) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """Embed a batch of instances (their opened images, in order) through
    :mod:`clipforge.inference`, the one embedding path.  Returns the [B, I, dim] image and
    [B, T, dim] caption embeddings of the instances kept, and ``(key, reason)`` for each
    instance dropped because the model could not take one of its images or captions."""
    shape_i, shape_t = len(batch[0].images), len(batch[0].captions)
    images = inference.embed_pictures(model, pictures, batch_size=batch_size, progress=False)
    texts = inference.embed_texts(model, [c for inst in batch for c in inst.captions],
                                  truncate=True, progress=False)
    dropped: dict[int, str] = {}
    for failures, per_instance, what in ((images.failures, shape_i, "image"),
                                         (texts.failures, shape_t, "caption")):
        for position, reason in failures:
            instance, item = divmod(int(position), per_instance)
            detail = reason.partition(": ")[2] or reason  # it names the position in the batch
            dropped.setdefault(instance, f"cannot use {what} {item}: {detail}")
    kept = [i for i in range(len(batch)) if i not in dropped]
    image_rows = _placed(images, len(pictures)).view(len(batch), shape_i, -1)[kept]
    text_rows = _placed(texts, len(batch) * shape_t).view(len(batch), shape_t, -1)[kept]
    return image_rows, text_rows, [(batch[i].key, r) for i, r in dropped.items()]


def score_instances(model: CLIP, instances: Sequence[Instance], batch_size: int = 64
                    ) -> tuple[dict[str, float], list[tuple[str, str]], int]:
    """Embed and score instances that all have the same numbers of images and captions; an
    instance with an image that cannot be read or used is skipped.  Returns the metrics, the
    skipped (key, reason) pairs and how many instances were scored.  ``batch_size`` instances
    are opened at a time, so memory does not grow with the file."""
    skipped: list[tuple[str, str]] = []
    image_rows, text_rows = [], []
    for start in range(0, len(instances), batch_size):
        batch, pictures = [], []
        for instance in instances[start:start + batch_size]:
            try:
                opened = [_open(im) for im in instance.images]
            except BadItem as exc:
                skipped.append((instance.key, str(exc)))
                continue
            batch.append(instance)
            pictures.extend(opened)
        if not batch:
            continue
        images, texts, dropped = _embed(model, batch, pictures, batch_size)
        skipped += dropped
        image_rows.append(images)
        text_rows.append(texts)
    if not any(len(rows) for rows in image_rows):
        raise DataError("no instance could be scored: every one was skipped "
                        f"({skipped[0][1] if skipped else 'none given'})")
    images, texts = torch.cat(image_rows), torch.cat(text_rows)
    return selection_metrics(images, texts), skipped, len(images)


def caption_selection(model: CLIP, dataset: str, options: Any) -> dict[str, Any]:
    """``clipforge eval --task image_caption_selection``: the record's task-specific part
    (``dataset``, ``metrics`` and what clipforge adds), as :mod:`.tasks` assembles it.
    ``options.images``, when set, is the folder the images are looked up in first."""
    root = getattr(options, "images", None)
    data = load_selection(dataset, image_root=root)
    if not data.instances:
        reason = data.skipped[0][1] if data.skipped else "the file lists no instance"
        raise DataError(f"{dataset}: no instance to score ({reason})")
    metrics, skipped, scored = score_instances(model, data.instances,
                                               batch_size=getattr(options, "batch_size", 64))
    failures = [{"item": key, "reason": reason} for key, reason in data.skipped + skipped]
    return {"dataset": getattr(options, "dataset_name", None) or data.name, "metrics": metrics,
            "format": data.format, "n_instances": scored, "skipped": failures}

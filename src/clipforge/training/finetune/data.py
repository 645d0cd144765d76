"""The labelled images a fine-tuning run learns from and is validated on.

Sets are read by the evaluation readers (:func:`clipforge.evaluation.datasets.load_classification`:
ImageFolder, CSV with labels, webdataset with ``.cls``), so ``finetune`` takes exactly what
``clipforge eval`` takes.  Training needs the items by index (a fresh order each epoch, a
held-out share): image files are addressed by index as they are; a stream of shards is read
once, preprocessed, into memory (fine for the labelled sets people fine-tune on; streaming
shards is left for a later slice).

Items keep the evaluation readers' form, ``(tag, pixels or None, reason)``, so an unreadable
image is skipped and counted, never fatal, and they go straight through
:func:`clipforge.inference.embed_image_batches` for validation.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ...evaluation.datasets import ClassificationData, ImageFiles, Invalid, load_classification
from ...reading import DataError

log = logging.getLogger("clipforge.finetune")


@dataclass
class Labelled:
    """Indexable items ``(tag, pixels or None, reason)`` with their targets (``targets[i]`` is
    item i's class), the class names, the prompt templates the data ships (if any), and what
    was left out when the set was read."""

    name: str
    classnames: list[str]
    items: Dataset
    targets: list[int]
    templates: list[str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, indices: Sequence[int], name: str, keep_skipped: bool = False) -> Labelled:
        """The items at ``indices`` (a split of this set); ``keep_skipped``: the part that
        reports what reading the set left out."""
        indices = list(indices)
        return Labelled(name, self.classnames, Subset(self.items, indices),
                        [self.targets[i] for i in indices], self.templates,
                        list(self.skipped) if keep_skipped else [])


class _InMemory(Dataset):
    """Items read once from a stream, served by index."""

    def __init__(self, items: list[tuple[Any, torch.Tensor, str]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor, str]:
        return self.items[index]


def _as_list(batch: list) -> list:
    return batch


def read_labelled(spec: str, *, split: str, classnames: Any, preprocess: Any,
                  image_key: str = "filepath", label_key: str = "label", workers: int = 0
                  ) -> Labelled:
    """The labelled set ``spec`` (any kind ``clipforge eval`` reads) as indexable items whose
    pixels come from ``preprocess``."""
    data = load_classification(spec, split=split, classnames=classnames, image_key=image_key,
                               label_key=label_key)
    if isinstance(data.images, ImageFiles):
        return Labelled(data.name, data.classnames, data.images.dataset(preprocess),
                        list(data.images.payloads), data.templates, list(data.skipped))
    return _read_stream(data, preprocess, workers)


def _read_stream(data: ClassificationData, preprocess: Any, workers: int) -> Labelled:
    """Shards read once into memory, in stream order; unusable samples are left out and
    listed, a label outside the class list is an error (as evaluation treats it)."""
    kept: list[tuple[Any, torch.Tensor, str]] = []
    skipped = list(data.skipped)
    loader = DataLoader(data.images.dataset(preprocess), batch_size=64, num_workers=workers,
                        collate_fn=_as_list)
    for batch in loader:
        for tag, pixels, reason in batch:
            if isinstance(tag.payload, Invalid):
                raise DataError(tag.payload.message)
            if pixels is None:
                skipped.append((tag.name, reason))
            else:
                kept.append((tag, pixels, reason))
    kept.sort(key=lambda item: item[0].order)
    return Labelled(data.name, data.classnames, _InMemory(kept),
                    [tag.payload for tag, _, _ in kept], data.templates, skipped)


def split_off(targets: Sequence[int], fraction: float, seed: int
              ) -> tuple[list[int], list[int]]:
    """``(training indices, validation indices)``: ``fraction`` of each class held out, drawn
    by ``seed``.  Per class, so that a small or unbalanced set keeps every class on both sides
    where it can: at least one image of a class with two or more is held out, and at least one
    always stays for training."""
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(target, []).append(index)
    generator = torch.Generator().manual_seed(seed)
    train: list[int] = []
    val: list[int] = []
    for target in sorted(by_class):
        members = by_class[target]
        order = torch.randperm(len(members), generator=generator).tolist()
        held = 0 if fraction == 0 or len(members) < 2 else \
            min(len(members) - 1, max(1, round(fraction * len(members))))
        val += [members[i] for i in order[:held]]
        train += [members[i] for i in order[held:]]
    return sorted(train), sorted(val)


def check_classes(part: Labelled, where: str) -> None:
    """Every class needs training images: a head trained without any for a class can only
    learn to never predict it.  The message names the empty classes and what to do."""
    counts = Counter(part.targets)
    empty = [name for i, name in enumerate(part.classnames) if counts[i] == 0]
    if len(part.classnames) < 2:
        raise DataError(f"{where} has {len(part.classnames)} class; a classifier needs at least "
                        "two classes")
    if empty:
        shown = ", ".join(map(repr, empty[:5])) + (", ..." if len(empty) > 5 else "")
        raise DataError(f"{len(empty)} of the {len(part.classnames)} classes have no training "
                        f"image in {where}: {shown}; add images of them, or remove them (their "
                        "folders, rows or class names)")


def check_same_classes(train: Labelled, val: Labelled, val_spec: str) -> None:
    """The validation set must name the classes of the training set, in the same order."""
    if train.classnames != val.classnames:
        raise DataError(f"the validation set {val_spec} has classes {val.classnames[:5]}..., the "
                        f"training set {train.classnames[:5]}...: they must be the same list in "
                        "the same order (give both the same --classnames, or the same class "
                        "folders)")

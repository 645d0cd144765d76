"""The evaluation sets of ``clipforge eval``: labelled images (zero-shot classification, linear
probes) and captioned images (retrieval), read from the layouts people have them in.

:func:`load_classification` reads

* an ImageFolder tree, ``DIR/<class name>/<images>``: the classes are every sub-folder, sorted,
  and the images are taken in torchvision's order with torchvision's extensions, so targets equal
  ``torchvision.datasets.ImageFolder``'s (which CLIP_benchmark uses for ImageNet and others);
* a CSV/TSV with an image path column and a label column;
* webdataset shards whose samples hold an image and a ``.cls`` label;
* CLIP_benchmark's webdataset export (``clip_benchmark.datasets.builder.build_wds_dataset``):
  ``DIR/classnames.txt``, ``DIR/zeroshot_classification_templates.txt``, optional
  ``DIR/dataset_type.txt`` and ``DIR/<split>/nshards.txt`` with ``DIR/<split>/0.tar ...``.

:func:`load_retrieval` reads a CSV/TSV of (image, caption) rows, a folder of images with
same-name ``.txt`` captions (one per non-empty line), shards with ``.txt`` captions, and
CLIP_benchmark's retrieval export (``dataset_type.txt`` = ``retrieval``).

A path with only a ``<split>`` level below it (``DIR/train``, ``DIR/test``) is read at
``DIR/<split>``; elsewhere ``split`` only picks the CLIP_benchmark split.

**CLIP_benchmark fidelity.** Its exports are read as it reads them, so results compare with its
own: images are taken from the first of ``webp, png, jpg, jpeg`` a sample has, labels are the
integer in ``.cls``, a retrieval sample's captions are ``str.splitlines()`` of its ``.txt``
(kept as they are: CLIP_benchmark does not undo the ``\\n`` escape its exporter writes for
newlines inside a caption, so neither does this), and templates are its ``{c}`` templates,
handed on with ``{}`` in place of ``{c}`` as clipforge's zero-shot classifier takes them.  Where
CLIP_benchmark would quietly go wrong, this stops instead: a blank line inside
``classnames.txt`` (every later class would shift), a label outside the class list, a file that
is not UTF-8.

**Embedding** (:func:`embed_classification`, :func:`embed_retrieval`) goes through
:func:`clipforge.inference.embed_image_batches`: images are decoded and preprocessed in
DataLoader workers, and an unreadable image is skipped and reported (with its captions) while
the run goes on.  Captions longer than the model's context are truncated, keeping the
end-of-text token last, as CLIP_benchmark's tokenizers (open_clip's) do; nothing is skipped for
length.  Results come back in dataset order (shard, then position in the shard) whatever the
number of workers.

Items that cannot be used at all are split in two kinds.  A defect of one item (an unreadable
or missing image, a missing label or caption, a corrupt shard) is skipped and listed as
``(item, reason)``, with the reasons of :mod:`clipforge.reading`.  A contradiction between
the data and its description (a label outside the class list, an unknown class name) raises
:class:`~clipforge.reading.DataError` naming the item: every accuracy computed past it
would be wrong.
"""

from __future__ import annotations

import logging
import os
import re
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..data.sources import FolderCaptions
from ..encoder import Encoder
from ..inference import embed_image_batches, embed_texts
from ..reading import (
    EMPTY_CAPTION,
    MISSING_CAPTION,
    MISSING_IMAGE,
    MISSING_LABEL,
    UNREADABLE_CAPTION,
    UNREADABLE_IMAGE,
    BadItem,
    DataError,
    Sample,
    expand_shards,
    is_shard_spec,
    open_image_bytes,
    open_image_file,
    read_shard,
    read_table,
    read_utf8,
)

log = logging.getLogger(__name__)

_INTEGER = re.compile(r"[+-]?\d+")
# CLIP_benchmark's wds reader takes the first of these a sample has (its ``to_tuple`` order).
WDS_IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")
# torchvision.datasets.folder.IMG_EXTENSIONS: the files ImageFolder counts.
IMAGEFOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff",
                          ".webp")
# Folder names read as splits when they are the only sub-folders of a data directory.
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing",
                         "dev", "eval"})
CB_CLASSNAMES = "classnames.txt"
CB_TEMPLATES = "zeroshot_classification_templates.txt"
CB_TYPE = "dataset_type.txt"
CB_NSHARDS = "nshards.txt"

CB_LAYOUT = ("DIR/classnames.txt (one class per line, line i naming label i), "
             "DIR/zeroshot_classification_templates.txt (one template per line, {c} where the "
             "class name goes), DIR/dataset_type.txt (optional: classification or retrieval), "
             "DIR/<split>/nshards.txt (the number of shards N) and DIR/<split>/0.tar ... "
             "N-1.tar")
CLASSIFICATION_KINDS = (
    "an ImageFolder tree: DIR/<class name>/<image files> (or DIR/<split>/<class name>/...)",
    "a .csv/.tsv with an image path column and a label column (a class name, or an index into "
    "classnames=)",
    "webdataset shards whose samples hold an image (webp/png/jpg/jpeg) and a .cls label: a "
    ".tar file, a brace pattern like shards/{0..9}.tar, a glob, or several joined with '::'",
    f"CLIP_benchmark's webdataset export: {CB_LAYOUT}",
)
RETRIEVAL_KINDS = (
    "a .csv/.tsv with an image path column and a caption column (rows of one image are its "
    "captions)",
    "a directory of images, each with a same-name .txt holding its captions, one per line",
    "webdataset shards whose samples hold an image (webp/png/jpg/jpeg) and a .txt of captions, "
    "one per line",
    f"CLIP_benchmark's webdataset retrieval export: {CB_LAYOUT}, dataset_type.txt saying "
    "retrieval",
)


# --------------------------------------------------------------------------- items


class Tag(NamedTuple):
    """What travels with an image through the DataLoader: its place in the dataset (for a
    stable order whatever the workers), its name for reports, and its payload (a class index,
    or a list of captions)."""

    order: tuple[int, int]
    name: str
    payload: Any


class Invalid(NamedTuple):
    """A payload that contradicts the data's description (a label outside the class list):
    raised as a :class:`DataError` in the main process, which gives a clean message where an
    exception raised in a worker would arrive wrapped in a traceback."""

    message: str


class Example(NamedTuple):
    """One item read in this process: the image (None with ``error`` saying why), and its
    label (class index) or captions."""

    name: str
    image: Image.Image | None
    label: Any
    error: str | None


def _prepare(image: Image.Image, preprocess: Any) -> Any:
    return image if preprocess is None else preprocess(image)


class _FileItems(Dataset):
    """Worker side of :class:`ImageFiles`: item i -> (tag, pixels or None, reason)."""

    def __init__(self, paths: Sequence[Path], payloads: Sequence[Any], preprocess: Any):
        self.paths, self.payloads, self.preprocess = list(paths), list(payloads), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tag, Any, str]:
        tag = Tag((0, index), str(self.paths[index]), self.payloads[index])
        try:
            return tag, _prepare(open_image_file(self.paths[index]), self.preprocess), ""
        except BadItem as exc:
            return tag, None, str(exc)
        except Exception as exc:  # preprocessing an odd image: the item's failure, not the run's
            return tag, None, f"{UNREADABLE_IMAGE} ({type(exc).__name__}: {exc})"


class _ShardItems(IterableDataset):
    """Worker side of :class:`ImageShards`.

    With at least as many shards as DataLoader workers, each worker reads every n-th shard;
    with fewer (one shard, four workers), every worker reads every shard's bytes but decodes
    only every n-th sample, so all workers decode.  Either way each item is yielded once, tagged
    with (shard index, position in shard)."""

    def __init__(self, urls: Sequence[str], label: str, num_classes: int | None,
                 preprocess: Any):
        self.urls, self.label, self.num_classes = list(urls), label, num_classes
        self.preprocess = preprocess

    def __iter__(self) -> Iterator[tuple[Tag, Any, str]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        by_shard = len(self.urls) >= workers
        seen = 0
        for s, url in enumerate(self.urls):
            if by_shard and s % workers != worker:
                continue
            for position, item in enumerate(read_shard(url)):
                seen += 1
                if by_shard or (seen - 1) % workers == worker:
                    yield self._item((s, position), item)

    def _item(self, order: tuple[int, int], item: dict[str, Any] | Sample
              ) -> tuple[Tag, Any, str]:
        if isinstance(item, Sample):  # the shard itself could not be read (further)
            reason = (item.error or "").removeprefix(f"{item.key}: ")
            return Tag(order, item.key, None), None, reason
        name = f"{item.get('__key__', '?')} in {item.get('__url__', '?')}"
        has = ", ".join(sorted(k for k in item if not k.startswith("__"))) or "nothing"
        payload = self._payload(item, name, has)
        if isinstance(payload, str):
            return Tag(order, name, None), None, payload
        tag = Tag(order, name, payload)
        if isinstance(payload, Invalid):
            return tag, None, "invalid label"
        ext = next((k for k in WDS_IMAGE_KEYS if k in item), None)
        if ext is None:
            return tag, None, f"{MISSING_IMAGE} (sample has: {has})"
        try:
            return tag, _prepare(open_image_bytes(item[ext], ext), self.preprocess), ""
        except BadItem as exc:
            return tag, None, str(exc)
        except Exception as exc:
            return tag, None, f"{UNREADABLE_IMAGE} (.{ext}: {type(exc).__name__}: {exc})"

    def _payload(self, item: dict[str, Any], name: str, has: str) -> Any:
        """The class index or caption list; a str is the reason to skip the sample."""
        if self.label == "cls":
            if "cls" not in item:
                return f"{MISSING_LABEL} (no .cls; sample has: {has})"
            return _class_index(item["cls"], name, self.num_classes)
        if "txt" not in item:
            return f"{MISSING_CAPTION} (no .txt; sample has: {has})"
        try:
            return item["txt"].decode("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            return (f"{UNREADABLE_CAPTION} (.txt is not UTF-8: byte "
                    f"0x{item['txt'][exc.start]:02x} at byte offset {exc.start})")


def _class_index(data: bytes, name: str, num_classes: int | None) -> int | Invalid:
    text = data.decode("utf-8", errors="replace").strip()
    if _INTEGER.fullmatch(text) and (num_classes is None or 0 <= int(text) < num_classes):
        return int(text)
    if num_classes is None:
        return Invalid(f"{name}: label {text!r} in .cls is not a class index (an integer)")
    return Invalid(f"{name}: label {text!r} in .cls is not a class index 0..{num_classes - 1} of "
                   f"the {num_classes} classes; the class list does not describe this data")


@dataclass
class ImageFiles:
    """Image files with one payload each (a class index, or a list of captions), known when the
    set is loaded."""

    paths: list[Path]
    payloads: list[Any]

    def __len__(self) -> int:
        return len(self.paths)

    def dataset(self, preprocess: Any = None) -> Dataset:
        """A DataLoader-ready dataset of ``(tag, pixels or None, reason)``; with no
        ``preprocess``, decoded PIL images instead of pixels."""
        return _FileItems(self.paths, self.payloads, preprocess)


@dataclass
class ImageShards:
    """Webdataset shards, read in order; each sample's payload comes from its ``.cls`` (an
    integer, checked against ``num_classes``) or its ``.txt`` (captions, one per line)."""

    urls: list[str]
    label: str  # "cls" or "txt"
    num_classes: int | None = None

    def dataset(self, preprocess: Any = None) -> IterableDataset:
        """A DataLoader-ready stream of ``(tag, pixels or None, reason)``; see
        :meth:`ImageFiles.dataset`."""
        return _ShardItems(self.urls, self.label, self.num_classes, preprocess)


Images = ImageFiles | ImageShards


def _examples(images: Images) -> Iterator[Example]:
    dataset = images.dataset(None)
    items = (dataset[i] for i in range(len(images))) if isinstance(images, ImageFiles) \
        else iter(dataset)
    for tag, image, reason in items:
        if isinstance(tag.payload, Invalid):
            raise DataError(tag.payload.message)
        yield Example(tag.name, image, tag.payload, reason or None)


# --------------------------------------------------------------------------- data sets


class _ImageSet:
    """What labelled and captioned sets share: ``images`` whose payloads (targets or caption
    lists) are known up front for files and only once read for shards."""

    name: str
    images: Images

    def _payloads(self) -> list | None:
        return list(self.images.payloads) if isinstance(self.images, ImageFiles) else None

    @property
    def size(self) -> int | None:
        """The number of images, or None for shards (known once read)."""
        return len(self.images) if isinstance(self.images, ImageFiles) else None

    def __iter__(self) -> Iterator[Example]:
        """The items decoded in this process, in order; ``label`` is the payload."""
        return _examples(self.images)


@dataclass
class ClassificationData(_ImageSet):
    """Labelled images: ``classnames[i]`` names target ``i``; ``templates`` (with ``{}`` where
    the class name goes) when the data ships its own; ``skipped`` lists ``(item, reason)`` for
    what was left out when the set was read (rows without an image path, ...)."""

    name: str
    classnames: list[str]
    images: Images
    templates: list[str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    kind: str = ""

    @property
    def targets(self) -> list[int] | None:
        """Every image's target, or None for shards (known once read)."""
        return self._payloads()


@dataclass
class RetrievalData(_ImageSet):
    """Captioned images: each image's payload is its list of captions.  ``skipped`` lists
    ``(item, reason)`` for what was left out when the set was read (an image without captions,
    a caption file that is not UTF-8, ...)."""

    name: str
    images: Images
    skipped: list[tuple[str, str]] = field(default_factory=list)
    kind: str = ""

    @property
    def captions(self) -> list[list[str]] | None:
        """Every image's captions, or None for shards (known once read)."""
        return self._payloads()


# --------------------------------------------------------------------------- small readers


def _lines(path: Path, what: str) -> list[tuple[int, str]]:
    """(line number, stripped line) of a CLIP_benchmark metadata file, where line i means item
    i: trailing blank lines are dropped, a blank line before the end is an error."""
    lines = [line.strip() for line in read_utf8(path, what).splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    for number, line in enumerate(lines, 1):
        if not line:
            raise DataError(f"{what} {path} line {number} is empty: every line up to the last "
                            f"must hold one entry (a blank line would shift every later one)")
    return list(enumerate(lines, 1))


def _template(template: str, path: Path, line: int) -> str:
    """A CLIP_benchmark template (``{c}`` where the class name goes) in clipforge's form
    (``{}``); a bare ``{}`` is accepted too."""
    where = f"templates file {path} line {line}: template {template!r}"
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise DataError(f"{where} is not a valid format string ({exc})") from None
    out, fields = [], 0
    for literal, name, spec, conversion in parsed:
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if name is None:
            continue
        if name not in ("c", "") or spec or conversion:
            raise DataError(f"{where} has the field {{{name}}}; mark the class name's place "
                            "with {c}")
        out.append("{}")
        fields += 1
    if fields != 1:
        raise DataError(f"{where} must mark the class name's place exactly once, with {{c}} "
                        f"(it has {fields})")
    return "".join(out)


def _read_templates(path: Path) -> list[str]:
    templates = [_template(t, path, n) for n, t in _lines(path, "templates file")]
    if not templates:
        raise DataError(f"templates file {path} is empty; give one template per line, with {{c}} "
                        "where the class name goes, e.g. 'a photo of a {c}.'")
    return templates


def _read_classnames(path: Path) -> list[str]:
    names = [name for _, name in _lines(path, "class names file")]
    if not names:
        raise DataError(f"class names file {path} is empty: the class list is empty; give one "
                        "class name per line, line i naming label i")
    return names


def _given_classnames(classnames: Sequence[str] | str | os.PathLike[str] | None
                      ) -> list[str] | None:
    """Class names given by the caller: a list, or a file (text, one per line, or JSON)."""
    if classnames is None:
        return None
    from ..prompts import load_classnames, validate_classnames

    if isinstance(classnames, str | os.PathLike):
        return load_classnames(classnames)
    if len(classnames) == 0:
        raise DataError("the class list is empty; give at least one class name")
    return validate_classnames(list(classnames))


def _check_count(names: list[str], found: int, what: str) -> None:
    if len(names) != found:
        raise DataError(f"classnames gives {len(names)} class name(s) but {what} has {found} "
                        "classes; give one name per class, in label order")


def _split_dir(root: Path, split: str) -> Path:
    """``root/split`` when root's sub-folders are all split names (train/val/test...)."""
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not subdirs or not all(d.lower() in SPLIT_NAMES for d in subdirs):
        return root
    if split not in subdirs:
        raise DataError(f"{root} holds the split(s) {', '.join(subdirs)} but no {split!r}; choose "
                        "one with split=")
    return root / split


def _unknown_spec(spec: str, kinds: Sequence[str], task: str) -> DataError:
    accepted = "".join(f"\n  - {k}" for k in kinds)
    what = "does not exist" if not Path(spec).exists() and not is_shard_spec(spec) else \
        "is not a kind clipforge reads"
    return DataError(f"{task} set {spec!r} {what}; expected one of:{accepted}")


# --------------------------------------------------------------------------- CLIP_benchmark


def _has_images(root: Path) -> bool:
    for _, _, files in os.walk(root, followlinks=True):
        if any(f.lower().endswith(IMAGEFOLDER_EXTENSIONS) for f in files):
            return True
    return False


def is_clip_benchmark_dir(root: str | Path) -> bool:
    """Whether a directory looks like a CLIP_benchmark webdataset export (of any split)."""
    root = Path(root)
    if (root / CB_TYPE).is_file() or any(root.glob(f"*/{CB_NSHARDS}")) \
            or any(root.glob("*/*.tar")):
        return True
    has_metadata = (root / CB_CLASSNAMES).is_file() or (root / CB_TEMPLATES).is_file()
    # (shards straight in the folder, with classnames.txt beside them, are plain shards)
    return has_metadata and not any(root.glob("*.tar")) and not _has_images(root)


def _cb_type(root: Path) -> str:
    path = root / CB_TYPE
    if not path.is_file():
        return "classification"  # CLIP_benchmark's default too
    return read_utf8(path, "dataset type file").strip().lower()


def _cb_shards(root: Path, split: str) -> list[str]:
    nshards = root / split / CB_NSHARDS
    if not nshards.is_file():
        splits = sorted(p.parent.name for p in root.glob(f"*/{CB_NSHARDS}"))
        here = f"; splits here: {', '.join(splits)}" if splits else ""
        raise DataError(f"{nshards} does not exist: a CLIP_benchmark webdataset set (split "
                        f"{split!r}) is laid out as {CB_LAYOUT}, with DIR = {root}{here}")
    text = read_utf8(nshards, "shard count file").strip()
    if not re.fullmatch(r"\d+", text) or int(text) < 1:
        raise DataError(f"{nshards} must hold the number of shards (a positive integer), "
                        f"not {text[:40]!r}")
    urls = [str(root / split / f"{i}.tar") for i in range(int(text))]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise DataError(f"{nshards} says {text} shard(s) but {len(missing)} do not exist, e.g. "
                        f"{missing[0]}")
    return urls


def _cb_classification(root: Path, split: str, names: list[str] | None,
                       name: str | None) -> ClassificationData:
    kind = _cb_type(root)
    if kind == "retrieval":
        raise DataError(f"{root} is a retrieval set ({root / CB_TYPE} says 'retrieval'); read "
                        "it with load_retrieval (the retrieval task)")
    if kind != "classification":
        raise DataError(f"{root / CB_TYPE} says {kind!r}; clipforge reads CLIP_benchmark "
                        "'classification' and 'retrieval' sets (not multi-label ones)")
    urls = _cb_shards(root, split)
    shipped = _read_classnames(root / CB_CLASSNAMES) if (root / CB_CLASSNAMES).is_file() \
        else None
    if names is not None and shipped is not None:
        _check_count(names, len(shipped), str(root / CB_CLASSNAMES))
    classnames = names if names is not None else shipped
    if classnames is None:
        raise DataError(f"{root} has no {CB_CLASSNAMES}: give the class names (classnames=, "
                        "label i on line i) or add the file")
    templates_path = root / CB_TEMPLATES
    templates = _read_templates(templates_path) if templates_path.is_file() else None
    return ClassificationData(name or root.name, classnames,
                              ImageShards(urls, "cls", len(classnames)), templates,
                              kind="clip_benchmark")


def _cb_retrieval(root: Path, split: str, name: str | None) -> RetrievalData:
    kind = _cb_type(root)
    if kind != "retrieval":
        told = f"{root / CB_TYPE} says {kind!r}" if (root / CB_TYPE).is_file() else \
            f"it has no {CB_TYPE}, which CLIP_benchmark reads as 'classification'"
        raise DataError(f"{root} is not a retrieval set ({told}); a CLIP_benchmark retrieval "
                        f"export has {CB_TYPE} saying 'retrieval'")
    return RetrievalData(name or root.name, ImageShards(_cb_shards(root, split), "txt"),
                         kind="clip_benchmark")


# --------------------------------------------------------------------------- classification


def _image_folder(root: Path, split: str, names: list[str] | None,
                  name: str | None) -> ClassificationData:
    """torchvision's ImageFolder: every sub-folder is a class (sorted); files by extension,
    walked in sorted order, following links.  The dataset is named after ``root``, not after
    its split folder."""
    name = name or root.name
    root = _split_dir(root, split)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise _unknown_spec(str(root), CLASSIFICATION_KINDS, "classification")
    paths: list[Path] = []
    targets: list[int] = []
    empty = []
    for index, cls in enumerate(classes):
        before = len(paths)
        for folder, _, files in sorted(os.walk(root / cls, followlinks=True)):
            for file in sorted(files):
                if file.lower().endswith(IMAGEFOLDER_EXTENSIONS):
                    paths.append(Path(folder) / file)
                    targets.append(index)
        if len(paths) == before:
            empty.append(cls)
    if not paths:
        raise DataError(f"{root} has class folders ({', '.join(classes[:5])}...) but no image "
                        f"in them (extensions {', '.join(IMAGEFOLDER_EXTENSIONS)})")
    if empty:  # torchvision refuses these; they are kept so that targets stay torchvision's
        log.warning("%s: %d class folder(s) hold no image but still count as classes: %s",
                    root, len(empty), ", ".join(empty[:10]))
    if names is not None:
        _check_count(names, len(classes), f"{root} (one sub-folder per class)")
    return ClassificationData(name, names or classes, ImageFiles(paths, targets),
                              kind="imagefolder")


def _csv_classification(path: Path, names: list[str] | None, image_key: str, label_key: str,
                        separator: str | None, name: str | None) -> ClassificationData:
    (images, labels), lines = read_table(
        path, (image_key, label_key), separator,
        hint="Name the columns with image_key= and label_key=")
    labels = [label.strip() for label in labels]
    if names is None:
        given = [label for label in labels if label]
        if given and all(_INTEGER.fullmatch(label) for label in given):
            raise DataError(f"{path}: column {label_key!r} holds class indices (e.g. "
                            f"{given[0]!r}) but no class names were given; pass classnames= (a "
                            "list, or a file with one name per line, line i naming label i)")
        classnames = sorted(set(given))
        if not classnames:
            raise DataError(f"{path} has no labelled row: the class list is empty")
    else:
        classnames = names
    index: dict[str, int] = {}
    repeated: dict[str, list[int]] = {}
    for i, cls in enumerate(classnames):
        repeated.setdefault(cls, []).append(i)
        index.setdefault(cls, i)
    paths: list[Path] = []
    targets: list[int] = []
    skipped: list[tuple[str, str]] = []
    for image, label, line in zip(images, labels, lines):
        where = f"{path} line {line}"
        if not image.strip():
            skipped.append((where, f"{MISSING_IMAGE} (empty image path)"))
            continue
        if label in index:
            if len(repeated[label]) > 1:
                raise DataError(f"{where}: label {label!r} names {len(repeated[label])} classes "
                                f"({', '.join(map(str, repeated[label]))}); use the class index")
            target = index[label]
        elif names is not None and _INTEGER.fullmatch(label) and 0 <= int(label) < len(names):
            target = int(label)
        else:
            accepted = f"one of the {len(classnames)} class names (e.g. " \
                       f"{', '.join(map(repr, classnames[:3]))})"
            if names is not None:
                accepted += f" or a class index 0..{len(names) - 1}"
            raise DataError(f"{where} (image {image!r}): label {label!r} is not {accepted}")
        paths.append(path.parent / image)  # an absolute path replaces the folder
        targets.append(target)
    return ClassificationData(name or path.stem, classnames, ImageFiles(paths, targets),
                              skipped=skipped, kind="csv")


def _beside_shards(urls: list[str], filename: str) -> Path | None:
    """A metadata file in the first local shard's folder, or the folder above it (where a
    CLIP_benchmark export keeps it)."""
    first = Path(urls[0])
    if not first.exists():
        return None
    for folder in (first.parent, first.parent.parent):
        if (folder / filename).is_file():
            return folder / filename
    return None


def _shard_classification(spec: str, names: list[str] | None,
                          name: str | None) -> ClassificationData:
    urls = expand_shards(spec)
    templates_path = _beside_shards(urls, CB_TEMPLATES)
    if names is None:
        found = _beside_shards(urls, CB_CLASSNAMES)
        if found is None:
            raise DataError(f"{spec}: webdataset shards carry class indices only; give the class "
                            f"names (classnames=, label i on line i) or put {CB_CLASSNAMES} "
                            "beside the shards")
        names = _read_classnames(found)
    templates = _read_templates(templates_path) if templates_path else None
    default = Path(urls[0]).parent.name or Path(urls[0]).stem
    return ClassificationData(name or default, names, ImageShards(urls, "cls", len(names)),
                              templates, kind="webdataset")


def load_classification(spec: str | os.PathLike[str], *, split: str = "test",
                        classnames: Sequence[str] | str | os.PathLike[str] | None = None,
                        image_key: str = "filepath", label_key: str = "label",
                        separator: str | None = None, name: str | None = None
                        ) -> ClassificationData:
    """Labelled images from ``spec`` (see :data:`CLASSIFICATION_KINDS`).

    ``classnames`` (a list, or a file with one name per line) names the classes in label order:
    for an ImageFolder it renames the sorted sub-folders (one name each, e.g. readable names for
    WordNet ids); for a CSV it makes integer labels valid (a label is then a class name or an
    index); for shards it replaces ``classnames.txt``.  Without it a CSV's classes are its
    distinct labels, sorted.  ``image_key``/``label_key``/``separator`` describe a CSV;
    ``split`` picks a CLIP_benchmark split (or a ``DIR/<split>`` folder).  Raises
    :class:`DataError` (a ValueError) naming the file, line or item at fault.
    """
    text = os.fspath(spec)
    path = Path(text)
    names = _given_classnames(classnames)
    if path.is_dir():
        if is_clip_benchmark_dir(path):
            return _cb_classification(path, split, names, name)
        tars = sorted(path.glob("*.tar"))
        if tars and not any(e.is_dir() for e in os.scandir(path)):
            return _shard_classification("::".join(map(str, tars)), names, name or path.name)
        return _image_folder(path, split, names, name)
    if path.suffix.lower() in (".csv", ".tsv") and path.is_file():
        return _csv_classification(path, names, image_key, label_key, separator, name)
    if is_shard_spec(text):
        return _shard_classification(text, names, name)
    raise _unknown_spec(text, CLASSIFICATION_KINDS, "classification")


# --------------------------------------------------------------------------- retrieval


def _csv_retrieval(path: Path, image_key: str, caption_key: str, separator: str | None,
                   name: str | None) -> RetrievalData:
    (images, captions), lines = read_table(
        path, (image_key, caption_key), separator,
        hint="Name the columns with image_key= and caption_key=")
    groups: dict[Path, list[str]] = {}  # first appearance order
    skipped: list[tuple[str, str]] = []
    for image, caption, line in zip(images, captions, lines):
        where = f"{path} line {line}"
        if not image.strip():
            skipped.append((where, f"{MISSING_IMAGE} (empty image path)"))
        elif not caption.strip():
            skipped.append((where, f"{EMPTY_CAPTION} (image {image})"))
        else:
            groups.setdefault(path.parent / image, []).append(caption.strip())
    return RetrievalData(name or path.stem, ImageFiles(list(groups), list(groups.values())),
                         skipped, kind="csv")


def _folder_retrieval(root: Path, split: str, name: str | None) -> RetrievalData:
    root = _split_dir(root, split)
    folder = FolderCaptions(root)  # images with a same-name .txt, and those without
    skipped = [(str(p), f"{MISSING_CAPTION} (no {p.with_suffix('.txt').name} beside it)")
               for p in folder.skipped]
    paths: list[Path] = []
    captions: list[list[str]] = []
    for image in folder.images:
        try:
            text = read_utf8(image.with_suffix(".txt"), "caption file")
        except DataError as exc:
            skipped.append((str(image), f"{UNREADABLE_CAPTION} ({exc})"))
            continue
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            skipped.append((str(image), f"{EMPTY_CAPTION} ({image.with_suffix('.txt').name} "
                                        "has no non-empty line)"))
            continue
        paths.append(image)
        captions.append(lines)
    if not paths and not skipped:
        raise _unknown_spec(str(root), RETRIEVAL_KINDS, "retrieval")
    return RetrievalData(name or root.name, ImageFiles(paths, captions), skipped, kind="folder")


def load_retrieval(spec: str | os.PathLike[str], *, split: str = "test",
                   image_key: str = "filepath", caption_key: str = "title",
                   separator: str | None = None, name: str | None = None) -> RetrievalData:
    """Captioned images from ``spec`` (see :data:`RETRIEVAL_KINDS`).

    CSV rows naming the same image are one image with several captions, in the order of first
    appearance; a folder image's captions are the non-empty lines of its same-name ``.txt``.
    Images left with no caption are listed in ``skipped`` (a CLIP_benchmark sample whose
    ``.txt`` is empty is kept, as CLIP_benchmark keeps it: it can only miss).  Raises
    :class:`DataError` (a ValueError) naming the file at fault.
    """
    text = os.fspath(spec)
    path = Path(text)
    if path.is_dir():
        if is_clip_benchmark_dir(path):
            return _cb_retrieval(path, split, name)
        tars = sorted(path.glob("*.tar"))
        if tars and not _has_images(path):
            return RetrievalData(name or path.name, ImageShards(list(map(str, tars)), "txt"),
                                 kind="webdataset")
        return _folder_retrieval(path, split, name)
    if path.suffix.lower() in (".csv", ".tsv") and path.is_file():
        return _csv_retrieval(path, image_key, caption_key, separator, name)
    if is_shard_spec(text):
        urls = expand_shards(text)
        return RetrievalData(name or Path(urls[0]).parent.name or Path(urls[0]).stem,
                             ImageShards(urls, "txt"), kind="webdataset")
    raise _unknown_spec(text, RETRIEVAL_KINDS, "retrieval")


# --------------------------------------------------------------------------- embedding


@dataclass
class ClassificationEmbeddings:
    """Unit-norm float32 image vectors ``[N, D]`` of the images that could be read, their
    targets (int64) and names (``ids``), in dataset order, and ``(item, reason)`` for the rest.
    Unpacks as ``vectors, targets, failures = embed_classification(...)``."""

    vectors: np.ndarray
    targets: np.ndarray
    failures: list[tuple[str, str]]
    ids: list[str]

    def __iter__(self) -> Iterator[Any]:
        return iter((self.vectors, self.targets, self.failures))


@dataclass
class RetrievalEmbeddings:
    """Unit-norm float32 image vectors ``[N, D]`` and caption vectors ``[M, D]``;
    ``text_to_image[j]`` is the row of caption j's image.  Captions of images that could not be
    read are dropped with them (``failures``).  Unpacks as
    ``images, texts, text_to_image, failures = embed_retrieval(...)``."""

    image_vectors: np.ndarray
    text_vectors: np.ndarray
    text_to_image: np.ndarray
    failures: list[tuple[str, str]]
    ids: list[str]
    captions: list[str]

    def __iter__(self) -> Iterator[Any]:
        return iter((self.image_vectors, self.text_vectors, self.text_to_image, self.failures))


def _embed(model: Encoder, name: str, images: Images, skipped: list[tuple[str, str]],
           batch_size: int, num_workers: int, progress: bool
           ) -> tuple[list[Tag], np.ndarray, list[tuple[str, str]]]:
    """Tags and vectors of the images that worked, and every failure, in dataset order."""
    tags: list[Tag] = []
    blocks: list[np.ndarray] = []
    failed: list[tuple[Tag, str]] = []
    for batch in embed_image_batches(model, images.dataset(model.preprocess), batch_size,
                                     num_workers, progress, desc=name):
        for tag, reason in batch.failures:
            if isinstance(tag.payload, Invalid):
                raise DataError(tag.payload.message)
            failed.append((tag, reason))
        tags += batch.tags
        blocks.append(batch.vectors)
    failures = list(skipped) + [(t.name, r) for t, r in sorted(failed, key=lambda f: f[0].order)]
    if not tags:
        examples = "; ".join(f"{item}: {reason}" for item, reason in failures[:3])
        raise DataError(f"no image of {name} could be embedded"
                        + (f" ({len(failures)} skipped, e.g. {examples})" if failures else
                           ": the set is empty"))
    order = sorted(range(len(tags)), key=lambda i: tags[i].order)
    vectors = np.concatenate(blocks)[order]
    return [tags[i] for i in order], vectors, failures


def embed_classification(model: Encoder, data: ClassificationData, *, batch_size: int = 64,
                         num_workers: int = 0, progress: bool = True
                         ) -> ClassificationEmbeddings:
    """Embed a labelled set's images (decoded and preprocessed in ``num_workers`` DataLoader
    workers); unreadable images are skipped and listed in ``failures``, with the items left out
    when the set was read.  Raises :class:`DataError` if no image can be embedded or a shard
    label falls outside the class list."""
    tags, vectors, failures = _embed(model, data.name, data.images, data.skipped, batch_size,
                                     num_workers, progress)
    targets = np.array([t.payload for t in tags], dtype=np.int64)
    return ClassificationEmbeddings(vectors, targets, failures, [t.name for t in tags])


def embed_retrieval(model: Encoder, data: RetrievalData, *, batch_size: int = 64,
                    text_batch_size: int = 256, num_workers: int = 0, progress: bool = True
                    ) -> RetrievalEmbeddings:
    """Embed a captioned set: its images (as :func:`embed_classification`), then the captions
    of the images that could be read.  Captions longer than the model's context are truncated
    (end-of-text token kept last), as CLIP_benchmark's tokenizers do."""
    tags, image_vectors, failures = _embed(model, data.name, data.images, data.skipped,
                                           batch_size, num_workers, progress)
    captions = [caption for tag in tags for caption in tag.payload]
    text_to_image = np.array([row for row, tag in enumerate(tags) for _ in tag.payload],
                             dtype=np.int64)
    texts = embed_texts(model, captions, batch_size=text_batch_size, truncate=True,
                        progress=progress)
    return RetrievalEmbeddings(image_vectors, texts.vectors, text_to_image, failures,
                               [t.name for t in tags], captions)


__all__ = [
    "CLASSIFICATION_KINDS", "RETRIEVAL_KINDS", "ClassificationData", "ClassificationEmbeddings",
    "Example", "ImageFiles", "ImageShards", "RetrievalData", "RetrievalEmbeddings",
    "embed_classification", "embed_retrieval", "is_clip_benchmark_dir", "load_classification",
    "load_retrieval",
]

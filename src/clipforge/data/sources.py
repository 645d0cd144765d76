"""Training data as people have it: CSV/TSV tables, folders of captioned images, webdataset shards.

Every source yields :class:`Sample` items.  A bad item (an unreadable or truncated image, a missing
file, an empty caption, a corrupt tar member) is never an exception: it comes back as a ``Sample``
with ``image``/``caption`` set to ``None`` and ``error`` naming the file or key and the reason, so
a training loop can skip and count it (:class:`SkipCounter`) without losing its place.

* :class:`CsvCaptions` -- a CSV or TSV with a header row, one image path and caption per row.
* :class:`FolderCaptions` -- ``cat.jpg`` + ``cat.txt`` pairs anywhere under a directory.
* :class:`WebDatasetCaptions` -- img2dataset-style tar shards, streamed with ``webdataset``.

:func:`open_source` picks one from a path or pattern; :func:`check_readable` stops a run at once
when a source has nothing usable.  All randomness (shard order, shuffle buffer, resampling) is a
function of ``seed``, the epoch, the rank and the DataLoader worker, never of global RNG state.

The low-level readers these are made of (:func:`open_image_file`, :func:`read_table`,
:func:`expand_shards`, the reasons an item is skipped...) live in :mod:`clipforge.reading`, which
evaluation and search read files through too, so that every part of clipforge skips the same
items for the same reasons; they are re-exported here for existing imports.
"""

from __future__ import annotations

import functools
import inspect
import logging
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from ..reading import (
    CORRUPT_SHARD,
    CSV_FIELD_LIMIT,
    CSV_FIELD_LIMIT_ENV,
    EMPTY_CAPTION,
    IMAGE_SUFFIXES,
    MISSING_CAPTION,
    MISSING_IMAGE,
    MISSING_LABEL,
    REASONS,
    UNREADABLE_CAPTION,
    UNREADABLE_IMAGE,
    BadItem,
    BarrenShards,
    DataError,
    Sample,
    ShardErrors,
    bad_sample,
    csv_field_limit,
    expand_shards,
    is_shard_spec,
    open_image_bytes,
    open_image_file,
    read_rows,
    read_shard,
    read_table,
    read_utf8,
    skip_reason,
    tar_samples,
    with_errors,
)

# The readers of clipforge.reading, re-exported for the imports that name them here.
__all__ = [
    "CORRUPT_SHARD", "CSV_FIELD_LIMIT", "CSV_FIELD_LIMIT_ENV", "EMPTY_CAPTION", "KINDS",
    "MISSING_CAPTION", "MISSING_IMAGE", "MISSING_LABEL", "REASONS", "UNREADABLE_CAPTION",
    "UNREADABLE_IMAGE", "WDS_CAPTION_KEY", "WDS_IMAGE_KEYS", "BadItem", "CsvCaptions",
    "DataError", "FolderCaptions", "Sample", "SkipCounter", "StreamShare", "WebDatasetCaptions",
    "check_readable", "csv_field_limit", "expand_shards", "is_shard_spec", "open_image_bytes",
    "open_image_file", "open_source", "read_rows", "read_shard", "read_table", "read_utf8",
    "skip_reason",
]

log = logging.getLogger(__name__)


WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
WDS_CAPTION_KEY = "txt"


def _caption_or_error(key: str, caption: str | None, image: Image.Image) -> Sample:
    caption = (caption or "").strip()
    if not caption:
        return bad_sample(key, EMPTY_CAPTION)
    return Sample(image, caption, key)


def _load_file(path: Path) -> Image.Image | Sample:
    """The decoded image, or the error Sample naming the file."""
    try:
        return open_image_file(path)
    except BadItem as exc:
        return Sample(None, None, str(path), f"{path}: {exc}")


class SkipCounter:
    """Tallies skipped samples by reason, for the logs: ``{"unreadable image": 3, ...}``."""

    def __init__(self, examples: int = 3):
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []
        self.max_examples = examples

    def add(self, item: Sample | str | None) -> bool:
        """Count a Sample's error or an error message; returns whether anything was counted."""
        error = item.error if isinstance(item, Sample) else item
        if isinstance(item, Sample) and error is None and not item.ok:
            error = f"{item.key}: {EMPTY_CAPTION if item.image is not None else MISSING_IMAGE}"
        if not error:
            return False
        self.counts[skip_reason(error)] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(error)
        return True

    def update(self, items: Iterable[Sample | str | None]) -> None:
        for item in items:
            self.add(item)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts.most_common())

    def __bool__(self) -> bool:
        return self.total > 0

    def __str__(self) -> str:
        return ", ".join(f"{reason}: {n}" for reason, n in self.counts.most_common()) or "none"


# --------------------------------------------------------------------------- CSV / TSV


class CsvCaptions(Dataset):
    """Map-style dataset over a CSV/TSV with a header row: an image path and a caption per row.

    Relative image paths resolve against ``root`` (default: the CSV's folder).  The separator
    is a tab for ``.tsv`` files and a comma otherwise, unless given.
    """

    def __init__(self, path: str | Path, image_key: str = "filepath", caption_key: str = "title",
                 separator: str | None = None, root: str | Path | None = None):
        self.path = Path(path)
        self.spec = str(path)
        self.root = Path(root) if root is not None else self.path.parent
        self.image_key, self.caption_key = image_key, caption_key
        (self.images, self.captions), self.lines = read_table(
            self.path, (image_key, caption_key), separator,
            hint="Name the columns with --csv-image-key and --csv-caption-key "
                 "(image_key=/caption_key=)")

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        return self.root / self.images[index]  # an absolute path replaces root

    def __getitem__(self, index: int) -> Sample:
        if not self.images[index].strip():
            return bad_sample(f"{self.path} row {index + 2}", MISSING_IMAGE, "empty image path")
        path = self.image_path(index)
        image = _load_file(path)
        if isinstance(image, Sample):
            return image
        return _caption_or_error(str(path), self.captions[index], image)

    def __repr__(self) -> str:
        return f"CsvCaptions({self.spec!r}, {len(self)} rows)"


# --------------------------------------------------------------------------- folder


class FolderCaptions(Dataset):
    """Images (by suffix) anywhere under ``root``, each with a same-name ``.txt`` caption.

    Images with no caption file beside them are listed in ``skipped`` and left out.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.spec = str(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root} is not a directory")
        images = sorted(p for p in self.root.rglob("*")
                        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        self.images: list[Path] = []
        self.skipped: list[Path] = []
        for path in images:
            (self.images if path.with_suffix(".txt").is_file() else self.skipped).append(path)
        if self.skipped:
            log.warning("%s: %d image(s) have no .txt caption beside them and are skipped, "
                        "e.g. %s", self.root, len(self.skipped), self.skipped[0])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Sample:
        path = self.images[index]
        text_path = path.with_suffix(".txt")
        try:
            caption = text_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            return bad_sample(str(text_path), UNREADABLE_CAPTION, str(exc))
        image = _load_file(path)
        if isinstance(image, Sample):
            return image
        return _caption_or_error(str(path), caption, image)

    def __repr__(self) -> str:
        return f"FolderCaptions({self.spec!r}, {len(self)} pairs, {len(self.skipped)} skipped)"


# --------------------------------------------------------------------------- webdataset


def _seed(*parts: int) -> int:
    """A seed from integers, independent of PYTHONHASHSEED and of global RNG state."""
    import numpy as np

    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


@dataclass(frozen=True)
class StreamShare:
    """Which part of a shard stream one reader takes: its rank among ``world_size`` processes
    and its DataLoader worker among ``workers``.  Shards (or, resampled, the random draws of
    shards) are split by it, and the stream's randomness is seeded by it."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    workers: int = 1

    @classmethod
    def current(cls) -> StreamShare:
        """This process's share: torch.distributed's rank and the DataLoader worker (the
        ``RANK``/``WORLD_SIZE`` environment variables win, as in webdataset)."""
        import webdataset as wds

        return cls(*wds.utils.pytorch_worker_info())


class WebDatasetCaptions(IterableDataset):
    """img2dataset-style tar shards (``000000000.jpg`` + ``000000000.txt``) as a stream of Samples.

    Without ``resampled``, each pass reads every shard once: the shard list is shuffled the same
    way on every rank (seeded by ``seed`` and the epoch, see :meth:`set_epoch`) and split across
    torch.distributed ranks and DataLoader workers, so no sample is read twice in one pass (a rank
    or worker left without a shard yields nothing).  With ``resampled``, every rank and worker
    draws shards with replacement for ever (multi-epoch runs; stop by step count).  Samples pass
    through a shuffle buffer of ``shuffle_buffer`` raw (undecoded) samples.
    """

    def __init__(self, urls: str | Path | Iterable[str | Path], resampled: bool = False,
                 shuffle_buffer: int = 1000, seed: int = 0):
        self.spec = str(urls) if isinstance(urls, (str, Path)) else " ".join(map(str, urls))
        self.urls = expand_shards(urls)
        self.resampled, self.shuffle_buffer, self.seed = resampled, shuffle_buffer, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for another pass; call before creating the DataLoader iterator."""
        self.epoch = epoch

    def _shards(self) -> Iterator[dict[str, str]]:
        urls = list(self.urls)
        random.Random(_seed(self.seed, self.epoch, 0x5A4D)).shuffle(urls)
        for url in urls:
            yield {"url": url}

    def pipeline(self, errors: ShardErrors, share: StreamShare):
        """Shards -> raw samples (undecoded dicts) for one share, shuffled with a buffer."""
        import webdataset as wds

        barren = None
        if self.resampled:
            shards = [wds.ResampledShards(self.urls, seed=self.seed, deterministic=True,
                                          worker_seed=lambda: _seed(share.rank, share.worker,
                                                                    self.epoch))]
            barren = BarrenShards(self.spec, self.urls, errors)
        else:
            # Every rank shuffles the list alike, then takes every world_size-th shard, and each
            # worker every workers-th of those (as wds.split_by_node / split_by_worker do).
            def split(shards: Iterator[dict[str, str]]) -> Iterator[dict[str, str]]:
                mine = islice(shards, share.rank, None, share.world_size)
                return islice(mine, share.worker, None, share.workers)

            shards = [self._shards, split]
        stages = [*shards, functools.partial(tar_samples, errors=errors, barren=barren)]
        if self.shuffle_buffer > 1:
            rng = random.Random(_seed(self.seed, self.epoch, share.rank, share.worker, 0x5B0F))
            stages.append(wds.shuffle(self.shuffle_buffer, rng=rng))
        return wds.DataPipeline(*stages)

    def stream(self, share: StreamShare | None = None, start: int = 0) -> Iterator[Sample]:
        """One share's Samples (every share when ``share`` is None: this process's rank and
        DataLoader worker), from stream position ``start`` on.

        The stream is a deterministic sequence of items, samples and read errors alike; the
        first ``start`` of them are read again but not decoded.  So a training run that
        records how many items each share consumed resumes at exactly the same sample, with
        the same shuffle-buffer state, at the cost of re-reading (not decoding) those bytes.
        """
        share = share or StreamShare.current()
        errors = ShardErrors()
        position = 0
        for item in with_errors(self.pipeline(errors, share), errors):
            position += 1
            if position > start:
                yield item if isinstance(item, Sample) else self.decode(item)

    def __iter__(self) -> Iterator[Sample]:
        return self.stream()

    @staticmethod
    def decode(raw: dict[str, Any]) -> Sample:
        key = str(raw.get("__key__", "?"))
        where = f"{key} in {raw.get('__url__', '?')}"
        image_key = next((k for k in WDS_IMAGE_KEYS if k in raw), None)
        if image_key is None:
            has = ", ".join(sorted(k for k in raw if not k.startswith("__"))) or "nothing"
            return Sample(None, None, key, f"{where}: {MISSING_IMAGE} (sample has: {has})")
        if WDS_CAPTION_KEY not in raw:
            return Sample(None, None, key, f"{where}: {MISSING_CAPTION} (no .txt)")
        try:
            caption = raw[WDS_CAPTION_KEY].decode("utf-8")
        except UnicodeDecodeError as exc:
            return Sample(None, None, key, f"{where}: {UNREADABLE_CAPTION} ({exc})")
        try:
            image = open_image_bytes(raw[image_key], image_key)
        except BadItem as exc:
            return Sample(None, None, key, f"{where}: {exc}")
        sample = _caption_or_error(key, caption, image)
        if sample.error:
            sample.error = f"{where}: {EMPTY_CAPTION}"
        return sample

    def __repr__(self) -> str:
        return (f"WebDatasetCaptions({self.spec!r}, {len(self.urls)} shards, "
                f"resampled={self.resampled})")


# --------------------------------------------------------------------------- dispatch


KINDS = ("a .csv/.tsv file (image path and caption columns)",
         "a directory of images with same-name .txt captions",
         "webdataset .tar shards: a file, a brace pattern like shards/{00000..00009}.tar, "
         "a glob like shards/*.tar, or several joined with '::'")


def _construct(cls: type, spec: Any, options: dict[str, Any]) -> Dataset:
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return cls(spec, **{k: v for k, v in options.items() if k in accepted})


def open_source(spec: str | Path, **options: Any) -> Dataset:
    """A data source from a path or pattern (see :data:`KINDS`).

    ``options`` go to the constructor of the chosen kind (``image_key``, ``caption_key``,
    ``separator``, ``root`` for CSV; ``resampled``, ``shuffle_buffer``, ``seed`` for shards);
    options meant for the other kinds are ignored, unknown ones are an error.
    """
    kinds = (CsvCaptions, FolderCaptions, WebDatasetCaptions)
    known = set().union(*(inspect.signature(k.__init__).parameters for k in kinds))
    known -= {"self", "path", "urls"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"open_source: unknown option(s) {', '.join(unknown)}")
    text = str(spec)
    path = Path(text)
    accepted = "; ".join(KINDS)
    if path.is_dir():
        folder = _construct(FolderCaptions, path, options)
        tars = sorted(path.glob("*.tar"))
        if len(folder) == 0 and not folder.skipped and tars:  # an img2dataset output folder
            return _construct(WebDatasetCaptions, [str(t) for t in tars], options)
        return folder
    if path.suffix.lower() in (".csv", ".tsv"):
        if not path.is_file():
            raise ValueError(f"data source {text!r}: no such file")
        return _construct(CsvCaptions, path, options)
    if is_shard_spec(text):
        return _construct(WebDatasetCaptions, text, options)
    if not path.exists():
        raise ValueError(f"data source {text!r} does not exist; expected {accepted}")
    raise ValueError(f"data source {text!r} is not a kind clipforge reads; expected {accepted}")


# --------------------------------------------------------------------------- checks


def _source_name(source: Any) -> str:
    return str(getattr(source, "spec", None) or repr(source))


def check_readable(source: Dataset, probe: int = 64) -> None:
    """Read up to ``probe`` items (the first ones) and raise :class:`DataError` if none is usable.

    The training loop calls this before starting, so that a source with nothing usable (wrong
    column, wrong root, every file corrupt) stops at once with the reasons, not after hours.
    """
    name = _source_name(source)
    if isinstance(source, IterableDataset):
        items = islice(iter(source), probe)
    else:
        size = len(source)  # type: ignore[arg-type]
        if size == 0:
            hint = ""
            if getattr(source, "skipped", None):
                hint = (f": {len(source.skipped)} image(s) have no same-name .txt caption, "
                        f"e.g. {source.skipped[0]}")
            raise DataError(f"no readable sample in {name}: it has no items{hint}")
        items = (source[i] for i in range(min(probe, size)))
    counter = SkipCounter(examples=3)
    seen = 0
    for item in items:
        seen += 1
        if not isinstance(item, Sample):  # (image, caption) pairs of the built-in dataset
            image, caption = item
            item = Sample(image, caption, str(seen - 1))
        if item.ok:
            return
        counter.add(item)
    if seen == 0:
        hint = ""
        if isinstance(source, WebDatasetCaptions) and not source.resampled:
            import webdataset as wds

            world = wds.utils.pytorch_worker_info()[1]
            if world > len(source.urls):
                hint = (f" ({len(source.urls)} shard(s) split across {world} rank(s): a rank "
                        "with no shard reads nothing; use more shards or resampled=True)")
            else:
                hint = " (are its shards empty tar files?)"
        raise DataError(f"no readable sample in {name}: it yielded no items{hint}")
    raise DataError(f"no readable sample in {name}: the first {seen} item(s) all failed "
                    f"({counter}): " + "; ".join(counter.examples))

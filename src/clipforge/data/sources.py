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

The low-level readers (:func:`open_image_file`, :func:`open_image_bytes`, :func:`read_utf8`,
:func:`read_table`, :func:`read_shard`) also serve the evaluation sets
(:mod:`clipforge.evaluation.datasets`), so that training and evaluation skip the same items for
the same reasons and report bad files the same way.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import glob
import inspect
import io
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from ..fileio import NotUTF8Error, decode_utf8
from ..image.transform import (
    ImageLoadError,
    NotRegularFileError,
    check_aspect_ratio,
    open_regular_file,
)
from ..inference import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

# Reasons an item is skipped; each error message contains exactly one of them.
UNREADABLE_IMAGE = "unreadable image"
MISSING_IMAGE = "missing image"
EMPTY_CAPTION = "empty caption"
MISSING_CAPTION = "missing caption"
UNREADABLE_CAPTION = "unreadable caption"
CORRUPT_SHARD = "corrupt shard"
MISSING_LABEL = "missing label"  # evaluation sets: a sample with no class label
REASONS = (UNREADABLE_IMAGE, MISSING_IMAGE, EMPTY_CAPTION, MISSING_CAPTION, UNREADABLE_CAPTION,
           CORRUPT_SHARD, MISSING_LABEL)

#: The longest CSV/TSV field (in characters) that :func:`read_rows` accepts; Python's csv module
#: stops at 131,072 by default.  The whole table is in memory already, so a longer field costs
#: nothing more; the bound is there to turn an unbalanced quote, which makes the rest of the
#: file one field, into an error naming the line.  :data:`CSV_FIELD_LIMIT_ENV` overrides it.
CSV_FIELD_LIMIT = 1 << 20
CSV_FIELD_LIMIT_ENV = "CLIPFORGE_CSV_FIELD_LIMIT"

WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
WDS_CAPTION_KEY = "txt"
_URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:(//)?")
_GLOB_CHARS = re.compile(r"[*?\[]")


class DataError(ValueError):
    """A data source has nothing usable (or cannot be opened at all)."""


class BadItem(Exception):
    """One item cannot be used; ``str()`` is the reason (one of :data:`REASONS`, with detail),
    without the item's name, so that each reader can name the item its own way."""


@dataclass
class Sample:
    """One image-caption pair, or the reason it could not be read (``error``)."""

    image: Image.Image | None
    caption: str | None
    key: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.image is not None and bool(self.caption)


def _bad(key: str, reason: str, detail: str = "") -> Sample:
    return Sample(None, None, key, f"{key}: {reason}" + (f" ({detail})" if detail else ""))


def _caption_or_error(key: str, caption: str | None, image: Image.Image) -> Sample:
    caption = (caption or "").strip()
    if not caption:
        return _bad(key, EMPTY_CAPTION)
    return Sample(image, caption, key)


def _without_file_repr(exc: Exception) -> str:
    """PIL's message without the file object's repr (the caller names the file itself)."""
    return re.sub(r" ?<_io\.(BytesIO object at \w+|BufferedReader name=[^>]*)>", "", str(exc))


def _decode(image: Image.Image, draft: int | None) -> Image.Image:
    """Decode fully; with ``draft``, let the JPEG decoder scale down by 1/2, 1/4 or 1/8 in the
    DCT domain while both sides stay at least ``draft`` pixels (PIL's draft mode).  A 12 MP
    photo then decodes several times faster; the pixels differ slightly from the exact path
    (measured in docs/benchmarks.md).  Other formats ignore it.  The stored size is kept in
    ``image.info["original_size"]``.

    An image beyond the aspect-ratio bound (:func:`~clipforge.image.transform.check_aspect_ratio`)
    raises :class:`ImageLoadError` from its header, before decoding: every reader of files and
    shard members then skips it as preprocessing would, training included."""
    check_aspect_ratio(image.size)
    image.info["original_size"] = image.size
    width, height = image.size
    # Only where the decoder will really scale down: draft mode also switches libjpeg to its
    # faster, less exact IDCT, which would change small JPEGs' pixels for no gain.
    if draft and image.format == "JPEG" and min(width // draft, height // draft) >= 2:
        image.draft(image.mode, (draft, draft))
    image.load()
    return image


def open_image_file(path: str | Path, draft: int | None = None) -> Image.Image:
    """The fully decoded image, or :class:`BadItem` (``missing image`` / ``unreadable image``).
    (Like ``load_image``, but any decoding failure is the item's, never the run's, and the file
    is closed when decoding fails, not left to the garbage collector.)  Training and evaluation
    sets read files through this one function, so they skip the same files for the same
    reasons.  Only regular files are opened: a FIFO named ``x.jpg`` is skipped as ``not a
    regular file`` rather than waited on for ever.  ``draft``: see :func:`_decode`."""
    try:
        with open_regular_file(path) as f:
            image = _decode(Image.open(f), draft)
        return image
    except FileNotFoundError:
        raise BadItem(f"{MISSING_IMAGE} (no such file)") from None
    except NotRegularFileError as exc:
        raise BadItem(f"{UNREADABLE_IMAGE} (not a regular file: it is {exc.kind})") from None
    except ImageLoadError as exc:  # our own checks: the message is already the reason
        raise BadItem(f"{UNREADABLE_IMAGE} ({exc})") from None
    except Exception as exc:  # PIL raises many kinds for malformed files; none may escape
        raise BadItem(f"{UNREADABLE_IMAGE} ({type(exc).__name__}: {_without_file_repr(exc)})"
                      ) from None


def open_image_bytes(data: bytes, extension: str, draft: int | None = None) -> Image.Image:
    """A fully decoded image from a shard member's bytes, or :class:`BadItem` naming the member
    (``unreadable image (.jpg: ...)``).  ``draft``: see :func:`_decode`."""
    try:
        return _decode(Image.open(io.BytesIO(data)), draft)
    except ImageLoadError as exc:
        raise BadItem(f"{UNREADABLE_IMAGE} (.{extension}: {exc})") from None
    except Exception as exc:  # any decoding failure is this sample's, not the stream's
        raise BadItem(f"{UNREADABLE_IMAGE} (.{extension}: {type(exc).__name__}: "
                      f"{_without_file_repr(exc)})") from None


def _load_file(path: Path) -> Image.Image | Sample:
    """The decoded image, or the error Sample naming the file."""
    try:
        return open_image_file(path)
    except BadItem as exc:
        return Sample(None, None, str(path), f"{path}: {exc}")


def read_utf8(path: str | Path, what: str = "file") -> str:
    """A whole file as text, strictly UTF-8 (a leading byte-order mark is dropped).

    A file in another encoding raises :class:`DataError` naming the file, the byte offset and
    line of the first undecodable byte: decoded leniently, a Latin-1 'café' would become another
    class name or caption without a word.  (Text-mode reading reports a position within its
    read buffer, not the file, which is why the bytes are decoded at once here.)
    """
    path = Path(path)
    try:
        with open_regular_file(path) as f:  # a FIFO named x.csv would block for ever
            return decode_utf8(f.read())
    except OSError as exc:
        raise DataError(f"cannot read {what} {path}: {exc}") from exc
    except NotUTF8Error as exc:
        raise DataError(f"{what} {path} is not UTF-8 text: {exc}; save it as UTF-8 (e.g. "
                        "iconv -f latin1 -t utf-8)") from None


def csv_field_limit() -> int:
    """The field-length bound in force: :data:`CSV_FIELD_LIMIT_ENV` if set, else
    :data:`CSV_FIELD_LIMIT`."""
    value = os.environ.get(CSV_FIELD_LIMIT_ENV, "").strip()
    if not value:
        return int(CSV_FIELD_LIMIT)
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise DataError(f"{CSV_FIELD_LIMIT_ENV}={value!r} is not a positive whole number")
    return limit


@contextlib.contextmanager
def _field_size_limit(limit: int) -> Iterator[None]:
    """``csv.field_size_limit`` is process-wide: set it for one read, then put it back."""
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def read_rows(path: str | Path, separator: str | None = None
              ) -> tuple[list[str] | None, list[tuple[int, list[str]]]]:
    """The header row of a CSV/TSV (None for an empty file) and its other non-blank rows, each
    with the file line it starts on.  The separator is a tab for ``.tsv`` files and a comma
    otherwise, unless given.  Any parse error, a field over :func:`csv_field_limit` characters
    included, raises a one-line :class:`DataError` naming the file and the line."""
    path = Path(path)
    if separator is None:
        separator = "\t" if path.suffix.lower() == ".tsv" else ","
    text = read_utf8(path, "table")
    limit = csv_field_limit()
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=separator)
    rows: list[tuple[int, list[str]]] = []
    start = 1
    with _field_size_limit(limit):
        try:
            header = next(reader, None)
            start = reader.line_num + 1
            for row in reader:
                if row:
                    rows.append((start, row))
                start = reader.line_num + 1
        except csv.Error as exc:
            if "field larger than field limit" in str(exc):
                raise DataError(
                    f"{path}, line {start}: a field is longer than {limit} characters (an "
                    f"unbalanced quote makes the rest of the file one field); set "
                    f"{CSV_FIELD_LIMIT_ENV} to read longer fields") from None
            raise DataError(f"cannot read {path}, line {start}: {exc}") from None
    return header, rows


def read_table(path: str | Path, columns: Iterable[str], separator: str | None = None,
               hint: str = "") -> tuple[list[list[str]], list[int]]:
    """The named columns of a CSV/TSV with a header row, and the file line where each row starts.

    The separator is a tab for ``.tsv`` files and a comma otherwise, unless given.  A missing
    column raises :class:`ValueError` listing the columns there are (``hint`` says how to name
    them); an empty or unreadable file raises :class:`DataError` (see :func:`read_rows`).
    Blank rows are left out.
    """
    path = Path(path)
    columns = list(columns)
    if separator is None:
        separator = "\t" if path.suffix.lower() == ".tsv" else ","
    header, rows = read_rows(path, separator)
    if header is None:
        raise DataError(f"{path} is empty: expected a header row naming the columns "
                        f"{', '.join(map(repr, columns))}")
    missing = [k for k in columns if k not in header]
    if missing:
        raise ValueError(f"{path} has no column {' or '.join(map(repr, missing))}; its "
                         f"columns are: {', '.join(map(repr, header))} (separator "
                         f"{separator!r})" + (f". {hint}" if hint else ""))
    where = [header.index(k) for k in columns]
    values: list[list[str]] = [[row[i] if i < len(row) else "" for _, row in rows]
                               for i in where]
    return values, [line for line, _ in rows]


def skip_reason(error: str) -> str:
    """The reason (one of :data:`REASONS`, else ``"other"``) named in an error message."""
    return next((reason for reason in REASONS if reason in error), "other")


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
            return _bad(f"{self.path} row {index + 2}", MISSING_IMAGE, "empty image path")
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
            return _bad(str(text_path), UNREADABLE_CAPTION, str(exc))
        image = _load_file(path)
        if isinstance(image, Sample):
            return image
        return _caption_or_error(str(path), caption, image)

    def __repr__(self) -> str:
        return f"FolderCaptions({self.spec!r}, {len(self)} pairs, {len(self.skipped)} skipped)"


# --------------------------------------------------------------------------- webdataset


def _is_remote(url: str) -> bool:
    return bool(_URL_SCHEME.match(url)) and not re.match(r"^[a-zA-Z]:[\\/]", url)


def expand_shards(urls: str | Path | Iterable[str | Path]) -> list[str]:
    """Shard URLs from ``::``-separated brace patterns (``shards/{00000..00009}.tar``), globs
    and lists.  A local shard that does not exist is an error."""
    import braceexpand

    specs = str(urls).split("::") if isinstance(urls, (str, Path)) else [str(u) for u in urls]
    result: list[str] = []
    for spec in specs:
        for url in braceexpand.braceexpand(spec):
            if _is_remote(url):
                result.append(url)
            elif _GLOB_CHARS.search(url) and not Path(url).exists():
                matches = sorted(glob.glob(url))
                if not matches:
                    raise DataError(f"no shard matches {url!r}")
                result += matches
            else:
                result.append(url)
    if not result:
        raise DataError(f"no shards in {urls!r}")
    missing = [u for u in result if not _is_remote(u) and not Path(u).is_file()]
    if missing:
        odd = [u for u in missing if Path(u).exists()]  # a FIFO or a directory named x.tar
        if odd:
            raise DataError(f"shard {odd[0]} of {urls!r} is not a regular file")
        raise DataError(f"{len(missing)} of {len(result)} shard(s) of {urls!r} do not exist, "
                        f"e.g. {missing[0]}")
    return result


def _seed(*parts: int) -> int:
    """A seed from integers, independent of PYTHONHASHSEED and of global RNG state."""
    import numpy as np

    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class _ErrorCollector:
    """A webdataset handler: remember the error and carry on.  The stream turns each error into a
    Sample error, so that it is counted like any other skipped item.  webdataset may report one
    broken shard twice (the member read, then the tar iteration); that counts once per shard
    read."""

    def __init__(self):
        self.pending: list[tuple[str, str]] = []
        self.last_reason: dict[str, str] = {}  # shard -> its latest error, drained or not
        self.url = "?"
        self._last: tuple[str, str] | None = None

    def track(self, shards: Iterator[dict[str, str]]) -> Iterator[dict[str, str]]:
        """A pipeline stage noting which shard is being read (the handler is not told)."""
        for shard in shards:
            self.url, self._last = shard["url"], None
            yield shard

    def __call__(self, exc: Exception) -> bool:
        name = type(exc).__name__
        if self._last != (self.url, name):
            self._last = (self.url, name)
            text = str(exc.args[0]) if exc.args else str(exc)
            text = re.sub(r" @ <.*>$", "", text)
            reason = f"{CORRUPT_SHARD} ({name}: {text})"[:500]
            self.pending.append((self.url, reason))
            self.last_reason[self.url] = reason
        return True

    def drain(self) -> Iterator[Sample]:
        while self.pending:
            url, reason = self.pending.pop(0)
            yield _bad(url, reason)


class _BarrenShards:
    """Stops a resampled stream none of whose shards holds a file (an empty tar, random bytes,
    a file that cannot be opened): the stream draws shards for ever, so without this check it
    would wait for ever for a sample, quietly collecting the read errors.

    Two pipeline stages: :meth:`shards` sees each draw, :meth:`files` each tar member read.
    When a shard is drawn, the one before it has been read to its end; once every shard has
    been drawn with no member read since the last one that had any, :class:`DataError` names
    the shards and what was wrong with them.  A source with even one readable shard is never
    stopped: any member read starts the count again.
    """

    def __init__(self, spec: str, urls: Iterable[str], errors: _ErrorCollector):
        self.spec, self.urls, self.errors = spec, set(urls), errors
        self.barren: dict[str, None] = {}  # in draw order
        self.current: str | None = None
        self.read_any = False

    def shards(self, shards: Iterator[dict[str, str]]) -> Iterator[dict[str, str]]:
        for shard in shards:
            self._settle()
            self.current, self.read_any = shard["url"], False
            yield shard

    def files(self, files: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for member in files:
            if member:  # {} is webdataset's end-of-shard marker, also sent for an empty tar
                self.read_any = True
            yield member

    def _settle(self) -> None:
        if self.current is None:
            return
        if self.read_any:
            self.barren.clear()
            return
        self.barren[self.current] = None
        if len(self.barren) >= len(self.urls):
            raise DataError(self.message())

    def message(self) -> str:
        reasons = self.errors.last_reason
        shown = [f"{url}: {reasons.get(url, 'no files (an empty tar)')}"
                 for url in list(self.barren)[:3]]
        more = f"; and {len(self.barren) - 3} more" if len(self.barren) > 3 else ""
        return (f"no readable sample in {self.spec}: none of its {len(self.urls)} shard(s) "
                f"holds a file to read: " + "; ".join(shown) + more)


def _with_errors(raws: Iterable[dict[str, Any]], errors: _ErrorCollector
                 ) -> Iterator[dict[str, Any] | Sample]:
    """Raw samples with the read errors met on the way, as error Samples, in stream order."""
    for raw in raws:
        yield from errors.drain()
        yield raw
    yield from errors.drain()


def _closing(opened: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for source in opened:
        try:
            yield source
        finally:  # the shard has been read (or the stream abandoned)
            source["stream"].close()


def _tar_samples(shards: Iterator[dict[str, str]], errors: _ErrorCollector,
                 barren: _BarrenShards | None = None) -> Iterator[dict[str, Any]]:
    """``wds.tarfile_to_samples``, but closing each shard once read (webdataset 1.0.2 leaves
    that to the garbage collector: a ResourceWarning per shard).  ``barren``: see
    :class:`_BarrenShards`."""
    from webdataset import tariterators

    if barren is not None:
        shards = barren.shards(shards)
    opened = tariterators.url_opener(errors.track(shards), handler=errors)
    files = tariterators.tar_file_expander(_closing(opened), handler=errors)
    if barren is not None:
        files = barren.files(files)
    return tariterators.group_by_keys(files, handler=errors)


def read_shard(url: str) -> Iterator[dict[str, Any] | Sample]:
    """One shard's raw samples (undecoded dicts with ``__key__`` and ``__url__``) in file order,
    with read errors (a corrupt or truncated tar) as error Samples where they happen.  The same
    bytes always give the same sequence, so readers that split one shard between processes by
    position agree on who reads what."""
    errors = _ErrorCollector()
    return _with_errors(_tar_samples(iter([{"url": url}]), errors), errors)


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

    def pipeline(self, errors: _ErrorCollector, share: StreamShare):
        """Shards -> raw samples (undecoded dicts) for one share, shuffled with a buffer."""
        import webdataset as wds

        barren = None
        if self.resampled:
            shards = [wds.ResampledShards(self.urls, seed=self.seed, deterministic=True,
                                          worker_seed=lambda: _seed(share.rank, share.worker,
                                                                    self.epoch))]
            barren = _BarrenShards(self.spec, self.urls, errors)
        else:
            # Every rank shuffles the list alike, then takes every world_size-th shard, and each
            # worker every workers-th of those (as wds.split_by_node / split_by_worker do).
            def split(shards: Iterator[dict[str, str]]) -> Iterator[dict[str, str]]:
                mine = islice(shards, share.rank, None, share.world_size)
                return islice(mine, share.worker, None, share.workers)

            shards = [self._shards, split]
        stages = [*shards, functools.partial(_tar_samples, errors=errors, barren=barren)]
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
        errors = _ErrorCollector()
        position = 0
        for item in _with_errors(self.pipeline(errors, share), errors):
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


def _is_shard_pattern(spec: str) -> bool:
    import braceexpand

    if "::" in spec:
        return True
    expanded = list(braceexpand.braceexpand(spec))
    if len(expanded) != 1 or expanded[0] != spec:
        return True
    return bool(_GLOB_CHARS.search(spec)) and not Path(spec).exists()


def _is_tar(spec: str) -> bool:
    return spec.lower().endswith((".tar", ".tar.gz", ".tgz"))


def is_shard_spec(spec: str | Path) -> bool:
    """Whether ``spec`` names webdataset shards: a URL, a ``.tar`` file, a brace pattern, a glob
    that matches no file by its own name, or several specs joined with ``::``."""
    text = str(spec)
    return _is_remote(text) or _is_tar(text) or _is_shard_pattern(text)


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

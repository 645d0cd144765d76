"""Reading what users give us: image files and shard members, tables, text files, shard
patterns, and the reasons an item is skipped.

This is the bottom of clipforge's data path: inference, evaluation, search and training all read
files through it (nothing here imports a model), so that every part of the package opens the
same files the same way, skips the same items for the same reasons, and reports bad files in
the same words.

* images: :func:`open_image_file` and :func:`open_image_bytes` decode fully or raise
  :class:`BadItem` with one of :data:`REASONS` (a failure is the item's, never the run's);
  :func:`find_images` lists image files by suffix;
* tables and text: :func:`read_utf8` (strict UTF-8), :func:`read_rows` and :func:`read_table`
  (CSV/TSV with a bound on field length, :data:`CSV_FIELD_LIMIT`);
* webdataset shards: :func:`is_shard_spec` and :func:`expand_shards` (brace patterns, globs,
  ``::`` lists), :func:`read_shard` (a tar's raw samples, read errors as error
  :class:`Sample`\\ s);
* file names: :func:`printable_name` and :func:`name_bytes_hex` for names that are not UTF-8.

The image primitives below these (regular files only, the aspect-ratio bound) are
:mod:`clipforge.image.transform`'s, which preprocessing shares.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .fileio import NotUTF8Error, decode_utf8
from .image.transform import (
    ImageLoadError,
    NotRegularFileError,
    check_aspect_ratio,
    open_regular_file,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}

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

_URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:(//)?")
_GLOB_CHARS = re.compile(r"[*?\[]")


# --------------------------------------------------------------------------- items and reasons


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


def bad_sample(key: str, reason: str, detail: str = "") -> Sample:
    return Sample(None, None, key, f"{key}: {reason}" + (f" ({detail})" if detail else ""))


# --------------------------------------------------------------------------- images


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


# --------------------------------------------------------------------------- text and tables


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


# --------------------------------------------------------------------------- webdataset shards


def _is_remote(url: str) -> bool:
    return bool(_URL_SCHEME.match(url)) and not re.match(r"^[a-zA-Z]:[\\/]", url)


def is_remote(url: str) -> bool:
    """Whether a shard URL names a remote stream (``https://``, ``pipe:``...), not a local file
    (a Windows drive letter is local)."""
    return _is_remote(url)


def _is_tar(spec: str) -> bool:
    return spec.lower().endswith((".tar", ".tar.gz", ".tgz"))


def _is_shard_pattern(spec: str) -> bool:
    import braceexpand

    if "::" in spec:
        return True
    expanded = list(braceexpand.braceexpand(spec))
    if len(expanded) != 1 or expanded[0] != spec:
        return True
    return bool(_GLOB_CHARS.search(spec)) and not Path(spec).exists()


def is_shard_spec(spec: str | Path) -> bool:
    """Whether ``spec`` names webdataset shards: a URL, a ``.tar`` file, a brace pattern, a glob
    that matches no file by its own name, or several specs joined with ``::``."""
    text = str(spec)
    return _is_remote(text) or _is_tar(text) or _is_shard_pattern(text)


def expand_shards(urls: str | Path | Iterable[str | Path], must_exist: bool = True) -> list[str]:
    """Shard URLs from ``::``-separated brace patterns (``shards/{00000..00009}.tar``), globs
    and lists.  A local shard that does not exist is an error, unless ``must_exist`` is False
    (``clipforge embed --shards`` records such a shard as failed and goes on)."""
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
    if not must_exist:
        return result
    missing = [u for u in result if not _is_remote(u) and not Path(u).is_file()]
    if missing:
        odd = [u for u in missing if Path(u).exists()]  # a FIFO or a directory named x.tar
        if odd:
            raise DataError(f"shard {odd[0]} of {urls!r} is not a regular file")
        raise DataError(f"{len(missing)} of {len(result)} shard(s) of {urls!r} do not exist, "
                        f"e.g. {missing[0]}")
    return result


class ShardErrors:
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
            yield bad_sample(url, reason)


class BarrenShards:
    """Stops a resampled stream none of whose shards holds a file (an empty tar, random bytes,
    a file that cannot be opened): the stream draws shards for ever, so without this check it
    would wait for ever for a sample, quietly collecting the read errors.

    Two pipeline stages: :meth:`shards` sees each draw, :meth:`files` each tar member read.
    When a shard is drawn, the one before it has been read to its end; once every shard has
    been drawn with no member read since the last one that had any, :class:`DataError` names
    the shards and what was wrong with them.  A source with even one readable shard is never
    stopped: any member read starts the count again.
    """

    def __init__(self, spec: str, urls: Iterable[str], errors: ShardErrors):
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


def with_errors(raws: Iterable[dict[str, Any]], errors: ShardErrors
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


def tar_samples(shards: Iterator[dict[str, str]], errors: ShardErrors,
                 barren: BarrenShards | None = None) -> Iterator[dict[str, Any]]:
    """``wds.tarfile_to_samples``, but closing each shard once read (webdataset 1.0.2 leaves
    that to the garbage collector: a ResourceWarning per shard).  ``barren``: see
    :class:`BarrenShards`."""
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
    errors = ShardErrors()
    return with_errors(tar_samples(iter([{"url": url}]), errors), errors)



# --------------------------------------------------------------------------- file names


def printable_name(name: str) -> str:
    """A file name as valid UTF-8 text, for tables and messages: a name that is not UTF-8
    (``os.fsdecode`` gives lone surrogates for its bytes) shows them as ``\\xNN``."""
    try:
        return name.encode("utf-8").decode("utf-8")
    except UnicodeEncodeError:
        try:
            return os.fsencode(name).decode("utf-8", "backslashreplace")
        except UnicodeError:  # a surrogate no file system would give
            return name.encode("utf-8", "backslashreplace").decode("utf-8")


def name_bytes_hex(name: str) -> str:
    """The exact bytes of a file name that is not UTF-8, in hex (``bytes.fromhex`` and
    ``os.fsdecode`` give the name back); "" for a name :func:`printable_name` shows as it is."""
    try:
        name.encode("utf-8")
        return ""
    except UnicodeEncodeError:
        return os.fsencode(name).hex()


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, and image files (by suffix) found recursively in given directories.
    Whatever is listed is opened by :func:`open_image_file` only if it
    is a regular file: a FIFO named ``x.jpg`` is skipped and reported, never waited on."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(item)
    return paths

"""What an index holds: the items of a folder tree, a CSV/TSV of paths, or webdataset shards.

Scanning lists items without decoding any image: each :class:`Entry` carries the file's size and
modification time, so that a re-run embeds only new or changed items and drops deleted ones.  A
webdataset member is addressed as ``shard.tar#member``; its size and time are the shard's, so a
rewritten shard is re-embedded as a whole.

A video file (by suffix, :data:`~clipforge.video.VIDEO_SUFFIXES`) is one entry too; the build
turns it into segments, each an item of its own addressed as ``video.mp4#t=START,END`` (a W3C
media fragment: its ``member`` is ``t=START,END``, in seconds, and it has no byte span), so that
its segments stand or fall with the file, as a shard's members do.

:func:`read_entry_image` is the one way to get an item's pixels, used by the build (in DataLoader
workers) and by the search side (thumbnails), so both read the same bytes.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..image.transform import open_regular_file
from ..reading import (
    IMAGE_SUFFIXES,
    BadItem,
    DataError,
    expand_shards,
    is_shard_spec,
    open_image_bytes,
    open_image_file,
    read_rows,
    read_utf8,
)
from ..video import frame_at, is_video

_SHARD_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_SEGMENT = re.compile(r"t=(\d+(?:\.\d+)?),(\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class Entry:
    """One item to index.  ``key`` is unique in an index: the absolute path of a file, or
    ``shard#member`` for an image inside a tar shard."""

    key: str
    path: str
    member: str | None  # tar member name, with its data's byte span in the shard
    size: int
    mtime_ns: int
    caption: str | None = None
    extra: str | None = None  # JSON of a CSV row's other columns
    offset: int | None = None
    length: int | None = None

    @property
    def stamp(self) -> tuple[int, int]:
        return self.size, self.mtime_ns


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _caption_beside(path: Path) -> str | None:
    text = path.with_suffix(".txt")
    if not text.is_file():
        return None
    try:
        return read_utf8(text, "caption file").strip() or None
    except (DataError, OSError):
        return None


def scan_folder(root: Path, videos: bool = True) -> Iterator[Entry]:
    """Image files, and video files unless ``videos`` is false (by suffix), anywhere under
    ``root``, in sorted order, with a same-name .txt caption where there is one."""
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                       or (videos and is_video(p))):
        if path.is_file():
            path = path.resolve()
            yield Entry(str(path), str(path), None, *_stat(path), caption=_caption_beside(path))


def scan_table(table: Path, image_key: str = "filepath", caption_key: str = "title",
               separator: str | None = None) -> Iterator[Entry]:
    """Rows of a CSV/TSV with a header: an image path column, an optional caption column, and
    any other columns kept as metadata.  Relative paths resolve against the table's folder.
    Rows whose file is missing are skipped here and reported by the build as missing.  (Read
    with :func:`~clipforge.reading.read_rows`, as training reads tables: the same parse
    errors, named by line.)"""
    columns, rows = read_rows(table, separator)
    columns = columns or []
    if image_key not in columns:
        raise DataError(f"{table} has no column {image_key!r} (columns: {', '.join(columns)}); "
                        "name the image column with --csv-image-key")
    for _, cells in rows:
        # As csv.DictReader: extra cells are dropped (no name), missing ones are None.
        row: dict[str, str | None] = dict(zip(columns, cells))
        row.update({k: None for k in columns[len(cells):]})
        name = (row.get(image_key) or "").strip()
        if not name:
            continue
        path = (table.parent / name).resolve()
        try:
            stamp = _stat(path)
        except OSError:
            stamp = (-1, -1)  # listed but missing: the build reports it
        extra = {k: v for k, v in row.items() if k not in (image_key, caption_key) and k}
        caption = (row.get(caption_key) or "").strip() or None
        yield Entry(str(path), str(path), None, *stamp, caption=caption,
                    extra=json.dumps(extra, ensure_ascii=False) if extra else None)


def scan_shards(spec: str) -> Iterator[Entry]:
    """Image members of local webdataset shards (headers only; nothing is decoded), each with
    the same-key ``.txt`` member's text as caption."""
    for url in expand_shards(spec):
        shard = Path(url).resolve()
        if not shard.is_file():
            raise DataError(f"{url}: only local shards can be indexed (thumbnails and "
                            "incremental updates read the files again)")
        if shard.suffix.lower() in (".gz", ".tgz"):
            raise DataError(f"{shard}: compressed shards cannot be read in place; "
                            "decompress them (gunzip) and index the .tar files")
        stamp = _stat(shard)
        images: dict[str, tarfile.TarInfo] = {}
        captions: dict[str, str] = {}
        try:
            with tarfile.open(shard) as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    base, _, ext = info.name.partition(".")
                    if "." + ext.lower() in _SHARD_IMAGE_SUFFIXES:
                        images.setdefault(base, info)
                    elif ext.lower() == "txt":
                        data = tar.extractfile(info)
                        captions[base] = data.read().decode("utf-8", "replace").strip() if data \
                            else ""
        except (tarfile.TarError, OSError) as exc:
            raise DataError(f"{shard}: corrupt shard ({exc}); repair or remove it") from None
        for base, info in images.items():
            yield Entry(f"{shard}#{info.name}", str(shard), info.name, *stamp,
                        caption=captions.get(base) or None, offset=info.offset_data,
                        length=info.size)


def scan_source(source: str | Path, *, image_key: str = "filepath", caption_key: str = "title",
                separator: str | None = None, videos: bool = True) -> list[Entry]:
    """Every item of ``source`` (a folder, a .csv/.tsv, or shards), keys unique, sorted;
    without ``videos``, video files (by suffix) are left out."""
    text = str(source)
    path = Path(text)
    if path.is_dir():
        entries = list(scan_folder(path, videos))
    elif path.suffix.lower() in (".csv", ".tsv") and path.is_file():
        entries = [e for e in scan_table(path, image_key, caption_key, separator)
                   if videos or not is_video(e.path)]
    elif is_shard_spec(text):
        entries = list(scan_shards(text))
    elif not path.exists():
        raise DataError(f"{text} does not exist; index a folder of images, a .csv/.tsv of "
                        "image paths or webdataset .tar shards")
    else:
        raise DataError(f"{text} is not a folder, a .csv/.tsv table or .tar shards")
    unique = {entry.key: entry for entry in entries}  # a table may list a file twice
    return [unique[key] for key in sorted(unique)]


def format_seconds(seconds: float) -> str:
    """Seconds as a media fragment writes them: to the millisecond, no trailing zeros."""
    return f"{round(seconds, 3):.3f}".rstrip("0").rstrip(".")


def segment_member(start: float, end: float) -> str:
    """The ``member`` of a video segment: the media fragment ``t=START,END``."""
    return f"t={format_seconds(start)},{format_seconds(end)}"


def segment_times(member: object, offset: object = None) -> tuple[float, float] | None:
    """(start, end) in seconds if an item's ``member`` names a video segment, else None.  A
    shard member always has a byte span (``offset``), and its name an image suffix, so the
    two never meet."""
    if offset is not None or not isinstance(member, str):
        return None
    found = _SEGMENT.fullmatch(member)
    return (float(found[1]), float(found[2])) if found else None


def entry_key(key: str, path: str, member: object, offset: object) -> str:
    """The key of the scanned entry an item comes from: its own, or for a video segment the
    video file's, whose size and time decide whether the segment is still current."""
    return path if segment_times(member, offset) is not None else key


def read_entry_image(path: str, member: str | None = None, offset: int | None = None,
                     length: int | None = None, draft: int | None = None) -> Image.Image:
    """The fully decoded image of an item; :class:`BadItem` with the reason if it cannot be.

    A shard member is read by the byte span the scan recorded (one seek, not a walk through
    the tar's headers), which is why a rewritten shard is always re-scanned.  A video
    segment's image is the frame shown at its start.  ``draft``: decode JPEGs at a reduced
    scale, no smaller than this (see :func:`clipforge.reading.open_image_file`).
    """
    if member is None:
        return open_image_file(path, draft)
    times = segment_times(member, offset)
    if times is not None:
        return frame_at(path, times[0])
    try:
        with open_regular_file(path) as f:
            f.seek(offset or 0)
            payload = f.read(length or 0)
    except OSError as exc:
        raise BadItem(f"missing image (cannot read {member} from the shard: {exc})") from None
    if len(payload) != length:
        raise BadItem(f"missing image ({member}: the shard is shorter than when it was "
                      "scanned; run the index build again)")
    return open_image_bytes(payload, member.rsplit(".", 1)[-1], draft)

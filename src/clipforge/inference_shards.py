"""Webdataset shards to per-shard embedding files, resumable and spread over ``torchrun`` ranks:
what ``clipforge embed --shards`` runs (:func:`embed_shards`).

Built for collections too large for one index folder (a billion images: docs/scale-plan.md).
Every shard gets its own files in the output folder, so the unit of work, of failure and of
retry is one shard:

* ``STEM.npy`` -- unit-norm image embeddings, N x D (float16 by default, ``dtype``);
* ``STEM.csv`` -- the N rows' key, caption, url and raw ``.json`` record, in tar order;
* ``STEM.captions.npy`` -- with ``captions``, the captions' embeddings, row for row;
* ``STEM.json`` -- written last, each file before it atomically: the shard is done once it
  exists; it records the counts, the skipped samples and their reasons, and the model's
  fingerprint, so that a folder never mixes embeddings from two models.

Running it again skips the done shards, so a run killed by preemption, node loss or a full disk
is resumed by running it again (with any number of ranks).  A sample that cannot be used is
skipped and counted; a shard that cannot be read (missing, truncated, not a tar) writes nothing,
is listed in ``failed-shards.txt`` and is tried again by the next run.  Rank 0 writes
``manifest.json``, the totals over all shards, after the other ranks are done.

Each rank takes every world_size-th shard of the sorted list of shards not done yet (the ranks
check the files together, then split the leftovers, so a resumed run spreads them over all its
ranks); its DataLoader workers read, decode and preprocess every workers-th of those, while the
model runs in the main process through :func:`clipforge.inference.embed_image_batches`, the one
embedding path.

This sits beside :mod:`clipforge.inference`, below training and search: it talks to
``torch.distributed`` directly (as :mod:`clipforge.search.build` does) and leaves joining the
process group to the caller (the command line uses
:func:`clipforge.training.distributed.init_distributed`).
"""

from __future__ import annotations

import csv
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from .data.sources import WDS_CAPTION_KEY, WDS_IMAGE_KEYS
from .encoder import Encoder
from .fileio import atomic_file
from .inference import ImageBatch, embed_image_batches, embed_texts
from .ranks import all_gather_objects, barrier, rank_and_world
from .reading import (
    CORRUPT_SHARD,
    EMPTY_CAPTION,
    MISSING_CAPTION,
    MISSING_IMAGE,
    UNREADABLE_CAPTION,
    UNREADABLE_IMAGE,
    BadItem,
    DataError,
    Sample,
    expand_shards,
    is_remote,
    open_image_bytes,
    read_shard,
    skip_reason,
)
from .weights.fingerprint import weights_fingerprint

__all__ = ["DTYPES", "FAILED_SHARDS", "FORMAT", "MANIFEST", "ShardReport", "ShardsError",
           "embed_shards", "shard_stem"]

MANIFEST = "manifest.json"
FAILED_SHARDS = "failed-shards.txt"
FORMAT = "clipforge-shard-embeddings"
TABLE_COLUMNS = ("key", "caption", "url", "json")
DTYPES = ("float16", "float32")
_SHARD_SUFFIX = re.compile(r"(\.tar|\.tar\.gz|\.tgz)$", re.IGNORECASE)


class ShardsError(ValueError):
    """The shards or the output folder cannot be used as asked; ``str()`` says what to do."""


@dataclass
class ShardReport:
    """What one rank did in this run; on rank 0 also the folder's ``manifest.json`` (totals
    over every shard, earlier runs' too).  Every rank's report is gathered on rank 0, so it
    stays a plain, picklable record."""

    rank: int = 0
    embedded_shards: int = 0
    already_done: int = 0
    samples: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (shard url, reason)
    manifest: dict[str, Any] | None = None


# --------------------------------------------------------------------------- the shard list


@dataclass(frozen=True)
class ShardFiles:
    """One shard and the files it is written to in the output folder."""

    url: str
    stem: str
    out: Path

    def path(self, suffix: str) -> Path:
        return self.out / f"{self.stem}{suffix}"

    @property
    def vectors(self) -> Path:
        return self.path(".npy")

    @property
    def table(self) -> Path:
        return self.path(".csv")

    @property
    def captions(self) -> Path:
        return self.path(".captions.npy")

    @property
    def record(self) -> Path:
        return self.path(".json")


def shard_stem(url: str) -> str:
    """``data/000123.tar`` -> ``000123`` (also for URLs and ``.tar.gz``): the name a shard's
    files share in the output folder."""
    name = url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    return _SHARD_SUFFIX.sub("", name) or name


def plan_shards(spec: str, out: Path) -> list[ShardFiles]:
    """The sorted, de-duplicated shards of ``spec`` with their output files.  Shards missing on
    disk stay in the list (they are recorded as failed when read); two shards with the same
    file name would write the same files, which is an error."""
    try:
        urls = sorted(set(expand_shards(spec, must_exist=False)))
    except DataError as exc:
        raise ShardsError(f"--shards: {exc}") from None
    shards = [ShardFiles(url, shard_stem(url), out) for url in urls]
    seen: dict[str, str] = {}
    for shard in shards:
        if shard.stem in seen:
            raise ShardsError(f"shards {seen[shard.stem]} and {shard.url} would both be "
                              f"written as {shard.stem}.npy in {out}; embed them into separate "
                              "--out folders")
        seen[shard.stem] = shard.url
    return shards


def read_record(path: Path) -> dict[str, Any] | None:
    """A shard's or the folder's JSON record; None if absent or unreadable (not done)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class Settings:
    """What every file in one output folder must agree on."""

    fingerprint: str
    dim: int
    dtype: str

    def check(self, record: dict[str, Any], where: Path) -> None:
        """Refuse to add to ``where`` embeddings made another way than ``record``'s."""
        theirs = {k: record.get(k) for k in ("fingerprint", "dim", "dtype")}
        ours = {"fingerprint": self.fingerprint, "dim": self.dim, "dtype": self.dtype}
        if theirs != ours:
            diff = ", ".join(f"{k} {theirs[k]} there, {ours[k]} now" for k in ours
                             if theirs[k] != ours[k])
            raise ShardsError(f"{where} holds embeddings made differently ({diff}): use the "
                              "same --model, --weights and --dtype to resume, or another --out")


def is_done(shard: ShardFiles, settings: Settings, captions: bool) -> bool:
    """Whether ``shard`` was embedded by an earlier run with these settings: its record and
    every data file exist (deleting one file makes the shard run again)."""
    record = read_record(shard.record)
    if record is None:
        return False
    settings.check(record, shard.record)
    files = [shard.vectors, shard.table] + ([shard.captions] if captions else [])
    return all(f.is_file() for f in files)


def pending_shards(shards: Sequence[ShardFiles], settings: Settings, captions: bool, rank: int,
                   world: int) -> tuple[list[ShardFiles], int]:
    """The shards not done yet, the same sorted list on every rank, and how many of its share
    this rank found done.  Each rank checks every world-th shard's files, then the ranks pool
    their lists: a resumed run splits only the leftover shards between all its ranks, so that
    the shards a lost node left behind do not all fall to one rank."""
    mine = list(shards[rank::world])
    todo = [s.stem for s in mine if not is_done(s, settings, captions)]
    pending = {stem for part in all_gather_objects(todo) for stem in part}  # type: ignore[union-attr]
    return [s for s in shards if s.stem in pending], len(mine) - len(todo)


# --------------------------------------------------------------------------- reading (workers)


class Row(NamedTuple):
    """A sample's place (shard index, position in the tar) and its table fields."""

    shard: int
    position: int
    key: str
    caption: str
    url: str
    json: str
    caption_error: str


class ShardEnd(NamedTuple):
    """The marker a reader sends after a shard's last sample; ``error``: why it could not be
    read to the end (its samples are then not used)."""

    shard: int
    error: str | None


def _text(raw: dict[str, Any], name: str) -> tuple[str, str]:
    """A member as text, and "" or the reason it cannot be used."""
    if name not in raw:
        return "", MISSING_CAPTION if name == WDS_CAPTION_KEY else ""
    try:
        text = raw[name].decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        return "", f"{UNREADABLE_CAPTION} ({exc})"
    return text, "" if text or name != WDS_CAPTION_KEY else EMPTY_CAPTION


def _row(shard: int, position: int, raw: dict[str, Any]) -> Row:
    """A sample's table fields, read before its image so that a skipped sample still has its
    key for the shard's record."""
    caption, caption_error = _text(raw, WDS_CAPTION_KEY)
    record, _ = _text(raw, "json")
    url = ""
    if record:  # img2dataset's metadata: the url is the one field worth a column
        try:
            url = json.loads(record).get("url") or ""
        except (ValueError, AttributeError):
            pass
    return Row(shard, position, str(raw.get("__key__", "?")), caption, str(url), record,
               caption_error)


def short_shard(url: str, samples: int) -> str | None:
    """Why a shard that read to its end without an error is still incomplete, or None.

    A tar cut exactly between two members reads as a valid, shorter tar (the format records no
    count), so the only check is img2dataset's ``STEM_stats.json`` beside a local shard: fewer
    samples than its ``successes`` means the copy is truncated."""
    if is_remote(url):
        return None
    stats = read_record(Path(url).with_name(f"{shard_stem(url)}_stats.json"))
    expected = stats.get("successes") if stats else None
    if isinstance(expected, int) and samples < expected:
        return (f"{CORRUPT_SHARD} (truncated: {samples} sample(s) read, its _stats.json lists "
                f"{expected})")
    return None


class ShardImages(IterableDataset):
    """The samples of ``shards`` as ``(Row, pixels or None, reason)``, each shard followed by
    its :class:`ShardEnd` (as an item with no pixels).  DataLoader worker ``w`` of ``n`` reads
    shards ``w, w+n, ...``, so each shard is read once, whole, by one process."""

    def __init__(self, shards: Sequence[ShardFiles], preprocess: Callable,
                 draft: int | None = None, need_caption: bool = False):
        self.urls = [s.url for s in shards]
        self.preprocess, self.draft, self.need_caption = preprocess, draft, need_caption

    def __iter__(self) -> Iterator[tuple[Row | ShardEnd, Any, str]]:
        info = get_worker_info()
        start, step = (info.id, info.num_workers) if info else (0, 1)
        for index in range(start, len(self.urls), step):
            yield from self._read(index)

    def _read(self, index: int) -> Iterator[tuple[Row | ShardEnd, Any, str]]:
        """One shard's items, then its end marker (with the error that stopped it, if any)."""
        url = self.urls[index]
        if not is_remote(url) and not Path(url).is_file():
            yield ShardEnd(index, f"{CORRUPT_SHARD} (no such file)"), None, "end"
            return
        position = 0
        for raw in read_shard(url):
            if isinstance(raw, Sample):  # the tar itself is unreadable from here on
                reason = (raw.error or CORRUPT_SHARD).removeprefix(f"{url}: ")
                yield ShardEnd(index, reason), None, "end"
                return
            yield self._item(_row(index, position, raw), raw)
            position += 1
        yield ShardEnd(index, short_shard(url, position)), None, "end"

    def _item(self, row: Row, raw: dict[str, Any]) -> tuple[Row, Any, str]:
        """A sample's pixels, or the reason it is skipped (never raised: one bad sample must
        not stop its shard)."""
        ext = next((k for k in WDS_IMAGE_KEYS if k in raw), None)
        if ext is None:
            has = ", ".join(sorted(k for k in raw if not k.startswith("__"))) or "nothing"
            return row, None, f"{MISSING_IMAGE} (sample has: {has})"
        if self.need_caption and row.caption_error:
            return row, None, row.caption_error
        try:
            return row, self.preprocess(open_image_bytes(raw[ext], ext, self.draft)), ""
        except BadItem as exc:
            return row, None, str(exc)
        except Exception as exc:  # a mode or size the transform cannot take
            return row, None, f"{UNREADABLE_IMAGE} ({type(exc).__name__}: {exc})"


# --------------------------------------------------------------------------- writing (main)


@dataclass(frozen=True)
class _Options:
    """How the shards are embedded: the keyword arguments of :func:`embed_shards`."""

    batch_size: int
    workers: int
    captions: bool
    truncate: bool
    fast_decode: bool


@dataclass
class _Pending:
    """A shard being read: its rows with their vectors, and its skipped samples."""

    rows: list[tuple[Row, np.ndarray]] = field(default_factory=list)
    skipped: list[tuple[Row, str]] = field(default_factory=list)


def _save_array(path: Path, array: np.ndarray) -> None:
    """``np.save`` under a temporary name, renamed once complete (a killed run leaves none)."""
    with atomic_file(path) as tmp, tmp.open("wb") as f:
        np.save(f, array)


def _save_table(path: Path, rows: Sequence[Row]) -> None:
    """The shard's CSV, written atomically like its arrays."""
    with atomic_file(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(TABLE_COLUMNS)
        writer.writerows((r.key, r.caption, r.url, r.json) for r in rows)


def _shard_record(shard: ShardFiles, settings: Settings, samples: int,
                  skipped: list[tuple[str, str]], captions: bool) -> dict[str, Any]:
    """``STEM.json``: the shard's counts, its skipped samples, and the settings the folder
    must agree on."""
    return {"format": FORMAT, "shard": shard.url, "samples": samples, "skipped": len(skipped),
            "skipped_by_reason": dict(Counter(skip_reason(r) for _, r in skipped)),
            "skipped_samples": [{"key": k, "reason": r} for k, r in skipped],
            "fingerprint": settings.fingerprint, "dim": settings.dim,
            "dtype": settings.dtype, "captions": captions}


class ShardWriter:
    """Collects batches into shards and writes each shard's files when its end arrives."""

    def __init__(self, model: Encoder, shards: Sequence[ShardFiles], settings: Settings,
                 options: _Options, report: ShardReport):
        self.model, self.shards, self.settings = model, shards, settings
        self.captions, self.truncate = options.captions, options.truncate
        self.text_batch = options.batch_size * 8
        self.report = report
        self.pending: dict[int, _Pending] = {}

    def add(self, batch: ImageBatch) -> None:
        """Sort a batch's samples into their shards; finish the shards whose end it holds."""
        for row, vector in zip(batch.tags, batch.vectors):
            self.pending.setdefault(row.shard, _Pending()).rows.append((row, vector))
        ends = []
        for tag, reason in batch.failures:
            if isinstance(tag, ShardEnd):
                ends.append(tag)
            else:
                self.pending.setdefault(tag.shard, _Pending()).skipped.append((tag, reason))
        for end in ends:  # after the whole batch: a shard's last samples may share it
            self.finish(end)

    def finish(self, end: ShardEnd) -> None:
        """Write a shard read to its end, in tar order; a failed one only goes in the report."""
        shard = self.shards[end.shard]
        pending = self.pending.pop(end.shard, _Pending())
        if end.error is not None:
            self.report.failed.append((shard.url, end.error))
            return
        pending.rows.sort(key=lambda item: item[0].position)
        rows = [row for row, _ in pending.rows]
        dim = self.settings.dim
        vectors = (np.stack([v for _, v in pending.rows]) if rows
                   else np.zeros((0, dim), np.float32))
        skipped = [(row.key, reason) for row, reason in pending.skipped]
        text_vectors = None
        if self.captions:
            rows, vectors, text_vectors, too_long = self._embed_captions(rows, vectors)
            skipped += too_long
        self._write(shard, rows, vectors, text_vectors, skipped)

    def _embed_captions(self, rows: list[Row], vectors: np.ndarray
                        ) -> tuple[list[Row], np.ndarray, np.ndarray, list[tuple[str, str]]]:
        """The captions' embeddings; a caption the model cannot take (over-long without
        ``truncate``) drops its sample from both files."""
        result = embed_texts(self.model, [r.caption for r in rows], self.text_batch,
                             truncate=self.truncate, progress=False)
        kept = [int(i) for i in result.ids]
        dropped = [(rows[int(i)].key, reason) for i, reason in result.failures]
        return [rows[i] for i in kept], vectors[kept], result.vectors, dropped

    def _write(self, shard: ShardFiles, rows: list[Row], vectors: np.ndarray,
               text_vectors: np.ndarray | None, skipped: list[tuple[str, str]]) -> None:
        """The shard's files, its record last (the shard is done once that exists)."""
        dtype = np.dtype(self.settings.dtype)
        _save_array(shard.vectors, vectors.astype(dtype))
        _save_table(shard.table, rows)
        if text_vectors is not None:
            _save_array(shard.captions, text_vectors.astype(dtype))
        record = _shard_record(shard, self.settings, len(rows), skipped,
                               text_vectors is not None)
        with atomic_file(shard.record) as tmp:
            tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        self.report.embedded_shards += 1
        self.report.samples += len(rows)
        self.report.skipped += len(skipped)


def embed_shard_files(model: Encoder, shards: Sequence[ShardFiles], settings: Settings,
                      options: _Options, report: ShardReport, progress: bool) -> None:
    """Embed ``shards`` into their files, counting into ``report``."""
    if not shards:
        return
    draft = model.preprocess.image_size if options.fast_decode else None
    dataset = ShardImages(shards, model.preprocess, draft, need_caption=options.captions)
    writer = ShardWriter(model, shards, settings, options, report)
    for batch in embed_image_batches(model, dataset, options.batch_size,
                                     min(options.workers, len(shards)), progress=progress,
                                     desc=f"shards ({len(shards)})"):
        writer.add(batch)


# --------------------------------------------------------------------------- the manifest


def _count_done(shards: Sequence[ShardFiles]) -> tuple[int, int, int, Counter]:
    """(shards done, samples, skipped, skipped by reason) over the shards' records, earlier
    runs' too: the manifest describes the folder, not one run."""
    done, samples, skipped, reasons = 0, 0, 0, Counter()
    for shard in shards:
        record = read_record(shard.record)
        if record is None:
            continue
        done += 1
        samples += int(record.get("samples", 0))
        skipped += int(record.get("skipped", 0))
        reasons.update(record.get("skipped_by_reason") or {})
    return done, samples, skipped, reasons


def _write_failed(out: Path, failed: list[tuple[str, str]]) -> None:
    """``failed-shards.txt``, one ``url<TAB>reason`` a line; removed when nothing failed, so
    its presence alone says a rerun is needed."""
    path = out / FAILED_SHARDS
    if failed:
        with atomic_file(path) as tmp:
            tmp.write_text("".join(f"{url}\t{reason}\n" for url, reason in failed),
                           encoding="utf-8")
    else:
        path.unlink(missing_ok=True)


def write_manifest(out: Path, shards: Sequence[ShardFiles], settings: Settings,
                   origin: dict[str, Any], failed: list[tuple[str, str]]) -> dict[str, Any]:
    """Totals over every shard's record (earlier runs' too), and the failed shards, in
    ``manifest.json`` and ``failed-shards.txt`` (removed when nothing failed)."""
    done, samples, skipped, reasons = _count_done(shards)
    failed = sorted(failed)
    manifest = {"format": FORMAT, "format_version": 1, "updated": time.time(),
                "model": origin.get("model"), "weights": origin.get("weights"),
                "origin": origin, "fingerprint": settings.fingerprint, "dim": settings.dim,
                "dtype": settings.dtype, "shards": len(shards), "shards_done": done,
                "shards_failed": len(failed), "samples": samples, "skipped": skipped,
                "skipped_by_reason": dict(reasons.most_common()),
                "failed": [{"shard": url, "reason": reason} for url, reason in failed]}
    with atomic_file(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    _write_failed(out, failed)
    return manifest


# --------------------------------------------------------------------------- the run


def _open_folder(out: Path, settings: Settings, rank: int) -> None:
    """Create ``out`` (rank 0, before the others look in it) and refuse a folder whose
    manifest records another model or dtype."""
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    previous = read_record(out / MANIFEST)
    if previous is not None:
        settings.check(previous, out / MANIFEST)


def _finish(out: Path, shards: Sequence[ShardFiles], settings: Settings, origin: dict[str, Any],
            report: ShardReport) -> None:
    """Gather every rank's report (also the wait for every rank's shards) and, on rank 0, write
    the manifest over them into ``report.manifest``."""
    everyone = all_gather_objects(report)
    if report.rank == 0:
        failed = [f for r in everyone for f in r.failed]  # type: ignore[attr-defined]
        report.manifest = write_manifest(out, shards, settings, origin, failed)
    barrier()


def embed_shards(model: Encoder, shards: str, out: str | Path, *, batch_size: int = 32,
                 workers: int = 0, captions: bool = False, dtype: str = "float16",
                 truncate: bool = False, fast_decode: bool = False, progress: bool = True,
                 on_rank_done: Callable[[ShardReport], None] | None = None) -> ShardReport:
    """Embed the webdataset ``shards`` (brace patterns, globs, ``::``-separated) into per-shard
    files in ``out``, skipping the shards an earlier run finished; this rank's share under
    ``torchrun`` (the caller joins the process group; every rank must call).

    ``captions`` also embeds each sample's ``.txt`` (a sample without one is skipped);
    ``truncate`` cuts an over-long caption instead of skipping its sample; ``dtype`` is the
    files' float type (one of :data:`DTYPES`); ``fast_decode`` decodes large JPEGs at a reduced
    scale; ``workers`` DataLoader processes each read whole shards; the progress bar shows on
    rank 0 only.  ``on_rank_done(report)`` is called once this rank's shards are written, before
    it waits for the others, so that each rank's account is out even if another rank fails.

    Returns this rank's :class:`ShardReport` (with the manifest on rank 0).  Raises
    :class:`ShardsError` for a shard list that names nothing or two shards with one file name,
    and for a folder holding embeddings of another model or dtype.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out = Path(out)
    files = plan_shards(shards, out)
    settings = Settings(weights_fingerprint(model), model.config.embed_dim, dtype)
    rank, world = rank_and_world()
    _open_folder(out, settings, rank)
    pending, done_here = pending_shards(files, settings, captions, rank, world)
    report = ShardReport(rank=rank, already_done=done_here)
    options = _Options(batch_size, workers, captions, truncate, fast_decode)
    embed_shard_files(model, pending[rank::world], settings, options, report,
                      progress=progress and rank == 0)
    if on_rank_done is not None:
        on_rank_done(report)
    _finish(out, files, settings, model.origin or {}, report)
    return report

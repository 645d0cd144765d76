"""``clipforge embed --shards``: webdataset shards to per-shard embedding files, resumable, and
spread over ``torchrun`` ranks.

Built for collections too large for one index folder (a billion images: docs/scale-plan.md).
Every shard gets its own files in ``--out``, so the unit of work, of failure and of retry is one
shard:

* ``STEM.npy`` -- unit-norm image embeddings, N x D (float16 by default, ``--dtype``);
* ``STEM.csv`` -- the N rows' key, caption, url and raw ``.json`` record, in tar order;
* ``STEM.captions.npy`` -- with ``--captions``, the captions' embeddings, row for row;
* ``STEM.json`` -- written last, each file before it atomically: the shard is done once it
  exists; it records the counts, the skipped samples and their reasons, and the model's
  fingerprint, so that a folder never mixes embeddings from two models.

Re-running the same command skips the done shards, so a run killed by preemption, node loss or
a full disk is resumed by running it again (with any number of ranks).  A sample that cannot be
used is skipped and counted; a shard that cannot be read (missing, truncated, not a tar) writes
nothing, is listed in ``failed-shards.txt`` and is tried again by the next run.  Rank 0 writes
``manifest.json``, the totals over all shards, after the other ranks are done.

Each rank takes every world_size-th shard of the sorted list of shards not done yet (the ranks
check the files together, then split the leftovers, so a resumed run spreads them over all its
ranks); its DataLoader workers read, decode and preprocess every workers-th of those, while the
model runs in the main process through :func:`clipforge.inference.embed_image_batches`, the one
embedding path.
"""

from __future__ import annotations

import argparse
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

from ..data.sources import WDS_CAPTION_KEY, WDS_IMAGE_KEYS
from ..encoder import Encoder
from ..fileio import atomic_file
from ..inference import ImageBatch, embed_image_batches, embed_texts
from ..reading import (
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
from ..weights.fingerprint import weights_fingerprint

MANIFEST = "manifest.json"
FAILED_SHARDS = "failed-shards.txt"
FORMAT = "clipforge-shard-embeddings"
TABLE_COLUMNS = ("key", "caption", "url", "json")
DTYPES = ("float16", "float32")
_SHARD_SUFFIX = re.compile(r"(\.tar|\.tar\.gz|\.tgz)$", re.IGNORECASE)


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
    """``data/000123.tar`` -> ``000123`` (also for URLs and ``.tar.gz``)."""
    name = url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    return _SHARD_SUFFIX.sub("", name) or name


def plan_shards(spec: str, out: Path) -> list[ShardFiles]:
    """The sorted, de-duplicated shards of ``spec`` with their output files.  Shards missing on
    disk stay in the list (they are recorded as failed when read); two shards with the same
    file name would write the same files, which is an error."""
    try:
        urls = sorted(set(expand_shards(spec, must_exist=False)))
    except DataError as exc:
        raise SystemExit(f"error: --shards: {exc}") from None
    shards = [ShardFiles(url, shard_stem(url), out) for url in urls]
    seen: dict[str, str] = {}
    for shard in shards:
        if shard.stem in seen:
            raise SystemExit(f"error: shards {seen[shard.stem]} and {shard.url} would both be "
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
            raise SystemExit(f"error: {where} holds embeddings made differently ({diff}): "
                             "use the same --model, --weights and --dtype to resume, or "
                             "another --out")


def is_done(shard: ShardFiles, settings: Settings, captions: bool) -> bool:
    """Whether ``shard`` was embedded by an earlier run with these settings: its record and
    every data file exist (deleting one file makes the shard run again)."""
    record = read_record(shard.record)
    if record is None:
        return False
    settings.check(record, shard.record)
    files = [shard.vectors, shard.table] + ([shard.captions] if captions else [])
    return all(f.is_file() for f in files)


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


@dataclass
class Totals:
    """What one rank did in this run."""

    embedded_shards: int = 0
    already_done: int = 0
    samples: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    def line(self, rank: int) -> str:
        return (f"rank {rank}: {self.embedded_shards} shard(s) embedded, {self.already_done} "
                f"already done, {len(self.failed)} failed; {self.samples} samples, "
                f"{self.skipped} skipped")


@dataclass
class _Pending:
    """A shard being read: its rows with their vectors, and its skipped samples."""

    rows: list[tuple[Row, np.ndarray]] = field(default_factory=list)
    skipped: list[tuple[Row, str]] = field(default_factory=list)


def _save_array(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as tmp, tmp.open("wb") as f:
        np.save(f, array)


def _save_table(path: Path, rows: Sequence[Row]) -> None:
    with atomic_file(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(TABLE_COLUMNS)
        writer.writerows((r.key, r.caption, r.url, r.json) for r in rows)


class ShardWriter:
    """Collects batches into shards and writes each shard's files when its end arrives."""

    def __init__(self, model: Encoder, shards: Sequence[ShardFiles], settings: Settings,
                 args: argparse.Namespace, totals: Totals):
        self.model, self.shards, self.settings = model, shards, settings
        self.captions, self.truncate = args.captions, args.truncate
        self.text_batch = args.batch_size * 8
        self.totals = totals
        self.pending: dict[int, _Pending] = {}

    def add(self, batch: ImageBatch) -> None:
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
        shard = self.shards[end.shard]
        pending = self.pending.pop(end.shard, _Pending())
        if end.error is not None:
            self.totals.failed.append((shard.url, end.error))
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
        --truncate) drops its sample from both files."""
        result = embed_texts(self.model, [r.caption for r in rows], self.text_batch,
                             truncate=self.truncate, progress=False)
        kept = [int(i) for i in result.ids]
        dropped = [(rows[int(i)].key, reason) for i, reason in result.failures]
        return [rows[i] for i in kept], vectors[kept], result.vectors, dropped

    def _write(self, shard: ShardFiles, rows: list[Row], vectors: np.ndarray,
               text_vectors: np.ndarray | None, skipped: list[tuple[str, str]]) -> None:
        dtype = np.dtype(self.settings.dtype)
        _save_array(shard.vectors, vectors.astype(dtype))
        _save_table(shard.table, rows)
        if text_vectors is not None:
            _save_array(shard.captions, text_vectors.astype(dtype))
        record = {"format": FORMAT, "shard": shard.url, "samples": len(rows),
                  "skipped": len(skipped),
                  "skipped_by_reason": dict(Counter(skip_reason(r) for _, r in skipped)),
                  "skipped_samples": [{"key": k, "reason": r} for k, r in skipped],
                  "fingerprint": self.settings.fingerprint, "dim": self.settings.dim,
                  "dtype": self.settings.dtype, "captions": text_vectors is not None}
        with atomic_file(shard.record) as tmp:  # last: the shard is done once this exists
            tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        self.totals.embedded_shards += 1
        self.totals.samples += len(rows)
        self.totals.skipped += len(skipped)


# --------------------------------------------------------------------------- the run


def pending_shards(shards: Sequence[ShardFiles], settings: Settings, captions: bool, rank: int,
                   world: int, gather: Callable[[object], list[object]]
                   ) -> tuple[list[ShardFiles], int]:
    """The shards not done yet, the same sorted list on every rank, and how many of its share
    this rank found done.  Each rank checks every world-th shard's files, then the ranks pool
    their lists: a resumed run splits only the leftover shards between all its ranks, so that
    the shards a lost node left behind do not all fall to one rank."""
    mine = list(shards[rank::world])
    todo = [s.stem for s in mine if not is_done(s, settings, captions)]
    pending = {stem for part in gather(todo) for stem in part}  # type: ignore[union-attr]
    return [s for s in shards if s.stem in pending], len(mine) - len(todo)


def embed_shard_files(model: Encoder, shards: Sequence[ShardFiles], settings: Settings,
                      args: argparse.Namespace, totals: Totals, progress: bool) -> None:
    """Embed ``shards`` into their files, counting into ``totals``."""
    if not shards:
        return
    draft = model.preprocess.image_size if args.fast_decode else None
    dataset = ShardImages(shards, model.preprocess, draft, need_caption=args.captions)
    writer = ShardWriter(model, shards, settings, args, totals)
    for batch in embed_image_batches(model, dataset, args.batch_size,
                                     min(args.workers, len(shards)), progress=progress,
                                     desc=f"shards ({len(shards)})"):
        writer.add(batch)


def write_manifest(out: Path, shards: Sequence[ShardFiles], settings: Settings,
                   origin: dict[str, Any], failed: list[tuple[str, str]]) -> dict[str, Any]:
    """Totals over every shard's record (earlier runs' too), and the failed shards, in
    ``manifest.json`` and ``failed-shards.txt`` (removed when nothing failed)."""
    done, samples, skipped, reasons = 0, 0, 0, Counter()
    for shard in shards:
        record = read_record(shard.record)
        if record is None:
            continue
        done += 1
        samples += int(record.get("samples", 0))
        skipped += int(record.get("skipped", 0))
        reasons.update(record.get("skipped_by_reason") or {})
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
    failed_path = out / FAILED_SHARDS
    if failed:
        with atomic_file(failed_path) as tmp:
            tmp.write_text("".join(f"{url}\t{reason}\n" for url, reason in failed),
                           encoding="utf-8")
    else:
        failed_path.unlink(missing_ok=True)
    return manifest


def run(args: argparse.Namespace) -> int:
    """``clipforge embed --shards``, in one process or as one torchrun rank."""
    import torch.distributed as dist

    from ..training.distributed import all_gather_objects, barrier, init_distributed
    from .options import load_model

    if args.images or args.texts:
        raise SystemExit("error: --shards cannot be combined with --images or --texts")
    ranks, device = init_distributed(args.device)
    try:
        args.device = str(device)
        return _run(args, load_model(args), ranks.rank, ranks.world_size,
                    all_gather_objects, barrier)
    finally:
        if ranks.enabled:
            dist.destroy_process_group()


def _run(args: argparse.Namespace, model: Encoder, rank: int, world: int,
         gather: Callable[[object], list[object]], barrier: Callable[[], None]) -> int:
    out = Path(args.out)
    shards = plan_shards(args.shards, out)
    settings = Settings(weights_fingerprint(model), model.config.embed_dim, args.dtype)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    previous = read_record(out / MANIFEST)
    if previous is not None:
        settings.check(previous, out / MANIFEST)
    pending, done_here = pending_shards(shards, settings, args.captions, rank, world, gather)
    totals = Totals(already_done=done_here)
    embed_shard_files(model, pending[rank::world], settings, args, totals, progress=rank == 0)
    print(totals.line(rank), flush=True)
    for url, reason in totals.failed:
        print(f"failed shard {url}: {reason}", flush=True)
    everyone = gather(totals)  # also the barrier: every rank has written its shards
    if rank == 0:
        failed = [f for t in everyone for f in t.failed]  # type: ignore[attr-defined]
        manifest = write_manifest(out, shards, settings, model.origin or {}, failed)
        print(f"{out}: {manifest['shards_done']} of {manifest['shards']} shard(s) done, "
              f"{manifest['samples']} samples, {manifest['skipped']} skipped, "
              f"{len(failed)} shard(s) failed" + (f" (listed in {out / FAILED_SHARDS}; run "
                                                   "the same command again to retry them)"
                                                   if failed else ""), flush=True)
    barrier()
    return 0

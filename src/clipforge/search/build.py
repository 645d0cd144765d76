"""Building and updating an index: scan, embed what is new or changed, commit in one step.

A build is incremental and crash-safe.  The scan (no decoding) says which items are new or
changed by size and modification time; only those are embedded, batch by batch, each batch
durable in the rank's staging file once written.  A build that is killed leaves the committed
index untouched (searches go on seeing the old state) and its finished batches staged, so
running it again embeds only the rest.  The last step merges the staged embeddings, drops items
whose files are gone, and bumps the generation, in one SQLite transaction.

With a memory budget (``max_index_memory``), the commit also decides where the rows of the
new generation live (:func:`clipforge.search.vectors.plan_storage`): in memory as before, or,
when they do not fit, in memory-mapped files (float16 rows, ids, an IVF index with its lists on
disk) that are written inside the commit's transaction, before it commits, each under a
temporary name and renamed once complete.  A build killed while writing them leaves the old
generation and its files untouched, and the next build writes them again; older generations'
files are removed once the new one is committed.

With a Milvus backend (``vector_store``, :mod:`clipforge.search.milvus`), the commit also mirrors
the new state into the Milvus collection (rows an unfinished build left deleted, missing ones
inserted) before it commits, and the rows it dropped are deleted from the collection after it.

Under ``torchrun`` every rank scans the same source, embeds every world-size-th pending item
into its own staging file, and rank 0 merges them all after a barrier; a resumed build may use
another number of ranks, since the merge reads whatever is staged.

Video files are embedded after the images (:mod:`clipforge.search.video`): each becomes
segments, one item each, staged together once the whole video is done, so a killed build never
commits part of a video.  The index records the video options (``info["video"]``); a build with
other options embeds every video again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..encoder import Encoder
from ..fileio import atomic_file
from ..inference import ImageBatch, embed_image_batches
from ..ranks import barrier, rank_and_world
from ..reading import BadItem, DataError
from ..video import INSTALL_HINT, have_pyav, is_video
from ..weights.fingerprint import weights_fingerprint
from .milvus import MilvusBackend, index_type, parse_backend, prune_collection, sync_collection
from .sources import Entry, read_entry_image, scan_source, segment_member
from .store import (
    FORMAT_VERSION,
    STAGING_DIR,
    Staging,
    Store,
    clear_staging,
    staged_stamps,
    staging_files,
)
from .vectors import (
    ANN_KINDS,
    DiskFiles,
    VectorIndex,
    memory_bytes,
    parse_memory,
    plan_storage,
    save_rows,
)
from .video import VideoOptions, VideoResult, embed_videos

log = logging.getLogger(__name__)

REPORT_NAME = "report.json"
_SURROGATE = re.compile("[\ud800-\udfff]")
# ann-G.faiss, ondisk-G.*, and their temporary files (.ann-G.faiss.1f2e3d4c.tmp)
_GENERATION_FILE = re.compile(r"(\.)?(?:ann|ondisk)-(\d+)\..+")


def json_text(data: object, **kwargs: Any) -> str:
    """``json.dumps(data, ensure_ascii=False)``, but valid UTF-8 whatever the file names.

    A name that is not UTF-8 is a str with lone surrogates (``os.fsdecode``); written raw they
    cannot be encoded.  Each becomes the JSON escape ``\\udcXX`` instead (what ``json.dumps``
    does with ``ensure_ascii=True``), so ``json.loads`` gives back the same str and
    ``os.fsencode`` of it the exact bytes, while other non-ASCII names stay readable.
    """
    text = json.dumps(data, ensure_ascii=False, **kwargs)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class IndexMismatchError(ValueError):
    """Embeddings from one model were about to meet embeddings from another."""


def recorded_origin(info: dict[str, str]) -> dict[str, Any] | None:
    """How to load the model that built an index (``model.origin``, see
    :func:`clipforge.factory.load_origin`), from its recorded info; None if it records none.
    Indexes record it as JSON; older ones as two strings, "None" for no weights."""
    if info.get("origin"):
        try:
            origin = json.loads(info["origin"])
        except json.JSONDecodeError:
            origin = None
        return origin if isinstance(origin, dict) and isinstance(origin.get("model"), str) \
            else None
    model, weights = info.get("model"), info.get("weights")
    if model in (None, "", "None"):
        return None
    return {"model": model, "weights": None if weights in (None, "", "None") else weights}


def mismatch_message(directory: Path, info: dict[str, str], fingerprint: str,
                     action: str) -> str:
    origin = recorded_origin(info) or {}
    made_with = origin.get("model") or "an unrecorded model"
    weights = f" with weights {origin['weights']}" if origin.get("weights") else ""
    return (f"the index {directory} was built with {made_with}{weights} (weights fingerprint "
            f"{info.get('fingerprint')}); the model given has fingerprint {fingerprint}, so its "
            f"embeddings are not comparable. To {action}, use the index's own model (leave out "
            "--model), or build a new index with --out elsewhere")


@dataclass
class BuildReport:
    """What one build did; also written as ``report.json`` in the index directory."""

    index: str
    source: str
    model: str | None
    fingerprint: str
    scanned: int = 0
    unchanged: int = 0
    resumed: int = 0  # staged by an earlier, interrupted build and not embedded again
    embedded: int = 0  # read and embedded by this run (this rank, under torchrun)
    added: int = 0
    removed: int = 0
    total: int = 0
    generation: int = 0
    ann: str = "flat"
    storage: str = "memory"  # "ondisk": the rows did not fit max_index_memory; or "milvus"
    seconds: float = 0.0
    videos: int = 0  # videos read by this run (this rank), counted in embedded too
    video_seconds: float = 0.0  # their length
    segments: int = 0  # the segments they gave
    failures: list[tuple[str, str]] = field(default_factory=list)  # all current failures

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds else 0.0

    def to_json(self) -> str:
        data = asdict(self)
        data["images_per_second"] = round(self.images_per_second, 2)
        data["failures"] = [{"item": k, "reason": r} for k, r in self.failures]
        return json_text(data, indent=2)


class _EntryImages(Dataset):
    """Decoded, preprocessed images of entries, for DataLoader workers; the tag carries the
    entry's position and its original size, or the reason it could not be read."""

    def __init__(self, entries: Sequence[Entry], preprocess: Callable, draft: int | None = None):
        self.entries, self.preprocess, self.draft = list(entries), preprocess, draft

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[tuple[int, int, int], Any, str]:
        entry = self.entries[index]
        try:
            image = read_entry_image(entry.path, entry.member, entry.offset, entry.length,
                                     self.draft)
        except BadItem as exc:
            return (index, 0, 0), None, f"{entry.key}: {exc}"
        try:
            return (index, *image.info["original_size"]), self.preprocess(image), ""
        except Exception as exc:  # a mode or size the transform cannot take
            return (index, 0, 0), None, f"{entry.key}: unreadable image ({exc})"


def _rows(entries: Sequence[Entry], batch: ImageBatch) -> tuple[list[tuple], list[tuple]]:
    done = []
    for (i, width, height), vector in zip(batch.tags, batch.vectors):
        e = entries[i]
        done.append((e.key, e.path, e.member, e.offset, e.length, e.size, e.mtime_ns, e.caption,
                     e.extra, width, height, vector.astype(np.float16).tobytes()))
    failed = [(entries[i].key, entries[i].size, entries[i].mtime_ns, reason)
              for (i, _, _), reason in batch.failures]
    return done, failed


def _video_rows(entry: Entry, result: VideoResult) -> list[tuple]:
    """The staging rows of one video's segments (key ``video#t=START,END``)."""
    rows = []
    for segment in result.segments:
        member = segment_member(segment.start, segment.end)
        rows.append((f"{entry.key}#{member}", entry.path, member, None, None, entry.size,
                     entry.mtime_ns, entry.caption, entry.extra, result.width, result.height,
                     segment.vector.astype(np.float16).tobytes()))
    return rows


def _stage_videos(model: Encoder, videos: Sequence[Entry], options: VideoOptions,
                  staging: Staging, report: BuildReport, batch_size: int, num_workers: int,
                  progress: bool, on_batch: Callable[[int], None] | None, batches: int) -> None:
    """Embed ``videos`` and stage each one's segments (or its failure) in one transaction."""
    for result in embed_videos(model, videos, options, batch_size, num_workers, progress):
        entry = videos[result.index]
        if result.reason:
            staging.add([], [(entry.key, entry.size, entry.mtime_ns, result.reason)])
        else:
            staging.add(_video_rows(entry, result), [])
            report.video_seconds += result.duration
            report.segments += len(result.segments)
        report.videos += 1
        report.embedded += 1
        batches += 1
        if on_batch is not None:
            on_batch(batches)


def build_index(source: str | Path, out: str | Path, model: Encoder, *, batch_size: int = 32,
                num_workers: int = 0, ann: str | None = None,
                ann_params: dict[str, Any] | None = None, progress: bool = True,
                image_key: str = "filepath", caption_key: str = "title",
                separator: str | None = None, fast_decode: bool = False,
                max_index_memory: int | str | None = None, vector_store: str | None = None,
                videos: bool = True, video: VideoOptions | None = None,
                on_batch: Callable[[int], None] | None = None) -> BuildReport:
    """Create or update the index ``out`` from ``source`` with ``model``.

    ``source``: a folder tree of images and videos (a same-name ``.txt`` is the caption), a
    CSV/TSV with an image- or video-path column (``image_key``), an optional caption column
    (``caption_key``) and any other columns as metadata, or local webdataset ``.tar`` shards.
    The index comes to hold exactly the source's readable images and the segments of its
    readable videos; unreadable ones are listed in the report.

    ``videos``: index video files (by suffix; needs PyAV, ``pip install 'clipforge[video]'``);
    false leaves them out.  ``video``: how they are sampled and cut into segments
    (:class:`~clipforge.search.video.VideoOptions`); None keeps the index's (1 frame per second
    and 5-second windows for a new one).

    ``ann``: "flat" (exact), "ivfpq" or "hnsw" for large collections (searched approximately,
    then re-ranked exactly); None keeps the index's current choice (flat for a new one).
    ``fast_decode`` decodes large JPEGs at a reduced scale (PIL's draft mode, never below the
    model's input size): several times faster for camera photos, embeddings within 1e-5 cosine.
    ``max_index_memory``: the memory a search of the index may hold (bytes, or "512M", "2G";
    "none" for no limit; None keeps the index's, none for a new one).  Rows that do not fit it
    are kept in memory-mapped files instead, searched with an IVF index whose lists are on disk
    and re-ranked exactly (:func:`~clipforge.search.vectors.plan_storage`); ``info`` records the
    choice ("storage", "storage_plan").
    ``vector_store``: where the vectors are searched: "embedded" (in this folder, by faiss),
    ``milvus://HOST[:PORT]/COLLECTION`` or ``milvus-lite:PATH.db/COLLECTION`` (a Milvus
    collection kept in step with the index, see :mod:`clipforge.search.milvus`); None keeps the
    index's (embedded for a new one).  ``max_index_memory`` does not apply to a Milvus backend.
    ``on_batch(n)`` is called after each durable batch, and after each video (tests use it to
    interrupt a build).  Raises :class:`IndexMismatchError` if the index was made with other
    weights.
    """
    started = time.perf_counter()
    out = Path(out)
    rank, world = rank_and_world()
    fingerprint = weights_fingerprint(model)
    origin = model.origin or {}
    entries = scan_source(source, image_key=image_key, caption_key=caption_key,
                          separator=separator, videos=videos)
    if rank == 0:
        store = Store(out, create=True)
        info = store.info()
        if info.get("fingerprint") not in (None, fingerprint):
            store.close()
            raise IndexMismatchError(mismatch_message(out, info, fingerprint, "update it"))
        if not info:
            store.set_info({"format_version": FORMAT_VERSION, "created": time.time(),
                            "generation": 0})
    barrier()
    if rank != 0:
        store = Store(out)
        info = store.info()
    kind = ann or info.get("ann") or "flat"
    if kind not in ANN_KINDS:
        raise ValueError(f"unknown ann kind {kind!r}; choose one of {', '.join(ANN_KINDS)}")
    budget = memory_budget(max_index_memory, info)
    milvus = (recorded_backend(info) if vector_store is None
              else parse_backend(vector_store))
    if milvus is not None:
        index_type(kind)  # an --ann Milvus has no peer for: before anything is embedded
    recorded_video = VideoOptions.from_info(info)
    video = video or recorded_video or VideoOptions()
    # Staged rows count only for the same model and video options.
    stage_id = f"{fingerprint} video={video.to_json()}"
    indexed, failed = store.stamps()
    staged = staged_stamps(out, stage_id)
    redo_videos = video != (recorded_video or VideoOptions())
    unchanged = [e for e in entries if (indexed.get(e.key) == e.stamp
                                        or failed.get(e.key) == e.stamp)
                 and not (redo_videos and _is_video(e))]
    resumed = [e for e in entries if staged.get(e.key) == e.stamp]
    known = {e.key for e in unchanged} | {e.key for e in resumed}
    everything_pending = [e for e in entries if e.key not in known]
    if any(_is_video(e) for e in everything_pending) and not have_pyav():
        raise DataError(f"{source} holds video files, and reading them needs PyAV: "
                        f"{INSTALL_HINT}, or leave them out (--no-video)")
    pending = everything_pending[rank::world]
    current = {e.key: e.stamp for e in entries}
    stale = [k for k, stamp in (indexed | failed).items() if current.get(k) != stamp]
    changed = (bool(everything_pending or resumed or stale) or kind != info.get("ann")
               or budget != memory_budget(None, info) or milvus != recorded_backend(info)
               or redo_videos)
    report = BuildReport(str(out), str(source), origin.get("model"), fingerprint,
                         scanned=len(entries), unchanged=len(unchanged), resumed=len(resumed),
                         ann=kind)
    if pending:
        log.info("%s: %d item(s) to embed (%d unchanged, %d staged by an earlier run)",
                 out, len(pending), len(unchanged), len(resumed))
        staging = Staging(out / STAGING_DIR / f"rank-{rank}.sqlite", stage_id)
        images = [e for e in pending if not _is_video(e)]
        n = 0
        try:
            if images:
                for n, batch in enumerate(embed_image_batches(
                        model, _EntryImages(images, model.preprocess,
                                            model.preprocess.image_size if fast_decode
                                            else None),
                        batch_size, num_workers, progress, desc="indexing"), start=1):
                    staging.add(*_rows(images, batch))
                    report.embedded += len(batch.tags) + len(batch.failures)
                    if on_batch is not None:
                        on_batch(n)
            clips = [e for e in pending if _is_video(e)]
            if clips:
                _stage_videos(model, clips, video, staging, report, batch_size, num_workers,
                              progress, on_batch, n)
        finally:
            staging.close()
    barrier()
    if rank == 0 and not changed:  # nothing to do: readers keep their generation
        report.total, report.generation = store.count(), store.generation()
        report.failures = store.failures()
    elif rank == 0:
        dim = model.config.embed_dim

        def prepare(generation: int) -> dict[str, object]:
            if milvus is not None:
                return prepare_milvus(milvus, store, kind, ann_params or {}, dim, generation)
            return {**prepare_storage(out, store, kind, ann_params or {}, budget, dim,
                                      generation), "vector_store": ""}

        counts = store.commit(entries, staging_files(out, stage_id), {
            "format_version": FORMAT_VERSION, "origin": json_text(origin) if origin else "",
            "model": origin.get("model") or "", "weights": origin.get("weights") or "",
            "fingerprint": fingerprint,
            "embed_dim": dim, "ann": kind, "ann_params": json.dumps(ann_params or {}),
            "video": video.to_json(),
            "max_index_memory": "" if budget is None else budget, "source": str(source)},
            prepare=prepare)
        clear_staging(out)
        if milvus is not None:
            prune_collection(milvus, store.ids())
        report.added, report.removed = counts["added"], counts["removed"]
        report.total, report.generation = counts["total"], counts["generation"]
        report.failures = store.failures()
        write_ann(out, store, kind, ann_params or {}, counts["generation"])
    if rank == 0:
        report.storage = store.info().get("storage") or "memory"
    store.close()
    report.seconds = time.perf_counter() - started
    if rank == 0:
        with atomic_file(out / REPORT_NAME) as tmp:
            tmp.write_text(report.to_json(), encoding="utf-8")
    barrier()
    return report


def _is_video(entry: Entry) -> bool:
    """A video file to cut into segments (a shard's members are images)."""
    return entry.member is None and is_video(entry.path)


def ann_path(directory: Path, generation: int) -> Path:
    return directory / f"ann-{generation}.faiss"


def ondisk_files(directory: Path, generation: int) -> DiskFiles:
    """The memory-mapped files of ``generation`` when its rows are kept on disk."""
    return DiskFiles.named(directory, f"ondisk-{generation}")


def memory_budget(value: int | str | None, info: dict[str, str]) -> int | None:
    """The memory budget in bytes: ``value`` ("none": no limit), else the index's recorded
    one (None: no limit)."""
    if value is None:
        value = info.get("max_index_memory") or "none"
    if str(value).strip().lower() in ("none", "off"):
        return None
    try:
        return parse_memory(value)
    except ValueError as exc:
        raise ValueError(f"max index memory: {exc} (or 'none' for no limit)") from None


def recorded_backend(info: dict[str, str]) -> MilvusBackend | None:
    """The Milvus backend an index records, None for the embedded store."""
    return parse_backend(info["vector_store"]) if info.get("vector_store") else None


def prepare_milvus(backend: MilvusBackend, store: Store, kind: str, params: dict[str, Any],
                   dim: int, generation: int) -> dict[str, str]:
    """Inside the commit of ``generation``: mirror its rows into the Milvus collection (see
    :func:`~clipforge.search.milvus.sync_collection`).  Returns the info recording it."""
    counts = sync_collection(backend, store.row_chunks(dim), dim, kind, params,
                             store.generation(), generation)
    log.info("%s: %d rows inserted (%d left by an unfinished build deleted)", backend.text,
             counts["inserted"], counts["dropped"])
    return {"storage": "milvus", "storage_plan": "", "vector_store": backend.text}


def prepare_storage(directory: Path, store: Store, kind: str, params: dict[str, Any],
                    budget: int | None, dim: int, generation: int) -> dict[str, str]:
    """Inside the commit of ``generation``: choose where its rows live under ``budget`` and,
    if on disk, write its files (rows streamed from the database, then the IVF index).
    Returns the info recording the choice."""
    count = store.count()
    plan = plan_storage(kind, count, dim, budget, params)
    if plan["storage"] == "ondisk":
        files = ondisk_files(directory, generation)
        log.info("%s: %d rows need %d bytes in memory, over the budget of %d: writing them "
                 "to %s", directory, count, memory_bytes(kind, count, dim, params), budget,
                 ", ".join(f.name for f in files))
        save_rows(files, store.row_chunks(dim), count, dim)
        VectorIndex.build_ondisk(files, plan["params"])
    return {"storage": plan["storage"], "storage_plan": json.dumps(plan)}


def write_ann(directory: Path, store: Store, kind: str, params: dict[str, Any],
              generation: int) -> None:
    """Train and save the approximate structure of ``generation`` (nothing for flat, nor for
    rows kept on disk), then remove older generations' files.  Until it exists, searches of
    that generation are exact."""
    if kind != "flat" and store.info().get("storage") not in ("ondisk", "milvus"):
        snapshot = store.snapshot()
        if snapshot.generation == generation and len(snapshot.ids):
            VectorIndex.build(snapshot.vectors, snapshot.ids, kind, params=params
                              ).save_ann(ann_path(directory, generation))
    remove_stale_files(directory, store.generation())


def remove_stale_files(directory: Path, generation: int) -> None:
    """Remove the search files of generations before ``generation`` (the committed one), and
    the temporary files that a killed build left while writing them.  A newer generation's
    files are kept: another build may be writing them before its commit."""
    for path in directory.iterdir():
        match = _GENERATION_FILE.fullmatch(path.name)
        if match is None:
            continue
        temporary, number = bool(match[1]), int(match[2])
        if number < generation or (temporary and number == generation):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def read_report(directory: str | Path) -> dict[str, Any]:
    """The last build's report (``report.json``)."""
    return json.loads((Path(directory) / REPORT_NAME).read_text(encoding="utf-8"))

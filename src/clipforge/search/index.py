"""Querying an index: by text, by image, or both mixed, for the command line and the server.

A :class:`SearchIndex` holds the model that built the index (checked by weights fingerprint;
when none is given, the origin the index records is loaded again with
:func:`clipforge.factory.load_origin`) and an in-memory snapshot of one committed generation:
ids, float16 vectors and the faiss
structure.  :meth:`SearchIndex.refresh` swaps in a newer generation whole, so a server answering
while ``clipforge index build`` runs beside it serves the old state or the new one, never a mix.
It is safe to share between threads: model calls are serialised by a lock, and each thread gets
its own database connection.

An index whose rows did not fit the build's memory budget (``index build --max-index-memory``)
is not read into memory: its generation's files are opened memory-mapped
(:meth:`VectorIndex.open_ondisk`).  ``SearchIndex.open(..., max_index_memory=...)`` makes the
same choice for the reader's own budget: rows that fit are read into memory, and an index built
in memory that does not fit is refused with what to do.

An index whose vectors live in Milvus (``index build --vector-store milvus://...``) is searched
there (:class:`~clipforge.search.milvus.MilvusVectors`, filtered to its committed generation);
its items and metadata are read from the folder as for any index.  Milvus errors raise
:class:`IndexUnavailableError` naming the backend, so the server answers 503 while it lasts.

A connection opened on a file that is then deleted goes on reading the deleted file, so every
read first compares the database file's identity (device, inode, size, modification time; one
``stat``) with the one its connection was opened on: a deleted folder raises
:class:`IndexUnavailableError` instead of serving the old data, and a replaced or rewritten
file is opened afresh (a damaged one then fails to read, with the same error).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..configs import ARCHITECTURES
from ..dense import THRESHOLD, Location, locate
from ..encoder import Encoder
from ..evaluation.zeroshot import ZeroShotClassifier
from ..factory import load_origin
from ..inference import embed_pictures, embed_texts
from ..reading import BadItem, is_shard_spec
from ..text import ContextLengthError
from ..weights.fingerprint import weights_fingerprint
from .build import (
    IndexMismatchError,
    ann_path,
    memory_budget,
    mismatch_message,
    ondisk_files,
    recorded_backend,
    recorded_origin,
)
from .milvus import MilvusError, MilvusVectors
from .sources import read_entry_image, segment_times
from .store import DB_NAME, Head, IndexFormatError, Store
from .vectors import ONDISK, VectorIndex, memory_bytes, plan_storage

log = logging.getLogger(__name__)

MAX_K = 1000
RECORDED = "recorded"  # SearchIndex's max_index_memory: keep the storage the build chose
_LOAD_TRIES = 5  # generations committed while one is being opened, before giving up


class IndexUnavailableError(OSError):
    """The index on disk cannot be read now: its folder or database is gone, unreadable or
    damaged.  The server answers 503 while it lasts and serves again once it can read."""


@dataclass(frozen=True)
class Hit:
    """One search result (``score`` is the cosine similarity; nan for a plain lookup).  A
    video segment's ``path`` is the video file's, and ``start`` and ``end`` are its times in
    seconds (None for an image)."""

    id: int
    path: str
    score: float
    caption: str | None = None
    width: int | None = None
    height: int | None = None
    extra: dict[str, Any] | None = None
    start: float | None = None
    end: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """As JSON shows it; ``start`` and ``end`` only for a video segment."""
        data = asdict(self)
        data["score"] = None if math.isnan(self.score) else round(self.score, 6)
        if self.start is None:
            del data["start"], data["end"]
        return data


@dataclass(frozen=True)
class _State:
    generation: int
    ann_file: Path | None
    vectors: VectorIndex | MilvusVectors
    database: tuple[int, int]  # (device, inode) of the index.sqlite it was read from


class SearchIndex:
    """An index opened for search; build one with :func:`clipforge.search.build_index`."""

    def __init__(self, path: str | Path, model: Encoder, info: dict[str, str], *,
                 max_index_memory: int | str | None = None):
        self.path = Path(path)
        self.model = model
        self._info = info
        self._budget = (RECORDED if max_index_memory is None
                        else memory_budget(max_index_memory, {}))
        self._model_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._local = threading.local()
        self._state = self._load()
        self._root: tuple[_State, str | None] | None = None  # collection_root's, per state

    @classmethod
    def open(cls, path: str | Path, model: Encoder | None = None, *,
             device: str | torch.device = "cpu", precision: str = "fp32",
             max_index_memory: int | str | None = None) -> SearchIndex:
        """Open the index at ``path`` with ``model``, or else the model the index records,
        loaded on ``device`` at ``precision`` (any precision of the same weights answers the
        same index).

        ``max_index_memory`` (bytes, "512M", "2G", "none"): the memory the search may hold, as
        at build; None keeps where the build put the rows (memory, or memory-mapped files).

        Raises :class:`IndexMismatchError` when ``model`` has other weights than the index's.
        """
        if max_index_memory is not None:
            memory_budget(max_index_memory, {})  # a mistyped size: before the model loads
        store = Store(path)
        try:
            info = store.info()
        finally:
            store.close()
        if not info.get("fingerprint"):
            raise IndexFormatError(f"{path} has no finished build yet; run `clipforge index "
                                   f"build SOURCE --out {path}` to completion")
        if model is None:
            model = load_origin(_reloadable(Path(path), info), device=device, precision=precision)
        fingerprint = weights_fingerprint(model)
        if fingerprint != info["fingerprint"]:
            raise IndexMismatchError(mismatch_message(Path(path), info, fingerprint,
                                                      "search it"))
        return cls(path, model, info, max_index_memory=max_index_memory)

    # ----------------------------------------------------------------- state

    def _store(self) -> Store:
        """This thread's connection, opened again if the database file changed on disk."""
        local = self._local
        database = self.path / DB_NAME
        try:
            st = os.stat(database)
        except OSError as exc:
            self._close_store()
            raise IndexUnavailableError(f"{database} cannot be read ({exc.strerror}): was the "
                                        "index deleted?") from None
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if getattr(local, "stamp", None) != stamp:
            self._close_store()
            with self._reading():
                local.store = Store(self.path)
            local.stamp = stamp
        return local.store

    def _close_store(self) -> None:
        store = getattr(self._local, "store", None)
        self._local.store = self._local.stamp = None
        if store is not None:
            store.close()

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """Database errors become :class:`IndexUnavailableError`, and this thread's connection
        is dropped, so that the next read opens the file again."""
        try:
            yield
        except (sqlite3.DatabaseError, IndexFormatError, FileNotFoundError) as exc:
            self._close_store()
            raise IndexUnavailableError(f"{self.path / DB_NAME} cannot be read: {exc}"
                                        ) from None

    def _ann_file(self, info: dict[str, str], generation: int) -> Path | None:
        if info.get("ann", "flat") == "flat":
            return None
        path = ann_path(self.path, generation)
        return path if path.is_file() else None

    def _load(self) -> _State:
        """The newest committed generation: its rows read into memory, or its files opened."""
        store = self._store()
        for _ in range(_LOAD_TRIES):
            with self._reading():
                head = store.head()
            if head.info.get("fingerprint") != self._info.get("fingerprint"):
                raise IndexMismatchError(f"{self.path} was rebuilt with another model while "
                                         "open; open it again")
            storage = self._storage(head)
            if storage == "memory":
                state = self._load_memory(store, head)
            elif storage == "milvus":
                state = self._load_milvus(head)
            else:
                state = self._load_ondisk(store, head)
            if state is not None:
                self._info = head.info
                return state
        raise IndexUnavailableError(f"{self.path} changed {_LOAD_TRIES} times while it was "
                                    "being opened: try again")

    def _storage(self, head: Head) -> str:
        """"memory" or "ondisk": where the build put the rows, or what the budget given to
        :meth:`open` makes of them."""
        recorded = head.info.get("storage") or "memory"
        if self._budget == RECORDED or recorded == "milvus":  # Milvus holds the rows
            return recorded
        kind, dim = head.info.get("ann", "flat"), int(head.info.get("embed_dim", 0))
        params = json.loads(head.info.get("ann_params") or "{}")
        if plan_storage(kind, head.count, dim, self._budget, params)["storage"] == "memory":
            return "memory"
        if recorded == "ondisk":
            return "ondisk"
        needed = memory_bytes(kind, head.count, dim, params)
        raise IndexFormatError(
            f"{self.path} keeps its {head.count} rows in memory, about {needed / 2**20:.0f} "
            f"MiB, over the max index memory of {self._budget / 2**20:.0f} MiB: open it with a "
            f"larger budget, or build it again with `clipforge index build SOURCE --out "
            f"{self.path} --max-index-memory {self._budget}` to keep its rows on disk")

    def _load_memory(self, store: Store, head: Head) -> _State | None:
        """Every row read into memory (None if a newer generation was committed meanwhile)."""
        with self._reading():
            snapshot = store.snapshot()
        if snapshot.generation != head.generation:
            return None
        info = snapshot.info
        kind = info.get("ann", "flat")
        ann_file = self._ann_file(info, snapshot.generation)
        if kind != "flat" and ann_file is None:
            log.info("%s: no %s structure for generation %d (too few items, rows kept on disk, "
                     "or not written yet): searching exactly", self.path, kind,
                     snapshot.generation)
            kind = "flat"
        params = json.loads(info.get("ann_params") or "{}")
        vectors = VectorIndex.load(snapshot.vectors, snapshot.ids, kind, ann_file, params=params)
        return _State(snapshot.generation, ann_file, vectors, self._local.stamp[:2])

    def _load_ondisk(self, store: Store, head: Head) -> _State | None:
        """The generation's files opened memory-mapped (None if they were removed because a
        newer generation was committed meanwhile)."""
        plan = json.loads(head.info.get("storage_plan") or "{}")
        try:
            vectors = VectorIndex.open_ondisk(ondisk_files(self.path, head.generation),
                                              plan.get("params"))
        except FileNotFoundError as exc:
            with self._reading():
                if store.generation() != head.generation:
                    return None
            raise IndexUnavailableError(str(exc)) from None
        except ValueError as exc:
            raise IndexUnavailableError(str(exc)) from None
        return _State(head.generation, None, vectors, self._local.stamp[:2])

    def _load_milvus(self, head: Head) -> _State:
        """The generation's collection in Milvus, checked and loaded for search."""
        params = json.loads(head.info.get("ann_params") or "{}")
        with self._milvus():
            vectors = MilvusVectors.open(recorded_backend(head.info),
                                         int(head.info.get("embed_dim", 0)), head.count,
                                         head.generation, head.info.get("ann", "flat"), params)
        return _State(head.generation, None, vectors, self._local.stamp[:2])

    @contextlib.contextmanager
    def _milvus(self) -> Iterator[None]:
        """Milvus errors (unreachable, collection gone) become :class:`IndexUnavailableError`."""
        try:
            yield
        except MilvusError as exc:
            raise IndexUnavailableError(str(exc)) from None

    def refresh(self) -> bool:
        """Load a newer committed generation, or an index rebuilt in place of this one, if
        there is one; True if it did.  Cheap when nothing changed (a ``stat`` and two small
        queries), so the server calls it before every query and as its health check.

        Raises :class:`IndexUnavailableError` when the index cannot be read.
        """
        store = self._store()
        with self._reading():
            generation = store.generation()
            ann_file = self._ann_file(store.info(), generation)
        current = (generation, ann_file, self._local.stamp[:2])

        def loaded() -> bool:
            state = self._state
            return current == (state.generation, state.ann_file, state.database)

        if loaded():
            return False
        with self._reload_lock:
            if not loaded():
                self._state = self._load()  # one assignment: readers see old or new whole
        return True

    def __len__(self) -> int:
        return len(self._state.vectors)

    @property
    def info(self) -> dict[str, Any]:
        """Model, weights, fingerprint, item count, generation and search structure."""
        state = self._state
        origin = recorded_origin(self._info) or {}
        return {"path": str(self.path), "model": origin.get("model"),
                "weights": origin.get("weights"), "fingerprint": self._info["fingerprint"],
                "embed_dim": self.model.config.embed_dim, "count": len(state.vectors),
                "generation": state.generation, "ann": self._info.get("ann", "flat"),
                "searching": state.vectors.kind,
                "storage": {ONDISK: "ondisk", "milvus": "milvus"}.get(state.vectors.kind,
                                                                      "memory")}

    def collection_root(self) -> str | None:
        """The folder the items were collected from (see :func:`collection_root`), worked out
        once per generation: the server shows item paths relative to it."""
        state, cached = self._state, self._root
        if cached is not None and cached[0] is state:
            return cached[1]
        store = self._store()
        with self._reading():
            paths = store.paths()
        root = collection_root(self._info.get("source"), paths)
        self._root = (state, root)
        return root

    # ----------------------------------------------------------------- embedding

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm float32 embeddings; an over-long text raises ContextLengthError."""
        with self._model_lock:
            result = embed_texts(self.model, list(texts), progress=False)
        if result.failures:
            raise ContextLengthError(result.failures[0][1])
        return result.vectors

    def embed_image(self, image: Image.Image) -> np.ndarray:
        """The unit-norm float32 embedding of one image (ValueError if the model's transform
        cannot take it)."""
        with self._model_lock:
            result = embed_pictures(self.model, [image])
        if result.failures:
            raise ValueError(result.failures[0][1])
        return result.vectors[0]

    def query_vector(self, text: str | None = None, image: Image.Image | None = None,
                     text_weight: float = 1.0, image_weight: float = 1.0) -> np.ndarray:
        """The unit query vector: a text's, an image's, or their weighted sum, renormalised."""
        if text is not None and not text.strip():
            raise ValueError("the text query is empty")
        if text is None and image is None:
            raise ValueError("give a text query, an image query, or both")
        if min(text_weight, image_weight) < 0 or not math.isfinite(text_weight + image_weight):
            raise ValueError("query weights must be finite and non-negative")
        query = np.zeros(self.model.config.embed_dim, np.float32)
        if text is not None:
            query += text_weight * self.embed_texts([text])[0]
        if image is not None:
            query += image_weight * self.embed_image(image)
        norm = float(np.linalg.norm(query))
        if norm == 0:
            raise ValueError("the query weights are all zero")
        return query / norm

    def classify(self, image: Image.Image, labels: Sequence[str],
                 template: str = "a photo of a {}.") -> list[tuple[str, float]]:
        """Zero-shot probabilities of ``labels`` for ``image``, most likely first: a softmax
        over the labels, or a sigmoid per label for a sigmoid-loss model (SigLIP), as
        :class:`~clipforge.evaluation.zeroshot.ZeroShotClassifier` gives them."""
        if len(labels) < 2:
            raise ValueError("give at least two labels")
        if "{}" not in template:
            raise ValueError(f"template {template!r} has no '{{}}' for the label")
        vector = self.embed_image(image)
        with self._model_lock:
            classifier = ZeroShotClassifier.build(self.model, labels, [template])
        probs = classifier.predict_proba(torch.from_numpy(vector)[None])[0].numpy()
        order = np.argsort(-probs, kind="stable")
        return [(labels[i], float(probs[i])) for i in order]

    def locate(self, image: Image.Image, text: str, threshold: float = THRESHOLD) -> Location:
        """Where ``text`` is in ``image``: :func:`clipforge.dense.locate` with the index's
        model, its calls serialised with the others (ValueError for an empty or over-long
        text, or a model without per-patch features: an ONNX export)."""
        if not text.strip():
            raise ValueError("the text to locate is empty")
        with self._model_lock:
            return locate(self.model, image, text, threshold=threshold)

    # ----------------------------------------------------------------- search

    def search(self, *, text: str | None = None, image: Image.Image | None = None,
               text_weight: float = 1.0, image_weight: float = 1.0, k: int = 20,
               threshold: float | None = None, collapse: float | None = None) -> list[Hit]:
        """Top ``k`` items for a text, an image, or both (weighted); see :meth:`search_vector`."""
        _check_options(k, threshold, collapse)
        query = self.query_vector(text, image, text_weight, image_weight)
        return self.search_vector(query, k, threshold=threshold, collapse=collapse)

    def similar(self, item_id: int, k: int = 20, *, threshold: float | None = None,
                collapse: float | None = None) -> list[Hit]:
        """Items most like an indexed item ("more like this"), the item itself left out."""
        _check_options(k, threshold, collapse)
        state = self._state
        try:
            with self._milvus():
                query = state.vectors.rows(np.array([item_id], np.int64))[0]
        except KeyError:
            raise KeyError(f"no item {item_id} in {self.path}") from None
        query = query / max(float(np.linalg.norm(query)), 1e-12)
        return self.search_vector(query, k, threshold=threshold, collapse=collapse,
                                  exclude=[item_id], state=state)

    def search_vector(self, query: np.ndarray, k: int = 20, *, threshold: float | None = None,
                      collapse: float | None = None, exclude: Sequence[int] = (),
                      state: _State | None = None) -> list[Hit]:
        """Top ``k`` by cosine similarity to the unit vector ``query``.

        ``threshold`` drops results scoring below it.  ``collapse`` (e.g. 0.95) keeps only the
        best of near-duplicates: a result is left out when its cosine similarity to a better
        one is at least ``collapse``.
        """
        _check_options(k, threshold, collapse)
        state = state or self._state
        size = len(state.vectors)
        query = np.asarray(query, np.float32).reshape(1, -1)
        excluded = np.asarray(list(exclude), np.int64) if len(exclude) else None
        fetch = min(k if collapse is None else 4 * k, max(size, 1))
        while True:
            with self._milvus():
                scores, ids = state.vectors.search(query, fetch, exclude=excluded)
            keep = ids[0] >= 0
            if threshold is not None:
                keep &= scores[0] >= threshold
            chosen_ids, chosen_scores = ids[0][keep], scores[0][keep]
            if collapse is not None:
                with self._milvus():
                    chosen_ids, chosen_scores = _collapse(state.vectors, chosen_ids,
                                                          chosen_scores, collapse)
            exhausted = fetch >= size or keep.sum() < fetch
            if len(chosen_ids) >= k or exhausted:
                break
            fetch = min(fetch * 4, size)
        return self._hits(chosen_ids[:k], chosen_scores[:k])

    def embeddings(self, ids: Sequence[int]) -> np.ndarray:
        """The stored unit embeddings of items (float32, one row per id, in order), for
        comparing results with each other or with prompts after a search; KeyError for an id
        the newest generation does not hold."""
        with self._milvus():
            rows = self._state.vectors.rows(np.asarray(ids, np.int64).reshape(-1))
        return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)

    def item(self, item_id: int) -> Hit | None:
        """The metadata of one item (score nan), or None if there is no such item."""
        hits = self._hits(np.array([item_id]), np.array([np.nan]))
        return hits[0] if hits else None

    def _hits(self, ids: np.ndarray, scores: np.ndarray) -> list[Hit]:
        store = self._store()
        with self._reading():
            rows = store.items([int(i) for i in ids])
        hits = []
        for item_id, score in zip(ids, scores):
            row = rows.get(int(item_id))
            if row is None:  # removed by a newer generation since this search's snapshot
                continue
            times = segment_times(row["member"], row["offset"])
            start, end = times or (None, None)
            hits.append(Hit(int(item_id), row["key"] if times is None else row["path"],
                            float(score), row["caption"], row["width"], row["height"],
                            json.loads(row["extra"]) if row["extra"] else None, start, end))
        return hits

    def video_file(self, item_id: int) -> tuple[Path, os.stat_result]:
        """The video file of an indexed video segment and its ``stat``, for sending it whole
        or by byte ranges (read by id: no caller-given path reaches the disk).

        KeyError if there is no such item; ValueError if the item is not a video segment;
        OSError if the file is gone or changed since it was indexed (its times would not fit)."""
        store = self._store()
        with self._reading():
            row = store.items([int(item_id)]).get(int(item_id))
        if row is None:
            raise KeyError(f"no item {item_id} in {self.path}")
        if segment_times(row["member"], row["offset"]) is None:
            raise ValueError(f"item {item_id} is not a video segment")
        path = Path(row["path"])
        st = path.stat()
        if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != (row["size"],
                                                                            row["mtime_ns"]):
            raise OSError(f"{path} changed since it was indexed; run the index build again")
        return path, st

    def open_image(self, item_id: int) -> Image.Image:
        """The image of an indexed item (read by id: no caller-given path reaches the disk).

        KeyError if there is no such item; OSError if its file is gone or unreadable
        (:class:`IndexUnavailableError` if the index itself is)."""
        store = self._store()
        with self._reading():
            row = store.items([int(item_id)]).get(int(item_id))
        if row is None:
            raise KeyError(f"no item {item_id} in {self.path}")
        if row["member"] is not None:
            st = Path(row["path"]).stat()
            if (st.st_size, st.st_mtime_ns) != (row["size"], row["mtime_ns"]):
                raise OSError(f"{row['path']} changed since it was indexed; run the index "
                              "build again")
        try:
            return read_entry_image(row["path"], row["member"], row["offset"], row["length"])
        except BadItem as exc:
            raise OSError(f"{row['key']}: {exc}") from None


def _is_under(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # one relative and one absolute, or (Windows) another drive
        return False


def collection_root(source: str | None, paths: Sequence[str]) -> str | None:
    """The folder that holds every item file: the recorded build ``source`` (a folder itself;
    a table's or shards' folder) if all of ``paths`` lie under it, else their common parent
    (indexes built before the source was recorded, or a table listing files elsewhere); None
    if there is none (no items, or paths on several Windows drives)."""
    if source:
        folder = Path(source)
        if folder.suffix.lower() in (".csv", ".tsv") or is_shard_spec(source):
            folder = folder.parent
        # Item paths are resolved (sources.py); a relative source is taken from the working
        # directory, which may not be the build's: hence the check that it holds every item.
        recorded = str(folder.resolve())
        if all(_is_under(p, recorded) for p in paths):
            return recorded
    if not paths:
        return None
    try:
        return os.path.commonpath([os.path.dirname(p) for p in paths])
    except ValueError:
        return None


def _reloadable(path: Path, info: dict[str, str]) -> dict[str, Any]:
    """The origin the index records, if its model can be loaded again."""
    origin = recorded_origin(info)
    if origin is None:
        raise IndexMismatchError(f"{path} does not record how to load its model; pass the "
                                 "model that built it")
    if origin.get("weights") is None and origin["model"] in ARCHITECTURES:
        raise IndexMismatchError(
            f"{path} was built with a randomly initialised {origin['model']}, which cannot be "
            "loaded again; save the model to a file and build the index from that file")
    return origin


def _collapse(vectors: VectorIndex | MilvusVectors, ids: np.ndarray, scores: np.ndarray,
              limit: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy near-duplicate removal in score order."""
    if len(ids) == 0:
        return ids, scores
    rows = vectors.rows(ids)
    rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    kept: list[int] = []
    for i in range(len(ids)):
        if not kept or float(np.max(rows[kept] @ rows[i])) < limit:
            kept.append(i)
    return ids[kept], scores[kept]


def _check_options(k: int, threshold: float | None, collapse: float | None) -> None:
    if not isinstance(k, int | np.integer) or not 1 <= k <= MAX_K:
        raise ValueError(f"k must be an integer from 1 to {MAX_K}, not {k!r}")
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine similarity from -1 to 1, not {threshold!r}")
    if collapse is not None and not 0.0 < collapse <= 1.0:
        raise ValueError(f"collapse is a cosine similarity in (0, 1], not {collapse!r}")

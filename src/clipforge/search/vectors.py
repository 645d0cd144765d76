"""Vector part of the semantic image search index: top-k inner product over unit-norm CLIP rows.

Why it looks the way it does (figures: 1M x 512 rows stored as float16, 2 Zen 4 cores, from
``benchmarks/bench_ann.py``; this shared VM's timings drift by 20-30% from run to run):

* **Exact ("flat") search** is a memory-bound scan, so the fastest exact search is the one that
  reads the fewest bytes with all cores.  float16 rows are scanned by faiss
  ``IndexScalarQuantizer(QT_fp16)``, which reads the float16 codes directly (half the bytes of
  a float32 copy) and is still exact: float16 -> float32 conversion is exact and it accumulates
  in float32 (only the summation order differs from numpy).  The rows are split into blocks of
  about 8 MiB scanned by one thread per core: faiss's OpenMP loop only parallelises over
  queries, so one query would use one core and get less bandwidth, and a block stays in cache
  while a query batch scans it.  Measured, 1 query / 32 queries: this 24-32 ms / 0.42 s (one
  pass over the 1 GB of rows with both cores takes ~30 ms: it is at the memory limit); one
  unsplit scalar-quantizer index 44 ms / 0.90 s; ``IndexFlatIP`` over a float32 copy 148 ms /
  1.65 s; numpy float32 ``q @ X.T`` + argpartition 92 ms / 0.76 s; torch float32 184 ms / 0.49
  s.  numpy has no vectorised float16 arithmetic (converting the matrix to float32 alone takes
  ~0.9 s) and torch's float16 matmul needs a float16 query, which is not exact.  Cost: faiss
  keeps its own copy of the rows (N*d*2 bytes, 1 GB here, against 2 GB for a float32 copy).
  float32 rows are scanned the same way with ``IndexFlatIP`` blocks.
* **Approximate kinds** ("ivfpq", "hnsw") only produce a shortlist, which is re-ranked exactly
  with the stored rows, so returned scores are always exact inner products and recall depends
  only on whether the true neighbours reach the shortlist.  They index with the L2 metric: for
  unit vectors ``|q - x|^2 = 2 - 2 q.x`` ranks like the inner product, and k-means and PQ are
  made for L2 (an inner-product coarse quantiser favours long centroids).
* **IVF-PQ defaults**: ``nlist ~ 4 sqrt(N)`` (faiss's guideline: lists of ~sqrt(N)/4 rows keep
  both the coarse search and the list scans small), never more than ``N / 39`` (faiss k-means
  wants >= 39 training points per centroid); trained on ``50 * nlist`` sampled rows (k-means
  cost grows with the sample; with 200k rows 1M x 512 builds in ~85 s); PQ with ``m = d / 8``
  sub-quantisers of 8 bits (8 dimensions per byte, 64 B per 512-d row); ``nprobe = 32`` and a
  shortlist of ``max(4 k, 100)``: recall@10 0.998 at ~1 ms per query, +111 MiB.  The
  precomputed residual table is off: it costs ``nlist * m * 256 * 4`` bytes (260 MB at 1M
  rows, four times the codes) to save ~0.16 ms per query; ``faiss.read_index`` would build it
  again, so it is read with ``IO_FLAG_SKIP_PRECOMPUTE_TABLE``.  Fewer than ``39 * 2**nbits`` rows
  cannot train the PQ codebooks: such an index falls back to flat (logged, ``kind`` says
  "flat"); a too-large ``nlist`` is reduced (logged).
* **HNSW**: ``IndexHNSWSQ`` with 8-bit scalar-quantised storage (d bytes per row instead of
  4 d: the shortlist is re-ranked anyway), ``M = 32``, ``efConstruction = 40``, ``efSearch =
  max(128, shortlist)``: builds 1M x 512 in ~2 min, recall@10 0.985 at ~0.7 ms, +762 MiB.
* **On disk** (kind ``ONDISK``; ``index build --max-index-memory``), for rows that do not fit a
  memory budget.  :func:`plan_storage` decides as autofaiss does with ``max_index_memory_usage``:
  if :func:`memory_bytes` of the requested kind fits (flat: rows, ids and faiss's copy of the
  rows, 4 d + 8 bytes a row), the index stays in memory; otherwise it becomes an L2 IVF index
  (nlist and training as for IVF-PQ) with the largest codes for which centroids, codebooks, ids
  and inverted lists fit the budget: 8-bit scalar (d bytes a row), else PQ of d/4, d/8, d/16 or
  d/32 bytes (the smallest, with a warning, if none fits: the lists are then read from disk as
  queries need them).  Three files: the float16 rows and int64 ids as ``.npy`` (:func:`save_rows`
  streams them in, never holding them whole) and the faiss index, each written beside its name,
  synced and renamed.  The faiss index is written whole with ``write_index`` and read with
  ``IO_FLAG_MMAP``, which maps its inverted lists from that same file (``OnDiskInvertedLists``,
  read only): one self-contained file, renamed atomically and movable with its folder.
  ``faiss.contrib.ondisk.merge_ondisk`` writes the lists to a separate ``.ivfdata`` file whose
  path is stored inside the index (two files to swap, and a moved folder breaks it); what it
  adds, filling the lists without holding the codes in memory, matters only once the codes
  (N (code + 8) bytes: 1.4 GB at 10M rows of 128-byte codes) outgrow the building machine.  faiss
  checks every list's offset against the file's size when reading, and the ``.npy`` sizes are
  checked against their headers, so a file cut short fails at open, naming it, instead of with
  SIGBUS at a query.  A query scans ``nprobe`` lists through the map and re-ranks its shortlist
  exactly from the memory-mapped rows, so scores are exact as in memory.  Measured on a
  2-core Xeon VM: faiss's list prefetch threads (up to 32 per query) are off, 1.3 ms p50 against
  2.1 with them (200k x 512, PQ codes).  The rows map is advised ``MADV_RANDOM`` and a query asks
  for its shortlist's pages at once (``MADV_WILLNEED``), so the kernel reads 4 KiB per row
  instead of 128 KiB around it (on a real disk, 32 times less) and the page cache holds the rows
  queries use: at 400k x 512 with 8-bit codes, +280 MiB mapped after 200 queries against
  +570 MiB (the whole rows file) with default read-ahead, for a cold query 2.3 against 1.2 ms
  and a warm one 1.16 against 1.04 ms on this VM, whose virtual disk the host caches (large
  reads cost it almost nothing).  At 500k x 512 with a 128 MiB budget
  (``benchmarks/bench_ondisk.py``, PQ codes of 128 bytes, nlist 2828): open 0.02 s with no
  anonymous memory to speak of; queries 1.24 ms p50 warm, 2.6 ms cold; recall@10 1.000; +158 MiB
  of mapped pages after 200 queries, against +954 MiB and 26 ms a query for the same rows in
  memory.
* **Threads**: faiss's process-wide OpenMP setting is left alone.  The flat scan runs on its
  own threads, and single queries to the approximate kinds run on the calling thread, all with
  faiss's (thread-local) OpenMP count set to 1: an OpenMP team waits for every core, and on 2
  cores a core is often busy (numpy's OpenBLAS threads spin ~0.1 s after each call, torch has
  its own pool), which turned a 0.5 ms scan into 19 ms.
* **Ties** are broken by row order (ascending id when ids are given ascending), so results
  are deterministic.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from ..fileio import atomic_file

logger = logging.getLogger(__name__)

ANN_KINDS = ("flat", "ivfpq", "hnsw")
ONDISK = "ondisk"  # the kind of an index opened from files: IVF lists and rows memory-mapped
CODES = ("sq8", "pq")  # the codes an on-disk index keeps in its inverted lists

DEFAULTS = {
    "nlist": None,  # derived from N: ~4 sqrt(N), at most N // 39
    "m": None,  # derived from d: the largest divisor of d not above d // 8
    "codes": None,  # ondisk: "sq8" unless "m" is given; plan_storage picks them for a budget
    "nbits": 8,
    "nprobe": 32,
    "train_size": None,  # derived: 50 * nlist rows, at least 39 * 2**nbits, at most N
    "hnsw_m": 32,
    "ef_construction": 40,
    "ef_search": 128,
    "shortlist": 100,
}
_MIN_POINTS_PER_CENTROID = 39  # below this faiss k-means warns that training is unreliable
_TRAIN_PER_LIST = 50
_BLOCK_BYTES = 8 << 20  # flat scan block: fits in L3 while a query batch scans it
_PARALLEL_BYTES = 32 << 20  # a flat scan reading less (rows x queries) runs on one thread
_CHUNK_ROWS = 65536  # rows converted to float32 at a time when adding to faiss
_ID_BYTES = 8  # an int64 id: in the ids array, and beside each code in an inverted list
_ONDISK_PARAMS = ("codes", "nlist", "m", "nbits", "nprobe", "train_size", "shortlist")
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


@dataclass(frozen=True)
class DiskFiles:
    """The files of an on-disk index: the float16 rows and their int64 ids (``.npy``, opened
    memory-mapped) and the faiss IVF index, whose inverted lists are memory-mapped too."""

    rows: Path
    ids: Path
    lists: Path

    @classmethod
    def named(cls, folder: str | Path, stem: str) -> DiskFiles:
        folder = Path(folder)
        return cls(folder / f"{stem}.rows.npy", folder / f"{stem}.ids.npy",
                   folder / f"{stem}.lists.faiss")

    def __iter__(self) -> Iterator[Path]:
        return iter((self.rows, self.ids, self.lists))


class VectorIndex:
    """Inner-product (cosine) search over unit-norm rows, each row labelled with an item id."""

    kind: str
    ids: np.ndarray
    vectors: np.ndarray

    def __init__(self, vectors: np.ndarray, ids: np.ndarray, kind: str, params: dict,
                 ann: faiss.Index | None) -> None:
        """Use :meth:`build` or :meth:`load`."""
        self.kind, self.ids, self.vectors, self.params = kind, ids, vectors, params
        self._ann = ann
        self._blocks: list[tuple[int, faiss.Index]] = []
        if kind == "flat":
            self._blocks = _flat_blocks(vectors)
        if len(ids) > 1 and np.all(ids[1:] > ids[:-1]):
            self._order = None  # already sorted: positions are searchsorted indices
        else:
            self._order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids if self._order is None else ids[self._order]

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, vectors: np.ndarray, ids: np.ndarray, kind: str = "flat", *,
              params: dict | None = None, seed: int = 0) -> VectorIndex:
        """Index ``vectors`` (N, d) float16/float32 labelled by unique int64 ``ids`` (N,).

        ``kind`` is one of :data:`ANN_KINDS`; ``params`` override :data:`DEFAULTS`.  An
        approximate kind with too few rows to train falls back to "flat" (``kind`` says so)."""
        vectors, ids = _check_rows(vectors, ids)
        kind, params = _resolve(kind, params, len(ids), vectors.shape[1])
        ann = None
        if kind == "ivfpq":
            ann = _build_ivfpq(vectors, params, seed)
        elif kind == "hnsw":
            ann = _build_hnsw(vectors, params, seed)
        return cls(vectors, ids, kind, params, ann)

    @classmethod
    def load(cls, vectors: np.ndarray, ids: np.ndarray, kind: str, ann_path: str | Path | None,
             params: dict | None = None) -> VectorIndex:
        """Rebuild an index from its stored rows and the file written by :meth:`save_ann`.

        Pass the ``params`` given to :meth:`build` (search-time ones such as ``nprobe`` may
        change).  For "flat", or an approximate kind that falls back to flat for this N (as
        :meth:`build` did), ``ann_path`` is ignored.  ValueError naming the file if it does not
        match the rows; FileNotFoundError if it is missing."""
        vectors, ids = _check_rows(vectors, ids)
        n, d = vectors.shape
        kind, params = _resolve(kind, params, n, d)
        if kind == "flat":
            return cls(vectors, ids, kind, params, None)
        if ann_path is None:
            raise ValueError(f"kind {kind!r} needs the ANN file written by save_ann()")
        path = Path(ann_path)
        if not path.is_file():
            raise FileNotFoundError(f"ANN file {path} not found: rebuild the index")
        ann = faiss.read_index(str(path), faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE)  # downcast
        _no_precomputed_table(ann)
        expected = faiss.IndexIVFPQ if kind == "ivfpq" else faiss.IndexHNSW
        if ann.ntotal != n or ann.d != d or not isinstance(ann, expected):
            raise ValueError(
                f"ANN file {path} holds a {type(ann).__name__} of {ann.ntotal} rows x {ann.d} "
                f"dims, but the index is {kind!r} with {n} rows x {d} dims: rebuild the index")
        return cls(vectors, ids, kind, params, ann)

    @classmethod
    def build_ondisk(cls, files: DiskFiles, params: dict | None = None, *, seed: int = 0
                     ) -> VectorIndex:
        """Train an IVF index over the rows that :func:`save_rows` wrote to ``files``, write it
        to ``files.lists`` atomically, and open the three files (:meth:`open_ondisk`).

        ``params``: as :func:`plan_storage` chose them for a budget (else :data:`DEFAULTS`:
        8-bit scalar codes).  The rows are read from the memory-mapped file a chunk at a time;
        the codes are held in memory until written."""
        rows, ids = _open_rows(files)
        n, d = rows.shape
        if n == 0:
            raise ValueError(f"{files.rows} holds no rows: an empty index is searched in memory")
        p = _resolve(ONDISK, params, n, d)[1]
        index = _new_ivf(d, p, seed)
        sample = np.sort(np.random.default_rng(seed).choice(n, p["train_size"], replace=False))
        index.train(np.concatenate(list(_float32_chunks(rows, sample))))
        for chunk in _float32_chunks(rows):
            index.add(chunk)
        _write_index(index, files.lists)
        del index, rows, ids
        return cls.open_ondisk(files, p)

    @classmethod
    def open_ondisk(cls, files: DiskFiles, params: dict | None = None) -> VectorIndex:
        """Open an on-disk index without reading it whole: the rows and ids as ``np.memmap``,
        the IVF index with its inverted lists memory-mapped (faiss ``IO_FLAG_MMAP``).

        Search-time ``params`` (``nprobe``, ``shortlist``) may differ from the build's; the
        codes and lists are the file's.  FileNotFoundError or ValueError naming the file that
        is missing, cut short or does not match the others: rebuild the index."""
        rows, ids = _open_rows(files)
        n, d = rows.shape
        lists = _read_lists(files.lists, n, d)
        _advise_random(rows)
        p = _resolve(ONDISK, params, n, d)[1]
        p["codes"] = "pq" if isinstance(lists, faiss.IndexIVFPQ) else "sq8"
        p["nlist"] = lists.nlist
        return cls(rows, ids, ONDISK, p, lists)

    def save_ann(self, path: str | Path) -> None:
        """Write the trained ANN structure atomically (temp file + ``os.replace``); no-op for
        "flat", which is rebuilt from the rows."""
        if self._ann is not None:
            _write_index(self._ann, path)

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Stored rows of ``ids`` as float32, shape ``ids.shape + (d,)``; KeyError if absent."""
        return self.vectors[self._positions(ids)].astype(np.float32)

    def search(self, queries: np.ndarray, k: int, *, shortlist: int | None = None,
               exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` rows by inner product for each query (Q, d) or (d,).

        Returns ``(scores, ids)``, float32 and int64, always shaped (Q, k), best first, ties
        in row order; missing results (fewer than k rows) are score -inf, id -1.  Scores are
        exact (float32) inner products with the stored rows for every kind; approximate kinds
        re-rank a shortlist of ``shortlist`` candidates (default ``max(4 k, params
        shortlist)``).  ``exclude``: ids never returned (e.g. the query item itself)."""
        q = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if q.ndim != 2 or (q.shape[1] != self.dim and len(self)):  # empty: dim may be unknown
            raise ValueError(f"queries must be (Q, {self.dim}) or ({self.dim},), got "
                             f"{np.shape(queries)}")
        if not np.isfinite(q).all():
            raise ValueError("queries contain NaN or infinite values")
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k}")
        k = int(k)
        excluded = np.zeros(0, np.int64) if exclude is None else np.unique(
            np.asarray(exclude, dtype=np.int64).ravel())
        excluded = excluded[self._contains(excluded)]
        if self.kind == "flat":
            want = min(k + len(excluded), len(self))
            scores, pos = self._flat_search(q, want) if want else _empty(len(q))
        else:
            if shortlist is None:
                shortlist = max(4 * k, self.params["shortlist"])
            want = min(max(shortlist, k) + len(excluded), len(self))
            pos = self._ann_search(q, want)
            scores = self._exact(q, pos)
        if len(excluded):
            scores = np.where(np.isin(self.ids[np.maximum(pos, 0)], excluded), -np.inf, scores)
        return self._top(scores.astype(np.float32), pos, k)

    # ------------------------------------------------------------------ internals
    def _contains(self, ids: np.ndarray) -> np.ndarray:
        where = np.searchsorted(self._sorted_ids, ids).clip(0, max(len(self) - 1, 0))
        return self._sorted_ids[where] == ids if len(self) else np.zeros(ids.shape, bool)

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        found = self._contains(ids)
        if not np.all(found):
            raise KeyError(f"id {int(ids[~found].ravel()[0])} is not in the index")
        where = np.searchsorted(self._sorted_ids, ids)
        return where if self._order is None else self._order[where]

    def _flat_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        def scan(task: tuple[slice, list[tuple[int, faiss.Index]]]
                 ) -> tuple[np.ndarray, np.ndarray]:
            queries, blocks = task
            dist, pos = [], []
            for start, block in blocks:
                d, labels = block.search(q[queries], min(k, block.ntotal))
                dist.append(d)
                pos.append(np.where(labels >= 0, labels + start, -1))
            return np.hstack(dist), np.hstack(pos)

        blocks, workers = self._blocks, _cores()
        if self.vectors.nbytes * len(q) < _PARALLEL_BYTES:
            workers = 1
        if workers > 1 and len(blocks) >= workers:  # a run of blocks per thread, all queries
            runs = np.array_split(np.arange(len(blocks)), workers)
            tasks = [(slice(None), [blocks[i] for i in run]) for run in runs]
            axis = 1
        elif workers > 1 and len(q) >= workers:  # few blocks: a share of the queries each
            tasks = [(slice(r[0], r[-1] + 1), blocks)
                     for r in np.array_split(np.arange(len(q)), workers)]
            axis = 0
        else:
            with _omp_threads(1):
                dist, pos = scan((slice(None), blocks))
            return np.where(pos >= 0, dist, -np.inf), pos
        with ThreadPoolExecutor(workers, initializer=faiss.omp_set_num_threads,
                                initargs=(1,)) as pool:
            parts = list(pool.map(scan, tasks))
        dist = np.concatenate([p[0] for p in parts], axis=axis)
        pos = np.concatenate([p[1] for p in parts], axis=axis)
        return np.where(pos >= 0, dist, -np.inf), pos

    def _ann_search(self, q: np.ndarray, k: int) -> np.ndarray:
        if self.kind in ("ivfpq", ONDISK):
            sp = faiss.SearchParametersIVF(nprobe=min(self.params["nprobe"], self._ann.nlist))
        else:
            sp = faiss.SearchParametersHNSW(efSearch=max(self.params["ef_search"], k))
        # faiss parallelises over queries; a team for a few queries costs more than it saves
        with _omp_threads(1 if len(q) < 2 * _cores() else faiss.omp_get_max_threads()):
            return self._ann.search(q, k, params=sp)[1]

    def _exact(self, q: np.ndarray, pos: np.ndarray) -> np.ndarray:
        if isinstance(self.vectors, np.memmap):
            _prefetch_rows(self.vectors, pos)
        scores = np.empty(pos.shape, np.float32)
        for s in range(0, len(q), 64):  # bounded (64, S, d) float32 gather
            rows = self.vectors[np.maximum(pos[s:s + 64], 0)].astype(np.float32)
            scores[s:s + 64] = np.einsum("qsd,qd->qs", rows, q[s:s + 64])
        return np.where(pos >= 0, scores, -np.inf)

    def _top(self, scores: np.ndarray, pos: np.ndarray, k: int
             ) -> tuple[np.ndarray, np.ndarray]:
        pos = np.where(np.isfinite(scores), pos, -1)
        # best score first, then row order; missing entries (pos -1, -inf) sort last
        order = np.lexsort((np.where(pos < 0, len(self), pos), -scores), axis=-1)[:, :k]
        scores = np.take_along_axis(scores, order, axis=1)
        pos = np.take_along_axis(pos, order, axis=1)
        if scores.shape[1] < k:
            pad = k - scores.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            pos = np.pad(pos, ((0, 0), (0, pad)), constant_values=-1)
        ids = np.where(pos >= 0, self.ids[np.maximum(pos, 0)] if len(self) else -1, -1)
        return scores.astype(np.float32), ids.astype(np.int64)


# ---------------------------------------------------------------------- helpers
def _cores() -> int:
    return os.cpu_count() or 1


@contextmanager
def _omp_threads(n: int) -> Iterator[None]:
    """faiss's OpenMP thread count for calls from this thread (OpenMP keeps it per thread)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _empty(nq: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)


def _check_rows(vectors: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vectors = np.asarray(vectors)
    if vectors.dtype not in (np.float16, np.float32):
        raise ValueError(f"vectors must be float16 or float32, got {vectors.dtype}")
    if vectors.ndim != 2 or (vectors.shape[1] < 1 and len(vectors)):
        raise ValueError(f"vectors must be a 2-D (N, d) array, got shape {vectors.shape}")
    ids = np.asarray(ids)
    if ids.ndim != 1 or (len(ids) and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    ids = ids.astype(np.int64, copy=False)
    if len(ids) != len(vectors):
        raise ValueError(f"{len(vectors)} vectors but {len(ids)} ids")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("ids must be unique")
    vectors = np.ascontiguousarray(vectors)
    for start in range(0, len(vectors), _CHUNK_ROWS):
        chunk = vectors[start:start + _CHUNK_ROWS]
        if chunk.dtype == np.float16:  # numpy's float16 isfinite is slow: test exponent bits
            bad = ((chunk.view(np.uint16) & 0x7C00) == 0x7C00).any(axis=1)
        else:
            bad = ~np.isfinite(chunk).all(axis=1)
        if bad.any():
            bad_id = ids[start + bad.argmax()]
            raise ValueError(f"vectors contain NaN or infinite values (id {bad_id})")
    return vectors, ids


def _resolve(kind: str, params: dict | None, n: int, d: int) -> tuple[str, dict]:
    """Check ``kind`` and ``params``; fill in defaults from N and d; decide the fallback."""
    if kind not in (*ANN_KINDS, ONDISK):
        raise ValueError(f"unknown index kind {kind!r}; expected one of {ANN_KINDS}")
    given = dict(params or {})
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown index params {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **given}
    if kind == "ivfpq":
        min_rows = _pq_rows(p)
        if n < min_rows:
            logger.info("ivfpq needs >= %d rows to train %d-bit PQ codebooks; %d rows: "
                        "using exact flat search", min_rows, p["nbits"], n)
            return "flat", p
        _ivf_lists(p, n, min_rows)
        _pq_m(p, d)
    elif kind == ONDISK:
        _ondisk_codes(p, n)
        _ivf_lists(p, n, _pq_rows(p) if p["codes"] == "pq" else 1)
        if p["codes"] == "pq":
            _pq_m(p, d)
    elif kind == "hnsw" and n == 0:
        logger.info("hnsw on an empty set: using flat search")
        return "flat", p
    return kind, p


def _pq_rows(p: dict) -> int:
    """Rows needed to train PQ codebooks of ``nbits`` bits."""
    return _MIN_POINTS_PER_CENTROID * 2 ** p["nbits"]


def _ivf_lists(p: dict, n: int, min_rows: int) -> None:
    """``nlist`` (~4 sqrt(N), at most N // 39, at least 1) and ``train_size`` for N rows."""
    most = max(1, n // _MIN_POINTS_PER_CENTROID)
    if p["nlist"] is None:
        p["nlist"] = max(1, min(round(4 * math.sqrt(n)), most))
    elif p["nlist"] > most:
        logger.warning("nlist %d needs >= %d training rows; %d rows: using nlist %d",
                       p["nlist"], p["nlist"] * _MIN_POINTS_PER_CENTROID, n, most)
        p["nlist"] = most
    if p["train_size"] is None:
        p["train_size"] = min(n, max(_TRAIN_PER_LIST * p["nlist"], min_rows))


def _pq_m(p: dict, d: int) -> None:
    if p["m"] is None:
        p["m"] = next(m for m in range(max(1, d // 8), 0, -1) if d % m == 0)
    elif d % p["m"]:
        raise ValueError(f"PQ m={p['m']} must divide the dimension {d}")


def _ondisk_codes(p: dict, n: int) -> None:
    """The codes of an on-disk index: as given ("m" alone means PQ), else 8-bit scalar; PQ
    with too few rows to train its codebooks falls back to scalar (logged)."""
    codes = p["codes"] or ("pq" if p["m"] else "sq8")
    if codes not in CODES:
        raise ValueError(f"unknown on-disk codes {codes!r}; expected one of {CODES}")
    if codes == "pq" and n < _pq_rows(p):
        logger.info("pq codes need >= %d rows to train; %d rows: using 8-bit scalar codes",
                    _pq_rows(p), n)
        codes, p["m"] = "sq8", None
    p["codes"] = codes


# ---------------------------------------------------------------------- memory budget
def parse_memory(value: str | int) -> int:
    """A memory size in bytes from ``value``: a number of bytes, or one with K, M, G or T
    (powers of 1024, as autofaiss reads ``max_index_memory_usage``: "512M", "2G", "1.5GB")."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)i?b?\s*", str(value).lower())
    if match is None:
        raise ValueError(f"memory size {value!r} is not a size such as 512M, 2G or 1073741824")
    return int(float(match[1]) * _UNITS[match[2]])


def memory_bytes(kind: str, n: int, d: int, params: dict | None = None) -> int:
    """Bytes that N x d float16 rows indexed as ``kind`` keep in memory (after the fallbacks
    of :meth:`VectorIndex.build`): what :func:`plan_storage` holds against a budget.

    In memory: rows and ids, plus faiss's copy of the rows (flat), or the IVF-PQ codes and
    centroids, or the HNSW graph and 8-bit codes.  On disk (``ONDISK``): centroids and
    codebooks, plus the memory-mapped part that queries keep touching (the ids and the
    inverted lists, which then stay in the page cache); the rows file is not counted, since a
    query reads only its shortlist's rows."""
    kind, p = _resolve(kind, params, n, d)
    if kind == ONDISK:
        return _ivf_bytes(n, d, p) + n * _ID_BYTES
    rows = n * (2 * d + _ID_BYTES)
    if kind == "flat":
        return rows + 2 * n * d
    if kind == "ivfpq":
        return rows + _ivf_bytes(n, d, {**p, "codes": "pq"})
    return rows + n * (d + 8 * p["hnsw_m"] + 16)  # SQ8 codes, 2 M level-0 links, offsets


def _ivf_bytes(n: int, d: int, p: dict) -> int:
    """Centroids, codebooks and inverted lists (a code and an id per row) of an IVF index."""
    if p["codes"] == "pq":
        code, books = math.ceil(p["m"] * p["nbits"] / 8), d * 2 ** p["nbits"] * 4
    else:
        code, books = d, 2 * d * 4
    return p["nlist"] * d * 4 + books + n * (code + _ID_BYTES)


def plan_storage(kind: str, n: int, d: int, budget: int | None, params: dict | None = None
                 ) -> dict:
    """Where an index of N x d float16 rows lives under a memory ``budget`` (bytes; None: no
    limit), the way autofaiss fits an index to ``max_index_memory_usage``.

    ``kind`` in memory if its :func:`memory_bytes` fit; otherwise ``ONDISK``, an IVF index
    whose lists and rows are memory-mapped, with the largest codes whose resident and hot part
    fits: 8-bit scalar (d bytes a row), else PQ of d/4, d/8, d/16 or d/32 bytes (the smallest,
    with a warning, when none fits).  Returns ``{"storage": "memory" or "ondisk", "kind",
    "params" (ondisk: what :meth:`VectorIndex.build_ondisk` takes), "memory_bytes",
    "budget"}``."""
    kind, _ = _resolve(kind, params, n, d)
    needed = memory_bytes(kind, n, d, params)
    if budget is None or needed <= budget:
        return {"storage": "memory", "kind": kind, "params": {}, "memory_bytes": needed,
                "budget": budget}
    p = _fit_codes(n, d, budget, params)
    return {"storage": "ondisk", "kind": ONDISK,
            "params": {k: p[k] for k in _ONDISK_PARAMS if p[k] is not None},
            "memory_bytes": memory_bytes(ONDISK, n, d, p), "budget": budget}


def _fit_codes(n: int, d: int, budget: int, given: dict | None) -> dict:
    """On-disk params for ``budget``: the codes given, else the largest that fit."""
    given = dict(given or {})
    if given.get("codes") or given.get("m"):
        choices = [given]
    else:
        choices = [{**given, **choice} for choice in _code_choices(n, d)]
    for choice in choices:
        p = _resolve(ONDISK, choice, n, d)[1]
        if memory_bytes(ONDISK, n, d, p) <= budget:
            return p
    logger.warning("an on-disk index of %d rows needs %d bytes with its smallest codes (%s), "
                   "more than the budget of %d: queries will read its lists from disk",
                   n, memory_bytes(ONDISK, n, d, p), _codes_name(p), budget)
    return p


def _code_choices(n: int, d: int) -> list[dict]:
    """8-bit scalar codes, then PQ codes of d/4 to d/32 bytes (if N can train them)."""
    choices = [{"codes": "sq8"}]
    if n >= _pq_rows(DEFAULTS):
        ms = [next(m for m in range(max(1, d // f), 0, -1) if d % m == 0) for f in (4, 8, 16, 32)]
        choices += [{"codes": "pq", "m": m} for m in dict.fromkeys(ms)]
    return choices


def _codes_name(p: dict) -> str:
    return f"PQ {p['m']}x{p['nbits']} bits" if p["codes"] == "pq" else "8-bit scalar"


def _float32_chunks(vectors: np.ndarray, rows: np.ndarray | None = None
                    ) -> Iterator[np.ndarray]:
    """``vectors`` (or its ``rows``) as float32, a chunk at a time, warning once if rows are
    not unit norm (the L2 shortlist of the approximate kinds assumes they are)."""
    n = len(vectors) if rows is None else len(rows)
    warned = False
    for start in range(0, n, _CHUNK_ROWS):
        sel = slice(start, start + _CHUNK_ROWS)
        chunk = (vectors[sel] if rows is None else vectors[rows[sel]]).astype(np.float32)
        norms = np.linalg.norm(chunk, axis=1)
        if not warned and len(norms) and np.abs(norms - 1).max() > 1e-2:
            logger.warning("rows are not unit norm (norms %.3g..%.3g): inner-product ranking "
                           "of approximate kinds may lose recall", norms.min(), norms.max())
            warned = True
        yield chunk


def _flat_blocks(vectors: np.ndarray) -> list[tuple[int, faiss.Index]]:
    n, d = vectors.shape
    per_block = max(1, _BLOCK_BYTES // (d * vectors.itemsize))
    blocks = []
    for start in range(0, n, per_block):
        if vectors.dtype == np.float16:  # exact: the codes are the float16 rows themselves
            block = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16,
                                               faiss.METRIC_INNER_PRODUCT)
        else:
            block = faiss.IndexFlatIP(d)
        block.add(vectors[start:start + per_block].astype(np.float32))
        blocks.append((start, block))
    return blocks


def _build_ivfpq(vectors: np.ndarray, p: dict, seed: int) -> faiss.Index:
    n, d = vectors.shape
    index = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, p["nlist"], p["m"], p["nbits"])
    index.use_precomputed_table = -1  # see the module docstring
    index.cp.seed = index.pq.cp.seed = seed
    sample = np.sort(np.random.default_rng(seed).choice(n, p["train_size"], replace=False))
    index.train(np.concatenate(list(_float32_chunks(vectors, sample))))
    for chunk in _float32_chunks(vectors):
        index.add(chunk)
    return index


def _build_hnsw(vectors: np.ndarray, p: dict, seed: int) -> faiss.Index:
    n, d = vectors.shape
    index = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, p["hnsw_m"], faiss.METRIC_L2)
    index.hnsw.efConstruction = p["ef_construction"]
    sample = np.sort(np.random.default_rng(seed).choice(n, min(n, 100_000), replace=False))
    index.train(vectors[sample].astype(np.float32))  # per-dimension min/max of the 8-bit codes
    for chunk in _float32_chunks(vectors):
        index.add(chunk)
    return index


# ---------------------------------------------------------------------- on-disk files
def save_rows(files: DiskFiles, chunks: Iterable[tuple[np.ndarray, np.ndarray]], n: int,
              d: int) -> None:
    """Write N rows of d dimensions, given as ``(ids, rows)`` chunks in ascending id order, to
    ``files.ids`` (int64) and ``files.rows`` (float16) as ``.npy`` files.

    Each is written beside its name, synced and renamed, so a crash never leaves half a file
    under either name; rows are streamed, never held whole.  ValueError for rows that are not
    finite, ids out of order, or a count other than N."""
    if n < 1 or d < 1:
        raise ValueError(f"an on-disk index needs at least one row and dimension, got {n} x {d}")
    with atomic_file(files.ids) as ids_tmp, atomic_file(files.rows) as rows_tmp:
        ids_out = np.lib.format.open_memmap(ids_tmp, "w+", np.int64, (n,))
        rows_out = np.lib.format.open_memmap(rows_tmp, "w+", np.float16, (n, d))
        _fill_rows(ids_out, rows_out, chunks)
        ids_out.flush()
        rows_out.flush()
        del ids_out, rows_out  # unmapped before the rename
        _fsync(ids_tmp)
        _fsync(rows_tmp)


def _fill_rows(ids_out: np.ndarray, rows_out: np.ndarray,
               chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
    at, last = 0, None
    for ids, rows in chunks:
        rows, ids = _check_rows(rows, ids)
        if not len(ids):
            continue
        if rows.shape[1] != rows_out.shape[1] or at + len(ids) > len(ids_out):
            raise ValueError(f"rows of shape {rows.shape} at row {at} do not fit the announced "
                             f"{rows_out.shape}")
        if (last is not None and ids[0] <= last) or np.any(ids[1:] <= ids[:-1]):
            raise ValueError(f"ids must come in ascending order (id {ids[0]} at row {at})")
        ids_out[at:at + len(ids)] = ids
        rows_out[at:at + len(ids)] = rows
        at, last = at + len(ids), ids[-1]
    if at != len(ids_out):
        raise ValueError(f"{at} rows given, but {len(ids_out)} announced")


def _open_rows(files: DiskFiles) -> tuple[np.memmap, np.memmap]:
    rows = _open_npy(files.rows, np.float16, 2)
    ids = _open_npy(files.ids, np.int64, 1)
    if len(ids) != len(rows):
        raise ValueError(f"{files.ids} holds {len(ids)} ids but {files.rows} holds {len(rows)} "
                         "rows: rebuild the index")
    return rows, ids


def _open_npy(path: Path, dtype: type, ndim: int) -> np.memmap:
    """The ``.npy`` array at ``path``, memory-mapped read-only, once its header and size are
    checked (a file cut short would otherwise fail later, at the first read past its end)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: rebuild the index")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, found = read_header(f)
            offset = f.tell()
    except ValueError as exc:
        raise ValueError(f"{path} is not an array file ({exc}): rebuild the index") from None
    if found != np.dtype(dtype) or len(shape) != ndim or fortran:
        raise ValueError(f"{path} holds a {found} array of shape {shape}, not the {ndim}-D "
                         f"{np.dtype(dtype)} array of an index: rebuild the index")
    expected = offset + math.prod(shape) * found.itemsize
    size = path.stat().st_size
    if size != expected:
        raise ValueError(f"{path} is {size} bytes but its header says {expected}: it was cut "
                         "short or damaged; rebuild the index")
    return np.load(path, mmap_mode="r")


def _advise_random(rows: np.memmap) -> None:
    """No read-ahead around the rows a query reads (see the module docstring)."""
    if hasattr(mmap, "MADV_RANDOM") and getattr(rows, "_mmap", None) is not None:
        rows._mmap.madvise(mmap.MADV_RANDOM)


def _prefetch_rows(rows: np.memmap, pos: np.ndarray) -> None:
    """Ask for the pages of rows ``pos`` all at once (``MADV_WILLNEED``), so that a query
    whose rows are on disk waits for one round of reads rather than one read per row."""
    if not hasattr(mmap, "MADV_WILLNEED") or getattr(rows, "_mmap", None) is None:
        return
    size = rows.shape[1] * rows.itemsize
    start = rows.offset % mmap.ALLOCATIONGRANULARITY + np.unique(pos[pos >= 0]) * size
    first, last = start // mmap.PAGESIZE, (start + size - 1) // mmap.PAGESIZE
    for a, b in zip(first.tolist(), last.tolist()):
        rows._mmap.madvise(mmap.MADV_WILLNEED, a * mmap.PAGESIZE, (b - a + 1) * mmap.PAGESIZE)


def _read_lists(path: Path, n: int, d: int) -> faiss.IndexIVF:
    """The IVF index at ``path`` with its inverted lists memory-mapped, not read."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: rebuild the index")
    try:
        index = faiss.read_index(str(path),
                                 faiss.IO_FLAG_MMAP | faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE)
    except RuntimeError as exc:  # faiss checks each list's offset against the file's size
        reason = str(exc).rsplit("Error: ", 1)[-1].strip()
        raise ValueError(f"{path} cannot be read: it was cut short or damaged ({reason}); "
                         "rebuild the index") from None
    if not isinstance(index, faiss.IndexIVF) or index.ntotal != n or index.d != d:
        raise ValueError(f"{path} holds a {type(index).__name__} of {index.ntotal} rows x "
                         f"{index.d} dims, but the rows file {n} x {d}: rebuild the index")
    faiss.downcast_InvertedLists(index.invlists).prefetch_nthread = 0  # see the docstring
    _no_precomputed_table(index)
    return index


def _no_precomputed_table(index: faiss.Index) -> None:
    """Keep IVF-PQ's precomputed residual table off, as built (see the module docstring):
    ``faiss.read_index`` would compute it again unless told to skip it."""
    if isinstance(index, faiss.IndexIVFPQ):
        index.use_precomputed_table = -1


def _new_ivf(d: int, p: dict, seed: int) -> faiss.IndexIVF:
    """An untrained L2 IVF index with 8-bit scalar or PQ codes (see the module docstring)."""
    if p["codes"] == "pq":
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, p["nlist"], p["m"], p["nbits"])
        index.use_precomputed_table = -1
        index.pq.cp.seed = seed
    else:
        index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(d), d, p["nlist"],
                                              faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_L2)
    index.cp.seed = seed
    return index


def _write_index(index: faiss.Index, path: str | Path) -> None:
    """``faiss.write_index`` to a temporary file beside ``path``, synced, then renamed."""
    with atomic_file(path) as tmp:  # the mode a plain open() gives, not mkstemp's 0600
        faiss.write_index(index, str(tmp))
        _fsync(tmp)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())

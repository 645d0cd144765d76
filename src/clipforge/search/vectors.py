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
  rows, four times the codes) to save ~0.16 ms per query.  Fewer than ``39 * 2**nbits`` rows
  cannot train the PQ codebooks: such an index falls back to flat (logged, ``kind`` says
  "flat"); a too-large ``nlist`` is reduced (logged).
* **HNSW**: ``IndexHNSWSQ`` with 8-bit scalar-quantised storage (d bytes per row instead of
  4 d: the shortlist is re-ranked anyway), ``M = 32``, ``efConstruction = 40``, ``efSearch =
  max(128, shortlist)``: builds 1M x 512 in ~2 min, recall@10 0.985 at ~0.7 ms, +762 MiB.
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
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np

from ..fileio import atomic_file

logger = logging.getLogger(__name__)

ANN_KINDS = ("flat", "ivfpq", "hnsw")

DEFAULTS = {
    "nlist": None,  # derived from N: ~4 sqrt(N), at most N // 39
    "m": None,  # derived from d: the largest divisor of d not above d // 8
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
        ann = faiss.read_index(str(path))  # returned downcast to its concrete class
        expected = faiss.IndexIVFPQ if kind == "ivfpq" else faiss.IndexHNSW
        if ann.ntotal != n or ann.d != d or not isinstance(ann, expected):
            raise ValueError(
                f"ANN file {path} holds a {type(ann).__name__} of {ann.ntotal} rows x {ann.d} "
                f"dims, but the index is {kind!r} with {n} rows x {d} dims: rebuild the index")
        return cls(vectors, ids, kind, params, ann)

    def save_ann(self, path: str | Path) -> None:
        """Write the trained ANN structure atomically (temp file + ``os.replace``); no-op for
        "flat", which is rebuilt from the rows."""
        if self._ann is None:
            return
        with atomic_file(path) as tmp:  # the mode a plain open() gives, not mkstemp's 0600
            faiss.write_index(self._ann, str(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())

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
        if self.kind == "ivfpq":
            sp = faiss.SearchParametersIVF(nprobe=min(self.params["nprobe"], self._ann.nlist))
        else:
            sp = faiss.SearchParametersHNSW(efSearch=max(self.params["ef_search"], k))
        # faiss parallelises over queries; a team for a few queries costs more than it saves
        with _omp_threads(1 if len(q) < 2 * _cores() else faiss.omp_get_max_threads()):
            return self._ann.search(q, k, params=sp)[1]

    def _exact(self, q: np.ndarray, pos: np.ndarray) -> np.ndarray:
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
    if kind not in ANN_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {ANN_KINDS}")
    given = dict(params or {})
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown index params {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    p = {**DEFAULTS, **given}
    if kind == "ivfpq":
        min_rows = _MIN_POINTS_PER_CENTROID * 2 ** p["nbits"]
        if n < min_rows:
            logger.info("ivfpq needs >= %d rows to train %d-bit PQ codebooks; %d rows: "
                        "using exact flat search", min_rows, p["nbits"], n)
            return "flat", p
        most = n // _MIN_POINTS_PER_CENTROID
        if p["nlist"] is None:
            p["nlist"] = max(1, min(round(4 * math.sqrt(n)), most))
        elif p["nlist"] > most:
            logger.warning("nlist %d needs >= %d training rows; %d rows: using nlist %d",
                           p["nlist"], p["nlist"] * _MIN_POINTS_PER_CENTROID, n, most)
            p["nlist"] = most
        if p["m"] is None:
            p["m"] = next(m for m in range(max(1, d // 8), 0, -1) if d % m == 0)
        elif d % p["m"]:
            raise ValueError(f"PQ m={p['m']} must divide the dimension {d}")
        if p["train_size"] is None:
            p["train_size"] = min(n, max(_TRAIN_PER_LIST * p["nlist"], min_rows))
    elif kind == "hnsw" and n == 0:
        logger.info("hnsw on an empty set: using flat search")
        return "flat", p
    return kind, p


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

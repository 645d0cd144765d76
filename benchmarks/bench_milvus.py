"""Milvus Lite against the embedded faiss flat index, on the same rows (``--vector-store``).

``--n`` unit vectors of ``--dim`` dimensions, made as ``bench_ann.py`` makes them (1,000
cluster centres plus noise with a decaying spectrum, normalised, float16 as an index stores
them), and ``--queries`` queries drawn the same way (not in the set); k = 10.  Each store is
built from the rows and searched through the class :class:`~clipforge.search.SearchIndex` uses:

* faiss flat: :class:`~clipforge.search.vectors.VectorIndex` (what an index without
  ``--vector-store`` searches);
* Milvus Lite FLAT and HNSW: a collection filled by
  :func:`~clipforge.search.milvus.sync_collection` (what ``index build`` does, in batches of
  4,096 rows) and searched by :class:`~clipforge.search.milvus.MilvusVectors` (gRPC to the
  Milvus Lite server in this process).

Printed side by side: build seconds (for Milvus: insert, flush, index and load), single-query
latency p50/p99 over the queries after 5 warm-up queries, recall@10 against an exact top-10
(numpy float32), and the largest difference between a returned score and the exact inner
product.  Milvus Lite is one process on one machine: these figures say what its overhead is
against the in-process scan, not how a cluster scales (see docs/milvus.md).

    python benchmarks/bench_milvus.py [--n 100000] [--dim 512] [--queries 200] [--no-hnsw]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench_ann import K, latencies, make_data, recall_at
from clipforge.search.milvus import MilvusBackend, MilvusVectors, sync_collection
from clipforge.search.vectors import VectorIndex
from machine import cpu_name

_CHUNK = 65536


def exact_top(rows: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-K ids and scores by numpy float32, a chunk of rows at a time."""
    cand_s, cand_i = [], []
    for start in range(0, len(rows), _CHUNK):
        s = queries @ rows[start:start + _CHUNK].astype(np.float32).T
        top = np.argpartition(-s, min(K, s.shape[1] - 1), axis=1)[:, :K]
        cand_s.append(np.take_along_axis(s, top, 1))
        cand_i.append(top + start)
    scores, found = np.hstack(cand_s), np.hstack(cand_i)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    return np.take_along_axis(found, order, 1), np.take_along_axis(scores, order, 1)


def measure(name: str, build: Callable[[], object], queries: np.ndarray,
            truth: tuple[np.ndarray, np.ndarray], rows: np.ndarray) -> dict:
    """Build, then time single queries, then recall and score error."""
    start = time.perf_counter()
    store = build()
    built = time.perf_counter() - start
    times = latencies(lambda q: store.search(q, K), queries)
    scores, ids = store.search(queries, K)
    exact = np.einsum("qkd,qd->qk", rows[np.maximum(ids, 0)].astype(np.float32), queries)
    return {"name": name, "build_s": built, "p50_ms": 1e3 * float(np.median(times)),
            "p99_ms": 1e3 * float(np.quantile(times, 0.99)),
            "recall": recall_at(ids, truth[0]),
            "score_err": float(np.abs(np.where(ids >= 0, scores - exact, 0)).max())}


def milvus_build(rows: np.ndarray, ids: np.ndarray, folder: Path, kind: str
                 ) -> Callable[[], MilvusVectors]:
    def build() -> MilvusVectors:
        backend = MilvusBackend(str(folder / f"{kind}.db"), f"bench_{kind}")
        chunks = ((ids[s:s + _CHUNK], rows[s:s + _CHUNK]) for s in range(0, len(rows), _CHUNK))
        sync_collection(backend, chunks, rows.shape[1], kind, {}, 0, 1)
        return MilvusVectors.open(backend, rows.shape[1], len(rows), 1, kind)
    return build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--no-hnsw", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"$ python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores), Python {platform.python_version()}")
    rows, queries = make_data(args.n, args.dim, args.queries, args.seed)
    ids = np.arange(len(rows), dtype=np.int64)
    truth = exact_top(rows, queries)
    results = [measure("faiss flat (embedded)",
                       lambda: VectorIndex.build(rows, ids, "flat"), queries, truth, rows)]
    with tempfile.TemporaryDirectory() as tmp:
        kinds = ["flat"] if args.no_hnsw else ["flat", "hnsw"]
        for kind in kinds:
            results.append(measure(f"Milvus Lite {kind.upper()}",
                                   milvus_build(rows, ids, Path(tmp), kind), queries, truth,
                                   rows))
    print(f"{args.n} x {args.dim} float16 rows, {args.queries} queries, k={K}")
    print(f"{'store':24} {'build s':>8} {'p50 ms':>8} {'p99 ms':>8} {'recall@10':>10} "
          f"{'score err':>10}")
    for r in results:
        print(f"{r['name']:24} {r['build_s']:8.1f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
              f"{r['recall']:10.3f} {r['score_err']:10.1e}")


if __name__ == "__main__":
    main()

"""Vector search on CPU: exact flat search against IVF-PQ and HNSW (``clipforge.search.vectors``).

The data imitate CLIP image embeddings: ``--n`` unit vectors of ``--dim`` dimensions around
1,000 random cluster centres, with Gaussian noise whose variance decays like 1/i over a random
basis (a few strong directions, many weak ones), normalised and stored as float16 as the search
index stores them.  Queries are drawn the same way but are not in the set.  No network access.

Measured, per index kind:

* build time (training included) and memory: the growth of the process's resident set over
  the stored rows (which every kind keeps for exact re-ranking), and the saved ANN file size;
* single-query latency p50/p99: ``--queries`` queries one at a time (after 5 warm-up ones);
* batch throughput: the same queries in batches of ``--batch`` (32);
* recall@10 against an exact top-10 from numpy float32 matmul (ties are vanishingly rare).

Memory bandwidth sets the floor for exact search, so the script also measures it: one pass over
the N x d matrix in float32 and in float16 (``np.max`` over its raw bytes: a vectorised load and
max per 64 bytes, nothing else; fastest of 10), on one thread and on one thread per core (the
bytes split between Python threads; numpy releases the GIL), and prints each kind's
single-query latency as a multiple of that memory-bound pass over the float16 rows.

It also times the exact-search implementations that ``vectors.py`` chose between, on the same
rows (skip with ``--no-flat-variants``): faiss ``IndexFlatIP`` over a float32 copy, one
``IndexScalarQuantizer(QT_fp16)``, numpy and torch float32 matmul + top-k, and the blocked
threaded float16 scan that ``VectorIndex`` uses.  HNSW's build is the slowest part (about
2 minutes at 1M x 512 on 2 cores); ``--no-hnsw`` skips it.  The default run takes about 5.5
minutes on 2 Zen 4 cores and needs about 8 GB of memory.

    python benchmarks/bench_ann.py [--n 1000000] [--dim 512] [--queries 200] [--no-hnsw]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import torch

from bench_embed import BackgroundLoad, fmt_load
from clipforge.search.vectors import VectorIndex
from machine import cpu_name

CENTRES = 1000
K = 10


# --------------------------------------------------------------------------------------- data
def clustered(n: int, d: int, seed: int, centres: np.ndarray, basis: np.ndarray,
              dtype: type = np.float16, chunk: int = 65536) -> np.ndarray:
    """``n`` unit vectors: a random centre plus noise ``g @ basis``, normalised."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[rng.integers(0, len(centres), m)]
        x = x + rng.standard_normal((m, d), dtype=np.float32) @ basis
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def make_data(n: int, d: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rotation = np.linalg.qr(rng.standard_normal((d, d)))[0]
    scale = np.arange(1, d + 1) ** -0.5
    scale /= np.linalg.norm(scale)  # E|noise|^2 = 1: cosine to its centre ~0.7
    basis = (scale[:, None] * rotation.T).astype(np.float32)
    rows = clustered(n, d, seed + 1, centres, basis)
    qs = clustered(queries, d, seed + 2, centres, basis, dtype=np.float32)
    return rows, qs


# --------------------------------------------------------------------------------- measuring
def rss_bytes() -> int:
    """Resident set size now, after returning freed heap memory to the OS where possible."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def pass_seconds(matrix: np.ndarray, threads: int, repeats: int = 10) -> float:
    """Fastest of ``repeats`` single passes over ``matrix``: ``np.max`` of its raw bytes (one
    vectorised load and max per 64 bytes, nothing else), the rows split between threads."""
    parts = np.array_split(matrix.reshape(-1).view(np.uint8), threads)
    with ThreadPoolExecutor(threads) as pool:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.max, parts))
            best = min(best, time.perf_counter() - start)
    return best


def latencies(search: Callable[[np.ndarray], object], queries: np.ndarray) -> np.ndarray:
    for q in queries[:5]:
        search(q[None])
    times = []
    for q in queries:
        start = time.perf_counter()
        search(q[None])
        times.append(time.perf_counter() - start)
    return np.array(times)


def batch_rate(search: Callable[[np.ndarray], object], queries: np.ndarray, batch: int) -> float:
    """Queries per second over the full batches of ``queries`` (one warm-up batch first)."""
    full = len(queries) // batch * batch
    search(queries[:batch])
    start = time.perf_counter()
    for s in range(0, full, batch):
        search(queries[s:s + batch])
    return full / (time.perf_counter() - start)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


# ------------------------------------------------------------------------------ flat variants
def flat_variants(rows: np.ndarray, rows32: np.ndarray, queries: np.ndarray, batch: int
                  ) -> list[tuple[str, float, float, float]]:
    """(name, extra bytes, 1-query ms, batch ms) of each exact implementation: medians of 20
    single queries and of 3 batches, back to back after one warm-up call of each."""
    n, d = rows.shape
    ip = faiss.IndexFlatIP(d)
    sq = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    for s in range(0, n, 65536):
        ip.add(rows32[s:s + 65536])
        sq.add(rows32[s:s + 65536])
    flat = VectorIndex.build(rows, np.arange(n))
    t32 = torch.from_numpy(rows32)

    def np_topk(q: np.ndarray) -> np.ndarray:
        scores = q @ rows32.T
        return np.argpartition(-scores, K, axis=1)[:, :K]

    def torch_topk(q: np.ndarray) -> object:
        return torch.topk(torch.from_numpy(q) @ t32.T, K, dim=1)

    variants = [
        ("VectorIndex flat: fp16 SQ blocks, 1 thread/core", 2 * n * d,
         lambda q: flat.search(q, K)),
        ("faiss IndexScalarQuantizer QT_fp16 (one index)", 2 * n * d, lambda q: sq.search(q, K)),
        ("faiss IndexFlatIP over a float32 copy", 4 * n * d, lambda q: ip.search(q, K)),
        ("numpy float32 copy: q @ X.T + argpartition", 4 * n * d, np_topk),
        ("torch float32 copy: q @ X.T + topk", 4 * n * d, torch_topk),
    ]
    results = []
    for name, extra, fn in variants:
        time.sleep(0.3)  # numpy's OpenBLAS threads spin ~0.1 s after a call: let them settle
        fn(queries[:1])
        fn(queries[:batch])
        one = [timed(fn, queries[i:i + 1]) for i in range(1, 21)]
        many = [timed(fn, queries[:batch]) for _ in range(3)]
        results.append((name, extra, statistics.median(one) * 1e3,
                        statistics.median(many) * 1e3))
    return results


def timed(fn: Callable[[np.ndarray], object], q: np.ndarray) -> float:
    start = time.perf_counter()
    fn(q)
    return time.perf_counter() - start


# -------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="indexed rows (default 1M)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-hnsw", dest="hnsw", action="store_false",
                        help="skip HNSW (its build is the slowest part: ~2 min at 1M x 512)")
    parser.add_argument("--no-flat-variants", dest="flat_variants", action="store_false",
                        help="skip the comparison of exact-search implementations")
    parser.add_argument("--params", default="", help="index params for the ANN kinds, "
                        "e.g. 'nprobe=16,shortlist=200'")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = {k: int(v) for k, v in (p.split("=") for p in args.params.split(",") if p)}
    n, d = args.n, args.dim
    command = "python benchmarks/bench_ann.py " + shlex.join(sys.argv[1:] if argv is None
                                                            else argv)
    print("Vector search: exact flat vs IVF-PQ vs HNSW, clipforge.search.vectors, CPU")
    print(f"  cpu: {cpu_name()} ({os.cpu_count()} logical cores), python "
          f"{platform.python_version()}, faiss {faiss.__version__}, numpy {np.__version__}, "
          f"torch {torch.__version__}")
    print(f"  faiss OpenMP threads {faiss.omp_get_max_threads()}, torch threads "
          f"{torch.get_num_threads()}; load average before start "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    loads: dict[str, float | None] = {}

    start = time.perf_counter()
    rows, queries = make_data(n, d, args.queries, args.seed)
    print(f"\nData: {n:,} x {d} float16 rows ({rows.nbytes / 2**30:.2f} GiB), {CENTRES} "
          f"clusters, {args.queries} queries not in the set; generated in "
          f"{time.perf_counter() - start:.0f} s")

    # memory bandwidth and the exact ground truth, both on a float32 copy
    rows32 = rows.astype(np.float32)
    cores = os.cpu_count() or 1
    with BackgroundLoad() as load:
        bw = {(dt, th): pass_seconds(m, th) for dt, m in (("f32", rows32), ("f16", rows))
              for th in sorted({1, cores})}
    loads["bandwidth"] = load.cores
    print("\nMemory bandwidth: one pass over the matrix (np.max of its raw bytes), fastest "
          "of 10:")
    for (dt, th), sec in bw.items():
        size = rows32.nbytes if dt == "f32" else rows.nbytes
        print(f"  {dt}, {th} thread{'s' if th > 1 else ' '}: {sec * 1e3:6.1f} ms "
              f"= {size / sec / 1e9:5.1f} GB/s")
    scan_ms = bw[("f16", cores)] * 1e3
    truth = np.empty((len(queries), K), np.int64)
    for s in range(0, len(queries), 32):
        scores = queries[s:s + 32] @ rows32.T
        top = np.argpartition(-scores, K, axis=1)[:, :K]
        order = np.lexsort((top, -np.take_along_axis(scores, top, axis=1)), axis=1)
        truth[s:s + 32] = np.take_along_axis(top, order, axis=1)

    variants = []
    if args.flat_variants:
        with BackgroundLoad() as load:
            variants = flat_variants(rows, rows32, queries, args.batch)
        loads["flat variants"] = load.cores
    del rows32

    ids = np.arange(n, dtype=np.int64)
    kinds = ["flat", "ivfpq"] + (["hnsw"] if args.hnsw else [])
    results = []
    for kind in kinds:
        base = rss_bytes()
        with BackgroundLoad() as load:
            start = time.perf_counter()
            index = VectorIndex.build(rows, ids, kind, params=params if kind != "flat" else None)
            build_s = time.perf_counter() - start
            memory = rss_bytes() - base
            file_bytes = 0
            if kind != "flat":
                with tempfile.TemporaryDirectory() as tmp:
                    index.save_ann(Path(tmp) / "ann.faiss")
                    file_bytes = (Path(tmp) / "ann.faiss").stat().st_size

            def search(q: np.ndarray, index: VectorIndex = index) -> object:
                return index.search(q, K)

            lat = latencies(search, queries) * 1e3
            rate = batch_rate(search, queries, args.batch)
            found = index.search(queries, K)[1]
        loads[kind] = load.cores
        shown = {k: v for k, v in index.params.items()
                 if kind == "ivfpq" and k in ("nlist", "m", "nbits", "nprobe", "train_size",
                                              "shortlist")
                 or kind == "hnsw" and k in ("hnsw_m", "ef_construction", "ef_search",
                                             "shortlist")}
        results.append({"kind": kind, "build_s": build_s, "memory": memory, "file": file_bytes,
                        "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                        "rate": rate, "recall": recall_at(found, truth), "params": shown})
        r = results[-1]
        print(f"\n{kind}: built in {build_s:.1f} s, +{memory / 2**20:.0f} MiB resident"
              + (f", file {file_bytes / 2**20:.0f} MiB" if file_bytes else "")
              + (f"; {shown}" if shown else ""))
        print(f"  1 query: p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms "
              f"({r['p50'] / scan_ms:.2f}x the memory-bound float16 pass, {scan_ms:.1f} ms); "
              f"batch {args.batch}: {rate:.0f} queries/s; recall@{K} {r['recall']:.3f}")
        del index
    if not args.hnsw:
        print("\nhnsw: skipped (--no-hnsw)")

    if variants:
        print(f"\nExact search implementations, {n:,} x {d} float16 rows (medians of 20 single "
              f"queries and 3 batches, back to back; extra = memory beyond the stored rows):")
        header = (f"  {'implementation':<50} | {'extra MiB':>9} | {'1 query ms':>10} | "
                  f"{f'{args.batch} queries ms':>15}")
        print(header + "\n  " + "-" * (len(header) - 2))
        for name, extra, one, many in variants:
            print(f"  {name:<50} | {extra / 2**20:>9.0f} | {one:>10.1f} | {many:>15.1f}")

    print(f"\nSummary: {n:,} x {d} rows stored as float16 ({rows.nbytes / 2**20:.0f} MiB, kept "
          f"by every kind for exact re-ranking), k={K}, {args.queries} queries")
    header = (f"  {'index':<6} | {'build s':>7} | {'+MiB':>6} | {'p50 ms':>7} | {'p99 ms':>7} | "
              f"{'p50/scan':>8} | {f'batch-{args.batch} q/s':>12} | {f'recall@{K}':>9}")
    print(header + "\n  " + "-" * (len(header) - 2))
    for r in results:
        print(f"  {r['kind']:<6} | {r['build_s']:>7.1f} | {r['memory'] / 2**20:>6.0f} | "
              f"{r['p50']:>7.2f} | {r['p99']:>7.2f} | {r['p50'] / scan_ms:>8.2f} | "
              f"{r['rate']:>12.0f} | {r['recall']:>9.3f}")
    print(f"  memory-bound pass over the float16 rows with {cores} threads: {scan_ms:.1f} ms "
          f"(float32: {bw[('f32', cores)] * 1e3:.1f} ms); +MiB = resident growth at build")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"  peak resident memory of this run: {peak:.1f} GiB")
    print("  other processes' CPU use (cores, average) during: "
          + ", ".join(f"{name} {fmt_load(c)}" for name, c in loads.items()))
    busy = [name for name, c in loads.items() if c is not None and c > 0.1]
    if busy:
        print("WARNING: other processes used CPU during " + ", ".join(busy)
              + "; those figures are disturbed: re-run on a quiet machine")
    print(f"\ncommand: {command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Search beyond the memory budget: rows and IVF lists memory-mapped (``clipforge.search.vectors``).

``index build --max-index-memory`` keeps an index whose rows do not fit the budget on disk: an
IVF index whose inverted lists are memory-mapped gives a shortlist, re-ranked exactly against
the float16 rows, memory-mapped too.  This script measures that mode on ``--n`` unit vectors of
``--dim`` dimensions, made as ``bench_ann.py`` makes them (1,000 cluster centres plus noise with
a decaying spectrum, normalised, float16) but a chunk at a time and streamed into the rows file
as a build streams them from SQLite, so they are never all in memory.  The ``--queries``
queries are drawn the same way and are not in the set; k = 10.  The default budget (512 MiB)
is an eighth of what the same 2M x 512 rows take in memory (rows, ids and faiss's copy of the
rows for the exact scan: 4 GiB), so :func:`~clipforge.search.vectors.plan_storage` puts them
on disk and picks the codes that fit.

Measured:

* build: writing the rows and ids files, then training, filling and writing the IVF index, and
  the size of each file;
* resident memory from ``/proc/self/status``: anonymous memory (what the process holds) and
  mapped file pages (page cache the kernel may drop and read again), before and after opening
  the index and after the queries, and the peak of the build;
* single-query latency p50/p99 of a first pass over the queries right after the files were
  dropped from the page cache (``posix_fadvise(DONTNEED)``: "cold") and of a second pass
  ("warm"), then batch-32 throughput;
* recall@10 against an exact top-10 (numpy float32 over the rows read back a chunk at a time),
  and the largest difference between a returned score and the exact inner product.

Side by side, the same rows searched in memory (exact flat search, today's path without a
budget) when this machine can hold them; ``--no-memory`` skips it.

    python benchmarks/bench_ondisk.py [--n 2000000] [--dim 512] [--budget 512M] [--queries 200]
        [--no-memory] [--dir DIR] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np

from bench_ann import CENTRES, K, batch_rate, clustered, recall_at
from bench_embed import BackgroundLoad, fmt_load
from clipforge.search.vectors import (
    DiskFiles,
    VectorIndex,
    memory_bytes,
    parse_memory,
    plan_storage,
    save_rows,
)
from machine import cpu_name, status_bytes
from report import write_json

CHUNK = 65536
MiB = 2**20


# --------------------------------------------------------------------------------------- data
def space(d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Cluster centres and the noise basis, as ``bench_ann.make_data`` draws them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rotation = np.linalg.qr(rng.standard_normal((d, d)))[0]
    scale = np.arange(1, d + 1) ** -0.5
    scale /= np.linalg.norm(scale)
    return centres, (scale[:, None] * rotation.T).astype(np.float32)


def row_chunks(n: int, centres: np.ndarray, basis: np.ndarray, seed: int
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, float16 rows) chunks, each drawn with its own seed: never all rows at once."""
    for i, start in enumerate(range(0, n, CHUNK)):
        m = min(CHUNK, n - start)
        rows = clustered(m, centres.shape[1], seed + 100 + i, centres, basis)
        yield np.arange(start, start + m, dtype=np.int64), rows


def exact_top(rows: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Positions of the exact top-k of each query, the rows read a chunk at a time."""
    best_s = np.full((len(queries), K), -np.inf, np.float32)
    best_i = np.zeros((len(queries), K), np.int64)
    for start in range(0, len(rows), CHUNK):
        scores = queries @ rows[start:start + CHUNK].astype(np.float32).T
        top = np.argpartition(-scores, min(K, scores.shape[1] - 1), axis=1)[:, :K]
        cand_s = np.hstack([best_s, np.take_along_axis(scores, top, axis=1)])
        cand_i = np.hstack([best_i, top + start])
        order = np.lexsort((cand_i, -cand_s), axis=1)[:, :K]
        best_s = np.take_along_axis(cand_s, order, axis=1)
        best_i = np.take_along_axis(cand_i, order, axis=1)
    return best_i


# --------------------------------------------------------------------------------- measuring
def memory() -> dict[str, int]:
    """Resident bytes now: anonymous, mapped file pages, and the peak since the last reset."""
    return {"anon": status_bytes("RssAnon"), "file": status_bytes("RssFile"),
            "peak": status_bytes("VmHWM")}


def reset_peak() -> None:
    """Start VmHWM afresh (Linux: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def evict(files: DiskFiles) -> None:
    """Drop the files' pages from the page cache (none of them may be mapped now)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def score_error(index: VectorIndex, queries: np.ndarray, scores: np.ndarray,
                ids: np.ndarray) -> float:
    """Largest |returned score - exact float32 inner product with the stored row|."""
    exact = np.einsum("qkd,qd->qk", index.rows(ids), queries)
    return float(np.abs(scores - exact).max())


def single_ms(index: VectorIndex, queries: np.ndarray) -> np.ndarray:
    """Milliseconds of each query alone, in order, no warm-up."""
    times = []
    for q in queries:
        start = time.perf_counter()
        index.search(q, K)
        times.append(time.perf_counter() - start)
    return np.array(times) * 1e3


def query_figures(index: VectorIndex, queries: np.ndarray, batch: int) -> dict[str, float]:
    """First ("cold") and second ("warm") pass over the queries one at a time, batch
    throughput, recall and score error of ``index``."""
    times = {name: single_ms(index, queries) for name in ("cold", "warm")}
    rate = batch_rate(lambda q: index.search(q, K), queries, batch)
    scores, ids = index.search(queries, K)
    return {"cold_p50": float(np.percentile(times["cold"], 50)),
            "cold_p99": float(np.percentile(times["cold"], 99)),
            "p50": float(np.percentile(times["warm"], 50)),
            "p99": float(np.percentile(times["warm"], 99)), "rate": rate,
            "ids": ids, "score_error": score_error(index, queries, scores, ids)}


# ------------------------------------------------------------------------------------ phases
def build(files: DiskFiles, n: int, d: int, plan: dict, seed: int) -> dict:
    centres, basis = space(d, seed)
    reset_peak()
    start = time.perf_counter()
    save_rows(files, row_chunks(n, centres, basis, seed), n, d)
    rows_s = time.perf_counter() - start
    start = time.perf_counter()
    VectorIndex.build_ondisk(files, plan["params"], seed=seed)
    return {"rows_s": rows_s, "ivf_s": time.perf_counter() - start,
            "peak": memory()["peak"], "files": {p.name: p.stat().st_size for p in files}}


def measure_ondisk(files: DiskFiles, queries: np.ndarray, truth: np.ndarray, batch: int
                   ) -> dict:
    evict(files)
    before = memory()
    start = time.perf_counter()
    index = VectorIndex.open_ondisk(files)
    open_s = time.perf_counter() - start
    opened = memory()
    reset_peak()
    figures = query_figures(index, queries, batch)
    after = memory()
    figures["recall"] = recall_at(figures.pop("ids"), truth)
    return {**figures, "open_s": open_s, "before": before, "opened": opened, "after": after,
            "params": index.params}


def measure_memory(files: DiskFiles, queries: np.ndarray, truth: np.ndarray, batch: int
                   ) -> dict:
    """The same rows read into memory and searched exactly (flat), as without a budget."""
    before = memory()
    start = time.perf_counter()
    rows = np.array(np.load(files.rows, mmap_mode="r"))
    ids = np.arange(len(rows), dtype=np.int64)
    index = VectorIndex.build(rows, ids)
    open_s = time.perf_counter() - start
    opened = memory()
    figures = query_figures(index, queries, batch)
    figures["recall"] = recall_at(figures.pop("ids"), truth)
    return {**figures, "open_s": open_s, "before": before, "opened": opened, "after": memory()}


# -------------------------------------------------------------------------------------- report
def print_header(args: argparse.Namespace) -> None:
    print("Search beyond the memory budget: IVF lists and float16 rows memory-mapped, "
          "clipforge.search.vectors, CPU")
    print(f"  cpu: {cpu_name()} ({os.cpu_count()} logical cores), python "
          f"{platform.python_version()}, faiss {faiss.__version__}, numpy {np.__version__}; "
          f"load average before start {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def print_plan(n: int, d: int, budget: int, plan: dict) -> None:
    need = memory_bytes("flat", n, d)
    print(f"\nData: {n:,} x {d} float16 rows ({n * d * 2 / MiB:,.0f} MiB); in memory (rows, ids, "
          f"faiss's copy) {need / MiB:,.0f} MiB against a budget of {budget / MiB:,.0f} MiB")
    print(f"  chosen: {plan['storage']}, {plan['params']}; counted against the budget "
          f"(centroids, codebooks, ids and lists): {plan['memory_bytes'] / MiB:,.1f} MiB")


def print_build(built: dict) -> None:
    sizes = ", ".join(f"{name} {size / MiB:,.0f} MiB" for name, size in built["files"].items())
    print(f"\nBuild: rows and ids written in {built['rows_s']:.1f} s; IVF trained, filled and "
          f"written in {built['ivf_s']:.1f} s; peak resident {built['peak'] / MiB:,.0f} MiB")
    print(f"  files: {sizes}")


def print_summary(results: dict[str, dict], batch: int) -> None:
    print("\nSide by side (resident = anonymous + mapped file pages, MiB; after queries: file "
          "pages are page cache the kernel can drop):")
    header = (f"  {'search':<10} | {'open s':>6} | {'anon open':>9} | {'file open':>9} | "
              f"{'anon after':>10} | {'file after':>10} | {'cold p50':>8} | {'cold p99':>8} | "
              f"{'p50 ms':>6} | {'p99 ms':>6} | {f'batch-{batch} q/s':>12} | "
              f"{f'recall@{K}':>9} | {'score err':>9}")
    print(header + "\n  " + "-" * (len(header) - 2))
    for name, r in results.items():
        grow = {k: (r[k]["anon"] - r["before"]["anon"], r[k]["file"] - r["before"]["file"])
                for k in ("opened", "after")}
        print(f"  {name:<10} | {r['open_s']:>6.2f} | {grow['opened'][0] / MiB:>+9.0f} | "
              f"{grow['opened'][1] / MiB:>+9.0f} | {grow['after'][0] / MiB:>+10.0f} | "
              f"{grow['after'][1] / MiB:>+10.0f} | {r['cold_p50']:>8.2f} | "
              f"{r['cold_p99']:>8.2f} | {r['p50']:>6.2f} | {r['p99']:>6.2f} | "
              f"{r['rate']:>12.0f} | {r['recall']:>9.3f} | {r['score_error']:>9.1e}")


# -------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, help="indexed rows (default 2M; 20k with --quick)")
    parser.add_argument("--dim", type=int, help="dimensions (default 512; 64 with --quick)")
    parser.add_argument("--budget", help="max index memory (default 512M; 1M with --quick)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip the in-memory comparison (it needs about 2 N d bytes)")
    parser.add_argument("--dir", type=Path, help="where to write the index files (default: a "
                        "temporary folder, removed at the end)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run (seconds)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    args.n = args.n or (20_000 if args.quick else 2_000_000)
    args.dim = args.dim or (64 if args.quick else 512)
    args.budget = parse_memory(args.budget or ("1M" if args.quick else "512M"))
    return args


def run(args: argparse.Namespace, folder: Path) -> dict:
    n, d = args.n, args.dim
    plan = plan_storage("flat", n, d, args.budget)
    print_plan(n, d, args.budget, plan)
    if plan["storage"] != "ondisk":
        raise SystemExit("the rows fit the budget: give a smaller --budget or a larger --n")
    files = DiskFiles.named(folder, "bench")
    loads = {}
    with BackgroundLoad() as load:
        built = build(files, n, d, plan, args.seed)
    loads["build"] = load.cores
    print_build(built)
    queries = clustered(args.queries, d, args.seed + 2, *space(d, args.seed), dtype=np.float32)
    truth = exact_top(np.load(files.rows, mmap_mode="r"), queries)
    results = {}
    with BackgroundLoad() as load:
        results["on disk"] = measure_ondisk(files, queries, truth, args.batch)
        if args.memory:
            results["in memory"] = measure_memory(files, queries, truth, args.batch)
    loads["queries"] = load.cores
    print_summary(results, args.batch)
    return {"n": n, "dim": d, "budget": args.budget, "plan": plan, "build": built,
            "results": results, "other_load_cores": loads}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/bench_ondisk.py " + shlex.join(sys.argv[1:] if argv is None
                                                               else argv)
    print_header(args)
    folder = args.dir or Path(tempfile.mkdtemp(prefix="bench-ondisk-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        report = run(args, folder)
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    print("  other processes' CPU use (cores, average): "
          + ", ".join(f"{k} {fmt_load(v)}" for k, v in report["other_load_cores"].items()))
    if any(v is not None and v > 0.1 for v in report["other_load_cores"].values()):
        print("WARNING: other processes used CPU during the run; timings are disturbed")
    print(f"\ncommand: {command}")
    if args.json:
        write_json(args.json, {**report, "command": command, "cpu": cpu_name()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load test of the search server on loopback: throughput and latency per endpoint.

The server runs in its own process (``clipforge.search.server.serve``, uvicorn, one worker),
so its CPU time and GIL are not shared with the clients.  The clients are threads of this
process, each with its own keep-alive ``httpx.Client``, each sending ``--requests`` requests
one after another, drawn from a fixed mix:

* 40% text search (``GET /api/search``, k=20, one of a dozen queries),
* 25% "more like this" (``GET /api/items/{id}/similar``, k=20),
* 25% thumbnails (``GET /thumbnails/{id}``: the first request for an id renders it, the next
  ones come from the server's LRU cache),
* 10% image search (``POST /api/search/image`` with one of the indexed photos).

Every response must be 200: any other status or a transport error is counted as an error and
the script exits 1.  Without ``--index`` it builds an index first (scikit-image sample photos
plus flipped, rotated and cropped variants, ``--images`` in all) with a randomly initialised
``--model`` (tiny-vit by default; ViT-B-32 gives realistic model costs), saved to a file so
that the server process loads the same weights.

    python benchmarks/bench_serve.py [--model ViT-B-32] [--clients 16] [--requests 25]
                                     [--images 64] [--index DIR] [--no-batching] [--json PATH]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from PIL import Image, ImageOps

import clipforge
from clipforge.samples import write_sample_photos
from clipforge.search import SearchIndex, build_index
from machine import cpu_name
from report import write_json

QUERIES = ["a cat", "a dog on a beach", "a rocket on a launchpad", "a cup of coffee",
           "an astronaut", "a red motorcycle", "a horse", "a page of text", "a camera",
           "a photo of a person", "something blue", "a black and white picture"]
MIX = [("search", 40), ("similar", 25), ("thumbnail", 25), ("image", 10)]
SERVER = """
import sys
from clipforge.search import SearchIndex
from clipforge.search.server import serve
serve(SearchIndex.open(sys.argv[1]), port=int(sys.argv[2]), log_level="warning",
      batch_texts=sys.argv[3] == "1", max_client_requests=None)
"""  # every client is on 127.0.0.1: no per-address limit, or most would be told 429


# ------------------------------------------------------------------------------- setup
def variants(photo: Path) -> list[Image.Image]:
    """Eight different images from one photo, so that the index is larger than the samples."""
    image = Image.open(photo).convert("RGB")
    w, h = image.size
    return [image, ImageOps.mirror(image), image.rotate(90, expand=True), ImageOps.flip(image),
            image.crop((0, 0, w // 2, h)), image.crop((w // 2, 0, w, h)),
            ImageOps.autocontrast(image.crop((w // 4, h // 4, 3 * w // 4, 3 * h // 4))),
            ImageOps.grayscale(image).convert("RGB")]


def build_sample_index(work: Path, model_name: str, images: int) -> Path:
    """Sample photos and variants in ``work/photos``, the model in ``work/model.safetensors``,
    the index in ``work/index`` (built with the model loaded back from that file, so that the
    index records a loadable model)."""
    photos = write_sample_photos(work / "samples")
    folder = work / "photos"
    folder.mkdir()
    written = 0
    for round_ in range(8):
        for photo in photos:
            if written == images:
                break
            variants(photo)[round_].save(folder / f"{photo.stem}-{round_}.jpg", quality=90)
            written += 1
    torch.manual_seed(0)
    model_file = work / "model.safetensors"
    clipforge.save_model(clipforge.create_model(model_name), model_file)
    start = time.perf_counter()
    build_index(folder, work / "index", clipforge.create_model(model_file), progress=False)
    print(f"built an index of {written} images with random-weight {model_name} in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return work / "index"


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, port: int, batch_texts: bool,
                 timeout: float = 120.0) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(index), str(port),
                                str(int(batch_texts))])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.terminate()
    raise SystemExit("the server did not answer /healthz in time")


# -------------------------------------------------------------------------------- load
def client(base: str, seed: int, requests: int, ids: list[int], photos: list[bytes],
           records: list[tuple[str, float, int | str]]) -> None:
    """One client: ``requests`` requests in a row; appends (endpoint, seconds, status)."""
    rng = random.Random(seed)
    kinds, weights = zip(*MIX)
    with httpx.Client(base_url=base, timeout=120) as http:
        for _ in range(requests):
            kind = rng.choices(kinds, weights)[0]
            start = time.perf_counter()
            try:
                if kind == "search":
                    r = http.get("/api/search", params={"q": rng.choice(QUERIES), "k": 20})
                elif kind == "similar":
                    r = http.get(f"/api/items/{rng.choice(ids)}/similar", params={"k": 20})
                elif kind == "thumbnail":
                    r = http.get(f"/thumbnails/{rng.choice(ids)}")
                else:
                    r = http.post("/api/search/image", data={"k": "20"},
                                  files={"file": ("q.jpg", rng.choice(photos))})
                status: int | str = r.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            records.append((kind, time.perf_counter() - start, status))


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    rank = max(1, round(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def run_load(base: str, clients: int, requests: int, ids: list[int],
             photos: list[bytes]) -> tuple[list[tuple[str, float, int | str]], float]:
    records: list[tuple[str, float, int | str]] = []
    threads = [threading.Thread(target=client, args=(base, seed, requests, ids, photos, records))
               for seed in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records, time.perf_counter() - start


def summarise(records: list[tuple[str, float, int | str]], wall: float) -> dict:
    rows = {}
    for kind in [k for k, _ in MIX] + ["all"]:
        mine = [r for r in records if kind in ("all", r[0])]
        if not mine:
            continue
        ms = sorted(1000 * seconds for _, seconds, _ in mine)
        rows[kind] = {"requests": len(mine), "errors": sum(s != 200 for *_, s in mine),
                      "per_s": len(mine) / wall, "mean_ms": statistics.fmean(ms),
                      "p50_ms": percentile(ms, 50), "p90_ms": percentile(ms, 90),
                      "p99_ms": percentile(ms, 99), "max_ms": ms[-1]}
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, help="an existing index whose model it records "
                        "(default: build one of the sample photos)")
    parser.add_argument("--model", default="tiny-vit", help="architecture for the built index, "
                        "randomly initialised (default tiny-vit; e.g. ViT-B-32)")
    parser.add_argument("--images", type=int, default=64, help="images in the built index")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=25, help="requests per client")
    parser.add_argument("--no-batching", action="store_true", help="embed each text query "
                        "alone (create_app(batch_texts=False)), to measure what batching gives")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/bench_serve.py",
                                                              *sys.argv[1:]])

    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        index_dir = args.index or build_sample_index(Path(tmp), args.model, args.images)
        index = SearchIndex.open(index_dir)  # the ids and photos the clients will ask for
        ids = [h.id for h in index.search(text="a photo", k=min(1000, len(index)))]
        photos = [jpeg(index.open_image(i)) for i in ids[:8]]
        model = index.info["model"] if args.index else f"{args.model} (random weights)"
        port = free_port()
        server = start_server(index_dir, port, not args.no_batching)
        try:
            base = f"http://127.0.0.1:{port}"
            run_load(base, 2, 5, ids, photos)  # warm-up: first model calls, allocator
            records, wall = run_load(base, args.clients, args.requests, ids, photos)
        finally:
            server.terminate()
            server.wait(30)

    rows = summarise(records, wall)
    print(f"$ {command}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"index: {len(ids)} items, model {model}; {args.clients} clients x {args.requests} "
          f"requests; text batching {'off' if args.no_batching else 'on'}; wall {wall:.2f} s")
    print(f"{'endpoint':<10} {'requests':>8} {'errors':>6} {'req/s':>7} {'mean':>7} {'p50':>7} "
          f"{'p90':>7} {'p99':>7} {'max':>7}   (ms)")
    for kind, r in rows.items():
        print(f"{kind:<10} {r['requests']:>8} {r['errors']:>6} {r['per_s']:>7.1f} "
              f"{r['mean_ms']:>7.1f} {r['p50_ms']:>7.1f} {r['p90_ms']:>7.1f} "
              f"{r['p99_ms']:>7.1f} {r['max_ms']:>7.1f}")
    failures = sorted({str(s) for *_, s in records if s != 200})
    if failures:
        print(f"errors: {', '.join(failures)}")
    if args.json:
        write_json(args.json, {"command": command, "items": len(ids), "model": model,
                               "clients": args.clients, "requests": args.requests,
                               "wall_s": wall, "endpoints": rows})
    return 1 if rows["all"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

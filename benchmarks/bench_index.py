"""End-to-end indexing throughput: files on disk to a searchable index, on this machine's CPU.

Two collections: scikit-image's sample photos (copied to ``--photos`` files, 300-512 px PNGs and
a JPEG) and generated camera-size JPEGs (``--camera`` files of 4032 x 3024, smooth random
content at quality 90, about the size of a phone photo).  Each is indexed with ViT-B-32
(random weights: the cost does not depend on the values) by:

* ``clipforge index build`` (``build_index``): decode + resize + encode + SQLite commit, with
  ``--workers`` decoding processes (0 = decode in the main process), and with ``--fast-decode``
  (JPEG draft mode) at the largest worker count;
* the peer, the loop people write with Hugging Face ``transformers``: PIL ``Image.open``,
  ``CLIPImageProcessor`` and ``CLIPModel.get_image_features`` in batches of 32, keeping the
  vectors in memory (no storage at all), on the same weights.

Both use torch's default thread count.  Figures are images per second over the whole run
(fresh index each time; no warm cache beyond the OS's file cache, which a first untimed read
fills for both).

    python benchmarks/bench_index.py [--model ViT-B-32] [--photos 64] [--camera 48]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import clipforge
from clipforge.data.sources import open_image_file
from clipforge.samples import write_sample_photos
from clipforge.search import build_index
from machine import cpu_name


def sample_photos(directory: Path, count: int) -> list[Path]:
    originals = write_sample_photos(directory / "originals")
    paths = []
    for i in range(count):
        source = originals[i % len(originals)]
        target = directory / f"{i:04d}-{source.name}"
        shutil.copy(source, target)
        paths.append(target)
    shutil.rmtree(directory / "originals")
    return paths


def camera_jpegs(directory: Path, count: int, size: tuple[int, int] = (4032, 3024)) -> list[Path]:
    """Smooth random colour fields (upsampled noise plus fine grain), which JPEG-compress to
    roughly what a 12-megapixel phone photo weighs."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        coarse = rng.integers(0, 256, (size[1] // 64, size[0] // 64, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
        grain = rng.integers(-12, 13, (size[1], size[0], 3), dtype=np.int16)
        pixels = np.clip(np.asarray(image, np.int16) + grain, 0, 255).astype(np.uint8)
        path = directory / f"IMG_{i:04d}.jpg"
        Image.fromarray(pixels).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def run_clipforge(model: clipforge.CLIP, folder: Path, workers: int, fast: bool = False) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        report = build_index(folder, Path(out) / "index", model, batch_size=32,
                             num_workers=workers, progress=False, fast_decode=fast)
        seconds = time.perf_counter() - start
    assert report.total == len(list(folder.iterdir())), report.failures
    return report.total / seconds


def run_transformers(hf_model, processor, paths: list[Path]) -> float:
    start = time.perf_counter()
    vectors = []
    with torch.inference_mode():
        for i in range(0, len(paths), 32):
            images = [Image.open(p).convert("RGB") for p in paths[i:i + 32]]
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            out = hf_model.get_image_features(pixel_values=pixels)
            out = out if torch.is_tensor(out) else out.pooler_output
            vectors.append(torch.nn.functional.normalize(out, dim=-1))
    return len(paths) / (time.perf_counter() - start)


def decode_cost(model: clipforge.CLIP, paths: list[Path]) -> dict[str, float]:
    """Decode + preprocess time per image (one process), exact and with draft-mode decoding,
    and how far the fast path's pixels and embeddings are from the exact ones."""
    out: dict[str, float] = {}
    pixels = {}
    for name, draft in (("exact", None), ("fast", model.preprocess.image_size)):
        start = time.perf_counter()
        pixels[name] = torch.stack([model.preprocess(open_image_file(p, draft)) for p in paths])
        out[f"{name}_ms"] = 1000 * (time.perf_counter() - start) / len(paths)
    with torch.inference_mode():
        a, b = (torch.nn.functional.normalize(model.encode_image(pixels[n]), dim=-1)
                for n in ("exact", "fast"))
    cosine = (a * b).sum(-1)
    out["cos_mean"], out["cos_min"] = cosine.mean().item(), cosine.min().item()
    out["pixel_mean_abs"] = (pixels["exact"] - pixels["fast"]).abs().mean().item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--photos", type=int, default=64)
    parser.add_argument("--camera", type=int, default=48)
    parser.add_argument("--workers", default="0,2", help="decoding processes to try")
    args = parser.parse_args()

    from transformers import CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    model = clipforge.create_model(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clipforge.save_model(model, tmp / "hf", format="hf")
        hf_model = CLIPModel.from_pretrained(tmp / "hf").eval()
        size = model.config.image_size
        processor = CLIPImageProcessor(size={"shortest_edge": size},
                                       crop_size={"height": size, "width": size})
        sets = {}
        costs: dict[str, dict[str, float]] = {}
        (tmp / "photos").mkdir()
        sets["scikit-image photos"] = sample_photos(tmp / "photos", args.photos)
        (tmp / "camera").mkdir()
        print(f"writing {args.camera} camera-size JPEGs...", flush=True)
        sets["4032x3024 JPEGs"] = camera_jpegs(tmp / "camera", args.camera)
        for name, paths in sets.items():
            folder = paths[0].parent
            megabytes = sum(p.stat().st_size for p in paths) / len(paths) / 2**20
            for p in paths:  # fill the OS file cache for both contenders alike
                p.read_bytes()
            peer = run_transformers(hf_model, processor, paths)
            for workers in map(int, args.workers.split(",")):
                ours = run_clipforge(model, folder, workers)
                rows.append((name, f"{megabytes:.2f}", f"clipforge, {workers} workers",
                             f"{ours:.1f}"))
            fast_workers = max(map(int, args.workers.split(",")))
            ours = run_clipforge(model, folder, fast_workers, fast=True)
            rows.append((name, f"{megabytes:.2f}",
                         f"clipforge, {fast_workers} workers, --fast-decode", f"{ours:.1f}"))
            costs[name] = decode_cost(model, paths[:16])
            rows.append((name, f"{megabytes:.2f}", "transformers loop (no storage)",
                         f"{peer:.1f}"))
            print(f"{name}: done", flush=True)

    print(f"\n{args.model}, {os.cpu_count()} CPUs ({cpu_name()}), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    header = ("collection", "MB/file", "pipeline", "images/s")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    for row in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print("\ndecode + preprocess per image (one process), exact vs --fast-decode (draft mode):")
    for name, c in costs.items():
        print(f"  {name}: {c['exact_ms']:.1f} ms vs {c['fast_ms']:.1f} ms; pixels mean |diff| "
              f"{c['pixel_mean_abs']:.4f} (normalised units); embedding cosine to exact: mean "
              f"{c['cos_mean']:.6f}, min {c['cos_min']:.6f}")
    print("\ncommand: python benchmarks/bench_index.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items()))


if __name__ == "__main__":
    main()

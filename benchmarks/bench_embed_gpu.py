"""Image-embedding throughput on one accelerator (or, as a smoke test, the CPU): the figure that
docs/scale-plan.md needs and that no GPU was available to measure.

For each precision and batch size, two figures in images/s:

* ``model``: ``encode_image`` on preprocessed pixels already on the device: the accelerator's
  ceiling for this model, with no decoding at all;
* ``embed_images``: :func:`clipforge.inference.embed_images`, the one embedding path that
  ``clipforge embed --shards`` runs, on generated JPEG files of ``--image-px`` pixels (the size
  img2dataset shards are usually resized to), decoded and preprocessed by ``--workers``
  DataLoader processes.  When it is well below ``model``, decoding is the limit: add CPU cores.

Precisions: ``fp32``; ``bf16`` (``create_model(precision="bf16")``, what ``--precision bf16``
runs); ``autocast-fp16`` / ``autocast-bf16`` (float32 weights under ``torch.autocast``).  The
weights are random (the cost does not depend on their values), so no download is needed.  Each
figure is the median of ``--repeats`` timed runs after a warm-up run.  The last column converts
the best ``embed_images`` figure into GPU-hours for 1e9 images.

    python benchmarks/bench_embed_gpu.py --device cuda --model ViT-L-14 --workers 8
    python benchmarks/bench_embed_gpu.py --quick          # CPU smoke test, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import clipforge
from clipforge.inference import embed_images
from machine import cpu_name
from report import write_json

TARGET = 1e9  # images in docs/scale-plan.md
PRECISIONS = ("fp32", "bf16", "autocast-fp16", "autocast-bf16")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with its core count."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return f"{cpu_name()} ({os.cpu_count()} logical cores)"


def write_jpegs(directory: Path, count: int, px: int) -> list[Path]:
    """``count`` distinct JPEGs of ``px`` x ``px`` (smooth noise, quality 90): decoding cost
    close to a resized web photo's."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        coarse = rng.integers(0, 256, (px // 16, px // 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((px, px), Image.BILINEAR)
        paths.append(directory / f"{i:06d}.jpg")
        image.save(paths[-1], quality=90)
    return paths


def load(name: str, precision: str, device: torch.device) -> clipforge.CLIP:
    """The model for ``precision``: bf16 converts the weights; autocast keeps float32 ones."""
    kind = "bf16" if precision == "bf16" else "fp32"
    return clipforge.create_model(name, device=device, precision=kind)


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    if precision.startswith("autocast-"):
        dtype = torch.float16 if precision.endswith("fp16") else torch.bfloat16
        with torch.autocast(device.type, dtype=dtype):
            yield
    else:
        yield


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(run: Callable[[], int], device: torch.device, repeats: int) -> float:
    """Median items/s of ``repeats`` timed calls of ``run`` (which returns its item count),
    after one untimed call."""
    run()
    sync(device)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        count = run()
        sync(device)
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def model_rate(model: clipforge.CLIP, batch: int, steps: int, device: torch.device,
               repeats: int) -> float:
    """encode_image on ready pixels: ``steps`` batches per timed call."""
    size = model.preprocess.image_size
    pixels = torch.randn(batch, 3, size, size, device=device)

    def run() -> int:
        with torch.inference_mode():
            for _ in range(steps):
                model.encode_image(pixels)
        return batch * steps

    return rate(run, device, repeats)


def pipeline_rate(model: clipforge.CLIP, paths: list[Path], batch: int, workers: int,
                  device: torch.device, repeats: int) -> float:
    """embed_images over the files (DataLoader start-up included, as in every call)."""
    def run() -> int:
        return len(embed_images(model, paths, batch_size=batch, num_workers=workers,
                                progress=False).ids)

    return rate(run, device, repeats)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="64,128,256,512")
    parser.add_argument("--precisions", help=f"comma-separated, of {', '.join(PRECISIONS)} "
                        "(default: all on cuda; fp32,bf16,autocast-bf16 on cpu)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="decoding processes for embed_images")
    parser.add_argument("--images", type=int, default=4096, help="generated JPEG files")
    parser.add_argument("--image-px", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="batches per timed model call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny-vit, small batches, 64 images, 1 repeat")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.model, args.batch_sizes, args.images, args.steps, args.repeats = (
            "tiny-vit", "8,16", 64, 4, 1)
        args.workers = min(args.workers, 2)
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    precisions = (args.precisions.split(",") if args.precisions else
                  list(PRECISIONS) if device.type == "cuda"
                  else ["fp32", "bf16", "autocast-bf16"])
    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        raise SystemExit(f"unknown precision(s) {sorted(unknown)}; choose from {PRECISIONS}")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    print(f"clipforge image-embedding throughput, {args.model} (random weights)")
    print(f"  device: {device_name(device)}")
    print(f"  host cpu: {cpu_name()} ({os.cpu_count()} logical cores), torch {torch.__version__}"
          f", python {platform.python_version()}")
    print(f"  embed_images: {args.images} JPEGs of {args.image_px} px, {args.workers} workers")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.images, args.image_px)
        print(f"\n{'precision':<14} {'batch':>6} {'model img/s':>12} {'embed_images img/s':>19}"
              f" {'device-h per 1e9':>14}")
        for precision in precisions:
            model = load(args.model, precision, device)
            for batch in batches:
                with autocast(precision, device):
                    bare = model_rate(model, batch, args.steps, device, args.repeats)
                    full = pipeline_rate(model, paths, batch, args.workers, device, args.repeats)
                hours = TARGET / full / 3600
                rows.append({"precision": precision, "batch": batch, "model": round(bare, 1),
                             "embed_images": round(full, 1), "hours_per_1e9": round(hours, 1)})
                print(f"{precision:<14} {batch:>6} {bare:>12.1f} {full:>19.1f} {hours:>14.0f}",
                      flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    best = max(rows, key=lambda r: r["embed_images"])
    print(f"\nbest: {best['precision']} at batch {best['batch']}: {best['embed_images']} "
          f"images/s through embed_images = {best['hours_per_1e9']} device-hours per 1e9 "
          f"images (the plan's budget: 1,000, i.e. 278 images/s)")
    if args.json:
        write_json(args.json, {"model": args.model, "device": device_name(device),
                               "host_cpu": cpu_name(), "cores": os.cpu_count(),
                               "workers": args.workers, "image_px": args.image_px,
                               "images": args.images, "torch": torch.__version__,
                               "rows": rows})


if __name__ == "__main__":
    main()

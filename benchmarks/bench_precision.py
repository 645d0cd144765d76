"""Inference precisions on CPU: accuracy against float32 and throughput of fp32, bf16 and int8.

``clipforge.create_model(..., precision=...)`` converts a float32 model for inference (see
``clipforge/precision.py``).  This script measures, for each mode, what that costs in accuracy
and what it buys in speed, in one process, with torch's default thread count:

* **Accuracy** (cosine of each unit embedding with the float32 one, mean and minimum):
  ViT-B-32 and RN50 (random weights with noise on every parameter, so that no branch is
  an identity, or trained weights with ``--weights``) on ``--images`` images: scikit-image's
  bundled photos under random crops, flips, rotations and colour changes, and built-in
  synthetic scenes, half each; and ``--captions`` captions: ImageNet prompts (OpenAI's class
  names and templates) and detailed synthetic captions, half each.
* **Zero-shot agreement** on trained checkpoints (``--trained``, default ``runs/first-run``,
  the small-rn that ``make demo`` trains): the built-in dataset's zero-shot evaluation (48
  colour-shape classes, seen and held-out compositions, as ``clipforge train`` reports it); for
  each mode its top-1 accuracy and the share of images whose top-1 class equals float32's,
  plus the embedding cosines on those images and on the dataset's captions.
* **Throughput**: images/s and captions/s at batch 1 (median of ``--repeats`` interleaved calls
  after warm-up) and at batch 32 (the median batch of the accuracy pass above, where the modes
  run the same batch one after another, their order rotating, so drift hits them alike).
  Captions are pre-tokenized; images pre-processed.

The machine's load average (``os.getloadavg``) and the CPU used by other processes during the
timings (``others``, cores, from ``/proc/stat``) are printed beside the figures: on a 2-core
machine anything above ~0.1 cores disturbs them.  A default run takes about 10 minutes on
2 Zen 4 cores; ``--quick`` is a smoke run (tiny models, a few inputs) in seconds.

    python benchmarks/bench_precision.py [--models ViT-B-32,RN50] [--images 2048]
        [--rn50-images 1024] [--captions 2048] [--trained DIR ...] [--weights TAG]
        [--repeats 15] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

import clipforge
from bench_embed import BackgroundLoad, fmt_load, measure, summary
from clipforge.configs import get_config
from clipforge.data import synthetic
from clipforge.evaluation import ZeroShotClassifier
from clipforge.precision import PRECISIONS, apply_precision
from clipforge.prompts import IMAGENET_CLASSNAMES, IMAGENET_TEMPLATES
from clipforge.samples import SAMPLE_PHOTOS
from machine import cpu_name
from report import write_json

BATCH = 32
TARGETS = {"bf16": 0.999, "int8": 0.995}  # mean cosine to float32
AGREEMENT_TARGET = 0.99
BATCH1_PROMPT = "a photo of a golden retriever."


# ----------------------------------------------------------------------------------- inputs
def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
    """Noise on every parameter and float buffer (as the tests' ``perturb``): a randomly
    initialised ResNet has zeroed last batch norms (identity blocks) and fresh statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen) * scale
            if name.endswith("running_var"):
                tensor.copy_((tensor + noise).abs() + 0.5)
            else:
                tensor.add_(noise)
    return model


def sample_photos() -> list[Image.Image]:
    bundled = resources.files("skimage.data")
    photos = []
    for name in SAMPLE_PHOTOS:
        source = next(f for f in bundled.iterdir() if f.name.rsplit(".", 1)[0] == name)
        with source.open("rb") as handle:
            photos.append(Image.open(handle).convert("RGB"))
    return photos


def augmented(photo: Image.Image, rng: random.Random) -> Image.Image:
    """A random view of a photo: crop (8-100 % of the area), flip, small rotation, colour."""
    w, h = photo.size
    area = rng.uniform(0.08, 1.0) * w * h
    aspect = rng.uniform(3 / 4, 4 / 3)
    cw = max(16, min(w, int(round((area * aspect) ** 0.5))))
    ch = max(16, min(h, int(round((area / aspect) ** 0.5))))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    image = photo.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    if rng.random() < 0.3:
        image = image.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(rng.uniform(0.6, 1.4))
    return image


def image_batches(preprocess, n: int, size: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """``n`` preprocessed images in batches of BATCH: augmented photos and synthetic scenes
    alternating; deterministic for a seed."""
    photos = sample_photos()
    rng = random.Random(seed)
    for start in range(0, n, BATCH):
        images = []
        for i in range(start, min(n, start + BATCH)):
            if i % 2 == 0:
                images.append(augmented(photos[rng.randrange(len(photos))], rng))
            else:
                images.append(synthetic.render_scene(i, seed=seed, image_size=size).image)
        yield torch.stack([preprocess(image) for image in images])


def captions(n: int, seed: int = 0) -> list[str]:
    """ImageNet prompts (random class, random template) and detailed synthetic captions."""
    rng = random.Random(seed)
    prompts = [rng.choice(IMAGENET_TEMPLATES).format(rng.choice(IMAGENET_CLASSNAMES))
               for _ in range(n - n // 2)]
    _, scene_captions = synthetic.retrieval_set(n // 2, seed=seed, image_size=32)
    mixed = prompts + scene_captions
    rng.shuffle(mixed)
    return mixed


# ---------------------------------------------------------------------------------- helpers
def cosine_stats(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    cos = F.cosine_similarity(got.double(), want.double(), dim=-1)
    return {"mean": cos.mean().item(), "min": cos.min().item(),
            "p01": torch.quantile(cos, 0.001).item(), "n": len(cos)}


def rotating(modes: list[str], i: int) -> list[str]:
    k = i % len(modes)
    return modes[k:] + modes[:k]


def build(name: str, weights: str | None, modes: list[str]) -> dict[str, clipforge.CLIP]:
    """One model per mode from the same float32 weights (noise added before conversion)."""
    models = {}
    for mode in modes:
        if weights:
            model = clipforge.create_model(name, weights=weights)
        else:
            torch.manual_seed(0)
            model = perturb(clipforge.create_model(name))
        models[mode] = apply_precision(model, mode)
    return models


@torch.inference_mode()
def run_pass(models: dict[str, clipforge.CLIP], batches: Iterator[torch.Tensor], encode: str
             ) -> tuple[dict[str, torch.Tensor], dict[str, list[float]], float | None]:
    """Embed every batch with every mode (order rotating per batch): unit embeddings, seconds
    per full batch after the first, and the other processes' load during the pass."""
    modes = list(models)
    out: dict[str, list[torch.Tensor]] = {m: [] for m in modes}
    times: dict[str, list[float]] = {m: [] for m in modes}
    load_cores: list[float] = []
    for i, batch in enumerate(batches):
        with BackgroundLoad() as load:
            for mode in rotating(modes, i):
                t0 = time.perf_counter()
                vectors = getattr(models[mode], encode)(batch)
                seconds = time.perf_counter() - t0
                # the first batch warms up (allocations, oneDNN kernels); partial ones differ
                if i > 0 and len(batch) == BATCH:
                    times[mode].append(seconds)
                out[mode].append(F.normalize(vectors.float(), dim=-1))
        if load.cores is not None and i > 0:
            load_cores.append(load.cores)
    cores = statistics.mean(load_cores) if load_cores else None
    return {m: torch.cat(v) for m, v in out.items()}, times, cores


def token_batches(texts: list[str]) -> list[torch.Tensor]:
    tokens = clipforge.tokenize(texts, truncate=True)
    return [tokens[i:i + BATCH] for i in range(0, len(tokens), BATCH)]


# --------------------------------------------------------------------------------- sections
def architecture(name: str, weights: str | None, n_images: int, n_captions: int,
                 repeats: int, modes: list[str]) -> dict:
    print(f"\n== {name} ({weights or 'random weights + noise'}): {n_images} images, "
          f"{n_captions} captions", flush=True)
    started = time.perf_counter()
    models = build(name, weights, modes)
    size = models["fp32"].config.image_size
    image_emb, image_times, image_load = run_pass(
        models, image_batches(models["fp32"].preprocess, n_images, size), "encode_image")
    texts = captions(n_captions)
    text_emb, text_times, text_load = run_pass(models, iter(token_batches(texts)),
                                               "encode_text")
    one_image = next(image_batches(models["fp32"].preprocess, 1, size, seed=1))
    one_text = clipforge.tokenize([BATCH1_PROMPT])
    with torch.inference_mode():
        b1_image, b1_image_load = measure(
            {m: (lambda m=m: models[m].encode_image(one_image)) for m in modes}, 2, repeats)
        b1_text, b1_text_load = measure(
            {m: (lambda m=m: models[m].encode_text(one_text)) for m in modes}, 2, repeats)
    result: dict = {"weights": weights or "random+noise", "images": n_images,
                    "captions": n_captions, "accuracy": {}, "throughput": {},
                    "others_cores": {"images_b32": image_load, "captions_b32": text_load,
                                     "images_b1": b1_image_load, "captions_b1": b1_text_load}}
    for mode in modes:
        result["throughput"][mode] = {
            "images_b1": summary(b1_image[mode], 1),
            "images_b32": summary(image_times[mode], BATCH),
            "captions_b1": summary(b1_text[mode], 1),
            "captions_b32": summary(text_times[mode], BATCH),
        }
        if mode != "fp32":
            result["accuracy"][mode] = {
                "images": cosine_stats(image_emb[mode], image_emb["fp32"]),
                "captions": cosine_stats(text_emb[mode], text_emb["fp32"]),
            }
    result["seconds"] = time.perf_counter() - started
    return result


@torch.inference_mode()
def trained(path: str, n_per_split: int, n_captions: int, modes: list[str]) -> dict:
    """Zero-shot top-1 agreement with float32 on the built-in dataset, and cosines."""
    print(f"\n== trained checkpoint {path}: zero-shot on the built-in dataset", flush=True)
    started = time.perf_counter()
    models = {m: clipforge.create_model(path, precision=m) for m in modes}
    size = models["fp32"].config.image_size
    classifiers = {m: ZeroShotClassifier.build(models[m], synthetic.CLASSNAMES,
                                               synthetic.TEMPLATES) for m in modes}
    result: dict = {"model": path, "config_image_size": size, "splits": {}, "accuracy": {}}
    all_images: dict[str, list[torch.Tensor]] = {m: [] for m in modes}
    for split in ("seen_eval", "heldout"):
        images, labels = synthetic.zero_shot_set(split, n_per_split, seed=0, image_size=size)
        truth = torch.tensor(labels)
        pixels = torch.stack([models["fp32"].preprocess(im) for im in images])
        predictions, split_result = {}, {"n": len(labels)}
        for m in modes:
            emb = torch.cat([models[m].encode_image(pixels[i:i + 256])
                             for i in range(0, len(pixels), 256)])
            all_images[m].append(F.normalize(emb.float(), dim=-1))
            predictions[m] = classifiers[m].logits(emb.float()).argmax(dim=-1)
            split_result[m] = {"top1": (predictions[m] == truth).float().mean().item()}
            if m != "fp32":
                split_result[m]["agreement"] = (
                    (predictions[m] == predictions["fp32"]).float().mean().item())
        result["splits"][split] = split_result
    _, scene_captions = synthetic.retrieval_set(n_captions, seed=0, image_size=32)
    text = {m: torch.cat([F.normalize(models[m].encode_text(t).float(), dim=-1)
                          for t in token_batches(scene_captions)]) for m in modes}
    for m in modes:
        if m != "fp32":
            result["accuracy"][m] = {
                "images": cosine_stats(torch.cat(all_images[m]), torch.cat(all_images["fp32"])),
                "captions": cosine_stats(text[m], text["fp32"]),
            }
    result["seconds"] = time.perf_counter() - started
    return result


# ----------------------------------------------------------------------------------- report
def print_accuracy(rows: list[tuple[str, str, dict]], modes: list[str]) -> None:
    print("\nAccuracy against fp32: cosine of each embedding with its fp32 embedding "
          "(targets: mean >= " + ", ".join(f"{TARGETS[m]} {m}" for m in modes if m != "fp32")
          + ")")
    header = f"  {'model':<22} | {'input':<8} | {'n':>5}"
    for m in modes:
        if m != "fp32":
            header += f" | {m + ' mean':>10} | {m + ' min':>9}"
    print(header)
    print("  " + "-" * (len(header) - 2))
    for label, kind, acc in rows:
        line = f"  {label:<22} | {kind:<8} | {next(iter(acc.values()))[kind]['n']:>5}"
        for m in modes:
            if m != "fp32":
                stats = acc[m][kind]
                flag = "" if stats["mean"] >= TARGETS[m] else "!"
                line += f" | {stats['mean']:>9.6f}{flag or ' '} | {stats['min']:>9.6f}"
        print(line)


def print_zero_shot(result: dict, modes: list[str]) -> None:
    print(f"\nZero-shot on the built-in dataset (48 classes), {result['model']}: top-1 and "
          f"agreement of top-1 decisions with fp32 (target >= {AGREEMENT_TARGET:.0%})")
    header = f"  {'split':<10} | {'n':>5}" + "".join(
        f" | {m + ' top-1':>11}" + (f" | {m + ' agrees':>11}" if m != "fp32" else "")
        for m in modes)
    print(header)
    print("  " + "-" * (len(header) - 2))
    for split, res in result["splits"].items():
        line = f"  {split:<10} | {res['n']:>5}"
        for m in modes:
            line += f" | {100 * res[m]['top1']:>10.2f}%"
            if m != "fp32":
                line += f" | {100 * res[m]['agreement']:>10.2f}%"
        print(line)


def print_throughput(results: dict[str, dict], modes: list[str]) -> None:
    print("\nThroughput (median; x = speed-up over fp32 for the same model and input; "
          "others = CPU cores used by other processes meanwhile)")
    header = (f"  {'model':<10} | {'mode':<5} | {'img/s b1':>9} | {'img/s b32':>9} | "
              f"{'x b32':>5} | {'cap/s b1':>9} | {'cap/s b32':>9} | {'x b32':>5}")
    print(header)
    print("  " + "-" * (len(header) - 2))
    for name, res in results.items():
        thr = res["throughput"]
        for m in modes:
            t = thr[m]
            print(f"  {name:<10} | {m:<5} | {t['images_b1']['per_s']:>9.2f} | "
                  f"{t['images_b32']['per_s']:>9.2f} | "
                  f"{t['images_b32']['per_s'] / thr['fp32']['images_b32']['per_s']:>4.2f}x | "
                  f"{t['captions_b1']['per_s']:>9.1f} | {t['captions_b32']['per_s']:>9.1f} | "
                  f"{t['captions_b32']['per_s'] / thr['fp32']['captions_b32']['per_s']:>4.2f}x")
        others = res["others_cores"]
        print(f"  {'':<10}   others: " + ", ".join(f"{k} {fmt_load(v)}"
                                                    for k, v in others.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="ViT-B-32,RN50")
    parser.add_argument("--weights", default=None,
                        help="pretrained tag for --models (e.g. openai; needs the weights in "
                             "the local cache or network); default: random weights + noise")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--rn50-images", type=int, default=1024,
                        help="images for ResNet models (float32 RN50 is the slowest pass)")
    parser.add_argument("--captions", type=int, default=2048)
    parser.add_argument("--trained", nargs="*", default=None,
                        help="trained checkpoints for the zero-shot agreement "
                             "(default: runs/first-run when it exists)")
    parser.add_argument("--zero-shot-images", type=int, default=1200,
                        help="images per split (seen, held-out) for the zero-shot check")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny models")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    if args.quick:
        args.models, args.images, args.rn50_images, args.captions = "tiny-vit,tiny-rn", 64, 64, 64
        args.zero_shot_images, args.repeats = 80, 3
    trained_paths = args.trained
    if trained_paths is None:
        default = Path(__file__).resolve().parents[1] / "runs" / "first-run"
        trained_paths = [str(default)] if default.exists() else []
    modes = list(PRECISIONS)
    load_start = os.getloadavg()
    started = time.perf_counter()
    print("clipforge inference precisions: accuracy against fp32 and throughput, CPU")
    print(f"  cpu: {cpu_name()} ({os.cpu_count()} logical cores), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, python {platform.python_version()}")
    print("  load average at start (1/5/15 min): "
          + " ".join(f"{x:.2f}" for x in load_start))

    results: dict[str, dict] = {}
    for name in args.models.split(","):
        is_resnet = get_config(name).vision.patch_size is None
        n_images = args.rn50_images if is_resnet else args.images
        results[name] = architecture(name, args.weights, n_images, args.captions,
                                     args.repeats, modes)
    zero_shot = [trained(p, args.zero_shot_images, min(args.captions, 1000), modes)
                 for p in trained_paths]
    load_end = os.getloadavg()

    rows = []
    for name, res in results.items():
        label = f"{name} ({'random' if res['weights'] == 'random+noise' else res['weights']})"
        rows += [(label, "images", res["accuracy"]), (label, "captions", res["accuracy"])]
    for res in zero_shot:
        label = Path(res["model"]).name
        rows += [(label, "images", res["accuracy"]), (label, "captions", res["accuracy"])]
    print_accuracy(rows, modes)
    for res in zero_shot:
        print_zero_shot(res, modes)
    print_throughput(results, modes)
    print("\nload average at end (1/5/15 min): " + " ".join(f"{x:.2f}" for x in load_end)
          + f"; whole run {time.perf_counter() - started:.0f} s")
    busy = {f"{name} {k}": v for name, res in results.items()
            for k, v in res["others_cores"].items() if v is not None and v > 0.1}
    if busy:
        print("WARNING: other processes used CPU during "
              + ", ".join(f"{k} ({v:.2f} cores)" for k, v in busy.items())
              + "; the throughput figures are disturbed: re-run on a quiet machine")

    if args.json:
        report = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                  "cpu": cpu_name(), "loadavg_start": load_start, "loadavg_end": load_end,
                  "architectures": results, "zero_shot": zero_shot}
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

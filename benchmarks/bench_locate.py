"""Where in the image: pointing game and box IoU of ``clipforge.locate`` on built-in scenes.

The built-in renderer knows where it drew each object (``clipforge.data.draw.
draw_scene_with_boxes``: the box of the pixels each object's mask covers), so localisation can
be scored without annotations:

* one-object scenes (a seen colour-shape pair, 0.2 to 0.5 of the side, in one of the nine grid
  cells; filled, on plain or gradient backgrounds: the training distribution of ``clipforge
  train``), the query "a red star": **pointing** is the share of scenes whose map peak lies in
  the object's box (the pointing game of Zhang et al. 2016), **IoU** the mean intersection over
  union of ``locate``'s box with the object's;
* two-object scenes (two seen pairs that differ in colour and in shape, as the binding set
  draws them), each object queried in turn: **named** is the share of queries whose peak lies
  in the named object's box, **other** the share whose peak lies in the other object's, and
  **hotter** the share whose map is higher on average over the named object's box than over
  the other's (a text-blind map scores 50%; coarse grids, whose peaks sit at few points, show
  here what they know).

Chance: a peak drawn uniformly over the image lands in the object's box with the probability
of the box's share of the image (printed as "chance"), and in each of two objects' boxes about
equally often.  Each trained model given with ``--model`` is measured, then every family's tiny
or small architecture on random weights as the control (a map with no knowledge of the text:
near chance where the text matters, "named" against "other" and "hotter"; the pointing game
alone also rewards a map that merely finds the one salient object, which random ViT features
do).  A trained class-token ViT is measured a second time with the tower's own last-layer
patch tokens (``ln_post`` and the projection, attention kept) in place of MaskCLIP's value
path: the ablation that shows what the recipe adds.

``--image-size N`` measures each model a second time with its image tower run at N pixels
(``clipforge.locate(..., image_size=N)``: position embeddings resampled, a finer map; the
64 px scenes are upsampled to N by the preprocessing), for a model whose patches tile N.

    python benchmarks/bench_locate.py [--model runs/first-run] [--scenes 300] [--json PATH]
                                      [--image-size 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import clipforge  # noqa: E402
from clipforge.data.draw import CELLS, Box, draw_scene_with_boxes  # noqa: E402
from clipforge.data.synthetic import SEEN_PAIRS, SHARED_MAX  # noqa: E402
from clipforge.dense import at_image_size, place, similarity_maps  # noqa: E402
from clipforge.inference import embed_texts  # noqa: E402
from clipforge.model.dense import cell_size  # noqa: E402
from clipforge.model.text import project  # noqa: E402
from machine import cpu_name  # noqa: E402
from report import write_json  # noqa: E402

IMAGE_SIZE = 64  # the built-in dataset's (and the first-run model's) image size
# The random-weight controls: one architecture per family the image towers serve
CONTROLS = ("small-rn", "small-vit", "tiny-siglip", "tiny-pe", "tiny-eva02")
BACKGROUNDS = ("plain", "gradient")


@dataclass
class Scene:
    image: object  # PIL image
    pairs: list[tuple[str, str]]  # (colour, shape) per object
    boxes: list[Box]  # per object


def query(colour: str, shape: str) -> str:
    """How the training captions name one object: "a red star", "an orange circle"."""
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


def _draw(rng: np.random.Generator, pairs: list[tuple[str, str]], diameters: list[float]
          ) -> Scene:
    names = list(CELLS)
    cells = [names[k] for k in rng.permutation(len(names))[:len(pairs)]]
    objects = [{"colour": c, "shape": s, "diameter": d, "cells": [cell]}
               for (c, s), d, cell in zip(pairs, diameters, cells)]
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    image, _, boxes = draw_scene_with_boxes(rng, objects, "filled", background, IMAGE_SIZE)
    return Scene(image, pairs, [b[0] for b in boxes])


def one_object_scenes(n: int, seed: int) -> list[Scene]:
    scenes = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 0])
        pair = SEEN_PAIRS[rng.integers(len(SEEN_PAIRS))]
        scenes.append(_draw(rng, [pair], [float(rng.uniform(0.2, 0.5))]))
    return scenes


def two_object_scenes(n: int, seed: int) -> list[Scene]:
    scenes = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 1])
        while True:
            a, b = (SEEN_PAIRS[k] for k in rng.choice(len(SEEN_PAIRS), 2, replace=False))
            if a[0] != b[0] and a[1] != b[1]:
                break
        scenes.append(_draw(rng, [a, b], [float(rng.uniform(0.2, SHARED_MAX))
                                          for _ in range(2)]))
    return scenes


def inside(point: tuple[int, int], box: Box) -> bool:
    x, y = point
    return box[0] <= x < box[2] and box[1] <= y < box[3]


def iou(a: Box, b: Box) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union


def last_layer_tokens(model, pixels: torch.Tensor) -> torch.Tensor:
    """The ablation of MaskCLIP's recipe: the last block's patch tokens as the tower computes
    them (attention and all), through ``ln_post`` and the projection, unit norm."""
    visual = model.visual
    tokens = visual.forward_intermediates(pixels, indices=1, normalize_intermediates=True,
                                          intermediates_only=True, output_fmt="NLC")
    flat = F.normalize(project(tokens["image_intermediates"][0], visual.proj), dim=-1)
    return flat.reshape(flat.shape[0], visual.grid, visual.grid, -1)


@torch.inference_mode()
def _ablation_maps(model, images: list, texts: list[str]) -> np.ndarray:
    """similarity_maps with :func:`last_layer_tokens` as the dense features."""
    vectors = torch.from_numpy(embed_texts(model, texts, progress=False).vectors)
    dense = last_layer_tokens(model, torch.stack([model.preprocess(im) for im in images]))
    return torch.einsum("nhwd,td->nthw", dense, vectors).numpy()


def _locations(model, scenes: list[Scene], ablation: bool = False, batch: int = 64
               ) -> list[list]:
    """Per scene, the Location of each of its objects' queries."""
    texts = sorted({query(*pair) for scene in scenes for pair in scene.pairs})
    column = {text: k for k, text in enumerate(texts)}
    cell = cell_size(model.visual)
    maps_of = _ablation_maps if ablation else similarity_maps
    out = []
    for start in range(0, len(scenes), batch):
        chunk = scenes[start:start + batch]
        maps = maps_of(model, [s.image for s in chunk], texts)
        for scene, scene_maps in zip(chunk, maps):
            out.append([place(scene_maps[column[query(*pair)]], query(*pair), scene.image.size,
                              model.preprocess, cell) for pair in scene.pairs])
    return out


def measure(model, singles: list[Scene], pairs: list[Scene], ablation: bool = False) -> dict:
    start = time.perf_counter()
    found = _locations(model, singles, ablation)
    pointing = np.mean([inside(f[0].peak, s.boxes[0]) for f, s in zip(found, singles)])
    ious = [iou(f[0].box, s.boxes[0]) for f, s in zip(found, singles)]
    named = other = hotter = trials = 0
    for locations, scene in zip(_locations(model, pairs, ablation), pairs):
        for k, location in enumerate(locations):
            named += inside(location.peak, scene.boxes[k])
            other += inside(location.peak, scene.boxes[1 - k])
            hotter += mean_in(location.heatmap, scene.boxes[k]) > mean_in(location.heatmap,
                                                                          scene.boxes[1 - k])
            trials += 1
    return {"pointing": float(pointing), "iou": float(np.mean(ious)),
            "iou_at_0.5": float(np.mean([v >= 0.5 for v in ious])),
            "named": named / trials, "other": other / trials, "hotter": hotter / trials,
            "seconds": time.perf_counter() - start}


def mean_in(heatmap: np.ndarray, box: Box) -> float:
    """The map's mean over a box (its seen pixels)."""
    return float(np.nanmean(heatmap[box[1]:box[3], box[0]:box[2]]))


def chance(singles: list[Scene], pairs: list[Scene]) -> dict:
    """A uniformly random peak's hit rates, and the IoU of the whole image as the box."""
    area = IMAGE_SIZE * IMAGE_SIZE
    whole = (0, 0, IMAGE_SIZE, IMAGE_SIZE)
    share = [(b[2] - b[0]) * (b[3] - b[1]) / area for s in singles for b in s.boxes]
    pair_share = [(b[2] - b[0]) * (b[3] - b[1]) / area for s in pairs for b in s.boxes]
    return {"pointing": float(np.mean(share)),
            "iou": float(np.mean([iou(whole, s.boxes[0]) for s in singles])),
            "iou_at_0.5": float(np.mean([iou(whole, s.boxes[0]) >= 0.5 for s in singles])),
            "named": float(np.mean(pair_share)), "other": float(np.mean(pair_share)),
            "hotter": 0.5}


def random_model(name: str, seed: int):
    torch.manual_seed(seed)
    return clipforge.create_model(name).eval()


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "clipforge": clipforge.__version__, "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def _row(name: str, tower: str, r: dict) -> str:
    return (f"{name:<26} {tower:<28} {r['pointing']:>8.1%} {r['iou']:>6.3f} "
            f"{r['iou_at_0.5']:>8.1%} {r['named']:>7.1%} {r['other']:>7.1%} {r['hotter']:>7.1%}")


def _tower(model) -> str:
    v = model.config.vision
    if not v.is_vit:
        return f"ResNet {v.image_size}px, grid {v.image_size // 32}"
    recipe = "MAP head path" if v.pool == "map" else "MaskCLIP"
    return f"ViT/{v.patch_size} {v.image_size}px, {recipe}"


def measure_larger(model, name: str, size: int, singles: list[Scene], pairs: list[Scene],
                   results: dict) -> None:
    """The row of ``model`` with its tower at ``size`` pixels (skipped, saying why, where its
    patches do not tile ``size``)."""
    try:
        larger = at_image_size(model, size)
    except ValueError as exc:
        print(f"  at {size} px: skipped ({exc})", flush=True)
        return
    result = measure(larger, singles, pairs)
    results["models"][f"{name} at {size} px"] = {"tower": _tower(larger), **result}
    print(_row(f"  at {size} px", _tower(larger), result), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=[],
                        help="a trained model (run directory, checkpoint); repeatable")
    parser.add_argument("--scenes", type=int, default=300,
                        help="scenes of each kind (one object, two objects)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--image-size", type=int, action="append", default=[], metavar="N",
                        help="also measure each model with its tower at N pixels (a finer "
                        "map); repeatable")
    args = parser.parse_args(argv)
    env = environment()
    print(f"CPU: {env['cpu']} ({env['cpu_count']} cores, torch {env['torch']}, "
          f"{env['torch_threads']} threads)")
    singles = one_object_scenes(args.scenes, args.seed)
    pairs = two_object_scenes(args.scenes, args.seed)
    print(f"{args.scenes} one-object scenes, {args.scenes} two-object scenes "
          f"({2 * args.scenes} queries), {IMAGE_SIZE}x{IMAGE_SIZE} px\n")
    print(f"{'model':<26} {'tower':<28} {'pointing':>8} {'IoU':>6} {'IoU>=.5':>8} "
          f"{'named':>7} {'other':>7} {'hotter':>7}")
    results = {"environment": env, "scenes": args.scenes, "seed": args.seed,
               "chance": chance(singles, pairs), "models": {}}
    print(_row("chance (uniform peak)", "", results["chance"]))
    contenders = [(path, lambda p=path: clipforge.create_model(p).eval()) for path in args.model]
    contenders += [(f"{name} (random)", lambda n=name: random_model(n, args.seed))
                   for name in CONTROLS]
    for name, make in contenders:
        model = make()
        result = measure(model, singles, pairs)
        results["models"][name] = {"tower": _tower(model), **result}
        print(_row(name, _tower(model), result), flush=True)
        if name in args.model and _tower(model).endswith("MaskCLIP"):
            result = measure(model, singles, pairs, ablation=True)
            results["models"][f"{name} (last-layer tokens)"] = {"tower": "same", **result}
            print(_row("  its last-layer tokens", "ablation: no MaskCLIP", result), flush=True)
        for size in args.image_size:
            measure_larger(model, name, size, singles, pairs, results)
    if args.json:
        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

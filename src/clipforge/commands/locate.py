"""``clipforge locate``: where in an image a text is (:func:`clipforge.dense.locate`): writes
the similarity map over the image as a PNG and prints its peak and box, in the image's own
pixel coordinates."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..dense import THRESHOLD, locate, overlay, read_image
from ..fileio import atomic_file
from .options import add_model_options, load_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("locate", help="where in an image a text is: a heat map, its peak and "
                       "a box (training-free dense features: MaskCLIP's recipe)")
    p.add_argument("image", help="image file")
    p.add_argument("text", help='what to look for, e.g. "a red star"')
    p.add_argument("--out", type=Path, required=True,
                   help="the overlay to write (.png): the map over the image, box and peak")
    p.add_argument("--threshold", type=float, default=THRESHOLD,
                   help="where the box's region ends, as a share of the map's range "
                        f"(default {THRESHOLD})")
    p.add_argument("--image-size", type=int, metavar="N",
                   help="run the image tower at N pixels instead of its own (position "
                   "embeddings resampled; a multiple of the patch size, or of 32 for a "
                   "ResNet): more map cells, a finer map; peak and box stay in the image's "
                   "pixels")
    p.add_argument("--json", action="store_true", help='print JSON: "peak": [x, y] and "box": '
                   "[x0, y0, x1, y1] (x1, y1 exclusive) in the image's pixels")
    add_model_options(p)
    p.set_defaults(handler=run)


def _check(args: argparse.Namespace) -> None:
    """What can be refused before the model loads."""
    if args.out.suffix.lower() != ".png":
        raise SystemExit(f"error: --out {args.out} must be a .png file")
    if not 0 < args.threshold <= 1:
        raise SystemExit(f"error: --threshold must be in (0, 1], got {args.threshold}")
    if args.image_size is not None and args.image_size < 1:
        raise SystemExit(f"error: --image-size must be a positive number of pixels, got "
                         f"{args.image_size}")


def run(args: argparse.Namespace) -> int:
    _check(args)
    image = read_image(args.image)  # before the model: a bad file costs nothing
    model = load_model(args)
    found = locate(model, image, args.text, threshold=args.threshold,
                   image_size=args.image_size)
    picture = overlay(image, found)
    with atomic_file(args.out) as tmp:
        picture.save(tmp, format="PNG")
    print(f"wrote {args.out}", file=sys.stderr)
    if args.json:
        print(json.dumps({"image": args.image, "overlay": str(args.out), **found.to_dict()},
                         indent=2))
    else:
        x0, y0, x1, y1 = found.box
        rows, cols = found.grid.shape
        print(f"{args.image}: {args.text!r} peak ({found.peak[0]}, {found.peak[1]}), box "
              f"({x0}, {y0}, {x1}, {y1}), best cosine {found.score:.4f} (map {rows}x{cols})")
    return 0

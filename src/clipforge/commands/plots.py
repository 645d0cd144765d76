"""``clipforge plot-similarity``: the image-text cosine-similarity matrix as a picture."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..evaluation.plots import plot_similarity
from ..reading import find_images
from .options import add_model_options, load_model, read_lines


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot-similarity", help="draw the image-text cosine-similarity matrix "
                       "with thumbnails and captions (.png or .svg)")
    p.add_argument("--images", nargs="+", required=True, help="image files or directories")
    p.add_argument("--texts", nargs="+", help="texts, one per row")
    p.add_argument("--texts-file", help="UTF-8 file, one text per line")
    p.add_argument("--out", required=True, type=Path, help="destination .png or .svg")
    p.add_argument("--vmin", type=float, help="colour scale minimum (default: the smallest "
                   "value)")
    p.add_argument("--vmax", type=float, help="colour scale maximum")
    p.add_argument("--truncate", action="store_true", help="cut over-long texts instead of "
                   "skipping them")
    add_model_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    texts = list(args.texts or []) + (read_lines(args.texts_file, "--texts-file")
                                      if args.texts_file else [])
    paths = find_images(args.images)
    if not paths or not texts:
        raise SystemExit("error: give image files (--images) and texts (--texts or "
                         "--texts-file)")
    model = load_model(args)
    try:
        result = plot_similarity(paths, texts, model, args.out, truncate=args.truncate,
                                 vmin=args.vmin, vmax=args.vmax)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    for item, reason in result.skipped_images + result.skipped_texts:
        print(f"skipped {item}: {reason}", file=sys.stderr)
    print(f"wrote {args.out} ({len(result.texts)} texts x {len(result.images)} images)")
    return 0

"""``clipforge rank`` (images by similarity to a prompt) and ``clipforge score`` (CLIPScore of
image-caption pairs), both :mod:`clipforge.evaluation.scoring`."""

from __future__ import annotations

import argparse
import json
import sys

from ..evaluation.scoring import PREFIX, clip_score, pairs_from_csv, rank_images
from ..reading import find_images
from .options import add_model_options, load_model, read_lines


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rank", help="order images by similarity to a prompt")
    p.add_argument("images", nargs="+", help="image files or directories")
    p.add_argument("--prompt", required=True)
    p.add_argument("--top", type=int, default=0, help="show only the best N (default all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--truncate", action="store_true", help="cut an over-long prompt")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_model_options(p)
    p.set_defaults(handler=rank)

    p = sub.add_parser("score", help="CLIPScore of image-caption pairs (Hessel et al. 2021)")
    p.add_argument("--pairs", help="CSV/TSV with an image path and a caption column")
    p.add_argument("--csv-image-key", default="filepath")
    p.add_argument("--csv-caption-key", default="title")
    p.add_argument("--images", nargs="+", help="image files or directories (with --captions)")
    p.add_argument("--captions", help="UTF-8 file, one caption per image, in file order")
    p.add_argument("--w", type=float, default=2.5, help="CLIPScore weight (default 2.5)")
    p.add_argument("--no-prefix", action="store_true", help="do not prefix captions with "
                   "'A photo depicts ' (the paper's reference code does)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--truncate", action="store_true", help="cut over-long captions instead of "
                   "skipping their pairs")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_model_options(p)
    p.set_defaults(handler=score)


def rank(args: argparse.Namespace) -> int:
    model = load_model(args)
    ranked, skipped = rank_images(model, args.prompt, args.images, batch_size=args.batch_size,
                                  truncate=args.truncate)
    shown = ranked[: args.top] if args.top else ranked
    if args.json:
        print(json.dumps({"prompt": args.prompt,
                          "results": [{"image": p, "score": s} for p, s in shown],
                          "skipped": [{"image": p, "reason": r} for p, r in skipped]}, indent=2))
    else:
        for path, value in shown:
            print(f"{value:.4f}\t{path}")
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    return 0 if ranked else 1


def _pairs(args: argparse.Namespace) -> tuple[list, list[str]]:
    """The (image, caption) pairs the options name: --pairs, or --images with --captions."""
    if args.pairs:
        try:
            return pairs_from_csv(args.pairs, args.csv_image_key, args.csv_caption_key)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"error: {exc}") from None
    if args.images and args.captions:
        paths, captions = find_images(args.images), read_lines(args.captions, "--captions")
        if len(paths) != len(captions):
            raise SystemExit(f"error: {len(paths)} images but {len(captions)} captions in "
                             f"{args.captions}: give one caption line per image, in the order "
                             "of the files (folders are listed sorted)")
        return paths, captions
    raise SystemExit("error: give --pairs FILE.csv, or --images and --captions")


def score(args: argparse.Namespace) -> int:
    paths, captions = _pairs(args)
    model = load_model(args)
    result = clip_score(model, paths, captions, w=args.w, batch_size=args.batch_size,
                        prefix="" if args.no_prefix else PREFIX, truncate=args.truncate)
    if args.json:
        print(json.dumps({"mean": None if result.scored == 0 else result.mean,
                          "scored": result.scored, "w": args.w, "rows": result.rows()},
                         indent=2))
    else:
        for row in result.rows():
            value = "skipped" if row["score"] is None else f"{row['score']:.4f}"
            print(f"{value}\t{row['image']}\t{row['caption']}")
        if result.scored:
            print(f"CLIPScore (w={args.w}): {result.mean:.4f} over {result.scored} pair(s)")
    for index, reason in result.skipped:
        print(f"skipped pair {index + 1}: {reason}", file=sys.stderr)
    return 0 if result.scored else 1

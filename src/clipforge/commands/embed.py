"""``clipforge embed``: normalised image and text embeddings as .npy files, with .csv ids.

With ``--shards``, webdataset shards are embedded shard by shard into per-shard files, resumably
and under ``torchrun`` (:func:`clipforge.inference_shards.embed_shards`)."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from ..fileio import atomic_directory
from ..inference import embed_images, embed_texts
from ..inference_shards import DTYPES, FAILED_SHARDS, ShardReport, ShardsError, embed_shards
from ..reading import find_images, name_bytes_hex, printable_name
from .options import FAST_DECODE_HELP, add_model_options, load_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="write normalised image/text embeddings (.npy + .csv ids)")
    p.add_argument("--images", nargs="+", help="image files or directories")
    p.add_argument("--texts", help="text file, one text per line")
    p.add_argument("--shards", help="webdataset shards (img2dataset layout), e.g. "
                   "'data/{000000..000999}.tar': one STEM.npy + STEM.csv + STEM.json per shard "
                   "in --out; re-running skips done shards; runs under torchrun "
                   "(docs/scale-plan.md)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="image decoding processes (with "
                   "--shards: each reads whole shards, so at most one per shard is used)")
    p.add_argument("--fast-decode", action="store_true", help=FAST_DECODE_HELP)
    p.add_argument("--truncate", action="store_true", help="cut over-long texts instead of "
                   "skipping them")
    p.add_argument("--captions", action="store_true", help="with --shards: also embed each "
                   "sample's .txt caption (STEM.captions.npy); a sample without one is skipped")
    p.add_argument("--dtype", choices=DTYPES, default="float16", help="with --shards: the "
                   "embeddings' file type (default float16: half the bytes, ~1e-3 round-off)")
    add_model_options(p)
    p.set_defaults(handler=run)


def _write_table(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _read_texts(path: str | None) -> list[str]:
    if not path:
        return []
    try:
        return [line.rstrip("\n") for line in
                Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"error: cannot read --texts {path}: {exc}") from None


def _print_rank(report: ShardReport) -> None:
    """This rank's account, printed as soon as its shards are written (before the ranks wait
    for each other), with the shards it could not read."""
    print(f"rank {report.rank}: {report.embedded_shards} shard(s) embedded, "
          f"{report.already_done} already done, {len(report.failed)} failed; "
          f"{report.samples} samples, {report.skipped} skipped", flush=True)
    for url, reason in report.failed:
        print(f"failed shard {url}: {reason}", flush=True)


def _print_folder(out: Path, manifest: dict) -> None:
    """The folder's totals (earlier runs' shards too), and how to retry the failed ones."""
    failed = manifest["shards_failed"]
    retry = (f" (listed in {out / FAILED_SHARDS}; run the same command again to retry them)"
             if failed else "")
    print(f"{out}: {manifest['shards_done']} of {manifest['shards']} shard(s) done, "
          f"{manifest['samples']} samples, {manifest['skipped']} skipped, "
          f"{failed} shard(s) failed{retry}", flush=True)


def _embed_shards(args: argparse.Namespace) -> int:
    """``clipforge embed --shards``, in one process or as one torchrun rank: this process joins
    the process group, and leaves it whatever happens."""
    import torch.distributed as dist

    from ..training.distributed import init_distributed

    if args.images or args.texts:
        raise SystemExit("error: --shards cannot be combined with --images or --texts")
    ranks, device = init_distributed(args.device)
    try:
        args.device = str(device)
        model = load_model(args)
        try:
            report = embed_shards(model, args.shards, args.out, batch_size=args.batch_size,
                                  workers=args.workers, captions=args.captions,
                                  dtype=args.dtype, truncate=args.truncate,
                                  fast_decode=args.fast_decode, on_rank_done=_print_rank)
        except ShardsError as exc:
            raise SystemExit(f"error: {exc}") from None
        if report.manifest is not None:
            _print_folder(Path(args.out), report.manifest)
        return 0
    finally:
        if ranks.enabled:
            dist.destroy_process_group()


def run(args: argparse.Namespace) -> int:
    if args.shards:
        return _embed_shards(args)
    if not args.images and not args.texts:
        raise SystemExit("error: give --images and/or --texts, or --shards")
    texts = _read_texts(args.texts)
    paths = find_images(args.images or [])
    if args.images and not paths:
        raise SystemExit(f"error: no image files in {' '.join(args.images)}")
    model = load_model(args)
    failures = []
    with atomic_directory(args.out, marker="model.json", writes=("*.npy", "*.csv")) as out:
        if paths:
            result = embed_images(model, paths, batch_size=args.batch_size,
                                  num_workers=args.workers, fast_decode=args.fast_decode)
            np.save(out / "image_embeddings.npy", result.vectors.astype(np.float32))
            # A file name that is not UTF-8 is shown with \xNN escapes; path_hex has its bytes.
            _write_table(out / "images.csv", ("row", "path", "path_hex"),
                         [(row, printable_name(p), name_bytes_hex(p))
                          for row, p in enumerate(result.ids)])
            failures += [("image", p, e) for p, e in result.failures]
            print(f"{len(result.ids)} images embedded, {len(result.failures)} skipped")
        if texts:
            result = embed_texts(model, texts, batch_size=args.batch_size * 8,
                                 truncate=args.truncate)
            np.save(out / "text_embeddings.npy", result.vectors.astype(np.float32))
            _write_table(out / "texts.csv", ("row", "line", "text"),
                         [(r, int(i) + 1, texts[int(i)]) for r, i in enumerate(result.ids)])
            failures += [("text", f"line {int(i) + 1}", e) for i, e in result.failures]
            print(f"{len(result.ids)} texts embedded, {len(result.failures)} skipped")
        failures = [(kind, printable_name(item), printable_name(reason), name_bytes_hex(item))
                    for kind, item, reason in failures]
        _write_table(out / "skipped.csv", ("kind", "item", "reason", "item_hex"), failures)
        (out / "model.json").write_text(json.dumps(
            {"model": str(args.model), "weights": args.weights, "config": model.config.to_dict()},
            indent=2) + "\n")
    for kind, item, reason, _ in failures:
        print(f"skipped {kind} {item}: {reason}", file=sys.stderr)
    print(f"wrote {args.out}")
    return 0

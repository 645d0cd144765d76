"""``clipforge index build|info``, ``clipforge search`` and ``clipforge serve``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from PIL import Image

from ..cli import FAST_DECODE_HELP, _add_model_options, _load, _model
from ..image import ImageLoadError, load_image
from .build import build_index
from .store import Store
from .vectors import ANN_KINDS


def _index_model(args: argparse.Namespace):
    """The model the user named, else None: the index's own (or the default for a new one)."""
    if args.model is None:
        return None
    return _model(args)


def _recorded(index: Path) -> dict[str, str]:
    if not (index / "index.sqlite").is_file():
        return {}
    store = Store(index)
    try:
        return store.info()
    finally:
        store.close()


def cmd_index_build(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from ..training.distributed import init_distributed

    ranks, device = init_distributed(args.device)  # under torchrun: one share per rank
    try:
        return _index_build(args, str(device), ranks.is_main)
    finally:
        if ranks.enabled:
            dist.destroy_process_group()


def _index_build(args: argparse.Namespace, device: str, is_main: bool) -> int:
    from ..cli import DEFAULT_MODEL

    info = _recorded(args.out)
    if args.model is not None:
        model = _load(args.model, args.weights, args.activation, device, args.precision,
                      args.backend)
    elif info.get("model") not in (None, "None"):
        weights = None if info.get("weights") in (None, "None") else info["weights"]
        model = _load(info["model"], weights, args.activation, device, args.precision)
    else:
        model = _load(DEFAULT_MODEL, args.weights, args.activation, device, args.precision)
    params = {k: v for k, v in (("nlist", args.nlist), ("m", args.pq_m),
                                ("nprobe", args.nprobe)) if v is not None}
    report = build_index(args.source, args.out, model, batch_size=args.batch_size,
                         num_workers=args.workers, ann=args.ann, ann_params=params or None,
                         progress=not args.no_progress, image_key=args.csv_image_key,
                         caption_key=args.csv_caption_key, fast_decode=args.fast_decode)
    if not is_main:
        return 0
    if args.json:
        print(report.to_json())
    else:
        print(f"{report.index}: {report.total} items (generation {report.generation}, "
              f"{report.ann}); this run: {report.added} added, {report.removed} removed, "
              f"{report.unchanged} unchanged, {report.resumed} resumed, {report.embedded} read "
              f"in {report.seconds:.1f} s ({report.images_per_second:.1f} images/s)")
        for key, reason in report.failures[:20]:
            print(f"skipped: {reason if key in reason else f'{key}: {reason}'}",
                  file=sys.stderr)
        if len(report.failures) > 20:
            print(f"... {len(report.failures) - 20} more skipped; see "
                  f"{Path(report.index) / 'report.json'}", file=sys.stderr)
    return 0


def cmd_index_info(args: argparse.Namespace) -> int:
    store = Store(args.index)
    try:
        info = store.info()
        info["count"] = str(store.count())
        info["failures"] = str(len(store.failures()))
    finally:
        store.close()
    print(json.dumps(info, indent=2))
    return 0


def _query_image(path: str | None) -> Image.Image | None:
    if path is None:
        return None
    try:
        return load_image(path)
    except ImageLoadError as exc:
        raise SystemExit(f"error: --image: {exc}") from None


def cmd_search(args: argparse.Namespace) -> int:
    from .index import SearchIndex

    if args.query is None and args.image is None:
        raise SystemExit('error: give a text query ("a dog on a beach") and/or --image FILE')
    index = SearchIndex.open(args.index, _index_model(args), device=args.device)
    hits = index.search(text=args.query, image=_query_image(args.image),
                        text_weight=args.text_weight, image_weight=args.image_weight, k=args.k,
                        threshold=args.threshold, collapse=args.collapse)
    if args.json:
        print(json.dumps({"query": args.query, "image": args.image,
                          "results": [h.to_dict() for h in hits]}, indent=2))
    else:
        for hit in hits:
            print(f"{hit.score:.4f}\t{hit.path}")
    if args.html:
        from .html import write_contact_sheet

        title = " + ".join(q for q in (args.query, args.image and f"image {args.image}") if q)
        write_contact_sheet(index, hits, args.html, title=title)
        print(f"wrote {args.html}", file=sys.stderr)
    return 0 if hits else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from .index import SearchIndex
    from .server import serve

    index = SearchIndex.open(args.index, _index_model(args), device=args.device)
    serve(index, host=args.host, port=args.port, max_upload_bytes=args.max_upload_mb * 2**20)
    return 0


def _model_options(p: argparse.ArgumentParser) -> None:
    _add_model_options(p, default=None, default_help="the model that built the index; "
                       "ViT-B-32 for a new one")


def add_search_commands(sub: argparse._SubParsersAction) -> dict:
    """Add the search commands to the top-level parser; returns name -> function."""
    p = sub.add_parser("index", help="build or inspect a semantic search index")
    isub = p.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="index a folder, CSV/TSV or shards (incremental, "
                        "resumable)", description="Embed every image of SOURCE into the "
                        "index OUT. Re-running embeds only new or changed files and drops "
                        "deleted ones; an interrupted build resumes where it stopped. Scale out "
                        "with `torchrun --nproc_per_node N -m clipforge index build ...`.")
    b.add_argument("source", help="folder of images (same-name .txt = caption), .csv/.tsv of "
                   "paths (other columns kept as metadata) or local .tar shards")
    b.add_argument("--out", required=True, type=Path, help="index directory")
    b.add_argument("--ann", choices=ANN_KINDS, help="search structure: flat (exact, default), "
                   "ivfpq or hnsw for large collections (re-ranked exactly)")
    b.add_argument("--nlist", type=int, help="ivfpq: number of inverted lists")
    b.add_argument("--pq-m", type=int, help="ivfpq: product-quantiser sub-vectors")
    b.add_argument("--nprobe", type=int, help="ivfpq: lists searched per query")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="image decoding processes")
    b.add_argument("--fast-decode", action="store_true", help=FAST_DECODE_HELP)
    b.add_argument("--csv-image-key", default="filepath")
    b.add_argument("--csv-caption-key", default="title")
    b.add_argument("--json", action="store_true", help="print the build report as JSON")
    b.add_argument("--no-progress", action="store_true")
    _model_options(b)
    i = isub.add_parser("info", help="what an index holds and which model made it")
    i.add_argument("index", type=Path)

    p = sub.add_parser("search", help="query an index by text and/or image")
    p.add_argument("index", type=Path)
    p.add_argument("query", nargs="?", help='text query, e.g. "a dog on a beach"')
    p.add_argument("--image", help="image file to search by (with a text query: mixed)")
    p.add_argument("-k", type=int, default=20, help="number of results (default 20)")
    p.add_argument("--threshold", type=float, help="minimum cosine similarity")
    p.add_argument("--collapse", type=float, help="drop near-duplicates: results at least this "
                   "similar to a better one (e.g. 0.95)")
    p.add_argument("--text-weight", type=float, default=1.0)
    p.add_argument("--image-weight", type=float, default=1.0)
    p.add_argument("--html", type=Path, help="also write a contact sheet of the results")
    p.add_argument("--json", action="store_true")
    _model_options(p)

    p = sub.add_parser("serve", help="HTTP API and web page for an index (FastAPI)")
    p.add_argument("index", type=Path)
    p.add_argument("--host", default="127.0.0.1", help="address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=int, default=20, help="larger uploads get 413")
    _model_options(p)

    def index_command(args: argparse.Namespace) -> int:
        return {"build": cmd_index_build, "info": cmd_index_info}[args.index_command](args)

    return {"index": index_command, "search": cmd_search, "serve": cmd_serve}

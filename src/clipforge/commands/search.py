"""``clipforge index build|info``, ``clipforge search`` and ``clipforge serve``
(:mod:`clipforge.search`).

Without ``--model``, an index is searched, served and updated with the model it records (its
origin, loaded again by :func:`clipforge.factory.load_origin` at the ``--device`` and
``--precision`` given); a new index is built with ViT-B-32.  ``serve`` takes several indexes, by
name, each with its own model.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from ..factory import create_model, load_origin
from ..fileio import DiskFullError, is_disk_full
from ..image import ImageLoadError, load_image
from ..reading import printable_name
from ..search.build import build_index, memory_budget, recorded_origin
from ..search.index import SearchIndex
from ..search.milvus import EMBEDDED, TOKEN_ENV, parse_backend
from ..search.store import Store
from ..search.vectors import ANN_KINDS
from ..search.video import VideoOptions, clock
from .options import (
    DEFAULT_MODEL,
    FAST_DECODE_HELP,
    add_model_options,
    load_model,
    model_arguments,
)

log = logging.getLogger(__name__)

INDEX_KEPT = ("the index keeps its last committed state and the batches already embedded: "
              "free some space and run the build again")


def _named_model(args: argparse.Namespace):
    """The model the user named, else None: the index's own."""
    return None if args.model is None else load_model(args)


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


def _build_model(args: argparse.Namespace, device: str):
    """--model, else the model the index records, else the default model for a new index;
    on ``device`` (this rank's, under torchrun)."""
    origin = recorded_origin(_recorded(args.out))
    if args.model is None and origin is not None:
        return load_origin(origin, device=device, precision=args.precision)
    name = args.model or DEFAULT_MODEL
    return create_model(name, **{**model_arguments(args, name), "device": device})


def _video_options(args: argparse.Namespace) -> VideoOptions | None:
    """--fps, --segment and --shots over the index's own options (None: keep them all);
    ValueError naming the problem before the model loads."""
    given = {k: getattr(args, k) for k in ("fps", "segment", "shots")
             if getattr(args, k) is not None}
    if not given:
        return None
    recorded = VideoOptions.from_info(_recorded(args.out)) or VideoOptions()
    values = {"fps": recorded.fps, "segment": recorded.segment, "shots": recorded.shots, **given}
    if values["shots"] == "off":  # back to fixed windows
        values["shots"] = None
    try:
        return VideoOptions(**values)
    except ValueError as exc:
        raise ValueError(f"--fps/--segment/--shots: {exc}") from None


def _index_build(args: argparse.Namespace, device: str, is_main: bool) -> int:
    video = _video_options(args)
    model = _build_model(args, device)
    params = {k: v for k, v in (("nlist", args.nlist), ("m", args.pq_m),
                                ("nprobe", args.nprobe)) if v is not None}
    try:
        report = build_index(args.source, args.out, model, batch_size=args.batch_size,
                             num_workers=args.workers, ann=args.ann, ann_params=params or None,
                             progress=not args.no_progress, image_key=args.csv_image_key,
                             caption_key=args.csv_caption_key, fast_decode=args.fast_decode,
                             max_index_memory=args.max_index_memory,
                             vector_store=args.vector_store, videos=not args.no_video,
                             video=video)
    except Exception as exc:  # SQLite says "database or disk is full", not OSError(ENOSPC)
        if isinstance(exc, DiskFullError) or not is_disk_full(exc):
            raise
        raise DiskFullError(args.out, exc, INDEX_KEPT) from exc
    if not is_main:
        return 0
    if args.json:
        print(report.to_json())
    else:
        storage = {"ondisk": ", rows on disk", "milvus": ", vectors in Milvus"}.get(
            report.storage, "")
        print(f"{report.index}: {report.total} items (generation {report.generation}, "
              f"{report.ann}{storage}); this run: {report.added} added, {report.removed} removed, "
              f"{report.unchanged} unchanged, {report.resumed} resumed, {report.embedded} read "
              f"in {report.seconds:.1f} s ({report.images_per_second:.1f} images/s)")
        if report.videos:
            print(f"videos: {report.videos} read, {report.video_seconds:.1f} s of video in "
                  f"{report.segments} segments")
        for key, reason in report.failures[:20]:
            line = reason if key in reason else f"{key}: {reason}"
            print(f"skipped: {printable_name(line)}", file=sys.stderr)
        if len(report.failures) > 20:
            print(f"... {len(report.failures) - 20} more skipped; see "
                  f"{Path(report.index) / 'report.json'}", file=sys.stderr)
    return 0


def _memory_size(value: str) -> str:
    """An argparse type: a size ``build_index`` takes, checked before the model loads."""
    try:
        memory_budget(value, {})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _vector_store(value: str) -> str:
    """An argparse type: a ``--vector-store`` value ``build_index`` takes, checked before the model
    loads."""
    try:
        parse_backend(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


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
    if args.query is None and args.image is None:
        raise SystemExit('error: give a text query ("a dog on a beach") and/or --image FILE')
    index = SearchIndex.open(args.index, _named_model(args), device=args.device,
                             precision=args.precision, max_index_memory=args.max_index_memory)
    hits = index.search(text=args.query, image=_query_image(args.image),
                        text_weight=args.text_weight, image_weight=args.image_weight, k=args.k,
                        threshold=args.threshold, collapse=args.collapse)
    if args.json:
        print(json.dumps({"query": args.query, "image": args.image,
                          "results": [h.to_dict() for h in hits]}, indent=2))
    else:
        for hit in hits:
            times = "" if hit.start is None else f"\t{clock(hit.start)}-{clock(hit.end)}"
            print(f"{hit.score:.4f}\t{printable_name(str(hit.path))}{times}")
    if args.html:
        from ..search.html import write_contact_sheet

        title = " + ".join(q for q in (args.query, args.image and f"image {args.image}") if q)
        write_contact_sheet(index, hits, args.html, title=title)
        print(f"wrote {args.html}", file=sys.stderr)
    return 0 if hits else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from ..search.server import ServerLimits, check_exposure, check_tls, listen, serve

    paths = _index_paths(args.index)  # names checked before anything is bound or loaded
    token = _access_token(args.token_file)
    check_tls(args.tls_cert, args.tls_key)  # these two: before binding or loading
    check_exposure(args.host, token, args.insecure_no_auth)
    # Options left out keep the server's defaults (the constants in clipforge.search.server).
    limits = {k: getattr(args, k) for k in ("header_timeout", "body_timeout", "keep_alive",
                                            "max_connections") if getattr(args, k) is not None}
    if limits.get("max_connections") == 0:
        limits["max_connections"] = None
    options = _app_options(args)
    sockets = listen(args.host, args.port)  # a taken port is reported before the model loads
    try:
        indexes = {name: _open_served(name, path, args) for name, path in paths.items()}
        serve(indexes, host=args.host, port=args.port, allowed_hosts=args.allowed_hosts,
              limits=ServerLimits(**limits), sockets=sockets, token=token,
              insecure_no_auth=args.insecure_no_auth, tls_cert=args.tls_cert,
              tls_key=args.tls_key, **options)
    finally:
        for sock in sockets:
            sock.close()
    return 0


def _index_paths(values: list[str]) -> dict[str, Path]:
    """``INDEX`` or ``NAME=INDEX`` arguments -> {name: path}, in the order given; ValueError
    naming a name that is not allowed or given twice.  A name is the text before the first
    ``=``; without one, the index folder's name."""
    from ..search.server import check_index_name, default_index_name

    paths: dict[str, Path] = {}
    for value in values:
        name, given, path = value.partition("=")
        if not given:
            name, path = default_index_name(value), value
        try:
            check_index_name(name)
        except ValueError as exc:
            hint = "give it one: NAME=PATH" if not given else "rename it"
            raise ValueError(f"{printable_name(value)}: {exc}; {hint}") from None
        if not path:
            raise ValueError(f"{printable_name(value)}: no index folder after {name}=")
        if name in paths:
            first = printable_name(str(paths[name]))
            raise ValueError(f"the index name {name!r} is given twice ({first} and "
                             f"{printable_name(path)}): name them apart, as NAME=PATH")
        paths[name] = Path(path)
    return paths


def _open_served(name: str, path: Path, args: argparse.Namespace) -> SearchIndex:
    """The index at ``path`` with its own model (or ``--model``, loaded for it), or an error
    naming the index by ``name``: with several, the message must say which one failed."""
    try:
        return SearchIndex.open(path, _named_model(args), device=args.device,
                                precision=args.precision,
                                max_index_memory=args.max_index_memory)
    except (ValueError, RuntimeError, OSError) as exc:  # what `clipforge` reports in a line
        kind = next(k for k in (ValueError, RuntimeError, OSError) if isinstance(exc, k))
        raise kind(f"index {name!r}: {exc}") from exc


def _app_options(args: argparse.Namespace) -> dict:
    """``create_app``'s options from the command line, checked before the port is bound or
    the model loaded, so a mistake costs no wait; options left out keep their defaults."""
    from ..search.server import MAX_PIXELS, check_origins

    options: dict = {"max_upload_bytes": args.max_upload_mb * 2**20}
    if args.decode_budget_mpx is not None:
        options["decode_budget"] = round(args.decode_budget_mpx * 1_000_000)
        if options["decode_budget"] < MAX_PIXELS:
            raise ValueError(f"--decode-budget-mpx {args.decode_budget_mpx:g} is less than the "
                             f"largest upload allowed ({MAX_PIXELS / 1e6:g} megapixels)")
    if args.cors_origins is not None:  # "a, b" and a mistyped "a,,b" (an empty origin) alike
        try:
            options["cors_origins"] = check_origins([o.strip() for o in
                                                     args.cors_origins.split(",")])
        except ValueError as exc:
            raise ValueError(f"--cors-origins: {exc}") from None
    if args.max_client_requests is not None:
        options["max_client_requests"] = args.max_client_requests or None  # 0: no limit
    if args.allow_image_urls:
        options["allow_image_urls"] = True
    return options


def _access_token(token_file: Path | None) -> str | None:
    """The token from ``--token-file``, else from the environment, else None; ValueError in
    one line naming where it came from and how to make a good one.  The file wins over the
    environment, as a command-line option does."""
    from ..search.server import TOKEN_ENV, TOKEN_HINT, check_token

    if token_file is None and TOKEN_ENV not in os.environ:
        return None
    where = (f"--token-file {printable_name(str(token_file))}" if token_file is not None
             else TOKEN_ENV)
    try:
        token = (os.environ[TOKEN_ENV] if token_file is None
                 else token_file.read_text(encoding="utf-8")).strip()
        check_token(token)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        hint = TOKEN_HINT + (f" > {printable_name(str(token_file))}" if token_file else "")
        raise ValueError(f"{where}: {reason}; make a token with: {hint}") from None
    if token_file is not None:
        _warn_if_shared(token_file)
    return token


def _warn_if_shared(token_file: Path) -> None:
    """Other users who can read the token file can use the server: say so (a warning, since
    the file's owner may mean it, e.g. a group of service accounts)."""
    mode = token_file.stat().st_mode
    if os.name == "posix" and mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("%s is readable by other users (mode %s): chmod 600 %s",
                    printable_name(str(token_file)), stat.filemode(mode),
                    printable_name(str(token_file)))


def _port(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0 to 65535)")
    return int(value)


def _names(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give host names separated by commas")
    return names


def _positive(kind: type) -> Callable[[str], float]:
    """An argparse type: a positive number of ``kind`` (0 too for int: "no limit")."""

    def parse(value: str) -> float:
        try:
            number = kind(value)
        except ValueError:
            number = -1
        if not number > 0 and not (kind is int and number == 0):
            raise argparse.ArgumentTypeError(f"{value} is not a positive number")
        return number

    return parse


def _shot_threshold(value: str) -> float | str:
    """An argparse type: a cosine similarity from -1 to 1, or "off"."""
    if value.strip().lower() == "off":
        return "off"
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not -1 <= number <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not a cosine similarity from -1 to 1 "
                                         "(or 'off')")
    return number


def _memory_option(p: argparse.ArgumentParser) -> None:
    """Opening an index for queries: refuse one that would hold more memory than this."""
    p.add_argument("--max-index-memory", type=_memory_size, metavar="SIZE", help="refuse to "
                   "open an index whose search would hold more memory than this (512M, 2G): "
                   "rebuild it with `index build --max-index-memory` to keep its rows on disk")


def _model_options(p: argparse.ArgumentParser) -> None:
    add_model_options(p, default=None, default_help="the model that built the index; "
                      "ViT-B-32 for a new one")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="build or inspect a semantic search index")
    isub = p.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="index a folder, CSV/TSV or shards (incremental, "
                        "resumable)", description="Embed every image of SOURCE into the "
                        "index OUT (a video as segments of a few seconds, each a result). "
                        "Re-running embeds only new or changed files and drops "
                        "deleted ones; an interrupted build resumes where it stopped. Scale out "
                        "with `torchrun --nproc_per_node N -m clipforge index build ...`.")
    b.add_argument("source", help="folder of images and videos (same-name .txt = caption), "
                   ".csv/.tsv of paths (other columns kept as metadata) or local .tar shards")
    b.add_argument("--out", required=True, type=Path, help="index directory")
    b.add_argument("--ann", choices=ANN_KINDS, help="search structure: flat (exact, default), "
                   "ivfpq or hnsw for large collections (re-ranked exactly)")
    b.add_argument("--nlist", type=int, help="ivfpq: number of inverted lists")
    b.add_argument("--pq-m", type=int, help="ivfpq: product-quantiser sub-vectors")
    b.add_argument("--nprobe", type=int, help="ivfpq: lists searched per query")
    b.add_argument("--max-index-memory", type=_memory_size, metavar="SIZE", help="memory a "
                   "search of the index may hold, e.g. 512M or 2G ('none': no limit; default: "
                   "the index's, else none). Rows that do not fit are kept in memory-mapped "
                   "files, searched with an IVF index whose lists are on disk, then re-ranked "
                   "exactly")
    b.add_argument("--vector-store", type=_vector_store, metavar="URI", help="where the "
                   "vectors are "
                   f"searched: {EMBEDDED} (in the index folder, by faiss; the default for a new "
                   "index), milvus://HOST[:PORT]/COLLECTION (a Milvus server or cluster, "
                   f"milvus+https:// for TLS, token from ${TOKEN_ENV}) or "
                   "milvus-lite:PATH.db/COLLECTION (Milvus Lite, one process at a time); "
                   "default: the index's. Needs pip install 'clipforge[milvus]'")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="image decoding processes")
    b.add_argument("--fast-decode", action="store_true", help=FAST_DECODE_HELP)
    b.add_argument("--csv-image-key", default="filepath")
    b.add_argument("--csv-caption-key", default="title")
    v = b.add_argument_group("videos (needs pip install 'clipforge[video]'; default: the "
                             "index's options, else 1 frame/s in 5 s windows)")
    v.add_argument("--fps", type=_positive(float), metavar="N", help="frames sampled per "
                   "second of video")
    v.add_argument("--segment", type=_positive(float), metavar="SECONDS", help="length of a "
                   "segment (one result): fixed windows, or the longest shot with --shots")
    v.add_argument("--shots", type=_shot_threshold, metavar="COSINE", help="cut segments at "
                   "shots instead: where consecutive frames' embeddings are less similar than "
                   "this (e.g. 0.85); 'off': back to fixed windows")
    v.add_argument("--no-video", action="store_true", help="leave video files out")
    b.add_argument("--json", action="store_true", help="print the build report as JSON")
    b.add_argument("--no-progress", action="store_true")
    _model_options(b)
    b.set_defaults(handler=cmd_index_build)
    i = isub.add_parser("info", help="what an index holds and which model made it")
    i.add_argument("index", type=Path)
    i.set_defaults(handler=cmd_index_info)

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
    _memory_option(p)
    _model_options(p)
    p.set_defaults(handler=cmd_search)

    p = sub.add_parser("serve", help="HTTP API and web page for one index or several "
                       "(FastAPI)", description="Serve INDEX, or several indexes by name: "
                       "requests pick one with ?index=NAME (the clip-retrieval API with "
                       "indice_name), and those naming none get the first. Without --model "
                       "each index is searched with the model that built it.")
    p.add_argument("index", nargs="+", metavar="[NAME=]INDEX", help="an index folder, "
                   "named after the folder, or NAME=FOLDER (a name: letters, digits, '.', "
                   "'_' and '-'; names must differ; the name ends at the first '=', so a "
                   "folder whose path holds one needs a name)")
    p.add_argument("--host", default="127.0.0.1", help="address (default loopback only)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--allowed-hosts", type=_names, metavar="NAME,NAME", help="Host header "
                   "values answered, any port (others get 400, which stops DNS rebinding); "
                   "default: the names of --host (localhost, 127.0.0.1 and [::1] for loopback; "
                   "for 0.0.0.0 also this machine's name); '*' answers any")
    a = p.add_argument_group("access")
    a.add_argument("--token-file", type=Path, metavar="FILE", help="file holding the access "
                   "token every API request must send as 'Authorization: Bearer TOKEN' (at "
                   "least 16 characters; the page asks for it once); default: the environment "
                   "variable CLIPFORGE_API_TOKEN, else no token, which only loopback allows")
    a.add_argument("--insecure-no-auth", action="store_true", help="serve a non-loopback "
                   "--host without a token: whoever reaches it reads every indexed image")
    a.add_argument("--tls-cert", type=Path, metavar="FILE", help="serve HTTPS with this "
                   "certificate (PEM, the chain after it); needs --tls-key. Without both: "
                   "plain HTTP, for loopback or behind a TLS-terminating proxy")
    a.add_argument("--tls-key", type=Path, metavar="FILE", help="the certificate's private "
                   "key (PEM, unencrypted); needs --tls-cert")
    a.add_argument("--cors-origins", metavar="URL,URL", help="web sites whose pages may call "
                   "the API from a browser (CORS), as scheme://host[:port], e.g. "
                   "https://app.example; '*' is refused; default: none, only the server's own "
                   "page")
    a.add_argument("--allow-image-urls", action="store_true", help="let /knn-service "
                   "(clip-retrieval's API) fetch a query image from an http(s) image_url: the "
                   "server then makes requests wherever a client points it, so leave it off "
                   "unless the clients are trusted")
    g = p.add_argument_group("limits (defaults in clipforge.search.server)")
    g.add_argument("--max-upload-mb", type=int, default=20, help="larger uploads get 413")
    g.add_argument("--header-timeout", type=_positive(float), metavar="S", help="seconds a "
                   "client has to send a request's headers (default 10)")
    g.add_argument("--body-timeout", type=_positive(float), metavar="S", help="seconds a "
                   "request body may take to arrive; slower ones get 408 (default 60)")
    g.add_argument("--keep-alive", type=_positive(float), metavar="S", help="seconds an idle "
                   "connection is kept open between requests (default 5)")
    g.add_argument("--max-connections", type=_positive(int), metavar="N", help="open "
                   "connections; requests beyond get 503; 0: no limit (default 128)")
    g.add_argument("--max-client-requests", type=_positive(int), metavar="N", help="requests "
                   "one client address may have in flight; more get 429 with Retry-After; 0: "
                   "no limit (default 8)")
    g.add_argument("--decode-budget-mpx", type=_positive(float), metavar="MPX", help="megapixels "
                   "of uploaded images decoded at once; an upload that finds none free within "
                   "2 s gets 503 with Retry-After (default 100)")
    _memory_option(g)
    add_model_options(p, default=None, default_help="each index's own: the model that "
                      "built it. Given, it is loaded for every index, each of which must have "
                      "been built with it")
    p.set_defaults(handler=cmd_serve)

"""The ``clipforge`` command line: models, classify, embed, convert, train, eval, plots, rank,
score, samples; index, search and serve (in :mod:`clipforge.search.commands`)."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .configs import ACTIVATIONS, ARCHITECTURES
from .factory import create_model
from .fileio import atomic_directory, atomic_file
from .inference import embed_images, embed_texts, find_images
from .model import CLIP
from .weights import FORMATS, save_model
from .weights.pretrained import PRETRAINED, pretrained_tags

log = logging.getLogger("clipforge")


DEFAULT_MODEL = "ViT-B-32"
FAST_DECODE_HELP = ("decode large JPEGs at a reduced scale (PIL draft mode): several times "
                    "faster for camera photos, embeddings within 1e-5 cosine of the exact path")


def _add_model_options(parser: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL,
                       default_help: str = DEFAULT_MODEL) -> None:
    parser.add_argument("--model", default=default,
                        help="architecture name, checkpoint file, model directory or "
                             f"hf-hub:org/repo (default {default_help})")
    parser.add_argument("--weights", help="with an architecture name: pretrained tag, "
                        "hf-hub:org/repo or a checkpoint file (default: the first published "
                        "tag listed by `clipforge models`, e.g. openai)")
    parser.add_argument("--activation", choices=ACTIVATIONS,
                        help="override the activation (bare state dicts default to quick_gelu)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "int8"), default="fp32",
                        help="fp32 (exact), bf16 or int8 (faster on CPUs with AVX-512 bf16 / "
                        "VNNI; accuracy in docs/benchmarks.md)")
    parser.add_argument("--backend", choices=("torch", "onnx"),
                        help="onnx: run an export directory (`clipforge export onnx`) with "
                        "onnxruntime (default: onnx for an export directory, else torch)")


def _weights_for(name: str, weights: str | None) -> str | None:
    """The weights the command line uses: those given, else a bare architecture name's first
    published tag (None for the tiny test configs, which are randomly initialised)."""
    if weights is None and name in ARCHITECTURES:
        tags = pretrained_tags(name)
        if tags:
            log.info("using %s weights %r (choose others with --weights)", name, tags[0])
            return tags[0]
        log.warning("%s has no published weights: using a random initialisation, whose "
                    "outputs are meaningless until it is trained", name)
    return weights


def _load(name: str, weights: str | None, activation: str | None, device: str = "cpu",
          precision: str = "fp32", backend: str | None = None) -> CLIP:
    """The model a command runs: PyTorch, or onnxruntime for an ONNX export directory."""
    from .onnx.manifest import MANIFEST

    if backend == "onnx" or (backend is None and (Path(name) / MANIFEST).is_file()):
        if not (Path(name) / MANIFEST).is_file():
            raise ValueError(f"--backend onnx needs an export directory, and {name} is not "
                             "one; write one with `clipforge export onnx MODEL --out DIR`")
        if weights or activation or device != "cpu" or precision == "bf16":
            raise ValueError("an ONNX export runs as exported on the CPU: leave out --weights, "
                             "--activation and --device, and use --precision fp32 or int8")
        from .onnx import load_onnx

        return load_onnx(name, variant=precision)  # type: ignore[return-value]
    return create_model(name, weights=_weights_for(name, weights), device=device,
                        activation=activation, precision=precision)


def _model(args: argparse.Namespace) -> CLIP:
    """:func:`_load` with a command's model options."""
    return _load(args.model, args.weights, args.activation, args.device, args.precision,
                 args.backend)


def cmd_models(args: argparse.Namespace) -> int:
    rows = []
    for name, config in ARCHITECTURES.items():
        with torch.device("meta"):
            params = sum(p.numel() for p in CLIP(config).parameters())
        tags = ", ".join(PRETRAINED.get(name, {})) or "-"
        rows.append((name, "ViT" if config.vision.is_vit else "ResNet", str(config.image_size),
                     str(config.embed_dim), f"{params / 1e6:.1f}M", config.activation, tags))
    header = ("model", "tower", "image", "embed", "params", "activation", "pretrained weights")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if len(labels) < 2:
        raise SystemExit("error: --labels needs at least two comma-separated labels")
    if "{}" not in args.template:
        raise SystemExit(f"error: --template {args.template!r} has no '{{}}' for the label")
    paths = find_images(args.images)
    if not paths:
        raise SystemExit(f"error: no image files in {' '.join(args.images)}")
    model = _model(args)
    prompts = [args.template.format(label) for label in labels]
    text = torch.from_numpy(embed_texts(model, prompts, progress=False, truncate=True).vectors)
    images = embed_images(model, paths, batch_size=args.batch_size, progress=False)
    scale = model.logit_scale.exp().item()
    probs = (scale * torch.from_numpy(images.vectors) @ text.T).softmax(dim=-1)
    results = []
    for path, row in zip(images.ids, probs):
        order = row.argsort(descending=True)
        results.append({"image": path, "predictions": [
            {"label": labels[i], "probability": round(row[i].item(), 6)} for i in order]})
    if args.plot:
        from .evaluation.plots import plot_topk

        plot_topk([Path(p) for p in images.ids], labels, probs, args.plot, k=args.top)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps({"model": args.model, "results": results,
                          "skipped": [{"image": p, "error": e} for p, e in images.failures]},
                         indent=2))
    else:
        for result in results:
            print(result["image"])
            for pred in result["predictions"][: args.top]:
                print(f"  {pred['probability']:7.2%}  {pred['label']}")
    for _, error in images.failures:
        print(f"skipped: {error}", file=sys.stderr)
    return 1 if not results else 0


def _read_lines(path: str, what: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file, or a clear error naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SystemExit(f"error: {what} {path} is not UTF-8 text (byte {exc.start}: "
                         f"{exc.reason}); save it as UTF-8") from None
    except OSError as exc:
        raise SystemExit(f"error: cannot read {what} {path}: {exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def cmd_plot_similarity(args: argparse.Namespace) -> int:
    from .evaluation.plots import plot_similarity

    texts = list(args.texts or []) + (_read_lines(args.texts_file, "--texts-file")
                                      if args.texts_file else [])
    paths = find_images(args.images)
    if not paths or not texts:
        raise SystemExit("error: give image files (--images) and texts (--texts or "
                         "--texts-file)")
    model = _model(args)
    try:
        result = plot_similarity(paths, texts, model, args.out, truncate=args.truncate,
                                 vmin=args.vmin, vmax=args.vmax)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    for item, reason in result.skipped_images + result.skipped_texts:
        print(f"skipped {item}: {reason}", file=sys.stderr)
    print(f"wrote {args.out} ({len(result.texts)} texts x {len(result.images)} images)")
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    from .evaluation.scoring import rank_images

    model = _model(args)
    ranked, skipped = rank_images(model, args.prompt, args.images, batch_size=args.batch_size,
                                  truncate=args.truncate)
    shown = ranked[: args.top] if args.top else ranked
    if args.json:
        print(json.dumps({"prompt": args.prompt,
                          "results": [{"image": p, "score": s} for p, s in shown],
                          "skipped": [{"image": p, "reason": r} for p, r in skipped]}, indent=2))
    else:
        for path, score in shown:
            print(f"{score:.4f}\t{path}")
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    return 0 if ranked else 1


def cmd_score(args: argparse.Namespace) -> int:
    from .evaluation.scoring import PREFIX, clip_score, pairs_from_csv

    if args.pairs:
        try:
            paths, captions = pairs_from_csv(args.pairs, args.csv_image_key, args.csv_caption_key)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"error: {exc}") from None
    elif args.images and args.captions:
        paths, captions = find_images(args.images), _read_lines(args.captions, "--captions")
        if len(paths) != len(captions):
            raise SystemExit(f"error: {len(paths)} images but {len(captions)} captions in "
                             f"{args.captions}: give one caption line per image, in the order "
                             "of the files (folders are listed sorted)")
    else:
        raise SystemExit("error: give --pairs FILE.csv, or --images and --captions")
    model = _model(args)
    result = clip_score(model, paths, captions, w=args.w, batch_size=args.batch_size,
                        prefix="" if args.no_prefix else PREFIX, truncate=args.truncate)
    if args.json:
        print(json.dumps({"mean": None if result.scored == 0 else result.mean,
                          "scored": result.scored, "w": args.w, "rows": result.rows()},
                         indent=2))
    else:
        for row in result.rows():
            score = "skipped" if row["score"] is None else f"{row['score']:.4f}"
            print(f"{score}\t{row['image']}\t{row['caption']}")
        if result.scored:
            print(f"CLIPScore (w={args.w}): {result.mean:.4f} over {result.scored} pair(s)")
    for index, reason in result.skipped:
        print(f"skipped pair {index + 1}: {reason}", file=sys.stderr)
    return 0 if result.scored else 1


def _int_list(text: str | None, what: str) -> list[int]:
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: {what} takes comma-separated integers, got {text!r}") from None


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation.tasks import EvalOptions, _strict, evaluate, write_result

    options = EvalOptions(
        task=args.task, split=args.split, dataset_name=args.dataset_name,
        classnames=args.classnames, templates=args.templates, train=args.train,
        few_shot=_int_list(args.few_shot, "--few-shot"),
        seeds=_int_list(args.seeds, "--seeds") or [0], image_key=args.csv_image_key,
        label_key=args.csv_label_key, caption_key=args.csv_caption_key,
        batch_size=args.batch_size, workers=args.workers, progress=not args.no_progress)
    weights = _weights_for(args.model, args.weights)
    model = _load(args.model, weights, args.activation, args.device, args.precision, args.backend)
    record = evaluate(model, args.dataset, options, model_name=str(args.model),
                      pretrained=weights or "")
    for item in record.get("skipped", []):
        print(f"skipped {item['item']}: {item['reason']}", file=sys.stderr)
    print(json.dumps(_strict({k: record[k] for k in ("dataset", "model", "pretrained", "task",
                                                      "metrics")}), indent=2))
    if args.output:
        write_result(record, args.output)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def cmd_eval_table(args: argparse.Namespace) -> int:
    from .evaluation.tasks import merge_results

    paths = [p for pattern in args.results for p in (sorted(Path().glob(pattern))
                                                      if any(c in pattern for c in "*?[")
                                                      else [Path(pattern)])]
    if not paths:
        raise SystemExit(f"error: no result files match {' '.join(args.results)}")
    table = merge_results(paths)
    if args.out:
        with atomic_file(args.out) as tmp:
            tmp.write_text(table, encoding="utf-8")
        print(f"wrote {args.out} ({len(paths)} results)", file=sys.stderr)
    else:
        print(table, end="")
    return 0


def _write_table(path: Path, header: tuple[str, ...], rows: list[tuple]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def cmd_embed(args: argparse.Namespace) -> int:
    from .inference import name_bytes_hex, printable_name

    if not args.images and not args.texts:
        raise SystemExit("error: give --images and/or --texts")
    texts: list[str] = []
    if args.texts:
        try:
            texts = [line.rstrip("\n") for line in
                     Path(args.texts).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise SystemExit(f"error: cannot read --texts {args.texts}: {exc}") from None
    paths = find_images(args.images or [])
    if args.images and not paths:
        raise SystemExit(f"error: no image files in {' '.join(args.images)}")
    model = _model(args)
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


def cmd_convert(args: argparse.Namespace) -> int:
    from .weights import check_save_destination

    check_save_destination(args.dst, args.to)  # refuse a foreign folder before loading
    model = _load(args.src, args.weights, args.activation)
    save_model(model, args.dst, format=args.to)
    print(f"wrote {args.dst} ({args.to} format, activation {model.config.activation})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .onnx import export_onnx
    from .onnx.manifest import MANIFEST

    model = _load(args.model, args.weights, args.activation)
    out = export_onnx(model, args.out, opset=args.opset, quantize="int8" if args.int8 else None,
                      verify=not args.no_verify)
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    print(f"wrote {out} (opset {manifest.get('opset')}; checked against PyTorch: "
          f"{json.dumps(manifest.get('verification'))})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .training.loop import TrainConfig, train

    output = args.output or Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
    options = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    options["output"] = output
    options["progress"] = not args.no_progress
    train(TrainConfig(**options))
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    from .samples import write_sample_photos

    for path in write_sample_photos(args.directory):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list architectures and known pretrained weights")

    p = sub.add_parser("classify", help="zero-shot classify images against text labels")
    p.add_argument("images", nargs="+", help="image files or directories")
    p.add_argument("--labels", required=True, help='comma-separated, e.g. "cat,dog,a diagram"')
    p.add_argument("--template", default="a photo of a {}.", help="prompt with {} for the label")
    p.add_argument("--top", type=int, default=5, help="labels shown per image")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--plot", type=Path, help="also draw each image's top labels as bars "
                   "(.png or .svg)")
    _add_model_options(p)

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
    _add_model_options(p)

    p = sub.add_parser("rank", help="order images by similarity to a prompt")
    p.add_argument("images", nargs="+", help="image files or directories")
    p.add_argument("--prompt", required=True)
    p.add_argument("--top", type=int, default=0, help="show only the best N (default all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--truncate", action="store_true", help="cut an over-long prompt")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_model_options(p)

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
    _add_model_options(p)

    p = sub.add_parser("embed", help="write normalised image/text embeddings (.npy + .csv ids)")
    p.add_argument("--images", nargs="+", help="image files or directories")
    p.add_argument("--texts", help="text file, one text per line")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="image decoding processes")
    p.add_argument("--fast-decode", action="store_true", help=FAST_DECODE_HELP)
    p.add_argument("--truncate", action="store_true", help="cut over-long texts instead of "
                   "skipping them")
    _add_model_options(p)

    p = sub.add_parser("convert", help="convert weights between formats")
    p.add_argument("src", help="checkpoint file, model directory, hf-hub:org/repo or a name")
    p.add_argument("dst", type=Path, help="new or empty directory, one clipforge wrote before "
                   "(replaced), or a .safetensors file")
    p.add_argument("--to", choices=FORMATS, default="clipforge")
    p.add_argument("--weights", help="with an architecture name: tag, hf-hub:org/repo or file")
    p.add_argument("--activation", choices=ACTIVATIONS)

    p = sub.add_parser("export", help="export the image and text encoders for deployment",
                       description="Write the two encoders as ONNX graphs (dynamic batch and "
                       "text length) with the tokenizer vocabulary and a manifest describing "
                       "preprocessing; run them with `--backend onnx` or clipforge.onnx.OnnxCLIP, "
                       "without PyTorch.")
    p.add_argument("format", choices=("onnx",))
    p.add_argument("model", help="architecture name, checkpoint file, model directory or "
                   "hf-hub:org/repo")
    p.add_argument("--out", required=True, type=Path, help="export directory")
    p.add_argument("--weights", help="with an architecture name: tag, hf-hub:org/repo or file")
    p.add_argument("--activation", choices=ACTIVATIONS)
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--int8", action="store_true", help="also write int8 graphs (dynamic "
                   "quantisation of the matrix products; `--precision int8` runs them)")
    p.add_argument("--no-verify", action="store_true", help="skip running the graphs against "
                   "PyTorch after export")

    from .training.loop import TrainConfig, setting_names

    def default(name: str):  # one source of truth for the training defaults
        return TrainConfig.__dataclass_fields__[name].default

    p = sub.add_parser("train", help="contrastive pretraining (built-in data by default)",
                       description="Train a CLIP model. With no --data it trains "
                       f"{default('model')} on "
                       "the built-in procedural dataset and evaluates it zero-shot. Scale out "
                       "with `torchrun --nproc_per_node N -m clipforge train ...`.")
    p.add_argument("--data", default=default("data"), help="builtin, a CSV/TSV of image paths "
                   "and captions, a folder of images with same-name .txt captions, or webdataset "
                   "shards ('shards/{00000..00099}.tar')")
    p.add_argument("--output", type=Path, help="run directory (default runs/train-DATE-TIME)")
    p.add_argument("--model", default=default("model"),
                   help="architecture, or a model to fine-tune")
    p.add_argument("--weights", help="initial weights for an architecture name")
    p.add_argument("--activation", choices=ACTIVATIONS)
    p.add_argument("--steps", type=int, default=default("steps"))
    p.add_argument("--batch-size", type=int, default=default("batch_size"),
                   help="global batch (all processes)")
    p.add_argument("--micro-batch", type=int, help="GradCache: exact large batches, computing "
                   "at most this many examples with a graph at once")
    p.add_argument("--lr", type=float, default=default("lr"))
    p.add_argument("--warmup", type=int, default=default("warmup"))
    p.add_argument("--weight-decay", type=float, default=default("weight_decay"))
    p.add_argument("--grad-clip", type=float, default=default("grad_clip"),
                   help="max gradient norm (0: off)")
    p.add_argument("--loss", choices=("clip", "siglip"), default=default("loss"))
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                   default=default("precision"),
                   help="bf16 autocast (CPU/GPU), fp16 with a gradient scaler (GPU); auto: "
                   "bf16 where the hardware computes it natively, else fp32")
    p.add_argument("--patch-dropout", type=float, default=default("patch_dropout"),
                   help="FLIP: share of patches dropped while training (ViT)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--lock-image", action="store_true", help="LiT: freeze the image tower")
    p.add_argument("--lock-text", action="store_true", help="freeze the text tower")
    p.add_argument("--workers", type=int, default=default("workers"),
                   help="data loading processes per rank")
    p.add_argument("--seed", type=int, default=default("seed"))
    p.add_argument("--checkpoint-every", type=int, default=default("checkpoint_every"))
    p.add_argument("--keep-checkpoints", type=int, default=default("keep_checkpoints"))
    p.add_argument("--resume", help="'latest' (in --output) or a checkpoint file")
    p.add_argument("--resume-override", type=setting_names, default=(), metavar="NAME[,NAME]",
                   help="with --resume: accept these changed settings (e.g. steps,lr); others "
                   "that shape the result must stay as the run had them")
    p.add_argument("--log-every", type=int, default=default("log_every"))
    p.add_argument("--eval-every", type=int, default=default("eval_every"),
                   help="zero-shot eval every N steps (built-in data)")
    p.add_argument("--tensorboard", action="store_true")
    p.add_argument("--device", default=default("device"))
    p.add_argument("--csv-image-key", default=default("csv_image_key"))
    p.add_argument("--csv-caption-key", default=default("csv_caption_key"))
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("eval", help="zero-shot classification, retrieval or linear-probe "
                       "evaluation of one dataset (CLIP_benchmark's result format)",
                       description="Evaluate a model on a dataset: an ImageFolder tree, a "
                       "CSV/TSV (image path and label, or caption), webdataset shards, or a "
                       "CLIP_benchmark webdataset export. Prints the metrics; --output writes "
                       "the full record as JSON.")
    p.add_argument("dataset", help="dataset path or shard pattern")
    p.add_argument("--task", default="auto", choices=("auto", "zeroshot_classification",
                                                      "zeroshot_retrieval", "linear_probe"),
                   help="auto: retrieval for captioned data, else zero-shot classification")
    p.add_argument("--output", type=Path, help="write the result record (JSON) here")
    p.add_argument("--dataset-name", help="name recorded in the result (default: the folder "
                   "name); also picks the known prompts of that dataset")
    p.add_argument("--classnames", help="class names: a file (one per line, or JSON), or a "
                   "known dataset name such as imagenet1k")
    p.add_argument("--templates", help="prompt templates: a file (one per line with {}, JSON "
                   "list, or JSON object of per-class lists), or a known dataset name")
    p.add_argument("--split", default="test", help="split of a CLIP_benchmark export or of "
                   "DIR/<split> folders (default test)")
    p.add_argument("--train", help="linear probe: the training set (default: the dataset's "
                   "train split)")
    p.add_argument("--few-shot", help="linear probe: also k-shot probes, e.g. 1,2,4,8,16")
    p.add_argument("--seeds", default="0,1,2", help="few-shot draws (default 0,1,2)")
    p.add_argument("--csv-image-key", default="filepath")
    p.add_argument("--csv-label-key", default="label")
    p.add_argument("--csv-caption-key", default="title")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="image decoding processes")
    p.add_argument("--no-progress", action="store_true")
    _add_model_options(p)

    p = sub.add_parser("eval-table", help="merge evaluation result files into one CSV table")
    p.add_argument("results", nargs="+", help="result JSON files (clipforge eval --output or "
                   "CLIP_benchmark), or glob patterns")
    p.add_argument("--out", type=Path, help="write the CSV here (default: print it)")

    p = sub.add_parser("samples", help="write scikit-image's sample photos as PNG files")
    p.add_argument("directory", type=Path)
    _search_commands(sub)
    return parser


def _search_commands(sub: argparse._SubParsersAction) -> None:
    from .search.commands import add_search_commands

    COMMANDS.update(add_search_commands(sub))


COMMANDS = {"models": cmd_models, "classify": cmd_classify, "embed": cmd_embed,
            "convert": cmd_convert, "export": cmd_export, "train": cmd_train,
            "samples": cmd_samples,
            "plot-similarity": cmd_plot_similarity, "rank": cmd_rank, "score": cmd_score,
            "eval": cmd_eval, "eval-table": cmd_eval_table}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

"""``clipforge classify``: zero-shot classification of image files against text labels, with
the model's own probabilities (:class:`~clipforge.evaluation.zeroshot.ZeroShotClassifier`:
softmax over the labels, or a sigmoid per label for SigLIP-style models).  Without ``--labels``,
a fine-tuned model (``clipforge finetune``) answers with its own classes and head
(``model.classifier``, :class:`~clipforge.classifier.LinearClassifier`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..classifier import LinearClassifier
from ..encoder import Encoder
from ..evaluation.zeroshot import ZeroShotClassifier
from ..inference import embed_images
from ..reading import find_images
from .options import add_model_options, load_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="zero-shot classify images against text labels, or "
                       "with a fine-tuned model's own classes")
    p.add_argument("images", nargs="+", help="image files or directories")
    p.add_argument("--labels", help='comma-separated, e.g. "cat,dog,a diagram" (zero-shot); '
                   "default: the classes of a model written by `clipforge finetune`")
    p.add_argument("--template", default="a photo of a {}.", help="prompt with {} for the label")
    p.add_argument("--top", type=int, default=5, help="labels shown per image")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--plot", type=Path, help="also draw each image's top labels as bars "
                   "(.png or .svg)")
    add_model_options(p)
    p.set_defaults(handler=run)


def _labels(text: str, template: str) -> list[str]:
    """The zero-shot labels of ``--labels``, checked with ``--template``."""
    labels = [label.strip() for label in text.split(",") if label.strip()]
    if len(labels) < 2:
        raise SystemExit("error: --labels needs at least two comma-separated labels")
    if "{}" not in template:
        raise SystemExit(f"error: --template {template!r} has no '{{}}' for the label")
    return labels


def _classifier(model: Encoder, args: argparse.Namespace
                ) -> ZeroShotClassifier | LinearClassifier:
    """Zero-shot over ``--labels`` when given, else the model's own classifier."""
    if args.labels is not None:
        return ZeroShotClassifier.build(model, _labels(args.labels, args.template),
                                        [args.template])
    own = getattr(model, "classifier", None)
    if own is None:
        raise SystemExit(f"error: {args.model} has no classes of its own (only a model written "
                         "by `clipforge finetune` has); give --labels to classify zero-shot")
    return own


def run(args: argparse.Namespace) -> int:
    if args.labels is not None:
        _labels(args.labels, args.template)  # before loading the model
    paths = find_images(args.images)
    if not paths:
        raise SystemExit(f"error: no image files in {' '.join(args.images)}")
    model = load_model(args)
    classifier = _classifier(model, args)
    labels = classifier.classnames
    images = embed_images(model, paths, batch_size=args.batch_size, progress=False)
    probs = classifier.predict_proba(torch.from_numpy(images.vectors))
    results = []
    for path, row in zip(images.ids, probs):
        order = row.argsort(descending=True)
        results.append({"image": path, "predictions": [
            {"label": labels[i], "probability": round(row[i].item(), 6)} for i in order]})
    if args.plot:
        from ..evaluation.plots import plot_topk

        plot_topk([Path(p) for p in images.ids], labels, probs, args.plot, k=args.top)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps({"model": args.model, "results": results,
                          "skipped": [{"image": p, "error": e} for p, e in images.failures]},
                         indent=2))
    else:
        _print(results, args.top)
    for _, error in images.failures:
        print(f"skipped: {error}", file=sys.stderr)
    return 1 if not results else 0


def _print(results: list[dict], top: int) -> None:
    for result in results:
        print(result["image"])
        for pred in result["predictions"][:top]:
            print(f"  {pred['probability']:7.2%}  {pred['label']}")

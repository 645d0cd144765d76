"""``clipforge eval`` (one task on one dataset, CLIP_benchmark's result format, through
:mod:`clipforge.evaluation.tasks`) and ``clipforge eval-table`` (results merged into a CSV).

The evaluation tasks import scikit-learn (a second to load), so they are imported when an
evaluation runs, not when the command line is parsed."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..factory import create_model
from ..fileio import atomic_file
from .options import add_model_options, model_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="zero-shot classification, retrieval, linear-probe or "
                       "caption-selection evaluation of one dataset (CLIP_benchmark's result "
                       "format)",
                       description="Evaluate a model on a dataset: an ImageFolder tree, a "
                       "CSV/TSV (image path and label, or caption), webdataset shards, a "
                       "CLIP_benchmark webdataset export, or a SugarCrepe / Winoground file. "
                       "Prints the metrics; --output writes the full record as JSON.")
    p.add_argument("dataset", help="dataset path or shard pattern")
    p.add_argument("--task", default="auto", choices=("auto", "zeroshot_classification",
                                                      "zeroshot_retrieval", "linear_probe",
                                                      "image_caption_selection"),
                   help="auto: caption selection for a JSON/JSONL file, retrieval for "
                   "captioned data, else zero-shot classification")
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
    p.add_argument("--images", help="image_caption_selection: the folder the file's images "
                   "are looked up in first (default: beside the file, its val2017/ or images/)")
    p.add_argument("--csv-image-key", default="filepath")
    p.add_argument("--csv-label-key", default="label")
    p.add_argument("--csv-caption-key", default="title")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="image decoding processes")
    p.add_argument("--no-progress", action="store_true")
    add_model_options(p)
    p.set_defaults(handler=run_eval)

    p = sub.add_parser("eval-table", help="merge evaluation result files into one CSV table")
    p.add_argument("results", nargs="+", help="result JSON files (clipforge eval --output or "
                   "CLIP_benchmark), or glob patterns")
    p.add_argument("--out", type=Path, help="write the CSV here (default: print it)")
    p.set_defaults(handler=run_table)


def _int_list(text: str | None, what: str) -> list[int]:
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: {what} takes comma-separated integers, got {text!r}") from None


def run_eval(args: argparse.Namespace) -> int:
    from ..evaluation.tasks import EvalOptions, _strict, evaluate, write_result  # scikit-learn

    options = EvalOptions(
        task=args.task, split=args.split, dataset_name=args.dataset_name,
        classnames=args.classnames, templates=args.templates, train=args.train,
        few_shot=_int_list(args.few_shot, "--few-shot"),
        seeds=_int_list(args.seeds, "--seeds") or [0], image_key=args.csv_image_key,
        label_key=args.csv_label_key, caption_key=args.csv_caption_key, images=args.images,
        batch_size=args.batch_size, workers=args.workers, progress=not args.no_progress)
    arguments = model_arguments(args, args.model)
    model = create_model(args.model, **arguments)
    record = evaluate(model, args.dataset, options, model_name=str(args.model),
                      pretrained=arguments["weights"] or "")
    for item in record.get("skipped", []):
        print(f"skipped {item['item']}: {item['reason']}", file=sys.stderr)
    print(json.dumps(_strict({k: record[k] for k in ("dataset", "model", "pretrained", "task",
                                                      "metrics")}), indent=2))
    if args.output:
        write_result(record, args.output)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def run_table(args: argparse.Namespace) -> int:
    from ..evaluation.tasks import merge_results

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

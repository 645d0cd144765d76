"""``clipforge eval``: one dataset, one task, one result in CLIP_benchmark's JSON format.

Tasks, as CLIP_benchmark names them:

* ``zeroshot_classification`` -- class embeddings from prompt templates, acc@1, acc@5 and mean
  per-class recall;
* ``zeroshot_retrieval`` -- image->text and text->image recall@1/5/10 with several captions per
  image, computed in blocks (no full similarity matrix);
* ``linear_probe`` -- the paper's probe on frozen features (scikit-learn L-BFGS, C swept on a
  validation split), optionally k-shot probes averaged over seeds;
* ``image_caption_selection`` -- SugarCrepe and Winoground: does each image prefer its own
  caption to the hard negatives, and each caption its own image (:mod:`.caption_selection`).

The result record uses CLIP_benchmark's field names (``dataset``, ``model``, ``pretrained``,
``task``, ``metrics.acc1`` ...), so tables built from either tool line up; clipforge adds what it
skipped and how the prompts were chosen.  :func:`merge_results` turns many records into one CSV
table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_file
from ..model import CLIP
from ..prompts import UnknownDatasetError, get_prompts, load_templates
from .caption_selection import TASK as CAPTION_SELECTION
from .caption_selection import caption_selection
from .datasets import (
    ClassificationData,
    embed_classification,
    embed_retrieval,
    is_clip_benchmark_dir,
    load_classification,
    load_retrieval,
)
from .linear_probe import few_shot_probe, linear_probe
from .metrics import classification_metrics
from .retrieval import retrieval_recall
from .zeroshot import ZeroShotClassifier

TASKS = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe", CAPTION_SELECTION)
DEFAULT_TEMPLATES = ("a photo of a {}.",)
RECALL_KS = (1, 5, 10)


@dataclass
class EvalOptions:
    """What ``clipforge eval`` was asked, apart from the model and the dataset."""

    task: str = "auto"
    split: str = "test"
    dataset_name: str | None = None
    classnames: str | None = None  # a file, or a known dataset name (clipforge.prompts)
    templates: str | None = None  # likewise
    train: str | None = None  # linear probe: the training set (default: split "train")
    few_shot: Sequence[int] = ()
    seeds: Sequence[int] = (0, 1, 2)
    image_key: str = "filepath"
    label_key: str = "label"
    caption_key: str = "title"
    images: str | None = None  # image_caption_selection: the folder images are looked up in
    batch_size: int = 64
    workers: int = 0
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_task(dataset: str, task: str, caption_key: str, label_key: str) -> str:
    """``auto``: caption selection for a JSON or JSON-lines file (SugarCrepe, Winoground: no
    other dataset format is JSON), retrieval for captioned data (a CLIP_benchmark export of type
    retrieval, a CSV with a caption column and no label column, a folder of images with
    same-name .txt files), zero-shot classification otherwise."""
    if task != "auto":
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose auto or one of {', '.join(TASKS)}")
        return task
    path = Path(dataset)
    if path.is_file() and path.suffix.lower() in (".json", ".jsonl"):
        return CAPTION_SELECTION
    if path.is_dir() and is_clip_benchmark_dir(path):
        kind = path / "dataset_type.txt"
        retrieval = kind.is_file() and kind.read_text(encoding="utf-8").strip() == "retrieval"
    elif path.suffix.lower() in (".csv", ".tsv") and path.is_file():
        with path.open(encoding="utf-8-sig", errors="replace") as f:
            header = next(csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv"
                                     else ","), [])
        retrieval = caption_key in header and label_key not in header
    elif path.is_dir():
        retrieval = any(p.with_suffix(".txt").is_file() for p in path.rglob("*")
                        if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    else:
        retrieval = False
    return "zeroshot_retrieval" if retrieval else "zeroshot_classification"


def _known_prompts(name: str | None):
    if not name:
        return None
    try:
        return get_prompts(name)
    except UnknownDatasetError:
        return None


def _classnames_option(value: str | None) -> Any:
    """``--classnames``: a file, or the name of a dataset whose curated names ship with
    clipforge (``imagenet1k`` for an ImageFolder of WordNet ids)."""
    if value is None or Path(value).exists():
        return value
    known = _known_prompts(value)
    if known is None:
        raise ValueError(f"--classnames {value!r} is neither a file nor a known dataset name "
                         "(clipforge.prompts.DATASETS)")
    return list(known.classnames)


def choose_templates(data: ClassificationData, option: str | None
                     ) -> tuple[list[str] | dict[str, list[str]], str]:
    """The templates and where they came from: ``--templates`` (a file or a known dataset
    name), else those shipped with the data, else the known prompts of a dataset of that name,
    else ``a photo of a {}.``."""
    if option:
        if Path(option).exists():
            return load_templates(option, data.classnames), f"file {option}"
        known = _known_prompts(option)
        if known is None:
            raise ValueError(f"--templates {option!r} is neither a file nor a known dataset "
                             "name (clipforge.prompts.DATASETS)")
        return list(known.templates), f"clipforge.prompts {option}"
    if data.templates:
        return list(data.templates), "shipped with the dataset"
    known = _known_prompts(data.name)
    if known is not None:
        return list(known.templates), f"clipforge.prompts {data.name}"
    return list(DEFAULT_TEMPLATES), "default"


def _failures(items: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"item": item, "reason": reason} for item, reason in items]


def _load_classification(spec: str, options: EvalOptions, split: str) -> ClassificationData:
    return load_classification(spec, split=split, classnames=_classnames_option(
        options.classnames), image_key=options.image_key, label_key=options.label_key,
        name=options.dataset_name)


def zeroshot_classification(model: CLIP, dataset: str, options: EvalOptions) -> dict[str, Any]:
    data = _load_classification(dataset, options, options.split)
    templates, source = choose_templates(data, options.templates)
    classifier = ZeroShotClassifier.build(model, data.classnames, templates,
                                          progress=options.progress)
    embedded = embed_classification(model, data, batch_size=options.batch_size,
                                    num_workers=options.workers, progress=options.progress)
    logits = classifier.logits(torch.from_numpy(embedded.vectors))
    metrics = classification_metrics(logits, torch.from_numpy(embedded.targets))
    count = len(templates) if isinstance(templates, list) else \
        sum(len(t) for t in templates.values())
    return {"dataset": data.name, "metrics": metrics, "n_images": len(embedded.targets),
            "n_classes": len(data.classnames), "templates": {"source": source, "count": count},
            "skipped": _failures(embedded.failures)}


def zeroshot_retrieval(model: CLIP, dataset: str, options: EvalOptions) -> dict[str, Any]:
    data = load_retrieval(dataset, split=options.split, image_key=options.image_key,
                          caption_key=options.caption_key, name=options.dataset_name)
    embedded = embed_retrieval(model, data, batch_size=options.batch_size,
                               num_workers=options.workers, progress=options.progress)
    metrics = retrieval_recall(torch.from_numpy(embedded.image_vectors),
                               torch.from_numpy(embedded.text_vectors),
                               embedded.text_to_image.tolist(), ks=RECALL_KS)
    return {"dataset": data.name, "metrics": metrics, "n_images": len(embedded.ids),
            "n_captions": len(embedded.captions), "skipped": _failures(embedded.failures)}


def probe(model: CLIP, dataset: str, options: EvalOptions) -> dict[str, Any]:
    """Linear probe: features of the training set (``--train``, or the dataset's ``train``
    split) and of the test split; the classes are the training set's."""
    train_spec = options.train or dataset
    train = _load_classification(train_spec, options, "train")
    test = _load_classification(dataset, options, options.split)
    if train.classnames != test.classnames:
        raise ValueError(f"the training set {train_spec} has classes {train.classnames[:5]}..., "
                         f"the test set {dataset} {test.classnames[:5]}...: they must be the "
                         "same list in the same order")
    kwargs = dict(batch_size=options.batch_size, num_workers=options.workers,
                  progress=options.progress)
    train_embedded = embed_classification(model, train, **kwargs)
    test_embedded = embed_classification(model, test, **kwargs)
    args = (train_embedded.vectors, train_embedded.targets, test_embedded.vectors,
            test_embedded.targets)
    full = linear_probe(*args)
    result: dict[str, Any] = {
        "dataset": test.name, "metrics": full["metrics"], "C": full["C"], "fits": full["fits"],
        "n_train": full["n_train"], "n_val": full["n_val"], "n_test": full["n_test"],
        "skipped": _failures(train_embedded.failures + test_embedded.failures)}
    if options.few_shot:
        shots = few_shot_probe(*args, shots=list(options.few_shot), seeds=list(options.seeds))
        result["few_shot"] = {str(k): {"metrics": v["metrics"], "std": v["std"],
                                       "seeds": list(options.seeds)} for k, v in shots.items()}
        for k, v in shots.items():
            result["metrics"][f"{k}_shot_acc1"] = v["metrics"]["acc1"]
    return result


def evaluate(model: CLIP, dataset: str, options: EvalOptions, model_name: str = "",
             pretrained: str = "") -> dict[str, Any]:
    """Run one task on one dataset; the record as CLIP_benchmark writes it, plus clipforge's
    details (what was skipped, prompts, sizes, seconds)."""
    task = resolve_task(dataset, options.task, options.caption_key, options.label_key)
    run = {"zeroshot_classification": zeroshot_classification,
           "zeroshot_retrieval": zeroshot_retrieval, "linear_probe": probe,
           CAPTION_SELECTION: caption_selection}[task]
    start = time.perf_counter()
    details = run(model, dataset, options)
    return {"dataset": details.pop("dataset"), "model": model_name, "pretrained": pretrained,
            "task": task, "metrics": details.pop("metrics"), "language": "en",
            **details, "seconds": round(time.perf_counter() - start, 2), **options.extra}


def _strict(value: Any) -> Any:
    """NaN (acc5 with fewer than five classes, as CLIP_benchmark reports it) as JSON null:
    Python writes NaN, which strict JSON readers refuse."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


def write_result(record: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(_strict(record), indent=2, allow_nan=False) + "\n",
                       encoding="utf-8")
    return path


def merge_results(paths: Sequence[str | os.PathLike[str]]) -> str:
    """CSV text with one row per result file: dataset, model, pretrained, task, then every
    metric that any file has (empty where a file lacks it).  Files that are not CLIP_benchmark
    or clipforge results are an error naming the file."""
    rows, metric_names = [], []
    for path in paths:
        try:
            record = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable result file ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
            raise ValueError(f"{path}: not an evaluation result (no 'metrics' object)")
        for name in record["metrics"]:
            if name not in metric_names:
                metric_names.append(name)
        rows.append(record)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["dataset", "model", "pretrained", "task", *metric_names])
    for r in rows:
        metrics = r["metrics"]
        writer.writerow([r.get("dataset", ""), r.get("model", ""), r.get("pretrained", ""),
                         r.get("task", ""), *(metrics.get(m, "") for m in metric_names)])
    return out.getvalue()

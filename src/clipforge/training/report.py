"""What a finished run reports: on the built-in dataset, zero-shot accuracy per prompt language
on the training distribution (seen and held-out compositions) and on shift suites training
never shows, a linear probe on the same suites (and the supervised baseline, when one was
trained into the run: :mod:`.baseline`), one prompt against the template ensemble, k-shot
probes against zero-shot, attribute binding with swapped hard negatives, image<->text
retrieval; then a printed table, ``eval.json``, ``robustness.json`` and the plots
(``loss.png``, ``robustness.png``, ``few_shot.png``, ``suites.png``).

The sizes of the evaluation sets are module constants, overridable by environment variables
(:data:`EVAL_IMAGES_ENV` ...) so that tests can evaluate tiny runs quickly.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..data import synthetic
from ..data.captions import LANGUAGE_NAMES, LANGUAGES, TEMPLATES, pair_phrase
from ..evaluation import retrieval_recall
from ..evaluation import robustness as rb
from ..evaluation.robustness import image_features as embed_images
from ..evaluation.robustness import text_features as embed_texts
from ..fileio import atomic_file

# Images per suite (a multiple of 40 keeps the seen-pair suites balanced, of 8 the held-out).
EVAL_IMAGES = 960
EVAL_IMAGES_ENV = "CLIPFORGE_EVAL_IMAGES"
# Labelled images per class for the linear probes (k-shot probes draw up to 16 of them).
PROBE_PER_CLASS = 32
PROBE_PER_CLASS_ENV = "CLIPFORGE_PROBE_PER_CLASS"
# Seeds the k-shot probes are averaged over.
FEW_SHOT_SEEDS: tuple[int, ...] = (0, 1, 2)
ROBUSTNESS_FILE = "robustness.json"
BASELINE_DIR = "baseline"

SUITE_LABELS = {"seen": "seen\ncompositions", "heldout": "held-out\ncompositions",
                "style": "other drawing\nstyles", "background": "other\nbackgrounds",
                "smaller": "smaller\nobjects", "larger": "larger\nobjects",
                "renderer": "independent\nrenderer"}


def _count(env: str, default: int) -> int:
    value = os.environ.get(env)
    if value is None:
        return default
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count <= 0:
        raise ValueError(f"{env}={value!r}: give a positive whole number (default {default})")
    return count


def machine() -> dict[str, Any]:
    """Where the figures were measured: bf16 kernels (and so the last digits of a run) differ
    between processors."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat()}


# --------------------------------------------------------------------------- evaluation

def evaluate_builtin(model, seed: int, n: int = 240) -> dict[str, float]:
    """The quick evaluation (``--eval-every``): zero-shot top-1 on seen and held-out
    compositions of the training distribution, with every language's prompts."""
    size = model.config.image_size
    result: dict[str, float] = {}
    suites = {}
    for name in ("seen", "heldout"):
        images, labels = synthetic.suite_set(name, n, seed=seed, image_size=size)
        suites[name] = rb.Labelled(embed_images(model, images), labels)
    for language in LANGUAGES:
        scores = rb.zero_shot(model, suites, synthetic.class_names(language), TEMPLATES[language])
        for name in suites:
            result[f"{language}/{name}_top1"] = scores[name]["top1"]
    return result


def evaluate_run(model, seed: int, baseline: Mapping[str, float] | None = None
                 ) -> dict[str, Any]:
    """The full evaluation of a run on the built-in dataset (see the module docstring)."""
    n = _count(EVAL_IMAGES_ENV, EVAL_IMAGES)
    per_class = _count(PROBE_PER_CLASS_ENV, PROBE_PER_CLASS)
    size = model.config.image_size
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 1)
        clock = now

    suites = {}
    for name in synthetic.SUITES:
        images, labels = synthetic.suite_set(name, n, seed=seed, image_size=size)
        suites[name] = rb.Labelled(embed_images(model, images), labels)
    images, labels = synthetic.probe_set(per_class * len(synthetic.CLASSNAMES), seed=seed,
                                         image_size=size)
    pool = rb.Labelled(embed_images(model, images), labels)
    lap("render and embed")

    shapes = len(synthetic.SHAPES)
    zero_shot, attributes = {}, {}
    for language in LANGUAGES:
        scores = rb.zero_shot(model, suites, synthetic.class_names(language), TEMPLATES[language])
        attributes[language] = {name: rb.attribute_accuracy(s.pop("predictions"),
                                                            suites[name].labels, shapes)
                                for name, s in scores.items()}
        zero_shot[language] = scores
    lap("zero-shot")

    classes = len(synthetic.CLASSNAMES)
    probe = rb.probe(pool, suites, classes, seed=seed)
    lap("linear probe")
    # k-shot probes and zero-shot on the same test set: the training distribution, every class
    test = rb.Labelled.concat([suites["seen"], suites["heldout"]])
    few_shot = rb.few_shot(pool, test, classes, probe["decay"],
                           shots=[k for k in rb.SHOTS if k <= per_class], seeds=FEW_SHOT_SEEDS)
    # (zero-shot on that union: the two suites have n images each)
    few_shot["zero_shot"] = {language: (zero_shot[language]["seen"]["top1"]
                                        + zero_shot[language]["heldout"]["top1"]) / 2
                             for language in LANGUAGES}
    lap("few-shot probes")

    images, pairs = synthetic.binding_set(n // 2, seed=seed, image_size=size)
    features = embed_images(model, images)
    binding = {language: rb.binding(model, features, *binding_captions(language, pairs))
               for language in LANGUAGES}
    lap("binding")

    retrieval = {}
    image_features = None
    for language in LANGUAGES:
        images, captions = synthetic.retrieval_set(n, seed=seed, image_size=size,
                                                   language=language)
        if image_features is None:  # the same scenes in every language
            image_features = embed_images(model, images)
        retrieval[language] = retrieval_recall(image_features, embed_texts(model, captions),
                                               list(range(len(captions))), ks=(1, 5))
    lap("retrieval")

    result: dict[str, Any] = {
        # The headline figures, English prompts (as earlier versions reported them).
        "seen_top1": zero_shot["en"]["seen"]["top1"],
        "heldout_top1": zero_shot["en"]["heldout"]["top1"],
        "chance": 1 / len(synthetic.CLASSNAMES),
        "suites": {name: {"description": s.description, "shift": s.shift, "images": n}
                   for name, s in synthetic.SUITES.items()},
        "zero_shot": zero_shot, "attributes": attributes, "linear_probe": probe,
        "few_shot": few_shot, "binding": binding, "retrieval": retrieval,
        "probe_images": len(pool.labels), "binding_scenes": len(pairs),
        "seconds": seconds,
    }
    result["robustness"] = robustness_table(result, baseline)
    return result


def binding_captions(language: str, pairs: Sequence[tuple[tuple[str, str], tuple[str, str]]]
                     ) -> tuple[list[str], list[str]]:
    """Each scene's caption ("a red circle and a blue star") and its hard negative, the same
    words with the colours swapped ("a blue circle and a red star")."""
    positives = [pair_phrase(language, [a, b]) for a, b in pairs]
    negatives = [pair_phrase(language, [(b[0], a[1]), (a[0], b[1])]) for a, b in pairs]
    return positives, negatives


def robustness_table(result: Mapping[str, Any], baseline: Mapping[str, float] | None
                     ) -> dict[str, Any]:
    """Top-1 per suite and effective robustness of each classifier: zero-shot per language,
    the linear probe, and the supervised baseline when there is one."""
    series: dict[str, dict[str, float]] = {
        f"zero-shot ({language})": {s: v["top1"] for s, v in result["zero_shot"][language].items()}
        for language in LANGUAGES}
    series["linear probe on CLIP features"] = {s: v for s, v in result["linear_probe"].items()
                                               if s in synthetic.SUITES}
    if baseline:
        series["supervised (same tower, cross-entropy)"] = dict(baseline)
    shifts = synthetic.SHIFT_SUITES
    return {"accuracy": series,
            "effective_robustness": {name: rb.effective_robustness(values, shifts)
                                     for name, values in series.items()}}


# --------------------------------------------------------------------------- output

def _pct(value: float | None) -> str:
    return "   -  " if value is None else f"{100 * value:5.1f}%"


def format_table(result: Mapping[str, Any]) -> str:
    """The printed report: accuracy per suite and classifier, the drop under shift, then the
    other findings, each per prompt language."""
    series = result["robustness"]["accuracy"]
    effective = result["robustness"]["effective_robustness"]
    columns = list(series)
    heads = [c.replace("zero-shot ", "").replace("linear probe on CLIP features", "probe")
             .replace("supervised (same tower, cross-entropy)", "supervised") for c in columns]
    width = max(len(s.description) for s in synthetic.SUITES.values()) + 2
    lines = ["top-1 among all 48 colour-shape classes (chance 2.1%): zero-shot with the prompts "
             "of each language, a linear probe on CLIP's features"
             + (", the supervised baseline" if len(columns) > 4 else ""),
             "  " + "suite".ljust(width) + "".join(h.rjust(11) for h in heads)]
    for name, suite in synthetic.SUITES.items():
        label = ("shift: " if suite.shift else "") + suite.description
        lines.append("  " + label[:width].ljust(width)
                     + "".join(_pct(series[c].get(name)).rjust(11) for c in columns))
    for key, label in (("shift_mean", "mean over the shift suites"),
                       ("drop", "drop: seen minus shift mean")):
        lines.append("  " + label.ljust(width)
                     + "".join(_pct(effective[c][key]).rjust(11) for c in columns))
    lines.append("")
    rows: list[tuple[str, Sequence[float]]] = [
        ("held-out compositions, one prompt (not 6)",
         [result["zero_shot"][lang]["heldout"]["one_prompt_top1"] for lang in LANGUAGES]),
        ("held-out compositions, top-5",
         [result["zero_shot"][lang]["heldout"]["top5"] for lang in LANGUAGES]),
        ("held-out: predicted colour right",
         [result["attributes"][lang]["heldout"]["colour"] for lang in LANGUAGES]),
        ("held-out: predicted shape right (chance 16.7%)",
         [result["attributes"][lang]["heldout"]["shape"] for lang in LANGUAGES]),
        ("binding: prefers its caption to the swap",
         [result["binding"][lang]["text_acc"] for lang in LANGUAGES]),
        *((f"image -> text recall@{k}",
           [result["retrieval"][lang][f"text_retrieval_recall@{k}"] for lang in LANGUAGES])
          for k in (1, 5)),
        *((f"text -> image recall@{k}",
           [result["retrieval"][lang][f"image_retrieval_recall@{k}"] for lang in LANGUAGES])
          for k in (1, 5)),
        ("zero-shot on the k-shot test set",
         [result["few_shot"]["zero_shot"][lang] for lang in LANGUAGES]),
    ]
    width = max(len(r[0]) for r in rows) + 2
    lines.append("  " + "".ljust(width) + "".join(LANGUAGE_NAMES[x].rjust(10) for x in LANGUAGES))
    lines += ["  " + name.ljust(width) + "".join(_pct(v).rjust(10) for v in values)
              for name, values in rows]
    shots = result["few_shot"]
    lines.append("  k-shot linear probe, k = " + ", ".join(map(str, shots["shots"])) + ": "
                 + ", ".join(_pct(v).strip() for v in shots["top1"]))
    return "\n".join(lines)


def plot_loss(metrics_path: Path, destination: Path) -> None:
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return
    plt = rb._pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot([r["step"] for r in rows], [r["temperature"] for r in rows], color="tab:orange",
              lw=0.8, alpha=0.7)
    twin.set_ylabel("temperature exp(t)", color="tab:orange")
    fig.tight_layout()
    rb._save(fig, destination)
    plt.close(fig)


def plot_suite_examples(destination: Path, seed: int, per_suite: int = 10,
                        image_size: int = 64) -> None:
    """A sheet of example images: one row per suite."""
    from PIL import Image, ImageDraw

    scale, label_width = 2, 150
    side = image_size * scale
    sheet = Image.new("RGB", (label_width + per_suite * side, len(synthetic.SUITES) * side),
                      "white")
    draw = ImageDraw.Draw(sheet)
    for row, name in enumerate(synthetic.SUITES):
        images, _ = synthetic.suite_set(name, per_suite, seed=seed, image_size=image_size)
        draw.multiline_text((6, row * side + side // 3), SUITE_LABELS[name], fill="black")
        for col, image in enumerate(images):
            sheet.paste(image.resize((side, side), Image.Resampling.NEAREST),
                        (label_width + col * side, row * side))
    with atomic_file(destination) as tmp:
        sheet.save(tmp, format="PNG")


def write_robustness(output: Path, result: Mapping[str, Any] | None,
                     baseline: Mapping[str, float] | None) -> dict[str, Any] | None:
    """``robustness.json`` and ``robustness.png`` from the run's evaluation and the baseline's,
    whichever exist (each command redraws them when it finishes)."""
    if result is None:
        return None
    table = robustness_table(result, baseline)
    with atomic_file(output / ROBUSTNESS_FILE) as tmp:
        tmp.write_text(json.dumps(table, indent=2) + "\n")
    rb.plot_suites(table["accuracy"], list(synthetic.SUITES), SUITE_LABELS,
                   output / "robustness.png",
                   "top-1 per suite: zero-shot CLIP (per prompt language), a linear probe "
                   "on its features" + (", the supervised baseline" if baseline else ""))
    return table


def read_baseline(output: Path) -> dict[str, float] | None:
    """The supervised baseline's top-1 per suite, if one was trained into this run."""
    path = output / BASELINE_DIR / "eval.json"
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text())["eval"]["top1"])
    except (ValueError, KeyError, TypeError):
        return None


def read_run_eval(output: Path) -> dict[str, Any] | None:
    path = output / "eval.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())["eval"]
    except (ValueError, KeyError, TypeError):
        return None
    return record if isinstance(record, dict) and "zero_shot" in record else None


def final_report(config, model, output: Path, skipped: dict[str, int]) -> dict[str, Any]:
    plot_loss(output / "metrics.jsonl", output / "loss.png")
    report: dict[str, Any] = {"steps": config.steps, "skipped": skipped,
                              "precision": config.precision, "machine": machine()}
    if config.data == "builtin":
        start = time.perf_counter()
        baseline = read_baseline(output)
        report["eval"] = evaluate_run(model, config.seed, baseline)
        write_robustness(output, report["eval"], baseline)
        rb.plot_few_shot(report["eval"]["few_shot"], report["eval"]["few_shot"]["zero_shot"],
                         output / "few_shot.png",
                         "k-shot linear probes on CLIP's features against zero-shot")
        plot_suite_examples(output / "suites.png", config.seed,
                            image_size=model.config.image_size)
        report["eval_seconds"] = round(time.perf_counter() - start, 1)
        print("\nevaluation on the built-in dataset:")
        print(format_table(report["eval"]))
    else:
        print("\n(no built-in evaluation for your own data: use `clipforge eval` on a held-out "
              "set)")
    with atomic_file(output / "eval.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    plots = "loss.png, robustness.png, few_shot.png, suites.png" if config.data == "builtin" \
        else "loss.png"
    print(f"\nmodel, checkpoints, metrics.jsonl, {plots} and eval.json are in {output}")
    print(f"load it with clipforge.load({str(output)!r}) or `--model {output}`")
    return report

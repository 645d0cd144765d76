"""Ablations of the first run (issue 12): ``clipforge train`` on the built-in data with one
setting changed, then a compact evaluation that shows where the run fails.

Why a script and not options of ``clipforge train``: the settings it changes are the built-in
dataset's own constants (which styles and backgrounds training draws, how often a scene holds
two kinds of object, the colour jitter), or experiments that were measured and rejected
(greyscale copies with colourless captions, richer captions, another starting temperature).
They are overridden in this process only; the library keeps one dataset.

Evaluation (printed, and appended as one JSON line to ``--results``):

* zero-shot top-1 in English, Chinese and Russian on seen and held-out compositions, on each
  drawing style and background family alone, on smaller and larger objects and on the
  independent renderer (240 images each, drawn from this script's own random streams);
* the **compositionality probe**: a logistic-regression shape classifier trained on the image
  features of seen compositions and tested on held-out ones.  A tower whose features hold shape
  apart from colour scores near its seen accuracy; one that learnt colour-shape conjunctions
  scores near chance (1/6), however well the zero-shot classifier does on seen pairs.  This
  probe is confounded: it learns from its training pairs that yellow is never a cross, and
  every held-out pair breaks that rule by construction;
* so also the **leave-one-colour-out probe**: for each colour, a shape classifier trained on
  the seen pairs of the *other* colours, tested on that colour's seen shapes and on its
  held-out shape.  It cannot learn a prior for the colour it is tested on, so a gap between
  the two says that the tower's features of the held-out pair lack the shape itself;
* attribute binding: how often a two-object scene prefers its caption to the colour-swapped
  one (SugarCrepe's score, 240 scenes, chance 50%).

    python benchmarks/bench_first_run.py --name default
    python benchmarks/bench_first_run.py --name steps700 --steps 700
    python benchmarks/bench_first_run.py --name two-kinds --two-kinds 0.5
    python benchmarks/bench_first_run.py --name twins --twins
    python benchmarks/bench_first_run.py --eval-only runs/first-run
    python benchmarks/bench_first_run.py --summary      # the mean over seeds of each setting

A run takes what ``clipforge train`` takes (7-9 minutes on 2 cores); run one at
a time: two at once on 2 cores are ten times slower, not two.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from clipforge.data import captions, draw, sdf, synthetic
from clipforge.data.captions import LANGUAGES, TEMPLATES
from clipforge.evaluation import robustness as rb
from clipforge.factory import create_model
from clipforge.training import config as training_config
from clipforge.training import report
from clipforge.training.config import TrainConfig
from clipforge.training.loop import train
from clipforge.training.objective import Objective
from machine import cpu_name

EVAL_IMAGES = 240
STREAM_BASE = 100  # random streams of this script's suites, apart from the library's


def _suites() -> dict[str, tuple]:
    """name -> (pairs, styles, backgrounds, sizes, renderer) over the training distribution."""
    styles, backgrounds = list(synthetic.TRAIN_STYLES), list(synthetic.TRAIN_BACKGROUNDS)
    seen, held = synthetic.SEEN_PAIRS, synthetic.HELDOUT_PAIRS
    suites = {"seen": (seen, styles, backgrounds, None, "draw"),
              "heldout": (held, styles, backgrounds, None, "draw")}
    suites.update({f"style:{s}": (seen, [s], backgrounds, None, "draw") for s in draw.STYLES})
    suites.update({f"background:{b}": (seen, styles, [b], None, "draw")
                   for b in draw.BACKGROUNDS})
    suites["smaller"] = (seen, styles, backgrounds, synthetic.SMALLER, "draw")
    suites["larger"] = (seen, styles, backgrounds, synthetic.LARGER, "draw")
    suites["renderer"] = (seen, styles, backgrounds, None, "sdf")
    return suites


def _images(spec: tuple, n: int, stream: int, single: bool, seed: int = 0
            ) -> tuple[list, list[int]]:
    pairs, styles, backgrounds, sizes, renderer = spec
    images, labels = [], []
    for i in range(n):
        pair = pairs[i % len(pairs)]
        rng = np.random.default_rng([seed, i, STREAM_BASE + stream])
        count = 1 if single else int(rng.integers(1, 4))
        if renderer == "sdf":
            images.append(sdf.render(rng, *pair, count, 64))
        else:
            cells = synthetic._cells(rng)[:count]
            objects = [synthetic._object(pair, synthetic._diameter(rng, count, sizes), cells)]
            style = styles[rng.integers(len(styles))]
            background = backgrounds[rng.integers(len(backgrounds))]
            images.append(draw.draw_scene(rng, objects, style, background, 64)[0])
        labels.append(synthetic.class_index(*pair))
    return images, labels


def evaluate(model, n: int = EVAL_IMAGES) -> dict:
    model.eval()
    suites = {}
    for k, (name, spec) in enumerate(_suites().items()):
        images, labels = _images(spec, n, k, single=name == "larger")
        suites[name] = rb.Labelled(report.embed_images(model, images), labels)
    result = {language: {name: round(100 * s["top1"], 1) for name, s in rb.zero_shot(
        model, suites, synthetic.class_names(language), TEMPLATES[language]).items()}
        for language in LANGUAGES}
    result["shape_probe"] = _shape_probe(model)
    result["colour_out_probe"] = _colour_out_probe(model)
    images, pairs = synthetic.binding_set(n, seed=1)
    features = report.embed_images(model, images)
    result["binding"] = {language: round(100 * rb.binding(
        model, features, *report.binding_captions(language, pairs))["text_acc"], 1)
        for language in LANGUAGES}
    return result


def _shape_probe(model) -> dict[str, float]:
    """Shape read linearly from the image features: trained on seen pairs, tested on held-out."""
    shapes = len(synthetic.SHAPES)

    def features(name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        images, labels = synthetic.suite_set(name, n, seed=1)
        f = report.embed_images(model, images).float()
        return (f / f.norm(dim=-1, keepdim=True)).numpy(), np.array(labels) % shapes

    seen_x, seen_y = features("seen", 1200)
    held_x, held_y = features("heldout", 480)
    probe = LogisticRegression(C=1.0, max_iter=3000).fit(seen_x, seen_y)
    return {"seen": round(100 * probe.score(seen_x, seen_y), 1),
            "heldout": round(100 * probe.score(held_x, held_y), 1)}


def _colour_out_probe(model) -> dict:
    """Shape read from the features of a colour the probe never saw: per colour, trained on the
    other colours' seen pairs, tested on this colour's seen pairs and on its held-out pair."""
    def features(name: str, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        images, labels = synthetic.suite_set(name, n, seed=2)
        f = report.embed_images(model, images).float()
        pairs = [synthetic.ALL_PAIRS[i] for i in labels]
        return ((f / f.norm(dim=-1, keepdim=True)).numpy(), np.array([c for c, _ in pairs]),
                np.array([synthetic.SHAPES.index(s) for _, s in pairs]))

    seen_x, seen_c, seen_y = features("seen", 2400)
    held_x, held_c, held_y = features("heldout", 480)
    per_colour = {}
    for colour in synthetic.COLOURS:
        train = seen_c != colour
        probe = LogisticRegression(C=10.0, max_iter=3000).fit(seen_x[train], seen_y[train])
        per_colour[colour] = (probe.score(seen_x[~train], seen_y[~train]),
                              probe.score(held_x[held_c == colour], held_y[held_c == colour]))
    return {"seen": round(100 * float(np.mean([s for s, _ in per_colour.values()])), 1),
            "heldout": round(100 * float(np.mean([h for _, h in per_colour.values()])), 1),
            "heldout_per_colour": {c: round(100 * h) for c, (_, h) in per_colour.items()}}


# --------------------------------------------------------------------------- the overrides

def _grey_scenes(share: float) -> None:
    """A ``share`` of training scenes: one kind of object, greyscale, captioned without colour."""
    scene = synthetic._scene

    def grey_scene(stream, index, seed, image_size, pairs, main_pair=None, single_kind=False,
                   detailed=False, language=None, spread=1.0):
        grey = stream == "train" and np.random.default_rng([seed, index, 77]).random() < share
        if not grey:
            return scene(stream, index, seed, image_size, pairs, main_pair, single_kind,
                         detailed, language, spread)
        kept, captions.COLOURLESS_P = captions.COLOURLESS_P, 1.0
        try:
            result = scene(stream, index, seed, image_size, pairs, main_pair, True, detailed,
                           language, spread)
        finally:
            captions.COLOURLESS_P = kept
        result.image = result.image.convert("L").convert("RGB")
        return result

    synthetic._scene = grey_scene


def _swapped_twins() -> None:
    """NegCLIP's swapped-attribute negatives drawn as images: an odd training sample whose
    predecessor shows two kinds of object ("a red circle and a blue star") shows the same
    objects in the same places with their colours swapped ("a blue circle and a red star"),
    with its own background and caption, when both swapped pairs are seen pairs (about one
    sample in nine).  Training batches are runs of consecutive indices, so a twin meets its
    original in the same batch."""
    scene, compose = synthetic._scene, synthetic._compose

    def with_twins(stream, index, seed, *args, **kwargs):
        twin = None
        if stream == "train" and index % 2 == 1:
            before = np.random.default_rng([seed, index - 1, synthetic._STREAMS[stream]])
            objects = compose(before, synthetic.SEEN_PAIRS, None, False)  # as training does
            if len(objects) == 2:
                a, b = objects
                swapped = [dict(a, colour=b["colour"]), dict(b, colour=a["colour"])]
                if a["colour"] != b["colour"] and a["shape"] != b["shape"] and all(
                        (o["colour"], o["shape"]) in synthetic.SEEN_PAIRS for o in swapped):
                    twin = swapped
        if twin is None:
            return scene(stream, index, seed, *args, **kwargs)
        synthetic._compose = lambda *_: twin  # the scene's own draws then start afresh
        try:
            return scene(stream, index, seed, *args, **kwargs)
        finally:
            synthetic._compose = compose

    synthetic._scene = with_twins


def _start_temperature(value: float) -> None:
    def init_temperature(self) -> None:
        with torch.no_grad():
            self.model.logit_scale.fill_(math.log(value))

    Objective.init_temperature = init_temperature


def _weights(text: str) -> dict[str, float]:
    """``"filled:0.8,outlined:0.2"`` -> weights; a name without ``:w`` weighs 1."""
    pairs = [item.partition(":") for item in text.split(",")]
    return {name: float(weight or 1.0) for name, _, weight in pairs}


def apply_overrides(args: argparse.Namespace) -> None:
    if args.styles:
        synthetic.TRAIN_STYLES = _weights(args.styles)
    if args.backgrounds:
        synthetic.TRAIN_BACKGROUNDS = _weights(args.backgrounds)
    if args.two_kinds is not None:
        synthetic._TWO_KINDS_P = args.two_kinds
    if args.colour_jitter is not None:
        draw.COLOUR_JITTER = args.colour_jitter
    if args.grey:
        _grey_scenes(args.grey)
    if args.temperature:
        _start_temperature(args.temperature)
    if args.curriculum_share is not None:
        training_config.CURRICULUM_SHARE = args.curriculum_share
    if args.twins:
        _swapped_twins()
    if args.languages:
        languages = args.languages.split(",")
        unknown = set(languages) - set(LANGUAGES)
        if unknown:
            raise SystemExit(f"--languages: unknown {', '.join(sorted(unknown))}; choose from "
                             f"{', '.join(LANGUAGES)}")
        synthetic.LANGUAGE_WEIGHTS = {language: 1 / len(languages) for language in languages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="default", help="the run's name (runs/ablations/NAME)")
    parser.add_argument("--eval-only", metavar="RUN", help="evaluate a trained run, no training")
    for name, kind in (("steps", int), ("batch_size", int), ("warmup", int), ("lr", float)):
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind,
                            default=TrainConfig.__dataclass_fields__[name].default)
    parser.add_argument("--curriculum-share", type=float,
                        help="share of the run over which the scenes widen (0.6)")
    parser.add_argument("--styles", help="training styles, comma-separated, each with an optional "
                        ":weight (default: filled; e.g. filled:0.8,outlined:0.2)")
    parser.add_argument("--backgrounds", help="training backgrounds (default: plain,gradient)")
    parser.add_argument("--two-kinds", type=float, help="share of two-kind scenes (0.1)")
    parser.add_argument("--colour-jitter", type=int, help="per channel (12)")
    parser.add_argument("--grey", type=float, default=0.0,
                        help="share of greyscale one-kind scenes with colourless captions")
    parser.add_argument("--temperature", type=float, help="starting logit scale (1/0.07)")
    parser.add_argument("--twins", action="store_true",
                        help="each odd sample after a two-kind scene shows its colours swapped")
    parser.add_argument("--languages", help="caption languages, comma-separated (en,zh,ru)")
    parser.add_argument("--loss", default="clip", choices=training_config.LOSSES)
    parser.add_argument("--weight-decay", type=float,
                        help="AdamW's (default: the library's for the built-in data)")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed: other samples")
    parser.add_argument("--results", default="runs/ablations/results.jsonl")
    parser.add_argument("--summary", action="store_true",
                        help="print the mean over seeds of each setting in --results, no run")
    args = parser.parse_args()
    if args.summary:
        print_summary(Path(args.results))
        return
    apply_overrides(args)
    start = time.perf_counter()
    if args.eval_only:
        model, name = create_model(args.eval_only), Path(args.eval_only).name
    else:
        name, model = args.name, _train(args)
    settings = {k: v for k, v in vars(args).items() if v is not None and k != "summary"}
    result = {"name": name, "settings": settings, "seconds": round(time.perf_counter() - start),
              "cpu": cpu_name(), "torch": torch.__version__, "top1": evaluate(model)}
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(result) + "\n")
    for language in LANGUAGES:
        row = result["top1"][language]
        print(f"{language}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    print("shape probe (seen -> held-out):", result["top1"]["shape_probe"])
    print("leave-one-colour-out probe:", result["top1"]["colour_out_probe"])
    print("binding (prefers its caption to the colour swap):", result["top1"]["binding"])


def _train(args: argparse.Namespace):
    """Train as ``clipforge train`` does with the settings given; the trained model."""
    config = TrainConfig(output=Path("runs/ablations") / args.name, steps=args.steps,
                         batch_size=args.batch_size, warmup=args.warmup, lr=args.lr,
                         loss=args.loss, weight_decay=args.weight_decay, seed=args.seed,
                         progress=False)
    args.weight_decay = config.decay()  # recorded as run: the default depends on the data
    captured = {}

    def keep_model(config, model, out, skipped):  # the run's own report is not needed
        captured["model"] = model
        return {}

    report.final_report = keep_model
    train(config)
    return captured["model"]


# Settings that do not change what a run computes, or that tell runs of one setting apart.
_NOT_A_SETTING = ("name", "seed", "results", "eval_only")


def print_summary(results: Path) -> None:
    """One line per setting: the mean over its seeds, since one run is not a measurement
    (seeds of the same setting differ by 20 points on held-out compositions)."""
    groups: dict[str, list[dict]] = {}
    for line in results.read_text().splitlines():
        row = json.loads(line)
        if "settings" not in row or row["settings"].get("eval_only"):
            continue
        key = json.dumps({k: v for k, v in sorted(row["settings"].items())
                          if k not in _NOT_A_SETTING})
        groups.setdefault(key, []).append(row)
    print("mean over seeds, en / zh / ru: seen, held-out, suites training never drew; binding")
    for key, rows in groups.items():
        seeds = sorted(r["settings"].get("seed", 0) for r in rows)
        top1 = [r["top1"] for r in rows]
        shifts = _shift_suites(rows[0]["settings"], top1[0])
        print(f"{key}\n  seeds {seeds}: seen {_mean(top1, 'seen')}, held-out "
              f"{_mean(top1, 'heldout')}, shifts {_mean(top1, shifts)}; binding "
              f"{_mean(top1, 'binding')}")


def _shift_suites(settings: dict, top1: dict) -> list[str]:
    """The suites of a run that its training never drew: not its styles or backgrounds."""
    trained = {f"style:{s.partition(':')[0]}" for s in settings.get("styles", "filled").split(",")}
    trained |= {f"background:{b.partition(':')[0]}"
                for b in settings.get("backgrounds", "plain,gradient").split(",")}
    return [k for k in top1["en"] if k not in trained | {"seen", "heldout"}]


def _mean(top1: list[dict], figure: str | list[str]) -> str:
    """``figure`` (or the mean over a list of suites) per language, then over runs."""
    def one(t: dict, lang: str) -> float:
        if figure == "binding":
            return t["binding"][lang]
        if isinstance(figure, list):
            return float(np.mean([t[lang][k] for k in figure]))
        return t[lang][figure]

    return " / ".join(f"{np.mean([one(t, lang) for t in top1]):.1f}" for lang in LANGUAGES)

if __name__ == "__main__":
    main()

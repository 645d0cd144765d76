"""``clipforge finetune`` on the built-in data: accuracy in distribution and under shift for
zero-shot and every method (linear probe, Tip-Adapter and -F, LoRA, FLYP, end-to-end
fine-tuning and its WiSE-FT sweep); few-shot curves of the linear probe, Tip-Adapter(-F) and
LoRA; time and peak memory per method.

The starting point is a trained model directory (the first run's, ``runs/first-run``).  The
labelled set is drawn from the training distribution (``synthetic.probe_set``: single-kind
scenes, filled shapes over plain and gradient backgrounds) and written as an ImageFolder whose
class folders are the 40 *seen* colour-shape pairs: the eight held-out pairs have no labelled
images, as a user's own set would lack the classes they never labelled.  ``--per-class`` images
of each class train, the next ``--val-per-class`` of the same stream validate (disjoint indices,
so never the same scene); the "first k per class" of the training images make the few-shot sets.

Each method runs as the command users run, ``clipforge finetune`` (``clipforge.cli.main``), in a
fresh subprocess, so that its time and peak memory are its own: the child reports the wall
seconds of the command (model load, reading the images, training, validation, writing the
model) and its peak resident set (``VmHWM`` in ``/proc/self/status``: interpreter, torch, model,
optimiser state, images).  The zero-shot row is the same kind of child building the zero-shot
classifier.  ``full`` runs once, with ``--wise-ft``: its alpha-1 mix *is* the plain ``full``
model (tests/test_finetune.py checks this), so the ``full`` row is that mix and shares the run's
time and memory, which include writing and validating every mix.

Evaluation uses the library's classifiers only: ``ZeroShotClassifier.build`` for zero-shot (the
40 seen class names, the English caption templates, which are also given to ``finetune`` so its
zero-shot start is the same head), and each run directory's ``model.classifier`` (each WiSE-FT
mix is a model directory of its own, ``OUT/wise-ft/alpha-A``).  Tip-Adapter chooses its alpha
and beta on the validation images, as WiSE-FT chooses its mix.  Every suite of
``synthetic.SUITES`` except ``heldout`` is drawn from the seen pairs and is scored over the 40
seen classes; ``heldout`` is not applicable to heads trained on the seen classes only.

    python benchmarks/bench_finetune.py [--model runs/first-run] [--per-class 16]
        [--shots 1,2,4,8,16] [--eval-images 480] [--seed 0] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

import clipforge
from clipforge.data import captions, synthetic
from clipforge.evaluation import ZeroShotClassifier
from clipforge.inference import embed_pictures
from machine import cpu_name, status_bytes
from report import write_json

SEEN_NAMES = tuple(synthetic.CLASSNAMES[synthetic.class_index(c, s)]
                   for c, s in synthetic.SEEN_PAIRS)
EVAL_SUITES = tuple(name for name in synthetic.SUITES if name != "heldout")
SHIFT_SUITES = tuple(name for name in EVAL_SUITES if synthetic.SUITES[name].shift)
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
# Budgets (see the report): the probe and Tip-Adapter keep the library's defaults (epochs over
# cached embeddings: seconds); end to end (full, flyp) gets FULL_EPOCHS at FULL_LR, a tenth of the
# first run's pretraining rate (1e-3): the library's default 1e-5 suits towers pretrained at
# small rates and barely moves this one in a few epochs; LoRA its default rate for as many
# epochs.
FULL_EPOCHS, FULL_LR = 5, 1e-4
FEW_SHOT_METHODS = ("linear", "tip-adapter", "tip-adapter-f", "lora")
FROZEN = ("linear", "tip-adapter", "tip-adapter-f")  # the tower is the starting model's
QUICK = {"per_class": 2, "val_per_class": 1, "shots": (1, 2), "eval_images": 40,
         "full_epochs": 1, "linear_epochs": 5, "adapter_epochs": 1}


@dataclass
class Workdir:
    """The labelled sets written for the runs: ImageFolder trees and the templates file."""

    root: Path
    train: Path
    val: Path
    shots: dict[int, Path]
    templates: Path


# --------------------------------------------------------------------------- data


def labelled_images(per_class: int, val_per_class: int, seed: int, image_size: int
                    ) -> dict[str, list[Image.Image]]:
    """Per seen class, ``per_class + val_per_class`` scenes of the training distribution, in
    ``probe_set`` order (its labels cycle over all 48 pairs; held-out pairs are dropped)."""
    total = per_class + val_per_class
    images, labels = synthetic.probe_set(total * len(synthetic.ALL_PAIRS), seed, image_size)
    by_class: dict[str, list[Image.Image]] = {name: [] for name in SEEN_NAMES}
    for image, label in zip(images, labels):
        name = synthetic.CLASSNAMES[label]
        if name in by_class:
            by_class[name].append(image)
    return by_class


def write_folder(root: Path, by_class: dict[str, list[Image.Image]], start: int, stop: int
                 ) -> Path:
    """An ImageFolder of images ``start:stop`` of every class."""
    for name, images in by_class.items():
        (root / name).mkdir(parents=True)
        for i, image in enumerate(images[start:stop]):
            image.save(root / name / f"{start + i:03d}.png")
    return root


def prepare(root: Path, per_class: int, val_per_class: int, shots: tuple[int, ...], seed: int,
            image_size: int) -> Workdir:
    """The training set, the validation set, one training set per shot count and the English
    templates, under ``root``."""
    by_class = labelled_images(per_class, val_per_class, seed, image_size)
    templates = root / "templates.json"
    templates.write_text(json.dumps(list(captions.TEMPLATES["en"])), encoding="utf-8")
    return Workdir(root, write_folder(root / "train", by_class, 0, per_class),
                   write_folder(root / "val", by_class, per_class, per_class + val_per_class),
                   {k: write_folder(root / f"train-{k}shot", by_class, 0, k) for k in shots},
                   templates)


@dataclass
class Suites:
    """The evaluation images of every suite and their class names."""

    images: dict[str, list[Image.Image]]
    names: dict[str, list[str]]


def load_suites(n: int, seed: int, image_size: int) -> Suites:
    images, names = {}, {}
    for suite in EVAL_SUITES:
        images[suite], labels = synthetic.suite_set(suite, n, seed, image_size)
        names[suite] = [synthetic.CLASSNAMES[label] for label in labels]
    return Suites(images, names)


# --------------------------------------------------------------------------- measured runs


def run_child(spec: dict) -> dict:
    """In the child: run ``spec`` (a ``clipforge`` command line, or the zero-shot build) and
    return its wall seconds and this process's peak resident set."""
    started = time.perf_counter()
    if spec["kind"] == "zero-shot":
        model = clipforge.create_model(spec["model"])
        templates = json.loads(Path(spec["templates"]).read_text(encoding="utf-8"))
        ZeroShotClassifier.build(model, list(SEEN_NAMES), templates)
    else:
        from clipforge.cli import main as cli_main

        rc = cli_main(spec["argv"])
        if rc:
            raise SystemExit(f"clipforge {' '.join(spec['argv'])} failed (exit {rc})")
    return {"seconds": time.perf_counter() - started, "peak_bytes": status_bytes("VmHWM")}


def measured(spec: dict) -> dict:
    """Run ``spec`` in a fresh subprocess (so that its peak memory is its own)."""
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                          stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"the measured run {spec} failed (exit {done.returncode}); its "
                         "errors are above")
    return json.loads(done.stdout.strip().splitlines()[-1])


def finetune_argv(work: Workdir, model: str, output: Path, method: str, seed: int,
                  extra: list[str]) -> list[str]:
    return ["finetune", str(work.train), "--model", model, "--output", str(output),
            "--method", method, "--val", str(work.val), "--templates", str(work.templates),
            "--seed", str(seed), "--no-progress", *extra]


# --------------------------------------------------------------------------- evaluation


def suite_vectors(model: clipforge.CLIP, suites: Suites) -> dict[str, torch.Tensor]:
    """Unit image embeddings of every suite's images (the library's inference path)."""
    out = {}
    with torch.inference_mode():
        for suite, images in suites.images.items():
            result = embed_pictures(model, images, batch_size=128)
            if result.failures:
                raise RuntimeError(f"{len(result.failures)} {suite} image(s) failed to embed")
            out[suite] = torch.from_numpy(result.vectors)
    return out


def accuracies(classifier, vectors: dict[str, torch.Tensor], suites: Suites) -> dict[str, float]:
    """Top-1 of ``classifier`` (anything with ``classnames`` and ``predict``) on every suite,
    plus the mean over the shift suites."""
    index = {name: i for i, name in enumerate(classifier.classnames)}
    row = {}
    for suite, names in suites.names.items():
        targets = torch.tensor([index[name] for name in names])
        row[suite] = float((classifier.predict(vectors[suite]) == targets).float().mean())
    row["shift mean"] = sum(row[s] for s in SHIFT_SUITES) / len(SHIFT_SUITES)
    return row


def evaluate_directory(path: Path, suites: Suites) -> dict[str, float]:
    """Accuracies of the model directory ``path`` with its own classifier and image tower."""
    model = clipforge.create_model(path)
    return accuracies(model.classifier, suite_vectors(model, suites), suites)


# --------------------------------------------------------------------------- the benchmark


def options(args: argparse.Namespace, method: str) -> list[str]:
    """The benchmark's budget for ``method`` (see FULL_EPOCHS)."""
    if method in ("full", "flyp"):
        return list(args.full_options)
    if method == "linear":
        return list(args.linear_options)
    if method in ("lora", "tip-adapter-f"):
        return list(args.adapter_options)
    return []


def run_method(args: argparse.Namespace, work: Workdir, method: str, train: Path,
               output: Path, extra: list[str] = ()) -> dict:
    """One ``clipforge finetune`` run in a fresh process: its seconds and peak memory."""
    argv = finetune_argv(work, args.model, output, method, args.seed,
                         [*options(args, method), *extra])
    argv[1] = str(train)
    return measured({"kind": "cli", "argv": argv})


def evaluate_run(path: Path, method: str, suites: Suites,
                 base_vectors: dict[str, torch.Tensor]) -> dict[str, float]:
    """A run's accuracies: with its own classifier, on the starting model's embeddings where
    the method leaves the tower as it was (tests/test_finetune*.py check that it does)."""
    if method in FROZEN:
        return accuracies(clipforge.create_model(path).classifier, base_vectors, suites)
    return evaluate_directory(path, suites)


def method_rows(args: argparse.Namespace, work: Workdir, suites: Suites
                ) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Zero-shot, every method and every WiSE-FT mix of ``full``: accuracies, seconds, peak
    MiB."""
    base = clipforge.create_model(args.model)
    base_vectors = suite_vectors(base, suites)
    zeroshot = ZeroShotClassifier.build(base, list(SEEN_NAMES), list(captions.TEMPLATES["en"]))
    rows = [{"method": "zero-shot", **accuracies(zeroshot, base_vectors, suites),
             **measured({"kind": "zero-shot", "model": args.model,
                         "templates": str(work.templates)})}]
    for method in ("linear", "tip-adapter", "tip-adapter-f", "lora", "flyp"):
        output = work.root / f"run-{method}"
        cost = run_method(args, work, method, work.train, output)
        rows.append({"method": method, **evaluate_run(output, method, suites, base_vectors),
                     **cost})

    full_out = work.root / "run-full"
    alphas = ",".join(f"{a:g}" for a in ALPHAS)
    cost = run_method(args, work, "full", work.train, full_out, ["--wise-ft", alphas])
    record = json.loads((full_out / "finetune.json").read_text(encoding="utf-8"))
    mixes = [{"method": f"wise-ft alpha={mix['alpha']:g}",
              **evaluate_directory(full_out / mix["path"], suites), **cost,
              "val": mix["val_acc1"], "chosen": mix["alpha"] == record["chosen"]["alpha"]}
             for mix in record["wise_ft"]]
    full = next(row for row, mix in zip(mixes, record["wise_ft"]) if mix["alpha"] == 1)
    return [*rows, {**full, "method": "full", "chosen": False}, *mixes], base_vectors


def few_shot_rows(args: argparse.Namespace, work: Workdir, suites: Suites,
                  base_vectors: dict[str, torch.Tensor], zero_shot: dict) -> list[dict]:
    """Each few-shot method on the first k images per class (validated on the same validation
    images as every run)."""
    rows = [{"k": 0, "method": "zero-shot", **zero_shot}]
    for method in FEW_SHOT_METHODS:
        for k, folder in work.shots.items():
            output = work.root / f"run-{method}-{k}shot"
            cost = run_method(args, work, method, folder, output)
            rows.append({"k": k, "method": method,
                         **evaluate_run(output, method, suites, base_vectors), **cost})
    return rows


def print_methods(rows: list[dict]) -> None:
    columns = [*EVAL_SUITES, "shift mean"]
    print(f"\n{'method':<22}" + "".join(f"{c:>11}" for c in columns)
          + f"{'seconds':>9}{'peak MiB':>10}")
    for row in rows:
        mark = " *" if row.get("chosen") else ""
        print(f"{row['method'] + mark:<22}" + "".join(f"{row[c]:>11.1%}" for c in columns)
              + f"{row['seconds']:>9.1f}{row['peak_bytes'] / 2**20:>10.0f}")


def print_few_shot(rows: list[dict]) -> None:
    shots = sorted({row["k"] for row in rows if row["k"]})
    print(f"\n{'seen / shift mean':<16}" + "".join(f"{f'k={k}':>15}" for k in shots))
    zero = rows[0]
    print(f"{'zero-shot (k=0)':<16}{zero['seen']:>9.1%} / {zero['shift mean']:.1%}")
    for method in FEW_SHOT_METHODS:
        cells = {row["k"]: row for row in rows if row["method"] == method}
        print(f"{method:<16}" + "".join(
            f"{cells[k]['seen']:>8.1%} /{cells[k]['shift mean']:>5.1%}" for k in shots))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/first-run",
                        help="the starting model directory (the first run's)")
    parser.add_argument("--per-class", type=int, default=16, help="labelled images per class")
    parser.add_argument("--val-per-class", type=int, default=4,
                        help="validation images per class (WiSE-FT chooses its alpha on them)")
    parser.add_argument("--shots", default="1,2,4,8,16",
                        help="few-shot sizes (images per class), at most --per-class")
    parser.add_argument("--eval-images", type=int, default=480, help="images per suite")
    parser.add_argument("--full-epochs", type=int, default=FULL_EPOCHS)
    parser.add_argument("--full-lr", type=float, default=FULL_LR)
    parser.add_argument("--linear-epochs", type=int, default=None,
                        help="default: the library's (100)")
    parser.add_argument("--adapter-epochs", type=int, default=FULL_EPOCHS,
                        help="lora and tip-adapter-f epochs (at the library's rates)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    else:
        args.shots = tuple(int(k) for k in args.shots.split(",") if k.strip())
    if max(args.shots, default=0) > args.per_class or min(args.shots, default=1) < 1:
        parser.error(f"--shots {args.shots} must lie between 1 and --per-class {args.per_class}")
    args.full_options = ["--epochs", str(args.full_epochs), "--lr", f"{args.full_lr:g}"]
    args.linear_options = [] if args.linear_epochs is None else \
        ["--epochs", str(args.linear_epochs)]
    args.adapter_options = ["--epochs", str(args.adapter_epochs)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0
    image_size = clipforge.create_model(args.model).config.vision.image_size
    print(f"clipforge finetune on the built-in data; CPU: {cpu_name()}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; model {args.model} "
          f"({image_size} px); {args.per_class} labelled images per seen class (40 classes), "
          f"{args.val_per_class} for validation, {args.eval_images} images per suite; full: "
          f"{args.full_epochs} epochs at lr {args.full_lr:g} (also flyp); linear: "
          f"{args.linear_epochs or 'the default'} epochs; lora and tip-adapter-f: "
          f"{args.adapter_epochs} epochs at the default rates")
    suites = load_suites(args.eval_images, args.seed, image_size)
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        work = prepare(Path(tmp), args.per_class, args.val_per_class, tuple(args.shots),
                       args.seed, image_size)
        rows, base_vectors = method_rows(args, work, suites)
        shots = few_shot_rows(args, work, suites, base_vectors, rows[0])
    print_methods(rows)
    print("\n* the mix WiSE-FT chose on the validation images; heldout: not applicable (the "
          "heads know the 40 seen classes only). seconds: wall time of the command in a fresh "
          "process; peak MiB: its VmHWM (interpreter and torch included); full and the mixes "
          "are one `--wise-ft` run (alpha 1 is the plain full model)")
    print("\nfew-shot: accuracy on seen / shift mean with k labelled images per class; the "
          "seconds and peak MiB of every run are in --json")
    print_few_shot(shots)
    if args.json:
        write_json(args.json, {"methods": rows, "few_shot": shots, "cpu": cpu_name(),
                               "torch": torch.__version__, "args": {
                                   k: str(v) if isinstance(v, Path) else v
                                   for k, v in vars(args).items() if k != "json"}})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The supervised baseline of the effective-robustness comparison: the run's image tower trained
with cross-entropy on the class labels of the same images, for the same budget.

Fair by construction: the same architecture and initialisation (the image tower of
``config.model`` built with ``config.seed``) plus a linear head over the 48 colour-shape
classes; the same samples in the same order with the same augmentation (sample ``i`` of step
``s`` is the image the contrastive run sees there); the same steps, batch size, learning rate,
warm-up, cosine schedule, AdamW settings, gradient clipping and precision.  Only the target
differs: instead of the caption, the class of each object kind in the scene (a scene of two
kinds has the soft target 1/2, 1/2).  Held-out compositions never occur as targets, so the
supervised model cannot name them: the comparison is made on the suites of seen compositions.

It is not part of the default run (it would add about three quarters of the run's time): it
trains into ``<run>/baseline/`` and then redraws the run's ``robustness.png`` with it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import synthetic
from ..factory import create_model
from ..fileio import atomic_file
from ..image.augment import TrainTransform
from ..image.transform import Preprocess
from .config import BUILTIN_DATA, TrainConfig
from .data import StepBatches
from .loop import resolve_precision
from .optim import build_optimizer, cosine_schedule
from .report import (
    BASELINE_DIR,
    EVAL_IMAGES,
    EVAL_IMAGES_ENV,
    _count,
    machine,
    read_run_eval,
    write_robustness,
)

log = logging.getLogger("clipforge.train")


class SupervisedClassifier(nn.Module):
    """An image tower and a linear head: pixels -> class logits."""

    def __init__(self, visual: nn.Module, embed_dim: int, classes: int):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(embed_dim, classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(pixels))


def scene_target(objects: list[dict]) -> torch.Tensor:
    """The soft class target of a scene: equal weight on each object kind's class."""
    target = torch.zeros(len(synthetic.CLASSNAMES))
    kinds = {synthetic.class_index(o["colour"], o["shape"]) for o in objects}
    for k in kinds:
        target[k] = 1 / len(kinds)
    return target


class LabelledScenes(Dataset):
    """Global sample index -> (pixels, soft target): the training split's scene ``i`` with the
    augmentation the contrastive run draws for it (``training.data.TrainingSamples``)."""

    def __init__(self, seed: int, transform: TrainTransform, image_size: int,
                 curriculum: int = 0):
        self.seed, self.transform, self.image_size = seed, transform, image_size
        self.curriculum = curriculum

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index %= 2**31 - 1
        scene = synthetic.render_scene(index, self.seed, self.image_size, "train",
                                       spread=synthetic.curriculum_spread(index, self.curriculum))
        rng = np.random.default_rng([self.seed, index, 0])
        return self.transform(scene.image, rng), scene_target(scene.objects)


@torch.inference_mode()
def evaluate_classifier(classifier: SupervisedClassifier, preprocess: Preprocess, seed: int,
                        image_size: int, n: int) -> dict[str, float]:
    """Top-1 on every suite (the held-out compositions included, for completeness: they are
    classes the classifier never had as a target)."""
    top1 = {}
    for name in synthetic.SUITES:
        images, labels = synthetic.suite_set(name, n, seed=seed, image_size=image_size)
        logits = torch.cat([classifier(torch.stack([preprocess(im) for im in
                                                    images[i:i + 256]])).float()
                            for i in range(0, len(images), 256)])
        top1[name] = (logits.argmax(dim=-1) == torch.tensor(labels)).float().mean().item()
    return top1


def train_baseline(config: TrainConfig) -> dict[str, Any]:
    """Train and evaluate the supervised baseline of ``config``'s run into
    ``config.output/baseline``; returns its evaluation."""
    config.validate()
    if config.data != BUILTIN_DATA:
        raise ValueError("the supervised baseline needs class labels: it trains on the built-in "
                         "dataset only (no --data)")
    config = resolve_precision(config)
    output = Path(config.output) / BASELINE_DIR
    output.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    model = create_model(config.model, weights=config.weights, activation=config.activation)
    classifier = SupervisedClassifier(model.visual, model.config.embed_dim,
                                      len(synthetic.CLASSNAMES)).to(device)
    size = model.config.image_size
    preprocess = Preprocess.from_config(model.config)
    del model
    optimizer = build_optimizer(classifier, config.lr, config.decay())
    scheduler = cosine_schedule(optimizer, config.warmup, config.steps)
    scenes = LabelledScenes(config.seed, TrainTransform(preprocess), size, config.curriculum())
    loader = DataLoader(scenes,
                        batch_sampler=StepBatches(0, config.steps, config.batch_size, 0, 1),
                        num_workers=config.workers, generator=torch.Generator(),
                        prefetch_factor=4 if config.workers else None)
    rows = []
    start = time.perf_counter()
    classifier.train()
    for step, (pixels, targets) in enumerate(loader, 1):
        optimizer.zero_grad(set_to_none=True)
        with _autocast(config, device):
            loss = nn.functional.cross_entropy(classifier(pixels.to(device)).float(),
                                               targets.to(device))
        loss.backward()
        if config.grad_clip:
            nn.utils.clip_grad_norm_(classifier.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        value = loss.item()
        if not math.isfinite(value):
            raise RuntimeError(f"the baseline's loss became {value} at step {step}; lower --lr")
        if step % config.log_every == 0 or step == config.steps:
            rows.append({"step": step, "loss": value, "lr": optimizer.param_groups[0]["lr"],
                         "seconds": round(time.perf_counter() - start, 1)})
            if config.progress:
                print(f"baseline step {step}/{config.steps}  loss {value:.3f}", flush=True)
    train_seconds = time.perf_counter() - start
    classifier.eval()
    n = _count(EVAL_IMAGES_ENV, EVAL_IMAGES)
    top1 = evaluate_classifier(classifier, preprocess, config.seed, size, n)
    report = {"steps": config.steps, "precision": config.precision,
              "train_seconds": round(train_seconds, 1), "machine": machine(),
              "config": config.to_json(), "eval": {"top1": top1}}
    _write(output, classifier, rows, report)
    table = write_robustness(Path(config.output), read_run_eval(Path(config.output)), top1)
    print(format_baseline(top1, table))
    return report


def _autocast(config: TrainConfig, device: torch.device):
    if config.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if config.precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return torch.autocast(device.type, enabled=False)


def _write(output: Path, classifier: SupervisedClassifier, rows: list[dict],
           report: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    with atomic_file(output / "classifier.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(tmp))
    with atomic_file(output / "metrics.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with atomic_file(output / "eval.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")


def format_baseline(top1: dict[str, float], table: dict[str, Any] | None) -> str:
    lines = ["\nsupervised baseline (same image tower, cross-entropy on the class labels):"]
    lines += [f"  {synthetic.SUITES[name].description:<55} {100 * v:5.1f}%"
              for name, v in top1.items()]
    if table is None:
        lines.append("  (no contrastive run in this directory yet: train it with the same "
                     "--output to compare)")
        return "\n".join(lines)
    lines.append("\neffective robustness (top-1 on seen compositions, mean over the shift "
                 "suites, drop):")
    for name, e in table["effective_robustness"].items():
        lines.append(f"  {name:<40} {100 * e['in_distribution']:5.1f}%  "
                     f"{100 * e['shift_mean']:5.1f}%  {100 * e['drop']:5.1f}")
    return "\n".join(lines)

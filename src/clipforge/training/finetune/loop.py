"""The fine-tuning run: zero-shot head, training, WiSE-FT sweep, the run's model and record.

Every method starts from the zero-shot classifier (:class:`~clipforge.evaluation.zeroshot.
ZeroShotClassifier`, the one place zero-shot logic lives) turned into a linear head over unit
image embeddings (:meth:`~clipforge.classifier.LinearClassifier.from_zeroshot`): training then
starts from the zero-shot accuracy instead of chance, which is what lets a probe beat a plain
one with few labels and lets WiSE-FT mix the weights of two models that agree on what each
output means.

* ``linear``: the image tower is frozen; its embeddings are computed once and the head is
  trained on them with cross-entropy.
* ``full``: the image tower and the head are trained end to end with cross-entropy (the text
  tower is not needed: the head holds the class embeddings), AdamW with a cosine schedule
  after a linear warm-up, bf16 autocast where the hardware computes it natively.  The tower
  trains in eval mode: BatchNorm statistics (ResNets) stay those of pretraining, which small
  batches of few classes would spoil and which WiSE-FT could not mix meaningfully.
* ``lora``: as ``full``, but the pretrained tower stays frozen and low-rank adapters on its
  attention and MLP projections are trained with the head (:mod:`.lora`); they are saved in
  ``adapter/`` and merged into the run's model, which WiSE-FT then mixes as it mixes ``full``'s.
* ``flyp``: both towers trained with the contrastive loss against the class prompts; the head
  is the zero-shot head of the trained towers (:mod:`.flyp`).
* ``tip-adapter`` / ``tip-adapter-f``: a cache of the training images' embeddings on top of the
  zero-shot head, training-free or with trained keys (:mod:`.tip_adapter`).

``--layer-decay`` scales each layer's rate (:mod:`.layer_decay`); ``--image-size`` resamples the
position embeddings first (:func:`clipforge.model.resize.with_image_size`), so the run, its
WiSE-FT mixes and its model are all at the new resolution.

The run directory is a model directory like any other (``clipforge.load(DIR)``, with
``model.classifier``), and also holds ``finetune_config.json``, ``metrics.jsonl``,
``finetune.json`` (accuracies, the WiSE-FT table, what was skipped) and, with ``--wise-ft``,
``wise-ft/alpha-A/``: each mix as a model directory of its own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ...classifier import CacheClassifier, LinearClassifier
from ...evaluation.datasets import ClassificationData, ImageFiles
from ...evaluation.tasks import _classnames_option, choose_templates
from ...evaluation.zeroshot import Templates, ZeroShotClassifier
from ...factory import create_model
from ...fileio import atomic_file
from ...inference import embed_image_batches
from ...model import CLIP
from ...model.resize import with_image_size
from ...ranks import all_gather_objects, barrier, rank_and_world
from ...reading import DataError, skip_reason
from ..checkpoint import random_state, set_random_state
from ..distributed import average_gradients, init_distributed
from ..loop import MetricsLog, TrainingDiverged, resolve_precision
from ..optim import build_optimizer, cosine_schedule
from . import tip_adapter
from .config import FROZEN_TOWER, GENERIC_TEMPLATES, FinetuneConfig
from .data import Labelled, check_classes, check_same_classes, read_labelled, split_off
from .flyp import Flyp, head_of
from .layer_decay import layer_scales
from .lora import ADAPTER_DIR, add_adapters, save_and_merge
from .lora import check as check_lora
from .resume import Checkpoints, open_run
from .wise_ft import (
    alpha_name,
    apply_state,
    interpolate,
    save_model_directory,
    save_run_model,
    tuned_state,
)

log = logging.getLogger("clipforge.finetune")
CONFIG_FILE = "finetune_config.json"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "finetune.json"
WISE_FT_DIR = "wise-ft"

Batches = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]


class Tuned(nn.Module):
    """What is trained: the head over unit image embeddings, after the image tower (``full``)
    or on embeddings computed beforehand (``linear``: ``visual`` None)."""

    def __init__(self, head: LinearClassifier, visual: nn.Module | None = None):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(head.weight.shape[1], head.weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(head.weight)
            self.head.bias.copy_(head.bias)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = inputs if self.visual is None else self.visual(inputs)
        return self.head(F.normalize(features.float(), dim=-1))

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(inputs).float(), targets)

    def classifier(self, like: LinearClassifier) -> LinearClassifier:
        """The trained head, with ``like``'s class names and info."""
        return LinearClassifier(self.head.weight, self.head.bias, like.classnames, like.info)


@dataclasses.dataclass
class Skips:
    """Items skipped while training or validating, each counted once however many epochs meet
    it, with the first reason given."""

    items: dict[str, str] = dataclasses.field(default_factory=dict)

    def add(self, name: str, reason: str) -> None:
        if name not in self.items:
            log.warning("skipped %s: %s", name, reason)
            self.items[name] = reason

    def summary(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for reason in self.items.values():
            kinds[skip_reason(reason)] = kinds.get(skip_reason(reason), 0) + 1
        return {"count": len(self.items), "reasons": kinds,
                "items": [{"item": k, "reason": v} for k, v in self.items.items()]}


# --------------------------------------------------------------------------- data


def load_sets(config: FinetuneConfig, preprocess: Any) -> tuple[Labelled, Labelled | None]:
    """(training part, validation part or None): ``--val`` read as its own set, or a held-out
    share of the data.  Raises :class:`DataError` for classes without training images."""
    options = dict(classnames=_classnames_option(config.classnames), preprocess=preprocess,
                   image_key=config.image_key, label_key=config.label_key,
                   workers=config.workers)
    data = read_labelled(config.data, split="train", **options)
    if config.val is not None:
        val = read_labelled(config.val, split="val", **options)
        check_same_classes(data, val, config.val)
        train = data
    else:
        train_idx, val_idx = split_off(data.targets, config.val_fraction, config.seed)
        train = data.subset(train_idx, data.name, keep_skipped=True)
        val = data.subset(val_idx, f"{data.name} (held out)") if val_idx else None
    check_classes(train, f"{config.data} (the training part)")
    return train, val


def templates_for(data: Labelled, option: str | None
                  ) -> tuple[list[str] | dict[str, list[str]], str]:
    """The zero-shot head's prompts, as ``clipforge eval`` picks them (``--templates``, the
    data's own, a known dataset's), falling back to a small generic ensemble rather than a
    single prompt: the head is the training's starting point."""
    described = ClassificationData(data.name, data.classnames, ImageFiles([], []),
                                   data.templates)  # what choose_templates reads of a set
    templates, source = choose_templates(described, option)
    if source == "default":
        return list(GENERIC_TEMPLATES), "generic ensemble"
    return templates, source


def rank_batches(order: list[int], batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This rank's share of each batch of ``batch_size`` (the whole batch, over all ranks) of
    ``order``: items ``rank::world`` of the batch, cut to a multiple of ``world`` so that every
    rank has as many (equal shares make the averaged gradient the whole batch's, and let
    FLYP's loss gather the features of every rank)."""
    batches = []
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        batch = batch[:len(batch) - len(batch) % world] if world > 1 else batch
        if batch:
            batches.append(batch[rank::world])
    return batches


def _pixel_batches(part: Labelled, config: FinetuneConfig, skips: Skips, device: torch.device
                   ) -> Batches:
    """Each epoch's batches of (pixels, targets) in a fresh order drawn from (seed, epoch),
    this process's share of each under torchrun; unreadable images are left out of their batch
    and counted."""
    rank, world = rank_and_world()

    def epoch_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = torch.randperm(len(part), generator=generator).tolist()
        loader = DataLoader(part.items, batch_sampler=rank_batches(order, config.batch_size,
                                                                   rank, world),
                            num_workers=config.workers, collate_fn=list)
        for batch in loader:
            for tag, pixels, reason in batch:
                if pixels is None:
                    skips.add(tag.name, reason)
            good = [(tag.payload, pixels) for tag, pixels, _ in batch if pixels is not None]
            if good:
                yield (torch.stack([p for _, p in good]).to(device),
                       torch.tensor([t for t, _ in good], device=device))
    return epoch_batches


def _feature_batches(features: torch.Tensor, targets: torch.Tensor, config: FinetuneConfig
                     ) -> Batches:
    """Each epoch's batches of (embeddings, targets), in a fresh order drawn from (seed,
    epoch)."""
    def epoch_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = torch.randperm(len(targets), generator=generator)
        for start in range(0, len(order), config.batch_size):
            index = order[start:start + config.batch_size]
            yield features[index], targets[index]
    return epoch_batches


def embed(model: CLIP, part: Labelled, config: FinetuneConfig, skips: Skips
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit image embeddings and targets of a part's readable images (the evaluation path:
    :func:`~clipforge.inference.embed_image_batches`, eval mode, float32)."""
    vectors, targets = [], []
    for batch in embed_image_batches(model, part.items, config.batch_size, config.workers,
                                     config.progress, desc=part.name):
        vectors.append(torch.from_numpy(batch.vectors))
        targets += [tag.payload for tag in batch.tags]
        for tag, reason in batch.failures:
            skips.add(tag.name, reason)
    if not targets:
        raise DataError(f"no image of {part.name} could be read ({len(skips.items)} skipped)")
    return torch.cat(vectors), torch.tensor(targets)


def accuracy(classifier: LinearClassifier, vectors: torch.Tensor, targets: torch.Tensor
             ) -> float:
    """The share of images whose most likely class is their own."""
    return int((classifier.predict(vectors) == targets).sum()) / len(targets)


# --------------------------------------------------------------------------- training


_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(config: FinetuneConfig, device: torch.device):
    """bf16 or fp16 autocast (float32 weights) when asked; otherwise float32 throughout."""
    return torch.autocast(device.type, dtype=_AUTOCAST.get(config.precision, torch.bfloat16),
                          enabled=config.precision in _AUTOCAST)


@dataclasses.dataclass
class Optimisation:
    """What one training step updates: the optimiser, its schedule and fp16's loss scaler."""

    trainable: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler":
                self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def _optimisation(tuned: nn.Module, total: int, config: FinetuneConfig) -> Optimisation:
    """AdamW with decoupled weight decay (none on gains and biases), each layer's rate scaled
    by ``--layer-decay``, linear warm-up then cosine decay; a loss scaler for fp16."""
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    scales = layer_scales(tuned, config.layer_decay) if config.layer_decay != 1 else None
    optimizer = build_optimizer(tuned, config.lr, config.weight_decay, lr_scale=scales)
    return Optimisation(trainable, optimizer, cosine_schedule(optimizer, config.warmup, total),
                        torch.amp.GradScaler(trainable[0].device.type,
                                             enabled=config.precision == "fp16"))


def _step(tuned: nn.Module, opt: Optimisation, inputs: torch.Tensor, targets: torch.Tensor,
          config: FinetuneConfig, shared: bool) -> float:
    """One optimisation step; returns the loss (a non-finite loss stops the run)."""
    opt.optimizer.zero_grad(set_to_none=True)
    with _autocast(config, opt.trainable[0].device):
        loss = tuned.loss(inputs, targets)
    opt.scaler.scale(loss).backward()
    if shared:
        average_gradients(opt.trainable)
    opt.scaler.unscale_(opt.optimizer)
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(opt.trainable, config.grad_clip)
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.scheduler.step()
    value = loss.item()
    if not math.isfinite(value):
        raise TrainingDiverged(f"loss became {value}; stopped. Lower --lr or raise --warmup.")
    return value


def fit(tuned: nn.Module, batches: Batches, steps_per_epoch: int, config: FinetuneConfig,
        metrics: MetricsLog, after_epoch: Callable[[int, int], None],
        checkpoints: Checkpoints, shared: bool = False) -> None:
    """Train ``tuned``'s trainable parameters on ``tuned.loss(inputs, targets)`` for
    ``config.epochs`` (:func:`_optimisation`, gradient clipping); ``after_epoch(epoch, step)``
    validates, then the epoch is checkpointed (and a resumed run starts after its checkpoint's
    epoch).  ``shared``: each torchrun process has its share of every batch
    (:func:`rank_batches`), and the gradients are averaged over them; otherwise every process
    computes the same whole batches."""
    total = config.epochs * steps_per_epoch
    opt = _optimisation(tuned, total, config)
    first, step = _restore(checkpoints, tuned, opt)
    with tqdm(total=total, initial=step, disable=not config.progress, desc="finetune",
              unit="step", dynamic_ncols=True) as bar:
        for epoch in range(first, config.epochs + 1):
            for inputs, targets in batches(epoch):
                value = _step(tuned, opt, inputs, targets, config, shared)
                step += 1
                bar.set_postfix(loss=f"{value:.3f}", refresh=False)
                bar.update(1)
                if step % config.log_every == 0:
                    metrics.write({"step": step, "epoch": epoch, "loss": value, "lr": max(
                        g["lr"] for g in opt.optimizer.param_groups)})
            after_epoch(epoch, step)
            if is_main():
                checkpoints.save(step, {"tuned": tuned.state_dict(), **opt.state_dict(),
                                        "random": random_state(), "epoch": epoch, "step": step})


def _steps_per_epoch(size: int, batch_size: int) -> int:
    return max(1, math.ceil(size / batch_size))


def _restore(checkpoints: Checkpoints, tuned: nn.Module, opt: Optimisation) -> tuple[int, int]:
    """(first epoch to run, steps done): from the checkpoint resumed from, if any."""
    state = checkpoints.state
    if state is None:
        return 1, 0
    try:
        tuned.load_state_dict(state["tuned"])
        opt.load_state_dict(state)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise ValueError(f"the checkpoint in {checkpoints.directory} does not fit this run "
                         f"({str(exc).splitlines()[0]}); delete that folder to start over"
                         ) from None
    set_random_state(state["random"])
    log.info("resuming after epoch %d (step %d)", state["epoch"], state["step"])
    return int(state["epoch"]) + 1, int(state["step"])


# --------------------------------------------------------------------------- the run


def is_main() -> bool:
    """Whether this process writes the run (rank 0, or the only process)."""
    return rank_and_world()[0] == 0


class _NoMetrics:
    """The metrics log of a torchrun process other than rank 0, which writes none."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Run a fine-tuning; returns the record also written to ``OUTPUT/finetune.json`` (under
    torchrun, on rank 0: the other processes train their share and return ``{}``)."""
    config.validate()
    _, device = init_distributed(config.device)
    config = dataclasses.replace(config, device=str(device))
    config = resolve_precision(config)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    model = create_model(config.model, weights=config.weights, activation=config.activation,
                         device=config.device)
    if config.method == "lora":
        check_lora(model)
    if config.image_size is not None:
        model = with_image_size(model, config.image_size)
    train, val = load_sets(config, model.preprocess)
    config = config.resolved(_steps_per_epoch(len(train), config.batch_size))
    output = Path(config.output)
    checkpoints = open_run(config, output, CONFIG_FILE, RESULT_FILE)
    barrier()  # every process has read the recorded run before rank 0 rewrites it
    metrics: MetricsLog | _NoMetrics = _NoMetrics()
    if is_main():
        output.mkdir(parents=True, exist_ok=True)
        with atomic_file(output / CONFIG_FILE) as tmp:
            tmp.write_text(json.dumps(config.to_json(), indent=2) + "\n", encoding="utf-8")
        # the history up to the checkpoint (a fresh run: none)
        metrics = MetricsLog(output / METRICS_FILE, checkpoints.resume_step, False)
    try:
        record = _run(config, model, train, val, output, metrics, started, checkpoints)
    finally:
        metrics.close()
    if is_main():
        checkpoints.clear()
    return record


def _zero_shot_head(model: CLIP, train: Labelled, config: FinetuneConfig
                    ) -> tuple[LinearClassifier, Templates]:
    """The zero-shot head every method starts from, and the templates it was built from."""
    templates, source = templates_for(train, config.templates)
    zeroshot = ZeroShotClassifier.build(model, train.classnames, templates)
    count = len(templates) if isinstance(templates, list) else \
        sum(len(t) for t in templates.values())
    info = {"method": config.method, "templates": {"source": source, "count": count}}
    return LinearClassifier.from_zeroshot(zeroshot, info), templates


def _validate(model: CLIP, classifier: LinearClassifier, val: Labelled | None,
              config: FinetuneConfig, skips: Skips) -> float | None:
    """Validation accuracy (None without validation data, and on torchrun processes other
    than rank 0, which validates alone)."""
    if val is None or not is_main():
        return None
    model.eval()
    vectors, targets = embed(model, val, config, skips)
    return accuracy(classifier, vectors, targets)


def _run(config: FinetuneConfig, model: CLIP, train: Labelled, val: Labelled | None,
         output: Path, metrics: MetricsLog, started: float, checkpoints: Checkpoints
         ) -> dict[str, Any]:
    skips = Skips()
    for item, reason in train.skipped + (val.skipped if val is not None else []):
        skips.add(item, reason)
    zero_shot, templates = _zero_shot_head(model, train, config)
    zero_shot_acc = _validate(model, zero_shot, val, config, skips)
    if checkpoints.state is None:  # a resumed run's history has it
        metrics.write({"step": 0, "epoch": 0, "val_acc1": zero_shot_acc})
    whole = config.method == "flyp"  # both towers change; otherwise the image tower only
    start_state = tuned_state(model, zero_shot, whole)
    tuned = _train(config, model, zero_shot, templates, train, val, metrics, skips, output,
                   checkpoints)
    for items in all_gather_objects(skips.items):  # what every process skipped
        for item, reason in items.items():
            skips.add(item, reason)
    if not is_main():
        return {}
    final_acc = _validate(model, tuned, val, config, skips)
    chosen = {"alpha": 1.0, "val_acc1": final_acc}
    classifier, sweep = tuned, []
    if config.wise_ft:
        end_state = tuned_state(model, tuned, whole)

        def mix(alpha: float) -> LinearClassifier:
            mixed = apply_state(model, interpolate(start_state, end_state, alpha), tuned)
            return head_of(model, train.classnames, templates, mixed) if whole else mixed

        steps = config.epochs * _steps_per_epoch(len(train), config.batch_size)
        sweep = _wise_ft(config, model, mix, val, output, skips, metrics, steps)
        chosen = max(sweep, key=lambda r: (r["val_acc1"], -r["alpha"]))
        classifier = mix(chosen["alpha"])
    classifier.info |= {"wise_ft_alpha": chosen["alpha"], "val_acc1": chosen["val_acc1"]}
    model.eval()
    save_run_model(model, classifier, output)
    record = {"method": config.method, "model": config.model, "weights": config.weights,
              "data": config.data, "val": config.val or f"{config.val_fraction:g} of the data",
              "classes": train.classnames, "n_train": len(train),
              "n_val": len(val) if val is not None else 0,
              "templates": zero_shot.info["templates"], "image_size": model.config.image_size,
              "layer_decay": config.layer_decay, "freeze": config.freeze,
              "zero_shot": {"val_acc1": zero_shot_acc}, "fine_tuned": {"val_acc1": final_acc},
              "wise_ft": sweep, "chosen": chosen, "skipped": skips.summary(),
              "precision": config.precision, **_method_record(config, classifier),
              "seconds": round(time.perf_counter() - started, 2)}
    with atomic_file(output / RESULT_FILE) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def _method_record(config: FinetuneConfig, classifier: LinearClassifier) -> dict[str, Any]:
    """What only some methods have: LoRA's adapters, Tip-Adapter's cache."""
    if config.method == "lora":
        return {"lora": {"rank": config.lora_rank, "alpha": config.lora_alpha,
                         "dropout": config.lora_dropout, "adapter": ADAPTER_DIR}}
    if isinstance(classifier, CacheClassifier):
        return {"tip_adapter": {"alpha": classifier.alpha, "beta": classifier.beta,
                                "cache_size": len(classifier.labels)}}
    return {}


def _train(config: FinetuneConfig, model: CLIP, start: LinearClassifier, templates: Templates,
           train: Labelled, val: Labelled | None, metrics: MetricsLog, skips: Skips,
           output: Path, checkpoints: Checkpoints) -> LinearClassifier:
    """Train by ``config.method``; returns the classifier.  The towers are trained in place
    (``full``, ``flyp``); ``lora``'s adapters are saved in ``output`` and merged into the image
    tower; the other methods leave the towers as they are."""
    model.requires_grad_(False)
    if config.method in FROZEN_TOWER:
        return _train_on_embeddings(config, model, start, train, val, metrics, skips,
                                    checkpoints)
    adapted = None
    if config.method == "lora":  # the adapters alone require grad
        adapted = add_adapters(model, config)
        tuned: nn.Module = Tuned(start, adapted)
    elif config.method == "flyp":
        _unfreeze_towers(model, config.freeze)
        tuned = Flyp(model, train.classnames, templates, config.seed)
    else:
        model.visual.requires_grad_(True)
        tuned = Tuned(start, model.visual)
    tuned = tuned.to(model.device)
    model.eval()  # see the module docstring: BatchNorm statistics stay pretraining's

    def after_epoch(epoch: int, step: int) -> None:
        acc = _validate(model, tuned.classifier(start), val, config, skips)
        metrics.write({"step": step, "epoch": epoch, "val_acc1": acc})

    fit(tuned, _pixel_batches(train, config, skips, model.device),
        _steps_per_epoch(len(train), config.batch_size), config, metrics, after_epoch,
        checkpoints, shared=True)
    if adapted is not None:
        save_and_merge(adapted, output, write=is_main())
    model.requires_grad_(False)
    return tuned.classifier(start)


def _unfreeze_towers(model: CLIP, freeze: str | None) -> None:
    """FLYP trains both towers, the temperature and a SigLIP model's logit bias, less the
    tower ``--freeze`` names."""
    for name, param in model.named_parameters():
        tower = "image" if name.startswith("visual.") else "text"
        param.requires_grad_(name in ("logit_scale", "logit_bias") or tower != freeze)


def _train_on_embeddings(config: FinetuneConfig, model: CLIP, start: LinearClassifier,
                         train: Labelled, val: Labelled | None, metrics: MetricsLog,
                         skips: Skips, checkpoints: Checkpoints) -> LinearClassifier:
    """The methods of a frozen tower, on embeddings computed once: the linear probe, and
    Tip-Adapter's cache (its keys trained for ``tip-adapter-f``, its alpha and beta chosen on
    the validation images)."""
    features, targets = embed(model, train, config, skips)
    frozen_val = embed(model, val, config, skips) if val is not None else None
    steps = _steps_per_epoch(len(targets), config.batch_size)
    if config.method == "linear":
        tuned: nn.Module = Tuned(start).to(features.device)
        like: LinearClassifier = start
    else:
        like = tip_adapter.build_cache(start, features, targets)
        if config.method == "tip-adapter":
            return like if frozen_val is None else tip_adapter.search(like, *frozen_val)[0]
        tuned = tip_adapter.TrainedKeys(like)

    def after_epoch(epoch: int, step: int) -> None:
        acc = None if frozen_val is None else accuracy(tuned.classifier(like), *frozen_val)
        metrics.write({"step": step, "epoch": epoch, "val_acc1": acc})

    fit(tuned, _feature_batches(features, targets, config), steps, config, metrics, after_epoch,
        checkpoints)
    trained = tuned.classifier(like)
    if isinstance(trained, CacheClassifier) and frozen_val is not None:
        trained = tip_adapter.search(trained, *frozen_val)[0]
    return trained


def _wise_ft(config: FinetuneConfig, model: CLIP, mix: Callable[[float], LinearClassifier],
             val: Labelled | None, output: Path, skips: Skips, metrics: MetricsLog, steps: int
             ) -> list[dict[str, Any]]:
    """Each mix of ``config.wise_ft`` (``mix(alpha)`` loads it into ``model`` and returns its
    classifier): written as ``OUTPUT/wise-ft/alpha-A`` and validated (recorded in the metrics
    at the run's last step, ``steps``)."""
    rows = []
    for alpha in config.wise_ft:
        classifier = mix(alpha)
        classifier.info |= {"wise_ft_alpha": alpha}
        acc = _validate(model, classifier, val, config, skips)
        path = save_model_directory(model, classifier, output / WISE_FT_DIR / alpha_name(alpha))
        rows.append({"alpha": alpha, "val_acc1": acc, "path": str(path.relative_to(output))})
        metrics.write({"step": steps, "wise_ft_alpha": alpha, "val_acc1": acc})
        log.info("WiSE-FT alpha %g: validation accuracy %.4f", alpha, acc)
    return rows

"""What ``clipforge finetune`` is asked: :class:`FinetuneConfig`, its per-method defaults and
its checks (no torch here, as :mod:`clipforge.training.config` for ``train``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METHODS = ("full", "flyp", "lora", "linear", "tip-adapter", "tip-adapter-f")
TRAINING_FREE = ("tip-adapter",)
FROZEN_TOWER = ("linear", "tip-adapter", "tip-adapter-f")  # on embeddings computed once
FREEZE = ("image", "text")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# OpenAI's seven-template ensemble, chosen on ImageNet but generic (no dataset's vocabulary):
# the default prompts of the zero-shot head when neither --templates nor the data give any.
GENERIC_TEMPLATES = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                     "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
                     "a photo of the small {}.")
# Per method: (learning rate, epochs, weight decay).  End to end: WiSE-FT's and FLYP's small rate
# (the pretrained features must move little); a probe on frozen features: a rate a hundred
# times larger over many cheap epochs, and no decay, which would pull the head away from its
# zero-shot start towards zero.  LoRA: the probe's rate (its adapters start at zero and are
# small, as the head's changes are) over the end-to-end epochs, and no decay, for the head's sake.
# FLYP: the paper's rate and decay.  Tip-Adapter-F: the paper's (lr 1e-3, 20 epochs, AdamW's
# default decay 0.01); Tip-Adapter itself trains nothing.
METHOD_DEFAULTS = {"full": (1e-5, 10, 0.1), "flyp": (1e-5, 10, 0.1), "lora": (1e-3, 10, 0.0),
                   "linear": (1e-3, 100, 0.0), "tip-adapter": (0.0, 0, 0.0),
                   "tip-adapter-f": (1e-3, 20, 0.01)}
WARMUP_SHARE = 0.1  # default warm-up: this share of the steps
# Settings that may differ when a run is resumed: how it runs, not what it computes
RESUMABLE_CHANGES = ("workers", "progress", "resume", "log_every", "device")


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tuning run.  None means "the method's default" (:data:`METHOD_DEFAULTS`) for
    ``lr``, ``epochs`` and ``weight_decay``, and :data:`WARMUP_SHARE` of the steps for
    ``warmup``; :meth:`resolved` fills them in."""

    data: str
    output: Path
    model: str = "ViT-B-32"
    weights: str | None = None
    activation: str | None = None
    method: str = "full"
    classnames: str | None = None  # a file, or a known dataset name (as clipforge eval)
    templates: str | None = None  # likewise
    val: str | None = None  # a validation set; else val_fraction of data is held out
    val_fraction: float = 0.1
    wise_ft: tuple[float, ...] = ()
    lora_rank: int = 8  # --method lora: the adapters' rank, scale lora_alpha / lora_rank
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    layer_decay: float = 1.0  # layer-wise learning-rate decay (1: off), see .layer_decay
    freeze: str | None = None  # --method flyp: "image" or "text", the tower left as it is
    image_size: int | None = None  # fine-tune at this resolution (positions resampled)
    epochs: int | None = None
    batch_size: int = 32
    lr: float | None = None
    weight_decay: float | None = None
    warmup: int | None = None
    grad_clip: float = 1.0  # max gradient norm; 0: off
    precision: str = "auto"
    seed: int = 0
    workers: int = 0
    device: str = "cpu"
    image_key: str = "filepath"
    label_key: str = "label"
    log_every: int = 10
    progress: bool = True
    resume: bool = False  # continue the run in ``output`` from its last epoch's checkpoint

    def resolved(self, steps_per_epoch: int | None = None) -> FinetuneConfig:
        """The config with the method's defaults filled in (and the warm-up, once the number
        of steps per epoch is known)."""
        lr, epochs, decay = METHOD_DEFAULTS[self.method]
        config = dataclasses.replace(
            self, lr=lr if self.lr is None else self.lr,
            epochs=epochs if self.epochs is None else self.epochs,
            weight_decay=decay if self.weight_decay is None else self.weight_decay)
        if config.warmup is None and steps_per_epoch is not None:
            total = config.epochs * steps_per_epoch
            config = dataclasses.replace(config, warmup=math.ceil(WARMUP_SHARE * total))
        return config

    def validate(self) -> None:
        """Refuse settings that cannot run, naming the option and what to give."""
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision!r}: choose one of "
                             f"{', '.join(PRECISIONS)}")
        for name in ("batch_size", "epochs", "log_every", "lora_rank"):
            if name == "epochs" and self.method in TRAINING_FREE:
                continue
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.val is None and not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.wise_ft and self.val is None and self.val_fraction == 0:
            raise ValueError("--wise-ft chooses the mixing coefficient on validation data: give "
                             "--val DATA or a --val-fraction above 0")
        bad = [a for a in self.wise_ft if not 0 <= a <= 1]
        if bad:
            raise ValueError(f"--wise-ft coefficients must lie in [0, 1] (0: the zero-shot "
                             f"model, 1: the fine-tuned one), got {bad[0]}")
        self._validate_lora()
        self._validate_method_options()
        for name in ("lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if value is not None and (value < 0 or not math.isfinite(value)):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, "
                                 f"got {value}")

    def _validate_method_options(self) -> None:
        """Options that only some methods have, refused where they would be ignored."""
        if self.method in TRAINING_FREE:
            given = [f"--{n.replace('_', '-')}" for n in ("epochs", "lr", "weight_decay",
                                                          "warmup") if getattr(self, n) is not None]
            if given:
                raise ValueError(f"--method {self.method} trains nothing, so {', '.join(given)} "
                                 "would be ignored: drop it, or use --method tip-adapter-f")
        if self.wise_ft and self.method.startswith("tip-adapter"):
            raise ValueError(f"--wise-ft mixes a fine-tuned model's weights with the zero-shot "
                             f"model's; --method {self.method} leaves the towers as they are "
                             "(its cache's alpha, chosen on validation, is its own mix): drop "
                             "--wise-ft")
        if not (0 < self.layer_decay <= 1):
            raise ValueError(f"--layer-decay must lie in (0, 1] (1: off), got {self.layer_decay}")
        if self.layer_decay != 1 and self.method not in ("full", "flyp"):
            raise ValueError(f"--layer-decay scales the rates of the tower's layers, which "
                             f"--method {self.method} does not train; use it with full or flyp")
        if self.freeze is not None:
            if self.freeze not in FREEZE:
                raise ValueError(f"--freeze {self.freeze!r}: choose image or text")
            if self.method != "flyp":
                raise ValueError(f"--freeze chooses which tower --method flyp leaves as it is; "
                                 f"--method {self.method} trains the image tower only (its "
                                 "head holds the class embeddings): use --method linear to "
                                 "freeze it")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"--image-size must be a positive number of pixels, got "
                             f"{self.image_size}")
        if self.image_size is not None and self.method in FROZEN_TOWER:
            raise ValueError(f"--image-size fine-tunes at a new resolution, but --method "
                             f"{self.method} does not train the image tower, whose resampled "
                             "positions would stay untrained: use full, flyp or lora")

    def _validate_lora(self) -> None:
        if not (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)):
            raise ValueError(f"--lora-alpha must be a finite number above 0, got "
                             f"{self.lora_alpha}")
        if self.lora_dropout != 0:
            # peft adapts the fused q/k/v projection, a bare parameter, through its
            # ``target_parameters`` wrapper, which cannot apply dropout to the input
            raise ValueError(f"--lora-dropout {self.lora_dropout}: only 0 is supported, since "
                             "the attention's fused q/k/v projection is adapted as a parameter, "
                             "where peft cannot apply dropout; leave --lora-dropout at 0")

    def changed_settings(self, recorded: dict[str, Any]) -> list[str]:
        """The settings of this config that differ from a recorded run's (``to_json`` of the
        run's own config), less :data:`RESUMABLE_CHANGES`."""
        mine = self.to_json()
        return [k for k in mine if k not in RESUMABLE_CHANGES and recorded.get(k) != mine[k]]

    def to_json(self) -> dict[str, Any]:
        """The settings as JSON values (what the run directory records)."""
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}


def parse_alphas(text: str) -> tuple[float, ...]:
    """``--wise-ft 0,0.25,0.5`` -> the sorted distinct coefficients."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--wise-ft takes comma-separated numbers in [0, 1], e.g. "
                         f"0,0.25,0.5,0.75,1; got {text!r}") from None
    if not values:
        raise ValueError("--wise-ft needs at least one coefficient, e.g. 0,0.25,0.5,0.75,1")
    return tuple(sorted(set(values)))

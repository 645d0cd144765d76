"""What ``clipforge train`` is asked: :class:`TrainConfig`, its defaults and checks.

Kept apart from the loop (:mod:`clipforge.training.loop`) and free of torch, so that the
command line builds its ``train`` options from these defaults without importing the loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..configs import ACTIVATIONS

LOSSES = ("clip", "siglip")
# The text tower's tokenizer: the architecture's own ("model"), or a byte-level BPE learnt from
# the training captions ("learn", see clipforge.text.vocabulary); "auto" learns one for a run
# from scratch on the built-in data (captions in three languages), the model's otherwise.
TOKENIZERS = ("auto", "model", "learn")
# A run on the built-in data widens its scenes from easy to the full distribution over this
# share of its samples (clipforge.data.synthetic.SyntheticCaptions' curriculum).
CURRICULUM_SHARE = 0.6
# AdamW's decoupled weight decay: CLIP's 0.2, except on the built-in data from scratch, where a
# stronger pull towards small weights was measured to help (README, "More ablations" and
# "Longer runs"): held-out colour-shape compositions at 450 steps, seen ones and the shift
# suites at 600, in every paired seed.  A closed world of 48 conjunctions is easy to memorise.
WEIGHT_DECAY = 0.2
BUILTIN_WEIGHT_DECAY = 1.0
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BUILTIN_DATA = "builtin"


@dataclass
class TrainConfig:
    output: Path
    data: str = BUILTIN_DATA
    model: str = "small-rn"
    weights: str | None = None
    activation: str | None = None
    tokenizer: str = "auto"
    vocab_size: int = 1024
    # 600 x 256 fits the first run in ten minutes on 2 cores, and held-out compositions rise
    # with the steps up to there (README, "Longer runs").
    steps: int = 600
    batch_size: int = 256
    micro_batch: int | None = None
    lr: float = 1e-3
    warmup: int = 40
    weight_decay: float | None = None
    grad_clip: float | None = 1.0
    loss: str = "clip"
    precision: str = "auto"
    patch_dropout: float = 0.0
    grad_checkpointing: bool = False
    lock_image: bool = False
    lock_text: bool = False
    workers: int = 1
    seed: int = 0
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    resume: str | None = None
    resume_override: tuple[str, ...] = ()
    log_every: int = 10
    eval_every: int = 0
    tensorboard: bool = False
    device: str = "cpu"
    csv_image_key: str = "filepath"
    csv_caption_key: str = "title"
    progress: bool = True

    def validate(self) -> None:
        problems = []
        if self.loss not in LOSSES:
            problems.append(f"--loss {self.loss!r}: choose {', '.join(LOSSES)}")
        if self.precision not in PRECISIONS:
            problems.append(f"--precision {self.precision!r}: choose {', '.join(PRECISIONS)}")
        if self.precision == "fp16" and not self.device.startswith("cuda"):
            problems.append("--precision fp16 needs a CUDA device (use bf16 on CPU)")
        if self.tokenizer not in TOKENIZERS:
            problems.append(f"--tokenizer {self.tokenizer!r}: choose {', '.join(TOKENIZERS)}")
        elif self.learns_vocabulary() and (self.weights or Path(self.model).exists()):
            problems.append("--tokenizer learn gives the text tower a new vocabulary, which only "
                            "a model trained from scratch can take: drop --weights (or give an "
                            "architecture name as --model), or pass --tokenizer model")
        if self.weight_decay is not None and self.weight_decay < 0:
            problems.append(f"--weight-decay {self.weight_decay}: must be 0 or more")
        if self.vocab_size < 300:
            problems.append("--vocab-size must be at least 300 (the 256 byte tokens and the "
                            "special tokens come first)")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            problems.append(f"--activation {self.activation!r}: choose {', '.join(ACTIVATIONS)}")
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) <= 0:
                problems.append(f"--{name.replace('_', '-')} must be positive")
        if self.micro_batch is not None and not 0 < self.micro_batch:
            problems.append("--micro-batch must be positive")
        if not 0 <= self.patch_dropout < 1:
            problems.append("--patch-dropout must be in [0, 1)")
        if self.lock_image and self.lock_text:
            problems.append("--lock-image and --lock-text together leave nothing to train")
        checked = [f for f in self.__dataclass_fields__ if f not in RESUME_FREE]
        for name in setting_names(self.resume_override):
            if name not in self.__dataclass_fields__:  # a free setting needs no override
                problems.append(f"--resume-override: unknown setting {option_name(name)[2:]!r}; "
                                f"choose from {', '.join(option_name(f)[2:] for f in checked)}")
        if problems:
            raise ValueError("; ".join(problems))

    def curriculum(self) -> int:
        """Samples over which the built-in data widens (CURRICULUM_SHARE of the run's)."""
        return int(CURRICULUM_SHARE * self.steps * self.batch_size)

    def from_scratch_on_builtin(self) -> bool:
        """A new model on the built-in data: the case with its own defaults."""
        return (self.data == BUILTIN_DATA and self.weights is None
                and not Path(self.model).exists())

    def learns_vocabulary(self) -> bool:
        """Whether the run learns its tokenizer from its captions (see TOKENIZERS)."""
        if self.tokenizer == "auto":
            return self.from_scratch_on_builtin()
        return self.tokenizer == "learn"

    def decay(self) -> float:
        """The weight decay the optimiser gets: --weight-decay, else the default for the data."""
        if self.weight_decay is not None:
            return self.weight_decay
        return BUILTIN_WEIGHT_DECAY if self.from_scratch_on_builtin() else WEIGHT_DECAY

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in
                dataclasses.asdict(self).items()}


# Settings a resumed run may change freely: they decide where and how fast the run computes
# and what it logs or keeps, not what it computes (device, --micro-batch and
# --grad-checkpointing give the same steps up to float round-off).  Every other setting (data,
# model, steps, batch size, learning rate and schedule, loss, precision, seed, ...) shapes the
# result: a resume that changes one is refused unless --resume-override names it.  New
# settings are checked unless added here.
RESUME_FREE = frozenset({
    "output", "resume", "resume_override", "workers", "log_every", "eval_every", "tensorboard",
    "progress", "checkpoint_every", "keep_checkpoints", "device", "micro_batch",
    "grad_checkpointing"})


def setting_names(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"batch-size,lr"`` (or a list of names) -> ``("batch_size", "lr")``: the field names
    of the settings ``--resume-override`` accepts, spelled as options or as fields."""
    items = text.split(",") if isinstance(text, str) else list(text or ())
    return tuple(item.strip().lstrip("-").replace("-", "_") for item in items if item.strip())


def option_name(name: str) -> str:
    return "--" + name.replace("_", "-")


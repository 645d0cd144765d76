"""``clipforge train``: contrastive pretraining (:mod:`clipforge.training.loop`).

The options are built from :class:`~clipforge.training.config.TrainConfig`'s defaults, which
need no torch; the loop itself is imported only when the command runs."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..configs import ACTIVATIONS
from ..training.config import (
    BUILTIN_WEIGHT_DECAY,
    LOSSES,
    PRECISIONS,
    TOKENIZERS,
    WEIGHT_DECAY,
    TrainConfig,
    setting_names,
)


def _default(name: str):
    """One source of truth for the training defaults: TrainConfig's."""
    return TrainConfig.__dataclass_fields__[name].default


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="contrastive pretraining (built-in data by default)",
                       description="Train a CLIP model. With no --data it trains "
                       f"{_default('model')} on "
                       "the built-in procedural dataset and evaluates it zero-shot. Scale out "
                       "with `torchrun --nproc_per_node N -m clipforge train ...`.")
    p.add_argument("--data", default=_default("data"), help="builtin, a CSV/TSV of image paths "
                   "and captions, a folder of images with same-name .txt captions, or webdataset "
                   "shards ('shards/{00000..00099}.tar')")
    p.add_argument("--output", type=Path, help="run directory (default runs/train-DATE-TIME)")
    p.add_argument("--model", default=_default("model"),
                   help="architecture, or a model to fine-tune")
    p.add_argument("--weights", help="initial weights for an architecture name")
    p.add_argument("--activation", choices=ACTIVATIONS)
    p.add_argument("--tokenizer", choices=TOKENIZERS, default=_default("tokenizer"),
                   help="model: the architecture's own; learn: a byte-level BPE learnt from the "
                   "first 10,000 training captions, saved with the run (a model trained from "
                   "scratch only); auto (default): learn on the built-in data from scratch, "
                   "model otherwise")
    p.add_argument("--vocab-size", type=int, default=_default("vocab_size"),
                   help="most ids of a learnt vocabulary")
    p.add_argument("--steps", type=int, default=_default("steps"))
    p.add_argument("--batch-size", type=int, default=_default("batch_size"),
                   help="global batch (all processes)")
    p.add_argument("--micro-batch", type=int, help="GradCache: exact large batches, computing "
                   "at most this many examples with a graph at once")
    p.add_argument("--lr", type=float, default=_default("lr"))
    p.add_argument("--warmup", type=int, default=_default("warmup"))
    p.add_argument("--weight-decay", type=float, default=_default("weight_decay"),
                   help=f"AdamW's (default: {BUILTIN_WEIGHT_DECAY} on the built-in data from "
                   f"scratch, CLIP's {WEIGHT_DECAY} otherwise)")
    p.add_argument("--grad-clip", type=float, default=_default("grad_clip"),
                   help="max gradient norm (0: off)")
    p.add_argument("--loss", choices=LOSSES, default=_default("loss"))
    p.add_argument("--precision", choices=PRECISIONS,
                   default=_default("precision"),
                   help="bf16 autocast (CPU/GPU), fp16 with a gradient scaler (GPU); auto: "
                   "bf16 where the hardware computes it natively, else fp32")
    p.add_argument("--patch-dropout", type=float, default=_default("patch_dropout"),
                   help="FLIP: share of patches dropped while training (ViT)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--lock-image", action="store_true", help="LiT: freeze the image tower")
    p.add_argument("--lock-text", action="store_true", help="freeze the text tower")
    p.add_argument("--workers", type=int, default=_default("workers"),
                   help="data loading processes per rank")
    p.add_argument("--seed", type=int, default=_default("seed"))
    p.add_argument("--checkpoint-every", type=int, default=_default("checkpoint_every"))
    p.add_argument("--keep-checkpoints", type=int, default=_default("keep_checkpoints"))
    p.add_argument("--resume", help="'latest' (in --output) or a checkpoint file")
    p.add_argument("--resume-override", type=setting_names, default=(), metavar="NAME[,NAME]",
                   help="with --resume: accept these changed settings (e.g. steps,lr); others "
                   "that shape the result must stay as the run had them")
    p.add_argument("--log-every", type=int, default=_default("log_every"))
    p.add_argument("--eval-every", type=int, default=_default("eval_every"),
                   help="zero-shot eval every N steps (built-in data)")
    p.add_argument("--tensorboard", action="store_true")
    p.add_argument("--device", default=_default("device"))
    p.add_argument("--csv-image-key", default=_default("csv_image_key"))
    p.add_argument("--csv-caption-key", default=_default("csv_caption_key"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--baseline", action="store_true",
                   help="then train the supervised baseline of the effective-robustness "
                   "comparison (the same image tower on the class labels of the same images, for "
                   "the same budget) into OUTPUT/baseline; built-in data only")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..training.distributed import leave_distributed
    from ..training.loop import train

    output = args.output or Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
    options = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    options["output"] = output
    options["progress"] = not args.no_progress
    config = TrainConfig(**options)
    train(config)
    leave_distributed()  # after success only: a failed rank exits and torchrun stops the rest
    if args.baseline:
        from ..training.baseline import train_baseline

        train_baseline(config)
    return 0

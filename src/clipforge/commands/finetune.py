"""``clipforge finetune``: a model adapted to your own labelled images
(:mod:`clipforge.training.finetune`), written as a model directory that carries its classes."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..configs import ACTIVATIONS
from ..training.finetune.config import (
    FREEZE,
    METHOD_DEFAULTS,
    METHODS,
    PRECISIONS,
    TRAINING_FREE,
    FinetuneConfig,
    parse_alphas,
)
from .options import DEFAULT_MODEL, default_weights


def _default(name: str):
    """One source of truth for the defaults: FinetuneConfig's."""
    return FinetuneConfig.__dataclass_fields__[name].default


def _defaults(index: int) -> str:
    return ", ".join(f"{method} {values[index]:g}" for method, values in METHOD_DEFAULTS.items()
                     if method not in TRAINING_FREE)


def _alphas(text: str) -> tuple[float, ...]:
    try:
        return parse_alphas(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="adapt a model to your labelled images (zero-shot "
                       "head, end-to-end or linear, WiSE-FT)",
                       description="Fine-tune a model into a classifier of your classes, "
                       "starting from its zero-shot head. DATA is a labelled set as `clipforge "
                       "eval` reads it: an ImageFolder tree, a CSV/TSV with image and label "
                       "columns, or webdataset shards with .cls labels. The output directory "
                       "is a model: `clipforge classify IMAGE --model DIR` answers with its "
                       "classes.")
    p.add_argument("data", help="the labelled training set (its 'train' split if it has "
                   "split folders)")
    p.add_argument("--output", type=Path, help="run directory (default runs/finetune-DATE-TIME; "
                   "needed with --resume)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"architecture name, checkpoint or model directory (default "
                   f"{DEFAULT_MODEL})")
    p.add_argument("--weights", help="with an architecture name: pretrained tag or checkpoint "
                   "(default: its first published tag)")
    p.add_argument("--activation", choices=ACTIVATIONS)
    p.add_argument("--method", choices=METHODS, default=_default("method"),
                   help="full: image tower and head end to end with cross-entropy (default); "
                   "flyp: both towers with the contrastive loss against the class prompts, the "
                   "head rebuilt from them; lora: low-rank adapters on the image tower's "
                   "attention and MLP projections (a ResNet's convolutions and attention pool), "
                   "and the head (needs peft; the adapters are "
                   "saved in OUTPUT/adapter and merged into the model); linear: the head alone, "
                   "on frozen image embeddings; tip-adapter: a training-free cache of the "
                   "training images' embeddings on the zero-shot head; tip-adapter-f: its "
                   "keys trained")
    p.add_argument("--lora-rank", type=int, default=_default("lora_rank"),
                   help="--method lora: the adapters' rank")
    p.add_argument("--lora-alpha", type=float, default=_default("lora_alpha"),
                   help="--method lora: the adapters' scale is alpha / rank")
    p.add_argument("--lora-dropout", type=float, default=_default("lora_dropout"),
                   help="--method lora: only 0 is supported (peft cannot drop out on the fused "
                   "q/k/v projection)")
    p.add_argument("--layer-decay", type=float, default=_default("layer_decay"),
                   help="full, flyp: layer-wise learning-rate decay, e.g. 0.65 (each block "
                   "down from the head learns at this factor of the one above; 1: off)")
    p.add_argument("--freeze", choices=FREEZE,
                   help="flyp: leave this tower as it is (text: the class prompts' embeddings "
                   "move only through the temperature)")
    p.add_argument("--image-size", type=int,
                   help="full, flyp, lora: fine-tune (and save the model) at this resolution, "
                   "the position embeddings resampled (a multiple of the patch size, or of 32 "
                   "for a ResNet)")
    p.add_argument("--classnames", help="class names: a file (one per line, or JSON), or a "
                   "known dataset name; default: the folder names or CSV labels")
    p.add_argument("--templates", help="prompt templates of the zero-shot head: a file or a "
                   "known dataset name (default: the data's own, else a small generic set)")
    p.add_argument("--val", help="validation set (same classes); default: --val-fraction of "
                   "DATA held out")
    p.add_argument("--val-fraction", type=float, default=_default("val_fraction"),
                   help="share of each class held out for validation (seeded; 0: none)")
    p.add_argument("--wise-ft", type=_alphas, default=(), metavar="A[,A...]",
                   help="WiSE-FT: also write the weight mixes of the zero-shot (0) and "
                   "fine-tuned (1) models, e.g. 0,0.25,0.5,0.75,1, validate each and keep the "
                   "best as the run's model")
    p.add_argument("--epochs", type=int, help=f"passes over DATA (default {_defaults(1)})")
    p.add_argument("--batch-size", type=int, default=_default("batch_size"))
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {_defaults(0)})")
    p.add_argument("--weight-decay", type=float, help=f"AdamW (default {_defaults(2)})")
    p.add_argument("--warmup", type=int, help="linear warm-up steps (default: a tenth of the "
                   "steps)")
    p.add_argument("--grad-clip", type=float, default=_default("grad_clip"),
                   help="max gradient norm (0: off)")
    p.add_argument("--precision", choices=PRECISIONS, default=_default("precision"),
                   help="bf16 or fp16 autocast on float32 weights (fp16 with a loss scaler: "
                   "for GPUs without bf16); auto: bf16 where the hardware computes it natively")
    p.add_argument("--seed", type=int, default=_default("seed"))
    p.add_argument("--workers", type=int, default=_default("workers"),
                   help="image decoding processes")
    p.add_argument("--device", default=_default("device"))
    p.add_argument("--csv-image-key", default=_default("image_key"))
    p.add_argument("--csv-label-key", default=_default("label_key"))
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output from its last complete epoch (the same "
                   "settings; the checkpoints are deleted once the model is written)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..training.distributed import leave_distributed
    from ..training.finetune.loop import finetune

    if args.resume and args.output is None:
        raise SystemExit("error: --resume continues the run in --output DIR: give that DIR")
    config = FinetuneConfig(
        data=args.data, output=args.output or Path("runs") / time.strftime(
            "finetune-%Y%m%d-%H%M%S"),
        model=args.model, weights=default_weights(args.model, args.weights),
        activation=args.activation, method=args.method, classnames=args.classnames,
        templates=args.templates, val=args.val, val_fraction=args.val_fraction,
        wise_ft=args.wise_ft, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, layer_decay=args.layer_decay, freeze=args.freeze,
        image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup=args.warmup, grad_clip=args.grad_clip,
        precision=args.precision, seed=args.seed, workers=args.workers, device=args.device,
        image_key=args.csv_image_key, label_key=args.csv_label_key,
        progress=not args.no_progress, resume=args.resume)
    record = finetune(config)
    leave_distributed()  # after success only: a failed rank exits and torchrun stops the rest
    if record:  # under torchrun, rank 0 reports
        _report(record, config.output)
    return 0


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def _report(record: dict, output: Path) -> None:
    """The accuracies a user compares, on stderr; the full record is in the run directory."""
    print(f"validation accuracy: zero-shot {_percent(record['zero_shot']['val_acc1'])}, "
          f"fine-tuned {_percent(record['fine_tuned']['val_acc1'])}", file=sys.stderr)
    for row in record["wise_ft"]:
        print(f"  WiSE-FT alpha {row['alpha']:g}: {_percent(row['val_acc1'])}  ({row['path']})",
              file=sys.stderr)
    chosen = record["chosen"]
    if record["skipped"]["count"]:
        print(f"skipped {record['skipped']['count']} unreadable item(s): "
              f"{record['skipped']['reasons']}", file=sys.stderr)
    print(f"wrote {output} (alpha {chosen['alpha']:g}, validation accuracy "
          f"{_percent(chosen['val_acc1'])}); use it with --model {output}", file=sys.stderr)

"""What several commands share: the model options and how they map to
:func:`clipforge.create_model`, and small readers of command-line values.

The mapping adds one rule of its own, for people at a prompt: a bare architecture name with no
``--weights`` gets its first published weights (``clipforge models`` lists them), since a
randomly initialised model is rarely what a command-line user means.  The library keeps random
initialisation for ``weights=None``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..configs import ACTIVATIONS, ARCHITECTURES
from ..encoder import Encoder
from ..factory import BACKENDS, create_model
from ..precision import PRECISIONS
from ..weights.pretrained import pretrained_tags

log = logging.getLogger("clipforge")

DEFAULT_MODEL = "ViT-B-32"
FAST_DECODE_HELP = ("decode large JPEGs at a reduced scale (PIL draft mode): several times "
                    "faster for camera photos, embeddings within 1e-5 cosine of the exact path")


def add_model_options(parser: argparse.ArgumentParser, default: str | None = DEFAULT_MODEL,
                      default_help: str = DEFAULT_MODEL) -> None:
    """--model, --weights, --activation, --device, --precision and --backend."""
    parser.add_argument("--model", default=default,
                        help="architecture name, checkpoint file, model directory or "
                             f"hf-hub:org/repo (default {default_help})")
    parser.add_argument("--weights", help="with an architecture name: pretrained tag, "
                        "hf-hub:org/repo or a checkpoint file (default: the first published "
                        "tag listed by `clipforge models`, e.g. openai)")
    parser.add_argument("--activation", choices=ACTIVATIONS,
                        help="override the activation (bare state dicts default to quick_gelu)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32 (exact), bf16 or int8 (faster on CPUs with AVX-512 bf16 / "
                        "VNNI; accuracy in docs/benchmarks.md)")
    parser.add_argument("--backend", choices=BACKENDS,
                        help="onnx: run an export directory (`clipforge export onnx`) with "
                        "onnxruntime (default: onnx for an export directory, else torch)")


def default_weights(name: str, weights: str | None) -> str | None:
    """The weights the command line uses: those given, else a bare architecture name's first
    published tag (None for the tiny test configs, which are randomly initialised)."""
    if weights is None and name in ARCHITECTURES:
        tags = pretrained_tags(name)
        if tags:
            log.info("using %s weights %r (choose others with --weights)", name, tags[0])
            return tags[0]
        log.warning("%s has no published weights: using a random initialisation, whose "
                    "outputs are meaningless until it is trained", name)
    return weights


def model_arguments(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The :func:`clipforge.create_model` keyword arguments for model ``name`` from a command's
    model options (those its parser has: ``convert`` and ``export`` have no --device,
    --precision or --backend)."""
    return {"weights": default_weights(name, args.weights), "activation": args.activation,
            "device": getattr(args, "device", "cpu"),
            "precision": getattr(args, "precision", "fp32"),
            "backend": getattr(args, "backend", None)}


def load_model(args: argparse.Namespace, name: str | None = None) -> Encoder:
    """The model a command runs: :func:`clipforge.create_model` of ``--model`` (or ``name``)
    with the command's model options."""
    name = args.model if name is None else name
    return create_model(name, **model_arguments(args, name))


def read_lines(path: str, what: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file, or a clear error naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SystemExit(f"error: {what} {path} is not UTF-8 text (byte {exc.start}: "
                         f"{exc.reason}); save it as UTF-8") from None
    except OSError as exc:
        raise SystemExit(f"error: cannot read {what} {path}: {exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]

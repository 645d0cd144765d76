"""``clipforge convert`` (weights between formats) and ``clipforge export onnx`` (the encoders
as ONNX graphs for deployment)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..configs import ACTIVATIONS
from ..weights import FORMATS, check_save_destination, save_model
from .options import load_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert weights between formats")
    p.add_argument("src", help="checkpoint file, model directory, hf-hub:org/repo or a name")
    p.add_argument("dst", type=Path, help="new or empty directory, one clipforge wrote before "
                   "(replaced), or a .safetensors file")
    p.add_argument("--to", choices=FORMATS, default="clipforge")
    p.add_argument("--weights", help="with an architecture name: tag, hf-hub:org/repo or file")
    p.add_argument("--activation", choices=ACTIVATIONS)
    p.set_defaults(handler=convert)

    p = sub.add_parser("export", help="export the image and text encoders for deployment",
                       description="Write the two encoders as ONNX graphs (dynamic batch and "
                       "text length) with the tokenizer vocabulary and a manifest describing "
                       "preprocessing; run them with `--backend onnx` or clipforge.onnx.OnnxCLIP, "
                       "without PyTorch.")
    p.add_argument("format", choices=("onnx",))
    p.add_argument("model", help="architecture name, checkpoint file, model directory or "
                   "hf-hub:org/repo")
    p.add_argument("--out", required=True, type=Path, help="export directory")
    p.add_argument("--weights", help="with an architecture name: tag, hf-hub:org/repo or file")
    p.add_argument("--activation", choices=ACTIVATIONS)
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--int8", action="store_true", help="also write int8 graphs (dynamic "
                   "quantisation of the matrix products; `--precision int8` runs them)")
    p.add_argument("--no-verify", action="store_true", help="skip running the graphs against "
                   "PyTorch after export")
    p.set_defaults(handler=export)


def convert(args: argparse.Namespace) -> int:
    check_save_destination(args.dst, args.to)  # refuse a foreign folder before loading
    model = load_model(args, args.src)
    save_model(model, args.dst, format=args.to)
    print(f"wrote {args.dst} ({args.to} format, activation {model.config.activation})")
    return 0


def export(args: argparse.Namespace) -> int:
    from ..onnx import export_onnx
    from ..onnx.manifest import MANIFEST

    model = load_model(args)
    out = export_onnx(model, args.out, opset=args.opset, quantize="int8" if args.int8 else None,
                      verify=not args.no_verify)
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    print(f"wrote {out} (opset {manifest.get('opset')}; checked against PyTorch: "
          f"{json.dumps(manifest.get('verification'))})")
    return 0

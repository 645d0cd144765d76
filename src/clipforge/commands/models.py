"""``clipforge models``: the families, their architectures and their published weights.

One row per architecture, grouped by family: its image tower, input size, embedding width,
size, and each published tag with its ImageNet-1k zero-shot top-1 where OpenCLIP's tables give
one.  ``--family`` and ``--pretrained`` narrow the list; ``--json`` prints it as data.
"""

from __future__ import annotations

import argparse
import json

import torch

from ..configs import ARCHITECTURES, CLIPConfig
from ..model import CLIP
from ..weights.pretrained import PRETRAINED


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list model families, architectures and published "
                       "weights (with ImageNet zero-shot accuracy)")
    p.add_argument("--family", help="only this family (clip, siglip, siglip2, metaclip2, "
                   "chinese-clip, xlm-roberta, pe-core, eva02, eva)")
    p.add_argument("--pretrained", action="store_true",
                   help="only architectures with published weights")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=run)


def _tower(config: CLIPConfig) -> str:
    v = config.vision
    if not v.is_vit:
        return "ResNet"
    return f"ViT/{v.patch_size}" + ("+rope" if v.rope else "") + (
        " MAP" if v.pool == "map" else "")


def _parameters(config: CLIPConfig) -> int:
    with torch.device("meta"):  # sizes only: no memory, no initialisation cost to speak of
        return sum(p.numel() for p in CLIP(config).parameters())


def _tags(name: str) -> list[dict]:
    return [{"tag": tag, "repository": p.repo, "imagenet_top1": p.imagenet}
            for tag, p in PRETRAINED.get(name, {}).items()]


def listing(family: str | None = None, pretrained_only: bool = False) -> list[dict]:
    """The rows ``clipforge models`` prints, families in order of first appearance."""
    rows = []
    for name, config in ARCHITECTURES.items():
        if (family and config.family != family) or (pretrained_only and name not in PRETRAINED):
            continue
        rows.append({"family": config.family, "architecture": name, "tower": _tower(config),
                     "image_size": config.image_size, "embed_dim": config.embed_dim,
                     "parameters": _parameters(config), "tokenizer": config.tokenizer.kind,
                     "weights": _tags(name)})
    order = list(dict.fromkeys(r["family"] for r in rows))
    return sorted(rows, key=lambda r: order.index(r["family"]))


def _weights_cell(tags: list[dict]) -> str:
    if not tags:
        return "- (random initialisation)"
    return ", ".join(t["tag"] + (f" {t['imagenet_top1']:.1f}%" if t["imagenet_top1"] else "")
                     for t in tags)


def run(args: argparse.Namespace) -> int:
    rows = listing(args.family, args.pretrained)
    if not rows:
        raise SystemExit(f"error: no architecture of family {args.family!r}; families: "
                         f"{', '.join(sorted({c.family for c in ARCHITECTURES.values()}))}")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("family", "architecture", "image tower", "size", "embed", "params",
              "published weights (ImageNet zero-shot top-1)")
    table = [(r["family"], r["architecture"], r["tower"], str(r["image_size"]),
              str(r["embed_dim"]), f"{r['parameters'] / 1e6:.1f}M", _weights_cell(r["weights"]))
             for r in rows]
    widths = [max(len(row[i]) for row in table + [header]) for i in range(len(header) - 1)]
    for row in [header] + table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return 0

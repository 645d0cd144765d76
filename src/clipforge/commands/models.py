"""``clipforge models``: the architectures and their published weights."""

from __future__ import annotations

import argparse

import torch

from ..configs import ARCHITECTURES
from ..model import CLIP
from ..weights.pretrained import PRETRAINED


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list architectures and known pretrained weights")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    rows = []
    for name, config in ARCHITECTURES.items():
        with torch.device("meta"):
            params = sum(p.numel() for p in CLIP(config).parameters())
        tags = ", ".join(PRETRAINED.get(name, {})) or "-"
        rows.append((name, "ViT" if config.vision.is_vit else "ResNet", str(config.image_size),
                     str(config.embed_dim), f"{params / 1e6:.1f}M", config.activation, tags))
    header = ("model", "tower", "image", "embed", "params", "activation", "pretrained weights")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0

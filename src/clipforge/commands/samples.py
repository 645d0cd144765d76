"""``clipforge samples``: scikit-image's sample photos as PNG files, to try the commands on."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..samples import write_sample_photos


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("samples", help="write scikit-image's sample photos as PNG files")
    p.add_argument("directory", type=Path)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    for path in write_sample_photos(args.directory):
        print(path)
    return 0

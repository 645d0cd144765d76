"""The ``clipforge`` command line: models, classify, locate, embed, convert, train, finetune, eval,
plots, rank, score, samples; index, search and serve (each in :mod:`clipforge.commands`)."""

from __future__ import annotations

import argparse
import logging
import sys

from .commands import (
    classify,
    convert,
    embed,
    evaluate,
    finetune,
    locate,
    models,
    plots,
    samples,
    scoring,
    search,
    train,
)

# The order ``clipforge --help`` lists the commands in.
COMMANDS = (models, classify, locate, plots, scoring, embed, convert, train, finetune, evaluate,
            samples, search)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every command's parser (each holds its handler)."""
    parser = argparse.ArgumentParser(prog="clipforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        return args.handler(args)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

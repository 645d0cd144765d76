"""Renaming tensors between another library's layout and clipforge's, as data.

Every format clipforge reads or writes (transformers' families, OpenCLIP's towers, timm's) is a
table of :class:`Rule` rows, and these two functions apply a table in either direction.  A
tensor no rule names is an error (a checkpoint with a stray tensor does not belong to the model
its config describes), so nothing is dropped without a word.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from .checkpoint import CheckpointError

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Rule:
    """``ours`` <-> ``theirs``.  Patterns may hold ``{n}`` (a block number) and ``{kind}``
    (weight or bias); a pattern without ``{kind}`` also covers the tensors below it
    (``visual.ln_post`` covers ``visual.ln_post.weight``).  Several ``theirs`` are one tensor of
    ours concatenated along dimension 0 in their order (separate q, k, v projections of the
    fused ``in_proj``; timm's ``q`` and ``kv``).  ``transpose``: an [in, out] matrix of ours
    stored as an ``nn.Linear`` weight.  ``squeeze``: theirs holds extra leading dimensions of
    size 1 (timm's [1, N, W] position table, a [1] logit scale)."""

    ours: str
    theirs: tuple[str, ...]
    transpose: bool = False
    squeeze: bool = False


def rule(ours: str, *theirs: str, transpose: bool = False, squeeze: bool = False) -> Rule:
    """A :class:`Rule`; with no ``theirs``, the name is the same on both sides."""
    return Rule(ours, theirs or (ours,), transpose, squeeze)


def block(ours: str, theirs: str, table: dict[str, str | tuple[str, ...]]) -> list[Rule]:
    """Rules for the blocks ``ours{n}.`` <-> ``theirs{n}.`` from a within-block table."""
    return [rule(ours + a, *((theirs + x for x in b) if isinstance(b, tuple) else (theirs + b,)))
            for a, b in table.items()]


def _compile(name: str) -> re.Pattern:
    regex = re.escape(name).replace(r"\{n\}", r"(?P<n>\d+)").replace(
        r"\{kind\}", r"(?P<kind>weight|bias)")
    return re.compile(regex + ("" if "{kind}" in name else r"(?P<rest>\..+)?") + "$")


def _fill(name: str, match: re.Match) -> str:
    groups = match.groupdict()
    out = name.replace("{n}", groups.get("n") or "").replace("{kind}", groups.get("kind") or "")
    return out + (groups.get("rest") or "")


def to_ours(sd: StateDict, rules: Iterable[Rule], source: str, *,
            ignored: re.Pattern | None = None,
            unknown: Callable[[str], str] | None = None) -> StateDict:
    """``sd`` (their names) under clipforge's names.  ``ignored``: keys that hold no weights
    (index buffers some versions save).  ``unknown(key)``: the message for a tensor no rule
    names (default: it belongs to no part of the model)."""
    compiled = [(r, i, _compile(name)) for r in rules for i, name in enumerate(r.theirs)]
    out: StateDict = {}
    parts: dict[str, tuple[Rule, re.Match, dict[int, torch.Tensor]]] = {}
    for key, value in sd.items():
        if ignored is not None and ignored.match(key):
            continue
        found = next(((r, i, m) for r, i, pattern in compiled if (m := pattern.match(key))),
                     None)
        if found is None:
            raise CheckpointError(unknown(key) if unknown else
                                  f"{source}: tensor {key!r} belongs to no part of the model")
        r, index, match = found
        while r.squeeze and value.ndim and value.shape[0] == 1:
            value = value.reshape(value.shape[1:])
        if r.transpose:
            value = value.t().contiguous()
        ours = _fill(r.ours, match)
        if len(r.theirs) == 1:
            out[ours] = value
        else:
            parts.setdefault(ours, (r, match, {}))[2][index] = value
    for ours, (r, match, pieces) in parts.items():
        if len(pieces) != len(r.theirs):
            missing = [_fill(name, match) for i, name in enumerate(r.theirs) if i not in pieces]
            raise CheckpointError(f"{source}: {ours} lacks its part(s) {', '.join(missing)}")
        out[ours] = torch.cat([pieces[i] for i in range(len(r.theirs))], dim=0)
    return out


def to_theirs(sd: StateDict, rules: Iterable[Rule]) -> StateDict:
    """clipforge's ``sd`` under their names (the inverse of :func:`to_ours` for tables whose
    concatenated parts are equal, as q, k and v are): tensors shared where not reshaped."""
    compiled = [(r, _compile(r.ours)) for r in rules]
    out: StateDict = {}
    for key, value in sd.items():
        found = next(((r, m) for r, pattern in compiled if (m := pattern.match(key))), None)
        if found is None:
            raise ValueError(f"no name in the other format for {key!r}")
        r, match = found
        if r.transpose:
            value = value.t().contiguous()
        if r.squeeze and value.ndim == 0:
            value = value.reshape(1)
        pieces = value.chunk(len(r.theirs), dim=0) if len(r.theirs) > 1 else (value,)
        for name, piece in zip(r.theirs, pieces):
            out[_fill(name, match)] = piece.contiguous() if len(r.theirs) > 1 else piece
    return out

"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint holds the objective (model and loss parameters), optimiser, schedule, gradient
scaler, step, random state and data state.  For the built-in data, CSV and folders the data
position follows from the step (every sample is a function of the seed and its global index);
for streamed shards the data state holds how far each rank's streams had read, and the skip
counts of all ranks.  Files are written beside and
renamed, so a run killed mid-write leaves the previous checkpoint intact; the oldest are deleted
only after a newer one is complete.  Reading uses ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..fileio import DiskFullError, atomic_file

_NAME = re.compile(r"step_(\d+)\.pt$")


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


# What a full disk while checkpointing leaves, and what to do.
CHECKPOINT_KEPT = ("the earlier checkpoints are intact: free some space and continue the run "
                   "with --resume latest")


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    path = checkpoint_path(directory, step)
    try:
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            # Through a Python file, a full disk surfaces as OSError(ENOSPC) behind torch's
            # "unexpected pos" error, so it is recognised and named.
            torch.save(state, f)
    except DiskFullError as exc:
        raise DiskFullError(path, exc, CHECKPOINT_KEPT) from exc
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def resolve_resume(spec: str, directory: Path) -> Path | None:
    """``latest`` -> the newest checkpoint in the run (None if there is none yet); else a path."""
    if spec == "latest":
        found = list_checkpoints(directory)
        return found[-1] if found else None
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {spec}: no such checkpoint file")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path} ({exc}); pass an older one with "
                         "--resume PATH") from exc


def random_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

"""``clipforge finetune --resume``: a run continues from the end of its last complete epoch,
exactly as if it had not stopped.

After each epoch the run writes ``OUTPUT/checkpoints/step_N.pt`` (atomically, the previous one
deleted once the new one is complete; :mod:`clipforge.training.checkpoint`): what is trained
(``state_dict`` of the trained module, which holds FLYP's prompt sampler too), the optimiser,
the schedule, the random state, the epoch and the step.  The data order of an epoch is a
function of (seed, epoch), and the starting model, zero-shot head and data are read again as the
first time, so nothing else needs saving.  A resumed run must be asked the same thing: its
settings are compared with ``OUTPUT/finetune_config.json``, and only how it runs
(:data:`~.config.RESUMABLE_CHANGES`) may differ.  The checkpoints are deleted when the run has
written its model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .config import FinetuneConfig

CHECKPOINT_DIR = "checkpoints"


@dataclass
class Checkpoints:
    """Where a run's epoch checkpoints go, and the one it resumes from (None: a fresh run)."""

    directory: Path
    state: dict[str, Any] | None = None

    @property
    def resume_step(self) -> int:
        return -1 if self.state is None else int(self.state["step"])

    def save(self, step: int, state: dict[str, Any]) -> None:
        save_checkpoint(self.directory, step, state, keep=1)

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def open_run(config: FinetuneConfig, output: Path, config_file: str, result_file: str
             ) -> Checkpoints:
    """The run's checkpoints; with ``config.resume``, checked against the recorded run and
    loaded from its latest checkpoint (none yet: the run starts over)."""
    checkpoints = Checkpoints(output / CHECKPOINT_DIR)
    if not config.resume:
        return checkpoints
    recorded_file = output / config_file
    if not recorded_file.is_file():
        raise FileNotFoundError(f"--resume: {output} holds no fine-tuning run ({config_file} is "
                                "missing); start it without --resume")
    if (output / result_file).is_file():
        raise ValueError(f"--resume: the run in {output} is complete ({result_file} is "
                         "written); its model is there already")
    recorded = json.loads(recorded_file.read_text(encoding="utf-8"))
    changed = config.changed_settings(recorded)
    if changed:
        shown = ", ".join(f"{k} (was {recorded.get(k)!r}, now {config.to_json()[k]!r})"
                          for k in changed)
        raise ValueError(f"--resume continues the same run, but these settings differ from "
                         f"{recorded_file}: {shown}. Give the same settings, or start a new "
                         "run in another --output")
    found = list_checkpoints(checkpoints.directory)
    if found:
        checkpoints.state = load_checkpoint(found[-1])
    return checkpoints

"""WiSE-FT (Wortsman et al. 2022): the weight-space mix of the zero-shot and the fine-tuned
model, and the run's model files.

Fine-tuning end to end gains accuracy on the training distribution and loses robustness to
distribution shift; mixing the weights, ``(1 - alpha) * zero-shot + alpha * fine-tuned``,
keeps most of both.  The zero-shot model here is the pretrained image tower with the zero-shot
head (class embeddings times the temperature), so every mix is a model of the same shape: the
image tower and the head are mixed, the text tower is the same in both.  After a linear probe
the towers are the same too, and the mixes are of the heads alone.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...classifier import CLASSIFIER_FILE, PREFIX, WEIGHT_KEYS, LinearClassifier
from ...fileio import atomic_directory
from ...model import CLIP
from ...weights.checkpoint import StateDict
from ...weights.formats import MODEL_FILES, MODEL_MARKER, save_into_directory

VISUAL = "visual."


def tuned_state(model: CLIP, classifier: LinearClassifier, whole: bool = False) -> StateDict:
    """What fine-tuning changes, as detached copies: the image tower's tensors (``visual.*``),
    or with ``whole`` every tensor of the model (FLYP trains both towers), and the head's
    (``classifier.*``)."""
    tensors = model.state_dict() if whole else \
        {VISUAL + k: v for k, v in model.visual.state_dict().items()}
    state = {k: v.detach().clone() for k, v in tensors.items()}
    return state | {k: v.clone() for k, v in classifier.state_dict().items()}


def interpolate(zero_shot: StateDict, tuned: StateDict, alpha: float) -> StateDict:
    """``(1 - alpha) * zero_shot + alpha * tuned`` for every floating-point tensor, computed by
    ``torch.lerp``, which is exact at both ends (alpha 0 gives the zero-shot tensors bit for
    bit, alpha 1 the fine-tuned ones).  Counters (BatchNorm's ``num_batches_tracked``) cannot
    be mixed: they come from the nearer end."""
    if zero_shot.keys() != tuned.keys():
        raise ValueError("the zero-shot and fine-tuned states hold different tensors")
    mixed: StateDict = {}
    for key, start in zero_shot.items():
        end = tuned[key]
        if start.is_floating_point():
            mixed[key] = torch.lerp(start, end.to(start.dtype), alpha)
        else:
            mixed[key] = (end if alpha >= 0.5 else start).clone()
    return mixed


def apply_state(model: CLIP, state: StateDict, classifier: LinearClassifier
                ) -> LinearClassifier:
    """Load a (mixed) state into ``model`` (its image tower, or all of it if the state holds
    more, see :func:`tuned_state`); its head, as a classifier with ``classifier``'s class names
    and info."""
    tensors = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    with torch.no_grad():
        if all(k.startswith(VISUAL) for k in tensors):
            model.visual.load_state_dict({k[len(VISUAL):]: v for k, v in tensors.items()},
                                         strict=True)
        else:
            model.load_state_dict(tensors, strict=True)
    return LinearClassifier(state[WEIGHT_KEYS[0]], state[WEIGHT_KEYS[1]], classifier.classnames,
                            classifier.info)


def _model_state(model: CLIP, classifier: LinearClassifier) -> StateDict:
    return dict(model.state_dict()) | classifier.state_dict()


def save_run_model(model: CLIP, classifier: LinearClassifier, output: Path) -> None:
    """Write the run's model into its directory (which holds the run's other files too):
    the class names first, then the weights with the head, each atomically; the weights file
    is what loaders trust, and it holds the head the class names describe."""
    classifier.write_names(output)
    save_into_directory(model.config, _model_state(model, classifier), output, model.tokenizer)


def save_model_directory(model: CLIP, classifier: LinearClassifier, path: Path) -> Path:
    """Write a model directory of its own (one WiSE-FT mix), all of it or nothing."""
    with atomic_directory(path, MODEL_MARKER, (*MODEL_FILES, CLASSIFIER_FILE)) as tmp:
        save_into_directory(model.config, _model_state(model, classifier), tmp, model.tokenizer)
        classifier.write_names(tmp)
    return path


def alpha_name(alpha: float) -> str:
    """The folder name of one mix: ``alpha-0.25``."""
    return f"alpha-{alpha:g}"

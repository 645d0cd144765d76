"""Weights: reading every common checkpoint format safely, and writing clipforge's and HF's."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .checkpoint import CheckpointError
from .formats import read_weights, save_clipforge, save_huggingface
from .pretrained import PRETRAINED, WeightsUnavailableError, pretrained_tags
from .torchscript import UnsafeCheckpointError

FORMATS = ("clipforge", "hf")


def save_model(model: nn.Module, destination: str | Path, format: str = "clipforge") -> Path:
    """Save ``model`` (a :class:`~clipforge.CLIP`) as clipforge's format (a directory, or a single
    ``.safetensors`` file) or as a Hugging Face ``CLIPModel`` directory (``format="hf"``).
    Written to a temporary place first and renamed, so a crash leaves no half-written model.
    Only float32 models are saved: a bf16/int8 conversion is rounded (int8 weights cannot be
    read back at all), so save the model it came from and convert when loading."""
    precision = getattr(model, "precision", None) or "fp32"
    if precision != "fp32":
        raise ValueError(f"this model was converted to {precision} for inference; save the "
                         "float32 model and convert when loading (create_model(..., "
                         f"precision={precision!r}))")
    sd = dict(model.state_dict())
    if format == "clipforge":
        return save_clipforge(model.config, sd, destination)
    if format == "hf":
        return save_huggingface(model.config, sd, destination)
    raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")


__all__ = ["FORMATS", "PRETRAINED", "CheckpointError", "UnsafeCheckpointError",
           "WeightsUnavailableError", "pretrained_tags", "read_weights", "save_model"]

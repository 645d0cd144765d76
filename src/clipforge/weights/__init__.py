"""Weights: reading every common checkpoint format safely, and writing clipforge's and HF's."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..fileio import check_replaceable
from .checkpoint import CheckpointError
from .formats import MODEL_FILES, MODEL_MARKER, read_weights, save_clipforge, save_huggingface
from .pretrained import PRETRAINED, WeightsUnavailableError, pretrained_tags
from .torchscript import UnsafeCheckpointError

FORMATS = ("clipforge", "hf")


def save_model(model: nn.Module, destination: str | Path, format: str = "clipforge") -> Path:
    """Save ``model`` (a :class:`~clipforge.CLIP`) as clipforge's format (a directory, or a single
    ``.safetensors`` file) or as a Hugging Face ``CLIPModel`` directory (``format="hf"``).
    Written to a temporary place first and renamed, so a crash leaves no half-written model.
    An existing folder is replaced only if clipforge wrote all it holds
    (:func:`check_save_destination`); a full disk raises
    :class:`~clipforge.fileio.DiskFullError` and leaves the destination as it was.
    Only float32 models are saved: a bf16/int8 conversion is rounded (int8 weights cannot be
    read back at all), so save the model it came from and convert when loading."""
    precision = getattr(model, "precision", None) or "fp32"
    if precision != "fp32":
        raise ValueError(f"this model was converted to {precision} for inference; save the "
                         "float32 model and convert when loading (create_model(..., "
                         f"precision={precision!r}))")
    sd = dict(model.state_dict())
    tokenizer = getattr(model, "tokenizer", None)
    if format == "clipforge":
        return save_clipforge(model.config, sd, destination, tokenizer)
    if format == "hf":
        return save_huggingface(model.config, sd, destination, tokenizer)
    raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")


def check_save_destination(destination: str | Path, format: str = "clipforge") -> None:
    """Raise ``FileExistsError`` if :func:`save_model` would refuse ``destination`` (a folder
    holding files clipforge did not write), so that a command can say so before it spends
    minutes loading a model."""
    destination = Path(destination)
    if format == "clipforge" and destination.suffix == ".safetensors":
        return  # a single file, replaced atomically
    check_replaceable(destination.resolve(), MODEL_MARKER, MODEL_FILES)


__all__ = ["FORMATS", "PRETRAINED", "CheckpointError", "UnsafeCheckpointError",
           "WeightsUnavailableError", "check_save_destination", "pretrained_tags",
           "read_weights", "save_model"]

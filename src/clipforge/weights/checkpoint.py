"""Reading checkpoint files into state dicts, safely.

Formats: safetensors (preferred: no code at all), PyTorch pickles read with
``torch.load(weights_only=True)`` (plain state dicts, OpenCLIP's ``{"state_dict": ...}`` training
checkpoints, ``module.``-prefixed DDP keys), and OpenAI's TorchScript archives, whose tensors are
read by a restricted unpickler without running the archive's code.  Nothing here can execute code
from a file.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from .torchscript import UnsafeCheckpointError, is_torchscript_archive, read_torchscript_state_dict

StateDict = dict[str, torch.Tensor]

# Keys that OpenAI's TorchScript archives carry beside the weights; they describe, not parametrise.
ARCHIVE_ATTRIBUTES = ("input_resolution", "context_length", "vocab_size")


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit the model."""


def read_checkpoint(path: str | Path) -> tuple[StateDict, dict[str, str]]:
    """Return (state dict, metadata) of a weights file; metadata is safetensors' header dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if is_torchscript_archive(path):
        try:
            return read_torchscript_state_dict(path), {}
        except UnsafeCheckpointError:
            raise
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc
    return _read_pickle(path), {}


def _read_safetensors(path: Path) -> tuple[StateDict, dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"cannot read {path}: the safetensors file is truncated or corrupt ({exc}); "
            "download or export it again"
        ) from exc


def _read_pickle(path: Path) -> StateDict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"refused to load {path}: it needs code beyond plain tensors to unpickle ({exc}). "
            "clipforge never runs code from a checkpoint; convert the file to safetensors in an "
            "environment you trust, or use a state-dict file from a trusted source"
        ) from exc
    except Exception as exc:  # torch raises many types for damaged or foreign files
        raise CheckpointError(
            f"cannot read {path}: not a PyTorch checkpoint, or truncated or corrupt "
            f"({type(exc).__name__}: {exc}); download or export it again"
        ) from exc
    return unwrap_state_dict(obj, path)


def unwrap_state_dict(obj: object, path: str | Path = "<memory>") -> StateDict:
    """Find the tensors in a training checkpoint: ``state_dict``/``model`` wrappers, ``module.``."""
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} holds no state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors

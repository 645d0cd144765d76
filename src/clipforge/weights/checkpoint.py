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
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from .torchscript import (
    ArchiveError,
    UnsafeCheckpointError,
    check_zip_expansion,
    is_torchscript_archive,
    read_torchscript_state_dict,
)

StateDict = dict[str, torch.Tensor]

# Keys that OpenAI's TorchScript archives carry beside the weights; they describe, not parametrise.
ARCHIVE_ATTRIBUTES = ("input_resolution", "context_length", "vocab_size")

# The largest JSON config file read (config.json, preprocessor_config.json,
# open_clip_config.json): real ones are a few kilobytes.
MAX_CONFIG_BYTES = 1 << 20

_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit the model."""


def parse_json_object(text: str | bytes, source: str) -> dict[str, Any]:
    """The JSON object in ``text``; a :class:`CheckpointError` naming ``source`` if it is not
    JSON, or JSON but not an object (a list, a string...)."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, deep nesting
        raise CheckpointError(f"{source} is not valid JSON ({exc}); fix the file or download "
                              "it again") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{source} must hold a JSON object, found a JSON "
                              f"{_JSON_TYPES.get(type(data), type(data).__name__)}; fix the "
                              "file or download it again")
    return data


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in config file ``path`` (at most ``MAX_CONFIG_BYTES``)."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{path} has {size} bytes, more than any model config "
                                  f"({MAX_CONFIG_BYTES}); it is not a config file")
        return parse_json_object(path.read_bytes(), str(path))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None


def read_checkpoint(path: str | Path) -> tuple[StateDict, dict[str, str]]:
    """Return (state dict, metadata) of a weights file; metadata is safetensors' header dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if zipfile.is_zipfile(path):
        _check_zip(path)
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


def _check_zip(path: Path) -> None:
    """Refuse a zip (``torch.save``'s format, and TorchScript's) that would expand far beyond
    its size, before anything reads it: a 1.5 MB file can declare gigabytes."""
    try:
        with zipfile.ZipFile(path) as archive:
            check_zip_expansion(archive, str(path))
    except ArchiveError as exc:
        raise CheckpointError(str(exc)) from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"cannot read {path}: the zip archive is truncated or corrupt "
                              f"({exc}); download or export it again") from None


def _is_pickle(path: Path) -> bool:
    """Whether ``path`` can be a ``torch.save`` file at all: a zip, or (torch < 1.6) a pickle,
    which starts with the PROTO opcode."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


# What torch's restricted unpickler says when a pickle asks for more than tensors (the
# wording varies between torch versions; the global's name follows "GLOBAL").
_FORBIDDEN_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_FORBIDDEN_OTHER = ("allowlisted", "unrecognized function")


def _torch_reason(exc: BaseException) -> str:
    """The gist of a torch loading error, one line, without torch's advice: it suggests
    ``weights_only=False``, which would run the file's code."""
    text = str(exc).split("WeightsUnpickler error:")[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()
             and not re.search(r"weights_only|safe_globals|documentation|file an issue", line)]
    reason = lines[0] if lines else type(exc).__name__
    return reason[:200]


def _unpickling_error(path: Path, exc: pickle.UnpicklingError) -> ValueError:
    """Torch refused the pickle: unsafe if it names a global (or class) beyond tensors,
    otherwise the bytes are simply not a valid pickle (random bytes, truncation)."""
    message = str(exc)
    found = _FORBIDDEN_GLOBAL.search(message)
    if _is_pickle(path) and (found or any(word in message for word in _FORBIDDEN_OTHER)):
        what = f"the global '{found.group(1).rstrip('.')}'" if found else "an object"
        return UnsafeCheckpointError(
            f"refused to load {path}: its pickle asks for {what} beyond plain tensors, which "
            "could run code. clipforge never runs code from a checkpoint; use a safetensors or "
            "plain state-dict file from a trusted source"
        )
    return CheckpointError(
        f"cannot read {path}: not a PyTorch checkpoint, or truncated or corrupt (invalid "
        f"pickle data: {_torch_reason(exc)}); download or export it again"
    )


def _read_pickle(path: Path) -> StateDict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _unpickling_error(path, exc) from None
    except MemoryError:
        raise
    except Exception as exc:  # torch raises many types for damaged or foreign files
        raise CheckpointError(
            f"cannot read {path}: not a PyTorch checkpoint, or truncated or corrupt "
            f"({type(exc).__name__}: {_torch_reason(exc)}); download or export it again"
        ) from None
    return unwrap_state_dict(obj, path)


def unwrap_state_dict(obj: object, path: str | Path = "<memory>") -> StateDict:
    """Find the tensors in a training checkpoint: ``state_dict``/``model`` wrappers, ``module.``."""
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} holds no state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items()
               if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors

"""Read the tensors of a TorchScript archive without running any of its code.

OpenAI publishes its CLIP checkpoints (``RN50.pt``, ``ViT-B-32.pt``, ...) as TorchScript
archives written by ``torch.jit.save``. Loading them with ``torch.jit.load`` or an unrestricted
``pickle`` executes whatever the file says, so a tampered download could run arbitrary code.
This module instead unpickles ``data.pkl`` with an allowlist of globals, turns every TorchScript
module object into an inert placeholder that only keeps its attributes, and reads the tensor
bytes straight from the archive's ``data/<key>`` entries.

Archive layout (as written by torch 1.x-2.x)::

    <top>/data.pkl        pickled module tree: ``__torch__.*`` objects whose state is a dict
    <top>/data/<key>      raw little-endian bytes of each storage
    <top>/code/...        TorchScript source (never read here)
    <top>/constants.pkl   traced constants (never read here)
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from os import PathLike
from typing import Any

import torch

__all__ = ["UnsafeCheckpointError", "is_torchscript_archive", "read_torchscript_state_dict"]

# Top-level int attributes OpenAI's archives carry; openai/CLIP's ``build_model`` deletes
# exactly these keys from the JIT state dict, so callers expect to find them there.
_INT_ATTRIBUTES = ("input_resolution", "context_length", "vocab_size")

# The TorchScript pickler names a storage by its legacy typed class (``torch.HalfStorage``).
# We resolve those names to a dtype instead of the real class, so nothing can call them.
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64,
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint's pickle asks for a global outside the allowlist (possible code execution)."""


class _ScriptObject:
    """Inert stand-in for a ``__torch__.*`` class: it only remembers the state it is given."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _rebuild_tensor(
    storage: torch.Tensor,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    *_: Any,
) -> torch.Tensor:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: a view into the storage's flat tensor.

    ``requires_grad`` and backward hooks are ignored, as ``state_dict()`` returns plain tensors.
    """
    return storage.as_strided(size, stride, storage_offset)


def _untag(value: Any, *_: Any) -> Any:
    """Stand-in for ``torch.jit._pickle`` helpers that only attach static type info to lists."""
    return value


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): dtype for name, dtype in _STORAGE_DTYPES.items()},
    **{
        ("torch.jit._pickle", name): _untag
        for name in (
            "build_intlist",
            "build_tensorlist",
            "build_doublelist",
            "build_boollist",
            "restore_type_tag",
        )
    },
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for ``data.pkl`` that resolves only allowlisted globals and archive storages."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, path: str) -> None:
        super().__init__(archive.open(prefix + "data.pkl"))
        self._archive = archive
        self._prefix = prefix
        self._path = path
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._path}: refusing to load, its pickle references the forbidden global "
                f"'{module}.{name}', which could run code. Use a safetensors or state-dict file "
                "from a trusted source instead."
            ) from None

    def persistent_load(self, pid: Any) -> torch.Tensor:
        """Return storage ``pid`` as a flat CPU tensor, whatever device it was saved from."""
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], torch.dtype)
        ):
            raise ValueError(f"{self._path}: unexpected storage reference {pid!r} in data.pkl")
        _, dtype, key, _location, numel = pid
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}data/{key}")
            if len(raw) != numel * dtype.itemsize:
                raise ValueError(
                    f"{self._path}: storage {key!r} has {len(raw)} bytes, expected "
                    f"{numel * dtype.itemsize}; the file is truncated or corrupt, re-download it"
                )
            # frombuffer rejects empty buffers; a bytearray keeps the tensor writable.
            self._storages[key] = (
                torch.frombuffer(bytearray(raw), dtype=dtype)
                if raw
                else torch.empty(0, dtype=dtype)
            )
        return self._storages[key]


def _find_prefix(names: list[str]) -> str | None:
    """The archive's top folder (``'<top>/'``) holding ``data.pkl``; its name varies by file."""
    for name in names:
        top, _, rest = name.partition("/")
        if top and rest == "data.pkl":
            return top + "/"
    return None


def is_torchscript_archive(path: str | PathLike[str]) -> bool:
    """Whether ``path`` is a TorchScript archive rather than a plain ``torch.save`` zip.

    Both are zips with ``<top>/data.pkl``; only TorchScript adds ``code/`` and ``constants.pkl``,
    and only TorchScript pickles need the module-tree handling of this reader.
    """
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    prefix = _find_prefix(names)
    if prefix is None:
        return False
    return prefix + "constants.pkl" in names or any(n.startswith(prefix + "code/") for n in names)


def _flatten(obj: _ScriptObject, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Collect tensors of a placeholder module tree under ``state_dict()``-style dotted names.

    Non-tensor attributes (``training`` flags, ints, lists, ...) are not state and are skipped.
    Every tensor attribute is kept: in traced archives those are exactly the parameters and
    buffers (a scripted module's unregistered tensor attributes would be kept too).
    """
    if not isinstance(obj.state, dict):
        return
    for name, value in obj.state.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _flatten(value, f"{prefix}{name}.", out)
        elif not prefix and name in _INT_ATTRIBUTES and type(value) is int:
            out[name] = torch.tensor(value)


def read_torchscript_state_dict(path: str | PathLike[str]) -> dict[str, torch.Tensor]:
    """Load the parameters and buffers of TorchScript archive ``path`` as CPU tensors.

    The result matches ``torch.jit.load(path, map_location="cpu").state_dict()`` key for key
    (dtypes kept, e.g. float16), without executing anything from the file. Raises
    :class:`UnsafeCheckpointError` if the pickle references a non-allowlisted global, and
    ``ValueError`` if the file is not a readable archive.
    """
    path_str = str(path)
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _find_prefix(archive.namelist())
            if prefix is None:
                raise ValueError(f"{path_str}: not a TorchScript archive (no <top>/data.pkl)")
            root = _RestrictedUnpickler(archive, prefix, path_str).load()
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, KeyError) as exc:
        raise ValueError(
            f"{path_str}: the file is truncated or corrupt ({exc}); re-download it"
        ) from exc
    if isinstance(root, _ScriptObject):
        state: dict[str, torch.Tensor] = {}
        _flatten(root, "", state)
        return state
    raise ValueError(f"{path_str}: data.pkl does not hold a TorchScript module")

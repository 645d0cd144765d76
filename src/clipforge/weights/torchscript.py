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
import math
import os
import pickle
import zipfile
from os import PathLike
from typing import Any

import torch

__all__ = ["ArchiveError", "UnsafeCheckpointError", "check_zip_expansion",
           "is_torchscript_archive", "read_torchscript_state_dict"]

# How many bytes a checkpoint zip may expand to per byte of file, entry by entry and in all.
# torch.save and torch.jit.save store entries uncompressed (ratio 1), so a legitimate archive
# is far below this; a deflate bomb (a 1.5 MB file declaring 3.4 GB) is far above.
MAX_ZIP_EXPANSION = 10.0
ZIP_EXPANSION_ENV = "CLIPFORGE_MAX_ZIP_EXPANSION"
# Expansion allowed on top of the ratio, so that a tiny archive of small, very compressible
# entries (a re-zipped toy model) still reads.
ZIP_EXPANSION_ALLOWANCE = 1 << 20

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


class ArchiveError(ValueError):
    """A checkpoint zip is corrupt or hostile; the message names the file and what to do."""


def max_zip_expansion() -> float:
    """``MAX_ZIP_EXPANSION``, or the value of ``$CLIPFORGE_MAX_ZIP_EXPANSION``."""
    raw = os.environ.get(ZIP_EXPANSION_ENV, "").strip()
    if not raw:
        return MAX_ZIP_EXPANSION
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f"{ZIP_EXPANSION_ENV}={raw!r}: expected a number >= 1 (bytes a "
                         f"checkpoint zip may expand to per byte of file; default "
                         f"{MAX_ZIP_EXPANSION:g})")
    return value


def check_zip_expansion(archive: zipfile.ZipFile, path: str) -> None:
    """Raise :class:`ArchiveError` if any entry of ``archive``, or all of them together, would
    expand to more than ``max_zip_expansion()`` times its compressed size (plus
    ``ZIP_EXPANSION_ALLOWANCE``).  Uses the sizes the zip declares, before reading anything:
    readers (Python's and torch's) allocate by those sizes and never produce more."""
    ratio = max_zip_expansion()
    advice = (f"checkpoints are stored uncompressed, so the file is corrupt or hostile: "
              f"download it again (or raise {ZIP_EXPANSION_ENV}, now {ratio:g}, if you trust it)")
    total = 0
    for info in archive.infolist():
        if info.file_size > ratio * info.compress_size + ZIP_EXPANSION_ALLOWANCE:
            raise ArchiveError(f"{path}: zip entry {info.filename!r} expands from "
                               f"{info.compress_size} to {info.file_size} bytes; {advice}")
        total += info.file_size
    size = os.stat(path).st_size
    if total > ratio * size + ZIP_EXPANSION_ALLOWANCE:
        raise ArchiveError(f"{path}: its zip entries expand to {total} bytes from a "
                           f"{size}-byte file; {advice}")


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
            and isinstance(pid[2], str)
            and type(pid[4]) is int
            and pid[4] >= 0
        ):
            raise ArchiveError(f"{self._path}: unexpected storage reference {repr(pid)[:200]} in "
                               "data.pkl; the file is corrupt, re-download it")
        _, dtype, key, _location, numel = pid
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, dtype, numel)
        return self._storages[key]

    def _read_storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """The entry's declared size is checked against the pickle's element count before the
        entry is read, so neither can make the reader allocate more than the other states."""
        name = f"{self._prefix}data/{key}"
        try:
            declared = self._archive.getinfo(name).file_size
        except KeyError:
            raise ArchiveError(f"{self._path}: storage {key!r} is missing from the archive; the "
                               "file is truncated or corrupt, re-download it") from None
        if declared != numel * dtype.itemsize:
            raise ArchiveError(
                f"{self._path}: storage {key!r} has {declared} bytes, expected "
                f"{numel * dtype.itemsize}; the file is truncated or corrupt, re-download it"
            )
        raw = self._archive.read(name)
        # frombuffer rejects empty buffers; a bytearray keeps the tensor writable.
        return torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)


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
    :class:`ArchiveError` (a ``ValueError``) if the file is not a readable archive or would
    expand far beyond its size (:func:`check_zip_expansion`).
    """
    path_str = str(path)
    try:
        with zipfile.ZipFile(path) as archive:
            check_zip_expansion(archive, path_str)
            prefix = _find_prefix(archive.namelist())
            if prefix is None:
                raise ArchiveError(f"{path_str}: not a TorchScript archive (no <top>/data.pkl)")
            root = _RestrictedUnpickler(archive, prefix, path_str).load()
        if not isinstance(root, _ScriptObject):
            raise ArchiveError(f"{path_str}: data.pkl does not hold a TorchScript module")
        state: dict[str, torch.Tensor] = {}
        _flatten(root, "", state)
        return state
    except (ArchiveError, UnsafeCheckpointError, MemoryError):
        raise
    except Exception as exc:  # anything a damaged zip or pickle makes these steps raise
        raise ArchiveError(
            f"{path_str}: the file is truncated or corrupt ({type(exc).__name__}: "
            f"{str(exc)[:200]}); re-download it"
        ) from exc

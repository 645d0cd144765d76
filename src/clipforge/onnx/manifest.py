"""The export directory's layout and its manifest, ``clipforge_onnx.json``.

Export (which needs torch) and runtime (which must not) both depend on this module, so it
holds the file names, the format version and the checks a loader runs before it trusts a file.
A deployment gets its model from a copied directory. Truncated copies and half-synced volumes
happen, so each graph's size and sha256 are recorded at export and checked at load. The error
then names the file; onnxruntime's protobuf message would not.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..configs import TextConfig
from ..fileio import atomic_file

MANIFEST = "clipforge_onnx.json"
FORMAT = "clipforge-onnx"
# The manifest versions this clipforge reads.  1: OpenAI's BPE vocabulary; 2: a Hugging Face
# tokenizer's files (``tokenizer.type`` "huggingface"), which a version-1 reader cannot load.
# An export is written with the lowest version that describes it (export._manifest), so that
# older clipforge releases keep reading what they can and ask for an upgrade where they cannot.
FORMAT_VERSION = 2
HF_TOKENIZER_VERSION = 2
IMAGE_FILE, TEXT_FILE = "image_encoder.onnx", "text_encoder.onnx"
VOCAB_LICENSE = "LICENSE-bpe_simple_vocab.txt"
VARIANTS = ("fp32", "int8")


class OnnxLoadError(ValueError):
    """An export directory, its manifest or one of its graphs cannot be used."""


def variant_file(name: str, variant: str) -> str:
    """``image_encoder.onnx`` -> ``image_encoder_int8.onnx`` for the int8 variant."""
    return name if variant == "fp32" else name.replace(".onnx", f"_{variant}.onnx")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """What the manifest records of a written file: its name, size and sha256."""
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def export_directory(path: str | Path) -> Path:
    """The export directory for ``path``: the directory itself, or the one holding ``path``
    when it names the manifest or a graph inside it."""
    path = Path(path)
    if path.is_file() and (path.name == MANIFEST or path.suffix in (".onnx", ".data")):
        return path.parent
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the export at ``path``, after checking that it is one clipforge can read."""
    directory = export_directory(path)
    if not directory.exists():
        raise OnnxLoadError(f"{directory} does not exist")
    if not directory.is_dir():
        raise OnnxLoadError(f"{directory} is not an ONNX export directory")
    file = directory / MANIFEST
    if not file.is_file():
        raise OnnxLoadError(
            f"{directory} has no {MANIFEST}: not a clipforge ONNX export (write one with "
            "clipforge.onnx.export_onnx or `clipforge export onnx MODEL --out DIR`)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OnnxLoadError(f"cannot read {file}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise OnnxLoadError(f"{file} is not a clipforge ONNX manifest (no \"format\": "
                            f"\"{FORMAT}\")")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise OnnxLoadError(f"{file} has format version {version!r}; this clipforge reads "
                            f"versions up to {FORMAT_VERSION}: upgrade clipforge")
    return manifest


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest (atomically: readers see the old one or the new one)."""
    path = directory / MANIFEST
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def check_file(directory: Path, record: dict[str, Any], verify: bool) -> Path:
    """The path of a recorded file after checking that it is there, whole and (with
    ``verify``) the same bytes as exported; the errors name the file."""
    name = record["file"]
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise OnnxLoadError(f"{directory / MANIFEST} lists {name!r}, which is not a file name "
                            "inside the export directory; export the model again")
    path = directory / name
    if not path.is_file():
        raise OnnxLoadError(f"{path} is missing from the export; export the model again")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise OnnxLoadError(f"{path} is {size} bytes but was exported with {record['bytes']}: "
                            "truncated or replaced; copy or export it again")
    if verify and sha256_file(path) != record["sha256"]:
        raise OnnxLoadError(f"{path} does not match the sha256 recorded at export: corrupted or "
                            "replaced; copy or export it again")
    return path


def sample_ids(text: TextConfig, lengths: Sequence[int], seed: int = 0) -> np.ndarray:
    """[len(lengths), context] int64 random token ids laid out as the tower's tokenizer lays
    them out, for checking graphs without a tokenizer (torch-free, so that an int8 variant
    can be checked where it is deployed): each row ``length`` ids, the last of them the id the
    tower pools at (the largest id for ``argmax`` pooling, as OpenAI's end-of-text is;
    ``eos_id`` for ``eos``), then ``pad_id`` to the context.  The other ids avoid the padding
    and the pooled id, so that the pooled position is the one intended."""
    rng = np.random.default_rng(seed)
    context, vocab = text.context_length, text.vocab_size
    marker = {"argmax": vocab - 1, "eos": text.eos_id}.get(text.pool)
    avoid = [text.pad_id] + ([marker] if marker is not None else [])
    choices = np.setdiff1d(np.arange(vocab, dtype=np.int64), np.array(avoid, np.int64))
    ids = np.full((len(lengths), context), text.pad_id, dtype=np.int64)
    for row, length in enumerate(lengths):
        length = min(max(int(length), 1), context)
        ids[row, :length] = rng.choice(choices, length)
        if marker is not None:
            ids[row, length - 1] = marker
    return ids

"""ONNX export of CLIP's encoders and a PyTorch-free runtime for them.

``export_onnx`` (needs torch, onnx and onnxruntime) writes a self-contained directory: two
graphs, a manifest and the tokenizer vocabulary.  ``OnnxCLIP`` / ``load_onnx`` run it with
onnxruntime alone, with ``CLIP``'s inference interface.  The export side is imported on first
use (PEP 562), so ``import clipforge.onnx`` works where torch is not installed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .manifest import MANIFEST, OnnxLoadError
from .quantize import quantize_export
from .runtime import NumpyPreprocess, OnnxCLIP, load_onnx

if TYPE_CHECKING:
    from .export import OnnxExportError, export_onnx

__all__ = ["MANIFEST", "NumpyPreprocess", "OnnxCLIP", "OnnxExportError", "OnnxLoadError",
           "export_onnx", "load_onnx", "quantize_export"]


def __getattr__(name: str) -> Any:
    if name in ("export_onnx", "OnnxExportError"):
        value = getattr(importlib.import_module(".export", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

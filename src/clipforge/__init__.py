"""clipforge: CLIP models, exact to the reference implementations, in one small package.

The pipeline, in reading order: ``text`` (tokenizer) -> ``image`` (transform) -> ``model``
(vision, text, CLIP) -> ``weights`` (formats in and out) -> command line (``cli``).

The names that need PyTorch (``CLIP``, ``create_model``, ``load``, ``save_model``...) are
imported on first use (PEP 562), so that ``import clipforge`` and the ONNX runtime
(:mod:`clipforge.onnx.runtime`) work in a deployment without torch; the tokenizer, the image
transform and the configs never need it.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from .configs import CLIPConfig, PreprocessConfig, TextConfig, VisionConfig
from .image import ImageLoadError, Preprocess, load_image
from .text import ContextLengthError, Tokenizer, get_tokenizer, tokenize

if TYPE_CHECKING:
    from .factory import available_models, create_model, load
    from .model import CLIP
    from .weights import save_model

__version__ = "0.1.0"

__all__ = [
    "CLIP", "CLIPConfig", "ContextLengthError", "ImageLoadError", "Preprocess",
    "PreprocessConfig", "TextConfig", "Tokenizer", "VisionConfig", "available_models",
    "create_model", "get_tokenizer", "load", "load_image", "save_model", "tokenize",
]

# name -> the submodule that defines it; each imports torch, so each waits until asked for
_LAZY = {"CLIP": ".model", "available_models": ".factory", "create_model": ".factory",
         "load": ".factory", "save_model": ".weights"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)  # clipforge.factory and the like
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

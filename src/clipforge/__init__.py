"""clipforge: CLIP models, exact to the reference implementations, in one small package.

The pipeline, in reading order: ``text`` (tokenizer) -> ``image`` (transform) -> ``model``
(vision, text, CLIP) -> ``weights`` (formats in and out) -> command line (``cli``).

Every loaded model, PyTorch or ONNX, has one interface (:class:`Encoder`) and carries its
preprocessing and its tokenizer; :func:`create_model` / :func:`load` are the one loader.

The names that need PyTorch (``CLIP``, ``create_model``, ``load``, ``save_model``,
``ZeroShotClassifier``...) are imported on first use (PEP 562), so that ``import clipforge`` and
the ONNX runtime (:mod:`clipforge.onnx.runtime`) work in a deployment without torch; the
tokenizer, the image transform and the configs never need it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import TYPE_CHECKING, Any

from . import text
from .configs import CLIPConfig, PreprocessConfig, TextConfig, VisionConfig
from .encoder import Encoder
from .image import ImageLoadError, Preprocess, load_image
from .text import ContextLengthError, Tokenizer, tokenize

if TYPE_CHECKING:
    from .dense import locate
    from .evaluation.zeroshot import ZeroShotClassifier
    from .factory import available_models, create_model, load
    from .model import CLIP
    from .weights import save_model

__version__ = "0.1.0"

__all__ = [
    "CLIP", "CLIPConfig", "ContextLengthError", "Encoder", "ImageLoadError", "Preprocess",
    "PreprocessConfig", "TextConfig", "Tokenizer", "VisionConfig", "ZeroShotClassifier",
    "available_models", "create_model", "get_tokenizer", "load", "load_image", "locate",
    "save_model", "tokenize",
]

# name -> the submodule that defines it; each imports torch, so each waits until asked for
_LAZY = {"CLIP": ".model", "available_models": ".factory", "create_model": ".factory",
         "load": ".factory", "locate": ".dense", "save_model": ".weights",
         "ZeroShotClassifier": ".evaluation.zeroshot"}


def get_tokenizer(name_or_model: Any = None) -> Any:
    """A model's tokenizer: callable (texts -> [N, context] ids with the model's own padding,
    truncation and cleaning), with ``encode`` / ``decode``.

    No argument: OpenAI's BPE, as :func:`tokenize` uses (loaded once, no torch needed).  A
    loaded model: its own ``model.tokenizer``.  A name, file, directory or ``hf-hub:`` name:
    the tokenizer that model would load (:func:`clipforge.factory.tokenizer_of`, which reads
    no weights for a built-in architecture name).
    """
    if name_or_model is None:
        return text.get_tokenizer()
    if not isinstance(name_or_model, str | os.PathLike):
        return name_or_model.tokenizer
    from .factory import tokenizer_of

    return tokenizer_of(name_or_model)


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

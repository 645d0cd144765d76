"""Drive a clipforge model with CLIP_benchmark itself (github.com/LAION-AI/CLIP_benchmark).

CLIP_benchmark needs three things from a model type: a model with ``encode_image(pixels)`` and
``encode_text(tokens)``, the image transform, and a tokenizer that maps a list of strings to a
tensor of ids.  A clipforge model has both encoders, ``model.preprocess`` is the transform, and
the tokenizer is the model's own (``model.tokenizer``) with ``truncate=True`` (CLIP_benchmark
hands it captions of any length, as OpenCLIP's tokenizer accepts them).

Register the loader, then use CLIP_benchmark as usual::

    python -m clipforge.evaluation.clip_benchmark eval --model_type clipforge \\
        --model ViT-B-32 --pretrained openai --dataset cifar10 --output result.json

or, in Python::

    import clip_benchmark.models
    from clipforge.evaluation.clip_benchmark import register
    register(clip_benchmark.models)
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from ..factory import create_model

MODEL_TYPE = "clipforge"


def load_clipforge(model_name: str = "ViT-B-32", pretrained: str | None = "openai",
                   cache_dir: str | None = None, device: str | torch.device = "cpu"
                   ) -> tuple[torch.nn.Module, Callable[[Any], torch.Tensor], Callable]:
    """CLIP_benchmark's loader signature: ``(model, transform, tokenizer)``.

    ``model_name`` is anything ``clipforge.create_model`` takes (an architecture, a checkpoint
    file, a model directory, ``hf-hub:org/repo``); ``pretrained`` a weights tag or file for an
    architecture name ("" or None: the file named by ``model_name`` itself).  ``cache_dir`` is
    ignored: downloads go to the Hugging Face cache.
    """
    del cache_dir
    model = create_model(model_name, weights=pretrained or None, device=str(device))
    # CLIP_benchmark's tokenizer contract: strings in, ids out, never an error for a long
    # caption (it is cut, keeping the end-of-text token)
    return model, model.preprocess, functools.partial(model.tokenizer, truncate=True)


def register(models_module: ModuleType) -> None:
    """Add the ``clipforge`` model type to ``clip_benchmark.models`` (in place, so that the
    command line's ``--model_type`` choices include it)."""
    models_module.TYPE2FUNC[MODEL_TYPE] = load_clipforge
    if MODEL_TYPE not in models_module.MODEL_TYPES:
        models_module.MODEL_TYPES.append(MODEL_TYPE)


def main(argv: list[str] | None = None) -> int:
    """``clip_benchmark``'s command line with the clipforge model type registered."""
    try:
        import clip_benchmark.models
        from clip_benchmark import cli
    except ImportError as exc:
        raise SystemExit(f"CLIP_benchmark is not installed ({exc}): pip install "
                         "clip_benchmark") from None
    register(clip_benchmark.models)
    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    return cli.main() or 0


if __name__ == "__main__":
    sys.exit(main())

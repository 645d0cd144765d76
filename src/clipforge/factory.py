"""``create_model`` and ``load``: from a name, a file or a directory to a ready model.

The name decides nothing by itself: it only selects a row of the architecture table.  Files bring
their own config (or one inferred from their shapes), and the weights are checked key by key and
shape by shape before loading so that a wrong file gives a precise message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .allocator import keep_freed_memory
from .configs import ARCHITECTURES, CLIPConfig, get_config
from .image import Preprocess
from .model import CLIP
from .precision import apply_precision, check_precision
from .text import load_tokenizer
from .weights.checkpoint import ARCHIVE_ATTRIBUTES, CheckpointError, StateDict
from .weights.formats import read_weights
from .weights.pretrained import HUB_PREFIX, download, resolve

# openai/CLIP spells its names with '/' and '@336px'; accept those for users who know them.
OPENAI_NAMES = {"ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14",
                "ViT-L/14@336px": "ViT-L-14-336"}


@dataclass
class _Resolved:
    config: CLIPConfig
    sd: StateDict | None  # None: random initialisation
    source: str  # where the weights came from, for messages
    files: Path | None = None  # the directory that holds the weights' other files (tokenizer)


def _directory_of(path: str | Path) -> Path | None:
    return Path(path) if Path(path).is_dir() else None


def _resolve(name_or_path: str | Path, weights: str | Path | None, activation: str | None
             ) -> _Resolved:
    spec = str(name_or_path)
    spec = OPENAI_NAMES.get(spec, spec)
    if Path(spec).exists():
        if weights is not None:
            raise ValueError(f"{spec} is a checkpoint already; pass weights= only with a "
                             "model name")
        config, sd = read_weights(spec, activation)
        return _Resolved(config, sd, spec, _directory_of(spec))
    if spec.startswith(HUB_PREFIX):
        repo, _ = resolve("", spec)
        snapshot = download(repo)
        config, sd = read_weights(snapshot, activation)
        return _Resolved(config, sd, spec, snapshot)
    if weights is not None and not Path(weights).exists():
        # a published tag or hf-hub:org/repo: the downloaded files bring their own config, so
        # the name needs no row of its own (OpenCLIP's SigLIP and DFN names, for example)
        repo, tag_activation = resolve(spec, str(weights))
        snapshot = download(repo)
        file_config, sd = read_weights(snapshot, activation or tag_activation)
        return _Resolved(file_config, sd, f"{spec} {weights}", snapshot)
    config = get_config(spec)
    if activation:
        config = config.replace(activation=activation)
    if weights is None:
        return _Resolved(config, None, "random initialisation")
    # The name gives the architecture; the activation is what the file records (QuickGELU for
    # a bare state dict) unless the caller says otherwise: never the name's row.
    file_config, sd = read_weights(weights, activation)
    return _Resolved(config.replace(activation=file_config.activation,
                                    preprocess=file_config.preprocess),
                     sd, str(weights), _directory_of(weights))


def load_checked(model: CLIP, sd: StateDict, source: str) -> None:
    """Load ``sd`` into ``model`` (assigning its tensors), after checking that every key and
    shape fits; the error names the source and the first offending keys."""
    sd = {k: v for k, v in sd.items() if k not in ARCHIVE_ATTRIBUTES}
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [f"{k} (file {tuple(sd[k].shape)}, model {tuple(v.shape)})"
                  for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", mismatched)) if keys]
    if problems:
        raise CheckpointError(
            f"weights from {source} do not fit the architecture: " + "; ".join(problems)
            + ". Check the model name / checkpoint pairing (or pass the checkpoint alone so its "
            "architecture is read from the file)."
        )
    model.load_state_dict(sd, strict=True, assign=True)


def create_model(name_or_path: str | Path, *, weights: str | Path | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 activation: str | None = None, precision: str = "fp32") -> CLIP:
    """Build a :class:`CLIP` in eval mode with ``model.preprocess`` set.

    ``name_or_path``: a built-in architecture (see :func:`available_models`), a checkpoint file
    (OpenAI TorchScript or state dict, OpenCLIP, clipforge ``.safetensors``), a model directory
    (clipforge or Hugging Face ``CLIPModel``) or ``hf-hub:org/repo``.  ``weights``: with a name,
    a pretrained tag (``"openai"``, ``"laion2b_s39b_b160k"``...), ``hf-hub:org/repo`` or a local
    file; None gives random initialisation.  ``activation`` ("quick_gelu" | "gelu") overrides
    what the weights record; bare state dicts record nothing and are read as QuickGELU.
    ``dtype`` defaults to float32 whatever the file stores.
    ``precision``: ``"fp32"`` (the exact path), or ``"bf16"`` / ``"int8"`` for a faster
    inference-only model with float32 outputs (see :mod:`clipforge.precision`); the weights are
    read as float32 and converted, so ``dtype`` must then be left unset (or float32).
    A CPU model tunes the process's malloc once (:mod:`clipforge.allocator`).
    """
    check_precision(precision)
    if precision != "fp32" and dtype not in (None, torch.float32):
        raise ValueError(f"precision={precision!r} converts float32 weights; leave dtype unset "
                         f"(got {dtype})")
    found = _resolve(name_or_path, weights, activation)
    config = found.config
    tokenizer = load_tokenizer(config, found.files)  # first: a missing file fails fast
    if found.sd is None:
        model = CLIP(config)
    else:
        with torch.device("meta"):
            model = CLIP(config)
        load_checked(model, found.sd, found.source)
    model = model.to(device=device, dtype=dtype or torch.float32)
    if model.device.type == "cpu":
        keep_freed_memory()  # activations are reused, not page-faulted in per layer
    model.preprocess = Preprocess.from_config(config)
    model.tokenizer = tokenizer
    model.origin = _origin(name_or_path, weights)
    return apply_precision(model.eval(), precision)


def _origin(name_or_path: str | Path, weights: str | Path | None) -> dict[str, str | None]:
    """How to load this model again (files as absolute paths): what a search index records so
    that queries can load the model that made it."""
    def spelled(value: str | Path | None) -> str | None:
        if value is None:
            return None
        return str(Path(value).resolve()) if Path(value).exists() else str(value)
    return {"model": spelled(name_or_path), "weights": spelled(weights)}


def load(name_or_path: str | Path, *, weights: str | Path | None = None,
         device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         activation: str | None = None, precision: str = "fp32"
         ) -> tuple[CLIP, Callable]:
    """openai/CLIP's ``clip.load``: ``(model, preprocess)``; arguments as :func:`create_model`."""
    model = create_model(name_or_path, weights=weights, device=device, dtype=dtype,
                         activation=activation, precision=precision)
    return model, model.preprocess


def available_models() -> list[str]:
    """Built-in architecture names (each has a config; see ``clipforge models`` for weights)."""
    return list(ARCHITECTURES)

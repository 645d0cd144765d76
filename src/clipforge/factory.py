"""``create_model`` and ``load``: the one way from a name, a file or a directory to a ready model.

The command line, index building, ``SearchIndex.open``, the server, evaluation and training all
load through :func:`create_model`, so a model means the same thing everywhere.  What it returns
carries all it needs to be used (:class:`~clipforge.encoder.Encoder`): its preprocessing, its
tokenizer, and ``origin``, how to load it again (:func:`load_origin`; what a search index
records).

The name decides nothing by itself: it only selects a row of the architecture table.  Files bring
their own config (or one inferred from their shapes), and the weights are checked key by key and
shape by shape before loading so that a wrong file gives a precise message.  ``backend="onnx"``
runs an export directory (``clipforge export onnx``) with onnxruntime instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .allocator import keep_freed_memory
from .classifier import read_classifier, split_classifier
from .configs import ARCHITECTURES, CLIPConfig, get_config
from .image import Preprocess
from .model import CLIP
from .onnx import MANIFEST, OnnxCLIP
from .onnx.manifest import read_manifest
from .precision import apply_precision, check_precision
from .text import load_tokenizer
from .text.vocabulary import fit_config
from .weights.checkpoint import ARCHIVE_ATTRIBUTES, CheckpointError, StateDict
from .weights.formats import read_model, read_weights
from .weights.pretrained import HUB_PREFIX, download, resolve

# openai/CLIP spells its names with '/' and '@336px'; accept those for users who know them.
OPENAI_NAMES = {"ViT-B/32": "ViT-B-32", "ViT-B/16": "ViT-B-16", "ViT-L/14": "ViT-L-14",
                "ViT-L/14@336px": "ViT-L-14-336"}
BACKENDS = ("torch", "onnx")
ONNX_PRECISIONS = ("fp32", "int8")  # the variants an export can hold


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
        found = read_model(spec, activation)
        return _Resolved(found.config, found.sd, spec, found.files)
    if spec.startswith(HUB_PREFIX):
        repo, _ = resolve("", spec)
        found = read_model(download(repo), activation)
        return _Resolved(found.config, found.sd, spec, found.files)
    if weights is not None and not Path(weights).exists():
        # a published tag or hf-hub:org/repo: the downloaded files bring their own config, so
        # the name needs no row of its own (OpenCLIP's SigLIP and DFN names, for example)
        repo, tag_activation = resolve(spec, str(weights))
        found = read_model(download(repo), activation or tag_activation)
        return _Resolved(found.config, found.sd, f"{spec} {weights}", found.files)
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
                 activation: str | None = None, precision: str = "fp32",
                 backend: str | None = None, tokenizer: str | Path | None = None
                 ) -> CLIP | OnnxCLIP:
    """A model in eval mode, ready to use: ``model.preprocess``, ``model.tokenizer`` and
    ``model.origin`` set (see :class:`~clipforge.encoder.Encoder`).

    ``name_or_path``: a built-in architecture (see :func:`available_models`), a checkpoint file
    (OpenAI TorchScript or state dict, OpenCLIP, clipforge ``.safetensors``), a model directory
    (clipforge or Hugging Face), ``hf-hub:org/repo``, or an ONNX export directory.  ``weights``:
    with a name, a pretrained tag (``"openai"``, ``"laion2b_s39b_b160k"``...),
    ``hf-hub:org/repo`` or a local file; None gives random initialisation.  ``activation``
    ("quick_gelu" | "gelu") overrides what the weights record; bare state dicts record nothing
    and are read as QuickGELU.  ``dtype`` defaults to float32 whatever the file stores.
    ``precision``: ``"fp32"`` (the exact path), or ``"bf16"`` / ``"int8"`` for a faster
    inference-only model with float32 outputs (see :mod:`clipforge.precision`); the weights are
    read as float32 and converted, so ``dtype`` must then be left unset (or float32).
    ``backend``: ``"torch"`` (a :class:`CLIP`), ``"onnx"`` (an export directory run by
    :class:`~clipforge.onnx.OnnxCLIP` on the CPU, ``precision`` fp32 or int8 choosing the
    variant), or None: onnx for an export directory, torch otherwise.
    ``tokenizer``: a vocabulary learnt for a model trained from scratch (a directory that
    :func:`clipforge.text.vocabulary.train_bpe` wrote), read instead of the architecture's
    tokenizer; the text tower's vocabulary size, length and end token follow it.  Only with
    random initialisation: pretrained weights come with their own vocabulary.
    A CPU model tunes the process's malloc once (:mod:`clipforge.allocator`).
    """
    if resolve_backend(name_or_path, backend) == "onnx":
        if tokenizer is not None:
            raise ValueError("tokenizer= is for a model from random initialisation; an ONNX "
                             "export carries its own tokenizer")
        return _onnx_model(name_or_path, weights=weights, device=device, dtype=dtype,
                           activation=activation, precision=precision)
    check_precision(precision)
    if precision != "fp32" and dtype not in (None, torch.float32):
        raise ValueError(f"precision={precision!r} converts float32 weights; leave dtype unset "
                         f"(got {dtype})")
    found = _resolve(name_or_path, weights, activation)
    config, files = found.config, found.files
    if tokenizer is not None:
        if found.sd is not None:
            raise ValueError(f"tokenizer={str(tokenizer)!r} gives a text tower a new "
                             f"vocabulary, but {found.source} brings trained weights (and their "
                             "tokenizer): pass a learnt vocabulary only with random "
                             "initialisation")
        config, files = fit_config(config, tokenizer), Path(tokenizer)
    text_tokenizer = load_tokenizer(config, files)  # first: a missing file fails fast
    sd, head = split_classifier(found.sd) if found.sd is not None else (None, {})
    classifier = read_classifier(head, files or _folder_of_file(weights or name_or_path),
                                 found.source)
    if sd is None:
        model = CLIP(config)
    else:
        with torch.device("meta"):
            model = CLIP(config)
        load_checked(model, sd, found.source)
    model = model.to(device=device, dtype=dtype or torch.float32)
    if model.device.type == "cpu":
        keep_freed_memory()  # activations are reused, not page-faulted in per layer
    model.preprocess = Preprocess.from_config(config)
    model.tokenizer = text_tokenizer
    model.origin = _origin(name_or_path, weights, activation)
    model.classifier = classifier  # a fine-tuned model's classes and head (clipforge.classifier)
    return apply_precision(model.eval(), precision)


def _folder_of_file(spec: str | Path) -> Path | None:
    """The folder of a weights file given by path (where its classifier file would be)."""
    path = Path(spec)
    return path.parent if path.is_file() else None


def is_export_directory(path: str | Path) -> bool:
    """Whether ``path`` is an ONNX export directory (it holds the export's manifest)."""
    return (Path(path) / MANIFEST).is_file()


def resolve_backend(name_or_path: str | Path, backend: str | None) -> str:
    """``backend``, checked; None: "onnx" for an export directory, "torch" otherwise."""
    if backend is None:
        return "onnx" if is_export_directory(name_or_path) else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return backend


def _onnx_model(path: str | Path, *, weights: str | Path | None, device: str | torch.device,
                dtype: torch.dtype | None, activation: str | None, precision: str) -> OnnxCLIP:
    """The export at ``path`` run by onnxruntime, after refusing options it cannot honour."""
    if not is_export_directory(path):
        raise ValueError(f"backend 'onnx' needs an export directory, and {path} is not one; "
                         "write one with `clipforge export onnx MODEL --out DIR` "
                         "(clipforge.onnx.export_onnx)")
    if (weights is not None or activation is not None or dtype is not None
            or torch.device(device).type != "cpu" or precision not in ONNX_PRECISIONS):
        raise ValueError("an ONNX export runs as exported on the CPU: leave out the weights, "
                         "activation, dtype and device (--weights, --activation, --device), and "
                         f"use precision {' or '.join(ONNX_PRECISIONS)}")
    return OnnxCLIP(path, variant=precision)


def _origin(name_or_path: str | Path, weights: str | Path | None, activation: str | None
            ) -> dict[str, str | None]:
    """How to load this model again (files as absolute paths): what a search index records so
    that queries can load the model that made it (:func:`load_origin`)."""
    def spelled(value: str | Path | None) -> str | None:
        if value is None:
            return None
        return str(Path(value).resolve()) if Path(value).exists() else str(value)
    origin = {"model": spelled(name_or_path), "weights": spelled(weights)}
    if activation is not None:
        origin["activation"] = activation
    return origin


def load_origin(origin: Mapping[str, Any], *, device: str | torch.device = "cpu",
                precision: str = "fp32") -> CLIP | OnnxCLIP:
    """The model a ``model.origin`` record describes, loaded again (on ``device``, at
    ``precision``): the same weights, the same backend."""
    if not isinstance(origin, Mapping) or not isinstance(origin.get("model"), str):
        raise ValueError(f"not a model origin record (no model name): {origin!r}")
    return create_model(origin["model"], weights=origin.get("weights"),
                        activation=origin.get("activation"), backend=origin.get("backend"),
                        device=device, precision=precision)


def load(name_or_path: str | Path, *, weights: str | Path | None = None,
         device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         activation: str | None = None, precision: str = "fp32", backend: str | None = None
         ) -> tuple[CLIP | OnnxCLIP, Callable]:
    """openai/CLIP's ``clip.load``: ``(model, preprocess)``; arguments as :func:`create_model`."""
    model = create_model(name_or_path, weights=weights, device=device, dtype=dtype,
                         activation=activation, precision=precision, backend=backend)
    return model, model.preprocess


def tokenizer_of(name_or_path: str | Path) -> Any:
    """The tokenizer the model ``name_or_path`` would load, without building the model: a
    built-in architecture name costs nothing (its config says which tokenizer and how long its
    texts are), an export directory costs its manifest, and a file, directory or hub name is
    read (and downloaded) as :func:`create_model` reads it."""
    spec = OPENAI_NAMES.get(str(name_or_path), str(name_or_path))
    if spec in ARCHITECTURES and not Path(spec).exists():
        return load_tokenizer(get_config(spec), None)
    if is_export_directory(spec):
        return load_tokenizer(CLIPConfig.from_dict(read_manifest(spec)["config"]), spec)
    found = _resolve(spec, None, None)
    return load_tokenizer(found.config, found.files)


def available_models() -> list[str]:
    """Built-in architecture names (each has a config; see ``clipforge models`` for weights)."""
    return list(ARCHITECTURES)

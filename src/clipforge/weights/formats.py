"""Which format a path is in, and reading/writing each.

In: a clipforge directory or ``.safetensors`` file (config inside), a Hugging Face ``CLIPModel``
directory, an OpenCLIP hub directory (``open_clip_config.json``, read by :mod:`.open_clip`), or
a bare OpenAI/OpenCLIP checkpoint (architecture inferred from shapes).  Out: clipforge's format
or Hugging Face's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from ..configs import CLIPConfig, json_field
from ..fileio import atomic_directory, atomic_file
from ..text import get_tokenizer
from .checkpoint import CheckpointError, StateDict, parse_json_object, read_checkpoint
from .huggingface import (
    HF_FIELD_NAMES,
    config_from_hf,
    config_to_hf,
    from_hf_state_dict,
    hf_format_of,
    hf_model_type,
    hf_rules,
    preprocessor_to_hf,
    read_hf_json,
    to_hf_state_dict,
)
from .infer import check_config_fits, infer_config
from .open_clip import read_open_clip

FORMAT = "clipforge"
FORMAT_VERSION = 1
CONFIG_KEY = "clipforge_config"  # safetensors metadata entry carrying the config
WEIGHTS_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin",
                 "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class ReadModel:
    """What a checkpoint holds: its config, its tensors (OpenAI layout) and the folder holding
    the model's other files, its tokenizer's among them (None for a single file).  That folder
    is not always the weights': an OpenCLIP config may name a tokenizer elsewhere."""

    config: CLIPConfig
    sd: StateDict
    files: Path | None


def read_weights(path: str | Path, activation: str | None = None) -> tuple[CLIPConfig, StateDict]:
    """(config, OpenAI-layout state dict) of a checkpoint file or model directory (see
    :func:`read_model`)."""
    found = read_model(path, activation)
    return found.config, found.sd


def read_model(path: str | Path, activation: str | None = None) -> ReadModel:
    """Config, OpenAI-layout state dict and files folder of a checkpoint file or model
    directory.

    ``activation`` overrides the file's; files that record none use QuickGELU unless given.
    A config read from a file (not inferred from the shapes) is checked against the tensors'
    shapes here, before anyone builds a model from it
    (:func:`~clipforge.weights.infer.check_config_fits`).
    """
    path = Path(path)
    if path.is_dir():
        return _read_directory(path, activation)
    sd, metadata = read_checkpoint(path)
    if CONFIG_KEY in metadata:
        source = f"{path} (its {CONFIG_KEY} metadata)"
        return _checked(_native_config(metadata[CONFIG_KEY], activation, source), sd, source,
                        path)
    if is_hf_layout(sd):
        raise CheckpointError(
            f"{path} holds Hugging Face CLIPModel weights without their config.json: "
            "pass the directory that contains both"
        )
    return ReadModel(infer_config(sd, activation, source=str(path)), sd, None)


def _checked(config: CLIPConfig, sd: StateDict, source: str, weights: Path,
             names: dict[str, str] | None = None, files: Path | None = None) -> ReadModel:
    """The config checked against the tensors' shapes; ``files`` defaults to the weights'
    folder when the weights come in one (a directory's file)."""
    check_config_fits(config, sd, source, str(weights), names)
    return ReadModel(config, sd, files)


def _native_config(data: str | dict[str, Any], activation: str | None,
                   source: str) -> CLIPConfig:
    """clipforge's own config (the JSON text of the weights' metadata, or the ``model``
    object of ``config.json``); every field checked, errors naming ``source``."""
    if isinstance(data, str):
        data = parse_json_object(data, source)
    try:
        config = CLIPConfig.from_dict(data)
        return config.replace(activation=activation) if activation else config
    except ValueError as exc:
        raise CheckpointError(f"{source}: {exc}; fix the file or export the model again"
                              ) from None


def is_hf_layout(sd: StateDict) -> bool:
    return any(k.startswith(("vision_model.", "text_model.")) for k in sd)


def _weights_file(directory: Path) -> Path:
    for name in WEIGHTS_FILES:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(
        f"{directory} holds no weights file (looked for {', '.join(WEIGHTS_FILES)})")


def _read_directory(directory: Path, activation: str | None) -> ReadModel:
    """Read a model directory.  The tensors' key layout, not which config files happen to be
    present, decides how to read it: LAION's hub repositories hold both an OpenCLIP config with
    OpenCLIP weights and a transformers config, and only one of them may be downloaded."""
    config_path = directory / "config.json"
    config_json = read_hf_json(config_path)
    weights = _weights_file(directory)
    sd, metadata = read_checkpoint(weights)
    if CONFIG_KEY in metadata:  # written with the weights: authoritative
        source = f"{weights} (its {CONFIG_KEY} metadata)"
        return _checked(_native_config(metadata[CONFIG_KEY], activation, source), sd, source,
                        weights, files=directory)
    if config_json is not None and config_json.get("format") == FORMAT:
        return _checked(_clipforge_json(config_json, activation, str(config_path)), sd,
                        str(config_path), weights, files=directory)
    if is_hf_layout(sd):
        return _read_hf(directory, config_json, sd, weights, activation)
    open_clip_path = directory / "open_clip_config.json"
    if (open_clip_json := read_hf_json(open_clip_path)) is not None:
        found = read_open_clip(open_clip_json, sd, directory, activation, str(weights),
                               str(open_clip_path))
        return _checked(found.config, found.sd, str(open_clip_path), weights, found.names,
                        found.tokenizer_files)
    return ReadModel(infer_config(sd, activation, source=str(weights)), sd, directory)


def _read_hf(directory: Path, config_json: dict[str, Any] | None, sd: StateDict, weights: Path,
             activation: str | None) -> ReadModel:
    """A transformers directory (config.json, preprocessor_config.json, tokenizer files)."""
    config_path = directory / "config.json"
    if not (config_json and "vision_config" in config_json):
        raise CheckpointError(f"{weights} holds Hugging Face CLIPModel weights but "
                              f"{directory} has no CLIPModel config.json beside them")
    preprocessor = directory / "preprocessor_config.json"
    config = config_from_hf(config_json, read_hf_json(preprocessor),
                            source=str(config_path), preprocessor_source=str(preprocessor),
                            directory=directory)
    rules = hf_rules(hf_model_type(config_json, str(config_path)))
    return _checked(config.replace(activation=activation) if activation else config,
                    _from_hf(sd, weights, rules), str(config_path), weights, HF_FIELD_NAMES,
                    directory)


def _from_hf(sd: StateDict, weights: Path, rules: list) -> StateDict:
    """clipforge's tensors of a transformers state dict; odd key names or shapes (a
    transposed matrix that is not one) name the file instead of surfacing as a traceback."""
    try:
        return from_hf_state_dict(sd, rules, str(weights))
    except CheckpointError:
        raise
    except (ValueError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"{weights}: not a CLIPModel state dict clipforge can read "
                              f"({exc}); download or export it again") from None


def _clipforge_json(document: dict[str, Any], activation: str | None,
                    source: str) -> CLIPConfig:
    """The model config of clipforge's ``config.json``; a newer format is refused, not
    half-read."""
    try:
        version = json_field(document, "format_version", "", "positive int", FORMAT_VERSION)
        model = json_field(document, "model", "", "object")
    except ValueError as exc:
        raise CheckpointError(f"{source}: {exc}; fix the file or export the model again"
                              ) from None
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{source} has format_version {version}, written by a newer "
                              f"clipforge (this one reads {FORMAT_VERSION}); upgrade clipforge")
    return _native_config(model, activation, source)


def _special_ids(tokenizer: Any) -> dict[str, int]:
    """The bos/eos/pad ids of a Hugging Face tokenizer (those it has)."""
    hf = tokenizer.hf
    ids = {"bos": hf.bos_token_id, "eos": hf.eos_token_id, "pad": hf.pad_token_id}
    return {k: int(v) for k, v in ids.items() if v is not None}


def _contiguous(sd: StateDict) -> StateDict:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


# What the model writers below put in a folder: a folder written before clipforge listed its
# files in a manifest is replaced only if it holds these alone (config.json among them).
MODEL_MARKER = "config.json"
MODEL_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "vocab.json",
               "merges.txt", "special_tokens_map.json", "tokenizer_config.json")


def save_clipforge(config: CLIPConfig, sd: StateDict, destination: str | Path,
                   tokenizer: Any = None) -> Path:
    """Write clipforge's format: a directory with ``config.json`` and ``model.safetensors``
    (whose metadata also carries the config, so the file alone is enough) and, for a model
    with a Hugging Face tokenizer (``config.tokenizer.kind == "hf"``), that tokenizer's files;
    or, when ``destination`` ends in ``.safetensors``, that single file (OpenAI's tokenizer
    only: the others' files need a directory)."""
    destination = Path(destination)
    _check_tokenizer(config, tokenizer, destination)
    metadata = {"format": "pt", CONFIG_KEY: config.to_json()}
    if destination.suffix == ".safetensors":
        with atomic_file(destination) as tmp:
            save_file(_contiguous(sd), str(tmp), metadata=metadata)
        return destination
    with atomic_directory(destination, MODEL_MARKER, MODEL_FILES) as tmp:
        save_file(_contiguous(sd), str(tmp / "model.safetensors"), metadata=metadata)
        document = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": config.to_dict()}
        (tmp / "config.json").write_text(json.dumps(document, indent=2) + "\n")
        if config.tokenizer.kind == "hf":
            tokenizer.save(tmp)
    return destination


def _check_tokenizer(config: CLIPConfig, tokenizer: Any, destination: Path) -> None:
    """A model whose tokenizer is a Hugging Face one is saved with its files, so they must be
    at hand and the destination a directory."""
    if config.tokenizer.kind != "hf":
        return
    if tokenizer is None or not hasattr(tokenizer, "save"):
        raise ValueError(f"cannot save to {destination}: the model reads a Hugging Face "
                         "tokenizer and none was given to copy its files from (save the model "
                         "object clipforge loaded: it carries model.tokenizer)")
    if destination.suffix == ".safetensors":
        raise ValueError(f"cannot save to the single file {destination}: the model's tokenizer "
                         "files need a directory; give a directory name")


def save_into_directory(config: CLIPConfig, sd: StateDict, directory: str | Path,
                        tokenizer: Any = None) -> Path:
    """Write clipforge's two model files into an existing folder that holds other things too
    (a training run's directory), each atomically.  The weights go first: their metadata carries
    the config and readers trust it over ``config.json``, so the pair is never inconsistent.
    A Hugging Face tokenizer's files are written first of all."""
    directory = Path(directory)
    _check_tokenizer(config, tokenizer, directory)
    if config.tokenizer.kind == "hf":
        tokenizer.save(directory)
    with atomic_file(directory / "model.safetensors") as tmp:
        save_file(_contiguous(sd), str(tmp), metadata={"format": "pt",
                                                       CONFIG_KEY: config.to_json()})
    with atomic_file(directory / "config.json") as tmp:
        document = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": config.to_dict()}
        tmp.write_text(json.dumps(document, indent=2) + "\n")
    return directory


def save_huggingface(config: CLIPConfig, sd: StateDict, destination: str | Path,
                     tokenizer: Any = None) -> Path:
    """Write a directory that transformers loads as the model's own class (``CLIPModel``,
    ``SiglipModel``, ``MetaClip2Model``, ``ChineseCLIPModel``, see
    :func:`~clipforge.weights.huggingface.hf_format_of`) with its processor: config,
    safetensors weights, image-processor and tokenizer files."""
    destination = Path(destination)
    _check_tokenizer(config, tokenizer, destination)
    hf_sd = to_hf_state_dict(sd, hf_rules(hf_format_of(config)))
    ids = _special_ids(tokenizer) if config.tokenizer.kind == "hf" else None
    with atomic_directory(destination, MODEL_MARKER, MODEL_FILES) as tmp:
        save_file(_contiguous(hf_sd), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_to_hf(config, ids), indent=2) + "\n")
        (tmp / "preprocessor_config.json").write_text(
            json.dumps(preprocessor_to_hf(config), indent=2) + "\n")
        if config.tokenizer.kind == "hf":
            tokenizer.save(tmp)
            return destination
        get_tokenizer().save_hf_vocabulary(tmp)
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        tokenizer_config = {"tokenizer_class": "CLIPTokenizer", "processor_class": "CLIPProcessor",
                            "model_max_length": config.text.context_length, **special}
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return Path(destination)


"""Which format a path is in, and reading/writing each.

In: a clipforge directory or ``.safetensors`` file (config inside), a Hugging Face ``CLIPModel``
directory, an OpenCLIP hub directory (``open_clip_config.json``), or a bare OpenAI/OpenCLIP
checkpoint (architecture inferred from shapes).  Out: clipforge's format or Hugging Face's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from ..configs import CLIPConfig, PreprocessConfig, TextConfig, VisionConfig
from ..fileio import atomic_directory, atomic_file
from ..text import get_tokenizer
from .checkpoint import CheckpointError, StateDict, read_checkpoint
from .huggingface import (
    config_from_hf,
    config_to_hf,
    from_hf_state_dict,
    preprocessor_to_hf,
    read_hf_json,
    to_hf_state_dict,
)
from .infer import infer_config

FORMAT = "clipforge"
FORMAT_VERSION = 1
CONFIG_KEY = "clipforge_config"  # safetensors metadata entry carrying the config
WEIGHTS_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin",
                 "open_clip_pytorch_model.bin")


def read_weights(path: str | Path, activation: str | None = None) -> tuple[CLIPConfig, StateDict]:
    """(config, OpenAI-layout state dict) of a checkpoint file or model directory.

    ``activation`` overrides the file's; files that record none use QuickGELU unless given.
    """
    path = Path(path)
    if path.is_dir():
        config, sd = _read_directory(path, activation)
    else:
        sd, metadata = read_checkpoint(path)
        if CONFIG_KEY in metadata:
            config = _native_config(json.loads(metadata[CONFIG_KEY]), activation)
        elif is_hf_layout(sd):
            raise CheckpointError(
                f"{path} holds Hugging Face CLIPModel weights without their config.json: "
                "pass the directory that contains both"
            )
        else:
            config = infer_config(sd, activation, source=str(path))
    return config, sd


def _native_config(data: dict[str, Any], activation: str | None) -> CLIPConfig:
    config = CLIPConfig.from_dict(data)
    return config.replace(activation=activation) if activation else config


def is_hf_layout(sd: StateDict) -> bool:
    return any(k.startswith(("vision_model.", "text_model.")) for k in sd)


def _weights_file(directory: Path) -> Path:
    for name in WEIGHTS_FILES:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(
        f"{directory} holds no weights file (looked for {', '.join(WEIGHTS_FILES)})")


def _read_directory(directory: Path, activation: str | None) -> tuple[CLIPConfig, StateDict]:
    """Read a model directory.  The tensors' key layout, not which config files happen to be
    present, decides how to read it: LAION's hub repositories hold both an OpenCLIP config with
    OpenCLIP weights and a transformers config, and only one of them may be downloaded."""
    config_json = read_hf_json(directory / "config.json")
    weights = _weights_file(directory)
    sd, metadata = read_checkpoint(weights)
    if CONFIG_KEY in metadata:  # written with the weights: authoritative
        return _native_config(json.loads(metadata[CONFIG_KEY]), activation), sd
    if config_json and config_json.get("format") == FORMAT:
        return _native_config(config_json["model"], activation), sd
    if is_hf_layout(sd):
        if not (config_json and "vision_config" in config_json):
            raise CheckpointError(f"{weights} holds Hugging Face CLIPModel weights but "
                                  f"{directory} has no CLIPModel config.json beside them")
        config = config_from_hf(config_json, read_hf_json(directory / "preprocessor_config.json"),
                                source=str(directory / "config.json"))
        return (config.replace(activation=activation) if activation else config,
                from_hf_state_dict(sd))
    if (open_clip_json := read_hf_json(directory / "open_clip_config.json")) is not None:
        return config_from_open_clip(open_clip_json, sd, activation, str(weights)), sd
    return infer_config(sd, activation, source=str(weights)), sd


def config_from_open_clip(data: dict[str, Any], sd: StateDict, activation: str | None,
                          source: str) -> CLIPConfig:
    """Read OpenCLIP's ``open_clip_config.json`` (model_cfg + preprocess_cfg)."""
    cfg, pre = data.get("model_cfg", {}), data.get("preprocess_cfg", {})
    shapes = infer_config(sd, activation or "quick_gelu", source)
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    vision = shapes.vision
    if vision.is_vit:
        vision = VisionConfig(vision.image_size, vision.width, vision.layers,
                              vision.width // v.get("head_width", 64), vision.patch_size,
                              vision.mlp_width)
    text = TextConfig(shapes.text.width, shapes.text.layers, t.get("heads", 8),
                      shapes.text.context_length, shapes.text.vocab_size, shapes.text.mlp_width)
    default = PreprocessConfig()
    preprocess = PreprocessConfig(tuple(pre.get("mean", default.mean)),
                                  tuple(pre.get("std", default.std)),
                                  pre.get("interpolation", "bicubic"))
    act = activation or ("quick_gelu" if cfg.get("quick_gelu") else "gelu")
    return CLIPConfig(shapes.embed_dim, vision, text, act, preprocess)


def _contiguous(sd: StateDict) -> StateDict:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save_clipforge(config: CLIPConfig, sd: StateDict, destination: str | Path) -> Path:
    """Write clipforge's format: a directory with ``config.json`` and ``model.safetensors``
    (whose metadata also carries the config, so the file alone is enough), or, when
    ``destination`` ends in ``.safetensors``, that single file."""
    destination = Path(destination)
    metadata = {"format": "pt", CONFIG_KEY: config.to_json()}
    if destination.suffix == ".safetensors":
        with atomic_file(destination) as tmp:
            save_file(_contiguous(sd), str(tmp), metadata=metadata)
        return destination
    with atomic_directory(destination, marker="config.json") as tmp:
        save_file(_contiguous(sd), str(tmp / "model.safetensors"), metadata=metadata)
        document = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": config.to_dict()}
        (tmp / "config.json").write_text(json.dumps(document, indent=2) + "\n")
    return destination


def save_into_directory(config: CLIPConfig, sd: StateDict, directory: str | Path) -> Path:
    """Write clipforge's two model files into an existing folder that holds other things too
    (a training run's directory), each atomically.  The weights go first: their metadata carries
    the config and readers trust it over ``config.json``, so the pair is never inconsistent."""
    directory = Path(directory)
    with atomic_file(directory / "model.safetensors") as tmp:
        save_file(_contiguous(sd), str(tmp), metadata={"format": "pt",
                                                       CONFIG_KEY: config.to_json()})
    with atomic_file(directory / "config.json") as tmp:
        document = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": config.to_dict()}
        tmp.write_text(json.dumps(document, indent=2) + "\n")
    return directory


def save_huggingface(config: CLIPConfig, sd: StateDict, destination: str | Path) -> Path:
    """Write a directory that ``transformers.CLIPModel.from_pretrained`` and ``CLIPProcessor``
    load: config, safetensors weights, image-processor and tokenizer files."""
    hf_sd = to_hf_state_dict(sd)
    with atomic_directory(destination, marker="config.json") as tmp:
        save_file(_contiguous(hf_sd), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
        (tmp / "preprocessor_config.json").write_text(
            json.dumps(preprocessor_to_hf(config), indent=2) + "\n")
        get_tokenizer().save_hf_vocabulary(tmp)
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        tokenizer_config = {"tokenizer_class": "CLIPTokenizer", "processor_class": "CLIPProcessor",
                            "model_max_length": config.text.context_length, **special}
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return Path(destination)


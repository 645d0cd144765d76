"""Working out the architecture of a bare state dict from its tensor shapes.

OpenAI and OpenCLIP checkpoints name no architecture, but every size is in the shapes: widths from
the weight matrices, depths from counting blocks, patch size and grid from the patch embedding and
positional table.  Only the head count is invisible (it does not change any shape): it is
``width // 64`` as in every OpenAI tower, unless the shapes are exactly those of a built-in
architecture, whose head counts are then used (LAION's ViT-H/g/bigG use 80-104-wide heads).

A bare state dict records no activation either.  It is read with OpenAI's convention (QuickGELU)
unless the caller says otherwise; see :func:`infer_config`.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import torch

from ..configs import ARCHITECTURES, CLIPConfig, TextConfig, VisionConfig
from .checkpoint import CheckpointError

log = logging.getLogger(__name__)
StateDict = dict[str, torch.Tensor]


def _count_blocks(sd: StateDict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in sd if (m := pattern.match(k))})


def _infer_vision(sd: StateDict) -> VisionConfig:
    if "visual.proj" in sd:
        conv = sd["visual.conv1.weight"]
        width, patch = conv.shape[0], conv.shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        return VisionConfig(
            image_size=grid * patch, width=width, patch_size=patch,
            layers=_count_blocks(sd, "visual.transformer.resblocks."), heads=width // 64,
            mlp_width=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        )
    if "visual.attnpool.positional_embedding" in sd:
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        layers = tuple(_count_blocks(sd, f"visual.layer{i}.") for i in range(1, 5))
        return VisionConfig(image_size=grid * 32, width=width, layers=layers,
                            heads=width * 32 // 64)
    raise KeyError("visual.proj or visual.attnpool.positional_embedding")


def _signature(config: CLIPConfig) -> tuple:
    """Everything shapes can show: the config without head counts, activation, preprocessing."""
    return (config.embed_dim, dataclasses.replace(config.vision, heads=0),
            dataclasses.replace(config.text, heads=0))


def infer_config(sd: StateDict, activation: str | None = None, source: str = "checkpoint"
                 ) -> CLIPConfig:
    """A :class:`CLIPConfig` for an OpenAI/OpenCLIP-layout state dict.

    ``activation`` None means OpenAI's QuickGELU.  When the shapes are those of a built-in
    architecture whose published weights use another activation, a warning says so, because a
    wrong activation degrades accuracy silently.
    """
    try:
        vision = _infer_vision(sd)
        text_width = sd["ln_final.weight"].shape[0]
        text = TextConfig(
            width=text_width, layers=_count_blocks(sd, "transformer.resblocks."),
            heads=text_width // 64, context_length=sd["positional_embedding"].shape[0],
            vocab_size=sd["token_embedding.weight"].shape[0],
            mlp_width=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        )
        embed_dim = sd["text_projection"].shape[1]
    except KeyError as exc:
        raise CheckpointError(
            f"{source} is not a CLIP state dict in OpenAI/OpenCLIP layout: key {exc} is missing "
            f"(first keys: {', '.join(list(sd)[:5])})"
        ) from None
    if "input_resolution" in sd:  # TorchScript archives state it outright
        vision = dataclasses.replace(vision, image_size=int(sd["input_resolution"]))
    config = CLIPConfig(embed_dim, vision, text, activation or "quick_gelu")
    for name, known in ARCHITECTURES.items():
        if _signature(known) == _signature(config):
            config = config.replace(
                vision=dataclasses.replace(vision, heads=known.vision.heads),
                text=dataclasses.replace(text, heads=known.text.heads),
            )
            if activation is None and known.activation != "quick_gelu":
                log.warning(
                    "%s records no activation and has the shapes of %s, whose published weights "
                    "use %s; reading it with QuickGELU (OpenAI's convention). If these weights "
                    "were trained with %s, pass activation=%r (--activation %s).",
                    source, name, known.activation, known.activation, known.activation,
                    known.activation,
                )
            break
    return config

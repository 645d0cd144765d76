"""A model at another input resolution: its learned position embeddings resampled to the new
patch grid, as OpenCLIP's ``resize_pos_embed`` does (bicubic, antialiased, corners not
aligned; the class or mean token's row kept as it is).

Fine-tuning at a higher resolution than pretraining (FixRes; OpenCLIP issues 416 and 985) sees
finer detail for the cost of more tokens.  The model is rebuilt from its config with the new
``image_size`` (so the patch grid, the rotary tables and the preprocessing follow) and given the
resampled weights; everything else it carries (tokenizer, origin, classifier) is kept.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from ..configs import CLIPConfig
from .clip import CLIP

# The position tables that live on the image grid: the ViT's (class token first, if any) and
# the ResNet attention pool's (the mean token first)
GRID_TABLES = ("visual.positional_embedding", "visual.attnpool.positional_embedding")


def resample_positions(table: torch.Tensor, grid: int, prefix: int) -> torch.Tensor:
    """``[prefix + g*g, width]`` -> ``[prefix + grid*grid, width]``: the first ``prefix`` rows
    kept, the rest read as a g x g image of ``width`` channels and resized bicubically."""
    rows, width = table.shape
    old = math.isqrt(rows - prefix)
    if old * old != rows - prefix:
        raise ValueError(f"a position table of {rows} rows with {prefix} extra token(s) is not a "
                         "square grid")
    if old == grid:
        return table
    image = table[prefix:].reshape(1, old, old, width).permute(0, 3, 1, 2)
    image = F.interpolate(image.float(), size=(grid, grid), mode="bicubic", antialias=True,
                          align_corners=False).to(table.dtype)
    return torch.cat([table[:prefix], image.permute(0, 2, 3, 1).reshape(grid * grid, width)])


def resized_config(config: CLIPConfig, image_size: int) -> CLIPConfig:
    """``config`` for ``image_size`` pixels (checked by the config itself: a multiple of the
    patch size, or of 32 for a ResNet)."""
    return dataclasses.replace(config, vision=dataclasses.replace(config.vision,
                                                                  image_size=image_size))


def with_image_size(model: CLIP, image_size: int) -> CLIP:
    """``model`` for ``image_size`` x ``image_size`` inputs (the same model if it already is):
    a new float32 model on the same device, in eval mode, with the resampled position tables and
    a preprocessing that resizes to the new size."""
    if image_size == model.config.image_size:
        return model
    if model.precision != "fp32":
        raise ValueError(f"a {model.precision} inference model cannot be resized; load it with "
                         "precision='fp32'")
    vision = model.config.vision
    step = vision.patch_size if vision.is_vit else 32
    if image_size % step:
        raise ValueError(f"image size {image_size} is not a multiple of this model's "
                         f"{'patch size' if vision.is_vit else 'ResNet stride'} {step}: choose "
                         f"e.g. {image_size // step * step or step} or "
                         f"{(image_size // step + 1) * step}")
    config = resized_config(model.config, image_size)
    vision, grid = config.vision, image_size // step
    state = dict(model.state_dict())
    for key in GRID_TABLES:
        if key in state:
            prefix = int(vision.class_token) if key == GRID_TABLES[0] else 1
            state[key] = resample_positions(state[key], grid, prefix)
    with torch.device("meta"):
        resized = CLIP(config)
    resized.load_state_dict(state, assign=True)
    resized = resized.to(model.device).eval()
    resized.preprocess = dataclasses.replace(model.preprocess, image_size=image_size)
    resized.tokenizer = model.tokenizer
    resized.origin = model.origin
    resized.classifier = model.classifier
    return resized

"""Layer-wise learning-rate decay (``--layer-decay D``, BEiT's and ELECTRA's recipe, used to
fine-tune CLIP by FD-CLIP and OpenCLIP's fine-tuning scripts).

Each tower is cut into depth + 2 levels: its embeddings (patch or token embedding, positions,
class token, the ResNet stem) at level 0, block ``i`` (or ResNet stage ``i``) at level ``i + 1``,
and what follows the last block (final norm, pooling head, projection, temperature, the
classifier head) at the top, level depth + 1.  A parameter at level ``l`` learns at
``lr * D ** (depth + 1 - l)``: the head at the full rate, the embeddings at the smallest, so the
general early features move least.  The image and text towers each decay over their own depth.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

_BLOCK = re.compile(r"(?:^|\.)transformer\.resblocks\.(\d+)\.")
_STAGE = re.compile(r"(?:^|\.)visual\.(?:.*\.)?layer([1-4])\.")
_VISION_STEM = re.compile(r"(?:^|\.)visual\.(?:.*\.)?(conv[123]|bn[123]|class_embedding|"
                          r"positional_embedding|ln_pre)(?:\.|$)")
_TEXT_STEM = re.compile(r"(?:^|\.)(token_embedding|positional_embedding|token_type_embedding|"
                        r"ln_embed)(?:\.|$)")


def _depths(module: nn.Module) -> tuple[int, int]:
    """(image tower depth, text tower depth) from the parameter names."""
    vision, text = 0, 0
    for name, _ in module.named_parameters():
        block = _BLOCK.search(name)
        stage = _STAGE.search(name)
        if "visual." in name:
            vision = max(vision, int(block[1]) + 1 if block else int(stage[1]) if stage else 0)
        elif block:
            text = max(text, int(block[1]) + 1)
    return vision, text


def level(name: str, vision_depth: int, text_depth: int) -> tuple[int, int]:
    """(level, depth of its tower) of a parameter (see the module docstring)."""
    visual = "visual." in name
    depth = vision_depth if visual else text_depth
    block = _BLOCK.search(name)
    if block:
        return int(block[1]) + 1, depth
    stage = _STAGE.search(name) if visual else None
    if stage:
        return int(stage[1]), depth
    stem = _VISION_STEM.search(name) if visual else _TEXT_STEM.search(name)
    if stem and not (visual and ".attnpool." in name):  # the pool's positions are the head's
        return 0, depth
    return depth + 1, depth


def layer_scales(module: nn.Module, decay: float) -> Callable[[str], float]:
    """``name -> D ** (depth + 1 - level)`` for ``module``'s parameters."""
    vision, text = _depths(module)

    def scale(name: str) -> float:
        at, depth = level(name, vision, text)
        return decay ** (depth + 1 - at)
    return scale

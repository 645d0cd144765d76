"""Training augmentation: OpenCLIP's RandomResizedCrop, ToTensor and Normalize, no torchvision.

OpenCLIP trains with torchvision's ``RandomResizedCrop(S, scale=(0.9, 1.0),
interpolation=BICUBIC)``, then ``convert("RGB")``, ``ToTensor`` and ``Normalize``.  The crop box
is drawn with torchvision's ``RandomResizedCrop.get_params`` algorithm, reproduced step for step
(ten tries of area / log-aspect-ratio sampling, then a central crop with the ratio clamped), and
applied as torchvision applies it to PIL images: ``img.crop(box)`` then ``img.resize((S, S))``.
(PIL's ``resize(..., box=...)`` is *not* the same: its filter reads pixels outside the box near
the edges, where a crop sees only the crop.)

Randomness comes only from the ``numpy.random.Generator`` the caller passes, seeded from
(seed, sample index), so a resumed run draws the same crops as an uninterrupted one.

Memory is bounded by construction, whatever the image's shape: the crop box lies inside the
image with its aspect ratio within ``ratio`` (the fallback clamps it), and it is resized straight
to S x S, so no intermediate is larger than the crop or S x (crop's long side).  A 1x400000 strip
becomes a 1x1 crop, not the 224 x 90 million image of the evaluation resize; files that shape
never get here anyway, since the readers refuse them from their header
(:func:`clipforge.image.transform.check_aspect_ratio`), as evaluation does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..configs import CLIPConfig
from .transform import _RESAMPLE, Preprocess


def random_resized_crop_params(width: int, height: int, scale: tuple[float, float],
                               ratio: tuple[float, float], rng: np.random.Generator
                               ) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: ``(top, left, height, width)``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: a central crop, the aspect ratio clamped into range.
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class TrainTransform:
    """Callable ``(PIL image, rng) -> float32 tensor [3, S, S]``: a random resized crop on top
    of the exact evaluation transform ``eval`` (its size, resampling and normalisation)."""

    eval: Preprocess
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must be (low, high) with 0 < low <= high, got {self.ratio}")

    @classmethod
    def from_config(cls, config: CLIPConfig, **kwargs) -> TrainTransform:
        return cls(Preprocess.from_config(config), **kwargs)

    def crop_box(self, img: Image.Image, rng: np.random.Generator
                 ) -> tuple[int, int, int, int]:
        """The ``(left, top, right, bottom)`` box this rng draws for this image."""
        top, left, h, w = random_resized_crop_params(img.width, img.height, self.scale,
                                                     self.ratio, rng)
        return left, top, left + w, top + h

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        size = (self.eval.image_size, self.eval.image_size)
        img = img.crop(self.crop_box(img, rng)).resize(size, _RESAMPLE[self.eval.interpolation])
        return self.eval.to_tensor(img.convert("RGB"))

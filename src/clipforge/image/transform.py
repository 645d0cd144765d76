"""Image -> pixels: OpenAI's evaluation transform, reproduced exactly with PIL and torch.

openai/CLIP composes torchvision's ``Resize(S, BICUBIC)``, ``CenterCrop(S)``, RGB conversion,
``ToTensor`` and ``Normalize``.  torchvision is not needed: the same arithmetic is done here step
for step (the long side is ``int(S * long / short)``, the crop offset uses Python's ``round``, the
RGB conversion happens after cropping, normalisation subtracts then divides in float32), which is
what makes the pixels identical rather than merely close.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..configs import CLIPConfig, PreprocessConfig

if TYPE_CHECKING:  # torch is imported where tensors are made: to_numpy does not need it
    import torch

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


class ImageLoadError(ValueError):
    """An image file could not be read or decoded."""


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image, turning every PIL/OS failure into one clear error."""
    try:
        with open(path, "rb") as f:  # closing the file, not the image, keeps the pixels
            img = Image.open(f)
            img.load()  # decode now: truncated files fail here, not later in a batch
        return img
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ImageLoadError(f"cannot read image {path}: {exc}") from exc


def resize_short_side(img: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    width, height = img.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return img.resize(new_size, resample)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    width, height = img.size
    if width < size or height < size:
        raise ValueError(f"image {img.size} is smaller than the crop {size}")
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class Preprocess:
    """Callable PIL image -> float32 tensor [3, size, size], normalised."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; choose one of "
                             f"{', '.join(_RESAMPLE)}")

    @classmethod
    def from_config(cls, config: CLIPConfig) -> Preprocess:
        pre: PreprocessConfig = config.preprocess
        return cls(config.image_size, pre.mean, pre.std, pre.interpolation)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = resize_short_side(img, self.image_size, _RESAMPLE[self.interpolation])
        img = center_crop(img, self.image_size)
        return self.to_tensor(img.convert("RGB"))

    def to_numpy(self, img: Image.Image) -> np.ndarray:
        """The pixels of :meth:`__call__` as a numpy float32 array, without torch (for
        deployments that run the ONNX encoders, see :mod:`clipforge.onnx.runtime`): the same
        float32 operations in the same order, so the values are identical."""
        img = resize_short_side(img, self.image_size, _RESAMPLE[self.interpolation])
        img = center_crop(img, self.image_size)
        pixels = np.array(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
        pixels = pixels.astype(np.float32, order="C") / np.float32(255)
        pixels -= np.array(self.mean, dtype=np.float32).reshape(3, 1, 1)
        pixels /= np.array(self.std, dtype=np.float32).reshape(3, 1, 1)
        return pixels

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        """An RGB image already at the model size -> normalised [3, S, S] float32."""
        import torch

        pixels = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
        pixels = pixels.permute(2, 0, 1).float().div(255)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return pixels.sub_(mean).div_(std)

    def load(self, path: str | Path) -> torch.Tensor:
        """Read the file and transform it; errors name the file."""
        return self(load_image(path))

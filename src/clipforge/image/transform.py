"""Image -> pixels: the evaluation transforms of OpenAI and OpenCLIP, reproduced exactly with PIL.

openai/CLIP composes torchvision's ``Resize(S, BICUBIC)``, ``CenterCrop(S)``, RGB conversion,
``ToTensor`` and ``Normalize``.  torchvision is not needed: the same arithmetic is done here step
for step (the long side is ``int(S * long / short)``, the crop offset uses Python's ``round``, the
RGB conversion happens after cropping, normalisation subtracts then divides in float32), which is
what makes the pixels identical rather than merely close.

OpenCLIP records how each set of weights wants its images (``preprocess_cfg.resize_mode``), and
the three modes are reproduced the same way (:class:`Preprocess` ``resize_mode``):

* ``shortest`` (OpenAI, most weights): short side to S, centre crop;
* ``squash`` (SigLIP, DFN-378): both sides to S, the aspect ratio not kept;
* ``longest``: long side to S (timm's ``ResizeKeepRatio``: sizes ``round(side / ratio)``), then
  the short side padded with ``fill_color`` on both sides (``CenterCropOrPad``: the extra pixel
  of an odd padding goes right or below).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from ..configs import CLIPConfig, PreprocessConfig

if TYPE_CHECKING:  # torch is imported where tensors are made: to_numpy does not need it
    import torch

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

#: The longest side an image may have relative to its shortest (100 allows 100x1 strips, 30000x300
#: panoramas and webtoon pages).  Resizing the short side to the model's size S makes the long side
#: S x ratio, so without a bound a 1x400000 PNG of a few hundred bytes would become a 224 x 90
#: million image (20 GB) before the centre crop throws almost all of it away.  The environment
#: variable :data:`MAX_ASPECT_RATIO_ENV` overrides it; so does assigning this constant.
MAX_ASPECT_RATIO = 100.0
MAX_ASPECT_RATIO_ENV = "CLIPFORGE_MAX_ASPECT_RATIO"


class ImageLoadError(ValueError):
    """An image file could not be read or decoded."""


class NotRegularFileError(OSError):
    """A path names a FIFO, device, socket or directory: reading it could block for ever (a
    named pipe with no writer) or never end (``/dev/zero``), so it is never opened as data.
    ``kind`` says what it is instead ("a named pipe (FIFO)", ...)."""

    def __init__(self, path: str | os.PathLike, kind: str):
        super().__init__(f"not a regular file: {os.fsdecode(path)} is {kind}")
        self.kind = kind


_FILE_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISDIR, "a directory"))


def _nonblocking(path: str | os.PathLike, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


def open_regular_file(path: str | os.PathLike) -> IO[bytes]:
    """``open(path, "rb")``, for regular files only; :class:`NotRegularFileError` otherwise.

    The file is opened non-blocking and then checked with ``fstat`` (not ``stat`` first, which
    a rename could outrun): opening a FIFO for reading would otherwise wait for a writer that
    never comes.  Regular files ignore the flag, so reading them is unchanged.
    """
    f = open(path, "rb", opener=_nonblocking)  # noqa: SIM115 (returned to the caller)
    mode = os.fstat(f.fileno()).st_mode
    if not stat.S_ISREG(mode):
        f.close()
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a plain file")
        raise NotRegularFileError(path, kind)
    if hasattr(os, "set_blocking"):
        os.set_blocking(f.fileno(), True)
    return f


def max_aspect_ratio() -> float:
    """The aspect-ratio bound in force: :data:`MAX_ASPECT_RATIO_ENV` if set, else
    :data:`MAX_ASPECT_RATIO`.  Read at each call, so that a setting reaches data workers."""
    value = os.environ.get(MAX_ASPECT_RATIO_ENV, "").strip()
    if not value:
        return float(MAX_ASPECT_RATIO)
    try:
        limit = float(value)
    except ValueError:
        limit = float("nan")
    if not limit >= 1:  # also refuses nan
        raise ValueError(f"{MAX_ASPECT_RATIO_ENV}={value!r} is not a number of at least 1")
    return limit


def check_aspect_ratio(size: tuple[int, int]) -> None:
    """Raise :class:`ImageLoadError` for an image of ``size`` (width, height) whose long side is
    more than :func:`max_aspect_ratio` times its short side, or that has no pixels.

    Called from the header's size, before any pixel is decoded or resampled: the work of
    :func:`resize_short_side` grows with the ratio, not with the file or pixel count.  The
    message says how to change the bound; callers add the file's name.
    """
    width, height = size
    if min(width, height) < 1:
        raise ImageLoadError(f"image is {width}x{height} pixels: it has no pixels")
    ratio = max(width, height) / min(width, height)
    limit = max_aspect_ratio()
    if ratio > limit:
        shown = f"{ratio:.1f}".removesuffix(".0")
        raise ImageLoadError(
            f"image is {width}x{height} pixels, an aspect ratio of {shown}:1, over the "
            f"limit of {limit:g}:1; set {MAX_ASPECT_RATIO_ENV} to change the limit")


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image, turning every PIL/OS failure into one clear error.
    Only regular files are opened (:func:`open_regular_file`): a FIFO would block."""
    try:
        with open_regular_file(path) as f:  # closing the file, not the image, keeps the pixels
            img = Image.open(f)
            img.load()  # decode now: truncated files fail here, not later in a batch
        return img
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ImageLoadError(f"cannot read image {path}: {exc}") from exc


def resize_short_side(img: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """torchvision's ``Resize(size)``: the short side to ``size``, the long side in proportion.
    Images beyond :func:`max_aspect_ratio` raise :class:`ImageLoadError` before resampling."""
    check_aspect_ratio(img.size)
    return img.resize(short_side_size(img.size, size), resample)


def short_side_size(image_size: tuple[int, int], size: int) -> tuple[int, int]:
    """The (width, height) :func:`resize_short_side` gives an image of ``image_size``."""
    width, height = image_size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def crop_corner(image_size: tuple[int, int], size: int) -> tuple[int, int]:
    """The (left, top) corner of :func:`center_crop`'s square in an image of ``image_size``."""
    width, height = image_size
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


def center_crop(img: Image.Image, size: int) -> Image.Image:
    width, height = img.size
    if width < size or height < size:
        raise ValueError(f"image {img.size} is smaller than the crop {size}")
    left, top = crop_corner(img.size, size)
    return img.crop((left, top, left + size, top + size))


def resize_longest_and_pad(img: Image.Image, size: int, resample: Image.Resampling,
                           fill: int) -> Image.Image:
    """OpenCLIP's ``resize_mode="longest"``: timm's ``ResizeKeepRatio(longest=1)`` then
    ``CenterCropOrPad(size, fill)``, as torchvision applies them to a PIL image."""
    check_aspect_ratio(img.size)
    width, height = img.size
    new_width, new_height = longest_side_size(img.size, size)
    if min(new_height, new_width) < 1:
        raise ImageLoadError(f"image is {width}x{height} pixels: too thin to scale to {size}")
    img = img.resize((new_width, new_height), resample)
    pad_w, pad_h = max(size - new_width, 0), max(size - new_height, 0)
    if pad_w or pad_h:
        border = (pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2)
        colour = fill if len(img.getbands()) == 1 else (fill,) * len(img.getbands())
        palette = img.getpalette() if img.mode == "P" else None
        img = ImageOps.expand(img, border=border, fill=colour)
        if palette is not None:
            img.putpalette(palette)
    return center_crop(img, size)


def longest_side_size(image_size: tuple[int, int], size: int) -> tuple[int, int]:
    """The (width, height) :func:`resize_longest_and_pad` resizes an image of ``image_size`` to
    before padding."""
    width, height = image_size
    ratio = max(height / size, width / size)
    return round(width / ratio), round(height / ratio)


def squash(img: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """OpenCLIP's ``resize_mode="squash"`` and SigLIP's: both sides to ``size``."""
    check_aspect_ratio(img.size)
    return img.resize((size, size), resample)


RESIZE_MODES = ("shortest", "longest", "squash")


@dataclass(frozen=True)
class Preprocess:
    """Callable PIL image -> float32 tensor [3, size, size], normalised.  ``resize_mode`` and
    ``fill_color``: see the module docstring."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; choose one of "
                             f"{', '.join(_RESAMPLE)}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {self.resize_mode!r}; choose one of "
                             f"{', '.join(RESIZE_MODES)}")

    @classmethod
    def from_config(cls, config: CLIPConfig) -> Preprocess:
        pre: PreprocessConfig = config.preprocess
        return cls(config.image_size, pre.mean, pre.std, pre.interpolation, pre.resize_mode,
                   pre.fill_color)

    def resized(self, img: Image.Image) -> Image.Image:
        """``img`` at the model's size, in its own mode (converted to RGB afterwards, as
        torchvision's pipelines do)."""
        resample, size = _RESAMPLE[self.interpolation], self.image_size
        if self.resize_mode == "squash":
            return squash(img, size, resample)
        if self.resize_mode == "longest":
            return resize_longest_and_pad(img, size, resample, self.fill_color)
        return center_crop(resize_short_side(img, size, resample), size)

    def window(self, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The part of an image of ``image_size`` (width, height) that :meth:`resized` shows
        the model, as (x0, y0, x1, y1) in the image's pixel coordinates (pixel edges: the
        model's input square maps onto it linearly, as PIL resizes).  "shortest" shows the
        centre crop, "squash" the whole image, "longest" the image and the padding around it
        (the window reaches past the image).  Why: to put what the model saw at a position of
        its input (a similarity map, a box) back onto the image."""
        width, height = image_size
        size = self.image_size
        if self.resize_mode == "squash":
            return 0.0, 0.0, float(width), float(height)
        if self.resize_mode == "longest":
            new_width, new_height = longest_side_size(image_size, size)
            left, top = max(size - new_width, 0) // 2, max(size - new_height, 0) // 2
        else:
            new_width, new_height = short_side_size(image_size, size)
            left, top = (-offset for offset in crop_corner((new_width, new_height), size))
        sx, sy = width / new_width, height / new_height
        return -left * sx, -top * sy, (size - left) * sx, (size - top) * sy

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.to_tensor(self.resized(img).convert("RGB"))

    def to_numpy(self, img: Image.Image) -> np.ndarray:
        """The pixels of :meth:`__call__` as a numpy float32 array, without torch (for
        deployments that run the ONNX encoders, see :mod:`clipforge.onnx.runtime`): the same
        float32 operations in the same order, so the values are identical."""
        img = self.resized(img)
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
        img = load_image(path)
        try:
            return self(img)
        except ImageLoadError as exc:
            raise ImageLoadError(f"cannot read image {path}: {exc}") from None

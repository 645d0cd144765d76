"""Where in an image a text is: similarity maps from per-patch embeddings, without training.

:func:`locate` embeds the text, computes the image's per-patch embeddings by the training-free
recipe of its tower (MaskCLIP's value path for ViTs, the attention pool's per-position output
for ResNets: :mod:`clipforge.model.dense`), takes their cosine with the text, and puts the map
back onto the image's own pixels: the model saw a square (a centre crop, the squashed image or
the padded one, see :meth:`~clipforge.image.Preprocess.window`), so each image pixel reads the
map bilinearly at the point of the square it fell on; pixels the model never saw (outside a
centre crop) have no value.  The box bounds the region around the peak
where the map, scaled to [0, 1] over the seen pixels, stays at or above a threshold (0.5: half
way between the map's lowest and highest value), the connected component that holds the peak.
The peak is the pixel at the centre of the map's best position: with bilinear upsampling that is
where the map is highest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .image import ImageLoadError, Preprocess, load_image
from .image.transform import check_aspect_ratio
from .inference import embed_texts
from .model import CLIP
from .model.dense import cell_size, encode_dense
from .model.resize import with_image_size

THRESHOLD = 0.5  # of the map's range over the seen pixels: where the box's region ends
OVERLAY_ALPHA = 0.5  # the heat map's share in the overlay
OVERLAY_COLOURMAP = "turbo"


@dataclass
class Location:
    """Where ``text`` is in an image of ``size`` (width, height), in the image's own pixels.

    ``peak``: (x, y) of the pixel where the map is highest; ``box``: (x0, y0, x1, y1) pixel
    edges (x1, y1 exclusive, as PIL's crop boxes) of the thresholded region around the peak;
    ``score``: the highest cosine of the map; ``heatmap``: [height, width] float32 cosines (NaN
    where the model saw nothing); ``grid``: the map as the model computed it, [grid, grid]."""

    text: str
    size: tuple[int, int]
    peak: tuple[int, int]
    box: tuple[int, int, int, int]
    score: float
    heatmap: np.ndarray
    grid: np.ndarray

    def to_dict(self) -> dict:
        """What ``clipforge locate --json`` prints (no arrays)."""
        return {"text": self.text, "size": list(self.size), "peak": list(self.peak),
                "box": list(self.box), "score": round(self.score, 6),
                "grid": list(self.grid.shape)}


def read_image(path: str | Path) -> Image.Image:
    """The image file, decoded and checked as the preprocessing will need it, so that every
    error (:class:`~clipforge.ImageLoadError`) names the file."""
    picture = load_image(path)
    try:
        check_aspect_ratio(picture.size)
    except ImageLoadError as exc:
        raise ImageLoadError(f"cannot read image {path}: {exc}") from None
    return picture


def _as_image(image: Image.Image | str | Path) -> Image.Image:
    return read_image(image) if isinstance(image, str | Path) else image


def _check_model(model: object) -> CLIP:
    if not isinstance(model, CLIP):
        raise ValueError("locating needs the PyTorch model: its per-patch features are not "
                         "part of an ONNX export; load it with backend='torch' (--backend "
                         "torch)")
    return model


@torch.inference_mode()
def similarity_maps(model: CLIP, images: Sequence[Image.Image], texts: Sequence[str]
                    ) -> np.ndarray:
    """[N images, T texts, grid, grid] cosines of each image's per-patch embeddings with each
    text's embedding (the model's own tokenizer and preprocessing)."""
    model = _check_model(model)
    embedded = embed_texts(model, list(texts), progress=False)
    if embedded.failures:
        raise ValueError(f"cannot embed text: {embedded.failures[0][1]}")
    pixels = torch.stack([model.preprocess(image) for image in images])
    dense = encode_dense(model, pixels).float().cpu()  # [N, g, g, D]
    return torch.einsum("nhwd,td->nthw", dense, torch.from_numpy(embedded.vectors)).numpy()


def _axis_weights(pixels: int, start: float, end: float, input_size: int, cell: int,
                  grid: int) -> np.ndarray:
    """[pixels, grid] bilinear weights of the grid's cells for each pixel of one image axis
    (rows summing to 1; NaN rows for the pixels the model did not see): the pixel's centre
    falls at ``(x + 0.5 - start) * input_size / (end - start)`` in the model's input, between
    cell centres ``(k + 0.5) * cell``, clamped at the outer cells."""
    u = (np.arange(pixels) + 0.5 - start) * (input_size / (end - start))
    seen = (u >= 0) & (u < grid * cell)
    position = np.clip(u / cell - 0.5, 0, grid - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, grid - 1)
    frac = position - low
    weights = np.zeros((pixels, grid), np.float32)
    rows = np.arange(pixels)
    np.add.at(weights, (rows, low), 1 - frac)
    np.add.at(weights, (rows, high), frac)
    weights[~seen] = np.nan
    return weights


def upsample(grid_map: np.ndarray, size: tuple[int, int], window: tuple[float, float, float,
             float], input_size: int, cell: int) -> np.ndarray:
    """A [grid, grid] map over the model's input square -> [height, width] over an image of
    ``size`` whose part ``window`` (:meth:`Preprocess.window`) the square showed; each map
    position covers ``cell`` input pixels a side.  NaN where the model saw nothing."""
    grid = grid_map.shape[0]
    width, height = size
    x0, y0, x1, y1 = window
    rows = _axis_weights(height, y0, y1, input_size, cell, grid)
    cols = _axis_weights(width, x0, x1, input_size, cell, grid)
    return rows @ grid_map.astype(np.float32) @ cols.T


def peak_pixel(grid_map: np.ndarray, size: tuple[int, int],
               window: tuple[float, float, float, float], input_size: int, cell: int
               ) -> tuple[int, int]:
    """The image pixel (x, y) at the centre of the map's best position whose centre lies in
    the image (the first of equals; positions over "longest"'s padding do not count): where
    the upsampled map is highest, as a bilinear map peaks at a grid point (past the outer
    centres it stays flat, so its arg-max alone would drift to a corner)."""
    x0, y0, x1, y1 = window
    centres = (np.arange(grid_map.shape[0]) + 0.5) * cell / input_size
    xs, ys = x0 + centres * (x1 - x0), y0 + centres * (y1 - y0)
    width, height = size
    inside = ((ys >= 0) & (ys < height))[:, None] & ((xs >= 0) & (xs < width))[None, :]
    scores = np.where(inside, grid_map, -np.inf) if inside.any() else grid_map
    row, col = np.unravel_index(np.argmax(scores), grid_map.shape)
    return min(max(int(xs[col]), 0), width - 1), min(max(int(ys[row]), 0), height - 1)


def region(heatmap: np.ndarray, peak: tuple[int, int], threshold: float = THRESHOLD
           ) -> tuple[int, int, int, int]:
    """The box (x0, y0, x1, y1; edges) of the connected region of ``heatmap`` (NaN: unseen)
    around ``peak`` (x, y) where the map is at or above ``threshold`` of its range."""
    from scipy import ndimage  # here: its import costs more than parsing a command line

    if not np.isfinite(heatmap).any():
        raise ValueError("the map has no seen pixel: nothing to locate")
    low, high = np.nanmin(heatmap), np.nanmax(heatmap)
    scaled = (heatmap - low) / (high - low) if high > low else np.ones_like(heatmap)
    labels, _ = ndimage.label(np.nan_to_num(scaled, nan=-1.0) >= threshold)
    x, y = peak
    if not labels[y, x]:  # a peak below the threshold: the region of the hottest pixel
        y, x = np.unravel_index(np.nanargmax(heatmap), heatmap.shape)
    ys, xs = np.nonzero(labels == labels[y, x])
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def place(grid_map: np.ndarray, text: str, size: tuple[int, int], preprocess: Preprocess,
          cell: int, threshold: float = THRESHOLD) -> Location:
    """A [grid, grid] similarity map over the model's input -> its :class:`Location` on an
    image of ``size`` (width, height) that ``preprocess`` turned into that input."""
    window = preprocess.window(size)
    heatmap = upsample(grid_map, size, window, preprocess.image_size, cell)
    peak = peak_pixel(grid_map, size, window, preprocess.image_size, cell)
    box = region(heatmap, peak, threshold)
    return Location(text, tuple(size), peak, box, float(grid_map.max()), heatmap, grid_map)


def at_image_size(model: CLIP, image_size: int | None) -> CLIP:
    """``model`` with its image tower run at ``image_size`` pixels (None: as it is), its
    position embeddings resampled (:func:`~clipforge.model.resize.with_image_size`, as
    OpenCLIP's ``resize_pos_embed``): more input pixels, more map cells, a finer map.  MaskCLIP
    feeds CLIP 512 px for the same reason.  ValueError for a size that is not a multiple of
    the patch size (32 for a ResNet)."""
    model = _check_model(model)
    if image_size is None:
        return model
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image size must be a positive number of pixels, not {image_size!r}")
    return with_image_size(model, image_size)


def locate_many(model: CLIP, image: Image.Image | str | Path, texts: Sequence[str],
                threshold: float = THRESHOLD, image_size: int | None = None
                ) -> list[Location]:
    """:func:`locate` for several texts in one image (its features computed once)."""
    image = _as_image(image)
    model = at_image_size(model, image_size)
    maps = similarity_maps(model, [image], texts)[0]
    cell = cell_size(model.visual)
    return [place(m, text, image.size, model.preprocess, cell, threshold)
            for m, text in zip(maps, texts)]


def locate(model: CLIP, image: Image.Image | str | Path, text: str,
           threshold: float = THRESHOLD, image_size: int | None = None) -> Location:
    """Where ``text`` is in ``image`` (a PIL image or a file): the similarity map of the
    model's per-patch embeddings with the text, on the image's own pixels, its peak and a box
    (see the module docstring).  ``image_size``: run the image tower at this many pixels
    instead of its own (:func:`at_image_size`) for a finer map; peak and box stay in the
    image's pixels."""
    return locate_many(model, image, [text], threshold, image_size)[0]


def overlay(image: Image.Image, location: Location, alpha: float = OVERLAY_ALPHA,
            max_side: int | None = None) -> Image.Image:
    """``image`` (RGB) with the map over it (colour map scaled to the map's range over the
    seen pixels; unseen pixels left as they are), the box outlined and the peak marked.

    ``max_side``: draw it at most this many pixels on the long side (the image and the map
    sampled at the smaller picture's pixel centres): the full-size drawing takes about 120
    bytes a pixel, too much for a server answering with a preview."""
    heat, box, peak = location.heatmap, location.box, location.peak
    if max_side is not None and max(image.size) > max_side:
        image, heat, box, peak = _shrunk(image, location, max_side)
    return _draw(image, heat, box, peak, alpha)


def _shrunk(image: Image.Image, location: Location, max_side: int
            ) -> tuple[Image.Image, np.ndarray, tuple[int, int, int, int], tuple[int, int]]:
    """The image, its map, box and peak scaled to at most ``max_side`` pixels a side."""
    if max_side < 1:
        raise ValueError(f"max_side must be a positive number of pixels, not {max_side}")
    width, height = image.size
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    xs = ((np.arange(size[0]) + 0.5) * width / size[0]).astype(int)
    ys = ((np.arange(size[1]) + 0.5) * height / size[1]).astype(int)
    heat = location.heatmap[ys][:, xs]
    sx, sy = size[0] / width, size[1] / height
    x0, y0, x1, y1 = location.box
    box = (int(x0 * sx), int(y0 * sy), max(int(np.ceil(x1 * sx)), int(x0 * sx) + 1),
           max(int(np.ceil(y1 * sy)), int(y0 * sy) + 1))
    peak = (min(int((location.peak[0] + 0.5) * sx), size[0] - 1),
            min(int((location.peak[1] + 0.5) * sy), size[1] - 1))
    small = image.convert("RGB").resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    return small, heat, box, peak


def _draw(image: Image.Image, heat: np.ndarray, box: tuple[int, int, int, int],
          peak: tuple[int, int], alpha: float) -> Image.Image:
    from matplotlib import colormaps

    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    seen = np.isfinite(heat)
    low, high = np.nanmin(heat), np.nanmax(heat)
    scaled = np.where(seen, (heat - low) / max(high - low, 1e-12), 0.0)
    colours = colormaps[OVERLAY_COLOURMAP](scaled)[..., :3] * 255
    mixed = np.where(seen[..., None], (1 - alpha) * base + alpha * colours, base)
    out = Image.fromarray(np.clip(mixed + 0.5, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    line = max(1, round(min(out.size) / 150))
    x0, y0, x1, y1 = box
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 255, 255), width=line)
    x, y = peak
    arm = max(3, 4 * line)
    for dx, dy in ((arm, 0), (0, arm)):
        draw.line((x - dx, y - dy, x + dx, y + dy), fill=(255, 255, 255), width=line)
    return out


__all__ = ["THRESHOLD", "Location", "at_image_size", "locate", "locate_many", "overlay",
           "peak_pixel", "place", "read_image", "region", "similarity_maps", "upsample"]

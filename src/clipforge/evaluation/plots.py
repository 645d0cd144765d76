"""Looking, not only reading: the two pictures of openai/CLIP's "Interacting with CLIP" notebook.

* :func:`plot_similarity` -- the text x image cosine-similarity matrix, thumbnails along the top,
  captions down the left and the value in every cell.  One glance shows whether the diagonal
  (each photo with its own description) stands out, which a single accuracy figure hides.
* :func:`plot_topk` -- per image, the top-k zero-shot classes as horizontal bars beside the image.

Figures are built on :class:`matplotlib.figure.Figure` directly, never through ``pyplot``: no
global state, no backend switch in the caller's process, nothing ever shown, so this is safe in
servers, tests and notebooks alike.  Files are written atomically (:func:`~clipforge.fileio.
atomic_file`) as PNG or SVG according to the destination's suffix; SVG keeps its text as text, so
captions and values can be searched and read by screen readers.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..encoder import Encoder
from ..fileio import atomic_file
from ..image import load_image
from ..inference import embed_images, embed_pictures, embed_texts

ImageLike = str | Path | Image.Image
FORMATS = {".png": "png", ".svg": "svg"}
TITLE = "Cosine similarity between text and image features"


@dataclass
class Similarity:
    """Cosine similarities ``matrix[t, i]`` of ``texts[t]`` and ``images[i]``, for the items that
    could be embedded; the others are listed with the reason, and are not plotted."""

    matrix: np.ndarray
    images: list[ImageLike]
    texts: list[str]
    skipped_images: list[tuple[str, str]] = field(default_factory=list)
    skipped_texts: list[tuple[str, str]] = field(default_factory=list)


def _format_of(destination: str | Path) -> str:
    suffix = Path(destination).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"cannot write a plot to {str(destination)!r}: the file name must end "
                         f"in {' or '.join(FORMATS)} (got {suffix or 'no suffix'!r})")
    return FORMATS[suffix]


def _label(image: ImageLike) -> str:
    return Path(image).name if isinstance(image, str | Path) else ""


def similarity_matrix(model: Encoder, images: Sequence[ImageLike], texts: Sequence[str], *,
                      truncate: bool = False, batch_size: int = 32, num_workers: int = 0,
                      progress: bool = False) -> Similarity:
    """Cosine similarities [texts, images] of normalised CLIP embeddings, as the notebook's
    ``text_features @ image_features.T``.

    Files go through :func:`~clipforge.inference.embed_images` (PIL images through
    :func:`~clipforge.inference.embed_pictures`), so an unreadable one is skipped and reported
    instead of stopping the plot; texts go through
    :func:`~clipforge.inference.embed_texts`, so an over-long one is skipped and reported, or cut
    to the context length when ``truncate`` is set.  Order is kept among the survivors.
    """
    images, texts = list(images), list(texts)
    files = [im for im in images if not isinstance(im, Image.Image)]
    pictures = [im for im in images if isinstance(im, Image.Image)]
    embedded = embed_images(model, files, batch_size=batch_size, num_workers=num_workers,
                            progress=progress)
    in_memory = embed_pictures(model, pictures, batch_size=batch_size)
    file_vectors = dict(zip(embedded.ids, embedded.vectors, strict=True))
    picture_vectors = dict(zip(in_memory.ids, in_memory.vectors, strict=True))
    kept, vectors, n_pictures = [], [], 0
    for im in images:
        if isinstance(im, Image.Image):  # embed_pictures names them by position: "0", "1"...
            vector = picture_vectors.get(str(n_pictures))
            n_pictures += 1
        else:
            vector = file_vectors.get(str(Path(im)))
        if vector is not None:
            kept.append(im)
            vectors.append(vector)
    skipped_pictures = [(f"image {i}", reason) for i, reason in in_memory.failures]
    text_result = embed_texts(model, texts, truncate=truncate, progress=progress)
    kept_texts = [texts[int(i)] for i in text_result.ids]
    skipped_texts = [(texts[int(i)], reason) for i, reason in text_result.failures]
    image_matrix = np.stack(vectors) if vectors else np.zeros((0, model.config.embed_dim))
    matrix = (text_result.vectors @ image_matrix.T).astype(np.float32)
    return Similarity(matrix, kept, kept_texts, list(embedded.failures) + skipped_pictures,
                      skipped_texts)


def _square_thumbnail(image: ImageLike, size: int = 160) -> np.ndarray:
    """The centre square, as CLIP's preprocessing crops it, at thumbnail size."""
    img = image if isinstance(image, Image.Image) else load_image(image)
    img = img.convert("RGB")
    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC))


def _text_colour(rgba: Sequence[float]) -> str:
    """Black on light cells, white on dark ones (relative luminance)."""
    r, g, b = rgba[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


def _save(fig, destination: str | Path, fmt: str, dpi: int) -> None:
    import matplotlib

    # SVG: text stays text; each thumbnail stays its own full-resolution image; stable ids.
    style = {"svg.fonttype": "none", "image.composite_image": False, "svg.hashsalt": "clipforge"}
    with matplotlib.rc_context(style):
        with atomic_file(destination) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight", pad_inches=0.15,
                        metadata={"Date": None} if fmt == "svg" else None)


def plot_similarity(images: Sequence[ImageLike], texts: Sequence[str],
                    similarity: np.ndarray | torch.Tensor | Encoder, destination: str | Path, *,
                    truncate: bool = False, batch_size: int = 32, num_workers: int = 0,
                    progress: bool = False, title: str | None = TITLE,
                    vmin: float | None = None, vmax: float | None = None,
                    cmap: str = "viridis", colorbar: bool = True, dpi: int = 100) -> Similarity:
    """Draw the [texts, images] cosine-similarity matrix to ``destination`` (.png or .svg).

    ``similarity`` is either the matrix itself (``len(texts)`` rows, ``len(images)`` columns) or
    a model (any :class:`~clipforge.encoder.Encoder`), in which case it is computed with
    :func:`similarity_matrix`: unreadable files and over-long texts are then left out of the
    picture and listed in the result.  ``vmin`` and ``vmax`` fix the colour scale (the notebook
    used 0.1 to 0.3 for trained OpenAI models); by default it spans the values drawn.  Returns
    what was drawn.
    """
    fmt = _format_of(destination)
    if isinstance(similarity, Encoder):
        result = similarity_matrix(similarity, images, texts, truncate=truncate,
                                   batch_size=batch_size, num_workers=num_workers,
                                   progress=progress)
    else:
        matrix = similarity.detach().cpu().numpy() if isinstance(similarity, torch.Tensor) \
            else np.asarray(similarity)
        if matrix.shape != (len(texts), len(images)):
            raise ValueError(f"similarity has shape {matrix.shape}; expected (texts, images) = "
                             f"({len(texts)}, {len(images)})")
        result = Similarity(matrix.astype(np.float32), list(images), list(texts))
    if not result.images or not result.texts:
        reasons = [r for _, r in result.skipped_images + result.skipped_texts]
        raise ValueError("nothing to plot: no readable image or no usable text"
                         + (": " + "; ".join(reasons) if reasons else ""))
    _draw_similarity(result, destination, fmt, title=title, vmin=vmin, vmax=vmax, cmap=cmap,
                     colorbar=colorbar, dpi=dpi)
    return result


def _draw_similarity(result: Similarity, destination: str | Path, fmt: str, *,
                     title: str | None, vmin: float | None, vmax: float | None, cmap: str,
                     colorbar: bool, dpi: int) -> None:
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    matrix = result.matrix
    n_texts, n_images = matrix.shape
    thumbnails = [_square_thumbnail(im) for im in result.images]
    captions = [textwrap.fill(t, 50) for t in result.texts]
    caption_inches = 0.09 * max(len(line) for c in captions for line in c.splitlines())
    cell = 1.0  # inches per cell: room for a readable thumbnail and a two-decimal value
    fig = Figure(figsize=(caption_inches + cell * n_images + 1.2, cell * (n_texts + 1.2) + 0.6))
    ax = fig.add_axes((caption_inches / fig.get_figwidth(), 0.02,
                       cell * n_images / fig.get_figwidth(), 0.9))
    norm = Normalize(vmin=matrix.min() if vmin is None else vmin,
                     vmax=matrix.max() if vmax is None else vmax)
    if norm.vmin == norm.vmax:  # a constant matrix still gets a colour
        norm = Normalize(norm.vmin - 1e-3, norm.vmax + 1e-3)
    colours = colormaps[cmap]
    mesh = ax.imshow(matrix, cmap=colours, norm=norm, interpolation="nearest")
    for i, thumb in enumerate(thumbnails):  # one per column, just above the matrix
        ax.imshow(thumb, extent=(i - 0.45, i + 0.45, -0.6, -1.5), interpolation="bilinear")
    for t in range(n_texts):
        for i in range(n_images):
            value = float(matrix[t, i])
            ax.text(i, t, f"{value:.2f}", ha="center", va="center", fontsize=11,
                    color=_text_colour(colours(norm(value))))
    ax.set_yticks(range(n_texts), captions, fontsize=12)
    labels = [_label(im) for im in result.images]
    if any(labels):  # file names under the columns identify look-alike thumbnails
        ax.set_xticks(range(n_images), labels, fontsize=8, rotation=30, ha="right")
    else:
        ax.set_xticks([])
    ax.tick_params(length=0)
    for side in ("left", "top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_xlim(-0.5, n_images - 0.5)
    ax.set_ylim(n_texts - 0.5, -1.6)
    if title:
        ax.set_title(title, fontsize=14)
    if colorbar:
        ax.apply_aspect()  # the matrix's final place, to give the bar exactly its height
        to_figure = ax.transData + fig.transFigure.inverted()
        (x1, y0), (_, y1) = to_figure.transform([(n_images - 0.5, n_texts - 0.5),
                                                 (n_images - 0.5, -0.5)])
        bar = fig.colorbar(mesh, cax=fig.add_axes((x1 + 0.1 / fig.get_figwidth(), y0,
                                                   0.15 / fig.get_figwidth(), y1 - y0)))
        bar.ax.tick_params(labelsize=9)
        bar.set_label("cosine similarity", fontsize=10)
    _save(fig, destination, fmt, dpi)


def plot_topk(images: ImageLike | Sequence[ImageLike], class_names: Sequence[str],
              probabilities: np.ndarray | torch.Tensor, destination: str | Path, *, k: int = 5,
              per_row: int = 2, dpi: int = 100) -> list[list[tuple[str, float]]]:
    """Per image, its ``k`` most probable classes as horizontal bars beside the image.

    ``probabilities`` is [images, classes] (one row may be given as a vector), for example
    ``ZeroShotClassifier.predict_proba(...)``; rows must be probabilities, not logits.  Images are
    drawn ``per_row`` image-and-bars pairs to a row, as in the notebook.  Returns, per image, the
    (class name, probability) pairs drawn, most probable first.
    """
    fmt = _format_of(destination)
    if isinstance(images, str | Path | Image.Image):
        images = [images]
    images = list(images)
    probs = probabilities.detach().float().cpu().numpy() if isinstance(
        probabilities, torch.Tensor) else np.asarray(probabilities, dtype=np.float32)
    if probs.ndim == 1:
        probs = probs[None]
    if probs.shape != (len(images), len(class_names)):
        raise ValueError(f"probabilities have shape {probs.shape}; expected (images, classes) = "
                         f"({len(images)}, {len(class_names)})")
    if not images:
        raise ValueError("nothing to plot: no images")
    if k < 1 or per_row < 1:
        raise ValueError(f"k and per_row must be at least 1 (got k={k}, per_row={per_row})")
    if probs.min() < -1e-6 or probs.max() > 1 + 1e-6:
        raise ValueError("probabilities must lie in [0, 1]: pass softmax(logits), not logits")
    k = min(k, len(class_names))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top = [[(class_names[c], float(probs[n, c])) for c in order[n]] for n in range(len(images))]
    _draw_topk(images, top, destination, fmt, per_row=min(per_row, len(images)), dpi=dpi)
    return top


def _draw_topk(images: list[ImageLike], top: list[list[tuple[str, float]]],
               destination: str | Path, fmt: str, *, per_row: int, dpi: int) -> None:
    from matplotlib.figure import Figure

    rows = math.ceil(len(images) / per_row)
    k = len(top[0])
    name_inches = 0.09 * max(len(name) for pairs in top for name, _ in pairs)
    row_inches = max(2.6, 0.4 * k + 0.8)
    bar_inches = 3.2 + name_inches  # the bars and their class-name labels
    fig = Figure(figsize=(per_row * (row_inches + bar_inches + 0.3), rows * row_inches),
                 layout="constrained")
    # image, bars, then a narrow gap so one pair's bars do not run into the next pair's image
    ratios = ([row_inches, bar_inches, 0.3] * per_row)[:-1]
    grid = fig.add_gridspec(rows, 3 * per_row - 1, width_ratios=ratios)
    for n, (image, pairs) in enumerate(zip(images, top, strict=True)):
        r, c = divmod(n, per_row)
        pic = fig.add_subplot(grid[r, 3 * c])
        pic.imshow(np.asarray((image if isinstance(image, Image.Image)
                               else load_image(image)).convert("RGB")))
        pic.set_axis_off()
        if _label(image):
            pic.set_title(_label(image), fontsize=9)
        bars = fig.add_subplot(grid[r, 3 * c + 1])
        y = np.arange(k)
        values = [p for _, p in pairs]
        bars.grid(axis="x", alpha=0.4)
        bars.set_axisbelow(True)
        bars.barh(y, values, color="tab:blue")
        for yi, p in zip(y, values, strict=True):
            bars.text(min(p, 1.0) + 0.02, yi, f"{p:.1%}", va="center", fontsize=9)
        bars.set_yticks(y, [name for name, _ in pairs], fontsize=10)
        bars.invert_yaxis()
        bars.set_xlim(0, 1.18)
        bars.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
        bars.set_xlabel("probability", fontsize=9)
        for side in ("top", "right"):
            bars.spines[side].set_visible(False)
    _save(fig, destination, fmt, dpi)

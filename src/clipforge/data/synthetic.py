"""A procedurally generated image-caption dataset, so that ``clipforge train`` needs no downloads.

Every scene shows one kind of object (one to three identical copies) or two different kinds,
drawn as large, saturated, aliased shapes on a muted grey-toned background, with a caption that
always names colour and shape (and the count) and sometimes size, position and background, in
varied phrasing. A fixed set of colour-shape pairs (``HELDOUT_PAIRS``) never appears in the
training split, so zero-shot accuracy on them measures compositional generalisation: each of
their colours and shapes is still seen in training, only never together.

Sample ``i`` depends on ``(seed, i, split)`` alone, so it is identical in any process and any
order: training can resume exactly and workers can split indices without sharing state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
import torch.utils.data
from PIL import Image, ImageDraw

# Saturated and far apart in RGB; white and black stay visible because backgrounds are mid-grey.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 75, 235),
    "yellow": (245, 215, 0),
    "purple": (150, 45, 200),
    "orange": (255, 130, 0),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
# Silhouettes that stay distinct at 13 px (no diamond: it is a rotated square; no hexagon: a
# small hexagon is a circle).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross")
# Object diameter as a fraction of the image side; a 3x3 grid cell is 1/3, so two medium
# objects in neighbouring cells do not overlap.
SIZES: dict[str, float] = {"small": 0.20, "medium": 0.26, "large": 0.36}
# Grid cell (column, row) of each position name.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered", "gradient", "noisy")
COUNTS: tuple[int, ...] = (1, 2, 3)

# One held-out shape per colour, shifted by two along SHAPES (a Latin-square-like diagonal):
# every colour keeps five training shapes, every shape keeps at least six training colours,
# and every shape is held out with at least one colour.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (colour, SHAPES[(i + 2) % len(SHAPES)]) for i, colour in enumerate(COLOURS)
)
SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_PAIRS
)

# Zero-shot classes: every colour-shape pair, seen or held out.
CLASSNAMES: tuple[str, ...] = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
# Prompt templates for zero-shot classification, filled with plain ``str.format``. They say
# "one {}", never "a {}", so that no class gets "a orange star": training captions use "one" as
# well as "a"/"an" for a single object, so these prompts are in the caption distribution.
TEMPLATES: tuple[str, ...] = (
    "one {}.",
    "a picture of one {}.",
    "a photo of one {}.",
    "a drawing of one {}.",
    "there is one {}.",
    "an image of one {}.",
)

SPLITS: tuple[str, ...] = ("train", "seen_eval", "heldout")
# Distinct RNG streams: the evaluation sets never reuse a training (seed, index) stream.
_STREAMS = {"train": 0, "seen_eval": 1, "heldout": 2, "retrieval": 3,
            "zero_shot_seen_eval": 4, "zero_shot_heldout": 5}

_SIZE_WORDS = {"small": ("small", "little"), "medium": ("medium-sized", "medium"),
               "large": ("large", "big")}
_POSITION_PHRASES = {
    "top left": ("in the top left corner", "at the top left", "in the upper left"),
    "top": ("at the top", "near the top", "at the top center"),
    "top right": ("in the top right corner", "at the top right", "in the upper right"),
    "left": ("on the left", "on the left side", "at the left"),
    "center": ("in the center", "in the middle", "at the center"),
    "right": ("on the right", "on the right side", "at the right"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom center"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right"),
}
_BACKGROUND_PHRASES = {
    "plain": ("on a plain background", "on a plain grey background"),
    "striped": ("on a striped background", "on stripes"),
    "dotted": ("on a dotted background", "on a polka-dot background"),
    "checkered": ("on a checkered background", "on a checkerboard"),
    "gradient": ("on a gradient background", "on a smooth gradient"),
    "noisy": ("on a noisy background", "on a grainy background"),
}
_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
_ONE_P = 0.2  # how often a single object is "one red circle" rather than "a red circle"
_PLURALS = {"cross": "crosses"}
# "{}" twice: the bare noun phrase is the most common caption form.
_FRAMES = ("{}", "{}", "a picture of {}", "an image of {}", "a drawing of {}", "a photo of {}",
           "a rendering of {}", "there {be} {}", "{} drawn on a canvas")
_TWO_KINDS_P = 0.25
_TILTED = ("triangle", "star", "heart")


@dataclass
class Scene:
    """One rendered sample: the image, its caption and the ground truth that produced both.

    Each ``objects`` entry has ``colour``, ``shape``, ``size``, ``count``, ``position`` (the
    grid cell name, or None when ``count`` > 1 and the copies are scattered) and ``cells`` (the
    cell of every copy). The first entry is the main object (held out in split "heldout").
    """

    image: Image.Image
    caption: str
    objects: list[dict]
    background: str


def class_index(colour: str, shape: str) -> int:
    """Index of the colour-shape pair in CLASSNAMES."""
    return list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)


def render_scene(index: int, seed: int = 0, image_size: int = 64, split: str = "train") -> Scene:
    """Render sample ``index`` of ``split``; the same arguments always give the same pixels.

    "train" never draws a HELDOUT_PAIRS pair; "heldout" draws one as the main object (a second
    kind, if any, is a seen pair); "seen_eval" draws seen pairs from its own RNG stream, so its
    images are new images of training compositions.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    pairs = HELDOUT_PAIRS if split == "heldout" else SEEN_PAIRS
    return _scene(split, index, seed, image_size, pairs)


class SyntheticCaptions(torch.utils.data.Dataset):
    """Map-style dataset of ``(image, caption)``; item ``i`` is ``render_scene(i, ...)``.

    ``length`` defaults to the largest int32, so it is effectively infinite: a training loop
    takes as many steps as it wants and resumes by index, with no epoch boundary to track.
    """

    # Items are independent random draws already: a training loop reads index i directly
    # instead of walking a shuffled permutation of (2**31 entries of) indices.
    draws_by_index = True

    def __init__(self, seed: int = 0, image_size: int = 64, split: str = "train",
                 length: int = 2**31 - 1) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.seed, self.image_size, self.split, self.length = seed, image_size, split, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        scene = render_scene(index, self.seed, self.image_size, self.split)
        return scene.image, scene.caption


def zero_shot_set(split: str, n: int, seed: int = 0,
                  image_size: int = 64) -> tuple[list[Image.Image], list[int]]:
    """``n`` single-kind scenes (one to three copies) labelled by their CLASSNAMES index.

    Labels cycle through the split's pairs (the 40 seen ones for "seen_eval", the 8 held-out
    ones for "heldout"), so any ``n`` that is a multiple of that count is exactly balanced.
    """
    if split not in ("seen_eval", "heldout"):
        raise ValueError(f"split must be 'seen_eval' or 'heldout', got {split!r}")
    pairs = HELDOUT_PAIRS if split == "heldout" else SEEN_PAIRS
    images, labels = [], []
    for i in range(n):
        pair = pairs[i % len(pairs)]
        scene = _scene(f"zero_shot_{split}", i, seed, image_size, pairs, main_pair=pair,
                       single_kind=True)
        images.append(scene.image)
        labels.append(class_index(*pair))
    return images, labels


def retrieval_set(n: int, seed: int = 0,
                  image_size: int = 64) -> tuple[list[Image.Image], list[str]]:
    """``n`` new scenes of seen compositions with detailed captions, for image<->text recall.

    Captions name every attribute (size, position, background) so that few of them coincide;
    identical captions can still occur for identical-looking scenes.
    """
    scenes = [_scene("retrieval", i, seed, image_size, SEEN_PAIRS, detailed=True)
              for i in range(n)]
    return [s.image for s in scenes], [s.caption for s in scenes]


# --------------------------------------------------------------------------- composition

def _scene(stream: str, index: int, seed: int, image_size: int,
           pairs: tuple[tuple[str, str], ...], main_pair: tuple[str, str] | None = None,
           single_kind: bool = False, detailed: bool = False) -> Scene:
    """Compose, draw and caption one scene from its own RNG stream."""
    rng = np.random.default_rng([seed, index, _STREAMS[stream]])
    objects = _compose(rng, pairs, main_pair, single_kind)
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    image = _draw(rng, objects, background, image_size)
    caption = _caption(rng, objects, background, detailed)
    return Scene(image, caption, objects, background)


def _compose(rng: np.random.Generator, pairs: tuple[tuple[str, str], ...],
             main_pair: tuple[str, str] | None, single_kind: bool) -> list[dict]:
    """Choose the objects: pairs, counts, sizes and distinct grid cells (no overlaps)."""
    if main_pair is None:
        main_pair = pairs[rng.integers(len(pairs))]
    cells = [list(POSITIONS)[k] for k in rng.permutation(len(POSITIONS))]
    # Copies and second kinds are at most medium, so objects in neighbouring cells stay apart.
    small_medium = ("small", "medium")
    if not single_kind and rng.random() < _TWO_KINDS_P:
        others = [p for p in SEEN_PAIRS if p != main_pair]
        second = others[rng.integers(len(others))]
        return [_object(main_pair, small_medium[rng.integers(2)], [cells[0]]),
                _object(second, small_medium[rng.integers(2)], [cells[1]])]
    count = int(rng.choice(COUNTS, p=(0.6, 0.2, 0.2)))
    if count == 1:
        size = list(SIZES)[rng.integers(len(SIZES))]
    else:
        size = small_medium[rng.integers(2)]
    return [_object(main_pair, size, cells[:count])]


def _object(pair: tuple[str, str], size: str, cells: list[str]) -> dict:
    return {"colour": pair[0], "shape": pair[1], "size": size, "count": len(cells),
            "position": cells[0] if len(cells) == 1 else None, "cells": cells}


# --------------------------------------------------------------------------- drawing

def _draw(rng: np.random.Generator, objects: list[dict], background: str,
          image_size: int) -> Image.Image:
    """Background in numpy, shapes with PIL ImageDraw (aliased), optional pixel noise."""
    image = Image.fromarray(_background(rng, background, image_size))
    draw = ImageDraw.Draw(image)
    cell = image_size / 3
    jitter = 0.025 * image_size
    for obj in objects:
        base = np.array(COLOURS[obj["colour"]])
        for name in obj["cells"]:
            col, row = POSITIONS[name]
            radius = 0.5 * SIZES[obj["size"]] * image_size * rng.uniform(0.93, 1.07)
            lo, hi = radius + 1, image_size - 1 - radius
            cx = min(max((col + 0.5) * cell + rng.uniform(-jitter, jitter), lo), hi)
            cy = min(max((row + 0.5) * cell + rng.uniform(-jitter, jitter), lo), hi)
            fill = tuple(int(v) for v in np.clip(base + rng.integers(-12, 13, 3), 0, 255))
            # Squares and crosses stay upright: tilted by a few degrees, their long straight
            # edges rasterise into ragged steps and small crosses into blobs.
            angle = math.radians(rng.uniform(-8, 8)) if obj["shape"] in _TILTED else 0.0
            _draw_shape(draw, obj["shape"], cx, cy, radius, angle, fill)
    if rng.random() < 0.5:
        noisy = np.asarray(image, dtype=np.int16) + rng.integers(-6, 7, (image_size,) * 2 + (3,))
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float,
                angle: float, fill: tuple[int, ...]) -> None:
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        return
    c, s = math.cos(angle), math.sin(angle)
    # Integer vertices: Pillow fills polygons with fractional vertices with stray pixels and
    # notches well away from the outline.
    points = [(round(cx + radius * (c * x - s * y)), round(cy + radius * (s * x + c * y)))
              for x, y in _unit_polygon(shape)]
    draw.polygon(points, fill=fill)


@cache
def _unit_polygon(shape: str) -> tuple[tuple[float, float], ...]:
    """Outline inside the unit circle, y pointing down (image coordinates)."""
    if shape == "square":
        return ((-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85))
    if shape == "triangle":
        return ((0.0, -1.0), (0.95, 0.8), (-0.95, 0.8))
    if shape == "star":  # five points; inner radius 0.45 keeps the arms thick enough at 13 px
        return tuple(((1.0 if k % 2 == 0 else 0.45) * math.cos(math.pi * (k / 5 - 0.5)),
                      (1.0 if k % 2 == 0 else 0.45) * math.sin(math.pi * (k / 5 - 0.5)))
                     for k in range(10))
    if shape == "cross":  # a plus sign with thick arms
        a, w = 0.95, 0.36
        return ((-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w),
                (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w))
    if shape == "heart":  # the classic parametric heart, centred and scaled into the circle
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        x, y = x - (x.max() + x.min()) / 2, y - (y.max() + y.min()) / 2
        scale = np.hypot(x, y).max()
        return tuple(zip((x / scale).tolist(), (y / scale).tolist()))
    raise ValueError(f"unknown shape {shape!r}")


@lru_cache(maxsize=8)
def _grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:image_size, 0:image_size]
    return ys, xs


def _background(rng: np.random.Generator, kind: str, image_size: int) -> np.ndarray:
    """A muted, low-contrast texture around mid-grey, so every object colour stands out."""
    base = np.clip(rng.integers(95, 161) + rng.integers(-12, 13, 3), 0, 255)
    sign = 1 if rng.random() < 0.5 else -1
    ys, xs = _grid(image_size)
    shape = (image_size, image_size, 3)
    if kind == "plain":
        out = np.broadcast_to(base, shape).astype(np.float64)
    elif kind == "noisy":
        out = base + rng.normal(0, 14, shape)
    elif kind == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        t = (math.cos(a) * xs + math.sin(a) * ys) / image_size
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6) - 0.5
        out = base + t[..., None] * rng.integers(50, 80)
    else:
        if kind == "striped":
            period = int(rng.integers(4, 9))
            coord = (ys, xs, xs + ys, xs - ys + image_size)[rng.integers(4)]
            mask, delta = coord % period < period // 2, 25
        elif kind == "dotted":
            spacing, offset = int(rng.integers(5, 9)), int(rng.integers(0, 5))
            mask, delta = ((xs + offset) % spacing < 2) & ((ys + offset) % spacing < 2), 40
        elif kind == "checkered":
            square = int(rng.integers(4, 11))
            mask, delta = (xs // square + ys // square) % 2 == 0, 25
        else:
            raise ValueError(f"unknown background {kind!r}")
        out = base + mask[..., None] * (sign * delta)
    return np.clip(out, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- captions

def _caption(rng: np.random.Generator, objects: list[dict], background: str,
             detailed: bool) -> str:
    """Colour, shape and count always; size, position and background only sometimes (always
    when ``detailed``); phrasing drawn from the templates above."""

    def pick(options: tuple[str, ...]) -> str:
        return options[rng.integers(len(options))]

    def maybe(p: float) -> bool:
        return detailed or rng.random() < p

    def noun_phrase(obj: dict, size_p: float) -> str:
        size_word = pick(_SIZE_WORDS[obj["size"]]) if maybe(size_p) else None
        return _noun_phrase(obj, size_word, one=rng.random() < _ONE_P)

    if len(objects) == 1:
        obj = objects[0]
        parts = [noun_phrase(obj, 0.4)]
        modifiers = []
        if obj["count"] == 1 and maybe(0.4):
            modifiers.append(pick(_POSITION_PHRASES[obj["position"]]))
        if maybe(0.3):
            modifiers.append(pick(_BACKGROUND_PHRASES[background]))
        if len(modifiers) == 2 and rng.random() < 0.5:
            modifiers.reverse()
        body = " ".join(parts + modifiers)
        plural = obj["count"] > 1
    else:
        phrases = []
        for obj in objects:
            phrase = noun_phrase(obj, 0.3)
            if maybe(0.3):
                phrase += " " + pick(_POSITION_PHRASES[obj["position"]])
            phrases.append(phrase)
        if rng.random() < 0.5:
            phrases.reverse()
        body = " and ".join(phrases)
        if maybe(0.25):
            body += " " + pick(_BACKGROUND_PHRASES[background])
        plural = False  # "there is a red circle and a blue square"
    frame = pick(_FRAMES)
    caption = frame.replace("{be}", "are" if plural else "is").format(body)
    return caption + "." if rng.random() < 0.3 else caption


def _noun_phrase(obj: dict, size_word: str | None, one: bool = False) -> str:
    """"a small red circle", "an orange star", "one green heart", "three blue crosses"."""
    count = obj["count"]
    shape = obj["shape"] if count == 1 else _PLURALS.get(obj["shape"], obj["shape"] + "s")
    words = [w for w in (size_word, obj["colour"], shape) if w]
    if count == 1 and not one:
        return _fix_articles("a " + " ".join(words))
    return " ".join([_COUNT_WORDS[count], *words])


def _fix_articles(text: str) -> str:
    """"a orange" -> "an orange" (every word starting with a vowel here takes "an")."""
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] == "a" and words[i + 1][:1] in ("a", "e", "i", "o", "u"):
            words[i] = "an"
    return " ".join(words)

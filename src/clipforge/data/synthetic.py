"""A procedurally generated image-caption dataset, so that ``clipforge train`` needs no downloads.

Every scene shows one kind of object (one to three identical copies) or two different kinds,
with a caption in English, Chinese or Russian (drawn per sample, :mod:`.captions`) that always
names colour, shape and count, and sometimes size, drawing style, position and background.
The renderer (:mod:`.draw`) spans what a concept can look like: backgrounds from black to
white (plain, gradients, textures, crops of natural photos, patterns), drawing styles (filled,
outlined, sketched, soft-edged, shaded, hatched), scale, aspect, blur, noise and JPEG
artefacts.  Training draws filled shapes over plain and gradient backgrounds from black to
white (see TRAIN_STYLES for why); the rest are the shift suites.

What training never shows, so that evaluation can measure generalisation:

* ``HELDOUT_PAIRS``: eight colour-shape pairs (each colour and shape is still seen, never
  together): compositional generalisation;
* the drawing styles other than filled (outlined, sketched, soft, shaded, hatched) and the
  background families other than plain and gradient (textures, photos, patterns), sizes outside
  the training range, and a second renderer written independently of the training one
  (:mod:`.sdf`): the shift suites of :data:`SUITES`, in the spirit of ImageNet-Sketch, -R and
  -V2.

Sample ``i`` depends on ``(seed, i, split)`` alone, so it is identical in any process and any
order: training can resume exactly and workers can split indices without sharing state.  The
image and the caption come from separate random streams, so the same scene can be captioned in
each language.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch.utils.data
from PIL import Image

from . import captions, draw, sdf
from .captions import LANGUAGES

COLOURS: dict[str, tuple[int, int, int]] = draw.COLOURS
# Silhouettes that stay distinct at 13 px (no diamond: it is a rotated square; no hexagon: a
# small hexagon is a circle).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross")
# Object diameter (fraction of the image side) of each size word.  Copies and second kinds
# are at most SHARED_MAX, so that objects in neighbouring cells of the 3x3 grid stay apart.
SIZES: dict[str, tuple[float, float]] = {"small": (0.2, 0.27), "medium": (0.27, 0.36),
                                         "large": (0.36, 0.5)}
SHARED_MAX = 0.31
# Out-of-range sizes for the shift suites: smaller than the smallest and larger than the
# largest object training draws.
SMALLER: tuple[float, float] = (0.12, 0.16)
LARGER: tuple[float, float] = (0.6, 0.78)
POSITIONS: tuple[str, ...] = tuple(draw.CELLS)
COUNTS: tuple[int, ...] = (1, 2, 3)
# Drawing styles and background families: training draws these (with these weights) ...
# Measured on the first run (issue 12, README): small-rn learns shape within its ten minutes
# on filled shapes over plain and gradient backgrounds from black to white (95% in
# distribution); with the outlined, sketched, soft and shaded styles, textures, photos and any
# rotation it reaches 38% (69% with the solid styles and textures), so those are shift suites.
TRAIN_STYLES: dict[str, float] = {"filled": 1.0}
TRAIN_BACKGROUNDS: dict[str, float] = {"plain": 0.5, "gradient": 0.5}
# ... and never these: the style and background shift suites.
HELDOUT_STYLES: tuple[str, ...] = tuple(s for s in draw.STYLES if s not in TRAIN_STYLES)
HELDOUT_BACKGROUNDS: tuple[str, ...] = tuple(b for b in draw.BACKGROUNDS
                                             if b not in TRAIN_BACKGROUNDS)
# What the start of a curriculum draws (SyntheticCaptions' ``curriculum``).
EASY_BACKGROUNDS: tuple[str, ...] = ("plain", "gradient")
BACKGROUNDS: tuple[str, ...] = tuple(TRAIN_BACKGROUNDS)
# Captions per language, equally often.
LANGUAGE_WEIGHTS: dict[str, float] = {language: 1 / len(LANGUAGES) for language in LANGUAGES}

# One held-out shape per colour, shifted by two along SHAPES (a Latin-square-like diagonal):
# every colour keeps five training shapes, every shape keeps at least six training colours,
# and every shape is held out with at least one colour.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (colour, SHAPES[(i + 2) % len(SHAPES)]) for i, colour in enumerate(COLOURS)
)
SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_PAIRS
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)

# Zero-shot classes: every colour-shape pair, seen or held out (English names; other
# languages: class_names(language)).
CLASSNAMES: tuple[str, ...] = tuple(f"{c} {s}" for c, s in ALL_PAIRS)
# English prompt templates (every language's: captions.TEMPLATES).  They say "one {}", never
# "a {}", so that no class gets "a orange star"; training captions use "one" as well as "a"/"an"
# for a single object, so these prompts are in the caption distribution.
TEMPLATES: tuple[str, ...] = captions.TEMPLATES["en"]

SPLITS: tuple[str, ...] = ("train", "seen_eval", "heldout")
# Distinct random streams: no evaluation set reuses a training (seed, index) stream.
_STREAMS = {"train": 0, "seen_eval": 1, "heldout": 2, "retrieval": 3, "suite/seen": 4,
            "suite/heldout": 5, "suite/style": 6, "suite/background": 7, "suite/smaller": 8,
            "suite/larger": 9, "suite/renderer": 10, "probe": 11, "binding": 12}
# Share of training scenes with two kinds of object.  10% rather than 25%: paired seed by seed
# over four seeds (issue 12, README "Longer runs"), held-out compositions gain 5.9 points on
# average (-2.9, +1.4, +21.9, +3.3), the weakest seed most, while binding loses a few: two-kind
# scenes train exactly the colour-shape conjunctions that fail on unseen pairs.
_TWO_KINDS_P = 0.1
_CAPTION_STREAM = 1  # the caption's generator: (seed, index, stream, _CAPTION_STREAM)


def class_names(language: str) -> tuple[str, ...]:
    """The zero-shot class names in ``language``, in CLASSNAMES order."""
    return tuple(captions.class_name(language, c, s) for c, s in ALL_PAIRS)


def class_index(colour: str, shape: str) -> int:
    """Index of the colour-shape pair in CLASSNAMES."""
    return list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)


@dataclass
class Scene:
    """One rendered sample: the image, its caption and the ground truth that produced both.

    Each ``objects`` entry has ``colour``, ``shape``, ``size`` (a SIZES word), ``diameter``,
    ``count``, ``position`` (the grid cell name, or None when ``count`` > 1) and ``cells`` (the
    cell of every copy).  The first entry is the main object (held out in split "heldout").
    ``background`` is the family, ``style`` the drawing style, ``language`` the caption's.
    """

    image: Image.Image
    caption: str
    objects: list[dict]
    background: str
    style: str = "filled"
    language: str = "en"


@dataclass(frozen=True)
class Suite:
    """An evaluation set of single-kind scenes (one to ``max(counts)`` copies): which pairs,
    drawing styles, backgrounds, sizes and renderer it draws from."""

    name: str
    description: str
    pairs: tuple[tuple[str, str], ...]
    styles: tuple[str, ...] = tuple(TRAIN_STYLES)
    backgrounds: tuple[str, ...] = tuple(TRAIN_BACKGROUNDS)
    sizes: tuple[float, float] | None = None  # None: the training sizes
    counts: tuple[int, ...] = COUNTS
    renderer: str = "draw"  # or "sdf"
    shift: bool = True  # a distribution training never shows


SUITES: dict[str, Suite] = {s.name: s for s in (
    Suite("seen", "training distribution, seen compositions", SEEN_PAIRS, shift=False),
    Suite("heldout", "training distribution, held-out compositions", HELDOUT_PAIRS,
          shift=False),
    Suite("style", "drawing styles: outlined, sketched, soft, shaded, hatched", SEEN_PAIRS,
          styles=HELDOUT_STYLES),
    Suite("background", "backgrounds: textures, photos, stripes, checks, dots", SEEN_PAIRS,
          backgrounds=HELDOUT_BACKGROUNDS),
    Suite("smaller", "smaller than any training object", SEEN_PAIRS, sizes=SMALLER),
    Suite("larger", "larger than any training object", SEEN_PAIRS, sizes=LARGER, counts=(1,)),
    Suite("renderer", "an independent renderer (numpy signed distances)", SEEN_PAIRS,
          renderer="sdf"),
)}
SHIFT_SUITES: tuple[str, ...] = tuple(name for name, s in SUITES.items() if s.shift)


def render_scene(index: int, seed: int = 0, image_size: int = 64, split: str = "train",
                 language: str | None = None, spread: float = 1.0) -> Scene:
    """Render sample ``index`` of ``split``; the same arguments always give the same pixels.

    "train" never draws a HELDOUT_PAIRS pair; "heldout" draws one as the main object (a second
    kind, if any, is a seen pair); "seen_eval" draws seen pairs from its own random stream, so
    its images are new images of training compositions.  The caption's language is drawn per
    sample unless ``language`` is given (the image is the same either way).
    ``spread`` (the curriculum, see :class:`SyntheticCaptions`): 1 is the full training
    distribution; lower values draw easier scenes.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    pairs = HELDOUT_PAIRS if split == "heldout" else SEEN_PAIRS
    return _scene(split, index, seed, image_size, pairs, language=language, spread=spread)


class SyntheticCaptions(torch.utils.data.Dataset):
    """Map-style dataset of ``(image, caption)``; item ``i`` is ``render_scene(i, ...)``.

    ``length`` defaults to the largest int32, so it is effectively infinite: a training loop
    takes as many steps as it wants and resumes by index, with no epoch boundary to track.

    ``curriculum``: over its first ``curriculum`` samples the scenes widen from easy (filled
    shapes on plain or gradient backgrounds of mid tones, nearly upright) to the full training
    distribution, which every later sample draws.  Sample ``i`` draws the easy variant of each
    of these choices with probability ``1 - i / curriculum``, and its tone and rotation ranges
    grow with ``i`` (:func:`clipforge.data.draw.draw_scene`'s ``spread``).  Measured on the
    first run (issue 12): without it the model learns colour but not shape on black-to-white
    backgrounds.  0: the full distribution from the first sample.
    """

    # Items are independent random draws already: a training loop reads index i directly
    # instead of walking a shuffled permutation of (2**31 entries of) indices.
    draws_by_index = True

    def __init__(self, seed: int = 0, image_size: int = 64, split: str = "train",
                 length: int = 2**31 - 1, curriculum: int = 0) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if curriculum < 0:
            raise ValueError(f"curriculum must be a number of samples >= 0, got {curriculum}")
        self.seed, self.image_size, self.split, self.length = seed, image_size, split, length
        self.curriculum = curriculum

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        scene = render_scene(index, self.seed, self.image_size, self.split,
                             spread=curriculum_spread(index, self.curriculum))
        return scene.image, scene.caption


def curriculum_spread(index: int, curriculum: int) -> float:
    """How far training sample ``index`` reaches into the full distribution (1: all of it)
    in a curriculum of ``curriculum`` samples (0: none)."""
    return min(1.0, index / curriculum) if curriculum else 1.0


def suite_set(name: str, n: int, seed: int = 0,
              image_size: int = 64) -> tuple[list[Image.Image], list[int]]:
    """``n`` images of suite ``name`` (a key of SUITES) labelled by their CLASSNAMES index.

    Labels cycle through the suite's pairs, so an ``n`` that is a multiple of their number
    (40 seen, 8 held out) is exactly balanced.
    """
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}: choose one of {', '.join(SUITES)}")
    suite = SUITES[name]
    images, labels = [], []
    for i in range(n):
        pair = suite.pairs[i % len(suite.pairs)]
        rng = np.random.default_rng([seed, i, _STREAMS[f"suite/{name}"]])
        count = int(suite.counts[rng.integers(len(suite.counts))])
        if suite.renderer == "sdf":
            images.append(sdf.render(rng, *pair, count, image_size))
        else:
            objects = [_object(pair, _diameter(rng, count, suite.sizes), _cells(rng)[:count])]
            style = suite.styles[rng.integers(len(suite.styles))]
            background = suite.backgrounds[rng.integers(len(suite.backgrounds))]
            images.append(draw.draw_scene(rng, objects, style, background, image_size)[0])
        labels.append(class_index(*pair))
    return images, labels


def zero_shot_set(split: str, n: int, seed: int = 0,
                  image_size: int = 64) -> tuple[list[Image.Image], list[int]]:
    """``suite_set`` of the training distribution: "seen_eval" (the 40 seen pairs) or
    "heldout" (the 8 held-out ones)."""
    if split not in ("seen_eval", "heldout"):
        raise ValueError(f"split must be 'seen_eval' or 'heldout', got {split!r}")
    return suite_set("seen" if split == "seen_eval" else "heldout", n, seed, image_size)


def probe_set(n: int, seed: int = 0,
              image_size: int = 64) -> tuple[list[Image.Image], list[int]]:
    """``n`` labelled single-kind scenes of every class (seen and held-out pairs), drawn as
    training draws them: the training set of the linear probes."""
    images, labels = [], []
    for i in range(n):
        pair = ALL_PAIRS[i % len(ALL_PAIRS)]
        scene = _scene("probe", i, seed, image_size, ALL_PAIRS, main_pair=pair,
                       single_kind=True, language="en")
        images.append(scene.image)
        labels.append(class_index(*pair))
    return images, labels


def retrieval_set(n: int, seed: int = 0, image_size: int = 64,
                  language: str = "en") -> tuple[list[Image.Image], list[str]]:
    """``n`` new single-kind scenes of seen compositions with detailed captions in
    ``language``, for image<->text recall (the images are the same in every language).

    Captions name size and position, and the background where it has a name, so that few of
    them coincide; identical captions can still occur for identical-looking scenes.
    """
    scenes = [_scene("retrieval", i, seed, image_size, SEEN_PAIRS, detailed=True,
                     single_kind=True, language=language) for i in range(n)]
    return [s.image for s in scenes], [s.caption for s in scenes]


def binding_set(n: int, seed: int = 0, image_size: int = 64
                ) -> tuple[list[Image.Image], list[tuple[tuple[str, str], tuple[str, str]]]]:
    """``n`` scenes of two objects of different colours and different shapes, both seen
    pairs, in the training distribution; with each scene, its two (colour, shape) pairs in the
    order a caption names them.  Swapping their colours gives the hard negative."""
    images, pairs = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i, _STREAMS["binding"]])
        while True:
            a, b = (SEEN_PAIRS[k] for k in rng.choice(len(SEEN_PAIRS), 2, replace=False))
            if a[0] != b[0] and a[1] != b[1]:
                break
        cells = _cells(rng)
        objects = [_object(p, _diameter(rng, 2), [cell]) for p, cell in zip((a, b), cells)]
        style, background = _style_and_background(rng)
        images.append(draw.draw_scene(rng, objects, style, background, image_size)[0])
        pairs.append((a, b) if rng.random() < 0.5 else (b, a))
    return images, pairs


# --------------------------------------------------------------------------- composition

def _weighted(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    return names[rng.choice(len(names), p=np.array(list(weights.values())) / sum(
        weights.values()))]


def _style_and_background(rng: np.random.Generator, spread: float = 1.0) -> tuple[str, str]:
    """A training style and background family; with ``spread`` < 1, each is the easy one
    (filled; plain or gradient) with probability ``1 - spread``."""
    style, background = _weighted(rng, TRAIN_STYLES), _weighted(rng, TRAIN_BACKGROUNDS)
    if spread < 1:
        if rng.random() >= spread:
            style = "filled"
        if rng.random() >= spread:
            background = EASY_BACKGROUNDS[rng.integers(len(EASY_BACKGROUNDS))]
    return style, background


def _cells(rng: np.random.Generator) -> list[str]:
    return [POSITIONS[k] for k in rng.permutation(len(POSITIONS))]


def _diameter(rng: np.random.Generator, count: int,
              sizes: tuple[float, float] | None = None) -> float:
    """A diameter for one of ``count`` objects: any size word alone, at most SHARED_MAX when
    shared with others; from ``sizes`` when given."""
    if sizes is not None:
        return float(rng.uniform(*sizes))
    if count == 1:
        low, high = SIZES[list(SIZES)[rng.integers(len(SIZES))]]
    else:
        low, high = SIZES["small"][0], SHARED_MAX
    return float(rng.uniform(low, high))


def _size_word(diameter: float) -> str:
    for word, (_, high) in SIZES.items():
        if diameter < high:
            return word
    return "large"


def _object(pair: tuple[str, str], diameter: float, cells: list[str]) -> dict:
    return {"colour": pair[0], "shape": pair[1], "size": _size_word(diameter),
            "diameter": diameter, "count": len(cells),
            "position": cells[0] if len(cells) == 1 else None, "cells": cells}


def _scene(stream: str, index: int, seed: int, image_size: int,
           pairs: tuple[tuple[str, str], ...], main_pair: tuple[str, str] | None = None,
           single_kind: bool = False, detailed: bool = False,
           language: str | None = None, spread: float = 1.0) -> Scene:
    """Compose and draw one scene from its own random stream, and caption it from another."""
    rng = np.random.default_rng([seed, index, _STREAMS[stream]])
    objects = _compose(rng, pairs, main_pair, single_kind)
    style, background = _style_and_background(rng, spread)
    image, word = draw.draw_scene(rng, objects, style, background, image_size, spread=spread)
    text_rng = np.random.default_rng([seed, index, _STREAMS[stream], _CAPTION_STREAM])
    if language is None:
        language = _weighted(text_rng, LANGUAGE_WEIGHTS)
    elif language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}: choose one of {', '.join(LANGUAGES)}")
    caption = captions.describe(language, objects, word, style, text_rng, detailed)
    return Scene(image, caption, objects, background, style, language)


def _compose(rng: np.random.Generator, pairs: tuple[tuple[str, str], ...],
             main_pair: tuple[str, str] | None, single_kind: bool) -> list[dict]:
    """Choose the objects: pairs, counts, diameters and distinct grid cells (no overlaps)."""
    if main_pair is None:
        main_pair = pairs[rng.integers(len(pairs))]
    cells = _cells(rng)
    if not single_kind and rng.random() < _TWO_KINDS_P:
        others = [p for p in SEEN_PAIRS if p != main_pair]
        second = others[rng.integers(len(others))]
        return [_object(main_pair, _diameter(rng, 2), [cells[0]]),
                _object(second, _diameter(rng, 2), [cells[1]])]
    count = int(rng.choice(COUNTS, p=(0.6, 0.2, 0.2)))
    return [_object(main_pair, _diameter(rng, count), cells[:count])]

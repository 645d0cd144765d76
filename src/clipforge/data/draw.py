"""The training renderer of the built-in dataset: PIL ImageDraw polygons, drawn supersampled,
composited over numpy backgrounds, then degraded.

Objects are polygons (a circle is a 64-gon) stretched to an aspect ratio, rotated, and drawn
``SUPERSAMPLE`` times larger into an 8-bit mask that is box-filtered down, which anti-aliases
every edge.  Drawing styles change the mask or the colour: filled, outlined, sketched (a
wobbling, overshooting pen line, one or two passes), soft (the mask blurred), shaded (lighter
on one side, or a highlight), and hatched (parallel stripes clipped to the shape, the style
training never shows).  Backgrounds span black to white: plain tones, gradients, value-noise
textures, crops of scikit-image's bundled photos, and geometric patterns (stripes,
checkerboards, dots and grids: the family training never shows).  The background is drawn
again (up to ``BACKGROUND_TRIES`` times) while an object would not stand out from what lies
under it.  The whole image may then be blurred, get pixel noise, or be JPEG-compressed.

Everything random comes from the generator the caller passes, so a scene is a function of its
seed and index.  :mod:`clipforge.data.sdf` is a second renderer written independently of this
one (numpy signed distance fields), for the evaluation only.
"""

from __future__ import annotations

import colorsys
import io
import math
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SUPERSAMPLE = 4
STYLES: tuple[str, ...] = ("filled", "outlined", "sketched", "soft", "shaded", "hatched")
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "texture", "photo", "pattern")
# Saturated and far apart in RGB.
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
COLOUR_JITTER = 12  # per channel, so that no colour name is one exact RGB value
# An object's colour must lie this far (Euclidean RGB) from the mean of the background under
# it; backgrounds are redrawn up to BACKGROUND_TRIES times until every object qualifies.
MIN_CONTRAST = 90.0
BACKGROUND_TRIES = 8
# scikit-image's bundled photos used as backgrounds (colour and grey; faces, animals,
# vehicles, food, sky, textures).  Loaded once per process, the short side cut to 256 px.
PHOTOS: tuple[str, ...] = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
                           "motorcycle_left.png", "motorcycle_right.png",
                           "hubble_deep_field.jpg", "ihc.png", "camera.png", "coins.png",
                           "moon.png", "brick.png", "grass.png", "gravel.png")
PHOTO_SIDE = 256
Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) pixel edges, x1 and y1 exclusive


# --------------------------------------------------------------------------- entry point

def draw_scene(rng: np.random.Generator, objects: list[dict], style: str, background: str,
               image_size: int, degrade: bool = True, spread: float = 1.0
               ) -> tuple[Image.Image, str | None]:
    """Render the objects (each with ``colour``, ``shape``, ``diameter`` as a fraction of the
    image side, and ``cells``: grid cells "top left" ... of its copies) in ``style`` over a
    background of family ``background``.  Returns the image and the word captions may use for
    the background ("white", "dark", "photo" ...; None when there is none).

    ``spread`` in [0, 1] (a training curriculum, see :mod:`.synthetic`): how far background
    tones and rotation reach, from mid tones and nearly upright objects (0) to black-to-white
    and any angle (1, what evaluation draws)."""
    image, word, _ = draw_scene_with_boxes(rng, objects, style, background, image_size, degrade,
                                           spread)
    return image, word


def draw_scene_with_boxes(rng: np.random.Generator, objects: list[dict], style: str,
                          background: str, image_size: int, degrade: bool = True,
                          spread: float = 1.0
                          ) -> tuple[Image.Image, str | None, list[list[Box]]]:
    """:func:`draw_scene` (the same pixels for the same generator), with where each object's
    copies lie: per object, per cell, the box (x0, y0, x1, y1; pixel edges, x1 and y1
    exclusive) of the pixels its mask covers at least half.  Why: measuring localisation
    (``benchmarks/bench_locate.py``) needs the truth the generator knows."""
    if not 0 <= spread <= 1:
        raise ValueError(f"spread must be in [0, 1], got {spread}")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}: choose one of {', '.join(STYLES)}")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}: choose one of "
                         f"{', '.join(BACKGROUNDS)}")
    layers = [_layer(rng, obj, cell, style, image_size, spread)
              for obj in objects for cell in obj["cells"]]
    half = EASY_TONES + (0.5 - EASY_TONES) * spread
    canvas, word = _contrasting_background(rng, background, image_size, layers,
                                           (0.5 - half, 0.5 + half))
    for alpha, (y0, x0), colour in layers:
        region = canvas[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]]
        a = alpha[..., None]
        region *= 1 - a
        region += a * colour
    image = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))
    boxes = iter([_box(alpha, corner) for alpha, corner, _ in layers])
    placed = [[next(boxes) for _ in obj["cells"]] for obj in objects]
    return (_degrade(rng, image) if degrade else image), word, placed


def _box(alpha: np.ndarray, corner: tuple[int, int]) -> Box:
    """The box of the pixels a layer's mask covers at least half, in image pixels."""
    ys, xs = np.nonzero(alpha >= 0.5)
    y0, x0 = corner
    if not len(xs):  # a mask thinner than half a pixel everywhere: its whole layer
        return x0, y0, x0 + alpha.shape[1], y0 + alpha.shape[0]
    return (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1,
            y0 + int(ys.max()) + 1)


# --------------------------------------------------------------------------- objects

# Where a grid cell's centre lies, as (column, row) of a 3x3 grid.
CELLS: dict[str, tuple[int, int]] = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "center": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}
# Rotation range in degrees, training and evaluation alike: the first run learns shape within
# its ten minutes with +-8 degrees (38% in distribution with any angle: README, issue 12).
TURN = 8.0
# The easiest scenes of the curriculum (spread 0): rotation within +-EASY_TURN degrees and
# background tones within 0.5 +- EASY_TONES of the value range.  Measured (issue 12): a model
# that first learns shape and colour over mid tones then extends to pale and dark ones.
EASY_TURN = 8.0
EASY_TONES = 0.15


def _layer(rng: np.random.Generator, obj: dict, cell: str, style: str, size: int,
           spread: float) -> tuple[np.ndarray, tuple[int, int], np.ndarray]:
    """One copy of an object: its alpha mask (over its bounding box), the box's top-left
    corner and its colour (RGB, or an RGB field for shaded objects)."""
    col, row = CELLS[cell]
    radius = 0.5 * obj["diameter"] * size * rng.uniform(0.95, 1.05)
    jitter = 0.04 * size
    lo, hi = radius + 0.5, size - 0.5 - radius
    cx = float(np.clip((col + 0.5) * size / 3 + rng.uniform(-jitter, jitter), lo, max(lo, hi)))
    cy = float(np.clip((row + 0.5) * size / 3 + rng.uniform(-jitter, jitter), lo, max(lo, hi)))
    turn = min(TURN, EASY_TURN) + (TURN - min(TURN, EASY_TURN)) * spread
    angle = math.radians(rng.uniform(-turn, turn))
    stretch = math.exp(rng.uniform(-0.22, 0.22))
    points = _outline(obj["shape"], cx, cy, radius, angle, stretch)
    base = np.array(COLOURS[obj["colour"]], dtype=np.float32)
    rgb = np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255)
    alpha, corner = _mask(rng, points, style, radius, size)
    colour = _shade(rng, rgb, alpha.shape, corner, cx, cy, radius) if style == "shaded" \
        else rgb.astype(np.float32)
    return alpha, corner, colour


def _outline(shape: str, cx: float, cy: float, radius: float, angle: float,
             stretch: float) -> np.ndarray:
    """The shape's outline in image pixels, [n, 2] (x, y)."""
    unit = np.array(_unit_polygon(shape))
    xy = unit * np.array([stretch ** 0.5, stretch ** -0.5])
    c, s = math.cos(angle), math.sin(angle)
    rotated = xy @ np.array([[c, s], [-s, c]])
    return rotated * radius + np.array([cx, cy])


@cache
def _unit_polygon(shape: str) -> tuple[tuple[float, float], ...]:
    """Outline inside the unit circle, y pointing down (image coordinates)."""
    if shape == "circle":
        t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        return tuple(zip(np.cos(t).tolist(), np.sin(t).tolist()))
    if shape == "square":
        return ((-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85))
    if shape == "triangle":
        return ((0.0, -1.0), (0.95, 0.8), (-0.95, 0.8))
    if shape == "star":  # five points; inner radius 0.45 keeps the arms thick at small sizes
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


def _mask(rng: np.random.Generator, points: np.ndarray, style: str, radius: float,
          size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Alpha in [0, 1] over the outline's bounding box (clipped to the image), drawn
    SUPERSAMPLE times larger and box-filtered down."""
    f = SUPERSAMPLE
    width = rng.uniform(1.1, 2.6)  # pen width in output pixels (outlined, sketched)
    pad = width + 4
    x0, y0 = (max(0, int(math.floor(v - pad))) for v in points.min(axis=0))
    x1, y1 = (min(size, int(math.ceil(v + pad))) for v in points.max(axis=0))
    big = Image.new("L", ((x1 - x0) * f, (y1 - y0) * f), 0)
    draw = ImageDraw.Draw(big)
    # Integer vertices: Pillow fills polygons with fractional vertices with stray pixels.
    local = np.rint((points - np.array([x0, y0])) * f).astype(int)
    vertices = [tuple(p) for p in local.tolist()]
    if style == "outlined":
        draw.line(vertices + vertices[:2], fill=255, width=max(1, round(width * f)),
                  joint="curve" if len(vertices) < 24 else None)
    elif style == "sketched":
        _sketch(rng, draw, local, width * f, radius * f)
    else:
        draw.polygon(vertices, fill=255)
    if style == "hatched":
        big = Image.fromarray(np.asarray(big) * _stripes(rng, big.size, f))
    alpha = big.reduce(f)
    if style == "soft":
        alpha = alpha.filter(ImageFilter.GaussianBlur(rng.uniform(0.7, 1.8)))
    return np.asarray(alpha, dtype=np.float32) / 255.0, (y0, x0)


def _sketch(rng: np.random.Generator, draw: ImageDraw.ImageDraw, vertices: np.ndarray,
            width: float, radius: float) -> None:
    """A hand-drawn outline: the polygon resampled densely, displaced by a smooth random wobble,
    drawn past its start (the pen overshoots), once or twice."""
    closed = np.vstack([vertices, vertices[:1]]).astype(np.float64)
    lengths = np.hypot(*np.diff(closed, axis=0).T)
    along = np.concatenate([[0], np.cumsum(lengths)])
    n = 72
    t = np.linspace(0, along[-1], n, endpoint=False)
    dense = np.stack([np.interp(t, along, closed[:, k]) for k in (0, 1)], axis=1)
    centre = dense.mean(axis=0)
    for _ in range(int(rng.integers(1, 3))):
        phase = rng.uniform(0, 2 * math.pi, 3)
        amplitude = rng.uniform(0.02, 0.06, 3) * radius
        u = np.linspace(0, 2 * math.pi, n, endpoint=False)
        wobble = sum(a * np.sin((k + 2) * u + p) for k, (a, p) in
                     enumerate(zip(amplitude, phase)))
        direction = dense - centre
        direction /= np.maximum(np.hypot(*direction.T), 1e-6)[:, None]
        path = dense + direction * wobble[:, None] + rng.normal(0, 0.01 * radius, dense.shape)
        start = int(rng.integers(n))
        order = [(start + k) % n for k in range(n + int(rng.integers(3, 9)))]
        # No rounded joints: at 72 points a turn is a few degrees, and each rounded joint
        # costs a pie slice.
        draw.line([tuple(p) for p in np.rint(path[order]).astype(int).tolist()], fill=255,
                  width=max(1, round(width * rng.uniform(0.8, 1.1))))


def _stripes(rng: np.random.Generator, shape: tuple[int, int], f: int) -> np.ndarray:
    """0/1 parallel stripes (period 2.6-3.6 output pixels, any angle) over a supersampled box."""
    w, h = shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) / f
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(2.6, 3.6)
    duty = rng.uniform(0.5, 0.65)
    coord = xs * math.cos(angle) + ys * math.sin(angle) + rng.uniform(0, period)
    return ((coord % period) < duty * period).astype(np.uint8)


def _shade(rng: np.random.Generator, rgb: np.ndarray, shape: tuple[int, int],
           corner: tuple[int, int], cx: float, cy: float, radius: float) -> np.ndarray:
    """An RGB field: lighter toward a light direction (linear) or around a highlight (radial),
    darker away from it.  Lightening mixes toward white, darkening toward black, so that white
    and black objects shade too without changing their name."""
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    xs = (xs + corner[1] + 0.5 - cx) / radius
    ys = (ys + corner[0] + 0.5 - cy) / radius
    a = rng.uniform(0, 2 * math.pi)
    if rng.random() < 0.5:
        t = np.clip(xs * math.cos(a) + ys * math.sin(a), -1, 1)
    else:
        hx, hy = 0.45 * math.cos(a), 0.45 * math.sin(a)
        t = np.clip(1 - np.hypot(xs - hx, ys - hy), -1, 1)
    k = rng.uniform(0.25, 0.4)
    t = (k * t)[..., None]
    return np.where(t > 0, rgb + t * (255 - rgb), rgb * (1 + t)).astype(np.float32)


# --------------------------------------------------------------------------- backgrounds

def _contrasting_background(rng: np.random.Generator, family: str, size: int,
                            layers: list, tones: tuple[float, float]
                            ) -> tuple[np.ndarray, str | None]:
    """A background of ``family`` (its tones within ``tones`` of the value range) under which
    every object stands out (see MIN_CONTRAST); the best of BACKGROUND_TRIES draws when none
    does."""
    best, best_score = None, -1.0
    for _ in range(BACKGROUND_TRIES):
        canvas, word = _background(rng, family, size, tones)
        score = min((_contrast(canvas, layer) for layer in layers), default=math.inf)
        if score >= MIN_CONTRAST:
            return canvas, word
        if score > best_score:
            best, best_score = (canvas, word), score
    return best


def _contrast(canvas: np.ndarray, layer: tuple) -> float:
    alpha, (y0, x0), colour = layer
    weight = alpha[..., None]
    region = canvas[y0:y0 + alpha.shape[0], x0:x0 + alpha.shape[1]]
    total = max(float(alpha.sum()), 1e-6)
    under = (region * weight).sum(axis=(0, 1)) / total
    mean_colour = colour if colour.ndim == 1 else (colour * weight).sum(axis=(0, 1)) / total
    return float(np.linalg.norm(mean_colour - under))


def _tone(rng: np.random.Generator, tones: tuple[float, float], value: float | None = None
          ) -> np.ndarray:
    """A background colour grey or faintly tinted, its brightness at ``value`` (random when
    None) of the way through ``tones`` (black to white: (0, 1))."""
    v = rng.uniform(0, 1) if value is None else value
    v = tones[0] + (tones[1] - tones[0]) * v
    saturation = rng.uniform(0, 0.3) if rng.random() < 0.6 else 0.0
    return np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), saturation, v),
                    dtype=np.float32) * 255


def _two_tones(rng: np.random.Generator, low: float, high: float, tones: tuple[float, float]
               ) -> tuple[np.ndarray, np.ndarray]:
    """Two tones whose brightness differs by ``low`` to ``high`` of the ``tones`` range."""
    gap = rng.uniform(low, high)
    v = rng.uniform(0, 1 - gap)
    a, b = _tone(rng, tones, v), _tone(rng, tones, v + gap)
    return (a, b) if rng.random() < 0.5 else (b, a)


def _background(rng: np.random.Generator, family: str, size: int,
                tones: tuple[float, float] = (0.0, 1.0)) -> tuple[np.ndarray, str | None]:
    if family == "plain":
        colour = _tone(rng, tones)
        return np.broadcast_to(colour, (size, size, 3)).copy(), _tone_word(colour)
    if family == "gradient":
        return (_blend(_gradient_field(rng, size), *_two_tones(rng, 0.25, 0.7, tones)),
                "gradient")
    if family == "texture":
        return (_blend(_value_noise(rng, size), *_two_tones(rng, 0.15, 0.55, tones)),
                "texture")
    if family == "photo":
        return _photo_crop(rng, size), "photo"
    if family == "pattern":
        return _blend(_pattern(rng, size), *_two_tones(rng, 0.15, 0.5, tones)), None
    raise ValueError(f"unknown background {family!r}")


def _tone_word(colour: np.ndarray) -> str | None:
    """How captions call a plain background: white, black, grey, dark or light."""
    luminance = float(colour @ np.array([0.299, 0.587, 0.114]))
    chroma = float(colour.max() - colour.min())
    if chroma < 30:
        for limit, word in ((45, "black"), (95, "dark"), (170, "grey"), (215, "light")):
            if luminance < limit:
                return word
        return "white"
    return "dark" if luminance < 100 else "light" if luminance > 165 else None


def _blend(t: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + t[..., None] * (b - a)


@cache
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return ys, xs


def _gradient_field(rng: np.random.Generator, size: int) -> np.ndarray:
    ys, xs = _grid(size)
    if rng.random() < 0.65:
        a = rng.uniform(0, 2 * math.pi)
        t = math.cos(a) * xs + math.sin(a) * ys
    else:
        t = np.hypot(xs - rng.uniform(0, 1), ys - rng.uniform(0, 1))
    return (t - t.min()) / max(float(t.max() - t.min()), 1e-6)


def _value_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random blotches: two octaves of random grids upsampled bicubically."""
    total = np.zeros((size, size), np.float32)
    cells = int(rng.integers(3, 7))
    for amplitude in (1.0, 0.5):
        grid = rng.uniform(0, 1, (cells, cells)).astype(np.float32)
        up = Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC)
        total += amplitude * np.asarray(up)
        cells *= 2
    return (total - total.min()) / max(float(total.max() - total.min()), 1e-6)


def _pattern(rng: np.random.Generator, size: int) -> np.ndarray:
    """Stripes, a checkerboard, dots or grid lines, as 0/1."""
    ys, xs = (g * size for g in _grid(size))
    kind = int(rng.integers(4))
    if kind == 0:
        period = rng.uniform(4, 10)
        a = rng.uniform(0, math.pi)
        coord = xs * math.cos(a) + ys * math.sin(a)
        return ((coord % period) < period / 2).astype(np.float32)
    if kind == 1:
        square = int(rng.integers(4, 12))
        return ((xs // square + ys // square) % 2).astype(np.float32)
    spacing = int(rng.integers(5, 11))
    ox, oy = rng.integers(0, spacing, 2)
    if kind == 2:
        radius = rng.uniform(1.0, 2.2)
        dx = (xs + ox) % spacing - spacing / 2
        dy = (ys + oy) % spacing - spacing / 2
        return (np.hypot(dx, dy) < radius).astype(np.float32)
    line = int(rng.integers(1, 3))
    return (((xs + ox) % spacing < line) | ((ys + oy) % spacing < line)).astype(np.float32)


@cache
def _photos() -> tuple[Image.Image, ...]:
    """scikit-image's bundled photos as RGB, the short side at most PHOTO_SIDE (decoded once
    per process: data-loader workers each load their own)."""
    from importlib import resources

    try:
        folder = resources.files("skimage.data")
    except ModuleNotFoundError:
        raise RuntimeError("the built-in dataset draws backgrounds from scikit-image's bundled "
                           "photos: pip install scikit-image (or clipforge[demo])") from None
    photos = []
    for name in PHOTOS:
        with Image.open(io.BytesIO((folder / name).read_bytes())) as image:
            image = image.convert("RGB")
            scale = PHOTO_SIDE / min(image.size)
            if scale < 1:
                image = image.resize((round(image.width * scale), round(image.height * scale)),
                                     Image.Resampling.BILINEAR)
            photos.append(image)
    return tuple(photos)


def _photo_crop(rng: np.random.Generator, size: int) -> np.ndarray:
    """A square crop of a random photo (a fifth to two thirds of its short side), maybe
    mirrored, with its contrast and brightness varied."""
    photos = _photos()
    photo = photos[rng.integers(len(photos))]
    side = int(min(photo.size) * rng.uniform(0.2, 0.67))
    left = int(rng.integers(0, photo.width - side + 1))
    top = int(rng.integers(0, photo.height - side + 1))
    crop = photo.resize((size, size), Image.Resampling.BILINEAR,
                        box=(left, top, left + side, top + side))
    out = np.asarray(crop, dtype=np.float32)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    mean = out.mean()
    out = mean + (out - mean) * rng.uniform(0.55, 1.0) + rng.uniform(-50, 50)
    return np.clip(out, 0, 255)


# --------------------------------------------------------------------------- degradations

def _degrade(rng: np.random.Generator, image: Image.Image) -> Image.Image:
    """Sometimes blur, pixel noise and JPEG artefacts, in that order (each independently)."""
    if rng.random() < 0.2:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0)))
    if rng.random() < 0.3:
        noisy = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(2, 9),
                                                           (image.height, image.width, 3))
        image = Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(25, 86)))
        with Image.open(buffer) as decoded:
            image = decoded.convert("RGB")
    return image

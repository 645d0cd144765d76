"""A second renderer for the built-in dataset's shapes, written independently of the training
one (:mod:`clipforge.data.draw`), used only to evaluate: the "renderer" shift suite.

Where the training renderer rasterises PIL polygons on a 3x3 grid of cells, this one evaluates
signed distance functions in numpy (the analytic formulas popularised by Inigo Quilez: a
rounded box, an equilateral triangle, a five-pointed star, a heart made of two arcs and a
point, a rounded plus sign), anti-aliases by the distance itself, places objects anywhere by
rejection sampling, colours them from another palette (Google's Material colours), and paints
its own backgrounds (flat, four-corner bilinear, vignette, slow waves) and degradations (box
blur, uniform noise).  It shares no code, no geometry and no colours with the training
renderer, the way ImageNet-V2 shares only the class list with ImageNet: a model that learned
the training renderer's quirks rather than the shapes loses accuracy here.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# Material Design 600 shades (and near-white / near-black): another artist's idea of each name.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (229, 57, 53),
    "green": (67, 160, 71),
    "blue": (30, 136, 229),
    "yellow": (253, 216, 53),
    "purple": (142, 36, 170),
    "orange": (251, 140, 0),
    "white": (245, 245, 245),
    "black": (33, 33, 33),
}
STYLES = ("solid", "ring", "glow", "lit")
BACKDROPS = ("flat", "bilinear", "vignette", "waves")
SEPARATION = 95.0  # least RGB distance between an object's colour and the backdrop under it


def render(rng: np.random.Generator, colour: str, shape: str, count: int,
           image_size: int) -> Image.Image:
    """``count`` copies of one colour-shape object, same style, on one backdrop."""
    size = image_size
    diameters = rng.uniform(0.22, 0.45, 1) if count == 1 else rng.uniform(0.2, 0.3, count)
    centres = _place(rng, diameters * size / 2, size)
    style = STYLES[rng.integers(len(STYLES))]
    ink = np.array(PALETTE[colour], np.float64) + rng.uniform(-10, 10, 3)
    coverage = np.zeros((size, size))
    lighting = np.ones((size, size))
    for (cx, cy), d in zip(centres, diameters):
        dist, inside = _distance(rng, shape, cx, cy, d * size / 2, size)
        coverage = np.maximum(coverage, _coverage(rng, style, dist, d * size / 2))
        if style == "lit":
            lighting = np.where(inside, _light(rng, cx, cy, d * size / 2, size), lighting)
    paint = np.clip(ink * lighting[..., None], 0, 255)
    backdrop = _backdrop_for(rng, ink, coverage, size)
    image = backdrop * (1 - coverage[..., None]) + paint * coverage[..., None]
    return Image.fromarray(_finish(rng, image))


def _place(rng: np.random.Generator, radii: np.ndarray, size: int) -> list[tuple[float, float]]:
    """Centres anywhere in the image, kept apart by their radii (rejection sampling)."""
    centres: list[tuple[float, float]] = []
    for r in radii:
        for _ in range(200):
            c = (rng.uniform(r, size - r), rng.uniform(r, size - r))
            if all(math.dist(c, o) > 1.15 * (r + ro) for o, ro in zip(centres, radii)):
                break
        centres.append(c)
    return centres


def _distance(rng: np.random.Generator, shape: str, cx: float, cy: float, r: float,
              size: int) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance in pixels (negative inside) of a rotated, stretched shape, and the
    inside as a boolean image.  Coordinates are scaled so the shape spans about [-1, 1]."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    spin = rng.uniform(-0.6, 0.6) if shape == "heart" else rng.uniform(0, 2 * math.pi)
    squash = math.exp(rng.uniform(-0.2, 0.2))
    u, v = (x - cx) / r, (cy - y) / r  # v points up
    u, v = u * math.cos(spin) + v * math.sin(spin), -u * math.sin(spin) + v * math.cos(spin)
    u, v = u / squash, v * squash
    d = {"circle": _sd_circle, "square": _sd_box, "triangle": _sd_triangle, "star": _sd_star,
         "heart": _sd_heart, "cross": _sd_plus}[shape](u, v)
    dist = d * r
    return dist, dist < 0


def _sd_circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.sqrt(u * u + v * v) - 0.92


def _sd_box(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    half, rounding = 0.72, 0.08
    qx, qy = np.abs(u) - half + rounding, np.abs(v) - half + rounding
    outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
    return outside + np.minimum(np.maximum(qx, qy), 0) - rounding


def _sd_triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Equilateral, pointing up, circumradius 1."""
    k = math.sqrt(3.0)
    side = 1.0 * k / 2  # half the side length for circumradius 1
    px = np.abs(u) - side
    py = v + 0.5
    flip = px + k * py > 0
    px, py = (np.where(flip, (px - k * py) / 2, px), np.where(flip, (-k * px - py) / 2, py))
    px = px - np.clip(px, -2 * side, 0)
    return -np.sqrt(px * px + py * py) * np.sign(py)


def _sd_star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Five points, outer radius 1, inner radius 0.5 (a fold into one sector, then a segment)."""
    r, inner = 1.0, 0.5
    k1x, k1y = 0.809016994375, -0.587785252292
    k2x, k2y = -k1x, k1y
    px, py = np.abs(u), v
    dot = np.maximum(k1x * px + k1y * py, 0)
    px, py = px - 2 * dot * k1x, py - 2 * dot * k1y
    dot = np.maximum(k2x * px + k2y * py, 0)
    px, py = px - 2 * dot * k2x, py - 2 * dot * k2y
    px = np.abs(px)
    py = py - r
    bax, bay = -k1y * inner, k1x * inner - 1.0  # rf * (-k1.y, k1.x) - (0, 1)
    h = np.clip((px * bax + py * bay) / (bax * bax + bay * bay), 0, r)
    return np.sqrt((px - bax * h) ** 2 + (py - bay * h) ** 2) * np.sign(py * bax - px * bay)


def _sd_heart(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Two lobes and a point; the formula's heart spans y in [0, 1.1], so it is shifted down
    and scaled up to fill [-1, 1]."""
    px, py = np.abs(u) / 1.55, (v + 1.0) / 1.55
    lobe = np.sqrt((px - 0.25) ** 2 + (py - 0.75) ** 2) - math.sqrt(2) / 4
    m = 0.5 * np.maximum(px + py, 0)
    point = np.sqrt(np.minimum(px ** 2 + (py - 1) ** 2, (px - m) ** 2 + (py - m) ** 2)) \
        * np.sign(px - py)
    return np.where(py + px > 1, lobe, point) * 1.55


def _sd_plus(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A plus sign: arms reaching 0.92, 0.34 thick on each side of the axis, rounded a little."""
    long, short, rounding = 0.86, 0.28, 0.06
    ax, ay = np.abs(u), np.abs(v)
    px, py = np.maximum(ax, ay), np.minimum(ax, ay)
    qx, qy = px - long, py - short
    k = np.maximum(qy, qx)
    wx = np.where(k > 0, qx, short - px)
    wy = np.where(k > 0, qy, -k)
    return np.sign(k) * np.sqrt(np.maximum(wx, 0) ** 2 + np.maximum(wy, 0) ** 2) - rounding


def _coverage(rng: np.random.Generator, style: str, dist: np.ndarray, r: float) -> np.ndarray:
    """How much of each pixel the ink covers, from the signed distance (in pixels)."""
    if style == "ring":
        thickness = rng.uniform(1.2, 2.6)
        return np.clip(thickness / 2 + 0.5 - np.abs(dist + thickness / 2), 0, 1)
    if style == "glow":
        return 1 / (1 + np.exp(np.clip(dist / rng.uniform(0.6, 1.2), -30, 30)))
    return np.clip(0.5 - dist, 0, 1)


def _light(rng: np.random.Generator, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """A brightness factor ramping across the object (0.7 to 1.25)."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    a = rng.uniform(0, 2 * math.pi)
    ramp = np.clip(((x - cx) * math.cos(a) + (y - cy) * math.sin(a)) / r, -1, 1)
    return 0.975 + 0.275 * ramp


def _backdrop_for(rng: np.random.Generator, ink: np.ndarray, coverage: np.ndarray,
                  size: int) -> np.ndarray:
    """A backdrop whose mean under the objects is at least SEPARATION from the ink; the most
    separated of a few draws otherwise."""
    weight = coverage / max(float(coverage.sum()), 1e-9)
    best, best_gap = None, -1.0
    for _ in range(10):
        backdrop = _backdrop(rng, size)
        under = (backdrop * weight[..., None]).sum(axis=(0, 1))
        gap = float(np.sqrt(((under - ink) ** 2).sum()))
        if gap >= SEPARATION:
            return backdrop
        if gap > best_gap:
            best, best_gap = backdrop, gap
    return best


def _random_grey(rng: np.random.Generator) -> np.ndarray:
    level = rng.uniform(0, 255)
    tint = rng.uniform(-18, 18, 3) if rng.random() < 0.5 else np.zeros(3)
    return np.clip(level + tint, 0, 255)


def _backdrop(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = BACKDROPS[rng.integers(len(BACKDROPS))]
    t = (np.arange(size) + 0.5) / size
    if kind == "flat":
        return np.broadcast_to(_random_grey(rng), (size, size, 3)).astype(np.float64)
    if kind == "bilinear":
        corners = [_random_grey(rng) for _ in range(4)]
        top = corners[0] * (1 - t)[:, None] + corners[1] * t[:, None]
        bottom = corners[2] * (1 - t)[:, None] + corners[3] * t[:, None]
        return top[None] * (1 - t)[:, None, None] + bottom[None] * t[:, None, None]
    if kind == "vignette":
        centre, rim = _random_grey(rng), _random_grey(rng)
        y, x = np.meshgrid(t, t, indexing="ij")
        fall = np.clip(np.hypot(x - 0.5, y - 0.5) / 0.7071, 0, 1) ** 1.5
        return centre * (1 - fall[..., None]) + rim * fall[..., None]
    base, swing = _random_grey(rng), rng.uniform(15, 40)
    y, x = np.meshgrid(t, t, indexing="ij")
    fx, fy = rng.uniform(-2.5, 2.5, 2)
    wave = np.sin(2 * math.pi * (fx * x + fy * y) + rng.uniform(0, 2 * math.pi))
    return np.clip(base + swing * wave[..., None], 0, 255)


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Sometimes a 3x3 box blur, sometimes uniform noise; then 8 bits."""
    if rng.random() < 0.2:
        padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
        image = sum(padded[dy:dy + image.shape[0], dx:dx + image.shape[1]]
                    for dy in range(3) for dx in range(3)) / 9
    if rng.random() < 0.3:
        image = image + rng.uniform(-12, 12, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)

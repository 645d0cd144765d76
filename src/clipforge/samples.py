"""Real photos for demos and tests, taken from scikit-image's bundled data (no download)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# scikit-image loader name -> what the photo shows (usable as a caption).
SAMPLE_PHOTOS: dict[str, str] = {
    "astronaut": "a portrait of an astronaut with the American flag",
    "chelsea": "a facial photo of a tabby cat",
    "coffee": "a cup of coffee on a saucer",
    "horse": "a black-and-white silhouette of a horse",
    "motorcycle_right": "a red motorcycle standing in a garage",
    "page": "a page of text in black and white",
    "rocket": "a rocket standing on a launchpad",
    "camera": "a person looking at a camera on a tripod",
}


def write_sample_photos(directory: str | Path) -> list[Path]:
    """Copy the photo files (PNG, and JPEG for the rocket) into ``directory`` unchanged."""
    try:
        bundled = resources.files("skimage.data")
    except ModuleNotFoundError as exc:
        raise RuntimeError("sample photos need scikit-image: pip install scikit-image") from exc
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SAMPLE_PHOTOS:
        source = next(f for f in bundled.iterdir() if f.name.rsplit(".", 1)[0] == name)
        path = directory / source.name
        path.write_bytes(source.read_bytes())
        paths.append(path)
    return paths

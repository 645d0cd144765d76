"""A contact sheet of search results: one self-contained HTML file (thumbnails inlined), to open
in a browser or send to someone without the collection."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageOps

from ..fileio import atomic_file
from .index import Hit, SearchIndex
from .video import clock

THUMBNAIL = 256

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }}
h1 {{ font-size: 1.2rem; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr));
         gap: 1rem; }}
figure {{ margin: 0; border: 1px solid #ddd; border-radius: 6px; padding: .5rem; }}
img {{ width: 100%; height: 200px; object-fit: contain; background: #f4f4f4; }}
figcaption {{ font-size: .8rem; overflow-wrap: anywhere; }}
.score {{ font-weight: 600; }}
.missing {{ height: 200px; display: flex; align-items: center; justify-content: center;
            background: #f4f4f4; color: #a00; font-size: .8rem; text-align: center; }}
</style></head>
<body><h1>{title}</h1><p>{count} result(s) from {index}</p>
<div class="grid">
{figures}
</div></body></html>
"""


def render_thumbnail(image: Image.Image, size: int = THUMBNAIL) -> bytes:
    """JPEG bytes at most ``size`` pixels on the long side, upright (EXIF orientation).  The
    contact sheet and the server's ``/thumbnails/{id}`` both use it."""
    image.draft("RGB", (size, size))  # JPEG not yet decoded: decode at a reduced scale
    image = ImageOps.exif_transpose(image).convert("RGB")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85, optimize=True)
    return out.getvalue()


def _figure(index: SearchIndex, rank: int, hit: Hit) -> str:
    name = html.escape(hit.path)
    try:
        data = base64.b64encode(render_thumbnail(index.open_image(hit.id))).decode()
        picture = f'<img src="data:image/jpeg;base64,{data}" alt="{name}">'
    except (KeyError, OSError) as exc:
        picture = f'<div class="missing">{html.escape(str(exc))}</div>'
    caption = f"<br>{html.escape(hit.caption)}" if hit.caption else ""
    if hit.start is not None:
        caption = f" {clock(hit.start)}&ndash;{clock(hit.end)}{caption}"
    return (f'<figure>{picture}<figcaption><span class="score">#{rank} &middot; '
            f"{hit.score:.4f}</span><br>{name}{caption}</figcaption></figure>")


def write_contact_sheet(index: SearchIndex, hits: Sequence[Hit], out: str | Path,
                        title: str = "search results") -> Path:
    """Write the results as an HTML page of thumbnails with scores (atomically)."""
    figures = "\n".join(_figure(index, rank, hit) for rank, hit in enumerate(hits, start=1))
    page = _PAGE.format(title=html.escape(title), count=len(hits),
                        index=html.escape(str(index.path)), figures=figures)
    with atomic_file(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return Path(out)

"""The server's locate routes: where in an image a text is, by :func:`clipforge.dense.locate`
with the served index's model, for an uploaded image (``POST /api/locate``) or an indexed item
(``GET /api/items/{item_id}/locate``).

The routes only translate: the library locates (:meth:`SearchIndex.locate` holds the index's
model lock around :func:`clipforge.dense.locate`), and the overlay is the library's
:func:`clipforge.dense.overlay`, drawn at most :data:`OVERLAY_SIDE` pixels on the long side and
sent as base64 in the JSON answer (one request, one model call; the page shows it from a
``data:`` URL, which its Content-Security-Policy allows).  Peak and box are in the image's own
pixels, whatever size the overlay is drawn at.

Uploads go through the server's own checks (:meth:`_Service.decoded`: formats, the pixel count
from the header, the aspect ratio, the body size by the middleware), and the answers' errors
have the API's shape (``{"detail": ...}``).  Locating holds far more than the decoded image (the
full-size map and its region: about 22 bytes a pixel over the image's 3), so an image takes
:data:`LOCATE_PIXEL_COST` times its pixels of the server's decode budget, an indexed one too.
A video segment is located on the frame at its start, the frame its thumbnail shows.
Everything here reads indexed data, so it is behind the token when there is one.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from PIL import Image

from ..dense import THRESHOLD, overlay
from ..model import CLIP
from .media import open_item_image
from .schema import MAX_QUERY_CHARS, IndexField, IndexName, ItemId, LocateOut

if TYPE_CHECKING:
    from ..dense import Location
    from .server import _Service, _Services

log = logging.getLogger(__name__)

OVERLAY_SIDE = 512  # pixels on the overlay's long side: a preview (thumbnails are 256)
LOCATE_PIXEL_COST = 8  # decode-budget pixels per image pixel while locating (25 bytes / 3)

Text = Annotated[str, Query(min_length=1, max_length=MAX_QUERY_CHARS,
                            description="what to look for, e.g. a red star")]
Threshold = Annotated[float, Query(gt=0.0, le=1.0, description=(
    "where the box's region ends, as a share of the map's range"))]
WithOverlay = Annotated[bool, Query(description="also send the overlay PNG")]


def add_locate_routes(app: FastAPI, services: _Services) -> None:
    """Add ``POST /api/locate`` and ``GET /api/items/{item_id}/locate`` to ``app``."""

    @app.post("/api/locate", response_model=LocateOut, tags=["locate"])
    def locate_upload(
            file: Annotated[UploadFile, File(description="the image to look in")],
            q: Annotated[str, Form(min_length=1, max_length=MAX_QUERY_CHARS,
                                   description="what to look for, e.g. a red star")],
            threshold: Annotated[float, Form(gt=0.0, le=1.0)] = THRESHOLD,
            overlay: Annotated[bool, Form()] = True,
            index: IndexField = None) -> LocateOut:
        """Where a text is in an uploaded image: the peak and a box in the image's pixels,
        and the map over the image as a PNG, by the model of the index named."""
        service = services.pick(index)
        check_query(service, q)
        with service.decoded(_read(file), cost=LOCATE_PIXEL_COST) as image:
            return located(service, image, q, threshold, overlay, upload=file.filename)

    @app.get("/api/items/{item_id}/locate", response_model=LocateOut, tags=["locate"])
    def locate_item(item_id: ItemId, q: Text, threshold: Threshold = THRESHOLD,
                    overlay: WithOverlay = True, index: IndexName = None) -> LocateOut:
        """Where a text is in an indexed item (a video segment: in the frame at its start,
        the thumbnail's frame), as for an upload."""
        service = services.pick(index)
        check_query(service, q)
        with item_image(service, item_id) as (image, start):
            return located(service, image, q, threshold, overlay, item=item_id, start=start)


def _read(upload: UploadFile) -> bytes:
    """The form's file (a spooled temporary file; the route runs in a worker thread)."""
    upload.file.seek(0)
    return upload.file.read()


def check_query(service: _Service, text: str) -> None:
    """What can be refused before an image is read: a blank text (400), or a served model
    without per-patch features (an ONNX export: 501, the server can search with it, not
    locate)."""
    if not text.strip():
        raise HTTPException(400, "the text to locate is empty")
    if not isinstance(service.index.model, CLIP):
        raise HTTPException(501, f"the index {service.name!r} is served with an ONNX model, "
                                 "which has no per-patch features to locate with; serve it "
                                 "with the PyTorch model (--backend torch)")


@contextlib.contextmanager
def item_image(service: _Service, item_id: int) -> Iterator[tuple[Image.Image, float | None]]:
    """An indexed item's image (a video segment's frame at its start) and that start, while
    it holds its share of the decode budget; 404 for no such item or an unreadable file."""
    with service.reading():
        hit = service.index.item(item_id)
        if hit is None:
            raise HTTPException(404, f"no item {item_id}")
        declared = (hit.width or 0) * (hit.height or 0)
        with service.budget.hold(declared * LOCATE_PIXEL_COST):
            image = open_item_image(service.index, item_id, "locate", service.name)
            with _closing(image):
                yield image.convert("RGB") if image.mode != "RGB" else image, hit.start


@contextlib.contextmanager
def _closing(image: Image.Image) -> Iterator[None]:
    try:
        yield
    finally:
        image.close()


def located(service: _Service, image: Image.Image, text: str, threshold: float,
            with_overlay: bool, *, upload: str | None = None, item: int | None = None,
            start: float | None = None) -> LocateOut:
    """Locate ``text`` in ``image`` with the service's index; its ValueError (an empty or
    over-long text) is the client's mistake: 400."""
    began = time.perf_counter()
    try:
        with service.metrics.model_time("image"):
            found = service.index.locate(image, text, threshold=threshold)
    except ValueError as exc:
        raise HTTPException(400, service.public(str(exc))) from exc
    png, png_size = _overlay_png(image, found) if with_overlay else (None, None)
    return LocateOut(index=service.name, text=text, image=upload, item=item, start=start,
                     size=list(found.size), peak=list(found.peak), box=list(found.box),
                     score=round(found.score, 6), grid=list(found.grid.shape),
                     overlay_png=png, overlay_size=png_size,
                     took_ms=round((time.perf_counter() - began) * 1000, 2))


def _overlay_png(image: Image.Image, found: Location) -> tuple[str, list[int]]:
    """The overlay, at most OVERLAY_SIDE pixels a side, as base64 PNG bytes, and its size."""
    picture = overlay(image, found, max_side=OVERLAY_SIDE)
    out = io.BytesIO()
    picture.save(out, format="PNG", optimize=False)
    return base64.b64encode(out.getvalue()).decode("ascii"), list(picture.size)

"""The search server's JSON shapes, request limits and parameter types its modules share
(:mod:`.server`, :mod:`.knn_service` which builds on the server's answers, and :mod:`.media`):
kept apart so that they import them from here, with no import cycle between them."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Form, Query
from fastapi import Path as PathParam
from pydantic import BaseModel, Field, StringConstraints

MAX_QUERY_CHARS = 1000  # per text, label or template: far beyond any model's context
MAX_TEXTS = 256  # texts per /api/embed call
MAX_UPLOAD_BYTES = 20 * 2**20  # a multipart body (an image upload)
MAX_INDEX_NAME_CHARS = 64  # a served index's name (it appears in URLs and metric labels)


def shown_name(name: str, limit: int = 100) -> str:
    """A client-given name as an error message quotes it: cut to ``limit`` characters, so a
    huge query parameter cannot make a huge response."""
    return name if len(name) <= limit else name[:limit] + "..."


# ---------------------------------------------------------------- parameters routes share
ItemId = Annotated[int, PathParam(ge=0, le=2**63 - 1, description="an id from a result")]
INDEX_HELP = "the index's name (GET /api/indexes); default: the first index served"
IndexName = Annotated[str | None, Query(max_length=MAX_INDEX_NAME_CHARS, description=INDEX_HELP)]
IndexField = Annotated[str | None, Form(max_length=MAX_INDEX_NAME_CHARS, description=INDEX_HELP)]


# ------------------------------------------------------------------------------ JSON shapes
class HitOut(BaseModel):
    id: int
    path: str = Field(description="relative to the folder the index was built from, or the "
                                  "file name alone; never absolute")
    score: float | None = Field(description="cosine similarity; null for plain item lookups")
    caption: str | None
    width: int | None
    height: int | None
    extra: dict[str, Any] | None = Field(None, description="other metadata columns (CSV)")
    thumbnail: str = Field(description="URL of a JPEG thumbnail (a video segment's: the frame "
                                       "at its start)")
    start: float | None = Field(None, description="a video segment's start, in seconds from "
                                                  "the video's start; null for an image")
    end: float | None = Field(None, description="a video segment's end, in seconds")
    video: str | None = Field(None, description="URL of a video segment's whole video file "
                                                "(byte ranges allowed); null for an image")


class QueryOut(BaseModel):
    text: str | None = None
    image: str | None = Field(None, description="file name of the uploaded query image")
    similar_to: int | None = Field(None, description="item id of a 'more like this' query")


class SearchOut(BaseModel):
    index: str = Field(description="the name of the index that answered")
    query: QueryOut
    results: list[HitOut]
    took_ms: float


class LabelOut(BaseModel):
    label: str
    probability: float


class ClassifyOut(BaseModel):
    labels: list[LabelOut]
    took_ms: float


class EmbedIn(BaseModel):
    texts: list[Annotated[str, StringConstraints(max_length=MAX_QUERY_CHARS)]] = Field(
        default_factory=list, max_length=MAX_TEXTS)
    index: str | None = Field(None, max_length=MAX_INDEX_NAME_CHARS, description=(
        "the index whose model embeds (GET /api/indexes); default: the first"))


class EmbedOut(BaseModel):
    model: str | None
    dim: int
    texts: list[list[float]]
    image: list[float] | None


class IndexOut(BaseModel):
    """One served index, by name (never by path)."""

    name: str
    status: str = Field(description="ok, or unavailable (see detail)")
    items: int | None = None
    model: str | None = None
    generation: int | None = None
    detail: str | None = Field(None, description="why the index cannot be read")


class IndexesOut(BaseModel):
    default: str = Field(description="the index used when a request names none")
    indexes: list[IndexOut]


class HealthOut(BaseModel):
    status: str = Field(description="ok, or degraded when an index other than the default "
                                    "cannot be read")
    items: int = Field(description="of the default index, as are model and generation")
    model: str | None
    generation: int | None
    indexes: list[IndexOut] = Field(default_factory=list, description="every served index")


class UnavailableOut(BaseModel):
    status: str = "unavailable"
    detail: str = Field(description="why the (default) index cannot be read")
    indexes: list[IndexOut] = Field(default_factory=list, description="every served index")


class LocateOut(BaseModel):
    """Where a text is in one image (``clipforge.locate``), in the image's own pixels."""

    index: str = Field(description="the name of the index whose model located")
    text: str
    image: str | None = Field(None, description="file name of the uploaded image")
    item: int | None = Field(None, description="the indexed item located in")
    start: float | None = Field(None, description="a video segment's start: its frame at this "
                                                  "time (the thumbnail's) was located in")
    size: list[int] = Field(description="[width, height] of the image located in")
    peak: list[int] = Field(description="[x, y] of the pixel where the map is highest")
    box: list[int] = Field(description="[x0, y0, x1, y1] around the peak where the map stays "
                                       "above the threshold (x1, y1 exclusive)")
    score: float = Field(description="the map's highest cosine")
    grid: list[int] = Field(description="[rows, columns] of the model's map (its cells)")
    overlay_png: str | None = Field(None, description=(
        "base64 of a PNG: the map over the image, box and peak drawn, at most overlay_side "
        "pixels on the long side (null when overlay=false)"))
    overlay_size: list[int] | None = Field(None, description="[width, height] of that PNG")
    took_ms: float

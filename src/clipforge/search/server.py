"""HTTP front end of a :class:`~clipforge.search.SearchIndex`: a JSON API, thumbnails and a
small web page.

Everything the server does is a thin translation between HTTP and the index, which already
serialises model calls and swaps in newer committed generations atomically.  What lives here is
what only a network service needs:

* uploads are untrusted: the body size is capped (by Content-Length before reading, and by
  counting bytes while reading, so a lying or chunked client is caught too), only a few image
  formats are parsed, and the pixel count in the header is checked before any decoding, so
  a small file cannot expand into gigabytes;
* files are reached by integer item id only, never by a path from the request;
* ``index.refresh()`` runs before each query, so items added by ``clipforge index build`` while
  the server runs appear without a restart;
* endpoints that run the model are plain ``def`` functions: FastAPI runs them in its thread
  pool, so a slow query never blocks the event loop (thumbnails and static files keep flowing).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import uvicorn
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.datastructures import UploadFile as FormFile

from .. import __version__
from .html import render_thumbnail
from .index import MAX_K

if TYPE_CHECKING:
    from . import Hit, SearchIndex

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
MAX_QUERY_CHARS = 1000  # far beyond any model's context; the tokenizer rejects long texts first
MAX_LABELS = 256  # zero-shot labels per /api/classify call (each one runs the text encoder)
MAX_TEXTS = 256  # texts per /api/embed call
# Formats a browser upload can reasonably be in; PIL's rarer parsers stay out of reach.
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# The page loads nothing from elsewhere; uploaded images are previewed from blob: URLs.
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
            "base-uri 'none'; frame-ancestors 'none'")


# ------------------------------------------------------------------------------ JSON shapes
class HitOut(BaseModel):
    id: int
    path: str
    score: float | None = Field(description="cosine similarity; null for plain item lookups")
    caption: str | None
    width: int | None
    height: int | None
    extra: dict[str, Any] | None = Field(None, description="other metadata columns (CSV)")
    thumbnail: str = Field(description="URL of a JPEG thumbnail")


class QueryOut(BaseModel):
    text: str | None = None
    image: str | None = Field(None, description="file name of the uploaded query image")
    similar_to: int | None = Field(None, description="item id of a 'more like this' query")


class SearchOut(BaseModel):
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
    texts: list[str] = Field(default_factory=list, max_length=MAX_TEXTS)


class EmbedOut(BaseModel):
    model: str | None
    dim: int
    texts: list[list[float]]
    image: list[float] | None


class HealthOut(BaseModel):
    status: str
    items: int
    model: str | None
    generation: int | None


# Parameter types shared by the GET and form endpoints.
K = Annotated[int, Query(ge=1, le=MAX_K, description="number of results")]
Threshold = Annotated[float | None, Query(ge=-1.0, le=1.0,
                                          description="drop results scoring below this")]
Collapse = Annotated[float | None, Query(gt=0.0, le=1.0, description=(
    "fold near-duplicates: results more similar than this to a better one are dropped"))]
Weight = Annotated[float, Form(ge=0.0, le=100.0)]
ItemId = Annotated[int, PathParam(ge=0, le=2**63 - 1, description="an id from a result")]


# ----------------------------------------------------------------------------- uploads
def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Uploaded bytes -> RGB image, or HTTP 400 saying why not.

    The pixel count is checked from the header, before decoding: a PNG of one colour can
    declare 20000x20000 pixels in a few kilobytes and would take gigabytes once decoded.  PIL's
    own bomb limit raises DecompressionBombError inside ``Image.open`` for the worst cases; for
    images between its warning level and that, the explicit check below refuses them too
    (``Image.MAX_IMAGE_PIXELS`` also caps ``max_pixels``).  Catching the warning itself would
    need ``warnings.catch_warnings``, which is not thread-safe.
    """
    if not data:
        raise HTTPException(400, "the uploaded file is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except Image.DecompressionBombError as exc:
        raise HTTPException(400, f"image too large to decode safely: {exc}") from exc
    except Exception as exc:  # UnidentifiedImageError, or a parser's own error on junk
        raise HTTPException(400, "not an image in a supported format "
                                 f"({', '.join(UPLOAD_FORMATS)})") from exc
    width, height = image.size
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    if width * height > limit:
        raise HTTPException(400, f"image is {width}x{height} = {width * height} pixels, more "
                                 f"than the limit of {limit}")
    try:
        return image.convert("RGB")  # decodes now: a truncated or corrupt body fails here
    except Exception as exc:
        raise HTTPException(400, f"cannot decode the {image.format} image: {exc}") from exc


def _read_upload(upload: UploadFile, max_pixels: int) -> Image.Image:
    """The form's file, decoded; runs in a worker thread (reads a spooled temporary file)."""
    upload.file.seek(0)
    return decode_upload(upload.file.read(), max_pixels)


def parse_labels(values: list[str]) -> list[str]:
    """One field value is a comma-separated list; repeated fields are taken as they are, so a
    label may itself contain a comma ("Washington, D.C.")."""
    if len(values) == 1:
        values = values[0].split(",")
    labels = [v.strip() for v in values if v.strip()]
    if not labels:
        raise HTTPException(400, "no labels: give `labels` as 'cat, dog' or repeat the field")
    if len(labels) > MAX_LABELS:
        raise HTTPException(400, f"{len(labels)} labels; at most {MAX_LABELS} per request")
    return labels


class BodySizeLimit:
    """ASGI middleware capping request bodies at ``limit`` bytes with a JSON 413.

    A declared Content-Length above the limit is refused at once, before routing and before a
    byte of the body is read.  Bodies are also counted as they arrive, which catches chunked
    uploads (no Content-Length) and clients sending more than they declared: the first chunk
    past the limit raises HTTPException(413) inside whatever is reading the body (form parsing,
    ``request.body()``), and FastAPI answers it like any other HTTP error.
    """

    def __init__(self, app: Any, limit: int, detail: str):
        self.app, self.limit, self.detail = app, limit, detail

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, self.detail)
            return message

        async def watching_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except HTTPException as exc:  # raised where no exception handler was around
            if exc.status_code != 413 or started:
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        response = JSONResponse({"detail": self.detail}, status_code=413,
                                headers={"Connection": "close"})
        await response(scope, receive, send)


# ------------------------------------------------------------------------ text batching
class _Pending:
    __slots__ = ("text", "vector", "error", "done")

    def __init__(self, text: str):
        self.text, self.vector, self.error, self.done = text, None, None, False


class TextBatcher:
    """Concurrent text queries share one text-encoder call.

    Each request thread queues its text, then waits for the turn; whoever holds the turn embeds
    everything queued so far (its own text and those that arrived while the previous batch ran),
    so the others find their vector ready.  There is no timer: a lone query runs at once, and
    batches form by themselves under load.  A batch costs far less than its texts one by one
    (16 threads of ViT-B/32 text queries on 2 CPU cores: 1.75x the throughput).  A text the
    tokenizer refuses fails only its own request.
    """

    def __init__(self, embed: Callable[[list[str]], np.ndarray], max_batch: int = 32):
        self._embed = embed
        self.max_batch = max_batch
        self._queue: list[_Pending] = []
        self._queue_lock = threading.Lock()
        self._turn = threading.Lock()

    def __call__(self, text: str) -> np.ndarray:
        """The unit embedding of ``text`` (ValueError if the tokenizer refuses it)."""
        pending = _Pending(text)
        with self._queue_lock:
            self._queue.append(pending)
        while not pending.done:
            with self._turn:
                if pending.done:
                    break
                with self._queue_lock:
                    batch = self._queue[:self.max_batch]
                    del self._queue[:self.max_batch]
                self._run(batch)
        if pending.error is not None:
            raise pending.error
        return pending.vector

    def _run(self, batch: list[_Pending]) -> None:
        try:
            try:
                vectors = list(self._embed([p.text for p in batch]))
            except ValueError:  # an over-long text: embed one by one, so only it fails
                vectors = []
                for p in batch:
                    try:
                        vectors.append(self._embed([p.text])[0])
                    except ValueError as exc:
                        vectors.append(None)
                        p.error = exc
            for p, vector in zip(batch, vectors):
                p.vector = vector
        except Exception as exc:  # whatever went wrong, nobody waits forever
            for p in batch:
                p.error = p.error or exc
        finally:
            for p in batch:
                p.done = True


# -------------------------------------------------------------------------- thumbnails
class ThumbnailCache:
    """A bounded least-recently-used map from (index generation, item id) to JPEG bytes.

    The generation is part of the key because a rebuilt index may give an id to another image.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[tuple[Any, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, int]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple[Any, int], data: bytes) -> None:
        with self._lock:
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


# ------------------------------------------------------------------------------- the app
def create_app(index: SearchIndex, *, max_upload_bytes: int = 20 * 2**20,
               max_pixels: int = 50_000_000, thumbnail_size: int = 256,
               thumbnail_cache: int = 2048, batch_texts: bool = True) -> FastAPI:
    """The FastAPI application serving ``index``; see the module docstring for the design.

    ``max_upload_bytes`` caps every request body (413 beyond it), ``max_pixels`` the size of an
    uploaded image as its header declares it (400 beyond it), ``thumbnail_cache`` the number of
    thumbnails kept in memory; ``batch_texts`` embeds concurrent text queries together
    (:class:`TextBatcher`).
    """
    # FastAPIOffline serves the /docs and /redoc pages' scripts itself (FastAPI's own pages load
    # them from a CDN, which leaves /docs blank on a machine without internet access).
    app = FastAPIOffline(title="clipforge search", version=__version__,
                         description="Text, image and mixed search over a clipforge index.")
    thumbnails = ThumbnailCache(thumbnail_cache)
    embed_text = TextBatcher(index.embed_texts) if batch_texts else None
    too_large = f"request body too large: the limit is {max_upload_bytes} bytes"
    app.add_middleware(BodySizeLimit, limit=max_upload_bytes, detail=too_large)

    last_refresh_error = [""]  # logged once, not on every request while it lasts

    def refresh() -> None:
        """Pick up a newer generation; a failed refresh keeps the current one serving."""
        try:
            if index.refresh():
                log.info("index refreshed: %d items", len(index))
            last_refresh_error[0] = ""
        except Exception as exc:
            if str(exc) != last_refresh_error[0]:
                log.exception("index refresh failed; still serving the previous generation")
            last_refresh_error[0] = str(exc)

    def hit_out(hit: Hit) -> HitOut:
        score = None if hit.score is None or math.isnan(hit.score) else float(hit.score)
        return HitOut(id=hit.id, path=str(hit.path), score=score, caption=hit.caption,
                      width=hit.width, height=hit.height, extra=hit.extra,
                      thumbnail=f"/thumbnails/{hit.id}")

    def answer(query: QueryOut, find: Callable[[], list[Hit]]) -> SearchOut:
        """Run a query on the newest generation; the index's ValueError (empty or over-long
        text, bad weights) is the client's mistake (400), its KeyError an unknown item (404)."""
        start = time.perf_counter()
        refresh()
        try:
            hits = find()
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from exc
        except KeyError as exc:
            raise HTTPException(404, f"no item {query.similar_to}") from exc
        return SearchOut(query=query, results=[hit_out(h) for h in hits],
                         took_ms=round((time.perf_counter() - start) * 1000, 2))

    def text_hits(text: str, k: int, threshold: float | None,
                  collapse: float | None) -> list[Hit]:
        if embed_text is None or not text.strip():  # (the index words the empty-text error)
            return index.search(text=text, k=k, threshold=threshold, collapse=collapse)
        return index.search_vector(embed_text(text), k, threshold=threshold, collapse=collapse)

    @app.get("/api/search", response_model=SearchOut, tags=["search"])
    def search_text(q: Annotated[str, Query(min_length=1, max_length=MAX_QUERY_CHARS,
                                            description="text query")],
                    k: K = 20, threshold: Threshold = None, collapse: Collapse = None
                    ) -> SearchOut:
        """Items ranked by similarity to a text."""
        return answer(QueryOut(text=q), lambda: text_hits(q, k, threshold, collapse))

    @app.post("/api/search/image", response_model=SearchOut, tags=["search"])
    def search_image(file: Annotated[UploadFile, File(description="query image")],
                     q: Annotated[str | None, Form(max_length=MAX_QUERY_CHARS,
                                                   description="optional text to mix in")]
                     = None,
                     text_weight: Weight = 1.0, image_weight: Weight = 1.0,
                     k: Annotated[int, Form(ge=1, le=MAX_K)] = 20,
                     threshold: Annotated[float | None, Form(ge=-1.0, le=1.0)] = None,
                     collapse: Annotated[float | None, Form(gt=0.0, le=1.0)] = None
                     ) -> SearchOut:
        """Items ranked by similarity to an uploaded image, or to a weighted mix of the image
        and a text (``q``)."""
        image = _read_upload(file, max_pixels)
        text = q if q and q.strip() else None  # an empty form field means "no text"
        return answer(QueryOut(text=text, image=file.filename), lambda: index.search(
            text=text, image=image, text_weight=text_weight, image_weight=image_weight, k=k,
            threshold=threshold, collapse=collapse))

    @app.get("/api/items/{item_id}", response_model=HitOut, tags=["items"])
    def item(item_id: ItemId) -> HitOut:
        """Metadata of one indexed item."""
        refresh()
        hit = index.item(item_id)
        if hit is None:
            raise HTTPException(404, f"no item {item_id}")
        return hit_out(hit)

    @app.get("/api/items/{item_id}/similar", response_model=SearchOut, tags=["items"])
    def similar(item_id: ItemId, k: K = 20, threshold: Threshold = None,
                collapse: Collapse = None) -> SearchOut:
        """"More like this": items nearest to an indexed item, the item itself left out."""
        return answer(QueryOut(similar_to=item_id), lambda: index.similar(
            item_id, k=k, threshold=threshold, collapse=collapse))

    @app.post("/api/classify", response_model=ClassifyOut, tags=["models"])
    def classify(file: Annotated[UploadFile, File(description="image to classify")],
                 labels: Annotated[list[str], Form(description=(
                     "class names: one comma-separated value, or the field repeated"))],
                 template: Annotated[str, Form(min_length=1, max_length=MAX_QUERY_CHARS)]
                 = "a photo of a {}.") -> ClassifyOut:
        """Zero-shot classification of an uploaded image among ``labels``."""
        start = time.perf_counter()
        names = parse_labels(labels)
        try:  # the index formats it: "{0} {1}" or "{name}" would fail there with a 500
            template.format("label")
        except (IndexError, KeyError, ValueError) as exc:
            raise HTTPException(400, "template must contain one {} for the label, and no "
                                     "other braces") from exc
        image = _read_upload(file, max_pixels)
        try:
            ranked = index.classify(image, names, template=template)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from exc
        return ClassifyOut(labels=[LabelOut(label=n, probability=float(p)) for n, p in ranked],
                           took_ms=round((time.perf_counter() - start) * 1000, 2))

    def embed_now(texts: list[str], data: bytes | None) -> EmbedOut:
        image = decode_upload(data, max_pixels) if data is not None else None
        try:
            text_vectors = index.embed_texts(texts).tolist() if texts else []
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from exc
        image_vector = index.embed_image(image).tolist() if image is not None else None
        dim = len(image_vector) if image_vector is not None else (
            len(text_vectors[0]) if text_vectors else 0)
        return EmbedOut(model=index.info.get("model"), dim=dim, texts=text_vectors,
                        image=image_vector)

    embed_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": EmbedIn.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary"},
            "texts": {"type": "array", "items": {"type": "string"}}}}},
    }}}

    @app.post("/api/embed", response_model=EmbedOut, tags=["models"], openapi_extra=embed_body)
    async def embed(request: Request) -> EmbedOut:
        """Unit-norm embeddings of texts (JSON ``{"texts": [...]}``, or repeated ``texts``
        form fields) and/or of an image (multipart field ``file``)."""
        content_type = request.headers.get("content-type", "")
        data = None
        if content_type.startswith("multipart/form-data"):
            async with request.form(max_files=1, max_fields=MAX_TEXTS) as form:
                texts = [v for v in form.getlist("texts") if isinstance(v, str)]
                upload = form.get("file")
                if isinstance(upload, FormFile):  # not a plain text field
                    data = await upload.read()
        elif content_type.startswith("application/json"):
            try:
                texts = EmbedIn.model_validate_json(await request.body()).texts
            except ValidationError as exc:
                raise RequestValidationError(exc.errors(include_url=False)) from exc
        else:
            raise HTTPException(415, "send JSON {\"texts\": [...]} or a multipart form")
        if len(texts) > MAX_TEXTS:
            raise HTTPException(400, f"{len(texts)} texts; at most {MAX_TEXTS} per request")
        if not texts and data is None:
            raise HTTPException(400, "nothing to embed: give texts, an image file, or both")
        return await run_in_threadpool(embed_now, texts, data)

    @app.get("/thumbnails/{item_id}", tags=["items"],
             responses={200: {"content": {"image/jpeg": {}}}})
    def thumbnail(item_id: ItemId, request: Request) -> Response:
        """A JPEG thumbnail of an indexed item.  Only the integer id comes from the request;
        the index maps it to the file (or archive member) it recorded."""
        refresh()
        key = (index.info.get("generation"), item_id)
        data = thumbnails.get(key)
        if data is None:
            if index.item(item_id) is None:
                raise HTTPException(404, f"no item {item_id}")
            try:
                with index.open_image(item_id) as image:
                    data = render_thumbnail(image, thumbnail_size)
            except KeyError as exc:
                raise HTTPException(404, f"no item {item_id}") from exc
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                log.warning("thumbnail of item %d: %s", item_id, exc)
                raise HTTPException(404, f"the image of item {item_id} cannot be read") from exc
            thumbnails.put(key, data)
        etag = '"' + hashlib.blake2b(data, digest_size=12).hexdigest() + '"'
        headers = {"Cache-Control": "public, max-age=3600", "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/jpeg", headers=headers)

    @app.get("/healthz", response_model=HealthOut, tags=["service"])
    def healthz() -> HealthOut:
        """Liveness and what is being served."""
        refresh()
        info = index.info
        return HealthOut(status="ok", items=len(index), model=info.get("model"),
                         generation=info.get("generation"))

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={
            "Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


# ------------------------------------------------------------------------------ running
def serve(index: SearchIndex, host: str = "127.0.0.1", port: int = 8000, *,
          log_level: str = "info", **options: Any) -> None:
    """Serve ``index`` with uvicorn until interrupted; ``options`` go to :func:`create_app`.

    Loopback by default: the API has no authentication, and anyone who can reach it can read
    every indexed image.
    """
    if host not in LOOPBACK_HOSTS:
        log.warning("serving on %s: every indexed image is readable by whoever can reach this "
                    "address, without authentication", host)
    uvicorn.run(create_app(index, **options), host=host, port=port, log_level=log_level)


@contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                   timeout: float = 30.0) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread; yield its base URL, then stop it.

    Port 0 lets the OS pick a free port (no race with other processes); the URL carries the
    port actually bound.  For tests, benchmarks and notebooks.
    """
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="clipforge-search-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout)

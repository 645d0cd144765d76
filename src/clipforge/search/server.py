"""HTTP front end of a :class:`~clipforge.search.SearchIndex`: a JSON API, thumbnails and a
small web page.

Everything the server does is a thin translation between HTTP and the index, which already
serialises model calls and swaps in newer committed generations atomically.  What lives here is
what only a network service needs:

* uploads are untrusted: the body size is capped (by Content-Length before reading, and by
  counting bytes while reading, so a lying or chunked client is caught too), only a few image
  formats are parsed, and the pixel count in the header is checked before any decoding, so
  a small file cannot expand into gigabytes; concurrent decodes share a pixel budget;
* clients are untrusted too: a request must arrive by fixed deadlines (a slow or silent client
  cannot hold a connection), the number of connections is capped, texts and labels are
  capped in length before they reach the tokenizer, and only the Host names the server is
  bound to are answered, so a DNS-rebinding web page cannot read the index through a
  visitor's browser;
* every response carries security headers (Content-Security-Policy, nosniff, no framing);
* one client address may have only so many requests in flight (429 beyond:
  :class:`ClientLimit`), so a single client cannot take every connection and the model's time;
* other web sites' pages may call the API from a browser only if their origins are listed
  (``cors_origins``: CORS); by default no CORS headers are sent, so only the server's own page
  can read answers;
* with a token (``create_app(token=...)``, ``clipforge serve --token-file``), the API and the
  thumbnails answer only requests carrying ``Authorization: Bearer <token>``; the page, its
  static files, the API docs and ``/healthz`` stay open, since they show nothing of the index
  (:class:`BearerAuth`); ``clipforge serve`` refuses a non-loopback address without a token;
  it serves HTTPS when given a certificate and its key (:func:`check_tls`), else plain HTTP;
* where in an image a text is (``POST /api/locate`` for an upload, ``GET
  /api/items/{id}/locate`` for an indexed item: :mod:`.locate_routes`) is the library's
  ``clipforge.locate``, under the same upload checks, with locating's larger share of the
  decode budget;
* ``/metrics`` serves Prometheus metrics (:mod:`.metrics`: requests by route template, latency,
  model time, index size), behind the token like the API;
* files are reached by integer item id only (thumbnails, and the video files of video
  segments, :mod:`.media`), never by a path from the request, and no answer shows an absolute
  path (:func:`display_path`; the index's folder is named by its name only), so a client
  learns nothing of the server's directory layout;
* ``index.refresh()`` runs before each query, so items added by ``clipforge index build`` while
  the server runs appear without a restart, and an index that can no longer be read (deleted,
  damaged) answers 503 rather than old data;
* endpoints that run the model are plain ``def`` functions: FastAPI runs them in its thread
  pool, so a slow query never blocks the event loop (thumbnails and static files keep flowing);
* several indexes may be served by name (``create_app({"a": index_a, "b": index_b})``), each
  with its own model, caches and health (:class:`_Service`); a request picks one with
  ``index`` (a query parameter, form field or JSON field), else gets the first; item ids,
  and so thumbnail URLs, are per index.

Every bound is a module constant below and a parameter of :func:`create_app`,
:class:`ServerLimits` or :func:`serve` (and an option of ``clipforge serve``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import ipaddress
import logging
import math
import os
import re
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlencode

import h11
import numpy as np
import uvicorn
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.datastructures import UploadFile as FormFile
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from uvicorn.protocols.http.h11_impl import H11Protocol

from .. import __version__
from ..image.transform import ImageLoadError, check_aspect_ratio
from ..reading import printable_name
from .html import render_thumbnail
from .index import MAX_K, IndexUnavailableError
from .knn_service import PromptFilter, add_knn_routes
from .locate_routes import add_locate_routes
from .media import add_video_routes, open_item_image
from .metrics import RequestMetrics, ServerMetrics, add_metrics_route
from .schema import (
    MAX_INDEX_NAME_CHARS,
    MAX_QUERY_CHARS,
    MAX_TEXTS,
    MAX_UPLOAD_BYTES,
    ClassifyOut,
    EmbedIn,
    EmbedOut,
    HealthOut,
    HitOut,
    IndexesOut,
    IndexField,
    IndexName,
    IndexOut,
    ItemId,
    LabelOut,
    QueryOut,
    SearchOut,
    UnavailableOut,
    shown_name,
)

if TYPE_CHECKING:
    from . import Hit, SearchIndex

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
MAX_LABELS = 256  # zero-shot labels per /api/classify call (each one runs the text encoder)
MAX_JSON_BYTES = 4 * 2**20  # any other body: 256 texts of 1000 characters, JSON-escaped
MAX_PIXELS = 50_000_000  # one uploaded image, as its header declares it
DECODE_BUDGET_PIXELS = 100_000_000  # uploaded pixels decoded and held at once (300 MB RGB)
DECODE_WAIT_S = 2.0  # how long an upload waits for decode budget before a 503
DECODE_THREADS = 2  # threads that decode uploads (their malloc arenas hold the decoded images)
HEADER_TIMEOUT_S = 10.0  # from a request's first byte (or the connection) to its last header
BODY_TIMEOUT_S = 60.0  # from the first read of a body to its end: 20 MB at 2.7 Mbit/s
KEEP_ALIVE_S = 5.0  # an idle connection between requests (uvicorn's timeout_keep_alive)
MAX_CONNECTIONS = 128  # open connections; requests beyond get 503 (uvicorn limit_concurrency)
MAX_CLIENT_REQUESTS = 8  # requests in flight from one client address; beyond get 429
CLIENT_RETRY_AFTER_S = 1  # the Retry-After of that 429: requests in flight end quickly
# Formats a browser upload can reasonably be in; PIL's rarer parsers stay out of reach.
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")  # as they appear in a Host header
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
CLOSE = {"Connection": "close"}  # after a refused body: its rest is never read
MIN_TOKEN_CHARS = 16  # an access token shorter than this is refused (16 random characters
# from token_urlsafe are 96 bits)
TOKEN_ENV = "CLIPFORGE_API_TOKEN"
TOKEN_HINT = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'  # prints one
# Reachable without the token: what shows nothing of the index (the page and its files, the API
# description and its docs pages, the health check).  A prefix covers a static-file mount only.
OPEN_PATHS = ("/", "/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
OPEN_PREFIXES = ("/static/", "/static-offline-docs/")

# Every response: everything comes from this server; uploads are previewed from blob: URLs, and
# with a token, videos play from blob: URLs too (a <video src> cannot send the header).
CSP = ("default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
# FastAPI's /docs and /redoc pages start Swagger UI and ReDoc with an inline script (allowed by
# its hash, computed from the page as sent) and style themselves inline.
DOCS_PAGES = ("/docs", "/docs/oauth2-redirect", "/redoc")
DOCS_CSP = ("default-src 'self'; script-src 'self'{hashes}; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; worker-src 'self' blob:; object-src 'none'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
# CORS: what a listed origin's page may send (the token, JSON) and read of the answers.
CORS_METHODS = ("GET", "POST")
CORS_HEADERS = ("Authorization", "Content-Type")
CORS_EXPOSED = ("Retry-After", "WWW-Authenticate")  # not readable cross-origin by default
# An origin as a browser sends it: scheme, host (name, IPv4 or bracketed IPv6), optional port.
ORIGIN_PATTERN = re.compile(r"(https?)://([a-z0-9_.-]+|\[[0-9a-f:.]+\])(?::([0-9]{1,5}))?",
                            re.IGNORECASE)
DEFAULT_PORTS = {"http": 80, "https": 443}
# A served index's name: it appears in URLs, form fields and metric labels as it is.
INDEX_NAME_PATTERN = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_INDEX_NAME_CHARS}}}")
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                    "Referrer-Policy": "no-referrer",
                    "Cross-Origin-Resource-Policy": "same-origin"}


# Parameter types shared by the GET and form endpoints.
K = Annotated[int, Query(ge=1, le=MAX_K, description="number of results")]
Threshold = Annotated[float | None, Query(ge=-1.0, le=1.0,
                                          description="drop results scoring below this")]
Collapse = Annotated[float | None, Query(gt=0.0, le=1.0, description=(
    "fold near-duplicates: results more similar than this to a better one are dropped"))]
Weight = Annotated[float, Form(ge=0.0, le=100.0)]


# ----------------------------------------------------------------------------- uploads
def open_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Uploaded bytes -> an image whose header is read and checked but whose pixels are not
    yet decoded, or HTTP 400 saying why not.

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
        check_aspect_ratio(image.size)  # before preprocessing resamples a strip to gigabytes
    except ImageLoadError as exc:
        raise HTTPException(400, str(exc)) from None
    return image


def decode_image(image: Image.Image) -> Image.Image:
    """An opened upload, decoded to RGB (a truncated or corrupt body fails here: 400).  An RGB
    image is returned as decoded: ``convert("RGB")`` would copy it, doubling its memory."""
    try:
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as exc:
        raise HTTPException(400, f"cannot decode the {image.format} image: {exc}") from exc


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Uploaded bytes -> RGB image, or HTTP 400 saying why not (see :func:`open_upload`)."""
    return decode_image(open_upload(data, max_pixels))


def _read_upload(upload: UploadFile) -> bytes:
    """The form's file; runs in a worker thread (reads a spooled temporary file)."""
    upload.file.seek(0)
    return upload.file.read()


class PixelBudget:
    """Bounds the memory of decoded uploads: at most ``total`` pixels held at once.

    Each upload takes its pixel count (known from the header) before it is decoded and gives
    it back when its request is done with the image.  An upload that cannot have its share
    within ``wait`` seconds gets 503 with Retry-After, so a burst of large uploads is turned
    away instead of taking the server's memory, and everything else goes on being answered.
    Eight 7000x7000 JPEG uploads at once (tiny model, 2 cores): the server's peak memory went
    from 0.4 to 3.6 GB without a budget, to 0.9 GB with the default one (6 served, 2 told
    to retry).
    """

    def __init__(self, total: int, wait: float):
        if total < 1 or wait < 0:
            raise ValueError(f"decode budget {total} pixels, wait {wait} s: both must be "
                             "positive")
        self.total, self.wait = total, wait
        self._free = total
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Hold ``pixels`` of the budget for the ``with`` block, or raise HTTP 503."""
        pixels = min(pixels, self.total)
        with self._changed:
            if not self._changed.wait_for(lambda: self._free >= pixels, self.wait):
                raise HTTPException(
                    503, f"the server is busy decoding other images ({self.total - self._free}"
                         f" of {self.total} pixels in use); try again shortly",
                    headers={"Retry-After": str(max(1, math.ceil(self.wait)))})
            self._free -= pixels
        try:
            yield
        finally:
            with self._changed:
                self._free += pixels
                self._changed.notify_all()


def check_lengths(values: Sequence[str], what: str) -> None:
    """HTTP 422 for the first value longer than MAX_QUERY_CHARS: checked before the tokenizer
    sees anything (an 18 MB text cost 3 s of CPU before it was refused)."""
    for number, value in enumerate(values, start=1):
        if len(value) > MAX_QUERY_CHARS:
            raise HTTPException(422, f"{what} {number} is {len(value)} characters long; at "
                                     f"most {MAX_QUERY_CHARS}")


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
    check_lengths(labels, "label")
    return labels


# -------------------------------------------------------------------------- middleware
class BodyLimits:
    """ASGI middleware bounding request bodies in size (JSON 413) and in time (JSON 408).

    A declared Content-Length above the limit is refused at once, before routing and before a
    byte of the body is read.  Bodies are also counted as they arrive, which catches chunked
    uploads (no Content-Length) and clients sending more than they declared: the first chunk
    past the limit raises HTTPException(413) inside whatever is reading the body (form parsing,
    ``request.body()``), and FastAPI answers it like any other HTTP error.  Multipart bodies
    (image uploads) may have ``upload_limit`` bytes, any other body (JSON texts) only
    ``other_limit``: texts need far less room than images.

    Once something starts reading the body, all of it must arrive within ``timeout`` seconds,
    or the reader gets HTTPException(408): a client trickling its body cannot hold a request
    open.  (A body nobody reads is bounded by :class:`DeadlineH11Protocol`.)  Both refusals
    close the connection, so the rest of the body is never read.
    """

    def __init__(self, app: Any, upload_limit: int, other_limit: int, timeout: float):
        self.app, self.timeout = app, timeout
        self.upload_limit, self.other_limit = upload_limit, min(other_limit, upload_limit)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        multipart = headers.get("content-type", "").startswith("multipart/form-data")
        limit = self.upload_limit if multipart else self.other_limit
        too_large = HTTPException(413, f"request body too large: the limit is {limit} bytes"
                                  + ("" if multipart else " for a body that is not a "
                                     "multipart upload"), headers=CLOSE)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await self._refuse(too_large, scope, receive, send)
            return
        received, deadline, finished, started = 0, None, False, False

        async def guarded_receive() -> dict:
            nonlocal received, deadline, finished
            if finished:  # the body is complete: what follows is a disconnect, whenever
                return await receive()
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + self.timeout
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                raise HTTPException(408, "the request body did not arrive within "
                                         f"{self.timeout:g} s", headers=CLOSE) from None
            finished = message["type"] != "http.request" or not message.get("more_body")
            received += len(message.get("body", b""))
            if received > limit:
                raise too_large
            return message

        async def watching_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, watching_send)
        except HTTPException as exc:  # raised where no exception handler was around
            if exc.status_code not in (408, 413) or started:
                raise
            await self._refuse(exc, scope, receive, send)

    @staticmethod
    async def _refuse(exc: HTTPException, scope: dict, receive: Any, send: Any) -> None:
        response = JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                                headers=exc.headers)
        await response(scope, receive, send)


class SecurityHeaders:
    """ASGI middleware putting :data:`SECURITY_HEADERS` and a Content-Security-Policy on
    every response: pages, static files, JSON, thumbnails and refusals alike.

    The pages in ``hashed_pages`` (FastAPI's API docs) carry inline scripts; their policy
    allows exactly those scripts, by the SHA-256 of each as the page is sent, so no inline
    script is allowed anywhere else and no policy goes stale when FastAPI changes the page.
    """

    def __init__(self, app: Any, hashed_pages: Collection[str] = DOCS_PAGES):
        self.app, self.hashed_pages = app, frozenset(hashed_pages)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        if path in self.hashed_pages:
            await self.app(scope, receive, self._with_script_hashes(send))
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                self._add_headers(message, CSP)
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _with_script_hashes(self, send: Any) -> Callable:
        """A ``send`` that holds the (small) page back until it is whole, then sends it with
        a policy naming the hashes of its inline scripts."""
        start: dict = {}
        chunks: list[bytes] = []

        async def buffered_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            hashes = "".join(
                f" 'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
                for script in re.findall(rb"<script>(.*?)</script>", body, re.S))
            self._add_headers(start, DOCS_CSP.format(hashes=hashes))
            await send(start)
            await send({"type": "http.response.body", "body": body})

        return buffered_send

    @staticmethod
    def _add_headers(start: dict, csp: str) -> None:
        headers = MutableHeaders(scope=start)
        headers.setdefault("Content-Security-Policy", csp)
        for name, value in SECURITY_HEADERS.items():
            headers.setdefault(name, value)


class BearerAuth:
    """ASGI middleware answering 401 to any request without ``Authorization: Bearer <token>``,
    except for :data:`OPEN_PATHS` and :data:`OPEN_PREFIXES`.

    It runs before the body is read or the request routed, so an unauthenticated client learns
    nothing, not even whether a path or an upload size would be accepted, and the refusal
    closes the connection.  Both tokens are hashed before the constant-time comparison, so the
    time taken says nothing about the token's length either.  The token never appears in a
    response or a log line.  ``token`` has passed :func:`check_token` (in :func:`create_app`).
    """

    def __init__(self, app: Any, token: str):
        self.app = app
        self._digest = hashlib.sha256(token.encode()).digest()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan" or self._is_open(scope) or self._authorized(scope):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        else:
            await self._refuse(scope, receive, send)

    @staticmethod
    def _is_open(scope: dict) -> bool:
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)

    def _authorized(self, scope: dict) -> bool:
        value = Headers(scope=scope).get("authorization", "")
        scheme, _, credentials = value.partition(" ")
        given = hashlib.sha256(credentials.strip().encode("latin-1")).digest()
        # Compared even for another scheme, so that the time does not tell which was wrong.
        return hmac.compare_digest(given, self._digest) and scheme.lower() == "bearer"

    @staticmethod
    async def _refuse(scope: dict, receive: Any, send: Any) -> None:
        given = Headers(scope=scope).get("authorization")
        challenge = 'Bearer error="invalid_token"' if given else "Bearer"
        detail = ("the access token is not valid" if given else "an access token is "
                  "required: send the header 'Authorization: Bearer <token>'")
        response = JSONResponse({"detail": detail}, status_code=401,
                                headers={"WWW-Authenticate": challenge, **CLOSE})
        await response(scope, receive, send)


class ClientLimit:
    """ASGI middleware answering 429 (JSON, ``Retry-After``) to a request from a client
    address that already has ``max_requests`` requests in flight.

    The connection cap is shared by everyone, so one client opening many connections could take
    all of it and queue the model's time behind its own queries; this bound keeps one address
    from crowding out the others.  A request counts until the app has sent its whole answer
    (``finally``: also when it fails or the client goes away).  Addresses with nothing in flight
    are dropped, so the table never outgrows the open connections.  ``/healthz`` is exempt, so
    a monitor is never told "busy".  Behind a reverse proxy every request comes from the
    proxy's address: raise the limit there, or bound clients at the proxy.  The lock matters
    only when the app is driven from several event loops (TestClient without ``with``).
    """

    exempt = ("/healthz",)

    def __init__(self, app: Any, max_requests: int):
        self.app, self.max_requests = app, max_requests
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "").removeprefix(scope.get("root_path", "")) or "/"
        if scope["type"] != "http" or path in self.exempt:
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("",))[0]
        if not self._enter(client):
            await self._refuse(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self._leave(client)

    def _enter(self, client: str) -> bool:
        with self._lock:
            count = self._in_flight.get(client, 0)
            if count >= self.max_requests:
                return False
            self._in_flight[client] = count + 1
            return True

    def _leave(self, client: str) -> None:
        with self._lock:
            count = self._in_flight.pop(client) - 1
            if count:
                self._in_flight[client] = count

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        response = JSONResponse(
            {"detail": f"too many requests at once from this address (at most "
                       f"{self.max_requests} in flight); try again when some have finished"},
            status_code=429, headers={"Retry-After": str(CLIENT_RETRY_AFTER_S), **CLOSE})
        await response(scope, receive, send)


def check_origins(origins: Sequence[str]) -> list[str]:
    """The CORS origins as browsers send them in an ``Origin`` header (lower case, no default
    port: Starlette compares them as strings), or ValueError naming the first that is not a
    plain ``scheme://host[:port]``.  ``*`` is refused: any web page could then drive the API,
    with a token its visitor holds, or, without a token, through any visitor's browser."""
    checked = []
    for origin in [origins] if isinstance(origins, str) else origins:
        if origin.strip() == "*":
            raise ValueError("CORS origin '*' (any web site) is refused: with it, any web "
                             "page could drive the API with a token its visitor holds (or, "
                             "without a token, through any visitor's browser); list the sites "
                             "whose pages should, e.g. https://app.example")
        found = ORIGIN_PATTERN.fullmatch(origin.strip())
        if found is None or (found.group(3) and not 0 < int(found.group(3)) <= 65535):
            raise ValueError(f"CORS origin {origin!r} is not an origin: give http(s)://host or "
                             "http(s)://host:port, with no path (not even a final /), e.g. "
                             "https://app.example")
        scheme, host, port = found.group(1).lower(), found.group(2).lower(), found.group(3)
        port_part = "" if port is None or int(port) == DEFAULT_PORTS[scheme] else f":{int(port)}"
        checked.append(f"{scheme}://{host}{port_part}")
    return checked


def check_token(token: str) -> str:
    """``token`` if it can serve as an access token, else ValueError saying why: too short to
    resist guessing, or with characters an HTTP header cannot carry as they are."""
    if not token:
        raise ValueError("the token is empty")
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the token has {len(token)} characters; at least {MIN_TOKEN_CHARS} "
                         "are needed")
    if not re.fullmatch(r"[\x21-\x7e]+", token):
        raise ValueError("the token must be printable ASCII without spaces")
    return token


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` is reachable from this machine only.  Host names other than
    ``localhost`` count as reachable from the network: they may resolve to anything."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None, insecure_no_auth: bool = False) -> None:
    """ValueError when ``host`` is reachable from the network and no token guards it: every
    indexed image would be readable by anyone who can reach the address."""
    if token is None and not insecure_no_auth and not is_loopback(host):
        raise ValueError(f"--host {host} is reachable from the network, and without a token "
                         "anyone who can reach it can read every indexed image: give "
                         f"--token-file FILE or set {TOKEN_ENV} (or --insecure-no-auth to "
                         "serve without one)")


class _EncryptedKeyError(Exception):
    """Raised by :func:`check_tls` when the key asks for a password (never prompted for)."""


def _refuse_password() -> bytes:
    raise _EncryptedKeyError


def check_tls(cert: str | os.PathLike | None, key: str | os.PathLike | None
              ) -> tuple[str, str] | None:
    """The certificate and private key files to serve HTTPS with, as strings, or None for
    plain HTTP (neither given); else ValueError naming the option and the file: one given
    without the other, a file missing, or files that do not load as a PEM certificate (chain)
    and the unencrypted key that goes with it.  They are loaded here, so that a mistake is
    reported before the port is bound or the model loaded, not when uvicorn starts."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        given, missing = ("--tls-cert", "--tls-key") if key is None else ("--tls-key",
                                                                         "--tls-cert")
        raise ValueError(f"{given} was given without {missing}: HTTPS needs both the "
                         "certificate (--tls-cert FILE) and its private key (--tls-key FILE), "
                         "PEM files; give both, or neither for plain HTTP")
    for option, path in (("--tls-cert", cert), ("--tls-key", key)):
        if not Path(path).is_file():
            what = "is a directory" if Path(path).is_dir() else "does not exist"
            raise ValueError(f"{option} {printable_name(str(path))} {what}: give a PEM file")
    cert_name, key_name = printable_name(str(cert)), printable_name(str(key))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=cert)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"--tls-cert {cert_name} cannot be read as a PEM certificate: "
                         f"{exc.strerror or exc}") from None
    try:
        context.load_cert_chain(cert, key, password=_refuse_password)
    except _EncryptedKeyError:
        raise ValueError(f"--tls-key {key_name} is encrypted, and the server asks for no "
                         f"password: give it decrypted (openssl pkey -in {key_name} -out "
                         "FILE), readable by the server's user only") from None
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"--tls-key {key_name} is not the PEM private key of --tls-cert "
                         f"{cert_name}: {exc.strerror or exc}") from None
    return str(cert), str(key)


def host_pattern(name: str) -> str:
    """A host name as a Host header spells it: lower case, IPv6 addresses in brackets."""
    name = name.strip().lower()
    return f"[{name}]" if ":" in name and not name.startswith("[") else name


def default_allowed_hosts(host: str) -> list[str]:
    """The Host header values to answer when bound to ``host``.

    A loopback bind answers localhost, 127.0.0.1 and [::1]; another address, that address.
    A wildcard bind (0.0.0.0, ::) answers loopback plus this machine's host name; other names
    and addresses clients use must be given (``--allowed-hosts``).  Any port is accepted: a
    DNS-rebinding page differs in its host name, not its port.
    """
    if host in LOOPBACK_HOSTS:
        return list(LOOPBACK_NAMES)
    if host in WILDCARD_HOSTS:
        names = {host_pattern(n) for n in (socket.gethostname(), socket.getfqdn()) if n}
        return list(LOOPBACK_NAMES) + sorted(names - set(LOOPBACK_NAMES))
    return [host_pattern(host)]


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

    The generation is part of the key because a rebuilt index may give an id to another image;
    the server also clears the cache whenever it loads another state of the index (an index
    rebuilt from scratch in place of the old one starts again at generation 1).
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

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def display_path(path: str, root: str | None) -> str:
    """How an item's path appears in answers: relative to the collection ``root`` (see
    :meth:`SearchIndex.collection_root`; ``sub/x.jpg``), else the file name alone.  Never
    absolute: a server reachable from a network must not reveal its directory layout."""
    if root is not None:
        try:
            relative = os.path.relpath(path, root)
        except ValueError:  # (Windows) another drive
            relative = os.pardir
        if relative != os.pardir and not relative.startswith(os.pardir + os.sep) \
                and not os.path.isabs(relative):
            return Path(relative).as_posix()
    return os.path.basename(path)


def display_model(model: str | None) -> str | None:
    """How an index's recorded model appears in answers: a name (``ViT-B-32``,
    ``hf-hub:org/repo``) as it is, a model file or folder by its name alone (an index built from
    ``/home/me/models/clip.safetensors`` records that path)."""
    if model is not None and os.path.isabs(model):
        return os.path.basename(model.rstrip("/" + os.sep)) or model
    return model


# ------------------------------------------------------------------------------- the app
class _Service:
    """What the routes share about one served index: the index, its name, its health, uploads'
    decoding, and the caches.

    ``tagged``: several indexes are served, so the thumbnail URLs in answers name this one
    (``?index=NAME``: item ids are per index).  ``budget`` and ``decoder`` are the server's,
    shared by every index: they bound the memory of decoded uploads, whichever index they go to.
    """

    def __init__(self, index: SearchIndex, name: str, *, max_pixels: int, budget: PixelBudget,
                 decoder: ThreadPoolExecutor, thumbnail_size: int, thumbnail_cache: int,
                 batch_texts: bool, metrics: ServerMetrics, tagged: bool = False):
        self.index, self.name, self.tagged = index, name, tagged
        self.max_pixels, self.budget, self._decoder = max_pixels, budget, decoder
        self.thumbnail_size = thumbnail_size
        self.thumbnails = ThumbnailCache(thumbnail_cache)
        self.metrics = metrics  # the model's calls are timed there
        self.embed_text = TextBatcher(self.embed_texts) if batch_texts else None
        self._problem = ""  # logged once, not on every request while it lasts
        self._items = metrics.index_items.labels(name)
        self._items.set(len(index))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """The index's :meth:`~SearchIndex.embed_texts`, its time recorded as "text"."""
        with self.metrics.model_time("text"):
            return self.index.embed_texts(texts)

    def embed_image(self, image: Image.Image) -> np.ndarray:
        """The index's :meth:`~SearchIndex.embed_image`, its time recorded as "image"."""
        with self.metrics.model_time("image"):
            return self.index.embed_image(image)

    def public(self, message: str) -> str:
        """``message`` with the index's folder named by the index's name alone (logs keep the
        whole path; answers show no absolute path)."""
        folder = self.index.path
        for path in sorted({str(folder.absolute()), str(folder.resolve()), str(folder)},
                           key=len, reverse=True):
            message = message.replace(path, self.name)
        return message

    def unreadable(self, exc: Exception) -> str:
        """What a client is told when the index cannot be read: by its name, never its path."""
        return self.public(f"the index {self.name!r} cannot be read: {exc}")

    def index_problem(self) -> str | None:
        """Pick up a newer generation; None if the index is readable, else why not."""
        try:
            if self.index.refresh():
                self.thumbnails.clear()
                self._items.set(len(self.index))
                log.info("index %s refreshed: %d items", self.name, len(self.index))
        except Exception as exc:  # IndexUnavailableError, or a rebuild with another model
            problem = self.unreadable(exc)
            if problem != self._problem:
                log.error("the index %s cannot be read: %s; answering 503 until it can",
                          self.name, exc)
            self._problem = problem
            return problem
        if self._problem:
            log.info("the index %s can be read again", self.name)
            self._problem = ""
        return None

    def describe(self) -> IndexOut:
        """This index for /healthz and /api/indexes: its name, size and model, or why it
        cannot be read."""
        problem = self.index_problem()
        if problem is not None:
            return IndexOut(name=self.name, status="unavailable", detail=problem)
        info = self.index.info
        return IndexOut(name=self.name, status="ok", items=info["count"],
                        model=display_model(info.get("model")),
                        generation=info.get("generation"))

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Around a use of the index: the newest generation, and 503 (never old data or a
        500) while the index cannot be read."""
        problem = self.index_problem()
        if problem is not None:
            raise HTTPException(503, problem)
        try:
            yield
        except IndexUnavailableError as exc:
            raise HTTPException(503, self.unreadable(exc)) from exc

    @contextmanager
    def decoded(self, data: bytes, cost: int = 1) -> Iterator[Image.Image]:
        """The uploaded image, decoded while it holds its share of the pixel budget: ``cost``
        budget pixels per image pixel (more for work that holds more than the decoded image:
        locating, :mod:`.locate_routes`).

        Decoding runs on DECODE_THREADS threads of its own: glibc's malloc keeps memory freed
        by a thread in that thread's arena, so decodes spread over the request threads left
        each one holding an image's worth (RSS climbing by ~190 MB per 49-megapixel upload
        after the budget had bounded the live images); on a few threads it is reused.
        """
        image = open_upload(data, self.max_pixels)
        with self.budget.hold(image.width * image.height * cost):
            yield self._decoder.submit(decode_image, image).result()

    def hit_out(self, hit: Hit, root: str | None) -> HitOut:
        score = None if hit.score is None or math.isnan(hit.score) else float(hit.score)
        video = None if hit.start is None else f"/videos/{hit.id}{self.thumbnail_query}"
        return HitOut(id=hit.id, path=printable_name(display_path(str(hit.path), root)),
                      score=score, caption=hit.caption, width=hit.width, height=hit.height,
                      extra=hit.extra, thumbnail=f"/thumbnails/{hit.id}{self.thumbnail_query}",
                      start=hit.start, end=hit.end, video=video)

    @property
    def thumbnail_query(self) -> str:
        """What a thumbnail URL needs besides the item id: the index's name, when several are
        served (ids are per index)."""
        return "?" + urlencode({"index": self.name}) if self.tagged else ""

    def answer(self, query: QueryOut, find: Callable[[], list[Hit]]) -> SearchOut:
        """Run a query on the newest generation; the index's ValueError (empty or over-long
        text, bad weights) is the client's mistake (400), its KeyError an unknown item (404)."""
        start = time.perf_counter()
        with self.reading():
            try:
                hits = find()
            except ValueError as exc:
                raise HTTPException(400, self.public(str(exc))) from exc
            except KeyError as exc:
                raise HTTPException(404, f"no item {query.similar_to}") from exc
            root = self.index.collection_root()
        return SearchOut(index=self.name, query=query,
                         results=[self.hit_out(h, root) for h in hits],
                         took_ms=round((time.perf_counter() - start) * 1000, 2))

    def text_hits(self, text: str, k: int, threshold: float | None,
                  collapse: float | None) -> list[Hit]:
        if not text.strip():  # (the index words the empty error)
            return self.index.search(text=text, k=k, threshold=threshold, collapse=collapse)
        if self.embed_text is None:  # no batching: the search is timed with the model's call
            with self.metrics.model_time("text"):
                return self.index.search(text=text, k=k, threshold=threshold,
                                         collapse=collapse)
        return self.index.search_vector(self.embed_text(text), k, threshold=threshold,
                                        collapse=collapse)

    def mixed_hits(self, text: str | None, image: Image.Image, text_weight: float,
                   image_weight: float, k: int, threshold: float | None,
                   collapse: float | None) -> list[Hit]:
        """An image query, a text mixed in or not: one call into the model, timed as
        "image", then the search."""
        with self.metrics.model_time("image"):
            vector = self.index.query_vector(text, image, text_weight, image_weight)
        return self.index.search_vector(vector, k, threshold=threshold, collapse=collapse)

    def thumbnail(self, item_id: int) -> bytes:
        """JPEG bytes of an item's thumbnail, from the cache or rendered (404 if none)."""
        with self.reading():
            key = (self.index.info.get("generation"), item_id)
            data = self.thumbnails.get(key)
            if data is not None:
                return data
            if self.index.item(item_id) is None:
                raise HTTPException(404, f"no item {item_id}")
            with open_item_image(self.index, item_id, "thumbnail", self.name) as image:
                data = render_thumbnail(image, self.thumbnail_size)
        self.thumbnails.put(key, data)
        return data


class _Services:
    """The served indexes' services by name, in the order given: the first is the default,
    used by every request that names no index."""

    def __init__(self, services: Sequence[_Service]):
        self.by_name = {service.name: service for service in services}
        self.default = services[0]

    def __iter__(self) -> Iterator[_Service]:
        return iter(self.by_name.values())

    @property
    def names(self) -> list[str]:
        return list(self.by_name)

    def pick(self, name: str | None) -> _Service:
        """The service of the index ``name`` (None or empty: the default), or 404 listing the
        names that are served."""
        if not name:
            return self.default
        service = self.by_name.get(name)
        if service is None:
            raise HTTPException(404, f"no index {shown_name(name)!r} is served here; the names "
                                     f"are {self.names} (GET /api/indexes)")
        return service

    def refresh(self) -> None:
        """Pick up rebuilt indexes (before a metrics scrape: the sizes are then current)."""
        for service in self:
            service.index_problem()


def default_index_name(path: str | os.PathLike) -> str:
    """The name clients know an index by when it is given none: its folder's name, never a
    path."""
    return os.path.basename(os.path.abspath(path)) or "index"


def check_index_name(name: str) -> str:
    """``name`` if it can name a served index, else ValueError naming it: it appears in URLs,
    forms and metric labels, so only letters, digits, ``.``, ``_`` and ``-`` are allowed."""
    if not isinstance(name, str) or not INDEX_NAME_PATTERN.fullmatch(name) \
            or not name.strip("."):
        raise ValueError(f"index name {name!r} is not allowed: use 1 to "
                         f"{MAX_INDEX_NAME_CHARS} letters, digits, '.', '_' and '-', not only "
                         "dots")
    return name


def named_indexes(indexes: SearchIndex | Mapping[str, SearchIndex]) -> dict[str, SearchIndex]:
    """One index (named after its folder, as before names existed) or a mapping name -> index
    (names checked by :func:`check_index_name`), as a dict in the order given."""
    if not isinstance(indexes, Mapping):
        return {default_index_name(indexes.path): indexes}
    if not indexes:
        raise ValueError("no index to serve: give at least one")
    return {check_index_name(name): index for name, index in indexes.items()}


def create_app(indexes: SearchIndex | Mapping[str, SearchIndex], *,
               max_upload_bytes: int = MAX_UPLOAD_BYTES,
               max_pixels: int = MAX_PIXELS, thumbnail_size: int = 256,
               thumbnail_cache: int = 2048, batch_texts: bool = True,
               allowed_hosts: Sequence[str] | None = None,
               max_json_bytes: int = MAX_JSON_BYTES, body_timeout: float = BODY_TIMEOUT_S,
               decode_budget: int = DECODE_BUDGET_PIXELS,
               decode_wait: float = DECODE_WAIT_S, token: str | None = None,
               cors_origins: Sequence[str] = (),
               max_client_requests: int | None = MAX_CLIENT_REQUESTS,
               allow_image_urls: bool = False, safety_prompts: PromptFilter | None = None,
               violence_prompts: PromptFilter | None = None) -> FastAPI:
    """The FastAPI application serving ``indexes``; see the module docstring for the design.

    ``indexes`` is one :class:`SearchIndex` (named after its folder) or a mapping name ->
    index (:func:`named_indexes`); requests pick one by name (``index``, or ``indice_name`` in
    the clip-retrieval API), and those naming none get the first.  ``max_upload_bytes`` caps
    multipart bodies and ``max_json_bytes`` any other (413 beyond),
    ``body_timeout`` the seconds a body may take to arrive (408 beyond), ``max_pixels`` the
    size of an uploaded image as its header declares it (400 beyond), ``decode_budget`` the
    pixels of all uploads decoded at once (503 with Retry-After when none frees up within
    ``decode_wait`` seconds); ``allowed_hosts`` are the Host header values answered (400 for
    others; default: loopback names; ``"*"``: any), ``thumbnail_cache`` the number of
    thumbnails kept in memory for each index; ``batch_texts`` embeds concurrent text queries
    together (:class:`TextBatcher`); ``token``, when given, is required of every request except
    those for the page, the docs and ``/healthz`` (:class:`BearerAuth`; 401 without it);
    ``cors_origins`` are the web sites (``https://app.example``) whose pages may call the API
    from a browser (none by default; :func:`check_origins`); ``max_client_requests`` bounds
    the requests in flight from one client address (429 beyond; None: no limit;
    :class:`ClientLimit`).  ``allow_image_urls``, ``safety_prompts`` and ``violence_prompts``
    configure the clip-retrieval API (:func:`.knn_service.add_knn_routes`).
    """
    if max_client_requests is not None and max_client_requests < 1:
        raise ValueError(f"max_client_requests must be at least 1 (None: no limit), not "
                         f"{max_client_requests}")
    if decode_budget < max_pixels:
        raise ValueError(f"decode_budget ({decode_budget} pixels) must be at least max_pixels "
                         f"({max_pixels}), or the largest allowed image could never be decoded")
    named = named_indexes(indexes)
    # FastAPIOffline serves the /docs and /redoc pages' scripts itself (FastAPI's own pages load
    # them from a CDN, which leaves /docs blank on a machine without internet access).
    app = FastAPIOffline(title="clipforge search", version=__version__,
                         description="Text, image and mixed search over clipforge indexes.")
    metrics = ServerMetrics()
    budget = PixelBudget(decode_budget, decode_wait)
    decoder = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode-upload")
    services = _Services([
        _Service(index, name, max_pixels=max_pixels, budget=budget, decoder=decoder,
                 thumbnail_size=thumbnail_size, thumbnail_cache=thumbnail_cache,
                 batch_texts=batch_texts, metrics=metrics, tagged=len(named) > 1)
        for name, index in named.items()])
    _add_middleware(app, allowed_hosts=LOOPBACK_NAMES if allowed_hosts is None
                    else allowed_hosts, max_upload_bytes=max_upload_bytes,
                    max_json_bytes=max_json_bytes, body_timeout=body_timeout, token=token,
                    cors_origins=check_origins(cors_origins),
                    max_client_requests=max_client_requests, metrics=metrics)
    _add_search_routes(app, services)
    _add_item_routes(app, services)
    _add_model_routes(app, services)
    _add_service_routes(app, services, metrics)
    add_video_routes(app, services)
    add_locate_routes(app, services)
    add_knn_routes(app, services, allow_image_urls=allow_image_urls,
                   safety_prompts=safety_prompts, violence_prompts=violence_prompts)
    if token is not None:
        _document_token(app)
    return app


def _add_middleware(app: FastAPI, *, allowed_hosts: Sequence[str], max_upload_bytes: int,
                    max_json_bytes: int, body_timeout: float, token: str | None,
                    cors_origins: Sequence[str], max_client_requests: int | None,
                    metrics: ServerMetrics) -> None:
    """Starlette runs the middleware added last first, so a request meets the metrics first
    (every request is counted and timed, refusals included), then the security headers
    (every answer, refusals included, carries them), then the Host check
    (before anything is read or routed), then CORS (a browser's preflight carries no token,
    and the 401s and 429s below must carry CORS headers for a listed site's page to read
    them), then the per-client limit (unauthenticated floods count too), then the token
    (before the body is looked at: an unauthenticated client learns nothing of the limits),
    then the body's size and time limits."""
    app.add_middleware(BodyLimits, upload_limit=max_upload_bytes, other_limit=max_json_bytes,
                       timeout=body_timeout)
    if token is not None:  # checked now: Starlette builds the middleware at the first request
        app.add_middleware(BearerAuth, token=check_token(token))
    if max_client_requests is not None:
        app.add_middleware(ClientLimit, max_requests=max_client_requests)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins),
                           allow_methods=CORS_METHODS, allow_headers=CORS_HEADERS,
                           expose_headers=CORS_EXPOSED)
    hosts = [h if h.startswith("*") else host_pattern(h) for h in allowed_hosts]
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts, www_redirect=False)
    app.add_middleware(SecurityHeaders, hashed_pages=DOCS_PAGES)
    app.add_middleware(RequestMetrics, metrics=metrics, router=app.router)


def _document_token(app: FastAPI) -> None:
    """Declare the bearer token in the OpenAPI schema on every operation that needs it, so
    that /docs offers an "Authorize" button and its "Try it out" requests carry the token."""
    schema = app.openapi()  # cached by FastAPI: what /openapi.json serves
    schema.setdefault("components", {})["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in schema["paths"].items():
        if path not in OPEN_PATHS:
            for operation in operations.values():
                operation["security"] = [{"bearer": []}]


def _add_search_routes(app: FastAPI, services: _Services) -> None:
    @app.get("/api/search", response_model=SearchOut, tags=["search"])
    def search_text(q: Annotated[str, Query(min_length=1, max_length=MAX_QUERY_CHARS,
                                            description="text query")],
                    k: K = 20, threshold: Threshold = None, collapse: Collapse = None,
                    index: IndexName = None) -> SearchOut:
        """Items ranked by similarity to a text."""
        service = services.pick(index)
        return service.answer(QueryOut(text=q),
                              lambda: service.text_hits(q, k, threshold, collapse))

    @app.post("/api/search/image", response_model=SearchOut, tags=["search"])
    def search_image(file: Annotated[UploadFile, File(description="query image")],
                     q: Annotated[str | None, Form(max_length=MAX_QUERY_CHARS,
                                                   description="optional text to mix in")]
                     = None,
                     text_weight: Weight = 1.0, image_weight: Weight = 1.0,
                     k: Annotated[int, Form(ge=1, le=MAX_K)] = 20,
                     threshold: Annotated[float | None, Form(ge=-1.0, le=1.0)] = None,
                     collapse: Annotated[float | None, Form(gt=0.0, le=1.0)] = None,
                     index: IndexField = None) -> SearchOut:
        """Items ranked by similarity to an uploaded image, or to a weighted mix of the image
        and a text (``q``)."""
        service = services.pick(index)  # before decoding: an unknown name costs nothing
        text = q if q and q.strip() else None  # an empty form field means "no text"
        with service.decoded(_read_upload(file)) as image:
            return service.answer(QueryOut(text=text, image=file.filename),
                                  lambda: service.mixed_hits(text, image, text_weight,
                                                             image_weight, k, threshold,
                                                             collapse))


def _add_item_routes(app: FastAPI, services: _Services) -> None:
    """Item ids are per index: each route takes the index's name (``?index=``) too."""

    @app.get("/api/items/{item_id}", response_model=HitOut, tags=["items"])
    def item(item_id: ItemId, index: IndexName = None) -> HitOut:
        """Metadata of one indexed item."""
        service = services.pick(index)
        with service.reading():
            hit = service.index.item(item_id)
            root = service.index.collection_root()
        if hit is None:
            raise HTTPException(404, f"no item {item_id}")
        return service.hit_out(hit, root)

    @app.get("/api/items/{item_id}/similar", response_model=SearchOut, tags=["items"])
    def similar(item_id: ItemId, k: K = 20, threshold: Threshold = None,
                collapse: Collapse = None, index: IndexName = None) -> SearchOut:
        """"More like this": items nearest to an indexed item, the item itself left out."""
        service = services.pick(index)
        return service.answer(QueryOut(similar_to=item_id), lambda: service.index.similar(
            item_id, k=k, threshold=threshold, collapse=collapse))

    @app.get("/thumbnails/{item_id}", tags=["items"],
             responses={200: {"content": {"image/jpeg": {}}}})
    def thumbnail(item_id: ItemId, request: Request, index: IndexName = None) -> Response:
        """A JPEG thumbnail of an indexed item.  Only the integer id and the index's name come
        from the request; the index maps the id to the file (or archive member) it recorded.
        Cached by the browser only ("private"): a shared cache must not hand a token-guarded
        image to others."""
        data = services.pick(index).thumbnail(item_id)
        etag = '"' + hashlib.blake2b(data, digest_size=12).hexdigest() + '"'
        headers = {"Cache-Control": "private, max-age=3600", "ETag": etag}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type="image/jpeg", headers=headers)


def _add_model_routes(app: FastAPI, services: _Services) -> None:
    """Endpoints that use an index's model but not its items."""

    @app.post("/api/classify", response_model=ClassifyOut, tags=["models"])
    def classify(file: Annotated[UploadFile, File(description="image to classify")],
                 labels: Annotated[list[str], Form(description=(
                     "class names: one comma-separated value, or the field repeated"))],
                 template: Annotated[str, Form(min_length=1, max_length=MAX_QUERY_CHARS)]
                 = "a photo of a {}.", index: IndexField = None) -> ClassifyOut:
        """Zero-shot classification of an uploaded image among ``labels``, by the model of
        the index named (default: the first)."""
        start = time.perf_counter()
        service = services.pick(index)
        names = parse_labels(labels)
        try:  # the index formats it: "{0} {1}" or "{name}" would fail there with a 500
            template.format("label")
        except (IndexError, KeyError, ValueError) as exc:
            raise HTTPException(400, "template must contain one {} for the label, and no "
                                     "other braces") from exc
        with service.decoded(_read_upload(file)) as image:
            try:
                with service.metrics.model_time("image"):
                    ranked = service.index.classify(image, names, template=template)
            except ValueError as exc:
                raise HTTPException(400, str(exc)) from exc
        return ClassifyOut(labels=[LabelOut(label=n, probability=float(p)) for n, p in ranked],
                           took_ms=round((time.perf_counter() - start) * 1000, 2))

    def embed_now(service: _Service, texts: list[str], data: bytes | None) -> EmbedOut:
        with service.decoded(data) if data is not None else contextlib.nullcontext() as image:
            try:
                text_vectors = service.embed_texts(texts).tolist() if texts else []
            except ValueError as exc:
                raise HTTPException(400, str(exc)) from exc
            image_vector = service.embed_image(image).tolist() if image is not None else None
        dim = len(image_vector) if image_vector is not None else (
            len(text_vectors[0]) if text_vectors else 0)
        return EmbedOut(model=display_model(service.index.info.get("model")), dim=dim,
                        texts=text_vectors, image=image_vector)

    embed_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": EmbedIn.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "string", "format": "binary"},
            "texts": {"type": "array", "items": {"type": "string",
                                                 "maxLength": MAX_QUERY_CHARS}},
            "index": {"type": "string", "maxLength": MAX_INDEX_NAME_CHARS}}}},
    }}}

    @app.post("/api/embed", response_model=EmbedOut, tags=["models"], openapi_extra=embed_body)
    async def embed(request: Request) -> EmbedOut:
        """Unit-norm embeddings of texts (JSON ``{"texts": [...]}``, or repeated ``texts``
        form fields) and/or of an image (multipart field ``file``), by the model of the index
        named (``index``, a JSON or form field; default: the first)."""
        content_type = request.headers.get("content-type", "")
        data, name = None, None
        if content_type.startswith("multipart/form-data"):
            async with request.form(max_files=1, max_fields=MAX_TEXTS + 1) as form:
                texts = [v for v in form.getlist("texts") if isinstance(v, str)]
                name = form.get("index") if isinstance(form.get("index"), str) else None
                upload = form.get("file")
                if isinstance(upload, FormFile):  # not a plain text field
                    data = await upload.read()
        elif content_type.startswith("application/json"):
            try:
                query = EmbedIn.model_validate_json(await request.body())
            except ValidationError as exc:
                raise RequestValidationError(exc.errors(include_url=False)) from exc
            texts, name = query.texts, query.index
        else:
            raise HTTPException(415, "send JSON {\"texts\": [...]} or a multipart form")
        service = services.pick(name)
        if len(texts) > MAX_TEXTS:
            raise HTTPException(400, f"{len(texts)} texts; at most {MAX_TEXTS} per request")
        check_lengths(texts, "text")
        if not texts and data is None:
            raise HTTPException(400, "nothing to embed: give texts, an image file, or both")
        return await run_in_threadpool(embed_now, service, texts, data)


def _add_service_routes(app: FastAPI, services: _Services, metrics: ServerMetrics) -> None:
    """Health, the list of indexes, metrics, the page and its static files."""

    @app.get("/healthz", response_model=HealthOut, tags=["service"],
             responses={503: {"model": UnavailableOut}})
    def healthz() -> HealthOut | JSONResponse:
        """What is being served, or 503 and why when the default index cannot be read
        (deleted, damaged): a health check that reflects the index, not just the process.
        The top-level fields are the default index's; ``indexes`` lists every index, and
        ``status`` is "degraded" when another one cannot be read."""
        listed = [service.describe() for service in services]
        default = listed[0]
        if default.status != "ok":
            return JSONResponse(UnavailableOut(detail=default.detail, indexes=listed
                                               ).model_dump(), status_code=503)
        status = "ok" if all(i.status == "ok" for i in listed) else "degraded"
        return HealthOut(status=status, items=default.items, model=default.model,
                         generation=default.generation, indexes=listed)

    @app.get("/api/indexes", response_model=IndexesOut, tags=["service"])
    def indexes() -> IndexesOut:
        """The served indexes, by the names requests give as ``index``: their item counts
        and models, or why one cannot be read."""
        return IndexesOut(default=services.default.name,
                          indexes=[service.describe() for service in services])

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    add_metrics_route(app, metrics, before_scrape=services.refresh)


# ------------------------------------------------------------------------- connections
class DeadlineH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol (h11) with deadlines for receiving each request.

    uvicorn times out only idle keep-alive connections, and every byte received restarts that
    timer, so a client that connects and sends nothing, or sends its headers a byte at a time,
    holds a connection for as long as it likes (uvicorn issue #157).  Here each request must
    arrive by fixed deadlines counted from its first byte (for a new connection, from the
    connection): its headers within ``header_timeout`` seconds, all of it, body included,
    within ``request_timeout``.  A late client is disconnected.  The time between requests is
    still uvicorn's ``timeout_keep_alive``, and the time the server takes to answer is not
    limited.  (A body the app reads too slowly gets a 408 first: see :class:`BodyLimits`.)
    """

    header_timeout = HEADER_TIMEOUT_S
    request_timeout = HEADER_TIMEOUT_S + BODY_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: str | None = None  # "headers" or "request": what is being waited for
        self._request_start = 0.0
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop()
        super().connection_lost(exc)

    def _watch(self) -> None:
        """Start, move on or stop the deadline after anything that may change what is being
        received: a request's headers (h11 IDLE), its body (SEND_BODY), or nothing."""
        state = self.conn.their_state
        between_requests = (state is h11.IDLE and not self.conn.trailing_data[0]
                            and self.timeout_keep_alive_task is not None)
        if (self.transport.is_closing() or between_requests
                or state not in (h11.IDLE, h11.SEND_BODY)):
            self._stop()
            return
        phase = "headers" if state is h11.IDLE else "request"
        if phase == self._phase:
            return
        if phase == "headers" or self._phase is None:  # a new request
            self._request_start = self.loop.time()
        limit = self.header_timeout if phase == "headers" else self.request_timeout
        self._stop_timer()
        self._deadline = self.loop.call_at(self._request_start + limit, self._expired)
        self._phase = phase

    def _stop_timer(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _stop(self) -> None:
        self._stop_timer()
        self._phase = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.info("closing the connection from %s: its request %s did not arrive in time",
                     self.client, "headers" if self._phase == "headers" else "body")
            self.transport.close()


@dataclass(frozen=True)
class ServerLimits:
    """Limits on connections, for :func:`serve` and :func:`running_server`.

    ``header_timeout``: seconds from a request's first byte to its last header;
    ``body_timeout``: seconds for its body (the app answers 408; a body nobody reads must
    arrive within both together); ``keep_alive``: seconds an idle connection is kept between
    requests; ``max_connections``: open connections (None: no limit), requests beyond get 503.
    """

    header_timeout: float = HEADER_TIMEOUT_S
    body_timeout: float = BODY_TIMEOUT_S
    keep_alive: float = KEEP_ALIVE_S
    max_connections: int | None = MAX_CONNECTIONS

    def __post_init__(self) -> None:
        for name in ("header_timeout", "body_timeout", "keep_alive"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds, not "
                                 f"{getattr(self, name)!r}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {self.max_connections}")

    def uvicorn_config(self, app: FastAPI, **kwargs: Any) -> uvicorn.Config:
        """A uvicorn configuration applying these limits (h11, whatever else is installed)."""
        protocol = type("DeadlineH11Protocol", (DeadlineH11Protocol,), {
            "header_timeout": self.header_timeout,
            "request_timeout": self.header_timeout + self.body_timeout})
        return uvicorn.Config(app, http=protocol, timeout_keep_alive=self.keep_alive,
                              limit_concurrency=self.max_connections, **kwargs)


# ------------------------------------------------------------------------------ running
def listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to, or an error in one line
    (ValueError, OSError) naming the address and the reason: a port out of range, in use, or
    a host that is not this machine's.  Binding comes first, so ``clipforge serve`` says so
    before spending seconds loading the model."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is not a port number (0 to 65535)")
    sockets: list[socket.socket] = []
    try:
        for family, _, _, _, address in socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
            if not any(s.getsockname()[0] == address[0] for s in sockets):
                sockets.append(socket.create_server(address, family=family))
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sockets


def serve(indexes: SearchIndex | Mapping[str, SearchIndex], host: str = "127.0.0.1",
          port: int = 8000, *,
          log_level: str = "info", allowed_hosts: Sequence[str] | None = None,
          limits: ServerLimits | None = None, sockets: list[socket.socket] | None = None,
          token: str | None = None, insecure_no_auth: bool = False,
          tls_cert: str | os.PathLike | None = None, tls_key: str | os.PathLike | None = None,
          **options: Any) -> None:
    """Serve ``indexes`` (one index, or a mapping name -> index: see :func:`create_app`) with
    uvicorn until interrupted; ``options`` go to :func:`create_app`.

    Loopback by default.  Anyone who can reach the server can read every indexed image unless
    ``token`` is given, so another address needs one, or ``insecure_no_auth=True``
    (:func:`check_exposure`), HTTPS or not.  ``tls_cert`` and ``tls_key`` (PEM files, both or
    neither: :func:`check_tls`) serve HTTPS instead of plain HTTP.  ``allowed_hosts`` defaults
    to the names of ``host`` (:func:`default_allowed_hosts`); ``sockets`` are already
    listening ones (:func:`listen`).
    """
    check_exposure(host, token, insecure_no_auth)
    tls = check_tls(tls_cert, tls_key)
    limits = limits or ServerLimits()
    allowed = list(allowed_hosts) if allowed_hosts else default_allowed_hosts(host)
    _warn_about_exposure(host, token, allowed, tls=tls is not None)
    sockets = sockets or listen(host, port)
    app = create_app(indexes, allowed_hosts=allowed, body_timeout=limits.body_timeout,
                     token=token, **options)
    served = ", ".join(f"{name} ({index.path})" for name, index in
                       named_indexes(indexes).items())  # the log may name paths
    ssl_files = {"ssl_certfile": tls[0], "ssl_keyfile": tls[1]} if tls else {}
    server = uvicorn.Server(limits.uvicorn_config(app, log_level=log_level, **ssl_files))
    for sock in sockets:
        address, bound_port = sock.getsockname()[:2]
        log.info("serving %s on %s://%s:%d (Host names answered: %s; %s)", served,
                 "https" if tls else "http", host_pattern(address), bound_port,
                 ", ".join(allowed), "access token required" if token else "no access token")
    server.run(sockets=sockets)


def _warn_about_exposure(host: str, token: str | None, allowed: Sequence[str],
                         tls: bool = False) -> None:
    """Say what a network-reachable server leaves open, once, as it starts."""
    if not is_loopback(host):
        if token is None:
            log.warning("serving on %s: every indexed image is readable by whoever can reach "
                        "this address, without authentication (--insecure-no-auth)", host)
        elif not tls:
            log.warning("serving on %s over plain HTTP: the token and the images cross the "
                        "network unencrypted unless a TLS proxy stands in front (or give "
                        "--tls-cert and --tls-key)", host)
    if "*" in allowed:
        log.warning("answering any Host name: a web page can read the index through a "
                    "visitor's browser (DNS rebinding)")


@contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                   timeout: float = 30.0, limits: ServerLimits | None = None) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread; yield its base URL, then stop it.

    Port 0 lets the OS pick a free port (no race with other processes); the URL carries the
    port actually bound.  ``limits`` as for :func:`serve`.  For tests, benchmarks and
    notebooks.
    """
    config = (limits or ServerLimits()).uvicorn_config(app, host=host, port=port,
                                                       log_level="warning")
    server = uvicorn.Server(config)
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

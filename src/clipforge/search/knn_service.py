"""clip-retrieval's HTTP API over the served index (``POST /knn-service``, ``POST /metadata``,
``GET /indices-list``), so that clip-retrieval's own Python ``ClipClient`` and its web front-end
work against ``clipforge serve`` unchanged.

The request and answer shapes are those of clip-retrieval 2.45.0 (``clip_back.py``, read by
``clip_client.py`` and the front-end); the work is the server's own: the routes share the
server's service object (text batching, upload decoding under the pixel budget, 503 while the
index cannot be read, no absolute path in any answer) and go through its middleware (Host
check, access token, per-client limit, body limits).  Where clip-retrieval's back-end relies on
things a clipforge index does not have, this module says so rather than pretending:

* the index holds image embeddings only, so ``modality: "text"`` (clip_back's search among
  captions' embeddings) is a 400, as is ``use_mclip`` with a text query (there is no
  multilingual text encoder beside the served model);
* ``use_safety_model`` and ``use_violence_detector`` are zero-shot filters with the served
  model (:class:`PromptFilter`): clip-retrieval's trained NSFW classifier and its violence
  prompt file exist for two OpenAI models only.  A result is dropped when its stored image
  embedding is nearest to one of the flagged prompts, as clip_back's violence detector decides
  with its own prompt embeddings.  The header ``X-Clipforge-Filters`` names the filters applied;
* ``aesthetic_score`` and ``aesthetic_weight`` (which ``ClipClient`` always sends) are accepted
  and ignored: LAION's aesthetic embeddings exist for two OpenAI models only
  (``X-Clipforge-Ignored`` says so);
* ``image_url`` makes the server fetch whatever URL a client names, internal addresses
  included, so it is refused unless the app was created with ``allow_image_urls=True``;
* ``num_result_ids`` above the server's result limit (:data:`~.index.MAX_K`) is lowered to it,
  since clip-retrieval's front-end always asks for 3000 (``X-Clipforge-Limited`` says so), and
  ``num_images`` above it is a 400;
* ``url`` is this server's thumbnail of the item (an absolute URL built from the request, by
  item id, and by the index's name when the server serves several), never a file path;
* a video segment's result carries its ``start`` and ``end`` in seconds, as in ``/api/search``
  (its ``url`` is the thumbnail of the frame at its start); an image's result has neither
  key, so it is exactly what clip_back answers;
* ``/indices-list`` lists the served indexes' names; ``indice_name`` picks one (absent: the
  first), and a name not served is a 400 listing those that are.

As in clip_back, a body is read as JSON whatever its Content-Type (``ClipClient`` sends none,
the front-end ``text/plain``), but here a malformed one is a 400 naming the field, never a 500.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from starlette.concurrency import run_in_threadpool

from .. import __version__
from .index import MAX_K
from .schema import MAX_QUERY_CHARS, MAX_UPLOAD_BYTES, HitOut, QueryOut, shown_name

if TYPE_CHECKING:
    from . import Hit, SearchIndex
    from .server import _Service, _Services

log = logging.getLogger(__name__)

DEDUP_THRESHOLD = 0.94  # clip_back's get_non_uniques: results with a larger inner product match
DEFAULT_NUM_IMAGES = 40  # ClipClient's default
IMAGE_URL_TIMEOUT_S = 10.0  # clip_back's download timeout; here for the whole download
MAX_URL_CHARS = 2048
USER_AGENT = f"clipforge/{__version__} (image_url of a knn-service query)"
FILTERS_HEADER = "X-Clipforge-Filters"  # which result filters were applied, and how
IGNORED_HEADER = "X-Clipforge-Ignored"  # request fields accepted but without effect here
LIMITED_HEADER = "X-Clipforge-Limited"  # request values lowered to the server's limits
# Keys of a result that the index's own metadata columns (CSV extras) never replace.
RESERVED_KEYS = frozenset({"id", "similarity", "caption", "url", "path", "image", "start",
                           "end"})

# Zero-shot prompts of the two filters, flagged ones against the rest: a result is dropped when
# its image embedding is nearest to a flagged prompt.  The "allowed" lists are broad on purpose:
# an ordinary photo must find a closer prompt there than among the flagged ones.
UNSAFE_PROMPTS = ("a photo of nudity", "a photo of a naked person", "a pornographic photo",
                  "an explicit sexual image", "an erotic photo")
SAFE_PROMPTS = ("a photo", "an ordinary everyday photo", "a photo of people wearing clothes",
                "a portrait photo", "a photo of an animal", "a photo of a landscape",
                "a photo of an object", "a photo of food", "a photo of a building",
                "a drawing", "a page of text")
VIOLENT_PROMPTS = ("a photo of violence", "a photo of a violent fight",
                   "a photo of a bloody injury", "a photo of a person attacked with a weapon",
                   "a photo of a dead body")
PEACEFUL_PROMPTS = ("a peaceful photo", "an ordinary everyday photo",
                    "a photo of people talking", "a photo of people playing sports",
                    "a portrait photo", "a photo of an animal", "a photo of a landscape",
                    "a photo of an object", "a photo of food", "a photo of a building",
                    "a drawing", "a page of text")


@dataclass(frozen=True)
class PromptFilter:
    """A zero-shot result filter: a result is dropped when, of all the prompts, its image
    embedding is most similar to one of ``flagged`` (the others are ``allowed``).

    Prompts stand in for clip-retrieval's trained detectors, which exist for two OpenAI models
    only; how well they work depends on the served model (a real CLIP catches the obvious
    cases; no prompt list is a moderation system).  Lists are taken as tuples.
    """

    flagged: tuple[str, ...]
    allowed: tuple[str, ...]

    def __post_init__(self) -> None:
        for name in ("flagged", "allowed"):
            prompts = getattr(self, name)
            if isinstance(prompts, str) or not prompts or not all(
                    isinstance(p, str) and p.strip() for p in prompts):
                raise ValueError(f"{name} prompts must be a non-empty list of non-empty texts, "
                                 f"not {prompts!r}")
            if max(len(p) for p in prompts) > MAX_QUERY_CHARS:
                raise ValueError(f"a {name} prompt is longer than {MAX_QUERY_CHARS} characters")
            object.__setattr__(self, name, tuple(prompts))


SAFETY_PROMPTS = PromptFilter(UNSAFE_PROMPTS, SAFE_PROMPTS)
VIOLENCE_PROMPTS = PromptFilter(VIOLENT_PROMPTS, PEACEFUL_PROMPTS)


class _ZeroShotFilter:
    """A :class:`PromptFilter` whose prompts the served model embeds once, at first use (the
    model stays the same while the server runs: an index rebuilt with another model answers
    503 until the server is restarted)."""

    def __init__(self, prompts: PromptFilter, index: SearchIndex, name: str):
        self.prompts, self.name, self._index = prompts, name, index
        self._vectors: np.ndarray | None = None
        self._lock = threading.Lock()

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """Whether each unit image embedding (row) is nearest to a flagged prompt."""
        nearest = np.argmax(rows @ self._embedded().T, axis=1)
        return nearest < len(self.prompts.flagged)

    def _embedded(self) -> np.ndarray:
        with self._lock:
            if self._vectors is None:
                try:
                    self._vectors = self._index.embed_texts(
                        list(self.prompts.flagged + self.prompts.allowed))
                except ValueError as exc:  # a prompt beyond the model's context
                    log.error("the %s prompts cannot be embedded: %s", self.name, exc)
                    raise HTTPException(500, f"the server's {self.name} prompts cannot be "
                                             f"embedded by its model ({exc}); its operator "
                                             "must shorten them") from exc
            return self._vectors


def near_duplicates(rows: np.ndarray, threshold: float = DEDUP_THRESHOLD) -> np.ndarray:
    """Which ranked unit embeddings (rows, best first) repeat a better-ranked one, decided as
    clip_back's ``deduplicate`` does: rows whose inner product exceeds ``threshold`` are
    linked, and of each connected group only the first (best-ranked) is kept, so a chain of
    near-duplicates collapses to its head even where its two ends differ more."""
    duplicate = np.zeros(len(rows), bool)
    if len(rows) < 2:
        return duplicate
    _, groups = connected_components(csr_matrix(rows @ rows.T > threshold), directed=False)
    duplicate[:] = True
    duplicate[np.unique(groups, return_index=True)[1]] = False
    return duplicate


# ------------------------------------------------------------------------------ JSON shapes
class KnnIn(BaseModel):
    """A clip-retrieval ``/knn-service`` query: exactly one of ``text``, ``image`` (base64 of an
    image file), ``image_url`` or ``embedding_input``.  Unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    text: str | None = Field(None, max_length=MAX_QUERY_CHARS)
    image: str | None = Field(None, description="the image file's bytes, base64-encoded")
    image_url: str | None = Field(None, max_length=MAX_URL_CHARS, description=(
        "refused unless the server was started allowing image URLs"))
    embedding_input: list[float] | None = Field(None, max_length=65536, description=(
        "a query embedding of the served model's dimension (normalised here)"))
    modality: Literal["image", "text"] = Field("image", description=(
        "what to search among; this index holds image embeddings only"))
    num_images: int = Field(DEFAULT_NUM_IMAGES, ge=1, le=MAX_K, description=(
        "results returned with their metadata"))
    num_result_ids: int | None = Field(None, ge=1, description=(
        f"results searched for (default num_images; at most {MAX_K}): those past num_images "
        "carry only id and similarity (see /metadata)"))
    indice_name: str | None = Field(None, description="the name from /indices-list, or absent")
    use_mclip: bool = False
    deduplicate: bool = True
    use_safety_model: bool = Field(False, description="zero-shot prompts with the served model")
    use_violence_detector: bool = Field(False, description=(
        "zero-shot prompts with the served model"))
    aesthetic_score: int | str | None = Field(None, description="accepted and ignored")
    aesthetic_weight: float | str | None = Field(None, description="accepted and ignored")


class MetadataIn(BaseModel):
    """A clip-retrieval ``/metadata`` query: the items' ids, from a ``/knn-service`` answer."""

    model_config = ConfigDict(extra="ignore")

    ids: list[Annotated[int, Field(ge=0, le=2**63 - 1)]] = Field(max_length=MAX_K)
    indice_name: str | None = None


class KnnHitOut(BaseModel):
    """One result, as clip_back gives it (documentation only: past ``num_images`` a result
    has only ``id`` and ``similarity``, and the index's other metadata columns are added)."""

    model_config = ConfigDict(extra="allow")

    id: int
    similarity: float = Field(description="cosine similarity to the query")
    caption: str | None = Field(None, description="absent when the item has none")
    url: str | None = Field(None, description="this server's thumbnail of the item")
    path: str | None = Field(None, description="as in /api/search: never absolute")
    start: float | None = Field(None, description="a video segment's start in seconds; absent "
                                                  "for an image")
    end: float | None = Field(None, description="a video segment's end in seconds")


Model = TypeVar("Model", bound=BaseModel)


def parse_body(model: type[Model], body: bytes) -> Model:
    """The body as JSON whatever its Content-Type (as clip_back's ``get_json(force=True)``
    reads it), or 400 naming each field that is wrong."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
                    for error in exc.errors(include_url=False)]
        raise HTTPException(400, "; ".join(problems[:10])) from None


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI description of a body the route parses itself (:func:`parse_body`)."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()}}}}


def decode_base64(value: str) -> bytes:
    """The bytes of a base64 ``image`` (line breaks allowed), or 400 saying what is wrong."""
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HTTPException(400, f"image is not base64 ({exc}): send the image file's bytes "
                                 "base64-encoded") from None


# ------------------------------------------------------------------------------- image_url
def _http_opener() -> urllib.request.OpenerDirector:
    """urllib with HTTP(S) and nothing else: a redirect to ``ftp:`` or ``file:`` fails."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(),
                    urllib.request.HTTPRedirectHandler(),
                    urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def fetch_image(url: str, limit: int = MAX_UPLOAD_BYTES,
                timeout: float = IMAGE_URL_TIMEOUT_S) -> bytes:
    """The bytes at an http(s) ``url`` for an ``image_url`` query: at most ``limit`` bytes,
    all within ``timeout`` seconds, or 400 saying why not."""
    if urlsplit(url).scheme.lower() not in ("http", "https"):
        raise HTTPException(400, "image_url must be an http:// or https:// URL")
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with _http_opener().open(request, timeout=timeout) as response:
            return _read_bounded(response, limit, deadline)
    except urllib.error.HTTPError as exc:
        raise HTTPException(400, f"image_url cannot be fetched: its server answered "
                                 f"{exc.code} {exc.reason}") from None
    except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError is an OSError
        raise HTTPException(400, "image_url cannot be fetched: "
                                 f"{getattr(exc, 'reason', None) or exc}") from None


def _read_bounded(response: Any, limit: int, deadline: float) -> bytes:
    declared = response.headers.get("Content-Length", "")
    too_large = HTTPException(400, f"image_url: the image is larger than {limit} bytes")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    data = bytearray()
    while chunk := response.read(2**16):
        data += chunk
        if len(data) > limit:
            raise too_large
        if time.monotonic() > deadline:
            raise HTTPException(400, f"image_url: the image did not arrive within "
                                     f"{IMAGE_URL_TIMEOUT_S:g} s")
    return bytes(data)


# --------------------------------------------------------------------------------- answers
def item_metadata(hit: HitOut, url: str) -> dict[str, Any]:
    """An item as clip_back's metadata columns show it: its caption (the key is absent when
    there is none: clip-retrieval's front-end reads any caption present as text), its image's
    ``url``, its ``path`` as /api/search shows it, a video segment's ``start`` and ``end``
    (seconds; absent for an image, whose result stays exactly clip_back's), and the index's
    other metadata columns, which never replace those."""
    data: dict[str, Any] = {} if hit.caption is None else {"caption": hit.caption}
    data.update(url=url, path=hit.path)
    if hit.start is not None:
        data.update(start=hit.start, end=hit.end)
    data.update((k, v) for k, v in (hit.extra or {}).items() if k not in RESERVED_KEYS)
    return data


def clip_result(hit: HitOut, url: str, with_metadata: bool) -> dict[str, Any]:
    """One result as clip_back answers it: id and similarity, then the metadata for the first
    ``num_images`` results only (the front-end asks /metadata for the rest as it scrolls)."""
    result: dict[str, Any] = {"id": hit.id, "similarity": hit.score}
    return {**result, **item_metadata(hit, url)} if with_metadata else result


class _Knn:
    """What the clip-retrieval routes share for one served index: its service in the server
    (which holds its name), its zero-shot filters (its own model embeds their prompts) and the
    options of :func:`add_knn_routes`."""

    def __init__(self, service: _Service, *, allow_image_urls: bool,
                 safety_prompts: PromptFilter, violence_prompts: PromptFilter):
        self.service, self.index, self.name = service, service.index, service.name
        self.allow_image_urls = allow_image_urls
        self.safety = _ZeroShotFilter(safety_prompts, self.index, "safety")
        self.violence = _ZeroShotFilter(violence_prompts, self.index, "violence")

    # ------------------------------------------------------------------ checks
    def check_query(self, knn: KnnIn) -> tuple[str, Any]:
        """The one query given (field name, value), or 400 saying what is wrong."""
        if knn.modality == "text":
            raise HTTPException(400, "modality 'text' searches the captions' embeddings, and "
                                     "this index holds image embeddings only: use modality "
                                     "'image'")
        given = {name: value for name, value in (
            ("text", knn.text), ("image", knn.image), ("image_url", knn.image_url),
            ("embedding_input", knn.embedding_input)) if value is not None and value != ""}
        if len(given) != 1:
            got = f" (got {', '.join(given)})" if given else ""
            raise HTTPException(400, "give exactly one of text, image (base64), image_url or "
                                     f"embedding_input{got}")
        (field, value), = given.items()
        if field == "text" and knn.use_mclip:
            raise HTTPException(400, "use_mclip: this server has no multilingual CLIP; send "
                                     "use_mclip false to embed the text with the served model")
        if field == "image_url" and not self.allow_image_urls:
            raise HTTPException(400, "image_url: this server does not fetch images from URLs "
                                     "(it was not started allowing it); send the image's bytes "
                                     "base64-encoded as `image` instead")
        return field, value

    def check_embedding(self, values: list[float]) -> np.ndarray:
        dim = self.index.info["embed_dim"]
        if len(values) != dim:
            raise HTTPException(400, f"embedding_input has {len(values)} values; this index's "
                                     f"model embeds in {dim} dimensions")
        vector = np.asarray(values, np.float64)
        if not np.isfinite(vector).all() or not vector.any():
            raise HTTPException(400, "embedding_input must be finite numbers, not all zero")
        vector /= np.abs(vector).max()  # (no overflow in the norm of large values)
        return (vector / np.linalg.norm(vector)).astype(np.float32)

    def limits(self, knn: KnnIn) -> tuple[int, dict[str, str]]:
        """Results to search for, and the header saying when it was lowered."""
        asked = knn.num_result_ids or knn.num_images
        if asked <= MAX_K:
            return asked, {}
        return MAX_K, {LIMITED_HEADER: f"num_result_ids={MAX_K} (asked {asked}; the server's "
                                       "result limit)"}

    # ------------------------------------------------------------------ filters
    def filters(self, knn: KnnIn) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
        """The post-filters a query asks for, named as the response header shows them."""
        chosen: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
        if knn.deduplicate:
            chosen[f"deduplicate=inner-product>{DEDUP_THRESHOLD:g}"] = near_duplicates
        if knn.use_safety_model:
            chosen["safety=zero-shot-prompts"] = self.safety
        if knn.use_violence_detector:
            chosen["violence=zero-shot-prompts"] = self.violence
        return chosen

    def post_filter(self, hits: list[Hit], filters: Sequence[Callable]) -> list[Hit]:
        """The hits no filter drops.  As in clip_back, every filter looks at every candidate
        (a near-duplicate of an unsafe result goes too), using the index's stored embeddings."""
        if not hits or not filters:
            return hits
        try:
            rows = self.index.embeddings([hit.id for hit in hits])
        except KeyError:  # a newer generation came in between the search and this
            raise HTTPException(503, "the index changed while answering; try again",
                                headers={"Retry-After": "1"}) from None
        dropped = np.zeros(len(hits), bool)
        for check in filters:
            dropped |= check(rows)
        return [hit for hit, drop in zip(hits, dropped) if not drop]

    # ------------------------------------------------------------------ routes
    def answer(self, knn: KnnIn, url_for: Callable[[int], str]) -> JSONResponse:
        """``/knn-service``: runs in a worker thread (it uses the model)."""
        field, value = self.check_query(knn)
        k, headers = self.limits(knn)
        filters = self.filters(knn)
        headers[FILTERS_HEADER] = "; ".join(filters) or "none"
        if knn.aesthetic_score not in (None, ""):  # (clip_back reads the weight only with it)
            headers[IGNORED_HEADER] = "aesthetic_score, aesthetic_weight"
        hits = self.search(field, value, k, list(filters.values()))
        results = [clip_result(hit, url_for(hit.id), rank < knn.num_images)
                   for rank, hit in enumerate(hits)]
        return JSONResponse(results, headers=headers)

    def search(self, field: str, value: Any, k: int, filters: list[Callable]) -> list[HitOut]:
        """The top ``k`` for the query, filtered, through the server's own search calls."""
        service, index = self.service, self.index
        if field == "text":
            return service.answer(QueryOut(text=value), lambda: self.post_filter(
                service.text_hits(value, k, None, None), filters)).results
        if field == "embedding_input":
            vector = self.check_embedding(value)
            return service.answer(QueryOut(), lambda: self.post_filter(
                index.search_vector(vector, k), filters)).results
        data = decode_base64(value) if field == "image" else fetch_image(value)
        with contextlib.ExitStack() as stack:
            try:
                image = stack.enter_context(service.decoded(data))
            except HTTPException as exc:  # name the field: the messages speak of an upload
                raise HTTPException(exc.status_code, f"{field}: {exc.detail}",
                                    headers=exc.headers) from None
            return service.answer(QueryOut(image=field), lambda: self.post_filter(
                index.search(image=image, k=k), filters)).results

    def metadata(self, query: MetadataIn, url_for: Callable[[int], str]) -> list[dict]:
        """``/metadata``: the items of ``ids`` that exist, in order (clip_back fails on an
        unknown id; here it is left out)."""
        with self.service.reading():
            hits = [hit for hit in map(self.index.item, query.ids) if hit is not None]
            root = self.index.collection_root()
        shown = [self.service.hit_out(hit, root) for hit in hits]
        return [{"id": hit.id, "metadata": item_metadata(hit, url_for(hit.id))} for hit in shown]


def thumbnail_urls(request: Request, service: _Service) -> Callable[[int], str]:
    """Item id -> absolute URL of its thumbnail on this server, as the client reached it (with
    the index's name when several are served: ids are per index)."""
    def url(item_id: int) -> str:
        found = request.url_for("thumbnail", item_id=item_id)
        return str(found.include_query_params(index=service.name) if service.tagged else found)

    return url


class _KnnIndexes:
    """The clip-retrieval side of every served index, by the name ``indice_name`` gives."""

    def __init__(self, services: _Services, **options: Any):
        self.by_name = {service.name: _Knn(service, **options) for service in services}
        self.default = self.by_name[services.default.name]

    def pick(self, name: str | None) -> _Knn:
        """The index ``indice_name`` names (absent: the default), or 400 listing the names
        (as clip_back answers a name it does not serve)."""
        if name is None:
            return self.default
        knn = self.by_name.get(name)
        if knn is None:
            raise HTTPException(400, f"indice_name {shown_name(name)!r} is not served here; the "
                                     f"valid names are {list(self.by_name)} (GET /indices-list)")
        return knn


def add_knn_routes(app: FastAPI, services: _Services, *, allow_image_urls: bool = False,
                   safety_prompts: PromptFilter | None = None,
                   violence_prompts: PromptFilter | None = None) -> None:
    """Add clip-retrieval's ``/knn-service``, ``/metadata`` and ``/indices-list`` to the
    server's ``app``, over its ``services`` (one per served index); see the module docstring
    for what differs.  ``allow_image_urls`` lets queries name an ``image_url`` for the server
    to fetch (any URL it can reach: only for trusted clients); ``safety_prompts`` and
    ``violence_prompts`` replace :data:`SAFETY_PROMPTS` and :data:`VIOLENCE_PROMPTS`."""
    indexes = _KnnIndexes(services, allow_image_urls=allow_image_urls,
                          safety_prompts=safety_prompts or SAFETY_PROMPTS,
                          violence_prompts=violence_prompts or VIOLENCE_PROMPTS)
    results = {200: {"description": "results, best first", "content": {"application/json": {
        "schema": {"type": "array", "items": KnnHitOut.model_json_schema()}}}}}

    @app.post("/knn-service", tags=["clip-retrieval"], openapi_extra=json_body(KnnIn),
              responses=results)
    async def knn_service(request: Request) -> JSONResponse:
        """clip-retrieval's nearest-neighbour query (what ``ClipClient.query`` posts)."""
        query = parse_body(KnnIn, await request.body())
        knn = indexes.pick(query.indice_name)
        return await run_in_threadpool(knn.answer, query, thumbnail_urls(request, knn.service))

    @app.post("/metadata", tags=["clip-retrieval"], openapi_extra=json_body(MetadataIn))
    async def metadata(request: Request) -> list[dict]:
        """Metadata of results by id: ``[{"id", "metadata": {"caption", "url", ...}}]``."""
        query = parse_body(MetadataIn, await request.body())
        knn = indexes.pick(query.indice_name)
        return await run_in_threadpool(knn.metadata, query, thumbnail_urls(request, knn.service))

    @app.get("/indices-list", tags=["clip-retrieval"])
    def indices_list() -> list[str]:
        """The served indexes' names: the values of ``indice_name`` in queries (the first is
        used when a query gives none)."""
        return list(indexes.by_name)

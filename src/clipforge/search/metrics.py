"""Prometheus metrics of the search server, served at ``GET /metrics``.

What an operator needs to see a server's health and load: requests (by route, method and
status), their latency, the time the model spends encoding queries, and the items served.
Each app has its own :class:`~prometheus_client.CollectorRegistry`, so several apps in one
process (tests, notebooks) keep separate counts and never clash over metric names.

Label values are bounded, whatever clients send: a request is labelled by the template of the
route it matches (``/api/items/{item_id}``, never the id itself), or ``(unmatched)``, and by its
method if it is a standard one, else ``OTHER``.  A scanner trying random paths and methods
therefore adds no series.  ``/metrics`` is not an open path: with a token, it needs the token
like the API (:class:`~clipforge.search.server.BearerAuth`), since request counts and the
index's size are the server's business only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.context_managers import Timer
from prometheus_client.exposition import choose_encoder
from starlette.routing import Match, Router

MODEL_KINDS = ("text", "image")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER_METHOD = "OTHER"
UNMATCHED = "(unmatched)"


class ServerMetrics:
    """One app's registry and metrics.

    ``requests``: ``clipforge_http_requests_total{route, method, status}``;
    ``latency``: ``clipforge_http_request_duration_seconds{route}``, from the request's arrival
    at the app to the end of its answer; ``model_seconds``:
    ``clipforge_model_encode_seconds{kind}``, one observation per call into the model;
    ``index_items``: ``clipforge_index_items{index}``, the items of the generation being served,
    one series per served index (by name: the names are the server's own, so they are bounded).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "clipforge_http_requests", "HTTP requests answered, by route template, method and "
            "status code", ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram(
            "clipforge_http_request_duration_seconds", "Time from a request's arrival to the "
            "end of its answer, by route template", ["route"], registry=self.registry)
        self.model_seconds = Histogram(
            "clipforge_model_encode_seconds", "Time spent in the model per call: text = "
            "encoding query texts (one call per batch of concurrent queries); image = "
            "encoding an uploaded image, with the texts that go with it (a mixed query's text, "
            "/api/classify's labels)", ["kind"], registry=self.registry)
        self.index_items = Gauge("clipforge_index_items", "Items in the index generation being "
                                 "served, by the index's name", ["index"],
                                 registry=self.registry)
        for kind in MODEL_KINDS:  # present from the start, at zero, as Prometheus advises
            self.model_seconds.labels(kind)

    def model_time(self, kind: str) -> Timer:
        """A context manager timing a call into the model as ``kind``: a new one for each
        call (it holds its start time), so concurrent calls are timed apart."""
        if kind not in MODEL_KINDS:
            raise ValueError(f"model kind {kind!r} is not one of {', '.join(MODEL_KINDS)}")
        return self.model_seconds.labels(kind).time()

    def record_request(self, route: str, method: str, status: int, seconds: float) -> None:
        method = method if method in METHODS else OTHER_METHOD
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The metrics in the format the scraper's ``Accept`` header asks for (Prometheus
        text, or OpenMetrics), and its content type."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


def route_template(router: Router, scope: dict) -> str:
    """The path template of the route ``scope`` goes to (``/api/items/{item_id}``; a mounted
    folder as ``/static/{path}``), else :data:`UNMATCHED`.  A route that matches the path but
    not the method counts too: it answers 405.  Matched here rather than read from the scope
    after routing, so that requests refused before routing (401, 429) have their route too."""
    partial = None
    for route in router.routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return _template(route)
        if match is Match.PARTIAL and partial is None:
            partial = route
    return UNMATCHED if partial is None else _template(partial)


def _template(route: Any) -> str:
    return getattr(route, "path_format", None) or getattr(route, "path", None) or UNMATCHED


class RequestMetrics:
    """ASGI middleware counting and timing every HTTP request in ``metrics``, refusals
    included.  A request whose app fails before answering counts as the 500 it becomes."""

    def __init__(self, app: Any, metrics: ServerMetrics, router: Router):
        self.app, self.metrics, self.router = app, metrics, router

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = route_template(self.router, scope)
        status = 500
        start = time.perf_counter()

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.record_request(route, scope["method"], status,
                                        time.perf_counter() - start)


def add_metrics_route(app: FastAPI, metrics: ServerMetrics,
                      before_scrape: Callable[[], Any] = lambda: None) -> None:
    """``GET /metrics``: ``metrics`` as Prometheus scrapes them.  ``before_scrape`` runs
    first (the server picks up a rebuilt index there, so that the index size is current even
    when no query came since)."""

    @app.get("/metrics", tags=["service"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus "
                              "text format, or OpenMetrics if the Accept header asks for it"}})
    def scrape(request: Request) -> Response:
        """Request counts and latencies, model time and index size, for Prometheus; needs the
        access token when the server has one."""
        before_scrape()
        data, content_type = metrics.exposition(request.headers.get("accept", ""))
        return Response(data, media_type=content_type, headers={"Cache-Control": "no-store"})

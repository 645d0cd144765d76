"""The search server's CORS allow-list (``create_app(cors_origins=...)``, ``clipforge serve
--cors-origins``) and its per-client bound on requests in flight (``max_client_requests``,
``--max-client-requests``: 429 with Retry-After beyond it, /healthz exempt).  Live tests run
uvicorn on 127.0.0.1 only; every wait has a timeout, and blocked handlers are always released."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from clipforge.cli import main
from clipforge.search import SearchIndex
from clipforge.search import server as server_module
from clipforge.search.server import (
    MAX_CLIENT_REQUESTS,
    TOKEN_ENV,
    ClientLimit,
    check_origins,
    create_app,
    running_server,
)

LOOPBACK = "http://127.0.0.1"
TOKEN = "s3cret-Token_for-tests-0123456789"
ALLOWED = "https://app.example"
OTHER_SITE = "https://evil.example"
WAIT_S = 20.0  # the most any test waits for a request, a thread or the server


@pytest.fixture(autouse=True)
def _no_token_in_environment(monkeypatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)


@pytest.fixture(scope="module")
def cors_client(index: SearchIndex) -> Iterator[TestClient]:
    app = create_app(index, token=TOKEN, cors_origins=[ALLOWED, "http://localhost:5173"])
    with TestClient(app, base_url=LOOPBACK) as c:
        yield c


def preflight(client: TestClient, origin: str, method: str = "GET",
              headers: str = "authorization") -> httpx.Response:
    return client.options("/api/search", headers={
        "Origin": origin, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers})


# --------------------------------------------------------------------------------- CORS
def test_preflight_from_an_allowed_origin_then_the_request_with_a_token(
        cors_client: TestClient) -> None:
    answer = preflight(cors_client, ALLOWED)  # no token: a browser's preflight carries none
    assert answer.status_code == 200, answer.text
    assert answer.headers["access-control-allow-origin"] == ALLOWED
    assert "authorization" in answer.headers["access-control-allow-headers"].lower()
    assert set(answer.headers["access-control-allow-methods"].split(", ")) == {"GET", "POST"}
    post = preflight(cors_client, ALLOWED, "POST", "authorization, content-type")
    assert post.status_code == 200 and post.headers["access-control-allow-origin"] == ALLOWED
    result = cors_client.get("/api/search?q=a+cat&k=2", headers={
        "Origin": ALLOWED, "Authorization": f"Bearer {TOKEN}"})
    assert result.status_code == 200 and len(result.json()["results"]) == 2
    assert result.headers["access-control-allow-origin"] == ALLOWED


def test_other_origins_get_no_cors_headers(cors_client: TestClient) -> None:
    refused = preflight(cors_client, OTHER_SITE)
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers
    result = cors_client.get("/api/search?q=a+cat", headers={
        "Origin": OTHER_SITE, "Authorization": f"Bearer {TOKEN}"})
    assert result.status_code == 200  # answered, but a browser keeps it from the page
    assert "access-control-allow-origin" not in result.headers
    for method, headers in (("DELETE", "authorization"), ("GET", "x-custom")):
        wrong = preflight(cors_client, ALLOWED, method, headers)
        assert wrong.status_code == 400, (method, headers)


def test_a_401_for_an_allowed_origin_is_readable_by_its_page(cors_client: TestClient) -> None:
    answer = cors_client.get("/api/search?q=a+cat", headers={"Origin": ALLOWED})
    assert answer.status_code == 401
    assert answer.headers["access-control-allow-origin"] == ALLOWED
    assert "www-authenticate" in answer.headers["access-control-expose-headers"].lower()
    assert answer.headers["content-security-policy"]  # the security headers still apply


def test_no_cors_headers_by_default(index: SearchIndex) -> None:
    with TestClient(create_app(index), base_url=LOOPBACK) as client:
        answer = client.get("/api/search?q=a+cat", headers={"Origin": ALLOWED})
        assert answer.status_code == 200
        assert not any(h.startswith("access-control-") for h in answer.headers)
        assert "access-control-allow-origin" not in preflight(client, ALLOWED).headers


def test_origins_are_compared_as_browsers_send_them() -> None:
    assert check_origins(["HTTPS://App.Example:443", "http://b.example:80",
                          "http://localhost:5173", "http://[::1]:8080", "http://10.0.0.2"]) == [
        "https://app.example", "http://b.example", "http://localhost:5173",
        "http://[::1]:8080", "http://10.0.0.2"]
    assert check_origins(()) == []


BAD_ORIGINS = ["", "https://app.example/", "https://app.example/api", "app.example",
               "ftp://app.example", "https://app.example:99999", "https://user@app.example",
               "null", "https://app.example?x=1", "https://"]


@pytest.mark.parametrize("origin", BAD_ORIGINS)
def test_an_origin_that_is_not_scheme_host_port_is_refused(index: SearchIndex,
                                                            origin: str) -> None:
    with pytest.raises(ValueError, match="is not an origin") as info:
        create_app(index, cors_origins=[ALLOWED, origin])
    assert repr(origin) in str(info.value) and "\n" not in str(info.value)


def test_any_origin_is_refused_with_the_reason(index: SearchIndex) -> None:
    with pytest.raises(ValueError, match=r"'\*'.*any web page could drive the API"):
        create_app(index, cors_origins=["*"])


def refuse_to_load(monkeypatch) -> None:
    """Fail the test if ``clipforge serve`` got as far as loading the index."""
    def opened(cls, *args, **kwargs):
        raise AssertionError("the index was opened before the options were checked")
    monkeypatch.setattr(SearchIndex, "open", classmethod(opened))


@pytest.mark.parametrize("value", ["*", "https://a.example,*", "", "https://a.example,,"
                                   "https://b.example", "https://a.example/path"])
def test_serve_refuses_bad_cors_origins_in_one_line(tmp_path: Path, monkeypatch, capsys,
                                                    value: str) -> None:
    refuse_to_load(monkeypatch)
    assert main(["serve", str(tmp_path), "--port", "0", "--cors-origins", value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: --cors-origins: CORS origin ") and "Traceback" not in err
    if "*" in value:
        assert "'*'" in err and "any web page could drive the API" in err
    else:
        assert "is not an origin" in err


def test_serve_options_reach_the_app(tmp_path: Path, monkeypatch) -> None:
    seen: dict = {}
    monkeypatch.setattr(SearchIndex, "open", classmethod(lambda cls, *a, **k: "the index"))
    monkeypatch.setattr(server_module, "serve", lambda index, **kwargs: seen.update(kwargs))
    assert main(["serve", str(tmp_path), "--port", "0", "--cors-origins",
                 "https://A.example, http://b.example:8080", "--max-client-requests", "3"]) == 0
    assert seen["cors_origins"] == ["https://a.example", "http://b.example:8080"]
    assert seen["max_client_requests"] == 3
    seen.clear()
    assert main(["serve", str(tmp_path), "--port", "0", "--max-client-requests", "0"]) == 0
    assert seen["max_client_requests"] is None  # no limit
    seen.clear()
    assert main(["serve", str(tmp_path), "--port", "0"]) == 0
    assert "cors_origins" not in seen and "max_client_requests" not in seen


def test_serve_help_states_the_client_limit_default(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    help_text = text.rsplit("--max-client-requests", 1)[1]  # the option's own help
    assert help_text.split("(default ", 1)[1].startswith(f"{MAX_CLIENT_REQUESTS})")
    assert "--cors-origins" in text and "'*' is refused" in text


def test_client_limit_must_be_positive(index: SearchIndex) -> None:
    with pytest.raises(ValueError, match="max_client_requests"):
        create_app(index, max_client_requests=0)


# ---------------------------------------------------------------- per-client limit, unit
def test_client_limit_counts_each_address_on_its_own() -> None:
    """Two requests from A are held; A's third gets 429, B and A's /healthz go through; once
    A's requests finish, A is served again."""
    async def scenario() -> list[tuple[str, int, dict]]:
        release = asyncio.Event()
        answers: list[tuple[str, int, dict]] = []

        async def app(scope, receive, send) -> None:
            if scope["path"] != "/healthz":
                await asyncio.wait_for(release.wait(), WAIT_S)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        limit = ClientLimit(app, max_requests=2)

        async def request(client: str, path: str = "/api/search") -> None:
            scope = {"type": "http", "method": "GET", "path": path, "root_path": "",
                     "headers": [], "client": (client, 1234), "query_string": b""}

            async def receive() -> dict:
                return {"type": "http.request", "body": b"", "more_body": False}

            async def send(message: dict) -> None:
                if message["type"] == "http.response.start":
                    headers = {k.decode(): v.decode() for k, v in message["headers"]}
                    answers.append((f"{client}{path}", message["status"], headers))

            await asyncio.wait_for(limit(scope, receive, send), WAIT_S)

        held = [asyncio.create_task(request("10.0.0.1")) for _ in range(2)]
        await asyncio.sleep(0.05)  # both are in flight, waiting for the release
        await request("10.0.0.1")
        await request("10.0.0.1", "/healthz")
        other = asyncio.create_task(request("10.0.0.2"))
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.gather(*held, other)
        await request("10.0.0.1")
        assert limit._in_flight == {}  # nothing left behind
        return answers

    answers = asyncio.run(scenario())
    assert answers[0][:2] == ("10.0.0.1/api/search", 429)
    assert answers[0][2]["retry-after"] == "1"
    assert answers[1][:2] == ("10.0.0.1/healthz", 200)
    assert sorted(a[:2] for a in answers[2:5]) == [("10.0.0.1/api/search", 200)] * 2 + [
        ("10.0.0.2/api/search", 200)]
    assert answers[5][:2] == ("10.0.0.1/api/search", 200)


# ---------------------------------------------------------------- per-client limit, live
@pytest.fixture
def blocked_search(index: SearchIndex, monkeypatch) -> Iterator[tuple[threading.Semaphore,
                                                                      threading.Event]]:
    """``index.search`` held until the event is set; the semaphore counts calls entered."""
    entered, release = threading.Semaphore(0), threading.Event()

    def search(*args, **kwargs) -> list:
        entered.release()
        if not release.wait(WAIT_S):
            raise RuntimeError("the test never released the search")
        return []

    monkeypatch.setattr(index, "search", search)
    try:
        yield entered, release
    finally:
        release.set()


def get(url: str, path: str) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=WAIT_S) as http:
        return http.get(path)


def test_requests_past_the_client_limit_get_429_until_others_finish(
        index: SearchIndex, blocked_search: tuple[threading.Semaphore, threading.Event]) -> None:
    entered, release = blocked_search
    app = create_app(index, batch_texts=False, max_client_requests=2, cors_origins=[ALLOWED])
    with running_server(app) as url, ThreadPoolExecutor(2) as pool:
        held = [pool.submit(get, url, f"/api/search?q=query+{n}") for n in range(2)]
        try:
            assert all(entered.acquire(timeout=WAIT_S) for _ in held), "requests never arrived"
            with httpx.Client(base_url=url, timeout=WAIT_S) as http:
                refused = http.get("/api/search?q=one+more", headers={"Origin": ALLOWED})
                health = [http.get("/healthz") for _ in range(3)]
        finally:
            release.set()
        finished = [future.result(timeout=WAIT_S) for future in held]
        with httpx.Client(base_url=url, timeout=WAIT_S) as http:
            deadline = time.monotonic() + WAIT_S
            again = http.get("/api/search?q=later")
            while again.status_code == 429 and time.monotonic() < deadline:
                time.sleep(0.05)  # the last answer's bytes may beat its bookkeeping
                again = http.get("/api/search?q=later")
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert "at most 2 in flight" in refused.json()["detail"]
    assert refused.headers["access-control-allow-origin"] == ALLOWED  # readable by the page
    assert [h.status_code for h in health] == [200] * 3
    assert [f.status_code for f in finished] == [200, 200]
    assert again.status_code == 200


def test_no_client_limit_lets_every_request_through(
        index: SearchIndex, blocked_search: tuple[threading.Semaphore, threading.Event]) -> None:
    entered, release = blocked_search
    app = create_app(index, batch_texts=False, max_client_requests=None)
    with running_server(app) as url, ThreadPoolExecutor(3) as pool:
        held = [pool.submit(get, url, f"/api/search?q=query+{n}") for n in range(3)]
        try:
            arrived = [entered.acquire(timeout=WAIT_S) for _ in held]
        finally:
            release.set()
        finished = [future.result(timeout=WAIT_S) for future in held]
    assert all(arrived)
    assert [f.status_code for f in finished] == [200] * 3

"""The search server against hostile or broken conditions: foreign Host headers (DNS
rebinding), slow and silent clients, over-long texts, security headers on every response, an
index deleted or damaged under the running server, concurrent large decodes, and a port that
cannot be bound.  Live tests run uvicorn on 127.0.0.1 only, with timeouts configured short."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import clipforge
from clipforge.cli import main
from clipforge.search import SearchIndex, build_index
from clipforge.search.html import render_thumbnail
from clipforge.search.index import IndexUnavailableError
from clipforge.search.server import (
    MAX_QUERY_CHARS,
    ServerLimits,
    create_app,
    default_allowed_hosts,
    listen,
    running_server,
)

LOOPBACK = "http://127.0.0.1"
# Short enough to keep the tests quick, long enough that a busy CI machine does not trip them.
SHORT = ServerLimits(header_timeout=0.5, body_timeout=0.5, keep_alive=0.5, max_connections=None)
WAIT_S = 10.0  # the most any test waits for the server to close a connection


@pytest.fixture(scope="module")
def client(index: SearchIndex) -> Iterator[TestClient]:
    with TestClient(create_app(index), base_url=LOOPBACK) as c:
        yield c


def jpeg_bytes(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (90, 140, 200)).save(out, "JPEG")
    return out.getvalue()


def assert_still_serving(client: TestClient | httpx.Client) -> None:
    response = client.get("/api/search", params={"q": "a cat", "k": 3})
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 3


# ------------------------------------------------------------------------ 1. Host header
@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1", "127.0.0.1:8000",
                                  "[::1]", "[::1]:8000", "LOCALHOST:8000"])
def test_loopback_host_names_are_accepted(client: TestClient, host: str) -> None:
    assert client.get("/healthz", headers={"host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example",
                                  "localhost.evil.example:80", "[::2]:8000", "10.0.0.1", ""])
def test_foreign_host_names_are_refused(client: TestClient, host: str) -> None:
    """A DNS-rebinding page reaches the server under its own name: refused before routing."""
    for url in ["/healthz", "/api/search?q=cat", "/api/items/1", "/thumbnails/1", "/"]:
        response = client.get(url, headers={"host": host})
        assert response.status_code == 400, (url, host)
        assert "host" in response.text.lower()
        assert "results" not in response.text and "path" not in response.text


def test_allowed_hosts_can_be_configured(index: SearchIndex) -> None:
    app = create_app(index, allowed_hosts=["photos.lan", "::1"])
    with TestClient(app, base_url="http://photos.lan") as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/healthz", headers={"host": "photos.lan:9000"}).status_code == 200
        assert c.get("/healthz", headers={"host": "[::1]:9000"}).status_code == 200
        assert c.get("/healthz", headers={"host": "localhost"}).status_code == 400


def test_default_allowed_hosts_follow_the_bind_address() -> None:
    loopback = {"localhost", "127.0.0.1", "[::1]"}
    assert set(default_allowed_hosts("127.0.0.1")) == loopback
    assert set(default_allowed_hosts("localhost")) == loopback
    assert set(default_allowed_hosts("::1")) == loopback
    assert default_allowed_hosts("192.168.1.20") == ["192.168.1.20"]
    assert default_allowed_hosts("fd00::20") == ["[fd00::20]"]
    assert default_allowed_hosts("photos.lan") == ["photos.lan"]
    everywhere = default_allowed_hosts("0.0.0.0")
    assert loopback <= set(everywhere) and socket.gethostname().lower() in everywhere


def test_live_server_refuses_a_foreign_host(index: SearchIndex) -> None:
    with running_server(create_app(index)) as url:
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/healthz").status_code == 200
            assert http.get("/healthz", headers={"host": "attacker.example"}).status_code == 400


# ------------------------------------------------------------------ 2. slow clients
def raw_connection(url: str) -> socket.socket:
    port = int(url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection; fails if it is still open
    after WAIT_S seconds."""
    data = b""
    deadline = time.monotonic() + WAIT_S
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"the connection is still open after {WAIT_S} s (got {data!r})")


def trickle_until_closed(sock: socket.socket, piece: bytes) -> bytes:
    """Send ``piece`` every 0.1 s (at most WAIT_S seconds' worth) until the server closes the
    connection; what it sent meanwhile."""
    data = b""
    sock.settimeout(0.1)
    for _ in range(int(WAIT_S / 0.1)):
        try:
            sock.sendall(piece)
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"the connection is still open after {WAIT_S} s (got {data!r})")


@pytest.fixture(scope="module")
def short_server(index: SearchIndex) -> Iterator[str]:
    app = create_app(index, body_timeout=SHORT.body_timeout)
    with running_server(app, limits=SHORT) as url:
        yield url


def test_silent_connection_is_closed(short_server: str) -> None:
    with raw_connection(short_server) as sock:
        assert read_until_closed(sock) == b""
    with httpx.Client(base_url=short_server, timeout=30) as http:
        assert_still_serving(http)


def test_half_sent_headers_are_cut_off(short_server: str) -> None:
    with raw_connection(short_server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        assert read_until_closed(sock) == b""


def test_headers_trickled_byte_by_byte_are_cut_off(short_server: str) -> None:
    """Every byte would restart an idle timer: the headers' deadline is counted from the
    request's first byte."""
    with raw_connection(short_server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert trickle_until_closed(sock, b"X") == b""


def test_slow_body_gets_408(short_server: str) -> None:
    with raw_connection(short_server) as sock:
        sock.sendall(b"POST /api/embed HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                     b'{"texts": [')
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"body" in answer


def test_body_nobody_reads_is_cut_off(short_server: str) -> None:
    """/healthz never reads a body: the server answers, then stops a client that goes on
    trickling the body it announced."""
    with raw_connection(short_server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n")
        answer = trickle_until_closed(sock, b"x")
    assert answer.startswith(b"HTTP/1.1 200"), answer


def read_response(sock: socket.socket) -> bytes:
    """One whole response (headers and a Content-Length body) from a keep-alive connection."""
    sock.settimeout(WAIT_S)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return head


def test_keep_alive_connection_is_reused_then_closed_when_idle(short_server: str) -> None:
    with raw_connection(short_server) as sock:
        for _ in range(2):  # one connection, two requests
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_response(sock).startswith(b"HTTP/1.1 200")
        assert read_until_closed(sock) == b""


def test_connection_limit_answers_503(index: SearchIndex) -> None:
    limits = ServerLimits(header_timeout=30, body_timeout=30, keep_alive=30, max_connections=3)
    with running_server(create_app(index), limits=limits) as url:
        idle = [raw_connection(url) for _ in range(3)]
        try:
            with httpx.Client(base_url=url, timeout=30) as http:
                refused = http.get("/healthz")
        finally:
            for sock in idle:
                sock.close()
        with httpx.Client(base_url=url, timeout=30) as http:
            for _ in range(50):  # until the server has seen the idle connections close
                accepted = http.get("/healthz")
                if accepted.status_code != 503:
                    break
                time.sleep(0.1)
    assert refused.status_code == 503
    assert accepted.status_code == 200


# ------------------------------------------------------------ 3. texts and labels
@pytest.fixture
def model_calls(index: SearchIndex, monkeypatch) -> list[list[str]]:
    """Texts that reached the text encoder."""
    calls: list[list[str]] = []
    real = index.embed_texts
    monkeypatch.setattr(index, "embed_texts", lambda texts: calls.append(list(texts))
                        or real(texts))
    return calls


def test_over_long_embed_texts_are_refused_before_the_model(client: TestClient,
                                                            model_calls: list) -> None:
    long = "a" * (MAX_QUERY_CHARS + 1)
    as_json = client.post("/api/embed", json={"texts": ["a cat", long]})
    as_form = client.post("/api/embed", data={"texts": ["a cat", long]},
                          files={"file": ("x.txt", b"")})
    for response in (as_json, as_form):
        assert response.status_code == 422, response.text
        assert str(MAX_QUERY_CHARS) in response.text
    assert model_calls == []
    fine = client.post("/api/embed", json={"texts": ["a" * 50]})
    assert fine.status_code == 200


def test_over_long_labels_are_refused_before_the_model(client: TestClient, photo_dir: Path,
                                                       model_calls: list) -> None:
    data = (photo_dir / "coffee.png").read_bytes()
    for labels in (f"cat, {'b' * (MAX_QUERY_CHARS + 1)}", ["cat", "d" * (MAX_QUERY_CHARS + 1)]):
        response = client.post("/api/classify", files={"file": ("c.png", data)},
                               data={"labels": labels})
        assert response.status_code == 422, response.text
        assert str(MAX_QUERY_CHARS) in response.json()["detail"]
    assert model_calls == []


def test_json_bodies_have_their_own_smaller_cap(index: SearchIndex, photo_dir: Path) -> None:
    """Texts need far less room than images: a JSON body over max_json_bytes is refused by its
    Content-Length, while a multipart upload of the same size is accepted."""
    with TestClient(create_app(index, max_json_bytes=5_000), base_url=LOOPBACK) as c:
        texts = ["a photo of a cat"] * 100  # 2 KB of JSON: fine
        assert c.post("/api/embed", json={"texts": texts}).status_code == 200
        big = c.post("/api/embed", json={"texts": ["word " * 150] * 20})
        assert big.status_code == 413 and "5000" in big.json()["detail"]
        photo = (photo_dir / "horse.png").read_bytes()  # 17 KB, over 5000 bytes
        assert c.post("/api/search/image", files={"file": ("h.png", photo)}).status_code == 200


# ---------------------------------------------------------------- 4. security headers
def assert_security_headers(response: httpx.Response) -> None:
    headers = response.headers
    csp = headers.get("content-security-policy", "")
    assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp, response.url
    assert "object-src 'none'" in csp
    assert headers.get("x-content-type-options") == "nosniff", response.url
    assert headers.get("x-frame-options") == "DENY", response.url
    assert headers.get("referrer-policy") == "no-referrer", response.url


def test_security_headers_on_every_response(client: TestClient, index: SearchIndex) -> None:
    some_id = index.search(text="a cat", k=1)[0].id
    for url in ["/", "/docs", "/redoc", "/openapi.json", "/static/app.js", "/static/style.css",
                "/static-offline-docs/swagger-ui.css", "/healthz", "/api/search?q=a+cat",
                f"/api/items/{some_id}", f"/thumbnails/{some_id}", "/api/items/999999",
                "/no/such/page", "/api/search?k=0"]:
        response = client.get(url)
        assert response.status_code < 500, url
        assert_security_headers(response)
    assert_security_headers(client.get("/healthz", headers={"host": "evil.example"}))
    assert_security_headers(client.post("/api/embed", content=b"x" * (2 * 2**20),
                                        headers={"content-type": "application/json"}))


def test_docs_csp_allows_exactly_its_inline_script(client: TestClient) -> None:
    for url in ["/docs", "/docs/oauth2-redirect"]:
        response = client.get(url)
        scripts = re.findall(r"<script>(.*?)</script>", response.text, re.S)
        assert scripts, url
        csp = response.headers["content-security-policy"]
        script_src = re.search(r"script-src ([^;]*)", csp).group(1)
        assert "unsafe-inline" not in script_src and "unsafe-eval" not in script_src
        for script in scripts:
            digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
            assert f"'sha256-{digest}'" in script_src, url
    page_csp = client.get("/").headers["content-security-policy"]
    assert "sha256" not in page_csp and "unsafe-inline" not in page_csp


# ------------------------------------------------------------ 5. an index that goes away
@pytest.fixture
def own_index(photo_dir: Path, model: clipforge.CLIP, tmp_path: Path) -> SearchIndex:
    """An index this test may delete or damage."""
    build_index(photo_dir, tmp_path / "index", model)
    return SearchIndex.open(tmp_path / "index", model)


def test_deleted_index_makes_health_and_queries_503(own_index: SearchIndex, photo_dir: Path,
                                                    model: clipforge.CLIP) -> None:
    with TestClient(create_app(own_index), base_url=LOOPBACK) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        results = c.get("/api/search", params={"q": "a cat", "k": 100}).json()["results"]
        some_id = results[0]["id"]
        for r in results:  # cache every thumbnail
            assert c.get(f"/thumbnails/{r['id']}").status_code == 200
        shutil.rmtree(own_index.path)
        health = c.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "unavailable"
        assert "index.sqlite" in health.json()["detail"]
        assert str(own_index.path.parent) not in health.json()["detail"]  # no absolute path
        for url in ["/api/search?q=a+cat", f"/api/items/{some_id}",
                    f"/api/items/{some_id}/similar", f"/thumbnails/{some_id}"]:
            response = c.get(url)
            assert response.status_code == 503, url
            assert "index" in response.json()["detail"]
        image = c.post("/api/search/image",
                       files={"file": ("r.jpg", (photo_dir / "rocket.jpg").read_bytes())})
        assert image.status_code == 503
        # Rebuilt at the same place from other photos: served again, the new index, whose
        # ids (and generation) start again where the old one's did.
        folder = own_index.path.parent / "fewer"
        folder.mkdir()
        for photo in sorted(photo_dir.iterdir())[-3:]:
            shutil.copy(photo, folder / photo.name)
        build_index(folder, own_index.path, model)
        health = c.get("/healthz")
        assert health.status_code == 200 and health.json()["items"] == 3
        results = c.get("/api/search", params={"q": "a cat", "k": 100}).json()["results"]
        assert {r["path"] for r in results} == {p.name for p in folder.iterdir()}
        for r in results:  # no thumbnail cached from the old index is served for a new id
            thumb = c.get(f"/thumbnails/{r['id']}")
            assert thumb.content == render_thumbnail(Image.open(folder / r["path"])), r["path"]


def test_damaged_database_makes_health_and_queries_503(own_index: SearchIndex) -> None:
    with TestClient(create_app(own_index), base_url=LOOPBACK) as c:
        assert c.get("/healthz").status_code == 200
        db = own_index.path / "index.sqlite"
        with open(db, "r+b") as f:  # the same file, its header and first pages overwritten
            f.write(b"\x13not a database" * 1000)
        health = c.get("/healthz")
        assert health.status_code == 503
        assert "index.sqlite" in health.json()["detail"]
        search = c.get("/api/search", params={"q": "a cat"})
        assert search.status_code == 503 and "index" in search.json()["detail"]


def test_index_failing_during_a_query_is_503(client: TestClient, index: SearchIndex,
                                             monkeypatch) -> None:
    """Readable at the refresh, gone by the read that follows: still 503, not a 500."""
    def gone(*args, **kwargs):
        raise IndexUnavailableError(f"{index.path}/index.sqlite cannot be read: gone")

    some_id = index.search(text="a cat", k=1)[0].id
    monkeypatch.setattr(index, "item", gone)
    monkeypatch.setattr(index, "search_vector", gone)
    for url in [f"/api/items/{some_id}", "/api/search?q=a+cat", "/thumbnails/999999"]:
        response = client.get(url)
        assert response.status_code == 503, url
        assert "cannot be read" in response.json()["detail"]
        assert str(index.path.parent) not in response.json()["detail"]


def test_search_index_refresh_raises_when_the_index_is_gone(own_index: SearchIndex) -> None:
    assert own_index.refresh() is False
    shutil.rmtree(own_index.path)
    with pytest.raises(IndexUnavailableError, match="index.sqlite"):
        own_index.refresh()
    with pytest.raises(IndexUnavailableError):  # and again: nothing cached lets it through
        own_index.refresh()


# ------------------------------------------------------------- 6. concurrent decodes
def test_decode_budget_refuses_uploads_over_budget_and_keeps_serving(index: SearchIndex,
                                                                    monkeypatch) -> None:
    """One 1000x1000 upload holds the whole 1-megapixel budget while the model runs: a second
    upload gets 503 with Retry-After, other requests are answered, and once the first is done
    the second goes through."""
    entered, release = threading.Event(), threading.Event()
    real = index.embed_image

    def slow_embed_image(image: Image.Image):
        if image.size == (1000, 1000):
            entered.set()
            release.wait(WAIT_S)
        return real(image)

    monkeypatch.setattr(index, "embed_image", slow_embed_image)
    app = create_app(index, max_pixels=1_000_000, decode_budget=1_000_000, decode_wait=0.2)
    big, small = jpeg_bytes((1000, 1000)), jpeg_bytes((300, 200))
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        first: list[httpx.Response] = []
        holder = threading.Thread(target=lambda: first.append(http.post(
            "/api/search/image", files={"file": ("big.jpg", big)})))
        holder.start()
        try:
            assert entered.wait(WAIT_S)
            with httpx.Client(base_url=url, timeout=30) as other:
                refused = other.post("/api/search/image", files={"file": ("s.jpg", small)})
                embed_refused = other.post("/api/embed", files={"file": ("s.jpg", small)})
                assert_still_serving(other)
        finally:
            release.set()
            holder.join(WAIT_S)
        again = http.post("/api/search/image", files={"file": ("s.jpg", small)})
        big_again = http.post("/api/classify", files={"file": ("big.jpg", big)},
                              data={"labels": "sky, sea"})
    for response in (refused, embed_refused):
        assert response.status_code == 503, response.text
        assert int(response.headers["retry-after"]) >= 1
        assert "decod" in response.json()["detail"]
    assert first[0].status_code == 200
    assert again.status_code == 200 and big_again.status_code == 200


def test_decode_budget_must_hold_the_largest_image(index: SearchIndex) -> None:
    with pytest.raises(ValueError, match="decode_budget"):
        create_app(index, max_pixels=2_000_000, decode_budget=1_000_000)


# ------------------------------------------------------------------- 7. bad ports
def test_port_out_of_range_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", str(tmp_path), "--port", "99999"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "99999" in err and "65535" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="65535"):
        listen("127.0.0.1", 99999)


def test_port_in_use_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:") and f"127.0.0.1:{port}" in err and "in use" in err


def test_serve_options_reach_the_server(tmp_path: Path, monkeypatch) -> None:
    from clipforge.search import server

    seen: dict = {}
    monkeypatch.setattr(SearchIndex, "open", classmethod(lambda cls, *a, **k: "the index"))
    monkeypatch.setattr(server, "serve", lambda index, **kwargs: seen.update(kwargs))
    assert main(["serve", str(tmp_path), "--port", "0", "--allowed-hosts", "a.lan, b.lan",
                 "--header-timeout", "3", "--body-timeout", "4", "--keep-alive", "2",
                 "--max-connections", "0", "--decode-budget-mpx", "60"]) == 0
    assert seen["allowed_hosts"] == ["a.lan", "b.lan"]
    assert seen["limits"] == ServerLimits(header_timeout=3, body_timeout=4, keep_alive=2,
                                          max_connections=None)
    assert seen["decode_budget"] == 60_000_000 and seen["sockets"]
    seen.clear()
    assert main(["serve", str(tmp_path), "--port", "0"]) == 0
    assert seen["allowed_hosts"] is None and seen["limits"] == ServerLimits()
    assert "decode_budget" not in seen


def test_serve_help_states_the_real_defaults(capsys) -> None:
    from clipforge.search import server

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, default in [("--header-timeout", server.HEADER_TIMEOUT_S),
                            ("--body-timeout", server.BODY_TIMEOUT_S),
                            ("--keep-alive", server.KEEP_ALIVE_S),
                            ("--max-connections", server.MAX_CONNECTIONS),
                            ("--decode-budget-mpx", server.DECODE_BUDGET_PIXELS / 1e6)]:
        help_text = text.rsplit(option, 1)[1]  # the last mention: the option's own help
        assert help_text.split("(default ", 1)[1].startswith(f"{default:g})"), option
    assert f"within {server.DECODE_WAIT_S:g} s" in text


def test_clipforge_serve_end_to_end(photo_dir: Path, tmp_path: Path) -> None:
    """The real command in its own process: it says where it listens, answers loopback
    names only, and cuts off a client that stops halfway through its headers."""
    torch.manual_seed(0)
    clipforge.save_model(clipforge.create_model("tiny-vit"), tmp_path / "model.safetensors")
    build_index(photo_dir, tmp_path / "index",
                clipforge.create_model(tmp_path / "model.safetensors"), progress=False)
    process = subprocess.Popen(
        [sys.executable, "-m", "clipforge", "serve", str(tmp_path / "index"), "--port", "0",
         "--header-timeout", "0.5"], stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr],
                     daemon=True).start()
    try:
        url, deadline = None, time.monotonic() + 120
        while url is None and time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(queue.Empty):
                found = re.search(r"on (http://127\.0\.0\.1:\d+)", lines.get(timeout=1))
                url = found and found.group(1)
        assert url, "the server did not say where it listens"
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/healthz").json()["items"] == 8
            assert http.get("/healthz", headers={"host": "evil.example"}).status_code == 400
        with raw_connection(url) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            assert read_until_closed(sock) == b""
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_extreme_aspect_ratio_upload_is_400_on_every_route(client: TestClient) -> None:
    """A 1x100000 PNG is a few hundred bytes; preprocessing it would resample a strip of
    gigabytes.  Every upload route refuses it with the reason, and the server keeps serving."""
    buffer = io.BytesIO()
    Image.new("L", (100_000, 1)).save(buffer, format="PNG")
    strip = buffer.getvalue()
    for route, extra in (("/api/embed", {}), ("/api/search/image", {}),
                         ("/api/classify", {"labels": "cat,dog"})):
        response = client.post(route, files={"file": ("strip.png", strip, "image/png")},
                               data=extra)
        assert response.status_code == 400, (route, response.text)
        assert "aspect ratio" in response.json()["detail"]
    assert_still_serving(client)


def test_a_path_that_is_not_utf8_is_served_as_text(tmp_path, photo_dir: Path,
                                                    model: clipforge.CLIP) -> None:
    import os

    root = tmp_path / "odd"
    root.mkdir()
    first = sorted(photo_dir.glob("*.png"))[0]
    shutil.copy(first, os.fsencode(root.resolve()) + b"/caf\xe9.png")
    build_index(root, tmp_path / "index", model=model, progress=False)
    index = SearchIndex.open(tmp_path / "index", model=model)
    with TestClient(create_app(index), base_url="http://127.0.0.1") as odd_client:
        response = odd_client.get("/api/search", params={"q": "a photo", "k": 1})
    assert response.status_code == 200
    assert response.json()["results"][0]["path"].endswith("caf\\xe9.png")

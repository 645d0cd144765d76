"""The search server's access token (``create_app(token=...)``, ``clipforge serve --token-file``
or ``CLIPFORGE_API_TOKEN``): every endpoint but the page, the docs and /healthz needs
``Authorization: Bearer <token>``; a server reachable from the network refuses to start without
one unless told ``--insecure-no-auth``; bad token files are one-line errors naming the file;
the token is never logged nor echoed.  Nothing here listens beyond loopback: ``clipforge serve``
runs with its binding and uvicorn replaced."""

from __future__ import annotations

import hmac
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from clipforge.cli import main
from clipforge.search import SearchIndex
from clipforge.search import server as server_module
from clipforge.search.server import (
    MIN_TOKEN_CHARS,
    TOKEN_ENV,
    check_exposure,
    create_app,
    is_loopback,
    running_server,
)
from test_server_hardening import assert_security_headers

LOOPBACK = "http://127.0.0.1"
TOKEN = "s3cret-Token_for-tests-0123456789"  # 33 characters, as token_urlsafe(24) would give
OTHER = "another-token-of-the-same-kind-42"


@pytest.fixture(scope="module")
def client(index: SearchIndex) -> Iterator[TestClient]:
    with TestClient(create_app(index, token=TOKEN), base_url=LOOPBACK) as c:
        yield c


@pytest.fixture(scope="module")
def item_id(index: SearchIndex) -> int:
    return index.search(text="a cat", k=1)[0].id


@pytest.fixture(autouse=True)
def _no_token_in_environment(monkeypatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def calls(photo_dir: Path, item_id: int) -> list[tuple[str, str, dict]]:
    """(method, url, request arguments) of every guarded endpoint, each a valid request."""
    photo = (photo_dir / "chelsea.png").read_bytes()
    return [
        ("GET", "/api/search?q=a+cat&k=3", {}),
        ("POST", "/api/search/image", {"files": {"file": ("c.png", photo)}}),
        ("GET", f"/api/items/{item_id}", {}),
        ("GET", f"/api/items/{item_id}/similar?k=3", {}),
        ("GET", f"/thumbnails/{item_id}", {}),
        ("POST", "/api/classify", {"files": {"file": ("c.png", photo)},
                                   "data": {"labels": "cat, dog"}}),
        ("POST", "/api/embed", {"json": {"texts": ["a cat"]}}),
    ]


def assert_refused(response: httpx.Response, challenge: str = "Bearer") -> None:
    assert response.status_code == 401, (response.request.url, response.text)
    assert response.headers["www-authenticate"] == challenge
    assert response.headers["content-type"] == "application/json"
    assert isinstance(response.json()["detail"], str) and response.json()["detail"]


# ------------------------------------------------------------------- 1. the API needs it
def test_every_guarded_endpoint_refuses_a_request_without_the_token(
        client: TestClient, photo_dir: Path, item_id: int) -> None:
    for method, url, kwargs in calls(photo_dir, item_id):
        response = client.request(method, url, **kwargs)
        assert_refused(response)
        assert "Authorization: Bearer" in response.json()["detail"]


def test_a_wrong_token_is_refused_and_not_echoed(client: TestClient, photo_dir: Path,
                                                 item_id: int) -> None:
    for token in [OTHER, TOKEN[:-1], TOKEN + "x", TOKEN.upper(), TOKEN[1:] + TOKEN[0]]:
        for method, url, kwargs in calls(photo_dir, item_id):
            response = client.request(method, url, headers=bearer(token), **kwargs)
            assert_refused(response, 'Bearer error="invalid_token"')
            assert token not in response.text and TOKEN not in response.text
            assert all(token not in value for value in response.headers.values())


@pytest.mark.parametrize("value", [f"Basic {TOKEN}", f"Token {TOKEN}", TOKEN, "Bearer",
                                   "Bearer ", f"Bearer{TOKEN}", f"Bearer: {TOKEN}",
                                   f"Bearer {TOKEN} {TOKEN}"])
def test_another_scheme_or_a_malformed_header_is_refused(client: TestClient,
                                                         value: str) -> None:
    response = client.get("/api/search?q=a+cat", headers={"Authorization": value})
    assert_refused(response, 'Bearer error="invalid_token"')


def test_the_right_token_opens_every_endpoint(client: TestClient, photo_dir: Path,
                                              item_id: int) -> None:
    for method, url, kwargs in calls(photo_dir, item_id):
        response = client.request(method, url, headers=bearer(), **kwargs)
        assert response.status_code == 200, (url, response.text)
    # The scheme's name is case-insensitive (RFC 9110 11.1); surrounding spaces are not part
    # of the token.
    for value in [f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer {TOKEN}  "]:
        response = client.get("/api/search?q=a+cat", headers={"Authorization": value})
        assert response.status_code == 200, value


def test_thumbnails_are_not_for_shared_caches(client: TestClient, item_id: int) -> None:
    response = client.get(f"/thumbnails/{item_id}", headers=bearer())
    assert response.headers["content-type"] == "image/jpeg"
    assert "private" in response.headers["cache-control"]
    assert "public" not in response.headers["cache-control"]


def test_page_docs_and_health_are_open(client: TestClient) -> None:
    for url in ["/", "/healthz", "/static/app.js", "/static/style.css", "/docs", "/redoc",
                "/openapi.json", "/static-offline-docs/swagger-ui.css"]:
        assert client.get(url).status_code == 200, url
    assert client.get("/healthz").json()["items"] == 8
    # Only those: a look-alike path or a trailing slash does not slip through.
    for url in ["/healthz/", "/healthzx", "/api/search/", "/static", "/staticx/app.js",
                "/openapi.json/x", "/no/such/page"]:
        assert client.get(url).status_code == 401, url


def test_the_refusal_carries_the_security_headers_and_closes(client: TestClient) -> None:
    response = client.get("/api/search?q=a+cat")
    assert response.status_code == 401
    assert_security_headers(response)
    assert response.headers["connection"] == "close"
    assert_security_headers(client.get("/api/search?q=a+cat", headers=bearer(OTHER)))


def test_the_token_is_checked_before_the_body_or_the_route(client: TestClient) -> None:
    """An unauthenticated client learns nothing of the limits: an oversized body, a bad
    parameter or an unknown item all get the same 401."""
    oversized = client.post("/api/embed", content=b"x" * (5 * 2**20),
                            headers={"content-type": "application/json"})
    assert oversized.status_code == 401
    assert client.get("/api/search?k=0").status_code == 401
    assert client.get("/api/items/999999999").status_code == 401
    # The Host check still comes first (DNS rebinding: 400 whatever the token).
    assert client.get("/api/search?q=a", headers={"host": "evil.example", **bearer()}
                      ).status_code == 400


def test_the_comparison_is_constant_time(client: TestClient, monkeypatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return original(a, b)

    monkeypatch.setattr(server_module.hmac, "compare_digest", spy)
    assert client.get("/api/search?q=a", headers=bearer(OTHER)).status_code == 401
    assert client.get("/api/search?q=a", headers=bearer()).status_code == 200
    # Both requests went through compare_digest, on digests of equal length (so the time
    # does not depend on where, or whether, the lengths differ).
    assert len(compared) == 2
    assert all(isinstance(a, bytes) and len(a) == len(b) == 32 for a, b in compared)


def test_openapi_declares_the_token(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"] == {"type": "http",
                                                                 "scheme": "bearer"}
    assert schema["paths"]["/api/search"]["get"]["security"] == [{"bearer": []}]
    assert schema["paths"]["/api/embed"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_without_a_token_the_api_stays_open_on_loopback(index: SearchIndex) -> None:
    with TestClient(create_app(index), base_url=LOOPBACK) as open_client:
        assert open_client.get("/api/search?q=a+cat").status_code == 200
        schema = open_client.get("/openapi.json").json()
        assert "securitySchemes" not in schema.get("components", {})


@pytest.mark.parametrize("token", ["", "short", "x" * (MIN_TOKEN_CHARS - 1),
                                   "has a space inside it", "caf\u00e9-token-0123456789"])
def test_create_app_refuses_a_weak_token(index: SearchIndex, token: str) -> None:
    with pytest.raises(ValueError, match="token"):
        create_app(index, token=token)


def test_live_server_refuses_then_serves(index: SearchIndex, photo_dir: Path) -> None:
    """Through uvicorn: an unauthenticated upload is refused without its body being read, and
    the server goes on answering the right token."""
    with running_server(create_app(index, token=TOKEN)) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        photo = (photo_dir / "rocket.jpg").read_bytes()
        refused = http.post("/api/search/image", files={"file": ("r.jpg", photo)})
        assert_refused(refused)
        assert http.get("/healthz").status_code == 200
        answered = http.post("/api/search/image", files={"file": ("r.jpg", photo)},
                             headers=bearer())
        assert answered.status_code == 200, answered.text
        assert answered.json()["results"][0]["path"].endswith("rocket.jpg")


def test_the_token_is_never_logged(client: TestClient, caplog, capsys) -> None:
    caplog.set_level(logging.DEBUG)
    for token in [TOKEN, OTHER]:
        client.get("/api/search?q=a+cat", headers=bearer(token))
        client.post("/api/embed", json={"texts": ["a"]}, headers=bearer(token))
    assert caplog.records  # the logging was on (httpx logs every request)
    captured = capsys.readouterr()
    for token in [TOKEN, OTHER]:
        assert token not in caplog.text
        assert token not in captured.out + captured.err


# --------------------------------------------------------- 2. exposure: refused or allowed
@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True),
    ("[::1]", True), ("0.0.0.0", False), ("::", False), ("", False), ("192.168.1.20", False),
    ("10.0.0.1", False), ("myhost.lan", False), ("localhost.evil.example", False)])
def test_which_hosts_count_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    if loopback:
        check_exposure(host, None)
    else:
        with pytest.raises(ValueError, match="--token-file"):
            check_exposure(host, None)
        check_exposure(host, TOKEN)
        check_exposure(host, None, insecure_no_auth=True)


@pytest.fixture
def fake_serving(index: SearchIndex, monkeypatch) -> dict:
    """``clipforge serve`` with nothing listening: the index is the test's, ``listen`` hands
    over an unbound socket, and uvicorn's ``Server.run`` records the app instead of serving.
    ``listen`` records its calls, so a test can tell whether the command got that far."""
    seen: dict = {"listen": []}

    def fake_listen(host: str, port: int) -> list[socket.socket]:
        seen["listen"].append(host)
        return [socket.socket()]

    def fake_run(self: uvicorn.Server, sockets=None) -> None:
        seen["app"] = self.config.app

    monkeypatch.setattr(SearchIndex, "open", classmethod(lambda cls, *a, **k: index))
    monkeypatch.setattr(server_module, "listen", fake_listen)
    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    return seen


def token_file(tmp_path: Path, text: str = TOKEN + "\n", mode: int = 0o600) -> Path:
    path = tmp_path / "token"
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:") and "Traceback" not in err
    return err


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "myhost.lan"])
def test_serve_on_the_network_without_a_token_refuses_to_start(
        tmp_path: Path, fake_serving: dict, capsys, host: str) -> None:
    assert main(["serve", str(tmp_path), "--host", host, "--port", "0"]) == 2
    err = one_error_line(capsys)
    assert host in err and "--token-file" in err and TOKEN_ENV in err
    assert "--insecure-no-auth" in err
    assert fake_serving["listen"] == [] and "app" not in fake_serving  # nothing bound


def test_serve_on_the_network_with_insecure_no_auth_starts(
        tmp_path: Path, fake_serving: dict, caplog) -> None:
    caplog.set_level(logging.INFO)
    assert main(["serve", str(tmp_path), "--host", "0.0.0.0", "--port", "0",
                 "--insecure-no-auth"]) == 0
    assert fake_serving["listen"] == ["0.0.0.0"]
    with TestClient(fake_serving["app"], base_url=LOOPBACK) as c:
        assert c.get("/api/search?q=a+cat").status_code == 200  # open, as asked
    assert "without authentication" in caplog.text


def test_serve_on_the_network_with_a_token_file_starts_guarded(
        tmp_path: Path, fake_serving: dict, caplog, capsys) -> None:
    caplog.set_level(logging.DEBUG)
    path = token_file(tmp_path)
    assert main(["serve", str(tmp_path), "--host", "0.0.0.0", "--port", "0",
                 "--token-file", str(path)]) == 0
    with TestClient(fake_serving["app"], base_url=LOOPBACK) as c:
        assert_refused(c.get("/api/search?q=a+cat"))
        assert c.get("/api/search?q=a+cat", headers=bearer()).status_code == 200
    assert "access token required" in caplog.text and "plain HTTP" in caplog.text
    captured = capsys.readouterr()
    assert TOKEN not in caplog.text + captured.out + captured.err


def test_serve_takes_the_token_from_the_environment(tmp_path: Path, fake_serving: dict,
                                                    monkeypatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, f"  {OTHER}\n")
    assert main(["serve", str(tmp_path), "--host", "0.0.0.0", "--port", "0"]) == 0
    with TestClient(fake_serving["app"], base_url=LOOPBACK) as c:
        assert c.get("/api/search?q=a", headers=bearer(OTHER)).status_code == 200
        assert c.get("/api/search?q=a", headers=bearer()).status_code == 401
    # --token-file wins over the environment.
    assert main(["serve", str(tmp_path), "--port", "0", "--token-file",
                 str(token_file(tmp_path))]) == 0
    with TestClient(fake_serving["app"], base_url=LOOPBACK) as c:
        assert c.get("/api/search?q=a", headers=bearer()).status_code == 200
        assert c.get("/api/search?q=a", headers=bearer(OTHER)).status_code == 401


def test_serve_on_loopback_without_a_token_starts_open(tmp_path: Path,
                                                       fake_serving: dict) -> None:
    for host in ["127.0.0.1", "localhost", "::1"]:
        assert main(["serve", str(tmp_path), "--host", host, "--port", "0"]) == 0
        with TestClient(fake_serving["app"], base_url=LOOPBACK) as c:
            assert c.get("/api/search?q=a+cat").status_code == 200


# --------------------------------------------------------------------- 3. bad token files
@pytest.mark.parametrize(("content", "reason"), [
    (None, "No such file"), (b"", "empty"), (b"  \n\t\n", "empty"),
    (b"too-short\n", f"at least {MIN_TOKEN_CHARS}"),
    (b"has spaces inside the token\n", "printable ASCII"),
    (b"\xff\xfe-not-utf8-but-long-enough", "utf-8")])
def test_a_bad_token_file_is_one_line_naming_the_file(tmp_path: Path, fake_serving: dict,
                                                      capsys, content: bytes | None,
                                                      reason: str) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_bytes(content)
    assert main(["serve", str(tmp_path), "--port", "0", "--token-file", str(path)]) == 2
    err = one_error_line(capsys)
    assert f"--token-file {path}" in err and reason in err
    assert f'secrets.token_urlsafe(32))" > {path}' in err
    assert fake_serving["listen"] == []


def test_a_directory_as_token_file_is_one_line(tmp_path: Path, fake_serving: dict,
                                               capsys) -> None:
    assert main(["serve", str(tmp_path), "--port", "0", "--token-file", str(tmp_path)]) == 2
    err = one_error_line(capsys)
    assert f"--token-file {tmp_path}" in err and "directory" in err.lower()


@pytest.mark.parametrize("value", ["", "   ", "short"])
def test_a_bad_environment_token_is_one_line_naming_the_variable(
        tmp_path: Path, fake_serving: dict, monkeypatch, capsys, value: str) -> None:
    monkeypatch.setenv(TOKEN_ENV, value)
    assert main(["serve", str(tmp_path), "--port", "0"]) == 2
    err = one_error_line(capsys)
    assert err.startswith(f"error: {TOKEN_ENV}:") and "secrets.token_urlsafe" in err
    assert fake_serving["listen"] == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_a_token_file_others_can_read_is_warned_about(tmp_path: Path, fake_serving: dict,
                                                      caplog) -> None:
    caplog.set_level(logging.WARNING)
    private = token_file(tmp_path, mode=0o600)
    assert main(["serve", str(tmp_path), "--port", "0", "--token-file", str(private)]) == 0
    assert "readable by other users" not in caplog.text
    shared = token_file(tmp_path, mode=0o644)
    assert main(["serve", str(tmp_path), "--port", "0", "--token-file", str(shared)]) == 0
    assert f"{shared} is readable by other users" in caplog.text and "chmod 600" in caplog.text
    assert TOKEN not in caplog.text

"""The search server's Prometheus metrics (``GET /metrics``: requests by route template and
their latency, model time by kind, index size; behind the token like the API) and HTTPS
(``clipforge serve --tls-cert FILE --tls-key FILE``).  Each test builds its own app, so counts
start at zero.  The live server listens on 127.0.0.1 only, on a port the OS picks, and every
wait has a timeout."""

from __future__ import annotations

import datetime
import importlib.util
import ipaddress
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import clipforge
from clipforge.cli import main
from clipforge.search import SearchIndex, build_index
from clipforge.search import server as server_module
from clipforge.search.server import OPEN_PATHS, TOKEN_ENV, create_app

LOOPBACK = "http://127.0.0.1"
TOKEN = "s3cret-Token_for-tests-0123456789"
WAIT_S = 20.0  # the most any test waits for a request, a thread or the server
REQUESTS = "clipforge_http_requests_total"
LATENCY = "clipforge_http_request_duration_seconds"
MODEL = "clipforge_model_encode_seconds"
ITEMS = "clipforge_index_items"

Samples = dict[tuple[str, frozenset], float]


@pytest.fixture(autouse=True)
def _no_token_in_environment(monkeypatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)


@pytest.fixture
def client(index: SearchIndex) -> Iterator[TestClient]:
    """A new app for each test: its metrics start at zero."""
    with TestClient(create_app(index), base_url=LOOPBACK) as c:
        yield c


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def scrape(client: TestClient, headers: dict[str, str] | None = None) -> Samples:
    """GET /metrics, parsed by prometheus_client: {(sample name, labels): value}."""
    response = client.get("/metrics", headers=headers or {})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; a sample that is not there fails, naming those that are."""
    key = (name, frozenset(labels.items()))
    assert key in samples, (name, labels, label_sets(samples, name))
    return samples[key]


def label_sets(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for sample, labels in samples if sample == name]


# ------------------------------------------------------------------------------- requests
def test_searches_are_counted_by_route_method_and_status(client: TestClient) -> None:
    for query in ["a cat", "coffee", "an astronaut"]:
        assert client.get("/api/search", params={"q": query, "k": 2}).status_code == 200
    assert client.get("/api/search", params={"q": "a cat", "k": 0}).status_code == 422
    samples = scrape(client)
    assert value(samples, REQUESTS, route="/api/search", method="GET", status="200") == 3
    assert value(samples, REQUESTS, route="/api/search", method="GET", status="422") == 1
    assert label_sets(samples, REQUESTS) == [
        {"route": "/api/search", "method": "GET", "status": "200"},
        {"route": "/api/search", "method": "GET", "status": "422"}]
    assert value(samples, f"{LATENCY}_count", route="/api/search") == 4
    assert value(samples, f"{LATENCY}_bucket", route="/api/search", le="+Inf") == 4
    assert 0 < value(samples, f"{LATENCY}_sum", route="/api/search") < 4 * WAIT_S
    # A scrape is counted once it has been answered: the next one shows it.
    again = scrape(client)
    assert value(again, REQUESTS, route="/metrics", method="GET", status="200") == 1
    assert value(again, REQUESTS, route="/api/search", method="GET", status="200") == 3


def test_routes_are_recorded_by_their_template_never_the_raw_path(
        client: TestClient, index: SearchIndex) -> None:
    ids = sorted(hit.id for hit in index.search(text="a photo", k=3))
    for item_id in ids:
        assert client.get(f"/api/items/{item_id}").status_code == 200
        assert client.get(f"/thumbnails/{item_id}").status_code == 200
    assert client.get("/api/items/987654321").status_code == 404
    assert client.get("/no/such/page").status_code == 404
    assert client.get("/wp-admin/setup.php").status_code == 404
    assert client.request("BREW", "/api/search").status_code == 405
    assert client.get("/static/app.js").status_code == 200
    samples = scrape(client)
    item = {"route": "/api/items/{item_id}", "method": "GET"}
    assert value(samples, REQUESTS, **item, status="200") == 3
    assert value(samples, REQUESTS, **item, status="404") == 1
    assert value(samples, REQUESTS, route="/thumbnails/{item_id}", method="GET",
                 status="200") == 3
    assert value(samples, REQUESTS, route="(unmatched)", method="GET", status="404") == 2
    # An unknown method is folded into OTHER, so that it adds no series either.
    assert value(samples, REQUESTS, route="/api/search", method="OTHER", status="405") == 1
    assert value(samples, REQUESTS, route="/static/{path}", method="GET", status="200") == 1
    routes = {labels["route"] for labels in label_sets(samples, REQUESTS)}
    assert routes == {"/api/items/{item_id}", "/thumbnails/{item_id}", "(unmatched)",
                      "/api/search", "/static/{path}"}
    assert {labels["route"] for labels in label_sets(samples, f"{LATENCY}_count")} == routes


def test_model_time_is_recorded_by_kind(client: TestClient, photo_dir: Path) -> None:
    start = scrape(client)
    assert value(start, f"{MODEL}_count", kind="text") == 0  # both kinds there from the start
    assert value(start, f"{MODEL}_count", kind="image") == 0
    assert client.get("/api/search", params={"q": "a cat"}).status_code == 200
    after_text = scrape(client)
    assert value(after_text, f"{MODEL}_count", kind="text") == 1
    assert value(after_text, f"{MODEL}_sum", kind="text") > 0
    assert value(after_text, f"{MODEL}_count", kind="image") == 0
    # A blank text is refused before the model runs.
    assert client.get("/api/search", params={"q": " "}).status_code == 400
    photo = (photo_dir / "chelsea.png").read_bytes()
    upload = {"files": {"file": ("c.png", photo)}}
    assert client.post("/api/search/image", **upload).status_code == 200
    assert client.post("/api/classify", **upload, data={"labels": "cat, dog"}
                       ).status_code == 200
    assert client.post("/api/embed", json={"texts": ["a cat", "a dog"]}).status_code == 200
    assert client.post("/api/embed", **upload, data={"texts": "a cat"}).status_code == 200
    after = scrape(client)
    assert value(after, f"{MODEL}_count", kind="text") == 3  # one call per embedded batch
    assert value(after, f"{MODEL}_count", kind="image") == 3
    assert value(after, f"{MODEL}_sum", kind="image") > 0


def test_model_time_without_text_batching(index: SearchIndex) -> None:
    with TestClient(create_app(index, batch_texts=False), base_url=LOOPBACK) as c:
        assert c.get("/api/search", params={"q": "a cat"}).status_code == 200
        assert value(scrape(c), f"{MODEL}_count", kind="text") == 1


def test_index_size_is_the_items_served(client: TestClient, index: SearchIndex) -> None:
    items = value(scrape(client), ITEMS, index=index.path.name)  # labelled by the index's name
    assert items == len(index) == client.get("/healthz").json()["items"] == 8


def test_index_size_follows_a_rebuilt_index(photo_dir: Path, model: clipforge.CLIP,
                                            tmp_path: Path) -> None:
    """A scrape picks up a rebuild by itself, as /healthz does: no query needed between."""
    photos = sorted(photo_dir.iterdir())
    folder = tmp_path / "growing"
    folder.mkdir()
    for photo in photos[:3]:
        shutil.copy(photo, folder / photo.name)
    build_index(folder, tmp_path / "index", model)
    with TestClient(create_app(SearchIndex.open(tmp_path / "index", model)),
                    base_url=LOOPBACK) as c:
        assert value(scrape(c), ITEMS, index="index") == 3
        for photo in photos[3:]:
            shutil.copy(photo, folder / photo.name)
        build_index(folder, tmp_path / "index", model)
        assert value(scrape(c), ITEMS, index="index") == len(photos) == 8


def test_metrics_need_the_token(index: SearchIndex) -> None:
    assert "/metrics" not in OPEN_PATHS
    with TestClient(create_app(index, token=TOKEN), base_url=LOOPBACK) as c:
        refused = c.get("/metrics")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
        assert "clipforge_" not in refused.text
        assert c.get("/metrics", headers=bearer("another-token-of-the-same-kind-42")
                     ).status_code == 401
        samples = scrape(c, headers=bearer())
        assert value(samples, REQUESTS, route="/metrics", method="GET", status="401") == 2
        schema = c.get("/openapi.json").json()
        assert schema["paths"]["/metrics"]["get"]["security"] == [{"bearer": []}]


def test_each_app_counts_its_own_requests(index: SearchIndex) -> None:
    with TestClient(create_app(index), base_url=LOOPBACK) as first, \
            TestClient(create_app(index), base_url=LOOPBACK) as second:
        assert first.get("/api/search", params={"q": "a cat"}).status_code == 200
        assert label_sets(scrape(second), REQUESTS) == []
        assert value(scrape(first), REQUESTS, route="/api/search", method="GET",
                     status="200") == 1


def test_openmetrics_when_the_scraper_asks(client: TestClient) -> None:
    response = client.get("/metrics", headers={
        "Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    assert f'{ITEMS}{{index="index"}} 8.0' in response.text


# ------------------------------------------------------------------------------------ TLS
def make_certificate(folder: Path, name: str = "server",
                     password: str | None = None) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 and its key (encrypted with
    ``password`` if given), made with the cryptography package or else the openssl command."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    if importlib.util.find_spec("cryptography") is not None:
        _certificate_with_cryptography(cert, key, password)
    elif shutil.which("openssl") is not None:
        _certificate_with_openssl(cert, key, password)
    else:
        pytest.skip("making a test certificate needs the cryptography package or the openssl "
                    "command, and neither is installed")
    return cert, key


def _certificate_with_cryptography(cert: Path, key: Path, password: str | None) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(private.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(private.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            private.public_key()), critical=False)
        .sign(private, hashes.SHA256()))
    encryption = (serialization.BestAvailableEncryption(password.encode()) if password
                  else serialization.NoEncryption())
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8, encryption))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def _certificate_with_openssl(cert: Path, key: Path, password: str | None) -> None:
    secret = ["-passout", f"pass:{password}"] if password else ["-nodes"]
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert), *secret],
                   check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = make_certificate(folder)
    other_cert, other_key = make_certificate(folder, "other")
    _, encrypted_key = make_certificate(folder, "encrypted", password="not-asked-for")
    junk = folder / "junk.pem"
    junk.write_text("not a certificate\n")
    return {"cert": cert, "key": key, "other_key": other_key, "encrypted_key": encrypted_key,
            "junk": junk, "missing": folder / "missing.pem", "folder": folder}


@pytest.fixture
def fake_serving(index: SearchIndex, monkeypatch) -> dict:
    """``clipforge serve`` with nothing listening: the index is the test's, ``listen`` hands
    over an unbound socket and records its calls, and uvicorn records its configuration
    instead of serving."""
    seen: dict = {"listen": []}

    def fake_listen(host: str, port: int) -> list[socket.socket]:
        seen["listen"].append(host)
        return [socket.socket()]

    def fake_run(self: uvicorn.Server, sockets=None) -> None:
        seen["config"] = self.config

    monkeypatch.setattr(SearchIndex, "open", classmethod(lambda cls, *a, **k: index))
    monkeypatch.setattr(server_module, "listen", fake_listen)
    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    return seen


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error:") and "Traceback" not in err
    return err


def test_serve_answers_over_https(tmp_path: Path, index: SearchIndex, tls_files: dict,
                                  monkeypatch, caplog) -> None:
    """The command end to end: the real uvicorn serves the test's index on an ephemeral
    loopback port; a client trusting the certificate gets /healthz over HTTPS, while plain
    HTTP and a client that does not trust it get no answer."""
    monkeypatch.setattr(SearchIndex, "open", classmethod(lambda cls, *a, **k: index))
    real_run = uvicorn.Server.run
    answers: dict = {}

    def run_and_ask(server: uvicorn.Server, sockets=None) -> None:
        thread = threading.Thread(target=real_run, args=(server,), kwargs={"sockets": sockets},
                                  daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + WAIT_S
            while not server.started:
                assert thread.is_alive() and time.monotonic() < deadline, "server not started"
                time.sleep(0.02)
            url = f"127.0.0.1:{sockets[0].getsockname()[1]}/healthz"
            trust = ssl.create_default_context(cafile=str(tls_files["cert"]))
            answers["https"] = httpx.get(f"https://{url}", verify=trust, timeout=WAIT_S)
            for attempt in [lambda: httpx.get(f"http://{url}", timeout=WAIT_S),
                            lambda: httpx.get(f"https://{url}", timeout=WAIT_S)]:
                try:
                    answers.setdefault("others", []).append(attempt().status_code)
                except httpx.TransportError as exc:
                    answers.setdefault("others", []).append(type(exc).__name__)
        finally:
            server.should_exit = True
            thread.join(WAIT_S)
            answers["stopped"] = not thread.is_alive()

    monkeypatch.setattr(uvicorn.Server, "run", run_and_ask)
    caplog.set_level(logging.INFO)
    assert main(["serve", str(tmp_path), "--port", "0", "--tls-cert", str(tls_files["cert"]),
                 "--tls-key", str(tls_files["key"])]) == 0
    response = answers["https"]
    assert response.status_code == 200 and response.json()["items"] == len(index)
    # Plain HTTP is cut off; an untrusted certificate fails verification.
    assert answers["others"] == ["RemoteProtocolError", "ConnectError"], answers["others"]
    assert answers["stopped"]
    assert "on https://127.0.0.1:" in caplog.text


def test_https_on_the_network_still_needs_a_token(tmp_path: Path, tls_files: dict,
                                                  fake_serving: dict, capsys,
                                                  caplog) -> None:
    tls = ["--tls-cert", str(tls_files["cert"]), "--tls-key", str(tls_files["key"])]
    assert main(["serve", str(tmp_path), "--host", "0.0.0.0", "--port", "0", *tls]) == 2
    err = one_error_line(capsys)
    assert "--token-file" in err and TOKEN_ENV in err
    assert fake_serving["listen"] == [] and "config" not in fake_serving
    # With a token it starts, on HTTPS, and does not warn about plain HTTP.
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    caplog.set_level(logging.INFO)
    assert main(["serve", str(tmp_path), "--host", "0.0.0.0", "--port", "0",
                 "--token-file", str(token), *tls]) == 0
    config = fake_serving["config"]
    assert (config.ssl_certfile, config.ssl_keyfile) == (str(tls_files["cert"]),
                                                         str(tls_files["key"]))
    assert "https://" in caplog.text and "plain HTTP" not in caplog.text
    # Without TLS options, uvicorn gets none, and the plain-HTTP warning names them.
    assert main(["serve", str(tmp_path), "--host", "0.0.0.0", "--port", "0",
                 "--token-file", str(token)]) == 0
    assert fake_serving["config"].ssl_certfile is None
    assert "plain HTTP" in caplog.text and "--tls-cert" in caplog.text


@pytest.mark.parametrize(("options", "message"), [
    ({"--tls-cert": "cert"}, "--tls-cert was given without --tls-key"),
    ({"--tls-key": "key"}, "--tls-key was given without --tls-cert"),
    ({"--tls-cert": "missing", "--tls-key": "key"}, "--tls-cert {missing} does not exist"),
    ({"--tls-cert": "cert", "--tls-key": "missing"}, "--tls-key {missing} does not exist"),
    ({"--tls-cert": "folder", "--tls-key": "key"}, "--tls-cert {folder} is a directory"),
    ({"--tls-cert": "junk", "--tls-key": "key"},
     "--tls-cert {junk} cannot be read as a PEM certificate"),
    ({"--tls-cert": "key", "--tls-key": "key"},
     "--tls-cert {key} cannot be read as a PEM certificate"),
    ({"--tls-cert": "cert", "--tls-key": "other_key"},
     "--tls-key {other_key} is not the PEM private key of --tls-cert {cert}"),
    ({"--tls-cert": "cert", "--tls-key": "junk"},
     "--tls-key {junk} is not the PEM private key of --tls-cert {cert}"),
    ({"--tls-cert": "cert", "--tls-key": "encrypted_key"}, "--tls-key {encrypted_key} is "
     "encrypted")])
def test_tls_option_mistakes_are_one_line_before_anything_starts(
        tmp_path: Path, tls_files: dict, fake_serving: dict, capsys, options: dict,
        message: str) -> None:
    arguments = [part for option, file in options.items()
                 for part in (option, str(tls_files[file]))]
    assert main(["serve", str(tmp_path), "--port", "0", *arguments]) == 2
    err = one_error_line(capsys)
    assert message.format(**{k: str(v) for k, v in tls_files.items()}) in err, err
    assert fake_serving["listen"] == [] and "config" not in fake_serving

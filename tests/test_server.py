"""The search server (``clipforge.search.server``): every endpoint on an index of the sample
photos built with a tiny random-weight model, upload safety (size, non-images, decompression
bombs, malformed parameters, each followed by a normal query), an index rebuilt under a running
server, and concurrent clients against a live uvicorn on loopback."""

from __future__ import annotations

import io
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient
from PIL import Image, ImageFile

import clipforge
from clipforge.search import SearchIndex, build_index
from clipforge.search.server import (
    TextBatcher,
    create_app,
    decode_upload,
    parse_labels,
    running_server,
)

QUERIES = ["a cat", "a rocket on a launchpad", "coffee", "an astronaut", "a red motorcycle"]


@pytest.fixture(scope="module")
def item_ids(index: SearchIndex) -> list[int]:
    """The ids the index gave the photos (the index chooses them; they need not start at 0)."""
    return sorted(hit.id for hit in index.search(text="a photo", k=1000))


@pytest.fixture(scope="module")
def client(index: SearchIndex) -> TestClient:
    with TestClient(create_app(index), base_url="http://127.0.0.1") as c:
        yield c


@pytest.fixture(scope="module")
def small_client(index: SearchIndex) -> TestClient:
    """Limits low enough that tests need not send megabytes."""
    with TestClient(create_app(index, max_upload_bytes=200_000, max_pixels=1_000_000),
                    base_url="http://127.0.0.1") as c:
        yield c


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def assert_still_serving(client: TestClient | httpx.Client) -> None:
    response = client.get("/api/search", params={"q": "a cat", "k": 3})
    assert response.status_code == 200
    assert len(response.json()["results"]) == 3


def names(results: list[dict]) -> list[str]:
    return [Path(r["path"]).name for r in results]


# ----------------------------------------------------------------------------- search
def test_text_search(client: TestClient, photo_dir: Path) -> None:
    response = client.get("/api/search", params={"q": "a photo of a cat", "k": 5})
    assert response.status_code == 200
    data = response.json()
    assert data["query"] == {"text": "a photo of a cat", "image": None, "similar_to": None}
    assert data["took_ms"] >= 0
    results = data["results"]
    assert len(results) == 5
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0 <= s <= 1.0 for s in scores)
    assert len({r["id"] for r in results}) == 5
    photos = {p.name for p in photo_dir.iterdir()}
    assert set(names(results)) <= photos
    for r in results:
        assert r["thumbnail"] == f"/thumbnails/{r['id']}"
        assert r["width"] > 0 and r["height"] > 0


def test_text_search_k_and_threshold(client: TestClient, index: SearchIndex) -> None:
    everything = client.get("/api/search", params={"q": "coffee", "k": 1000}).json()["results"]
    assert len(everything) == len(index)
    cut = everything[2]["score"]
    kept = client.get("/api/search", params={"q": "coffee", "threshold": cut}).json()["results"]
    assert [r["id"] for r in kept] == [r["id"] for r in everything if r["score"] >= cut]


@pytest.mark.parametrize("name", ["rocket.jpg", "chelsea.png", "horse.png"])
def test_image_search_finds_the_photo_itself(client: TestClient, photo_dir: Path,
                                             name: str) -> None:
    data = (photo_dir / name).read_bytes()
    response = client.post("/api/search/image", files={"file": (name, data)}, data={"k": "4"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"]["image"] == name and body["query"]["text"] is None
    first = body["results"][0]
    assert Path(first["path"]).name == name
    assert first["score"] == pytest.approx(1.0, abs=2e-3)  # the index stores float16
    assert all(r["score"] < first["score"] for r in body["results"][1:])


def test_mixed_text_and_image_search(client: TestClient, photo_dir: Path) -> None:
    data = (photo_dir / "coffee.png").read_bytes()
    image_only = client.post("/api/search/image", files={"file": ("c.png", data)}).json()
    mixed = client.post("/api/search/image", files={"file": ("c.png", data)},
                        data={"q": "a rocket", "text_weight": "1", "image_weight": "1"}).json()
    assert mixed["query"] == {"text": "a rocket", "image": "c.png", "similar_to": None}
    # Mixing in a text moves every score away from the image-only ones.
    assert mixed["results"][0]["score"] < image_only["results"][0]["score"] - 1e-3
    # An empty text field is no text at all (the web form always sends the field).
    blank = client.post("/api/search/image", files={"file": ("c.png", data)},
                        data={"q": "  "}).json()
    assert blank["query"]["text"] is None
    assert [r["id"] for r in blank["results"]] == [r["id"] for r in image_only["results"]]


# ------------------------------------------------------------------------------ items
def test_item_metadata(client: TestClient, index: SearchIndex, item_ids: list[int]) -> None:
    first = item_ids[0]
    response = client.get(f"/api/items/{first}")
    assert response.status_code == 200
    item = response.json()
    assert item["id"] == first and item["score"] is None
    assert item["path"] == Path(index.item(first).path).name  # relative to the photo folder
    assert client.get(f"/api/items/{max(item_ids) + 100}").status_code == 404
    for bad in ["-1", "abc", "1.5", "1e3", str(2**64)]:
        assert client.get(f"/api/items/{bad}").status_code == 422, bad
        assert client.get(f"/api/items/{bad}/similar").status_code == 422, bad
        assert client.get(f"/thumbnails/{bad}").status_code == 422, bad


def test_similar_excludes_the_item_and_matches_an_image_query(client: TestClient,
                                                              index: SearchIndex,
                                                              photo_dir: Path,
                                                              item_ids: list[int]) -> None:
    item_id = item_ids[3]
    hit = index.item(item_id)
    response = client.get(f"/api/items/{item_id}/similar", params={"k": 100})
    assert response.status_code == 200
    body = response.json()
    assert body["query"]["similar_to"] == item_id
    ids = [r["id"] for r in body["results"]]
    assert item_id not in ids
    assert len(ids) == len(index) - 1
    # "More like this" ranks as an image query with the item's own photo does, minus itself.
    photo = (photo_dir / Path(hit.path).name).read_bytes()
    by_image = client.post("/api/search/image", files={"file": ("q", photo)},
                           data={"k": "100"}).json()["results"]
    assert by_image[0]["id"] == item_id
    expected = {r["id"]: r["score"] for r in by_image[1:]}
    assert {r["id"]: pytest.approx(r["score"], abs=2e-3) for r in body["results"]} == expected
    assert client.get(f"/api/items/{max(item_ids) + 1}/similar").status_code == 404


# --------------------------------------------------------------------------- classify
def test_classify(client: TestClient, photo_dir: Path) -> None:
    data = (photo_dir / "chelsea.png").read_bytes()
    response = client.post("/api/classify", files={"file": ("cat.png", data)},
                           data={"labels": "cat, dog ,rocket"})
    assert response.status_code == 200, response.text
    labels = response.json()["labels"]
    assert {x["label"] for x in labels} == {"cat", "dog", "rocket"}
    probabilities = [x["probability"] for x in labels]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
    # Repeated fields keep commas inside labels; a custom template is accepted.
    repeated = client.post("/api/classify", files={"file": ("cat.png", data)},
                           data={"labels": ["Washington, D.C.", "a cat"],
                                 "template": "a picture of {}"})
    assert {x["label"] for x in repeated.json()["labels"]} == {"Washington, D.C.", "a cat"}


@pytest.mark.parametrize("fields", [{"labels": " , "}, {"labels": "a,b", "template": "no slot"},
                                    {"labels": "a,b", "template": "a {0} {1}"},
                                    {"labels": "a,b", "template": "a {name}"}])
def test_classify_rejects_bad_labels_and_templates(client: TestClient, photo_dir: Path,
                                                   fields: dict) -> None:
    data = (photo_dir / "coffee.png").read_bytes()
    response = client.post("/api/classify", files={"file": ("c.png", data)}, data=fields)
    assert response.status_code == 400
    assert response.json()["detail"]
    assert_still_serving(client)


def test_parse_labels() -> None:
    assert parse_labels(["cat, dog,,  bird "]) == ["cat", "dog", "bird"]
    assert parse_labels(["a, b", "c"]) == ["a, b", "c"]


# ------------------------------------------------------------------------------ embed
def test_embed_texts_and_image(client: TestClient, index: SearchIndex, photo_dir: Path) -> None:
    response = client.post("/api/embed", json={"texts": ["a cat", "a dog"]})
    assert response.status_code == 200, response.text
    body = response.json()
    vectors = np.array(body["texts"])
    assert vectors.shape == (2, body["dim"]) and body["image"] is None
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, index.embed_texts(["a cat", "a dog"]), atol=1e-6)

    data = (photo_dir / "rocket.jpg").read_bytes()
    both = client.post("/api/embed", files={"file": ("r.jpg", data)},
                       data={"texts": ["a rocket"]}).json()
    expected = index.embed_image(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_allclose(both["image"], expected, atol=1e-6)
    np.testing.assert_allclose(both["texts"][0], index.embed_texts(["a rocket"])[0], atol=1e-6)


@pytest.mark.parametrize("request_kwargs, status", [
    ({"json": {}}, 400),
    ({"json": {"texts": "not a list"}}, 422),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 422),
    ({"content": b"texts=a", "headers": {"content-type": "text/plain"}}, 415),
    ({"json": {"texts": ["word " * 100]}}, 400),
    ({"files": {"file": ("x.png", b"not an image")}}, 400),
])
def test_embed_rejects_bad_requests(client: TestClient, request_kwargs: dict,
                                    status: int) -> None:
    response = client.post("/api/embed", **request_kwargs)
    assert response.status_code == status, response.text
    assert_still_serving(client)


# ------------------------------------------------------------------------- thumbnails
def test_thumbnail(client: TestClient, index: SearchIndex, item_ids: list[int]) -> None:
    url = f"/thumbnails/{item_ids[1]}"
    response = client.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert "max-age" in response.headers["cache-control"]
    thumb = Image.open(io.BytesIO(response.content))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256
    hit = index.item(item_ids[1])
    assert thumb.size[0] / thumb.size[1] == pytest.approx(hit.width / hit.height, rel=0.05)
    # Cached: the same bytes again, and a conditional request is answered 304 without a body.
    again = client.get(url)
    assert again.content == response.content
    etag = response.headers["etag"]
    assert client.get(url, headers={"If-None-Match": etag}).status_code == 304


def test_thumbnail_unknown_and_path_like_ids_are_never_read(client: TestClient,
                                                            index: SearchIndex,
                                                            item_ids: list[int],
                                                            monkeypatch) -> None:
    opened = []
    real_open_image = index.open_image
    monkeypatch.setattr(index, "open_image", lambda i: opened.append(i) or real_open_image(i))
    assert client.get(f"/thumbnails/{max(item_ids) + 5}").status_code == 404
    assert client.get("/thumbnails/-1").status_code == 422
    for url in ["/thumbnails/..%2F..%2Fetc%2Fpasswd", "/thumbnails/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                "/thumbnails/1%2F..%2F..%2Fetc%2Fpasswd", "/thumbnails/etc/passwd",
                "/static/..%2F..%2Fserver.py", "/static/%2e%2e/server.py"]:
        response = client.get(url)
        assert response.status_code in (404, 422), url
        assert b"root:" not in response.content and b"import" not in response.content
    assert opened == []


# ------------------------------------------------------------------- service and page
def test_healthz(client: TestClient, index: SearchIndex) -> None:
    body = client.get("/healthz").json()
    assert body["status"] == "ok"
    assert body["items"] == len(index) == 8
    assert body["generation"] == index.info.get("generation")


def test_page_static_files_and_docs(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for testid in ["search-input", "search-submit", "file-input", "error", "status", "results"]:
        assert f'data-testid="{testid}"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from elsewhere
    script = client.get("/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "http" not in script.text.replace("http.", "")
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/search", "/api/search/image", "/api/items/{item_id}/similar",
            "/api/classify", "/api/embed", "/thumbnails/{item_id}", "/healthz"} <= set(paths)


# -------------------------------------------------------------------- upload safety
def test_oversized_upload_with_content_length(small_client: TestClient) -> None:
    big = b"\0" * 300_000
    response = small_client.post("/api/search/image", files={"file": ("big.png", big)})
    assert response.status_code == 413
    assert "200000" in response.json()["detail"]
    assert_still_serving(small_client)


def test_oversized_upload_without_content_length(small_client: TestClient) -> None:
    """A chunked body declares no size: the server counts while reading."""
    def chunks():
        for _ in range(40):
            yield b"x" * 10_000

    response = small_client.post("/api/embed", content=chunks(),
                                 headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert "200000" in response.json()["detail"]
    assert_still_serving(small_client)


def test_oversized_upload_with_a_lying_content_length(small_client: TestClient,
                                                      photo_dir: Path) -> None:
    """The body turns out longer than its Content-Length claims."""
    boundary = "b0undary"
    payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
               f"filename=\"x.png\"\r\nContent-Type: image/png\r\n\r\n").encode()
    payload += b"\0" * 300_000 + f"\r\n--{boundary}--\r\n".encode()
    response = small_client.post(
        "/api/search/image", content=payload,
        headers={"content-type": f"multipart/form-data; boundary={boundary}",
                 "content-length": "1000"})
    assert response.status_code == 413
    assert "200000" in response.json()["detail"]
    assert_still_serving(small_client)


@pytest.mark.parametrize("payload, reason", [
    (b"", "empty"),
    (b"%PDF-1.4 definitely not an image", "not an image"),
    (b"P6\n4 4\n255\n" + b"\x80" * 48, "not an image"),  # a PPM: PIL reads it, we do not
    ("truncated", "cannot decode"),
])
def test_non_images_are_refused(client: TestClient, photo_dir: Path, payload: bytes | str,
                                reason: str) -> None:
    if payload == "truncated":
        whole = (photo_dir / "chelsea.png").read_bytes()
        payload = whole[:len(whole) // 2]
    for url in ["/api/search/image", "/api/classify"]:
        response = client.post(url, files={"file": ("x.png", payload)}, data={"labels": "a,b"})
        assert response.status_code == 400, response.text
        assert reason in response.json()["detail"]
        assert_still_serving(client)


@pytest.fixture(scope="module")
def pil_bomb() -> bytes:
    """20000x20000 pixels of one colour: 48 KB as a PNG, 400 megapixels decoded, beyond PIL's
    own DecompressionBombError limit."""
    return png_bytes(Image.new("1", (20_000, 20_000)))


def test_decompression_bombs_are_refused_before_decoding(client: TestClient,
                                                         small_client: TestClient,
                                                         pil_bomb: bytes) -> None:
    response = client.post("/api/search/image", files={"file": ("bomb.png", pil_bomb)})
    assert response.status_code == 400
    assert "too large" in response.json()["detail"]
    assert_still_serving(client)
    # Below PIL's limit but above the server's max_pixels (1 megapixel here).
    medium = png_bytes(Image.new("1", (2000, 1000)))
    response = small_client.post("/api/search/image", files={"file": ("m.png", medium)})
    assert response.status_code == 400
    assert "2000x1000" in response.json()["detail"]
    assert_still_serving(small_client)


def test_decode_upload_checks_the_header_before_decoding(monkeypatch) -> None:
    data = png_bytes(Image.new("1", (3000, 3000)))
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self))
    with pytest.raises(HTTPException, match="3000x3000") as info:
        decode_upload(data, max_pixels=1_000_000)
    assert info.value.status_code == 400
    assert decoded == []


def test_pil_bomb_limit_caps_max_pixels() -> None:
    """Between PIL's warning level and its error, PIL only warns: the server refuses anyway,
    even when told to allow more pixels than PIL considers safe."""
    data = png_bytes(Image.new("1", (10_000, 10_000)))  # 100 Mpx > Image.MAX_IMAGE_PIXELS
    with pytest.warns(Image.DecompressionBombWarning), \
            pytest.raises(HTTPException, match="10000x10000") as info:
        decode_upload(data, max_pixels=10**9)
    assert info.value.status_code == 400


@pytest.mark.parametrize("params", [
    {"q": "cat", "k": "0"}, {"q": "cat", "k": "abc"}, {"q": "cat", "k": "1001"},
    {"q": "cat", "k": "-3"}, {"q": "cat", "threshold": "2"}, {"q": "cat", "threshold": "nan"},
    {"q": "cat", "threshold": "x"}, {"q": "cat", "collapse": "0"}, {"q": "cat", "collapse": "1.5"},
    {"q": ""}, {}, {"q": "a" * 1001},
])
def test_malformed_parameters_are_422(client: TestClient, params: dict) -> None:
    response = client.get("/api/search", params=params)
    assert response.status_code == 422, response.text
    assert_still_serving(client)


@pytest.mark.parametrize("fields", [{"k": "0"}, {"k": "x"}, {"text_weight": "-1"},
                                    {"image_weight": "inf"}, {"threshold": "-7"}])
def test_malformed_form_fields_are_422(client: TestClient, photo_dir: Path,
                                       fields: dict) -> None:
    data = (photo_dir / "coffee.png").read_bytes()
    response = client.post("/api/search/image", files={"file": ("c.png", data)}, data=fields)
    assert response.status_code == 422, response.text
    assert_still_serving(client)


def test_blank_and_over_long_text_are_400_with_a_reason(client: TestClient) -> None:
    blank = client.get("/api/search", params={"q": "   "})
    assert blank.status_code == 400 and blank.json()["detail"]
    long = client.get("/api/search", params={"q": "a very long query " * 30})
    assert long.status_code == 400
    assert "context length" in long.json()["detail"]
    assert_still_serving(client)


def test_missing_file_is_422(client: TestClient) -> None:
    assert client.post("/api/search/image", data={"q": "cat"}).status_code == 422
    assert_still_serving(client)


# ---------------------------------------------------------------------- batching
def test_text_batcher_shares_encoder_calls_and_isolates_failures() -> None:
    batches: list[list[str]] = []
    gate = threading.Event()

    def embed(texts: list[str]) -> np.ndarray:
        gate.wait(5)  # the first call holds the turn until every thread has queued its text
        batches.append(list(texts))
        if any(t.startswith("bad") for t in texts):
            raise ValueError(f"refused {texts}")
        return np.array([[len(t), i] for i, t in enumerate(texts)], np.float32)

    batcher = TextBatcher(embed, max_batch=8)
    texts = ["x" * n for n in range(1, 20)] + ["bad text"]
    with ThreadPoolExecutor(len(texts)) as pool:
        futures = [pool.submit(batcher, t) for t in texts]
        threading.Timer(0.3, gate.set).start()
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result(timeout=10)[0])
            except ValueError as exc:
                outcomes.append(str(exc))
    assert outcomes[:-1] == [float(n) for n in range(1, 20)]  # each got its own vector
    assert "bad text" in outcomes[-1]
    assert max(len(b) for b in batches) == 8  # batches formed, capped at max_batch
    assert sum(len(b) for b in batches if len(b) > 1) >= len(texts) - 1


# ------------------------------------------------------------------- live server
def test_rebuilt_index_is_served_without_restart(photo_dir: Path, model: clipforge.CLIP,
                                                 tmp_path: Path) -> None:
    """Items added by a rebuild appear in answers; queries running during the rebuild see
    either the old or the new state, never an error or a partial one."""
    photos = sorted(photo_dir.iterdir())
    folder = tmp_path / "growing"
    folder.mkdir()
    for p in photos[:4]:
        shutil.copy(p, folder / p.name)
    build_index(folder, tmp_path / "index", model)
    index = SearchIndex.open(tmp_path / "index", model)
    seen: set[int] = set()
    errors: list[str] = []
    stop = threading.Event()

    with running_server(create_app(index)) as url, httpx.Client(base_url=url) as http:
        assert http.get("/healthz").json()["items"] == 4
        generation = http.get("/healthz").json()["generation"]

        def poll() -> None:
            with httpx.Client(base_url=url, timeout=30) as poller:
                while not stop.is_set():
                    r = poller.get("/api/search", params={"q": "a photo", "k": 100})
                    if r.status_code != 200:
                        errors.append(r.text)
                    else:
                        seen.add(len(r.json()["results"]))

        thread = threading.Thread(target=poll)
        thread.start()
        try:
            for p in photos[4:]:
                shutil.copy(p, folder / p.name)
            build_index(folder, tmp_path / "index", model)
        finally:
            stop.set()
            thread.join()

        results = http.get("/api/search", params={"q": "a photo", "k": 100}).json()["results"]
        health = http.get("/healthz").json()
        newest = max(r["id"] for r in results)
        thumb = http.get(f"/thumbnails/{newest}")
    assert errors == []
    assert seen and seen <= {4, 8}
    assert len(results) == 8 and set(names(results)) == {p.name for p in photos}
    assert health["items"] == 8 and health["generation"] != generation
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"


def test_live_server_refuses_oversized_uploads(index: SearchIndex, photo_dir: Path) -> None:
    """Through a real HTTP connection: declared and chunked oversized bodies get 413, and the
    server goes on answering, on new connections and on the same keep-alive client."""
    def chunks():
        for _ in range(30):
            yield b"x" * 10_000

    app = create_app(index, max_upload_bytes=200_000)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        declared = http.post("/api/search/image", files={"file": ("a.png", b"\0" * 300_000)})
        chunked = http.post("/api/embed", content=chunks(),
                            headers={"content-type": "application/json"})
        photo = (photo_dir / "horse.png").read_bytes()  # 17 KB
        fine = http.post("/api/search/image", files={"file": ("h.png", photo)})
        assert_still_serving(http)
    assert declared.status_code == 413 and "200000" in declared.json()["detail"]
    assert chunked.status_code == 413 and "200000" in chunked.json()["detail"]
    assert fine.status_code == 200


def test_concurrent_clients_get_the_serial_answers(index: SearchIndex) -> None:
    """8 threads x 10 mixed text searches against a live server: no errors, and every answer
    equals the one a serial run gave."""
    def ask(http: httpx.Client, q: str) -> list[tuple[int, float]]:
        r = http.get("/api/search", params={"q": q, "k": 5})
        r.raise_for_status()
        return [(x["id"], x["score"]) for x in r.json()["results"]]

    with running_server(create_app(index)) as url:
        with httpx.Client(base_url=url) as http:
            serial = {q: ask(http, q) for q in QUERIES}

        def worker(n: int) -> list[tuple[str, list]]:
            with httpx.Client(base_url=url, timeout=60) as http:
                return [(q, ask(http, q))
                        for q in (QUERIES[(n + i) % len(QUERIES)] for i in range(10))]

        with ThreadPoolExecutor(8) as pool:
            answers = [a for batch in pool.map(worker, range(8)) for a in batch]
    assert len(answers) == 80
    for q, got in answers:
        assert [i for i, _ in got] == [i for i, _ in serial[q]], q
        assert [s for _, s in got] == pytest.approx([s for _, s in serial[q]], abs=1e-5)

"""Locating on the search server (issue 15): ``POST /api/locate`` for an upload and ``GET
/api/items/{id}/locate`` for an indexed item answer what ``clipforge.locate`` answers on the
same image and text, behind the token, under the upload checks and the decode budget, with the
API's error shapes.  (A video segment's frame: tests/test_video.py; the page's control:
tests/test_browser.py.)"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import clipforge
from clipforge.dense import overlay
from clipforge.search import SearchIndex
from clipforge.search import server as server_module
from clipforge.search.locate_routes import LOCATE_PIXEL_COST, OVERLAY_SIDE
from clipforge.search.server import create_app

LOOPBACK = "http://127.0.0.1"
TOKEN = "s3cret-Token_for-locate-0123456789"
TEXT = "a cat on a sofa"


@pytest.fixture(scope="module")
def client(index: SearchIndex) -> Iterator[TestClient]:
    with TestClient(create_app(index), base_url=LOOPBACK) as c:
        yield c


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def item_ids(client: TestClient) -> dict[str, int]:
    results = client.get("/api/search", params={"q": "a photo", "k": 20}).json()["results"]
    return {r["path"]: r["id"] for r in results}


def decoded_overlay(answer: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(answer["overlay_png"])))


def upload(client: TestClient, data: bytes, name: str = "query.png", **fields) -> object:
    return client.post("/api/locate", files={"file": (name, data)},
                       data={"q": TEXT, **fields})


# ------------------------------------------------------------------- the same as the library
def test_an_upload_is_located_as_the_library_locates_it(client: TestClient, model,
                                                        photos: list[Path]) -> None:
    photo = next(p for p in photos if p.name == "rocket.jpg")  # 640x427: the overlay shrinks
    answer = upload(client, photo.read_bytes(), name=photo.name)
    assert answer.status_code == 200, answer.text
    got = answer.json()
    with Image.open(photo) as image:
        image = image.convert("RGB")
    expected = clipforge.locate(model, image, TEXT)
    assert (got["peak"], got["box"]) == (list(expected.peak), list(expected.box))
    assert got["size"] == list(image.size) and got["score"] == round(expected.score, 6)
    assert got["grid"] == [4, 4] and got["image"] == photo.name and got["item"] is None
    # the overlay is the library's, drawn at most OVERLAY_SIDE pixels a side (PNG: lossless)
    drawn = overlay(image, expected, max_side=OVERLAY_SIDE)
    picture = decoded_overlay(got)
    assert picture.format == "PNG" and list(picture.size) == got["overlay_size"]
    assert max(picture.size) == OVERLAY_SIDE < max(image.size)
    assert np.array_equal(np.asarray(picture.convert("RGB")), np.asarray(drawn))


def test_an_indexed_item_is_located_as_the_library_locates_its_file(
        client: TestClient, model, photo_dir: Path) -> None:
    ids = item_ids(client)
    for name in ("rocket.jpg", "coffee.png"):
        answer = client.get(f"/api/items/{ids[name]}/locate", params={"q": "a red rocket"})
        assert answer.status_code == 200, answer.text
        got = answer.json()
        expected = clipforge.locate(model, photo_dir / name, "a red rocket")
        assert (got["peak"], got["box"]) == (list(expected.peak), list(expected.box))
        assert got["size"] == list(expected.size) and got["item"] == ids[name]
        assert got["start"] is None and got["image"] is None
        x0, y0, x1, y1 = got["box"]
        assert 0 <= x0 < x1 <= got["size"][0] and 0 <= y0 < y1 <= got["size"][1]


def test_the_threshold_reaches_the_library_and_the_overlay_can_be_left_out(
        client: TestClient, model, photo_dir: Path) -> None:
    ids = item_ids(client)
    answer = client.get(f"/api/items/{ids['rocket.jpg']}/locate",
                        params={"q": TEXT, "threshold": 0.9, "overlay": "false"}).json()
    expected = clipforge.locate(model, photo_dir / "rocket.jpg", TEXT, threshold=0.9)
    assert answer["box"] == list(expected.box)
    assert answer["overlay_png"] is None and answer["overlay_size"] is None
    wide = clipforge.locate(model, photo_dir / "rocket.jpg", TEXT, threshold=0.1)
    assert wide.box != expected.box  # the threshold changes the box: the check can fail


# ------------------------------------------------------------------- refusals
def test_locating_needs_the_token(index: SearchIndex, photos: list[Path]) -> None:
    with TestClient(create_app(index, token=TOKEN), base_url=LOOPBACK) as guarded:
        item = guarded.get("/api/search", params={"q": "x"},
                           headers={"Authorization": f"Bearer {TOKEN}"}).json()["results"][0]
        route = f"/api/items/{item['id']}/locate"
        assert guarded.get(route, params={"q": TEXT}).status_code == 401
        refused = upload(guarded, photos[0].read_bytes())
        assert refused.status_code == 401 and "access token" in refused.json()["detail"]
        wrong = guarded.get(route, params={"q": TEXT}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        allowed = guarded.get(route, params={"q": TEXT},
                              headers={"Authorization": f"Bearer {TOKEN}"})
        assert allowed.status_code == 200 and allowed.json()["item"] == item["id"]
        schema = guarded.get("/openapi.json").json()
        assert schema["paths"]["/api/locate"]["post"]["security"] == [{"bearer": []}]


def test_unknown_items_and_indexes_are_404(client: TestClient) -> None:
    missing = client.get("/api/items/999999/locate", params={"q": TEXT})
    assert missing.status_code == 404 and missing.json() == {"detail": "no item 999999"}
    elsewhere = client.get("/api/items/0/locate", params={"q": TEXT, "index": "other"})
    assert elsewhere.status_code == 404 and "no index 'other'" in elsewhere.json()["detail"]
    assert client.get("/api/items/-1/locate", params={"q": TEXT}).status_code == 422


def test_bad_uploads_are_400_naming_the_problem(index: SearchIndex) -> None:
    strip = png_bytes(Image.new("L", (100_000, 1)))
    large = png_bytes(Image.new("RGB", (1200, 1000)))
    with TestClient(create_app(index, max_pixels=1_000_000, max_upload_bytes=300_000),
                    base_url=LOOPBACK) as limited:
        cases = {"junk": (b"not an image at all", "not an image in a supported format"),
                 "empty": (b"", "empty"),
                 "strip": (strip, "aspect ratio"),
                 "large": (large, "1200x1000 = 1200000 pixels, more than the limit of 1000000"),
                 "cut": (png_bytes(Image.new("RGB", (64, 64), (9, 9, 9)))[:80], "cannot decode")}
        for name, (data, reason) in cases.items():
            answer = upload(limited, data, name=f"{name}.png")
            assert answer.status_code == 400, (name, answer.text)
            assert reason in answer.json()["detail"], (name, answer.json())
        too_big = upload(limited, b"\0" * 400_000)
        assert too_big.status_code == 413 and "300000" in too_big.json()["detail"]


def test_bad_texts_are_refused(client: TestClient, photos: list[Path]) -> None:
    route = f"/api/items/{item_ids(client)['rocket.jpg']}/locate"
    blank = client.get(route, params={"q": "   "})
    assert blank.status_code == 400 and "empty" in blank.json()["detail"]
    blank_upload = upload(client, photos[0].read_bytes(), q=" ")
    assert blank_upload.status_code == 400 and "empty" in blank_upload.json()["detail"]
    long = client.get(route, params={"q": "x" * 1001})
    assert long.status_code == 422
    context = client.get(route, params={"q": "a very long query " * 30})
    assert context.status_code == 400 and "context length" in context.json()["detail"]
    assert upload(client, photos[0].read_bytes(), threshold="0").status_code == 422
    no_text = client.post("/api/locate", files={"file": ("a.png", photos[0].read_bytes())})
    assert no_text.status_code == 422


def test_an_onnx_model_is_refused_with_what_to_do(index: SearchIndex, client: TestClient,
                                                  monkeypatch) -> None:
    route = f"/api/items/{item_ids(client)['rocket.jpg']}/locate"
    monkeypatch.setattr(index, "model", object())  # what the check sees of an ONNX encoder
    answer = client.get(route, params={"q": TEXT})
    assert answer.status_code == 501 and "--backend torch" in answer.json()["detail"]


def test_locating_holds_its_cost_of_the_decode_budget(index: SearchIndex, monkeypatch,
                                                      photo_dir: Path) -> None:
    """The map and its region hold several times the decoded image: an upload or an indexed
    image takes LOCATE_PIXEL_COST budget pixels per pixel while it is located."""
    held: list[int] = []

    class Recording(server_module.PixelBudget):
        def hold(self, pixels: int):
            held.append(pixels)
            return super().hold(pixels)

    monkeypatch.setattr(server_module, "PixelBudget", Recording)
    with TestClient(create_app(index), base_url=LOOPBACK) as recording:
        ids = item_ids(recording)
        image = Image.new("RGB", (120, 80), (200, 30, 30))
        assert upload(recording, png_bytes(image)).status_code == 200
        assert recording.get(f"/api/items/{ids['rocket.jpg']}/locate",
                             params={"q": TEXT}).status_code == 200
    with Image.open(photo_dir / "rocket.jpg") as rocket:
        width, height = rocket.size
    assert held == [120 * 80 * LOCATE_PIXEL_COST, width * height * LOCATE_PIXEL_COST]


def test_no_absolute_path_in_any_answer(client: TestClient, index: SearchIndex) -> None:
    ids = item_ids(client)
    answer = client.get(f"/api/items/{ids['rocket.jpg']}/locate", params={"q": TEXT})
    assert str(index.path.parent) not in answer.text and "/tmp" not in answer.text

"""One server, several indexes by name (issue 14): ``create_app({"all": a, "few": b})`` and
``clipforge serve NAME=PATH ...``.  Two indexes of the sample photos, built with different tiny
models (all eight photos; three of them), answer the same requests each from its own items and
with its own model; names pick them in every route (``index``), in clip-retrieval's API
(``indice_name``) and in thumbnail URLs (ids are per index); a rebuilt or deleted index changes
nothing for the other.  Live servers listen on 127.0.0.1 only, on a port the OS picks."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import clipforge
from clipforge.cli import main
from clipforge.search import SearchIndex, build_index
from clipforge.search import server as server_module
from clipforge.search.html import render_thumbnail
from clipforge.search.server import TOKEN_ENV, create_app, running_server
from conftest import seeded_model

LOOPBACK = "http://127.0.0.1"
FEW = 3  # photos in the second index


@pytest.fixture(autouse=True)
def _no_token_in_environment(monkeypatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)


@pytest.fixture(scope="module")
def other_model() -> clipforge.CLIP:
    """Another architecture than the shared index's: each index must use its own model."""
    return seeded_model("tiny-rn", seed=2)


@pytest.fixture(scope="module")
def few_photos(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the last three sample photos (copies: the shared folder stays as it is)."""
    folder = tmp_path_factory.mktemp("few-photos")
    for photo in sorted(photo_dir.iterdir())[-FEW:]:
        shutil.copy(photo, folder / photo.name)
    return folder


@pytest.fixture(scope="module")
def few(few_photos: Path, other_model: clipforge.CLIP,
        tmp_path_factory: pytest.TempPathFactory) -> SearchIndex:
    out = tmp_path_factory.mktemp("few") / "few.idx"
    build_index(few_photos, out, other_model)
    return SearchIndex.open(out, other_model)


@pytest.fixture(scope="module")
def client(index: SearchIndex, few: SearchIndex) -> Iterator[TestClient]:
    with TestClient(create_app({"all": index, "few": few}), base_url=LOOPBACK) as c:
        yield c


def by_id(hits) -> dict[int, str]:
    return {hit.id: Path(hit.path).name for hit in hits}


def shared_id(index: SearchIndex, few: SearchIndex) -> int:
    """An item id both indexes use, for different photos."""
    everything, some = by_id(index.search(text="a photo", k=100)), by_id(
        few.search(text="a photo", k=100))
    shared = [i for i in some if i in everything and everything[i] != some[i]]
    assert shared, (everything, some)
    return shared[0]


def scrape(client: TestClient) -> dict[tuple[str, frozenset], float]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text)
            for sample in family.samples}


# ------------------------------------------------------------------------------- search
def test_the_same_query_gets_each_indexs_own_results(client: TestClient, index: SearchIndex,
                                                     few: SearchIndex) -> None:
    for name, served in [("all", index), ("few", few)]:
        response = client.get("/api/search", params={"q": "a cat", "k": 100, "index": name})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["index"] == name
        expected = served.search(text="a cat", k=100)  # with the index's own model
        assert [r["id"] for r in body["results"]] == [h.id for h in expected]
        assert [r["score"] for r in body["results"]] == pytest.approx(
            [h.score for h in expected], abs=1e-5)
        assert [r["path"] for r in body["results"]] == [Path(h.path).name for h in expected]
        assert all(r["thumbnail"] == f"/thumbnails/{r['id']}?index={name}"
                   for r in body["results"])
    assert len(client.get("/api/search", params={"q": "a cat", "k": 100, "index": "few"}
                          ).json()["results"]) == FEW
    # No name: the first index, as with an explicit one.
    default = client.get("/api/search", params={"q": "a cat", "k": 100}).json()
    named = client.get("/api/search", params={"q": "a cat", "k": 100, "index": "all"}).json()
    assert default["index"] == "all" and default["results"] == named["results"]


def test_image_search_items_similar_embed_and_classify_take_the_index(
        client: TestClient, index: SearchIndex, few: SearchIndex, few_photos: Path) -> None:
    photo = sorted(few_photos.iterdir())[0]
    image = client.post("/api/search/image", files={"file": (photo.name, photo.read_bytes())},
                        data={"k": "100", "index": "few"})
    assert image.status_code == 200, image.text
    results = image.json()["results"]
    assert len(results) == FEW and results[0]["path"] == photo.name
    assert results[0]["score"] == pytest.approx(1.0, abs=2e-3)  # found with few's own model
    first = results[0]["id"]
    item = client.get(f"/api/items/{first}", params={"index": "few"}).json()
    assert item["path"] == photo.name and item["thumbnail"] == f"/thumbnails/{first}?index=few"
    similar = client.get(f"/api/items/{first}/similar", params={"k": 100, "index": "few"})
    assert {r["id"] for r in similar.json()["results"]} == {r["id"] for r in results[1:]}

    embedded = client.post("/api/embed", json={"texts": ["a cat"], "index": "few"}).json()
    np.testing.assert_allclose(embedded["texts"], few.embed_texts(["a cat"]), atol=1e-6)
    assert embedded["model"] == few.info["model"] == "tiny-rn"
    form = client.post("/api/embed", files={"file": (photo.name, photo.read_bytes())},
                       data={"index": "few"}).json()
    expected = few.embed_image(Image.open(photo).convert("RGB"))
    np.testing.assert_allclose(form["image"], expected, atol=1e-6)
    default = client.post("/api/embed", json={"texts": ["a cat"]}).json()
    assert default["model"] == "tiny-vit"
    np.testing.assert_allclose(default["texts"], index.embed_texts(["a cat"]), atol=1e-6)

    classified = client.post("/api/classify", files={"file": (photo.name, photo.read_bytes())},
                             data={"labels": "a cat, a rocket", "index": "few"})
    assert classified.status_code == 200, classified.text
    expected_labels = few.classify(Image.open(photo).convert("RGB"), ["a cat", "a rocket"])
    assert [(x["label"], pytest.approx(x["probability"], abs=1e-5))
            for x in classified.json()["labels"]] == [(n, float(p)) for n, p in expected_labels]


@pytest.mark.parametrize("method, url, kwargs", [
    ("GET", "/api/search?q=a+cat&index=nope", {}),
    ("GET", "/api/items/1?index=nope", {}),
    ("GET", "/api/items/1/similar?index=nope", {}),
    ("GET", "/thumbnails/1?index=nope", {}),
    ("POST", "/api/search/image", {"files": {"file": ("x.png", b"not read")},
                                   "data": {"index": "nope"}}),
    ("POST", "/api/classify", {"files": {"file": ("x.png", b"not read")},
                               "data": {"labels": "a, b", "index": "nope"}}),
    ("POST", "/api/embed", {"json": {"texts": ["a cat"], "index": "nope"}}),
    ("POST", "/api/embed", {"files": {"file": ("x.png", b"not read")},
                            "data": {"index": "nope"}}),
])
def test_an_unknown_index_is_404_listing_the_names(client: TestClient, method: str, url: str,
                                                   kwargs: dict) -> None:
    response = client.request(method, url, **kwargs)
    assert response.status_code == 404, response.text
    detail = response.json()["detail"]
    assert "'nope'" in detail and "['all', 'few']" in detail


def test_thumbnails_and_items_are_per_index(client: TestClient, index: SearchIndex,
                                            few: SearchIndex) -> None:
    item_id = shared_id(index, few)
    for name, served in [("all", index), ("few", few)]:
        path = served.item(item_id).path
        thumb = client.get(f"/thumbnails/{item_id}", params={"index": name})
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert thumb.content == render_thumbnail(Image.open(path)), name
        item = client.get(f"/api/items/{item_id}", params={"index": name}).json()
        assert item["path"] == Path(path).name
    assert client.get(f"/thumbnails/{item_id}").content == client.get(
        f"/thumbnails/{item_id}", params={"index": "all"}).content  # the default
    beyond = max(by_id(few.search(text="a photo", k=100))) + 1
    assert beyond in by_id(index.search(text="a photo", k=100))  # there, but not in few
    assert client.get(f"/thumbnails/{beyond}", params={"index": "few"}).status_code == 404
    assert client.get(f"/api/items/{beyond}", params={"index": "few"}).status_code == 404


def test_one_index_in_a_mapping_is_served_as_before(index: SearchIndex) -> None:
    with TestClient(create_app({"photos": index}), base_url=LOOPBACK) as c:
        hit = c.get("/api/search", params={"q": "a cat"}).json()["results"][0]
        assert hit["thumbnail"] == f"/thumbnails/{hit['id']}"  # nothing to tell apart
        assert c.get("/indices-list").json() == ["photos"]
        assert c.get("/api/search", params={"q": "a cat", "index": "photos"}).status_code == 200


@pytest.mark.parametrize("names", [{"a b": 0}, {"../x": 0}, {"": 0}, {"..": 0},
                                   {"ok": 0, "é": 0}, {"x" * 65: 0}])
def test_create_app_refuses_unsafe_names(index: SearchIndex, names: dict) -> None:
    bad = list(names)[-1]
    with pytest.raises(ValueError, match="is not allowed") as info:
        create_app({name: index for name in names})
    assert repr(bad) in str(info.value)


def test_create_app_needs_an_index() -> None:
    with pytest.raises(ValueError, match="no index"):
        create_app({})


# --------------------------------------------------------------------- service routes
def test_health_indexes_and_metrics_report_every_index(client: TestClient, index: SearchIndex,
                                                       few: SearchIndex) -> None:
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["items"] == 8 and health["model"] == "tiny-vit"
    listed = [(i["name"], i["status"], i["items"], i["model"]) for i in health["indexes"]]
    assert listed == [("all", "ok", 8, "tiny-vit"), ("few", "ok", FEW, "tiny-rn")]
    answer = client.get("/api/indexes")
    assert answer.status_code == 200
    assert answer.json()["default"] == "all"
    assert [(i["name"], i["items"], i["model"]) for i in answer.json()["indexes"]] == [
        ("all", 8, "tiny-vit"), ("few", FEW, "tiny-rn")]
    for folder in (index.path, few.path):
        assert str(folder.parent) not in answer.text + json.dumps(health)
    samples = scrape(client)
    assert samples[("clipforge_index_items", frozenset({("index", "all")}))] == 8
    assert samples[("clipforge_index_items", frozenset({("index", "few")}))] == FEW


def test_a_model_file_is_shown_by_its_name_alone(index: SearchIndex, few_photos: Path,
                                                 other_model: clipforge.CLIP,
                                                 tmp_path: Path) -> None:
    """An index built with a model file records the file's absolute path: answers show its
    name only."""
    clipforge.save_model(other_model, tmp_path / "mine.safetensors")
    from_file = clipforge.create_model(tmp_path / "mine.safetensors")
    build_index(few_photos, tmp_path / "filed", from_file)
    filed = SearchIndex.open(tmp_path / "filed", from_file)
    assert filed.info["model"] == str(tmp_path / "mine.safetensors")
    with TestClient(create_app({"filed": filed, "all": index}), base_url=LOOPBACK) as c:
        answers = [c.get("/healthz"), c.get("/api/indexes"),
                   c.post("/api/embed", json={"texts": ["a cat"]})]
        assert answers[0].json()["model"] == "mine.safetensors"
        assert answers[1].json()["indexes"][0]["model"] == "mine.safetensors"
        assert answers[2].json()["model"] == "mine.safetensors"
        for answer in answers:
            assert str(tmp_path) not in answer.text


def test_a_deleted_index_is_named_and_leaves_the_other_served(
        index: SearchIndex, few_photos: Path, other_model: clipforge.CLIP,
        tmp_path: Path) -> None:
    build_index(few_photos, tmp_path / "doomed", other_model)
    gone = SearchIndex.open(tmp_path / "doomed", other_model)
    with TestClient(create_app({"main": index, "gone": gone}), base_url=LOOPBACK) as c:
        assert c.get("/api/search", params={"q": "a cat", "index": "gone"}).status_code == 200
        shutil.rmtree(tmp_path / "doomed")
        health = c.get("/healthz")
        assert health.status_code == 200  # the default index is fine
        assert health.json()["status"] == "degraded"
        status = {i["name"]: i["status"] for i in health.json()["indexes"]}
        assert status == {"main": "ok", "gone": "unavailable"}
        search = c.get("/api/search", params={"q": "a cat", "index": "gone"})
        assert search.status_code == 503
        detail = search.json()["detail"]
        assert "'gone'" in detail and "gone/index.sqlite" in detail  # by name, not folder
        assert str(tmp_path) not in detail and "doomed" not in detail
        assert str(tmp_path) not in health.text + c.get("/api/indexes").text
        assert c.get("/api/search", params={"q": "a cat", "index": "main"}).status_code == 200
    # The default index gone: the top-level health is 503, as with one index.
    build_index(few_photos, tmp_path / "first", other_model)
    first = SearchIndex.open(tmp_path / "first", other_model)
    with TestClient(create_app({"first": first, "main": index}), base_url=LOOPBACK) as c:
        shutil.rmtree(tmp_path / "first")
        health = c.get("/healthz")
        assert health.status_code == 503 and "'first'" in health.json()["detail"]
        assert [i["status"] for i in health.json()["indexes"]] == ["unavailable", "ok"]


# ---------------------------------------------------------------------- clip-retrieval
def knn(client: TestClient, path: str = "/knn-service", **fields) -> httpx.Response:
    return client.post(path, content=json.dumps(fields))


def test_indices_list_and_indice_name_pick_the_index(client: TestClient,
                                                     few: SearchIndex) -> None:
    assert client.get("/indices-list").json() == ["all", "few"]
    plain = {"deduplicate": False, "num_images": 100}
    for name in ("all", "few"):
        answer = knn(client, text="a cat", indice_name=name, **plain)
        assert answer.status_code == 200, answer.text
        expected = client.get("/api/search", params={"q": "a cat", "k": 100, "index": name})
        assert [(r["id"], r["similarity"]) for r in answer.json()] == [
            (r["id"], r["score"]) for r in expected.json()["results"]]
        for result in answer.json():
            assert result["url"] == f"{LOOPBACK}/thumbnails/{result['id']}?index={name}"
        thumb = client.get(answer.json()[0]["url"])
        assert thumb.status_code == 200
        assert thumb.content == client.get(f"/thumbnails/{answer.json()[0]['id']}",
                                           params={"index": name}).content
    absent = knn(client, text="a cat", **plain).json()
    assert absent == knn(client, text="a cat", indice_name="all", **plain).json()
    ids = [r["id"] for r in knn(client, text="a cat", indice_name="few", **plain).json()]
    metadata = knn(client, "/metadata", ids=ids, indice_name="few").json()
    assert [m["metadata"]["path"] for m in metadata] == [
        Path(few.item(i).path).name for i in ids]
    assert all(m["metadata"]["url"].endswith(f"/thumbnails/{m['id']}?index=few")
               for m in metadata)
    for path, body in [("/knn-service", {"text": "a cat"}), ("/metadata", {"ids": ids})]:
        wrong = knn(client, path, indice_name="nope", **body)
        assert wrong.status_code == 400
        assert "'nope'" in wrong.json()["detail"] and "['all', 'few']" in wrong.json()["detail"]


def test_embedding_input_is_checked_against_the_named_indexs_model(
        client: TestClient, few: SearchIndex) -> None:
    vector = few.embed_texts(["a rocket"])[0].tolist()
    answer = knn(client, embedding_input=vector, indice_name="few", deduplicate=False,
                 num_images=FEW)
    expected = [h.id for h in few.search_vector(np.asarray(vector, np.float32), FEW)]
    assert [r["id"] for r in answer.json()] == expected


# -------------------------------------------------------------------------------- rebuild
def test_a_rebuild_of_one_index_is_picked_up_without_affecting_the_other(
        index: SearchIndex, photo_dir: Path, other_model: clipforge.CLIP,
        tmp_path: Path) -> None:
    """The growing index answers with its new items; the other, polled all along, answers
    exactly as before, and keeps its generation."""
    photos = sorted(photo_dir.iterdir())
    folder = tmp_path / "growing"
    folder.mkdir()
    for photo in photos[:FEW]:
        shutil.copy(photo, folder / photo.name)
    build_index(folder, tmp_path / "grow", other_model)
    grow = SearchIndex.open(tmp_path / "grow", other_model)
    other_answers: list = []
    errors: list[str] = []
    stop = threading.Event()
    query = {"q": "a photo", "k": 100}

    with running_server(create_app({"steady": index, "grow": grow})) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        before = http.get("/healthz").json()["indexes"]
        steady = http.get("/api/search", params={**query, "index": "steady"}).json()["results"]
        assert len(http.get("/api/search", params={**query, "index": "grow"}
                            ).json()["results"]) == FEW

        def poll() -> None:
            with httpx.Client(base_url=url, timeout=30) as poller:
                while not stop.is_set():
                    r = poller.get("/api/search", params={**query, "index": "steady"})
                    if r.status_code != 200:
                        errors.append(r.text)
                    else:
                        other_answers.append(r.json()["results"])

        thread = threading.Thread(target=poll)
        thread.start()
        try:
            for photo in photos[FEW:]:
                shutil.copy(photo, folder / photo.name)
            build_index(folder, tmp_path / "grow", other_model)
        finally:
            stop.set()
            thread.join()
        grown = http.get("/api/search", params={**query, "index": "grow"}).json()["results"]
        after = http.get("/healthz").json()["indexes"]
        newest = max(r["id"] for r in grown)
        thumb = http.get(f"/thumbnails/{newest}", params={"index": "grow"})
        metrics = http.get("/metrics").text
    assert errors == [] and other_answers
    assert all(answer == steady for answer in other_answers)
    assert {Path(r["path"]).name for r in grown} == {p.name for p in photos}
    assert [(i["name"], i["items"]) for i in after] == [("steady", 8), ("grow", 8)]
    assert after[0]["generation"] == before[0]["generation"]
    assert after[1]["generation"] != before[1]["generation"]
    assert thumb.status_code == 200
    assert thumb.content == render_thumbnail(Image.open(grow.item(newest).path))
    assert 'clipforge_index_items{index="grow"} 8.0' in metrics


# ------------------------------------------------------------------------ command line
def refuse_to_load(monkeypatch) -> None:
    """Fail the test if ``clipforge serve`` got as far as opening an index."""
    def opened(cls, *args, **kwargs):
        raise AssertionError("an index was opened before the names were checked")
    monkeypatch.setattr(SearchIndex, "open", classmethod(opened))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_serve_names_reach_the_server_in_order(tmp_path: Path, monkeypatch) -> None:
    opened, seen = [], {}
    monkeypatch.setattr(SearchIndex, "open", classmethod(
        lambda cls, path, *a, **k: opened.append(Path(path)) or f"index at {path}"))
    monkeypatch.setattr(server_module, "serve",
                        lambda indexes, **kwargs: seen.update(indexes=indexes))
    (tmp_path / "photos.idx").mkdir()
    assert main(["serve", f"b={tmp_path / 'x'}", str(tmp_path / "photos.idx") + os.sep,
                 f"a={tmp_path / 'y=z'}", "--port", "0"]) == 0
    assert list(seen["indexes"]) == ["b", "photos.idx", "a"]  # the folder's name by default
    assert opened == [tmp_path / "x", tmp_path / "photos.idx", tmp_path / "y=z"]


@pytest.mark.parametrize("arguments, expected", [
    (["a=one", "a=two"], ["'a'", "twice", "one", "two", "NAME=PATH"]),
    (["one/index", "two/index"], ["'index'", "twice", "NAME=PATH"]),
    (["bad name=one"], ["'bad name'", "not allowed", "letters, digits"]),
    (["a/b=one"], ["'a/b'", "not allowed"]),
    (["=one"], ["''", "not allowed"]),
    (["a="], ["a=", "no index folder"]),
    (["my photos"], ["'my photos'", "not allowed", "NAME=PATH"]),
])
def test_serve_refuses_bad_or_duplicate_names_in_one_line(
        tmp_path: Path, monkeypatch, capsys, arguments: list[str], expected: list[str]) -> None:
    refuse_to_load(monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert main(["serve", *arguments, "--port", "0"]) == 2
    err = one_error_line(capsys)
    for part in expected:
        assert part in err, (part, err)


def test_serve_names_the_index_that_fails_to_load(tmp_path: Path, monkeypatch,
                                                  capsys) -> None:
    def fake_open(cls, path, *args, **kwargs):
        if Path(path).name != "good":
            raise ValueError(f"{path} has no finished build yet")
        return "the index"

    monkeypatch.setattr(SearchIndex, "open", classmethod(fake_open))
    monkeypatch.setattr(server_module, "serve", lambda indexes, **kwargs: None)
    assert main(["serve", f"first={tmp_path / 'good'}", f"second={tmp_path / 'empty'}",
                 "--port", "0"]) == 2
    err = one_error_line(capsys)
    assert err.startswith("error: index 'second': ") and "no finished build" in err


# ------------------------------------------------------------------------------ the page
def test_page_has_an_index_picker_hidden_until_there_are_several(client: TestClient) -> None:
    page = client.get("/").text
    assert 'data-testid="index-select"' in page
    picker = page.split('id="index-picker"', 1)[1].split(">", 1)[0]
    assert "hidden" in picker


def test_page_searches_the_chosen_index_in_a_browser(index: SearchIndex,
                                                     few: SearchIndex) -> None:
    """Headless Chromium, when Playwright and Chromium are installed (as in tests/
    test_browser.py): choosing "few" searches it, and its thumbnails and maps load by its
    name."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    chromium = os.environ.get("CLIPFORGE_CHROMIUM", "/usr/bin/chromium")
    if not (Path(chromium).is_file() or shutil.which(chromium)):
        pytest.skip(f"no Chromium at {chromium} (set CLIPFORGE_CHROMIUM)")
    expect = sync_api.expect
    with running_server(create_app({"all": index, "few": few})) as url, \
            sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, timeout=30_000,
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.set_default_timeout(10_000)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            located: list[str] = []
            page.on("request", lambda r: located.append(r.url) if "/locate?" in r.url
                    else None)
            page.goto(url + "/")
            picker = page.get_by_test_id("index-select")
            expect(picker).to_be_visible()
            expect(page.get_by_test_id("index-info")).to_contain_text("8 items")
            page.get_by_label("Search by text").fill("a cat")
            page.get_by_test_id("search-submit").click()
            expect(page.get_by_test_id("result-card")).to_have_count(8)
            picker.select_option("few")  # the query runs again, on the chosen index
            expect(page.get_by_test_id("result-card")).to_have_count(FEW)
            expect(page.get_by_test_id("index-info")).to_contain_text(f"{FEW} items")
            img = page.get_by_test_id("result-card").first.get_by_role("img")
            expect(img).to_have_attribute("src", re.compile(r"^/thumbnails/\d+\?index=few$"))
            img.evaluate("img => img.decode()")
            assert img.evaluate("img => img.naturalWidth") > 0
            assert "index=few" in page.url
            # the map of a result comes from the chosen index's item (ids are per index)
            page.get_by_test_id("result-card").first.get_by_test_id("locate").click()
            expect(img).to_have_attribute("src", re.compile(r"^data:image/png"))
            assert len(located) == 1 and "index=few" in located[0]
            more = page.get_by_test_id("result-card").first.get_by_role(
                "button", name=re.compile("^More like"))
            more.click()
            expect(page.get_by_test_id("result-card")).to_have_count(FEW - 1)
            page.reload()  # the choice and the query are in the URL
            expect(picker).to_have_value("few")
            expect(page.get_by_test_id("result-card")).to_have_count(FEW)
            assert errors == []
        finally:
            browser.close()

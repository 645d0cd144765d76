"""The server shows no absolute path (issue 14): item paths are relative to the collection root
the index was built from, or file names alone; error details name the index folder by its name
only.  (``clipforge search`` on the command line still prints full paths.)"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import clipforge
from clipforge.search import SearchIndex, build_index
from clipforge.search.index import collection_root
from clipforge.search.server import create_app, display_path

LOOPBACK = "http://127.0.0.1"


@pytest.fixture(scope="module")
def collection(photo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the sample photos, half of them in a nested subfolder."""
    root = tmp_path_factory.mktemp("collection") / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    for i, photo in enumerate(sorted(photo_dir.iterdir())):
        folder = [root, root / "sub", root / "sub" / "deeper"][i % 3]
        shutil.copy(photo, folder / photo.name)
    return root


@pytest.fixture(scope="module")
def index(collection: Path, model: clipforge.CLIP) -> SearchIndex:
    out = collection.parent / "index"
    build_index(collection, out, model)
    return SearchIndex.open(out, model)


@pytest.fixture(scope="module")
def client(index: SearchIndex) -> TestClient:
    with TestClient(create_app(index), base_url=LOOPBACK) as c:
        yield c


def relative_names(collection: Path) -> set[str]:
    return {p.relative_to(collection).as_posix() for p in collection.rglob("*") if p.is_file()}


def check_relative(path: str, collection: Path, index: SearchIndex, item_id: int) -> None:
    assert not path.startswith("/") and not os.path.isabs(path), path
    assert str(collection.parent) not in path, path
    assert path == Path(index.item(item_id).path).relative_to(collection).as_posix()


def test_search_items_and_similar_show_paths_relative_to_the_collection(
        client: TestClient, index: SearchIndex, collection: Path) -> None:
    search = client.get("/api/search", params={"q": "a photo", "k": 100})
    assert search.status_code == 200
    results = search.json()["results"]
    assert {r["path"] for r in results} == relative_names(collection)
    assert any(r["path"].startswith("sub/deeper/") for r in results)  # nested, kept nested
    bodies = [search.text]
    for r in results:
        check_relative(r["path"], collection, index, r["id"])
        item = client.get(f"/api/items/{r['id']}")
        assert item.status_code == 200 and item.json()["path"] == r["path"]
        similar = client.get(f"/api/items/{r['id']}/similar", params={"k": 100})
        assert similar.status_code == 200
        for s in similar.json()["results"]:
            check_relative(s["path"], collection, index, s["id"])
        bodies += [item.text, similar.text]
    photo = next(collection.rglob("*.jpg")).read_bytes()
    image = client.post("/api/search/image", files={"file": ("q.jpg", photo)})
    assert image.status_code == 200
    bodies.append(image.text)
    for body in bodies:
        assert str(collection.parent) not in body


def test_errors_name_no_absolute_path(collection: Path, model: clipforge.CLIP,
                                      tmp_path: Path) -> None:
    out = tmp_path / "doomed"
    build_index(collection, out, model)
    with TestClient(create_app(SearchIndex.open(out, model)), base_url=LOOPBACK) as c:
        item_id = c.get("/api/search", params={"q": "a cat"}).json()["results"][0]["id"]
        shutil.rmtree(out)
        for url in ["/healthz", "/api/search?q=a+cat", f"/api/items/{item_id}",
                    f"/api/items/{item_id}/similar", f"/thumbnails/{item_id}"]:
            response = c.get(url)
            assert response.status_code == 503, url
            assert "doomed/index.sqlite" in response.json()["detail"], url
            assert str(tmp_path) not in response.text, url


def test_an_index_without_a_recorded_source_falls_back_to_the_common_folder(
        collection: Path, model: clipforge.CLIP, tmp_path: Path) -> None:
    """Indexes built before the source was recorded: the items' common folder is the root."""
    import sqlite3

    out = tmp_path / "old"
    build_index(collection, out, model)
    with sqlite3.connect(out / "index.sqlite") as con:
        con.execute("DELETE FROM info WHERE key = 'source'")
    index = SearchIndex.open(out, model)
    assert index.collection_root() == str(collection.resolve())
    with TestClient(create_app(index), base_url=LOOPBACK) as c:
        results = c.get("/api/search", params={"q": "a cat", "k": 100}).json()["results"]
    assert {r["path"] for r in results} == relative_names(collection)


def test_collection_root() -> None:
    items = ["/data/photos/a.jpg", "/data/photos/sub/b.jpg"]
    assert collection_root("/data/photos", items) == "/data/photos"
    assert collection_root("/data/photos/list.csv", items) == "/data/photos"
    assert collection_root("/data/photos/shard-{0..3}.tar", ["/data/photos/shard-0.tar"]
                           ) == "/data/photos"
    # A table listing files outside its folder, or no source recorded: their common folder.
    assert collection_root("/data/photos/sub/list.csv", items) == "/data/photos"
    assert collection_root(None, items) == "/data/photos"
    assert collection_root(None, ["/data/photos/sub/b.jpg"]) == "/data/photos/sub"
    assert collection_root(None, []) is None


def test_display_path() -> None:
    assert display_path("/data/photos/sub/b.jpg", "/data/photos") == "sub/b.jpg"
    assert display_path("/data/photos/shard-0.tar#x/1.jpg", "/data/photos") == \
        "shard-0.tar#x/1.jpg"
    assert display_path("/elsewhere/c.jpg", "/data/photos") == "c.jpg"  # outside: the name
    assert display_path("/data/photos2/c.jpg", "/data/photos") == "c.jpg"
    assert display_path("/data/photos/..c.jpg", "/data/photos") == "..c.jpg"
    assert display_path("/data/photos/c.jpg", None) == "c.jpg"

"""Milvus as an index's vector store (``index build --vector-store``): the same results as the
embedded faiss index, incremental builds mirrored into the collection, a killed build's rows
never seen, and errors that say what to do.  Run against Milvus Lite (embedded, in this process);
skipped when it cannot start here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import clipforge
from clipforge.search import SearchIndex, build_index, milvus
from clipforge.search import build as build_module
from clipforge.search.index import IndexUnavailableError
from clipforge.search.milvus import MilvusBackend, MilvusError, connect, parse_backend
from clipforge.search.server import create_app
from clipforge.search.store import Store

QUERIES = ("a cat", "a red square", "a rocket launch", "coffee", "a person")


@pytest.fixture(scope="module")
def lite(tmp_path_factory) -> Path:
    """A folder for Milvus Lite databases, once one has started here."""
    pytest.importorskip("pymilvus", reason="pip install 'clipforge[milvus]'")
    pytest.importorskip("milvus_lite", reason="pip install 'clipforge[milvus]'")
    folder = tmp_path_factory.mktemp("milvus")
    try:
        connect(MilvusBackend(str(folder / "probe.db"), "probe")).list_collections()
    except Exception as exc:  # noqa: BLE001 - any reason it cannot start is a reason to skip
        pytest.skip(f"Milvus Lite cannot start on this machine: {exc}")
    return folder


def _build(source: Path, out: Path, model, **kw):
    return build_index(source, out, model, batch_size=8, progress=False, **kw)


def _lite(lite: Path, name: str) -> str:
    return f"milvus-lite:{lite / name}.db/photos"


def _same_hits(got, want, by: str = "id") -> None:
    """The same items (by id, or by path across two indexes), in order, with the same scores
    to float32 round-off."""
    assert [getattr(h, by) for h in got] == [getattr(h, by) for h in want]
    np.testing.assert_allclose([h.score for h in got], [h.score for h in want], rtol=0,
                               atol=2e-6)


def _collection_ids(backend: str, generation: int) -> list[int]:
    b = parse_backend(backend)
    rows = connect(b).query(b.collection, filter=f"generation <= {generation}",
                            output_fields=["id"])
    return sorted(r["id"] for r in rows)


def test_backend_uris() -> None:
    assert parse_backend("embedded") is None
    b = parse_backend("milvus://db.example:19531/photos")
    assert (b.uri, b.collection, b.text, b.lite) == (
        "http://db.example:19531", "photos", "milvus://db.example:19531/photos", False)
    b = parse_backend("milvus+https://db.example/photos")
    assert (b.uri, b.text) == ("https://db.example:19530", "milvus+https://db.example:19530/photos")
    b = parse_backend("milvus-lite:some/dir/x.db/c_1")
    assert b.lite and b.uri == str(Path("some/dir/x.db").absolute()) and b.collection == "c_1"
    assert parse_backend(b.text) == b  # what the index records reads back the same
    with pytest.raises(ValueError, match="no user or password.*MILVUS_TOKEN") as err:
        parse_backend("milvus://root:s3cret@db.example/photos")
    assert "s3cret" not in str(err.value)
    for bad, message in (("milvus://db.example/1photos", "collection name '1photos'"),
                         ("milvus://db.example:port/photos", "HOST\\[:PORT\\]"),
                         ("milvus-lite:x.sqlite/photos", "ending in .db"),
                         ("faiss://x/y", "is not one of")):
        with pytest.raises(ValueError, match=message):
            parse_backend(bad)


def test_milvus_gives_the_embedded_results(lite, folder, tmp_path, model) -> None:
    embedded = tmp_path / "embedded"
    in_milvus = tmp_path / "milvus"
    _build(folder, embedded, model)
    report = _build(folder, in_milvus, model, vector_store=_lite(lite, "same"))
    assert (report.storage, report.total) == ("milvus", 28)
    info = Store(in_milvus).info()
    assert (info["storage"], info["vector_store"]) == ("milvus", _lite(lite, "same"))
    exact, index = SearchIndex.open(embedded, model), SearchIndex.open(in_milvus, model)
    assert (index.info["storage"], index.info["searching"], len(index)) == ("milvus", "milvus", 28)
    for text in QUERIES:
        _same_hits(index.search(text=text, k=10), exact.search(text=text, k=10))
        _same_hits(index.search(text=text, k=40, threshold=0.0),
                   exact.search(text=text, k=40, threshold=0.0))
        _same_hits(index.search(text=text, k=5, collapse=0.9),
                   exact.search(text=text, k=5, collapse=0.9))
    first = exact.search(text="a cat", k=1)[0].id
    _same_hits(index.similar(first, k=6), exact.similar(first, k=6))
    assert first not in [h.id for h in index.similar(first, k=6)]
    np.testing.assert_array_equal(index.embeddings([first, 3]), exact.embeddings([first, 3]))
    with pytest.raises(KeyError, match="no item 9999"):
        index.similar(9999)

    # The server over it answers as over the embedded index.
    answers = []
    for opened in (index, exact):
        with TestClient(create_app(opened), base_url="http://127.0.0.1") as client:
            reply = client.get("/api/search", params={"q": "a cat", "k": 8})
            assert reply.status_code == 200
            answers.append([(r["id"], r["score"]) for r in reply.json()["results"]])
    assert [i for i, _ in answers[0]] == [i for i, _ in answers[1]]
    np.testing.assert_allclose([s for _, s in answers[0]], [s for _, s in answers[1]],
                               atol=2e-6)


def test_incremental_builds_keep_the_collection_in_step(lite, folder, tmp_path, model,
                                                        monkeypatch) -> None:
    out, backend = tmp_path / "index", _lite(lite, "steps")
    first = _build(folder, out, model, vector_store=backend)
    reader = SearchIndex.open(out, model)
    (folder / "c00.png").unlink()
    (folder / "c01.png").unlink()
    Image.new("RGB", (40, 40), "white").save(folder / "white.png")
    Image.new("RGB", (40, 40), (10, 200, 30)).save(folder / "c02.png")  # changed: a new id
    second = _build(folder, out, model)  # the recorded backend is kept
    assert (second.added, second.removed, second.total) == (2, 3, 27)
    assert (second.storage, second.generation) == ("milvus", first.generation + 1)
    ids = Store(out).ids().tolist()
    assert _collection_ids(backend, second.generation) == ids
    assert reader.refresh() and len(reader) == 27
    exact = tmp_path / "exact"
    _build(folder, exact, model)
    for text in QUERIES:
        _same_hits(reader.search(text=text, k=27),
                   SearchIndex.open(exact, model).search(text=text, k=27), by="path")

    # A build killed after its rows reached Milvus, before its commit: readers of the committed
    # generation never see them, and the next build deletes them before inserting its own.
    Image.new("RGB", (40, 40), "black").save(folder / "black.png")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    real = build_module.prepare_milvus
    monkeypatch.setattr(build_module, "prepare_milvus",
                        lambda *a, **kw: (real(*a, **kw), killed())[0])
    with pytest.raises(KeyboardInterrupt):
        _build(folder, out, model)
    monkeypatch.undo()
    b = parse_backend(backend)
    assert connect(b).query(b.collection, filter=f"generation > {second.generation}",
                            output_fields=["id"])  # the killed build's row is there...
    assert not reader.refresh() and len(reader.search(text="black", k=100)) == 27  # ...unseen
    third = _build(folder, out, model)
    assert (third.generation, third.total) == (second.generation + 1, 28)
    assert _collection_ids(backend, third.generation) == Store(out).ids().tolist()

    # Back to the embedded store: the folder holds everything it needs.
    back = _build(folder, out, model, vector_store="embedded")
    assert back.storage == "memory" and Store(out).info()["vector_store"] == ""
    assert reader.refresh() and reader.info["storage"] == "memory" and len(reader) == 28


def test_errors_name_the_backend_and_what_to_do(lite, folder, tmp_path, model,
                                                monkeypatch) -> None:
    out, backend = tmp_path / "index", _lite(lite, "errors")
    _build(folder, out, model, vector_store=backend)
    b = parse_backend(backend)
    connect(b).drop_collection(b.collection)
    with pytest.raises(IndexUnavailableError, match=r"no collection 'photos'.*index build"):
        SearchIndex.open(out, model)

    # A collection of other vectors is refused, not filled.
    wrong = MilvusBackend(b.uri, "wrong_dim")
    connect(wrong).create_collection("wrong_dim", schema=milvus._schema(connect(wrong), 7),
                                     index_params=milvus._index_params(connect(wrong), "flat",
                                                                       {}))
    with pytest.raises(MilvusError, match=r"holds 7-d vectors but the index's model makes"):
        _build(folder, tmp_path / "other", model, vector_store=wrong.text)
    with pytest.raises(ValueError, match="--ann ivfpq has no Milvus peer.*flat or hnsw"):
        _build(folder, tmp_path / "ivf", model, vector_store=backend, ann="ivfpq")

    monkeypatch.setenv("MILVUS_TOKEN", "root:s3cret")
    with pytest.raises(MilvusError, match=r"milvus://127\.0\.0\.1:1/photos cannot be reached"
                       r".*MILVUS_TOKEN") as err:
        _build(folder, tmp_path / "far", model, vector_store="milvus://127.0.0.1:1/photos")
    assert "s3cret" not in str(err.value)

    monkeypatch.setitem(sys.modules, "pymilvus", None)  # as if not installed
    monkeypatch.setattr(milvus, "_clients", {})
    with pytest.raises(ImportError, match=r"clipforge\[milvus\]"):
        _build(folder, tmp_path / "none", model, vector_store=backend)


def test_hnsw_in_milvus_and_the_command_line(lite, folder, tmp_path, model, capsys) -> None:
    from clipforge.cli import main

    out, model_file = tmp_path / "index", tmp_path / "tiny.safetensors"
    clipforge.save_model(model, model_file)
    backend = _lite(lite, "cli")
    build = ["index", "build", str(folder), "--out", str(out), "--model", str(model_file),
             "--workers", "0", "--no-progress", "--vector-store", backend, "--ann", "hnsw"]
    assert main(build) == 0
    assert "vectors in Milvus" in capsys.readouterr().out
    b = parse_backend(backend)
    assert connect(b).describe_index(b.collection, "vector")["index_type"] == "HNSW"
    assert main(["search", str(out), "a cat", "-k", "5", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["results"]
    exact = SearchIndex.open(_embedded(folder, tmp_path, model), model)
    want = exact.search(text="a cat", k=5)
    assert [r["id"] for r in got] == [h.id for h in want]  # 28 rows: HNSW finds them all
    with pytest.raises(SystemExit):
        main([*build[:-4], "--vector-store", "milvus://root:pw@host/photos"])
    assert "no user or password" in capsys.readouterr().err


def _embedded(folder: Path, tmp_path: Path, model) -> Path:
    out = tmp_path / "embedded"
    _build(folder, out, model)
    return out

"""Semantic search: building (incremental, resumable, crash-safe), querying, model checks."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipforge
from clipforge.inference import embed_images, embed_texts
from clipforge.search import IndexMismatchError, SearchIndex, build_index, read_report
from clipforge.search.store import Store, staging_files
from conftest import perturb, saved_tiny_vit


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A tiny model saved to a file, so that an index can load it again by its recorded path."""
    return saved_tiny_vit(tmp_path_factory.mktemp("model"), seed=3)


@pytest.fixture(scope="module")
def model(model_file) -> clipforge.CLIP:
    return clipforge.create_model(model_file)


@pytest.fixture
def folder(tmp_path, photos) -> Path:
    """The eight sample photos, one in a subfolder with a caption, and one corrupt file."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for path in photos:
        target = root / ("sub" if path.stem == "chelsea" else "") / path.name
        shutil.copy(path, target)
    (root / "sub" / "chelsea.txt").write_text("my cat on the sofa\n")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return root


def _build(source, out, model, **kw):
    return build_index(source, out, model, batch_size=3, progress=False, **kw)


def test_build_and_search_match_brute_force(folder, tmp_path, model) -> None:
    out = tmp_path / "index"
    report = _build(folder, out, model)
    assert (report.scanned, report.total, report.embedded) == (9, 8, 9)
    assert [k for k, _ in report.failures] == [str((folder / "broken.jpg").resolve())]
    assert "unreadable image" in report.failures[0][1]
    assert read_report(out)["total"] == 8

    index = SearchIndex.open(out)  # loads the model recorded in the index
    assert len(index) == 8 and index.info["count"] == 8
    # Independently: embed the files with the batch embedder and rank by numpy.
    files = sorted(p for p in folder.rglob("*") if p.suffix != ".txt" and p.name != "broken.jpg")
    reference = embed_images(model, files, progress=False)
    query = "a photo of a cat"
    text = embed_texts(model, [query], progress=False).vectors[0]
    scores = reference.vectors.astype(np.float16).astype(np.float32) @ text
    order = np.argsort(-scores)
    hits = index.search(text=query, k=5)
    assert [h.path for h in hits] == [str(Path(reference.ids[i]).resolve()) for i in order[:5]]
    np.testing.assert_allclose([h.score for h in hits], scores[order[:5]], atol=1e-5)
    cat = next(h for h in index.search(text=query, k=8) if h.path.endswith("chelsea.png"))
    assert cat.caption == "my cat on the sofa" and (cat.width, cat.height) == (451, 300)


def test_image_query_finds_itself_and_similar_excludes_it(folder, tmp_path, model) -> None:
    out = tmp_path / "index"
    _build(folder, out, model)
    index = SearchIndex.open(out, model)
    rocket = folder / "rocket.jpg"
    hits = index.search(image=Image.open(rocket), k=3)
    assert hits[0].path == str(rocket.resolve()) and hits[0].score > 0.999
    similar = index.similar(hits[0].id, k=20)
    assert hits[0].id not in [h.id for h in similar] and len(similar) == 7
    assert index.item(hits[0].id).path == hits[0].path
    assert index.item(10**9) is None
    with pytest.raises(KeyError, match="no item"):
        index.similar(10**9)
    # Mixed: with the text weighted zero, the image decides alone.
    mixed = index.search(text="a cat", image=Image.open(rocket), text_weight=0.0, k=3)
    assert [h.id for h in mixed] == [h.id for h in hits]
    assert index.open_image(hits[0].id).size == Image.open(rocket).size


def test_threshold_collapse_and_bad_arguments(folder, tmp_path, model) -> None:
    shutil.copy(folder / "coffee.png", folder / "coffee-copy.png")
    out = tmp_path / "index"
    _build(folder, out, model)
    index = SearchIndex.open(out, model)
    coffee = Image.open(folder / "coffee.png")
    both = index.search(image=coffee, k=2)
    assert {Path(h.path).name for h in both} == {"coffee.png", "coffee-copy.png"}
    collapsed = index.search(image=coffee, k=2, collapse=0.99)
    assert Path(collapsed[0].path).name.startswith("coffee")
    assert not Path(collapsed[1].path).name.startswith("coffee")
    assert all(h.score >= 0.9 for h in index.search(image=coffee, k=9, threshold=0.9))
    for kwargs, message in [({"text": "a cat", "k": 0}, "k must be"),
                            ({"text": "a cat", "threshold": 2.0}, "threshold"),
                            ({"text": "a cat", "collapse": 0.0}, "collapse"),
                            ({"text": " "}, "empty"), ({}, "give a text query")]:
        with pytest.raises(ValueError, match=message):
            index.search(**kwargs)
    with pytest.raises(clipforge.ContextLengthError):
        index.search(text="word " * 100)


def test_incremental_update_embeds_only_changes(folder, tmp_path, model) -> None:
    out = tmp_path / "index"
    first = _build(folder, out, model)
    ids = {h.path: h.id for h in SearchIndex.open(out, model).search(text="x", k=20)}
    again = _build(folder, out, model)
    assert (again.embedded, again.added, again.removed, again.unchanged) == (0, 0, 0, 9)
    assert again.generation == first.generation  # nothing changed: nothing committed

    os.remove(folder / "horse.png")
    shutil.copy(folder / "coffee.png", folder / "new.png")
    Image.new("RGB", (40, 30), "red").save(folder / "rocket.jpg")  # changed content
    third = _build(folder, out, model)
    assert (third.embedded, third.added, third.removed, third.total) == (2, 2, 2, 8)
    assert third.generation == first.generation + 1
    index = SearchIndex.open(out, model)
    now = {h.path: h.id for h in index.search(text="x", k=20)}
    rocket = str((folder / "rocket.jpg").resolve())
    assert now[rocket] != ids[rocket]  # a changed file is a new item
    assert str((folder / "horse.png").resolve()) not in now
    assert index.search(image=Image.new("RGB", (40, 30), "red"), k=1)[0].path == rocket
    # A fixed broken file is picked up; an unchanged broken one is not read again.
    Image.new("RGB", (20, 20), "blue").save(folder / "broken.jpg", "JPEG")
    fourth = _build(folder, out, model)
    assert (fourth.embedded, fourth.total, fourth.failures) == (1, 9, [])


def test_interrupted_build_resumes_and_never_shows_half(folder, tmp_path, model) -> None:
    out = tmp_path / "index"
    small = tmp_path / "small"
    small.mkdir()
    for name in ("coffee.png", "horse.png"):
        shutil.copy(folder / name, small / name)
    _build(small, out, model)  # an existing index of 2 items
    before = SearchIndex.open(out, model)

    def crash(batch: int) -> None:
        if batch == 2:
            raise KeyboardInterrupt  # as if killed after two durable batches
    with pytest.raises(KeyboardInterrupt):
        _build(folder, out, model, on_batch=crash)
    assert staging_files(out)
    assert not before.refresh() and len(before) == 2  # still the old state
    resumed = _build(folder, out, model)
    assert (resumed.resumed, resumed.embedded) == (6, 3)  # two durable batches of 3 kept
    assert (resumed.removed, resumed.total) == (2, 8)
    assert not staging_files(out)
    assert before.refresh() and len(before) == 8
    # The same state as one uninterrupted build.
    clean = tmp_path / "clean"
    _build(folder, clean, model)
    a, b = SearchIndex.open(out, model), SearchIndex.open(clean, model)
    q = a.query_vector(text="a red motorcycle")
    assert [(h.path, round(h.score, 5)) for h in a.search_vector(q, 8)] == \
        [(h.path, round(h.score, 5)) for h in b.search_vector(q, 8)]


def test_killed_build_process_leaves_old_state(folder, tmp_path, model_file) -> None:
    """A real SIGKILL in the middle of a build: the index stays readable and complete."""
    out = tmp_path / "index"
    model = clipforge.create_model(model_file)
    small = tmp_path / "small"
    small.mkdir()
    shutil.copy(folder / "coffee.png", small / "coffee.png")
    _build(small, out, model)
    many = tmp_path / "many"
    many.mkdir()
    for i in range(200):
        Image.new("RGB", (64, 64), (i, 255 - i, 0)).save(many / f"{i:03d}.png")
    code = ("import sys, clipforge; from clipforge.search import build_index\n"
            f"m = clipforge.create_model({str(model_file)!r})\n"
            f"build_index({str(many)!r}, {str(out)!r}, m, batch_size=4, progress=False,\n"
            "            on_batch=lambda n: n == 5 and print('ready', flush=True))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.kill()
    proc.wait()
    index = SearchIndex.open(out, model)
    assert len(index) == 1 and index.search(text="coffee", k=5)[0].path.endswith("coffee.png")
    report = _build(many, out, model)
    assert report.resumed >= 20 and report.total == 200 and report.removed == 1


def test_model_mismatch_is_refused(folder, tmp_path, model) -> None:
    out = tmp_path / "index"
    _build(folder, out, model)
    other = perturb(clipforge.create_model("tiny-vit"), seed=9)
    with pytest.raises(IndexMismatchError, match="was built with .*tiny.safetensors"):
        SearchIndex.open(out, other)
    with pytest.raises(IndexMismatchError, match="fingerprint"):
        _build(folder, out, other)
    random_out = tmp_path / "random"
    _build(folder, random_out, clipforge.create_model("tiny-vit"))
    with pytest.raises(IndexMismatchError, match="randomly initialised"):
        SearchIndex.open(random_out)


def test_csv_with_metadata_and_missing_files(folder, tmp_path, model) -> None:
    table = tmp_path / "photos.csv"
    table.write_text("filepath,title,photographer\n"
                     f"{folder / 'coffee.png'},a cup of coffee,Ann\n"
                     "photos/horse.png,a horse,Bob\n"
                     "photos/gone.png,nothing,Cy\n", encoding="utf-8")
    report = _build(table, tmp_path / "index", model)
    assert report.total == 2
    assert [Path(k).name for k, _ in report.failures] == ["gone.png"]
    assert "missing image" in report.failures[0][1]
    index = SearchIndex.open(tmp_path / "index", model)
    hit = index.search(image=Image.open(folder / "horse.png"), k=1)[0]
    assert (hit.caption, hit.extra) == ("a horse", {"photographer": "Bob"})


def test_webdataset_shards(folder, tmp_path, model) -> None:
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for name in ("coffee", "rocket"):
            source = next(folder.glob(f"{name}.*"))
            image = io.BytesIO()
            Image.open(source).convert("RGB").save(image, "JPEG")
            for suffix, payload in ((".jpg", image.getvalue()), (".txt", name.encode())):
                info = tarfile.TarInfo(f"{name}{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    report = _build(str(shard), tmp_path / "index", model)
    assert report.total == 2
    index = SearchIndex.open(tmp_path / "index", model)
    hit = index.search(image=Image.open(folder / "rocket.jpg"), k=1)[0]
    assert hit.path == f"{shard.resolve()}#rocket.jpg" and hit.caption == "rocket"
    assert index.open_image(hit.id).size == Image.open(folder / "rocket.jpg").size


def test_ann_index_and_concurrent_readers(folder, tmp_path, model) -> None:
    out = tmp_path / "index"
    for i in range(40):
        Image.new("RGB", (48, 48), (6 * i, 100, 255 - 6 * i)).save(folder / f"c{i:02d}.png")
    report = _build(folder, out, model, ann="hnsw")  # (IVF-PQ needs ~10k rows to train)
    assert report.ann == "hnsw" and (out / f"ann-{report.generation}.faiss").is_file()
    index = SearchIndex.open(out, model)
    assert index.info["searching"] == "hnsw"
    exact = SearchIndex.open(out, model)
    flat = exact._state.vectors.__class__.build(exact._state.vectors.vectors,
                                                exact._state.vectors.ids, "flat")
    q = index.query_vector(text="a blue square")
    scores, ids = flat.search(q[None], 5)
    assert [h.id for h in index.search_vector(q, 5)][:1] == ids[0][:1].tolist()

    # Readers during a build see 48 or 58 items, never anything in between.
    for i in range(10):
        Image.new("RGB", (48, 48), (0, 25 * i, 0)).save(folder / f"g{i}.png")
    seen, stop = set(), threading.Event()

    def reader() -> None:
        while not stop.is_set():
            index.refresh()
            seen.add(len(index.search(text="green", k=100)))
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        _build(folder, out, model)
    finally:
        stop.set()
        thread.join()
    index.refresh()
    assert seen <= {48, 58} and len(index) == 58
    assert json.loads((out / "report.json").read_text())["ann"] == "hnsw"
    assert sorted(p.name for p in out.glob("ann-*.faiss")) == [f"ann-{report.generation + 1}.faiss"]


def test_command_line(folder, tmp_path, model_file, capsys) -> None:
    from clipforge.cli import main

    out = tmp_path / "index"
    assert main(["index", "build", str(folder), "--out", str(out), "--model", str(model_file),
                 "--workers", "0", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert f"{out}: 8 items" in captured.out and "broken.jpg" in captured.err
    sheet = tmp_path / "sheet.html"
    # No --model: the index loads the model that built it.
    assert main(["search", str(out), "a cat", "-k", "3", "--json", "--html", str(sheet)]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert len(results) == 3 and {"id", "path", "score"} <= set(results[0])
    page = sheet.read_text()
    assert page.count("<figure>") == 3 and "data:image/jpeg;base64," in page
    assert main(["search", str(out), "--image", str(folder / "rocket.jpg"), "-k", "1"]) == 0
    assert capsys.readouterr().out.strip().endswith("rocket.jpg")
    assert main(["index", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["count"], info["failures"], info["model"]) == ("8", "1", str(model_file))

    assert main(["search", str(out), "a cat", "--model", "tiny-vit"]) == 2
    assert "was built with" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "nowhere"), "a cat"]) == 2
    assert "no clipforge index" in capsys.readouterr().err
    assert main(["search", str(out), "a cat", "-k", "0"]) == 2
    assert "k must be" in capsys.readouterr().err


def test_two_processes_build_the_same_index(folder, tmp_path, model_file) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(port), "-m", "clipforge", "index", "build", str(folder),
         "--out", str(tmp_path / "two"), "--model", str(model_file), "--workers", "0",
         "--batch-size", "2", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("8 items") == 1  # rank 0 reports
    model = clipforge.create_model(model_file)
    _build(folder, tmp_path / "one", model)
    a, b = SearchIndex.open(tmp_path / "two", model), SearchIndex.open(tmp_path / "one", model)
    assert read_report(tmp_path / "two")["failures"] == read_report(tmp_path / "one")["failures"]
    for text in ("a cat", "a rocket", "text on a page"):
        q = a.query_vector(text=text)
        assert [(h.path, round(h.score, 4)) for h in a.search_vector(q, 8)] == \
            [(h.path, round(h.score, 4)) for h in b.search_vector(q, 8)]


def test_fast_decode_keeps_sizes_and_embeddings(tmp_path, photos, model) -> None:
    from clipforge.data.sources import open_image_file

    folder = tmp_path / "big"
    folder.mkdir()
    for path in photos[:3]:
        image = Image.open(path).convert("RGB")
        image.resize((image.width * 6, image.height * 6), Image.Resampling.BICUBIC).save(
            folder / f"{path.stem}.jpg", quality=90)
    big = sorted(folder.iterdir())
    assert open_image_file(big[0], draft=model.config.image_size).size[0] < \
        Image.open(big[0]).size[0] // 4  # really decoded at a reduced scale
    exact = embed_images(model, big, progress=False)
    fast = embed_images(model, big, progress=False, fast_decode=True)
    cosine = (exact.vectors * fast.vectors).sum(axis=1)
    assert cosine.min() > 0.9999 and not np.array_equal(exact.vectors, fast.vectors)
    _build(folder, tmp_path / "index", model, fast_decode=True)
    hits = SearchIndex.open(tmp_path / "index", model).search(text="x", k=3)
    assert {(Path(h.path).name, h.width, h.height) for h in hits} == \
        {(p.name, *Image.open(p).size) for p in big}  # the stored size, not the draft's


def test_fast_decode_leaves_small_images_exact(tmp_path, photos, model) -> None:
    """Draft mode only where the decoder really scales down: a JPEG under twice the model's
    input size, and any other format, decode exactly as without it."""
    size = model.config.image_size
    small = tmp_path / "small.jpg"
    Image.open(photos[0]).convert("RGB").resize((3 * size, 2 * size - 1)).save(small)
    files = [small, *(p for p in photos if p.suffix == ".png")]
    exact = embed_images(model, files, progress=False)
    fast = embed_images(model, files, progress=False, fast_decode=True)
    np.testing.assert_array_equal(fast.vectors, exact.vectors)


# --------------------------------------------------------------------------- hostile files


def test_names_that_are_not_utf8_are_indexed_exactly(tmp_path, photos, model) -> None:
    """A file name in Latin-1 (b"caf\\xe9.png") used to fail the build after embedding
    everything, writing nothing, and the same on every rerun."""
    root = tmp_path / "odd"
    root.mkdir()
    for path in photos[:2]:
        shutil.copy(path, root / path.name)
    odd = os.fsencode(root.resolve()) + b"/caf\xe9.png"
    shutil.copy(photos[2], odd)
    Image.new("L", (1, 400_000)).save(root / "strip.png")  # and an extreme aspect ratio
    out = tmp_path / "index"
    report = _build(root, out, model)
    assert (report.scanned, report.total, report.added) == (4, 3, 3)
    strip = str((root / "strip.png").resolve())
    assert [k for k, _ in report.failures] == [strip]
    assert "1x400000" in report.failures[0][1] and "CLIPFORGE_MAX_ASPECT_RATIO" in \
        report.failures[0][1]
    assert read_report(out)["failures"][0]["item"] == strip  # report.json is valid UTF-8
    index = SearchIndex.open(out)
    hits = index.search(text="a photo", k=3)
    name = os.fsdecode(odd)
    hit = next(h for h in hits if h.path == name)
    assert os.fsencode(hit.path) == odd  # the exact bytes
    assert index.open_image(hit.id).size == Image.open(photos[2]).size
    again = _build(root, out, model)  # incremental: nothing is read again
    assert (again.embedded, again.unchanged, again.added, again.total) == (0, 4, 0, 3)
    (root / "strip.png").unlink()
    os.unlink(odd)  # and a removed odd name leaves the index
    after = _build(root, out, model)
    assert (after.removed, after.total, after.failures) == (1, 2, [])


def test_an_odd_index_folder_name_is_kept(tmp_path, photos, model) -> None:
    source = Path(os.fsdecode(os.fsencode(tmp_path) + b"/fotos-\xe9t\xe9"))
    source.mkdir()
    shutil.copy(photos[0], source / photos[0].name)
    report = _build(source, tmp_path / "index", model)
    assert report.total == 1
    store = Store(tmp_path / "index")
    assert store.info()["source"] == str(source)
    store.close()
    assert json.loads((tmp_path / "index" / "report.json").read_bytes().decode("utf-8")
                      )["source"] == str(source)


def test_table_listing_a_fifo_is_built_without_waiting(tmp_path, photos, model_file) -> None:
    os.mkfifo(tmp_path / "x.jpg")
    shutil.copy(photos[0], tmp_path / "a.png")
    (tmp_path / "table.csv").write_text("filepath,title\nx.jpg,a pipe\na.png,a photo\n")
    out = tmp_path / "index"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "clipforge", "index", "build", str(tmp_path / "table.csv"),
             "--out", str(out), "--model", str(model_file), "--no-progress"],
            capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("index build blocked on a FIFO")
    assert done.returncode == 0, done.stderr
    [(item, reason)] = [(f["item"], f["reason"]) for f in read_report(out)["failures"]]
    assert item == str((tmp_path / "x.jpg").resolve()) and "not a regular file" in reason
    assert read_report(out)["total"] == 1


def test_table_with_an_overlong_field_names_the_line(tmp_path, photos, model) -> None:
    shutil.copy(photos[0], tmp_path / "a.png")
    (tmp_path / "t.csv").write_text(f"filepath,title,notes\na.png,x,\"{'n' * (2 << 20)}\"\n")
    with pytest.raises(ValueError) as info:
        _build(tmp_path / "t.csv", tmp_path / "index", model)
    assert str(info.value).startswith(f"{tmp_path / 't.csv'}, line 2: a field is longer than")
    (tmp_path / "t.csv").write_text(f"filepath,title,notes\na.png,x,\"{'n' * 200_000}\"\n")
    assert _build(tmp_path / "t.csv", tmp_path / "index", model).total == 1

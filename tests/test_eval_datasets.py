"""Evaluation sets: ImageFolder trees, CSV/TSV, captioned folders, webdataset shards and
CLIP_benchmark's webdataset export, and their embedding with unreadable items skipped.

Everything is written into ``tmp_path``: the scikit-image photos, small generated PNG/JPEG/WEBP
images, corrupt ones (a text file named ``.png``, a truncated JPEG, garbage ``.webp`` bytes),
and CLIP_benchmark exports written as its ``convert_dataset``/``convert_retrieval_dataset``
write them (``webdataset.ShardWriter`` with ``%d.tar``, keys ``s0000000``, lossless ``webp``
bytes, ``cls`` as an int, ``nshards.txt``, ``classnames.txt``, templates with ``{c}``).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.data.sources import CsvCaptions, DataError, read_table
from clipforge.evaluation.datasets import (
    ClassificationData,
    RetrievalData,
    embed_classification,
    embed_retrieval,
    is_clip_benchmark_dir,
    load_classification,
    load_retrieval,
)
from clipforge.image import load_image

wds = pytest.importorskip("webdataset")


def _image(seed: int, size: tuple[int, int] = (40, 30)) -> Image.Image:
    w, h = size
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _save(path: Path, seed: int, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _image(seed).save(path, fmt)
    return path


def _webp(image: Image.Image) -> bytes:
    """clip_benchmark.webdataset_builder.PIL_to_bytes("webp")."""
    buf = io.BytesIO()
    image.save(buf, format="webp", lossless=True)
    return buf.getvalue()


def _corrupt_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG not really an image")
    return path


def _truncated_jpeg(path: Path) -> Path:
    buf = io.BytesIO()
    _image(99, (64, 64)).save(buf, "JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def _expected(model: clipforge.CLIP, images: list[Image.Image]) -> np.ndarray:
    """The hand computation: preprocess each image, encode, normalise."""
    with torch.no_grad():
        pixels = torch.stack([model.preprocess(image) for image in images])
        return model.encode_image(pixels, normalize=True).numpy()


def _expected_texts(model: clipforge.CLIP, texts: list[str]) -> np.ndarray:
    with torch.no_grad():
        tokens = clipforge.tokenize(texts, truncate=True)
        return model.encode_text(tokens, normalize=True).numpy()


def _write_cb(root: Path, samples: list[tuple[bytes, object]], *, split: str = "test",
              classes: list[str] | None = None, templates: list[str] | None = None,
              retrieval: bool = False, max_count: int = 10_000) -> Path:
    """What clip_benchmark's convert_dataset / convert_retrieval_dataset write."""
    os.makedirs(root / split, exist_ok=True)
    if classes:
        with open(root / "classnames.txt", "w") as f:
            print(*classes, sep="\n", end="\n", file=f)
    if templates:
        with open(root / "zeroshot_classification_templates.txt", "w") as f:
            print(*templates, sep="\n", end="\n", file=f)
    if retrieval:
        with open(root / "dataset_type.txt", "w") as f:
            print("retrieval", end="\n", file=f)
    sink = wds.ShardWriter(str(root / split / "%d.tar"), maxcount=max_count, verbose=0)
    for index, (image, output) in enumerate(samples):
        sample = {"__key__": f"s{index:07d}", "webp": image}  # its "s%07d" % index
        if retrieval:
            sample["txt"] = "\n".join(c.replace("\n", r"\n") for c in output)
        else:
            sample["cls"] = output
        sink.write(sample)
    shards = sink.shard
    sink.close()
    with open(root / split / "nshards.txt", "w") as f:
        print(shards, end="\n", file=f)
    return root


# --------------------------------------------------------------------------- ImageFolder


def test_image_folder_follows_torchvision(tmp_path, photos, tiny_vit):
    root = tmp_path / "folder"
    _save(root / "dog" / "b.png", 1)
    _save(root / "dog" / "sub" / "a.jpg", 2, "JPEG")
    _save(root / "dog" / "C.WEBP", 3, "WEBP")
    (root / "dog" / "notes.txt").write_text("not an image")
    _save(root / "dog" / "anim.gif", 4, "GIF")  # not one of torchvision's extensions
    for i, photo in enumerate(photos[:3]):
        (root / "cat").mkdir(parents=True, exist_ok=True)
        (root / "cat" / f"{i}{photo.suffix}").write_bytes(photo.read_bytes())
    (root / "empty").mkdir()  # a class without images is still a class
    _corrupt_png(root / "cat" / "3.png")

    data = load_classification(root)
    assert isinstance(data, ClassificationData) and data.kind == "imagefolder"
    assert data.classnames == ["cat", "dog", "empty"] and data.name == "folder"
    names = [p.relative_to(root).as_posix() for p in data.images.paths]
    assert names == ["cat/0.png", "cat/1.png", "cat/2.png", "cat/3.png", "dog/C.WEBP",
                     "dog/b.png", "dog/sub/a.jpg"]
    assert data.targets == [0, 0, 0, 0, 1, 1, 1] and data.templates is None

    examples = list(data)
    assert [e.label for e in examples] == data.targets
    assert examples[3].image is None and "unreadable image" in examples[3].error

    vectors, targets, failures = embed_classification(tiny_vit, data, batch_size=3,
                                                      progress=False)
    good = [p for p in data.images.paths if p.name != "3.png"]
    assert vectors.dtype == np.float32 and vectors.shape == (6, tiny_vit.config.embed_dim)
    np.testing.assert_allclose(vectors, _expected(tiny_vit, [load_image(p) for p in good]),
                               atol=1e-5)
    assert targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(failures) == 1 and failures[0][0].endswith("3.png")
    assert "unreadable image" in failures[0][1]

    renamed = load_classification(root, classnames=["a cat", "a dog", "nothing"])
    assert renamed.classnames == ["a cat", "a dog", "nothing"] and renamed.targets == data.targets
    with pytest.raises(DataError, match="2 class name.*has 3 classes"):
        load_classification(root, classnames=["a", "b"])


def test_image_folder_split_directories(tmp_path):
    root = tmp_path / "set"
    _save(root / "train" / "x" / "0.png", 0)
    _save(root / "test" / "y" / "0.png", 1)
    _save(root / "test" / "z" / "0.png", 2)
    assert load_classification(root).classnames == ["y", "z"]
    assert load_classification(root, split="train").classnames == ["x"]
    with pytest.raises(DataError, match=r"holds the split\(s\) test, train but no 'val'"):
        load_classification(root, split="val")


# --------------------------------------------------------------------------- CSV


def test_csv_labels_by_name_and_index(tmp_path):
    images = [_save(tmp_path / "img" / f"{i}.png", i) for i in range(4)]
    table = tmp_path / "labels.csv"
    table.write_text("filepath,label\n"
                     f"img/0.png,tabby cat\n{images[1]},dog\n,dog\nimg/2.png, dog \n"
                     "img/3.png,bird\n", encoding="utf-8")
    data = load_classification(table)
    assert data.kind == "csv" and data.name == "labels"
    assert data.classnames == ["bird", "dog", "tabby cat"]  # distinct labels, sorted
    assert data.images.paths == [images[0], images[1], images[2], images[3]]
    assert data.targets == [2, 1, 1, 0]
    assert data.skipped == [(f"{table} line 4", "missing image (empty image path)")]

    # With a class list a label is a class name or an index into it.
    table.write_text("path\tcls\nimg/0.png\t1\nimg/1.png\tcat\nimg/2.png\t0\n", encoding="utf-8")
    tsv = table.rename(tmp_path / "labels.tsv")
    names = tmp_path / "names.txt"
    names.write_text("dog\ncat\n", encoding="utf-8")
    for given in (["dog", "cat"], names, str(names)):
        data = load_classification(tsv, classnames=given, image_key="path", label_key="cls")
        assert data.classnames == ["dog", "cat"] and data.targets == [1, 1, 0]

    tsv.write_text("path\tcls\nimg/0.png\t1\nimg/1.png\tcow\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"labels\.tsv line 3 \(image 'img/1\.png'\): label "
                                        r"'cow' is not one of the 2 class names.*index 0\.\.1"):
        load_classification(tsv, classnames=["dog", "cat"], image_key="path", label_key="cls")
    tsv.write_text("path\tcls\nimg/0.png\t1\nimg/1.png\t2\n", encoding="utf-8")
    with pytest.raises(DataError, match="line 3.*label '2' is not"):
        load_classification(tsv, classnames=["dog", "cat"], image_key="path", label_key="cls")
    with pytest.raises(DataError, match="holds class indices.*pass classnames="):
        load_classification(tsv, image_key="path", label_key="cls")
    with pytest.raises(ValueError, match=r"no column 'filepath' or 'label'; its columns are: "
                                         r"'path', 'cls'"):
        load_classification(tsv)


def test_csv_ambiguous_and_non_utf8(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("filepath,label\na.png,missile\n", encoding="utf-8")
    with pytest.raises(DataError, match="label 'missile' names 2 classes"):
        load_classification(table, classnames=["missile", "ship", "missile"])
    table.write_bytes("filepath,label\na.png,caf\xe9\n".encode("latin-1"))
    offset = table.read_bytes().index(b"\xe9")
    with pytest.raises(DataError, match=rf"t\.csv is not UTF-8 text: byte 0xe9 at byte offset "
                                        rf"{offset} \(line 2\)"):
        load_classification(table)


def test_read_table_line_numbers_and_training_csv_share_the_reader(tmp_path):
    table = tmp_path / "q.csv"
    table.write_text('filepath,title\na.png,"two\nlines"\n\nb.png,x\n', encoding="utf-8")
    (paths, captions), lines = read_table(table, ("filepath", "title"))
    assert paths == ["a.png", "b.png"] and captions == ["two\nlines", "x"] and lines == [2, 5]
    table.write_bytes(b"\xef\xbb\xbffilepath,title\na.png,ok\nb.png,\xff\n")
    offset = table.read_bytes().index(b"\xff")  # counted from the file's start, BOM included
    with pytest.raises(DataError, match=rf"byte 0xff at byte offset {offset} \(line 3\)"):
        CsvCaptions(table)


# --------------------------------------------------------------------------- shards


def test_shards_with_cls_labels(tmp_path, tiny_vit):
    images = [_image(i) for i in range(5)]
    shards = tmp_path / "shards"
    shards.mkdir()
    encoded = []
    with wds.TarWriter(str(shards / "000.tar")) as sink:
        for i, (fmt, ext) in enumerate([("PNG", "png"), ("JPEG", "jpg"), ("PNG", "png")]):
            buf = io.BytesIO()
            images[i].save(buf, fmt)
            encoded.append(buf.getvalue())
            sink.write({"__key__": f"k{i}", ext: buf.getvalue(), "cls": i % 2})
    with wds.TarWriter(str(shards / "001.tar")) as sink:
        sink.write({"__key__": "k3", "jpeg": b"not a jpeg", "cls": 1})
        sink.write({"__key__": "k4", "webp": _webp(images[4])})  # no label
    with pytest.raises(DataError, match="carry class indices only; give the class names"):
        load_classification(str(shards / "{000..001}.tar"))
    (shards / "classnames.txt").write_text("even\nodd\n", encoding="utf-8")
    data = load_classification(str(shards / "{000..001}.tar"))
    assert data.kind == "webdataset" and data.classnames == ["even", "odd"]
    assert data.targets is None and data.size is None
    assert load_classification(shards).images.urls == data.images.urls  # a folder of shards

    result = embed_classification(tiny_vit, data, batch_size=2, progress=False)
    decoded = [Image.open(io.BytesIO(b)) for b in encoded]
    np.testing.assert_allclose(result.vectors, _expected(tiny_vit, decoded), atol=1e-5)
    assert result.targets.tolist() == [0, 1, 0]
    assert result.ids == [f"k{i} in {shards / '000.tar'}" for i in range(3)]
    reasons = dict(result.failures)
    assert "unreadable image (.jpeg: UnidentifiedImageError" in reasons[
        f"k3 in {shards / '001.tar'}"]
    assert reasons[f"k4 in {shards / '001.tar'}"] == "missing label (no .cls; sample has: webp)"

    with pytest.raises(DataError, match=r"k1 in .*000\.tar: label '1' in \.cls is not a class "
                                        r"index 0\.\.0 of the 1 classes"):
        embed_classification(tiny_vit, load_classification(str(shards / "000.tar"),
                                                           classnames=["only"]),
                             progress=False)


# --------------------------------------------------------------------------- CLIP_benchmark


CB_CLASSES = ["apple", "banana", "cherry"]
CB_TEMPLATES = ["a photo of a {c}.", "a {c} in {{braces}}."]


def _cb_classification(root: Path, n: int = 7, corrupt: int | None = None,
                       max_count: int = 3) -> tuple[Path, list[Image.Image], list[int]]:
    images = [_image(10 + i) for i in range(n)]
    labels = [i % len(CB_CLASSES) for i in range(n)]
    samples = [(b"RIFF\x00\x00junk" if i == corrupt else _webp(im), label)
               for i, (im, label) in enumerate(zip(images, labels))]
    _write_cb(root, samples, classes=CB_CLASSES, templates=CB_TEMPLATES, max_count=max_count)
    return root, images, labels


def test_clip_benchmark_classification(tmp_path, tiny_vit):
    root, images, labels = _cb_classification(tmp_path / "wds_fruit", corrupt=4)
    assert (root / "test" / "nshards.txt").read_text() == "3\n"
    assert is_clip_benchmark_dir(root)
    data = load_classification(root)
    assert data.kind == "clip_benchmark" and data.name == "wds_fruit"
    assert data.classnames == CB_CLASSES
    assert data.templates == ["a photo of a {}.", "a {} in {{braces}}."]  # clipforge's form
    assert [t.format("fig") for t in data.templates] == [
        t.format(c="fig") for t in CB_TEMPLATES]  # the prompts CLIP_benchmark makes
    assert [e.label for e in data] == labels

    keep = [i for i in range(len(images)) if i != 4]
    expected = _expected(tiny_vit, [images[i] for i in keep])
    for workers in (0, 2):  # 3 shards: each worker reads its own shards; order is restored
        result = embed_classification(tiny_vit, data, batch_size=2, num_workers=workers,
                                      progress=False)
        np.testing.assert_allclose(result.vectors, expected, atol=1e-5)
        assert result.targets.tolist() == [labels[i] for i in keep]
        assert [i.split(" in ")[0] for i in result.ids] == [f"s{i:07d}" for i in keep]
        assert len(result.failures) == 1
        item, reason = result.failures[0]
        assert item == f"s0000004 in {root / 'test' / '1.tar'}"
        assert reason.startswith("unreadable image (.webp: ")


def test_one_shard_split_between_workers(tmp_path, tiny_vit):
    root, images, labels = _cb_classification(tmp_path / "one", n=5, max_count=100)
    assert (root / "test" / "nshards.txt").read_text() == "1\n"
    result = embed_classification(tiny_vit, load_classification(root), batch_size=2,
                                  num_workers=2, progress=False)
    np.testing.assert_allclose(result.vectors, _expected(tiny_vit, images), atol=1e-5)
    assert result.targets.tolist() == labels and result.failures == []


def test_clip_benchmark_retrieval(tmp_path, tiny_vit):
    long = " ".join(["word"] * 100)  # longer than the context: truncated, not skipped
    captions = [["a red square", "line one\nline two"], [long], [], ["x", "y", "z"],
                ["lost with its image"]]
    images = [_image(30 + i) for i in range(len(captions))]
    samples = [(b"junk" if i == 4 else _webp(im), caps)
               for i, (im, caps) in enumerate(zip(images, captions))]
    root = _write_cb(tmp_path / "wds_caps", samples, retrieval=True, max_count=2)
    data = load_retrieval(root)
    assert isinstance(data, RetrievalData) and data.kind == "clip_benchmark"
    examples = list(data)
    # CLIP_benchmark's str.splitlines of the .txt: the exporter's "\n" escape stays.
    assert examples[0].label == ["a red square", r"line one\nline two"]
    assert examples[2].label == [] and examples[4].image is None

    images_out, texts, text_to_image, failures = embed_retrieval(
        tiny_vit, data, batch_size=2, progress=False)
    kept = [0, 1, 2, 3]
    np.testing.assert_allclose(images_out, _expected(tiny_vit, [images[i] for i in kept]),
                               atol=1e-5)
    flat = ["a red square", r"line one\nline two", long, "x", "y", "z"]
    np.testing.assert_allclose(texts, _expected_texts(tiny_vit, flat), atol=1e-5)
    assert text_to_image.tolist() == [0, 0, 1, 3, 3, 3]
    assert [f[0] for f in failures] == [f"s0000004 in {root / 'test' / '2.tar'}"]

    with pytest.raises(DataError, match="is a retrieval set.*load_retrieval"):
        load_classification(root)
    fruit, _, _ = _cb_classification(tmp_path / "fruit")
    with pytest.raises(DataError, match="no dataset_type.txt, which CLIP_benchmark reads as "
                                        "'classification'"):
        load_retrieval(fruit)


def test_clip_benchmark_file_errors(tmp_path):
    root, _, _ = _cb_classification(tmp_path / "cb")
    (root / "classnames.txt").write_bytes("apple\nbanana\ncr\xe8me\n".encode("latin-1"))
    assert (root / "classnames.txt").read_bytes().index(b"\xe8") == 15
    with pytest.raises(DataError, match=r"class names file .*classnames\.txt is not UTF-8 text: "
                                        r"byte 0xe8 at byte offset 15 \(line 3\)"):
        load_classification(root)
    (root / "classnames.txt").write_text("apple\n\ncherry\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"classnames\.txt line 2 is empty"):
        load_classification(root)
    (root / "classnames.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="class list is empty"):
        load_classification(root)
    (root / "classnames.txt").write_text("apple\nbanana\ncherry\n", encoding="utf-8")

    templates = root / "zeroshot_classification_templates.txt"
    templates.write_bytes("a photo of a {c}.\nune photo d'une {c} \xe0 moi.\n".encode("latin-1"))
    offset = templates.read_bytes().index(b"\xe0")
    with pytest.raises(DataError, match=r"templates file .*templates\.txt is not UTF-8 text: "
                                        rf"byte 0xe0 at byte offset {offset} \(line 2\)"):
        load_classification(root)
    templates.write_text("a photo of a {c}.\na {label}.\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: template 'a \{label\}\.' has the field"):
        load_classification(root)
    templates.write_text("a photo of a {c}.\n", encoding="utf-8")

    (root / "test" / "nshards.txt").unlink()
    with pytest.raises(DataError) as info:
        load_classification(root)
    message = str(info.value)
    assert f"{root / 'test' / 'nshards.txt'} does not exist" in message
    assert "DIR/<split>/nshards.txt" in message and "0.tar ... N-1.tar" in message
    (root / "test" / "nshards.txt").write_text("4\n")
    with pytest.raises(DataError, match=r"says 4 shard\(s\) but 1 do not exist.*3\.tar"):
        load_classification(root)
    with pytest.raises(DataError, match=r"nshards\.txt does not exist.*splits here: test"):
        load_classification(root, split="train")
    (root / "dataset_type.txt").write_text("multilabel\n")
    with pytest.raises(DataError, match="says 'multilabel'"):
        load_classification(root)


# --------------------------------------------------------------------------- retrieval


def test_csv_retrieval_groups_rows_and_drops_captions_of_bad_images(tmp_path, photos,
                                                                    tiny_vit):
    bad = _truncated_jpeg(tmp_path / "bad.jpg")
    table = tmp_path / "caps.csv"
    rows = [(photos[1], "a cat"), (photos[0], "an astronaut"), (bad, "never seen"),
            (photos[1], "a tabby"), (photos[2], "  "), (photos[0], "a flag")]
    table.write_text("filepath,title\n" + "".join(f'{p},"{c}"\n' for p, c in rows),
                     encoding="utf-8")
    data = load_retrieval(table)
    assert data.kind == "csv" and data.images.paths == [photos[1], photos[0], bad]
    assert data.captions == [["a cat", "a tabby"], ["an astronaut", "a flag"], ["never seen"]]
    assert data.skipped == [(f"{table} line 6", f"empty caption (image {photos[2]})")]

    result = embed_retrieval(tiny_vit, data, progress=False)
    np.testing.assert_allclose(
        result.image_vectors, _expected(tiny_vit, [load_image(photos[1]), load_image(photos[0])]),
        atol=1e-5)
    assert result.captions == ["a cat", "a tabby", "an astronaut", "a flag"]
    np.testing.assert_allclose(result.text_vectors, _expected_texts(tiny_vit, result.captions),
                               atol=1e-5)
    assert result.text_to_image.tolist() == [0, 0, 1, 1]
    assert [item for item, _ in result.failures] == [f"{table} line 6", str(bad)]
    assert "unreadable image" in result.failures[1][1]


def test_folder_retrieval(tmp_path, photos):
    root = tmp_path / "captioned"
    root.mkdir()
    for i, photo in enumerate(photos[:5]):
        (root / f"{i}{photo.suffix}").write_bytes(photo.read_bytes())
    (root / "0.txt").write_text("first caption\n\n  second caption  \n", encoding="utf-8")
    (root / "1.txt").write_text("only one", encoding="utf-8")
    (root / "2.txt").write_bytes("un caf\xe9\n".encode("latin-1"))
    (root / "3.txt").write_text("\n \n", encoding="utf-8")
    # 4 has no .txt at all
    data = load_retrieval(root)
    assert data.kind == "folder"
    assert [p.name for p in data.images.paths] == ["0.png", "1.png"]
    assert data.captions == [["first caption", "second caption"], ["only one"]]
    reasons = {Path(item).stem: reason for item, reason in data.skipped}
    assert reasons["2"].startswith("unreadable caption (caption file")
    assert "byte 0xe9 at byte offset 6 (line 1)" in reasons["2"]
    assert reasons["3"] == "empty caption (3.txt has no non-empty line)"
    assert reasons["4"].startswith("missing caption (no 4.txt beside it)")


# --------------------------------------------------------------------------- bad input


def test_unknown_specs_list_what_is_accepted(tmp_path):
    other = tmp_path / "labels.json"
    other.write_text("{}")
    with pytest.raises(ValueError, match=r"is not a kind clipforge reads; expected one of:"
                                         r"[\s\S]*ImageFolder[\s\S]*\.csv/\.tsv[\s\S]*\.cls[\s\S]*nshards\.txt"):
        load_classification(other)
    with pytest.raises(ValueError, match=r"does not exist; expected one of:[\s\S]*same-name \.txt"):
        load_retrieval(tmp_path / "missing.csv")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="'.*nothing' is not a kind clipforge reads"):
        load_classification(tmp_path / "nothing")
    with pytest.raises(ValueError, match="is not a kind clipforge reads"):
        load_retrieval(tmp_path / "nothing")


def test_empty_class_lists(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("filepath,label\n", encoding="utf-8")
    with pytest.raises(DataError, match="class list is empty"):
        load_classification(table)
    with pytest.raises(DataError, match="class list is empty"):
        load_classification(table, classnames=[])
    names = tmp_path / "names.txt"
    names.write_text("\n")
    with pytest.raises(ValueError, match="no class names"):
        load_classification(table, classnames=names)


def test_nothing_readable_is_an_error(tmp_path, tiny_vit):
    root = tmp_path / "bad"
    _corrupt_png(root / "a" / "x.png")
    with pytest.raises(DataError, match=r"no image of bad could be embedded \(1 skipped, e\.g\. "
                                        r".*x\.png: unreadable image"):
        embed_classification(tiny_vit, load_classification(root), progress=False)


def test_truncated_shard_is_reported_once_and_the_run_goes_on(tmp_path, tiny_vit):
    root, images, labels = _cb_classification(tmp_path / "cut", n=6, max_count=100)
    shard = root / "test" / "0.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) * 2 // 3])
    for workers in (0, 2):  # one shard, two workers: each decodes every other item
        result = embed_classification(tiny_vit, load_classification(root), num_workers=workers,
                                      progress=False)
        n = len(result.targets)
        assert 0 < n < 6 and result.targets.tolist() == labels[:n]
        np.testing.assert_allclose(result.vectors, _expected(tiny_vit, images[:n]), atol=1e-5)
        reasons = dict(result.failures)
        assert reasons.pop(str(shard)).startswith("corrupt shard (")
        # the sample cut in two is skipped too (its label without its image)
        assert reasons == {f"s{n:07d} in {shard}": "missing image (sample has: cls)"}

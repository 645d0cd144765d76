"""``clipforge eval`` against CLIP_benchmark's own metric code (its zero-shot classification and
retrieval ``evaluate`` functions, driving the same clipforge model through the adapter), the
result format and ``eval-table``."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

import clipforge
from clipforge.cli import main
from clipforge.evaluation import clip_benchmark as adapter
from conftest import perturb

zeroshot_cb = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
retrieval_cb = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")

CLASSES = {"astronaut": "astronaut", "cat": "chelsea", "coffee": "coffee", "horse": "horse",
           "motorcycle": "motorcycle_right", "rocket": "rocket"}
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "art of the {}."]


@pytest.fixture
def saved_model(tmp_path):
    """tiny-vit with fixed random weights, whatever ran before (create_model draws from the
    global generator)."""
    torch.manual_seed(0)
    path = tmp_path / "tiny"
    clipforge.save_model(perturb(clipforge.create_model("tiny-vit"), seed=1), path)
    return path


def _variants(photo: Path) -> list[Image.Image]:
    """Four different images from one photo, so every class has several."""
    image = Image.open(photo).convert("RGB")
    return [image, ImageOps.mirror(image), image.rotate(90, expand=True),
            ImageOps.autocontrast(image.crop((0, 0, image.width // 2, image.height)))]


@pytest.fixture
def image_folder(photos, tmp_path) -> Path:
    by_stem = {p.stem: p for p in photos}
    root = tmp_path / "pictures"
    for cls, stem in CLASSES.items():
        (root / cls).mkdir(parents=True)
        for i, image in enumerate(_variants(by_stem[stem])):
            image.save(root / cls / f"{i}.png")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG broken")
    return root


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, items, transform, classes=None):
        self.items, self.transform, self.classes = items, transform, classes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, target = self.items[i]
        return self.transform(Image.open(path)), target


def _collate_captions(batch):
    return torch.stack([x for x, _ in batch]), [captions for _, captions in batch]


def _accuracy(output, target, topk=(1,)):
    """CLIP_benchmark 1.6.2's ``accuracy`` with one change: it turns a one-element array into a
    float with ``float(array)``, which NumPy 2.4 refuses; here ``.item()`` does it."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def test_zeroshot_classification_equals_clip_benchmark(saved_model, image_folder, tmp_path,
                                                        capsys, monkeypatch) -> None:
    monkeypatch.setattr(zeroshot_cb, "accuracy", _accuracy)
    templates = tmp_path / "templates.txt"
    templates.write_text("\n".join(TEMPLATES) + "\n", encoding="utf-8")
    out = tmp_path / "result.json"
    assert main(["eval", str(image_folder), "--model", str(saved_model), "--templates",
                 str(templates), "--output", str(out), "--no-progress"]) == 0
    record = json.loads(out.read_text())
    assert record["task"] == "zeroshot_classification" and record["dataset"] == "pictures"
    assert record["model"] == str(saved_model) and record["n_images"] == 24
    assert [s["item"] for s in record["skipped"]] == [str(image_folder / "cat" / "broken.png")]
    assert "broken.png" in capsys.readouterr().err

    model, transform, tokenizer = adapter.load_clipforge(str(saved_model), pretrained=None)
    items = [(p, i) for i, cls in enumerate(sorted(CLASSES))
             for p in sorted((image_folder / cls).glob("[0-9].png"))]
    loader = torch.utils.data.DataLoader(_Pairs(items, transform, sorted(CLASSES)), batch_size=7)
    cb_templates = [t.replace("{}", "{c}") for t in TEMPLATES]  # CLIP_benchmark's spelling
    expected = zeroshot_cb.evaluate(model, loader, tokenizer, sorted(CLASSES), cb_templates,
                                    "cpu", amp=False)
    assert set(expected) == set(record["metrics"])
    for name, value in expected.items():
        assert record["metrics"][name] == pytest.approx(value, abs=1e-6), name
    # CLIP_benchmark's class embeddings are clipforge's, to float32 round-off
    theirs = zeroshot_cb.zero_shot_classifier(model, tokenizer, sorted(CLASSES), cb_templates,
                                              "cpu", amp=False)
    ours = clipforge.evaluation.ZeroShotClassifier.build(model, sorted(CLASSES), TEMPLATES)
    torch.testing.assert_close(ours.class_embeddings, theirs.T, rtol=0, atol=1e-5)


def test_zeroshot_retrieval_equals_clip_benchmark(saved_model, photos, tmp_path) -> None:
    root = tmp_path / "captioned"
    root.mkdir()
    items = []
    for i, photo in enumerate(photos):
        for j, image in enumerate(_variants(photo)[:2]):
            path = root / f"{i}_{j}.png"
            image.save(path)
            # distinct captions: tied scores would make the top k depend on round-off
            captions = [f"a picture of {photo.stem}, view {j}", f"{photo.stem} number {j}",
                        f"the {j}th view of a {photo.stem} " + "very " * (40 * (i == 0))]
            path.with_suffix(".txt").write_text("\n".join(captions[: 2 + (i + j) % 2]) + "\n",
                                                encoding="utf-8")
            items.append((path, captions[: 2 + (i + j) % 2]))
    out = tmp_path / "retrieval.json"
    assert main(["eval", str(root), "--model", str(saved_model), "--output", str(out),
                 "--no-progress"]) == 0
    record = json.loads(out.read_text())
    assert record["task"] == "zeroshot_retrieval"
    model, transform, tokenizer = adapter.load_clipforge(str(saved_model), pretrained=None)
    loader = torch.utils.data.DataLoader(_Pairs(sorted(items), transform), batch_size=5,
                                         collate_fn=_collate_captions)
    expected = retrieval_cb.evaluate(model, loader, tokenizer, "cpu", amp=False,
                                     recall_k_list=[1, 5, 10])
    assert set(expected) == set(record["metrics"])
    for name, value in expected.items():
        assert record["metrics"][name] == pytest.approx(value, abs=1e-6), name
    assert 0 < record["metrics"]["text_retrieval_recall@10"] <= 1


COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (35, 75, 235)}


def _colour_folder(root: Path, count: int, seed: int) -> None:
    """Three classes by the colour of one filled disc or square of random size and place on a
    random grey, with pixel noise: an easy task drawn here, not by the built-in dataset, whose
    scenes are made hard on purpose (varied styles and backgrounds) and change as it evolves."""
    rng = np.random.default_rng(seed)
    for colour, rgb in COLOURS.items():
        (root / colour).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            grey = int(rng.integers(70, 190))
            image = Image.new("RGB", (64, 64), (grey, grey, grey))
            side = int(rng.integers(20, 40))
            x, y = (int(v) for v in rng.integers(0, 64 - side, size=2))
            draw = ImageDraw.Draw(image)
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((x, y, x + side, y + side), fill=rgb)
            pixels = np.asarray(image, np.int16) + rng.integers(-12, 13, (64, 64, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
                root / colour / f"{index}.png")


def test_linear_probe_and_table(saved_model, tmp_path, capsys) -> None:
    _colour_folder(tmp_path / "shapes" / "train", 20, seed=1)
    _colour_folder(tmp_path / "shapes" / "test", 10, seed=2)
    out = tmp_path / "probe.json"
    assert main(["eval", str(tmp_path / "shapes"), "--task", "linear_probe", "--few-shot", "1,4",
                 "--seeds", "0,1", "--model", str(saved_model), "--output", str(out),
                 "--no-progress"]) == 0
    record = json.loads(out.read_text())
    assert record["task"] == "linear_probe" and record["n_test"] == 30
    assert record["n_train"] + record["n_val"] == 60 and record["fits"] >= 2
    # colour is easy even for random features (1.0 and 0.95 with this model and data): far
    # above chance (1/3), where a probe fed mismatched features and labels would land
    assert record["metrics"]["acc1"] >= 0.9
    assert record["metrics"]["4_shot_acc1"] >= 0.7
    assert record["metrics"]["acc5"] is None  # NaN for 3 classes, as CLIP_benchmark, as null
    assert set(record["few_shot"]) == {"1", "4"}
    assert record["metrics"]["4_shot_acc1"] == record["few_shot"]["4"]["metrics"]["acc1"]

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"dataset": "cifar10", "model": "ViT-B-32",
                                 "pretrained": "openai", "task": "zeroshot_classification",
                                 "metrics": {"acc1": 0.898, "acc5": 0.995,
                                             "mean_per_class_recall": 0.898}}))
    capsys.readouterr()
    assert main(["eval-table", str(out), str(other)]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["dataset"] for r in rows] == ["shapes", "cifar10"]
    assert rows[1]["acc1"] == "0.898" and rows[1]["4_shot_acc1"] == ""
    assert float(rows[0]["acc1"]) == pytest.approx(record["metrics"]["acc1"])
    (tmp_path / "junk.json").write_text("[1, 2]")
    assert main(["eval-table", str(tmp_path / "junk.json")]) == 2
    assert "junk.json: not an evaluation result" in capsys.readouterr().err


def test_eval_bad_input(saved_model, image_folder, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a cat\n", encoding="utf-8")
    assert main(["eval", str(image_folder), "--templates", str(bad), "--model",
                 str(saved_model), "--no-progress"]) == 2
    assert "bad.txt" in capsys.readouterr().err
    latin = tmp_path / "latin.txt"
    latin.write_bytes("une photo d'un {} \xe0 Paris\n".encode("latin-1"))
    assert main(["eval", str(image_folder), "--templates", str(latin), "--model",
                 str(saved_model), "--no-progress"]) == 2
    assert "latin.txt" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", str(empty), "--model", str(saved_model), "--no-progress"]) == 2
    assert main(["eval", str(image_folder), "--templates", "no-such-dataset", "--model",
                 str(saved_model), "--no-progress"]) == 2
    assert "neither a file nor a known dataset" in capsys.readouterr().err


def test_adapter_contract(saved_model, photos) -> None:
    model, transform, tokenizer = adapter.load_clipforge(str(saved_model), pretrained="")
    pixels = transform(Image.open(photos[0]))
    assert pixels.shape == (3, model.config.image_size, model.config.image_size)
    ids = tokenizer(["a cat", "word " * 200])  # long captions are cut, never an error
    assert ids.shape == (2, 77) and ids[1, -1] == clipforge.get_tokenizer().eot_token_id
    with torch.no_grad():
        assert model.encode_image(pixels[None]).shape == (1, model.config.embed_dim)
        assert model.encode_text(ids).shape == (2, model.config.embed_dim)

    class Registry:  # clip_benchmark.models' shape: TYPE2FUNC and MODEL_TYPES
        TYPE2FUNC = {"open_clip": None}
        MODEL_TYPES = ["open_clip"]

    adapter.register(Registry)
    adapter.register(Registry)
    assert Registry.MODEL_TYPES == ["open_clip", "clipforge"]
    assert Registry.TYPE2FUNC["clipforge"] is adapter.load_clipforge
    np.testing.assert_array_equal(ids[0].numpy(), clipforge.tokenize(["a cat"])[0].numpy())


def test_clip_benchmark_export_through_the_cli(saved_model, photos, tmp_path) -> None:
    """A CLIP_benchmark webdataset export (as its convert_dataset writes it): the task, class
    names and {c} templates come from the export; the retrieval type is detected."""
    from test_eval_datasets import _webp, _write_cb

    images = [Image.open(p).convert("RGB").resize((64, 48)) for p in photos]
    classification = _write_cb(tmp_path / "wds_photos", [(_webp(im), i % 3)
                                                         for i, im in enumerate(images)],
                               classes=["animal", "object", "vehicle"],
                               templates=["a photo of a {c}.", "a drawing of the {c}."],
                               max_count=3)
    out = tmp_path / "cls.json"
    assert main(["eval", str(classification), "--model", str(saved_model), "--output",
                 str(out), "--no-progress", "--workers", "2"]) == 0
    record = json.loads(out.read_text())
    assert record["task"] == "zeroshot_classification" and record["dataset"] == "wds_photos"
    assert record["n_images"] == len(photos) and record["n_classes"] == 3
    assert record["templates"] == {"source": "shipped with the dataset", "count": 2}

    retrieval = _write_cb(tmp_path / "wds_captions", [(_webp(im), [f"photo {i}", "a thing"])
                                                      for i, im in enumerate(images)],
                          retrieval=True)
    out = tmp_path / "ret.json"
    assert main(["eval", str(retrieval), "--model", str(saved_model), "--output", str(out),
                 "--no-progress"]) == 0
    record = json.loads(out.read_text())
    assert record["task"] == "zeroshot_retrieval" and record["n_captions"] == 2 * len(photos)
    assert set(record["metrics"]) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text")
                                      for k in (1, 5, 10)}

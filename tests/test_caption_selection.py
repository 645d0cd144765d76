"""CLIP_benchmark's image_caption_selection task (SugarCrepe, Winoground): the metrics equal
CLIP_benchmark's own, files in both formats are read, bad instances are skipped and reported,
and `evaluate` writes a record in CLIP_benchmark's shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import clipforge
from clipforge.cli import main
from clipforge.data.synthetic import render_scene
from clipforge.evaluation import caption_selection
from clipforge.evaluation.caption_selection import (
    TASK,
    Instance,
    load_selection,
    score_instances,
    selection_metrics,
)
from clipforge.evaluation.tasks import TASKS, EvalOptions, evaluate, resolve_task
from clipforge.reading import DataError
from conftest import seeded_model

image_caption_selection = pytest.importorskip("clip_benchmark.metrics.image_caption_selection")


def _images(root: Path, n: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"{i:03d}.png"
        render_scene(i, image_size=64).image.save(root / name)
        names.append(name)
    return names


def _sugar_crepe(tmp_path: Path, n: int = 12) -> Path:
    names = _images(tmp_path / "val2017", n)
    records = {}
    for i, name in enumerate(names):
        scene = render_scene(i, image_size=64, language="en")
        o = scene.objects[0]
        records[str(i * 3)] = {"filename": name, "caption": scene.caption,
                               "negative_caption": f"a {o['colour']} shape on a table"}
    path = tmp_path / "swap_att.json"
    path.write_text(json.dumps(records))
    return path


def _winoground(tmp_path: Path, n: int = 8) -> Path:
    names = _images(tmp_path / "images", 2 * n)
    rows = [{"id": i, "image_0": names[2 * i][:-4], "image_1": names[2 * i + 1][:-4],
             "caption_0": render_scene(2 * i, language="en").caption,
             "caption_1": render_scene(2 * i + 1, language="en").caption} for i in range(n)]
    path = tmp_path / "examples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _reference(model, instances) -> dict[str, float]:
    """CLIP_benchmark's own evaluate(), fed the same instances through a DataLoader-like list
    of (images [B, I, C, H, W], texts) batches."""
    batches = []
    for start in range(0, len(instances), 4):
        chunk = instances[start:start + 4]
        pixels = torch.stack([torch.stack([model.preprocess(Image.open(p).convert("RGB"))
                                           for p in inst.images]) for inst in chunk])
        batches.append((pixels, [inst.captions for inst in chunk]))
    return image_caption_selection.evaluate(
        model, batches, lambda texts: model.tokenizer(texts, truncate=True), "cpu", amp=False)


@pytest.mark.parametrize("kind", ["sugar_crepe", "winoground"])
def test_metrics_equal_clip_benchmarks(tiny_vit, tmp_path, kind) -> None:
    path = _sugar_crepe(tmp_path) if kind == "sugar_crepe" else _winoground(tmp_path)
    data = load_selection(path)
    assert data.format == kind and not data.skipped
    metrics, skipped, scored = score_instances(tiny_vit, data.instances, batch_size=5)
    assert not skipped and scored == len(data.instances)
    expected = _reference(tiny_vit, data.instances)
    assert set(metrics) == set(expected) == {"image_acc", "text_acc", "acc"}
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-9), name
    if kind == "sugar_crepe":  # one image: every caption "finds" it
        assert metrics["image_acc"] == 1.0 and metrics["acc"] == metrics["text_acc"]


class _Lookup(torch.nn.Module):
    """A "model" whose embeddings are given: an image is its own [dim, 1, 1] pixels, a text
    the name of a row of ``texts``; so CLIP_benchmark's evaluate() scores exactly the
    embeddings that selection_metrics is given."""

    def __init__(self, texts: torch.Tensor) -> None:
        super().__init__()
        self.texts = texts

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.flatten(1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.texts[ids]


@pytest.mark.parametrize(("images_per", "captions_per"), [(1, 2), (2, 2), (1, 4), (3, 2)])
def test_selection_metrics_equal_clip_benchmarks_on_the_same_embeddings(images_per,
                                                                        captions_per) -> None:
    n, dim = 40, 6
    generator = torch.Generator().manual_seed(images_per * 10 + captions_per)
    images = torch.randn(n, images_per, dim, generator=generator)
    texts = torch.randn(n, captions_per, dim, generator=generator)
    matched = min(images_per, captions_per)  # some instances right, some not
    images[: n // 2, :matched] += 1.5 * texts[: n // 2, :matched]
    texts[0, 1] = texts[0, 0]  # exact ties: both tools take the lower index
    images[1, -1] = images[1, 0]
    flat = texts.reshape(n * captions_per, dim)
    batches = [(images[s:s + 8, :, :, None, None],
                [[str(s * captions_per + i * captions_per + j) for j in range(captions_per)]
                 for i in range(len(images[s:s + 8]))]) for s in range(0, n, 8)]
    expected = image_caption_selection.evaluate(
        _Lookup(flat), batches, lambda t: torch.tensor([int(x) for x in t]), "cpu", amp=False)
    ours = selection_metrics(images, texts)
    assert ours == pytest.approx(expected, abs=1e-12)
    assert 0 < ours["acc"] < 1  # neither all right nor all wrong: the comparison means something


def test_selection_metrics_on_known_scores() -> None:
    # instance 0: both images pick their own caption, both captions their own image;
    # instance 1: image 1 prefers caption 0 (text wrong), captions still pick their images.
    images = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],
                           [[1.0, 0.0], [0.8, 0.6]]])
    texts = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],
                          [[1.0, 0.1], [0.0, 1.0]]])
    metrics = selection_metrics(images, texts)
    assert metrics == {"image_acc": 1.0, "text_acc": 0.5, "acc": 0.5}
    with pytest.raises(ValueError):
        selection_metrics(images[0], texts)


def test_missing_images_are_skipped_and_reported(tiny_vit, tmp_path) -> None:
    path = _sugar_crepe(tmp_path, n=6)
    (tmp_path / "val2017" / "002.png").unlink()
    (tmp_path / "val2017" / "004.png").write_bytes(b"not a png")
    data = load_selection(path)
    assert [key for key, _ in data.skipped] == ["6"]
    assert "missing image" in data.skipped[0][1]
    metrics, skipped, scored = score_instances(tiny_vit, data.instances)
    assert scored == 4 and [key for key, _ in skipped] == ["12"]
    assert "unreadable image" in skipped[0][1]


def test_an_image_the_model_cannot_take_drops_its_instance_only(tiny_vit, monkeypatch) -> None:
    """An image that opens but that the model's transform refuses (here 0x0 pixels) skips its
    instance, named, and the others keep their own embeddings (the rows stay aligned)."""
    scenes = [render_scene(i, image_size=64, language="en") for i in range(24)]
    instances = [Instance(str(i), [scenes[2 * i].image, scenes[2 * i + 1].image],
                          [scenes[2 * i].caption, scenes[2 * i + 1].caption]) for i in range(12)]
    # first in its batch of 3, so that misplaced rows would shift every later instance
    bad = Instance("bad", [Image.new("RGB", (0, 0)), instances[3].images[1]],
                   instances[3].captions)
    scored_embeddings = []
    monkeypatch.setattr(caption_selection, "selection_metrics",
                        lambda *pair: scored_embeddings.append(pair) or {})
    _, skipped, scored = score_instances(tiny_vit, [*instances[:3], bad, *instances[4:]],
                                         batch_size=3)
    assert skipped == [("bad", "cannot use image 0: image is 0x0 pixels: it has no pixels")]
    assert scored == 11
    score_instances(tiny_vit, instances[:3] + instances[4:], batch_size=4)
    (images, texts), (expected_images, expected_texts) = scored_embeddings
    torch.testing.assert_close(images, expected_images, atol=1e-5, rtol=0)
    torch.testing.assert_close(texts, expected_texts, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("content", "message"), [
    ('{"1": {"filename": "a.png", "caption": "x"}}', "negative_caption"),
    ('[{"image_0": "a", "caption_0": "x"}]', "image_1"),
    ("not json at all", "not JSON"),
])
def test_malformed_files_are_named(tmp_path, content, message) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_selection(path)
    assert str(path) in str(info.value)
    with pytest.raises(DataError, match="no such file"):
        load_selection(tmp_path / "absent.json")


def test_evaluate_writes_clip_benchmarks_record(tiny_vit, tmp_path) -> None:
    assert TASK == "image_caption_selection" and TASK in TASKS
    path = _winoground(tmp_path, n=4)
    record = evaluate(tiny_vit, str(path), EvalOptions(task=TASK, progress=False),
                      model_name="tiny-vit", pretrained="")
    for key in ("dataset", "model", "pretrained", "task", "metrics", "language"):
        assert key in record
    assert record["task"] == TASK and record["dataset"] == "winoground"  # CLIP_benchmark's name
    assert set(record["metrics"]) == {"image_acc", "text_acc", "acc"}
    assert record["n_instances"] == 4 and record["skipped"] == []


def test_command_line_writes_clip_benchmarks_result(tmp_path, capsys) -> None:
    """``clipforge eval --task image_caption_selection`` end to end on a saved tiny model: a
    SugarCrepe file with a missing and an unreadable image (skipped and reported, the rest
    scored) and a Winoground file whose images are in another folder (``--images``).  The
    metrics equal CLIP_benchmark's evaluate() on the same model and instances."""
    model_dir = tmp_path / "tiny"
    clipforge.save_model(seeded_model("tiny-vit", seed=3), model_dir)
    model = clipforge.create_model(str(model_dir))

    sugar = _sugar_crepe(tmp_path / "sugar", n=10)
    (tmp_path / "sugar" / "val2017" / "003.png").unlink()
    (tmp_path / "sugar" / "val2017" / "005.png").write_bytes(b"not a png")
    wino = tmp_path / "wino" / "examples.jsonl"
    wino.parent.mkdir()
    _winoground(tmp_path / "wino", n=6).rename(wino.with_suffix(".tmp"))
    (tmp_path / "wino" / "images").rename(tmp_path / "pictures")
    wino.with_suffix(".tmp").rename(wino)
    assert resolve_task(str(wino), "auto", "title", "label") == TASK

    cases = [(sugar, [], "sugar_crepe/swap_att", 8, {"9", "15"}),
             (wino, ["--images", str(tmp_path / "pictures")], "winoground", 6, set())]
    for path, extra, name, scored, skipped in cases:
        out = tmp_path / f"{path.stem}.json"
        capsys.readouterr()
        assert main(["eval", str(path), "--task", TASK, "--model", str(model_dir), *extra,
                     "--output", str(out), "--no-progress"]) == 0
        err = capsys.readouterr().err
        record = json.loads(out.read_text())
        assert {"dataset", "model", "pretrained", "task", "metrics", "language"} <= set(record)
        assert (record["dataset"], record["task"], record["pretrained"]) == (name, TASK, "")
        assert record["model"] == str(model_dir)
        metrics = record["metrics"]
        assert set(metrics) == {"image_acc", "text_acc", "acc"}
        assert all(0 <= v <= 1 for v in metrics.values())
        assert metrics["acc"] <= min(metrics["image_acc"], metrics["text_acc"])
        assert record["n_instances"] == scored
        assert {s["item"] for s in record["skipped"]} == skipped
        for key in skipped:
            assert f"skipped {key}: " in err
        if skipped:
            reasons = " ".join(s["reason"] for s in record["skipped"])
            assert "missing image" in reasons and "unreadable image" in reasons
            assert metrics["image_acc"] == 1.0  # one image per instance
        instances = load_selection(path, image_root=extra[1] if extra else None).instances
        instances = [i for i in instances if i.key not in skipped]
        expected = _reference(model, instances)
        for metric, value in expected.items():
            assert metrics[metric] == pytest.approx(value, abs=1e-9), (name, metric)

    # without --images the Winoground images are not found: an error naming them, exit 2
    assert main(["eval", str(wino), "--task", TASK, "--model", str(model_dir),
                 "--no-progress"]) == 2
    assert "missing image" in capsys.readouterr().err
    assert main(["eval", str(wino), "--images", str(tmp_path / "absent"), "--model",
                 str(model_dir), "--no-progress"]) == 2
    assert "absent: no such folder" in capsys.readouterr().err

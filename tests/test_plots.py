"""The similarity and top-k pictures: drawn from the model's own numbers, readable, and written
only as PNG or SVG; unreadable images and over-long captions are reported, not drawn."""

from __future__ import annotations

import html

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.evaluation import plots
from clipforge.evaluation.plots import plot_similarity, plot_topk, similarity_matrix
from clipforge.samples import SAMPLE_PHOTOS

CAPTIONS = list(SAMPLE_PHOTOS.values())


def by_hand(model: clipforge.CLIP, images: list, texts: list[str]) -> np.ndarray:
    """[texts, images] cosine similarities straight from encode_image/encode_text."""
    with torch.no_grad():
        image = model.encode_image(torch.stack([model.preprocess.load(p) for p in images]))
        text = model.encode_text(clipforge.tokenize(texts))
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return (text @ image.t()).numpy()


@pytest.fixture
def corrupt(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return path


def test_png_for_the_sample_photos_draws_the_models_similarities(
        tiny_vit, photos, tmp_path, monkeypatch) -> None:
    drawn = []
    draw = plots._draw_similarity
    monkeypatch.setattr(plots, "_draw_similarity", lambda result, *a, **k: (
        drawn.append(result.matrix.copy()), draw(result, *a, **k)))
    out = tmp_path / "sim.png"
    result = plot_similarity(photos, CAPTIONS, tiny_vit, out)
    assert len(photos) == 8 and result.skipped_images == [] and result.skipped_texts == []
    np.testing.assert_allclose(drawn[0], by_hand(tiny_vit, photos, CAPTIONS), atol=1e-5)
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG"
        wide = img.size
    assert 800 < wide[0] < 2000 and 600 < wide[1] < 1500
    assert [p.name for p in tmp_path.iterdir()] == ["sim.png"]  # no temporary file left
    plot_similarity(photos[:3], CAPTIONS, tiny_vit, tmp_path / "narrow.png")
    with Image.open(tmp_path / "narrow.png") as img:
        assert img.size[0] < wide[0] - 3 * 80  # about 100 px per image column less
        assert img.size[1] == pytest.approx(wide[1], abs=40)


def test_svg_holds_captions_and_cell_values_as_text(tiny_vit, photos, tmp_path) -> None:
    out = tmp_path / "sim.svg"
    result = plot_similarity(photos, CAPTIONS, tiny_vit, out)
    svg = out.read_text()
    for caption in CAPTIONS:
        assert f">{html.escape(caption)}<" in svg
    texts = svg.split("<text")
    for value in result.matrix.ravel():
        assert any(f">{value:.2f}<" in t for t in texts)
    assert svg.count("<image") == len(photos) + 2  # thumbnails, the matrix, the colour bar


def test_corrupt_image_is_reported_and_left_out(tiny_vit, photos, corrupt, tmp_path) -> None:
    images = [photos[0], corrupt, photos[1]]
    out = tmp_path / "sim.svg"
    result = plot_similarity(images, CAPTIONS[:2], tiny_vit, out)
    assert result.images == [photos[0], photos[1]]
    assert [name for name, _ in result.skipped_images] == [str(corrupt)]
    assert "broken.png" in result.skipped_images[0][1]
    np.testing.assert_allclose(result.matrix, by_hand(tiny_vit, [photos[0], photos[1]],
                                                      CAPTIONS[:2]), atol=1e-5)
    svg = out.read_text()
    assert "broken.png" not in svg and photos[1].name in svg
    assert svg.count("<image") == 2 + 2
    with pytest.raises(ValueError, match="nothing to plot.*broken.png"):
        plot_similarity([corrupt], CAPTIONS[:2], tiny_vit, tmp_path / "none.png")


def test_long_text_is_reported_or_truncated(tiny_vit, photos, tmp_path) -> None:
    long = "a photo of " + "a very " * 60 + "large cat"
    result = similarity_matrix(tiny_vit, photos[:2], [CAPTIONS[0], long])
    assert result.texts == [CAPTIONS[0]] and result.matrix.shape == (1, 2)
    assert result.skipped_texts[0][0] == long and "tokens long" in result.skipped_texts[0][1]
    kept = similarity_matrix(tiny_vit, photos[:2], [CAPTIONS[0], long], truncate=True)
    assert kept.texts == [CAPTIONS[0], long] and kept.matrix.shape == (2, 2)


def test_pil_images_and_a_given_matrix(tiny_vit, photos, tmp_path) -> None:
    pictures = [Image.open(p) for p in photos[:2]]
    result = similarity_matrix(tiny_vit, [pictures[0], photos[2], pictures[1]], CAPTIONS[:2])
    np.testing.assert_allclose(result.matrix, by_hand(tiny_vit, [photos[0], photos[2], photos[1]],
                                                      CAPTIONS[:2]), atol=1e-5)
    given = torch.tensor([[0.5, -0.25], [0.125, 1.0]])
    drawn = plot_similarity(pictures, ["one", "two"], given, tmp_path / "given.svg")
    np.testing.assert_array_equal(drawn.matrix, given.numpy())
    assert ">-0.25<" in (tmp_path / "given.svg").read_text()
    with pytest.raises(ValueError, match=r"shape \(2, 2\); expected .* \(3, 2\)"):
        plot_similarity(pictures, ["one", "two", "three"], given, tmp_path / "bad.png")


@pytest.mark.parametrize("name", ["sim.jpg", "sim", "sim.pdf"])
def test_other_suffixes_are_refused(tiny_vit, photos, tmp_path, name) -> None:
    with pytest.raises(ValueError, match=r"must end in \.png or \.svg"):
        plot_similarity(photos[:1], CAPTIONS[:1], tiny_vit, tmp_path / name)
    with pytest.raises(ValueError, match=r"\.png or \.svg"):
        plot_topk(photos[0], ["a", "b"], [0.5, 0.5], tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_topk_bars_show_the_most_probable_classes(photos, tmp_path) -> None:
    classes = [f"class number {c}" for c in range(12)]
    probs = torch.randn(len(photos), len(classes), generator=torch.Generator().manual_seed(0))
    probs = probs.mul(2).softmax(dim=-1)
    out = tmp_path / "topk.png"
    top = plot_topk(photos, classes, probs, out)
    values, index = probs.topk(5, dim=-1)
    assert [[name for name, _ in row] for row in top] == [[classes[i] for i in r] for r in index]
    np.testing.assert_allclose([[p for _, p in row] for row in top], values.numpy(), rtol=1e-6)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 1000 and img.size[1] > 800
    svg_top = plot_topk(photos[0], classes[:3], probs[0, :3] / probs[0, :3].sum(),
                        tmp_path / "one.svg", k=5)
    assert len(svg_top) == 1 and len(svg_top[0]) == 3  # k is capped at the number of classes
    svg = (tmp_path / "one.svg").read_text()
    assert all(f">{name}<" in svg for name in classes[:3]) and photos[0].name in svg


def test_topk_refuses_logits_and_mismatched_shapes(photos, tmp_path) -> None:
    with pytest.raises(ValueError, match="softmax"):
        plot_topk(photos[:2], ["a", "b"], torch.tensor([[3.0, -1.0], [0.0, 2.0]]),
                  tmp_path / "t.png")
    with pytest.raises(ValueError, match=r"expected \(images, classes\) = \(2, 3\)"):
        plot_topk(photos[:2], ["a", "b", "c"], torch.full((2, 2), 0.5), tmp_path / "t.png")

"""Ranking and CLIPScore equal what encode_image/encode_text give by hand, whatever the batch
size; unreadable images and over-long captions are skipped and reported, not fatal."""

from __future__ import annotations

import copy
import csv
import shutil

import numpy as np
import pytest
import torch

import clipforge
from clipforge.evaluation.scoring import (
    PREFIX,
    clip_score,
    pairs_from_csv,
    rank_images,
    ref_clip_score,
)
from clipforge.samples import SAMPLE_PHOTOS

CAPTIONS = list(SAMPLE_PHOTOS.values())
LONG = "a photo of " + "a very " * 60 + "large cat"


def unit_images(model: clipforge.CLIP, paths) -> torch.Tensor:
    with torch.no_grad():
        x = model.encode_image(torch.stack([model.preprocess.load(p) for p in paths]))
    return x / x.norm(dim=-1, keepdim=True)


def unit_texts(model: clipforge.CLIP, texts) -> torch.Tensor:
    with torch.no_grad():
        x = model.encode_text(clipforge.tokenize(texts))
    return x / x.norm(dim=-1, keepdim=True)


def cosines(model, paths, captions, prefix=PREFIX) -> np.ndarray:
    """Per-pair cos(E_image, E_caption) computed by hand."""
    image, text = unit_images(model, paths), unit_texts(model, [prefix + c for c in captions])
    return (image * text).sum(dim=-1).numpy()


@pytest.fixture
def corrupt(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return path


def test_rank_orders_by_hand_computed_cosine(tiny_vit, photos) -> None:
    prompt = "a facial photo of a tabby cat"
    ranked, skipped = rank_images(tiny_vit, prompt, photos, batch_size=3)
    by_hand = (unit_images(tiny_vit, photos) @ unit_texts(tiny_vit, [prompt])[0]).numpy()
    order = np.argsort(-by_hand)
    assert skipped == []
    assert [path for path, _ in ranked] == [str(photos[i]) for i in order]
    np.testing.assert_allclose([s for _, s in ranked], by_hand[order], atol=1e-5)
    assert all(a[1] >= b[1] for a, b in zip(ranked, ranked[1:], strict=False))


def test_rank_skips_unreadable_files_and_searches_folders(tiny_vit, photos, corrupt) -> None:
    (corrupt.parent / "notes.txt").write_text("not an image suffix: not a candidate")
    ranking = rank_images(tiny_vit, "a horse", [photos[0], corrupt.parent])
    assert [path for path, _ in ranking.ranked] == [str(photos[0])]
    assert [path for path, _ in ranking.skipped] == [str(corrupt)]
    assert "cannot read image" in ranking.skipped[0][1]


def test_rank_refuses_an_over_long_prompt_unless_truncated(tiny_vit, photos) -> None:
    with pytest.raises(clipforge.ContextLengthError, match="tokens long"):
        rank_images(tiny_vit, LONG, photos[:2])
    assert len(rank_images(tiny_vit, LONG, photos[:2], truncate=True).ranked) == 2


def test_clip_score_is_w_times_clipped_cosine(tiny_vit, photos) -> None:
    result = clip_score(tiny_vit, photos, CAPTIONS)
    cos = cosines(tiny_vit, photos, CAPTIONS)
    np.testing.assert_allclose(result.scores, 2.5 * np.maximum(cos, 0), atol=1e-5)
    assert result.mean == pytest.approx(float(np.mean(2.5 * np.maximum(cos, 0))), abs=1e-5)
    assert result.skipped == [] and result.scored == len(photos)
    plain = clip_score(tiny_vit, photos, CAPTIONS, w=1.0, prefix="")
    np.testing.assert_allclose(plain.scores, np.maximum(cosines(tiny_vit, photos, CAPTIONS, ""),
                                                        0), atol=1e-5)


def test_negative_cosines_score_zero(tiny_vit, photos) -> None:
    """Negating the text projection negates every cosine: pairs that were positive must now
    score exactly 0, and those that were negative 2.5 * |cos|."""
    flipped = copy.deepcopy(tiny_vit)
    with torch.no_grad():
        flipped.text_projection.neg_()
    cos = cosines(tiny_vit, photos, CAPTIONS)
    assert (cos > 0).any()
    result = clip_score(flipped, photos, CAPTIONS)
    np.testing.assert_allclose(result.scores, 2.5 * np.maximum(-cos, 0), atol=1e-5)
    assert (result.scores[cos > 1e-4] == 0).all()


def test_batch_size_does_not_change_scores(tiny_vit, photos) -> None:
    one = clip_score(tiny_vit, photos, CAPTIONS, batch_size=1)
    many = clip_score(tiny_vit, photos, CAPTIONS, batch_size=64)
    np.testing.assert_allclose(one.scores, many.scores, rtol=0, atol=1e-6)


def test_repeated_images_and_captions_score_like_single_pairs(tiny_vit, photos) -> None:
    images = [photos[0], photos[0], photos[1], photos[0]]
    captions = [CAPTIONS[0], CAPTIONS[1], CAPTIONS[0], CAPTIONS[0]]
    result = clip_score(tiny_vit, images, captions)
    expected = 2.5 * np.maximum(cosines(tiny_vit, images, captions), 0)
    np.testing.assert_allclose(result.scores, expected, atol=1e-5)
    assert result.scores[0] == result.scores[3]


def test_unreadable_image_and_long_caption_are_skipped(tiny_vit, photos, corrupt) -> None:
    images = [photos[0], corrupt, photos[1]]
    captions = [CAPTIONS[0], CAPTIONS[1], LONG]
    result = clip_score(tiny_vit, images, captions)
    assert [i for i, _ in result.skipped] == [1, 2]
    assert "broken.png" in result.skipped[0][1] and "tokens long" in result.skipped[1][1]
    assert np.isnan(result.scores[1:]).all() and result.scored == 1
    assert result.mean == pytest.approx(result.scores[0])
    rows = result.rows()
    assert rows[0]["score"] == pytest.approx(result.scores[0]) and "skipped" not in rows[0]
    assert rows[1]["score"] is None and "broken.png" in rows[1]["skipped"]
    cut = clip_score(tiny_vit, images, captions, truncate=True)
    assert [i for i, _ in cut.skipped] == [1] and not np.isnan(cut.scores[2])


def test_mismatched_inputs_are_refused(tiny_vit, photos) -> None:
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        clip_score(tiny_vit, photos[:3], CAPTIONS[:2])
    with pytest.raises(TypeError, match="sequences"):
        clip_score(tiny_vit, photos[:1], CAPTIONS[0])
    with pytest.raises(ValueError, match="2 captions but 1 reference lists"):
        ref_clip_score(tiny_vit, photos[:2], CAPTIONS[:2], [[CAPTIONS[0]]])


def test_ref_clip_score_is_the_harmonic_mean(tiny_vit, photos) -> None:
    images, captions = photos[:3], CAPTIONS[:3]
    references = [[CAPTIONS[0], "an astronaut"], [CAPTIONS[5], CAPTIONS[1]], []]
    plain, ref = ref_clip_score(tiny_vit, images, captions, references)
    assert [i for i, _ in ref.skipped] == [2] and "no usable reference" in ref.skipped[0][1]
    assert plain.skipped == ref.skipped and np.isnan(plain.scores[2])
    a = 2.5 * np.maximum(cosines(tiny_vit, images[:2], captions[:2]), 0)
    for i in range(2):
        c = unit_texts(tiny_vit, [PREFIX + captions[i]])[0]
        r = unit_texts(tiny_vit, [PREFIX + t for t in references[i]])
        b = max(float((r @ c).max()), 0.0)
        assert plain.scores[i] == pytest.approx(a[i], abs=1e-5)
        assert ref.scores[i] == pytest.approx(2 * a[i] * b / (a[i] + b), abs=1e-5)
    np.testing.assert_allclose(plain.scores[:2], clip_score(tiny_vit, images[:2],
                                                            captions[:2]).scores, atol=1e-6)


def test_pairs_from_csv_resolve_against_the_file(photos, tmp_path) -> None:
    """A relative path resolves against the CSV's folder, not the working directory; an
    absolute one is kept. (The CSV lives in its own folder: the shared photo folder is read
    only, other tests index it whole.)"""
    near = tmp_path / photos[0].name
    shutil.copy(photos[0], near)
    table = tmp_path / "pairs.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title"])
        writer.writerows([[near.name, "an astronaut"], [str(photos[1]), "a cat, sitting"]])
    paths, captions = pairs_from_csv(table)
    assert paths == [near, photos[1]] and captions == ["an astronaut", "a cat, sitting"]

"""The built-in synthetic image-caption data: determinism, held-out splits, captions, eval sets."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from clipforge.data.synthetic import (
    BACKGROUNDS,
    CLASSNAMES,
    COLOURS,
    HELDOUT_PAIRS,
    POSITIONS,
    SEEN_PAIRS,
    SHAPES,
    SIZES,
    TEMPLATES,
    SyntheticCaptions,
    class_index,
    render_scene,
    retrieval_set,
    zero_shot_set,
)

COUNT_WORDS = {2: "two", 3: "three"}


def pixels(image) -> np.ndarray:
    return np.asarray(image)


@pytest.fixture(scope="module")
def train_scenes():
    return [render_scene(i) for i in range(5000)]


def test_heldout_pairs_form_a_latin_square_like_set() -> None:
    assert len(HELDOUT_PAIRS) == len(set(HELDOUT_PAIRS)) == 8
    assert not set(HELDOUT_PAIRS) & set(SEEN_PAIRS)
    assert len(SEEN_PAIRS) + len(HELDOUT_PAIRS) == len(COLOURS) * len(SHAPES)
    # Each colour held out once, each shape at most twice and at least once ...
    assert Counter(c for c, _ in HELDOUT_PAIRS) == Counter(list(COLOURS))
    shape_counts = Counter(s for _, s in HELDOUT_PAIRS)
    assert set(shape_counts) == set(SHAPES) and max(shape_counts.values()) <= 2
    # ... so every colour and every shape keeps several training partners.
    for colour in COLOURS:
        assert sum(c == colour for c, _ in SEEN_PAIRS) >= 4
    for shape in SHAPES:
        assert sum(s == shape for _, s in SEEN_PAIRS) >= 6


def test_same_arguments_give_identical_scene_in_any_order() -> None:
    later = [render_scene(i, seed=3, split="train") for i in (7, 5, 6)]
    first = render_scene(5, seed=3, split="train")
    assert np.array_equal(pixels(first.image), pixels(later[1].image))
    assert first.caption == later[1].caption and first.objects == later[1].objects
    assert first.background == later[1].background


def test_index_seed_and_split_each_change_the_image() -> None:
    base = pixels(render_scene(5).image)
    for other in (render_scene(6), render_scene(5, seed=1), render_scene(5, split="seen_eval")):
        assert not np.array_equal(base, pixels(other.image))


@pytest.mark.parametrize("size", [64, 96])
def test_image_is_rgb_of_requested_size(size: int) -> None:
    for i in range(20):
        image = render_scene(i, image_size=size).image
        assert image.mode == "RGB" and image.size == (size, size)


def test_unknown_split_is_rejected() -> None:
    with pytest.raises(ValueError, match="split"):
        render_scene(0, split="test")
    with pytest.raises(ValueError, match="split"):
        SyntheticCaptions(split="validation")


def test_train_never_draws_a_heldout_pair(train_scenes) -> None:
    drawn = {(o["colour"], o["shape"]) for s in train_scenes for o in s.objects}
    assert not drawn & set(HELDOUT_PAIRS)
    # and the training split does cover every seen pair, colour, shape, size, cell, background
    assert drawn == set(SEEN_PAIRS)
    objects = [o for s in train_scenes for o in s.objects]
    assert {o["colour"] for o in objects} == set(COLOURS)
    assert {o["shape"] for o in objects} == set(SHAPES)
    assert {o["size"] for o in objects} == set(SIZES)
    assert {cell for o in objects for cell in o["cells"]} == set(POSITIONS)
    assert {s.background for s in train_scenes} == set(BACKGROUNDS)
    assert {o["count"] for o in objects} == {1, 2, 3}
    two_kinds = sum(len(s.objects) == 2 for s in train_scenes) / len(train_scenes)
    assert 0.15 < two_kinds < 0.35


def test_seen_eval_draws_only_seen_pairs() -> None:
    for i in range(1000):
        for o in render_scene(i, split="seen_eval").objects:
            assert (o["colour"], o["shape"]) in SEEN_PAIRS


def test_heldout_main_object_is_always_a_heldout_pair() -> None:
    mains = [render_scene(i, split="heldout").objects[0] for i in range(1000)]
    pairs = {(o["colour"], o["shape"]) for o in mains}
    assert pairs == set(HELDOUT_PAIRS)


def test_objects_occupy_distinct_cells(train_scenes) -> None:
    for scene in train_scenes[:1000]:
        cells = [cell for o in scene.objects for cell in o["cells"]]
        assert len(cells) == len(set(cells))
        for o in scene.objects:
            assert len(o["cells"]) == o["count"]
            assert o["position"] == (o["cells"][0] if o["count"] == 1 else None)


def test_objects_are_actually_drawn() -> None:
    # Each object's colour must cover a sizeable patch of its grid cell (jitter allowed).
    for i in range(300):
        scene = render_scene(i)
        image = pixels(scene.image).astype(int)
        for o in scene.objects:
            rgb = np.array(COLOURS[o["colour"]])
            near = np.abs(image - rgb).max(axis=-1) <= 24
            for cell in o["cells"]:
                col, row = POSITIONS[cell]
                box = near[max(row * 21 - 4, 0):row * 21 + 25, max(col * 21 - 4, 0):col * 21 + 25]
                assert box.sum() >= 40, (i, o, cell)


def test_captions_name_colour_shape_and_count(train_scenes) -> None:
    for scene in train_scenes:
        words = scene.caption.rstrip(".").split()
        for o in scene.objects:
            shape = o["shape"]
            if o["count"] == 1:
                assert shape in words, scene.caption
            else:
                assert (shape + "es" if shape == "cross" else shape + "s") in words
                assert COUNT_WORDS[o["count"]] in words, scene.caption
            assert o["colour"] in words, scene.caption
        assert "a orange" not in scene.caption and " a a" not in scene.caption
        if len(scene.objects) == 1 and scene.objects[0]["count"] == 1:
            assert not {"two", "three"} & set(words), scene.caption


def test_orange_takes_an() -> None:
    captions = [s.caption for s in (render_scene(i) for i in range(3000))
                if s.objects[0]["colour"] == "orange" and s.objects[0]["count"] == 1
                and len(s.objects) == 1 and s.objects[0]["size"] != "large"]
    assert any("an orange" in c for c in captions)


def test_captions_are_varied(train_scenes) -> None:
    captions = [s.caption for s in train_scenes[:2000]]
    assert len(set(captions)) > 200
    joined = " ".join(captions)
    for phrase in ("background", "corner", "there is", "there are", "a picture of", "big"):
        assert phrase in joined


def test_zero_shot_set_is_balanced_and_labels_match_the_objects() -> None:
    for split, pairs in (("seen_eval", SEEN_PAIRS), ("heldout", HELDOUT_PAIRS)):
        n = 3 * len(pairs)
        images, labels = zero_shot_set(split, n)
        assert len(images) == n and all(im.size == (64, 64) for im in images)
        assert Counter(labels) == {class_index(*p): 3 for p in pairs}
    images, labels = zero_shot_set("heldout", 16, seed=2)
    again, _ = zero_shot_set("heldout", 16, seed=2)
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(images, again))
    for label, image in zip(labels, images):
        colour, shape = CLASSNAMES[label].split()
        rgb = np.array(COLOURS[colour])
        assert (np.abs(pixels(image).astype(int) - rgb).max(axis=-1) <= 24).sum() >= 40
    with pytest.raises(ValueError):
        zero_shot_set("train", 4)


def test_eval_sets_do_not_repeat_training_or_seen_eval_images() -> None:
    others = [pixels(render_scene(i, split=split).image)
              for split in ("train", "seen_eval") for i in range(20)]
    for images in (zero_shot_set("seen_eval", 20)[0], retrieval_set(20)[0]):
        assert not any(np.array_equal(pixels(a), b) for a in images for b in others)


def test_classnames_and_prompts() -> None:
    assert len(CLASSNAMES) == len(set(CLASSNAMES)) == 48
    for colour in COLOURS:
        for shape in SHAPES:
            assert CLASSNAMES[class_index(colour, shape)] == f"{colour} {shape}"
    assert all(t.count("{}") == 1 for t in TEMPLATES)
    # Filled with plain str.format, as zero-shot classifiers do, every prompt is grammatical.
    prompts = [t.format(name) for name in CLASSNAMES for t in TEMPLATES]
    assert not [p for p in prompts if re.search(r"\ba [aeiou]", p)]
    assert "a photo of one orange star." in prompts


def test_template_phrasing_occurs_in_training_captions(train_scenes) -> None:
    captions = [s.caption.rstrip(".") for s in train_scenes]
    for template in TEMPLATES:
        prefix = template.split("{}")[0]
        assert any(c.startswith(prefix) for c in captions), template


def test_retrieval_set_is_detailed_and_seen_only() -> None:
    images, captions = retrieval_set(200, seed=1)
    assert len(images) == len(captions) == 200
    assert len(set(captions)) > 190
    assert all("background" in c or "on " in c for c in captions)
    heldout_phrases = [f"{c} {s}" for c, s in HELDOUT_PAIRS]
    assert not any(p in c for p in heldout_phrases for c in captions)


def test_dataset_items_equal_render_scene() -> None:
    data = SyntheticCaptions(seed=4, split="heldout")
    assert len(data) == 2**31 - 1
    for i in (0, 17, 2**31 - 2):
        image, caption = data[i]
        scene = render_scene(i, seed=4, split="heldout")
        assert caption == scene.caption
        assert np.array_equal(pixels(image), pixels(scene.image))
    with pytest.raises(IndexError):
        SyntheticCaptions(length=10)[10]

"""The built-in synthetic image-caption data: determinism, what training shows and never shows,
the shift suites, the second renderer, and the evaluation sets."""

from __future__ import annotations

import ast
import inspect
from collections import Counter

import numpy as np
import pytest

from clipforge.data import draw, sdf, synthetic
from clipforge.data.synthetic import (
    CLASSNAMES,
    COLOURS,
    HELDOUT_BACKGROUNDS,
    HELDOUT_PAIRS,
    HELDOUT_STYLES,
    LARGER,
    POSITIONS,
    SEEN_PAIRS,
    SHAPES,
    SHIFT_SUITES,
    SIZES,
    SMALLER,
    SUITES,
    TRAIN_BACKGROUNDS,
    TRAIN_STYLES,
    SyntheticCaptions,
    binding_set,
    class_index,
    probe_set,
    render_scene,
    retrieval_set,
    suite_set,
    zero_shot_set,
)

COUNT_WORDS = {2: "two", 3: "three"}


def pixels(image) -> np.ndarray:
    return np.asarray(image)


@pytest.fixture(scope="module")
def train_scenes():
    return [render_scene(i) for i in range(3000)]


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
    assert (first.background, first.style, first.language) == \
        (later[1].background, later[1].style, later[1].language)


def test_index_seed_and_split_each_change_the_image() -> None:
    base = pixels(render_scene(5).image)
    for other in (render_scene(6), render_scene(5, seed=1), render_scene(5, split="seen_eval")):
        assert not np.array_equal(base, pixels(other.image))


@pytest.mark.parametrize("size", [32, 64, 96])
def test_image_is_rgb_of_requested_size(size: int) -> None:
    for i in range(20):
        image = render_scene(i, image_size=size).image
        assert image.mode == "RGB" and image.size == (size, size)
    for name in SUITES:
        assert all(im.size == (size, size) and im.mode == "RGB"
                   for im in suite_set(name, 3, image_size=size)[0])


def test_unknown_split_suite_and_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="split"):
        render_scene(0, split="test")
    with pytest.raises(ValueError, match="split"):
        SyntheticCaptions(split="validation")
    with pytest.raises(ValueError, match="suite"):
        suite_set("sketch", 4)
    with pytest.raises(ValueError, match="style"):
        draw.draw_scene(np.random.default_rng(0), [], "watercolour", "plain", 64)
    with pytest.raises(ValueError, match="background"):
        draw.draw_scene(np.random.default_rng(0), [], "filled", "marble", 64)


def test_training_spans_every_style_background_size_cell_and_count(train_scenes) -> None:
    objects = [o for s in train_scenes for o in s.objects]
    assert {(o["colour"], o["shape"]) for o in objects} == set(SEEN_PAIRS)
    assert {s.style for s in train_scenes} == set(TRAIN_STYLES)
    assert {s.background for s in train_scenes} == set(TRAIN_BACKGROUNDS)
    assert {o["size"] for o in objects} == set(SIZES)
    assert {cell for o in objects for cell in o["cells"]} == set(POSITIONS)
    assert {o["count"] for o in objects} == {1, 2, 3}
    two_kinds = sum(len(s.objects) == 2 for s in train_scenes) / len(train_scenes)
    assert 0.07 < two_kinds < 0.13
    for o in objects:
        low, high = SIZES[o["size"]]
        assert low <= o["diameter"] < high


def test_training_never_shows_what_the_shift_suites_test(train_scenes) -> None:
    """Held-out pairs, the held-out style and background family, out-of-range sizes: never
    drawn in training; each shift suite is made of exactly one of them (or the renderer)."""
    objects = [o for s in train_scenes for o in s.objects]
    assert not {(o["colour"], o["shape"]) for o in objects} & set(HELDOUT_PAIRS)
    assert not set(HELDOUT_STYLES) & {s.style for s in train_scenes}
    assert not set(HELDOUT_BACKGROUNDS) & {s.background for s in train_scenes}
    # every style and background the renderer has is either trained on or a shift
    assert set(HELDOUT_STYLES) | set(TRAIN_STYLES) == set(draw.STYLES)
    assert set(HELDOUT_BACKGROUNDS) | set(TRAIN_BACKGROUNDS) == set(draw.BACKGROUNDS)
    diameters = [o["diameter"] for o in objects]
    assert SMALLER[1] < min(diameters) and max(diameters) < LARGER[0]
    shifts = {name: SUITES[name] for name in SHIFT_SUITES}
    assert set(shifts) == {"style", "background", "smaller", "larger", "renderer"}
    assert shifts["style"].styles == HELDOUT_STYLES
    assert not set(shifts["style"].styles) & set(TRAIN_STYLES)
    assert shifts["background"].backgrounds == HELDOUT_BACKGROUNDS
    assert not set(shifts["background"].backgrounds) & set(TRAIN_BACKGROUNDS)
    assert shifts["renderer"].renderer == "sdf"
    for suite in shifts.values():
        assert suite.pairs == SEEN_PAIRS  # a shift of the images, not of the classes
    assert not SUITES["seen"].shift and not SUITES["heldout"].shift


def test_backgrounds_span_black_to_white(train_scenes) -> None:
    luminance = [pixels(s.image).astype(float).mean() for s in train_scenes]
    assert min(luminance) < 40 and max(luminance) > 215
    # pale backgrounds (the first run's failure) are common, not rare
    assert sum(v > 170 for v in luminance) / len(luminance) > 0.1


def test_every_object_stands_out_from_its_background() -> None:
    """Drawn without degradations, every object's colour covers pixels in its own grid cell,
    and the background under it is far from that colour (MIN_CONTRAST) in nearly all scenes."""
    for i in range(300):
        rng = np.random.default_rng([0, i, 99])
        scene = render_scene(i)
        image, _ = draw.draw_scene(rng, scene.objects, "filled", scene.background, 64,
                                   degrade=False)
        values = pixels(image).astype(int)
        for o in scene.objects:
            near = np.abs(values - np.array(COLOURS[o["colour"]])).max(axis=-1) <= 30
            for cell in o["cells"]:
                col, row = draw.CELLS[cell]
                box = near[max(row * 21 - 6, 0):row * 21 + 27, max(col * 21 - 6, 0):col * 21 + 27]
                assert box.sum() >= 40, (i, o, cell)


def test_every_style_draws_a_different_mask() -> None:
    objects = [synthetic._object(("red", "star"), 0.45, ["center"])]
    masks = {}
    for style in draw.STYLES:
        image, _ = draw.draw_scene(np.random.default_rng(1), objects, style, "plain", 64,
                                   degrade=False)
        values = pixels(image).astype(int)
        masks[style] = np.abs(values - np.array(COLOURS["red"])).max(axis=-1) <= 40
    filled = masks["filled"].sum()
    assert masks["outlined"].sum() < 0.6 * filled
    assert masks["hatched"].sum() < 0.8 * filled
    assert len({m.tobytes() for m in masks.values()}) == len(draw.STYLES)


def test_suites_are_balanced_and_labelled_by_their_objects() -> None:
    for name, suite in SUITES.items():
        n = 2 * len(suite.pairs)
        images, labels = suite_set(name, n, seed=1)
        assert len(images) == n
        assert Counter(labels) == {class_index(*p): 2 for p in suite.pairs}
        again, _ = suite_set(name, n, seed=1)
        assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(images, again))
    # the drawn colour is the label's, in either renderer's palette (a thin, blurred outline
    # may keep few pixels of it)
    for name, palette in (("seen", COLOURS), ("renderer", sdf.PALETTE)):
        images, labels = suite_set(name, 80)
        found = []
        for label, image in zip(labels, images):
            colour = CLASSNAMES[label].split()[0]
            near = np.abs(pixels(image).astype(int) - np.array(palette[colour])).max(axis=-1)
            found.append((near <= 40).sum() >= 6)
        assert np.mean(found) > 0.9, name


def test_zero_shot_set_is_the_training_distribution_suite() -> None:
    images, labels = zero_shot_set("heldout", 16, seed=2)
    suite_images, suite_labels = suite_set("heldout", 16, seed=2)
    assert labels == suite_labels
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(images, suite_images))
    assert set(labels) == {class_index(*p) for p in HELDOUT_PAIRS}
    with pytest.raises(ValueError):
        zero_shot_set("train", 4)


def test_eval_sets_do_not_repeat_training_images() -> None:
    training = {pixels(render_scene(i, split=split).image).tobytes()
                for split in ("train", "seen_eval") for i in range(40)}
    sets = [suite_set(name, 40)[0] for name in SUITES]
    sets += [probe_set(40)[0], retrieval_set(40)[0], binding_set(40)[0]]
    for images in sets:
        assert not {pixels(im).tobytes() for im in images} & training


def test_probe_set_covers_every_class_in_the_training_style() -> None:
    images, labels = probe_set(2 * len(CLASSNAMES), seed=3)
    assert Counter(labels) == {k: 2 for k in range(len(CLASSNAMES))}


def test_retrieval_set_is_detailed_seen_only_and_the_same_images_in_every_language() -> None:
    images, captions = retrieval_set(200, seed=1)
    assert len(images) == len(captions) == 200
    assert len(set(captions)) > 150
    heldout_phrases = [f"{c} {s}" for c, s in HELDOUT_PAIRS]
    assert not any(p in c for p in heldout_phrases for c in captions)
    for language in ("zh", "ru"):
        other, texts = retrieval_set(20, seed=1, language=language)
        assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(images, other))
        assert texts != captions[:20]


def test_binding_set_has_two_objects_that_differ_in_colour_and_shape() -> None:
    images, pairs = binding_set(60, seed=0)
    assert len(images) == len(pairs) == 60
    for a, b in pairs:
        assert a in SEEN_PAIRS and b in SEEN_PAIRS
        assert a[0] != b[0] and a[1] != b[1]
    assert len({p[0] for p in pairs}) > 20  # the order a caption names them varies


def test_second_renderer_shares_no_code_and_no_palette_with_the_first() -> None:
    tree = ast.parse(inspect.getsource(sdf))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {f"{node.module}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "math", "numpy", "PIL"}, imported
    assert set(sdf.PALETTE) == set(COLOURS)
    assert all(sdf.PALETTE[c] != COLOURS[c] for c in COLOURS)


def test_missing_scikit_image_is_named(monkeypatch) -> None:
    from importlib import resources

    def missing(package):
        raise ModuleNotFoundError(package)

    draw._photos.cache_clear()
    monkeypatch.setattr(resources, "files", missing)
    try:
        with pytest.raises(RuntimeError, match="pip install scikit-image"):
            draw._photos()
    finally:
        monkeypatch.undo()
        draw._photos.cache_clear()


def test_captions_name_colour_shape_and_count_in_english(train_scenes) -> None:
    for scene in train_scenes:
        if scene.language != "en":
            continue
        words = scene.caption.rstrip(".").split()
        for o in scene.objects:
            shape = o["shape"]
            if o["count"] == 1:
                assert shape in words, scene.caption
            else:
                assert (shape + "es" if shape == "cross" else shape + "s") in words
                assert COUNT_WORDS[o["count"]] in words, scene.caption
            assert o["colour"] in words, scene.caption
        if len(scene.objects) == 1 and scene.objects[0]["count"] == 1:
            assert not {"two", "three"} & set(words), scene.caption


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


def test_curriculum_starts_easy_and_ends_at_the_full_distribution(monkeypatch) -> None:
    """Sample 0 of a curriculum is filled, on a plain or gradient background of mid tones,
    nearly upright; past the curriculum every sample equals the full distribution's.  (With
    every style and background in training, to see them come in.)"""
    monkeypatch.setattr(synthetic, "TRAIN_STYLES", {s: 1.0 for s in draw.STYLES if s != "hatched"})
    monkeypatch.setattr(synthetic, "TRAIN_BACKGROUNDS", {b: 1.0 for b in draw.BACKGROUNDS})
    easy = SyntheticCaptions(seed=2, curriculum=1000)
    full = SyntheticCaptions(seed=2)
    for i in range(40):  # spread < 0.0001: all easy
        scene = render_scene(i, seed=2, spread=synthetic.curriculum_spread(i, 400_000))
        assert scene.style == "filled" and scene.background in synthetic.EASY_BACKGROUNDS
        corners = pixels(draw_plain(scene)).reshape(-1, 3)
        # tones within 0.5 +- (EASY_TONES + a little: the curriculum has begun) of the range
        assert corners.max() <= 255 * (0.5 + draw.EASY_TONES) + 14
        assert corners.max(axis=1).min() >= 255 * (0.5 - draw.EASY_TONES) - 14
    late = [render_scene(i, seed=2, spread=synthetic.curriculum_spread(i, 1000))
            for i in range(1000, 1200)]
    assert {s.style for s in late} > {"filled"} and len({s.background for s in late}) > 2
    late_tones = [pixels(draw_plain(s)).max() for s in late if s.background == "plain"]
    assert min(late_tones) < 255 * 0.3 and max(late_tones) > 255 * 0.75
    for i in (1000, 1234, 2**31 - 2):
        a, b = easy[i], full[i]
        assert a[1] == b[1] and np.array_equal(pixels(a[0]), pixels(b[0]))
    assert synthetic.curriculum_spread(500, 1000) == 0.5
    assert synthetic.curriculum_spread(5, 0) == 1.0
    with pytest.raises(ValueError, match="curriculum"):
        SyntheticCaptions(curriculum=-1)
    with pytest.raises(ValueError, match="spread"):
        draw.draw_scene(np.random.default_rng(0), [], "filled", "plain", 16, spread=1.5)


def draw_plain(scene) -> np.ndarray:
    """The image's four corner pixels (a background where no object reaches)."""
    image = np.asarray(scene.image)
    return np.stack([image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]])

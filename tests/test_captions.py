"""Captions of the built-in dataset in English, Chinese and Russian: grammar (articles, measure
words, gender and number agreement), zero-shot prompts, and lengths in BPE tokens."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from clipforge.data.captions import (
    LANGUAGES,
    RU_COLOURS,
    RU_SHAPES,
    TEMPLATES,
    ZH_COLOURS,
    ZH_SHAPES,
    class_name,
    describe,
    noun_phrase,
    pair_phrase,
)
from clipforge.data.synthetic import COLOURS, SHAPES, class_names, render_scene
from clipforge.text import get_tokenizer


def obj(colour: str, shape: str, count: int = 1, size: str = "small",
        position: str | None = "top left") -> dict:
    return {"colour": colour, "shape": shape, "count": count, "size": size,
            "position": position if count == 1 else None}


@pytest.fixture(scope="module")
def scenes():
    return [render_scene(i) for i in range(3000)]


# --------------------------------------------------------------------------- Russian

@pytest.mark.parametrize(("colour", "shape", "count", "expected"), [
    ("red", "circle", 1, "красный круг"),
    ("red", "star", 1, "красная звезда"),
    ("red", "heart", 1, "красное сердце"),
    ("red", "circle", 2, "два красных круга"),
    ("red", "heart", 2, "два красных сердца"),
    ("blue", "star", 2, "две синие звезды"),
    ("blue", "star", 3, "три синие звезды"),
    ("blue", "square", 3, "три синих квадрата"),
    ("yellow", "cross", 2, "два жёлтых креста"),
    ("blue", "heart", 1, "синее сердце"),
    ("blue", "star", 1, "синяя звезда"),
])
def test_russian_adjectives_agree_in_gender_number_and_case(colour, shape, count,
                                                            expected) -> None:
    assert noun_phrase("ru", obj(colour, shape, count), None) == expected


def test_russian_size_words_and_numerals_agree_as_well() -> None:
    assert noun_phrase("ru", obj("red", "star", 1, "small"), None, size=True) == \
        "маленькая красная звезда"
    assert noun_phrase("ru", obj("red", "heart", 2, "large"), None, size=True) == \
        "два больших красных сердца"
    assert noun_phrase("ru", obj("green", "star", 2, "medium"), None, size=True) == \
        "две средние зелёные звезды"
    assert noun_phrase("ru", obj("red", "heart"), None, one=True) == "одно красное сердце"
    assert noun_phrase("ru", obj("red", "star"), None, one=True) == "одна красная звезда"
    assert noun_phrase("ru", obj("red", "circle"), None, one=True) == "один красный круг"


ENDINGS = {"m": ("ый", "ий", "ой"), "f": ("ая", "яя"), "n": ("ое", "ее")}


def test_every_russian_phrase_agrees(scenes) -> None:
    """In every Russian training caption, each noun's adjectives take the noun's form, or
    the colour follows the noun in the genitive ("звезда зелёного цвета")."""
    checked = colour_after = 0
    for scene in scenes:
        if scene.language != "ru":
            continue
        for o in scene.objects:
            noun, gender, genitive = RU_SHAPES[o["shape"]]
            colour = RU_COLOURS[o["colour"]]
            after = f"{colour['gen']} цвета"  # "звезда зелёного цвета": agrees with nothing
            if o["count"] == 1:
                assert f"{colour[gender]} {noun}" in scene.caption or \
                    re.search(rf"\b{noun} {after}", scene.caption), scene.caption
            else:
                form = "pl" if gender == "f" else "gen_pl"
                numeral = {2: "две" if gender == "f" else "два", 3: "три"}[o["count"]]
                assert re.search(rf"\b{numeral} (\w+ )?{colour[form]} {genitive}\b",
                                 scene.caption) or re.search(
                    rf"\b{numeral} (\w+ )?{genitive} {after}", scene.caption), scene.caption
            colour_after += after in scene.caption
            checked += 1
        words = scene.caption.rstrip(".").split()
        if "нарисован" in words:
            assert len(scene.objects) == 1 and scene.objects[0]["count"] == 1
            assert RU_SHAPES[scene.objects[0]["shape"]][1] == "m"
        for participle, gender in (("нарисована", "f"), ("нарисовано", "n")):
            if participle in words:
                assert [RU_SHAPES[o["shape"]][1] for o in scene.objects] == [gender]
        if "нарисованы" in words:
            assert len(scene.objects) == 2 or scene.objects[0]["count"] > 1
    assert checked > 800
    assert 0.35 < colour_after / checked < 0.65  # RU_COLOUR_AFTER_P of the phrases


# --------------------------------------------------------------------------- Chinese

def test_chinese_measure_words_and_numbers() -> None:
    assert noun_phrase("zh", obj("red", "circle"), None) == "一个红色的圆形"
    assert noun_phrase("zh", obj("blue", "star", 2), None) == "两颗蓝色的星星"
    assert noun_phrase("zh", obj("green", "heart", 3), None) == "三颗绿色的爱心"
    assert noun_phrase("zh", obj("red", "circle", 1, "small"), None, size=True) == \
        "一个红色的小圆形"
    assert noun_phrase("zh", obj("red", "circle", 1, "medium"), None, size=True) == \
        "一个中等大小的红色圆形"


def test_every_chinese_phrase_has_number_measure_word_colour_and_noun(scenes) -> None:
    numbers = {1: "一", 2: "两", 3: "三"}
    checked = 0
    for scene in scenes:
        if scene.language != "zh":
            continue
        assert "二" not in scene.caption  # two of something is 两, never 二
        for o in scene.objects:
            options = "|".join(f"{numbers[o['count']]}{measure}[^和，。]*{noun}"
                               for noun, measure in ZH_SHAPES[o["shape"]])
            assert re.search(options, scene.caption), scene.caption
            assert ZH_COLOURS[o["colour"]] in scene.caption, scene.caption
            checked += 1
    assert checked > 800


# --------------------------------------------------------------------------- English

def test_english_articles_and_plurals(scenes) -> None:
    assert noun_phrase("en", obj("orange", "star"), None) == "an orange star"
    assert noun_phrase("en", obj("red", "cross", 2), None) == "two red crosses"
    assert noun_phrase("en", obj("red", "star"), None, style="outlined") == "an outlined red star"
    for scene in scenes:
        if scene.language == "en":
            assert not re.search(r"\ba [aeiou]", scene.caption), scene.caption
            assert not re.search(r"\ban [^aeiou]", scene.caption), scene.caption


# --------------------------------------------------------------------------- all languages

def test_languages_are_drawn_equally_often_and_every_caption_names_its_objects(scenes) -> None:
    counts = Counter(s.language for s in scenes)
    assert set(counts) == set(LANGUAGES)
    assert all(abs(c / len(scenes) - 1 / 3) < 0.04 for c in counts.values())
    for scene in scenes:
        for o in scene.objects:
            if scene.language == "en":
                assert o["colour"] in scene.caption and o["shape"] in scene.caption
            elif scene.language == "ru":
                assert RU_SHAPES[o["shape"]][0 if o["count"] == 1 else 2] in scene.caption


def test_the_caption_does_not_change_the_image() -> None:
    scenes = [render_scene(7, language=language) for language in LANGUAGES]
    images = [np.asarray(s.image) for s in scenes]
    assert all(np.array_equal(images[0], im) for im in images[1:])
    assert len({s.caption for s in scenes}) == 3
    with pytest.raises(ValueError, match="language"):
        render_scene(0, language="fr")


def test_class_names_and_templates_in_every_language() -> None:
    for language in LANGUAGES:
        names = class_names(language)
        assert len(set(names)) == len(COLOURS) * len(SHAPES)
        assert all(t.count("{}") == 1 for t in TEMPLATES[language])
    assert class_name("zh", "blue", "star") == "一颗蓝色的星星"
    assert class_name("ru", "red", "heart") == "сердце красного цвета"
    assert "a photo of one orange star." in [t.format(n) for n in class_names("en")
                                             for t in TEMPLATES["en"]]
    with pytest.raises(ValueError, match="language"):
        class_name("de", "red", "star")


def test_prompt_phrasing_occurs_in_training_captions(scenes) -> None:
    """Each template's words around the class name appear in captions of its language."""
    for language in LANGUAGES:
        texts = [s.caption.rstrip(".。") for s in scenes if s.language == language]
        for template in TEMPLATES[language]:
            prefix = template.split("{}")[0]
            assert any(c.startswith(prefix) for c in texts), (language, template)


def test_binding_phrases_swap_attributes_only() -> None:
    a, b = ("red", "circle"), ("blue", "star")
    assert pair_phrase("en", [a, b]) == "a red circle and a blue star"
    assert pair_phrase("en", [("blue", "circle"), ("red", "star")]) == \
        "a blue circle and a red star"
    assert pair_phrase("zh", [a, b]) == "一个红色的圆形和一颗蓝色的星星"
    assert pair_phrase("ru", [a, b]) == "красный круг и синяя звезда"
    assert pair_phrase("ru", [("blue", "circle"), ("red", "star")]) == \
        "синий круг и красная звезда"


def test_captions_fit_the_context_in_bpe_tokens(scenes) -> None:
    """OpenAI's byte-level BPE encodes every script, at a cost: about 11 tokens for an English
    caption, 36 for Chinese, 42 for Russian.  No training caption may need truncation."""
    tokenizer = get_tokenizer()
    lengths: dict[str, list[int]] = {language: [] for language in LANGUAGES}
    for scene in scenes:
        lengths[scene.language].append(len(tokenizer.encode(scene.caption)) + 2)
    assert max(max(v) for v in lengths.values()) <= 77
    means = {k: float(np.mean(v)) for k, v in lengths.items()}
    assert means["en"] < means["zh"] < means["ru"] < 50


def test_detailed_captions_name_size_position_and_background() -> None:
    o = obj("red", "star", 1, "large", "bottom right")
    for seed in range(10):
        en = describe("en", [o], "white", "filled", np.random.default_rng(seed), detailed=True)
        assert re.fullmatch(r"(an?|one) (large|big) red star (in the bottom right corner|at "
                            r"the bottom right|in the lower right) on (a white background|white)"
                            r"\.?", en), en
        ru = describe("ru", [o], "white", "filled", np.random.default_rng(seed), detailed=True)
        assert ru.rstrip(".").removeprefix("одна ") in (
            "большая красная звезда справа внизу на белом фоне",
            "большая звезда красного цвета справа внизу на белом фоне")
        zh = describe("zh", [o], "white", "filled", np.random.default_rng(seed), detailed=True)
        assert zh.rstrip("。") in ("白色背景的右下角有一颗红色的大星星",
                                   "白色背景的右下角有一个红色的大五角星")
    with pytest.raises(ValueError, match="language"):
        describe("fr", [o], None, "filled", np.random.default_rng(0))

"""Captions and zero-shot prompts for the built-in dataset in English, Chinese and Russian.

Each language is written in its own grammar rather than translated word by word:

* English: "a"/"an" by sound ("an orange star"), plurals ("two blue crosses");
* Chinese: a measure word between the number and the noun, chosen by the noun (一个红色的圆形,
  两颗蓝色的星星, 一颗爱心), no plural inflection, modifiers before the noun with 的;
* Russian: adjectives agree with the noun in gender and number (красный круг, красная звезда,
  красное сердце), and after два/две/три the noun takes the genitive singular while the
  adjectives take the genitive plural (два красных круга) or, with a feminine noun, the
  nominative plural (две красные звезды); the participle нарисован agrees as well.

A caption is drawn per sample from these phrasings, so that the model learns to answer prompts
in any of the three languages.  What the functions read is the ground truth of a scene: a list
of object dicts (``colour``, ``shape``, ``size``, ``count``, ``position``) as
:mod:`clipforge.data.synthetic` composes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

LANGUAGES: tuple[str, ...] = ("en", "zh", "ru")
LANGUAGE_NAMES = {"en": "English", "zh": "Chinese", "ru": "Russian"}

# --------------------------------------------------------------------------- English

EN_PLURALS = {"cross": "crosses"}
EN_COUNTS = {1: "one", 2: "two", 3: "three"}
EN_SIZES = {"small": ("small", "little"), "medium": ("medium-sized", "medium"),
            "large": ("large", "big")}
EN_STYLES = {"filled": ("solid", "filled"), "outlined": ("outlined", "hollow"),
             "sketched": ("hand-drawn", "sketched"), "soft": ("blurry", "soft-edged"),
             "shaded": ("shaded", "three-dimensional")}
EN_POSITIONS = {
    "top left": ("in the top left corner", "at the top left", "in the upper left"),
    "top": ("at the top", "near the top", "at the top center"),
    "top right": ("in the top right corner", "at the top right", "in the upper right"),
    "left": ("on the left", "on the left side", "at the left"),
    "center": ("in the center", "in the middle", "at the center"),
    "right": ("on the right", "on the right side", "at the right"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "in the lower left"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom center"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "in the lower right"),
}
EN_BACKGROUNDS = {
    "white": ("on a white background", "on white"),
    "black": ("on a black background", "on black"),
    "grey": ("on a grey background", "on a plain grey background"),
    "dark": ("on a dark background", "on a dark plain background"),
    "light": ("on a light background", "on a pale background"),
    "gradient": ("on a gradient background", "on a smooth gradient"),
    "texture": ("on a textured background", "on a mottled background"),
    "photo": ("on a photo", "on a photo background"),
}
# "{}" twice: the bare noun phrase is the most common caption form.
EN_FRAMES = ("{}", "{}", "a picture of {}", "an image of {}", "a drawing of {}", "a photo of {}",
             "a rendering of {}", "there {be} {}", "{} drawn on a canvas")
EN_ONE_P = 0.2  # how often a single object is "one red circle" rather than "a red circle"

# --------------------------------------------------------------------------- Chinese

ZH_COLOURS = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色",
              "purple": "紫色", "orange": "橙色", "white": "白色", "black": "黑色"}
# (noun, measure word): stars and hearts are counted with 颗, the rest with 个.
ZH_SHAPES: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("圆形", "个"), ("圆", "个")),
    "square": (("正方形", "个"), ("方块", "个")),
    "triangle": (("三角形", "个"),),
    "star": (("星星", "颗"), ("五角星", "个")),
    "heart": (("爱心", "颗"), ("心形", "个")),
    "cross": (("十字", "个"), ("十字形", "个")),
}
ZH_NUMBERS = {1: "一", 2: "两", 3: "三"}
ZH_SIZES = {"small": "小", "large": "大"}  # before the noun: 红色的小圆形
ZH_MEDIUM = "中等大小的"  # before the colour: 一个中等大小的红色圆形
ZH_STYLES = {"filled": "实心的", "outlined": "空心的", "sketched": "手绘的", "soft": "模糊的",
             "shaded": "立体的"}
ZH_POSITIONS = {"top left": "左上角", "top": "上方", "top right": "右上角", "left": "左边",
                "center": "中间", "right": "右边", "bottom left": "左下角", "bottom": "下方",
                "bottom right": "右下角"}
ZH_BACKGROUNDS = {"white": "白色背景", "black": "黑色背景", "grey": "灰色背景",
                  "dark": "深色背景", "light": "浅色背景", "gradient": "渐变背景",
                  "texture": "纹理背景", "photo": "照片"}
ZH_FRAMES = ("{}", "{}", "图中有{}", "图片里有{}", "画面上有{}", "这是{}", "一幅画，画着{}")

# --------------------------------------------------------------------------- Russian

# Adjective forms: masculine, feminine, neuter (nominative singular), nominative plural,
# genitive plural, and the genitive singular of "{} цвета" ("of ... colour").
_RU_FORMS = ("m", "f", "n", "pl", "gen_pl", "gen")


def _ru(*forms: str) -> dict[str, str]:
    """An adjective's forms (sizes and styles have no "цвета" form)."""
    return dict(zip(_RU_FORMS[:len(forms)], forms, strict=True))


RU_COLOURS = {
    "red": _ru("красный", "красная", "красное", "красные", "красных", "красного"),
    "green": _ru("зелёный", "зелёная", "зелёное", "зелёные", "зелёных", "зелёного"),
    "blue": _ru("синий", "синяя", "синее", "синие", "синих", "синего"),
    "yellow": _ru("жёлтый", "жёлтая", "жёлтое", "жёлтые", "жёлтых", "жёлтого"),
    "purple": _ru("фиолетовый", "фиолетовая", "фиолетовое", "фиолетовые", "фиолетовых",
                  "фиолетового"),
    "orange": _ru("оранжевый", "оранжевая", "оранжевое", "оранжевые", "оранжевых",
                  "оранжевого"),
    "white": _ru("белый", "белая", "белое", "белые", "белых", "белого"),
    "black": _ru("чёрный", "чёрная", "чёрное", "чёрные", "чёрных", "чёрного"),
}
# How often a Russian caption names the colour after the noun, "звезда зелёного цвета" (a
# star of green colour), a phrase that does not agree with the noun: star is the only feminine
# shape and heart the only neuter one, so a held-out pair such as green star would otherwise
# need an adjective form (зелёная) that no training caption shows.  Russian zero-shot prompts
# use this phrasing (class_name).
RU_COLOUR_AFTER_P = 0.5
RU_SIZES = {
    "small": _ru("маленький", "маленькая", "маленькое", "маленькие", "маленьких"),
    "medium": _ru("средний", "средняя", "среднее", "средние", "средних"),
    "large": _ru("большой", "большая", "большое", "большие", "больших"),
}
RU_STYLES = {
    "filled": _ru("сплошной", "сплошная", "сплошное", "сплошные", "сплошных"),
    "outlined": _ru("контурный", "контурная", "контурное", "контурные", "контурных"),
    "sketched": _ru("рисованный", "рисованная", "рисованное", "рисованные", "рисованных"),
    "soft": _ru("размытый", "размытая", "размытое", "размытые", "размытых"),
    "shaded": _ru("объёмный", "объёмная", "объёмное", "объёмные", "объёмных"),
}
# noun: (nominative singular, gender, genitive singular -- the form after два/три)
RU_SHAPES = {
    "circle": ("круг", "m", "круга"),
    "square": ("квадрат", "m", "квадрата"),
    "triangle": ("треугольник", "m", "треугольника"),
    "star": ("звезда", "f", "звезды"),
    "heart": ("сердце", "n", "сердца"),
    "cross": ("крест", "m", "креста"),
}
RU_ONE = {"m": "один", "f": "одна", "n": "одно"}
RU_TWO = {"m": "два", "f": "две", "n": "два"}
RU_DRAWN = {"m": "нарисован", "f": "нарисована", "n": "нарисовано", "pl": "нарисованы"}
RU_POSITIONS = {"top left": "слева вверху", "top": "вверху", "top right": "справа вверху",
                "left": "слева", "center": "в центре", "right": "справа",
                "bottom left": "слева внизу", "bottom": "внизу", "bottom right": "справа внизу"}
RU_BACKGROUNDS = {"white": "на белом фоне", "black": "на чёрном фоне", "grey": "на сером фоне",
                  "dark": "на тёмном фоне", "light": "на светлом фоне",
                  "gradient": "на градиентном фоне", "texture": "на пёстром фоне",
                  "photo": "на фоне фотографии"}
RU_FRAMES = ("{}", "{}", "это {}", "на картинке {}", "на рисунке {}", "на фото {}",
             "здесь {drawn} {}")

# --------------------------------------------------------------------------- zero-shot prompts

# Templates per language, filled with plain ``str.format`` by a class name of that language
# (:func:`class_names`).  English says "one {}", never "a {}", so that no class gets
# "a orange star"; Chinese class names carry their own number and measure word (一颗红色的星星),
# so its templates need none.  Every template's phrasing occurs in training captions.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "en": ("a photo of one {}.", "one {}.", "a picture of one {}.", "a drawing of one {}.",
           "there is one {}.", "an image of one {}."),
    "zh": ("图中有{}。", "{}。", "图片里有{}。", "画面上有{}。", "这是{}。", "一幅画，画着{}。"),
    "ru": ("на картинке {}.", "{}.", "это {}.", "на рисунке {}.", "на фото {}.", "{}"),
}


def class_name(language: str, colour: str, shape: str) -> str:
    """The zero-shot class name of a colour-shape pair: "red star", "一颗红色的星星",
    "красная звезда"."""
    if language == "en":
        return f"{colour} {shape}"
    if language == "zh":
        noun, measure = ZH_SHAPES[shape][0]
        return f"一{measure}{ZH_COLOURS[colour]}的{noun}"
    if language == "ru":  # "звезда зелёного цвета": see RU_COLOUR_AFTER_P
        return f"{RU_SHAPES[shape][0]} {RU_COLOURS[colour]['gen']} цвета"
    raise ValueError(f"unknown language {language!r}: choose one of {', '.join(LANGUAGES)}")


def pair_phrase(language: str, objects: Sequence[tuple[str, str]]) -> str:
    """The objects, one of each, joined by "and": "a red circle and a blue star",
    "一个红色的圆形和一颗蓝色的星星", "красный круг и синяя звезда".  The binding test's captions
    and their swapped negatives."""
    rng = None
    phrases = [noun_phrase(language, {"colour": c, "shape": s, "count": 1}, rng)
               for c, s in objects]
    return _join(language, phrases)


# --------------------------------------------------------------------------- noun phrases

Picker = Callable[[Sequence[str]], str]


def _picker(rng: np.random.Generator | None) -> Picker:
    """``rng`` picks among variants; without one, the first variant (the canonical form)."""
    if rng is None:
        return lambda options: options[0]
    return lambda options: options[rng.integers(len(options))]


def noun_phrase(language: str, obj: dict, rng: np.random.Generator | None,
                size: bool = False, style: str | None = None, one: bool = False,
                colour: bool = True) -> str:
    """The object (``obj["count"]`` copies) with its colour (unless not ``colour``), and its
    size word when ``size`` or its drawing style when ``style`` (one of the two, never both),
    in ``language``.  Without ``rng`` it is the canonical phrase; ``one``: "one red circle" in
    English, "один красный круг" in Russian (Chinese always has its number)."""
    pick = _picker(rng)
    modifier = ("size", obj["size"]) if size else ("style", style) if style else None
    if not colour:
        obj = {**obj, "colour": None}
    if language == "en":
        return _en_phrase(obj, modifier, pick, one)
    if language == "zh":
        return _zh_phrase(obj, modifier, pick)
    if language == "ru":
        after = rng is not None and rng.random() < RU_COLOUR_AFTER_P
        return _ru_phrase(obj, modifier, pick, one, after)
    raise ValueError(f"unknown language {language!r}: choose one of {', '.join(LANGUAGES)}")


def _en_phrase(obj: dict, modifier: tuple[str, str] | None, pick: Picker, one: bool) -> str:
    count = obj["count"]
    shape = obj["shape"] if count == 1 else EN_PLURALS.get(obj["shape"], obj["shape"] + "s")
    word = None
    if modifier is not None:
        kind, value = modifier
        word = pick((EN_SIZES if kind == "size" else EN_STYLES)[value])
    words = [w for w in (word, obj["colour"], shape) if w]
    if count == 1 and not one:
        return _indefinite(" ".join(words))
    return " ".join([EN_COUNTS[count], *words])


def _indefinite(phrase: str) -> str:
    """"a" or "an" by the first sound; every word here that starts with a vowel letter starts
    with a vowel sound ("an orange", "an outlined"), and none with a silent h."""
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _zh_phrase(obj: dict, modifier: tuple[str, str] | None, pick: Picker) -> str:
    noun, measure = pick(ZH_SHAPES[obj["shape"]])
    head = ZH_NUMBERS[obj["count"]] + measure
    if obj["colour"] is None:  # 一个圆形, 两颗小星星, 一个空心的圆形
        if modifier is None:
            return head + noun
        kind, value = modifier
        if kind == "size" and value in ZH_SIZES:
            return f"{head}{ZH_SIZES[value]}{noun}"
        return f"{head}{ZH_MEDIUM if kind == 'size' else ZH_STYLES[value]}{noun}"
    colour = ZH_COLOURS[obj["colour"]]
    if modifier is None:
        return head + pick((f"{colour}的{noun}", f"{colour}{noun}"))
    kind, value = modifier
    if kind == "size" and value in ZH_SIZES:
        return f"{head}{colour}的{ZH_SIZES[value]}{noun}"
    prefix = ZH_MEDIUM if kind == "size" else ZH_STYLES[value]
    return f"{head}{prefix}{colour}{noun}"


def _ru_phrase(obj: dict, modifier: tuple[str, str] | None, pick: Picker, one: bool,
               after: bool = False) -> str:
    """``after``: the colour follows the noun, "звезда зелёного цвета" (RU_COLOUR_AFTER_P)."""
    noun, gender, genitive = RU_SHAPES[obj["shape"]]
    adjectives = []
    if modifier is not None:
        kind, value = modifier
        adjectives.append((RU_SIZES if kind == "size" else RU_STYLES)[value])
    colour = RU_COLOURS[obj["colour"]] if obj["colour"] is not None else None
    if colour is not None and not after:
        adjectives.append(colour)
    of_colour = [colour["gen"], "цвета"] if colour is not None and after else []
    count = obj["count"]
    if count == 1:
        words = [a[gender] for a in adjectives] + [noun]
        return " ".join(([RU_ONE[gender]] if one else []) + words + of_colour)
    # 2-4: genitive singular noun; adjectives in the genitive plural, or with a feminine noun
    # in the nominative plural (две красные звезды, два красных круга).
    form = "pl" if gender == "f" else "gen_pl"
    numeral = RU_TWO[gender] if count == 2 else "три"
    return " ".join([numeral, *(a[form] for a in adjectives), genitive, *of_colour])


def _join(language: str, phrases: Sequence[str]) -> str:
    if language == "zh":
        return "和".join(phrases)
    return (" and " if language == "en" else " и ").join(phrases)


# --------------------------------------------------------------------------- whole captions

# How often a caption of one kind of object leaves its colour out ("two stars", "一个圆形",
# "треугольник"), as people's captions often do.  WIP (issue 12), measured on easy English data
# (wip-issue-12/FINDINGS.md): 0.3 raises shape in distribution (85% -> 91%) but lowers held-out
# compositions (64% -> 49%); not settled.
COLOURLESS_P = 0.0

# At most this many optional attributes (size, style, position, background) per caption of
# one kind of object, and of two kinds, outside ``detailed`` mode: byte-level BPE spends about
# one token per Russian letter and two to three per Chinese character, and a caption must fit
# the text tower's 77 tokens (the text tower's cost grows with the longest caption of a batch).
MAX_EXTRAS = {1: 2, 2: 0}


def describe(language: str, objects: Sequence[dict], background: str | None, style: str,
             rng: np.random.Generator, detailed: bool = False) -> str:
    """One caption of a scene.  Colour, shape and count always; size, drawing style, position
    and background only sometimes, at most MAX_EXTRAS of them (``detailed``: size and position
    of every object and the background, no style, no framing words).  ``background`` is a key of the
    backgrounds tables ("white", "dark", "photo" ...) or None for a background the captions
    never name."""
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}: choose one of {', '.join(LANGUAGES)}")

    def maybe(p: float) -> bool:
        return detailed or rng.random() < p

    single = len(objects) == 1
    colour = not (single and not detailed and rng.random() < COLOURLESS_P)
    extras: list[tuple[str, int]] = []
    for i, obj in enumerate(objects):
        if maybe(0.35 if single else 0.25):
            extras.append(("size", i))
        elif rng.random() < 0.2:
            extras.append(("style", i))
        if obj["count"] == 1 and maybe(0.35 if single else 0.25):
            extras.append(("position", i))
    if background is not None and maybe(0.3):
        extras.append(("background", -1))
    limit = MAX_EXTRAS[len(objects)]
    if not detailed and len(extras) > limit:
        extras = [extras[k] for k in sorted(rng.choice(len(extras), limit, replace=False))]
    phrases, positions = [], []
    for i, obj in enumerate(objects):
        phrases.append(noun_phrase(language, obj, rng, size=("size", i) in extras,
                                   style=style if ("style", i) in extras else None,
                                   one=rng.random() < EN_ONE_P, colour=colour))
        positions.append(obj["position"] if ("position", i) in extras else None)
    if not single and rng.random() < 0.5:
        phrases.reverse()
        positions.reverse()
    where = background if ("background", -1) in extras else None
    build = {"en": _en_caption, "zh": _zh_caption, "ru": _ru_caption}[language]
    return build(objects, phrases, positions, where, rng, not detailed)


def _en_caption(objects, phrases, positions, background, rng, framed: bool) -> str:
    pick = _picker(rng)
    parts = [p + (" " + pick(EN_POSITIONS[w]) if w else "") for p, w in zip(phrases, positions)]
    body = " and ".join(parts)
    if background:
        body += " " + pick(EN_BACKGROUNDS[background])
    plural = len(objects) == 1 and objects[0]["count"] > 1
    frame = pick(EN_FRAMES) if framed else "{}"
    caption = frame.replace("{be}", "are" if plural else "is").format(body)
    return caption + "." if rng.random() < 0.3 else caption


def _zh_caption(objects, phrases, positions, background, rng, framed: bool) -> str:
    pick = _picker(rng)
    if len(phrases) == 1 and positions[0]:
        place = ZH_POSITIONS[positions[0]]
        if background:  # 白色背景的左上角有一个红色的圆形
            body = f"{ZH_BACKGROUNDS[background]}的{place}有{phrases[0]}"
        else:
            body = pick((f"{place}有{phrases[0]}", f"{phrases[0]}在{place}"))
    elif any(positions):  # 左上角有一个红色的圆形，还有一颗蓝色的星星
        body = "，".join(f"{ZH_POSITIONS[w]}有{p}" if w else ("还有" if i else "有") + p
                        for i, (p, w) in enumerate(zip(phrases, positions)))
        if background:
            body = f"{ZH_BACKGROUNDS[background]}上，{body}"
    else:
        body = "和".join(phrases)
        body = f"{ZH_BACKGROUNDS[background]}上有{body}" if background else \
            (pick(ZH_FRAMES) if framed else "{}").format(body)
    return body + "。" if rng.random() < 0.3 else body


def _ru_caption(objects, phrases, positions, background, rng, framed: bool) -> str:
    pick = _picker(rng)
    parts = [p + (" " + RU_POSITIONS[w] if w else "") for p, w in zip(phrases, positions)]
    body = " и ".join(parts)
    if background:
        body += " " + RU_BACKGROUNDS[background]
    # "здесь нарисованы ..." only for one kind of object: two Russian noun phrases are long
    # in BPE tokens already.
    frames = RU_FRAMES if len(objects) == 1 else RU_FRAMES[:-1]
    frame = pick(frames) if framed else "{}"
    if "{drawn}" in frame:
        obj = objects[0]
        frame = frame.replace("{drawn}", RU_DRAWN["pl" if obj["count"] > 1 else
                                                   RU_SHAPES[obj["shape"]][1]])
    caption = frame.format(body)
    return caption + "." if rng.random() < 0.3 else caption

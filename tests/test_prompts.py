"""Zero-shot prompt data (``clipforge.prompts``): the shipped lists and the file readers.

The shipped lists are checked against published facts (dataset sizes, known entries, ImageNet's
two repeated names) and, where CLIP_benchmark or open_clip are installed, against their own
copies of the data, read as files (their packages are not imported).  Without them those checks
skip; the data was generated from and compared with both (see LICENSE-prompts.txt).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from clipforge import prompts
from clipforge.prompts import (
    DATASETS,
    OPENAI_DATASETS,
    PromptDataError,
    PromptSet,
    UnknownDatasetError,
    get_prompts,
    load_classnames,
    load_templates,
    validate_classnames,
    validate_templates,
)

# Published class counts and the number of templates shipped for each dataset.
EXPECTED = {
    "imagenet1k": (1000, 80), "cifar10": (10, 18), "cifar100": (100, 18), "food101": (101, 1),
    "pets": (37, 1), "flowers": (102, 1), "stl10": (10, 2), "eurosat": (10, 3),
    "sun397": (397, 2), "dtd": (47, 8), "gtsrb": (43, 3), "mnist": (10, 1), "cars": (196, 8),
    "fgvc_aircraft": (100, 2),
    "caltech101": (102, 34),  # Caltech-101's 101 categories and 'background', as published
    "caltech101_vtab": (102, 34), "country211": (211, 5), "fer2013": (7, 6), "pcam": (2, 2),
    "renderedsst2": (2, 1), "resisc45": (45, 4), "clevr_count_all": (8, 1),
    "kitti_closest_vehicle_distance": (4, 1), "voc2007": (20, 1), "svhn": (10, 6),
    "dmlab": (6, 1), "diabetic_retinopathy": (5, 1), "birdsnap": (500, 1), "ucf101": (101, 48),
    "kinetics700": (588, 28),  # OpenAI published 588 of Kinetics-700's 700 names
    "hateful_memes": (2, 1),
}
# The datasets of OpenAI's published lists: data/prompts.md's 26 and the ImageNet notebook.
OPENAI_KEYS = set(EXPECTED) - {"caltech101_vtab", "svhn", "dmlab", "diabetic_retinopathy"}


# --------------------------------------------------------------------------- shipped data


def test_imagenet_is_openais_curated_list():
    assert len(prompts.IMAGENET_CLASSNAMES) == 1000
    assert prompts.IMAGENET_CLASSNAMES[:3] == ["tench", "goldfish", "great white shark"]
    assert prompts.IMAGENET_CLASSNAMES[-1] == "toilet paper"
    assert len(prompts.IMAGENET_TEMPLATES) == 80
    assert prompts.IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert prompts.IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert prompts.IMAGENET_TEMPLATES_SIMPLE == [
        "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
        "a {} in a video game.", "art of the {}.", "a photo of the small {}."]
    assert set(prompts.IMAGENET_TEMPLATES_SIMPLE) <= set(prompts.IMAGENET_TEMPLATES)
    assert len(set(prompts.IMAGENET_TEMPLATES)) == 80


def test_imagenet_repeats_exactly_two_names():
    """OpenAI's curated names give two pairs of ImageNet classes the same name."""
    names = prompts.IMAGENET_CLASSNAMES
    repeats = {n: [i for i, m in enumerate(names) if m == n]
               for n, count in Counter(names).items() if count > 1}
    assert repeats == {"missile": [657, 744], "sunglasses": [836, 837]}
    assert len(set(names)) == 998


def test_every_dataset_has_its_published_size():
    assert {k: (len(v.classnames), len(v.templates)) for k, v in DATASETS.items()} == EXPECTED
    assert set(OPENAI_DATASETS) == OPENAI_KEYS
    for key, ps in DATASETS.items():
        assert ps.name == key and ps.source


@pytest.mark.parametrize("table", [DATASETS, OPENAI_DATASETS], ids=["benchmark", "openai"])
def test_every_shipped_list_is_valid(table):
    for key, ps in table.items():
        assert all(t.count("{}") == 1 for t in ps.templates), key
        assert validate_templates(ps.templates) == list(ps.templates)
        assert validate_classnames(ps.classnames) == list(ps.classnames)
        assert all(n == n.strip() for n in ps.classnames), key
        assert len(set(ps.templates)) == len(ps.templates), key
        if key != "imagenet1k":
            assert len(set(ps.classnames)) == len(ps.classnames), key


def test_known_entries():
    assert prompts.CIFAR10_CLASSNAMES == ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                          "frog", "horse", "ship", "truck"]
    assert prompts.CIFAR10_TEMPLATES[:2] == ["a photo of a {}.", "a blurry photo of a {}."]
    assert prompts.CIFAR100_CLASSNAMES[1] == "aquarium fish"  # spaced, unlike torchvision
    assert prompts.CIFAR100_CLASSNAMES[-1] == "worm"
    assert prompts.FOOD101_CLASSNAMES[0] == "apple pie"
    assert prompts.FOOD101_TEMPLATES == ["a photo of {}, a type of food."]
    assert prompts.PETS_CLASSNAMES[:2] == ["Abyssinian", "American Bulldog"]
    assert prompts.FLOWERS_CLASSNAMES[0] == "pink primrose"
    assert prompts.STL10_CLASSNAMES[7] == "monkey"
    assert prompts.SUN397_CLASSNAMES[0] == "abbey"
    assert prompts.DTD_CLASSNAMES[0] == "banded"
    assert prompts.GTSRB_CLASSNAMES[14] == "stop"
    assert prompts.GTSRB_TEMPLATES[0] == 'a zoomed in photo of a "{}" traffic sign.'
    assert prompts.MNIST_CLASSNAMES == [str(d) for d in range(10)]
    assert prompts.CARS_CLASSNAMES[0] == "AM General Hummer SUV 2000"
    assert prompts.CARS_TEMPLATES[3] == "i love my {}!"
    assert prompts.FGVC_AIRCRAFT_CLASSNAMES[:2] == ["707-320", "727-200"]
    assert prompts.CALTECH101_CLASSNAMES[:3] == ["background", "off-center face", "centered face"]
    assert "head of a  crocodile" in prompts.CALTECH101_CLASSNAMES  # sic, two spaces
    assert prompts.COUNTRY211_CLASSNAMES[37] == "Cote d'Ivoire"
    assert prompts.EUROSAT_CLASSNAMES[0] == "annual crop land"
    assert prompts.KITTI_CLOSEST_VEHICLE_DISTANCE_TEMPLATES == ["{}"]
    assert prompts.CLEVR_COUNT_ALL_CLASSNAMES[0] == "three"
    assert prompts.RENDEREDSST2_CLASSNAMES == ["negative", "positive"]
    assert prompts.VOC2007_CLASSNAMES[10] == "diningtable"
    assert prompts.BIRDSNAP_CLASSNAMES[0] == "Acadian Flycatcher"
    assert prompts.UCF101_CLASSNAMES[-1] == "Yo Yo"
    assert prompts.KINETICS700_CLASSNAMES[-2:] == ["stretching arm", "yoga"]
    assert prompts.HATEFUL_MEMES_CLASSNAMES == ["meme", "hatespeech meme"]


def test_openai_variant_keeps_openais_order_and_words():
    """Where CLIP_benchmark's lists differ from OpenAI's, both are there, with a note."""
    ours, theirs = DATASETS, OPENAI_DATASETS
    assert theirs["eurosat"].classnames[:2] == ("forest", "permanent crop land")
    assert sorted(theirs["eurosat"].classnames) == sorted(ours["eurosat"].classnames)
    assert theirs["pets"].classnames[12] == "american bulldog"
    assert sorted(map(str.lower, theirs["pets"].classnames)) == sorted(
        map(str.lower, ours["pets"].classnames))
    assert theirs["clevr_count_all"].classnames[:2] == ("10", "3")
    assert theirs["clevr_count_all"].templates == ("a photo of {} objects.",)
    assert theirs["voc2007"].classnames[16] == "diningtable"
    assert theirs["pcam"].templates == ("this is a photo of {}",)
    assert len(theirs["resisc45"].templates) == 18
    assert theirs["fer2013"].classnames == ("angry", "disgusted", "fearful", "happy", "sad",
                                            "surprised", "neutral")
    assert theirs["fer2013"].synonyms[5] == ("surprised", "shocked", "spooked")
    for key in ("eurosat", "pets", "clevr_count_all", "voc2007", "pcam", "resisc45", "fer2013"):
        assert ours[key] != theirs[key] and ours[key].note, key
    for key in OPENAI_KEYS - {"eurosat", "pets", "clevr_count_all", "voc2007", "pcam",
                              "resisc45", "fer2013"}:
        assert theirs[key].classnames == ours[key].classnames, key
        assert theirs[key].templates == ours[key].templates, key


def test_fer2013_synonyms_follow_the_shipped_order():
    assert prompts.FER2013_CLASSNAMES == ["angry", "disgusted", "fearful", "happy", "neutral",
                                          "sad", "surprised"]
    assert [s[0] for s in prompts.FER2013_SYNONYMS] == prompts.FER2013_CLASSNAMES
    assert prompts.FER2013_SYNONYMS[3] == ["happy", "smiling"]
    assert prompts.FER2013_SYNONYMS[4] == ["neutral", "bored"]


def test_module_constants_are_independent_lists():
    assert isinstance(prompts.IMAGENET_CLASSNAMES, list)
    assert prompts.SUN397_CLASSNAMES == list(DATASETS["sun397"].classnames)
    assert prompts.RESISC45_TEMPLATES == list(DATASETS["resisc45"].templates)
    for name in prompts.__all__:
        assert hasattr(prompts, name), name
    for key in DATASETS:
        prefix = "IMAGENET" if key == "imagenet1k" else key.upper()
        assert getattr(prompts, f"{prefix}_CLASSNAMES") == list(DATASETS[key].classnames)
        assert getattr(prompts, f"{prefix}_TEMPLATES") == list(DATASETS[key].templates)


def test_data_files_ship_with_the_package():
    folder = resources.files("clipforge.prompts")
    doc = json.loads(folder.joinpath("openai_prompts.json").read_text(encoding="utf-8"))
    assert set(doc["datasets"]) == set(EXPECTED)
    licence = folder.joinpath("LICENSE-prompts.txt").read_text(encoding="utf-8")
    for holder in ("Copyright (c) 2021 OpenAI", "Copyright (c) 2022, Mehdi Cherti",
                   "Gabriel Ilharco"):
        assert holder in licence


# --------------------------------------------------------------------------- get_prompts


def test_get_prompts_by_clip_benchmark_name():
    assert get_prompts("cifar10") is DATASETS["cifar10"]
    assert get_prompts(" CIFAR10 ") is DATASETS["cifar10"]
    assert get_prompts("vtab/eurosat") is DATASETS["eurosat"]
    assert get_prompts("wds/vtab/cifar100") is DATASETS["cifar100"]
    assert get_prompts("vtab/caltech101") is DATASETS["caltech101_vtab"]
    assert get_prompts("caltech101") is DATASETS["caltech101"]
    for alias in ("imagenet", "imagenetv2", "imagenet_sketch", "wds/imagenet1k"):
        assert get_prompts(alias) is DATASETS["imagenet1k"]
    assert get_prompts("eurosat", variant="openai") is OPENAI_DATASETS["eurosat"]


def test_get_prompts_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownDatasetError) as info:
        get_prompts("cifar-10")
    message = str(info.value)
    assert isinstance(info.value, KeyError)
    assert "'cifar-10'" in message and "did you mean 'cifar10'" in message
    assert all(key in message for key in DATASETS)
    with pytest.raises(UnknownDatasetError, match="no OpenAI prompts for dataset 'svhn'"):
        get_prompts("svhn", variant="openai")
    with pytest.raises(ValueError, match="variant must be one of"):
        get_prompts("cifar10", variant="paper")


def test_prompt_set_is_frozen_and_fills_templates():
    ps = PromptSet(["cat", "dog"], ["a photo of a {}.", "a {} in a video game."], name="pets")
    assert ps.classnames == ("cat", "dog") and isinstance(ps.templates, tuple)
    assert ps.prompts("cat") == ["a photo of a cat.", "a cat in a video game."]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ps.classnames = ("bird",)
    with pytest.raises(ValueError, match="synonyms"):
        PromptSet(["cat", "dog"], ["{}"], synonyms=[["cat", "kitten"]])


# --------------------------------------------------------------------------- references


def _package_dir(name: str) -> Path | None:
    """Where an installed package lives, found without importing it (open_clip and
    CLIP_benchmark import torch and more at import time)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def test_same_as_clip_benchmark():
    root = _package_dir("clip_benchmark")
    if root is None:
        pytest.skip("clip_benchmark is not installed")
    folder = root / "datasets"
    names = json.loads((folder / "en_classnames.json").read_text(encoding="utf-8"))
    templates = json.loads((folder / "en_zeroshot_classification_templates.json")
                           .read_text(encoding="utf-8"))
    compared = 0
    for key, ps in DATASETS.items():
        if key in names:
            assert list(ps.classnames) == names[key], key
            compared += 1
        tkey = "caltech101" if key == "caltech101_vtab" else key
        if tkey in templates:
            assert list(ps.templates) == [t.replace("{c}", "{}") for t in templates[tkey]], key
            compared += 1
    assert compared >= 40


def _template_from_lambda(node: ast.expr) -> str:
    """open_clip writes templates as ``lambda c: f'a photo of a {c}.'``; back to a format
    string."""
    assert isinstance(node, ast.Lambda) and isinstance(node.body, ast.JoinedStr)
    return "".join("{}" if isinstance(part, ast.FormattedValue) else part.value
                   for part in node.body.values)


def test_same_as_open_clip():
    root = _package_dir("open_clip")
    if root is None or not (root / "zero_shot_metadata.py").is_file():
        pytest.skip("open_clip (open_clip_torch) is not installed")
    tree = ast.parse((root / "zero_shot_metadata.py").read_text(encoding="utf-8"))
    values = {node.targets[0].id: node.value for node in tree.body
              if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    assert list(ast.literal_eval(values["IMAGENET_CLASSNAMES"])) == prompts.IMAGENET_CLASSNAMES
    assert [_template_from_lambda(e) for e in values["OPENAI_IMAGENET_TEMPLATES"].elts] == \
        prompts.IMAGENET_TEMPLATES
    assert [_template_from_lambda(e) for e in values["SIMPLE_IMAGENET_TEMPLATES"].elts] == \
        prompts.IMAGENET_TEMPLATES_SIMPLE


# --------------------------------------------------------------------------- reading files


def _write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def test_load_classnames_from_text(tmp_path):
    path = _write(tmp_path / "classes.txt", "\ufeffcat\r\n\n  red fox  \n\t\nGerman shepherd\n")
    assert load_classnames(path) == ["cat", "red fox", "German shepherd"]
    assert load_classnames(str(path)) == ["cat", "red fox", "German shepherd"]
    assert load_classnames(_write(tmp_path / "one.txt", "café")) == ["café"]


def test_load_classnames_from_json(tmp_path):
    assert load_classnames(_write(tmp_path / "c.json", '["cat", "red fox"]')) == ["cat", "red fox"]
    # A JSON list is recognised whatever the file is called.
    assert load_classnames(_write(tmp_path / "c.txt", ' ["cat",\n "dog"]\n')) == ["cat", "dog"]
    # ... but a text line that only looks like JSON stays a name.
    assert load_classnames(_write(tmp_path / "d.txt", "[unused]\ncat\n")) == ["[unused]", "cat"]


def test_load_templates_from_text_and_json(tmp_path):
    text = _write(tmp_path / "t.txt", "a photo of a {}.\n\n  a drawing of the {}.  \n")
    assert load_templates(text) == ["a photo of a {}.", "a drawing of the {}."]
    assert load_templates(_write(tmp_path / "bare.txt", "{}\n")) == ["{}"]
    listed = _write(tmp_path / "t.json", json.dumps(prompts.IMAGENET_TEMPLATES))
    assert load_templates(listed) == prompts.IMAGENET_TEMPLATES
    braces = _write(tmp_path / "braces.txt", "a {{literal}} brace and a {}\n")
    assert load_templates(braces) == ["a {{literal}} brace and a {}"]


def test_load_per_class_templates(tmp_path):
    per_class = {"cat": ["a photo of a {}, a pet.", "a {} sleeping."], "mars": ["{}, a planet."]}
    path = _write(tmp_path / "per_class.json", json.dumps(per_class))
    assert load_templates(path) == per_class
    assert load_templates(path, classnames=["mars", "cat"]) == per_class
    with pytest.raises(PromptDataError, match=r"give none for 1 of 3 classes, e.g. 'dog'"):
        load_templates(path, classnames=["cat", "dog", "mars"])


def test_non_utf8_file_names_the_byte(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_bytes("cat\ncafé\n".encode("latin-1"))
    with pytest.raises(PromptDataError) as info:
        load_classnames(path)
    message = str(info.value)
    assert str(path) in message and "not UTF-8" in message
    assert "byte 0xe9 at byte offset 7 (line 2)" in message and "save the file as UTF-8" in message
    assert info.value.path == path and isinstance(info.value, ValueError)
    with pytest.raises(PromptDataError, match="not UTF-8"):
        load_templates(path)


@pytest.mark.parametrize("text", ["", "\n\n   \n", "[]"])
def test_empty_files(tmp_path, text):
    path = _write(tmp_path / "empty.txt", text)
    with pytest.raises(PromptDataError, match="no class names") as info:
        load_classnames(path)
    assert str(path) in str(info.value)
    with pytest.raises(PromptDataError, match="no templates"):
        load_templates(path)


@pytest.mark.parametrize(("line", "problem"), [
    ("a photo of a cat.", "has no '{}' where the class name goes"),
    ("a {} next to a {}.", "has 2 replacement fields"),
    ("a photo of a {0}.", "bare '{}'"),
    ("a photo of a {name}.", "bare '{}'"),
    ("a photo of a {:>10}.", "bare '{}'"),
    ("a {{}} with no field", "has no '{}'"),
    ("a {} and a stray }", "not a valid format string"),
    ("a {} and a stray {", "not a valid format string"),
])
def test_bad_template_names_file_and_line(tmp_path, line, problem):
    path = _write(tmp_path / "templates.txt", f"a photo of a {{}}.\n\n{line}\n")
    with pytest.raises(PromptDataError) as info:
        load_templates(path)
    message = str(info.value)
    assert message.startswith(f"{path}: templates, line 3: template {line!r}")
    assert problem in message


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("c.json", '{"imagenet1k": ["tench"]}', "expected a JSON list of class names, got an object"),
    ("c.json", '"cat"', "must be a list of strings, got a string"),
    ("c.json", '["cat", 3]', "class name at entry 2 is a number, not a string"),
    ("c.json", '["cat", " "]', "class name at entry 2 is empty"),
    ("c.json", '["cat", "red\\nfox"]', "has a line break"),
    ("c.json", '["cat", ', "not valid JSON"),
    ("c.json", "null", "got null"),
])
def test_bad_json_class_lists(tmp_path, name, content, problem):
    path = _write(tmp_path / name, content)
    with pytest.raises(PromptDataError, match="^" + str(path).replace("\\", "\\\\")) as info:
        load_classnames(path)
    assert problem in str(info.value)


@pytest.mark.parametrize(("content", "problem"), [
    ("3", "expected a JSON list of templates, or an object mapping class names"),
    ('"a photo of a {}."', "got a string"),
    ('["a photo of a {}.", 7]', "templates, entry 2: template is a number, not a string"),
    ('["a photo of a {}.", "a photo"]', "templates, entry 2: template 'a photo' has no '{}'"),
    ('{"cat": "a photo of a {}."}', "templates of 'cat' must be a list of strings, got a string"),
    ('{"cat": []}', "templates of 'cat': no templates"),
    ('{"cat": ["a {} and {}"]}', "templates of 'cat', entry 1: template 'a {} and {}' has 2"),
    ('{"": ["a {}"]}', "key '' is not a class name"),
])
def test_bad_json_templates(tmp_path, content, problem):
    path = _write(tmp_path / "t.json", content)
    with pytest.raises(PromptDataError) as info:
        load_templates(path)
    assert str(info.value).startswith(f"{path}: ") and problem in str(info.value)


def test_validate_in_memory():
    assert validate_templates(("a {}.",)) == ["a {}."]
    assert validate_templates({"cat": ("a {}.",)}) == {"cat": ["a {}."]}
    with pytest.raises(PromptDataError, match="^templates must be a list of strings"):
        validate_templates("a photo of a {}.")
    with pytest.raises(PromptDataError, match=r"^templates, entry 1: template 'x' has no"):
        validate_templates(["x"])
    with pytest.raises(PromptDataError, match="per-class template mapping is empty"):
        validate_templates({})
    with pytest.raises(PromptDataError, match="^no class names"):
        validate_classnames([])
    # Repeated names are allowed: OpenAI's ImageNet list has two.
    assert validate_classnames(["missile", "missile"]) == ["missile", "missile"]

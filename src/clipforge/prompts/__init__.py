"""Zero-shot prompt data: the published class names and prompt templates, and readers for yours.

Zero-shot accuracy depends on the exact words.  OpenAI's curated ImageNet names and its
80-template ensemble are worth several points over raw WordNet labels and one template, and a
result only compares with a published one (the CLIP paper, CLIP_benchmark, open_clip) when the
class names, their order and the templates are the same.  So the lists ship here as data,
``openai_prompts.json``, each with its provenance, rather than being retyped:

* ImageNet (``imagenet1k``): OpenAI's 1,000 curated names, 80 templates and the 7-template subset
  from its Prompt_Engineering_for_ImageNet notebook.  CLIP_benchmark uses identical lists.  The
  names are not all distinct: 'missile' (657, 744) and 'sunglasses' (836, 837) each name two
  classes, as in OpenAI's list.
* Every other dataset is keyed by its CLIP_benchmark name.  Where CLIP_benchmark ships class names
  or templates, those are used, so results compare with CLIP_benchmark's; the rest come from the
  list OpenAI published with CLIP (``data/prompts.md``).  Where the two differ (the class order of
  EuroSAT, Pets, FER2013 and VOC 2007; the wording of CLEVR counts; the PCam and RESISC45
  templates), ``OPENAI_DATASETS`` or ``get_prompts(name, variant="openai")`` gives OpenAI's
  lists exactly, and ``PromptSet.note`` says what differs.

Class order is label order: ``classnames[i]`` names label ``i`` of the loader the list was made
for (CLIP_benchmark's, which is torchvision's for most datasets).  Sources and licences:
``LICENSE-prompts.txt`` beside this file.

``load_classnames`` and ``load_templates`` read your own lists (text, one per line, or JSON) and
fail early, naming the file and the line, rather than after an expensive embedding run.
"""

from __future__ import annotations

import difflib
import json
import os
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..fileio import NotUTF8Error, decode_utf8

DATA_FILE = "openai_prompts.json"
VARIANTS = ("clip_benchmark", "openai")

Templates = list[str] | dict[str, list[str]]


class PromptDataError(ValueError):
    """Class names or templates that cannot be used.  The message names the file (when there is
    one) and the place in it, and says how to fix it; ``path`` is that file or None."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None):
        self.path = None if path is None else Path(path)
        super().__init__(message if path is None else f"{path}: {message}")


class UnknownDatasetError(KeyError):
    """``get_prompts`` was given a name it has no prompts for; the message lists the names."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])


@dataclass(frozen=True)
class PromptSet:
    """One dataset's zero-shot prompts: ``classnames[i]`` names label ``i``, and every template
    takes a class name through its one ``{}``.

    ``synonyms``, where the source gives them (OpenAI's FER2013), lists every name of each class,
    the first being ``classnames[i]``; OpenAI averaged the prompts of all of them.  Sequences are
    stored as tuples so that the shared sets in ``DATASETS`` cannot be changed in place.
    """

    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    name: str = ""
    source: str = ""
    note: str = ""
    synonyms: tuple[tuple[str, ...], ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "classnames", tuple(self.classnames))
        object.__setattr__(self, "templates", tuple(self.templates))
        if self.synonyms is not None:
            synonyms = tuple(tuple(names) for names in self.synonyms)
            if [names[:1] for names in synonyms] != [(c,) for c in self.classnames]:
                raise ValueError(f"{self.name or 'PromptSet'}: synonyms must give one list per "
                                 "class, each starting with that class's name")
            object.__setattr__(self, "synonyms", synonyms)

    def prompts(self, classname: str) -> list[str]:
        """Every template filled with ``classname``."""
        return [template.format(classname) for template in self.templates]


# ---------------------------------------------------------------------------------------------
# Validation, shared by the shipped data's tests and the file readers


def _kind(value: Any) -> str:
    """A JSON value's type in JSON's words, for messages."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return {str: "a string", int: "a number", float: "a number", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _place(i: int, line_numbers: Sequence[int] | None) -> str:
    return f"line {line_numbers[i]}" if line_numbers is not None else f"entry {i + 1}"


def _template_problem(template: Any) -> str | None:
    """What is wrong with one template, or None.  The rule is ``str.format``'s, not a count of
    "{}": '{{}}' is a literal brace pair and '{0}' or '{name}' are fields of another kind."""
    if not isinstance(template, str):
        return f"is {_kind(template)}, not a string"
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as exc:
        return (f"is not a valid format string ({exc}); write a literal brace as '{{{{' or "
                "'}}'")
    if not fields:
        return "has no '{}' where the class name goes; add one, e.g. 'a photo of a {}.'"
    if len(fields) > 1:
        return (f"has {len(fields)} replacement fields; a template takes exactly one '{{}}' for "
                "the class name (write a literal brace as '{{' or '}}')")
    if fields[0] != ("", "", None):
        return "must mark the class name's place with a bare '{}', not a named or formatted field"
    return None


def _check_template_list(templates: Any, path: str | os.PathLike[str] | None, where: str,
                         line_numbers: Sequence[int] | None = None) -> list[str]:
    if isinstance(templates, str) or not isinstance(templates, Sequence):
        raise PromptDataError(f"{where} must be a list of strings, got {_kind(templates)}", path)
    if not templates:
        raise PromptDataError(f"{where}: no templates; give at least one, with '{{}}' where the "
                              "class name goes, e.g. 'a photo of a {}.'", path)
    for i, template in enumerate(templates):
        problem = _template_problem(template)
        if problem:
            shown = f"template {template!r}" if isinstance(template, str) else "template"
            raise PromptDataError(f"{where}, {_place(i, line_numbers)}: {shown} {problem}", path)
    return list(templates)


def validate_templates(templates: Sequence[str] | Mapping[str, Sequence[str]], *,
                       path: str | os.PathLike[str] | None = None,
                       line_numbers: Sequence[int] | None = None) -> Templates:
    """Check templates before any prompt is embedded; return them as a list, or as a dict for
    per-class templates (a mapping from class name to that class's list).

    Every template must have exactly one bare ``{}`` (where the class name goes) and otherwise
    be a valid ``str.format`` string.  ``path`` and ``line_numbers`` (one per template) only
    make messages point into the file the templates came from.  Raises ``PromptDataError``.
    """
    if isinstance(templates, Mapping):
        if not templates:
            raise PromptDataError("the per-class template mapping is empty; map each class name "
                                  "to a list of templates, or give one list for every class", path)
        out: dict[str, list[str]] = {}
        for classname, class_templates in templates.items():
            if not isinstance(classname, str) or not classname.strip():
                raise PromptDataError(f"per-class templates: key {classname!r} is not a class "
                                      "name (a non-empty string)", path)
            out[classname] = _check_template_list(class_templates, path,
                                                  f"templates of {classname!r}")
        return out
    return _check_template_list(templates, path, "templates", line_numbers)


def validate_classnames(classnames: Sequence[str], *, path: str | os.PathLike[str] | None = None,
                        line_numbers: Sequence[int] | None = None) -> list[str]:
    """Check a class list; return it as a list.  Each name must be a non-empty single-line string.
    Repeats are allowed: OpenAI's ImageNet names repeat two (two ImageNet classes each)."""
    if isinstance(classnames, str) or not isinstance(classnames, Sequence):
        raise PromptDataError("class names must be a list of strings, got "
                              f"{_kind(classnames)}", path)
    if not classnames:
        raise PromptDataError("no class names; give one per line (blank lines are skipped) or a "
                              "JSON list of strings", path)
    for i, name in enumerate(classnames):
        if not isinstance(name, str):
            problem = f"is {_kind(name)}, not a string"
        elif not name.strip():
            problem = "is empty"
        elif "\n" in name or "\r" in name:
            problem = f"{name!r} has a line break"
        else:
            continue
        raise PromptDataError(f"class name at {_place(i, line_numbers)} {problem}", path)
    return list(classnames)


# ---------------------------------------------------------------------------------------------
# Reading users' files


def _read_text(path: Path) -> str:
    """The file as text, strictly UTF-8 (a leading byte-order mark is dropped): a Latin-1 file
    decoded leniently would turn 'café' into a different class name without a word."""
    try:
        return decode_utf8(path.read_bytes())
    except NotUTF8Error as exc:
        raise PromptDataError(f"not UTF-8 text: {exc}; save the file as UTF-8, e.g. "
                              f"`iconv -f latin1 -t utf-8 {path.name}` if it is Latin-1",
                              path) from None


def _parse(path: Path) -> tuple[Any, list[int] | None]:
    """A file's JSON value, or its non-blank lines (stripped) and their line numbers.

    JSON when the name ends in .json, or when the whole text is a JSON list or a non-empty JSON
    object (a text file of templates whose only line is '{}' stays text)."""
    text = _read_text(path)
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text), None
        except json.JSONDecodeError as exc:
            raise PromptDataError(f"not valid JSON ({exc.msg} at line {exc.lineno} column "
                                  f"{exc.colno}); fix it, or use a text file with one entry per "
                                  "line", path) from None
    if text.lstrip()[:1] in ("[", "{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, list) or (isinstance(value, dict) and value):
            return value, None
    numbered = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    return [line for _, line in numbered], [n for n, _ in numbered]


def load_classnames(path: str | os.PathLike[str]) -> list[str]:
    """Class names from a file: text with one name per line (surrounding spaces and blank lines
    ignored) or a JSON list of strings.  Line ``i`` (of the non-blank ones) is label ``i``.
    Raises ``PromptDataError`` for an empty list, a non-UTF-8 file or JSON of another shape."""
    path = Path(path)
    value, line_numbers = _parse(path)
    if isinstance(value, dict):
        raise PromptDataError("expected a JSON list of class names, got an object; give the list "
                              "itself (for a file keyed by dataset, pick its entry)", path)
    return validate_classnames(value, path=path, line_numbers=line_numbers)


def load_templates(path: str | os.PathLike[str],
                   classnames: Sequence[str] | None = None) -> Templates:
    """Templates from a file: text with one template per line, a JSON list of strings, or a JSON
    object mapping each class name to its own list (per-class templates).

    Returns a list, or a dict for per-class templates; either is what zero-shot classifiers take.
    With ``classnames``, per-class templates must cover every class.  Raises ``PromptDataError``
    (an empty list, a template without exactly one ``{}``, a non-UTF-8 file, JSON of another
    shape).
    """
    path = Path(path)
    value, line_numbers = _parse(path)
    if not isinstance(value, list | dict):
        raise PromptDataError("expected a JSON list of templates, or an object mapping class "
                              f"names to lists of templates; got {_kind(value)}", path)
    templates = validate_templates(value, path=path, line_numbers=line_numbers)
    if isinstance(templates, dict) and classnames is not None:
        missing = [c for c in classnames if c not in templates]
        if missing:
            raise PromptDataError(f"per-class templates give none for {len(missing)} of "
                                  f"{len(classnames)} classes, e.g. {missing[0]!r}; add them, or "
                                  "give one list for every class", path)
    return templates


# ---------------------------------------------------------------------------------------------
# The shipped data


def _load_data() -> tuple[dict[str, PromptSet], dict[str, PromptSet], list[str]]:
    """Both variants of every dataset from the one JSON file (about 100 kB, read at import)."""
    doc = json.loads(resources.files(__package__).joinpath(DATA_FILE).read_text(encoding="utf-8"))
    ours: dict[str, PromptSet] = {}
    openai: dict[str, PromptSet] = {}
    for key, entry in doc["datasets"].items():
        ours[key] = PromptSet(entry["classnames"], entry["templates"], key, entry["source"],
                              entry.get("note", ""), entry.get("synonyms"))
        if "openai" in entry:  # OpenAI's own lists, where they differ
            theirs = entry["openai"]
            openai[key] = PromptSet(theirs.get("classnames", entry["classnames"]),
                                    theirs.get("templates", entry["templates"]), key,
                                    theirs["source"], entry.get("note", ""),
                                    theirs.get("synonyms", entry.get("synonyms")))
    return ours, openai, list(doc["imagenet_templates_simple"])


DATASETS, OPENAI_DATASETS, _IMAGENET_SIMPLE = _load_data()
"""``DATASETS``: every dataset by CLIP_benchmark name, CLIP_benchmark's lists where it has them.
``OPENAI_DATASETS``: the datasets of OpenAI's published lists, exactly as OpenAI gives them."""

# Other names CLIP_benchmark evaluates with these lists: ImageNet's test sets that keep all 1,000
# classes (ImageNet-A, -R and -O use subsets and are not covered).
ALIASES = {"imagenet": "imagenet1k", "imagenet1k-unverified": "imagenet1k",
           "imagenetv2": "imagenet1k", "imagenet_sketch": "imagenet1k",
           "vtab/caltech101": "caltech101_vtab"}
_PREFIXES = ("wds/", "vtab/", "tfds/")


def get_prompts(name: str, *, variant: str = "clip_benchmark") -> PromptSet:
    """The prompts of dataset ``name``, a CLIP_benchmark dataset name (``cifar10``,
    ``imagenet1k``, ``vtab/eurosat``; case and a ``wds/``, ``vtab/`` or ``tfds/`` prefix are
    ignored).  ``variant="openai"`` gives OpenAI's published lists instead.  An unknown name
    raises ``UnknownDatasetError`` (a ``KeyError``) listing the known ones."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(map(repr, VARIANTS))}, "
                         f"not {variant!r}")
    table = DATASETS if variant == "clip_benchmark" else OPENAI_DATASETS
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    while key not in table and key.startswith(_PREFIXES):
        key = key.split("/", 1)[1]
        key = ALIASES.get(key, key)
    if key in table:
        return table[key]
    known = sorted(table)
    close = difflib.get_close_matches(key, known + sorted(ALIASES), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    what = "prompts" if variant == "clip_benchmark" else "OpenAI prompts"
    raise UnknownDatasetError(f"no {what} for dataset {name!r}; {hint}known: {', '.join(known)}"
                              f" (and aliases {', '.join(sorted(ALIASES))})")


def _lists(key: str) -> tuple[list[str], list[str]]:
    """A dataset's class names and templates as fresh lists, for the module constants."""
    return list(DATASETS[key].classnames), list(DATASETS[key].templates)


IMAGENET_CLASSNAMES, IMAGENET_TEMPLATES = _lists("imagenet1k")
IMAGENET_TEMPLATES_SIMPLE: list[str] = _IMAGENET_SIMPLE
CIFAR10_CLASSNAMES, CIFAR10_TEMPLATES = _lists("cifar10")
CIFAR100_CLASSNAMES, CIFAR100_TEMPLATES = _lists("cifar100")
FOOD101_CLASSNAMES, FOOD101_TEMPLATES = _lists("food101")
PETS_CLASSNAMES, PETS_TEMPLATES = _lists("pets")
FLOWERS_CLASSNAMES, FLOWERS_TEMPLATES = _lists("flowers")
STL10_CLASSNAMES, STL10_TEMPLATES = _lists("stl10")
EUROSAT_CLASSNAMES, EUROSAT_TEMPLATES = _lists("eurosat")
SUN397_CLASSNAMES, SUN397_TEMPLATES = _lists("sun397")
DTD_CLASSNAMES, DTD_TEMPLATES = _lists("dtd")
GTSRB_CLASSNAMES, GTSRB_TEMPLATES = _lists("gtsrb")
MNIST_CLASSNAMES, MNIST_TEMPLATES = _lists("mnist")
CARS_CLASSNAMES, CARS_TEMPLATES = _lists("cars")
FGVC_AIRCRAFT_CLASSNAMES, FGVC_AIRCRAFT_TEMPLATES = _lists("fgvc_aircraft")
CALTECH101_CLASSNAMES, CALTECH101_TEMPLATES = _lists("caltech101")
CALTECH101_VTAB_CLASSNAMES, CALTECH101_VTAB_TEMPLATES = _lists("caltech101_vtab")
COUNTRY211_CLASSNAMES, COUNTRY211_TEMPLATES = _lists("country211")
FER2013_CLASSNAMES, FER2013_TEMPLATES = _lists("fer2013")
FER2013_SYNONYMS: list[list[str]] = [list(s) for s in DATASETS["fer2013"].synonyms or ()]
PCAM_CLASSNAMES, PCAM_TEMPLATES = _lists("pcam")
RENDEREDSST2_CLASSNAMES, RENDEREDSST2_TEMPLATES = _lists("renderedsst2")
RESISC45_CLASSNAMES, RESISC45_TEMPLATES = _lists("resisc45")
CLEVR_COUNT_ALL_CLASSNAMES, CLEVR_COUNT_ALL_TEMPLATES = _lists("clevr_count_all")
KITTI_CLOSEST_VEHICLE_DISTANCE_CLASSNAMES, KITTI_CLOSEST_VEHICLE_DISTANCE_TEMPLATES = _lists(
    "kitti_closest_vehicle_distance")
VOC2007_CLASSNAMES, VOC2007_TEMPLATES = _lists("voc2007")
SVHN_CLASSNAMES, SVHN_TEMPLATES = _lists("svhn")
DMLAB_CLASSNAMES, DMLAB_TEMPLATES = _lists("dmlab")
DIABETIC_RETINOPATHY_CLASSNAMES, DIABETIC_RETINOPATHY_TEMPLATES = _lists("diabetic_retinopathy")
BIRDSNAP_CLASSNAMES, BIRDSNAP_TEMPLATES = _lists("birdsnap")
UCF101_CLASSNAMES, UCF101_TEMPLATES = _lists("ucf101")
KINETICS700_CLASSNAMES, KINETICS700_TEMPLATES = _lists("kinetics700")
HATEFUL_MEMES_CLASSNAMES, HATEFUL_MEMES_TEMPLATES = _lists("hateful_memes")

__all__ = [
    "ALIASES", "DATASETS", "OPENAI_DATASETS", "PromptDataError", "PromptSet", "Templates",
    "UnknownDatasetError", "get_prompts", "load_classnames", "load_templates",
    "validate_classnames", "validate_templates", "IMAGENET_CLASSNAMES", "IMAGENET_TEMPLATES",
    "IMAGENET_TEMPLATES_SIMPLE", "CIFAR10_CLASSNAMES", "CIFAR10_TEMPLATES", "CIFAR100_CLASSNAMES",
    "CIFAR100_TEMPLATES", "FOOD101_CLASSNAMES", "FOOD101_TEMPLATES", "PETS_CLASSNAMES",
    "PETS_TEMPLATES", "FLOWERS_CLASSNAMES", "FLOWERS_TEMPLATES", "STL10_CLASSNAMES",
    "STL10_TEMPLATES", "EUROSAT_CLASSNAMES", "EUROSAT_TEMPLATES", "SUN397_CLASSNAMES",
    "SUN397_TEMPLATES", "DTD_CLASSNAMES", "DTD_TEMPLATES", "GTSRB_CLASSNAMES", "GTSRB_TEMPLATES",
    "MNIST_CLASSNAMES", "MNIST_TEMPLATES", "CARS_CLASSNAMES", "CARS_TEMPLATES",
    "FGVC_AIRCRAFT_CLASSNAMES", "FGVC_AIRCRAFT_TEMPLATES", "CALTECH101_CLASSNAMES",
    "CALTECH101_TEMPLATES", "CALTECH101_VTAB_CLASSNAMES", "CALTECH101_VTAB_TEMPLATES",
    "COUNTRY211_CLASSNAMES", "COUNTRY211_TEMPLATES", "FER2013_CLASSNAMES", "FER2013_TEMPLATES",
    "FER2013_SYNONYMS", "PCAM_CLASSNAMES", "PCAM_TEMPLATES", "RENDEREDSST2_CLASSNAMES",
    "RENDEREDSST2_TEMPLATES", "RESISC45_CLASSNAMES", "RESISC45_TEMPLATES",
    "CLEVR_COUNT_ALL_CLASSNAMES", "CLEVR_COUNT_ALL_TEMPLATES",
    "KITTI_CLOSEST_VEHICLE_DISTANCE_CLASSNAMES", "KITTI_CLOSEST_VEHICLE_DISTANCE_TEMPLATES",
    "VOC2007_CLASSNAMES", "VOC2007_TEMPLATES", "SVHN_CLASSNAMES", "SVHN_TEMPLATES",
    "DMLAB_CLASSNAMES", "DMLAB_TEMPLATES", "DIABETIC_RETINOPATHY_CLASSNAMES",
    "DIABETIC_RETINOPATHY_TEMPLATES", "BIRDSNAP_CLASSNAMES", "BIRDSNAP_TEMPLATES",
    "UCF101_CLASSNAMES", "UCF101_TEMPLATES", "KINETICS700_CLASSNAMES", "KINETICS700_TEMPLATES",
    "HATEFUL_MEMES_CLASSNAMES", "HATEFUL_MEMES_TEMPLATES",
]

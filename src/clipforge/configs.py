"""Architectures as data.

Every model clipforge can build is described by a :class:`CLIPConfig`: the image tower, the text
tower, the shared embedding width, the MLP activation, the preprocessing constants and the
tokenizer.  Named architectures are rows of the ``ARCHITECTURES`` table below; checkpoints carry
their own config (or have one inferred from tensor shapes), so nothing anywhere switches on a
model's *name*.

The families differ from OpenAI's CLIP by fields here, never by classes: SigLIP is a ViT without
a class token pooled by an attention head (``VisionConfig.pool="map"``) beside a bidirectional
text tower pooled at its last position, with a logit bias and sigmoid probabilities;
Chinese-CLIP's and XLM-RoBERTa's text towers are post-norm BERT stacks (``TextConfig.norm``)
with a padding mask; MetaCLIP 2 pools at its end-of-sequence id.  Meta's PE-Core image towers add
2D rotary position encoding (``VisionConfig.rope``) and an attention-pooling head with its own
head count; EVA02's add rotary encoding, SwiGLU MLPs (``mlp_gated`` with ``silu``) and layer
norms inside the attention and the MLP (``attn_norm``, ``mlp_norm``); EVA02-E normalises each
residual branch's output (``norm="res_post"``).  Fields added for those families are left out
of an OpenAI-style config's JSON, which reads as it always did.

The activation is part of the config on purpose: OpenAI's weights were trained with QuickGELU and
LAION's large models with exact GELU, and mixing them up silently costs accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

Activation = Literal["quick_gelu", "gelu", "gelu_tanh", "silu"]
ACTIVATIONS: tuple[str, ...] = get_args(Activation)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATIONS: tuple[str, ...] = ("bicubic", "bilinear")

REQUIRED: Any = object()  # json_field's default: the key must be present


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(value: Any, name: str) -> None:
    """Config sizes come from files: a string, a float or a bool where a size belongs would
    otherwise surface as a traceback deep inside model construction."""
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


# json_field's kinds: (test, how a message describes it).
_KINDS: dict[str, tuple[Any, str]] = {
    "positive int": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "int": (_is_int, "an integer"),
    "number": (_is_number, "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "object": (lambda v: isinstance(v, dict), "a JSON object"),
    "3 numbers": (lambda v: isinstance(v, list) and len(v) == 3 and all(map(_is_number, v)),
                  "a list of 3 numbers"),
}


def json_field(data: Mapping[str, Any], key: str, where: str, kind: str,
               default: Any = REQUIRED) -> Any:
    """``data[key]`` checked to be of ``kind`` (a key of ``_KINDS``), for readers of JSON
    configs: the message names the field as the file spells it (``where`` is its enclosing
    path, such as ``"vision_config."``), so that it can be fixed there.  Never coerces: a
    ``"64"`` where a size belongs is an error, not a guess."""
    if key not in data:
        if default is REQUIRED:
            raise ValueError(f"{where}{key} is missing")
        return default
    value = data[key]
    test, description = _KINDS[kind]
    if not test(value):
        shown = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) \
            else type(value).__name__
        raise ValueError(f"{where}{key} must be {description}, got {shown}")
    return value


def _check_fields(obj: Any, prefix: str) -> None:
    """Check every field whose annotation is a ``Literal``, a bool or a float: configs come
    from files, and a misspelt choice must be an error naming it, not a silent default."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        name = f"{prefix}{f.name}"
        choices = _literal_choices(hint)
        if choices is not None:
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, "
                                 f"got {value!r}")
        elif hint is bool and not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        elif hint is float and not (_is_number(value) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
        elif hint is int and not (_is_int(value) and value >= 0):
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _literal_choices(hint: Any) -> tuple | None:
    """The allowed values of ``Literal[...]`` or ``Literal[...] | None`` (None included)."""
    if get_origin(hint) is Literal:
        return get_args(hint)
    args = get_args(hint)
    literals = [a for a in args if get_origin(a) is Literal]
    if literals and all(a is type(None) or get_origin(a) is Literal for a in args):
        return (*get_args(literals[0]), None)
    return None


@dataclass(frozen=True)
class TokenizerConfig:
    """Which tokenizer a model's text tower reads: OpenAI's byte-level BPE (packaged), or the
    Hugging Face tokenizer files that come with the weights (``hf``), cleaned before
    tokenizing as OpenCLIP cleans them, or lower-cased as big_vision did for SigLIP 2
    (``clean``, see clipforge.text.hf)."""

    kind: Literal["openai", "hf"] = "openai"
    clean: Literal["none", "canonicalize", "whitespace", "lower", "ascii_lower"] = "none"
    strip_sep: bool = False

    def __post_init__(self) -> None:
        _check_fields(self, "tokenizer.")


@dataclass(frozen=True)
class VisionConfig:
    """Image tower.  ``patch_size`` set means a ViT; ``None`` means OpenAI's modified ResNet.

    For a ViT, ``width``/``layers``/``heads``/``mlp_width`` describe the transformer.  For a ResNet,
    ``width`` is the stem width (64 for RN50), ``layers`` the block count per stage and
    ``heads`` the attention-pooling heads.
    """

    image_size: int
    width: int
    layers: int | tuple[int, ...]
    heads: int
    patch_size: int | None = None
    mlp_width: int = 0
    # family fields (defaults: OpenAI's ViT; see clipforge.model.vision)
    activation: Activation | None = None  # None: the model's activation
    ln_eps: float = 1e-5
    patch_bias: bool = False
    class_token: bool = True
    ln_pre: bool = True
    pool: Literal["token", "map"] = "token"
    proj: Literal["matrix", "linear", "none"] = "matrix"  # linear: biased (timm's head)
    # timm's Eva towers (PE-Core, EVA02; see clipforge.model.transformer and .rope)
    norm: Literal["pre", "res_post"] = "pre"  # res_post: x + ln(f(x)) (EVA02-E)
    mlp_gated: bool = False  # act(x W_gate) * (x W_value): SwiGLU with activation silu
    attn_norm: bool = False  # layer norm of the attention's heads before out_proj (sub-LN)
    mlp_norm: bool = False  # layer norm of the MLP's hidden layer
    rope: bool = False  # 2D rotary position encoding of the patch tokens' queries and keys
    rope_theta: float = 10000.0
    rope_grid: int = 0  # the grid the positions are scaled to (timm's ref_feat_shape); 0: none
    rope_offset: int = 0  # added to each patch's row and column index
    rope_indexing: Literal["ij", "xy"] = "ij"  # xy: (column, row) coordinates, as PE's
    pool_heads: int = 0  # attention-pooling head's heads (0: the tower's)
    pool_mlp_width: int = 0  # its MLP's hidden width (0: the tower's mlp_width)

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):  # as JSON spells a ResNet's tuple
            object.__setattr__(self, "layers", tuple(self.layers))
        for name in ("image_size", "width", "heads"):
            _positive_int(getattr(self, name), f"vision.{name}")
        if not _is_int(self.mlp_width) or self.mlp_width < 0:
            raise ValueError(f"vision.mlp_width must be a non-negative integer, "
                             f"got {self.mlp_width!r}")
        _check_fields(self, "vision.")
        if self.is_vit:
            self._check_vit()
        else:
            self._check_resnet()

    def _check_vit(self) -> None:
        _positive_int(self.patch_size, "vision.patch_size")
        _positive_int(self.layers, "vision.layers")
        # patches need not tile the image: the pixels past the last whole patch are unused, as
        # in timm and transformers (ViT-SO400M-14-SigLIP-384: 27 patches of 14 in 384)
        if self.image_size < self.patch_size:
            raise ValueError(f"vision.image_size {self.image_size} is smaller than "
                             f"vision.patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"vision.width {self.width} is not divisible by vision.heads "
                             f"{self.heads}")
        self._check_rope()
        if self.pool != "map" and (unused := self.changed(("pool_heads", "pool_mlp_width"))):
            raise ValueError(f"vision.{unused[0]} needs vision.pool 'map'")
        if self.pool_heads and self.width % self.pool_heads:
            raise ValueError(f"vision.width {self.width} is not divisible by vision.pool_heads "
                             f"{self.pool_heads}")

    def _check_rope(self) -> None:
        """Rotary encoding turns each pair of a head's channels by an angle of one axis: a
        head width that is not a multiple of 4 leaves channels no axis covers."""
        if not self.rope:
            if unused := self.changed(ROPE_FIELDS[1:]):
                raise ValueError(f"vision.{unused[0]} needs vision.rope")
            return
        head = self.width // self.heads
        if head % 4:
            raise ValueError(f"vision.rope needs a head width divisible by 4, got {head} "
                             f"(vision.width / vision.heads)")

    def changed(self, names: tuple[str, ...]) -> list[str]:
        """Those of ``names`` that differ from their defaults."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return [name for name in names if getattr(self, name) != defaults[name]]

    def _check_resnet(self) -> None:
        if unused := self.changed(VIT_FIELDS):
            raise ValueError(f"vision.{unused[0]} applies to a ViT (with patch_size), not to a "
                             "ResNet")
        if not (isinstance(self.layers, tuple) and len(self.layers) == 4):
            raise ValueError(f"vision.layers of a ResNet (no patch_size) must be 4 block counts, "
                             f"got {self.layers!r}")
        for count in self.layers:
            _positive_int(count, "each of vision.layers")
        if self.image_size % 32:
            raise ValueError(f"vision.image_size {self.image_size} of a ResNet is not a "
                             "multiple of 32")
        if self.width * 32 % self.heads:
            raise ValueError(f"vision.heads {self.heads} does not divide the ResNet's "
                             f"attention-pool width {self.width * 32}")

    @property
    def is_vit(self) -> bool:
        return self.patch_size is not None


@dataclass(frozen=True)
class TextConfig:
    """Causal text transformer over the BPE vocabulary, pooled at the end-of-text token."""

    width: int
    layers: int
    heads: int
    context_length: int = 77
    vocab_size: int = 49408
    mlp_width: int = 0
    # family fields (defaults: OpenAI's causal tower; see clipforge.model.text)
    activation: Activation | None = None  # None: the model's activation
    ln_eps: float = 1e-5
    causal: bool = True
    norm: Literal["pre", "post"] = "pre"
    pool: Literal["argmax", "eos", "last", "first", "mean"] = "argmax"
    eos_id: int | None = None  # pool "eos": the id pooled at (its first occurrence)
    pad_id: int = 0
    mask_padding: bool = False
    type_vocab_size: int = 0
    position_offset: int = 0
    max_positions: int = 0  # rows of the position table (0: context_length + position_offset)
    proj: Literal["matrix", "linear", "mlp", "none"] = "matrix"
    proj_hidden: int = 0

    @property
    def positions(self) -> int:
        return self.max_positions or self.context_length + self.position_offset

    def __post_init__(self) -> None:
        for name in ("width", "layers", "heads", "context_length", "vocab_size"):
            _positive_int(getattr(self, name), f"text.{name}")
        if not _is_int(self.mlp_width) or self.mlp_width < 0:
            raise ValueError(f"text.mlp_width must be a non-negative integer, "
                             f"got {self.mlp_width!r}")
        if self.width % self.heads:
            raise ValueError(f"text.width {self.width} is not divisible by text.heads "
                             f"{self.heads}")
        _check_fields(self, "text.")
        if self.pool == "eos" and not (_is_int(self.eos_id) and self.eos_id >= 0):
            raise ValueError(f"text.pool 'eos' needs text.eos_id, got {self.eos_id!r}")
        if self.positions < self.context_length + self.position_offset:
            raise ValueError(f"text.max_positions {self.max_positions} is less than "
                             f"text.context_length + text.position_offset")


@dataclass(frozen=True)
class PreprocessConfig:
    """How pixels are prepared: resize the short side (bicubic), centre-crop, normalise."""

    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    # how the image reaches the model's size (OpenCLIP's resize_mode): short side then centre
    # crop, long side then pad with fill_color, or both sides stretched (squash)
    resize_mode: Literal["shortest", "longest", "squash"] = "shortest"
    fill_color: int = 0

    def __post_init__(self) -> None:
        """Pixels are divided by ``std``: a zero, a NaN or a missing channel would turn every
        probability into NaN instead of an error."""
        for name in ("mean", "std"):
            value = getattr(self, name)
            if not (isinstance(value, (tuple, list)) and len(value) == 3
                    and all(_is_number(x) and math.isfinite(x) for x in value)):
                raise ValueError(f"preprocess.{name} must be 3 finite numbers (one per RGB "
                                 f"channel), got {value!r}")
            object.__setattr__(self, name, tuple(float(x) for x in value))
        if min(self.std) <= 0:
            raise ValueError(f"preprocess.std must be positive, got {self.std!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"preprocess.interpolation must be one of "
                             f"{', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        _check_fields(self, "preprocess.")
        if self.fill_color > 255:
            raise ValueError(f"preprocess.fill_color must be 0..255, got {self.fill_color}")


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    activation: Activation = "quick_gelu"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    # SigLIP: a learned bias added to the logits, and sigmoid (not softmax) probabilities
    logit_bias: bool = False
    probability: Literal["softmax", "sigmoid"] = "softmax"
    tokenizer: TokenizerConfig = field(default_factory=lambda: TokenizerConfig())
    family: str = "clip"  # for listings; nothing dispatches on it

    def __post_init__(self) -> None:
        _positive_int(self.embed_dim, "embed_dim")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}"
            )
        _check_fields(self, "")
        for tower in ("vision", "text"):
            cfg = getattr(self, tower)
            if cfg.proj == "none" and cfg.width != self.embed_dim:
                raise ValueError(f"{tower}.proj 'none' needs {tower}.width ({cfg.width}) equal "
                                 f"to embed_dim ({self.embed_dim})")
        if self.vision.is_vit and not self.vision.class_token and self.vision.pool == "token":
            raise ValueError("vision.pool 'token' needs vision.class_token")

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    def replace(self, **changes: Any) -> CLIPConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data.  Fields added for the newer families are left out
        while they hold their defaults, so an OpenAI-style config reads as it always has (and
        its weights fingerprint, which hashes this, does not change)."""
        data = dataclasses.asdict(self)
        for name, default in _FAMILY_DEFAULTS.items():
            section, _, key = name.rpartition(".")
            where = data[section] if section else data
            if key in where and where[key] == default:
                del where[key]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Any) -> CLIPConfig:
        """Build from :meth:`to_dict` output; missing optional fields take their defaults.
        Values are checked, never coerced, and a field clipforge does not know is an error:
        a setting silently dropped would give a different model than the file describes."""
        if not isinstance(data, dict):
            raise ValueError(f"a clipforge model config must be a JSON object, "
                             f"got {type(data).__name__}")
        _check_keys(data, cls, "")
        values = dict(data)
        for name, klass in _SECTIONS.items():
            section = json_field(data, name, "", "object", {})
            _check_keys(section, klass, name + ".")
            values[name] = klass(**section)
        values["vision"] = _complete_vision(values["vision"])
        values["text"] = _complete_text(values["text"])
        return cls(**values)


def _check_keys(data: Mapping[str, Any], klass: type, prefix: str) -> None:
    """Every required field of dataclass ``klass`` present in ``data``, and nothing else."""
    fields = dataclasses.fields(klass)
    required = [f.name for f in fields if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    if missing := [name for name in required if name not in data]:
        raise ValueError(f"config field {prefix}{missing[0]} is missing")
    if unknown := sorted(set(data) - {f.name for f in fields}):
        raise ValueError(f"unknown config field {prefix}{unknown[0]}: clipforge implements "
                         f"{', '.join(prefix + f.name for f in fields)}")


# VisionConfig fields of rotary position encoding, and those only a ViT has (PE-Core, EVA)
ROPE_FIELDS = ("rope", "rope_theta", "rope_grid", "rope_offset", "rope_indexing")
VIT_FIELDS = ("norm", "mlp_gated", "attn_norm", "mlp_norm", *ROPE_FIELDS, "pool_heads",
              "pool_mlp_width")

_SECTIONS: dict[str, type] = {"vision": VisionConfig, "text": TextConfig,
                               "preprocess": PreprocessConfig, "tokenizer": TokenizerConfig}

# Fields that an OpenAI-style config leaves out of its JSON while they keep these values.
_FAMILY_DEFAULTS: dict[str, Any] = {
    **{f"vision.{f.name}": f.default for f in dataclasses.fields(VisionConfig)
       if f.name in ("activation", "ln_eps", "patch_bias", "class_token", "ln_pre", "pool",
                     "proj", *VIT_FIELDS)},
    **{f"text.{f.name}": f.default for f in dataclasses.fields(TextConfig)
       if f.name in ("activation", "ln_eps", "causal", "norm", "pool", "eos_id", "pad_id",
                     "mask_padding", "type_vocab_size", "position_offset", "max_positions",
                     "proj", "proj_hidden")},
    "preprocess.resize_mode": "shortest", "preprocess.fill_color": 0,
    "logit_bias": False, "probability": "softmax", "family": "clip",
    "tokenizer": {"kind": "openai", "clean": "none", "strip_sep": False},
}


def _complete_vision(v: VisionConfig) -> VisionConfig:
    if v.is_vit and not v.mlp_width:
        return dataclasses.replace(v, mlp_width=4 * v.width)
    return v


def _complete_text(t: TextConfig) -> TextConfig:
    return t if t.mlp_width else dataclasses.replace(t, mlp_width=4 * t.width)


def _vit(image_size: int, width: int, layers: int, patch: int, heads: int | None = None,
         mlp_width: int = 0) -> VisionConfig:
    return _complete_vision(VisionConfig(image_size, width, layers, heads or width // 64, patch,
                                         mlp_width))


def _resnet(image_size: int, width: int, layers: tuple[int, ...]) -> VisionConfig:
    # OpenAI: attention pooling runs at width * 32 channels with 64-wide heads.
    return VisionConfig(image_size, width, layers, heads=width * 32 // 64)


def _text(width: int, layers: int = 12, heads: int | None = None) -> TextConfig:
    return _complete_text(TextConfig(width, layers, heads or width // 64))


def _clip(embed_dim: int, vision: VisionConfig, text: TextConfig,
          activation: Activation = "quick_gelu") -> CLIPConfig:
    return CLIPConfig(embed_dim, vision, text, activation)


# Published architectures (OpenAI's paper; LAION's OpenCLIP configs for H, g and bigG) and two
# tiny ones for tests and demos.  The activation recorded here is the one the known pretrained
# weights for that architecture use.
ARCHITECTURES: dict[str, CLIPConfig] = {
    "RN50": _clip(1024, _resnet(224, 64, (3, 4, 6, 3)), _text(512)),
    "RN101": _clip(512, _resnet(224, 64, (3, 4, 23, 3)), _text(512)),
    "RN50x4": _clip(640, _resnet(288, 80, (4, 6, 10, 6)), _text(640)),
    "RN50x16": _clip(768, _resnet(384, 96, (6, 8, 18, 8)), _text(768)),
    "RN50x64": _clip(1024, _resnet(448, 128, (3, 15, 36, 10)), _text(1024)),
    "ViT-B-32": _clip(512, _vit(224, 768, 12, 32), _text(512)),
    "ViT-B-16": _clip(512, _vit(224, 768, 12, 16), _text(512)),
    "ViT-L-14": _clip(768, _vit(224, 1024, 24, 14), _text(768)),
    "ViT-L-14-336": _clip(768, _vit(336, 1024, 24, 14), _text(768)),
    "ViT-H-14": _clip(1024, _vit(224, 1280, 32, 14, heads=16), _text(1024, 24), "gelu"),
    "ViT-g-14": _clip(1024, _vit(224, 1408, 40, 14, heads=16, mlp_width=6144),
                      _text(1024, 24), "gelu"),
    "ViT-bigG-14": _clip(1280, _vit(224, 1664, 48, 14, heads=16, mlp_width=8192),
                         _text(1280, 32), "gelu"),
    # The first-run model of `clipforge train`: small enough to learn the built-in dataset on two
    # CPU cores in minutes.  A ResNet: at this budget its convolutions learn the shapes, where
    # small-vit (kept for comparison) learns the colours but not the shapes.
    "small-rn": _clip(128, _resnet(64, 32, (1, 1, 1, 1)), _text(128, 4, heads=2)),
    "small-vit": _clip(128, _vit(64, 192, 4, 8, heads=3), _text(128, 4, heads=2)),
    "tiny-vit": _clip(64, _vit(32, 64, 2, 8, heads=4), _text(64, 2, heads=4)),
    "tiny-rn": _clip(64, _resnet(64, 8, (1, 1, 1, 1)), _text(64, 2, heads=4)),
    # The families' towers at test size, with OpenAI's packaged tokenizer so that they need no
    # files: what every command and precision is tested with.  (Real checkpoints of these
    # families bring their own tokenizer files.)
    "tiny-siglip": CLIPConfig(
        64, dataclasses.replace(_vit(32, 64, 2, 8, heads=4), activation="gelu_tanh",
                                ln_eps=1e-6, patch_bias=True, class_token=False, ln_pre=False,
                                pool="map", proj="none"),
        dataclasses.replace(_text(64, 2, heads=4), context_length=16, activation="gelu_tanh",
                            ln_eps=1e-6, causal=False, pool="last", proj="linear"),
        "gelu_tanh", PreprocessConfig((0.5,) * 3, (0.5,) * 3, resize_mode="squash"),
        logit_bias=True, probability="sigmoid", family="siglip"),
    "tiny-bert": _clip(64, _vit(32, 64, 2, 8, heads=4), dataclasses.replace(
        _text(64, 2, heads=4), context_length=32, activation="gelu", ln_eps=1e-12, causal=False,
        norm="post", pool="first", mask_padding=True, type_vocab_size=2),
        ).replace(family="chinese-clip"),
    "tiny-xlmr": _clip(64, _vit(32, 64, 2, 8, heads=4), dataclasses.replace(
        _text(64, 2, heads=4), context_length=32, activation="gelu", causal=False, norm="post",
        pool="mean", mask_padding=True, type_vocab_size=1, position_offset=1, proj="mlp"),
        "gelu").replace(family="xlm-roberta"),
    # PE-Core's image tower: rotary (column, row) positions + 1 scaled to a 6x6 grid, a class
    # token, an attention-pooling head with fewer heads than the tower, timm's biased head
    "tiny-pe": CLIPConfig(
        64, dataclasses.replace(_vit(32, 64, 2, 8, heads=4), pool="map", pool_heads=2,
                                proj="linear", rope=True, rope_grid=6, rope_offset=1,
                                rope_indexing="xy"),
        dataclasses.replace(_text(64, 2, heads=4), context_length=32), "gelu",
        PreprocessConfig((0.5,) * 3, (0.5,) * 3, "bilinear", resize_mode="squash"),
        family="pe-core"),
    # EVA02's: SwiGLU with a norm on its hidden layer, a norm inside the attention, rotary
    # positions scaled to a 16x16 grid, no ln_pre, timm's biased head
    "tiny-eva02": _clip(64, dataclasses.replace(
        _vit(32, 64, 2, 8, heads=4, mlp_width=170), activation="silu", ln_eps=1e-6,
        patch_bias=True, ln_pre=False, mlp_gated=True, attn_norm=True, mlp_norm=True, rope=True,
        rope_grid=16, proj="linear"), _text(64, 2, heads=4), "gelu").replace(family="eva02"),
}


HAND_WRITTEN: tuple[str, ...] = tuple(ARCHITECTURES)


def _published() -> dict[str, CLIPConfig]:
    """The other architectures OpenCLIP publishes weights for (SigLIP, SigLIP 2, DFN, MetaCLIP 2,
    PE-Core, EVA, XLM-RoBERTa...): rows of data in ``published_architectures.json``, made by
    clipforge's own OpenCLIP reader from OpenCLIP's configs (tools/published_architectures.py)."""
    from importlib import resources

    text = resources.files(__package__).joinpath("published_architectures.json").read_text(
        encoding="utf-8")
    return {name: CLIPConfig.from_dict(row) for name, row in json.loads(text).items()}


ARCHITECTURES.update({name: config for name, config in _published().items()
                      if name not in ARCHITECTURES})


def available_models() -> list[str]:
    """Names of the built-in architectures."""
    return list(ARCHITECTURES)


def get_config(name: str) -> CLIPConfig:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}: not a built-in architecture nor an existing file or "
            f"directory. Built-in: {', '.join(ARCHITECTURES)}"
        ) from None

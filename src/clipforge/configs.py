"""Architectures as data.

Every model clipforge can build is described by a :class:`CLIPConfig`: the image tower, the text
tower, the shared embedding width, the MLP activation and the preprocessing constants.  Named
architectures are rows of the ``ARCHITECTURES`` table below; checkpoints carry their own config (or
have one inferred from tensor shapes), so nothing anywhere switches on a model's *name*.

The activation is part of the config on purpose: OpenAI's weights were trained with QuickGELU and
LAION's large models with exact GELU, and mixing them up silently costs accuracy.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

Activation = Literal["quick_gelu", "gelu"]
ACTIVATIONS: tuple[str, ...] = ("quick_gelu", "gelu")

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


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


@dataclass(frozen=True)
class PreprocessConfig:
    """How pixels are prepared: resize the short side (bicubic), centre-crop, normalise."""

    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    activation: Activation = "quick_gelu"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}"
            )

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    def replace(self, **changes: Any) -> CLIPConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLIPConfig:
        """Build from :meth:`to_dict` output; missing optional fields take their defaults."""
        try:
            vision = dict(data["vision"])
            if isinstance(vision.get("layers"), list):
                vision["layers"] = tuple(vision["layers"])
            text = data["text"]
            pre = dict(data.get("preprocess") or {})
            for key in ("mean", "std"):
                if key in pre:
                    pre[key] = tuple(pre[key])
            return cls(
                embed_dim=int(data["embed_dim"]),
                vision=_complete_vision(VisionConfig(**vision)),
                text=_complete_text(TextConfig(**text)),
                activation=data.get("activation", "quick_gelu"),
                preprocess=PreprocessConfig(**pre),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"invalid clipforge model config: {exc}") from exc


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
}


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

"""Hugging Face transformers directories, in and out: ``CLIPModel``, ``MetaClip2Model``,
``SiglipModel`` (SigLIP and the fixed-resolution SigLIP 2 checkpoints) and
``ChineseCLIPModel``.

Each format is data: a table of renaming rules between transformers' parameter names and
clipforge's (OpenAI's layout, extended for the families, see :mod:`clipforge.model`), and a
reader and writer of its ``config.json``.  The rules come from transformers' own modelling
code: each attention's separate ``q/k/v`` projections are clipforge's fused ``in_proj``, the
output projections of CLIP-style towers are stored transposed, the towers sit under
``vision_model.``/``text_model.``.  transformers has no ResNet tower, so RN models cannot be
written in this format.

A directory's other files complete its config.json as transformers reads them: the image
processor's settings (``processor_config.json``'s ``image_processor``, where transformers 5
writes them, else ``preprocessor_config.json``) and the tokenizer files (which tokenizer, its
padding id and its length: :class:`TokenizerFiles`).

A field that changes the computation and that clipforge does not implement (another
``hidden_act``, ``vision_use_head: false``, a relative position embedding...) is an error naming
it, never dropped.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..configs import (
    REQUIRED,
    VIT_FIELDS,
    CLIPConfig,
    PreprocessConfig,
    TextConfig,
    TokenizerConfig,
    VisionConfig,
    json_field,
)
from ..text.hf import VOCABULARY_FILES, TokenizerFilesError, load_hf_tokenizer
from .checkpoint import CheckpointError, read_json_object
from .renaming import Rule, block, rule, to_ours, to_theirs

StateDict = dict[str, torch.Tensor]

# ------------------------------------------------------------------------ renaming rules


# Within-block names: CLIP-style pre-norm blocks (CLIP, SigLIP, MetaCLIP 2) and BERT's post-norm
# layers (Chinese-CLIP's text tower; ln_1 follows the attention, ln_2 the MLP).
_CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2",
               "attn.in_proj_{kind}": ("self_attn.q_proj.{kind}", "self_attn.k_proj.{kind}",
                                       "self_attn.v_proj.{kind}"),
               "attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1",
               "mlp.c_proj": "mlp.fc2"}
_BERT_BLOCK = {"attn.in_proj_{kind}": ("attention.self.query.{kind}", "attention.self.key.{kind}",
                                       "attention.self.value.{kind}"),
               "attn.out_proj": "attention.output.dense", "ln_1": "attention.output.LayerNorm",
               "mlp.c_fc": "intermediate.dense", "mlp.c_proj": "output.dense",
               "ln_2": "output.LayerNorm"}

_CLIP_VISION = [
    rule("visual.conv1", "vision_model.embeddings.patch_embedding"),
    rule("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    rule("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    rule("visual.ln_pre", "vision_model.pre_layrnorm"),  # sic, transformers' spelling
    *block("visual.transformer.resblocks.{n}.", "vision_model.encoder.layers.{n}.", _CLIP_BLOCK),
    rule("visual.ln_post", "vision_model.post_layernorm"),
    rule("visual.proj", "visual_projection.weight", transpose=True),
]
_CLIP_TEXT = [
    rule("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    rule("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    *block("transformer.resblocks.{n}.", "text_model.encoder.layers.{n}.", _CLIP_BLOCK),
    rule("ln_final", "text_model.final_layer_norm"),
    rule("text_projection", "text_projection.weight", transpose=True),
]
CLIP_RULES = [*_CLIP_VISION, *_CLIP_TEXT, rule("logit_scale", "logit_scale")]

SIGLIP_RULES = [
    rule("visual.conv1", "vision_model.embeddings.patch_embedding"),
    rule("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    *block("visual.transformer.resblocks.{n}.", "vision_model.encoder.layers.{n}.", _CLIP_BLOCK),
    rule("visual.ln_post", "vision_model.post_layernorm"),
    rule("visual.attn_pool.probe", "vision_model.head.probe"),
    rule("visual.attn_pool.in_proj_{kind}", "vision_model.head.attention.in_proj_{kind}"),
    rule("visual.attn_pool.out_proj", "vision_model.head.attention.out_proj"),
    rule("visual.attn_pool.ln", "vision_model.head.layernorm"),
    rule("visual.attn_pool.mlp.c_fc", "vision_model.head.mlp.fc1"),
    rule("visual.attn_pool.mlp.c_proj", "vision_model.head.mlp.fc2"),
    *[r for r in _CLIP_TEXT if r.ours != "text_projection"],
    rule("text_projection", "text_model.head"),
    rule("logit_scale", "logit_scale", squeeze=True),
    rule("logit_bias", "logit_bias", squeeze=True),
]

CHINESE_CLIP_RULES = [
    *_CLIP_VISION,
    rule("token_embedding.weight", "text_model.embeddings.word_embeddings.weight"),
    rule("positional_embedding", "text_model.embeddings.position_embeddings.weight"),
    rule("token_type_embedding", "text_model.embeddings.token_type_embeddings.weight"),
    rule("ln_embed", "text_model.embeddings.LayerNorm"),
    *block("transformer.resblocks.{n}.", "text_model.encoder.layer.{n}.", _BERT_BLOCK),
    rule("text_projection", "text_projection.weight", transpose=True),
    rule("logit_scale", "logit_scale"),
]

# Buffers some transformers versions save; they hold no weights.
_IGNORED = re.compile(r".*\.(position_ids|token_type_ids)$")


def to_hf_state_dict(sd: StateDict, rules: list[Rule] = CLIP_RULES) -> StateDict:
    """clipforge state dict -> transformers' names (tensors shared where not transposed)."""
    if "visual.attnpool.positional_embedding" in sd:
        raise ValueError("only ViT image towers can be written in Hugging Face format "
                         "(transformers has no ResNet CLIP tower); use --to clipforge")
    return to_theirs(sd, rules)


def from_hf_state_dict(hf: StateDict, rules: list[Rule] = CLIP_RULES,
                       source: str = "the weights") -> StateDict:
    """transformers' state dict -> clipforge's names (the inverse of :func:`to_hf_state_dict`)."""
    return to_ours(hf, rules, source, ignored=_IGNORED, unknown=lambda key: (
        f"{source}: unexpected key {key!r} in a Hugging Face state dict"))


# ------------------------------------------------------------------------ config.json in


_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh"}
_RESAMPLE = {"bicubic": 3, "bilinear": 2}


def _activation(tower: dict[str, Any], where: str, default: str) -> str:
    act = json_field(tower, "hidden_act", where, "str", default)
    if act not in _ACTIVATIONS:
        raise ValueError(f"{where}hidden_act {act!r} is not implemented (clipforge implements "
                         f"{', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[act]


def _size(tower: dict[str, Any], key: str, where: str, default: Any = REQUIRED) -> int:
    return json_field(tower, key, where, "positive int", default)


def _eps(tower: dict[str, Any], where: str, default: float) -> float:
    return float(json_field(tower, "layer_norm_eps", where, "number", default))


def _require(tower: dict[str, Any], key: str, where: str, value: Any) -> None:
    """A field whose only implemented value is ``value``."""
    if key in tower and tower[key] != value:
        raise ValueError(f"{where}{key} {tower[key]!r} is not implemented (clipforge "
                         f"implements {value!r})")


def _clip_vision(v: dict[str, Any], act: str | None = None, **family: Any) -> VisionConfig:
    where = "vision_config."
    _require(v, "num_channels", where, 3)
    width = _size(v, "hidden_size", where)
    return VisionConfig(
        image_size=_size(v, "image_size", where, 224), width=width,
        layers=_size(v, "num_hidden_layers", where), heads=_size(v, "num_attention_heads", where),
        patch_size=_size(v, "patch_size", where, 32),
        mlp_width=_size(v, "intermediate_size", where),
        activation=act or _activation(v, where, "quick_gelu"), ln_eps=_eps(v, where, 1e-5),
        **family)


@dataclass(frozen=True)
class TokenizerFiles:
    """What a transformers directory's config.json leaves to the tokenizer files beside it:
    which tokenizer the model reads (SigLIP 2 is a SiglipModel with Gemma's tokenizer), the
    padding id its texts are padded with (config.json's ``pad_token_id`` is not read by
    SigLIP's or Chinese-CLIP's modelling code and is stale in some repositories: SigLIP 2's says
    1 where Gemma pads with 0), and the text length it truncates at (a BERT tower's 512
    positions are more than Chinese-CLIP was trained with)."""

    directory: Path | None = None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def read(cls, directory: Path | None) -> TokenizerFiles:
        settings = read_hf_json(directory / "tokenizer_config.json") if directory else None
        return cls(directory, settings or {})

    @property
    def tokenizer_class(self) -> str | None:
        name = self.settings.get("tokenizer_class")
        return name.removesuffix("Fast") if isinstance(name, str) else None

    @property
    def max_length(self) -> int | None:
        """``model_max_length``, unless absent or transformers' "no limit" (about 1e30)."""
        value = self.settings.get("model_max_length")
        return value if isinstance(value, int) and 0 < value < 10**9 else None

    def pad_id(self, default: int) -> int:
        """The padding id of the tokenizer (``default`` without tokenizer files: loading the
        model then fails on them, naming what is missing)."""
        if self.directory is None or not any(
                (self.directory / name).is_file() for name in VOCABULARY_FILES):
            return default
        pad = load_hf_tokenizer(self.directory).pad_token_id
        return default if pad is None else int(pad)


def _stated_pad_id(t: dict[str, Any], default: int) -> int:
    """config.json's ``pad_token_id`` (absent or null: ``default``)."""
    if t.get("pad_token_id") is None:
        return default
    return json_field(t, "pad_token_id", "text_config.", "int")


def _eos_pooling(t: dict[str, Any], vocab: int, legacy: bool) -> dict[str, Any]:
    """transformers' pooling of CLIP-style text towers: at the first ``eos_token_id``, except
    that ``CLIPModel`` (``legacy``) pools at the arg-max id when ``eos_token_id`` is 2 (its
    configs before transformers PR 24773).  CLIPModel's eos that is the largest id (OpenAI's
    end of text) is read as the arg-max, the same position, OpenAI's layout, whose prefix
    sharing then applies.  ``MetaClip2Model`` always pools at the first ``eos_token_id`` (2 in
    XLM-V)."""
    eos = json_field(t, "eos_token_id", "text_config.", "int", 2 if legacy else REQUIRED)
    if legacy and eos in (2, vocab - 1):
        return {}
    if not 0 <= eos < vocab:
        raise ValueError(f"text_config.eos_token_id {eos} is not an id of the vocabulary "
                         f"(0..{vocab - 1})")
    return {"pool": "eos", "eos_id": eos}


def _clip_tokenizer(vocab: int, tokenizer: TokenizerFiles) -> TokenizerConfig:
    """OpenAI's vocabulary (49,408 ids, read by a CLIPTokenizer or with no tokenizer files) is
    clipforge's packaged BPE; any other comes as the tokenizer files beside the weights."""
    if vocab == 49408 and tokenizer.tokenizer_class in (None, "CLIPTokenizer"):
        return TokenizerConfig()
    return TokenizerConfig(kind="hf")


def _clip(hf: dict[str, Any], family: str, tokenizer: TokenizerFiles,
          legacy_eos: bool = True) -> CLIPConfig:
    v = json_field(hf, "vision_config", "", "object")
    t = json_field(hf, "text_config", "", "object")
    where = "text_config."
    vocab = _size(t, "vocab_size", where, 49408)
    kind = _clip_tokenizer(vocab, tokenizer)
    pad = _stated_pad_id(t, 1)
    if kind.kind == "hf":
        pad = tokenizer.pad_id(pad)
    text = TextConfig(
        width=_size(t, "hidden_size", where), layers=_size(t, "num_hidden_layers", where),
        heads=_size(t, "num_attention_heads", where),
        context_length=_size(t, "max_position_embeddings", where, 77), vocab_size=vocab,
        mlp_width=_size(t, "intermediate_size", where),
        activation=_activation(t, where, "quick_gelu"), ln_eps=_eps(t, where, 1e-5),
        pad_id=pad, **_eos_pooling(t, vocab, legacy_eos))
    vision = _clip_vision(v)
    return CLIPConfig(json_field(hf, "projection_dim", "", "positive int", 512), vision, text,
                      vision.activation, tokenizer=kind, family=family)


def _metaclip_2(hf: dict[str, Any], family: str, tokenizer: TokenizerFiles) -> CLIPConfig:
    return _clip(hf, family, tokenizer, legacy_eos=False)


def _siglip(hf: dict[str, Any], family: str, tokenizer: TokenizerFiles) -> CLIPConfig:
    """SigLIP, and SigLIP 2 at fixed resolution (the same SiglipModel, with Gemma's tokenizer,
    whose text big_vision lower-cased, ASCII letters only, where SigLIP's is canonicalised)."""
    v = json_field(hf, "vision_config", "", "object", {})
    t = json_field(hf, "text_config", "", "object", {})
    if not json_field(v, "vision_use_head", "vision_config.", "bool", True):
        raise ValueError("vision_config.vision_use_head false is not implemented (without its "
                         "attention-pooling head the model has no image embedding)")
    vision = VisionConfig(
        image_size=_size(v, "image_size", "vision_config.", 224),
        width=_size(v, "hidden_size", "vision_config.", 768),
        layers=_size(v, "num_hidden_layers", "vision_config.", 12),
        heads=_size(v, "num_attention_heads", "vision_config.", 12),
        patch_size=_size(v, "patch_size", "vision_config.", 16),
        mlp_width=_size(v, "intermediate_size", "vision_config.", 3072),
        activation=_activation(v, "vision_config.", "gelu_pytorch_tanh"),
        ln_eps=_eps(v, "vision_config.", 1e-6), patch_bias=True, class_token=False,
        ln_pre=False, pool="map", proj="none")
    _require(v, "num_channels", "vision_config.", 3)
    where = "text_config."
    width = _size(t, "hidden_size", where, 768)
    text = TextConfig(
        width=width, layers=_size(t, "num_hidden_layers", where, 12),
        heads=_size(t, "num_attention_heads", where, 12),
        context_length=_size(t, "max_position_embeddings", where, 64),
        vocab_size=_size(t, "vocab_size", where, 32000),
        mlp_width=_size(t, "intermediate_size", where, 3072),
        activation=_activation(t, where, "gelu_pytorch_tanh"), ln_eps=_eps(t, where, 1e-6),
        causal=False, pool="last", pad_id=tokenizer.pad_id(_stated_pad_id(t, 1)), proj="linear")
    embed_dim = _size(t, "projection_size", where, width)
    if embed_dim != vision.width:
        raise ValueError(f"text_config.projection_size {embed_dim} differs from "
                         f"vision_config.hidden_size {vision.width}: the two embeddings must "
                         "have one width")
    family, cleaning = siglip_text(tokenizer, family)
    return CLIPConfig(embed_dim, vision, text, vision.activation, logit_bias=True,
                      probability="sigmoid", family=family,
                      tokenizer=TokenizerConfig(kind="hf", clean=cleaning))


def siglip_text(tokenizer: TokenizerFiles, family: str = "siglip") -> tuple[str, str]:
    """(family, text cleaning) of a SigLIP-style model, from its tokenizer files, wherever the
    weights come from: what each was trained with.  SigLIP's SentencePiece text was
    canonicalised (punctuation removed, lower case: big_vision, transformers' SiglipTokenizer,
    OpenCLIP); SigLIP 2's Gemma text was only lower-cased, ASCII letters only (big_vision's
    ``lower`` op).  OpenCLIP's SigLIP 2 configs ask for ``canonicalize`` instead, which differs
    for text with punctuation or non-ASCII capitals: clipforge follows the training."""
    if (tokenizer.tokenizer_class or "").startswith("Gemma"):
        return "siglip2", "ascii_lower"
    return family, "canonicalize"


def _chinese_clip(hf: dict[str, Any], family: str, tokenizer: TokenizerFiles) -> CLIPConfig:
    """Chinese-CLIP: a BERT text tower read at the tokenizer's length (Chinese-CLIP was trained
    at 52 tokens of BERT's 512 positions), or at all its positions if the tokenizer sets none."""
    v = json_field(hf, "vision_config", "", "object")
    t = json_field(hf, "text_config", "", "object")
    where = "text_config."
    _require(t, "position_embedding_type", where, "absolute")
    positions = _size(t, "max_position_embeddings", where, 512)
    context = min(tokenizer.max_length or positions, positions)
    text = TextConfig(
        width=_size(t, "hidden_size", where), layers=_size(t, "num_hidden_layers", where),
        heads=_size(t, "num_attention_heads", where), context_length=context,
        max_positions=positions if context < positions else 0,
        vocab_size=_size(t, "vocab_size", where), mlp_width=_size(t, "intermediate_size", where),
        activation=_activation(t, where, "gelu"), ln_eps=_eps(t, where, 1e-12),
        causal=False, norm="post", pool="first", pad_id=tokenizer.pad_id(_stated_pad_id(t, 0)),
        mask_padding=True, type_vocab_size=_size(t, "type_vocab_size", where, 2))
    vision = _clip_vision(v)
    return CLIPConfig(json_field(hf, "projection_dim", "", "positive int", 512), vision, text,
                      vision.activation, family=family, tokenizer=TokenizerConfig(kind="hf"))


Reader = Callable[[dict[str, Any], str, TokenizerFiles], CLIPConfig]
# model_type -> (reader, renaming rules, family)
_FORMATS: dict[str, tuple[Reader, list[Rule], str]] = {
    "clip": (_clip, CLIP_RULES, "clip"),
    "metaclip_2": (_metaclip_2, CLIP_RULES, "metaclip2"),
    "siglip": (_siglip, SIGLIP_RULES, "siglip"),
    "chinese_clip": (_chinese_clip, CHINESE_CLIP_RULES, "chinese-clip"),
}
HF_MODEL_TYPES = tuple(_FORMATS)


def hf_model_type(hf: dict[str, Any], source: str = "config.json") -> str:
    model_type = hf.get("model_type", "clip")
    if model_type == "siglip2":
        raise CheckpointError(
            f"{source}: model_type 'siglip2' (transformers' Siglip2Model, the variable-"
            "resolution NaFlex SigLIP 2) is not implemented; the fixed-resolution SigLIP 2 "
            "checkpoints (model_type 'siglip') are")
    if model_type not in _FORMATS:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not implemented "
                              f"(clipforge reads {', '.join(HF_MODEL_TYPES)})")
    return model_type


def hf_rules(model_type: str) -> list[Rule]:
    return _FORMATS[model_type][1]


def preprocess_from_hf(preprocessor: dict[str, Any] | None, image_size: int,
                       source: str = "preprocessor_config.json",
                       default: PreprocessConfig | None = None) -> PreprocessConfig:
    """The resizing, cropping and normalisation of a transformers image-processor config.
    ``size`` ``{"shortest_edge": S}`` (or a number) with a centre crop is CLIP's resize and
    crop; ``{"height": S, "width": S}`` without a crop stretches the image (OpenCLIP's
    "squash", SigLIP's).  Anything else that changes the pixels is an error naming it."""
    default = default or PreprocessConfig()
    if not preprocessor:
        return default
    inverse = {code: name for name, code in _RESAMPLE.items()}
    try:
        resample = json_field(preprocessor, "resample", "", "int", _RESAMPLE[
            default.interpolation])
        if resample not in inverse:
            raise ValueError(f"resample {resample} is not implemented (clipforge resizes "
                             f"bicubic (3) or bilinear (2))")
        for key in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            # null: the processor's default (true for these; for do_convert_rgb, transformers
            # 4's "convert when needed", which on RGB images is the same)
            if preprocessor.get(key) is not None and not json_field(preprocessor, key, "",
                                                                     "bool"):
                raise ValueError(f"{key} false is not implemented")
        factor = json_field(preprocessor, "rescale_factor", "", "number", 1 / 255)
        if abs(factor - 1 / 255) > 1e-12:
            raise ValueError(f"rescale_factor {factor} is not implemented (1/255)")
        return PreprocessConfig(
            mean=tuple(json_field(preprocessor, "image_mean", "", "3 numbers", default.mean)),
            std=tuple(json_field(preprocessor, "image_std", "", "3 numbers", default.std)),
            interpolation=inverse[resample],
            resize_mode=_resize_mode(preprocessor, image_size, default.resize_mode))
    except ValueError as exc:
        raise CheckpointError(f"{source}: {exc}; fix the file or download it again") from None


def _resize_mode(pre: dict[str, Any], image_size: int, default: str) -> str:
    size = pre.get("size")
    crop = json_field(pre, "do_center_crop", "", "bool", default == "shortest")
    if size is None:
        mode = default
    elif isinstance(size, int) and not isinstance(size, bool) or (
            isinstance(size, dict) and set(size) == {"shortest_edge"}):
        edge = size if isinstance(size, int) else size["shortest_edge"]
        if edge != image_size:
            raise ValueError(f"size {edge} differs from the model's image_size {image_size}")
        mode = "shortest"
    elif isinstance(size, dict) and set(size) == {"height", "width"}:
        if size["height"] != image_size or size["width"] != image_size:
            raise ValueError(f"size {size} differs from the model's square image_size "
                             f"{image_size}")
        mode = "squash"
    else:
        raise ValueError(f"size {size!r} is not implemented")
    if mode == "shortest" and not crop:
        raise ValueError("do_center_crop false after a shortest-edge resize is not implemented")
    if crop:
        crop_size = pre.get("crop_size", image_size)
        side = crop_size if isinstance(crop_size, int) else (
            crop_size.get("height") if isinstance(crop_size, dict) else None)
        if side != image_size or (isinstance(crop_size, dict)
                                  and crop_size.get("width") != image_size):
            raise ValueError(f"crop_size {crop_size!r} differs from the model's image_size "
                             f"{image_size}")
    return mode


# clipforge's config fields as a config.json spells them, for messages.
HF_FIELD_NAMES = {
    "embed_dim": "projection_dim",
    **{f"{tower}.{ours}": f"{tower}_config.{theirs}" for tower in ("vision", "text")
       for ours, theirs in (("width", "hidden_size"), ("layers", "num_hidden_layers"),
                            ("heads", "num_attention_heads"), ("mlp_width", "intermediate_size"))},
    "vision.image_size": "vision_config.image_size",
    "vision.patch_size": "vision_config.patch_size",
    "text.context_length": "text_config.max_position_embeddings",
    "text.vocab_size": "text_config.vocab_size",
}


def _hf_spelling(message: str) -> str:
    """``message`` with clipforge's field names as config.json spells them."""
    return re.sub(r"\b(?:vision|text)\.\w+|\bembed_dim\b",
                  lambda m: HF_FIELD_NAMES.get(m.group(0), m.group(0)), message)


# How each family's image processor defaults (what a missing preprocessor_config.json means).
_DEFAULT_PREPROCESS = {"siglip": PreprocessConfig((0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
                                                  resize_mode="squash")}


def config_from_hf(hf: dict[str, Any], preprocessor: dict[str, Any] | None,
                   source: str = "config.json",
                   preprocessor_source: str = "preprocessor_config.json",
                   directory: Path | None = None) -> CLIPConfig:
    """A :class:`CLIPConfig` from a transformers ``config.json`` (and its image processor).
    A field of the wrong JSON type, or a value clipforge does not implement, is an error naming
    the file and the field, never coerced or dropped.  ``directory``: the model directory, whose
    tokenizer files (see :class:`TokenizerFiles`) and ``processor_config.json`` are read too
    (transformers 5 writes a processor's image settings there, and reads them first)."""
    model_type = hf_model_type(hf, source)
    reader, _, family = _FORMATS[model_type]
    if directory is not None:
        preprocessor, preprocessor_source = _image_processor(directory, preprocessor,
                                                             preprocessor_source)
    try:
        config = reader(hf, family, TokenizerFiles.read(directory))
    except TokenizerFilesError:
        raise
    except ValueError as exc:
        raise CheckpointError(f"{source} is not a {model_type} config clipforge can read: "
                              f"{_hf_spelling(str(exc))}. Fix the file or download it again"
                              ) from None
    preprocess = preprocess_from_hf(preprocessor, config.image_size, preprocessor_source,
                                    _DEFAULT_PREPROCESS.get(model_type))
    return _inherit_activation(config.replace(preprocess=preprocess))


def _image_processor(directory: Path, preprocessor: dict[str, Any] | None, source: str
                     ) -> tuple[dict[str, Any] | None, str]:
    """The image processor's settings as transformers finds them: the ``image_processor``
    object of ``processor_config.json`` if there is one, else ``preprocessor_config.json``."""
    path = directory / "processor_config.json"
    processor = read_hf_json(path)
    if processor is not None and "image_processor" in processor:
        try:
            nested = json_field(processor, "image_processor", "", "object")
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}; fix the file or download it again"
                                  ) from None
        return nested, f"{path} (its image_processor)"
    return preprocessor, source


def _inherit_activation(config: CLIPConfig) -> CLIPConfig:
    """Towers whose activation is the model's say so by leaving theirs unset (the canonical
    form, which a config written by clipforge also has)."""
    changes = {}
    for name in ("vision", "text"):
        tower = getattr(config, name)
        if tower.activation == config.activation:
            changes[name] = dataclasses.replace(tower, activation=None)
    return config.replace(**changes)


def read_hf_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None if there is no such file."""
    return read_json_object(path) if path.is_file() else None


# ------------------------------------------------------------------------ config.json out


def hf_format_of(config: CLIPConfig) -> str:
    """The transformers model type that represents ``config`` exactly; a ValueError for a
    model no transformers class computes (ResNet towers, OpenCLIP's XLM-RoBERTa towers)."""
    v, t = config.vision, config.text
    if not v.is_vit:
        raise ValueError("Hugging Face has no ResNet CLIP tower; use --to clipforge")
    if eva := [*v.changed(VIT_FIELDS), *(["proj"] if v.proj == "linear" else [])]:
        raise ValueError(f"no transformers model class computes this image tower (vision.{eva[0]} "
                         f"{getattr(v, eva[0])!r}: a timm Eva tower); use --to clipforge")
    if v.pool == "map" and not v.class_token and t.pool == "last" and t.proj == "linear":
        return "siglip"
    if t.norm == "post" and t.pool == "first" and t.type_vocab_size and t.position_offset == 0:
        return "chinese_clip"
    if t.norm == "pre" and t.causal and t.proj == "matrix" and v.pool == "token" and (
            t.pool == "argmax" or t.pool == "eos"):
        return _clip_model_type(config)
    raise ValueError("no transformers model class computes this model exactly (its text "
                     f"tower pools by {t.pool!r} with a {t.proj!r} projection); use --to "
                     "clipforge")


def _clip_model_type(config: CLIPConfig) -> str:
    """``CLIPModel`` or ``MetaClip2Model``, which differ only in pooling: CLIPModel pools at the
    arg-max id when its eos_token_id is 2 (and at the first eos_token_id otherwise),
    MetaClip2Model always at the first eos_token_id.  So an eos of 2 (XLM-V's) needs
    MetaClip2Model, the arg-max needs CLIPModel, and any other eos is computed by both: then the
    recorded family picks the class it came from (a label only: the computation is the same)."""
    t = config.text
    if t.pool == "eos" and (t.eos_id == 2 or config.family == "metaclip2"):
        return "metaclip_2"
    return "clip"


def _common(tower: VisionConfig | TextConfig, act: str) -> dict[str, Any]:
    names = {v: k for k, v in _ACTIVATIONS.items() if k != "gelu_new"}
    return {"hidden_size": tower.width, "intermediate_size": tower.mlp_width,
            "num_attention_heads": tower.heads, "num_hidden_layers": tower.layers,
            "hidden_act": names[tower.activation or act], "layer_norm_eps": tower.ln_eps}


def config_to_hf(config: CLIPConfig, tokenizer_ids: dict[str, int] | None = None
                 ) -> dict[str, Any]:
    """``config.json`` of the transformers model that computes ``config`` (see
    :func:`hf_format_of`).  ``tokenizer_ids``: the special ids (bos, eos) of a Hugging Face
    tokenizer, recorded in the text config where they do not change the computation (the
    padding id is the model's, which is its tokenizer's)."""
    model_type = hf_format_of(config)
    v, t, act = config.vision, config.text, config.activation
    ids = tokenizer_ids or {}
    vision = {**_common(v, act), "image_size": v.image_size, "patch_size": v.patch_size,
              "num_channels": 3}
    text = {**_common(t, act), "vocab_size": t.vocab_size,
            "max_position_embeddings": t.positions, "pad_token_id": t.pad_id}
    top: dict[str, Any] = {"architectures": [_CLASSES[model_type]], "model_type": model_type,
                           "torch_dtype": "float32"}
    if model_type in ("clip", "metaclip_2"):
        eos = t.eos_id if t.pool == "eos" else _argmax_eos(config)
        text.update(bos_token_id=ids.get("bos", t.vocab_size - 2), eos_token_id=eos)
        top.update(projection_dim=config.embed_dim, logit_scale_init_value=2.6592)
    elif model_type == "siglip":
        vision["vision_use_head"] = True
        text["projection_size"] = config.embed_dim
        text.update({k: ids[k2] for k, k2 in (("bos_token_id", "bos"), ("eos_token_id", "eos"))
                     if k2 in ids})
    else:  # chinese_clip
        text.update(type_vocab_size=t.type_vocab_size, position_embedding_type="absolute")
        top["projection_dim"] = config.embed_dim
    return {**top, "text_config": {"model_type": f"{model_type}_text_model", **text},
            "vision_config": {"model_type": f"{model_type}_vision_model", **vision}}


def _argmax_eos(config: CLIPConfig) -> int:
    """The ``eos_token_id`` that makes CLIPModel pool at the arg-max id: OpenAI's end of text
    (the largest id, which its tokenizer always writes, so the first eos is the arg-max), or,
    with another vocabulary, 2, which CLIPModel reads as "arg-max" whatever the texts hold."""
    return config.text.vocab_size - 1 if config.tokenizer.kind == "openai" else 2


_CLASSES = {"clip": "CLIPModel", "metaclip_2": "MetaClip2Model", "siglip": "SiglipModel",
            "chinese_clip": "ChineseCLIPModel"}
_PROCESSORS = {"clip": ("CLIPImageProcessor", "CLIPProcessor"),
               "metaclip_2": ("CLIPImageProcessor", "CLIPProcessor"),
               "siglip": ("SiglipImageProcessor", "SiglipProcessor"),
               "chinese_clip": ("ChineseCLIPImageProcessor", "ChineseCLIPProcessor")}


def preprocessor_to_hf(config: CLIPConfig) -> dict[str, Any]:
    """``preprocessor_config.json`` of the model's transformers image processor."""
    size, pre = config.image_size, config.preprocess
    model_type = hf_format_of(config)
    if pre.resize_mode == "longest":
        raise ValueError("transformers' image processors have no longest-side resize with "
                         "padding (OpenCLIP's resize_mode 'longest'); use --to clipforge")
    image, processor = _PROCESSORS[model_type]
    squash = pre.resize_mode == "squash"
    return {
        "image_processor_type": image, "processor_class": processor,
        "do_resize": True,
        "size": {"height": size, "width": size} if squash else {"shortest_edge": size},
        "resample": _RESAMPLE[pre.interpolation],
        "do_center_crop": not squash, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(pre.mean), "image_std": list(pre.std), "do_convert_rgb": True,
    }

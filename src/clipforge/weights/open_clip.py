"""OpenCLIP hub directories: ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) beside
``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``.

OpenCLIP builds three kinds of model from such a config, and each is read here as data:

* the plain towers (its ``CLIP`` class: OpenAI's layout, which clipforge's own is): DFN,
  DataComp, MetaCLIP and LAION weights.  Sizes come from the tensors, everything else (head
  width, QuickGELU, ``act_kwargs``/``norm_kwargs``, pooling, ``no_ln_pre``...) from the config;
* ``CustomTextCLIP`` with OpenCLIP's own text transformer (keys ``text.*``) and timm's image
  towers (``visual.trunk.*``, ``timm_model_name``): SigLIP's (timm's VisionTransformer) and the
  Eva class's (PE-Core, EVA02, EVA01).  timm's parameter names are renamed to clipforge's by the
  table :data:`TIMM_RULES`, and what shapes cannot show (heads, activation, norm placement,
  rotary encoding...) comes from :data:`TIMM_TOWERS`, read from timm's own definitions;
* ``CustomTextCLIP`` with a Hugging Face text tower (``hf_model_name``: XLM-RoBERTa, RoBERTa),
  renamed by :data:`HF_TEXT_RULES`; its sizes, activation and padding id come from the
  ``config.json`` that ``hf_model_name`` names (a local folder, absolute or relative to the model
  directory, else downloaded from the hub).

A field that changes the computation is mapped onto clipforge's config or is an error naming it
(layer scale, attentional pooling, average pooling, QK norm, cosine attention, CoCa...); a field
OpenCLIP itself ignores for that kind of tower (training-only settings, a timm tower's ViT sizes)
is ignored here too.  A name that no OpenCLIP version defines is an error.

The tokenizer is OpenAI's BPE unless ``text_cfg.hf_tokenizer_name`` names a Hugging Face one; its
files are looked for where OpenCLIP looks: in the model directory (``local-dir:``), then at
``hf_tokenizer_name`` as a local path, then on the hub.  ``tokenizer_kwargs`` carry OpenCLIP's
text cleaning (``clean``, default ``whitespace`` as OpenCLIP's ``HFTokenizer``) and
``strip_sep_token``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..configs import (
    CLIPConfig,
    PreprocessConfig,
    TextConfig,
    TokenizerConfig,
    VisionConfig,
    json_field,
)
from .checkpoint import CheckpointError, StateDict, read_json_object
from .huggingface import TokenizerFiles, siglip_text
from .infer import _count_blocks, _dim
from .renaming import Rule, rule, to_ours

# ------------------------------------------------------------------------ field tables

# Every field of OpenCLIP's CLIPVisionCfg and CLIPTextCfg (open_clip/model.py): a name outside
# these is an error, as it is for OpenCLIP itself.
VISION_FIELDS = frozenset({
    "layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "ls_init_value",
    "patch_dropout", "attentional_pool", "attn_pooler_queries", "attn_pooler_heads", "no_ln_pre",
    "pos_embed_type", "final_ln_after_pool", "pool_type", "output_tokens", "act_kwargs",
    "norm_kwargs", "block_type", "qk_norm", "scaled_cosine_attn", "scale_heads",
    "scale_attn_inner", "scale_attn", "scale_fc", "timm_model_name", "timm_model_pretrained",
    "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path"})
TEXT_FIELDS = frozenset({
    "context_length", "vocab_size", "hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs",
    "width", "heads", "layers", "mlp_ratio", "ls_init_value", "embed_cls", "pad_id", "eos_id",
    "no_causal_mask", "final_ln_after_pool", "pool_type", "proj_bias", "proj_type",
    "output_tokens", "act_kwargs", "norm_kwargs", "block_type", "qk_norm", "scaled_cosine_attn",
    "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc", "hf_model_name",
    "hf_model_pretrained", "hf_proj_type", "hf_pooler_type"})
# model_cfg: the arguments of OpenCLIP's CLIP / CustomTextCLIP (custom_text picks the class)
MODEL_FIELDS = frozenset({
    "embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
    "nonscalar_logit_scale", "output_dict", "custom_text", "cast_dtype"})
PREPROCESS_FIELDS = frozenset({"size", "mode", "mean", "std", "interpolation", "resize_mode",
                               "fill_color"})

# Settings whose only implemented value is OpenCLIP's default: (field, default, what it is).
# The attention-block variants of open_clip/transformer.py and the rest that clipforge's
# transformer does not compute.
_BLOCK_DEFAULTS = (
    ("ls_init_value", None, "layer scale"),
    ("qk_norm", False, "layer norm of queries and keys"),
    ("scaled_cosine_attn", False, "scaled cosine attention"),
    ("scale_heads", False, "per-head attention scaling"),
    ("scale_attn_inner", False, "a layer norm inside the attention"),
    ("scale_attn", False, "a layer norm after the attention"),
    ("scale_fc", False, "a layer norm inside the MLP"),
    ("output_tokens", False, "token outputs in place of the embedding"),
)
_VISION_DEFAULTS = (*_BLOCK_DEFAULTS,
                    ("attentional_pool", False, "CoCa's attentional pooler"))
_TEXT_DEFAULTS = (*_BLOCK_DEFAULTS,
                  ("embed_cls", False, "CoCa's appended class token"),
                  ("tokenizer_mode", None, "a custom tokenization mode"))

# OpenCLIP's text pool_type -> clipforge's TextConfig.pool
_TEXT_POOLS = {"argmax": "argmax", "eos": "eos", "last": "last", "first": "first"}
# hf_pooler_type -> TextConfig.pool (cls_pooler uses the tower's pooler layer, dense + tanh)
_HF_POOLERS = {"mean_pooler": "mean", "cls_last_hidden_state_pooler": "first"}
# transformers' hidden_act -> clipforge's activation
_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                   "quick_gelu": "quick_gelu"}
_HF_TEXT_MODELS = ("xlm-roberta", "roberta")  # BERT-style, positions after the padding id
_INTERPOLATIONS = {"bicubic": "bicubic", "bilinear": "bilinear",
                   "random": "bicubic"}  # 'random' is a training option: bicubic at inference


TIMM_LN_EPS = 1e-6  # timm's LayerNorm (SigLIP's, EVA's); PE's towers set 1e-5
# The settings of a timm SigLIP tower (timm's VisionTransformer with class_token False,
# global_pool 'map'), as clipforge's VisionConfig fields
_SIGLIP = {"ln_eps": TIMM_LN_EPS, "patch_bias": True, "class_token": False, "ln_pre": False,
           "pool": "map"}


@dataclass(frozen=True)
class TimmTower:
    """What a timm tower's weights cannot show (its sizes come from the tensors), from timm's
    own definitions (``vision_transformer.py``, ``eva.py``): its head count, its MLP's
    activation (``gelu`` is ``nn.GELU``, exact; ``gelu_tanh`` timm's ``GELUTanh``; ``silu`` the
    gate of a SwiGLU), the rest of the tower as :class:`VisionConfig` fields (``settings``) and
    the family name of the models built on it."""

    heads: int
    activation: str
    family: str = "siglip"
    settings: Mapping[str, Any] = dataclasses.field(default_factory=lambda: dict(_SIGLIP))


def _pe_core(heads: int, grid: int, class_token: bool = True, offset: int = 1) -> TimmTower:
    """Meta's PE-Core towers (timm's ``vit_pe_core_*``, Eva class with ``attn_type='rope'``):
    a patch convolution without bias, ``norm_pre``, rotary encoding of (column, row) patch
    coordinates scaled to the pre-training grid, an 8-head attention-pooling head, LayerNorm
    eps 1e-5."""
    return TimmTower(heads, "gelu", "pe-core", {
        "ln_eps": 1e-5, "patch_bias": False, "class_token": class_token, "ln_pre": True,
        "pool": "map", "pool_heads": 8, "rope": True, "rope_grid": grid, "rope_offset": offset,
        "rope_indexing": "xy"})


# EVA's CLIP towers (timm's Eva class, global_pool 'token'): a biased patch convolution, a class
# token, no norm before the blocks, q and v biases without a k bias
_EVA = {"ln_eps": TIMM_LN_EPS, "patch_bias": True, "class_token": True, "ln_pre": False,
        "pool": "token"}
# EVA02-B and -L: SwiGLU MLPs with a norm on their hidden layer, a norm inside the attention,
# rotary encoding scaled to a 16x16 grid
_EVA02 = {**_EVA, "mlp_gated": True, "attn_norm": True, "mlp_norm": True, "rope": True,
          "rope_grid": 16}

# The timm image towers of OpenCLIP's model configs.  Some SigLIP towers use exact GELU although
# big_vision trained with the tanh form: timm defines them so, and OpenCLIP computes them so.
TIMM_TOWERS: dict[str, TimmTower] = {
    **{f"vit_base_patch16_siglip_{s}": TimmTower(12, "gelu") for s in (224, 256, 384, 512)},
    "vit_base_patch32_siglip_256": TimmTower(12, "gelu_tanh"),
    **{f"vit_large_patch16_siglip_{s}": TimmTower(16, "gelu") for s in (256, 384)},
    "vit_large_patch16_siglip_512": TimmTower(16, "gelu_tanh"),
    **{f"vit_so400m_patch14_siglip_{s}": TimmTower(16, "gelu") for s in (224, 378, 384)},
    **{f"vit_so400m_patch16_siglip_{s}": TimmTower(16, "gelu_tanh") for s in (256, 384, 512)},
    **{f"vit_giantopt_patch16_siglip_{s}": TimmTower(16, "gelu_tanh") for s in (256, 384)},
    "vit_pe_core_tiny_patch16_384": _pe_core(3, 24),
    "vit_pe_core_small_patch16_384": _pe_core(6, 24),
    "vit_pe_core_base_patch16_224": _pe_core(12, 14),
    "vit_pe_core_large_patch14_336": _pe_core(16, 24),
    "vit_pe_core_gigantic_patch14_448": _pe_core(16, 32, class_token=False, offset=0),
    "eva02_base_patch16_clip_224": TimmTower(12, "silu", "eva02", _EVA02),
    "eva02_large_patch14_clip_224": TimmTower(16, "silu", "eva02", _EVA02),
    "eva02_large_patch14_clip_336": TimmTower(16, "silu", "eva02", _EVA02),
    # EVA02-E: plain MLPs, each block's branches normalised before they are added
    "eva02_enormous_patch14_clip_224": TimmTower(16, "gelu", "eva02", {**_EVA,
                                                                       "norm": "res_post"}),
    "eva_giant_patch14_224": TimmTower(16, "gelu", "eva", _EVA),  # EVA01-g
}

# ------------------------------------------------------------------------ renaming rules


_LOGIT_RULES = [rule("logit_scale", squeeze=True), rule("logit_bias", squeeze=True)]

# OpenCLIP's text transformer: at the root (CLIP) or under text. (CustomTextCLIP)
_TEXT_NAMES = ("token_embedding", "positional_embedding", "transformer", "ln_final",
               "text_projection")
TEXT_TRANSFORMER_RULES = [rule(name, prefix + name) for prefix in ("", "text.")
                          for name in _TEXT_NAMES]

PLAIN_VISION_RULES = [rule("visual")]  # OpenAI's names, as clipforge's

_TIMM = "visual.trunk."
_THEIRS = _TIMM + "blocks.{n}."
_OURS = "visual.transformer.resblocks.{n}."
# timm's names, shared by its VisionTransformer (SigLIP) and its Eva class (PE-Core, EVA); a
# tower has the tensors of its options only
TIMM_RULES = [
    rule("visual.conv1", _TIMM + "patch_embed.proj"),
    rule("visual.class_embedding", _TIMM + "cls_token", squeeze=True),
    rule("visual.positional_embedding", _TIMM + "pos_embed", squeeze=True),
    rule("visual.ln_pre", _TIMM + "norm_pre"),
    rule(_OURS + "ln_1", _THEIRS + "norm1"),
    rule(_OURS + "attn.in_proj_{kind}", _THEIRS + "attn.qkv.{kind}"),
    # Eva: a fused weight with q and v biases, or three projections; the k bias they lack is
    # added as zeros first (_zero_key_biases)
    rule(_OURS + "attn.in_proj_bias", _THEIRS + "attn.q_bias", _THEIRS + "attn.k_bias",
          _THEIRS + "attn.v_bias"),
    rule(_OURS + "attn.in_proj_{kind}", _THEIRS + "attn.q_proj.{kind}",
          _THEIRS + "attn.k_proj.{kind}", _THEIRS + "attn.v_proj.{kind}"),
    rule(_OURS + "attn.ln_inner", _THEIRS + "attn.norm"),
    rule(_OURS + "attn.out_proj", _THEIRS + "attn.proj"),
    rule(_OURS + "ln_2", _THEIRS + "norm2"),
    rule(_OURS + "mlp.c_fc", _THEIRS + "mlp.fc1"),
    rule(_OURS + "mlp.c_fc.{kind}", _THEIRS + "mlp.fc1_g.{kind}", _THEIRS + "mlp.fc1_x.{kind}"),
    rule(_OURS + "mlp.ln", _THEIRS + "mlp.norm"),
    rule(_OURS + "mlp.c_proj", _THEIRS + "mlp.fc2"),
    rule("visual.ln_post", _TIMM + "norm"),
    rule("visual.attn_pool.probe", _TIMM + "attn_pool.latent"),
    rule("visual.attn_pool.in_proj_{kind}", _TIMM + "attn_pool.q.{kind}",
          _TIMM + "attn_pool.kv.{kind}"),
    rule("visual.attn_pool.out_proj", _TIMM + "attn_pool.proj"),
    rule("visual.attn_pool.ln", _TIMM + "attn_pool.norm"),
    rule("visual.attn_pool.mlp.c_fc", _TIMM + "attn_pool.mlp.fc1"),
    rule("visual.attn_pool.mlp.c_proj", _TIMM + "attn_pool.mlp.fc2"),
    rule("visual.proj", _TIMM + "head"),  # timm_proj null: the trunk's head is the projection
]
_QUERY_BIAS = re.compile(r"(visual\.trunk\.blocks\.\d+\.attn\.)(q_bias|q_proj\.bias)$")


def _zero_key_biases(sd: StateDict, source: str) -> StateDict:
    """``sd`` with a zero k bias beside each Eva attention's q bias.  timm's Eva attention has
    biases on its queries and values only; clipforge's fused q/k/v bias holds a zero k part,
    which computes exactly the same (adding an exact zero) and is saved as it is.  (A
    ``k_proj.bias`` in the file is a real one, kept; ``k_bias`` is timm's unsaved zero buffer,
    which OpenCLIP refuses in a file.)"""
    out = dict(sd)
    for key, value in sd.items():
        if match := _QUERY_BIAS.match(key):
            if match[2] == "q_bias" and match[1] + "k_bias" in sd:
                raise CheckpointError(f"{source}: tensor {match[1] + 'k_bias'!r} belongs to no "
                                      "part of the model its open_clip_config.json describes "
                                      "(timm's Eva attention has no k bias)")
            name = "k_bias" if match[2] == "q_bias" else "k_proj.bias"
            out.setdefault(match[1] + name, torch.zeros_like(value))
    return out


# transformers' (XLM-)RoBERTa under text.transformer., OpenCLIP's projection under text.proj
_HF = "text.transformer."
_LAYER = _HF + "encoder.layer.{n}."
_BLOCK = "transformer.resblocks.{n}."
HF_TEXT_RULES = [
    rule("token_embedding.weight", _HF + "embeddings.word_embeddings.weight"),
    rule("positional_embedding", _HF + "embeddings.position_embeddings.weight"),
    rule("token_type_embedding", _HF + "embeddings.token_type_embeddings.weight"),
    rule("ln_embed", _HF + "embeddings.LayerNorm"),
    rule(_BLOCK + "attn.in_proj_{kind}", _LAYER + "attention.self.query.{kind}",
          _LAYER + "attention.self.key.{kind}", _LAYER + "attention.self.value.{kind}"),
    rule(_BLOCK + "attn.out_proj", _LAYER + "attention.output.dense"),
    rule(_BLOCK + "ln_1", _LAYER + "attention.output.LayerNorm"),
    rule(_BLOCK + "mlp.c_fc", _LAYER + "intermediate.dense"),
    rule(_BLOCK + "mlp.c_proj", _LAYER + "output.dense"),
    rule(_BLOCK + "ln_2", _LAYER + "output.LayerNorm"),
]
HF_MLP_PROJECTION = [rule("text_projection", "text.proj")]  # .0 and .2, Linear without bias
HF_LINEAR_PROJECTION = [rule("text_projection", "text.proj.weight", transpose=True)]
# buffers transformers and timm versions save; they hold no weights (timm recomputes its rotary
# tables as clipforge does, and ignores them in files too)
_IGNORED = re.compile(r"text\.transformer\.embeddings\.(position_ids|token_type_ids)$"
                      r"|visual\.trunk\.rope\.(bands|pos_embed|pos_embed_sin|pos_embed_cos)$")


def rename(sd: StateDict, rules: list[Rule], source: str) -> StateDict:
    """OpenCLIP's tensors under clipforge's names; a tensor no rule names is an error (OpenCLIP
    loads strictly too: it would not load into the model the config describes)."""
    return to_ours(sd, rules, source, ignored=_IGNORED, unknown=lambda key: (
        f"{source}: tensor {key!r} belongs to no part of the model its open_clip_config.json "
        "describes; the config and the weights do not go together"))


# ------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class OpenClipModel:
    """A read OpenCLIP directory: clipforge's config and tensors, the folder that holds the
    tokenizer files (the model directory unless the config names another) and, for messages,
    clipforge's field names as the files spell them."""

    config: CLIPConfig
    sd: StateDict
    tokenizer_files: Path
    names: dict[str, str]


def _check_names(data: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}{unknown[0]} is not an OpenCLIP setting clipforge knows (it "
                         f"reads {', '.join(sorted(known))}); remove it or fix its spelling")


def _defaults_only(data: Mapping[str, Any], table: tuple, where: str) -> None:
    for key, default, what in table:
        if data.get(key, default) != default:
            raise ValueError(f"{where}{key} {data[key]!r} ({what}) is not implemented")


def _activation(quick_gelu: bool, act_kwargs: Any, where: str) -> str:
    """OpenCLIP's ``act_layer`` (QuickGELU or nn.GELU) with its ``act_kwargs``."""
    if act_kwargs is None:
        return "quick_gelu" if quick_gelu else "gelu"
    if not isinstance(act_kwargs, dict):
        raise ValueError(f"{where}act_kwargs must be a JSON object, got "
                         f"{type(act_kwargs).__name__}")
    unknown = sorted(set(act_kwargs) - {"approximate"})
    if unknown or quick_gelu and act_kwargs:
        key = unknown[0] if unknown else "approximate"
        raise ValueError(f"{where}act_kwargs.{key} is not implemented for "
                         f"{'QuickGELU' if quick_gelu else 'GELU'}")
    approximate = act_kwargs.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"{where}act_kwargs.approximate {approximate!r} is not implemented "
                         "(clipforge implements 'none' and 'tanh')")
    return "gelu_tanh" if approximate == "tanh" else "gelu"


def _ln_eps(norm_kwargs: Any, where: str, default: float = 1e-5) -> float:
    if norm_kwargs is None:
        return default
    if not isinstance(norm_kwargs, dict):
        raise ValueError(f"{where}norm_kwargs must be a JSON object, got "
                         f"{type(norm_kwargs).__name__}")
    unknown = sorted(set(norm_kwargs) - {"eps"})
    if unknown:
        raise ValueError(f"{where}norm_kwargs.{unknown[0]} is not implemented (clipforge "
                         "implements eps)")
    return float(json_field(norm_kwargs, "eps", f"{where}norm_kwargs.", "number", default))


def _size(data: Mapping[str, Any], key: str, where: str, shown: int | None,
          default: int) -> int:
    """A size the config may state: stated, else what the tensors show, else OpenCLIP's
    default (the tensors are then checked against it)."""
    if key in data:
        return json_field(data, key, where, "positive int")
    return shown if shown is not None else default


def _block_type(data: Mapping[str, Any], where: str) -> None:
    """``custom`` blocks compute what the default ones do unless one of their options is on
    (checked separately)."""
    value = data.get("block_type")
    if value not in (None, "default", "custom"):
        raise ValueError(f"{where}block_type {value!r} is not implemented")


# ---------------------------------------------------------------- image towers


def _vision(v: Mapping[str, Any], sd: StateDict, act: str) -> VisionConfig:
    where = "model_cfg.vision_cfg."
    _check_names(v, VISION_FIELDS, where)
    if v.get("timm_model_name") is not None:
        return _timm_vision(v, sd, where)
    if isinstance(v.get("layers"), list):
        return _resnet_vision(v, sd, where)
    return _vit_vision(v, sd, act, where)


def _vit_vision(v: Mapping[str, Any], sd: StateDict, act: str, where: str) -> VisionConfig:
    _defaults_only(v, _VISION_DEFAULTS, where)
    _block_type(v, where)
    # sin_cos_2d is a fixed table, but stored with the weights like a learned one
    pos = json_field(v, "pos_embed_type", where, "str", "learnable")
    if pos not in ("learnable", "sin_cos_2d"):
        raise ValueError(f"{where}pos_embed_type {pos!r} is not implemented (clipforge implements "
                         "'learnable' and 'sin_cos_2d')")
    pool = json_field(v, "pool_type", where, "str", "tok")
    if pool != "tok":
        after = " with final_ln_after_pool" if v.get("final_ln_after_pool") else ""
        raise ValueError(f"{where}pool_type {pool!r}{after} is not implemented (clipforge "
                         "pools the class token, 'tok')")
    # with the class token pooled, a norm after pooling is the same per-token norm
    json_field(v, "final_ln_after_pool", where, "bool", False)
    conv = "visual.conv1.weight"
    width = _size(v, "width", where, _dim(sd, conv, 0), 768)
    patch = _size(v, "patch_size", where, _dim(sd, conv, -1), 16)
    head_width = json_field(v, "head_width", where, "positive int", 64)
    if width % head_width:
        raise ValueError(f"{where}head_width {head_width} does not divide the image tower's width "
                         f"{width}")
    positions = _dim(sd, "visual.positional_embedding", 0)
    grid = round((positions - 1) ** 0.5) if positions else None
    layers = _size(v, "layers", where, _count_blocks(sd, "visual.transformer.resblocks.") or None,
                   12)
    return VisionConfig(
        image_size=_size(v, "image_size", where, grid * patch if grid else None, 224),
        width=width, layers=layers, heads=width // head_width, patch_size=patch,
        mlp_width=_mlp_width(v, where, width,
                             _dim(sd, "visual.transformer.resblocks.0.mlp.c_fc.weight", 0)),
        activation=_activation(act == "quick_gelu", v.get("act_kwargs"), where),
        ln_eps=_ln_eps(v.get("norm_kwargs"), where),
        ln_pre=not json_field(v, "no_ln_pre", where, "bool", False))


def _mlp_width(data: Mapping[str, Any], where: str, width: int, shown: int | None) -> int:
    if "mlp_ratio" in data:
        return int(width * json_field(data, "mlp_ratio", where, "number"))
    return shown if shown is not None else 4 * width


def _resnet_vision(v: Mapping[str, Any], sd: StateDict, where: str) -> VisionConfig:
    """OpenAI's ResNet (OpenCLIP builds it from layers, width, head_width, image_size only)."""
    layers = v["layers"]
    if not (len(layers) == 4 and all(isinstance(n, int) and n > 0 for n in layers)):
        raise ValueError(f"{where}layers of a ResNet must be 4 positive block counts, got {layers}")
    width = _size(v, "width", where, _dim(sd, "visual.layer1.0.conv1.weight", 0), 64)
    head_width = json_field(v, "head_width", where, "positive int", 64)
    positions = _dim(sd, "visual.attnpool.positional_embedding", 0)
    grid = round((positions - 1) ** 0.5) if positions else None
    return VisionConfig(_size(v, "image_size", where, grid * 32 if grid else None, 224), width,
                        tuple(layers), width * 32 // head_width)


def _timm_vision(v: Mapping[str, Any], sd: StateDict, where: str) -> VisionConfig:
    """A timm tower of :data:`TIMM_TOWERS` in OpenCLIP's TimmModel: sizes from the tensors,
    the rest from the table.  ``timm_pool`` must be the tower's own pooling (its class token or
    its attention-pooling head); ``timm_proj`` "none" means no projection, null the trunk's
    own head (a biased linear layer to embed_dim, PE's and EVA's); OpenCLIP's extra head
    ("linear", "mlp") is not implemented."""
    name = json_field(v, "timm_model_name", where, "str")
    tower = TIMM_TOWERS.get(name)
    if tower is None:
        raise ValueError(f"{where}timm_model_name {name!r} is not implemented (clipforge reads "
                         f"these timm towers: {', '.join(TIMM_TOWERS)})")
    pool = json_field(v, "timm_pool", where, "str", "avg")
    if pool != tower.settings["pool"]:
        raise ValueError(f"{where}timm_pool {pool!r} is not implemented for {name} (clipforge "
                         f"implements {tower.settings['pool']!r})")
    proj = v.get("timm_proj", "linear")
    if proj not in ("none", None):
        raise ValueError(f"{where}timm_proj {proj!r} is not implemented for {name} (clipforge "
                         "implements 'none' and null, the trunk's own head)")
    conv, block = "visual.conv1.weight", "visual.transformer.resblocks.0."
    hidden = _dim(sd, block + "mlp.c_fc.weight", 0) or 0
    if tower.settings.get("mlp_gated"):
        hidden //= 2  # the gate's and the value's rows
    pool_hidden = _dim(sd, "visual.attn_pool.mlp.c_fc.weight", 0) or 0
    settings = {**tower.settings, "pool_heads": _unless(tower.settings.get("pool_heads", 0),
                                                        tower.heads),
                "pool_mlp_width": _unless(pool_hidden, hidden)}
    return VisionConfig(
        image_size=json_field(v, "image_size", where, "positive int", 224),
        width=_dim(sd, conv, 0) or 768,
        layers=_count_blocks(sd, "visual.transformer.resblocks.") or 12, heads=tower.heads,
        patch_size=_dim(sd, conv, -1) or 16, mlp_width=hidden, activation=tower.activation,
        proj="none" if proj == "none" else "linear", **settings)


def _unless(value: int, same: int) -> int:
    """``value``, or 0 (the config's "as the tower") when it is ``same``: one spelling per
    model, so that configs compare equal."""
    return 0 if value == same else value


# ---------------------------------------------------------------- text towers


def _text(t: Mapping[str, Any], sd: StateDict, act: str) -> TextConfig:
    """OpenCLIP's own text transformer (CLIP's or CustomTextCLIP's ``text``)."""
    where = "model_cfg.text_cfg."
    _defaults_only(t, _TEXT_DEFAULTS, where)
    _block_type(t, where)
    pool = json_field(t, "pool_type", where, "str", "argmax")
    if pool not in _TEXT_POOLS:
        raise ValueError(f"{where}pool_type {pool!r} is not implemented (clipforge implements "
                         f"{', '.join(_TEXT_POOLS)})")
    proj_type = json_field(t, "proj_type", where, "str", "linear")
    if proj_type not in ("linear", "none"):
        raise ValueError(f"{where}proj_type {proj_type!r} is not implemented (clipforge implements "
                         "'linear' and 'none')")
    bias = json_field(t, "proj_bias", where, "bool", False)
    proj = "none" if proj_type == "none" else "linear" if bias else "matrix"
    width = _size(t, "width", where, _dim(sd, "token_embedding.weight", 1), 512)
    extra = {"eos_id": json_field(t, "eos_id", where, "int", 2)} if pool == "eos" else {}
    return TextConfig(
        width=width,
        layers=_size(t, "layers", where, _count_blocks(sd, "transformer.resblocks.") or None, 12),
        heads=json_field(t, "heads", where, "positive int", 8),
        context_length=_size(t, "context_length", where, _dim(sd, "positional_embedding", 0), 77),
        vocab_size=_size(t, "vocab_size", where, _dim(sd, "token_embedding.weight", 0), 49408),
        mlp_width=_mlp_width(t, where, width,
                             _dim(sd, "transformer.resblocks.0.mlp.c_fc.weight", 0)),
        activation=_activation(act == "quick_gelu", t.get("act_kwargs"), where),
        ln_eps=_ln_eps(t.get("norm_kwargs"), where),
        causal=not json_field(t, "no_causal_mask", where, "bool", False),
        pool=_TEXT_POOLS[pool], proj=proj, **extra)


def _hf_text(t: Mapping[str, Any], hf: Mapping[str, Any], hf_source: str, embed_dim: int
             ) -> TextConfig:
    """A transformers (XLM-)RoBERTa tower (OpenCLIP's HFTextEncoder): post-norm blocks, a mask
    over the padding, positions counted from the padding id + 1, then OpenCLIP's pooler and
    projection.  Sizes from the tower's ``config.json`` (``hf_source``)."""
    where = "model_cfg.text_cfg."
    _defaults_only(t, (("output_tokens", False, "token outputs in place of the embedding"),
                       ("tokenizer_mode", None, "a custom tokenization mode")), where)
    pooler = json_field(t, "hf_pooler_type", where, "str", "mean_pooler")
    if pooler not in _HF_POOLERS:
        raise ValueError(f"{where}hf_pooler_type {pooler!r} is not implemented (clipforge "
                         f"implements {', '.join(_HF_POOLERS)})")
    here = f"{hf_source}: "
    model_type = json_field(hf, "model_type", here, "str", "")
    if model_type not in _HF_TEXT_MODELS:
        raise ValueError(f"{here}model_type {model_type!r} is not implemented as an OpenCLIP text "
                         f"tower (clipforge implements {', '.join(_HF_TEXT_MODELS)})")
    for key, value in (("is_decoder", False), ("add_cross_attention", False),
                       ("position_embedding_type", "absolute")):
        if hf.get(key, value) != value:
            raise ValueError(f"{here}{key} {hf[key]!r} is not implemented ({value!r} is)")
    act = json_field(hf, "hidden_act", here, "str", "gelu")
    if act not in _HF_ACTIVATIONS:
        raise ValueError(f"{here}hidden_act {act!r} is not implemented (clipforge implements "
                         f"{', '.join(_HF_ACTIVATIONS)})")
    width = json_field(hf, "hidden_size", here, "positive int")
    pad = json_field(hf, "pad_token_id", here, "int", 1)
    return TextConfig(
        width=width, layers=json_field(hf, "num_hidden_layers", here, "positive int"),
        heads=json_field(hf, "num_attention_heads", here, "positive int"),
        context_length=json_field(t, "context_length", where, "positive int", 77),
        vocab_size=json_field(hf, "vocab_size", here, "positive int"),
        mlp_width=json_field(hf, "intermediate_size", here, "positive int"),
        activation=_HF_ACTIVATIONS[act],
        ln_eps=float(json_field(hf, "layer_norm_eps", here, "number", 1e-12)),
        causal=False, norm="post", pool=_HF_POOLERS[pooler], pad_id=pad, mask_padding=True,
        type_vocab_size=json_field(hf, "type_vocab_size", here, "positive int", 2),
        position_offset=pad + 1,
        max_positions=json_field(hf, "max_position_embeddings", here, "positive int", 512),
        proj=_hf_projection(t, where, width, embed_dim))


def _hf_projection(t: Mapping[str, Any], where: str, width: int, embed_dim: int) -> str:
    """OpenCLIP's projection after a Hugging Face tower: ``mlp`` (Linear, GELU, Linear, no
    biases), ``linear`` (one Linear without bias: clipforge's bare matrix), or none when the
    widths already agree."""
    proj = t.get("hf_proj_type", "mlp")
    if proj == "mlp":
        return "mlp"
    if proj == "linear":
        return "matrix"
    if proj is None and width == embed_dim:
        return "none"
    raise ValueError(f"{where}hf_proj_type {proj!r} is not implemented (clipforge implements 'mlp' "
                     "and 'linear')")


# ---------------------------------------------------------------- tokenizer and files

# The files a Hugging Face tokenizer may consist of (fetched from the hub when present there).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json",
                   "added_tokens.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt", "config.json")


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer_config.json").is_file() or (
        directory / "tokenizer.json").is_file()


def _local(name: str, directory: Path) -> Path | None:
    """``name`` as a local folder: absolute, or relative to the model directory."""
    for candidate in (Path(name).expanduser(), directory / name):
        if candidate.is_dir():
            return candidate
    return None


def _from_hub(repo: str, names: tuple[str, ...], required: tuple[str, ...], field: str,
              source: str) -> Path:
    """The hub snapshot folder holding those of ``names`` that ``repo`` has (one of
    ``required`` at least): from the Hugging Face cache when there, else downloaded.  Offline
    it fails at once, saying how to give a local folder instead."""
    from huggingface_hub import hf_hub_download, list_repo_files
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from .pretrained import WeightsUnavailableError, _hub_reachable

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise ValueError(f"{field} {repo!r} is neither a folder (absolute, or relative to the "
                         "model directory) nor a Hugging Face Hub repository name") from None

    def fetch(name: str, cached_only: bool) -> Path | None:
        try:
            return Path(hf_hub_download(repo, name, local_files_only=cached_only))
        except (EntryNotFoundError, LocalEntryNotFoundError, FileNotFoundError):
            return None

    def first(found: list[Path]) -> Path | None:
        return next((p.parent for p in found if p.name in required), None)

    cached = [p for name in names if (p := fetch(name, True)) is not None]
    if (folder := first(cached)) is not None:
        return folder
    advice = (f"download it where you are online (`hf download {repo}`) and set {field} in "
              f"{source} to that folder (absolute, or relative to the model directory)")
    if not _hub_reachable():
        raise WeightsUnavailableError(
            f"{source}: {field} names the Hugging Face Hub repository {repo!r}, which is not in "
            f"the local cache, and there is no network (or HF_HUB_OFFLINE is set); {advice}")
    try:
        listed = set(list_repo_files(repo))
        found = [p for name in names if name in listed and (p := fetch(name, False)) is not None]
    except Exception as exc:  # HTTP errors, unknown or gated repositories, broken connections
        raise WeightsUnavailableError(f"{source}: download of {field} {repo!r} failed ({exc}); "
                                      f"{advice}") from exc
    if (folder := first(found)) is None:
        raise WeightsUnavailableError(f"{source}: {field} {repo!r} holds none of "
                                      f"{', '.join(required)}")
    return folder


def _hf_model_config(name: str, directory: Path, source: str) -> tuple[dict[str, Any], str]:
    """The ``config.json`` of ``text_cfg.hf_model_name`` and its path."""
    folder = _local(name, directory) or _from_hub(
        name, ("config.json",), ("config.json",), "model_cfg.text_cfg.hf_model_name", source)
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{source}: model_cfg.text_cfg.hf_model_name {name!r} is a folder "
                              "without config.json")
    return read_json_object(path), str(path)


def _tokenizer(t: Mapping[str, Any], where: str) -> TokenizerConfig:
    name = t.get("hf_tokenizer_name")
    if not name:
        return TokenizerConfig()
    kwargs = json_field(t, "tokenizer_kwargs", where, "object", {})
    unknown = sorted(set(kwargs) - {"clean", "strip_sep_token"})
    if unknown:
        raise ValueError(f"{where}tokenizer_kwargs.{unknown[0]} is not implemented (clipforge "
                         "implements clean and strip_sep_token)")
    inner = f"{where}tokenizer_kwargs."
    return TokenizerConfig(kind="hf", clean=json_field(kwargs, "clean", inner, "str", "whitespace"),
                           strip_sep=json_field(kwargs, "strip_sep_token", inner, "bool", False))


def _tokenizer_files(t: Mapping[str, Any], directory: Path, source: str) -> Path:
    """Where OpenCLIP finds the tokenizer: the model directory (``local-dir:``), else
    ``hf_tokenizer_name`` as a local folder, else that hub repository."""
    if _has_tokenizer(directory):
        return directory
    name = t["hf_tokenizer_name"]
    folder = _local(name, directory)
    if folder is not None:
        return folder
    return _from_hub(name, TOKENIZER_FILES, ("tokenizer_config.json", "tokenizer.json"),
                     "model_cfg.text_cfg.hf_tokenizer_name", source)


def _pad_id(config: CLIPConfig, files: Path | None) -> int:
    """The id a bidirectional tower without a mask (SigLIP) pads short rows with: its
    tokenizer's (OpenAI's BPE pads with 0)."""
    if config.tokenizer.kind != "hf" or files is None:
        return 0
    from ..text.hf import HFTokenizer

    return HFTokenizer(files, config.text.context_length).pad_id


# ---------------------------------------------------------------- preprocessing


def preprocess_from_open_clip(pre: Mapping[str, Any], image_size: int) -> PreprocessConfig:
    """``preprocess_cfg`` as OpenCLIP's ``image_transform`` applies it at inference."""
    where = "preprocess_cfg."
    _check_names(pre, PREPROCESS_FIELDS, where)
    if pre.get("size") is not None:
        size = pre["size"]
        sizes = size if isinstance(size, list) else [size, size]
        if sizes != [image_size, image_size]:
            raise ValueError(f"{where}size {size} differs from the model's square image size "
                             f"{image_size}")
    if pre.get("mode", "RGB") != "RGB":
        raise ValueError(f"{where}mode {pre['mode']!r} is not implemented ('RGB' is)")
    interpolation = json_field(pre, "interpolation", where, "str", "bicubic")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"{where}interpolation {interpolation!r} is not implemented (clipforge "
                         f"implements {', '.join(_INTERPOLATIONS)})")
    mode = json_field(pre, "resize_mode", where, "str", "shortest")
    if mode not in ("shortest", "longest", "squash"):
        raise ValueError(f"{where}resize_mode {mode!r} is not implemented (clipforge implements "
                         "shortest, longest, squash)")
    default = PreprocessConfig()
    return PreprocessConfig(
        mean=_channels(pre, "mean", where, default.mean),
        std=_channels(pre, "std", where, default.std),
        interpolation=_INTERPOLATIONS[interpolation], resize_mode=mode,
        fill_color=json_field(pre, "fill_color", where, "int", 0))


def _channels(pre: Mapping[str, Any], key: str, where: str, default: tuple) -> tuple:
    """Three numbers, or one for all channels (as OpenCLIP's transform accepts)."""
    value = pre.get(key)
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * 3
    return tuple(json_field(pre, key, where, "3 numbers"))


# ---------------------------------------------------------------- the model


# clipforge's config fields as open_clip_config.json spells them, for messages.
FIELD_NAMES = {
    "embed_dim": "model_cfg.embed_dim",
    **{f"vision.{k}": f"model_cfg.vision_cfg.{k}" for k in ("width", "layers", "patch_size",
                                                            "image_size")},
    "vision.mlp_width": "model_cfg.vision_cfg.mlp_ratio",
    **{f"text.{k}": f"model_cfg.text_cfg.{k}" for k in ("width", "layers", "context_length",
                                                        "vocab_size")},
    "text.mlp_width": "model_cfg.text_cfg.mlp_ratio",
}


def _rules(v: Mapping[str, Any], t: Mapping[str, Any]) -> list[Rule]:
    vision = TIMM_RULES if v.get("timm_model_name") else PLAIN_VISION_RULES
    if t.get("hf_model_name"):
        text = HF_TEXT_RULES + (HF_LINEAR_PROJECTION if t.get("hf_proj_type") == "linear"
                                else HF_MLP_PROJECTION)
    else:
        text = TEXT_TRANSFORMER_RULES
    return [*_LOGIT_RULES, *vision, *text]


def _embed_dim(cfg: Mapping[str, Any], sd: StateDict) -> int:
    shown = (_dim(sd, "text_projection", 1) or _dim(sd, "text_projection.weight", 0)
             or _dim(sd, "text_projection.2.weight", 0) or _dim(sd, "visual.proj", 1)
             or _dim(sd, "visual.attnpool.c_proj.weight", 0) or _dim(sd, "visual.conv1.weight", 0))
    return _size(cfg, "embed_dim", "model_cfg.", shown, 512)


def read_open_clip(document: Mapping[str, Any], sd: StateDict, directory: Path,
                   activation: str | None, weights: str, source: str) -> OpenClipModel:
    """Read an OpenCLIP hub directory: ``document`` is its ``open_clip_config.json``
    (``source`` names it), ``sd`` the tensors of ``weights``.  ``activation`` overrides what
    the config records for the plain towers (``quick_gelu``)."""
    try:
        return _read(document, sd, directory, activation, weights, source)
    except ValueError as exc:
        raise CheckpointError(f"{source}: {exc}; fix the file or download it again") from None


def _read(document: Mapping[str, Any], sd: StateDict, directory: Path, activation: str | None,
          weights: str, source: str) -> OpenClipModel:
    if not isinstance(document, Mapping):
        raise ValueError("the file must hold a JSON object")
    _check_names(document, frozenset({"model_cfg", "preprocess_cfg"}), "")
    cfg = json_field(document, "model_cfg", "", "object", {})
    pre = json_field(document, "preprocess_cfg", "", "object", {})
    if "multimodal_cfg" in cfg:
        raise ValueError("model_cfg.multimodal_cfg (CoCa, a captioning model) is not implemented")
    _check_names(cfg, MODEL_FIELDS, "model_cfg.")
    v = json_field(cfg, "vision_cfg", "model_cfg.", "object", {})
    t = json_field(cfg, "text_cfg", "model_cfg.", "object", {})
    _check_names(t, TEXT_FIELDS, "model_cfg.text_cfg.")
    if v.get("timm_model_name"):
        sd = _zero_key_biases(sd, weights)
    sd = rename(sd, _rules(v, t), weights)
    quick = json_field(cfg, "quick_gelu", "model_cfg.", "bool", False)
    act = activation or ("quick_gelu" if quick else "gelu")
    embed_dim = _embed_dim(cfg, sd)
    vision = _vision(v, sd, act)
    names = dict(FIELD_NAMES)
    if t.get("hf_model_name"):
        hf, hf_source = _hf_model_config(json_field(t, "hf_model_name", "model_cfg.text_cfg.",
                                                    "str"), directory, source)
        text = _hf_text(t, hf, hf_source, embed_dim)
        names.update(_hf_names(hf_source))
    else:
        text = _text(t, sd, act)
    bias = cfg.get("init_logit_bias") is not None
    config = CLIPConfig(
        embed_dim, vision, text, act, preprocess_from_open_clip(pre, vision.image_size),
        logit_bias=bias, probability="sigmoid" if bias else "softmax",
        tokenizer=_tokenizer(t, "model_cfg.text_cfg."), family=_family(v, vision, text))
    files = None if config.tokenizer.kind == "openai" else _tokenizer_files(t, directory, source)
    if not text.causal and not text.mask_padding:
        config = config.replace(text=_replace(text, pad_id=_pad_id(config, files)))
    if config.family == "siglip" and files is not None:
        family, cleaning = siglip_text(TokenizerFiles.read(files))
        config = config.replace(family=family, tokenizer=dataclasses.replace(
            config.tokenizer, clean=cleaning))
    return OpenClipModel(_inherit_activation(config), sd, files or directory, names)


def _hf_names(hf_source: str) -> dict[str, str]:
    return {f"text.{ours}": f"{hf_source} {theirs}" for ours, theirs in (
        ("width", "hidden_size"), ("layers", "num_hidden_layers"),
        ("mlp_width", "intermediate_size"), ("vocab_size", "vocab_size"),
        ("context_length", "max_position_embeddings"))}


def _family(v: Mapping[str, Any], vision: VisionConfig, text: TextConfig) -> str:
    if v.get("timm_model_name"):
        return TIMM_TOWERS[v["timm_model_name"]].family
    if vision.pool == "map":
        return "siglip"
    if text.norm == "post":
        return "xlm-roberta"
    if text.pool == "eos":  # MetaCLIP 2 worldwide: CLIP towers, XLM-V pooled at its eos id
        return "metaclip2"
    return "clip"


def _replace(tower: TextConfig | VisionConfig, **changes: Any) -> Any:
    return dataclasses.replace(tower, **changes)


def _inherit_activation(config: CLIPConfig) -> CLIPConfig:
    """Towers whose activation is the model's leave theirs unset (the canonical form, which a
    config written by clipforge also has); two towers that agree make it the model's."""
    vision, text = config.vision.activation, config.text.activation
    if vision is not None and vision == text:
        config = config.replace(activation=vision)
    changes = {name: _replace(getattr(config, name), activation=None)
               for name in ("vision", "text")
               if getattr(config, name).activation == config.activation}
    return config.replace(**changes)

"""Hugging Face ``transformers.CLIPModel`` format, in and out (ViT image towers only).

The mapping is the table in transformers' own conversion script: the fused ``in_proj`` of each
attention is split into ``q_proj``/``k_proj``/``v_proj``, the projections are stored transposed as
``nn.Linear`` weights, and the towers move under ``vision_model.``/``text_model.``.  transformers
has no ResNet tower, so RN models cannot be written in this format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..configs import CLIPConfig, PreprocessConfig, TextConfig, VisionConfig
from .checkpoint import CheckpointError

StateDict = dict[str, torch.Tensor]

_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_FIXED = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre": "vision_model.pre_layrnorm",  # sic, transformers' spelling
    "visual.ln_post": "vision_model.post_layernorm",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final": "text_model.final_layer_norm",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight",
               "text_projection": "text_projection.weight"}
_TOWERS = {"visual.transformer.resblocks.": "vision_model.encoder.layers.",
           "transformer.resblocks.": "text_model.encoder.layers."}
_RESAMPLE = {"bicubic": 3, "bilinear": 2}


def _rename_fixed(key: str, table: dict[str, str]) -> str | None:
    for src, dst in table.items():
        if key == src or key.startswith(src + "."):
            return dst + key[len(src):]
    return None


def to_hf_state_dict(sd: StateDict) -> StateDict:
    """OpenAI-layout ViT state dict -> ``CLIPModel`` state dict (tensors shared, not copied)."""
    if "visual.proj" not in sd:
        raise ValueError("only ViT image towers can be written in Hugging Face format "
                         "(transformers has no ResNet CLIP tower); use --to clipforge")
    out: StateDict = {}
    for key, value in sd.items():
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
            continue
        if (fixed := _rename_fixed(key, _FIXED)) is not None:
            out[fixed] = value
            continue
        for src, dst in _TOWERS.items():
            if key.startswith(src):
                index, rest = key[len(src):].split(".", 1)
                base = f"{dst}{index}."
                if rest.startswith("attn.in_proj_"):
                    kind = rest.rsplit("_", 1)[1]  # weight | bias
                    for name, part in zip("qkv", value.chunk(3, dim=0)):
                        out[f"{base}self_attn.{name}_proj.{kind}"] = part.contiguous()
                else:
                    out[base + (_rename_fixed(rest, _BLOCK) or rest)] = value
                break
        else:
            raise ValueError(f"no Hugging Face name for {key!r}")
    return out


def from_hf_state_dict(hf: StateDict) -> StateDict:
    """``CLIPModel`` state dict -> OpenAI layout (the inverse of :func:`to_hf_state_dict`)."""
    inverse_fixed = {v: k for k, v in _FIXED.items()}
    inverse_block = {v: k for k, v in _BLOCK.items()}
    inverse_transposed = {v: k for k, v in _TRANSPOSED.items()}
    out: StateDict = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in hf.items():
        if key.endswith("position_ids"):
            continue  # an index buffer some transformers versions save
        if (transposed := inverse_transposed.get(key)) is not None:
            out[transposed] = value.t().contiguous()
            continue
        if (fixed := _rename_fixed(key, inverse_fixed)) is not None:
            out[fixed] = value
            continue
        for dst, src in _TOWERS.items():
            if key.startswith(src):
                index, rest = key[len(src):].split(".", 1)
                base = f"{dst}{index}."
                if rest.startswith("self_attn.") and rest[10] in "qkv" and "_proj." in rest:
                    kind = rest.rsplit(".", 1)[1]
                    pending.setdefault(f"{base}attn.in_proj_{kind}", {})[rest[10]] = value
                else:
                    out[base + (_rename_fixed(rest, inverse_block) or rest)] = value
                break
        else:
            raise CheckpointError(f"unexpected key {key!r} in a Hugging Face CLIPModel state dict")
    for key, parts in pending.items():
        if set(parts) != set("qkv"):
            raise CheckpointError(f"{key}: missing {sorted(set('qkv') - set(parts))} projections")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def config_to_hf(config: CLIPConfig) -> dict[str, Any]:
    """``config.json`` of a transformers ``CLIPModel``."""
    v, t = config.vision, config.text
    if not v.is_vit:
        raise ValueError("Hugging Face CLIPModel has no ResNet image tower")
    common = {"hidden_act": config.activation, "layer_norm_eps": 1e-5,
              "projection_dim": config.embed_dim}
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": 2.6592,
        "torch_dtype": "float32",
        "text_config": {
            **common, "model_type": "clip_text_model", "hidden_size": t.width,
            "intermediate_size": t.mlp_width, "num_attention_heads": t.heads,
            "num_hidden_layers": t.layers, "max_position_embeddings": t.context_length,
            "vocab_size": t.vocab_size, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 1,
        },
        "vision_config": {
            **common, "model_type": "clip_vision_model", "hidden_size": v.width,
            "intermediate_size": v.mlp_width, "num_attention_heads": v.heads,
            "num_hidden_layers": v.layers, "image_size": v.image_size,
            "patch_size": v.patch_size, "num_channels": 3,
        },
    }


def preprocessor_to_hf(config: CLIPConfig) -> dict[str, Any]:
    """``preprocessor_config.json`` for transformers' ``CLIPImageProcessor``."""
    size, pre = config.image_size, config.preprocess
    return {
        "image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
        "do_resize": True, "size": {"shortest_edge": size},
        "resample": _RESAMPLE[pre.interpolation],
        "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(pre.mean), "image_std": list(pre.std), "do_convert_rgb": True,
    }


def config_from_hf(hf: dict[str, Any], preprocessor: dict[str, Any] | None,
                   source: str = "config.json") -> CLIPConfig:
    """A :class:`CLIPConfig` from a ``CLIPModel`` ``config.json`` (and its image processor)."""
    try:
        v, t = hf["vision_config"], hf["text_config"]
        acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}
        if len(acts) != 1:
            raise ValueError(f"{source}: towers use different activations {sorted(acts)}; "
                             "clipforge models use one activation")
        vision = VisionConfig(
            image_size=v.get("image_size", 224), width=v["hidden_size"],
            layers=v["num_hidden_layers"], heads=v["num_attention_heads"],
            patch_size=v.get("patch_size", 32), mlp_width=v["intermediate_size"],
        )
        text = TextConfig(
            width=t["hidden_size"], layers=t["num_hidden_layers"],
            heads=t["num_attention_heads"], context_length=t.get("max_position_embeddings", 77),
            vocab_size=t.get("vocab_size", 49408), mlp_width=t["intermediate_size"],
        )
        pre = PreprocessConfig()
        if preprocessor:
            inverse = {code: name for name, code in _RESAMPLE.items()}
            pre = PreprocessConfig(
                mean=tuple(preprocessor.get("image_mean", pre.mean)),
                std=tuple(preprocessor.get("image_std", pre.std)),
                interpolation=inverse.get(preprocessor.get("resample", 3), "bicubic"),
            )
        return CLIPConfig(hf.get("projection_dim", 512), vision, text, acts.pop(), pre)
    except KeyError as exc:
        raise CheckpointError(f"{source} is not a CLIPModel config: {exc} is missing") from None


def read_hf_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None

"""OpenCLIP hub directories against open_clip 3.3.0 itself (model code with timm 1.0.31, see
``families.open_clip``).

Each kind of model OpenCLIP builds from an ``open_clip_config.json`` is built here by open_clip
(random weights, a small config), written as its hub directories are (the config as
``push_to_hf_hub.save_config_for_hf`` writes it, the state dict as ``open_clip_model.safetensors``,
the tokenizer files), loaded back by open_clip from that directory as the reference, and loaded
by ``clipforge.create_model``.  Token ids, pixels, embeddings and logits are compared (within
1e-5 in float32):

* the plain towers (OpenCLIP's ``CLIP``: DFN, DataComp, MetaCLIP, MetaCLIP 2 worldwide weights);
* ``CustomTextCLIP`` with OpenCLIP's text transformer and timm's image towers: SigLIP and
  SigLIP 2 (timm's VisionTransformer), PE-Core, EVA02 and EVA01 (timm's Eva class: rotary
  position encoding, SwiGLU, sub-LNs, residual post-norm, q/v biases).  timm takes no sizes from
  OpenCLIP, so its registry entry is wrapped to build the real architecture (heads, activation,
  norms, rotary settings) at test depth and width;
* ``CustomTextCLIP`` with a transformers XLM-RoBERTa text tower.

Pixels are compared with a step-by-step mirror of OpenCLIP's inference transform as torchvision
applies it to PIL images (torchvision cannot load here), and with transformers' SigLIP image
processor where the two agree (squash).  The published configs themselves (full size) are read
from open_clip's model table on the meta device, and every hyper-parameter is compared with the
modules open_clip instantiates.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import save_file

import clipforge
import families
from clipforge.configs import OPENAI_MEAN, OPENAI_STD, VisionConfig
from clipforge.image import Preprocess
from clipforge.weights import CheckpointError, WeightsUnavailableError
from clipforge.weights.infer import check_config_fits
from clipforge.weights.open_clip import (
    TIMM_LN_EPS,
    TIMM_TOWERS,
    preprocess_from_open_clip,
    read_open_clip,
)

TOL = 1e-5
TEXTS = ["a red circle", "Two BLUE stars!", "一个红色的圆形", "красная звезда",
         "🐱 cats & dogs", "snake_case x", ""]
SIGLIP_MEAN = (0.5, 0.5, 0.5)
# timm entries built at test size (real heads, activation and norms; depth, width and input
# size reduced) while the cases are built: (registry name, keyword overrides).  32 pixels in
# patches of 14 leave 4 unused, as 384 pixels do in ViT-SO400M-14-SigLIP-384's patches.
# Eva towers keep their heads, so their widths give head widths of 8 (4 for EVA02-E, which has
# no rotary encoding); their rotary grids stay the published ones (24, 32, 16), so positions
# are rescaled from the test grid as a fine-tuned resolution's are.
SMALL_TIMM = {"vit_so400m_patch14_siglip_384": {"depth": 2, "embed_dim": 48, "img_size": 32},
              "vit_so400m_patch16_siglip_256": {"depth": 2, "embed_dim": 64, "img_size": 32},
              "vit_pe_core_large_patch14_336": {"depth": 2, "embed_dim": 128, "img_size": 58},
              "vit_pe_core_gigantic_patch14_448": {"depth": 2, "embed_dim": 128, "img_size": 56},
              "eva02_base_patch16_clip_224": {"depth": 2, "embed_dim": 96, "img_size": 64},
              "eva02_enormous_patch14_clip_224": {"depth": 2, "embed_dim": 64, "img_size": 56},
              "eva_giant_patch14_224": {"depth": 2, "embed_dim": 64, "img_size": 42}}
PE_PREPROCESS = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear",
                 "resize_mode": "squash"}  # open_clip's _pecfg
EVA_PREPROCESS = {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic",
                  "resize_mode": "shortest"}  # open_clip's _pcfg


@pytest.fixture(scope="module")
def oc():
    return families.open_clip()



@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("open_clip")


@pytest.fixture(scope="module")
def tokenizers(root) -> dict[str, Path]:
    return {"siglip": families.siglip_tokenizer(root / "tok-siglip", context_length=16),
            "siglip2": families.siglip2_tokenizer(root / "tok-siglip2"),
            "xlmr": families.xlmr_tokenizer(root / "tok-xlmr")}


def _vocab(directory: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(directory))


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Noise on every parameter: unit norms and zero biases cannot hide a wrong mapping."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def _images() -> list[Image.Image]:
    sizes = [(40, 50), (64, 36), (33, 33)]
    return [Image.fromarray((np.random.RandomState(i).rand(h, w, 3) * 255).astype("uint8"))
            for i, (h, w) in enumerate(sizes)]


# ----------------------------------------------------------------------------- the cases


@dataclass
class Case:
    directory: Path
    reference: Any  # open_clip's model, loaded from the directory
    tokenizer: Any  # open_clip's tokenizer for it
    preprocess: dict[str, Any]  # preprocess_cfg


def _plain_vit(width: int = 64, layers: int = 2, **extra: Any) -> dict[str, Any]:
    return {"image_size": 32, "layers": layers, "width": width, "head_width": 16,
            "patch_size": 8, **extra}


def _configs(tokenizers: dict[str, Path], root: Path) -> dict[str, tuple[dict, dict, Path | None]]:
    """name -> (model_cfg, preprocess_cfg, tokenizer files to ship in the directory)."""
    openai_text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}
    xlmr = _xlmr_config(tokenizers["xlmr"], root)
    return {
        # DFN5B ViT-H-14-378: QuickGELU, 80-wide heads (16 here), squash
        "dfn-quickgelu": ({"embed_dim": 32, "quick_gelu": True, "vision_cfg": _plain_vit(),
                           "text_cfg": openai_text},
                          {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711],
                           "interpolation": "bicubic", "resize_mode": "squash"}, None),
        # exact GELU, an MLP ratio, the rarer ViT options, norm eps and a tanh text MLP
        "plain-options": ({"embed_dim": 32, "vision_cfg": _plain_vit(
                               mlp_ratio=3.0, no_ln_pre=True, final_ln_after_pool=True,
                               pos_embed_type="sin_cos_2d", norm_kwargs={"eps": 1e-6}),
                           "text_cfg": {**openai_text, "act_kwargs": {"approximate": "tanh"},
                                        "mlp_ratio": 2.0}},
                          {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3],
                           "interpolation": "bilinear", "resize_mode": "shortest"}, None),
        # MetaCLIP 2 worldwide: the plain towers, a multilingual tokenizer, pooled at eos
        "worldwide": ({"embed_dim": 32, "vision_cfg": _plain_vit(), "text_cfg": {
                           "hf_tokenizer_name": "facebook/xlm-v-base", "pool_type": "eos",
                           "eos_id": 2, "context_length": 24,
                           "vocab_size": _vocab(tokenizers["xlmr"]), "width": 32, "heads": 4,
                           "layers": 2}},
                      {"interpolation": "random", "resize_mode": "longest", "fill_color": 128},
                      tokenizers["xlmr"]),
        "resnet": ({"embed_dim": 32, "quick_gelu": True,
                    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8,
                                   "head_width": 16, "patch_size": None},
                    "text_cfg": openai_text}, {}, None),
        # SigLIP (vit_so400m_patch14_siglip_*: exact GELU in timm, patches that do not tile
        # the image) with no text projection
        "siglip": ({"embed_dim": 48, "init_logit_bias": -10, "custom_text": True,
                    "vision_cfg": {"image_size": 32, "timm_model_name":
                                   "vit_so400m_patch14_siglip_384",
                                   "timm_model_pretrained": False, "timm_pool": "map",
                                   "timm_proj": "none"},
                    "text_cfg": {"context_length": 16, "vocab_size": _vocab(tokenizers["siglip"]),
                                 "hf_tokenizer_name": "timm/ViT-B-16-SigLIP",
                                 "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 48,
                                 "heads": 4, "layers": 2, "no_causal_mask": True,
                                 "proj_type": "none", "pool_type": "last",
                                 "norm_kwargs": {"eps": 1e-6}}},
                   {"mean": list(SIGLIP_MEAN), "std": list(SIGLIP_MEAN),
                    "interpolation": "bicubic", "resize_mode": "squash"}, tokenizers["siglip"]),
        # SigLIP 2 (so400m patch16: tanh GELU, MLP ratio 3.7362), Gemma's tokenizer as the
        # SigLIP 2 repositories ship it (padded on the right)
        "siglip2": ({"embed_dim": 64, "init_logit_bias": -10, "custom_text": True,
                     "vision_cfg": {"image_size": 32, "timm_model_name":
                                    "vit_so400m_patch16_siglip_256",
                                    "timm_model_pretrained": False, "timm_pool": "map",
                                    "timm_proj": "none"},
                     "text_cfg": {"context_length": 16, "vocab_size": _vocab(tokenizers["siglip2"]),
                                  "hf_tokenizer_name": "timm/ViT-SO400M-16-SigLIP2-256",
                                  "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 48,
                                  "heads": 4, "layers": 2, "mlp_ratio": 3.7362,
                                  "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
                                  "norm_kwargs": {"eps": 1e-6},
                                  "act_kwargs": {"approximate": "tanh"}}},
                    {"mean": list(SIGLIP_MEAN), "std": list(SIGLIP_MEAN),
                     "interpolation": "bicubic", "resize_mode": "squash"},
                    tokenizers["siglip2"]),
        # xlm-roberta-base-ViT-B-32: mean pooling, MLP projection
        "xlmr-mlp": ({"embed_dim": 32, "vision_cfg": _plain_vit(), "text_cfg": {
                          "hf_model_name": str(xlmr), "hf_tokenizer_name": str(tokenizers["xlmr"]),
                          "hf_pooler_type": "mean_pooler", "context_length": 24}},
                     {}, tokenizers["xlmr"]),
        # first-token pooling and a linear projection; tokenizer and tower config found by
        # relative paths (the reference reads absolute ones, see _relative)
        "xlmr-linear": ({"embed_dim": 32, "vision_cfg": _plain_vit(), "text_cfg": {
                             "hf_model_name": str(xlmr),
                             "hf_tokenizer_name": str(tokenizers["xlmr"]),
                             "hf_pooler_type": "cls_last_hidden_state_pooler",
                             "hf_proj_type": "linear", "context_length": 24}},
                        {"resize_mode": "squash"}, None),
        # PE-Core L: rotary encoding of (column, row) + 1, a class token it does not turn, an
        # 8-head pooling head (16 in the tower), the trunk's head; OpenAI's BPE at 32 tokens
        "pe-core": _timm_case("vit_pe_core_large_patch14_336", "map", PE_PREPROCESS, 32),
        # PE-Core bigG: no class token (every token turned), a pooling MLP of its own width
        "pe-core-bigG": _timm_case("vit_pe_core_gigantic_patch14_448", "map", PE_PREPROCESS, 72),
        # EVA02-B: q/k/v projections without a k bias, SwiGLU with a norm, a norm inside the
        # attention, rotary positions scaled to a 16x16 grid, class-token pooling
        "eva02": _timm_case("eva02_base_patch16_clip_224", "token", EVA_PREPROCESS),
        # EVA02-E: fused q/k/v weight with q and v biases, x + ln(f(x)) blocks
        "eva02-e": _timm_case("eva02_enormous_patch14_clip_224", "token", EVA_PREPROCESS),
        # EVA01-g: a plain Eva tower (patches of 14 that leave 0 pixels of 42 unused)
        "eva01": _timm_case("eva_giant_patch14_224", "token", EVA_PREPROCESS),
    }


def _timm_case(name: str, pool: str, preprocess: dict, context: int = 77
               ) -> tuple[dict, dict, None]:
    """OpenCLIP's config of a timm tower with its own head as the projection (timm_proj null),
    as PE-Core's and EVA's configs are, at test size (:data:`SMALL_TIMM`)."""
    return ({"embed_dim": 32, "custom_text": True,
             "vision_cfg": {"image_size": SMALL_TIMM[name]["img_size"], "timm_model_name": name,
                            "timm_model_pretrained": False, "timm_pool": pool, "timm_proj": None},
             "text_cfg": {"context_length": context, "vocab_size": 49408, "width": 32,
                          "heads": 4, "layers": 2}}, preprocess, None)


def _xlmr_config(tokenizer: Path, root: Path) -> Path:
    """A small XLM-RoBERTa ``config.json`` (the shape of xlm-roberta-base's)."""
    from transformers import XLMRobertaConfig

    out = root / "xlmr-config"
    if not out.exists():
        XLMRobertaConfig(vocab_size=_vocab(tokenizer), hidden_size=48, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=96, max_position_embeddings=40,
                         type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5
                         ).save_pretrained(out)
    return out


CASES = ["dfn-quickgelu", "plain-options", "worldwide", "resnet", "siglip", "siglip2",
         "xlmr-mlp", "xlmr-linear", "pe-core", "pe-core-bigG", "eva02", "eva02-e", "eva01"]


def _write(directory: Path, model_cfg: dict, preprocess_cfg: dict) -> None:
    (directory / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))


@pytest.fixture(scope="module")
def build(oc, root, tokenizers):
    """name -> its Case, each built once in the module."""
    built: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in built:
            built[name] = _build(oc, root, tokenizers, name)
        return built[name]
    return get


def _build(oc, root: Path, tokenizers: dict[str, Path], name: str) -> Case:
    model_cfg, preprocess_cfg, shipped = _configs(tokenizers, root)[name]
    directory = root / name
    directory.mkdir()
    if shipped is not None:
        shutil.copytree(shipped, directory, dirs_exist_ok=True)
    _write(directory, model_cfg, preprocess_cfg)
    torch.manual_seed(0)
    with families.small_timm(SMALL_TIMM):
        built = _perturb(oc.create_model(f"local-dir:{directory}", pretrained_text=False),
                         seed=1)
        save_file({k: v.contiguous() for k, v in built.state_dict().items()},
                  directory / "open_clip_model.safetensors")
        reference = oc.create_model(f"local-dir:{directory}", pretrained_text=False).eval()
    text = model_cfg["text_cfg"]
    if "hf_tokenizer_name" in text and shipped is None:
        tokenizer = oc.tokenizer.HFTokenizer(text["hf_tokenizer_name"],
                                             context_length=text.get("context_length", 77),
                                             **text.get("tokenizer_kwargs", {}))
    else:
        tokenizer = oc.get_tokenizer(f"local-dir:{directory}")
    if name == "xlmr-linear":
        _relative(directory, model_cfg, preprocess_cfg)
    return Case(directory, reference, tokenizer, preprocess_cfg)


@pytest.fixture(scope="module", params=CASES)
def case(request, build) -> Case:
    return build(request.param)


def _relative(directory: Path, model_cfg: dict, preprocess_cfg: dict) -> None:
    """Name the tower config and the tokenizer by paths relative to the model directory."""
    text = model_cfg["text_cfg"]
    for key in ("hf_model_name", "hf_tokenizer_name"):
        text[key] = os.path.relpath(text[key], directory)
    _write(directory, model_cfg, preprocess_cfg)


@pytest.fixture(scope="module")
def loaded(case) -> clipforge.CLIP:
    return clipforge.create_model(case.directory)


# --------------------------------------------------------------------------------- tests


def _reference_ids(case, loaded, texts: list[str]) -> torch.Tensor:
    """open_clip's ids, except for SigLIP 2: OpenCLIP canonicalises its text, which big_vision
    trained with ASCII lower-casing only (punctuation kept); clipforge follows the training, so
    the reference tokenizer gets the text as the training cleaned it."""
    if loaded.config.family == "siglip2":
        return case.tokenizer.tokenizer(
            [t.lower() if t.isascii() else "".join(c.lower() if c.isascii() else c for c in t)
             for t in texts], padding="max_length", truncation=True,
            max_length=loaded.context_length, return_tensors="pt").input_ids
    return case.tokenizer(texts)


def test_token_ids_are_open_clips(case, loaded):
    assert torch.equal(loaded.tokenizer(TEXTS), _reference_ids(case, loaded, TEXTS))
    long = [families.LONG_TEXT, "short"]
    assert torch.equal(loaded.tokenizer(long, truncate=True), _reference_ids(case, loaded, long))


def test_siglip2_text_is_cleaned_as_trained(case, loaded):
    if loaded.config.family != "siglip2":
        pytest.skip("SigLIP 2 only")
    assert loaded.config.tokenizer.clean == "ascii_lower"
    # punctuation kept, non-ASCII capitals kept (open_clip's canonicalize drops/lowers both)
    ids = loaded.tokenizer.encode("Two BLUE stars! ÉCOLE")
    assert loaded.tokenizer.decode(ids) == "two blue stars! École"


def test_embeddings_and_logits_match_open_clip(case, loaded):
    images = _images()
    pixels = torch.stack([loaded.preprocess(im) for im in images])
    reference_pixels = torch.stack([open_clip_pixels(im, loaded.config.image_size,
                                                     case.preprocess) for im in images])
    assert torch.equal(pixels, reference_pixels)
    ours_ids, their_ids = loaded.tokenizer(TEXTS), _reference_ids(case, loaded, TEXTS)
    with torch.no_grad():
        image = loaded.encode_image(pixels, normalize=True)
        text = loaded.encode_text(ours_ids, normalize=True)
        logits, _ = loaded(pixels, ours_ids)
        ref_image = case.reference.encode_image(pixels, normalize=True)
        ref_text = case.reference.encode_text(their_ids, normalize=True)
        ref_logits, _ = case.reference.get_logits(pixels, their_ids)
        raw = (loaded.encode_image(pixels) - case.reference.encode_image(pixels)).abs().max()
    assert raw < TOL
    assert (image - ref_image).abs().max() < TOL
    assert (text - ref_text).abs().max() < TOL
    assert (logits - ref_logits).abs().max() < TOL
    has_bias = case.reference.logit_bias is not None
    assert (loaded.logit_bias is not None) == has_bias
    assert loaded.config.probability == ("sigmoid" if has_bias else "softmax")


def test_clipforge_format_round_trip_is_lossless(case, loaded, tmp_path):
    clipforge.save_model(loaded, tmp_path / "saved")
    again = clipforge.create_model(tmp_path / "saved")
    assert again.config == loaded.config
    assert torch.equal(again.tokenizer(TEXTS), loaded.tokenizer(TEXTS))
    for (key, a), b in zip(loaded.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), key
    pixels = torch.stack([loaded.preprocess(im) for im in _images()])
    with torch.no_grad():
        assert torch.equal(loaded(pixels, loaded.tokenizer(TEXTS))[0],
                           again(pixels, again.tokenizer(TEXTS))[0])


def test_canonicalize_turns_underscores_into_spaces():
    """big_vision's (and OpenCLIP's) canonicalisation replaces "_" by a space before removing
    punctuation: "snake_case" is two words, not "snakecase"."""
    from clipforge.text.hf import canonicalize

    assert canonicalize("A snake_case Word!") == "a snake case word"


# -------------------------------------------------------------------- hyper-parameters


def _act(module: torch.nn.Module) -> str:
    if isinstance(module, torch.nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    return {"QuickGELU": "quick_gelu", "GELUTanh": "gelu_tanh", "SiLU": "silu"}[
        type(module).__name__]


def _present(module: torch.nn.Module | None) -> bool:
    return module is not None and not isinstance(module, torch.nn.Identity)


def _timm_settings(trunk: torch.nn.Module) -> dict[str, Any]:
    """What timm built, as clipforge's VisionConfig fields (from one block: they are all the
    same), for timm's VisionTransformer and its Eva class alike."""
    from timm.layers import GluMlp, RotaryEmbeddingCat, SwiGLU

    block, rope = trunk.blocks[0], getattr(trunk, "rope", None)
    out = {"ln_eps": block.norm1.eps, "patch_bias": trunk.patch_embed.proj.bias is not None,
           "class_token": trunk.cls_token is not None, "ln_pre": _present(trunk.norm_pre),
           "pool": trunk.global_pool, "mlp_gated": isinstance(block.mlp, (SwiGLU, GluMlp)),
           "attn_norm": _present(block.attn.norm),
           "mlp_norm": _present(getattr(block.mlp, "norm", None)),
           "norm": "res_post" if type(block).__name__ == "EvaBlockPostNorm" else "pre"}
    if trunk.attn_pool is not None:
        out["pool_heads"] = trunk.attn_pool.num_heads
        assert _act(trunk.attn_pool.mlp.act) == _act(block.mlp.act) or out["mlp_gated"]
        assert trunk.attn_pool.norm.eps == out["ln_eps"]
    if rope is not None:
        assert isinstance(rope, RotaryEmbeddingCat) and not rope.in_pixels
        assert not rope.rotate_half and rope.temperature == 10000
        assert block.attn.num_prefix_tokens == int(out["class_token"])  # not turned
        grid = rope.ref_feat_shape
        out.update(rope=True, rope_grid=grid[0] if grid else 0, rope_offset=rope.grid_offset,
                   rope_indexing=rope.grid_indexing)
        assert not grid or grid[0] == grid[1]
    # the tower as the table describes it and nothing else: no register tokens, layer scale,
    # q/k norms, attention gates, fc_norm, and positions for the class token too
    assert trunk.norm.eps == out["ln_eps"] and _present(trunk.norm)
    assert not _present(trunk.fc_norm) and getattr(trunk, "reg_token", None) is None
    assert not getattr(trunk, "no_embed_class", False) and trunk.pos_embed is not None
    assert not _present(getattr(block, "ls1", None)) and getattr(block, "gamma_1", None) is None
    assert not _present(block.attn.q_norm) and getattr(block.attn, "gate", None) is None
    return out


def test_timm_table_is_timms_own(oc):
    """Every timm tower of open_clip's model configs (SigLIP, PE-Core, EVA) is in the table,
    with the pooling open_clip asks of it and the heads, activation, norms, rotary encoding and
    block layout that timm's registry entry builds (one block, on the meta device)."""
    import timm
    from open_clip.factory import _MODEL_CONFIGS

    pools = {c["vision_cfg"]["timm_model_name"]: c["vision_cfg"].get("timm_pool", "avg")
             for c in _MODEL_CONFIGS.values() if c["vision_cfg"].get("timm_model_name")}
    families = ("siglip", "vit_pe_core", "eva02_", "eva_giant")
    assert {n for n in pools if any(f in n for f in families)} <= set(TIMM_TOWERS)
    for name, tower in TIMM_TOWERS.items():
        if name in pools:
            assert pools[name] == tower.settings["pool"], name
        with torch.device("meta"):
            trunk = timm.create_model(name, depth=1, num_classes=0,
                                      global_pool=tower.settings["pool"])
        block = trunk.blocks[0]
        assert (block.attn.num_heads, _act(block.mlp.act)) == (tower.heads, tower.activation)
        built = _timm_settings(trunk)
        # the table's settings over clipforge's defaults ("as the tower" for the head's heads)
        defaults = {f.name: f.default for f in dataclasses.fields(VisionConfig)}
        expected = {**{k: defaults[k] for k in built}, **tower.settings}
        if "pool_heads" in built and not tower.settings.get("pool_heads"):
            expected["pool_heads"] = tower.heads
        assert built == expected, name
    assert TIMM_TOWERS["vit_base_patch16_siglip_224"].settings["ln_eps"] == TIMM_LN_EPS


def _reference_hyperparameters(model: torch.nn.Module) -> dict[str, Any]:
    """What open_clip instantiated: heads, activations and norm epsilons of both towers."""
    visual = model.visual
    out: dict[str, Any] = {}
    if hasattr(visual, "trunk"):
        block = visual.trunk.blocks[0]
        out.update(vision_heads=block.attn.num_heads, vision_act=_act(block.mlp.act),
                   vision_eps=block.norm1.eps)
    elif hasattr(visual, "transformer"):
        block = visual.transformer.resblocks[0]
        out.update(vision_heads=block.attn.num_heads, vision_act=_act(block.mlp.gelu),
                   vision_eps=block.ln_1.eps)
    else:
        out.update(vision_heads=visual.attnpool.num_heads)
    text = getattr(model, "text", model)
    block = text.transformer.resblocks[0]
    out.update(text_heads=block.attn.num_heads, text_act=_act(block.mlp.gelu),
               text_eps=block.ln_1.eps)
    return out


def _our_hyperparameters(config: clipforge.CLIPConfig) -> dict[str, Any]:
    v, t = config.vision, config.text
    out: dict[str, Any] = {"vision_heads": v.heads}
    if v.is_vit:
        out.update(vision_act=v.activation or config.activation, vision_eps=v.ln_eps)
    out.update(text_heads=t.heads, text_act=t.activation or config.activation, text_eps=t.ln_eps)
    return out


# (open_clip model name, pretrained tag whose preprocessing the hub config records)
PUBLISHED = [
    ("ViT-H-14-378-quickgelu", "dfn5b"), ("ViT-L-14-quickgelu", "dfn2b"),
    ("ViT-B-16", "datacomp_xl_s13b_b90k"), ("ViT-bigG-14", "laion2b_s39b_b160k"),
    ("RN50", "openai"), ("ViT-H-14-worldwide", "metaclip2_worldwide"),
    ("ViT-B-16-SigLIP", "webli"), ("ViT-B-32-SigLIP2-256", "webli"),
    ("ViT-SO400M-14-SigLIP-384", "webli"), ("ViT-SO400M-16-SigLIP-i18n-256", "webli"),
    ("ViT-gopt-16-SigLIP2-384", "webli"), ("PE-Core-L-14-336", "meta"),
    ("PE-Core-bigG-14-448", "meta"), ("EVA02-B-16", "merged2b_s8b_b131k"),
    ("EVA02-E-14", "laion2b_s4b_b115k"), ("EVA01-g-14", "laion400m_s11b_b41k"),
]
PUBLISHED_SLOW = [(n, "webli") for n in (
    "ViT-B-16-SigLIP-256", "ViT-B-16-SigLIP-384", "ViT-B-16-SigLIP-512", "ViT-B-16-SigLIP2",
    "ViT-B-16-SigLIP2-256", "ViT-B-16-SigLIP2-384", "ViT-B-16-SigLIP2-512",
    "ViT-B-16-SigLIP-i18n-256", "ViT-L-16-SigLIP-256", "ViT-L-16-SigLIP-384",
    "ViT-L-16-SigLIP2-256", "ViT-L-16-SigLIP2-384", "ViT-L-16-SigLIP2-512",
    "ViT-SO400M-14-SigLIP", "ViT-SO400M-14-SigLIP-378", "ViT-SO400M-14-SigLIP2",
    "ViT-SO400M-14-SigLIP2-378", "ViT-SO400M-16-SigLIP2-256", "ViT-SO400M-16-SigLIP2-384",
    "ViT-SO400M-16-SigLIP2-512", "ViT-gopt-16-SigLIP2-256")] + [
    ("PE-Core-T-16-384", "meta"), ("PE-Core-S-16-384", "meta"), ("PE-Core-B-16", "meta"),
    ("EVA02-L-14", "merged2b_s4b_b131k"), ("EVA02-L-14-336", "merged2b_s6b_b61k"),
    ("EVA02-E-14-plus", "laion2b_s9b_b144k"), ("EVA01-g-14-plus", "merged2b_s11b_b114k")]


@pytest.mark.parametrize("name, tag", [*PUBLISHED, *(
    pytest.param(n, t, marks=pytest.mark.slow) for n, t in PUBLISHED_SLOW)])
def test_published_configs_read_as_open_clip_builds_them(oc, tokenizers, tmp_path, name, tag):
    """The full-size configs of open_clip's table, as a hub directory records them (model_cfg,
    and the preprocessing of the pretrained tag), read against the shapes of the model open_clip
    builds from them (on the meta device): every tensor finds its place in clipforge's model,
    and heads, activations, norms and preprocessing are what open_clip instantiated."""
    from open_clip.factory import get_model_config

    from clipforge.factory import load_checked

    model_cfg = get_model_config(name)
    tag_cfg = oc.get_pretrained_cfg(name, tag) or {}
    preprocess_cfg = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode")
                      if k in tag_cfg}
    if tag_cfg.get("quick_gelu"):
        model_cfg["quick_gelu"] = True
    with torch.device("meta"):
        reference = oc.create_model(name, device="meta", pretrained_text=False,
                                    force_quick_gelu=bool(tag_cfg.get("quick_gelu")))
    if "hf_tokenizer_name" in model_cfg["text_cfg"]:  # a stand-in for its files
        shutil.copytree(tokenizers["siglip"], tmp_path, dirs_exist_ok=True)
    document = json.loads(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}))
    found = read_open_clip(document, reference.state_dict(), tmp_path, None, "weights", "config")
    check_config_fits(found.config, found.sd, "config", "weights", found.names)
    with torch.device("meta"):
        ours = clipforge.CLIP(found.config)
    load_checked(ours, found.sd, name)
    assert _our_hyperparameters(found.config) == _reference_hyperparameters(reference)
    pre = found.config.preprocess
    size = reference.visual.image_size
    assert found.config.image_size == (size[0] if isinstance(size, tuple) else size)
    assert pre.resize_mode == tag_cfg.get("resize_mode", "shortest")
    assert pre.interpolation == tag_cfg.get("interpolation", "bicubic")
    assert pre.mean == pytest.approx(tag_cfg.get("mean", OPENAI_MEAN))
    assert (ours.logit_bias is not None) == (reference.logit_bias is not None)


# -------------------------------------------------------------------------- preprocessing


def _tv_resize(img: Image.Image, height: int, width: int, resample: int) -> Image.Image:
    """torchvision's F.resize of a PIL image to [height, width]: returned as it is when the
    size does not change, else PIL's resize (F_pil.resize takes the size reversed)."""
    if [img.height, img.width] == [height, width]:
        return img
    return img.resize((width, height), resample)


def _tv_resize_short(img: Image.Image, size: int, resample: int) -> Image.Image:
    """torchvision's Resize(int): _compute_resized_output_size, then F.resize."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return _tv_resize(img, new_h, new_w, resample)


def _tv_pad(img: Image.Image, ltrb: list[int], fill: int) -> Image.Image:
    """F_pil.pad, constant mode: fill repeated over the bands, palette kept."""
    bands = len(img.getbands())
    colour: Any = tuple([fill] * bands) if bands > 1 else fill
    if img.mode == "P":
        palette = img.getpalette()
        out = ImageOps.expand(img, border=tuple(ltrb), fill=colour)
        out.putpalette(palette)
        return out
    return ImageOps.expand(img, border=tuple(ltrb), fill=colour)


def _tv_center_crop(img: Image.Image, size: int) -> Image.Image:
    """F.center_crop on a PIL image (the image is never smaller here)."""
    top = int(round((img.height - size) / 2.0))
    left = int(round((img.width - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def _resize_keep_ratio(img: Image.Image, size: int, resample: int) -> Image.Image:
    """open_clip's ResizeKeepRatio(size, longest=1).get_params, then F.resize."""
    h, w = img.size[::-1]
    ratio_h, ratio_w = h / size, w / size
    ratio = max(ratio_h, ratio_w) * 1.0 + min(ratio_h, ratio_w) * (1.0 - 1.0)
    new_h, new_w = (round(x * 1.0 / ratio) for x in (h, w))
    return _tv_resize(img, new_h, new_w, resample)


def _center_crop_or_pad(img: Image.Image, size: int, fill: int) -> Image.Image:
    """open_clip's center_crop_or_pad on a PIL image."""
    if size > img.width or size > img.height:
        pad = [(size - img.width) // 2 if size > img.width else 0,
               (size - img.height) // 2 if size > img.height else 0,
               (size - img.width + 1) // 2 if size > img.width else 0,
               (size - img.height + 1) // 2 if size > img.height else 0]
        img = _tv_pad(img, pad, fill)
        if img.size == (size, size):
            return img
    return _tv_center_crop(img, size)


def open_clip_pixels(img: Image.Image, size: int, pre: dict[str, Any]) -> torch.Tensor:
    """open_clip.transform.image_transform(is_train=False) on a PIL image, step by step as
    torchvision computes it: resize (and crop or pad), MaybeConvertMode, ToTensor, Normalize."""
    resample = (Image.Resampling.BILINEAR if pre.get("interpolation") == "bilinear"
                else Image.Resampling.BICUBIC)  # 'random' is bicubic at inference
    mode = pre.get("resize_mode", "shortest")
    if mode == "longest":
        img = _center_crop_or_pad(_resize_keep_ratio(img, size, resample), size,
                                  pre.get("fill_color", 0))
    elif mode == "squash":
        img = _tv_resize(img, size, size, resample)
    else:
        img = _tv_center_crop(_tv_resize_short(img, size, resample), size)
    img = img.convert("RGB")
    pixels = torch.from_numpy(np.array(img, np.uint8, copy=True))
    pixels = pixels.view(img.size[1], img.size[0], 3).permute(2, 0, 1).contiguous()
    pixels = pixels.to(dtype=torch.float32).div(255)
    mean = torch.as_tensor(pre.get("mean", OPENAI_MEAN), dtype=torch.float32)
    std = torch.as_tensor(pre.get("std", OPENAI_STD), dtype=torch.float32)
    return pixels.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


def _test_images() -> list[Image.Image]:
    """Sizes wider, taller, square, exact, thin and odd, in the modes photos come in."""
    rng = np.random.RandomState(7)
    rgb = [Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8"))
           for h, w in ((40, 50), (64, 36), (33, 33), (32, 32), (7, 90), (201, 31), (17, 16))]
    gray = Image.fromarray((rng.rand(45, 30) * 255).astype("uint8"), "L")
    rgba = Image.fromarray((rng.rand(30, 47, 4) * 255).astype("uint8"), "RGBA")
    palette = rgb[0].convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    bilevel = gray.convert("1")
    return [*rgb, gray, rgba, palette, bilevel]


PREPROCESS_VARIANTS = [
    {"resize_mode": mode, "interpolation": interpolation, "fill_color": fill,
     "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.25]}
    for mode in ("shortest", "longest", "squash") for interpolation in ("bicubic", "bilinear",
                                                                        "random")
    for fill in ((0, 255, 77) if mode == "longest" else (0,))]


@pytest.mark.parametrize("pre", PREPROCESS_VARIANTS,
                         ids=lambda p: f"{p['resize_mode']}-{p['interpolation']}-{p['fill_color']}")
@pytest.mark.parametrize("size", [32, 29])
def test_pixels_are_open_clips(pre, size):
    config = preprocess_from_open_clip(pre, size)
    ours = Preprocess(size, config.mean, config.std, config.interpolation, config.resize_mode,
                      config.fill_color)
    for img in _test_images():
        assert torch.equal(ours(img), open_clip_pixels(img, size, pre)), (img.mode, img.size)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_squash_pixels_are_siglip_processors(interpolation):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    pre = {"resize_mode": "squash", "interpolation": interpolation, "mean": [0.5, 0.4, 0.3],
           "std": [0.2, 0.3, 0.25]}
    config = preprocess_from_open_clip(pre, 32)
    ours = Preprocess(32, config.mean, config.std, config.interpolation, config.resize_mode)
    resample = {"bicubic": 3, "bilinear": 2}[interpolation]
    processor = SiglipImageProcessorPil(size={"height": 32, "width": 32}, resample=resample,
                                        image_mean=pre["mean"], image_std=pre["std"])
    images = [im for im in _test_images() if im.mode == "RGB"]
    theirs = processor(images=images, return_tensors="pt")["pixel_values"]
    assert (torch.stack([ours(im) for im in images]) - theirs).abs().max() < 1e-6


# ----------------------------------------------------------------------------- errors


def _copy_with(case_dir: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / case_dir.name
    shutil.copytree(case_dir, copy)
    document = json.loads((copy / "open_clip_config.json").read_text())
    edit(document)
    (copy / "open_clip_config.json").write_text(json.dumps(document))
    return copy


def _vision(**changes):
    return lambda d: d["model_cfg"]["vision_cfg"].update(changes)


def _text(**changes):
    return lambda d: d["model_cfg"]["text_cfg"].update(changes)


PLAIN_ERRORS = [
    (_vision(ls_init_value=1e-4), r"vision_cfg\.ls_init_value 0\.0001 \(layer scale\) is not"),
    (_vision(attentional_pool=True), r"vision_cfg\.attentional_pool True \(CoCa"),
    (_vision(pos_embed_type="rope"), r"vision_cfg\.pos_embed_type 'rope' is not implemented"),
    (_vision(pool_type="avg", final_ln_after_pool=True),
     r"vision_cfg\.pool_type 'avg' with final_ln_after_pool is not implemented"),
    (_vision(qk_norm=True), r"vision_cfg\.qk_norm True \(layer norm of queries and keys\)"),
    (_text(scaled_cosine_attn=True), r"text_cfg\.scaled_cosine_attn True \(scaled cosine"),
    (_vision(output_tokens=True), r"vision_cfg\.output_tokens True"),
    (_vision(act_kwargs={"inplace": True}), r"vision_cfg\.act_kwargs\.inplace is not"),
    (_text(norm_kwargs={"elementwise_affine": False}),
     r"text_cfg\.norm_kwargs\.elementwise_affine is not implemented"),
    (_text(act_kwargs={"approximate": "tanh"}), r"text_cfg\.act_kwargs\.approximate is not "
                                                r"implemented for QuickGELU"),
    (_vision(block_type="parallel"), r"vision_cfg\.block_type 'parallel'"),
    (_vision(head_width=24), r"vision_cfg\.head_width 24 does not divide"),
    (_text(embed_cls=True), r"text_cfg\.embed_cls True \(CoCa's appended class token\)"),
    (_text(pool_type="none"), r"text_cfg\.pool_type 'none' is not implemented"),
    (_text(proj_type="mlp"), r"text_cfg\.proj_type 'mlp' is not implemented"),
    (_text(hf_tokenizer_name="x", tokenizer_mode="clips"), r"text_cfg\.tokenizer_mode 'clips'"),
    (_text(hf_tokenizer_name="x", tokenizer_kwargs={"language": "fr"}),
     r"text_cfg\.tokenizer_kwargs\.language is not implemented"),
    (_text(bogus_field=1), r"model_cfg\.text_cfg\.bogus_field is not an OpenCLIP setting"),
    (_vision(widht=64), r"model_cfg\.vision_cfg\.widht is not an OpenCLIP setting"),
    (lambda d: d["model_cfg"].update(multimodal_cfg={}), r"model_cfg\.multimodal_cfg \(CoCa"),
    (lambda d: d["model_cfg"].update(temperature=1), r"model_cfg\.temperature is not an"),
    (lambda d: d.update(extra={}), r"extra is not an OpenCLIP setting"),
    (lambda d: d["preprocess_cfg"].update(resize_mode="crop"),
     r"preprocess_cfg\.resize_mode 'crop' is not implemented"),
    (lambda d: d["preprocess_cfg"].update(interpolation="nearest"),
     r"preprocess_cfg\.interpolation 'nearest' is not implemented"),
    (lambda d: d["preprocess_cfg"].update(size=64), r"preprocess_cfg\.size 64 differs"),
    (lambda d: d["preprocess_cfg"].update(crop_pct=0.9),
     r"preprocess_cfg\.crop_pct is not an OpenCLIP setting"),
    (lambda d: d["preprocess_cfg"].update(fill_color=300), r"preprocess\.fill_color must be"),
    (_text(layers=3), r"model_cfg\.text_cfg\.layers is 3 but the tensors have 2"),
]


@pytest.fixture(scope="module")
def plain_dir(oc, root, tokenizers) -> Path:
    model_cfg, preprocess_cfg, _ = _configs(tokenizers, root)["dfn-quickgelu"]
    directory = root / "errors-plain"
    directory.mkdir()
    _write(directory, model_cfg, preprocess_cfg)
    model = oc.create_model(f"local-dir:{directory}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              directory / "open_clip_model.safetensors")
    return directory


@pytest.mark.parametrize("edit, message", PLAIN_ERRORS)
def test_settings_not_implemented_are_errors_naming_them(plain_dir, tmp_path, edit, message):
    copy = _copy_with(plain_dir, tmp_path, edit)
    with pytest.raises(CheckpointError, match=rf"open_clip_config\.json.*{message}"):
        clipforge.create_model(copy)


def test_timm_and_hf_tower_settings_not_implemented_are_errors(build, root, tmp_path):
    siglip, xlmr = build("siglip").directory, build("xlmr-mlp").directory
    for edit, message in [
            (_vision(timm_model_name="vit_base_patch16_rope_224"),
             r"timm_model_name 'vit_base_patch16_rope_224' is not implemented"),
            (_vision(timm_pool="avg"), r"timm_pool 'avg' is not implemented"),
            (_vision(timm_proj="linear"), r"timm_proj 'linear' is not implemented")]:
        with pytest.raises(CheckpointError, match=message):
            clipforge.create_model(_copy_with(siglip, tmp_path / message[:9], edit))
    for pooler in ("cls_pooler", "max_pooler"):
        copy = _copy_with(xlmr, tmp_path / pooler, _text(hf_pooler_type=pooler))
        with pytest.raises(CheckpointError, match=f"hf_pooler_type '{pooler}'"):
            clipforge.create_model(copy)
    tower = tmp_path / "tower"
    shutil.copytree(root / "xlmr-config", tower)
    for key, value, message in [("model_type", "bert", r"model_type 'bert' is not implemented"),
                                ("hidden_act", "relu", r"hidden_act 'relu' is not implemented"),
                                ("is_decoder", True, r"is_decoder True is not implemented")]:
        hf = json.loads((root / "xlmr-config" / "config.json").read_text())
        hf[key] = value
        (tower / "config.json").write_text(json.dumps(hf))
        copy = _copy_with(xlmr, tmp_path / key, _text(hf_model_name=str(tower)))
        with pytest.raises(CheckpointError, match=message):
            clipforge.create_model(copy)


def test_eva_settings_and_tensors_not_implemented_are_errors(build, tmp_path):
    """An Eva tower pooled or projected otherwise than its own head, a timm tower not in the
    table (PE's spatial towers), a learned rotary table (timm's 'mixed' RoPE) or a stored k
    bias are errors naming them; the rotary tables timm may have saved are derived and read
    past, as timm itself does."""
    from safetensors.torch import load_file

    eva = build("eva02").directory
    for edit, message in [
            (_vision(timm_pool="avg"), r"timm_pool 'avg' is not implemented for "
                                       r"eva02_base_patch16_clip_224 \(clipforge implements "
                                       r"'token'\)"),
            (_vision(timm_proj="mlp"), r"timm_proj 'mlp' is not implemented"),
            (_vision(timm_model_name="vit_pe_spatial_base_patch16_512"),
             r"timm_model_name 'vit_pe_spatial_base_patch16_512' is not implemented")]:
        with pytest.raises(CheckpointError, match=message):
            clipforge.create_model(_copy_with(eva, tmp_path / message[:9], edit))
    reference = clipforge.create_model(eva)
    copy = _copy_with(eva, tmp_path / "tensors", lambda d: None)
    tensors = load_file(copy / "open_clip_model.safetensors")
    tensors["visual.trunk.rope.pos_embed"] = torch.zeros(16, 16)
    save_file(tensors, copy / "open_clip_model.safetensors")
    assert torch.equal(clipforge.create_model(copy).visual.transformer.resblocks[0].attn
                       .in_proj_bias, reference.visual.transformer.resblocks[0].attn.in_proj_bias)
    for key in ("visual.trunk.rope.freqs", "visual.trunk.blocks.0.attn.k_bias"):
        broken = dict(tensors, **{key: torch.zeros(8)})
        if key.endswith("k_bias"):  # beside q/v biases, as a fused Eva attention has them
            fused = _copy_with(build("eva02-e").directory, tmp_path / "fused", lambda d: None)
            broken = dict(load_file(fused / "open_clip_model.safetensors"),
                          **{key: torch.zeros(64)})
            copy = fused
        save_file(broken, copy / "open_clip_model.safetensors")
        with pytest.raises(CheckpointError, match=rf"tensor '{key}' belongs to no part"):
            clipforge.create_model(copy)


def test_weights_that_are_not_the_configs_are_an_error(plain_dir, build, tmp_path):
    """A SigLIP model's tensors under a plain config do not fit it; a tensor that no part of
    the described model has (a timm register token), or a missing part of a fused one, is
    named."""
    copy = _copy_with(plain_dir, tmp_path / "plain", lambda d: None)
    shutil.copy(build("siglip").directory / "open_clip_model.safetensors", copy)
    with pytest.raises(CheckpointError, match=r"open_clip_config\.json does not match its "
                                              r"weights: model_cfg\.text_cfg\.width is 32"):
        clipforge.create_model(copy)
    copy = _copy_with(build("siglip").directory, tmp_path / "siglip", lambda d: None)
    from safetensors.torch import load_file

    tensors = load_file(copy / "open_clip_model.safetensors")
    tensors["visual.trunk.reg_token"] = torch.zeros(1, 1, 48)
    save_file(tensors, copy / "open_clip_model.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor 'visual\.trunk\.reg_token' belongs to "
                                              r"no part of the model"):
        clipforge.create_model(copy)
    del tensors["visual.trunk.reg_token"], tensors["visual.trunk.attn_pool.kv.bias"]
    save_file(tensors, copy / "open_clip_model.safetensors")
    with pytest.raises(CheckpointError, match=r"visual\.attn_pool\.in_proj_bias lacks its "
                                              r"part\(s\) visual\.trunk\.attn_pool\.kv\.bias"):
        clipforge.create_model(copy)


# ------------------------------------------------------------------- files on the hub


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_tower_config_and_tokenizer_from_the_hub_cache(build, root, tokenizers, hub_cache,
                                                       tmp_path):
    """``hf_model_name`` and ``hf_tokenizer_name`` naming hub repositories (as published
    configs do: "xlm-roberta-base") are read from the Hugging Face cache; offline and not
    cached, loading fails at once with instructions."""
    source = build("xlmr-linear").directory
    reference = clipforge.create_model(source)
    files = {p.name: p.read_bytes() for p in tokenizers["xlmr"].iterdir() if p.is_file()}
    files["config.json"] = (root / "xlmr-config" / "config.json").read_bytes()
    families.fake_hub_cache(hub_cache, "org/xlmr", files)
    copy = _copy_with(source, tmp_path, _text(hf_model_name="org/xlmr",
                                              hf_tokenizer_name="org/xlmr"))
    model = clipforge.create_model(copy)
    assert model.config == reference.config
    assert torch.equal(model.tokenizer(TEXTS), reference.tokenizer(TEXTS))
    missing = _copy_with(source, tmp_path / "missing", _text(hf_model_name="org/not-cached"))
    with pytest.raises(WeightsUnavailableError, match=r"hf_model_name.*'org/not-cached'.*"
                                                      r"hf download org/not-cached"):
        clipforge.create_model(missing)

"""PE-Core and EVA image towers (timm's Eva class): the operations they add, their config fields,
and their precisions.

End to end against open_clip 3.3.0 + timm 1.0.31 (texts and PIL images in, token ids, pixels,
embeddings and logits out, clipforge-format round trips, the published configs on the meta
device, the TIMM_TOWERS table against timm's definitions) they are cases of
``test_open_clip_families.py``.  Here: the rotary tables and rotation against timm's own
functions (bit for bit), the fields' checks, what a Hugging Face export refuses, patch dropout
with rotary positions, bf16/int8, and the published-weights rows against open_clip's table.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import clipforge
import families
from clipforge.configs import ARCHITECTURES, CLIPConfig, VisionConfig
from clipforge.model.rope import rope_tables, rotate
from clipforge.precision import Int8Linear, ProjectedAttention, apply_precision
from conftest import perturb

MIN_COSINE = {"bf16": 0.9995, "int8": 0.998}  # as tests/test_precision.py
TEXTS = ["a photo of a cat", "two blue stars on a striped background", "a red circle", "x"]

# (head width, grid, reference grid, offset, indexing): PE-L (ref = grid), EVA02-B at a test
# grid (rescaled to 16), PE-bigG's (no offset), EVA02-L-336's (24 -> 16)
ROPE_SETTINGS = [(64, 24, 24, 1, "xy"), (8, 4, 16, 0, "ij"), (96, 32, 32, 0, "xy"),
                 (64, 24, 16, 0, "ij"), (16, 5, 0, 1, "ij")]


@pytest.fixture(scope="module")
def timm_layers():
    families.open_clip()  # timm's model code, importable beside the torchvision stand-in
    import timm.layers

    return timm.layers


@pytest.mark.parametrize("head, grid, ref, offset, indexing", ROPE_SETTINGS)
def test_rope_tables_are_timms(timm_layers, head, grid, ref, offset, indexing):
    """The sin/cos tables equal timm's RotaryEmbeddingCat (as Eva builds it for these towers:
    in_pixels False, interleaved layout) bit for bit."""
    theirs = timm_layers.RotaryEmbeddingCat(
        head, in_pixels=False, feat_shape=[grid, grid],
        ref_feat_shape=[ref, ref] if ref else None, grid_offset=float(offset),
        grid_indexing=indexing).get_embed()
    sin, cos = rope_tables(grid, head, 10000.0, ref, offset, indexing)
    ours = torch.cat([sin.repeat_interleave(2, -1), cos.repeat_interleave(2, -1)], dim=-1)
    assert ours.dtype == torch.float32 and torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefix", [0, 1])
def test_rotation_is_timms(timm_layers, dtype, prefix):
    """Queries turned as timm's Eva attention turns them: the patch tokens only (not a class
    token), in float32, returned in the input's dtype; the same bits."""
    grid, head = 4, 16
    sin, cos = rope_tables(grid, head, 10000.0, 16, 1, "xy")
    table = torch.cat([sin.repeat_interleave(2, -1), cos.repeat_interleave(2, -1)], dim=-1)
    q = torch.randn(2, 3, prefix + grid * grid, head, generator=torch.Generator().manual_seed(0))
    q = q.to(dtype)
    theirs = torch.cat([q[:, :, :prefix],
                        timm_layers.apply_rot_embed_cat(q[:, :, prefix:], table)], dim=2)
    ours = rotate(q, (sin, cos))
    assert ours.dtype == dtype and torch.equal(ours, theirs.type_as(q))
    assert torch.equal(ours[:, :, :prefix], q[:, :, :prefix])


# ------------------------------------------------------------------------------ config


def _vit(**changes) -> VisionConfig:
    return dataclasses.replace(ARCHITECTURES["tiny-vit"].vision, **changes)


@pytest.mark.parametrize("changes, message", [
    ({"rope_grid": 16}, r"vision\.rope_grid needs vision\.rope"),
    ({"rope_indexing": "xy"}, r"vision\.rope_indexing needs vision\.rope"),
    ({"rope": True, "heads": 32}, r"vision\.rope needs a head width divisible by 4, got 2"),
    ({"rope": True, "width": 72, "heads": 4}, r"head width divisible by 4, got 18"),
    ({"pool_heads": 2}, r"vision\.pool_heads needs vision\.pool 'map'"),
    ({"pool": "map", "class_token": False, "pool_heads": 3},
     r"vision\.width 64 is not divisible by vision\.pool_heads 3"),
    ({"norm": "post"}, r"vision\.norm must be one of pre, res_post"),
    ({"rope_indexing": "yx", "rope": True}, r"vision\.rope_indexing must be one of ij, xy"),
    ({"rope": True, "rope_theta": 0}, r"vision\.rope_theta must be a positive number"),
    ({"rope": True, "rope_offset": -1}, r"vision\.rope_offset must be a non-negative integer"),
    ({"activation": "swish"}, r"vision\.activation must be one of"),
])
def test_vision_fields_are_checked(changes, message):
    with pytest.raises(ValueError, match=message):
        _vit(**changes)


def test_vit_fields_on_a_resnet_are_errors():
    resnet = ARCHITECTURES["tiny-rn"].vision
    for field, value in (("rope", True), ("mlp_gated", True), ("norm", "res_post"),
                         ("pool_mlp_width", 8)):
        with pytest.raises(ValueError, match=rf"vision\.{field} applies to a ViT"):
            dataclasses.replace(resnet, **{field: value})


def test_configs_round_trip_and_old_configs_read_as_before():
    """The new fields leave an OpenAI-style config's JSON (and so its fingerprint) as it was,
    and PE's and EVA's configs come back from their JSON equal."""
    plain = ARCHITECTURES["tiny-vit"].to_dict()["vision"]
    assert set(plain) == {"image_size", "width", "layers", "heads", "patch_size", "mlp_width"}
    for name in ("tiny-pe", "tiny-eva02"):
        config = ARCHITECTURES[name]
        assert CLIPConfig.from_dict(config.to_dict()) == config
    assert ARCHITECTURES["tiny-pe"].to_dict()["vision"]["rope_indexing"] == "xy"
    with pytest.raises(ValueError, match=r"unknown config field vision\.rope_temperature"):
        data = ARCHITECTURES["tiny-pe"].to_dict()
        data["vision"]["rope_temperature"] = 100.0
        CLIPConfig.from_dict(data)


# ------------------------------------------------------------------------------ models


@pytest.fixture(scope="module", params=["tiny-pe", "tiny-eva02"])
def tower(request) -> clipforge.CLIP:
    torch.manual_seed(0)
    return perturb(clipforge.create_model(request.param), seed=5)


def test_model_has_the_configured_parts(tower):
    v = tower.config.vision
    block = tower.visual.transformer.resblocks[0]
    assert (block.attn.ln_inner is not None) == v.attn_norm
    assert (block.mlp.ln is not None) == v.mlp_norm and block.mlp.gated == v.mlp_gated
    assert block.mlp.c_fc.out_features == v.mlp_width * (2 if v.mlp_gated else 1)
    assert isinstance(tower.visual.proj, torch.nn.Linear) and tower.visual.proj.bias is not None
    # the rotary tables are derived: not in the state dict, not parameters
    assert not any("rope" in key for key in tower.state_dict())
    if v.pool == "map":
        assert tower.visual.attn_pool.heads == v.pool_heads


def test_rotary_positions_change_the_embedding(tower):
    """Rotary encoding is computed (a model without it embeds the same pixels otherwise)."""
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain = copy.deepcopy(tower)
    plain.visual.rope = None
    with torch.no_grad():
        assert (tower.encode_image(pixels) - plain.encode_image(pixels)).abs().max() > 1e-3


def test_patch_dropout_keeps_each_patch_its_position(tower):
    """With every patch kept, in a random order (FLIP's patch dropout at a negligible rate),
    each patch's rotary table travels with it: the embedding is the one without dropout."""
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    model = copy.deepcopy(tower)
    with torch.no_grad():
        want = model.encode_image(pixels)
        model.visual.patch_dropout = 1e-9
        model.train()
        torch.manual_seed(3)
        got = model.encode_image(pixels)
        index = model.visual._drop_patches(torch.zeros(1, 17, 1))[1]
    assert not torch.equal(index, torch.arange(16)[None])  # the order did change
    assert (got - want).abs().max() < 1e-5


def test_hugging_face_format_is_refused(tower, tmp_path):
    with pytest.raises(ValueError, match=r"no transformers model class computes this image "
                                         r"tower \(vision\.\w+ .*\); use --to clipforge"):
        clipforge.save_model(tower, tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists()


def test_clipforge_format_round_trip(tower, tmp_path):
    clipforge.save_model(tower, tmp_path / "saved")
    again = clipforge.create_model(tmp_path / "saved")
    assert again.config == tower.config
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    tokens = tower.tokenizer(TEXTS)
    with torch.no_grad():
        assert torch.equal(again(pixels, tokens)[0], tower(pixels, tokens)[0])


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_precisions_close_to_float32(tower, precision):
    """bf16 and int8 convert these towers (the gated MLP, the norms inside the attention and
    the MLP, the biased head, rotary encoding in float32) with float32 embeddings close to the
    float32 model's, as every family's (tests/test_precision.py)."""
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = tower.tokenizer(TEXTS)
    with torch.inference_mode():
        image32, text32 = tower.encode_image(pixels), tower.encode_text(tokens)
    model = apply_precision(copy.deepcopy(tower), precision)
    with torch.inference_mode():
        image, text = model.encode_image(pixels), model.encode_text(tokens)
    for got, want in ((image, image32), (text, text32)):
        assert got.dtype == torch.float32
        assert F.cosine_similarity(got, want, dim=-1).min() > MIN_COSINE[precision]
        assert not torch.equal(got, want)
    assert all(p.dtype == torch.float32 for p in model.visual.proj.parameters())
    block = model.visual.transformer.resblocks[0]
    if precision == "bf16":
        assert block.mlp.c_fc.weight.dtype == torch.bfloat16
    else:
        assert isinstance(block.mlp.c_fc, Int8Linear) and isinstance(block.attn,
                                                                     ProjectedAttention)
    # the norms inside the attention and the MLP are kept, in float32
    for norm in (block.attn.ln_inner, block.mlp.ln):
        assert norm is None or norm.weight.dtype == torch.float32
    assert (block.attn.ln_inner is not None) == tower.config.vision.attn_norm


# ------------------------------------------------------------------------ published weights


def test_published_rows_are_open_clips():
    """Every PE-Core and EVA tag of open_clip's pretrained table, with its repository, and the
    figures OpenCLIP publishes."""
    oc = families.open_clip()
    from clipforge.weights.pretrained import PRETRAINED

    names = [n for n in oc.list_models() if n.startswith(("PE-Core-", "EVA0"))]
    for name in names:
        tags = oc.list_pretrained_tags_by_model(name)
        assert tags and set(tags) == set(PRETRAINED[name]), name
        for tag in tags:
            repo = oc.get_pretrained_cfg(name, tag)["hf_hub"].rstrip("/")
            assert PRETRAINED[name][tag].repo == repo
            assert PRETRAINED[name][tag].activation is None
    assert PRETRAINED["PE-Core-bigG-14-448"]["meta"].imagenet == 85.4
    assert PRETRAINED["PE-Core-L-14-336"]["meta"].imagenet == 83.5
    assert PRETRAINED["EVA02-L-14-336"]["merged2b_s6b_b61k"].imagenet == 80.4
    assert PRETRAINED["EVA02-B-16"]["merged2b_s8b_b131k"].imagenet == 74.7


def test_a_gated_quick_gelu_mlp_is_not_rescaled():
    """bf16 runs QuickGELU MLPs as SiLU on rescaled weights; a gated MLP's first layer also
    makes the value, which that rescaling would scale too: it is left as it is."""
    config = ARCHITECTURES["tiny-eva02"]
    config = config.replace(vision=dataclasses.replace(config.vision, activation="quick_gelu"))
    torch.manual_seed(0)
    model = perturb(clipforge.CLIP(config), seed=6).eval()
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model.encode_image(pixels)
    half = apply_precision(copy.deepcopy(model), "bf16")
    with torch.inference_mode():
        got = half.encode_image(pixels)
    assert F.cosine_similarity(got, want, dim=-1).min() > MIN_COSINE["bf16"]

"""Dense features and ``clipforge locate`` (issue 15, "where").

* ``forward_intermediates`` against open_clip's own, on tiny random open_clip models whose
  weights clipforge loads from their hub directory: its ViT (class token), its ResNet, and
  timm's towers (SigLIP: no class token and an attention-pooling head; PE-Core: rotary positions,
  a class token and a head; EVA02: rotary positions, SwiGLU, class-token pooling);
* the dense recipes against what can be derived about them: where every token is the same, a
  token attending to itself or to all alike computes the same, so each patch's embedding is the
  image embedding; with one block, MaskCLIP's patch embedding is a function of its own patch;
  a ResNet's pooled embedding is the attention-weighted mean of its per-position ones;
* the way back from the model's input square to the image's own pixels, for each resize mode,
  against the transform itself and with a constructed map;
* the command: its JSON, the PNG, its errors.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import clipforge
import families
from clipforge.cli import main
from clipforge.configs import ARCHITECTURES
from clipforge.data.draw import COLOURS, draw_scene_with_boxes
from clipforge.dense import locate, place, region, upsample
from clipforge.image import Preprocess
from clipforge.model.dense import encode_dense, patch_embeddings
from clipforge.model.vision import take_indices
from conftest import seeded_model

TOL = 1e-5

# ------------------------------------------------------------------ against open_clip

OPENAI_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}
# timm towers at test size (their real heads, activations and norms)
SMALL_TIMM = {"vit_so400m_patch14_siglip_384": {"depth": 3, "embed_dim": 48, "img_size": 32},
              "vit_pe_core_large_patch14_336": {"depth": 2, "embed_dim": 128, "img_size": 58},
              "eva02_base_patch16_clip_224": {"depth": 2, "embed_dim": 96, "img_size": 64}}


def _timm(name: str, pool: str, proj: str | None, embed_dim: int) -> dict:
    return {"embed_dim": embed_dim, "custom_text": True, "text_cfg": OPENAI_TEXT,
            "vision_cfg": {"image_size": SMALL_TIMM[name]["img_size"], "timm_model_name": name,
                           "timm_model_pretrained": False, "timm_pool": pool,
                           "timm_proj": proj}}


OPEN_CLIP_CASES = {
    "vit": {"embed_dim": 32, "quick_gelu": True, "text_cfg": OPENAI_TEXT,
            "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 16,
                           "patch_size": 8}},
    "resnet": {"embed_dim": 32, "quick_gelu": True, "text_cfg": OPENAI_TEXT,
               "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8,
                              "head_width": 16, "patch_size": None}},
    "siglip": _timm("vit_so400m_patch14_siglip_384", "map", "none", 48),
    "pe-core": _timm("vit_pe_core_large_patch14_336", "map", None, 32),
    "eva02": _timm("eva02_base_patch16_clip_224", "token", None, 32),
}



@pytest.fixture(scope="module", params=list(OPEN_CLIP_CASES))
def open_clip_pair(request, tmp_path_factory):
    """(open_clip's model, clipforge's model of the same hub directory)."""
    oc = families.open_clip()
    directory = tmp_path_factory.mktemp(request.param)
    (directory / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": OPEN_CLIP_CASES[request.param], "preprocess_cfg": {}}))
    torch.manual_seed(0)
    with families.small_timm(SMALL_TIMM):
        reference = oc.create_model(f"local-dir:{directory}", pretrained_text=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # noise: zero biases and unit norms cannot hide a wrong mapping
        for p in reference.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()},
              directory / "open_clip_model.safetensors")
    return reference.eval(), clipforge.create_model(directory)


INTERMEDIATE_OPTIONS = [
    {},
    {"indices": 1, "output_extra_tokens": True},
    {"indices": [0, -1], "normalize_intermediates": True, "output_extra_tokens": True},
    {"indices": [-2], "output_fmt": "NLC", "intermediates_only": True, "stop_early": True},
]


@pytest.mark.parametrize("options", INTERMEDIATE_OPTIONS, ids=range(len(INTERMEDIATE_OPTIONS)))
def test_forward_intermediates_match_open_clip(open_clip_pair, options) -> None:
    reference, ours = open_clip_pair
    if not ours.config.vision.is_vit and options.get("output_fmt") == "NLC":
        options = {**options, "output_fmt": "NCHW"}  # open_clip's ResNet has no NLC
    size = ours.config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = reference.visual.forward_intermediates(pixels, **options)
        got = ours.visual.forward_intermediates(pixels, **options)
    assert set(got) == set(theirs)
    for key in theirs:
        expected = theirs[key] if isinstance(theirs[key], list) else [theirs[key]]
        actual = got[key] if isinstance(got[key], list) else [got[key]]
        assert len(actual) == len(expected), key
        for a, b in zip(actual, expected):
            assert a.shape == b.shape, key
            assert (a - b).abs().max() < TOL, key
    if "image_features" in got:  # the embedding, as encode_image gives it
        with torch.no_grad():
            assert torch.equal(got["image_features"], ours.encode_image(pixels))


def test_take_indices_reads_indices_as_timm() -> None:
    from timm.models._features import feature_take_indices

    for indices in (None, 1, 3, [0], [-1, 0], (1, -2)):
        assert take_indices(4, indices) == feature_take_indices(4, indices)[0]
    for bad in (0, 5, [4], [-5]):
        with pytest.raises(ValueError, match="out of range|cannot take"):
            take_indices(4, bad)


def test_forward_intermediates_refuses_an_unknown_format(tiny_vit) -> None:
    with pytest.raises(ValueError, match="output_fmt 'NHWC'"):
        tiny_vit.visual.forward_intermediates(torch.zeros(1, 3, 32, 32), output_fmt="NHWC")


# ------------------------------------------------------------------ the dense recipes

VIT_FAMILIES = ["tiny-vit", "tiny-siglip", "tiny-pe", "tiny-eva02"]


def _all_tokens_alike(model: clipforge.CLIP) -> torch.Tensor:
    """Make every token of a constant image the same (one position everywhere, the class token
    equal to a patch): pixels whose tokens a self-only attention and the tower's own attention
    treat alike."""
    visual = model.visual
    pixels = torch.full((1, 3, visual.image_size, visual.image_size), 0.7)
    with torch.no_grad():
        visual.positional_embedding.copy_(visual.positional_embedding[:1].expand_as(
            visual.positional_embedding))
        if visual.class_embedding is not None:
            visual.class_embedding.copy_(visual.conv1(pixels)[0, :, 0, 0])
    return pixels


@pytest.mark.parametrize("name", VIT_FAMILIES)
def test_patch_embeddings_are_the_image_embedding_where_all_tokens_are_alike(name) -> None:
    """MaskCLIP's last block (residual, value path, MLP), ``ln_post`` and the projection, or the
    head's value path and MLP: where every token is the same, the value path is what attention
    computes, so each patch's embedding must be the tower's embedding."""
    model = seeded_model(name, seed=3).eval()
    pixels = _all_tokens_alike(model)
    with torch.no_grad():
        dense = encode_dense(model, pixels)
        image = model.encode_image(pixels, normalize=True)
    assert dense.shape == (1, 4, 4, model.config.embed_dim)
    assert (dense - image[:, None, None]).abs().max() < TOL
    assert torch.allclose(dense.norm(dim=-1), torch.ones(1, 4, 4))


def test_maskclip_patch_embedding_depends_on_its_own_patch_only() -> None:
    """With one block, the value path never mixes tokens: changing the other patches leaves a
    patch's embedding exactly as it was (the tower's own tokens do change)."""
    config = ARCHITECTURES["tiny-vit"]
    config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, layers=1))
    torch.manual_seed(0)
    model = clipforge.CLIP(config).eval()
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1, 3, 32, 32, generator=gen)
    b = a.clone()
    b[..., 8:, :] = torch.randn(1, 3, 24, 32, generator=gen)  # every row of patches but the first
    with torch.no_grad():
        da, db = encode_dense(model, a), encode_dense(model, b)
        ta, tb = (model.visual.forward_intermediates(x, intermediates_only=True)
                  ["image_intermediates"][0] for x in (a, b))
    assert torch.equal(da[:, 0], db[:, 0])
    assert (da[:, 1:] - db[:, 1:]).abs().max() > 0.01
    assert (ta[:, :, 0] - tb[:, :, 0]).abs().max() > 0.01


def test_resnet_embedding_is_the_mean_of_its_positions_under_uniform_attention(tiny_rn) -> None:
    """With the pool's query zeroed, its attention is uniform over the mean token and the
    positions; with the mean token's position the mean of the others', the pooled embedding is
    then exactly the mean of the per-position outputs (value and output projections are
    linear)."""
    pool = tiny_rn.visual.attnpool
    with torch.no_grad():
        pool.q_proj.weight.zero_()
        pool.q_proj.bias.zero_()
        pool.positional_embedding[0] = pool.positional_embedding[1:].mean(0)
        pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        positions = patch_embeddings(tiny_rn.visual, pixels.contiguous())
        embedding = tiny_rn.encode_image(pixels)
    assert positions.shape == (2, 2, 2, 64)
    assert (positions.mean(dim=(1, 2)) - embedding).abs().max() < TOL
    assert (positions[:, 0, 0] - embedding).abs().max() > 0.01  # the positions do differ


def test_dense_features_refuse_an_onnx_model() -> None:
    with pytest.raises(TypeError, match="PyTorch model"):
        encode_dense(object(), torch.zeros(1, 3, 32, 32))


# ------------------------------------------------------------------ back onto the image

def _marked(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    image = Image.new("RGB", size, (0, 0, 0))
    image.paste((255, 255, 255), box)
    return image


@pytest.mark.parametrize("mode", ["shortest", "squash", "longest"])
@pytest.mark.parametrize("size", [(150, 90), (70, 160)])
def test_window_puts_the_input_square_back_where_the_transform_took_it(mode, size) -> None:
    """A white square drawn on a non-square image, found in the transformed image and mapped
    back through ``window``, lands where it was drawn (within the resampling's blur)."""
    pre = Preprocess(48, (0.0,) * 3, (1.0,) * 3, "bilinear", mode)
    mark = (size[0] // 2 - 12, size[1] // 2 - 20, size[0] // 2 + 8, size[1] // 2 + 4)
    seen = np.asarray(pre.resized(_marked(size, mark)).convert("L"), dtype=np.float64) / 255
    ys, xs = np.mgrid[0:48, 0:48] + 0.5
    x0, y0, x1, y1 = pre.window(size)
    centre = (x0 + (xs * seen).sum() / seen.sum() * (x1 - x0) / 48,
              y0 + (ys * seen).sum() / seen.sum() * (y1 - y0) / 48)
    assert centre == pytest.approx(((mark[0] + mark[2]) / 2, (mark[1] + mark[3]) / 2), abs=0.5)
    if mode == "squash":
        assert pre.window(size) == (0, 0, *size)


def test_window_of_each_mode() -> None:
    """Worked by hand: a 200x100 image at 32 px."""
    pre = functools.partial(Preprocess, 32, (0.0,) * 3, (1.0,) * 3)
    # shortest: resized to 64x32, the crop from x=16 to 48 -> 50 to 150 in the image
    assert pre(resize_mode="shortest").window((200, 100)) == (50.0, 0.0, 150.0, 100.0)
    # longest: resized to 32x16, padded by 8 above and below -> y from -50 to 150
    assert pre(resize_mode="longest").window((200, 100)) == (0.0, -50.0, 200.0, 150.0)


def test_a_constructed_map_lands_on_the_image_pixels_it_describes() -> None:
    """One hot cell (top right) of a 4x4 map over a 32 px square cut from the middle of a 200x100
    image: its centre (28, 4) in the square is (137.5, 12.5) in the image, the pixel (137, 12);
    the map falls to half at half a cell from it, so the box runs from 125 (the first pixel
    whose centre lies past 24 in the square) to the edge of the crop, 150, and from the top
    to 25."""
    grid = np.zeros((4, 4), np.float32)
    grid[0, 3] = 1.0
    pre = Preprocess(32, (0.0,) * 3, (1.0,) * 3)
    found = place(grid, "x", (200, 100), pre, cell=8)
    assert found.peak == (137, 12)
    assert found.box == (125, 0, 150, 25)
    assert found.heatmap.shape == (100, 200)
    assert np.isnan(found.heatmap[:, :50]).all() and np.isnan(found.heatmap[:, 150:]).all()
    assert np.isfinite(found.heatmap[:, 50:150]).all()
    assert found.score == 1.0


def test_locate_maps_the_model_peak_back_for_a_non_square_image(tiny_vit, monkeypatch) -> None:
    """``locate`` with the model's map replaced by a constructed one: a hot cell at (1, 2) of
    the 4x4 grid of tiny-vit (patches of 8 in 32 px) on a 90x180 image (shortest side first: the
    square is the middle 90x90, from y=45) peaks at the cell's centre (12, 20) in the square,
    (12 * 90 / 32, 45 + 20 * 90 / 32) = (33.75, 101.25) in the image."""
    grid = np.zeros((4, 4), np.float32)
    grid[2, 1] = 1.0
    monkeypatch.setattr("clipforge.dense.similarity_maps",
                        lambda model, images, texts: grid[None, None])
    found = locate(tiny_vit, Image.new("RGB", (90, 180)), "a red star")
    assert found.size == (90, 180) and found.heatmap.shape == (180, 90)
    assert abs(found.peak[0] + 0.5 - 33.75) <= 1 and abs(found.peak[1] + 0.5 - 101.25) <= 1
    x0, y0, x1, y1 = found.box
    assert x0 < found.peak[0] < x1 and y0 < found.peak[1] < y1
    assert 45 <= y0 and y1 <= 135  # inside the square the model saw


def test_region_keeps_the_component_of_the_peak() -> None:
    heat = np.zeros((10, 20), np.float32)
    heat[2:5, 3:6] = 1.0  # the peak's region
    heat[6:9, 12:18] = 0.9  # as hot, but apart
    heat[0, 0] = np.nan  # unseen
    assert region(heat, (4, 3)) == (3, 2, 6, 5)
    assert region(heat, (15, 7)) == (12, 6, 18, 9)
    assert region(heat, (10, 1)) == (3, 2, 6, 5)  # a cold peak: the hottest pixel's region
    with pytest.raises(ValueError, match="no seen pixel"):
        region(np.full((2, 2), np.nan), (0, 0))


def test_upsample_of_a_constant_map_is_constant_where_seen() -> None:
    heat = upsample(np.full((2, 2), 0.25, np.float32), (40, 20), (10.0, 0.0, 30.0, 20.0), 64,
                    32)
    assert np.isnan(heat[:, :10]).all() and np.isnan(heat[:, 30:]).all()
    assert np.allclose(heat[:, 10:30], 0.25)


def test_overlay_at_most_max_side_scales_the_map_box_and_peak() -> None:
    """The overlay drawn at 100 px of a 400x200 image: the same picture as the full-size one
    shrunk, near enough (the map sampled at the small pixels' centres), with the box's outline
    at a quarter of its coordinates; unseen columns (outside the centre crop) left as the
    image."""
    from clipforge.dense import overlay

    grid = np.zeros((4, 4), np.float32)
    grid[1, 2] = 1.0
    pre = Preprocess(32, (0.0,) * 3, (1.0,) * 3)
    image = Image.new("RGB", (400, 200), (40, 90, 160))
    found = place(grid, "x", image.size, pre, cell=8)
    small = overlay(image, found, max_side=100)
    assert small.size == (100, 50)
    full = np.asarray(overlay(image, found).resize((100, 50), Image.Resampling.BOX),
                      dtype=float)
    pixels = np.asarray(small, dtype=float)
    x0, y0, x1, y1 = (v // 4 for v in found.box)
    inner = np.ones((50, 100), bool)
    inner[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2] = False  # away from the outline
    assert np.abs(pixels - full)[inner].mean() < 4
    assert tuple(pixels[y0 + 1, x0]) == (255, 255, 255)  # the box's left edge
    assert (pixels[:, :20] == (40, 90, 160)).all() and (pixels[:, 80:] == (40, 90, 160)).all()
    assert overlay(image, found, max_side=400).size == (400, 200)  # no larger than it is
    with pytest.raises(ValueError, match="max_side"):
        overlay(image, found, max_side=0)


def test_locate_on_a_real_model_agrees_with_its_dense_map(tiny_rn) -> None:
    """The peak lies in the cell of the map's best position, mapped back to the image."""
    image = Image.fromarray((np.random.RandomState(0).rand(96, 64, 3) * 255).astype("uint8"))
    found = locate(tiny_rn, image, "a red star")
    with torch.no_grad():
        text = tiny_rn.encode_text(tiny_rn.tokenizer(["a red star"]), normalize=True)[0]
        dense = encode_dense(tiny_rn, tiny_rn.preprocess(image)[None])[0]
    cosines = (dense @ text).numpy()
    assert found.score == pytest.approx(float(cosines.max()), abs=1e-5)
    row, col = np.unravel_index(cosines.argmax(), cosines.shape)
    # 64 px square (the middle of 96 rows, from y=16) in a grid of 2: cells of 32 image pixels
    assert col * 32 <= found.peak[0] < (col + 1) * 32
    assert 16 + row * 32 <= found.peak[1] < 16 + (row + 1) * 32


@pytest.mark.parametrize(("name", "native", "larger"), [("tiny-vit", 32, 64),
                                                         ("tiny-rn", 64, 128)])
def test_a_larger_image_size_gives_a_finer_map_in_the_same_pixels(name, native,
                                                                   larger) -> None:
    """``image_size`` runs the tower at more pixels (position embeddings resampled): twice the
    cells a side, the resized model's own dense map, its peak in its best cell mapped back to
    the image's pixels.  At the native size the result is exactly the plain call's, and the
    model given is left as it was."""
    from clipforge.model.resize import with_image_size

    model = seeded_model(name, seed=4).eval()
    image = Image.fromarray((np.random.RandomState(2).rand(72, 96, 3) * 255).astype("uint8"))
    base = locate(model, image, "a red star")
    same = locate(model, image, "a red star", image_size=native)
    assert (same.peak, same.box, same.score) == (base.peak, base.box, base.score)
    assert np.array_equal(same.grid, base.grid)
    assert np.array_equal(same.heatmap, base.heatmap, equal_nan=True)
    fine = locate(model, image, "a red star", image_size=larger)
    assert model.config.image_size == native and model.preprocess.image_size == native
    assert fine.grid.shape == (2 * base.grid.shape[0], 2 * base.grid.shape[1])
    assert fine.size == base.size == (96, 72) and fine.heatmap.shape == (72, 96)
    resized = with_image_size(model, larger)
    with torch.no_grad():
        text = resized.encode_text(resized.tokenizer(["a red star"]), normalize=True)[0]
        dense = encode_dense(resized, resized.preprocess(image)[None])[0]
    cosines = (dense @ text).numpy()
    assert np.abs(fine.grid - cosines).max() < 1e-5
    assert np.abs(fine.grid[::2, ::2] - base.grid).max() > 1e-3  # not the old map repeated
    row, col = np.unravel_index(cosines.argmax(), cosines.shape)
    x0, y0, x1, y1 = resized.preprocess.window(image.size)  # the centre 72x72, from x=12
    cell = (x1 - x0) / fine.grid.shape[1]
    assert x0 + col * cell <= fine.peak[0] < x0 + (col + 1) * cell
    assert y0 + row * cell <= fine.peak[1] < y0 + (row + 1) * cell
    bx0, by0, bx1, by1 = fine.box
    assert x0 <= bx0 < bx1 <= x1 and y0 <= by0 < by1 <= y1


def test_an_image_size_that_does_not_fit_the_patches_is_refused(tiny_vit) -> None:
    image = Image.new("RGB", (40, 40))
    with pytest.raises(ValueError, match="not a multiple of this model's patch size 8"):
        locate(tiny_vit, image, "x", image_size=36)
    with pytest.raises(ValueError, match="positive number of pixels"):
        locate(tiny_vit, image, "x", image_size=0)


# ------------------------------------------------------------------ the built-in truth

def test_scene_boxes_bound_the_drawn_objects() -> None:
    """Each box is the bounding box (to a pixel) of the pixels nearer the object's colour than
    the plain background's, the object's connected blob."""
    from scipy import ndimage

    objects = [{"colour": "red", "shape": "star", "diameter": 0.3, "cells": ["top left"]},
               {"colour": "blue", "shape": "circle", "diameter": 0.25,
                "cells": ["bottom right", "center"]}]
    image, _, boxes = draw_scene_with_boxes(np.random.default_rng(0), objects, "filled",
                                            "plain", 64, degrade=False)
    pixels = np.asarray(image, dtype=np.float64)
    background = np.median(pixels.reshape(-1, 3), axis=0)
    assert [len(copies) for copies in boxes] == [1, 2]
    for obj, copies in zip(objects, boxes):
        colour = np.array(COLOURS[obj["colour"]], dtype=np.float64)
        near = (np.linalg.norm(pixels - colour, axis=-1)
                < np.linalg.norm(pixels - background, axis=-1))
        blobs = ndimage.find_objects(ndimage.label(near)[0])
        found = sorted((b[1].start, b[0].start, b[1].stop, b[0].stop) for b in blobs)
        assert len(found) == len(copies)
        for got, expected in zip(sorted(copies), found):
            assert np.abs(np.subtract(got, expected)).max() <= 1, (got, expected)


# ------------------------------------------------------------------ the command

@pytest.fixture
def saved_model(tiny_vit, tmp_path) -> Path:
    path = tmp_path / "tiny"
    clipforge.save_model(tiny_vit, path)
    return path


def test_locate_command_prints_peak_and_box_and_writes_the_overlay(saved_model, tmp_path,
                                                                   capsys) -> None:
    image_path = tmp_path / "scene.png"
    image = Image.fromarray((np.random.RandomState(1).rand(60, 110, 3) * 255).astype("uint8"))
    image.save(image_path)
    out = tmp_path / "maps" / "heat.png"
    assert main(["locate", str(image_path), "a red star", "--model", str(saved_model),
                 "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = locate(clipforge.create_model(saved_model), image_path, "a red star")
    assert report["peak"] == list(expected.peak) and report["box"] == list(expected.box)
    assert report["size"] == [110, 60]
    x0, y0, x1, y1 = report["box"]
    assert 0 <= x0 < x1 <= 110 and 0 <= y0 < y1 <= 60
    with Image.open(out) as written:
        assert written.format == "PNG" and written.size == (110, 60)
        pixels = np.asarray(written.convert("RGB"))
    # outside the centre crop (x < 25 or x >= 85) the model saw nothing: left as it was
    assert np.array_equal(pixels[:, :25], np.asarray(image)[:, :25])
    assert not np.array_equal(pixels[:, 30:80], np.asarray(image)[:, 30:80])


def test_locate_command_image_size(saved_model, tmp_path, capsys) -> None:
    image_path = tmp_path / "scene.png"
    Image.fromarray((np.random.RandomState(3).rand(50, 80, 3) * 255).astype("uint8")
                    ).save(image_path)
    out = tmp_path / "heat.png"
    assert main(["locate", str(image_path), "a red star", "--model", str(saved_model),
                 "--out", str(out), "--json", "--image-size", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = locate(clipforge.create_model(saved_model), image_path, "a red star",
                      image_size=64)
    assert report["grid"] == [8, 8] and report["size"] == [80, 50]
    assert report["peak"] == list(expected.peak) and report["box"] == list(expected.box)
    with Image.open(out) as written:
        assert written.size == (80, 50)
    assert main(["locate", str(image_path), "x", "--model", str(saved_model), "--out",
                 str(out), "--image-size", "60"]) == 2
    assert "not a multiple of this model's patch size 8" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--image-size"):
        main(["locate", str(image_path), "x", "--model", str(saved_model), "--out", str(out),
              "--image-size", "0"])


def test_locate_command_text_output(saved_model, tmp_path, capsys) -> None:
    image_path = tmp_path / "scene.png"
    Image.new("RGB", (40, 40), (10, 200, 30)).save(image_path)
    assert main(["locate", str(image_path), "a green square", "--model", str(saved_model),
                 "--out", str(tmp_path / "heat.png")]) == 0
    captured = capsys.readouterr()
    assert "peak (" in captured.out and "box (" in captured.out
    assert "wrote" in captured.err


def test_locate_command_errors(saved_model, tmp_path, capsys) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    out = tmp_path / "heat.png"
    assert main(["locate", str(broken), "a red star", "--model", "no/such/model",
                 "--out", str(out)]) == 2  # the image is read before the model
    assert f"cannot read image {broken}" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit, match="must be a .png file"):
        main(["locate", str(broken), "x", "--model", str(saved_model), "--out", "heat.jpg"])
    with pytest.raises(SystemExit, match="--threshold"):
        main(["locate", str(broken), "x", "--model", str(saved_model), "--out", str(out),
              "--threshold", "0"])


def test_locate_refuses_an_onnx_model() -> None:
    from clipforge.dense import locate_many

    with pytest.raises(ValueError, match="backend='torch'"):
        locate_many(object(), Image.new("RGB", (8, 8)), ["x"])

"""Image preprocessing against implementations we did not write.

openai/CLIP's transform is torchvision's ``Resize(S, BICUBIC)`` (short side to S, long side
``int(S * long / short)``), ``CenterCrop(S)`` (offsets ``int(round((h - S) / 2.0))``),
``convert("RGB")``, ``ToTensor`` (uint8 / 255 in float32) and ``Normalize`` (subtract, then divide).
torchvision is not installed here, so the reference is Hugging Face's PIL-backed
``CLIPImageProcessorPil``, which resizes with the same PIL call and the same size rule.  It differs
from torchvision in two documented places, handled below rather than hidden:

* centre-crop offsets: HF uses ``(h - S) // 2`` (floor), torchvision ``round`` (half to even), so
  when ``h - S`` is 3 (mod 4) HF's crop is one pixel further up/left.  We compare against HF's
  resized-and-normalised image cut with torchvision's offsets, and against HF's full pipeline
  wherever the two offset rules agree.
* colour conversion order: HF converts to RGB (compositing transparency onto white) *before*
  resizing; torchvision resizes in the image's own mode (PIL uses nearest-neighbour for "P" and
  "1", premultiplied alpha for "RGBA"/"LA") and converts afterwards, dropping alpha.  For RGB,
  grayscale and opaque RGBA the order makes no difference and HF is the reference; for the other
  modes an inline PIL + numpy mirror of torchvision is.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
from importlib import resources

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import clipforge
from clipforge.image import ImageLoadError, Preprocess, load_image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TOLERANCE = 1e-6  # float32 round-off; measured max difference is 0.0
SIZES = (224, 336, 288)
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "horse.png", "motorcycle_right.png",
          "page.png", "rocket.jpg", "camera.png")


# --------------------------------------------------------------------------- references


def _hf_processor(size: int, crop: bool = True, mean=OPENAI_MEAN, std=OPENAI_STD,
                  resample: str = "bicubic"):
    pil_clip = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    from transformers.image_utils import PILImageResampling

    return pil_clip.CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        do_resize=True, do_center_crop=crop, do_rescale=True, do_normalize=True,
        do_convert_rgb=True, image_mean=list(mean), image_std=list(std),
        resample=getattr(PILImageResampling, resample.upper()),
    )


def _hf(img: Image.Image, size: int, crop: bool = True, **kwargs) -> np.ndarray:
    out = _hf_processor(size, crop, **kwargs)(img, return_tensors="np")["pixel_values"][0]
    assert out.dtype == np.float32
    return out


def _tv_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's CenterCrop anchor."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def _hf_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """transformers.image_transforms.center_crop's anchor."""
    return (height - size) // 2, (width - size) // 2


def _tv_resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision Resize(int) for PIL: short side -> size, long side int(size * long / short)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def hf_reference(img: Image.Image, size: int, **kwargs) -> np.ndarray:
    """HF's resize + rescale + normalise, cut with torchvision's centre-crop offsets."""
    full = _hf(img, size, crop=False, **kwargs)
    height, width = full.shape[1:]
    assert (width, height) == _tv_resized_size(*img.size, size)  # same resize rule
    top, left = _tv_offsets(height, width, size)
    return full[:, top:top + size, left:left + size]


def torchvision_mirror(img: Image.Image, size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> np.ndarray:
    """openai/CLIP's torchvision Compose, step by step with PIL + numpy (for non-RGB modes)."""
    new_size = _tv_resized_size(*img.size, size)
    if new_size != img.size:  # torchvision returns the image untouched when the size is right
        img = img.resize(new_size, Image.Resampling.BICUBIC)  # in the image's own mode
    top, left = _tv_offsets(img.size[1], img.size[0], size)
    img = img.crop((left, top, left + size, top + size))
    img = img.convert("RGB")  # after the crop, alpha dropped (no compositing)
    pixels = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)
    pixels = pixels.transpose(2, 0, 1)
    mean = np.asarray(mean, dtype=np.float32)[:, None, None]
    std = np.asarray(std, dtype=np.float32)[:, None, None]
    return (pixels - mean) / std


# --------------------------------------------------------------------------- images


def _photo_path(name: str):
    try:
        folder = resources.files("skimage") / "data"
    except ModuleNotFoundError:
        pytest.skip("scikit-image (sample photos) is not installed")
    path = folder / name
    if not path.is_file():
        pytest.skip(f"scikit-image has no {name}")
    return path


@functools.cache
def photo(name: str) -> Image.Image:
    img = Image.open(_photo_path(name))
    img.load()
    return img


def _texture(width: int, height: int, seed: int) -> np.ndarray:
    """uint8 [H, W, 3]: smooth gradients, hard edges and per-pixel noise (bicubic overshoot)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack([
        127 + 120 * np.sin(x / max(width, 1) * rng.uniform(2, 12) + rng.uniform(0, 6)),
        255 * (y / max(height - 1, 1)),
        255.0 * (((x // 7) + (y // 5)) % 2),
    ], axis=-1)
    noise = rng.normal(0, 40, size=(height, width, 3))
    mask = rng.random((height, width, 1)) < 0.5
    return np.clip(np.where(mask, base + noise, rng.integers(0, 256, (height, width, 3))),
                   0, 255).astype(np.uint8)


# (width, height) of synthetic images; many give a resized long side with (long - S) odd, and both
# (long - S) = 1 and 3 (mod 4), where torchvision's round-half-even crop offset differs from floor.
SYNTHETIC = {
    "odd-landscape": (401, 301),
    "odd-portrait": (257, 479),
    "portrait-half-offset": (341, 426),  # long - S = 3 (mod 4) for every S: offsets differ
    "portrait-upsampled-half-offset": (201, 251),
    "wide-odd": (999, 333),
    "small-upsampled": (97, 61),
    "tiny-upsampled": (13, 21),
    "exactly-S": None,  # filled per S
    "S-plus-3": None,  # no resize; crop offset 1.5 -> round 2, floor 1
    "S-plus-1": None,  # crop offset 0.5 -> 0 both ways
    "S-plus-7-tall": None,  # no resize; vertical offset 3.5 -> round 4, floor 3
    "almost-square": (1000, 999),
    "thin-wide": (3000, 40),
    "thin-tall": (40, 3000),
}


@functools.cache
def synthetic(name: str, size: int) -> Image.Image:
    per_size = {"exactly-S": (size, size), "S-plus-3": (size + 3, size),
                "S-plus-1": (size, size + 1), "S-plus-7-tall": (size, size + 7)}
    dims = SYNTHETIC[name] or per_size[name]
    seed = sum(map(ord, name)) * 1000 + size
    return Image.fromarray(_texture(*dims, seed=seed), "RGB")


def _rgb_cases():
    for size in SIZES:
        for name in PHOTOS:
            yield pytest.param(("photo", name), size, id=f"{name}-{size}")
        for name in SYNTHETIC:
            yield pytest.param(("synthetic", name), size, id=f"{name}-{size}")


def _image(case, size: int) -> Image.Image:
    kind, name = case
    return photo(name) if kind == "photo" else synthetic(name, size)


def _preprocess(size: int) -> Preprocess:
    return Preprocess(size, OPENAI_MEAN, OPENAI_STD, "bicubic")


def _max_diff(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(("case", "size"), list(_rgb_cases()))
def test_matches_huggingface(case, size):
    img = _image(case, size)
    # Photos come as RGB, L (page, camera) and RGBA (horse), where the conversion order is moot:
    # L -> RGB copies the channel, and horse's only non-opaque pixels (12 of them) are white, so
    # compositing onto white changes nothing.  RGBA is also checked against the mirror.
    assert img.mode in ("RGB", "L", "RGBA")
    ours = _preprocess(size)(img)
    assert ours.shape == (3, size, size) and ours.dtype == torch.float32
    ours = ours.numpy()
    if img.mode == "RGBA":
        pixels = np.asarray(img)
        assert (pixels[pixels[..., 3] < 255][:, :3] == 255).all()
        assert _max_diff(ours, torchvision_mirror(img, size)) <= TOLERANCE

    diff = _max_diff(ours, hf_reference(img, size))
    assert diff <= TOLERANCE, f"{case} S={size}: max |ours - HF| = {diff}"

    # HF's own full pipeline, crop included, wherever its crop offsets agree with torchvision's.
    height, width = _tv_resized_size(*img.size, size)[::-1]
    full = _hf(img, size)
    if _tv_offsets(height, width, size) == _hf_offsets(height, width, size):
        diff = _max_diff(ours, full)
        assert diff <= TOLERANCE, f"{case} S={size}: max |ours - HF full| = {diff}"
    else:  # HF's floor offset is one pixel off: its output is ours shifted by one row/column
        assert _max_diff(ours, full) > 0.1


def test_cases_cover_both_crop_offset_rules():
    """The parametrised cases include crops where round-half-even and floor differ, and agree."""
    differ = agree = vertical = 0
    for param in _rgb_cases():
        case, size = param.values
        img = _image(case, size)
        height, width = _tv_resized_size(*img.size, size)[::-1]
        tv, hf = _tv_offsets(height, width, size), _hf_offsets(height, width, size)
        if tv == hf:
            agree += 1
        else:
            differ += 1
            vertical += tv[0] != hf[0]
        assert min(height, width) == size
    assert differ >= 5 and agree >= 20
    assert vertical >= 3  # portrait crops too, not only landscape


@pytest.mark.parametrize("size", SIZES)
def test_crop_offset_is_round_half_to_even(size):
    """An image S+3 wide is not resized; torchvision's crop starts at round(1.5) = 2, not 1."""
    img = synthetic("S-plus-3", size)
    assert img.size == (size + 3, size)
    ours = _preprocess(size)(img).numpy()
    pixels = np.asarray(img, dtype=np.float32)[:, 2:2 + size].transpose(2, 0, 1) / np.float32(255)
    mean = np.asarray(OPENAI_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(OPENAI_STD, dtype=np.float32)[:, None, None]
    assert _max_diff(ours, (pixels - mean) / std) <= TOLERANCE
    uncropped = _hf(img, size, crop=False)
    assert _max_diff(ours, uncropped[:, :, 2:2 + size]) <= TOLERANCE
    assert _max_diff(ours, uncropped[:, :, 1:1 + size]) > 0.1
    # An image S+5 wide starts at round(2.5) = 2 (half to even), the same as floor.
    wider = Image.fromarray(_texture(size + 5, size, seed=size), "RGB")
    assert _max_diff(_preprocess(size)(wider), _hf(wider, size)) <= TOLERANCE


@functools.cache
def _mode_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(7)
    rgb = _texture(317, 251, seed=11)
    alpha = rng.integers(0, 256, (251, 317), dtype=np.uint8)
    alpha[:, :40] = 0  # a fully transparent band
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    palette = Image.fromarray(rgb, "RGB").quantize(colors=64)
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 3
    return {
        "RGBA": rgba,
        "LA": rgba.convert("LA"),
        "P": palette,
        "P-transparency": transparent_palette,
        "1": Image.fromarray(rgb, "RGB").convert("1"),
        "CMYK": Image.fromarray(rgb, "RGB").convert("CMYK"),
        "I;16": Image.fromarray(rng.integers(0, 65536, (251, 317), dtype=np.uint16)),
        "I": Image.fromarray(rgb, "RGB").convert("I"),
    }


@pytest.mark.parametrize("mode", list(_mode_images()))
@pytest.mark.parametrize("size", (224, 288))
def test_other_modes_follow_torchvision_order(mode, size):
    """Resize in the image's own mode, then convert to RGB: where HF (convert first) differs."""
    img = _mode_images()[mode]
    ours = _preprocess(size)(img)
    assert ours.shape == (3, size, size) and ours.dtype == torch.float32
    diff = _max_diff(ours, torchvision_mirror(img, size))
    assert diff <= TOLERANCE, f"mode {mode}: max |ours - torchvision mirror| = {diff}"


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "P-transparency", "1", "CMYK"])
def test_other_modes_really_differ_from_huggingface(mode):
    """The exemption above is needed: on these modes HF's convert-first order gives other pixels."""
    img = _mode_images()[mode]
    assert _max_diff(_preprocess(224)(img), hf_reference(img, 224)) > 0.01


def test_alpha_is_dropped_not_composited():
    """torchvision drops alpha after resizing; HF composites onto white before resizing."""
    mean = np.asarray(OPENAI_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(OPENAI_STD, dtype=np.float32)[:, None, None]
    rgba = np.zeros((300, 300, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red, fully transparent
    img = Image.fromarray(rgba, "RGBA")
    ours = _preprocess(224)(img).numpy()
    # PIL resizes RGBA premultiplied, so fully transparent pixels come out black; then the
    # alpha channel is simply dropped.
    assert _max_diff(ours, np.broadcast_to(-mean / std, ours.shape)) <= TOLERANCE
    assert _max_diff(ours, torchvision_mirror(img, 224)) <= TOLERANCE
    white = _hf(img, 224)
    assert _max_diff(white, np.broadcast_to((1 - mean) / std, white.shape)) <= 1e-5
    # Already S x S: torchvision does not resize, so the transparent red survives as red.
    exact = Image.fromarray(rgba[:224, :224], "RGBA")
    expected = np.stack([np.full((224, 224), v / 255, np.float32) for v in (200, 0, 0)])
    assert _max_diff(_preprocess(224)(exact), (expected - mean) / std) <= TOLERANCE


@pytest.mark.parametrize("name", ["chelsea.png", "page.png", "rocket.jpg"])
def test_bilinear_and_custom_normalisation_match_huggingface(name):
    mean, std = (0.5, 0.25, 0.125), (0.2, 0.3, 0.4)
    img = photo(name)
    ours = Preprocess(288, mean, std, "bilinear")(img)
    ref = hf_reference(img, 288, mean=mean, std=std, resample="bilinear")
    assert _max_diff(ours, ref) <= TOLERANCE
    assert _max_diff(ours, hf_reference(img, 288)) > 0.1  # the settings are really used


# --------------------------------------------------------------------------- API contract


def test_from_config_uses_model_settings():
    config = clipforge.create_model("tiny-vit").config
    pre = Preprocess.from_config(config)
    assert pre.image_size == 32 == config.image_size
    assert tuple(pre.mean) == tuple(config.preprocess.mean) == OPENAI_MEAN
    assert tuple(pre.std) == tuple(config.preprocess.std) == OPENAI_STD
    assert pre.interpolation == config.preprocess.interpolation == "bicubic"
    img = photo("chelsea.png")
    out = pre(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert _max_diff(out, hf_reference(img, 32)) <= TOLERANCE

    custom = config.replace(preprocess=dataclasses.replace(
        config.preprocess, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear"))
    pre = Preprocess.from_config(custom)
    assert (pre.mean, pre.std, pre.interpolation) == ((0.5,) * 3, (0.25,) * 3, "bilinear")
    ref = hf_reference(img, 32, mean=(0.5,) * 3, std=(0.25,) * 3, resample="bilinear")
    assert _max_diff(pre(img), ref) <= TOLERANCE


@pytest.mark.parametrize("name", PHOTOS)
def test_load_equals_calling_on_opened_image(name):
    path = _photo_path(name)
    pre = _preprocess(224)
    with resources.as_file(path) as file:
        loaded = pre.load(file)
        direct = pre(Image.open(file))
        assert load_image(file).size == Image.open(file).size
    assert loaded.shape == (3, 224, 224) and loaded.dtype == torch.float32
    assert torch.equal(loaded, direct)


@pytest.fixture
def strict_pil(monkeypatch):
    # Truncated files must fail, whatever another test may have set globally.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


def test_truncated_jpeg_raises_with_path(tmp_path, strict_pil):
    data = _photo_path("rocket.jpg").read_bytes()
    path = tmp_path / "half rocket.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(ImageLoadError) as info:
        _preprocess(224).load(path)
    assert str(path) in str(info.value)


def test_text_file_raises_with_path(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n", encoding="utf-8")
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert str(path) in str(info.value)
    missing = tmp_path / "missing.jpg"
    with pytest.raises(ImageLoadError) as info:
        _preprocess(224).load(str(missing))
    assert str(missing) in str(info.value)


# --------------------------------------------------------------------------- bounds


@pytest.fixture
def no_resize(monkeypatch):
    """Any resample fails the test: a refused image must be refused from its size alone."""
    def resize(self, *args, **kwargs):
        raise AssertionError(f"resized a {self.size} image")

    monkeypatch.setattr(Image.Image, "resize", resize)


@pytest.mark.parametrize("size", [(1, 400_000), (100_000, 1)])
def test_extreme_aspect_ratio_is_refused_before_any_resize(size, no_resize, monkeypatch):
    # Resized to 224 on the short side, 1x400000 would be 224 x 89.6 million pixels (20 GB).
    monkeypatch.delenv("CLIPFORGE_MAX_ASPECT_RATIO", raising=False)
    img = Image.new("L", size)
    pre = _preprocess(224)
    for transform in (pre, pre.to_numpy):
        with pytest.raises(ImageLoadError) as info:
            transform(img)
        message = str(info.value)
        assert f"{size[0]}x{size[1]}" in message and "100:1" in message
        assert "CLIPFORGE_MAX_ASPECT_RATIO" in message and "\n" not in message


def test_load_names_the_file_of_an_extreme_image(tmp_path, no_resize):
    path = tmp_path / "strip.png"
    Image.new("L", (1, 400_000)).save(path)
    assert path.stat().st_size < 10_000  # a few hundred bytes of PNG
    with pytest.raises(ImageLoadError, match=rf"cannot read image {path}: image is 1x400000"):
        _preprocess(224).load(path)


def test_aspect_ratio_bound_is_inclusive_and_configurable(monkeypatch):
    monkeypatch.delenv("CLIPFORGE_MAX_ASPECT_RATIO", raising=False)
    pre = _preprocess(32)
    assert pre(Image.new("RGB", (3200, 32))).shape == (3, 32, 32)  # exactly 100:1
    wide = Image.new("RGB", (3300, 32))
    with pytest.raises(ImageLoadError, match="3300x32"):
        pre(wide)
    monkeypatch.setenv("CLIPFORGE_MAX_ASPECT_RATIO", "200")
    assert pre(wide).shape == (3, 32, 32) and pre.to_numpy(wide).shape == (3, 32, 32)
    monkeypatch.setattr("clipforge.image.transform.MAX_ASPECT_RATIO", 500.0)
    monkeypatch.delenv("CLIPFORGE_MAX_ASPECT_RATIO")
    assert pre(Image.new("RGB", (12800, 32))).shape == (3, 32, 32)
    monkeypatch.setenv("CLIPFORGE_MAX_ASPECT_RATIO", "wide")
    with pytest.raises(ValueError, match="CLIPFORGE_MAX_ASPECT_RATIO='wide'"):
        pre(wide)


def test_fifo_is_not_a_regular_file(tmp_path):
    """A named pipe called x.jpg: opening it to read would wait for a writer for ever.  Run in
    a child process with a timeout, so that a regression fails instead of hanging."""
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    code = ("import sys; from clipforge.image import ImageLoadError, Preprocess, load_image\n"
            "for f in (load_image, Preprocess(32, (0.5,) * 3, (0.5,) * 3).load):\n"
            "    try:\n        f(sys.argv[1])\n    except ImageLoadError as exc:\n"
            "        print(exc)\n")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True,
                              text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("reading a FIFO blocked")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        assert str(fifo) in line and "not a regular file" in line and "FIFO" in line

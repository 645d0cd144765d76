"""Every weight format in and out: lossless round trips, safe reading, clear errors."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import clipforge
import families
from clipforge.configs import ARCHITECTURES, HAND_WRITTEN
from clipforge.weights import CheckpointError, UnsafeCheckpointError, WeightsUnavailableError
from clipforge.weights.infer import infer_config
from conftest import perturb


def assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), f"{key} differs"


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_rn"])
@pytest.mark.parametrize("dest", ["model_dir", "model.safetensors"])
def test_clipforge_format_round_trip(fixture, dest, request, tmp_path) -> None:
    model = request.getfixturevalue(fixture)
    clipforge.save_model(model, tmp_path / dest)
    loaded = clipforge.create_model(tmp_path / dest)
    assert loaded.config == model.config
    assert_same_tensors(model, loaded)


def test_clipforge_format_records_activation_and_preprocessing(tiny_vit, tmp_path) -> None:
    config = tiny_vit.config.replace(
        activation="gelu",
        preprocess=clipforge.PreprocessConfig(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
    )
    model = clipforge.CLIP(config)
    clipforge.save_model(model, tmp_path / "m")
    document = json.loads((tmp_path / "m" / "config.json").read_text())
    assert document["format"] == "clipforge" and document["model"]["activation"] == "gelu"
    loaded = clipforge.create_model(tmp_path / "m")
    assert loaded.config.activation == "gelu"
    assert loaded.preprocess.mean == (0.5, 0.5, 0.5)
    assert clipforge.create_model(tmp_path / "m", activation="quick_gelu").config.activation \
        == "quick_gelu"


def test_hf_format_round_trip(tiny_vit, tmp_path) -> None:
    clipforge.save_model(tiny_vit, tmp_path / "hf", format="hf")
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "vocab.json",
            "merges.txt", "tokenizer_config.json"} <= files
    loaded = clipforge.create_model(tmp_path / "hf")
    assert loaded.config == tiny_vit.config
    assert_same_tensors(tiny_vit, loaded)


def test_hf_directory_loads_in_transformers_processor(tiny_vit, tmp_path, photos) -> None:
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    clipforge.save_model(tiny_vit, tmp_path / "hf", format="hf")
    processor = transformers.CLIPProcessor.from_pretrained(tmp_path / "hf")
    ids = processor.tokenizer(["Hello World!"])["input_ids"][0]
    assert ids == [49406, 3306, 1002, 256, 49407]
    image = Image.open(photos[0])
    pixels = processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert pixels.shape == (3, 32, 32)
    torch.testing.assert_close(pixels, tiny_vit.preprocess(image), atol=1e-5, rtol=0)


def test_resnet_cannot_be_written_as_hf(tiny_rn, tmp_path) -> None:
    with pytest.raises(ValueError, match="ResNet"):
        clipforge.save_model(tiny_rn, tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists()


def _openclip_variants(sd: dict[str, torch.Tensor], tmp_path: Path) -> list[Path]:
    """The shapes OpenCLIP checkpoints come in: bare .bin, training .pt, safetensors."""
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()},
                "optimizer": {"state": {}, "param_groups": []}}, tmp_path / "epoch_3.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "open_clip.safetensors")
    return [tmp_path / "open_clip_pytorch_model.bin", tmp_path / "epoch_3.pt",
            tmp_path / "open_clip.safetensors"]


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_rn"])
def test_openclip_checkpoints(fixture, request, tmp_path) -> None:
    model = request.getfixturevalue(fixture)
    for path in _openclip_variants(model.state_dict(), tmp_path):
        loaded = clipforge.create_model(path)
        assert loaded.config == model.config, path.name
        assert_same_tensors(model, loaded)


def test_openai_half_precision_state_dict(openai_model, tmp_path) -> None:
    """OpenAI's weights are (mostly) float16; they load as float32 unless a dtype is asked for."""
    torch.manual_seed(0)
    ref = perturb(openai_model.CLIP(48, 64, 3, 128, 16, 77, 49408, 128, 2, 2).eval(), seed=7)
    openai_model.convert_weights(ref)
    torch.save(ref.state_dict(), tmp_path / "ViT.pt")
    model = clipforge.create_model(tmp_path / "ViT.pt")
    assert model.dtype == torch.float32 and model.config.activation == "quick_gelu"
    half = clipforge.create_model(tmp_path / "ViT.pt", dtype=torch.float16)
    for key, value in ref.state_dict().items():
        assert torch.equal(half.state_dict()[key], value.half()), key


def test_torchscript_archive_loads_like_openai(openai_model, tmp_path) -> None:
    torch.manual_seed(0)
    ref = perturb(openai_model.CLIP(48, 64, (1, 2, 1, 1), 16, None, 77, 49408, 128, 2, 2).eval(),
                  seed=8)
    pixels = torch.randn(2, 3, 64, 64)
    tokens = clipforge.tokenize(["a diagram", "a dog"])
    traced = torch.jit.trace(ref, (pixels, tokens))
    traced.save(str(tmp_path / "RN.pt"))
    model = clipforge.create_model(tmp_path / "RN.pt")
    with torch.no_grad():
        torch.testing.assert_close(model(pixels, tokens)[0], ref(pixels, tokens)[0],
                                   atol=1e-4, rtol=1e-5)


def test_pickle_with_code_payload_is_refused(tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="evil.pt"):
        clipforge.create_model(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt"])
def test_truncated_checkpoint_names_the_file(tiny_vit, name, tmp_path) -> None:
    path = tmp_path / name
    if name.endswith(".safetensors"):
        clipforge.save_model(tiny_vit, path)
    else:
        torch.save(tiny_vit.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{name}.*(truncated|corrupt)"):
        clipforge.create_model(path)


def test_wrong_architecture_names_keys(tiny_vit, tmp_path) -> None:
    torch.save(tiny_vit.state_dict(), tmp_path / "vit.pt")
    with pytest.raises(CheckpointError, match=r"vit\.pt.*missing keys \(\d+\): visual\.bn1\.weight"
                                              r".*unexpected keys.*visual\.class_embedding"):
        clipforge.create_model("tiny-rn", weights=tmp_path / "vit.pt")
    sd = dict(tiny_vit.state_dict())
    sd["ln_final.weight"] = torch.ones(3)
    sd["extra.weight"] = torch.ones(3)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): extra\.weight.*"
                                              r"shape mismatches \(1\): ln_final\.weight"):
        clipforge.create_model("tiny-vit", weights=tmp_path / "bad.pt")


def test_not_a_checkpoint(tmp_path) -> None:
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pt"):
        clipforge.create_model(tmp_path / "notes.pt")
    torch.save({"weight": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="other.pt.*not a CLIP state dict"):
        clipforge.create_model(tmp_path / "other.pt")


@pytest.mark.parametrize("name", HAND_WRITTEN)
def test_architecture_inferred_from_shapes(name) -> None:
    """Every built-in OpenAI-layout architecture (built on the meta device: no memory) is
    recovered from its state dict alone, head counts included.  The other families' state
    dicts cannot say how their towers attend or pool, so a bare one is refused (their files
    always carry a config)."""
    config = ARCHITECTURES[name]
    with torch.device("meta"):
        sd = clipforge.CLIP(config).state_dict()
    if config.family != "clip":
        with pytest.raises(CheckpointError, match="OpenAI/OpenCLIP layout"):
            infer_config(sd, activation=config.activation)
        return
    inferred = infer_config(sd, activation=config.activation)
    assert inferred == config


def test_bare_laion_shapes_warn_about_activation(caplog) -> None:
    with torch.device("meta"):
        sd = clipforge.CLIP(ARCHITECTURES["ViT-H-14"]).state_dict()
    with caplog.at_level(logging.WARNING):
        config = infer_config(sd, source="h14.bin")
    assert config.activation == "quick_gelu"
    assert "h14.bin" in caplog.text and "activation='gelu'" in caplog.text


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_weights_from_cache_offline(tiny_vit, hub_cache, tmp_path, monkeypatch) -> None:
    """The real download path, served from a cache as an online run would have left it."""
    clipforge.save_model(tiny_vit, tmp_path / "m.safetensors")
    families.fake_hub_cache(hub_cache, "org/tiny", {"model.safetensors":
                                            (tmp_path / "m.safetensors").read_bytes()})
    loaded = clipforge.create_model("hf-hub:org/tiny")
    assert_same_tensors(tiny_vit, loaded)
    # A known tag resolves to its repository and records the tag's activation.
    from clipforge.weights import pretrained

    monkeypatch.setitem(pretrained.PRETRAINED, "tiny-vit",
                        {"laion": pretrained.Pretrained("org/tiny-laion", "gelu")})
    torch.save(tiny_vit.state_dict(), tmp_path / "bare.bin")
    open_clip_config = {"model_cfg": {"embed_dim": 64, "vision_cfg": {"head_width": 16},
                                      "text_cfg": {"heads": 4}}, "preprocess_cfg": {}}
    families.fake_hub_cache(hub_cache, "org/tiny-laion", {
        "open_clip_pytorch_model.bin": (tmp_path / "bare.bin").read_bytes(),
        "open_clip_config.json": json.dumps(open_clip_config).encode()})
    tagged = clipforge.create_model("tiny-vit", weights="laion")
    assert tagged.config.activation == "gelu"
    assert tagged.config.replace(activation="quick_gelu") == tiny_vit.config


def test_offline_download_fails_at_once_with_instructions(hub_cache) -> None:
    with pytest.raises(WeightsUnavailableError, match="local file or directory") as err:
        clipforge.create_model("ViT-B-32", weights="openai")
    assert "timm/vit_base_patch32_clip_224.openai" in str(err.value)
    with pytest.raises(WeightsUnavailableError, match="known tags: openai"):
        clipforge.create_model("ViT-B-32", weights="openia")
    # OpenCLIP's names for the newer families resolve to their repositories too: the files
    # bring the architecture, so the name needs no row of its own
    for name, tag, repo in (("ViT-B-16-SigLIP", "webli", "timm/ViT-B-16-SigLIP"),
                            ("ViT-H-14-378-quickgelu", "dfn5b", "apple/DFN5B-CLIP-ViT-H-14-378"),
                            ("xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k",
                             "laion/CLIP-ViT-B-32-xlm-roberta-base-laion5B-s13B-b90k")):
        with pytest.raises(WeightsUnavailableError, match="local file or directory") as err:
            clipforge.create_model(name, weights=tag)
        assert repo in str(err.value)


def test_pretrained_table_names_repositories_and_published_figures() -> None:
    from clipforge.weights.pretrained import PRETRAINED

    assert PRETRAINED["ViT-B-32"]["openai"].imagenet == 63.3
    assert PRETRAINED["ViT-B-32"]["openai"].activation == "quick_gelu"
    assert PRETRAINED["ViT-H-14-378-quickgelu"]["dfn5b"].imagenet == 84.4
    assert PRETRAINED["ViT-gopt-16-SigLIP2-384"]["webli"].imagenet == 85.0
    assert PRETRAINED["ViT-B-16-SigLIP"]["webli"].activation is None  # its files say
    repos = [p.repo for tags in PRETRAINED.values() for p in tags.values()]
    assert all("/" in r and " " not in r for r in repos) and len(repos) > 100


def test_laion_style_repository_with_both_layouts(tiny_vit, tmp_path) -> None:
    """LAION's repositories hold OpenCLIP files and transformers files side by side; a download
    may bring the transformers config.json with only the OpenCLIP weights, or the reverse."""
    clipforge.save_model(tiny_vit, tmp_path / "hf", format="hf")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_bytes((tmp_path / "hf" / "config.json").read_bytes())
    save_file({k: v.contiguous() for k, v in tiny_vit.state_dict().items()},
              repo / "open_clip_model.safetensors")
    (repo / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"quick_gelu": True, "vision_cfg": {"head_width": 16},
                       "text_cfg": {"heads": 4}}}))
    from_open_clip = clipforge.create_model(repo)
    assert from_open_clip.config == tiny_vit.config
    assert_same_tensors(tiny_vit, from_open_clip)
    (repo / "open_clip_model.safetensors").unlink()
    (repo / "model.safetensors").write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes())
    assert_same_tensors(tiny_vit, clipforge.create_model(repo))


def test_save_replaces_a_model_but_never_a_foreign_folder(tiny_vit, tiny_rn, tmp_path) -> None:
    clipforge.save_model(tiny_vit, tmp_path / "m")
    clipforge.save_model(tiny_rn, tmp_path / "m")  # overwriting its own output is fine
    assert clipforge.create_model(tmp_path / "m").config == tiny_rn.config
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not written by clipforge"):
        clipforge.save_model(tiny_vit, tmp_path / "docs")
    assert (tmp_path / "docs" / "notes.txt").read_text() == "keep"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_named_architecture_with_a_file_keeps_the_files_activation(tmp_path) -> None:
    gelu = perturb(clipforge.CLIP(ARCHITECTURES["tiny-vit"].replace(activation="gelu")))
    clipforge.save_model(gelu, tmp_path / "gelu.safetensors")
    torch.save(gelu.state_dict(), tmp_path / "bare.pt")
    assert clipforge.create_model("tiny-vit", weights=tmp_path / "gelu.safetensors"
                                  ).config.activation == "gelu"
    assert clipforge.create_model("tiny-vit", weights=tmp_path / "bare.pt"
                                  ).config.activation == "quick_gelu"
    assert clipforge.create_model("tiny-vit", weights=tmp_path / "bare.pt", activation="gelu"
                                  ).config.activation == "gelu"

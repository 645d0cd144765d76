"""Hostile and broken checkpoints and configs: refused early, with one clear line.

A config that lies about the tensors (100,000 layers), a zip that expands to gigabytes, JSON of
the wrong shape or type, random bytes, a pickle asking for code, preprocessing that divides by
zero: each must give a ``CheckpointError`` (or ``ValueError``) naming the file and the field,
before anything large is built or read, and the command line must print it as one ``error:``
line.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import clipforge
from clipforge import factory
from clipforge.cli import main
from clipforge.configs import PreprocessConfig, TextConfig, VisionConfig
from clipforge.weights import CheckpointError, UnsafeCheckpointError
from clipforge.weights.torchscript import read_torchscript_state_dict

ZIP_EXPANSION_ENV = "CLIPFORGE_MAX_ZIP_EXPANSION"


def _never_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make building any model fail the test: the check must come before construction."""
    def refuse(config):
        raise AssertionError(f"a model was built from an unchecked config: {config}")
    monkeypatch.setattr(factory, "CLIP", refuse)


def _tensors(model: clipforge.CLIP) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _edit_json(path: Path, edit) -> None:
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


# 1. A config is checked against the tensors before any model is built.

def test_safetensors_metadata_claiming_many_layers(tiny_vit, tmp_path, monkeypatch) -> None:
    config = tiny_vit.config.to_dict()
    config["text"]["layers"] = 100_000
    path = tmp_path / "liar.safetensors"
    save_file(_tensors(tiny_vit), path, metadata={"clipforge_config": json.dumps(config)})
    _never_build(monkeypatch)
    with pytest.raises(CheckpointError, match=r"liar\.safetensors.*clipforge_config.*"
                                              r"text\.layers is 100000 but the tensors have 2"):
        clipforge.create_model(path)


def test_clipforge_config_json_claiming_many_layers(tiny_vit, tmp_path, monkeypatch) -> None:
    clipforge.save_model(tiny_vit, tmp_path / "m")
    # weights without the config in their metadata: config.json is what is read
    save_file(_tensors(tiny_vit), tmp_path / "m" / "model.safetensors")
    _edit_json(tmp_path / "m" / "config.json",
               lambda d: d["model"]["vision"].update(layers=100_000, width=4096, heads=64))
    _never_build(monkeypatch)
    with pytest.raises(CheckpointError, match=r"config\.json does not match its weights: "
                                              r"vision\.width is 4096 but the tensors have 64"
                                              r".*vision\.layers is 100000 but .* have 2"):
        clipforge.create_model(tmp_path / "m")


def test_hf_config_claiming_many_layers(tiny_vit, tmp_path, monkeypatch) -> None:
    clipforge.save_model(tiny_vit, tmp_path / "hf", format="hf")
    _edit_json(tmp_path / "hf" / "config.json",
               lambda d: d["text_config"].update(num_hidden_layers=100_000))
    _never_build(monkeypatch)
    with pytest.raises(CheckpointError, match=r"hf/config\.json does not match its weights: "
                                              r"text_config\.num_hidden_layers is 100000 but "
                                              r"the tensors have 2"):
        clipforge.create_model(tmp_path / "hf")


def test_config_of_the_wrong_tower_kind(tiny_vit, tiny_rn, tmp_path, monkeypatch) -> None:
    config = tiny_rn.config.to_dict()
    path = tmp_path / "mixed.safetensors"
    save_file(_tensors(tiny_vit), path, metadata={"clipforge_config": json.dumps(config)})
    _never_build(monkeypatch)
    with pytest.raises(CheckpointError, match="mixed.safetensors.*describes a ResNet image "
                                              "tower, but the tensors hold a ViT"):
        clipforge.create_model(path)


def test_fake_blocks_do_not_count_as_depth(tiny_vit, tmp_path, monkeypatch) -> None:
    """A bare state dict's depth is counted from its keys: 20,000 one-number "blocks" in a
    small file must not make a 20,000-layer model."""
    sd = _tensors(tiny_vit)
    fake = {f"transformer.resblocks.{i}.ln_1.weight": torch.zeros(1) for i in range(2, 20_002)}
    save_file({**sd, **fake}, tmp_path / "padded.safetensors")
    _never_build(monkeypatch)
    with pytest.raises(CheckpointError, match=r"padded\.safetensors: block "
                                              r"transformer\.resblocks\.2 does not hold the "
                                              r"tensors and shapes of transformer\.resblocks\.0"):
        clipforge.create_model(tmp_path / "padded.safetensors")
    sd["visual.transformer.resblocks.7.ln_1.weight"] = torch.zeros(64)
    save_file(sd, tmp_path / "gap.safetensors")
    with pytest.raises(CheckpointError, match=r"gap\.safetensors: its blocks "
                                              r"visual\.transformer\.resblocks\.N are numbered"):
        clipforge.create_model(tmp_path / "gap.safetensors")


def test_checked_configs_still_load(tiny_vit, tiny_rn, tmp_path) -> None:
    """The check is exact: every format's own config passes it."""
    for model in (tiny_vit, tiny_rn):
        clipforge.save_model(model, tmp_path / "m.safetensors")
        assert clipforge.create_model(tmp_path / "m.safetensors").config == model.config
    clipforge.save_model(tiny_vit, tmp_path / "hf", format="hf")
    assert clipforge.create_model(tmp_path / "hf").config == tiny_vit.config


# 2. Zip checkpoints may not expand far beyond their size.

def _deflated_copy(source: Path, target: Path) -> None:
    """``source`` re-zipped with every entry deflated: what a zip bomb looks like (torch
    itself stores entries uncompressed)."""
    with zipfile.ZipFile(source) as src, \
            zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))


class _Zeros(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(8 << 20))  # 32 MiB of float32 zeros

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight[0]


@pytest.fixture(scope="module")
def zip_bombs(tmp_path_factory) -> dict[str, Path]:
    """A TorchScript archive and a torch.save file of 32 MiB, deflated to a few kilobytes."""
    root = tmp_path_factory.mktemp("bombs")
    module = _Zeros()
    torch.jit.save(torch.jit.trace(module, torch.zeros(1)), str(root / "plain_script.pt"))
    torch.save(module.state_dict(), root / "plain_state.pt")
    for name in ("script", "state"):
        _deflated_copy(root / f"plain_{name}.pt", root / f"{name}.pt")
        assert (root / f"{name}.pt").stat().st_size < (1 << 20)
    return {"script": root / "script.pt", "state": root / "state.pt"}


@pytest.mark.parametrize("kind", ["script", "state"])
def test_zip_bomb_is_refused_before_reading(zip_bombs, kind, monkeypatch) -> None:
    monkeypatch.delenv(ZIP_EXPANSION_ENV, raising=False)
    path = zip_bombs[kind]
    with pytest.raises(CheckpointError, match=rf"{path.name}: zip entry .* expands from \d+ to "
                                              rf"33554432 bytes; .*{ZIP_EXPANSION_ENV}"):
        clipforge.weights.checkpoint.read_checkpoint(path)
    if kind == "script":
        with pytest.raises(ValueError, match="expands from"):
            read_torchscript_state_dict(path)


def test_zip_expansion_bound_is_configurable(zip_bombs, monkeypatch) -> None:
    monkeypatch.setenv(ZIP_EXPANSION_ENV, "100000")
    sd, _ = clipforge.weights.checkpoint.read_checkpoint(zip_bombs["script"])
    assert sd["weight"].shape == (8 << 20,) and not sd["weight"].any()
    monkeypatch.setenv(ZIP_EXPANSION_ENV, "lots")
    with pytest.raises(ValueError, match=f"{ZIP_EXPANSION_ENV}='lots'"):
        clipforge.weights.checkpoint.read_checkpoint(zip_bombs["script"])


def test_many_small_entries_cannot_add_up(tmp_path, monkeypatch) -> None:
    """Each entry within the per-entry allowance, all of them together far beyond the file."""
    monkeypatch.delenv(ZIP_EXPANSION_ENV, raising=False)
    path = tmp_path / "many.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(40):
            archive.writestr(f"archive/data/{i}", bytes(1 << 19))
    with pytest.raises(CheckpointError, match=r"many\.pt: its zip entries expand to 20971520 "
                                              r"bytes from a \d+-byte file"):
        clipforge.create_model(path)


# 3. Clear errors for broken files.

@pytest.mark.parametrize("text, found", [("[1, 2]", "JSON array"), ('"model"', "JSON string"),
                                         ("{not json", "not valid JSON"),
                                         ("\udcff", "not valid JSON")])
def test_config_json_that_is_not_an_object(tiny_vit, tmp_path, text, found) -> None:
    clipforge.save_model(tiny_vit, tmp_path / "m", format="hf")
    (tmp_path / "m" / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(CheckpointError, match=rf"m/config\.json .*{found}"):
        clipforge.create_model(tmp_path / "m")


@pytest.mark.parametrize("tower, key, value, message", [
    ("vision_config", "hidden_size", "64", r'vision_config\.hidden_size must be a positive '
                                           r'integer, got "64"'),
    ("text_config", "num_hidden_layers", 2.0, r"text_config\.num_hidden_layers must be a "
                                              r"positive integer, got 2\.0"),
    ("text_config", "num_attention_heads", True, r"text_config\.num_attention_heads must be"),
    ("vision_config", "hidden_act", "relu", r"vision_config\.hidden_act 'relu' is not "
                                            r"implemented"),
    ("vision_config", "num_attention_heads", 0, r"num_attention_heads must be a positive"),
    ("text_config", "num_attention_heads", 3, r"text_config\.hidden_size 64 is not divisible by "
                                              r"text_config\.num_attention_heads 3"),
])
def test_hf_config_field_types(tiny_vit, tmp_path, tower, key, value, message) -> None:
    clipforge.save_model(tiny_vit, tmp_path / "hf", format="hf")
    _edit_json(tmp_path / "hf" / "config.json", lambda d: d[tower].update({key: value}))
    with pytest.raises(CheckpointError, match=rf"hf/config\.json .*{message}"):
        clipforge.create_model(tmp_path / "hf")


@pytest.mark.parametrize("key, value, message", [
    ("image_std", [0.0, 0.0, 0.0], r"preprocess\.std must be positive"),
    ("image_std", [0.5, float("nan"), 0.5], r"preprocess\.std must be 3 finite numbers"),
    ("image_mean", "0.5", r"image_mean must be a list of 3 numbers"),
    ("image_mean", [0.5, 0.5], r"image_mean must be a list of 3 numbers"),
    ("resample", 0, r"resample 0 is not implemented"),
])
def test_hf_preprocessor_fields(tiny_vit, tmp_path, key, value, message) -> None:
    clipforge.save_model(tiny_vit, tmp_path / "hf", format="hf")
    _edit_json(tmp_path / "hf" / "preprocessor_config.json", lambda d: d.update({key: value}))
    with pytest.raises(CheckpointError, match=rf"preprocessor_config\.json: {message}"):
        clipforge.create_model(tmp_path / "hf")


@pytest.mark.parametrize("section, key, value, message", [
    ("vision", "width", "64", r"vision\.width must be a positive integer, got '64'"),
    ("text", "layers", -2, r"text\.layers must be a positive integer, got -2"),
    ("preprocess", "std", [0, 0.5, 0.5], r"preprocess\.std must be positive"),
    ("preprocess", "mean", "abc", r"preprocess\.mean must be 3 finite numbers"),
    ("preprocess", "interpolation", "nearest", r"preprocess\.interpolation must be one of"),
    ("vision", "pool_type", "avg", r"unknown config field vision\.pool_type"),
])
def test_clipforge_config_fields(tiny_vit, tmp_path, section, key, value, message) -> None:
    config = tiny_vit.config.to_dict()
    config[section][key] = value
    path = tmp_path / "bad.safetensors"
    save_file(_tensors(tiny_vit), path, metadata={"clipforge_config": json.dumps(config)})
    with pytest.raises(CheckpointError, match=rf"bad\.safetensors .*: {message}"):
        clipforge.create_model(path)


def test_clipforge_config_of_a_newer_format(tiny_vit, tmp_path) -> None:
    clipforge.save_model(tiny_vit, tmp_path / "m")
    save_file(_tensors(tiny_vit), tmp_path / "m" / "model.safetensors")
    _edit_json(tmp_path / "m" / "config.json", lambda d: d.update(format_version=2))
    with pytest.raises(CheckpointError, match=r"config\.json has format_version 2.*upgrade"):
        clipforge.create_model(tmp_path / "m")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["model_cfg"]["vision_cfg"].update(head_width="16"),
     r'model_cfg\.vision_cfg\.head_width must be a positive integer, got "16"'),
    (lambda d: d["model_cfg"]["vision_cfg"].update(head_width=0),
     r"model_cfg\.vision_cfg\.head_width must be a positive integer, got 0"),
    (lambda d: d["model_cfg"]["text_cfg"].update(heads=3),
     r"text\.width 64 is not divisible by text\.heads 3"),
    (lambda d: d["model_cfg"].update(quick_gelu="yes"), r"model_cfg\.quick_gelu must be true"),
    (lambda d: d.update(preprocess_cfg={"std": [0, 1, 1]}), r"preprocess\.std must be positive"),
    (lambda d: d.update(model_cfg=[]), r"model_cfg must be a JSON object"),
])
def test_open_clip_config_fields(tiny_vit, tmp_path, edit, message) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    save_file(_tensors(tiny_vit), repo / "open_clip_model.safetensors")
    document = {"model_cfg": {"vision_cfg": {"head_width": 16}, "text_cfg": {"heads": 4}}}
    edit(document)
    (repo / "open_clip_config.json").write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match=rf"open_clip_config\.json: {message}"):
        clipforge.create_model(repo)


def test_preprocess_config_is_validated() -> None:
    with pytest.raises(ValueError, match="preprocess.std must be positive"):
        PreprocessConfig(std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="preprocess.mean must be 3 finite numbers"):
        PreprocessConfig(mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="vision.heads must be a positive integer"):
        VisionConfig(32, 64, 2, 0, 8)
    with pytest.raises(ValueError, match="text.width 64 is not divisible by text.heads 3"):
        TextConfig(64, 2, 3)
    assert PreprocessConfig(mean=[0, 0, 1]).mean == (0.0, 0.0, 1.0)


def test_random_bytes_are_a_corrupt_file_not_unsafe_code(tmp_path) -> None:
    path = tmp_path / "random.pt"
    path.write_bytes(bytes(range(61, 256)) * 20)  # starts with '=': not a pickle opcode
    with pytest.raises(CheckpointError, match=r"random\.pt: not a PyTorch checkpoint, or "
                                              r"truncated or corrupt") as err:
        clipforge.create_model(path)
    assert not isinstance(err.value, UnsafeCheckpointError)
    assert "weights_only" not in str(err.value) and "unsafe" not in str(err.value)


def test_unsafe_pickle_message_never_suggests_weights_only_false(tmp_path) -> None:
    class Payload:
        def __reduce__(self):
            return os.system, ("true",)

    torch.save({"x": torch.zeros(1), "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt: its pickle asks for the "
                                                    r"global '(posix|os)\.system'") as err:
        clipforge.create_model(tmp_path / "evil.pt")
    assert "weights_only" not in str(err.value) and "safe_globals" not in str(err.value)


def test_state_dict_with_non_string_keys(tmp_path) -> None:
    torch.save({1: torch.zeros(1), 2: torch.ones(1)}, tmp_path / "ints.pt")
    with pytest.raises(CheckpointError, match=r"ints\.pt holds no tensors"):
        clipforge.create_model(tmp_path / "ints.pt")


def test_scalar_where_a_matrix_belongs(tiny_vit, tmp_path) -> None:
    sd = _tensors(tiny_vit)
    sd["text_projection"] = torch.tensor(1.0)
    save_file(sd, tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match=r"odd\.safetensors: its tensor shapes describe "
                                              r"no CLIP model"):
        clipforge.create_model(tmp_path / "odd.safetensors")


# The same through the command line: exit status 2, one "error:" line, no traceback.

def _classify(photos, model: Path, capsys) -> tuple[int, str]:
    status = main(["classify", str(photos[0]), "--labels", "a cat,a dog", "--model", str(model)])
    return status, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if not line.startswith(("INFO:", "WARNING:"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_cli_config_json_list(tiny_vit, photos, tmp_path, capsys) -> None:
    clipforge.save_model(tiny_vit, tmp_path / "bad", format="hf")
    (tmp_path / "bad" / "config.json").write_text("[]")
    status, err = _classify(photos, tmp_path / "bad", capsys)
    assert status == 2
    assert "bad/config.json must hold a JSON object" in _one_error_line(err)


def test_cli_zero_std_is_an_error_not_nan(tiny_vit, photos, tmp_path, capsys) -> None:
    clipforge.save_model(tiny_vit, tmp_path / "m", format="hf")
    _edit_json(tmp_path / "m" / "preprocessor_config.json", lambda d: d.update(image_std=[0] * 3))
    status, err = _classify(photos, tmp_path / "m", capsys)
    assert status == 2
    assert "preprocessor_config.json: preprocess.std must be positive" in _one_error_line(err)


def test_cli_random_bytes(photos, tmp_path, capsys) -> None:
    (tmp_path / "random.pt").write_bytes(bytes(range(61, 256)) * 20)
    status, err = _classify(photos, tmp_path / "random.pt", capsys)
    assert status == 2
    line = _one_error_line(err)
    assert "random.pt: not a PyTorch checkpoint" in line and "weights_only" not in line


def test_cli_hf_string_size(tiny_vit, photos, tmp_path, capsys) -> None:
    clipforge.save_model(tiny_vit, tmp_path / "hf", format="hf")
    _edit_json(tmp_path / "hf" / "config.json",
               lambda d: d["vision_config"].update(hidden_size="64"))
    status, err = _classify(photos, tmp_path / "hf", capsys)
    assert status == 2
    assert 'vision_config.hidden_size must be a positive integer, got "64"' in \
        _one_error_line(err)


def test_hf_weights_with_odd_keys_and_shapes(tiny_vit, tmp_path) -> None:
    clipforge.save_model(tiny_vit, tmp_path / "hf", format="hf")
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "hf" / "model.safetensors")
    for key, value in [("vision_model.encoder.layers.7", torch.zeros(1)),
                       ("visual_projection.weight", torch.zeros(2, 2, 2))]:
        save_file({**sd, key: value}, tmp_path / "hf" / "model.safetensors")
        with pytest.raises(CheckpointError, match=r"hf/model\.safetensors: "):
            clipforge.create_model(tmp_path / "hf")

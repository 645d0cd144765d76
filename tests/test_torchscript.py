"""The code-free TorchScript reader, checked against archives of openai/CLIP's own model.

The archives are built the way OpenAI built theirs (half weights, ``torch.jit.trace``, the int
attributes as buffers) and ``torch.jit.load`` serves as the reference; the reader itself must
never execute anything from the file.
"""

from __future__ import annotations

import builtins
import importlib.util
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

from clipforge.weights.torchscript import (
    UnsafeCheckpointError,
    is_torchscript_archive,
    read_torchscript_state_dict,
)

_CLIP_SPEC = importlib.util.find_spec("clip")
if _CLIP_SPEC is None or not _CLIP_SPEC.submodule_search_locations:
    pytest.skip("clip-anytorch is not installed", allow_module_level=True)

# (CLIP constructor args, image resolution); both use one head (width 64) to stay tiny.
_CONFIGS = {
    "vit": (64, 32, 2, 64, 8, 77, 49408, 64, 1, 1),
    "resnet": (64, 64, (1, 1, 1, 1), 8, None, 77, 49408, 64, 1, 1),
}
# Keys that prove buffers and nested modules come through, not only top-level parameters.
_SAMPLE_KEYS = {
    "vit": ["visual.class_embedding", "visual.transformer.resblocks.1.attn.in_proj_weight"],
    "resnet": [
        "visual.bn1.running_var",
        "visual.bn1.num_batches_tracked",
        "visual.attnpool.positional_embedding",
    ],
}


def _openai_model_module() -> ModuleType:
    """openai/CLIP's ``model.py``, loaded by path: ``import clip`` would need torchvision."""
    path = Path(_CLIP_SPEC.submodule_search_locations[0]) / "model.py"
    spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save_openai_style(config: tuple, path: Path) -> None:
    """Trace a half-precision CLIP and carry the int attributes as buffers, like OpenAI did."""
    openai_model = _openai_model_module()
    torch.manual_seed(0)
    model = openai_model.CLIP(*config).eval()
    openai_model.convert_weights(model)
    resolution, context_length, vocab_size = config[1], config[5], config[6]
    for name, value in [
        ("input_resolution", resolution),
        ("context_length", context_length),
        ("vocab_size", vocab_size),
    ]:
        if hasattr(model, name):
            delattr(model, name)
        model.register_buffer(name, torch.tensor(value))
    image = torch.randn(1, 3, resolution, resolution, dtype=torch.float16)
    text = torch.zeros(1, context_length, dtype=torch.long)
    with torch.no_grad():
        traced = torch.jit.trace(model, (image, text), check_trace=False)
    torch.jit.save(traced, str(path))


@pytest.fixture(scope="module", params=sorted(_CONFIGS))
def archive(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(request.param) / f"{request.param}.pt"
    _save_openai_style(_CONFIGS[request.param], path)
    return path


def _reference(path: Path) -> dict[str, torch.Tensor]:
    return torch.jit.load(str(path), map_location="cpu").state_dict()


def _assert_same(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert list(ours) == list(ref)
    for key, expected in ref.items():
        assert ours[key].dtype == expected.dtype, key
        assert ours[key].device.type == "cpu", key
        assert torch.equal(ours[key], expected), key


def _rewrite_data_pkl(src: Path, dst: Path, transform: Callable[[bytes], bytes]) -> None:
    """Copy archive ``src`` to ``dst`` with its ``data.pkl`` replaced by ``transform(data.pkl)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):
                data = transform(data)
            zout.writestr(info, data)


def test_matches_torch_jit_load(archive: Path) -> None:
    ours = read_torchscript_state_dict(archive)
    _assert_same(ours, _reference(archive))
    assert {"input_resolution", "context_length", "vocab_size"} <= ours.keys()
    assert ours["context_length"].item() == 77
    assert set(_SAMPLE_KEYS[archive.stem]) <= ours.keys()
    assert any(t.dtype == torch.float16 for t in ours.values())


def test_cuda_locations_are_mapped_to_cpu(archive: Path, tmp_path: Path) -> None:
    # OpenAI saved from a GPU: the storages' location strings read "cuda:0" instead of "cpu".
    cpu, cuda = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"
    moved = tmp_path / "cuda.pt"
    _rewrite_data_pkl(archive, moved, lambda data: data.replace(cpu, cuda))
    with zipfile.ZipFile(moved) as z:
        assert any(b"cuda:0" in z.read(n) for n in z.namelist() if n.endswith("/data.pkl"))
    _assert_same(read_torchscript_state_dict(moved), _reference(archive))


class _Payload:
    """Pickles as a call to ``func(arg)``: what a malicious checkpoint would smuggle in."""

    def __init__(self, func: Callable[[str], object], arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple:
        return self.func, (self.arg,)


@pytest.mark.parametrize("attack", ["os.system", "builtins.exec"])
def test_dangerous_global_is_refused(archive: Path, tmp_path: Path, attack: str) -> None:
    marker = tmp_path / "pwned"
    payload = {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "builtins.exec": _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
    }[attack]
    evil = tmp_path / "evil.pt"
    _rewrite_data_pkl(archive, evil, lambda _: pickle.dumps(payload, protocol=2))

    with pytest.raises(UnsafeCheckpointError, match=attack.split(".")[1]) as info:
        read_torchscript_state_dict(evil)
    assert "evil.pt" in str(info.value)
    assert "safetensors" in str(info.value)
    assert not marker.exists()


def test_truncated_archive_is_reported(archive: Path, tmp_path: Path) -> None:
    data = archive.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.pt.*truncated or corrupt"):
        read_torchscript_state_dict(cut)


def test_is_torchscript_archive(archive: Path, tmp_path: Path) -> None:
    plain = tmp_path / "state_dict.pt"
    torch.save({"weight": torch.ones(2)}, plain)
    text = tmp_path / "notes.txt"
    text.write_text("not a zip")
    assert is_torchscript_archive(archive)
    assert not is_torchscript_archive(plain)
    assert not is_torchscript_archive(text)


class _ScriptedWithInts(torch.nn.Module):
    """A scripted module keeps int and list attributes, which tracing would drop."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)
        self.input_resolution = 224
        self.sizes = [1, 2]
        self.scales = {"a": 1.0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.sizes[0] * self.scales["a"] + self.input_resolution


def test_int_attributes_become_tensors(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(_ScriptedWithInts()), str(path))
    ours = read_torchscript_state_dict(path)
    ref = _reference(path)
    assert list(ours) == ["input_resolution", *ref]
    assert ours["input_resolution"].dtype == torch.int64
    assert ours["input_resolution"].item() == 224
    for key, expected in ref.items():
        assert torch.equal(ours[key], expected), key

"""Shared fixtures: perturbed tiny models, OpenAI's reference code, sample photos."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image

import clipforge
from clipforge.search import SearchIndex, build_index


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run tests on large models")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="large model: opt in with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter and float buffer, so that zero-initialised biases, unit
    norms and fresh BatchNorm statistics cannot hide a wrong mapping."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32) * scale
            if name.endswith("running_var"):
                tensor.copy_((tensor + noise).abs() + 0.5)
            else:
                tensor.add_(noise.to(tensor.dtype))
    return model


def seeded_model(name: str, seed: int) -> clipforge.CLIP:
    """A perturbed tiny model that is the same on every run: a test whose assertion holds
    only for some random draws must fail every time, not one run in six."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return perturb(clipforge.create_model(name), seed=seed)


def saved_tiny_vit(directory: Path, seed: int) -> Path:
    """A perturbed tiny ViT saved as one weights file in ``directory``: what an index records
    by path and the command line loads again."""
    torch.manual_seed(0)
    path = directory / "tiny.safetensors"
    clipforge.save_model(perturb(clipforge.create_model("tiny-vit"), seed=seed), path)
    return path


@pytest.fixture
def tiny_vit() -> clipforge.CLIP:
    return seeded_model("tiny-vit", seed=1)


@pytest.fixture
def tiny_rn() -> clipforge.CLIP:
    return seeded_model("tiny-rn", seed=2)


def _load_by_path(package: str, module: str) -> ModuleType:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} not installed (make setup installs clip-anytorch --no-deps)")
    path = Path(spec.submodule_search_locations[0]) / f"{module}.py"
    mod_spec = importlib.util.spec_from_file_location(f"_reference_{package}_{module}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def openai_model() -> ModuleType:
    """openai/CLIP's own model.py (from the clip-anytorch wheel), loaded by file: its package
    __init__ needs torchvision, which cannot be installed beside the CPU torch."""
    return _load_by_path("clip", "model")


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from clipforge.samples import write_sample_photos

    return write_sample_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def photo_dir(photos: list[Path]) -> Path:
    """The folder holding exactly the sample photos (read only: copy before changing it)."""
    return photos[0].parent


@pytest.fixture
def generated_images() -> int:
    """How many generated images :func:`folder` adds; a module that needs more rows (an index
    too large for a memory budget) overrides this fixture."""
    return 20


@pytest.fixture
def folder(tmp_path: Path, photos: list[Path], generated_images: int) -> Path:
    """A writable folder of the sample photos and ``generated_images`` generated 48x48 images
    ``c00.png``, ``c01.png``..., their colours stepping from blue to red: neighbours are
    near-duplicates, for collapse.  (test_search and test_finetune define their own.)"""
    root = tmp_path / "photos"
    root.mkdir()
    for path in photos:
        shutil.copy(path, root / path.name)
    step = 240 // generated_images
    for i in range(generated_images):
        Image.new("RGB", (48, 48), (step * i, 100, 255 - step * i)).save(root / f"c{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def model() -> clipforge.CLIP:
    """The seeded tiny model of the search and server tests (a module may define its own)."""
    torch.manual_seed(0)
    return clipforge.create_model("tiny-vit")


@pytest.fixture(scope="module")
def index(photo_dir: Path, model: clipforge.CLIP,
          tmp_path_factory: pytest.TempPathFactory) -> SearchIndex:
    """An index of the sample photos built with ``model``, one per test module."""
    out = tmp_path_factory.mktemp("index") / "index"
    build_index(photo_dir, out, model)
    return SearchIndex.open(out, model)


@pytest.fixture(autouse=True)
def _photo_folder_stays_untouched(request: pytest.FixtureRequest):
    """Fail the test that writes into the shared photo folder, not a later one that indexes
    it whole and finds a stray file (the failure would then depend on test order)."""
    if not {"photos", "photo_dir"} & set(request.fixturenames):
        yield
        return
    photos = request.getfixturevalue("photos")
    if not isinstance(photos, list):  # a module's own `photos` fixture, in its own tmp_path
        yield
        return
    folder = photos[0].parent
    before = sorted(p.name for p in folder.iterdir())
    yield
    after = sorted(p.name for p in folder.iterdir())
    assert after == before, f"{request.node.nodeid} changed the shared photo folder {folder}: " \
        "write into tmp_path instead"


@pytest.fixture(autouse=True)
def _small_builtin_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A training run on the built-in data ends with its full evaluation (thousands of rendered
    images, dozens of probes: half a minute even for a tiny model); tests check that report's
    shape, not its figures, so they evaluate on a few images (subprocesses inherit this)."""
    monkeypatch.setenv("CLIPFORGE_EVAL_IMAGES", "48")
    monkeypatch.setenv("CLIPFORGE_PROBE_PER_CLASS", "2")

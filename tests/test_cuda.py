"""GPU code paths: CUDA equals CPU, half precision stays close, training runs in fp16 and bf16.

Skipped where no CUDA device is present (CI has none); run on a GPU machine with
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import clipforge
from conftest import perturb

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(autouse=True)
def exact_matmul():
    """TF32 would change float32 results at the 1e-3 level; these tests compare float32."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _inputs(model: clipforge.CLIP) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(4, 3, model.config.image_size, model.config.image_size, generator=gen)
    tokens = clipforge.tokenize(["a cat", "a dog on a beach", "a diagram", "x"],
                                context_length=model.context_length)
    return pixels, tokens


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_cuda_float32_equals_cpu(name: str) -> None:
    model = perturb(clipforge.create_model(name), seed=5)
    pixels, tokens = _inputs(model)
    with torch.inference_mode():
        cpu = model.encode_image(pixels), model.encode_text(tokens)
        model = model.cuda()
        gpu = model.encode_image(pixels.cuda()), model.encode_text(tokens.cuda())
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_half_precision_on_cuda_stays_close(name: str, dtype: torch.dtype) -> None:
    model = perturb(clipforge.create_model(name), seed=5).cuda()
    pixels, tokens = _inputs(model)
    with torch.inference_mode():
        full = model.encode_image(pixels.cuda()), model.encode_text(tokens.cuda())
        half = model.to(dtype)
        low = half.encode_image(pixels.cuda().to(dtype)), half.encode_text(tokens.cuda())
    for a, b in zip(full, low):
        assert b.dtype == dtype
        cosine = torch.nn.functional.cosine_similarity(a, b.float(), dim=-1)
        assert cosine.min().item() > 0.998, cosine


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_training_on_cuda(tmp_path: Path, precision: str) -> None:
    out = tmp_path / precision
    args = ["--model", "tiny-vit", "--batch-size", "32", "--steps", "12", "--warmup", "2",
            "--workers", "0", "--log-every", "1", "--no-progress", "--device", "cuda",
            "--precision", precision, "--checkpoint-every", "6"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    run = subprocess.run([sys.executable, "-m", "clipforge", "train", *args, "--output",
                          str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert (out / "model.safetensors").is_file()
    # Resuming from the step-6 checkpoint replays the same losses (same device, same kernels).
    again = tmp_path / f"{precision}-resumed"
    (again / "checkpoints").mkdir(parents=True)
    ckpt = out / "checkpoints" / "step_00000006.pt"
    (again / "checkpoints" / ckpt.name).write_bytes(ckpt.read_bytes())
    run = subprocess.run([sys.executable, "-m", "clipforge", "train", *args, "--output",
                          str(again), "--resume", "latest"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (again / "metrics.jsonl").read_text().splitlines()]
    resumed = [r["loss"] for r in rows if "loss" in r]
    assert resumed[-6:] == pytest.approx(losses[-6:], rel=1e-3, abs=1e-4)


def test_search_index_built_on_cuda_matches_cpu(tmp_path: Path, photos) -> None:
    from clipforge.search import SearchIndex, build_index

    torch.manual_seed(0)
    model_path = tmp_path / "tiny.safetensors"
    clipforge.save_model(perturb(clipforge.create_model("tiny-vit"), seed=4), model_path)
    gpu = clipforge.create_model(model_path, device="cuda")
    cpu = clipforge.create_model(model_path)
    build_index(photos[0].parent, tmp_path / "gpu", gpu, progress=False)
    build_index(photos[0].parent, tmp_path / "cpu", cpu, progress=False)
    a = SearchIndex.open(tmp_path / "gpu", gpu)
    b = SearchIndex.open(tmp_path / "cpu", cpu)
    query = Image.open(photos[0])
    hits_a, hits_b = a.search(image=query, k=8), b.search(image=query, k=8)
    assert [h.path for h in hits_a] == [h.path for h in hits_b]
    assert [h.score for h in hits_a] == pytest.approx([h.score for h in hits_b], abs=2e-3)

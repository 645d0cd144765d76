"""ONNX export and the onnxruntime backend for every model family (issue 11).

The exported graphs are the model's own ``encode_image`` and ``encode_text``, traced, so each
family's tower is what the graph runs: SigLIP (MAP head, no class token, bidirectional text
without a mask, padded to its full length, pooled last, biased linear projection, logit bias,
sigmoid probabilities), BERT (Chinese-CLIP: post-norm, padding mask, token types, pooled
first), XLM-RoBERTa (mean pooling, position offset, MLP projection), PE-Core (rotary tables
computed per call, MAP head with its own heads, linear head) and EVA02 (rotary, SwiGLU,
sub-LN).  The tiny rows use OpenAI's tokenizer; a transformers SigLIP directory with a
SentencePiece vocabulary trained here shows a Hugging Face tokenizer travelling with the
export and read back without torch.

Each comparison is with the PyTorch model that was exported (perturbed weights), to float32
round-off (1e-5), on texts of mixed lengths in one batch (an empty one, one truncated to the
context), at several batch sizes and cut to several lengths; int8 variants to the cosine the
other int8 ONNX tests ask for.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import clipforge
import families
from clipforge.image import load_image
from clipforge.text.hf import VOCABULARY_FILES
from conftest import seeded_model

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from clipforge.onnx import OnnxCLIP, OnnxExportError, OnnxLoadError, export_onnx, load_onnx  # noqa: E402
from clipforge.onnx.manifest import MANIFEST, sample_ids  # noqa: E402

TOL = 1e-5
INT8_MIN_COSINE = 0.99  # as test_onnx.py's int8 variant
FAMILIES = {"tiny-siglip": 11, "tiny-bert": 12, "tiny-xlmr": 13, "tiny-pe": 14, "tiny-eva02": 15}
TEXTS = ["a photo of a cat", "", "two dogs playing in the snow next to a red car at night",
         "x", families.LONG_TEXT]


@pytest.fixture(scope="module", params=list(FAMILIES))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(PyTorch model, its export with the int8 variant, fp32 runtime, int8 runtime)."""
    name = request.param
    model = seeded_model(name, FAMILIES[name])
    path = export_onnx(model, tmp_path_factory.mktemp(name) / "export", quantize="int8")
    return model, path, load_onnx(path), load_onnx(path, variant="int8")


def _diff(a, b) -> float:
    return float((torch.as_tensor(np.asarray(a)) - torch.as_tensor(np.asarray(b))).abs().max())


def _batches(model: clipforge.CLIP) -> dict[str, torch.Tensor]:
    """Token batches: the tokenizer's output (mixed lengths, an empty and a truncated text) at
    batch sizes 1, 2 and 5, cut to shorter lengths, and random ids filling the context."""
    ids = model.tokenizer(TEXTS, truncate=True)
    context = model.context_length
    random = torch.from_numpy(sample_ids(model.config.text, (context, 3, context // 2), seed=1))
    return {"one text": ids[:1], "empty text alone": ids[1:2], "two texts": ids[:2],
            "five texts with a truncated one": ids, "cut to 6": ids[:, :6], "cut to 1": ids[:, :1],
            "cut to half": ids[:3, :context // 2], "random ids": random}


def test_text_encoder_matches_pytorch(exported) -> None:
    model, _, runtime, _ = exported
    assert torch.equal(runtime.tokenize(TEXTS, truncate=True),
                       model.tokenizer(TEXTS, truncate=True))
    for case, ids in _batches(model).items():
        with torch.inference_mode():
            expected = model.encode_text(ids)
        got = runtime.encode_text(ids)
        assert got.shape == expected.shape, case
        assert _diff(got, expected) <= TOL, case


@pytest.mark.parametrize("batch", [1, 4])
def test_image_encoder_matches_pytorch(exported, batch: int) -> None:
    model, _, runtime, _ = exported
    size = model.config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        expected = model.encode_image(pixels)
    assert _diff(runtime.encode_image(pixels), expected) <= TOL


def test_probabilities_are_the_models_own(exported, photos: list[Path]) -> None:
    """Logits with the bias, and sigmoid (SigLIP) or softmax probabilities, as PyTorch's."""
    model, _, runtime, _ = exported
    pixels = torch.stack([model.preprocess(load_image(p)) for p in photos[:3]])
    assert torch.equal(runtime.preprocess(load_image(photos[0])), pixels[0])
    ids = model.tokenizer(["a cat", "a dog", "a rocket", ""])
    with torch.inference_mode():
        logits = model.logits(model.encode_image(pixels, normalize=True),
                              model.encode_text(ids, normalize=True))
        expected = model.probabilities(logits)
    got_logits = runtime.logits(runtime.encode_image(pixels, normalize=True),
                                runtime.encode_text(ids, normalize=True))
    got = runtime.probabilities(got_logits)
    assert _diff(got_logits, logits) <= 1e-4  # logits are scaled by exp(logit_scale)
    assert _diff(got, expected) <= TOL
    if model.config.probability == "sigmoid":
        assert runtime.logit_bias is not None
        assert _diff(got, torch.sigmoid(got_logits)) <= 1e-6
        assert not torch.allclose(got.sum(-1), torch.ones(3))  # not a softmax
    else:
        assert runtime.logit_bias is None
        assert _diff(got.sum(-1), torch.ones(3)) <= 1e-6


def test_int8_variant_is_close(exported) -> None:
    model, path, fp32, int8 = exported
    ids = model.tokenizer(TEXTS, truncate=True)
    size = model.config.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    for a, b in ((int8.encode_text(ids, True), fp32.encode_text(ids, True)),
                 (int8.encode_image(pixels, True), fp32.encode_image(pixels, True))):
        assert float((a * b).sum(-1).min()) > INT8_MIN_COSINE
    manifest = json.loads((path / MANIFEST).read_text())
    assert min(manifest["variants"]["int8"]["verification"].values()) > INT8_MIN_COSINE


def test_manifest_describes_the_family(exported) -> None:
    model, path, runtime, _ = exported
    manifest = json.loads((path / MANIFEST).read_text())
    config = model.config
    assert runtime.config == config
    assert manifest["format_version"] == 1  # OpenAI's BPE: readable by every release
    assert manifest["probability"] == config.probability
    assert (manifest["logit_bias"] is None) == (not config.logit_bias)
    if config.logit_bias:
        assert manifest["logit_bias"] == pytest.approx(float(model.logit_bias.detach()))
        assert manifest["logits"].endswith("+ logit_bias")
    pre = manifest["preprocess"]
    assert pre["resize_mode"] == config.preprocess.resize_mode
    assert pre["resize"] == {"shortest": "shortest_side", "squash": "squash"}[pre["resize_mode"]]
    assert pre["crop"] == ("center" if pre["resize_mode"] == "shortest" else "none")
    assert pre["interpolation"] == config.preprocess.interpolation
    text = manifest["text_encoder"]["input"]
    assert text["padded_to_max_length_in_graph"] == (not (config.text.causal
                                                          or config.text.mask_padding))
    assert max(manifest["verification"].values()) <= TOL


# ----------------------------------------------------------------------------- descriptions


@pytest.mark.parametrize("mode", ["shortest", "longest", "squash"])
def test_preprocess_description_follows_the_resize_mode(mode: str) -> None:
    """The manifest says what clipforge.Preprocess does in each mode (it said shortest side and
    centre crop whatever the model's mode was); the padding it describes for ``longest`` is
    checked against the transform's output."""
    import dataclasses

    from PIL import Image

    from clipforge.onnx.export import _preprocess_description

    config = clipforge.configs.get_config("tiny-vit")
    config = config.replace(preprocess=dataclasses.replace(config.preprocess, resize_mode=mode,
                                                           fill_color=7))
    described = _preprocess_description(clipforge.CLIP(config))
    assert described["resize_mode"] == mode
    expected = {"shortest": ("shortest_side", "center"), "longest": ("longest_side", "none"),
                "squash": ("squash", "none")}[mode]
    assert (described["resize"], described["crop"]) == expected
    assert ("fill_color" in described) == ("pad" in described) == (mode == "longest")
    if mode == "longest":  # 64x40 -> 32x20, padded with 6 rows above and 6 below
        resized = clipforge.Preprocess.from_config(config).resized(
            Image.new("RGB", (64, 40), (200, 100, 50)))
        column = [resized.getpixel((16, y)) for y in range(32)]
        assert column == [(7, 7, 7)] * 6 + [(200, 100, 50)] * 20 + [(7, 7, 7)] * 6
        assert described["fill_color"] == 7


# ----------------------------------------------------------------------------- HF tokenizer

CONTEXT = 16
HF_TEXTS = ["a red circle", "Two BLUE stars!", "一个红色的圆形", "Кошка сидит на столе.",
            "🐱 cats & dogs 🐶", "", families.LONG_TEXT]


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (transformers initialises biases and norms to constants)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def _small(**extra) -> dict:
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, **extra)


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers SiglipModel directory (random weights) with a SentencePiece vocabulary
    trained on the multilingual corpus, as a hub repository ships it."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    root = tmp_path_factory.mktemp("siglip")
    tokenizer = transformers.SiglipTokenizer.from_pretrained(
        families.siglip_tokenizer(root / "tok", context_length=CONTEXT))
    config = transformers.SiglipConfig(
        text_config=_small(vocab_size=len(tokenizer), max_position_embeddings=CONTEXT),
        vision_config=_small(image_size=32, patch_size=8))
    torch.manual_seed(0)
    out = root / "hf"
    _perturbed(transformers.SiglipModel(config), seed=1).save_pretrained(out)
    tokenizer.save_pretrained(out)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def chinese_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers ChineseCLIPModel directory: a BERT text tower (post-norm, padding mask,
    [CLS] pooled) with a WordPiece vocabulary trained here."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.chinese_clip.image_processing_pil_chinese_clip import (
        ChineseCLIPImageProcessorPil,
    )

    root = tmp_path_factory.mktemp("chinese_clip")
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        families.bert_tokenizer(root / "tok"), model_max_length=CONTEXT)
    config = transformers.ChineseCLIPConfig(
        text_config=_small(vocab_size=len(tokenizer), max_position_embeddings=64),
        vision_config=_small(image_size=32, patch_size=8), projection_dim=48)
    torch.manual_seed(0)
    out = root / "hf"
    _perturbed(transformers.ChineseCLIPModel(config), seed=2).save_pretrained(out)
    tokenizer.save_pretrained(out)
    ChineseCLIPImageProcessorPil(size={"shortest_edge": 32},
                                 crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["siglip", "chinese_clip"])
def hf_export(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(PyTorch model read from a transformers directory, its export with the int8 variant,
    the tokenizer class the export must carry)."""
    directory = request.getfixturevalue(f"{request.param}_dir")
    model = clipforge.create_model(directory)
    path = export_onnx(model, tmp_path_factory.mktemp(f"{request.param}-onnx") / "export",
                       quantize="int8")
    return model, path


def test_hf_tokenizer_travels_with_the_export(hf_export) -> None:
    from clipforge.text import ContextLengthError
    from clipforge.text.hf import HFTokenizer

    model, path = hf_export
    assert isinstance(model.tokenizer, HFTokenizer)
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["format_version"] == 2  # older clipforge: "upgrade clipforge"
    described = manifest["tokenizer"]
    assert described["type"] == "huggingface"
    assert described["class"] == type(model.tokenizer.hf).__name__
    assert described["clean"] == model.config.tokenizer.clean
    assert described["context_length"] == CONTEXT == model.context_length
    assert described["pad_token_id"] == model.tokenizer.pad_id == model.config.text.pad_id
    names = {f["file"] for f in described["files"]}
    assert "tokenizer_config.json" in names and names & set(VOCABULARY_FILES)
    assert all((path / name).is_file() for name in names)
    assert manifest["probability"] == model.config.probability
    runtime = load_onnx(path)
    assert isinstance(runtime.tokenizer, HFTokenizer)
    ids = model.tokenizer(HF_TEXTS, truncate=True)
    assert torch.equal(runtime.tokenize(HF_TEXTS, truncate=True), ids)
    assert torch.equal(clipforge.get_tokenizer(str(path))(HF_TEXTS, truncate=True), ids)
    with pytest.raises(ContextLengthError, match="truncate"):
        runtime.tokenize(HF_TEXTS)
    for rows in ([0], [5], [0, 1], list(range(len(HF_TEXTS)))):
        for length in (CONTEXT, 4):  # cut ids: SigLIP's are padded to the context in the graph
            batch = ids[rows, :length]
            with torch.inference_mode():
                expected = model.encode_text(batch)
            assert _diff(runtime.encode_text(batch), expected) <= TOL, (rows, length)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert _diff(runtime.encode_image(pixels), model.encode_image(pixels)) <= TOL
    int8 = load_onnx(path, variant="int8")
    cos = (int8.encode_text(ids, True) * runtime.encode_text(ids, True)).sum(-1)
    assert float(cos.min()) > INT8_MIN_COSINE


def test_changed_tokenizer_file_is_named(hf_export, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(hf_export[1], tmp_path / "copy"))
    described = json.loads((copy / MANIFEST).read_text())["tokenizer"]
    name = next(f["file"] for f in described["files"] if f["file"] in VOCABULARY_FILES)
    data = bytearray((copy / name).read_bytes())
    data[100] ^= 0xFF
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(OnnxLoadError, match=f"{name} does not match the sha256"):
        load_onnx(copy)
    (copy / name).unlink()
    with pytest.raises(OnnxLoadError, match=f"{name} is missing"):
        load_onnx(copy)
    # the manifest names files of the export only: no path leads out of it
    shutil.copy(hf_export[1] / name, tmp_path / name)
    manifest = json.loads((copy / MANIFEST).read_text())
    next(f for f in manifest["tokenizer"]["files"] if f["file"] == name)["file"] = f"../{name}"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(OnnxLoadError, match="not a file name inside the export directory"):
        load_onnx(copy)


def test_command_line_on_an_hf_export(hf_export, photos, tmp_path, capsys) -> None:
    """classify (the model's own probabilities: sigmoids for SigLIP), embed and index/search
    run on the export directory of a model with its own tokenizer, as on its directory."""
    from clipforge.cli import main

    model, export = hf_export
    source = model.origin["model"]
    labels = "a red circle,一个红色的圆形,красный круг"
    args = ["classify", str(photos[0]), "--labels", labels, "--model"]
    assert main([*args, str(export), "--json"]) == 0
    onnx_result = json.loads(capsys.readouterr().out)["results"][0]["predictions"]
    assert main([*args, source, "--json"]) == 0
    torch_result = json.loads(capsys.readouterr().out)["results"][0]["predictions"]
    assert [p["label"] for p in onnx_result] == [p["label"] for p in torch_result]
    assert [p["probability"] for p in onnx_result] == pytest.approx(
        [p["probability"] for p in torch_result], abs=1e-5)
    total = sum(p["probability"] for p in onnx_result)
    assert (total == pytest.approx(1, abs=1e-5)) == (model.config.probability == "softmax")
    assert main([*args, str(export)]) == 0
    printed = capsys.readouterr().out
    for label in labels.split(","):
        assert f"%  {label}" in printed

    texts = tmp_path / "texts.txt"
    texts.write_text("a red circle\nкрасный круг\n🐱 cats & dogs 🐶\n", encoding="utf-8")
    vectors = []
    for name in (str(export), source):
        out = tmp_path / f"embed-{len(vectors)}"
        assert main(["embed", "--texts", str(texts), "--model", name, "--out", str(out)]) == 0
        vectors.append(np.load(out / "text_embeddings.npy"))
    assert "3 texts embedded" in capsys.readouterr().out
    assert vectors[0].shape == (3, model.config.embed_dim)
    assert _diff(vectors[0], vectors[1]) <= TOL

    index = tmp_path / "index"
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in photos[:3]:
        shutil.copy(photo, folder / photo.name)
    assert main(["index", "build", str(folder), "--out", str(index), "--model", str(export),
                 "--workers", "0", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["search", str(index), "два круга", "-k", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


NO_TORCH = textwrap.dedent("""
    import json, sys
    sys.modules["torch"] = None  # `import torch` now raises ImportError
    from clipforge.onnx.runtime import OnnxCLIP
    model = OnnxCLIP(sys.argv[1])
    ids = model.tokenize(json.loads(sys.argv[2]), truncate=True)
    out = {"ids": ids.tolist(), "text": model.encode_text(ids).tolist(),
           "tokenizer": type(model.tokenizer).__name__,
           "torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch"
                           and sys.modules[m] is not None)}
    print(json.dumps(out))
""")


def test_hf_export_runs_without_torch(hf_export) -> None:
    model, path = hf_export
    result = subprocess.run([sys.executable, "-c", NO_TORCH, str(path), json.dumps(HF_TEXTS)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "PyTorch was not found" not in result.stderr
    out = json.loads(result.stdout)
    assert out["torch"] == [] and out["tokenizer"] == "HFTokenizer"
    ids = model.tokenizer(HF_TEXTS, truncate=True)
    assert out["ids"] == ids.tolist()
    with torch.inference_mode():
        assert _diff(np.array(out["text"], np.float32), model.encode_text(ids)) <= TOL


def test_model_without_its_tokenizer_files_is_refused(tmp_path: Path) -> None:
    """A model that reads a Hugging Face tokenizer, built from its config alone, has no files
    for the export to carry: refused, nothing written."""
    config = clipforge.configs.get_config("tiny-siglip")
    config = config.replace(tokenizer=clipforge.configs.TokenizerConfig(kind="hf"))
    with pytest.raises(OnnxExportError, match="load it from its directory"):
        export_onnx(clipforge.CLIP(config), tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_runtime_is_an_encoder_for_every_family(exported) -> None:
    _, _, runtime, _ = exported
    assert isinstance(runtime, OnnxCLIP) and isinstance(runtime, clipforge.Encoder)


def test_export_logs_no_progress_chatter(tmp_path: Path, caplog) -> None:
    """`clipforge export onnx --int8` logs at INFO: the exporter's graph passes (onnx_ir) and
    the quantiser (a line per tensor, on the root logger) printed some 140 INFO lines for a
    tiny model.  A successful export has nothing to report below a warning."""
    import logging

    caplog.set_level(logging.INFO)
    model = seeded_model("tiny-vit", 3)
    export_onnx(model, tmp_path / "export", quantize="int8", verify=False)
    chatter = [f"{r.name}: {r.getMessage()[:60]}" for r in caplog.records
               if r.levelno < logging.WARNING and r.name.split(".")[0] in ("root", "onnx_ir")]
    assert chatter == []

"""ONNX export and the onnxruntime backend against the PyTorch model they come from.

Every comparison is with the model that was exported (perturbed tiny models, so that no
zero-initialised bias or fresh norm can hide a wrong mapping): the encoders at batch 1 and 3,
text at several lengths (one short text, mixed lengths in one batch, a text filling the whole
context, ids cut to any length), the preprocessing bit for bit, and clipforge's own embedding
loops with ``OnnxCLIP`` in place of ``CLIP``.  A subprocess in which ``import torch`` fails
shows that a deployment needs no torch.
"""

from __future__ import annotations

import copy
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
from clipforge.configs import CLIPConfig
from clipforge.image import load_image
from conftest import perturb

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from clipforge.fileio import DIRECTORY_MANIFEST  # noqa: E402
from clipforge.onnx import OnnxCLIP, OnnxLoadError, export_onnx, load_onnx  # noqa: E402
from clipforge.onnx.manifest import IMAGE_FILE, MANIFEST, TEXT_FILE  # noqa: E402

TOL = 1e-4
TEXTS = ["a photo of a cat", "a", "two dogs playing in the snow next to a red car at night"]
LONG = " ".join(["word"] * 200)  # truncated: fills all 77 positions, end token last


def _export(name: str, seed: int, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[clipforge.CLIP, Path]:
    model = perturb(clipforge.create_model(name), seed=seed)
    path = export_onnx(model, tmp_path_factory.mktemp(name) / "export")
    return model, path


@pytest.fixture(scope="module")
def vit_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[clipforge.CLIP, Path]:
    return _export("tiny-vit", 1, tmp_path_factory)


@pytest.fixture(scope="module")
def rn_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[clipforge.CLIP, Path]:
    return _export("tiny-rn", 2, tmp_path_factory)


@pytest.fixture(scope="module", params=["vit", "rn"])
def exported(request: pytest.FixtureRequest) -> tuple[clipforge.CLIP, Path, OnnxCLIP]:
    model, path = request.getfixturevalue(f"{request.param}_export")
    return model, path, load_onnx(path)


def _max_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor) -> float:
    return float((torch.as_tensor(a) - b.detach()).abs().max())


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("batch", [1, 3])
def test_image_encoder_matches_pytorch(exported, batch: int) -> None:
    model, _, runtime = exported
    size = model.config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
    with torch.inference_mode():
        expected = model.encode_image(pixels)
    got = runtime.encode_image(pixels)
    assert isinstance(got, torch.Tensor) and got.shape == expected.shape
    assert got.dtype == torch.float32
    assert _max_diff(got, expected) <= TOL


def _text_batches() -> dict[str, torch.Tensor]:
    ids = clipforge.tokenize(TEXTS + [LONG], truncate=True)
    assert ids[3, -1] == 49407 and ids[:3].argmax(-1).max() < 20
    return {
        "short, batch 1": ids[:1],
        "short, cut after its end token": ids[:1, :6],
        "mixed lengths, batch 3": ids[:3],
        "mixed lengths, cut to 20": ids[:3, :20],
        "full context, batch 1": ids[3:],
        "full context with short texts": ids[[3, 1, 0]],
    }


@pytest.mark.parametrize("case", list(_text_batches()))
def test_text_encoder_matches_pytorch(exported, case: str) -> None:
    model, _, runtime = exported
    ids = _text_batches()[case]
    with torch.inference_mode():
        expected = model.encode_text(ids)
    got = runtime.encode_text(ids)
    assert got.shape == expected.shape
    assert _max_diff(got, expected) <= TOL


def test_text_length_is_not_baked_in(vit_export) -> None:
    """The same texts padded to every length give the same embeddings: the graph's run length
    comes from the ids, not from the example the exporter traced."""
    model, path = vit_export
    runtime = load_onnx(path)
    ids = clipforge.tokenize(TEXTS)
    longest = int(ids.argmax(-1).max()) + 1
    with torch.inference_mode():
        expected = model.encode_text(ids)
    for length in (longest, longest + 1, 33, 76, 77):
        assert _max_diff(runtime.encode_text(ids[:, :length]), expected) <= TOL, length
    graph = onnx.load(str(path / TEXT_FILE), load_external_data=False).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, True]  # batch and length symbolic
    dims = onnx.load(str(path / IMAGE_FILE), load_external_data=False).graph.input[0]
    assert dims.type.tensor_type.shape.dim[0].dim_param != ""


def test_numpy_in_numpy_out_and_normalize(vit_export) -> None:
    model, path = vit_export
    runtime = load_onnx(path)
    ids = clipforge.tokenize(TEXTS)
    pixels = torch.randn(2, 3, 32, 32)
    text = runtime.encode_text(ids.numpy(), normalize=True)
    image = runtime.encode_image(pixels.numpy(), normalize=True)
    assert isinstance(text, np.ndarray) and isinstance(image, np.ndarray)
    with torch.inference_mode():
        assert _max_diff(text, model.encode_text(ids, normalize=True)) <= TOL
        assert _max_diff(image, model.encode_image(pixels, normalize=True)) <= TOL
        logits_image, logits_text = model(pixels, ids)
    got_image, got_text = runtime(pixels, ids)
    assert _max_diff(got_image, logits_image) <= 1e-3 and _max_diff(got_text, logits_text) <= 1e-3
    # lists of ids work as well; empty batches give empty results, like CLIP
    assert _max_diff(runtime.encode_text(ids[:1].tolist()), model.encode_text(ids[:1])) <= TOL
    assert runtime.encode_text(ids[:0]).shape == (0, 64)
    assert runtime.encode_image(np.zeros((0, 3, 32, 32), np.float32)).shape == (0, 64)


def test_prefix_encoding_matches_pytorch(vit_export) -> None:
    model, path = vit_export
    runtime = load_onnx(path)
    rows = clipforge.tokenize(["a photo of a cat.", "a photo of a big dog.", "a photo of a x."])
    shared = 5  # "<start> a photo of a"
    prefix, suffixes = rows[0, :shared], rows[:, shared:]
    with torch.inference_mode():
        expected = model.encode_text_with_prefix(prefix, suffixes)
    assert _max_diff(runtime.encode_text_with_prefix(prefix, suffixes), expected) <= TOL


def test_bad_inputs_are_refused_like_clip(vit_export) -> None:
    runtime = load_onnx(vit_export[1])
    with pytest.raises(ValueError, match="32, 32"):
        runtime.encode_image(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="exceeds the model's context 77"):
        runtime.encode_text(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        runtime.encode_text(torch.zeros(77, dtype=torch.long))


# ----------------------------------------------------------------------------- the manifest


def test_manifest_describes_the_deployment(exported) -> None:
    from clipforge.text.tokenizer import VOCAB_FILE
    from clipforge.weights.fingerprint import weights_fingerprint

    model, path, runtime = exported
    manifest = json.loads((path / MANIFEST).read_text())
    assert CLIPConfig.from_dict(manifest["config"]) == model.config == runtime.config
    assert manifest["embed_dim"] == model.config.embed_dim
    assert manifest["context_length"] == model.context_length == runtime.context_length == 77
    assert manifest["logit_scale"] == pytest.approx(float(model.logit_scale.detach()), abs=1e-7)
    assert manifest["fingerprint"] == weights_fingerprint(model) == runtime.fingerprint
    pre = manifest["preprocess"]
    assert pre["image_size"] == model.config.image_size
    assert (pre["resize"], pre["crop"], pre["interpolation"]) == ("shortest_side", "center",
                                                                  "bicubic")
    assert tuple(pre["mean"]) == model.config.preprocess.mean
    assert tuple(pre["std"]) == model.config.preprocess.std
    tok = manifest["tokenizer"]
    assert (tok["sot_token_id"], tok["eot_token_id"], tok["pad_token_id"]) == (49406, 49407, 0)
    assert tok["context_length"] == 77 and tok["lowercase"] is True
    assert "ftfy.fix_text" in tok["clean"]
    packaged = Path(clipforge.text.__file__).parent
    assert (path / VOCAB_FILE).read_bytes() == (packaged / VOCAB_FILE).read_bytes()
    assert (path / tok["vocab_license_file"]).read_text().strip()
    for key, file, name in (("image_encoder", IMAGE_FILE, "pixels"),
                            ("text_encoder", TEXT_FILE, "input_ids")):
        assert manifest[key]["file"] == file and manifest[key]["input"]["name"] == name
        onnx.checker.check_model(str(path / file), full_check=True)
    assert manifest["opset"] >= 18
    assert max(manifest["verification"].values()) <= TOL
    assert runtime.device == "cpu"
    assert runtime.origin == {"model": str(path), "weights": None, "backend": "onnx"}
    assert float(runtime.logit_scale) == pytest.approx(float(model.logit_scale.detach()))
    assert float(runtime.logit_scale.exp()) == pytest.approx(
        float(model.logit_scale.detach().exp()))


def test_preprocess_equals_clipforge_preprocess(vit_export, photos: list[Path]) -> None:
    model, path = vit_export
    runtime = load_onnx(path)
    as_numpy = load_onnx(path, array_type="numpy")
    reference = clipforge.Preprocess.from_config(model.config)
    for photo in photos:
        image = load_image(photo)
        expected = reference(image)
        assert torch.equal(runtime.preprocess(image), expected), photo.name
        got = as_numpy.preprocess(image)
        assert isinstance(got, np.ndarray) and np.array_equal(got, expected.numpy()), photo.name
    assert isinstance(as_numpy.tokenize(TEXTS), np.ndarray)
    assert torch.equal(runtime.tokenize(TEXTS), clipforge.tokenize(TEXTS))


# ----------------------------------------------------------------------------- drop-in use


def test_clipforge_embedding_loops_take_the_onnx_model(vit_export, photos: list[Path]) -> None:
    from clipforge.inference import embed_images, embed_texts

    model, path = vit_export
    runtime = load_onnx(path)
    texts = TEXTS + ["x " * 100]  # the last is too long and skipped by both
    a, b = embed_texts(model, texts, progress=False), embed_texts(runtime, texts, progress=False)
    assert a.ids == b.ids and a.failures == b.failures
    np.testing.assert_allclose(a.vectors, b.vectors, atol=TOL)
    a = embed_images(model, photos[:4], batch_size=3, progress=False)
    b = embed_images(runtime, photos[:4], batch_size=3, progress=False)
    assert a.ids == b.ids
    np.testing.assert_allclose(a.vectors, b.vectors, atol=TOL)


def test_search_index_takes_the_onnx_model(vit_export, photos: list[Path],
                                           tmp_path: Path) -> None:
    from clipforge.search import SearchIndex, build_index
    from clipforge.weights.fingerprint import weights_fingerprint

    model, path = vit_export
    runtime = load_onnx(path)
    try:
        same = weights_fingerprint(runtime) == weights_fingerprint(model)
    except (AttributeError, TypeError):
        pytest.skip("weights_fingerprint does not read OnnxCLIP.fingerprint yet")
    assert same
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in photos[:4]:
        shutil.copy(photo, folder / photo.name)
    build_index(folder, tmp_path / "index", runtime, batch_size=3, progress=False)
    by_torch = SearchIndex.open(tmp_path / "index", model)
    by_onnx = SearchIndex.open(tmp_path / "index", runtime)
    for query in ("a cat", "a rocket"):
        hits_torch = by_torch.search(text=query, k=4)
        hits_onnx = by_onnx.search(text=query, k=4)
        assert [h.id for h in hits_torch] == [h.id for h in hits_onnx]
        np.testing.assert_allclose([h.score for h in hits_torch],
                                   [h.score for h in hits_onnx], atol=TOL)


# ----------------------------------------------------------------------------- errors


def _copy(path: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(path, tmp_path / "copy"))


def test_truncated_graph_is_named(vit_export, tmp_path: Path) -> None:
    copy = _copy(vit_export[1], tmp_path)
    data = (copy / IMAGE_FILE).read_bytes()
    (copy / IMAGE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxLoadError, match="image_encoder.onnx is .* bytes.*truncated"):
        load_onnx(copy)


def test_corrupt_graph_is_named(vit_export, tmp_path: Path) -> None:
    copy = _copy(vit_export[1], tmp_path)
    size = (copy / TEXT_FILE).stat().st_size
    (copy / TEXT_FILE).write_bytes(b"\xff" * size)  # same size: only the checksum sees it
    with pytest.raises(OnnxLoadError, match="text_encoder.onnx does not match the sha256"):
        load_onnx(copy)
    with pytest.raises(OnnxLoadError, match="text_encoder.onnx: not a usable ONNX model") as info:
        load_onnx(copy, verify=False)  # then onnxruntime's parse fails, reported in one line
    assert info.value.__suppress_context__ and "\n" not in str(info.value)
    assert len(str(info.value)) < 600


def test_missing_manifest_or_graph(vit_export, tmp_path: Path) -> None:
    copy = _copy(vit_export[1], tmp_path)
    (copy / IMAGE_FILE).unlink()
    with pytest.raises(OnnxLoadError, match="image_encoder.onnx is missing"):
        load_onnx(copy)
    (copy / MANIFEST).unlink()
    with pytest.raises(OnnxLoadError, match="has no clipforge_onnx.json"):
        load_onnx(copy)
    with pytest.raises(OnnxLoadError, match="does not exist"):
        load_onnx(tmp_path / "nowhere")
    (copy / MANIFEST).write_text("{not json")
    with pytest.raises(OnnxLoadError, match="cannot read .*clipforge_onnx.json"):
        load_onnx(copy)
    with pytest.raises(OnnxLoadError, match="no int8 variant"):
        load_onnx(vit_export[1], variant="int8")


def test_export_refuses_a_foreign_directory_and_replaces_its_own(vit_export,
                                                                  tmp_path: Path) -> None:
    model = clipforge.create_model("tiny-vit")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not written by clipforge"):
        export_onnx(model, foreign, verify=False)
    assert (foreign / "notes.txt").read_text() == "keep me"
    model.precision = "bf16"  # as clipforge.precision marks its inference copies
    with pytest.raises(ValueError, match="converted to bf16 for inference"):
        export_onnx(model, tmp_path / "refused", verify=False)
    model.precision = "fp32"
    out = _copy(vit_export[1], tmp_path)
    model.train()  # exported in eval mode, the caller's mode restored
    assert export_onnx(model, out, verify=False) == out
    assert model.training
    assert load_onnx(out).fingerprint != load_onnx(vit_export[1]).fingerprint
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [IMAGE_FILE, TEXT_FILE, MANIFEST, "bpe_simple_vocab_16e6.txt.gz",
         "LICENSE-bpe_simple_vocab.txt", DIRECTORY_MANIFEST])


def test_bf16_model_opset_18_and_external_weights(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    """A bf16 model exports as float32 graphs (of the same values); graphs over the size
    threshold keep their weights in a ``.onnx.data`` side file, recorded and checked too."""
    from clipforge.onnx import export as export_module

    monkeypatch.setattr(export_module, "EXTERNAL_DATA_BYTES", 0)
    model = perturb(clipforge.create_model("tiny-rn"), seed=3)
    reference = copy.deepcopy(model)
    model = model.to(torch.bfloat16)
    reference.load_state_dict(model.state_dict())  # the bf16 values, in float32
    out = export_onnx(model, tmp_path / "export", opset=18)
    assert model.dtype == torch.bfloat16
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["opset"] == 18
    assert [f["file"] for f in manifest["image_encoder"]["files"]] == [IMAGE_FILE,
                                                                       IMAGE_FILE + ".data"]
    runtime = load_onnx(out)
    pixels, ids = torch.randn(2, 3, 64, 64), clipforge.tokenize(TEXTS)
    with torch.inference_mode():
        assert _max_diff(runtime.encode_image(pixels), reference.encode_image(pixels)) <= TOL
        assert _max_diff(runtime.encode_text(ids), reference.encode_text(ids)) <= TOL
    data = out / (TEXT_FILE + ".data")
    data.write_bytes(data.read_bytes()[:-4])
    with pytest.raises(OnnxLoadError, match="text_encoder.onnx.data is .* truncated"):
        load_onnx(out)


def test_int8_variant(vit_export, tmp_path: Path) -> None:
    from clipforge.onnx import quantize_export

    model, path = vit_export
    copy = quantize_export(_copy(path, tmp_path))
    fp32, int8 = load_onnx(copy), load_onnx(copy, variant="int8")
    # the fingerprint of the float32 weights, as every converted model carries
    assert int8.fingerprint == fp32.fingerprint and int8.origin["variant"] == "int8"
    ids = clipforge.tokenize(TEXTS)
    pixels = torch.randn(3, 3, 32, 32)
    for a, b in ((int8.encode_text(ids, True), fp32.encode_text(ids, True)),
                 (int8.encode_image(pixels, True), fp32.encode_image(pixels, True))):
        assert float((a * b).sum(-1).min()) > 0.99
    manifest = json.loads((copy / MANIFEST).read_text())
    assert min(manifest["variants"]["int8"]["verification"].values()) > 0.99
    # A new export replaces this one, int8 graphs included, even as an older clipforge left
    # it (no list of its files).
    (copy / DIRECTORY_MANIFEST).unlink()
    assert export_onnx(model, copy, verify=False) == copy
    assert not (copy / "image_encoder_int8.onnx").exists()


# ----------------------------------------------------------------------------- without torch

NO_TORCH = textwrap.dedent("""
    import json, sys
    sys.modules["torch"] = None  # `import torch` now raises ImportError
    from PIL import Image
    from clipforge.onnx.runtime import OnnxCLIP
    model = OnnxCLIP(sys.argv[1])
    pixels = model.preprocess(Image.open(sys.argv[2]))[None]
    ids = model.tokenize(json.loads(sys.argv[3]))
    out = {"image": model.encode_image(pixels).tolist(), "text": model.encode_text(ids).tolist(),
           "types": [type(x).__module__ for x in (pixels, ids, model.logit_scale)],
           "torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch"
                           and sys.modules[m] is not None)}
    print(json.dumps(out))
""")


def test_runtime_needs_no_torch(vit_export, photos: list[Path]) -> None:
    model, path = vit_export
    texts = ["a photo of a cat", "a rocket standing on a launchpad"]
    result = subprocess.run([sys.executable, "-c", NO_TORCH, str(path), str(photos[0]),
                             json.dumps(texts)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["torch"] == [] and out["types"] == ["numpy"] * 3
    with torch.inference_mode():
        image = model.encode_image(model.preprocess(load_image(photos[0]))[None])
        text = model.encode_text(clipforge.tokenize(texts))
    assert _max_diff(np.array(out["image"], np.float32), image) <= TOL
    assert _max_diff(np.array(out["text"], np.float32), text) <= TOL


# ----------------------------------------------------------------------------- large


@pytest.mark.slow
def test_vit_b_32_parity(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = clipforge.create_model("ViT-B-32")
    runtime = load_onnx(export_onnx(model, tmp_path / "export"))
    pixels = torch.randn(2, 3, 224, 224)
    ids = clipforge.tokenize(TEXTS + [LONG], truncate=True)
    with torch.inference_mode():
        image, text = model.encode_image(pixels), model.encode_text(ids)
    scale = float(image.abs().max())
    assert _max_diff(runtime.encode_image(pixels), image) <= TOL * max(1.0, scale)
    assert _max_diff(runtime.encode_text(ids), text) <= TOL * max(1.0, float(text.abs().max()))
    assert _max_diff(runtime.encode_text(ids[:2, :10]), model.encode_text(ids[:2, :10])) <= TOL


def test_command_line_export_and_onnx_backend(tmp_path, photos, capsys) -> None:
    """`clipforge export onnx`, then the same commands with the export: classify and embed
    auto-detect it, an index built from it reopens with it, and wrong options are refused."""
    from clipforge.cli import main

    torch.manual_seed(0)
    source = tmp_path / "tiny.safetensors"
    clipforge.save_model(perturb(clipforge.create_model("tiny-vit"), seed=7), source)
    out = tmp_path / "onnx"
    assert main(["export", "onnx", str(source), "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert main(["classify", str(photos[0]), "--labels", "cat,dog", "--model", str(out),
                 "--json"]) == 0
    onnx_result = json.loads(capsys.readouterr().out)["results"][0]["predictions"]
    assert main(["classify", str(photos[0]), "--labels", "cat,dog", "--model", str(source),
                 "--json"]) == 0
    torch_result = json.loads(capsys.readouterr().out)["results"][0]["predictions"]
    assert [p["label"] for p in onnx_result] == [p["label"] for p in torch_result]
    assert [p["probability"] for p in onnx_result] == pytest.approx(
        [p["probability"] for p in torch_result], abs=1e-4)

    index = tmp_path / "index"
    assert main(["index", "build", str(photos[0].parent), "--out", str(index), "--model",
                 str(out), "--workers", "0", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["search", str(index), "--image", str(photos[0]), "-k", "1"]) == 0
    assert capsys.readouterr().out.strip().endswith(photos[0].name)
    # The torch model with the same weights may query the index the export built.
    assert main(["search", str(index), "a cat", "--model", str(source), "-k", "1"]) == 0
    capsys.readouterr()

    assert main(["classify", str(photos[0]), "--labels", "a,b", "--model", str(source),
                 "--backend", "onnx"]) == 2
    assert "needs an export directory" in capsys.readouterr().err
    assert main(["classify", str(photos[0]), "--labels", "a,b", "--model", str(out),
                 "--precision", "bf16"]) == 2
    assert "runs as exported" in capsys.readouterr().err

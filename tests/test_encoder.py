"""One way in (issue 11, part 1): one loader, one encoder interface that the PyTorch and ONNX
models both have, the model's own tokenizer on every path, and zero-shot probabilities that
are the model's own (sigmoids for a SigLIP-style model) wherever they are shown."""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipforge
import families
from clipforge.cli import main
from clipforge.encoder import Encoder
from clipforge.evaluation.zeroshot import ZeroShotClassifier
from clipforge.inference import embed_pictures, embed_texts
from clipforge.search import SearchIndex, build_index
from clipforge.search.store import Store
from conftest import perturb

LABELS = ["cat", "dog", "rocket"]
MEMBERS = ("config", "context_length", "preprocess", "tokenizer", "device", "logit_scale",
           "logit_bias", "shares_prefixes", "encode_image", "encode_text", "logits",
           "probabilities")


@pytest.fixture(scope="module")
def sigmoid_file(tmp_path_factory) -> str:
    """A tiny SigLIP-style model (logit bias, sigmoid probabilities) with OpenAI's text layout,
    saved to a file."""
    config = clipforge.configs.get_config("tiny-vit").replace(logit_bias=True,
                                                              probability="sigmoid")
    torch.manual_seed(0)
    model = perturb(clipforge.CLIP(config), seed=5)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
        model.logit_bias.fill_(-1.5)
    path = tmp_path_factory.mktemp("sigmoid") / "tiny.safetensors"
    clipforge.save_model(model, path)
    return str(path)


@pytest.fixture(scope="module")
def sigmoid_model(sigmoid_file) -> clipforge.CLIP:
    return clipforge.create_model(sigmoid_file)


@pytest.fixture(scope="module")
def sigmoid_export(sigmoid_model, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from clipforge.onnx import export_onnx

    return export_onnx(sigmoid_model, tmp_path_factory.mktemp("onnx") / "export")


def _expected(model, image: Image.Image, labels: list[str], template: str = "a photo of a {}."):
    """sigmoid(exp(scale) * cos + bias) per label, computed here from the encoders."""
    with torch.no_grad():
        image_vector = model.encode_image(model.preprocess(image)[None], normalize=True)
        texts = model.encode_text(model.tokenizer([template.format(x) for x in labels]),
                                  normalize=True)
        logits = model.logit_scale.exp() * image_vector @ texts.T + model.logit_bias
    return logits.sigmoid()[0]


# ------------------------------------------------------------------------- the interface


def test_pytorch_and_onnx_models_are_encoders(sigmoid_model, sigmoid_export) -> None:
    onnx_model = clipforge.create_model(sigmoid_export)  # an export directory: onnx backend
    assert type(onnx_model).__name__ == "OnnxCLIP"
    for model in (sigmoid_model, onnx_model):
        assert isinstance(model, Encoder)
        assert isinstance(model, clipforge.Encoder)
        for name in MEMBERS:
            assert getattr(model, name) is not None or name == "logit_bias", name
    assert onnx_model.shares_prefixes is False and sigmoid_model.shares_prefixes is True
    assert float(onnx_model.logit_bias) == pytest.approx(float(sigmoid_model.logit_bias.detach()))
    image = torch.randn(2, sigmoid_model.config.embed_dim)
    text = torch.randn(3, sigmoid_model.config.embed_dim)
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    with torch.no_grad():
        ours = sigmoid_model.logits(image, text)
        torch.testing.assert_close(onnx_model.logits(image, text), ours, atol=1e-5, rtol=0)
        torch.testing.assert_close(onnx_model.probabilities(ours),
                                   sigmoid_model.probabilities(ours), atol=1e-6, rtol=0)
    numpy_logits = onnx_model.logits(image.numpy(), text.numpy())
    assert isinstance(numpy_logits, np.ndarray)


def test_onnx_softmax_model_has_no_bias(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from clipforge.onnx import export_onnx

    model = perturb(clipforge.create_model("tiny-vit"), seed=2)
    runtime = clipforge.create_model(export_onnx(model, tmp_path / "export", verify=False))
    assert runtime.logit_bias is None and model.logit_bias is None
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(runtime.probabilities(logits), logits.softmax(dim=-1))
    assert runtime.tokenizer.context_length == model.context_length


def test_export_reproduces_every_text_tower(tmp_path) -> None:
    """The graph is encode_text itself: a bidirectional tower pooled last (once refused) exports
    and gives the PyTorch model's embeddings (every family: test_onnx_families.py)."""
    pytest.importorskip("onnxruntime")
    from clipforge.onnx import export_onnx

    config = clipforge.configs.get_config("tiny-vit")
    config = config.replace(text=dataclasses.replace(config.text, causal=False, pool="last"))
    model = perturb(clipforge.CLIP(config), seed=4).eval()
    runtime = clipforge.create_model(export_onnx(model, tmp_path / "export"))
    ids = model.tokenizer(["a cat", "", "two dogs in the snow"])
    with torch.no_grad():
        torch.testing.assert_close(runtime.encode_text(ids), model.encode_text(ids),
                                   atol=1e-5, rtol=0)


# ------------------------------------------------------------------------- one loader


def test_create_model_backend_option(sigmoid_file, sigmoid_export) -> None:
    assert isinstance(clipforge.create_model(sigmoid_export, backend="onnx"),
                      type(clipforge.create_model(sigmoid_export)))
    int8 = clipforge.create_model(sigmoid_file, precision="int8")
    assert int8.precision == "int8"
    with pytest.raises(ValueError, match="needs an export directory"):
        clipforge.create_model(sigmoid_file, backend="onnx")
    with pytest.raises(ValueError, match="runs as exported"):
        clipforge.create_model(sigmoid_export, precision="bf16")
    with pytest.raises(ValueError, match="unknown backend"):
        clipforge.create_model(sigmoid_file, backend="tensorflow")
    model, preprocess = clipforge.load(sigmoid_export)
    assert preprocess is model.preprocess and model.origin["backend"] == "onnx"


def test_get_tokenizer(sigmoid_file, sigmoid_model, sigmoid_export) -> None:
    openai = clipforge.get_tokenizer()
    assert openai is clipforge.text.get_tokenizer()
    assert clipforge.get_tokenizer(sigmoid_model) is sigmoid_model.tokenizer
    for name in ("tiny-vit", "ViT-B/32", sigmoid_file, sigmoid_export):
        tokenizer = clipforge.get_tokenizer(name)
        assert torch.equal(tokenizer(["a cat"]), clipforge.tokenize(["a cat"])), name
        assert tokenizer.decode(tokenizer.encode("a cat")) == "a cat"


def test_openai_tokenizer_pickles_small_and_whole() -> None:
    """DataLoader workers receive the model's tokenizer pickled (spawn, forkserver)."""
    tokenizer = clipforge.get_tokenizer().with_context_length(32)
    data = pickle.dumps(tokenizer)
    again = pickle.loads(data)
    assert len(data) < 1000  # a reference to the vocabulary, not its tables
    assert again.context_length == 32
    assert torch.equal(again(["a photo of a cat"]), tokenizer(["a photo of a cat"]))


# ------------------------------------------------------------------------- zero-shot


def test_zero_shot_probabilities_are_sigmoids(sigmoid_model, photos, tmp_path) -> None:
    classifier = ZeroShotClassifier.build(sigmoid_model, LABELS, ["a photo of a {}."])
    assert classifier.probability == "sigmoid"
    assert classifier.logit_bias == pytest.approx(-1.5)
    image = Image.open(photos[0])
    vector = embed_pictures(sigmoid_model, [image]).vectors
    probs = classifier.predict_proba(torch.from_numpy(vector))[0]
    expected = _expected(sigmoid_model, image, LABELS)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=0)
    assert float(probs.sum()) != pytest.approx(1.0, abs=1e-3)
    loaded = ZeroShotClassifier.load(classifier.save(tmp_path / "zs.safetensors"))
    assert (loaded.logit_bias, loaded.probability) == (classifier.logit_bias, "sigmoid")
    torch.testing.assert_close(loaded.predict_proba(torch.from_numpy(vector))[0], probs)


def test_old_classifier_files_read_as_softmax(tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    save_file({"class_embeddings": torch.eye(2, 4)}, str(path),
              metadata={"classnames": json.dumps(["a", "b"]), "logit_scale": "100.0",
                        "format": "clipforge-zeroshot"})
    old = ZeroShotClassifier.load(path)
    assert (old.logit_bias, old.probability) == (None, "softmax")
    probs = old.predict_proba(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(1))
    assert clipforge.ZeroShotClassifier is ZeroShotClassifier


def test_classify_command_shows_sigmoids(sigmoid_file, sigmoid_model, photos, capsys) -> None:
    assert main(["classify", str(photos[0]), "--labels", ",".join(LABELS), "--model",
                 sigmoid_file, "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)["results"][0]["predictions"]
    got = {p["label"]: p["probability"] for p in predictions}
    expected = _expected(sigmoid_model, Image.open(photos[0]), LABELS)
    for label, value in zip(LABELS, expected.tolist()):
        assert got[label] == pytest.approx(value, abs=1e-5)
    assert sum(got.values()) != pytest.approx(1.0, abs=1e-3)


def test_index_classify_shows_sigmoids(sigmoid_model, photos, tmp_path) -> None:
    out = tmp_path / "index"
    build_index(photos[0].parent, out, sigmoid_model, progress=False)
    index = SearchIndex.open(out)
    image = Image.open(photos[0])
    ranked = dict(index.classify(image, LABELS))
    expected = _expected(sigmoid_model, image, LABELS)
    for label, value in zip(LABELS, expected.tolist()):
        assert ranked[label] == pytest.approx(value, abs=1e-5)


# ------------------------------------------------------------------------- indexes


def test_index_records_its_origin_as_json(sigmoid_file, sigmoid_model, photos, tmp_path) -> None:
    out = tmp_path / "index"
    build_index(photos[0].parent, out, sigmoid_model, progress=False)
    store = Store(out)
    info = store.info()
    store.close()
    origin = json.loads(info["origin"])
    assert origin["model"] == str(sigmoid_file) and origin["weights"] is None
    assert "None" not in info.values()
    assert SearchIndex.open(out).info["weights"] is None
    # An index written before origins were JSON ("None" for no weights) still opens.
    store = Store(out)
    store.set_info({"origin": "", "weights": "None"})
    store.close()
    legacy = SearchIndex.open(out)
    assert (legacy.info["model"], legacy.info["weights"]) == (str(sigmoid_file), None)


def test_search_keeps_the_precision_without_model(sigmoid_file, photos, tmp_path, capsys,
                                                  monkeypatch) -> None:
    from clipforge import factory

    out = tmp_path / "index"
    assert main(["index", "build", str(photos[0].parent), "--out", str(out), "--model",
                 sigmoid_file, "--workers", "0", "--no-progress"]) == 0
    loaded = []
    real = factory.create_model
    monkeypatch.setattr(factory, "create_model",
                        lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    capsys.readouterr()
    assert main(["search", str(out), "a cat", "-k", "1", "--precision", "int8"]) == 0
    assert [m.precision for m in loaded] == ["int8"]


# ------------------------------------------------------------------------- the model's tokenizer


@pytest.fixture(scope="module")
def siglip_model(tmp_path_factory):
    """A small SigLIP (transformers layout) with a SentencePiece vocabulary of its own."""
    pytest.importorskip("transformers")
    return clipforge.create_model(families.small_siglip_dir(tmp_path_factory.mktemp("siglip")))


def _unit_text(model, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_text(model.tokenizer(texts, truncate=True), normalize=True)


def test_every_path_uses_the_models_tokenizer(siglip_model, photos, tmp_path) -> None:
    texts = ["a red circle", "Two BLUE stars!", "красная звезда"]
    expected = _unit_text(siglip_model, texts)
    result = embed_texts(siglip_model, texts, progress=False)
    np.testing.assert_allclose(result.vectors, expected.numpy(), atol=1e-5)
    assert siglip_model.shares_prefixes is False
    classifier = ZeroShotClassifier.build(siglip_model, ["circle", "star"], ["a {}"])
    torch.testing.assert_close(classifier.class_embeddings,
                               _unit_text(siglip_model, ["a circle", "a star"]), atol=1e-5,
                               rtol=0)
    assert classifier.probability == "sigmoid"
    out = tmp_path / "index"
    build_index(photos[0].parent, out, siglip_model, progress=False)
    index = SearchIndex.open(out, siglip_model)
    np.testing.assert_allclose(index.embed_texts(texts), expected.numpy(), atol=1e-5)
    assert clipforge.get_tokenizer(siglip_model.origin["model"])(texts).shape == (3, 16)
    again = pickle.loads(pickle.dumps(siglip_model.tokenizer))
    assert torch.equal(again(texts), siglip_model.tokenizer(texts))

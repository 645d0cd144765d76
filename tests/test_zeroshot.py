"""Zero-shot classifier: class embeddings equal those built the way OpenCLIP builds them, with
transformers' CLIPModel embedding every prompt padded to 77 tokens; prompt sharing is exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.configs import CLIPConfig, TextConfig, VisionConfig
from clipforge.evaluation import zeroshot
from clipforge.evaluation.zeroshot import ZeroShotClassifier, class_prompts
from conftest import perturb

transformers = pytest.importorskip("transformers")

CLASSES = ["tench", "great white shark", "American black bear", "crane", "crane (bird)",
           "a", "Rhodesian Ridgeback", "ice cream & sorbet", "électric ray"]
TEMPLATES = ["a bad photo of a {}.", "a photo of many {}.", "{}", "itap of a {}.",
             "a {} in a video game.", "art of the {}.", "a photo of a {}."]
# A small model whose heads, widths and MLP are all different numbers, GELU activation.
ODD = CLIPConfig(
    40, VisionConfig(image_size=32, width=48, layers=2, heads=3, patch_size=16, mlp_width=100),
    TextConfig(width=72, layers=3, heads=3, mlp_width=130), activation="gelu")


def _hf_class_embeddings(hf, classnames, templates) -> torch.Tensor:
    """OpenCLIP's ``build_zero_shot_classifier``, on transformers: each class's prompts padded
    to 77 tokens with the end token (as CLIPTokenizer pads), features normalised, averaged,
    renormalised."""
    rows = []
    with torch.no_grad():
        for name in classnames:
            ids = clipforge.tokenize([t.format(name) for t in templates], truncate=True)
            eot = ids.argmax(dim=-1)
            ids = torch.where(torch.arange(77)[None] <= eot[:, None], ids, 49407)
            out = hf.get_text_features(input_ids=ids)
            out = out if isinstance(out, torch.Tensor) else out.pooler_output
            rows.append(F.normalize(F.normalize(out, dim=-1).mean(dim=0), dim=-1))
    return torch.stack(rows)


@pytest.mark.parametrize("config", ["tiny-vit", ODD], ids=["tiny", "odd"])
def test_class_embeddings_match_transformers(config, tmp_path, monkeypatch) -> None:
    model = perturb(clipforge.CLIP(clipforge.configs.get_config(config)
                                   if isinstance(config, str) else config).eval(), seed=4)
    clipforge.save_model(model, tmp_path / "hf", format="hf")
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    expected = _hf_class_embeddings(hf, CLASSES, TEMPLATES)
    # A small token budget, so that the suffixes run in several batches of different lengths.
    monkeypatch.setattr(zeroshot, "TOKENS_PER_BATCH", 24)
    classifier = ZeroShotClassifier.build(model, CLASSES, TEMPLATES)
    assert classifier.class_embeddings.shape == (len(CLASSES), model.config.embed_dim)
    torch.testing.assert_close(classifier.class_embeddings, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(classifier.class_embeddings.norm(dim=-1),
                               torch.ones(len(CLASSES)))
    assert classifier.logit_scale == pytest.approx(model.logit_scale.exp().item())


def test_prefix_sharing_is_exact(tiny_vit) -> None:
    tokens = clipforge.tokenize(["a photo of a " + name for name in CLASSES] +
                                ["a photo of a " + "very " * 80 + "long one"], truncate=True)
    with torch.no_grad():
        full = tiny_vit.encode_text(tokens)
        for shared in (1, 2, 5):  # the start token alone, and longer shared prefixes
            assert (tokens[:, :shared] == tokens[0, :shared]).all()
            part = tiny_vit.encode_text_with_prefix(tokens[0, :shared], tokens[:, shared:])
            torch.testing.assert_close(part, full, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="exceed"):
        tiny_vit.encode_text_with_prefix(tokens[-1, :70], tokens[-1:, 60:])


def test_identical_prompts_are_embedded_once(tiny_vit, monkeypatch) -> None:
    rows = []
    original = type(tiny_vit).encode_text_with_prefix

    def counting(self, prefix, suffixes, normalize=False):
        rows.append(suffixes.shape[0])
        return original(self, prefix, suffixes, normalize)

    monkeypatch.setattr(type(tiny_vit), "encode_text_with_prefix", counting)
    # "{}" and "{}" ... and per-class templates that repeat prompts across classes
    templates = {"cat": ["a photo of a {}.", "{}", "{}"], "dog": ["a photo of a {}.", "{} dog"],
                 "dog dog": ["{}"]}
    ZeroShotClassifier.build(tiny_vit, ["cat", "dog", "dog dog"], templates)
    # unique prompts: "a photo of a cat.", "cat", "a photo of a dog.", "dog dog"
    assert sum(rows) == 4


def test_per_class_templates_and_errors(tiny_vit) -> None:
    per_class = {"cat": ["a photo of a {}."], "dog": ["a photo of a {}.", "a {}, a pet."]}
    pairs = class_prompts(["cat", "dog"], per_class)
    assert [p for _, p in pairs[1]] == ["a photo of a dog.", "a dog, a pet."]
    classifier = ZeroShotClassifier.build(tiny_vit, ["cat", "dog"], per_class)
    cat = ZeroShotClassifier.build(tiny_vit, ["cat"], ["a photo of a {}."])
    torch.testing.assert_close(classifier.class_embeddings[0], cat.class_embeddings[0])
    with pytest.raises(ValueError, match="class list is empty"):
        ZeroShotClassifier.build(tiny_vit, [], ["{}"])
    with pytest.raises(ValueError, match=r"has no '\{\}' where the class name goes"):
        ZeroShotClassifier.build(tiny_vit, ["cat"], ["a photo of a cat"])
    with pytest.raises(ValueError, match="no templates"):
        ZeroShotClassifier.build(tiny_vit, ["cat"], [])
    with pytest.raises(ValueError, match="none for 1 class.*'dog'"):
        ZeroShotClassifier.build(tiny_vit, ["cat", "dog"], {"cat": ["{}"]})
    with pytest.raises(ValueError, match="2 replacement fields"):
        ZeroShotClassifier.build(tiny_vit, ["cat"], ["{} {x}"])


def test_save_load_predict(tiny_vit, tmp_path) -> None:
    classifier = ZeroShotClassifier.build(tiny_vit, CLASSES[:4], TEMPLATES)
    path = classifier.save(tmp_path / "imagenet.safetensors")
    loaded = ZeroShotClassifier.load(path)
    assert loaded.classnames == classifier.classnames
    assert loaded.logit_scale == classifier.logit_scale
    assert torch.equal(loaded.class_embeddings, classifier.class_embeddings)
    images = torch.randn(5, tiny_vit.config.embed_dim, generator=torch.Generator().manual_seed(0))
    probs = loaded.predict_proba(images)
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(5))
    assert torch.equal(loaded.predict(images), probs.argmax(dim=-1))
    top = loaded.topk(images, k=3)
    assert [len(t) for t in top] == [3] * 5
    for row, ranked in zip(probs, top):
        assert [name for name, _ in ranked] == [CLASSES[i] for i in row.topk(3).indices]
        assert ranked[0][1] == pytest.approx(row.max().item())
    (tmp_path / "broken.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="broken.safetensors"):
        ZeroShotClassifier.load(tmp_path / "broken.safetensors")

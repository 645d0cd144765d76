"""The model families against implementations we did not write: transformers' SiglipModel,
MetaClip2Model and ChineseCLIPModel with their processors, on random weights in small configs
and tokenizer files trained in the test (see ``families.py``).

Texts and PIL images in, token ids, pixels, embeddings and logits out, compared to float32
round-off.  Two deliberate differences from a naive transformers call, both what the models were
trained with (and what OpenCLIP does):

* SigLIP's text is canonicalised (lower case, punctuation removed) before tokenizing; the
  reference gets the same canonicalised text.  (transformers' SiglipTokenizer canonicalises by
  itself; Gemma's tokenizer for SigLIP 2 does not.)
* SigLIP's text tower sees no padding mask: it was trained on texts padded to 64 tokens with
  every position attended (big_vision; open_clip issue 984).  transformers 5's processor returns
  an ``attention_mask`` that, passed on, changes every padded text's embedding, so the
  reference is called with ``input_ids`` alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipforge
import families
from clipforge.text.hf import canonicalize

transformers = pytest.importorskip("transformers")

TOL = 1e-5
TEXTS = ["a red circle", "Two BLUE stars!", "一个红色的圆形", "красная звезда",
         "🐱 cats & dogs", ""]


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (transformers initialises biases and norms to constants)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


def _images(n: int = 3) -> list[Image.Image]:
    sizes = [(40, 50), (64, 36), (33, 33)]
    return [Image.fromarray((np.random.RandomState(i).rand(h, w, 3) * 255).astype("uint8"))
            for i, (h, w) in zip(range(n), sizes)]


# --------------------------------------------------------------------------------- SigLIP


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    from transformers import SiglipConfig, SiglipModel, SiglipTokenizer
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    root = tmp_path_factory.mktemp("siglip")
    tokenizer_dir = families.siglip_tokenizer(root / "tok", context_length=16)
    vocab = len(SiglipTokenizer.from_pretrained(tokenizer_dir))
    torch.manual_seed(0)
    config = SiglipConfig(
        text_config=dict(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8))
    out = root / "hf"
    _perturb(SiglipModel(config), seed=1).save_pretrained(out)
    SiglipTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def _siglip_reference(directory):
    from transformers import SiglipModel, SiglipProcessor

    return (SiglipModel.from_pretrained(directory).eval(),
            SiglipProcessor.from_pretrained(directory))


def test_siglip_tokenizer_is_the_models_own(siglip_dir):
    model = clipforge.create_model(siglip_dir)
    _, processor = _siglip_reference(siglip_dir)
    ours = model.tokenizer(TEXTS)
    theirs = processor(text=[canonicalize(t) for t in TEXTS], padding="max_length",
                       return_tensors="pt")["input_ids"]
    assert ours.shape == (len(TEXTS), 16)  # padded to the model's length, always
    assert torch.equal(ours, theirs)
    assert model.tokenizer.decode(ours[1]) == "two blue stars"


def test_siglip_embeddings_and_logits_match_transformers(siglip_dir):
    model = clipforge.create_model(siglip_dir)
    reference, processor = _siglip_reference(siglip_dir)
    images = _images()
    inputs = processor(text=[canonicalize(t) for t in TEXTS], images=images,
                       padding="max_length", return_tensors="pt")
    pixels = torch.stack([model.preprocess(im) for im in images])
    assert (pixels - inputs["pixel_values"]).abs().max() < 1e-6
    with torch.no_grad():
        out = reference(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
        text = model.encode_text(model.tokenizer(TEXTS), normalize=True)
        image = model.encode_image(pixels, normalize=True)
        logits, _ = model(pixels, model.tokenizer(TEXTS))
    assert (text - out.text_embeds).abs().max() < TOL
    assert (image - out.image_embeds).abs().max() < TOL
    assert (logits - out.logits_per_image).abs().max() < TOL
    probs = model.probabilities(logits)
    assert torch.allclose(probs, torch.sigmoid(out.logits_per_image), atol=TOL)
    assert not torch.allclose(probs.sum(dim=-1), torch.ones(len(images)))  # not a softmax


def test_siglip_pads_short_token_rows_to_its_length(siglip_dir):
    """Shorter rows (another library's padding="longest") get the trained padding, not a
    different embedding."""
    model = clipforge.create_model(siglip_dir)
    full = model.tokenizer(TEXTS[:2])
    short = full[:, :8]
    assert (short[:, -1] == model.tokenizer.pad_id).all()  # only padding was cut
    with torch.no_grad():
        assert torch.allclose(model.encode_text(short), model.encode_text(full), atol=1e-6)


@pytest.mark.parametrize("fmt", ["clipforge", "hf"])
def test_siglip_round_trips_with_its_tokenizer(siglip_dir, tmp_path, fmt):
    model = clipforge.create_model(siglip_dir)
    clipforge.save_model(model, tmp_path / "out", format=fmt)
    again = clipforge.create_model(tmp_path / "out")
    assert again.config == model.config
    assert torch.equal(again.tokenizer(TEXTS), model.tokenizer(TEXTS))
    pixels = torch.stack([model.preprocess(im) for im in _images()])
    with torch.no_grad():
        a, _ = model(pixels, model.tokenizer(TEXTS))
        b, _ = again(pixels, again.tokenizer(TEXTS))
    assert torch.equal(a, b)
    if fmt == "hf":  # transformers reads what clipforge wrote
        reference, _ = _siglip_reference(tmp_path / "out")
        with torch.no_grad():
            out = reference(input_ids=model.tokenizer(TEXTS), pixel_values=pixels)
        assert (out.logits_per_image - a).abs().max() < TOL


def test_siglip_single_file_refuses_to_lose_its_tokenizer(siglip_dir, tmp_path):
    model = clipforge.create_model(siglip_dir)
    with pytest.raises(ValueError, match="tokenizer files need a directory"):
        clipforge.save_model(model, tmp_path / "model.safetensors")


def test_siglip_config_fields_not_implemented_are_errors(siglip_dir, tmp_path):
    import json
    import shutil

    from clipforge.weights import CheckpointError

    copy = tmp_path / "copy"
    shutil.copytree(siglip_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["vision_config"]["vision_use_head"] = False
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="vision_use_head"):
        clipforge.create_model(copy)
    config["vision_config"]["vision_use_head"] = True
    config["model_type"] = "siglip2"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="NaFlex"):
        clipforge.create_model(copy)


def test_unit_embeddings_are_l2_normalised(siglip_dir):
    model = clipforge.create_model(siglip_dir)
    with torch.no_grad():
        text = model.encode_text(model.tokenizer(TEXTS), normalize=True)
    assert torch.allclose(text.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-6)
    assert torch.allclose(F.normalize(text, dim=-1), text)

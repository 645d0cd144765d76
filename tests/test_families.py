"""The model families against implementations we did not write: transformers' SiglipModel
(SigLIP, and SigLIP 2 at fixed resolution with Gemma's tokenizer), MetaClip2Model, ChineseCLIPModel
and CLIPModel with a vocabulary of its own, each with its processor, on random weights in small
configs and tokenizer files trained in the test (see ``families.py``).

Texts (English, Chinese, Russian, emoji, punctuation, an empty string; an over-long one) and PIL
images in; token ids, pixels, embeddings, logits and probabilities out, compared to float32
round-off (1e-5).  Each reference is called as its documentation says, and where our call
differs it is on purpose, to give what the model was trained with:

* SigLIP's text is canonicalised (lower case, punctuation removed) before tokenizing, as OpenCLIP
  does (transformers' SiglipTokenizer canonicalises by itself too); the reference gets the same
  text.
* SigLIP 2's text is lower-cased the way big_vision's SigLIP 2 configs do it
  (``lower(inkey='texts')|tok(length=64, model='gemma', bos='no', eos='sticky')``):
  ``tf.strings.lower``, which lower-cases ASCII letters only ("Кошка" stays "Кошка"); no
  punctuation is removed.  transformers' documentation says "lowercased text" and leaves it to
  the caller; OpenCLIP canonicalises instead.  The reference gets the text lower-cased the same
  way, padded to the model's length (``padding="max_length"``, as its documentation says).
* SigLIP's text tower sees no padding mask: it was trained on texts padded to its full length
  with every position attended (big_vision; open_clip issue 984).  transformers 5's
  SiglipProcessor returns an ``attention_mask`` that, passed on, changes every padded text's
  embedding, so the SigLIP reference is called with ``input_ids`` alone.  (The SigLIP 2
  repositories' tokenizer returns ``input_ids`` only, so there the documented ``model(**inputs)``
  is the same call.)
* MetaCLIP 2, Chinese-CLIP and CLIP with its own vocabulary are called as their documentation
  says: ``processor(text=..., images=..., padding=True)`` then ``model(**inputs)``, with the
  ``attention_mask``.  Our tokenizer pads every text to the model's length instead and computes
  without that mask, and the results are equal: the causal towers pool at the first end token,
  which attends only to itself and what precedes it (never padding: padding is on the right), and
  Chinese-CLIP's BERT tower masks its padding (by the padding id) exactly as the attention mask
  does, with absolute positions counted from 0 either way.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipforge
import families
from clipforge.text import ContextLengthError
from clipforge.text.hf import canonicalize
from clipforge.weights import CheckpointError

transformers = pytest.importorskip("transformers")

TOL = 1e-5
TEXTS = ["a red circle", "Two BLUE stars!", "一个红色的圆形", "Кошка сидит на столе.",
         "🐱 cats & dogs 🐶", "«quotes», (parens) [brackets]; a-b?", "café ÉCOLE", ""]
LONG = families.LONG_TEXT
CONTEXT = 32  # the text length of the test models
IMAGE = 32


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


def _small(**extra) -> dict:
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                **extra)


def ascii_lower(text: str) -> str:
    """big_vision's ``lower``: ``tf.strings.lower``, ASCII letters only (written here
    independently of clipforge's)."""
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in text)


# --------------------------------------------------------------------------------- families


@dataclass(frozen=True)
class Family:
    """How a family's reference is called: its transformers classes, the text it is given (the
    cleaning the model was trained with) and the processor's padding as its documentation says
    (``ids_only``: the reference gets ``input_ids`` alone, see the module docstring)."""

    name: str
    model_class: str
    text: Callable[[str], str] = str
    padding: dict = field(default_factory=lambda: {"padding": True})
    ids_only: bool = False


FAMILIES = {f.name: f for f in [
    Family("siglip", "SiglipModel", canonicalize, {"padding": "max_length"}, True),
    Family("siglip2", "SiglipModel", ascii_lower,
           {"padding": "max_length", "max_length": CONTEXT}, True),
    Family("metaclip2", "MetaClip2Model"),
    Family("chinese_clip", "ChineseCLIPModel"),
    Family("chinese_clip_squash", "ChineseCLIPModel"),
    Family("clip_eos", "CLIPModel"),
    Family("clip_legacy_eos", "CLIPModel"),
]}
HF_TOKENIZED = list(FAMILIES)  # every family here reads tokenizer files


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    from transformers import SiglipConfig, SiglipModel, SiglipTokenizer
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    root = tmp_path_factory.mktemp("siglip")
    tokenizer_dir = families.siglip_tokenizer(root / "tok", context_length=CONTEXT)
    vocab = len(SiglipTokenizer.from_pretrained(tokenizer_dir))
    torch.manual_seed(0)
    config = SiglipConfig(
        text_config=_small(vocab_size=vocab, max_position_embeddings=CONTEXT),
        vision_config=_small(image_size=IMAGE, patch_size=8))
    out = root / "hf"
    _perturb(SiglipModel(config), seed=1).save_pretrained(out)
    SiglipTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    SiglipImageProcessorPil(size={"height": IMAGE, "width": IMAGE}).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def siglip2_dir(tmp_path_factory):
    """SigLIP 2 at fixed resolution as the google/siglip2-*-patch16-224 repositories hold it: a
    SiglipModel with Gemma's tokenizer, saved through its processor (transformers 5 writes the
    image processor's settings into processor_config.json).  config.json keeps SiglipConfig's
    default padding id 1 while Gemma pads with 0 (transformers' SigLIP modelling never reads
    it)."""
    from transformers import AutoTokenizer, SiglipConfig, SiglipModel, SiglipProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    root = tmp_path_factory.mktemp("siglip2")
    tokenizer = AutoTokenizer.from_pretrained(families.siglip2_tokenizer(root / "tok"))
    torch.manual_seed(0)
    config = SiglipConfig(
        text_config=_small(vocab_size=len(tokenizer), max_position_embeddings=CONTEXT),
        vision_config=_small(image_size=IMAGE, patch_size=8))
    out = root / "hf"
    _perturb(SiglipModel(config), seed=2).save_pretrained(out)
    image = SiglipImageProcessorPil(size={"height": IMAGE, "width": IMAGE}, resample=2)
    SiglipProcessor(image_processor=image, tokenizer=tokenizer).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def metaclip2_dir(tmp_path_factory):
    """MetaCLIP 2 worldwide: CLIP towers, an XLM-V-style tokenizer (<s> 0, <pad> 1, </s> 2),
    the text pooled at the first eos_token_id 2."""
    from transformers import AutoTokenizer, CLIPProcessor, MetaClip2Config, MetaClip2Model
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    root = tmp_path_factory.mktemp("metaclip2")
    tokenizer = AutoTokenizer.from_pretrained(families.xlmr_tokenizer(root / "tok"),
                                              model_max_length=CONTEXT)
    torch.manual_seed(0)
    config = MetaClip2Config(
        text_config=_small(vocab_size=len(tokenizer), max_position_embeddings=CONTEXT,
                           bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision_config=_small(image_size=IMAGE, patch_size=8), projection_dim=48)
    out = root / "hf"
    _perturb(MetaClip2Model(config), seed=3).save_pretrained(out)
    image = CLIPImageProcessorPil(size={"shortest_edge": IMAGE},
                                  crop_size={"height": IMAGE, "width": IMAGE})
    CLIPProcessor(image_processor=image, tokenizer=tokenizer).save_pretrained(out)
    return out


def _chinese_clip(root: Path, image_processor: dict) -> Path:
    """Chinese-CLIP: a BERT text tower (post-norm, [CLS] pooled, padding masked) with 64
    positions read at the tokenizer's length (as Chinese-CLIP reads 52 of BERT's 512), and
    CLIP's image tower."""
    from transformers import AutoTokenizer, ChineseCLIPConfig, ChineseCLIPModel
    from transformers.models.chinese_clip.image_processing_pil_chinese_clip import (
        ChineseCLIPImageProcessorPil,
    )

    tokenizer = AutoTokenizer.from_pretrained(families.bert_tokenizer(root / "tok"),
                                              model_max_length=CONTEXT)
    torch.manual_seed(0)
    config = ChineseCLIPConfig(
        text_config=_small(vocab_size=len(tokenizer), max_position_embeddings=64),
        vision_config=_small(image_size=IMAGE, patch_size=8), projection_dim=48)
    out = root / "hf"
    _perturb(ChineseCLIPModel(config), seed=4).save_pretrained(out)
    tokenizer.save_pretrained(out)
    ChineseCLIPImageProcessorPil(**image_processor).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def chinese_clip_dir(tmp_path_factory):
    return _chinese_clip(tmp_path_factory.mktemp("chinese_clip"), {
        "size": {"shortest_edge": IMAGE}, "crop_size": {"height": IMAGE, "width": IMAGE}})


@pytest.fixture(scope="module")
def chinese_clip_squash_dir(tmp_path_factory):
    """Chinese-CLIP's own preprocessing (cn_clip resizes both sides to the resolution), as a
    ChineseCLIPImageProcessor records it: ``size`` {height, width}, no crop."""
    return _chinese_clip(tmp_path_factory.mktemp("chinese_clip_squash"), {
        "size": {"height": IMAGE, "width": IMAGE}, "do_center_crop": False})


@pytest.fixture(scope="module")
def clip_eos_dir(tmp_path_factory):
    """A CLIPModel with a vocabulary of its own whose eos_token_id (BERT's [SEP], 3) is neither
    2 (transformers' legacy arg-max pooling) nor the largest id: pooled at the first [SEP].
    Bilinear resizing and other mean/std, to cover those processor fields."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    root = tmp_path_factory.mktemp("clip_eos")
    tokenizer = AutoTokenizer.from_pretrained(families.bert_tokenizer(root / "tok"),
                                              model_max_length=CONTEXT)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=_small(vocab_size=len(tokenizer), max_position_embeddings=CONTEXT,
                           bos_token_id=tokenizer.cls_token_id,
                           eos_token_id=tokenizer.sep_token_id,
                           pad_token_id=tokenizer.pad_token_id, hidden_act="gelu"),
        vision_config=_small(image_size=IMAGE, patch_size=8), projection_dim=48)
    assert config.text_config.eos_token_id not in (2, len(tokenizer) - 1)
    out = root / "hf"
    _perturb(CLIPModel(config), seed=5).save_pretrained(out)
    image = CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, resample=2,
                                  crop_size={"height": IMAGE, "width": IMAGE},
                                  image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.25])
    CLIPProcessor(image_processor=image, tokenizer=tokenizer).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def clip_legacy_eos_dir(tmp_path_factory):
    """A CLIPModel with an XLM-R vocabulary and eos_token_id 2, which CLIPModel reads as its
    configs before transformers PR 24773 meant it: pool at the arg-max id (here some text
    token, as transformers computes it)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    root = tmp_path_factory.mktemp("clip_legacy_eos")
    tokenizer = AutoTokenizer.from_pretrained(families.xlmr_tokenizer(root / "tok"),
                                              model_max_length=CONTEXT)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=_small(vocab_size=len(tokenizer), max_position_embeddings=CONTEXT,
                           bos_token_id=0, eos_token_id=2, pad_token_id=1),
        vision_config=_small(image_size=IMAGE, patch_size=8), projection_dim=48)
    out = root / "hf"
    _perturb(CLIPModel(config), seed=6).save_pretrained(out)
    image = CLIPImageProcessorPil(size={"shortest_edge": IMAGE},
                                  crop_size={"height": IMAGE, "width": IMAGE})
    CLIPProcessor(image_processor=image, tokenizer=tokenizer).save_pretrained(out)
    return out


@pytest.fixture
def family(request) -> tuple[Family, Path]:
    name = request.param
    return FAMILIES[name], request.getfixturevalue(f"{name}_dir")


@functools.cache
def _ours(directory: Path):
    return clipforge.create_model(directory)


def _reference(fam: Family, directory: Path):
    """transformers' model and processor (AutoProcessor, as the documentation loads it)."""
    return _load_reference(fam.model_class, directory)


@functools.cache
def _load_reference(model_class: str, directory: Path):
    from transformers import AutoProcessor

    model = getattr(transformers, model_class).from_pretrained(directory).eval()
    return model, AutoProcessor.from_pretrained(directory)


def _reference_inputs(fam: Family, processor, texts: list[str], images=None,
                      truncation: bool = False) -> dict:
    inputs = processor(text=[fam.text(t) for t in texts], images=images, return_tensors="pt",
                       truncation=truncation, **fam.padding)
    return {"input_ids": inputs["input_ids"], "pixel_values": inputs.get("pixel_values")} \
        if fam.ids_only else dict(inputs)


def _same_ids(ours: torch.Tensor, theirs: torch.Tensor, pad_id: int) -> None:
    """Ours are padded to the model's length; the reference's (``padding=True``) to the longest
    text: equal where both have tokens, padding after."""
    length = theirs.shape[1]
    assert ours.shape[1] >= length
    assert torch.equal(ours[:, :length], theirs)
    assert (ours[:, length:] == pad_id).all()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ------------------------------------------------------------------------ against the reference


@pytest.mark.parametrize("family", HF_TOKENIZED, indirect=True)
def test_tokenizer_is_the_models_own(family):
    fam, directory = family
    model = _ours(directory)
    _, processor = _reference(fam, directory)
    ours = model.tokenizer(TEXTS)
    assert ours.shape == (len(TEXTS), CONTEXT)  # padded to the model's length, always
    theirs = _reference_inputs(fam, processor, TEXTS)["input_ids"]
    _same_ids(ours, theirs, model.tokenizer.pad_id)
    assert model.config.text.pad_id == model.tokenizer.pad_id


@pytest.mark.parametrize("family", HF_TOKENIZED, indirect=True)
def test_embeddings_logits_and_probabilities_match_transformers(family):
    fam, directory = family
    model = _ours(directory)
    reference, processor = _reference(fam, directory)
    images = _images()
    inputs = _reference_inputs(fam, processor, TEXTS, images)
    pixels = torch.stack([model.preprocess(im) for im in images])
    assert _max_diff(pixels, inputs["pixel_values"]) < 1e-6
    with torch.no_grad():
        out = reference(**inputs)
        tokens = model.tokenizer(TEXTS)
        text = model.encode_text(tokens, normalize=True)
        image = model.encode_image(pixels, normalize=True)
        logits, _ = model(pixels, tokens)
    diffs = {"text": _max_diff(text, out.text_embeds), "image": _max_diff(image, out.image_embeds),
             "logits": _max_diff(logits, out.logits_per_image)}
    assert max(diffs.values()) < TOL, diffs
    probs = model.probabilities(logits)
    if model.config.probability == "sigmoid":
        expected = torch.sigmoid(out.logits_per_image)
        assert not torch.allclose(probs.sum(dim=-1), torch.ones(len(images)))  # not a softmax
    else:
        expected = out.logits_per_image.softmax(dim=-1)
    assert _max_diff(probs, expected) < TOL


@pytest.mark.parametrize("family", HF_TOKENIZED, indirect=True)
def test_over_long_text_is_an_error_unless_truncated_as_the_reference_truncates(family):
    fam, directory = family
    model = _ours(directory)
    reference, processor = _reference(fam, directory)
    texts = [TEXTS[1], LONG]
    with pytest.raises(ContextLengthError, match="text 1"):
        model.tokenizer(texts)
    ours = model.tokenizer(texts, truncate=True)
    inputs = _reference_inputs(fam, processor, texts, _images(1), truncation=True)
    _same_ids(ours, inputs["input_ids"], model.tokenizer.pad_id)
    with torch.no_grad():
        theirs = reference(**inputs).text_embeds
        assert _max_diff(model.encode_text(ours, normalize=True), theirs) < TOL


# ---------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", ["clipforge", "hf"])
@pytest.mark.parametrize("family", HF_TOKENIZED, indirect=True)
def test_round_trips_with_its_tokenizer_and_processor(family, tmp_path, fmt):
    fam, directory = family
    model = _ours(directory)
    clipforge.save_model(model, tmp_path / "out", format=fmt)
    again = clipforge.create_model(tmp_path / "out")
    assert again.config == model.config
    texts = [*TEXTS, LONG]
    assert torch.equal(again.tokenizer(texts, truncate=True), model.tokenizer(texts, truncate=True))
    images = _images()
    pixels = torch.stack([model.preprocess(im) for im in images])
    assert torch.equal(torch.stack([again.preprocess(im) for im in images]), pixels)
    tokens = model.tokenizer(TEXTS)
    with torch.no_grad():
        a, _ = model(pixels, tokens)
        b, _ = again(pixels, again.tokenizer(TEXTS))
    assert torch.equal(a, b)
    if fmt == "hf":  # transformers reads what clipforge wrote, processor included
        reference, processor = _reference(fam, tmp_path / "out")
        inputs = _reference_inputs(fam, processor, TEXTS, images)
        assert _max_diff(inputs["pixel_values"], pixels) < 1e-6
        with torch.no_grad():
            out = reference(**inputs)
        assert _max_diff(out.logits_per_image, a) < TOL


@pytest.mark.parametrize("family", HF_TOKENIZED, indirect=True)
def test_convert_command_writes_both_formats(family, tmp_path, capsys):
    from clipforge.cli import main

    _, directory = family
    assert main(["convert", str(directory), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "cf"), "--to", "clipforge"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert clipforge.create_model(tmp_path / "cf").config == _ours(directory).config


@pytest.mark.parametrize("family", HF_TOKENIZED, indirect=True)
def test_missing_tokenizer_files_are_one_clear_error(family, tmp_path):
    _, directory = family
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    for path in copy.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "spiece", "vocab")):
            path.unlink()
    with pytest.raises(ValueError) as info:
        clipforge.create_model(copy)
    message = str(info.value)
    assert "\n" not in message
    assert str(copy) in message and "tokenizer.json" in message


# ------------------------------------------------------------------- what is not implemented


def _edited(directory: Path, tmp_path: Path, edit: Callable[[dict], None],
            name: str = "config.json") -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    data = json.loads((copy / name).read_text())
    edit(data)
    (copy / name).write_text(json.dumps(data))
    return copy


NOT_IMPLEMENTED = [
    ("siglip", lambda c: c["vision_config"].update(vision_use_head=False), "vision_use_head"),
    ("siglip", lambda c: c.update(model_type="siglip2"), "NaFlex"),
    ("siglip2", lambda c: c["text_config"].update(hidden_act="relu"), "text_config.hidden_act"),
    ("metaclip2", lambda c: c["text_config"].update(eos_token_id=[2, 3]),
     "text_config.eos_token_id"),
    ("metaclip2", lambda c: c["vision_config"].update(num_channels=1),
     "vision_config.num_channels"),
    ("chinese_clip", lambda c: c["text_config"].update(position_embedding_type="relative_key"),
     "text_config.position_embedding_type"),
    ("chinese_clip", lambda c: c["text_config"].update(type_vocab_size=0),
     "text_config.type_vocab_size"),
    ("clip_eos", lambda c: c["vision_config"].update(hidden_act="relu"),
     "vision_config.hidden_act"),
]


@pytest.mark.parametrize(("name", "edit", "field_name"), NOT_IMPLEMENTED,
                         ids=[f"{n}-{f}" for n, _, f in NOT_IMPLEMENTED])
def test_config_fields_not_implemented_are_errors(name, edit, field_name, request, tmp_path):
    directory = request.getfixturevalue(f"{name}_dir")
    with pytest.raises(CheckpointError, match=field_name):
        clipforge.create_model(_edited(directory, tmp_path, edit))


PROCESSOR_NOT_IMPLEMENTED = [
    ("chinese_clip", "preprocessor_config.json", lambda p: p.update(do_center_crop=False),
     "do_center_crop"),
    ("chinese_clip_squash", "preprocessor_config.json", lambda p: p.update(resample=0),
     "resample"),
    ("metaclip2", "processor_config.json",
     lambda p: p["image_processor"].update(crop_size={"height": 30, "width": 30}), "crop_size"),
    ("siglip2", "processor_config.json", lambda p: p["image_processor"].update(do_rescale=False),
     "do_rescale"),
]


@pytest.mark.parametrize(("name", "file", "edit", "field_name"), PROCESSOR_NOT_IMPLEMENTED,
                         ids=[f"{n}-{f}" for n, _, _, f in PROCESSOR_NOT_IMPLEMENTED])
def test_processor_fields_not_implemented_are_errors(name, file, edit, field_name, request,
                                                     tmp_path):
    directory = request.getfixturevalue(f"{name}_dir")
    with pytest.raises(CheckpointError, match=f"{file}.*{field_name}"):
        clipforge.create_model(_edited(directory, tmp_path, edit, file))


# ------------------------------------------------------------------------ family specifics


def test_siglip2_lower_cases_ascii_only_and_keeps_punctuation(siglip2_dir):
    """big_vision's SigLIP 2 text preprocessing, not OpenCLIP's canonicalisation."""
    tokenizer = _ours(siglip2_dir).tokenizer
    assert tokenizer.decode(tokenizer(["Two BLUE stars!"])[0]) == "two blue stars!"
    assert tokenizer.decode(tokenizer(["Кошка ÉCOLE"])[0]) == "Кошка École"


def test_siglip2_pads_on_the_right_whatever_the_files_say(siglip2_dir, tmp_path):
    """Gemma's tokenizer class pads on the left by default; SigLIP pools the last position and
    was trained with its padding after the text."""
    copy = _edited(siglip2_dir, tmp_path, lambda t: t.update(padding_side="left"),
                   "tokenizer_config.json")
    ours = clipforge.create_model(copy).tokenizer(TEXTS)
    assert torch.equal(ours, _ours(siglip2_dir).tokenizer(TEXTS))
    assert (ours[:, -1] == 0).all() and ours[0, 0] != 0


def test_siglip_pads_short_token_rows_to_its_length(siglip_dir, siglip2_dir):
    """Shorter rows (another library's padding="longest") get the trained padding, not a
    different embedding: SigLIP pads with </s> (1), SigLIP 2 with <pad> (0), whatever
    config.json's stale pad_token_id says."""
    for directory in (siglip_dir, siglip2_dir):
        model = _ours(directory)
        full = model.tokenizer(TEXTS[:2])
        short = full[:, :8]
        assert (short[:, -1] == model.tokenizer.pad_id).all()  # only padding was cut
        with torch.no_grad():
            assert torch.allclose(model.encode_text(short), model.encode_text(full), atol=1e-6)


def test_metaclip2_pools_at_the_first_eos_not_the_largest_id(metaclip2_dir):
    text = _ours(metaclip2_dir).config.text
    assert (text.pool, text.eos_id) == ("eos", 2)


def test_chinese_clip_reads_its_context_from_the_tokenizer(chinese_clip_dir):
    text = _ours(chinese_clip_dir).config.text
    assert (text.context_length, text.positions) == (CONTEXT, 64)


def test_tokenizer_files_are_read_once_and_again_when_changed(metaclip2_dir, tmp_path):
    """The config reader and the tokenizer share one load of the files (XLM-V's take seconds);
    changed files are read again."""
    from clipforge.text.hf import load_hf_tokenizer

    copy = tmp_path / "copy"
    shutil.copytree(metaclip2_dir, copy)
    first = load_hf_tokenizer(copy)
    assert load_hf_tokenizer(copy) is first
    assert clipforge.create_model(copy).tokenizer.hf is first
    _edited(metaclip2_dir, tmp_path / "edit", lambda t: t.update(model_max_length=7),
            "tokenizer_config.json")
    shutil.copy(tmp_path / "edit" / "copy" / "tokenizer_config.json", copy)
    again = load_hf_tokenizer(copy)
    assert again is not first and again.model_max_length == 7


def test_siglip_single_file_refuses_to_lose_its_tokenizer(siglip_dir, tmp_path):
    model = _ours(siglip_dir)
    with pytest.raises(ValueError, match="tokenizer files need a directory"):
        clipforge.save_model(model, tmp_path / "model.safetensors")


def test_unit_embeddings_are_l2_normalised(siglip_dir):
    model = _ours(siglip_dir)
    with torch.no_grad():
        text = model.encode_text(model.tokenizer(TEXTS), normalize=True)
    assert torch.allclose(text.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-6)
    assert torch.allclose(F.normalize(text, dim=-1), text)


def test_a_hub_repository_brings_its_tokenizer_files(siglip_dir, tmp_path, monkeypatch):
    """``hf-hub:org/repo`` downloads the tokenizer files beside the weights, so a family with
    its own vocabulary loads ready to use.  The Hub is stood in for by a folder (no network
    here): what is asked of it is what an online download would fetch."""
    import huggingface_hub

    from clipforge.weights import pretrained

    requested: list[str] = []
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()

    def hf_hub_download(repo, name, local_files_only=False):
        if local_files_only:  # nothing cached yet
            raise huggingface_hub.errors.LocalEntryNotFoundError(name)
        requested.append(name)
        (snapshot / name).write_bytes((siglip_dir / name).read_bytes())
        return str(snapshot / name)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files",
                        lambda repo: sorted(p.name for p in siglip_dir.iterdir()))
    monkeypatch.setattr(pretrained, "_hub_reachable", lambda: True)
    model = clipforge.create_model("hf-hub:org/siglip")
    assert "spiece.model" in requested and "tokenizer_config.json" in requested
    assert type(model.tokenizer).__name__ == "HFTokenizer"
    assert torch.equal(model.tokenizer(TEXTS), clipforge.create_model(siglip_dir).tokenizer(TEXTS))

"""A vocabulary learnt from the training captions (clipforge.text.vocabulary): words of all
three languages as tokens, any text still encodable, and a model that reads it end to end."""

from __future__ import annotations

import json

import pytest
import torch

import clipforge
from clipforge.data import synthetic
from clipforge.text.hf import HFTokenizer, TokenizerFilesError
from clipforge.text.vocabulary import fit_config, train_bpe
from clipforge.training.config import TrainConfig

CAPTIONS = [synthetic.render_scene(i, 0, 16).caption for i in range(1500)]


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory):
    return train_bpe(CAPTIONS, tmp_path_factory.mktemp("vocabulary"), vocab_size=1024)


def test_learning_is_deterministic(vocabulary, tmp_path) -> None:
    again = train_bpe(CAPTIONS, tmp_path / "again", vocab_size=1024)
    assert (again / "tokenizer.json").read_bytes() == (vocabulary / "tokenizer.json").read_bytes()


def test_each_language_keeps_its_words_apart(vocabulary) -> None:
    tok = HFTokenizer(vocabulary, 40)
    # every word of every class name is one token, held-out pairs' too: a colour is spelt the
    # same before (or, in Russian, after) every shape
    for language in ("en", "ru"):
        for name in synthetic.class_names(language):
            assert len(tok.encode(name)) == len(name.split()), name
    # Chinese: one token per character, never a merge across words
    # (after the one space every text starts with, which is a token of its own before Chinese)
    for name in synthetic.class_names("zh"):
        assert [tok.decode([i]) for i in tok.encode(name)] == ["", *name]
    # far shorter than OpenAI's byte-level BPE on the same captions
    openai = clipforge.get_tokenizer()
    ours = sum(len(tok.encode(c)) for c in CAPTIONS[:300])
    theirs = sum(len(openai.encode(c)) for c in CAPTIONS[:300])
    assert ours < 0.6 * theirs


def test_any_text_still_encodes(vocabulary) -> None:
    tok = HFTokenizer(vocabulary, 40)
    text = "Ωmega ünïcode 你好 ☃ Ё"
    ids = tok.encode(text)
    assert tok.decode(ids) == text.lower()
    row = tok([text])[0]
    assert row[0] == tok.hf.bos_token_id and int((row == tok.hf.eos_token_id).sum()) == 1


def test_context_length_follows_the_corpus(vocabulary) -> None:
    settings = json.loads((vocabulary / "tokenizer_config.json").read_text())
    tok = HFTokenizer(vocabulary, 512)
    longest = max(len(tok.encode(c)) + 2 for c in CAPTIONS)
    assert settings["model_max_length"] % 8 == 0
    assert 1.5 * longest <= settings["model_max_length"] < 1.5 * longest + 8


def test_a_model_reads_it_end_to_end(vocabulary, tmp_path) -> None:
    torch.manual_seed(0)
    model = clipforge.create_model("tiny-rn", tokenizer=vocabulary)
    config = fit_config(clipforge.create_model("tiny-rn").config, vocabulary)
    assert model.config == config
    assert model.config.text.vocab_size == HFTokenizer(vocabulary, 8).vocab_size
    assert model.config.text.pool == "eos"
    texts = ["one red circle", "две синие звезды", "两颗蓝色的星星"]
    tokens = model.tokenizer(texts)
    assert tokens.shape == (3, config.text.context_length)
    with torch.no_grad():
        before = model.encode_text(tokens)
    # the pooled position is each text's end token, not the largest id
    assert not torch.equal(before[0], before[1])
    saved = clipforge.save_model(model, tmp_path / "model")
    again = clipforge.create_model(saved)
    assert again.tokenizer(texts).tolist() == tokens.tolist()
    with torch.no_grad():
        assert torch.equal(again.encode_text(again.tokenizer(texts)), before)


def test_wrong_uses_are_clear_errors(vocabulary, tmp_path) -> None:
    weights = clipforge.save_model(clipforge.create_model("tiny-rn"), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="random initialisation"):
        clipforge.create_model("tiny-rn", weights=weights, tokenizer=vocabulary)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerFilesError, match="empty"):
        clipforge.create_model("tiny-rn", tokenizer=tmp_path / "empty")
    with pytest.raises(ValueError, match="no texts"):
        train_bpe([], tmp_path / "none")


def test_the_run_learns_one_only_from_scratch(tmp_path) -> None:
    assert TrainConfig(tmp_path).learns_vocabulary()  # built-in data, from scratch
    assert not TrainConfig(tmp_path, data="pairs.csv").learns_vocabulary()
    assert not TrainConfig(tmp_path, weights="w.safetensors").learns_vocabulary()
    assert TrainConfig(tmp_path, data="pairs.csv", tokenizer="learn").learns_vocabulary()
    with pytest.raises(ValueError, match="--tokenizer learn"):
        TrainConfig(tmp_path, tokenizer="learn", weights="w.safetensors").validate()
    with pytest.raises(ValueError, match="--tokenizer 'bpe'"):
        TrainConfig(tmp_path, tokenizer="bpe").validate()

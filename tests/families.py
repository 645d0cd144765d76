"""Test material for the model families: tokenizer files trained here on a multilingual corpus,
and the reference implementations we did not write (transformers, open_clip).

No network: every vocabulary is trained in the test session (SentencePiece unigram for SigLIP
and XLM-RoBERTa/XLM-V, WordPiece for BERT, byte-fallback BPE for Gemma) on a corpus of English,
Chinese and Russian captions with emoji, punctuation and a long text, then written by
transformers' own tokenizer classes, exactly as a hub repository ships them.

open_clip's model code needs no torchvision, but its package imports torchvision's transforms
(and timm's, its datasets) at import time; torchvision cannot load beside this machine's CPU
torch.  :func:`open_clip` installs an inert stand-in for the ``torchvision`` modules (any name
in them is a class that refuses to be constructed), so that open_clip's and timm's *model* code
imports and runs as published; their image transforms are never used (preprocessing is compared
against transformers' PIL image processors and a mirror of torchvision's arithmetic instead).
"""

from __future__ import annotations

import enum
import functools
import importlib.abc
import importlib.machinery
import random
import shutil
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CAPTIONS = [
    "a photo of a red circle", "two blue stars on a striped background",
    "A small RED Circle, in the upper-left corner!", "a green heart; a yellow square?",
    "一个红色的圆形", "两颗蓝色的星星", "一只猫坐在桌子上。", "条纹背景上的绿色三角形",
    "красный круг", "красная звезда", "два красных круга", "Кошка сидит на столе.",
    "зелёное сердце на полосатом фоне", "🐱 cats & dogs 🐶 — «quotes» (parens) [brackets]",
    "café naïve résumé, ÉCOLE", "Hello World! It's 2026: 100% #1 @home",
]
# Long enough to overflow any test model's context
LONG_TEXT = " ".join(CAPTIONS * 6)


def corpus(lines: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = " ".join(CAPTIONS).split()
    text = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(lines)]
    return text + CAPTIONS * 20


def _corpus_file(directory: Path) -> Path:
    path = directory / "corpus.txt"
    path.write_text("\n".join(corpus()), encoding="utf-8")
    return path


def siglip_tokenizer(directory: Path, context_length: int = 16) -> Path:
    """SigLIP's layout: a SentencePiece unigram model (``spiece.model``) read by
    ``SiglipTokenizer`` (pad = eos = ``</s>``)."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import SiglipTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    prefix = directory / "spm"
    spm.SentencePieceTrainer.train(
        input=str(_corpus_file(directory)), model_prefix=str(prefix), vocab_size=250,
        model_type="unigram", character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        hard_vocab_limit=False, minloglevel=2)
    out = directory / "siglip"
    SiglipTokenizer(vocab_file=str(prefix) + ".model",
                    model_max_length=context_length).save_pretrained(out)
    return out


def xlmr_tokenizer(directory: Path) -> Path:
    """XLM-RoBERTa's (and XLM-V's) layout: a SentencePiece unigram model with the fairseq ids
    (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3), read by ``XLMRobertaTokenizer``."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import XLMRobertaTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    prefix = directory / "xlmr"
    spm.SentencePieceTrainer.train(
        input=str(_corpus_file(directory)), model_prefix=str(prefix), vocab_size=250,
        model_type="unigram", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, minloglevel=2)
    raw = directory / "xlmr-raw"
    raw.mkdir(exist_ok=True)
    shutil.copy(str(prefix) + ".model", raw / "sentencepiece.bpe.model")
    out = directory / "xlmr-tok"
    XLMRobertaTokenizer.from_pretrained(raw).save_pretrained(out)
    return out


def bert_tokenizer(directory: Path) -> Path:
    """Chinese-CLIP's layout: a WordPiece ``vocab.txt`` (Chinese characters split one by one)
    read by ``BertTokenizer``."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    trainer = BertWordPieceTokenizer(lowercase=True, handle_chinese_chars=True)
    trainer.train([str(_corpus_file(directory))], vocab_size=600, show_progress=False)
    raw = directory / "bert-raw"
    raw.mkdir(exist_ok=True)
    trainer.save_model(str(raw))
    out = directory / "bert-tok"
    BertTokenizer.from_pretrained(raw).save_pretrained(out)
    return out


def gemma_tokenizer(directory: Path) -> Path:
    """SigLIP 2's layout: Gemma's byte-fallback BPE (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2,
    ``<unk>`` 3), read by ``GemmaTokenizer``."""
    import json

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                                          show_progress=False))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split())
              for m in json.loads(tok.to_str())["model"]["merges"]]
    out = directory / "gemma-tok"
    GemmaTokenizer(vocab=tok.get_vocab(), merges=merges).save_pretrained(out)
    return out


def siglip2_tokenizer(directory: Path, context_length: int | None = None) -> Path:
    """Gemma's tokenizer as the google/siglip2-* repositories ship it (transformers' SigLIP 2
    conversion): no ``<bos>``, ``<eos>`` appended, padded on the right, ``input_ids`` only
    (big_vision's ``tok(bos='no', eos='sticky')``).  ``context_length``: its
    ``model_max_length`` (unset: transformers' "no limit")."""
    from transformers import GemmaTokenizer

    extra = {} if context_length is None else {"model_max_length": context_length}
    tok = GemmaTokenizer.from_pretrained(gemma_tokenizer(directory), add_bos_token=False,
                                         add_eos_token=True, padding_side="right",
                                         model_input_names=["input_ids"], **extra)
    out = directory / "siglip2-tok"
    tok.save_pretrained(out)
    return out


def small_siglip_dir(root: Path) -> Path:
    """A small transformers SigLIP directory (random weights) with a SentencePiece vocabulary of
    its own, trained here: a model that reads its own tokenizer files."""
    import torch
    from transformers import SiglipConfig, SiglipModel, SiglipTokenizer

    tokenizer_dir = siglip_tokenizer(root / "tok", context_length=16)
    vocab = len(SiglipTokenizer.from_pretrained(tokenizer_dir))
    torch.manual_seed(0)
    config = SiglipConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8))
    out = root / "hf"
    SiglipModel(config).save_pretrained(out)
    SiglipTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def fake_hub_cache(cache: Path, repo: str, files: dict[str, bytes]) -> None:
    """A Hugging Face cache entry laid out as huggingface_hub writes it."""
    commit = "0" * 40
    entry = cache / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    snapshot = entry / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


# ----------------------------------------------------------------------------- open_clip


class _Refused:
    """What every torchvision name is here: a class that cannot be constructed."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision is a stand-in in these tests (its transforms are "
                           "never used by the model code under test)")


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class _StandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__version__ = "0+stand-in"
        module.InterpolationMode = InterpolationMode

        def __getattr__(attr: str):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _Refused
        module.__getattr__ = __getattr__
        return module

    def exec_module(self, module):
        pass


def open_clip():
    """open_clip with timm (model code only), or skip when they are not installed."""
    if "torchvision" not in sys.modules:
        finder = _StandIn()
        sys.meta_path.insert(0, finder)
    try:
        import open_clip as module
        import timm  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"open_clip/timm not installed ({exc})")
    return module


@contextmanager
def small_timm(sizes: dict[str, dict]) -> Iterator[None]:
    """timm's model constructors named in ``sizes`` build with those arguments (depth, width,
    image size) while the block runs: the published towers' code at test size."""
    from timm.models import _registry

    with pytest.MonkeyPatch.context() as patch:
        for name, kwargs in sizes.items():
            patch.setitem(_registry._model_entrypoints, name,
                          functools.partial(_registry._model_entrypoints[name], **kwargs))
        yield

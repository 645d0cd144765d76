"""The tokenizers of the other families, read from the files that come with their weights.

SigLIP (SentencePiece), SigLIP 2 (Gemma's), MetaCLIP 2 (XLM-V), XLM-RoBERTa and Chinese-CLIP's
BERT each ship their vocabulary as Hugging Face tokenizer files.  They are read by the library
made for them, transformers' ``AutoTokenizer`` (over ``tokenizers`` and ``sentencepiece``), never
re-implemented, and called the way each model was trained:

* every text is padded to the model's context (``padding="max_length"``): SigLIP pools its last
  position and was trained on texts padded to 64 tokens, so any other padding changes its
  embeddings (a mistake users of other libraries make often); for the masked and causal towers
  the padding is never computed (see :mod:`clipforge.model.text`);
* text is cleaned as OpenCLIP cleans it before tokenizing (``clean``): ``canonicalize`` (SigLIP:
  lower case, punctuation removed, whitespace collapsed, after ftfy and HTML unescaping),
  ``whitespace``, ``lower`` or ``none``;
* a text longer than the context is an error (:class:`ContextLengthError`) unless truncation is
  asked for, as with OpenAI's tokenizer; truncation keeps the tokenizer's end token.

Objects here have the interface of :class:`clipforge.text.Tokenizer`: ``encode``, ``decode``,
``encode_batch`` (numpy, no torch) and calling with texts for a ``LongTensor``.
"""

from __future__ import annotations

import html
import string
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import ftfy
import numpy as np

from .tokenizer import ContextLengthError

if TYPE_CHECKING:
    import torch

CLEANERS = ("none", "canonicalize", "whitespace", "lower")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def basic_clean(text: str) -> str:
    """ftfy, HTML unescaped twice, stripped (OpenCLIP's ``basic_clean``)."""
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def whitespace_clean(text: str) -> str:
    return " ".join(text.split()).strip()


def canonicalize(text: str) -> str:
    """big_vision's ``canonicalize_text`` as OpenCLIP applies it for SigLIP: punctuation removed,
    lower-cased, whitespace collapsed."""
    text = basic_clean(text).translate(_PUNCTUATION).lower()
    return " ".join(text.split()).strip()


def clean(text: str, how: str) -> str:
    """``text`` cleaned by one of :data:`CLEANERS` (OpenCLIP's names)."""
    if how == "canonicalize":
        return canonicalize(text)
    if how == "whitespace":
        return whitespace_clean(basic_clean(text))
    if how == "lower":
        return whitespace_clean(basic_clean(text)).lower()
    if how == "none":
        return text
    raise ValueError(f"unknown text cleaning {how!r}; choose one of {', '.join(CLEANERS)}")


class TokenizerFilesError(ValueError):
    """A model's tokenizer files are missing or unreadable."""


class HFTokenizer:
    """A Hugging Face tokenizer directory, called as the model it belongs to was trained.

    ``directory`` holds the files (``tokenizer.json``, ``spiece.model``, ``vocab.txt``,
    ``tokenizer_config.json``...).  ``context_length``: the model's text length.  ``clean``: one
    of :data:`CLEANERS`.  ``strip_sep``: replace the separator token by 0 (OpenCLIP's option for
    some BERT towers).
    """

    def __init__(self, directory: str | Path, context_length: int, clean: str = "none",
                 strip_sep: bool = False):
        if clean not in CLEANERS:
            raise ValueError(f"unknown text cleaning {clean!r}; choose one of "
                             f"{', '.join(CLEANERS)}")
        self.directory = Path(directory)
        self.context_length = context_length
        self.cleaning = clean
        self.strip_sep = strip_sep
        self.hf = _load(self.directory)
        if self.hf.pad_token_id is None:
            raise TokenizerFilesError(f"the tokenizer in {self.directory} defines no padding "
                                      "token, which padding every text to the model's length "
                                      "needs")
        self.pad_id = int(self.hf.pad_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (cleaned), without special tokens."""
        return list(self.hf(clean(text, self.cleaning), add_special_tokens=False)["input_ids"])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens (padding, start, end) dropped."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True).strip()

    def encode_batch(self, texts: str | Iterable[str], context_length: int | None = None,
                     truncate: bool = False) -> np.ndarray:
        """[N, context_length] int64 ids, each text with the tokenizer's special tokens and
        padded to the full length.  Over-long text raises :class:`ContextLengthError` unless
        ``truncate``."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        length = context_length or self.context_length
        cleaned = [clean(t, self.cleaning) for t in texts]
        if not cleaned:
            return np.zeros((0, length), dtype=np.int64)
        if not truncate:
            self._check_lengths(texts, cleaned, length)
        ids = self.hf(cleaned, padding="max_length", truncation=True, max_length=length,
                      return_attention_mask=False)["input_ids"]
        out = np.asarray(ids, dtype=np.int64)
        if self.strip_sep and self.hf.sep_token_id is not None:
            out[out == self.hf.sep_token_id] = 0
        return out

    def _check_lengths(self, texts: list[str], cleaned: list[str], length: int) -> None:
        full = self.hf(cleaned, return_attention_mask=False)["input_ids"]
        for row, ids in enumerate(full):
            if len(ids) > length:
                text = texts[row]
                preview = text if len(text) <= 60 else text[:57] + "..."
                raise ContextLengthError(
                    f"text {row} ({preview!r}) is {len(ids)} tokens long, more than the "
                    f"context length {length}; shorten it or pass truncate=True "
                    "(--truncate on the command line)")

    def __call__(self, texts: str | Iterable[str], context_length: int | None = None,
                 truncate: bool = False) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.encode_batch(texts, context_length, truncate))

    def save(self, directory: str | Path) -> None:
        """Write the tokenizer files into ``directory`` (a model being saved)."""
        self.hf.save_pretrained(str(directory))

    def __repr__(self) -> str:
        return (f"HFTokenizer({type(self.hf).__name__}, vocabulary {self.vocab_size}, "
                f"context {self.context_length}, clean={self.cleaning!r})")


def _load(directory: Path):
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise TokenizerFilesError(
            "this model's tokenizer needs the transformers package (pip install "
            "'transformers>=5'), which reads its vocabulary files") from exc
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError...
        raise TokenizerFilesError(
            f"cannot read the tokenizer files in {directory} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); the model directory must hold "
            "the tokenizer files that came with its weights (tokenizer.json, spiece.model or "
            "vocab.txt, with tokenizer_config.json)") from None

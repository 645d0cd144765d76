"""The tokenizers of the other families, read from the files that come with their weights.

SigLIP (SentencePiece), SigLIP 2 (Gemma's), MetaCLIP 2 (XLM-V), XLM-RoBERTa and Chinese-CLIP's
BERT each ship their vocabulary as Hugging Face tokenizer files.  They are read by the library
made for them, transformers' ``AutoTokenizer`` (over ``tokenizers`` and ``sentencepiece``), never
re-implemented, and called the way each model was trained:

* every text is padded to the model's context (``padding="max_length"``): SigLIP pools its last
  position and was trained on texts padded to 64 tokens, so any other padding changes its
  embeddings (a mistake users of other libraries make often); for the masked and causal towers
  the padding is never computed (see :mod:`clipforge.model.text`);
* padding goes after the text, whatever the files say (Gemma's tokenizer class pads on the
  left by default): every family here was trained so, and a left-padded text moves the pooled
  position of SigLIP and the positions of every other tower;
* text is cleaned before tokenizing as the model's training pipeline cleaned it (``clean``):
  OpenCLIP's ``canonicalize`` (SigLIP: lower case, punctuation removed, whitespace collapsed,
  after ftfy and HTML unescaping), ``whitespace``, ``lower`` or ``none``, or big_vision's
  ``ascii_lower`` (SigLIP 2: ``tf.strings.lower``, which lower-cases the ASCII letters only and
  changes nothing else);
* a text longer than the context is an error (:class:`ContextLengthError`) unless truncation is
  asked for, as with OpenAI's tokenizer; truncation cuts the end of the text and keeps the
  tokenizer's end token (big_vision's ``eos="sticky"``, transformers' ``truncation=True``).

Objects here have the interface of :class:`clipforge.text.Tokenizer`: ``encode``, ``decode``,
``encode_batch`` (numpy, no torch) and calling with texts for a ``LongTensor``.
"""

from __future__ import annotations

import html
import string
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import ftfy
import numpy as np

from .tokenizer import ContextLengthError

if TYPE_CHECKING:
    import torch

CLEANERS = ("none", "canonicalize", "whitespace", "lower", "ascii_lower")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)

#: The files that hold a Hugging Face tokenizer's vocabulary: one of them must be present.
VOCABULARY_FILES = ("tokenizer.json", "spiece.model", "sentencepiece.bpe.model",
                    "tokenizer.model", "vocab.txt", "vocab.json")
#: How many tokenizer directories stay loaded (a model's config reader and its tokenizer read the
#: same files once; a 900,000-token vocabulary such as XLM-V's takes seconds to load).
TOKENIZER_CACHE_SIZE = 4


def basic_clean(text: str) -> str:
    """ftfy, HTML unescaped twice, stripped (OpenCLIP's ``basic_clean``)."""
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def whitespace_clean(text: str) -> str:
    return " ".join(text.split()).strip()


def canonicalize(text: str) -> str:
    """big_vision's ``canonicalize_text`` as OpenCLIP applies it for SigLIP: punctuation removed,
    lower-cased, whitespace collapsed; an underscore first becomes a space, as there."""
    text = basic_clean(text).replace("_", " ").translate(_PUNCTUATION).lower()
    return " ".join(text.split()).strip()


def ascii_lower(text: str) -> str:
    """big_vision's ``lower`` op (``tf.strings.lower`` without an encoding), SigLIP 2's text
    preprocessing: A-Z lower-cased, every other character (Cyrillic, accented...) unchanged."""
    return text.translate(_ASCII_LOWER)


def clean(text: str, how: str) -> str:
    """``text`` cleaned by one of :data:`CLEANERS` (OpenCLIP's names, and ``ascii_lower``)."""
    if how == "ascii_lower":
        return ascii_lower(text)
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
        self.hf = load_hf_tokenizer(self.directory)
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
        return list(self._call(clean(text, self.cleaning), add_special_tokens=False)["input_ids"])

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
        ids = self._call(cleaned, padding="max_length", truncation=True, max_length=length,
                         return_attention_mask=False)["input_ids"]
        out = np.asarray(ids, dtype=np.int64)
        if self.strip_sep and self.hf.sep_token_id is not None:
            out[out == self.hf.sep_token_id] = 0
        return out

    def _call(self, texts: str | list[str], **kwargs):
        """The tokenizer on ``texts``, padding on the right (see the module docstring; its
        truncation side is set when loaded), without the warning transformers logs for a text
        longer than its ``model_max_length`` (ours is the model's context).  One call at a
        time: a fast tokenizer sets its padding and truncation on the shared Rust object before
        each call, and encodes without the GIL, so threads (the server's) could mix settings."""
        with _CALL_LOCK:
            return self.hf(texts, padding_side="right", verbose=False, **kwargs)

    def _check_lengths(self, texts: list[str], cleaned: list[str], length: int) -> None:
        full = self._call(cleaned, return_attention_mask=False)["input_ids"]
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


def load_hf_tokenizer(directory: str | Path):
    """The transformers tokenizer in ``directory`` (``AutoTokenizer``, local files only),
    loaded once while its files are unchanged (:data:`TOKENIZER_CACHE_SIZE` directories).
    :class:`TokenizerFilesError`, naming the directory and what is missing, when it holds no
    vocabulary file (:data:`VOCABULARY_FILES`): transformers would otherwise build an empty or
    default tokenizer from config.json alone, without a word."""
    if not any((Path(directory) / name).is_file() for name in VOCABULARY_FILES):
        raise TokenizerFilesError(
            f"{directory} holds none of the tokenizer files this model reads "
            f"({', '.join(VOCABULARY_FILES)}, with tokenizer_config.json): copy the tokenizer "
            "files that came with its weights into that directory")
    directory = Path(directory).resolve()
    return _load_cached(str(directory), _signature(directory))


def _signature(directory: Path) -> tuple:
    """What identifies a directory's contents for the cache: each file's name, size and time."""
    return tuple(sorted((p.name, st.st_size, st.st_mtime_ns) for p in directory.iterdir()
                        if p.is_file() and (st := p.stat())))


def _load_cached(directory: str, signature: tuple):
    key = (directory, signature)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    tokenizer = _load(Path(directory))
    with _CACHE_LOCK:
        _CACHE[key] = tokenizer
        while len(_CACHE) > max(TOKENIZER_CACHE_SIZE, 0):
            _CACHE.popitem(last=False)
    return tokenizer


_CACHE: OrderedDict = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CALL_LOCK = threading.Lock()


def _load(directory: Path):
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise TokenizerFilesError(
            "this model's tokenizer needs the transformers package (pip install "
            "'transformers>=5'), which reads its vocabulary files") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError...
        raise TokenizerFilesError(
            f"cannot read the tokenizer files in {directory} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); the model directory must hold "
            "the tokenizer files that came with its weights (tokenizer.json, spiece.model or "
            "vocab.txt, with tokenizer_config.json)") from None
    tokenizer.truncation_side = "right"  # a truncated text keeps its start (and end token)
    return tokenizer

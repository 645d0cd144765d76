"""OpenAI's byte-level BPE tokenizer for CLIP, reproduced exactly.

Text is cleaned (``ftfy.fix_text``, HTML-unescaped twice, whitespace collapsed, lower-cased), split
with OpenAI's pattern, mapped byte-by-byte to printable unicode, and merged by BPE with ``</w>``
marking word ends.  Ids: 256 byte symbols, 256 word-final byte symbols, 48,894 merges, then
``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407; padding is 0 (not 49407 as in Hugging
Face), which is what lets the text tower find the end of text as the arg-max id.

The vocabulary file ``bpe_simple_vocab_16e6.txt.gz`` is OpenAI's (MIT licence, see
``LICENSE-bpe_simple_vocab.txt`` beside it).
"""

from __future__ import annotations

import copy
import functools
import gzip
import html
import json
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import ftfy
import numpy as np
import regex

if TYPE_CHECKING:  # torch is imported where tensors are made: the ids alone do not need it
    import torch

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # lines 1..48894 of the vocabulary file
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
SPLIT_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table (no whitespace/control symbols)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def clean_text(text: str) -> str:
    """OpenAI's normalisation: ftfy, HTML unescape twice, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class ContextLengthError(ValueError):
    """A text encodes to more tokens than the model's context holds."""


class Tokenizer:
    """Byte-level BPE with ``encode``/``decode``; calling it tokenizes a batch (as
    :func:`tokenize`), padded to ``context_length`` (77 unless a model says otherwise)."""

    pad_id = 0

    def __init__(self, vocab_path: str | Path | None = None, context_length: int = 77):
        self.context_length = context_length
        self.vocab_path = vocab_path
        path = Path(vocab_path) if vocab_path else resources.files(__package__) / VOCAB_FILE
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        self.merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in self.merges]
        vocab += [SOT, EOT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.bpe_ranks = {merge: rank for rank, merge in enumerate(self.merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.sot_token_id = self.encoder[SOT]
        self.eot_token_id = self.encoder[EOT]
        self._bpe = functools.lru_cache(maxsize=100_000)(self._bpe_uncached)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def with_context_length(self, context_length: int) -> Tokenizer:
        """This tokenizer padding to ``context_length`` (the vocabulary is shared, not copied):
        what a model with another text length carries as ``model.tokenizer``."""
        if context_length == self.context_length:
            return self
        other = copy.copy(self)
        other.context_length = context_length
        return other

    def __reduce__(self) -> tuple:
        """Pickled by reference (the vocabulary file and the context length), not as its
        tables: DataLoader workers that tokenize captions then build (or share) their own."""
        return _rebuild, (self.vocab_path, self.context_length)

    def _bpe_uncached(self, token: str) -> tuple[str, ...]:
        if token in (SOT, EOT):
            return (token,)
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(word)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without the start/end tokens."""
        ids: list[int] = []
        for piece in SPLIT_PATTERN.findall(clean_text(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(piece))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; padding (0 after the end token) and special tokens are dropped."""
        pieces = []
        for i in ids:
            i = int(i)
            if i == self.eot_token_id:
                break
            if i != self.sot_token_id:
                pieces.append(self.decoder[i])
        data = bytearray(self.byte_decoder[c] for c in "".join(pieces))
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: str | Iterable[str], context_length: int | None = None,
                 truncate: bool = False) -> torch.Tensor:
        """[N, context_length] int64 ids: start token, text, end token, zero padding.

        Over-long text raises :class:`ContextLengthError` unless ``truncate`` is set, in which case
        the text is cut and the end-of-text token kept as the last id.
        """
        import torch

        # a copy: a tensor of its own (resizable, shareable), as before this went through numpy
        return torch.tensor(self.encode_batch(texts, context_length, truncate))

    def encode_batch(self, texts: str | Iterable[str], context_length: int | None = None,
                     truncate: bool = False) -> np.ndarray:
        """The ids of :meth:`__call__` as a numpy int64 array, without torch (for deployments
        that run the ONNX encoders, see :mod:`clipforge.onnx.runtime`)."""
        context_length = context_length or self.context_length
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        result = np.zeros((len(texts), context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > context_length:
                if not truncate:
                    preview = text if len(text) <= 60 else text[:57] + "..."
                    raise ContextLengthError(
                        f"text {row} ({preview!r}) is {len(ids)} tokens long, more than the "
                        f"context length {context_length}; shorten it or pass truncate=True "
                        f"(--truncate on the command line)"
                    )
                ids = ids[:context_length]
                ids[-1] = self.eot_token_id
            result[row, : len(ids)] = ids
        return result

    def save_hf_vocabulary(self, directory: str | Path) -> list[Path]:
        """Write ``vocab.json`` and ``merges.txt`` as Hugging Face's CLIPTokenizer reads them."""
        directory = Path(directory)
        vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
        vocab_file.write_text(json.dumps(self.encoder, ensure_ascii=False), encoding="utf-8")
        merges_file.write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges), encoding="utf-8"
        )
        return [vocab_file, merges_file]


def _rebuild(vocab_path: str | Path | None, context_length: int) -> Tokenizer:
    """A pickled :class:`Tokenizer` again (the packaged vocabulary is loaded once per process)."""
    base = get_tokenizer() if vocab_path is None else Tokenizer(vocab_path)
    return base.with_context_length(context_length)


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """The shared tokenizer over the packaged OpenAI vocabulary (loaded once)."""
    return Tokenizer()


def tokenize(texts: str | Iterable[str], context_length: int = 77,
             truncate: bool = False) -> torch.Tensor:
    """openai/CLIP's ``clip.tokenize``: [N, context_length] int64 ids, zero-padded."""
    return get_tokenizer()(texts, context_length=context_length, truncate=truncate)

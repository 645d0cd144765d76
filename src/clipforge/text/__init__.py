"""Text -> token ids: OpenAI's byte-level BPE (packaged), and the Hugging Face tokenizers of the
other families (:mod:`.hf`), read from the files that come with their weights."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .tokenizer import ContextLengthError, Tokenizer, clean_text, get_tokenizer, tokenize

if TYPE_CHECKING:
    from ..configs import CLIPConfig
    from .hf import HFTokenizer


def load_tokenizer(config: CLIPConfig, directory: str | Path | None = None
                   ) -> Tokenizer | HFTokenizer:
    """The tokenizer a model with ``config`` reads, padding to its text length: OpenAI's BPE,
    or (``config.tokenizer.kind == "hf"``) the tokenizer files in ``directory``."""
    spec, length = config.tokenizer, config.text.context_length
    if spec.kind == "openai":
        return get_tokenizer().with_context_length(length)
    from .hf import HFTokenizer, TokenizerFilesError

    if directory is None:
        raise TokenizerFilesError(
            "this model reads a Hugging Face tokenizer, whose files come with its weights; "
            "load it from its directory (or save it with clipforge.save_model, which copies "
            "them) rather than from a single weights file")
    return HFTokenizer(directory, length, clean=spec.clean, strip_sep=spec.strip_sep)


__all__ = ["ContextLengthError", "Tokenizer", "clean_text", "get_tokenizer", "load_tokenizer",
           "tokenize"]

"""Text -> token ids: OpenAI's byte-level BPE."""

from .tokenizer import ContextLengthError, Tokenizer, clean_text, get_tokenizer, tokenize

__all__ = ["ContextLengthError", "Tokenizer", "clean_text", "get_tokenizer", "tokenize"]

"""Train a byte-level BPE vocabulary on a corpus (Hugging Face ``tokenizers``), saved as the
tokenizer files of a model directory, so that a model trained from scratch can read its own
captions' words as single tokens.

Why: OpenAI's vocabulary was learnt on English web text; it spends about one token per Russian
letter and two to three per Chinese character, so a small text tower trained briefly has to
compose every Russian or Chinese word from bytes, and every caption is long.  A vocabulary
learnt on the training captions gives each frequent word of every language one token, and
stays byte-level, so any text still encodes (a word never seen falls back to byte tokens, never
to an unknown token).

The files are what :class:`clipforge.text.hf.HFTokenizer` reads: ``tokenizer.json`` with a
``<start> ... <end>`` template, ``<pad>`` as id 0, text lower-cased and NFKC-normalised.
Training is deterministic: the same corpus gives the same vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..configs import CLIPConfig

PAD, START, END = "<pad>", "<start>", "<end>"
# Chinese is written without spaces, so a BPE learnt on it merges across word boundaries
# ("一个红色的圆形" one token, "一个红" + "色的正方形" another): the colour would then be spelt
# differently with every shape.  Each CJK character (and CJK punctuation) is kept a token of its
# own instead, as BERT's and Chinese-CLIP's tokenizers do.
CJK = r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]"
SPECIAL_TOKENS = (PAD, START, END)


def train_bpe(texts: Iterable[str], directory: str | Path, vocab_size: int = 1024,
              context_length: int | None = None, min_frequency: int = 2) -> Path:
    """Learn a byte-level BPE of at most ``vocab_size`` ids from ``texts`` and save it into
    ``directory`` (created) as tokenizer files; returns the directory.

    ``context_length`` (saved as the tokenizer's ``model_max_length``, the text tower's length
    in :func:`fit_config`): None gives the longest text of ``texts`` in tokens, with its start
    and end tokens, times 1.5, rounded up to a multiple of 8, so that longer prompts than the
    training captions still fit."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    # One leading space, so that a text's first word is the same token as elsewhere ("red"
    # first or after "one"); prefixing every piece instead would glue a space to each CJK one.
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase(),
                                                 normalizers.Prepend(" ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CJK), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                         special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = list(texts)
    if not texts:
        raise ValueError("cannot learn a vocabulary from no texts")
    tokenizer.train_from_iterator(texts, trainer=trainer)
    start, end = tokenizer.token_to_id(START), tokenizer.token_to_id(END)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{START} $A {END}", special_tokens=[(START, start), (END, end)])
    if context_length is None:
        longest = max(len(e.ids) for e in tokenizer.encode_batch(texts))
        context_length = 8 * math.ceil(1.5 * longest / 8)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, bos_token=START,
                                   eos_token=END, model_max_length=context_length)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    return directory


def fit_config(config: CLIPConfig, directory: str | Path) -> CLIPConfig:
    """``config`` with a text tower that reads the vocabulary :func:`train_bpe` saved in
    ``directory``: its vocabulary size and context length, pooled at its end token, with the
    tokenizer files read from the model's directory (``tokenizer.kind`` "hf")."""
    from tokenizers import Tokenizer

    from ..configs import TokenizerConfig
    from .hf import TokenizerFilesError

    directory = Path(directory)
    try:
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        settings = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception for a bad file
        raise TokenizerFilesError(f"cannot read the vocabulary in {directory} ({exc}): learn it "
                                  "again with clipforge.text.vocabulary.train_bpe") from None
    end, length = tokenizer.token_to_id(END), settings.get("model_max_length")
    if end is None or tokenizer.token_to_id(PAD) != 0 or not isinstance(length, int):
        raise TokenizerFilesError(f"the tokenizer in {directory} was not learnt by "
                                  "clipforge.text.vocabulary.train_bpe (it needs <pad> as id 0, "
                                  "an <end> token and model_max_length)")
    text = dataclasses.replace(config.text, vocab_size=tokenizer.get_vocab_size(),
                               context_length=length, pool="eos", eos_id=end, pad_id=0,
                               max_positions=0)
    return config.replace(text=text, tokenizer=TokenizerConfig(kind="hf"))

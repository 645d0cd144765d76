"""The one interface every loaded model has: what embedding, zero-shot, search and the command
line may use, whatever runs the model.

:class:`clipforge.CLIP` (PyTorch, every family) and :class:`clipforge.onnx.OnnxCLIP`
(onnxruntime) both satisfy :class:`Encoder`, and ``clipforge.create_model`` returns one or the
other (``backend="torch"`` or ``"onnx"``).  Code above the models takes an ``Encoder`` and
nothing else, so that a new way of running a model (or a new family) needs no change there:

* inputs: ``preprocess`` (PIL image -> pixels) and ``tokenizer`` (texts -> ids, with the
  model's own vocabulary, cleaning, padding and ``context_length``);
* encoders: ``encode_image(pixels)`` and ``encode_text(ids)``, unnormalised unless asked;
* scores: ``logits(image, text)`` of unit embeddings, ``exp(logit_scale) * cos`` plus
  ``logit_bias`` (None for a softmax model), and ``probabilities(logits)``: a softmax over the
  texts, or an independent sigmoid per pair for a sigmoid-loss model (SigLIP;
  ``config.probability``);
* ``shares_prefixes``: whether ``encode_text_with_prefix`` computes a shared token prefix once
  (a causal tower pooled at the end token; zero-shot prompts use it when it is True);
* ``config`` (embedding size, families' fields) and ``device`` (where inputs go).

This module imports neither torch nor onnxruntime: tensors are torch tensors for the PyTorch
model and torch tensors or numpy arrays for the ONNX one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from .configs import CLIPConfig


@runtime_checkable
class Encoder(Protocol):
    """A loaded CLIP-style model, however it runs (see the module docstring)."""

    config: CLIPConfig
    context_length: int
    preprocess: Callable[[Any], Any]
    tokenizer: Any  # callable texts -> [N, context_length] ids; encode/decode/encode_batch

    @property
    def device(self) -> Any: ...

    @property
    def logit_scale(self) -> Any:
        """The log temperature (a 0-d tensor or array): logits are ``exp(logit_scale) * cos``."""

    @property
    def logit_bias(self) -> Any:
        """The learned logit bias of a sigmoid-loss model; None for a softmax model."""

    @property
    def shares_prefixes(self) -> bool: ...

    def encode_image(self, pixels: Any, normalize: bool = False) -> Any: ...

    def encode_text(self, tokens: Any, normalize: bool = False) -> Any: ...

    def logits(self, image: Any, text: Any) -> Any:
        """[N_img, N_txt] logits of unit image and text embeddings."""

    def probabilities(self, logits: Any) -> Any:
        """Probabilities from :meth:`logits`, as the model was trained to give them."""

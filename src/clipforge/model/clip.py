"""The CLIP model: an image tower and a text tower projected into one embedding space.

The layout and parameter names are openai/CLIP's (``visual.*`` for the image tower, the text tower
at the root), so OpenAI and OpenCLIP state dicts load as they are.  One class serves every
architecture; what differs between RN50 and ViT-bigG-14 is the
:class:`~clipforge.configs.CLIPConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import CLIPConfig
from .transformer import LayerNorm, Transformer
from .vision import build_vision_tower


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        text = config.text
        self.context_length = text.context_length
        self.visual = build_vision_tower(config.vision, config.embed_dim, config.activation)
        self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        self.positional_embedding = nn.Parameter(torch.empty(text.context_length, text.width))
        self.transformer = Transformer(text.width, text.layers, text.heads, text.mlp_width,
                                       config.activation)
        self.ln_final = LayerNorm(text.width)
        self.text_projection = nn.Parameter(torch.empty(text.width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.preprocess: Callable | None = None  # set by clipforge.create_model
        # How to load these weights again ({"model": ..., "weights": ...}), set by create_model.
        self.origin: dict[str, str | None] | None = None
        # "fp32", or "bf16" / "int8" for an inference model made by clipforge.precision, which
        # then also records the digest of the float32 weights it came from (weights_fingerprint
        # returns it; None: computed from the weights themselves)
        self.precision = "fp32"
        self.fingerprint: str | None = None
        self.init_weights()

    def init_weights(self) -> None:
        """OpenAI's initialisation, for training from scratch."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.config.text.width**-0.5)
        with torch.no_grad():
            self.logit_scale.fill_(math.log(1 / 0.07))
        self.transformer.init_weights()
        self.visual.init_weights()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the transformers compute in (bfloat16 for a bf16 or int8 model, whose
        layer norms and output projections stay float32)."""
        return self.token_embedding.weight.dtype

    def train(self, mode: bool = True) -> CLIP:
        """As ``nn.Module.train``, but a bf16 or int8 model refuses training mode: its weights
        are rounded or quantised copies, frozen, and training them would silently drift from
        the float32 checkpoint it names (training uses float32 weights with bf16 autocast)."""
        precision = getattr(self, "precision", "fp32")
        if mode and precision != "fp32":
            raise RuntimeError(
                f"this model was converted to {precision} for inference and cannot be trained; "
                "create it with precision='fp32' (training runs bf16 autocast on float32 weights)"
            )
        return super().train(mode)

    @property
    def device(self) -> torch.device:
        return self.text_projection.device

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """[N, 3, S, S] preprocessed pixels -> [N, embed_dim] image embeddings."""
        features = self.visual(pixels)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """[N, context] token ids (from :func:`clipforge.tokenize`) -> [N, embed_dim].

        Features are taken at the end-of-text token, found as the arg-max id (49407 is the largest
        id).  The transformer runs only up to the last end-of-text position in the batch: with a
        causal mask, positions after it cannot change the pooled features, so this is exact and
        typical prompts (~10 tokens) cost a fraction of the full 77.
        """
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.context_length:
            raise ValueError(
                f"token length {tokens.shape[1]} exceeds the model's context {self.context_length}"
            )
        eot = tokens.argmax(dim=-1)
        length = int(eot.max()) + 1 if tokens.shape[0] else 1
        x = self.token_embedding(tokens[:, :length]) + self.positional_embedding[:length]
        x = self.transformer(x.to(self.dtype), causal=True)
        x = self.ln_final(x.to(self.text_projection.dtype))  # float32 in a bf16 model too
        features = x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text_with_prefix(self, prefix: torch.Tensor, suffixes: torch.Tensor,
                                normalize: bool = False) -> torch.Tensor:
        """``encode_text`` of the sequences ``[prefix; suffixes[i]]`` that share the token prefix
        ``prefix`` [P] (starting with the start token), computing the prefix once.

        Zero-shot prompts built from one template share everything before the class name
        ("<start> a photo of a"), about half their tokens; the causal mask makes sharing exact.
        Each row of ``suffixes`` [N, S] must hold its end-of-text token (zero padded after it).
        """
        if prefix.ndim != 1 or suffixes.ndim != 2:
            raise ValueError("prefix must be [P] and suffixes [N, S] token ids")
        shared = prefix.shape[0]
        eot = suffixes.argmax(dim=-1)
        length = int(eot.max()) + 1 if suffixes.shape[0] else 1
        if shared + length > self.context_length:
            raise ValueError(f"prefix and suffix ({shared} + {length} tokens) exceed the "
                             f"model's context {self.context_length}")
        positions = self.positional_embedding
        suffixes = suffixes[:, :length]
        # Only the tokens up to each row's end token run (packed): padding costs nothing.
        valid = torch.arange(length, device=suffixes.device)[None, :] <= eot[:, None]
        x_p = (self.token_embedding(prefix) + positions[:shared])[None].to(self.dtype)
        x_s = (self.token_embedding(suffixes) + positions[shared:shared + length])[valid]
        last = (eot + 1).cumsum(dim=0) - 1  # each row's end token in the packed order
        x = self.transformer.forward_with_prefix(x_p, x_s.to(self.dtype), valid, keep=last)
        features = self.ln_final(x.to(self.text_projection.dtype)) @ self.text_projection
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled cosine similarities: (logits_per_image [N_img, N_txt], logits_per_text)."""
        image = self.encode_image(images, normalize=True)
        text = self.encode_text(tokens, normalize=True)
        logits_per_image = self.logit_scale.exp() * image @ text.t()
        return logits_per_image, logits_per_image.t()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable
        if hasattr(self.visual, "transformer"):
            self.visual.transformer.grad_checkpointing = enable

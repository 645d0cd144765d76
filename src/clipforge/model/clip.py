"""The CLIP model: an image tower and a text tower projected into one embedding space.

The layout and parameter names are openai/CLIP's (``visual.*`` for the image tower, the text tower
at the root), so OpenAI and OpenCLIP state dicts load as they are.  One class serves every
architecture and every family: what differs between RN50, ViT-bigG-14, SigLIP, MetaCLIP 2 and
Chinese-CLIP is the :class:`~clipforge.configs.CLIPConfig` (see :mod:`.text` for the text
tower's variants and :mod:`.vision` for the image tower's).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import CLIPConfig
from ..image import Preprocess
from ..text import load_tokenizer
from . import text as tower
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
        self.positional_embedding = nn.Parameter(torch.empty(text.positions, text.width))
        # BERT-style towers: one token-type row (every text is segment 0) and a norm over
        # the embeddings; their blocks are post-norm, so there is no final norm
        self.token_type_embedding = (nn.Parameter(torch.empty(text.type_vocab_size, text.width))
                                     if text.type_vocab_size else None)
        post_norm = text.norm == "post"
        self.ln_embed = LayerNorm(text.width, eps=text.ln_eps) if post_norm else None
        self.transformer = Transformer(text.width, text.layers, text.heads, text.mlp_width,
                                       text.activation or config.activation, text.ln_eps,
                                       text.norm)
        self.ln_final = None if post_norm else LayerNorm(text.width, eps=text.ln_eps)
        self.text_projection = tower.make_projection(text, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.zeros(())) if config.logit_bias else None
        # Its image transform and its tokenizer (texts -> ids): those the config names, replaced
        # by clipforge.create_model with the loaded files' own (a Hugging Face tokenizer needs
        # those files: None until then)
        self.preprocess: Callable | None = Preprocess.from_config(config)
        self.tokenizer: Callable | None = (load_tokenizer(config)
                                           if config.tokenizer.kind == "openai" else None)
        # How to load these weights again ({"model": ..., "weights": ...}), set by create_model.
        self.origin: dict[str, str | None] | None = None
        # A fine-tuned model's own classes and head (clipforge.classifier.LinearClassifier,
        # attached by create_model; not a submodule, so state_dict() stays the CLIP weights)
        self.classifier = None
        # "fp32", or "bf16" / "int8" for an inference model made by clipforge.precision, which
        # then also records the digest of the float32 weights it came from (weights_fingerprint
        # returns it; None: computed from the weights themselves)
        self.precision = "fp32"
        self.fingerprint: str | None = None
        self.init_weights()

    def init_weights(self) -> None:
        """OpenAI's initialisation, for training from scratch (SigLIP's temperature and bias
        start at log 10 and -10, as in the SigLIP paper)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.token_type_embedding is not None:
            nn.init.normal_(self.token_type_embedding, std=0.02)
        tower.init_projection(self.text_projection, self.config.text.width)
        with torch.no_grad():
            if self.logit_bias is None:
                self.logit_scale.fill_(math.log(1 / 0.07))
            else:
                self.logit_scale.fill_(math.log(10))
                self.logit_bias.fill_(-10.0)
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
        return self.logit_scale.device

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """[N, 3, S, S] preprocessed pixels -> [N, embed_dim] image embeddings."""
        features = self.visual(pixels)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """[N, context] token ids (from ``model.tokenizer``) -> [N, embed_dim].

        The pooled position, mask and projection are the family's (:mod:`.text`).  Padding
        that cannot change the result is not computed: a causal tower runs only up to the
        last end-of-text position in the batch, a masked tower up to its longest text, so
        typical prompts (~10 tokens) cost a fraction of the full context.  A bidirectional
        tower without a mask (SigLIP) was trained on texts padded to its full context, so
        shorter inputs are padded to it here: the only input it gives the right answer for.
        """
        cfg = self.config.text
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.context_length:
            raise ValueError(
                f"token length {tokens.shape[1]} exceeds the model's context {self.context_length}"
            )
        tokens = tower.pad_to_context(tokens, cfg)
        tokens = tokens[:, :tower.needed_length(tokens, cfg)]
        length = tokens.shape[1]
        offset = cfg.position_offset
        x = self.token_embedding(tokens) + self.positional_embedding[offset:offset + length]
        if self.token_type_embedding is not None:
            x = x + self.token_type_embedding[0]
        if self.ln_embed is not None:
            x = self.ln_embed(x)
        x = self.transformer(x.to(self.dtype), causal=cfg.causal,
                             mask=tower.padding_mask(tokens, cfg))
        out_dtype = tower.projection_dtype(self.text_projection, x.dtype)
        x = x.to(out_dtype)  # float32 in a bf16 model too
        if self.ln_final is not None:
            x = self.ln_final(x)
        features = tower.project(tower.pool(x, tokens, cfg), self.text_projection)
        return F.normalize(features, dim=-1) if normalize else features

    @property
    def shares_prefixes(self) -> bool:
        """Whether :meth:`encode_text_with_prefix` applies: a causal tower pooled at the
        arg-max end token (OpenAI's layout), whose tokens at one position never depend on
        later ones."""
        cfg = self.config.text
        return cfg.causal and cfg.pool == "argmax" and cfg.norm == "pre"

    def encode_text_with_prefix(self, prefix: torch.Tensor, suffixes: torch.Tensor,
                                normalize: bool = False) -> torch.Tensor:
        """``encode_text`` of the sequences ``[prefix; suffixes[i]]`` that share the token prefix
        ``prefix`` [P] (starting with the start token), computing the prefix once.

        Zero-shot prompts built from one template share everything before the class name
        ("<start> a photo of a"), about half their tokens; the causal mask makes sharing exact.
        Each row of ``suffixes`` [N, S] must hold its end-of-text token (zero padded after it).
        """
        if not self.shares_prefixes:
            raise ValueError("encode_text_with_prefix needs a causal text tower pooled at the "
                             "arg-max end token; use encode_text")
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
        x = x.to(tower.projection_dtype(self.text_projection, x.dtype))
        features = tower.project(self.ln_final(x), self.text_projection)
        return F.normalize(features, dim=-1) if normalize else features

    def logits(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """[N_img, N_txt] logits of unit embeddings: ``exp(logit_scale) * cos (+ logit_bias)``."""
        logits = self.logit_scale.exp() * image @ text.t()
        return logits if self.logit_bias is None else logits + self.logit_bias

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities as the model was trained to give them: a softmax over the texts
        (CLIP's contrastive loss) or, for a sigmoid-loss model (SigLIP), an independent
        sigmoid per image-text pair, which need not sum to one."""
        if self.config.probability == "sigmoid":
            return logits.sigmoid()
        return logits.softmax(dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled cosine similarities (plus the bias of a SigLIP model):
        (logits_per_image [N_img, N_txt], logits_per_text)."""
        image = self.encode_image(images, normalize=True)
        text = self.encode_text(tokens, normalize=True)
        logits_per_image = self.logits(image, text)
        return logits_per_image, logits_per_image.t()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable
        if hasattr(self.visual, "transformer"):
            self.visual.transformer.grad_checkpointing = enable

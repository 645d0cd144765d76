"""The model and its loss as one module: what DistributedDataParallel wraps and what the
optimiser and checkpoints see (SigLIP's bias lives in the loss)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..loss import SigLipLoss, clip_loss, clip_loss_chunked, upcast
from ..model import CLIP
from .config import LOSSES


class Objective(nn.Module):
    def __init__(self, model: CLIP, loss: str = "clip"):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
        self.model = model
        self.siglip = SigLipLoss() if loss == "siglip" else None

    def init_temperature(self) -> None:
        """The starting temperature each loss was designed with: 1/0.07 (CLIP) or 10 (SigLIP)."""
        with torch.no_grad():
            self.model.logit_scale.fill_(math.log(10.0 if self.siglip else 1 / 0.07))

    def loss_fn(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor
                ) -> torch.Tensor:
        """Loss of unit-norm local features (gathered across ranks inside)."""
        if self.siglip is not None:
            return self.siglip(image, text, logit_scale)
        return clip_loss(image, text, logit_scale)

    def chunked_loss_fn(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor
                        ) -> torch.Tensor:
        """``loss_fn`` for GradCache's full-batch loss step: the same value and gradients, but
        the CLIP loss never holds the N x N logits (``clip_loss_chunked``; single process only,
        it falls back to ``clip_loss`` across ranks).  SigLIP is unchanged."""
        if self.siglip is not None:
            return self.siglip(image, text, logit_scale)
        return clip_loss_chunked(image, text, logit_scale)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        image = F.normalize(upcast(self.model.encode_image(images)), dim=-1)
        text = F.normalize(upcast(self.model.encode_text(tokens)), dim=-1)
        return self.loss_fn(image, text, self.model.logit_scale)

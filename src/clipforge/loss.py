"""Contrastive objectives: CLIP's symmetric cross-entropy and SigLIP's pairwise sigmoid.

Both take unit-norm features.  Under torch.distributed every rank passes its *local* features: the
other ranks' features are all-gathered with gradient, and each rank computes only its own rows of
the similarity matrix (memory linear in the global batch, not quadratic).  With
DistributedDataParallel averaging gradients over ranks, the result equals one process computing
the loss over the whole global batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

LOGIT_SCALE_MAX = math.log(100.0)  # the paper clips the temperature so that exp(t) <= 100


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 for the softmax and sums; float32/float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """All ranks' features, concatenated in rank order; gradients flow back to their owners."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    from torch.distributed._functional_collectives import all_gather_tensor_autograd

    # The autograd-aware gather: its backward sends each rank the gradient of its own slice.
    return all_gather_tensor_autograd(features.contiguous(), gather_dim=0,
                                      group=dist.group.WORLD)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor
              ) -> torch.Tensor:
    """The paper's loss: mean of the image->text and text->image cross-entropies over the scaled
    cosine-similarity matrix, with the matching pairs on the diagonal as targets.

    ``logit_scale`` is the log temperature (the model parameter), exponentiated here.
    """
    scale = logit_scale.exp()
    all_image, all_text = gather_with_grad(image), gather_with_grad(text)
    logits_per_image = scale * image @ all_text.t()  # local rows x global columns
    logits_per_text = scale * text @ all_image.t()
    labels = torch.arange(image.shape[0], device=image.device) + _rank() * image.shape[0]
    return (F.cross_entropy(upcast(logits_per_image), labels)
            + F.cross_entropy(upcast(logits_per_text), labels)) / 2


class SigLipLoss(nn.Module):
    """SigLIP (Zhai et al. 2023): an independent binary decision for every image-text pair,
    ``-log sigmoid(z_ij * (t * cos_ij + b))`` with z = +1 on the diagonal and -1 elsewhere,
    summed over pairs and divided by the batch size.  It owns the learned bias ``b`` (initialised
    to -10 as in the paper); the temperature stays the model's ``logit_scale``, which SigLIP
    initialises to log(10)."""

    def __init__(self, bias_init: float = -10.0):
        super().__init__()
        self.logit_bias = nn.Parameter(torch.tensor(bias_init))

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor
                ) -> torch.Tensor:
        all_text = gather_with_grad(text)
        logits = upcast(logit_scale.exp() * image @ all_text.t() + self.logit_bias)
        offset = _rank() * image.shape[0]
        signs = -torch.ones_like(logits)
        rows = torch.arange(image.shape[0], device=image.device)
        signs[rows, rows + offset] = 1.0
        return -F.logsigmoid(signs * logits).sum() / image.shape[0]

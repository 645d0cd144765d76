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


class _ChunkedClipLoss(torch.autograd.Function):
    """The CLIP loss of ``clip_loss_chunked``, forward and backward, a row chunk at a time.

    With s = exp(logit_scale), S = s I T^T (N x N) and L = (1/2N) sum_i (lse_j S_ij - S_ii)
    + (1/2N) sum_j (lse_i S_ij - S_jj):

        G := dL/dS = (P + Q - 2 Id) / 2N,  P = softmax over rows of S, Q = softmax over columns,
        dL/dI = s G T,   dL/dT = s G^T I,   dL/dlogit_scale = sum_ij G_ij S_ij  (dS/dt = S).

    Forward keeps only the row and column log-sum-exps (two vectors of N); backward recomputes
    S in blocks of ``chunk`` rows, so P, Q and G are never held for more than ``chunk`` rows
    (about three ``chunk`` x N buffers at a time, updated in place).
    """

    @staticmethod
    def forward(ctx, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                chunk: int) -> torch.Tensor:
        image_, text_ = upcast(image), upcast(text)
        scale = float(logit_scale.detach().exp())
        n = image_.shape[0]

        def row_lse(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
            """lse over each row of s * left @ right^T, ``chunk`` rows at a time."""
            return torch.cat([torch.logsumexp((block @ right.t()).mul_(scale), dim=1)
                              for block in left.split(chunk)])

        lse_rows = row_lse(image_, text_)  # image -> text: rows of S
        lse_cols = row_lse(text_, image_)  # text -> image: rows of S^T = s T I^T
        diagonal = scale * (image_ * text_).sum(dim=1)
        loss = ((lse_rows - diagonal).sum() + (lse_cols - diagonal).sum()) / (2 * n)
        ctx.save_for_backward(image, text, logit_scale, lse_rows, lse_cols)
        ctx.chunk = chunk
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        image, text, logit_scale, lse_rows, lse_cols = ctx.saved_tensors
        image_, text_ = upcast(image), upcast(text)
        scale = float(logit_scale.detach().exp())
        n, chunk = image_.shape[0], ctx.chunk
        grad_image = torch.empty_like(image_)
        grad_text = torch.zeros_like(text_)
        grad_scale = torch.zeros((), dtype=image_.dtype, device=image_.device)
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            block = image_[rows]
            logits = (block @ text_.t()).mul_(scale)  # these rows of S
            g = (logits - lse_rows[rows, None]).exp_()  # P
            g += (logits - lse_cols[None, :]).exp_()  # + Q
            index = torch.arange(rows.start, rows.stop, device=g.device)
            g[index - start, index] -= 2
            g *= grad_loss.to(g.dtype) / (2 * n)  # G, times the incoming gradient
            grad_scale += g.flatten() @ logits.flatten()
            grad_image[rows] = (g @ text_).mul_(scale)
            grad_text.addmm_(g.t(), block, alpha=scale)
        return (grad_image.to(image.dtype), grad_text.to(text.dtype),
                grad_scale.to(logit_scale.dtype).reshape(logit_scale.shape), None)


def clip_loss_chunked(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                      chunk: int | None = None) -> torch.Tensor:
    """``clip_loss`` with the same value and gradients, holding at most ``chunk`` x N logits at
    a time instead of several N x N matrices (4 GiB each in float32 at N = 32,768): the loss
    for GradCache's full-batch step.  ``chunk`` defaults to the rows that fit 2**24 logits
    (64 MiB in float32; 512 rows at N = 32,768, all rows up to N = 4,096), so the loss's memory
    stays flat in N.  The logits are computed in float32 (float64 for float64 features).

    Single-process only: under torch.distributed with more than one rank it falls back to
    ``clip_loss``, whose per-rank logits are already local rows x global columns.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return clip_loss(image, text, logit_scale)
    if chunk is None:
        chunk = max(1, (1 << 24) // max(1, image.shape[0]))
    return _ChunkedClipLoss.apply(image, text, logit_scale, chunk)


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
        return sigmoid_loss(image, text, logit_scale, self.logit_bias)


def sigmoid_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor) -> torch.Tensor:
    """:class:`SigLipLoss` with a given bias (a SigLIP model's own ``logit_bias``, when it is
    fine-tuned with the loss it was pretrained with)."""
    all_text = gather_with_grad(text)
    logits = upcast(logit_scale.exp() * image @ all_text.t() + logit_bias)
    offset = _rank() * image.shape[0]
    signs = -torch.ones_like(logits)
    rows = torch.arange(image.shape[0], device=image.device)
    signs[rows, rows + offset] = 1.0
    return -F.logsigmoid(signs * logits).sum() / image.shape[0]

"""The parts of a text tower that differ between families, as small functions of the config.

A text tower is always: token (+ position, + token-type) embeddings, a transformer, a pooling
of its tokens, a projection.  What the families change is data (:class:`TextConfig`):

* ``causal`` attention (CLIP, MetaCLIP 2) or bidirectional (SigLIP, BERT, XLM-RoBERTa);
* a padding mask (``mask_padding``: BERT and XLM-RoBERTa ignore their padding; SigLIP attends to
  it, having been trained on texts padded to its full length);
* the pooled position: the arg-max id (OpenAI's end-of-text is its largest id), the first
  end-of-sequence id (transformers' CLIP/MetaCLIP 2 with other vocabularies), the last position
  (SigLIP), the first (BERT's [CLS]: Chinese-CLIP), or the mean of the real tokens (OpenCLIP's
  XLM-RoBERTa towers);
* the projection: a bare matrix (OpenAI), a biased linear layer (SigLIP), a two-layer MLP
  (OpenCLIP's Hugging Face towers) or none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import TextConfig
from .linear import Linear

try:
    from torch.compiler import is_compiling as _is_compiling
except ImportError:  # torch < 2.3
    from torch._dynamo import is_compiling as _is_compiling


def end_positions(tokens: torch.Tensor, cfg: TextConfig) -> torch.Tensor | None:
    """Per row, the position a causal tower pools (its end-of-text token), or None when the
    pooled position is not an end token (``last``, ``first``, ``mean``)."""
    if cfg.pool == "argmax":
        return tokens.argmax(dim=-1)
    if cfg.pool == "eos":
        # first occurrence; a row without one pools position 0, as transformers does
        return (tokens == cfg.eos_id).int().argmax(dim=-1)
    return None


def pad_to_context(tokens: torch.Tensor, cfg: TextConfig) -> torch.Tensor:
    """``tokens`` padded (with ``pad_id``) to the full context when the tower attends to its
    padding: a bidirectional tower without a mask (SigLIP) was trained on texts padded to its
    full length, the only input it gives the right answer for.  Other towers never see their
    padding, and their tokens are returned as they are.  The pad is written unconditionally
    (a width of 0 at full length) so that an exported graph takes every length."""
    if cfg.causal or cfg.mask_padding:
        return tokens
    return F.pad(tokens, (0, cfg.context_length - tokens.shape[1]), value=cfg.pad_id)


def needed_length(tokens: torch.Tensor, cfg: TextConfig) -> int:
    """How many leading positions can change the pooled features: the rest of the padding
    is not computed.  Exact: a causal tower's end token never sees what follows it, and a
    masked tower's real tokens never see its padding; a bidirectional tower without a mask
    (SigLIP) sees everything, so it runs at full length.

    The length is data.  ``.item()`` gives it as a Python int when the model runs, and as a
    size bounded by the checks below while ``torch.export`` traces (ONNX export), so the
    exported graph computes it from its input like this code does, never from the example
    it was traced with."""
    if tokens.shape[0] == 0:
        return 1
    if cfg.causal and (ends := end_positions(tokens, cfg)) is not None:
        last = ends
    elif cfg.mask_padding:
        real = (tokens != cfg.pad_id).int()
        last = real.shape[1] - 1 - real.flip(dims=[1]).argmax(dim=1)
    else:
        return tokens.shape[1]
    length = (last.max() + 1).item()
    torch._check(length >= 1)
    torch._check(length <= tokens.shape[1])
    return length


def padding_mask(tokens: torch.Tensor, cfg: TextConfig) -> torch.Tensor | None:
    """Boolean [N, 1, 1, L] attention mask, True for keys that are real tokens (masked towers).

    While torch traces the model (ONNX export, torch.compile) it is spelt out to [N, 1, L, L]:
    broadcasting a row over a length computed from the data (:func:`needed_length`) depends on
    whether that length is 1, which torch.export cannot know.  Only then: the attention kernels
    run up to 15 % slower with the full mask, and the values are the same."""
    if not cfg.mask_padding:
        return None
    mask = (tokens != cfg.pad_id)[:, None, None, :]
    if _is_compiling():
        mask = mask.expand(-1, -1, tokens.shape[1], -1)
    return mask


def pool(x: torch.Tensor, tokens: torch.Tensor, cfg: TextConfig) -> torch.Tensor:
    """[N, L, W] token features -> [N, W], at the position (or mean) the family pools."""
    ends = end_positions(tokens, cfg)
    if ends is not None:
        return x[torch.arange(x.shape[0], device=x.device), ends]
    if cfg.pool == "first":
        return x[:, 0]
    if cfg.pool == "last":
        return x[:, -1]
    if cfg.pool == "mean":
        real = (tokens != cfg.pad_id).unsqueeze(-1).to(x.dtype)
        return (x * real).sum(dim=1) / real.sum(dim=1)
    raise ValueError(f"unknown text pooling {cfg.pool!r}")


def make_projection(cfg: TextConfig, embed_dim: int) -> nn.Module | nn.Parameter | None:
    """The text projection: a [width, embed_dim] Parameter used as ``x @ P`` (OpenAI's layout,
    ``matrix``), a biased ``Linear`` (``linear``), OpenCLIP's MLP for Hugging Face towers
    (``mlp``: Linear, GELU, Linear, no biases, hidden width ``proj_hidden``) or None."""
    if cfg.proj == "matrix":
        return nn.Parameter(torch.empty(cfg.width, embed_dim))
    if cfg.proj == "linear":
        return Linear(cfg.width, embed_dim)
    if cfg.proj == "mlp":
        hidden = cfg.proj_hidden or (cfg.width + embed_dim) // 2
        return nn.Sequential(Linear(cfg.width, hidden, bias=False), nn.GELU(),
                             Linear(hidden, embed_dim, bias=False))
    if cfg.proj == "none":
        return None
    raise ValueError(f"unknown text projection {cfg.proj!r}")


def project(x: torch.Tensor, projection: nn.Module | nn.Parameter | None) -> torch.Tensor:
    if projection is None:
        return x
    if isinstance(projection, nn.Parameter):
        return x @ projection
    return projection(x)


def projection_dtype(projection: nn.Module | nn.Parameter | None, fallback: torch.dtype
                     ) -> torch.dtype:
    """The dtype pooled features are projected in (float32 in a bf16 model too)."""
    if projection is None:
        return fallback
    if isinstance(projection, nn.Parameter):
        return projection.dtype
    return next(projection.parameters()).dtype


def init_projection(projection: nn.Module | nn.Parameter | None, width: int) -> None:
    std = width**-0.5
    if isinstance(projection, nn.Parameter):
        nn.init.normal_(projection, std=std)
    elif projection is not None:
        for module in projection.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

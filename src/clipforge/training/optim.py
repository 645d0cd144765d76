"""AdamW with the paper's parameter groups, and a cosine schedule with linear warm-up."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Gains and biases (every tensor under 2-D), embeddings and the temperature are not decayed:
    shrinking them towards zero only hurts (CLIP paper; OpenCLIP's defaults)."""
    return (param.ndim < 2 or name.endswith(("embedding", "embedding.weight"))
            or "logit_scale" in name or "logit_bias" in name)


def build_optimizer(module: nn.Module, lr: float, weight_decay: float = 0.2,
                    betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6,
                    lr_scale: Callable[[str], float] | None = None) -> torch.optim.AdamW:
    """AdamW over ``module``'s trainable parameters, without decay where
    :func:`no_weight_decay` says; ``lr_scale(name)`` (e.g. layer-wise decay) multiplies a
    parameter's rate, one group per (decay, scale)."""
    groups: dict[tuple[bool, float], list[torch.Tensor]] = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            key = (not no_weight_decay(name, param), 1.0 if lr_scale is None else lr_scale(name))
            groups.setdefault(key, []).append(param)
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": weight_decay if decayed else 0.0, "lr": lr * scale}
         for (decayed, scale), params in sorted(groups.items(), key=lambda kv: kv[0],
                                                reverse=True)],
        lr=lr, betas=betas, eps=eps)


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from ~0 to the base rate over ``warmup_steps``, then a cosine decay to zero
    at ``total_steps``.  A LambdaLR, so its state checkpoints with the run."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

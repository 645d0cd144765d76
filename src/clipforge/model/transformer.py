"""The pre-norm transformer shared by the ViT image tower and the text tower.

Parameter names follow openai/CLIP (``ln_1``, ``attn.in_proj_weight``, ``mlp.c_fc`` ...) so that
OpenAI and OpenCLIP state dicts load without renaming.  Attention goes through
``torch.nn.functional.scaled_dot_product_attention``, which picks the fastest kernel available.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}; choose quick_gelu or gelu")


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back, so fp16/bf16 weights stay numerically safe."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.float16, torch.bfloat16):
            return super().forward(x)
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                            self.bias.float(), self.eps).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection (nn.MultiheadAttention's layout)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        n, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = make_activation(activation)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int, activation: str):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width, mlp_width, activation)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks on [batch, tokens, width] tensors."""

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, activation: str):
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_width, activation) for _ in range(layers)
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal=causal)
        return x

    def init_weights(self) -> None:
        """OpenAI's initialisation (std scaled by width and depth)."""
        proj_std = self.width**-0.5 * (2 * len(self.resblocks)) ** -0.5
        attn_std = self.width**-0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

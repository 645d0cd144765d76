"""The transformer shared by the ViT image towers and the text towers of every family.

Parameter names follow openai/CLIP (``ln_1``, ``attn.in_proj_weight``, ``mlp.c_fc`` ...) so that
OpenAI and OpenCLIP state dicts load without renaming.  Attention goes through
``torch.nn.functional.scaled_dot_product_attention``, which picks the fastest kernel available,
except where it is known not to (:func:`attention`).

What differs between families is data, not classes: the activation, the layer-norm epsilon,
causal or bidirectional attention, a padding mask, and where the norms sit.  CLIP and SigLIP
blocks normalise before each residual branch (pre-norm); BERT and XLM-RoBERTa text towers (the
Chinese and multilingual families) normalise after each residual sum (post-norm); EVA02-E
normalises each branch's output before adding it (``res_post``).  timm's Eva towers (PE-Core,
EVA02) add, as options of the same blocks: rotary position encoding of queries and keys
(:mod:`.rope`), a gated MLP (SwiGLU), and layer norms inside the attention (``ln_inner``, before
its output projection) and the MLP (``mlp.ln``, on the hidden layer), with OpenCLIP's names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .linear import Linear, PacksWeights
from .rope import Rope, rotate

try:
    from torch.compiler import is_compiling as _is_compiling
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3: no kernel choice (nor its CPU flash kernel's slow backward)
    sdpa_kernel = None

QUICK_GELU_SCALE = 1.702
# PyTorch's flash-attention kernel for CPU is slow to differentiate in bfloat16 on short
# sequences: its backward takes 2-4 times as long as the math kernel's at 40-77 tokens,
# and less time from about 200 on (torch 2.13, Xeon with AMX;
# benchmarks/bench_attention.py).  Its forward alone, and float32, are faster at every length.
MATH_KERNEL_MAX_TOKENS = 128


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """``scaled_dot_product_attention``, with the math kernel where the flash one is slow:
    bfloat16 training on CPU with up to MATH_KERNEL_MAX_TOKENS keys (a text tower, a small
    ViT: 13 % off the first run's step).  The kernels differ by round-off only."""
    if (sdpa_kernel is not None and q.requires_grad and q.device.type == "cpu"
            and q.dtype == torch.bfloat16 and k.shape[-2] <= MATH_KERNEL_MAX_TOKENS
            and not _is_compiling()):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return x * torch.sigmoid(QUICK_GELU_SCALE * x)
        # Without autograd, in place on one buffer: the same values, bit for bit, in one
        # allocation instead of three (2.4 times faster on MLP-sized tensors here).
        return (x * QUICK_GELU_SCALE).sigmoid_().mul_(x)


def make_activation(name: str) -> nn.Module:
    """``quick_gelu`` (OpenAI's weights), ``gelu`` (exact, erf: LAION's, BERT's),
    ``gelu_tanh`` (the tanh approximation: SigLIP's), ``silu`` (the gate of EVA02's SwiGLU)."""
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"unknown activation {name!r}; choose quick_gelu, gelu, gelu_tanh or silu")


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back, so fp16/bf16 weights stay numerically safe."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.float16, torch.bfloat16):
            return super().forward(x)
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                            self.bias.float(), self.eps).to(x.dtype)


class Attention(PacksWeights):
    """Multi-head self-attention with a fused q/k/v projection (nn.MultiheadAttention's layout).
    Its projections pack their weights for CPU inference (:mod:`clipforge.model.linear`)."""

    def __init__(self, width: int, heads: int, inner_norm: bool = False, eps: float = 1e-5):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        # EVA02's sub-LN: the heads' output normalised before the output projection
        self.ln_inner = LayerNorm(width, eps=eps) if inner_norm else None
        self.out_proj = Linear(width, width)

    def _in_proj(self, x: torch.Tensor) -> torch.Tensor:
        """The fused q/k/v projection, [..., width] -> [..., 3 width].  One method, so that
        :mod:`clipforge.precision` can put an int8 layer in its place."""
        return self.packed_linear(x, self.in_proj_weight, self.in_proj_bias)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """[3, batch, heads, tokens, head width] queries, keys and values."""
        n, length, width = x.shape
        qkv = self._in_proj(x)
        return qkv.view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)

    def _out(self, heads: torch.Tensor) -> torch.Tensor:
        n, _, length, _ = heads.shape
        return self._project(heads.transpose(1, 2).reshape(n, length, -1))

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """The heads' outputs, side by side [..., width], through the output projection."""
        if self.ln_inner is not None:
            x = self.ln_inner(x)
        return self.out_proj(x)

    def forward(self, x: torch.Tensor, causal: bool = False,
                mask: torch.Tensor | None = None, rope: Rope | None = None) -> torch.Tensor:
        """``mask``: boolean [N, 1, 1, L] (or [N, 1, L, L]), True where a key may be attended
        (padding masked); never given together with ``causal`` (causal towers pool before
        their padding).
        ``rope``: the rotary tables of the last tokens (the patches), whose queries and keys
        are turned; the tokens before them (a class token) are not."""
        q, k, v = self._qkv(x)
        if rope is not None:
            q, k = rotate(q, rope), rotate(k, rope)
        return self._out(attention(q, k, v, mask, causal))

    def forward_with_prefix(self, prefix: torch.Tensor, suffix: torch.Tensor,
                            valid: torch.Tensor, keep: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal attention over ``[prefix; suffix_i]`` for many sequences sharing ``prefix``
        [1, P, W], the prefix computed once.  The suffixes come packed, their tokens one after
        another in ``suffix`` [T, W]; ``valid`` [N, S] marks, row by row, the positions they
        fill (a prefix of each row), so the projections run on the T real tokens only and
        just the attention sees the padded [N, S] layout.  Returns both outputs, the suffix's
        packed again (only its ``keep`` tokens, when given)."""
        qp, kp, vp = self._qkv(prefix)
        n, length = valid.shape
        packed = self._in_proj(suffix)
        padded = packed.new_zeros(n, length, packed.shape[-1])
        padded[valid] = packed
        qs, ks, vs = padded.view(n, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        shared = prefix.shape[1]
        k = torch.cat([kp.expand(n, -1, -1, -1), ks], dim=2)
        v = torch.cat([vp.expand(n, -1, -1, -1), vs], dim=2)
        # suffix position i sees the whole prefix and suffix positions <= i (padding comes
        # after a row's tokens, so no real position sees it)
        mask = torch.ones(length, shared + length, dtype=torch.bool,
                          device=suffix.device).tril(diagonal=shared)
        out_s = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask)
        out_s = out_s.transpose(1, 2).reshape(n, length, -1)[valid]
        if keep is not None:
            out_s = out_s[keep]
        out_p = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
        return self._out(out_p), self._project(out_s)


class MLP(nn.Module):
    """``c_proj(act(c_fc(x)))``; gated (``gated``, SwiGLU with ``silu``): ``c_fc`` makes the
    gate and the value in one product, ``[gate; value]`` along its outputs, and the hidden
    layer is ``act(gate) * value``.  ``norm``: a layer norm on the hidden layer (EVA02's
    sub-LN, OpenCLIP's ``scale_fc``)."""

    def __init__(self, width: int, hidden: int, activation: str, gated: bool = False,
                 norm: bool = False, eps: float = 1e-5):
        super().__init__()
        self.gated = gated
        self.c_fc = Linear(width, 2 * hidden if gated else hidden)
        self.gelu = make_activation(activation)
        self.ln = LayerNorm(hidden, eps=eps) if norm else None
        self.c_proj = Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, value = self.c_fc(x).chunk(2, dim=-1)
            x = self.gelu(gate) * value
        else:
            x = self.gelu(self.c_fc(x))
        if self.ln is not None:
            x = self.ln(x)
        return self.c_proj(x)


# Where a block's norms sit: before each branch (CLIP), after each residual sum (BERT), or on
# each branch's output before it is added (EVA02-E)
NORMS = ("pre", "post", "res_post")


class ResidualAttentionBlock(nn.Module):
    """Attention and MLP, each a residual branch.  ``norm`` "pre" (CLIP, SigLIP, PE, EVA02):
    ``x + f(ln(x))``.  "post" (BERT, XLM-RoBERTa): ``ln(x + f(x))``, ``ln_1`` after the
    attention and ``ln_2`` after the MLP.  "res_post" (EVA02-E): ``x + ln(f(x))``.
    ``gated``, ``attn_norm`` and ``mlp_norm``: see :class:`MLP` and :class:`Attention`."""

    def __init__(self, width: int, heads: int, mlp_width: int, activation: str,
                 eps: float = 1e-5, norm: str = "pre", *, gated: bool = False,
                 attn_norm: bool = False, mlp_norm: bool = False):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm placement {norm!r}; choose one of {', '.join(NORMS)}")
        self.norm = norm
        self.ln_1 = LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, attn_norm, eps)
        self.ln_2 = LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_width, activation, gated, mlp_norm, eps)

    def forward(self, x: torch.Tensor, causal: bool = False,
                mask: torch.Tensor | None = None, rope: Rope | None = None) -> torch.Tensor:
        if self.norm == "post":
            x = self.ln_1(x + self.attn(x, causal=causal, mask=mask, rope=rope))
            return self.ln_2(x + self.mlp(x))
        if self.norm == "res_post":
            x = x + self.ln_1(self.attn(x, causal=causal, mask=mask, rope=rope))
            return x + self.ln_2(self.mlp(x))
        x = x + self.attn(self.ln_1(x), causal=causal, mask=mask, rope=rope)
        return x + self.mlp(self.ln_2(x))

    def forward_with_prefix(self, prefix: torch.Tensor, suffix: torch.Tensor,
                            valid: torch.Tensor, keep: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        attn_p, attn_s = self.attn.forward_with_prefix(self.ln_1(prefix), self.ln_1(suffix),
                                                       valid, keep)
        if keep is not None:  # past the attention, the other tokens are not needed
            suffix = suffix[keep]
        prefix, suffix = prefix + attn_p, suffix + attn_s
        return prefix + self.mlp(self.ln_2(prefix)), suffix + self.mlp(self.ln_2(suffix))


class Transformer(nn.Module):
    """A stack of residual attention blocks on [batch, tokens, width] tensors."""

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, activation: str,
                 eps: float = 1e-5, norm: str = "pre", **block: bool):
        """``block``: the options of :class:`ResidualAttentionBlock` (gated, attn_norm,
        mlp_norm)."""
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_width, activation, eps, norm, **block)
            for _ in range(layers)
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, causal: bool = False,
                mask: torch.Tensor | None = None, rope: Rope | None = None) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, mask, rope, use_reentrant=False)
            else:
                x = block(x, causal=causal, mask=mask, rope=rope)
        return x

    def forward_with_prefix(self, prefix: torch.Tensor, suffix: torch.Tensor,
                            valid: torch.Tensor, keep: torch.Tensor | None = None
                            ) -> torch.Tensor:
        """The causal pass over ``[prefix; suffix_i]`` for many sequences that share a prefix
        [1, P, W]: the prefix runs once, each suffix attends to its keys and values.  Suffix
        tokens come packed, [T, W], ``valid`` [N, S] marking where each row's tokens go (see
        ``Attention.forward_with_prefix``).  Returns the suffix tokens' outputs, packed, equal
        (to round-off) to those of the full causal pass over each whole sequence: with a
        causal mask the prefix never sees the suffix.  With ``keep`` (packed token indices),
        only those tokens' outputs are returned, and the last layer computes nothing else
        after its attention (the pooled end tokens are all a text tower needs)."""
        last = len(self.resblocks) - 1
        for i, block in enumerate(self.resblocks):
            prefix, suffix = block.forward_with_prefix(prefix, suffix, valid,
                                                       keep if i == last else None)
        return suffix

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

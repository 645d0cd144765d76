"""Image towers: the Vision Transformer and OpenAI's modified ResNet.

Both map normalised pixels [N, 3, H, W] to [N, embed_dim] (before L2 normalisation), with the
parameter names of openai/CLIP's ``model.py``.  Both also give what they compute on the way
(``forward_intermediates``, OpenCLIP's method and output: each chosen block's or stage's
features as [N, C, H, W] maps, a ViT's class token apart), and the ResNet's attention pool its
output at every position (:meth:`AttentionPool2d.positions`); :mod:`.dense` turns them into
per-patch embeddings in the joint space.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import VisionConfig
from . import text as tower
from .linear import Linear, PacksWeights
from .rope import Rope, keep_rows, rope_tables
from .transformer import MLP, LayerNorm, Transformer

# What forward_intermediates returns (OpenCLIP's keys): "image_intermediates" (a list of
# [N, C, H, W] maps, or [N, H*W, C] with output_fmt "NLC"), "image_intermediates_prefix" (a
# ViT's class token per block, [N, 1, C], when asked for and the tower has one) and
# "image_features" (the tower's output, as forward gives it; not with intermediates_only)
Intermediates = dict[str, torch.Tensor | list[torch.Tensor]]
OUTPUT_FORMATS = ("NCHW", "NLC")


def take_indices(count: int, indices: int | Sequence[int] | None) -> list[int]:
    """The blocks (or stages) ``indices`` selects among ``count``, as timm's
    ``feature_take_indices`` reads it (and OpenCLIP after it): None, all of them; an int n,
    the last n; a sequence, those (negative ones counted from the end)."""
    if indices is None:
        indices = count
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise ValueError(f"cannot take the last {indices} of {count} blocks: choose 1 to "
                             f"{count}")
        return list(range(count - indices, count))
    taken = []
    for index in indices:
        if not -count <= index < count:
            raise ValueError(f"block index {index} is out of range for {count} blocks "
                             f"(0 to {count - 1}, or negative from the end)")
        taken.append(index % count)
    if not taken:
        raise ValueError("indices is empty: give at least one block index")
    return taken


def _check_format(output_fmt: str, allowed: Sequence[str] = OUTPUT_FORMATS) -> None:
    if output_fmt not in allowed:
        raise ValueError(f"unknown output_fmt {output_fmt!r}; choose {' or '.join(allowed)}")


class VisionTransformer(nn.Module):
    """Patchify, add positions, transformer, pool, project.

    OpenAI's CLIP (the defaults): a patch convolution without bias, a class token, ``ln_pre``,
    then ``ln_post`` on the class token and ``x @ proj``.  SigLIP (config data, not another
    class): a biased patch convolution, no class token, no ``ln_pre``, ``ln_post`` on every
    token, then a multi-head attention-pooling head (:class:`MAPHead`) and no projection.
    timm's Eva towers (PE-Core, EVA02) add rotary position encoding (computed per call from
    the config, :mod:`.rope`), the block options of :class:`~.transformer.Transformer`, a head
    with its own head count, and a biased projection (``proj`` "linear", timm's ``head``).
    """

    def __init__(self, cfg: VisionConfig, embed_dim: int, activation: str):
        super().__init__()
        width, patch = cfg.width, cfg.patch_size
        activation = cfg.activation or activation
        self.image_size = cfg.image_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=cfg.patch_bias)
        scale = width**-0.5
        grid = cfg.image_size // patch
        self.class_embedding = (nn.Parameter(scale * torch.randn(width)) if cfg.class_token
                                else None)
        tokens = grid * grid + int(cfg.class_token)
        self.positional_embedding = nn.Parameter(scale * torch.randn(tokens, width))
        self.ln_pre = LayerNorm(width, eps=cfg.ln_eps) if cfg.ln_pre else nn.Identity()
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_width, activation,
                                       cfg.ln_eps, cfg.norm, gated=cfg.mlp_gated,
                                       attn_norm=cfg.attn_norm, mlp_norm=cfg.mlp_norm)
        # rope_tables' arguments (the tables are derived, not weights: made per call)
        self.rope = ((grid, width // cfg.heads, cfg.rope_theta, cfg.rope_grid, cfg.rope_offset,
                      cfg.rope_indexing) if cfg.rope else None)
        self.ln_post = LayerNorm(width, eps=cfg.ln_eps)
        self.attn_pool = (MAPHead(width, cfg.pool_heads or cfg.heads,
                                  cfg.pool_mlp_width or cfg.mlp_width, activation, cfg.ln_eps)
                          if cfg.pool == "map" else None)
        self.proj: nn.Parameter | nn.Module | None = None
        if cfg.proj == "matrix":
            self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))
        elif cfg.proj == "linear":
            self.proj = Linear(width, embed_dim)
        self.patch_dropout = 0.0  # FLIP: fraction of patch tokens dropped while training

    @property
    def output_dtype(self) -> torch.dtype:
        """The dtype the pooled features are projected in: the projection's (float32 also in a
        bf16 model, see clipforge.precision), or ``ln_post``'s without a projection."""
        return tower.projection_dtype(self.proj, self.ln_post.weight.dtype)

    def _drop_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a random subset of patch tokens (always the class token): FLIP (Li et al. 2023)
        trains on 50-75% fewer tokens for nearly the same accuracy.  Returns the tokens and
        the kept patches' numbers [batch, kept] (for their rotary tables)."""
        first = int(self.class_embedding is not None)
        keep = max(1, int(round((x.shape[1] - first) * (1 - self.patch_dropout))))
        scores = torch.rand(x.shape[0], x.shape[1] - first, device=x.device)
        index = scores.topk(keep, dim=-1).indices
        patches = x.gather(1, (index + first)[..., None].expand(-1, -1, x.shape[2]))
        return torch.cat([x[:, :first], patches], dim=1), index

    def rope_tables(self, device: torch.device) -> Rope | None:
        """The rotary tables of every patch (None without rotary encoding)."""
        return None if self.rope is None else rope_tables(*self.rope, device=device)

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.conv1.kernel_size[0]

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patches: the class token (1) or none (0)."""
        return int(self.class_embedding is not None)

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] pixels -> [N, tokens, width]: the transformer's output, before
        ``ln_post`` and pooling."""
        x, rope = self.embed(pixels)
        return self.transformer(x, rope=rope)

    def embed(self, pixels: torch.Tensor, drop: bool = True) -> tuple[torch.Tensor, Rope | None]:
        """[N, 3, S, S] pixels -> the transformer's input [N, tokens, width] (after ``ln_pre``)
        and the patches' rotary tables.  ``drop``: apply patch dropout while training
        (forward_intermediates keeps every patch, its maps need the whole grid)."""
        x = self.conv1(pixels.to(self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # [N, grid*grid, width]
        if self.class_embedding is not None:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
        if x.shape[1] != self.positional_embedding.shape[0]:
            raise ValueError(
                f"expected {self.image_size}x{self.image_size} images, got "
                f"{tuple(pixels.shape[-2:])}: use the model's preprocess transform"
            )
        x = x + self.positional_embedding.to(x.dtype)
        rope = self.rope_tables(x.device)
        if drop and self.training and self.patch_dropout > 0:
            x, kept = self._drop_patches(x)
            rope = None if rope is None else keep_rows(rope, kept)
        return self.ln_pre(x), rope

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pool(self.tokens(pixels))

    def forward_intermediates(self, pixels: torch.Tensor,
                              indices: int | Sequence[int] | None = None,
                              stop_early: bool = False, normalize_intermediates: bool = False,
                              intermediates_only: bool = False, output_fmt: str = "NCHW",
                              output_extra_tokens: bool = False) -> Intermediates:
        """The outputs of the blocks ``indices`` selects (see :func:`take_indices`), as
        OpenCLIP's ``forward_intermediates`` gives them: the patch tokens as [N, width, grid,
        grid] maps ("NCHW") or [N, grid*grid, width] ("NLC"); the class token apart
        ("image_intermediates_prefix", with ``output_extra_tokens``; a tower without one has
        no such key); ``normalize_intermediates``: each through ``ln_post``.  Also the
        embedding (``image_features``, equal to ``forward``'s) unless ``intermediates_only``;
        ``stop_early`` with ``intermediates_only`` skips the blocks after the last one taken.
        Why: segmentation and detection heads, probes and MaskCLIP-style maps read these."""
        _check_format(output_fmt)
        blocks = self.transformer.resblocks
        taken = take_indices(len(blocks), indices)
        x, rope = self.embed(pixels, drop=False)
        last = max(taken) if stop_early and intermediates_only else len(blocks) - 1
        kept = []
        for i, block in enumerate(blocks[:last + 1]):
            x = block(x, rope=rope)
            if i in taken:
                kept.append(self.ln_post(x) if normalize_intermediates else x)
        first = self.prefix_tokens
        out: Intermediates = {"image_intermediates": [self._patch_map(y[:, first:], output_fmt)
                                                      for y in kept]}
        if output_extra_tokens and first:
            out["image_intermediates_prefix"] = [y[:, :first] for y in kept]
        if not intermediates_only:
            out["image_features"] = self.pool(x)
        return out

    def _patch_map(self, patches: torch.Tensor, output_fmt: str) -> torch.Tensor:
        """[N, grid*grid, C] patch tokens (row-major) -> [N, C, grid, grid] for "NCHW"."""
        if output_fmt == "NLC":
            return patches
        n, _, width = patches.shape
        return patches.reshape(n, self.grid, self.grid, width).permute(0, 3, 1, 2).contiguous()

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The transformer's output [N, tokens, width] -> the image embedding [N, embed_dim]:
        ``ln_post`` on the class token (or the attention-pooling head on every token), then
        the projection."""
        if self.attn_pool is not None:
            pooled = self.attn_pool(self.ln_post(x)).to(self.output_dtype)
        else:
            # ln_post and the projection run in the projection's dtype: float32 also in a
            # bf16 model (clipforge.precision), so the embedding is not rounded at the end
            pooled = self.ln_post(x[:, 0].to(self.output_dtype))
        return tower.project(pooled, self.proj)

    def init_weights(self) -> None:
        self.transformer.init_weights()
        if isinstance(self.proj, nn.Module):
            tower.init_projection(self.proj, self.proj.in_features)
        if self.attn_pool is not None:
            self.attn_pool.init_weights()


class MAPHead(PacksWeights):
    """Multi-head attention pooling (SigLIP, PE): a learned probe attends to every token, then
    a residual MLP on the layer-normed result (``x + mlp(ln(x))``).  The fused q/k/v layout of
    ``nn.MultiheadAttention`` (which transformers' SigLIP head is): the probe makes the query,
    the tokens the keys and values."""

    def __init__(self, width: int, heads: int, mlp_width: int, activation: str, eps: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.probe = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = Linear(width, width)
        self.ln = LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_width, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, tokens, width] -> [N, width]."""
        n, length, width = x.shape
        head = width // self.heads
        w_q, w_kv = self.in_proj_weight.split([width, 2 * width])
        b_q, b_kv = self.in_proj_bias.split([width, 2 * width])
        q = self.packed_linear(self.probe.to(x.dtype), w_q, b_q)
        q = q.view(1, 1, self.heads, head).transpose(1, 2).expand(n, -1, -1, -1)
        kv = self.packed_linear(x, w_kv, b_kv).view(n, length, 2, self.heads, head)
        k, v = kv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, 1, width)
        out = self.out_proj(out)
        out = out + self.mlp(self.ln(out))
        return out[:, 0]

    def init_weights(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)


class Bottleneck(nn.Module):
    """ResNet bottleneck whose strided version average-pools before the 3x3->1x1 path
    (anti-aliasing), as in OpenAI's modified ResNet."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            # OpenAI's key names: "-1" (pool, no parameters), "0" (conv), "1" (norm).
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """Multi-head attention of the mean feature (as query) over the spatial grid."""

    def __init__(self, grid: int, width: int, heads: int, out_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) / width**0.5)
        self.k_proj = Linear(width, width)
        self.q_proj = Linear(width, width)
        self.v_proj = Linear(width, width)
        self.c_proj = Linear(width, out_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # [N, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        n, length, width = x.shape
        head_dim = width // self.heads
        q = self.q_proj(x[:, :1]).view(n, 1, self.heads, head_dim).transpose(1, 2)
        k = self.k_proj(x).view(n, length, self.heads, head_dim).transpose(1, 2)
        v = self.v_proj(x).view(n, length, self.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        # the output projection's dtype: float32 also in a bf16 model (clipforge.precision)
        out = out.transpose(1, 2).reshape(n, width).to(self.c_proj.weight.dtype)
        return self.c_proj(out)

    def positions(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, H, W, out_dim]: the pool's output at every position, the value
        and output projections of the position's feature plus its positional embedding,
        without the attention that mixes them.  The pooled output is the attention-weighted
        mean of these (per head), so each says what its position contributes: the per-position
        features MaskCLIP (Zhou et al. 2022) and its followers read from CLIP's ResNets."""
        n, _, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [N, HW, C]
        tokens = tokens + self.positional_embedding[1:].to(tokens.dtype)
        out = self.v_proj(tokens).to(self.c_proj.weight.dtype)
        return self.c_proj(out).reshape(n, height, width, -1)


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet: three-conv stem with average pooling, anti-aliased strided blocks,
    attention pooling in place of global average pooling."""

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        width = cfg.width
        if cfg.image_size % 32:
            raise ValueError(f"ResNet image size {cfg.image_size} is not a multiple of 32")
        self.image_size = cfg.image_size
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        self._inplanes = width
        self.layer1 = self._make_layer(width, cfg.layers[0])
        self.layer2 = self._make_layer(width * 2, cfg.layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, cfg.layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, cfg.layers[3], stride=2)
        self.attnpool = AttentionPool2d(cfg.image_size // 32, width * 32, cfg.heads, embed_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem(self, pixels: torch.Tensor) -> torch.Tensor:
        """The three convolutions and the average pool before the first stage."""
        x = pixels.to(self.conv1.weight.dtype)
        if x.device.type == "cpu":
            # oneDNN's convolutions want channels-last activations: given NCHW they reorder
            # every layer's input and output (RN50 runs 30 % faster in float32 here, 1x1
            # convolutions 3.5 times).  The weights keep their layout; values change by
            # round-off only.
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.avgpool(self.relu3(self.bn3(self.conv3(x))))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixels)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        self._check_grid(x, pixels)
        return self.attnpool(x)

    def _check_grid(self, x: torch.Tensor, pixels: torch.Tensor) -> None:
        """The last stage's grid must be the one the attention pool's positions were made
        for."""
        if x.shape[-1] * x.shape[-2] + 1 != self.attnpool.positional_embedding.shape[0]:
            raise ValueError(
                f"expected {self.image_size}x{self.image_size} images, got "
                f"{tuple(pixels.shape[-2:])}: use the model's preprocess transform"
            )

    def forward_intermediates(self, pixels: torch.Tensor,
                              indices: int | Sequence[int] | None = None,
                              stop_early: bool = False, normalize_intermediates: bool = False,
                              intermediates_only: bool = False, output_fmt: str = "NCHW",
                              output_extra_tokens: bool = False) -> Intermediates:
        """The outputs of the five stages (the stem, then ``layer1`` to ``layer4``) that
        ``indices`` selects (:func:`take_indices`), [N, C, H, W] each, and the embedding
        (``image_features``) unless ``intermediates_only``: OpenCLIP's method for its
        ResNet.  As there, ``normalize_intermediates`` and ``output_extra_tokens`` do not
        apply (no final norm, no class token); ``stop_early`` with ``intermediates_only``
        skips the stages after the last one taken."""
        _check_format(output_fmt, ("NCHW",))
        stages = [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]
        taken = take_indices(len(stages), indices)
        last = max(taken) if stop_early and intermediates_only else len(stages) - 1
        x, kept = pixels, []
        for i, stage in enumerate(stages[:last + 1]):
            x = stage(x)
            if i in taken:
                kept.append(x)
        out: Intermediates = {"image_intermediates": kept}
        if not intermediates_only:
            self._check_grid(x, pixels)
            out["image_features"] = self.attnpool(x)
        return out

    def positions(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] pixels -> [N, grid, grid, embed_dim]: the attention pool's output at
        each position of the last stage (:meth:`AttentionPool2d.positions`), unnormalised."""
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(pixels)))))
        self._check_grid(x, pixels)
        return self.attnpool.positions(x)

    def init_weights(self) -> None:
        pool = self.attnpool
        std = pool.c_proj.in_features**-0.5
        for linear in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            nn.init.normal_(linear.weight, std=std)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for name, param in stage.named_parameters():
                if name.endswith("bn3.weight"):
                    nn.init.zeros_(param)


def build_vision_tower(cfg: VisionConfig, embed_dim: int, activation: str) -> nn.Module:
    if cfg.is_vit:
        return VisionTransformer(cfg, embed_dim, activation)
    return ModifiedResNet(cfg, embed_dim)

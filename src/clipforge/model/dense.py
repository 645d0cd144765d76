"""Per-patch image embeddings in the joint space, without training: where in the image a text is.

CLIP is trained on one embedding per image, but its towers compute features per patch (ViT) or
per position (ResNet) on the way.  Read naively, the last layer's patch tokens do not live in
the joint space: the last attention layer mixes every token into the pooled one.  The known
training-free recipes (MaskCLIP, Zhou et al. 2022, "Extract Free Dense Labels from CLIP") read
the path each patch takes *into* the pooled embedding instead:

* ViT pooled at the class token (OpenAI, LAION, EVA): the last block runs with each token
  attending only to itself, which is MaskCLIP's value-embedding path: ``x + out_proj(v(ln_1 x))``,
  then the block's MLP on that as usual (the official MaskCLIP code keeps the residual and the
  MLP), then ``ln_post`` and the projection on every patch.  Done by the block itself under a
  self-only attention mask (softmax over one key is exactly 1), so every block variant (norm
  placement, sub-LNs, gated MLPs, rotary positions) takes the path it takes in the tower.
* ViT pooled by an attention head (SigLIP, PE-Core): the head's value path per patch: the head
  applied to each patch token alone (its probe attends to one key), ``out_proj(v(x))`` plus the
  head's residual MLP, then the projection if the tower has one.
* OpenAI's ResNets: the attention pool's output at each position
  (:meth:`~.vision.AttentionPool2d.positions`, ``c_proj(v_proj(x + pos))``), whose
  attention-weighted mean is the pooled embedding.

Each yields [N, grid, grid, embed_dim]; its cosine with a text embedding is a similarity map
(:mod:`clipforge.dense` maps it back onto the image).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import text as tower
from .clip import CLIP
from .vision import ModifiedResNet, VisionTransformer

# OpenAI's ResNet halves the grid five times (stride-2 stem convolution, the stem's pool, three
# strided stages): one attention-pool position per 32x32 input pixels
RESNET_STRIDE = 32


def cell_size(visual: VisionTransformer | ModifiedResNet) -> int:
    """The side, in the model's input pixels, of the square one map position covers (a ViT's
    patch; 32 for a ResNet).  A ViT whose patches do not tile its input leaves the last
    ``image_size - grid * patch`` rows and columns unseen."""
    if isinstance(visual, VisionTransformer):
        return visual.conv1.kernel_size[0]
    return RESNET_STRIDE


def _self_only(length: int, device: torch.device) -> torch.Tensor:
    """The attention mask under which each token attends to itself alone."""
    return torch.eye(length, dtype=torch.bool, device=device)


def _vit_class_token(visual: VisionTransformer, pixels: torch.Tensor) -> torch.Tensor:
    """MaskCLIP on a class-token tower: [N, patches, embed_dim]."""
    x, rope = visual.embed(pixels, drop=False)
    *blocks, last = visual.transformer.resblocks
    for block in blocks:
        x = block(x, rope=rope)
    x = last(x, mask=_self_only(x.shape[1], x.device), rope=rope)
    patches = x[:, visual.prefix_tokens:].to(visual.output_dtype)
    return tower.project(visual.ln_post(patches), visual.proj)


def _vit_attention_head(visual: VisionTransformer, pixels: torch.Tensor) -> torch.Tensor:
    """The attention-pooling head's value path on every patch: [N, patches, embed_dim]."""
    x, rope = visual.embed(pixels, drop=False)
    x = visual.transformer(x, rope=rope)
    patches = visual.ln_post(x)[:, visual.prefix_tokens:]
    n, length, width = patches.shape
    # the head over each patch alone: its probe's softmax over one key is exactly 1
    pooled = visual.attn_pool(patches.reshape(n * length, 1, width)).to(visual.output_dtype)
    return tower.project(pooled, visual.proj).reshape(n, length, -1)


def patch_embeddings(visual: VisionTransformer | ModifiedResNet,
                     pixels: torch.Tensor) -> torch.Tensor:
    """[N, 3, S, S] preprocessed pixels -> [N, grid, grid, embed_dim] unnormalised per-patch
    (per-position) embeddings, by the recipe of the tower's pooling (see the module
    docstring), rows top to bottom."""
    if isinstance(visual, ModifiedResNet):
        return visual.positions(pixels)
    if not isinstance(visual, VisionTransformer):
        raise TypeError(f"no dense recipe for an image tower of type {type(visual).__name__}")
    if visual.attn_pool is None:
        flat = _vit_class_token(visual, pixels)
    else:
        flat = _vit_attention_head(visual, pixels)
    return flat.reshape(flat.shape[0], visual.grid, visual.grid, -1)


def encode_dense(model: CLIP, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """The image tower's per-patch embeddings in the joint space, [N, grid, grid, embed_dim],
    L2-normalised unless ``normalize`` is False: their cosine with a unit text embedding
    (``encode_text(..., normalize=True)``) is the text's similarity map."""
    if not isinstance(model, CLIP):
        raise TypeError(f"dense features need the PyTorch model (clipforge.CLIP), not "
                        f"{type(model).__name__}: load it with backend='torch'")
    features = patch_embeddings(model.visual, pixels.to(model.device))
    return F.normalize(features, dim=-1) if normalize else features


__all__ = ["RESNET_STRIDE", "cell_size", "encode_dense", "patch_embeddings"]

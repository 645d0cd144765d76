"""``--method lora``: low-rank adapters (Hu et al. 2022) on the image tower, through peft.

The adapters sit on every transformer block's attention and MLP projections: the fused q/k/v
projection (``attn.in_proj_weight``, a bare parameter in openai/CLIP's layout, adapted through
peft's ``target_parameters``), the attention's output projection and the MLP's two layers.  In
OpenAI's ResNet they sit where its computation is: every bottleneck's three convolutions (peft's
convolutional LoRA: a rank-r convolution of the same kernel, then a 1x1 back up) and the
attention pool's q, k, v and output projections; the BatchNorms stay as pretrained.
The pretrained weights stay frozen; the adapters and the head are trained.  At the end the
adapters are saved on their own (``OUTPUT/adapter/``, peft's format, to re-apply to the base
model) and merged into the tower, so the run's model is a plain CLIP that loads without peft
and that WiSE-FT mixes like a fully fine-tuned one.

peft is an optional dependency (the ``finetune`` extra): it is imported only here, and only
when a LoRA run starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ...model import CLIP
from ...model.linear import PacksWeights
from .config import FinetuneConfig

ADAPTER_DIR = "adapter"
# The Linear projections of the transformer blocks (peft matches the full module name)
TARGET_MODULES = r".*transformer\.resblocks\.\d+\.(attn\.out_proj|mlp\.c_fc|mlp\.c_proj)"
TARGET_PARAMETERS = ["in_proj_weight"]
# OpenAI's ResNet: the bottlenecks' convolutions and the attention pool's projections
RESNET_MODULES = r".*(layer[1-4]\.\d+\.conv[123]|attnpool\.(q_proj|k_proj|v_proj|c_proj))"


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ImportError("--method lora needs the peft library: pip install "
                          "'clipforge[finetune]' (or pip install peft)") from None
    return peft


def check(model: CLIP) -> None:
    """Refuse a LoRA run that cannot work before reading any data: peft missing."""
    _peft()


def add_adapters(model: CLIP, config: FinetuneConfig) -> nn.Module:
    """Wrap ``model.visual`` in place with fresh adapters (zero at the start: the tower computes
    what it did); returns the peft model, whose only trainable parameters are the adapters."""
    check(model)
    peft = _peft()
    if model.config.vision.is_vit:
        targets = {"target_modules": TARGET_MODULES, "target_parameters": TARGET_PARAMETERS}
    else:
        targets = {"target_modules": RESNET_MODULES}
    lora = peft.LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                           lora_dropout=config.lora_dropout, bias="none", **targets)
    return peft.get_peft_model(model.visual, lora)


def save_and_merge(adapted: Any, output: Path, write: bool = True) -> nn.Module:
    """Save the adapters to ``output/adapter`` (unless ``write`` is False: a torchrun process
    other than rank 0) and merge them into the tower; returns the plain tower (the same module
    as ``model.visual``)."""
    if write:
        adapted.save_pretrained(output / ADAPTER_DIR)
    tower = adapted.merge_and_unload()
    _unwrap_nested(tower)
    _drop_packed(tower)
    return tower


def _unwrap_nested(tower: nn.Module) -> None:
    """peft 0.21 unloads the outer wrapper only where a module adapted through
    ``target_parameters`` (the attention, for its q/k/v) holds an adapted layer (its output
    projection): merge that inner layer if it is not yet and put its base layer back, so the
    tower's tensors have their plain names again."""
    from peft.tuners.lora import LoraLayer

    for name, layer in list(tower.named_modules()):
        if isinstance(layer, LoraLayer):
            if not layer.merged:
                layer.merge()
            parent, _, child = name.rpartition(".")
            setattr(tower.get_submodule(parent), child, layer.get_base_layer())


def _drop_packed(module: nn.Module) -> None:
    """peft merges by writing ``weight.data``, which the packed-weight caches cannot see (no
    version change): drop them, so that inference packs the merged weights."""
    for layer in module.modules():
        if isinstance(layer, PacksWeights):
            layer.drop_packed()

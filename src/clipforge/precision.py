"""Inference precisions: ``fp32`` (exact), ``bf16`` and ``int8`` encoders for fast CPU inference.

Why: image embedding is compute bound.  A 2-core Zen 4 peaks at about 208 GFLOP/s in float32,
so ViT-B-32 (8.8 GFLOP per image) cannot pass about 24 images/s; its AVX-512 bf16 instructions
double the rate of the matrix products and VNNI (int8 dot products) quadruples it.

* ``fp32``: the model as loaded (embeddings equal to openai/CLIP's to float32 round-off).

In every mode the linear layers of a CPU model keep oneDNN-packed copies of their weights for
inference (:mod:`clipforge.model.linear`): that is what brings float32 to the machine's peak.
* ``bf16``: weights and activations in bfloat16, except where rounding would cost accuracy for
  nothing: layer norms compute in float32 (their parameters stay float32), and the final
  projections (``visual.proj``, ``text_projection``, the ResNet attention pool's ``c_proj``)
  and ``logit_scale`` stay float32, so embeddings come back as float32.  For the ResNet tower,
  batch norms are folded into the convolutions (in float32, before rounding) and the tower runs
  channels-last, the layout oneDNN's convolutions want.  QuickGELU MLPs run SiLU on rescaled
  weights (:func:`_quick_gelu_as_silu`): the same function in one pass instead of three.
* ``int8``: the bf16 model with every linear layer of the transformers and of the attention
  pool (not the final projections) replaced by :class:`Int8Linear`: weights int8 per output
  channel, activations quantised per token at run time (symmetric, no calibration data),
  multiplied by oneDNN's int8 kernels on a weight packed once (AMX on Xeons that have it,
  VNNI elsewhere; ``torch._int_mm`` off x86).  This is torchao's
  ``Int8DynamicActivationInt8WeightConfig`` recipe, done here without the dependency and
  without the deprecated ``torch.ao.quantization.quantize_dynamic``; the attention's fused
  q/k/v projection is quantised too.  Convolutions stay bf16 (int8 convolutions need
  calibrated static quantisation).

A converted model is for inference only: it is in eval mode, its parameters do not require
gradients and ``model.train()`` raises (training uses float32 weights with bf16 autocast).  It
carries the fingerprint of the float32 weights it was made from as ``model.fingerprint``
(see :func:`clipforge.weights.fingerprint.weights_fingerprint`), so its queries are accepted by
a search index built with the float32 model, and ``model.origin["precision"]`` names the mode.
Accuracy against float32 (cosine of embeddings, zero-shot agreement) and throughput are
measured by ``benchmarks/bench_precision.py``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .model import CLIP
from .model.linear import PacksWeights, may_pack_int8
from .model.transformer import MLP, QUICK_GELU_SCALE, Attention, LayerNorm, QuickGELU
from .model.vision import AttentionPool2d, ModifiedResNet
from .weights.fingerprint import weights_fingerprint

PRECISIONS = ("fp32", "bf16", "int8")
log = logging.getLogger("clipforge.precision")


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` computes in bfloat16 natively: CPUs with AVX-512 BF16 or AMX, GPUs
    from Ampere on.  Elsewhere PyTorch emulates bfloat16, and it is a trap rather than a
    saving: on a 2-core AVX2 EPYC (no AVX-512), a 1024 x 1024 matrix product took 2.7 s in
    bfloat16 against 0.022 s in float32 (2026-12-03)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True  # MPS, XPU...: their own kernels; nothing known to emulate
    checks = [getattr(torch.cpu, name, None) for name in
              ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


def warn_if_emulated(precision: str, device: str | torch.device) -> None:
    """Log a warning when ``precision`` asks for bfloat16 arithmetic that ``device`` can only
    emulate: the user asked for speed and would get a run tens of times slower."""
    if precision in ("bf16", "int8") and not native_bf16(device):
        log.warning("precision %s on this CPU: it has neither AVX-512 BF16 nor AMX, so "
                    "PyTorch emulates bfloat16 and runs tens of times slower than float32 "
                    "here; use fp32 (training: --precision auto picks it)", precision)


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a ValueError that lists them
    (checked before a model is loaded, so a typo costs nothing)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of "
                         f"{', '.join(PRECISIONS)}")
    return precision


def apply_precision(model: CLIP, precision: str) -> CLIP:
    """Convert ``model`` (float32, eval mode) in place to ``precision`` and return it.

    ``fp32`` changes nothing but ``model.origin["precision"]``.  ``bf16`` and ``int8`` make an
    inference-only model (see the module docstring); ``int8`` needs a CPU model, since its
    matrix products are written for the CPU's integer instructions.  Converting a model to the
    precision it has is a no-op; to any other, a ValueError (rounded weights cannot be
    unrounded).
    """
    check_precision(precision)
    current = getattr(model, "precision", "fp32")
    if current != "fp32":
        if precision == current:
            return model
        raise ValueError(f"model is already {current}; convert from float32 weights (load "
                         f"them again with precision={precision!r})")
    if precision != "fp32":
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        if dtypes != {torch.float32}:
            raise ValueError(f"precision={precision!r} converts a float32 model; this one holds "
                             f"{', '.join(sorted(map(str, dtypes)))} weights")
        if precision == "int8" and model.device.type != "cpu":
            raise ValueError("precision='int8' runs on CPU (VNNI int8 matrix products); "
                             f"use 'bf16' on {model.device.type}")
        warn_if_emulated(precision, model.device)
        # The float32 weights' digest, taken before rounding: the converted model queries
        # indexes that these weights built.
        fingerprint = weights_fingerprint(model)
        model.eval()
        with torch.no_grad():
            if isinstance(model.visual, ModifiedResNet):
                _fold_batch_norms(model.visual)
            _quick_gelu_as_silu(model)
            _to_bfloat16(model)
            if precision == "int8":
                _replace_linears(model, Int8Linear)
            if isinstance(model.visual, ModifiedResNet):
                model.visual.to(memory_format=torch.channels_last)
        model.requires_grad_(False)
        model.fingerprint = fingerprint
        model.precision = precision
    if model.origin is not None:
        model.origin = {**model.origin, "precision": precision}
    return model


# ------------------------------------------------------------------------------------ bf16
def _final_projections(model: CLIP) -> list[nn.Module | nn.Parameter]:
    """What maps pooled features to the embedding, in every family: the text projection (a
    matrix, a biased linear layer or OpenCLIP's MLP), the image projection (absent in SigLIP,
    whose attention-pooling head ends the tower) and the ResNet attention pool's output."""
    finals: list[nn.Module | nn.Parameter] = []
    for projection in (model.text_projection, getattr(model.visual, "proj", None)):
        if projection is not None:
            finals.append(projection)
    finals += [m.c_proj for m in model.modules() if isinstance(m, AttentionPool2d)]
    return finals


def _float32_parameters(model: CLIP) -> set[int]:
    """Parameters kept float32 in a bf16 model: layer norms (which compute in float32 anyway,
    so bf16 copies would only be converted back on every call), the final projections (the
    embedding is not rounded at the end), the temperature and the logit bias."""
    keep: list[nn.Parameter] = [model.logit_scale]
    if model.logit_bias is not None:
        keep.append(model.logit_bias)
    for final in _final_projections(model):
        keep += [final] if isinstance(final, nn.Parameter) else list(final.parameters())
    for module in model.modules():
        if isinstance(module, LayerNorm):
            keep += list(module.parameters())
    return {id(p) for p in keep}


def _to_bfloat16(model: CLIP) -> None:
    keep = _float32_parameters(model)
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and id(param) not in keep:
                param.data = param.data.to(torch.bfloat16)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                module._buffers[name] = buffer.to(torch.bfloat16)


def _quick_gelu_as_silu(model: CLIP) -> None:
    """QuickGELU(y) = y sigmoid(1.702 y) = SiLU(1.702 y) / 1.702: scale each QuickGELU MLP's
    first layer by 1.702 and its second layer's weight by 1 / 1.702 (in float32, before any
    rounding, so the rounded weights are as close as before) and run SiLU, one fused pass
    over the hidden activations instead of three.  Per-channel int8 scales absorb the factors
    exactly.  Not in a gated MLP, whose first layer also makes the value."""
    for mlp in model.modules():
        if isinstance(mlp, MLP) and isinstance(mlp.gelu, QuickGELU) and not mlp.gated:
            mlp.c_fc.weight.mul_(QUICK_GELU_SCALE)
            mlp.c_fc.bias.mul_(QUICK_GELU_SCALE)
            mlp.c_proj.weight.div_(QUICK_GELU_SCALE)
            mlp.gelu = nn.SiLU()


def _fold_batch_norms(tower: ModifiedResNet) -> None:
    """Fold each eval-mode BatchNorm into the convolution before it (in float32): one pass
    over the activations fewer per convolution, and the folded weights are rounded once."""
    pairs: list[tuple[nn.Module, str, str]] = [(tower, "conv1", "bn1"), (tower, "conv2", "bn2"),
                                               (tower, "conv3", "bn3")]
    for stage in (tower.layer1, tower.layer2, tower.layer3, tower.layer4):
        for block in stage:
            pairs += [(block, "conv1", "bn1"), (block, "conv2", "bn2"), (block, "conv3", "bn3")]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))
    for parent, conv_name, bn_name in pairs:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
        setattr(parent, bn_name, nn.Identity())


# ------------------------------------------------------------------------------------ int8
class Int8Linear(PacksWeights):
    """``y = x W^T + b`` with int8 weights (symmetric, one scale per output channel) and
    activations quantised per row at run time (symmetric, one scale per token), multiplied
    in integers, then rescaled and biased.

    Per-token scales follow each token's range (no calibration set, no clipping of an
    outlying token by the others); per-channel weight scales keep small rows precise.  Output
    in the input's dtype.  Inference only: no gradients flow through the integer product.

    On x86 the product is oneDNN's (``onednn::qlinear_pointwise`` on a weight packed once,
    :mod:`clipforge.model.linear`): AMX int8 tiles where the CPU has them, VNNI elsewhere.  It
    applies the weight scales and writes the input's dtype; the per-token scale and the bias
    follow in one pass.  ``torch._int_mm`` (oneDNN's BLAS-style int8 GEMM, which has no AMX
    kernel) is the fallback elsewhere and under tracing.  Measured on ViT-B-32 images (batch
    32, one thread): 1.9x the ``_int_mm`` path on a Xeon with AMX, 1.3x with AVX-512 VNNI only
    (``benchmarks/bench_precision.py``, docs/benchmarks.md).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        quantised = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_int8", quantised.contiguous())  # [out, in], nn.Linear's
        self.register_buffer("weight_scale", scale.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls(linear.weight, linear.bias)

    def dequantised_weight(self) -> torch.Tensor:
        """The float32 [out, in] weight this layer multiplies by (for tests and checks)."""
        return self.weight_int8.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features)
        codes, step = quantise_rows(rows)
        if may_pack_int8(rows, self.weight_int8):
            out = self._onednn(codes, step, x.dtype)
        else:
            out = self._int_mm(codes, step)
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _onednn(self, codes: torch.Tensor, step: torch.Tensor, dtype: torch.dtype
                ) -> torch.Tensor:
        """oneDNN's packed int8 product, in ``dtype`` where it can write it (bf16, float32).
        The codes go in unsigned (+128, zero point 128): see :mod:`clipforge.model.linear`."""
        dtype = dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32
        packed, zeros = self.packed_int8(self.weight_int8)
        unsigned = codes.view(torch.uint8).bitwise_xor_(128)  # two's complement + 128
        out = torch.ops.onednn.qlinear_pointwise(unsigned, 1.0, 128, packed, self.weight_scale,
                                                 zeros, None, 1.0, 0, dtype, "none", [], "")
        step = step.to(dtype)
        if self.bias is None:
            return out.mul_(step)
        return torch.addcmul(self.bias.to(dtype), out, step)

    def _int_mm(self, codes: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """The portable product (float32 result): ``torch._int_mm`` into int32, rescaled."""
        out = torch._int_mm(codes, self.weight_int8.t()).float()
        out.mul_(step).mul_(self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


def quantise_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of each row of ``rows`` [M, K] and each row's step [M, 1] (float32;
    ``rows ~ codes * step``): ``step = max |row| / 127``, codes rounded half to even.

    The largest magnitude of a bf16 row is read from its bits (sign cleared, compared as
    int16: bf16 orders like its bit patterns), twice as fast as ``abs().amax()``; the codes
    are computed in float32 (rounded once), so they are the same either way."""
    if rows.dtype == torch.bfloat16:
        bits = rows.view(torch.int16).bitwise_and(0x7FFF)
        amax = bits.amax(dim=1, keepdim=True).view(torch.bfloat16).float()
    else:
        amax = rows.abs().amax(dim=1, keepdim=True).float()
    amax.clamp_(min=1e-12)
    # The explicit float32 copy matters for speed: a bf16 x float32 broadcast product takes a
    # slow mixed-dtype path (25x slower on [1600, 3072] on Zen 4).  |values| <= 127.
    codes = rows.to(torch.float32, copy=True).mul_(127 / amax).round_().to(torch.int8)
    return codes, amax.mul_(1 / 127)


# ------------------------------------------------------------------ linear layers as modules
class ProjectedAttention(Attention):
    """:class:`~clipforge.model.transformer.Attention` whose fused q/k/v projection (raw
    parameters there, which module-swapping converters never see) and output projection are
    :class:`Int8Linear` modules.  The attention itself (softmax of q k^T) runs in the input's
    dtype."""

    def __init__(self, attention: Attention, linear: type[Int8Linear]):
        nn.Module.__init__(self)
        self.heads = attention.heads
        self.in_proj = linear(attention.in_proj_weight, attention.in_proj_bias)
        self.ln_inner = attention.ln_inner
        self.out_proj = linear.from_linear(attention.out_proj)

    def _in_proj(self, x: torch.Tensor) -> torch.Tensor:
        return self.in_proj(x)


def _replace_linears(model: CLIP, linear: type[Int8Linear]) -> None:
    """Every linear layer of the transformers and the attention pools, and the attentions'
    fused q/k/v projections, as ``linear``; not the final projections (kept float32, see
    :func:`_final_projections`)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Attention) and not isinstance(child, ProjectedAttention):
                setattr(parent, name, ProjectedAttention(child, linear))
    keep = {id(m) for final in _final_projections(model) if isinstance(final, nn.Module)
            for m in final.modules()}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and id(child) not in keep:
                setattr(parent, name, linear.from_linear(child))


__all__ = ["PRECISIONS", "Int8Linear", "ProjectedAttention", "apply_precision",
           "check_precision"]

"""Packed linear layers (``clipforge.model.linear``): the same function as ``F.linear``, a cache
that follows the weight, and never in the way of training or export."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import clipforge
from clipforge.model import linear as linear_module
from clipforge.model.linear import Linear
from clipforge.model.transformer import Attention

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="oneDNN (mkldnn) not built into this torch")


def _layer(dtype: torch.dtype = torch.float32) -> tuple[Linear, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    layer = Linear(64, 48).to(dtype)
    with torch.no_grad():
        layer.bias.normal_(generator=gen)
    return layer, torch.randn(3, 50, 64, generator=gen).to(dtype)


def _packed(module: torch.nn.Module) -> bool:
    return bool(module.__dict__.get("_packed"))


BF16_PACKS = pytest.mark.skipif(torch.bfloat16 not in linear_module._PACKABLE,
                                reason="oneDNN packs bf16 weights only with AVX-512 or "
                                       "AVX-NE-CONVERT")


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16,
                                                               marks=BF16_PACKS)])
def test_packed_product_is_the_linear_product(dtype: torch.dtype) -> None:
    layer, x = _layer(dtype)
    with torch.inference_mode():
        packed = layer(x)
        strided = layer(x[:, :1])  # a strided view, as the attention pool's query
    assert _packed(layer)
    plain = F.linear(x, layer.weight, layer.bias)
    if dtype == torch.bfloat16:  # the same oneDNN kernel F.linear calls: bit for bit
        assert torch.equal(packed, plain)
    else:
        torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(strided, packed[:, :1], rtol=0, atol=0)


def test_training_never_packs_and_gets_gradients() -> None:
    layer, x = _layer()
    out = layer(x)
    assert not _packed(layer) and out.requires_grad
    out.sum().backward()
    assert layer.weight.grad is not None
    # frozen weights and an input that wants gradients: still the autograd path
    layer.requires_grad_(False)
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert not _packed(layer) and x.grad is not None


def test_the_cache_follows_the_weight() -> None:
    layer, x = _layer()
    with torch.no_grad():
        layer(x)
        assert _packed(layer)
        layer.weight.mul_(-2)  # in place, as an optimiser step: repacked, not stale
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias),
                                   rtol=1e-5, atol=1e-5)
        layer.weight = torch.nn.Parameter(torch.ones_like(layer.weight))  # replaced
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias),
                                   rtol=1e-5, atol=1e-5)
    for drop in (lambda m: m.train(), lambda m: m.to(torch.float32), lambda m: m.eval()):
        with torch.no_grad():
            layer(x)
        drop(layer)
        assert not _packed(layer)


def test_copies_and_pickles_leave_the_packed_weight_behind() -> None:
    layer, x = _layer()
    with torch.inference_mode():
        expected = layer(x)
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert not _packed(clone)
        with torch.inference_mode():
            assert torch.equal(clone(x), expected)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)  # the state dict holds the plain weight only
    assert set(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)) == {"weight",
                                                                                  "bias"}


def test_model_inference_uses_packed_weights_and_matches_the_autograd_path(
        tiny_vit: clipforge.CLIP) -> None:
    images = torch.randn(2, 3, tiny_vit.config.image_size, tiny_vit.config.image_size)
    tokens = clipforge.tokenize(["a cat", "a photo of two dogs"])
    plain = tiny_vit.encode_image(images), tiny_vit.encode_text(tokens)  # grad enabled
    assert not any(_packed(m) for m in tiny_vit.modules())
    with torch.inference_mode():
        fast = tiny_vit.encode_image(images), tiny_vit.encode_text(tokens)
    attentions = [m for m in tiny_vit.modules() if isinstance(m, Attention)]
    assert attentions and all(_packed(m) and _packed(m.out_proj) for m in attentions)
    for a, b in zip(plain, fast, strict=True):
        torch.testing.assert_close(b, a.detach(), rtol=1e-5, atol=1e-6)


def test_flop_counters_and_tracing_see_the_plain_product() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    layer, x = _layer()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        layer(x)
    assert counter.get_total_flops() == 2 * 150 * 64 * 48 and not _packed(layer)
    with torch.no_grad():
        traced = torch.jit.trace(layer, x)
    assert "mkldnn" not in str(traced.graph) and "linear" in str(traced.graph)


def test_weights_made_in_inference_mode_run_unpacked() -> None:
    """Inference tensors keep no version counter, so an in-place change could not be seen:
    such weights take the plain product (a model loaded inside inference_mode still runs)."""
    with torch.inference_mode():
        layer, x = _layer()
        first = layer(x)
        layer.weight.mul_(-1)
        second = layer(x)
    assert not _packed(layer)
    torch.testing.assert_close(second, F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    assert not torch.equal(first, second)
    with torch.inference_mode():
        model = clipforge.create_model("tiny-vit")
        model.encode_text(clipforge.tokenize(["a cat"]))

"""Inference precisions (``clipforge.precision``): bf16 and int8 encoders next to float32.

Tiny perturbed models only: each mode must run for both towers, give float32 embeddings close
to the float32 model's, keep what must stay float32 in float32, really quantise what int8
claims to, keep the float32 weights' fingerprint, and refuse to be trained.  Accuracy and speed
on real architectures are measured by ``benchmarks/bench_precision.py``.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clipforge
from clipforge.evaluation import ZeroShotClassifier
from clipforge.model import linear as linear_module
from clipforge.model.linear import Linear
from clipforge.model.transformer import Attention, LayerNorm
from clipforge.precision import (
    PRECISIONS,
    Int8Linear,
    ProjectedAttention,
    apply_precision,
    check_precision,
    native_bf16,
)
from clipforge.weights.fingerprint import weights_fingerprint
from conftest import perturb

# Minimum cosine to the float32 embeddings, per row.  Measured minima on these tiny perturbed
# models are about 0.99995 (bf16) and 0.9994 (int8, text); the bounds leave room for other
# inputs and kernels.  The benchmark's targets on real architectures are on the mean (bf16 >=
# 0.999, int8 >= 0.995).
MIN_COSINE = {"bf16": 0.9995, "int8": 0.998}
TEXTS = ["a photo of a cat", "two blue stars on a striped background", "a red circle", "x"]


def _inputs(model: clipforge.CLIP) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    size = model.config.image_size
    return torch.randn(6, 3, size, size, generator=gen), clipforge.tokenize(TEXTS)


def _embed(model: clipforge.CLIP, pixels: torch.Tensor, tokens: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        return model.encode_image(pixels), model.encode_text(tokens)


@pytest.fixture(params=["tiny_vit", "tiny_rn"])
def tiny(request: pytest.FixtureRequest) -> clipforge.CLIP:
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_close_to_float32(tiny: clipforge.CLIP, precision: str) -> None:
    pixels, tokens = _inputs(tiny)
    image32, text32 = _embed(tiny, pixels, tokens)
    model = apply_precision(copy.deepcopy(tiny), precision)
    image, text = _embed(model, pixels, tokens)
    for got, want in ((image, image32), (text, text32)):
        assert got.dtype == torch.float32 and got.shape == want.shape
        cosine = F.cosine_similarity(got, want, dim=-1)
        assert cosine.min() > MIN_COSINE[precision], cosine
        # not the float32 path in disguise
        assert not torch.equal(got, want)
    logits_per_image, logits_per_text = model(pixels, tokens)
    assert logits_per_image.dtype == torch.float32
    assert logits_per_image.shape == (len(pixels), len(TEXTS))
    assert torch.equal(logits_per_text, logits_per_image.t())


def test_fp32_is_unchanged(tiny: clipforge.CLIP) -> None:
    pixels, tokens = _inputs(tiny)
    image32, text32 = _embed(tiny, pixels, tokens)
    params = {name: p for name, p in tiny.named_parameters()}
    model = apply_precision(tiny, "fp32")
    assert model is tiny and model.precision == "fp32"
    assert model.origin["precision"] == "fp32"
    assert all(p is params[name] for name, p in model.named_parameters())
    image, text = _embed(model, pixels, tokens)
    assert torch.equal(image, image32) and torch.equal(text, text32)
    assert model.fingerprint is None  # an fp32 model may be trained: its digest stays live


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_prefix_encoding_matches_full_encoding(tiny_vit: clipforge.CLIP, precision: str) -> None:
    """Zero-shot prompts go through encode_text_with_prefix: it must agree with encode_text in
    a converted model as it does in float32 (same dtypes, same rounding, up to batching)."""
    model = apply_precision(tiny_vit, precision)
    tokens = clipforge.tokenize(["a photo of a cat.", "a photo of a small dog."])
    shared = 5  # <start> a photo of a
    assert torch.equal(tokens[0, :shared], tokens[1, :shared])
    with torch.inference_mode():
        full = model.encode_text(tokens)
        prefixed = model.encode_text_with_prefix(tokens[0, :shared], tokens[:, shared:])
    assert prefixed.dtype == torch.float32
    assert F.cosine_similarity(full, prefixed, dim=-1).min() > 0.999


def test_bf16_keeps_norms_and_projections_float32(tiny: clipforge.CLIP) -> None:
    model = apply_precision(tiny, "bf16")
    assert model.precision == "bf16" and model.dtype == torch.bfloat16
    float32 = {id(model.text_projection), id(model.logit_scale)}
    assert model.text_projection.dtype == torch.float32
    assert model.logit_scale.dtype == torch.float32
    if hasattr(model.visual, "proj"):
        assert model.visual.proj.dtype == torch.float32
        float32.add(id(model.visual.proj))
    else:
        c_proj = model.visual.attnpool.c_proj
        assert type(c_proj) is Linear
        assert c_proj.weight.dtype == c_proj.bias.dtype == torch.float32
        float32 |= {id(c_proj.weight), id(c_proj.bias)}
    norms = [m for m in model.modules() if isinstance(m, LayerNorm)]
    assert norms
    for norm in norms:
        assert norm.weight.dtype == norm.bias.dtype == torch.float32
        float32 |= {id(norm.weight), id(norm.bias)}
    # everything else is bf16: embeddings, convolutions, the transformers' linear layers
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    assert sum(id(t) not in float32 for _, t in tensors) > 10
    for name, tensor in tensors:
        if id(tensor) not in float32:
            assert tensor.dtype == torch.bfloat16, name
    block = model.transformer.resblocks[0]
    for weight in (block.attn.in_proj_weight, block.attn.out_proj.weight,
                   block.mlp.c_fc.weight, block.mlp.c_proj.weight):
        assert weight.dtype == torch.bfloat16


def test_bf16_resnet_folds_batch_norms_channels_last(tiny_rn: clipforge.CLIP) -> None:
    model = apply_precision(tiny_rn, "bf16")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    convs = [m for m in model.visual.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None and c.weight.dtype == torch.bfloat16 for c in convs)
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)


def test_int8_layers_are_quantised(tiny: clipforge.CLIP) -> None:
    linears = {name for name, m in tiny.named_modules() if isinstance(m, nn.Linear)}
    attentions = {name for name, m in tiny.named_modules() if isinstance(m, Attention)}
    model = apply_precision(tiny, "int8")
    modules = dict(model.named_modules())
    for name in attentions:
        attn = modules[name]
        assert isinstance(attn, ProjectedAttention)
        assert isinstance(attn.in_proj, Int8Linear) and isinstance(attn.out_proj, Int8Linear)
        assert not any(True for _ in attn.parameters())  # no float q/k/v weights left behind
    kept = {name for name in linears if name.endswith("attnpool.c_proj")}  # final projection
    assert len(kept) == (0 if hasattr(model.visual, "proj") else 1)
    for name in linears - kept:
        layer = modules[name]
        assert isinstance(layer, Int8Linear), name
        assert layer.weight_int8.dtype == torch.int8
        assert layer.weight_int8.abs().max() == 127  # full range used per channel
    for name in kept:
        assert type(modules[name]) is Linear
        assert modules[name].weight.dtype == torch.float32
    # the rest of the model is the bf16 model
    assert model.dtype == torch.bfloat16 and model.precision == "int8"


def test_int8_linear_matches_float_product() -> None:
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=gen) * 0.1)
    layer = Int8Linear.from_linear(linear)
    # the weight error is at most half a quantisation step per channel
    step = layer.weight_scale[:, None]
    assert ((layer.dequantised_weight() - linear.weight).abs() <= step / 2 + 1e-7).all()
    x = torch.randn(3, 5, 64, generator=gen)
    with torch.inference_mode():
        want = linear(x)
        got = layer(x)
        got_bf16 = layer(x.bfloat16())
        empty = layer(torch.zeros(0, 64))
    assert got.shape == want.shape == (3, 5, 48) and got.dtype == torch.float32
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.9999
    assert got_bf16.dtype == torch.bfloat16
    assert F.cosine_similarity(got_bf16.float().flatten(), want.flatten(), dim=0) > 0.999
    assert empty.shape == (0, 48)
    # per-token scales: a row's result does not depend on the other rows of the batch
    with torch.inference_mode():
        alone = layer(x[1:2] * 1)
        loud = layer(torch.cat([x[:1] * 1000, x[1:2]]))
    assert torch.equal(alone[0], loud[1])


def test_unknown_precision_is_a_clear_error(tiny_vit: clipforge.CLIP) -> None:
    for call in (lambda: check_precision("fp16"),
                 lambda: apply_precision(tiny_vit, "int4"),
                 lambda: clipforge.create_model("tiny-vit", precision="float32")):
        with pytest.raises(ValueError, match="unknown precision .*fp32, bf16, int8"):
            call()
    assert PRECISIONS == ("fp32", "bf16", "int8")
    with pytest.raises(ValueError, match="leave dtype unset"):
        clipforge.create_model("tiny-vit", precision="bf16", dtype=torch.float16)


def cpu_with(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    """Make torch report these CPU features (what ``native_bf16`` reads)."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16,
                        raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_emulated_bf16_is_a_warning(tiny_vit: clipforge.CLIP, precision: str, monkeypatch,
                                    caplog) -> None:
    """On a CPU without AVX-512 BF16 or AMX, bf16 is emulated (tens of times slower than
    float32): the conversion still works, and says so."""
    cases = {(False, False): True, (True, False): False, (False, True): False}
    for (avx512_bf16, amx), warned in cases.items():
        cpu_with(monkeypatch, avx512_bf16, amx)
        assert native_bf16("cpu") is not warned
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="clipforge.precision"):
            converted = apply_precision(copy.deepcopy(tiny_vit), precision)
            apply_precision(copy.deepcopy(tiny_vit), "fp32")
        assert converted.precision == precision
        assert ("neither AVX-512 BF16 nor AMX" in caplog.text) is warned, caplog.text
        assert f"precision {precision}" in caplog.text or not warned


def test_conversion_needs_float32_weights(tiny_vit: clipforge.CLIP) -> None:
    model = apply_precision(tiny_vit, "bf16")
    assert apply_precision(model, "bf16") is model  # already there: nothing to do
    for other in ("int8", "fp32"):
        with pytest.raises(ValueError, match="already bf16"):
            apply_precision(model, other)
    half = clipforge.create_model("tiny-vit", dtype=torch.float16)
    with pytest.raises(ValueError, match="converts a float32 model"):
        apply_precision(half, "bf16")


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_fingerprint_is_the_float32_weights(tiny: clipforge.CLIP, precision: str) -> None:
    expected = weights_fingerprint(tiny)
    model = apply_precision(copy.deepcopy(tiny), precision)
    assert model.fingerprint == expected
    assert weights_fingerprint(model) == expected
    # other weights, other digest
    other = apply_precision(perturb(copy.deepcopy(tiny), seed=9), precision)
    assert weights_fingerprint(other) != expected


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_load_with_precision(tmp_path, name: str) -> None:
    source = perturb(clipforge.create_model(name), seed=3)
    path = clipforge.save_model(source, tmp_path / name)
    fp32, _ = clipforge.load(path)
    pixels, tokens = _inputs(fp32)
    image32, text32 = _embed(fp32, pixels, tokens)
    for precision in ("bf16", "int8"):
        model, preprocess = clipforge.load(path, precision=precision)
        assert preprocess is model.preprocess
        assert model.origin["precision"] == precision
        assert model.origin["model"] == fp32.origin["model"]
        assert weights_fingerprint(model) == weights_fingerprint(fp32)
        image, text = _embed(model, pixels, tokens)
        assert F.cosine_similarity(image, image32, dim=-1).min() > MIN_COSINE[precision]
        assert F.cosine_similarity(text, text32, dim=-1).min() > MIN_COSINE[precision]
        assert not model.training


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_converted_model_refuses_training(tiny_rn: clipforge.CLIP, precision: str) -> None:
    model = apply_precision(tiny_rn, precision)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(RuntimeError, match=f"converted to {precision} for inference"):
        model.train()
    assert model.eval() is model  # eval stays allowed
    assert model.train(False) is model
    # float32 models train as before
    fresh = clipforge.create_model("tiny-rn")
    assert fresh.train().training


def test_zero_shot_with_int8() -> None:
    """The zero-shot path (prefix-shared prompt batches, logit scale) works on a converted
    model and stays close to float32: class embeddings within 0.998 cosine, logits within
    0.25 (about 0.02 in cosine at this model's logit scale; random tiny towers give small,
    nearly tied similarities, so decisions themselves are compared in the benchmark, on a
    trained model)."""
    torch.manual_seed(0)  # the weights must not depend on which tests ran before
    model32 = perturb(clipforge.create_model("tiny-vit"), seed=1)
    classnames = ["cat", "dog", "red circle", "blue star"]
    templates = ["a photo of a {}.", "a drawing of a {}."]
    pixels, _ = _inputs(model32)
    with torch.inference_mode():
        ref = ZeroShotClassifier.build(model32, classnames, templates)
        ref_logits = ref.logits(model32.encode_image(pixels))
        model = apply_precision(copy.deepcopy(model32), "int8")
        clf = ZeroShotClassifier.build(model, classnames, templates)
        logits = clf.logits(model.encode_image(pixels))
    assert clf.logit_scale == ref.logit_scale
    assert F.cosine_similarity(clf.class_embeddings, ref.class_embeddings).min() > 0.998
    assert logits.shape == ref_logits.shape
    assert (logits - ref_logits).abs().max() < 0.25


def test_converted_models_are_not_saved(tmp_path) -> None:
    import clipforge

    for precision in ("bf16", "int8"):
        model = clipforge.create_model("tiny-vit", precision=precision)
        with pytest.raises(ValueError, match="save the float32 model"):
            clipforge.save_model(model, tmp_path / f"{precision}.safetensors")
        assert not (tmp_path / f"{precision}.safetensors").exists()
    clipforge.save_model(clipforge.create_model("tiny-vit"), tmp_path / "fp32.safetensors")


def test_quick_gelu_as_silu_is_the_same_function(tiny: clipforge.CLIP) -> None:
    """The rescaled SiLU MLPs of the bf16/int8 conversion, applied alone in float32, give the
    QuickGELU model's embeddings to round-off."""
    from clipforge.model.transformer import MLP, QuickGELU
    from clipforge.precision import _quick_gelu_as_silu

    folded = copy.deepcopy(tiny)
    with torch.no_grad():
        _quick_gelu_as_silu(folded)
    mlps = [m for m in folded.modules() if isinstance(m, MLP)]
    assert mlps and all(isinstance(m.gelu, nn.SiLU) for m in mlps)
    assert not any(isinstance(m, QuickGELU) for m in folded.modules())
    images, tokens = _inputs(tiny)
    with torch.inference_mode():
        torch.testing.assert_close(folded.encode_image(images), tiny.encode_image(images),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(folded.encode_text(tokens), tiny.encode_text(tokens),
                                   rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=["tiny-siglip", "tiny-bert", "tiny-xlmr"])
def family(request: pytest.FixtureRequest) -> clipforge.CLIP:
    """The families' towers (MAP head, bidirectional and post-norm text towers, mean pooling,
    biased and MLP projections, a logit bias) with random weights."""
    torch.manual_seed(0)
    return perturb(clipforge.create_model(request.param), seed=3)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_families_close_to_float32(family: clipforge.CLIP, precision: str) -> None:
    pixels = torch.randn(4, 3, family.config.image_size, family.config.image_size,
                         generator=torch.Generator().manual_seed(1))
    tokens = family.tokenizer(TEXTS)
    image32, text32 = _embed(family, pixels, tokens)
    model = apply_precision(copy.deepcopy(family), precision)
    image, text = _embed(model, pixels, tokens)
    for got, want in ((image, image32), (text, text32)):
        assert got.dtype == torch.float32
        assert F.cosine_similarity(got, want, dim=-1).min() > MIN_COSINE[precision]
        assert not torch.equal(got, want)
    # the final projections, the temperature and the bias stay float32
    kept = [model.logit_scale, *model.text_projection.parameters()] if isinstance(
        model.text_projection, nn.Module) else [model.logit_scale, model.text_projection]
    if model.logit_bias is not None:
        kept.append(model.logit_bias)
    assert all(p.dtype == torch.float32 for p in kept)
    with torch.inference_mode():
        logits, _ = model(pixels, tokens)
        want, _ = family(pixels, tokens)
    assert (model.probabilities(logits) - family.probabilities(want)).abs().max() < 0.05


# ------------------------------------------------------------------ int8 kernels (oneDNN)
needs_onednn_int8 = pytest.mark.skipif(
    not linear_module._HAVE_ONEDNN_INT8,
    reason="oneDNN's int8 linear ops are used on x86 CPUs with VNNI only")


@needs_onednn_int8
def test_int8_runs_onednn_packed_kernels(tiny_vit: clipforge.CLIP, monkeypatch) -> None:
    """On x86 the int8 products are oneDNN's on weights packed once (AMX tiles where the CPU
    has them): ``torch._int_mm`` (oneDNN's BLAS-style GEMM, no AMX kernel, half the speed of
    bf16 on a Xeon with AMX) is not called.  The packed weights are a cache: not in copies."""
    model = apply_precision(tiny_vit, "int8")
    pixels, tokens = _inputs(model)

    def refuse(*args, **kwargs):
        raise AssertionError("torch._int_mm called")
    monkeypatch.setattr(torch, "_int_mm", refuse)
    image, text = _embed(model, pixels, tokens)
    assert image.isfinite().all() and text.isfinite().all()
    layer = model.visual.transformer.resblocks[0].mlp.c_fc
    assert isinstance(layer, Int8Linear) and layer.__dict__.get("_packed")
    again = copy.deepcopy(model)  # opaque oneDNN tensors cannot be copied: dropped
    assert not again.visual.transformer.resblocks[0].mlp.c_fc.__dict__.get("_packed")
    assert torch.equal(_embed(again, pixels, tokens)[0], image)


@needs_onednn_int8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_kernels_agree_with_the_portable_product(monkeypatch, dtype, bias) -> None:
    """oneDNN's packed product and the portable ``torch._int_mm`` one multiply the same codes
    (the same integers): equal to float32 round-off, to bf16 rounding in bf16."""
    from clipforge import precision

    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(96, 40, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 96, generator=gen) * 0.1)
    layer = Int8Linear.from_linear(linear)
    x = (torch.randn(2, 7, 96, generator=gen) * torch.rand(2, 7, 1, generator=gen)).to(dtype)
    with torch.inference_mode():
        fast = layer(x)
        monkeypatch.setattr(precision, "may_pack_int8", lambda *args: False)
        portable = layer(x)
    assert fast.dtype == portable.dtype == dtype and fast.shape == (2, 7, 40)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fast.float(), portable.float(), rtol=tol, atol=tol)


def test_quantise_rows_reads_bf16_magnitudes_from_bits() -> None:
    """The per-row scale of a bf16 input read from its bits equals ``abs().amax()``, and the
    codes equal those of the same values in float32 (negative zero, ties, zero rows)."""
    from clipforge.precision import quantise_rows

    gen = torch.Generator().manual_seed(0)
    rows = (torch.randn(9, 50, generator=gen) * 3).bfloat16()
    rows[1] = 0.0
    rows[2, :3] = torch.tensor([-0.0, -5.0, 5.0])
    rows[3, 0] = -1000.0
    codes, step = quantise_rows(rows)
    codes32, step32 = quantise_rows(rows.float())
    assert codes.dtype == torch.int8 and step.dtype == torch.float32 and step.shape == (9, 1)
    assert torch.equal(step, rows.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / 127)
    assert torch.equal(codes, codes32) and torch.equal(step, step32)
    assert codes[3, 0] == -127 and (codes[1] == 0).all()
    assert ((codes.float() * step - rows.float()).abs() <= step / 2 + 1e-6).all()

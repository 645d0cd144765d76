"""The model against implementations we did not write: transformers' CLIPModel (ViT) and
openai/CLIP's model.py (ViT and the modified ResNet)."""

from __future__ import annotations

import pytest
import torch

import clipforge
from clipforge.configs import ARCHITECTURES, CLIPConfig, TextConfig, VisionConfig
from conftest import perturb

transformers = pytest.importorskip("transformers")

TEXTS = ["a photo of a cat.", "Hello World!", "x",
         "a very long caption " + "with many words " * 30]  # truncated: runs all 77 positions

# Heads deliberately not width/64 and MLP not 4x width, so a config mix-up shows.
ODD_VIT = CLIPConfig(
    48, VisionConfig(image_size=48, width=96, layers=3, heads=3, patch_size=16, mlp_width=200),
    TextConfig(width=80, layers=3, heads=5, mlp_width=150), activation="gelu",
)


def _features(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _compare_with_hf(ours: clipforge.CLIP, hf: torch.nn.Module) -> None:
    size = ours.config.image_size
    pixels = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = clipforge.tokenize(TEXTS, truncate=True)
    with torch.no_grad():
        image_diff = (ours.encode_image(pixels)
                      - _features(hf.get_image_features(pixel_values=pixels))).abs().max()
        text_diff = (ours.encode_text(tokens)
                     - _features(hf.get_text_features(input_ids=tokens))).abs().max()
    assert image_diff <= 1e-5, f"image features differ by {image_diff}"
    assert text_diff <= 1e-5, f"text features differ by {text_diff}"


def test_vit_b32_parameter_count() -> None:
    with torch.device("meta"):
        model = clipforge.CLIP(ARCHITECTURES["ViT-B-32"])
    assert sum(p.numel() for p in model.parameters()) == 151_277_313


@pytest.mark.parametrize("config", [ARCHITECTURES["tiny-vit"], ODD_VIT], ids=["tiny", "odd"])
def test_written_model_matches_transformers(config: CLIPConfig, tmp_path) -> None:
    ours = perturb(clipforge.CLIP(config).eval(), seed=3)
    clipforge.save_model(ours, tmp_path / "hf", format="hf")
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    _compare_with_hf(ours, hf)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-L-14"])
def test_full_size_matches_transformers(name: str, tmp_path) -> None:
    ours = perturb(clipforge.create_model(name), seed=9, scale=0.01)
    clipforge.save_model(ours, tmp_path / "hf", format="hf")
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    _compare_with_hf(ours, hf)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_transformers_model_loads_exactly(act: str, tmp_path) -> None:
    """The other direction: a model transformers built and saved, read by clipforge."""
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=160, num_attention_heads=2,
                         num_hidden_layers=2, hidden_act=act, bos_token_id=49406,
                         eos_token_id=49407),
        vision_config=dict(hidden_size=64, intermediate_size=144, num_attention_heads=4,
                           num_hidden_layers=2, image_size=64, patch_size=16, hidden_act=act),
        projection_dim=32,
    )
    torch.manual_seed(0)
    hf = perturb(transformers.CLIPModel(config).eval(), seed=4)
    hf.save_pretrained(tmp_path / "hf")
    ours = clipforge.create_model(tmp_path / "hf")
    assert ours.config.activation == act
    assert ours.config.vision.heads == 4 and ours.config.text.heads == 2
    _compare_with_hf(ours, hf)


def test_activation_changes_output() -> None:
    """Guards the parity tests: a wrong activation must be visible at the tolerance used."""
    quick = perturb(clipforge.CLIP(ODD_VIT.replace(activation="quick_gelu")).eval(), seed=5)
    gelu = clipforge.CLIP(ODD_VIT).eval()
    gelu.load_state_dict(quick.state_dict())
    tokens = clipforge.tokenize(TEXTS, truncate=True)
    with torch.no_grad():
        assert (quick.encode_text(tokens) - gelu.encode_text(tokens)).abs().max() > 1e-3


def _openai_reference(openai_model, vit: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if vit:  # embed, resolution, layers, width, patch, context, vocab, text width/heads/layers
        ref = openai_model.CLIP(48, 64, 3, 128, 16, 77, 49408, 128, 2, 2)
    else:
        ref = openai_model.CLIP(48, 64, (1, 2, 1, 1), 16, None, 77, 49408, 128, 2, 2)
    return perturb(ref.eval(), seed=6)


@pytest.mark.parametrize("vit", [True, False], ids=["vit", "resnet"])
def test_matches_openai_reference(openai_model, vit: bool, tmp_path) -> None:
    ref = _openai_reference(openai_model, vit)
    torch.save(ref.state_dict(), tmp_path / "openai.pt")
    ours = clipforge.create_model(tmp_path / "openai.pt")
    assert ours.config.vision.is_vit == vit and ours.config.activation == "quick_gelu"
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    tokens = clipforge.tokenize(TEXTS[:3])
    with torch.no_grad():
        for a, b in [(ours.encode_image(pixels), ref.encode_image(pixels)),
                     (ours.encode_text(tokens), ref.encode_text(tokens)),
                     (ours(pixels, tokens)[0], ref(pixels, tokens)[0])]:
            assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())


def test_text_runs_only_to_last_end_token(tiny_vit) -> None:
    """Trimming to the longest end-of-text position is exact: rows embed the same alone, in a
    batch with a much longer text, and with junk after their end token."""
    tokens = clipforge.tokenize(TEXTS, truncate=True)
    with torch.no_grad():
        batch = tiny_vit.encode_text(tokens)
        alone = torch.cat([tiny_vit.encode_text(tokens[i:i + 1]) for i in range(len(TEXTS))])
        junk = tokens.clone()
        junk[0, 8:] = 1234  # after "a photo of a cat." ends: masked out by causality
        junk_out = tiny_vit.encode_text(junk)[0]
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(junk_out, batch[0], atol=1e-5, rtol=0)


def test_forward_and_normalize(tiny_vit) -> None:
    pixels = torch.randn(2, 3, 32, 32)
    tokens = clipforge.tokenize(["a cat", "a dog", "a bird"])
    with torch.no_grad():
        per_image, per_text = tiny_vit(pixels, tokens)
        image = tiny_vit.encode_image(pixels, normalize=True)
        text = tiny_vit.encode_text(tokens, normalize=True)
    assert per_image.shape == (2, 3) and torch.equal(per_text, per_image.t())
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(per_image, tiny_vit.logit_scale.exp() * image @ text.t())
    fresh = clipforge.create_model("tiny-vit")
    assert fresh.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-6)


def test_bad_inputs_are_named(tiny_vit) -> None:
    with pytest.raises(ValueError, match="expected 32x32 images"):
        tiny_vit.encode_image(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        tiny_vit.encode_text(torch.zeros(1, 80, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown model 'ViT-Q-99'"):
        clipforge.create_model("ViT-Q-99")


def test_bfloat16_runs_close_to_float32(tiny_rn) -> None:
    half = clipforge.create_model("tiny-rn", dtype=torch.bfloat16)
    half.load_state_dict(tiny_rn.state_dict())
    pixels, tokens = torch.randn(2, 3, 64, 64), clipforge.tokenize(["a cat", "a dog"])
    with torch.no_grad():
        for a, b in [(half.encode_image(pixels), tiny_rn.encode_image(pixels)),
                     (half.encode_text(tokens), tiny_rn.encode_text(tokens))]:
            assert a.dtype == torch.bfloat16
            assert torch.nn.functional.cosine_similarity(a.float(), b).min() > 0.99


@pytest.mark.parametrize("causal", [True, False])
def test_attention_kernel_choice_changes_round_off_only(causal: bool) -> None:
    """bfloat16 training on CPU takes the math kernel (clipforge.model.transformer.attention):
    its output and gradients must be the attention, to bfloat16 round-off of a float32
    reference; without gradients (inference, the exactness tests) nothing changes at all."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from clipforge.model.transformer import attention
    torch.manual_seed(0)
    shape = (4, 2, 24, 64)
    q, k, v = (torch.randn(shape) for _ in range(3))
    mask = None if causal else torch.rand(4, 1, 1, 24) > 0.3
    reference = [t.clone().requires_grad_() for t in (q, k, v)]
    out = sdpa(*reference, attn_mask=mask, is_causal=causal)
    out.backward(torch.ones_like(out))
    half = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    ours = attention(*half, mask, causal)
    ours.backward(torch.ones_like(ours))
    with sdpa_kernel(SDPBackend.MATH):
        assert torch.equal(ours, sdpa(*half, attn_mask=mask, is_causal=causal))
    assert (ours.float() - out).abs().max() < 0.03
    for a, b in zip(half, reference):
        assert (a.grad.float() - b.grad).abs().max() < 0.05 * b.grad.abs().max()
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            args = [t.to(dtype) for t in (q, k, v)]
            assert torch.equal(attention(*args, mask, causal),
                               sdpa(*args, attn_mask=mask, is_causal=causal))


def test_public_api_contract() -> None:
    names = clipforge.available_models()
    for required in ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16",
                     "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-g-14", "ViT-bigG-14",
                     "tiny-vit", "tiny-rn"]:
        assert required in names
    model, preprocess = clipforge.load("tiny-rn")
    assert preprocess is model.preprocess and preprocess.image_size == 64
    assert not model.training

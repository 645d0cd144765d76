"""Embedding throughput per model family on CPU: clipforge against the reference implementation.

For each family, a full-size model with random weights is built by its reference (no network):
transformers' model class from a config for the families transformers has (CLIP, SigLIP,
SigLIP 2, MetaCLIP 2, Chinese-CLIP), open_clip's model code (with timm's towers, through the
tests' ``families.open_clip`` stand-in for torchvision) for the OpenCLIP-only ones (XLM-RoBERTa
text tower, PE-Core, EVA02).  Its files are written as the hub repositories hold them (config,
weights, tokenizer files trained in the run, processor settings) and ``clipforge.create_model``
loads the same weights from that directory.  Before timing, the script compares clipforge
float32 embeddings with the reference's on the same pixels and texts.

Then, in one process, with torch's default thread count, each contender is timed on the same
inputs, the calls interleaved round by round (the order alternating, so drift hits all alike):

* clipforge ``create_model(dir, precision="fp32" | "bf16" | "int8")``;
* the reference in float32, and transformers' model in bfloat16 as well;
* images/s at batch 1 and 32 (random normalised pixels at the model's size);
* captions/s at batch 1 and 32 (the prompts "a photo of a {label}.", tokenized beforehand):
  clipforge gets its tokenizer's ids (padded to the model's length; it computes only the
  positions that can change the result); transformers gets its processor's, as its
  documentation calls it (padding to the longest text with an attention mask; SigLIP's to its
  full length without one); open_clip its tokenizer's (padded to the context length).

The vocabularies are trained in the run on a small multilingual corpus (``tests/families.py``)
while the embedding tables have the real sizes (Gemma's 256,000 ids for SigLIP 2, XLM-V's
901,629 for MetaCLIP 2): English prompts split into more pieces than with the real
vocabularies, the same ids for every contender.  MetaCLIP 2 is measured on ViT-B-32 towers
(its published worldwide models are ViT-H-14 and bigG), with the XLM-V-size vocabulary.

    python benchmarks/bench_families.py [--families clip,siglip,...] [--repeats 5] [--quick]
        [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))

import clipforge  # noqa: E402
from bench_embed import LABELS, fmt_load, measure  # noqa: E402
from clipforge.model.text import needed_length  # noqa: E402
from machine import cpu_name  # noqa: E402
from report import write_json  # noqa: E402

BATCHES = (1, 32)
MODES = ("fp32", "bf16", "int8")


# ------------------------------------------------------------------------------ the families
@dataclass
class Built:
    """One family, built: clipforge's directory, the reference's encoders (float32 and, where
    it runs, bfloat16) and their text inputs."""

    directory: Path
    peer: str  # "transformers" or "open_clip"
    encoders: dict[str, tuple[Callable, Callable]]  # mode -> (images, texts) of the peer
    peer_texts: Callable[[list[str]], Any]  # texts -> what the peer's text encoder takes
    peer_tokens: Callable[[Any], int] = lambda inputs: 0  # positions the peer runs
    notes: list[str] = field(default_factory=list)


def _features(output: Any) -> torch.Tensor:
    """transformers 5 returns a ModelOutput whose pooler_output is the embedding."""
    return output if torch.is_tensor(output) else output.pooler_output


def _hf_encoders(model_class: Any, directory: Path, with_mask: bool
                 ) -> dict[str, tuple[Callable, Callable]]:
    encoders = {}
    for mode, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = model_class.from_pretrained(directory, dtype=dtype).eval()

        def images(pixels: torch.Tensor, model=model, dtype=dtype) -> torch.Tensor:
            return _features(model.get_image_features(pixel_values=pixels.to(dtype)))

        def texts(inputs: dict, model=model) -> torch.Tensor:
            kept = inputs if with_mask else {"input_ids": inputs["input_ids"]}
            return _features(model.get_text_features(**kept))
        encoders[mode] = (images, texts)
    return encoders


def _hf_texts(directory: Path, padding: dict) -> Callable[[list[str]], dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)

    def tokenize(texts: list[str]) -> dict:
        return dict(tokenizer(texts, return_tensors="pt", truncation=True, **padding))
    return tokenize


def _sizes(quick: bool, **full: Any) -> dict[str, Any]:
    """Full-size settings, or test-size ones for ``--quick`` (a smoke run)."""
    if not quick:
        return full
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4)
    return {key: {**value, **small, **({"image_size": 32, "patch_size": 8}
                                       if "patch_size" in value else {})}
            if isinstance(value, dict) else value for key, value in full.items()}


def build_clip(root: Path, quick: bool) -> Built:
    """OpenAI's CLIP ViT-B-32 (transformers' CLIPConfig defaults), OpenAI's BPE."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from bench_embed import hf_inputs

    sizes = _sizes(quick, text={}, vision={"image_size": 224, "patch_size": 32})
    torch.manual_seed(0)
    config = CLIPConfig(text_config=sizes["text"], vision_config=sizes["vision"])
    out = root / "hf"
    CLIPModel(config).save_pretrained(out)
    size = config.vision_config.image_size
    CLIPImageProcessorPil(size={"shortest_edge": size},
                          crop_size={"height": size, "width": size}).save_pretrained(out)

    def texts(prompts: list[str]) -> dict:
        ids, mask = hf_inputs(clipforge.tokenize(prompts), 49407, pad_to_longest=True)
        return {"input_ids": ids, "attention_mask": mask}
    return Built(out, "transformers", _hf_encoders(CLIPModel, out, True), texts,
                 lambda inputs: inputs["input_ids"].shape[1])


def build_siglip(root: Path, quick: bool, gemma: bool = False) -> Built:
    """SigLIP ViT-B-16 (SiglipConfig's defaults: 224 pixels, 64 tokens, 32,000 ids) or SigLIP 2
    (the same towers, Gemma's tokenizer and its 256,000-id table)."""
    from transformers import AutoTokenizer, SiglipConfig, SiglipModel, SiglipProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    import families

    vocab = 256000 if gemma else 32000
    if gemma:
        tokenizer_dir = families.siglip2_tokenizer(root / "tok", context_length=64)
    else:
        tokenizer_dir = families.siglip_tokenizer(root / "tok", context_length=64)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    sizes = _sizes(quick, text={"vocab_size": vocab, "max_position_embeddings": 64},
                   vision={"image_size": 224, "patch_size": 16})
    if gemma:
        sizes["text"]["hidden_act"] = "gelu_pytorch_tanh"
    torch.manual_seed(0)
    config = SiglipConfig(text_config=sizes["text"], vision_config=sizes["vision"])
    out = root / "hf"
    SiglipModel(config).save_pretrained(out)
    size = config.vision_config.image_size
    image = SiglipImageProcessorPil(size={"height": size, "width": size})
    SiglipProcessor(image_processor=image, tokenizer=tokenizer).save_pretrained(out)
    # SigLIP's text tower was trained on texts padded to its length, with no mask
    return Built(out, "transformers", _hf_encoders(SiglipModel, out, False),
                 _hf_texts(out, {"padding": "max_length", "max_length": 64}),
                 lambda inputs: inputs["input_ids"].shape[1],
                 [f"vocabulary {vocab:,} ids"])


def build_siglip2(root: Path, quick: bool) -> Built:
    return build_siglip(root, quick, gemma=True)


def build_metaclip2(root: Path, quick: bool) -> Built:
    """MetaCLIP 2 worldwide's classes and text pooling (first end-of-sequence id) on ViT-B-32
    towers, with XLM-V's vocabulary size (901,629)."""
    from transformers import AutoTokenizer, CLIPProcessor, MetaClip2Config, MetaClip2Model
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    import families

    tokenizer = AutoTokenizer.from_pretrained(families.xlmr_tokenizer(root / "tok"),
                                              model_max_length=77)
    vocab = 2000 if quick else 901629
    sizes = _sizes(quick, text={"vocab_size": vocab, "max_position_embeddings": 77,
                                "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
                   vision={"image_size": 224, "patch_size": 32})
    torch.manual_seed(0)
    config = MetaClip2Config(text_config=sizes["text"], vision_config=sizes["vision"])
    out = root / "hf"
    MetaClip2Model(config).save_pretrained(out)
    size = config.vision_config.image_size
    image = CLIPImageProcessorPil(size={"shortest_edge": size},
                                  crop_size={"height": size, "width": size})
    CLIPProcessor(image_processor=image, tokenizer=tokenizer).save_pretrained(out)
    return Built(out, "transformers", _hf_encoders(MetaClip2Model, out, True),
                 _hf_texts(out, {"padding": True}),
                 lambda inputs: inputs["input_ids"].shape[1],
                 [f"ViT-B-32 towers, vocabulary {vocab:,} ids"])


def build_chinese_clip(root: Path, quick: bool) -> Built:
    """Chinese-CLIP ViT-B-16: BERT-base text tower (21,128 ids, read at 52 tokens)."""
    from transformers import AutoTokenizer, ChineseCLIPConfig, ChineseCLIPModel
    from transformers.models.chinese_clip.image_processing_pil_chinese_clip import (
        ChineseCLIPImageProcessorPil,
    )

    import families

    tokenizer = AutoTokenizer.from_pretrained(families.bert_tokenizer(root / "tok"),
                                              model_max_length=52)
    sizes = _sizes(quick, text={"vocab_size": 21128}, vision={"image_size": 224,
                                                              "patch_size": 16})
    torch.manual_seed(0)
    config = ChineseCLIPConfig(text_config=sizes["text"], vision_config=sizes["vision"],
                               projection_dim=512)
    out = root / "hf"
    ChineseCLIPModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    size = config.vision_config.image_size
    ChineseCLIPImageProcessorPil(size={"shortest_edge": size},
                                 crop_size={"height": size, "width": size}).save_pretrained(out)
    return Built(out, "transformers", _hf_encoders(ChineseCLIPModel, out, True),
                 _hf_texts(out, {"padding": True}),
                 lambda inputs: inputs["input_ids"].shape[1])


# OpenCLIP-only families: (open_clip model name, preprocess_cfg, quick model_cfg changes)
_OPEN_CLIP = {
    "pe_core": ("PE-Core-B-16", {"mean": [0.5] * 3, "std": [0.5] * 3,
                                 "interpolation": "bilinear", "resize_mode": "squash"}),
    "eva02": ("EVA02-B-16", {}),
    "xlmr": ("xlm-roberta-base-ViT-B-32", {}),
}
_QUICK_TIMM = {"vit_pe_core_base_patch16_224": {"depth": 2, "embed_dim": 96, "img_size": 32},
               "eva02_base_patch16_clip_224": {"depth": 2, "embed_dim": 96, "img_size": 32}}


def _open_clip_config(name: str, root: Path, quick: bool) -> dict:
    """open_clip's own model config for ``name``; XLM-RoBERTa's tower config and tokenizer
    written locally (their hub names need the network)."""
    import copy

    from open_clip.factory import _MODEL_CONFIGS

    import families

    config = copy.deepcopy(_MODEL_CONFIGS[name])
    text = config["text_cfg"]
    if "hf_model_name" in text:
        from transformers import XLMRobertaConfig

        tokenizer = families.xlmr_tokenizer(root / "tok")
        tower = root / "xlmr-config"
        XLMRobertaConfig(vocab_size=1000 if quick else 250002,
                         hidden_size=64 if quick else 768,
                         num_hidden_layers=2 if quick else 12,
                         num_attention_heads=4 if quick else 12,
                         intermediate_size=128 if quick else 3072,
                         max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                         layer_norm_eps=1e-5).save_pretrained(tower)
        text.update(hf_model_name=str(tower), hf_tokenizer_name=str(tokenizer))
    elif quick:
        text.update(width=64, heads=4, layers=2)
    if quick:
        vision = config["vision_cfg"]
        if "timm_model_name" in vision:
            vision["image_size"] = _QUICK_TIMM[vision["timm_model_name"]]["img_size"]
        else:
            vision.update(image_size=32, width=64, layers=2, patch_size=8)
    return config


def _build_open_clip(key: str, root: Path, quick: bool) -> Built:
    import contextlib
    import functools
    import json

    from safetensors.torch import save_file

    import families

    oc = families.open_clip()
    name, preprocess = _OPEN_CLIP[key]
    config = _open_clip_config(name, root, quick)
    out = root / "open_clip"
    out.mkdir()
    text = config["text_cfg"]
    if "hf_tokenizer_name" in text:
        shutil.copytree(text["hf_tokenizer_name"], out, dirs_exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": config, "preprocess_cfg": preprocess}, indent=2))
    with contextlib.ExitStack() as stack:
        if quick:
            from timm.models import _registry

            patch = stack.enter_context(__import__("pytest").MonkeyPatch.context())
            for timm_name, sizes in _QUICK_TIMM.items():
                patch.setitem(_registry._model_entrypoints, timm_name, functools.partial(
                    _registry._model_entrypoints[timm_name], **sizes))
        torch.manual_seed(0)
        model = oc.create_model(f"local-dir:{out}", pretrained_text=False).eval()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  out / "open_clip_model.safetensors")
    tokenizer = oc.get_tokenizer(f"local-dir:{out}")
    encoders = {"fp32": (model.encode_image, model.encode_text)}
    return Built(out, "open_clip", encoders, tokenizer, lambda ids: ids.shape[1])


def build_xlmr(root: Path, quick: bool) -> Built:
    """OpenCLIP's xlm-roberta-base-ViT-B-32: XLM-RoBERTa-base text tower (250,002 ids, mean
    pooling, MLP projection) through transformers inside open_clip, OpenAI's ViT-B-32."""
    return _build_open_clip("xlmr", root, quick)


def build_pe_core(root: Path, quick: bool) -> Built:
    """PE-Core-B-16: timm's Eva tower with 2D rotary encoding and a MAP head; OpenCLIP's text
    transformer at 32 tokens."""
    return _build_open_clip("pe_core", root, quick)


def build_eva02(root: Path, quick: bool) -> Built:
    """EVA02-B-16: timm's Eva tower (rotary encoding, SwiGLU, sub-LNs), OpenCLIP's text."""
    return _build_open_clip("eva02", root, quick)


FAMILIES: dict[str, tuple[str, Callable[[Path, bool], Built]]] = {
    "clip": ("CLIP ViT-B-32", build_clip),
    "siglip": ("SigLIP ViT-B-16", build_siglip),
    "siglip2": ("SigLIP 2 ViT-B-16", build_siglip2),
    "metaclip2": ("MetaCLIP 2 (ViT-B-32 towers)", build_metaclip2),
    "chinese_clip": ("Chinese-CLIP ViT-B-16", build_chinese_clip),
    "xlmr": ("XLM-R-base ViT-B-32", build_xlmr),
    "pe_core": ("PE-Core-B-16", build_pe_core),
    "eva02": ("EVA02-B-16", build_eva02),
}


# ---------------------------------------------------------------------------------- timing
def _padded(model: clipforge.CLIP, ids: torch.Tensor) -> torch.Tensor:
    """The ids as ``encode_text`` runs them: a bidirectional tower without a mask (SigLIP)
    padded to its full length."""
    cfg = model.config.text
    if cfg.causal or cfg.mask_padding or ids.shape[1] >= model.context_length:
        return ids
    return F.pad(ids, (0, model.context_length - ids.shape[1]), value=cfg.pad_id)


def _cos_min(got: torch.Tensor, want: torch.Tensor) -> float:
    return F.cosine_similarity(got.float(), want.float(), dim=-1).min().item()


def run_family(key: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    title, build = FAMILIES[key]
    start = time.perf_counter()
    built = build(root, args.quick)
    ours = {mode: clipforge.create_model(built.directory, precision=mode) for mode in MODES}
    size = ours["fp32"].config.image_size
    prompts = [f"a photo of a {label}." for label in LABELS[:max(BATCHES)]]
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(max(BATCHES), 3, size, size, generator=gen)
    result: dict[str, Any] = {"family": key, "title": title, "peer": built.peer,
                              "notes": built.notes, "image_size": size,
                              "build_s": time.perf_counter() - start}
    contenders: dict[str, tuple[Callable, Callable]] = {
        f"clipforge {mode}": (model.encode_image, model.encode_text)
        for mode, model in ours.items()}
    contenders.update({f"{built.peer} {mode}": pair for mode, pair in built.encoders.items()})
    with torch.inference_mode():
        # the same computation: clipforge float32 against the reference float32
        want_image = built.encoders["fp32"][0](pixels[:4])
        want_text = built.encoders["fp32"][1](built.peer_texts(prompts[:4]))
        got_image = ours["fp32"].encode_image(pixels[:4])
        got_text = ours["fp32"].encode_text(ours["fp32"].tokenizer(prompts[:4]))
        result["check"] = {"image_max_abs": (got_image - want_image).abs().max().item(),
                           "text_max_abs": (got_text - want_text.float()).abs().max().item()}
        result["cos_min"] = {}
        for name, (images, texts) in contenders.items():
            is_ours = name.startswith("clipforge")
            ids = ours["fp32"].tokenizer(prompts[:4]) if is_ours else built.peer_texts(
                prompts[:4])
            result["cos_min"][name] = min(_cos_min(images(pixels[:4]), got_image),
                                          _cos_min(texts(ids), got_text))
        for batch in BATCHES:
            ids = ours["fp32"].tokenizer(prompts[:batch])
            peer_inputs = built.peer_texts(prompts[:batch])
            ran = needed_length(_padded(ours["fp32"], ids), ours["fp32"].config.text)
            result[f"tokens_{batch}"] = {"clipforge": ran,
                                         built.peer: built.peer_tokens(peer_inputs)}
            for what in ("image", "text"):
                fns = {}
                for name, (images, texts) in contenders.items():
                    if what == "image":
                        fns[name] = (lambda f=images, p=pixels[:batch]: f(p))
                    else:
                        arg = ids if name.startswith("clipforge") else peer_inputs
                        fns[name] = (lambda f=texts, a=arg: f(a))
                times, load = measure(fns, args.warmup, args.repeats)
                result[f"{what}_{batch}"] = {name: batch / statistics.median(t)
                                             for name, t in times.items()}
                result[f"{what}_{batch}_others"] = load
                print(f"  {what} batch {batch}: " + ", ".join(
                    f"{name} {rate:.1f}" for name, rate in result[f"{what}_{batch}"].items())
                    + f" /s (others {fmt_load(load)})", flush=True)
    result["total_s"] = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------------- report
def print_table(results: list[dict[str, Any]]) -> None:
    header = ("family", "contender", "img/s b1", "img/s b32", "x peer", "cap/s b1",
              "cap/s b32", "x peer", "cos min")
    rows = [header]
    for r in results:
        peer = f"{r['peer']} fp32"
        for name in r["image_32"]:
            rows.append((r["title"] if name == "clipforge fp32" else "", name,
                         f"{r['image_1'][name]:.1f}", f"{r['image_32'][name]:.2f}",
                         f"{r['image_32'][name] / r['image_32'][peer]:.2f}",
                         f"{r['text_1'][name]:.1f}", f"{r['text_32'][name]:.1f}",
                         f"{r['text_32'][name] / r['text_32'][peer]:.2f}",
                         f"{r['cos_min'][name]:.5f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.rjust(w) if i > 1 else cell.ljust(w)
                        for i, (cell, w) in enumerate(zip(row, widths))))
    print("x peer: throughput over the reference's float32 (transformers' or open_clip's) at "
          "batch 32; cos min: embeddings against clipforge float32 on 4 images and 4 texts")
    for r in results:
        others = max((v or 0.0) for k, v in r.items() if k.endswith("_others"))
        notes = "; ".join(r["notes"])
        print(f"  {r['title']}: reference check max |diff| image {r['check']['image_max_abs']:.2e}"
              f", text {r['check']['text_max_abs']:.2e}; text positions run at batch 32: "
              f"{r['tokens_32']}; others {others:.2f} cores; {r['total_s']:.0f} s"
              + (f"; {notes}" if notes else ""))


def machine() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    isa = [f for f in ("avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
           if f" {f}" in flags]
    import transformers

    return (f"CPU: {cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch "
            f"threads; {' '.join(isa) or 'no AVX-512 VNNI/BF16/AMX'}), torch {torch.__version__}"
            f", transformers {transformers.__version__}, python {platform.python_version()}; "
            f"load average {os.getloadavg()[0]:.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help=f"comma-separated, from {', '.join(FAMILIES)}")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per measurement (default 5; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: every family at test size, in about a minute")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every contender (default: torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (2 if args.quick else 5)
    keys = [k.strip() for k in args.families.split(",") if k.strip()]
    unknown = [k for k in keys if k not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    print(machine(), flush=True)
    results = []
    for key in keys:
        print(f"{FAMILIES[key][0]}: building and loading...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            results.append(run_family(key, Path(tmp), args))
        gc.collect()
    print()
    print(machine())
    print_table(results)
    if args.json:
        write_json(args.json, {"machine": machine(), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

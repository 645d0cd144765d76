"""Export a CLIP model's two encoders as ONNX graphs, with what a deployment needs beside them.

The reason to export is deployment. onnxruntime runs the graphs on ordinary CPUs faster than
eager PyTorch, and the process that serves embeddings no longer needs torch. So the directory
holds the preprocessing and tokenizer descriptions, the tokenizer's files (OpenAI's BPE
vocabulary, or the Hugging Face tokenizer files of SigLIP, XLM-RoBERTa, Chinese-CLIP...), the
logit scale, bias and probability kind, and the weights fingerprint as well as the graphs, and
:class:`clipforge.onnx.OnnxCLIP` needs nothing else.

Exporter: ``torch.onnx.export(dynamo=True)``, torch.export-based, the default since torch 2.9.
The TorchScript exporter gives correct graphs too (tensor-valued slice ends are traced
dynamically), but it is deprecated. Its dynamic shapes are only names: whatever the trace
turned into a constant stays one, silently. torch.export instead proves the graph valid for
every batch size and every text length from 1 to the context, or refuses to export. Its graphs
are also about half the size (opset 18+, ``LayerNormalization`` kept whole) and as fast in
onnxruntime.

The graphs are ``CLIP.encode_image`` and ``CLIP.encode_text`` themselves, traced: one
implementation for PyTorch and ONNX, for every family (pooling at the arg-max, an end id, the
last or first position or the mean; padding masks; post-norm towers, token types, position
offsets; matrix, linear or MLP projections; SigLIP's padding to full length; MAP heads, rotary
towers, SwiGLU, sub-LN).  The text tower's run length is data (see
:func:`clipforge.model.text.needed_length`), computed inside the graph and never taken from
the example input: padded ids of any length up to the context give the same result as the
same ids cut after the last position that matters, and cost what the cut ids cost.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import warnings
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..fileio import atomic_directory
from ..model import CLIP
from ..text.hf import HFTokenizer
from ..text.tokenizer import SPLIT_PATTERN, VOCAB_FILE, get_tokenizer
from ..weights.fingerprint import weights_fingerprint
from .manifest import (
    FORMAT,
    HF_TOKENIZER_VERSION,
    IMAGE_FILE,
    MANIFEST,
    TEXT_FILE,
    VOCAB_LICENSE,
    file_record,
    sample_ids,
    write_manifest,
)
from .quantize import quantize_export

# A graph over this many bytes of weights keeps them in a side file (<graph>.onnx.data): one
# protobuf message cannot exceed 2 GiB.
EXTERNAL_DATA_BYTES = 1_500_000_000
# What an export directory holds (quantize_export adds *_int8.onnx later): a directory
# written before clipforge listed its files in a manifest is replaced only if it holds these.
EXPORT_FILES = (MANIFEST, "*.onnx", "*.onnx.data", VOCAB_FILE, VOCAB_LICENSE)


# How the manifest spells out config.probability for readers that are not clipforge
PROBABILITY_RULES = {
    "softmax": "softmax of the logits over the texts, for each image",
    "sigmoid": "sigmoid of each logit on its own (a sigmoid-loss model: they need not sum to 1)",
}


class OnnxExportError(RuntimeError):
    """The exported graph is invalid or does not reproduce the PyTorch model."""


class ImageEncoder(nn.Module):
    """``CLIP.encode_image`` (unnormalised) as a module of its own: pixels -> image_embeds."""

    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def weight_bytes(self) -> int:
        return _bytes(self.model.visual.parameters())


class TextEncoder(nn.Module):
    """``CLIP.encode_text`` (unnormalised) as a module of its own: input_ids -> text_embeds.

    The graph is ``encode_text`` itself, traced: the family's padding to full length, the run
    length (data, computed in the graph: see :func:`clipforge.model.text.needed_length`),
    token types and position offset, masks, norms, pooling and projection are the code the
    PyTorch model runs, not a second copy of it.
    """

    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(input_ids)

    def weight_bytes(self) -> int:
        return _bytes(self.model.parameters()) - _bytes(self.model.visual.parameters())


def _bytes(tensors: Iterator[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs progress and warnings about operators clipforge does not use
    (torchvision's, among others), and its graph passes (onnx_ir) each pass they run; a
    successful export has nothing to report."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export",
                                                    "torch._export", "onnxscript", "onnx_ir")]
    levels = [log.level for log in loggers]
    try:
        for log in loggers:
            log.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def _export(module: ImageEncoder | TextEncoder, example: torch.Tensor, path: Path,
            input_name: str, output_name: str, dims: dict[int, Any], opset: int | None) -> None:
    """One graph to ``path`` (and ``path.data`` when its weights are large)."""
    weight_bytes = module.weight_bytes()
    with _quiet_exporter():
        program = torch.onnx.export(
            module, (example,), input_names=[input_name], output_names=[output_name],
            opset_version=opset, dynamo=True, dynamic_shapes={input_name: dims},
            optimize=True, verbose=False)
        program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_BYTES)


def _check(path: Path) -> int:
    """``onnx.checker`` on the written file (by path, so graphs with external data work too);
    returns the graph's default-domain opset."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise OnnxExportError(f"the exported {path.name} is not a valid ONNX model: "
                              f"{exc}") from None
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def check_exportable(model: CLIP) -> None:
    """Raise :class:`OnnxExportError` when the export could not carry what the model needs:
    a Hugging Face tokenizer's files come from the loaded model (``model.tokenizer``)."""
    if model.config.tokenizer.kind == "hf" and not isinstance(model.tokenizer, HFTokenizer):
        raise OnnxExportError(
            f"this {model.config.family} model reads a Hugging Face tokenizer, and none is "
            "loaded with it (a model built from its config alone), so the export could not "
            "carry its files: load it from its directory (clipforge.create_model(DIR)) and "
            "export that")


# What the export is checked with: texts of mixed lengths, an empty one and one longer than any
# context (truncated), then random ids (sample_ids) up to the full context
VERIFY_TEXTS = ("a photo of a cat", "", "two dogs playing in the snow next to a red car at night",
                " ".join(["word"] * 300))


def _example_ids(model: CLIP) -> list[torch.Tensor]:
    """Token batches that exercise the text graph, the first (several texts, full context)
    the one it is traced with: the model's tokenizer on :data:`VERIFY_TEXTS` (when it has
    one), those ids cut short, and random ids whose longest text fills the whole context."""
    cfg = model.config.text
    context = cfg.context_length
    random = torch.from_numpy(sample_ids(cfg, (context, context // 2, 2), seed=0))
    if model.tokenizer is None:
        return [random, random[1:], random[:2, :max(2, context // 2)]]
    texts = model.tokenizer(list(VERIFY_TEXTS), truncate=True).to(torch.long)
    return [texts, texts[:1], texts[:3, :max(2, context // 4)], random]


def _verify(image_path: Path, text_path: Path, image: ImageEncoder, text: TextEncoder,
            image_size: int, ids: list[torch.Tensor]) -> dict[str, float]:
    """Run both graphs in onnxruntime on a few inputs and compare with PyTorch; the largest
    absolute differences go into the manifest."""
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(0)
    pixels = [torch.randn(n, 3, image_size, image_size, generator=gen) for n in (1, 3)]
    result = {}
    for name, path, module, inputs in (("image", image_path, image, pixels),
                                       ("text", text_path, text, ids)):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        worst = 0.0
        for x in inputs:
            with torch.inference_mode():
                expected = module(x).numpy()
            got = session.run(None, {input_name: x.numpy()})[0]
            if got.shape != expected.shape:
                raise OnnxExportError(f"{path.name} gives shape {got.shape} for input "
                                      f"{tuple(x.shape)}, PyTorch {expected.shape}")
            scale = max(1.0, float(np.abs(expected).max()))
            diff = float(np.abs(got - expected).max())
            if not diff <= 1e-3 * scale:  # float32 round-off is ~1e-6 relative
                raise OnnxExportError(f"{path.name} differs from PyTorch by {diff:.3g} (outputs "
                                      f"up to {scale:.3g}) for input {tuple(x.shape)}")
            worst = max(worst, diff)
        result[f"{name}_max_abs_diff"] = worst
    return result


def _float32_cpu_eval(model: CLIP) -> CLIP:
    """The model to trace: itself when already float32 on the CPU, else a float32 CPU copy
    (the graphs are float32 whatever the model was loaded as)."""
    if model.dtype == torch.float32 and model.device.type == "cpu":
        return model
    copied = copy.deepcopy(model).to("cpu", torch.float32)
    return copied


# How each resize mode (PreprocessConfig.resize_mode) brings an image to image_size: the resize,
# then what makes it square.  Each is what clipforge.Preprocess does, step for step.
_CENTER_CROP = {"crop": "center",
                "crop_rule": "offsets round((width - image_size) / 2), round((height - image_size)"
                             " / 2) (Python round, half to even)"}
_RESIZE = {
    "shortest": {"resize": "shortest_side",
                 "resize_rule": "PIL resize of the short side to image_size, the long side to "
                                "int(image_size * long / short)",
                 **_CENTER_CROP},
    "longest": {"resize": "longest_side",
                "resize_rule": "PIL resize to (round(width / r), round(height / r)) with r = "
                               "max(width, height) / image_size (Python round, half to even)",
                "pad": "the short side padded to image_size with fill_color: left (top) "
                       "(image_size - side) // 2, the rest right (bottom)",
                "crop": "none"},
    "squash": {"resize": "squash",
               "resize_rule": "PIL resize of both sides to image_size (the aspect ratio is not "
                              "kept)",
               "crop": "none"},
}


def _preprocess_description(model: CLIP) -> dict[str, Any]:
    pre = model.config.preprocess
    described = {
        "image_size": model.config.image_size,
        "resize_mode": pre.resize_mode,
        **_RESIZE[pre.resize_mode],
        "interpolation": pre.interpolation,
        "convert": "RGB, after the resize" + (" and crop" if pre.resize_mode == "shortest"
                                              else ""),
        "scale": "uint8 / 255 in float32",
        "mean": list(pre.mean),
        "std": list(pre.std),
        "normalize": "(x - mean) / std per channel, float32",
        "layout": "NCHW",
        "dtype": "float32",
    }
    if pre.resize_mode == "longest":
        described["fill_color"] = pre.fill_color
    return described


def _openai_tokenizer_description(model: CLIP) -> dict[str, Any]:
    tokenizer = get_tokenizer()
    return {
        "type": "openai-clip-bpe",
        "vocab_file": VOCAB_FILE,
        "vocab_license_file": VOCAB_LICENSE,
        "vocab_size": tokenizer.vocab_size,
        "sot_token_id": tokenizer.sot_token_id,
        "eot_token_id": tokenizer.eot_token_id,
        "pad_token_id": 0,
        "context_length": model.context_length,
        "lowercase": True,
        "clean": ["ftfy.fix_text", "html.unescape twice", "strip",
                  "collapse whitespace runs to one space", "lower-case"],
        "split_pattern": SPLIT_PATTERN.pattern,
        "split_ignore_case": True,
        "bpe": "byte-level (GPT-2 byte table), '</w>' marks word ends",
        "layout": "[sot, ids..., eot, 0...] padded to context_length; the end-of-text token "
                  "is the largest id, so the pooled position is the arg-max",
        "truncate": "off by default (over-long text is an error); when on, cut to "
                    "context_length with eot kept last",
    }


_SPECIAL_TOKENS = ("pad", "bos", "eos", "cls", "sep", "unk")


def _hf_tokenizer_description(model: CLIP, files: list[Path]) -> dict[str, Any]:
    tokenizer: HFTokenizer = model.tokenizer  # type: ignore[assignment]
    spec = model.config.tokenizer
    special = {f"{name}_token_id": int(value) for name in _SPECIAL_TOKENS
               if (value := getattr(tokenizer.hf, f"{name}_token_id", None)) is not None}
    return {
        "type": "huggingface",
        "class": type(tokenizer.hf).__name__,
        "files": [file_record(path) for path in files],
        "load": "transformers.AutoTokenizer.from_pretrained(<export directory>) "
                "(clipforge.text.hf.HFTokenizer)",
        "vocab_size": tokenizer.vocab_size,
        **special,
        "context_length": model.context_length,
        "clean": spec.clean,
        "strip_sep": spec.strip_sep,
        "padding": "on the right with pad_token_id, every text to context_length "
                   "(padding='max_length')",
        "truncate": "off by default (over-long text is an error); when on, the end of the "
                    "text is cut and the tokenizer's end token kept",
    }


def _write_tokenizer(model: CLIP, directory: Path) -> dict[str, Any]:
    """Copy the model's tokenizer files into ``directory`` (where :func:`clipforge.create_model`
    and ``clipforge.text.load_tokenizer`` look for them) and describe them for the manifest."""
    if model.config.tokenizer.kind == "openai":
        package = resources.files("clipforge.text")
        for name in (VOCAB_FILE, VOCAB_LICENSE):
            with resources.as_file(package / name) as source:
                shutil.copyfile(source, directory / name)
        record = file_record(directory / VOCAB_FILE)
        return {**_openai_tokenizer_description(model),
                **{f"vocab_{key}": value for key, value in record.items() if key != "file"}}
    before = set(directory.iterdir())
    model.tokenizer.save(directory)  # type: ignore[union-attr]
    written = sorted(p for p in set(directory.iterdir()) - before if p.is_file())
    return _hf_tokenizer_description(model, written)


def export_onnx(model: CLIP, out_dir: str | Path, *, opset: int | None = None,
                quantize: str | None = None, verify: bool = True) -> Path:
    """Write ``model``'s encoders as ONNX graphs, with a manifest, to ``out_dir``.

    ``image_encoder.onnx``: ``pixels`` float32 [batch, 3, S, S] -> ``image_embeds`` float32
    [batch, embed_dim], ``model.encode_image`` unnormalised.  ``text_encoder.onnx``:
    ``input_ids`` int64 [batch, length] (``model.tokenizer`` ids, any length from 1 to the
    context) -> ``text_embeds`` float32 [batch, embed_dim], ``model.encode_text``.  Batch is
    dynamic on both.  Every family exports (the graphs are the model's own encoders, traced).
    ``clipforge_onnx.json`` records the config, fingerprint, logit scale and bias, probability
    kind, preprocessing and tokenizer, and each file's size and sha256; the tokenizer's files
    (OpenAI's BPE vocabulary and its licence, or a Hugging Face tokenizer's files) are written
    beside them.  ``quantize="int8"`` adds ``*_int8.onnx`` (dynamic int8 quantisation of the
    matrix products, see :func:`clipforge.onnx.quantize.quantize_export`).

    The graphs are checked with ``onnx.checker`` and, with ``verify``, run in onnxruntime and
    compared with the PyTorch model on images and on texts of mixed lengths (empty, truncated,
    full context): :class:`OnnxExportError` if they differ beyond float32 round-off.  The
    directory is written atomically (an existing export there is replaced); returns its path.
    """
    if quantize not in (None, "int8"):
        raise ValueError(f"unknown quantize {quantize!r}; choose 'int8' or None")
    precision = getattr(model, "precision", "fp32")
    if precision != "fp32":  # rounded or quantised copies of the weights: not what to ship
        raise ValueError(f"this model was converted to {precision} for inference; export the "
                         "float32 model (create_model(..., precision='fp32')) and pass "
                         "quantize='int8' for an int8 graph")
    check_exportable(model)
    fingerprint = weights_fingerprint(model)
    traced = _float32_cpu_eval(model)
    was_training = traced.training
    traced.eval()
    size, context = model.config.image_size, model.context_length
    try:
        image, text = ImageEncoder(traced), TextEncoder(traced)
        ids = _example_ids(traced)
        with atomic_directory(out_dir, MANIFEST, EXPORT_FILES) as tmp:
            image_path, text_path = tmp / IMAGE_FILE, tmp / TEXT_FILE
            batch = torch.export.Dim("batch", min=1)
            _export(image, torch.zeros(2, 3, size, size), image_path, "pixels", "image_embeds",
                    {0: batch}, opset)
            length = torch.export.Dim("length", min=1, max=context)
            _export(text, ids[0], text_path, "input_ids", "text_embeds",
                    {0: batch, 1: length}, opset)
            opsets = {_check(image_path), _check(text_path)}
            verification = (_verify(image_path, text_path, image, text, size, ids)
                            if verify else None)
            tokenizer = _write_tokenizer(model, tmp)
            write_manifest(tmp, _manifest(model, fingerprint, opsets, verification, tokenizer,
                                          tmp))
            if quantize:
                quantize_export(tmp, verify=verify)
    finally:
        traced.train(was_training)
    return Path(out_dir).resolve()


def _graph_record(directory: Path, name: str, input_spec: dict[str, Any],
                  output_spec: dict[str, Any]) -> dict[str, Any]:
    files = [file_record(directory / name)]
    data = directory / f"{name}.data"
    if data.exists():
        files.append(file_record(data))
    return {"file": name, "files": files, "input": input_spec, "output": output_spec}


def _manifest(model: CLIP, fingerprint: str, opsets: set[int],
              verification: dict[str, float] | None, tokenizer: dict[str, Any],
              directory: Path) -> dict[str, Any]:
    config, text = model.config, model.config.text
    size, dim, context = config.image_size, config.embed_dim, model.context_length
    logit_scale = float(model.logit_scale.detach().float())
    return {
        "format": FORMAT,
        "format_version": HF_TOKENIZER_VERSION if config.tokenizer.kind == "hf" else 1,
        "clipforge_version": __version__,
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        "opset": max(opsets),
        "config": config.to_dict(),
        "embed_dim": dim,
        "context_length": context,
        "logit_scale": logit_scale,
        "logit_scale_exp": float(np.exp(logit_scale)),
        "logit_bias": (None if model.logit_bias is None
                       else float(model.logit_bias.detach().float())),
        "logits": "exp(logit_scale) * cos(image_embeds, text_embeds)"
                  + (" + logit_bias" if model.logit_bias is not None else ""),
        "probability": model.config.probability,
        "probability_rule": PROBABILITY_RULES[model.config.probability],
        "fingerprint": fingerprint,
        "source": dict(model.origin) if model.origin else None,
        "image_encoder": _graph_record(
            directory, IMAGE_FILE,
            {"name": "pixels", "dtype": "float32", "shape": ["batch", 3, size, size]},
            {"name": "image_embeds", "dtype": "float32", "shape": ["batch", dim],
             "normalized": False}),
        "text_encoder": _graph_record(
            directory, TEXT_FILE,
            {"name": "input_ids", "dtype": "int64", "shape": ["batch", "length"],
             "max_length": context, "pad_token_id": text.pad_id,
             "padded_to_max_length_in_graph": not (text.causal or text.mask_padding)},
            {"name": "text_embeds", "dtype": "float32", "shape": ["batch", dim],
             "normalized": False}),
        "preprocess": _preprocess_description(model),
        "tokenizer": tokenizer,
        "verification": verification,
        "variants": {},
    }

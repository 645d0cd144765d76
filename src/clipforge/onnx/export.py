"""Export a CLIP model's two encoders as ONNX graphs, with what a deployment needs beside them.

The reason to export is deployment. onnxruntime runs the graphs on ordinary CPUs faster than
eager PyTorch, and the process that serves embeddings no longer needs torch. So the directory
holds the preprocessing and tokenizer descriptions, the BPE vocabulary and the weights
fingerprint as well as the graphs, and :class:`clipforge.onnx.OnnxCLIP` needs nothing else.

Exporter: ``torch.onnx.export(dynamo=True)``, torch.export-based, the default since torch 2.9.
The TorchScript exporter gives correct graphs too (tensor-valued slice ends are traced
dynamically), but it is deprecated. Its dynamic shapes are only names: whatever the trace
turned into a constant stays one, silently. torch.export instead proves the graph valid for
every batch size and every text length from 1 to the context, or refuses to export. Its graphs
are also about half the size (opset 18+, ``LayerNormalization`` kept whole) and as fast in
onnxruntime.

The text graph does what ``CLIP.encode_text`` does. It pools at the arg-max id (the
end-of-text token) and runs the transformer only up to the batch's last end token. That
length is data (``eot.max() + 1``), so it is computed inside the graph; it is never taken from
the example input. Zero-padded ids of any length up to the context give the same result as
the same ids cut after the last end token, and cost what the cut ids cost.
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
from ..text.tokenizer import SPLIT_PATTERN, VOCAB_FILE, get_tokenizer
from ..weights.fingerprint import weights_fingerprint
from .manifest import (
    FORMAT,
    FORMAT_VERSION,
    IMAGE_FILE,
    MANIFEST,
    TEXT_FILE,
    VOCAB_LICENSE,
    file_record,
    write_manifest,
)
from .quantize import quantize_export

# A graph over this many bytes of weights keeps them in a side file (<graph>.onnx.data): one
# protobuf message cannot exceed 2 GiB.
EXTERNAL_DATA_BYTES = 1_500_000_000
# What an export directory holds (quantize_export adds *_int8.onnx later): a directory
# written before clipforge listed its files in a manifest is replaced only if it holds these.
EXPORT_FILES = (MANIFEST, "*.onnx", "*.onnx.data", VOCAB_FILE, VOCAB_LICENSE)


class OnnxExportError(RuntimeError):
    """The exported graph is invalid or does not reproduce the PyTorch model."""


class ImageEncoder(nn.Module):
    """``CLIP.encode_image`` (unnormalised) as a module of its own: pixels -> image_embeds."""

    def __init__(self, model: CLIP):
        super().__init__()
        self.visual = model.visual

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)


class TextEncoder(nn.Module):
    """``CLIP.encode_text`` (unnormalised) with the run length computed in the graph.

    ``encode_text`` reads the length with ``int(...)``, which an exporter can only turn into a
    constant. Here it stays a tensor (an unbacked size for torch.export), bounded by
    ``torch._check`` so that the slices are valid for every input.
    """

    def __init__(self, model: CLIP):
        super().__init__()
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.transformer = model.transformer
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        eot = input_ids.argmax(dim=-1)
        length = (eot.max() + 1).item()
        torch._check(length >= 1)
        torch._check(length <= input_ids.shape[1])
        x = self.token_embedding(input_ids[:, :length]) + self.positional_embedding[:length]
        x = self.ln_final(self.transformer(x, causal=True))
        return x[torch.arange(x.shape[0]), eot] @ self.text_projection


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs progress and warnings about operators clipforge does not use
    (torchvision's, among others); a successful export has nothing to report."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export",
                                                    "torch._export", "onnxscript")]
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


def _export(module: nn.Module, example: torch.Tensor, path: Path, input_name: str,
            output_name: str, dims: dict[int, Any], opset: int | None) -> None:
    """One graph to ``path`` (and ``path.data`` when its weights are large)."""
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
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


# The text layout TextEncoder reproduces (OpenAI's): causal, pre-norm, pooled at the arg-max
# end token, projected by a matrix, with OpenAI's BPE.  Other families' text towers are not
# exported yet: exporting them with this graph would give wrong embeddings without a word.
OPENAI_TEXT_LAYOUT = {"causal": True, "norm": "pre", "pool": "argmax", "mask_padding": False,
                      "type_vocab_size": 0, "position_offset": 0, "proj": "matrix"}


def check_exportable(model: CLIP) -> None:
    """Raise :class:`OnnxExportError` naming what the text graph cannot reproduce."""
    text = model.config.text
    other = [f"text.{k}={getattr(text, k)!r}" for k, v in OPENAI_TEXT_LAYOUT.items()
             if getattr(text, k) != v]
    if model.config.tokenizer.kind != "openai":
        other.append(f"tokenizer.kind={model.config.tokenizer.kind!r}")
    if other:
        raise OnnxExportError(
            f"ONNX export covers OpenAI-layout text towers so far, and this model "
            f"({model.config.family}) has {', '.join(other)}; run it with the PyTorch backend")


def _example_ids(context: int, sot: int, eot: int, seed: int) -> list[torch.Tensor]:
    """Token batches that exercise the text graph: short texts of mixed length padded to the
    full context, and a batch whose longest text fills the whole context."""
    gen = torch.Generator().manual_seed(seed)
    tokenizer = get_tokenizer()
    short = tokenizer(["a photo of a cat", "a diagram", "two dogs playing in the snow"],
                      context_length=context, truncate=True)
    full = torch.zeros(2, context, dtype=torch.long)
    full[:, 1:] = torch.randint(1, sot, (2, context - 1), generator=gen)
    full[:, 0] = sot
    full[0, -1] = eot
    full[1, context // 2] = eot
    full[1, context // 2 + 1:] = 0
    return [short, short[:1, :12], full]


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


def _preprocess_description(model: CLIP) -> dict[str, Any]:
    pre = model.config.preprocess
    return {
        "image_size": model.config.image_size,
        "resize": "shortest_side",
        "resize_rule": "PIL resize of the short side to image_size, the long side to "
                       "int(image_size * long / short)",
        "interpolation": pre.interpolation,
        "crop": "center",
        "crop_rule": "offsets round((width - image_size) / 2), round((height - image_size) / 2)"
                     " (Python round, half to even)",
        "convert": "RGB, after the crop",
        "scale": "uint8 / 255 in float32",
        "mean": list(pre.mean),
        "std": list(pre.std),
        "normalize": "(x - mean) / std per channel, float32",
        "layout": "NCHW",
        "dtype": "float32",
    }


def _tokenizer_description(model: CLIP) -> dict[str, Any]:
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


def export_onnx(model: CLIP, out_dir: str | Path, *, opset: int | None = None,
                quantize: str | None = None, verify: bool = True) -> Path:
    """Write ``model``'s encoders as ONNX graphs, with a manifest, to ``out_dir``.

    ``image_encoder.onnx``: ``pixels`` float32 [batch, 3, S, S] -> ``image_embeds`` float32
    [batch, embed_dim], ``model.encode_image`` unnormalised.  ``text_encoder.onnx``:
    ``input_ids`` int64 [batch, length] (``clipforge.tokenize`` ids, any length from 1 to the
    context) -> ``text_embeds`` float32 [batch, embed_dim], ``model.encode_text``.  Batch is
    dynamic on both.  ``clipforge_onnx.json`` records the config, fingerprint, logit scale and
    bias, preprocessing and tokenizer, and each file's size and sha256; the BPE vocabulary and its
    licence are copied beside them.  ``quantize="int8"`` adds ``*_int8.onnx`` (dynamic int8
    quantisation of the matrix products, see :func:`clipforge.onnx.quantize.quantize_export`).

    The graphs are checked with ``onnx.checker`` and, with ``verify``, run in onnxruntime and
    compared with the PyTorch model (:class:`OnnxExportError` if they differ beyond float32
    round-off).  Text towers other than OpenAI's layout are refused (:func:`check_exportable`).
    The directory is written atomically (an existing export there is replaced);
    returns its path.
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
    tokenizer = get_tokenizer()
    config = model.config
    size, context = config.image_size, model.context_length
    try:
        image, text = ImageEncoder(traced), TextEncoder(traced)
        ids = _example_ids(context, tokenizer.sot_token_id, tokenizer.eot_token_id, seed=0)
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
            package = resources.files("clipforge.text")
            for name in (VOCAB_FILE, VOCAB_LICENSE):
                with resources.as_file(package / name) as source:
                    shutil.copyfile(source, tmp / name)
            write_manifest(tmp, _manifest(model, fingerprint, opsets, verification, tmp))
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
              verification: dict[str, float] | None, directory: Path) -> dict[str, Any]:
    config = model.config
    size, dim, context = config.image_size, config.embed_dim, model.context_length
    logit_scale = float(model.logit_scale.detach().float())
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
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
             "max_length": context},
            {"name": "text_embeds", "dtype": "float32", "shape": ["batch", dim],
             "normalized": False}),
        "preprocess": _preprocess_description(model),
        "tokenizer": {**_tokenizer_description(model), **{
            f"vocab_{key}": value for key, value in file_record(directory / VOCAB_FILE).items()
            if key != "file"}},
        "verification": verification,
        "variants": {},
    }

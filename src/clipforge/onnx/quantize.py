"""An int8 variant of an export: dynamic quantisation of the encoders' matrix products.

Why dynamic quantisation: it needs no calibration data. The weights of every MatMul/Gemm are
stored as int8 (per output channel), and activations are quantised on the fly, batch by
batch. On CPUs with VNNI (AVX-512 VNNI or AVX-VNNI) onnxruntime then multiplies uint8 by int8
in hardware. The transformer's matrix products are most of a ViT's work, so the ViT and text
graphs gain most. Convolutions stay float32: onnxruntime's integer convolution is slower than
its float one.

int8 embeddings are close to the float32 ones (the cosine is recorded in the manifest) but
not equal. Like every model converted for inference (see ``weights_fingerprint``), the
variant carries the fingerprint of the float32 weights it came from, so it can query an index
those weights built; ``OnnxCLIP.origin`` names the variant. Needs onnxruntime only, not torch,
so an existing export can be quantised where it is deployed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..configs import CLIPConfig
from .manifest import (
    IMAGE_FILE,
    TEXT_FILE,
    check_file,
    export_directory,
    file_record,
    read_manifest,
    sample_ids,
    variant_file,
    write_manifest,
)

GRAPHS = (("image_encoder", IMAGE_FILE), ("text_encoder", TEXT_FILE))


@contextlib.contextmanager
def _without_preprocessing_advice() -> Iterator[None]:
    """quantize_dynamic advises (on the root logger) running its pre-processing (symbolic
    shape inference and graph optimisation) first. On ViT-B-32 that gave the same cosines
    and no speed-up here, because onnxruntime optimises the quantised graph when it loads it.
    It also logs a line per tensor it leaves alone at INFO (on the root logger too, which the
    command line shows): progress, not news.  Its warnings still come through."""
    def keep(record: logging.LogRecord) -> bool:
        return (record.levelno >= logging.WARNING
                and not str(record.msg).startswith("Please consider to run pre-processing"))

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def quantize_export(path: str | Path, *, verify: bool = True) -> Path:
    """Add ``image_encoder_int8.onnx`` and ``text_encoder_int8.onnx`` to the export at
    ``path`` and record them in its manifest (``variants.int8``); load them with
    ``OnnxCLIP(path, variant="int8")``.  With ``verify``, the manifest also records the
    lowest cosine similarity to the float32 graphs on a few random inputs."""
    import torch  # not at module level: running an export needs no torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    directory = export_directory(path)
    manifest = read_manifest(directory)
    records: dict[str, Any] = {}
    # Without VNNI (AVX2 only) onnxruntime multiplies u8 by s8 in 16-bit sums that saturate:
    # 7-bit weights (its reduce_range) keep them in range.  Measured on an AVX2 EPYC
    # (2026-12-03): 8-bit weights gave a cosine of 0.978 to float32, where tests ask > 0.99.
    reduce_range = not getattr(torch.cpu, "_is_vnni_supported", lambda: True)()
    for key, name in GRAPHS:
        source = check_file(directory, manifest[key]["files"][0], verify=False)
        target = directory / variant_file(name, "int8")
        with _without_preprocessing_advice():
            quantize_dynamic(source, target, op_types_to_quantize=["MatMul", "Gemm"],
                             per_channel=True, weight_type=QuantType.QInt8,
                             reduce_range=reduce_range,
                             use_external_data_format=len(manifest[key]["files"]) > 1)
        files = [file_record(target)]
        if (target.parent / f"{target.name}.data").exists():
            files.append(file_record(target.parent / f"{target.name}.data"))
        records[key] = {**manifest[key], "file": target.name, "files": files}
    records["fingerprint"] = manifest["fingerprint"]  # of the float32 weights quantised
    records["quantization"] = {"method": "onnxruntime.quantization.quantize_dynamic",
                               "ops": ["MatMul", "Gemm"],
                               "weights": ("int8 per channel, 7 bits used (reduce_range: "
                                           "made on a CPU without VNNI)") if reduce_range
                               else "int8 per channel",
                               "activations": "uint8, dynamic per tensor"}
    if verify:
        records["verification"] = _cosines(directory, manifest, records)
    manifest["variants"]["int8"] = records
    write_manifest(directory, manifest)
    return directory


def _cosines(directory: Path, manifest: dict[str, Any],
             records: dict[str, Any]) -> dict[str, float]:
    """Lowest cosine similarity between the int8 and float32 embeddings of random inputs."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    config = CLIPConfig.from_dict(manifest["config"])
    size, context = config.image_size, config.text.context_length
    ids = sample_ids(config.text, (6, 13, context // 2 + 1, context), seed=0)
    inputs = {"image_encoder": rng.standard_normal((4, 3, size, size), dtype=np.float32),
              "text_encoder": ids}
    result = {}
    for key, _ in GRAPHS:
        out = []
        for record in (manifest[key], records[key]):
            session = ort.InferenceSession(str(directory / record["file"]),
                                           providers=["CPUExecutionProvider"])
            out.append(session.run(None, {record["input"]["name"]: inputs[key]})[0])
        a, b = out
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        result[f"{key.split('_')[0]}_min_cosine_to_fp32"] = float(cos.min())
    return result

"""Run an exported CLIP with onnxruntime, with or without PyTorch.

:class:`OnnxCLIP` is a :class:`clipforge.Encoder`, as :class:`clipforge.CLIP` is:
``encode_image``, ``encode_text``, ``preprocess``, ``tokenizer``, ``context_length``,
``logit_scale``, ``logit_bias``, ``logits``, ``probabilities``, ``config``, ``device``, plus
``origin`` and ``fingerprint``. So clipforge's embedding loops, search index and zero-shot code
take it in place of the PyTorch model (``clipforge.create_model(DIR, backend="onnx")`` loads
it). Torch tensors in give torch tensors out; numpy arrays in give numpy arrays out.

Why no torch: a deployment that only embeds should not have to ship PyTorch (hundreds of
megabytes, seconds to import). This module imports numpy, PIL, onnxruntime and clipforge's
tokenizer and transform, none of which import torch; an export of a model with a Hugging Face
tokenizer (SigLIP, XLM-RoBERTa, Chinese-CLIP...) reads the tokenizer files it carries with
transformers' tokenizer classes, which need no torch either. ``tokenize`` and ``preprocess``
return numpy arrays when torch is absent (or when ``array_type="numpy"``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from ..configs import CLIPConfig
from ..image.transform import Preprocess
from ..text.hf import HFTokenizer, TokenizerFilesError
from ..text.tokenizer import Tokenizer
from .manifest import VARIANTS, OnnxLoadError, check_file, export_directory, read_manifest

ArrayType = Literal["auto", "torch", "numpy"]


class NumpyPreprocess(Preprocess):
    """:class:`clipforge.Preprocess` returning numpy float32 [3, S, S]: the same values,
    computed without torch."""

    def __call__(self, img: Image.Image) -> np.ndarray:  # type: ignore[override]
        return self.to_numpy(img)


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _is_torch(x: Any) -> bool:
    torch = sys.modules.get("torch")  # a torch tensor exists only if torch is imported
    return torch is not None and isinstance(x, torch.Tensor)


def _to_numpy(x: Any, dtype: type) -> np.ndarray:
    if _is_torch(x):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=dtype)


def _normalize(x: np.ndarray) -> np.ndarray:
    """``torch.nn.functional.normalize(x, dim=-1)``: rows over max(norm, 1e-12)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, np.float32(1e-12))


def default_threads() -> int:
    """The CPUs this process may run on (its affinity where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def session_options(threads: int | None = None) -> Any:
    """onnxruntime options for one-request-at-a-time encoding on the CPU: every core on each
    operator (intra-op), operators in sequence, all graph optimisations (operator fusion,
    constant folding, layout changes)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return options


def _session(path: Path, options: Any, providers: list[str]) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if len(reason) > 300:
            reason = reason[:297] + "..."
        raise OnnxLoadError(f"cannot load {path}: not a usable ONNX model ({reason}); copy or "
                            "export it again") from None


class OnnxCLIP:
    """An exported CLIP (see :func:`clipforge.onnx.export_onnx`) run by onnxruntime: a
    :class:`clipforge.Encoder`.

    ``variant``: "fp32" (equal to PyTorch to float32 round-off) or "int8" (if the export has
    it).  ``threads``: intra-op threads (default: the CPUs available).  ``array_type``: what
    ``tokenize``, ``preprocess`` and ``logit_scale`` return: "torch" tensors, "numpy" arrays,
    or "auto" (torch when it can be imported).  ``verify``: check each graph's sha256 against
    the manifest (sizes are always checked).  ``providers``: onnxruntime execution providers.
    """

    device = "cpu"
    # The graph has no prefix cache: zero-shot prompts run whole (encode_text_with_prefix
    # only prepends the prefix).
    shares_prefixes = False

    def __init__(self, path: str | Path, *, variant: str = "fp32", threads: int | None = None,
                 array_type: ArrayType = "auto", verify: bool = True,
                 providers: list[str] | None = None):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        if array_type not in ("auto", "torch", "numpy"):
            raise ValueError(f"unknown array_type {array_type!r}; choose auto, torch or numpy")
        self.path = export_directory(path).resolve()
        self.manifest = manifest = read_manifest(self.path)
        graphs = manifest if variant == "fp32" else manifest.get("variants", {}).get(variant)
        if graphs is None:
            raise OnnxLoadError(f"{self.path} has no {variant} variant; add it with "
                                "clipforge.onnx.quantize_export (or export with --int8)")
        try:
            self.config = CLIPConfig.from_dict(manifest["config"])
            image_files, text_files = graphs["image_encoder"], graphs["text_encoder"]
            self.fingerprint: str = graphs["fingerprint"]
            self._logit_scale = float(manifest["logit_scale"])
            tokenizer_files = _tokenizer_files(manifest["tokenizer"], self.config)
        except (KeyError, TypeError, ValueError) as exc:
            raise OnnxLoadError(f"{self.path / 'clipforge_onnx.json'} is incomplete or "
                                f"invalid: {exc!r}") from None
        self._logit_bias = _logit_bias(manifest, self.config)
        self.variant = variant
        self.context_length = self.config.text.context_length
        self.embed_dim = self.config.embed_dim
        self.image_size = self.config.image_size
        self.origin: dict[str, str | None] = {"model": str(self.path), "weights": None,
                                              "backend": "onnx"}
        if variant != "fp32":
            self.origin["variant"] = variant
        for record in image_files["files"] + text_files["files"]:
            check_file(self.path, record, verify)
        checked = [check_file(self.path, record, verify) for record in tokenizer_files]
        self._vocab = checked[0]  # OpenAI's BPE vocabulary (the first file)
        self._tokenizer: Tokenizer | HFTokenizer | None = None
        self.threads = threads or default_threads()
        options = session_options(self.threads)
        providers = providers or ["CPUExecutionProvider"]
        self._image = _session(self.path / image_files["file"], options, providers)
        self._text = _session(self.path / text_files["file"], options, providers)
        self._image_input = image_files["input"]["name"]
        self._text_input = text_files["input"]["name"]
        self.array_type: str = ("torch" if _torch_available() else "numpy"
                                ) if array_type == "auto" else array_type
        kind = Preprocess if self.array_type == "torch" else NumpyPreprocess
        self.preprocess: Preprocess = kind.from_config(self.config)

    def __repr__(self) -> str:
        return f"OnnxCLIP({str(self.path)!r}, variant={self.variant!r})"

    # ------------------------------------------------------------------ attributes

    @property
    def logit_scale(self) -> Any:
        """The log temperature, as ``CLIP.logit_scale`` (a 0-d float32 tensor or array)."""
        value = np.array(self._logit_scale, dtype=np.float32)
        if self.array_type == "torch":
            import torch

            return torch.from_numpy(value)
        return value

    @property
    def logit_bias(self) -> Any:
        """The learned logit bias (a 0-d float32 tensor or array) of a sigmoid-loss model
        (SigLIP), as ``CLIP.logit_bias``; None for a softmax model."""
        if self._logit_bias is None:
            return None
        value = np.array(self._logit_bias, dtype=np.float32)
        if self.array_type == "torch":
            import torch

            return torch.from_numpy(value)
        return value

    @property
    def tokenizer(self) -> Tokenizer | HFTokenizer:
        """The model's tokenizer over the export's own copy of its files, padding to the
        model's context: OpenAI's BPE, or the Hugging Face tokenizer the model was exported
        with (read by transformers' tokenizer classes, loaded at first use)."""
        if self._tokenizer is None:
            if self.config.tokenizer.kind == "openai":
                self._tokenizer = Tokenizer(self._vocab, context_length=self.context_length)
            else:
                self._tokenizer = self._hf_tokenizer()
        return self._tokenizer

    def _hf_tokenizer(self) -> HFTokenizer:
        spec = self.config.tokenizer
        _quiet_transformers()
        try:
            return HFTokenizer(self.path, self.context_length, clean=spec.clean,
                               strip_sep=spec.strip_sep)
        except TokenizerFilesError as exc:
            raise OnnxLoadError(f"cannot load the tokenizer of the export {self.path}: "
                                f"{exc}") from None

    def eval(self) -> OnnxCLIP:
        return self

    # ------------------------------------------------------------------ inputs

    def tokenize(self, texts: str | Iterable[str], truncate: bool = False) -> Any:
        """[N, context_length] int64 ids, as :func:`clipforge.tokenize` gives them."""
        ids = self.tokenizer.encode_batch(texts, self.context_length, truncate)
        if self.array_type == "torch":
            import torch

            return torch.from_numpy(ids)
        return ids

    # ------------------------------------------------------------------ encoders

    def encode_image(self, pixels: Any, normalize: bool = False) -> Any:
        """[N, 3, S, S] preprocessed pixels -> [N, embed_dim] image embeddings."""
        x = _to_numpy(pixels, np.float32)
        size = self.image_size
        if x.ndim != 4 or x.shape[1:] != (3, size, size):
            raise ValueError(f"expected [batch, 3, {size}, {size}] pixels, got shape "
                             f"{tuple(x.shape)}: use the model's preprocess transform")
        if len(x):
            out = self._image.run(None, {self._image_input: x})[0]
        else:
            out = np.zeros((0, self.embed_dim), np.float32)
        return self._output(out, normalize, like=pixels)

    def encode_text(self, tokens: Any, normalize: bool = False) -> Any:
        """[N, length] token ids (from ``tokenizer``, padded, any length up to the context) ->
        [N, embed_dim], as ``CLIP.encode_text``: the family's pooling, masks and projection
        are in the graph."""
        ids = _to_numpy(tokens, np.int64)
        if ids.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tuple(ids.shape)}")
        if ids.shape[1] > self.context_length:
            raise ValueError(f"token length {ids.shape[1]} exceeds the model's context "
                             f"{self.context_length}")
        if ids.shape[1] == 0:
            raise ValueError("tokens must hold at least one position")
        if len(ids):
            out = self._text.run(None, {self._text_input: ids})[0]
        else:
            out = np.zeros((0, self.embed_dim), np.float32)
        return self._output(out, normalize, like=tokens)

    def encode_text_with_prefix(self, prefix: Any, suffixes: Any,
                                normalize: bool = False) -> Any:
        """``encode_text`` of ``[prefix; suffixes[i]]`` (see ``CLIP.encode_text_with_prefix``);
        here the prefix is simply prepended: the graph has no prefix cache."""
        p, s = _to_numpy(prefix, np.int64), _to_numpy(suffixes, np.int64)
        if p.ndim != 1 or s.ndim != 2:
            raise ValueError("prefix must be [P] and suffixes [N, S] token ids")
        length = int(s.argmax(axis=-1).max()) + 1 if len(s) else 1
        if len(p) + length > self.context_length:
            raise ValueError(f"prefix and suffix ({len(p)} + {length} tokens) exceed the "
                             f"model's context {self.context_length}")
        ids = np.concatenate([np.broadcast_to(p, (len(s), len(p))), s[:, :length]], axis=1)
        return self._output(_to_numpy(self.encode_text(ids), np.float32), normalize,
                            like=suffixes)

    def logits(self, image: Any, text: Any) -> Any:
        """[N_img, N_txt] logits of unit embeddings: ``exp(logit_scale) * cos (+ logit_bias)``,
        as ``CLIP.logits``."""
        a, b = _to_numpy(image, np.float32), _to_numpy(text, np.float32)
        logits = np.float32(np.exp(self._logit_scale)) * a @ b.T
        if self._logit_bias is not None:
            logits = logits + np.float32(self._logit_bias)
        return self._wrap(logits, like=image)

    def probabilities(self, logits: Any) -> Any:
        """A softmax over the texts, or an independent sigmoid per pair for a sigmoid-loss
        model (``config.probability``), as ``CLIP.probabilities``."""
        x = _to_numpy(logits, np.float32)
        if self.config.probability == "sigmoid":
            probs = 1 / (1 + np.exp(-x))
        else:
            shifted = np.exp(x - x.max(axis=-1, keepdims=True))
            probs = shifted / shifted.sum(axis=-1, keepdims=True)
        return self._wrap(probs.astype(np.float32), like=logits)

    def __call__(self, images: Any, tokens: Any) -> tuple[Any, Any]:
        """Scaled cosine similarities (plus the bias of a SigLIP model):
        (logits_per_image [N_img, N_txt], logits_per_text)."""
        image = _to_numpy(self.encode_image(images, normalize=True), np.float32)
        text = _to_numpy(self.encode_text(tokens, normalize=True), np.float32)
        logits = _to_numpy(self.logits(image, text), np.float32)
        return self._wrap(logits, like=images), self._wrap(logits.T.copy(), like=images)

    def _output(self, out: np.ndarray, normalize: bool, like: Any) -> Any:
        return self._wrap(_normalize(out) if normalize else out, like)

    @staticmethod
    def _wrap(out: np.ndarray, like: Any) -> Any:
        if _is_torch(like):
            return sys.modules["torch"].from_numpy(out)
        return out


def _logit_bias(manifest: dict[str, Any], config: CLIPConfig) -> float | None:
    """The export's logit bias: None for a softmax model; an export of a model with a bias that
    does not record it cannot give its logits."""
    if not config.logit_bias:
        return None
    value = manifest.get("logit_bias")
    if not isinstance(value, int | float):
        raise OnnxLoadError("the manifest records no logit_bias for a model that has one "
                            "(an export by an older clipforge); export the model again")
    return float(value)


def _tokenizer_files(described: dict[str, Any], config: CLIPConfig) -> list[dict[str, Any]]:
    """The manifest's records of the tokenizer's files (the first one the vocabulary for
    OpenAI's BPE); KeyError/TypeError/ValueError when the description is incomplete."""
    if config.tokenizer.kind == "openai":
        return [{"file": described["vocab_file"], "bytes": described["vocab_bytes"],
                 "sha256": described["vocab_sha256"]}]
    files = described["files"]
    if not isinstance(files, list) or not files:
        raise ValueError("the Hugging Face tokenizer's files are not listed")
    return [{"file": f["file"], "bytes": f["bytes"], "sha256": f["sha256"]} for f in files]


class _NoTorchAdvice(logging.Filter):
    """transformers says on import, where torch is missing, that only tokenizers will work:
    here that is all it is asked for, and a deployment without torch is the point."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found")


def _quiet_transformers() -> None:
    log = logging.getLogger("transformers")
    if not any(isinstance(f, _NoTorchAdvice) for f in log.filters):
        log.addFilter(_NoTorchAdvice())


def load_onnx(path: str | Path, **options: Any) -> OnnxCLIP:
    """:class:`OnnxCLIP` for the export at ``path`` (keyword options as the class)."""
    return OnnxCLIP(path, **options)

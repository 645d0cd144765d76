"""A short digest of a model's architecture and weights.

Embeddings from two models live in different spaces even when the architecture is the same, so
anything that stores embeddings (a search index, a saved zero-shot classifier) records which
weights made them and refuses to mix in queries from others.  The digest covers the config and
every tensor's name, shape and float32 values: two loads of the same file, in any format, give
the same digest; a fine-tuned copy does not.
"""

from __future__ import annotations

import hashlib

import torch

from ..model import CLIP


def weights_fingerprint(model: CLIP) -> str:
    """sha256 (first 16 hex digits) of the config and the float32 weights of ``model``.

    A model converted for inference (bf16, int8, an ONNX export) carries the digest of the
    float32 weights it came from as ``model.fingerprint``, so that it can query an index those
    weights built."""
    recorded = getattr(model, "fingerprint", None)
    if recorded:
        return recorded
    digest = hashlib.sha256(model.config.to_json().encode())
    for name, tensor in sorted(model.state_dict().items()):
        values = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(values.shape)};".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]

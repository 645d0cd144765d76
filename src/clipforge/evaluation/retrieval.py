"""Image <-> text retrieval recall@k, in chunks so the full similarity matrix is never built."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _recall(queries: torch.Tensor, keys: torch.Tensor, relevant: list[set[int]],
            ks: Sequence[int], chunk: int) -> dict[int, float]:
    top = max(ks)
    hits = {k: 0 for k in ks}
    for start in range(0, len(queries), chunk):
        scores = queries[start:start + chunk] @ keys.t()
        best = scores.topk(min(top, keys.shape[0]), dim=-1).indices.tolist()
        for row, ranked in enumerate(best):
            wanted = relevant[start + row]
            for k in ks:
                hits[k] += bool(wanted.intersection(ranked[:k]))
    return {k: hits[k] / max(1, len(queries)) for k in ks}


def retrieval_recall(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                     text_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10),
                     chunk: int = 1024) -> dict[str, float]:
    """Recall@k both ways; ``text_to_image[j]`` is the image caption j describes (an image may
    have several captions: a hit if any of them is in the top k)."""
    image = F.normalize(image_embeddings.float(), dim=-1)
    text = F.normalize(text_embeddings.float(), dim=-1)
    captions_of: list[set[int]] = [set() for _ in range(len(image))]
    for j, i in enumerate(text_to_image):
        captions_of[i].add(j)
    i2t = _recall(image, text, captions_of, ks, chunk)
    t2i = _recall(text, image, [{i} for i in text_to_image], ks, chunk)
    metrics = {f"text_retrieval_recall@{k}": v for k, v in i2t.items()}
    metrics.update({f"image_retrieval_recall@{k}": v for k, v in t2i.items()})
    return metrics

"""Image <-> text retrieval recall@k as CLIP_benchmark reports it, in bounded memory.

Definitions (CLIP_benchmark's ``zeroshot_retrieval``): embeddings are L2-normalised and
scored by cosine similarity.

- ``text_retrieval_recall@k`` (image -> text): the fraction of images with at least one of
  their captions among the k best-scoring captions. An image with no caption can never hit;
  it still counts in the denominator, as in CLIP_benchmark (its recall there is 0/0 = NaN,
  and ``NaN > 0`` is false).
- ``image_retrieval_recall@k`` (text -> image): the fraction of captions whose one image is
  among the k best-scoring images.

**Memory.** The [queries x keys] score matrix of a large set (100k images x 500k captions is
5e10 scores) cannot be held, and neither can one [chunk x all keys] slab of it. Queries are
taken ``chunk`` at a time and keys ``key_chunk`` at a time; each query keeps a running top-k,
merged with the best of every new key block. Peak memory is about ``chunk x key_chunk x 4``
bytes for the score block (16 MiB at the defaults), plus ``chunk x (k + 8)`` small tensors
and about 50 MiB of rescoring buffers, whatever the sizes of the two sets. The exact
rescoring (below) touches about k x (1 + 1/2 + ... + 1/blocks) keys per query when the keys
come in no particular order: a vanishing share of the work for large sets.

**Scores and ties.** The ranking score is the float64 dot product of the float32 unit
vectors, rounded to float32. A float32 matrix product alone is not reproducible: the BLAS
kernel, and so the last bit of a score, changes with the block shape, and two identical
images scored in different blocks can differ. So the float32 product only picks candidates
(the best k + 8 per query and block, with a margin that covers its rounding error) and the
candidates are rescored exactly; rows whose candidates are too close to call are rescored
in full. The ranking therefore does not depend on ``chunk`` or ``key_chunk``.

Among equal scores the lower key index ranks first, as in a stable descending sort: each
score is packed with its index into one int64 (the order-preserving integer image of the
float32 score above the complemented index), so ``torch.topk`` has no ties left to break.
CLIP_benchmark calls ``torch.topk`` on raw float32 scores, whose tie order is unspecified;
exact ties (duplicate images or captions) are the one place where the two can differ. Here
the caption of the later of two identical images misses at k=1, and a collapsed model that
scores everything equally gets about k/N, not 100%.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

_LOW = 0xFFFFFFFF  # the index half of a packed sort key
_HIGH = 1 << 32
_EXTRA = 8  # candidates kept per query and key block beyond k, for the float32 -> exact step
_GATHER = 1 << 21  # float64 elements of gathered candidates rescored at once (2 x 16 MiB)
_NONE = torch.iinfo(torch.long).min  # below every packed key


def _pack(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 sort keys ordered as (score descending, index ascending): the order-preserving
    integer image of the float32 score in the high 32 bits, the complemented index below."""
    scores = scores.masked_fill(scores == 0, 0.0)  # -0.0 and 0.0 are one score
    bits = scores.view(torch.int32)
    # IEEE floats order like sign-magnitude integers: flip the magnitude bits of negatives.
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    return ordered.mul_(_HIGH).add_(_LOW - index)


def _unpack(keys: torch.Tensor) -> torch.Tensor:
    return _LOW - (keys & _LOW)


def _unpack_score(keys: torch.Tensor) -> torch.Tensor:
    ordered = torch.div(keys, _HIGH, rounding_mode="floor").int()
    return torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).view(torch.float32)


def _exact(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The canonical scores of a block: float64 products, rounded to float32."""
    return (queries.double() @ keys.double().t()).float()


def _block_top(queries: torch.Tensor, keys: torch.Tensor, first_index: int, k: int,
               floor: torch.Tensor) -> torch.Tensor:
    """Packed keys [queries, k + _EXTRA] holding every entry of this key block that can still
    enter each query's top k (the rest of the row is ``_NONE``).

    ``floor`` is each query's current k-th best canonical score (-inf while it has fewer than
    k): keys come in index order, so a new key must beat it strictly, and it must also beat
    all but k - 1 keys of its own block. The float32 product picks candidates, the best
    ``k + _EXTRA`` per row; it is off from the canonical score by less than ``slack / 2``, so
    only candidates within ``slack`` of both bars are rescored exactly (after the first
    blocks, almost none). A row whose first non-candidate is itself within reach (dense
    near-ties, such as duplicates) is rescored in full.
    """
    width = keys.shape[0]
    every = torch.arange(first_index, first_index + width, device=queries.device)
    m = k + _EXTRA
    if width <= m:
        return _pack(_exact(queries, keys), every)
    values, index = (queries @ keys.t()).topk(m + 1, dim=1)
    # twice the worst-case float32 error of a unit-vector dot product, plus rounding
    slack = queries.shape[1] * 2.0 ** -23 + 2.0 ** -22
    # To count, an entry must beat the floor and k entries of its own block.
    reach = torch.maximum(floor, values[:, k - 1]) - slack
    safe = values[:, m] < reach
    packed = torch.full((len(queries), m), _NONE, dtype=torch.long, device=queries.device)
    row, column = (values[:, :m] >= reach[:, None]).nonzero(as_tuple=True)
    step = max(1, _GATHER // queries.shape[1])
    for start in range(0, len(row), step):
        r, c = row[start:start + step], column[start:start + step]
        key = index[r, c]
        score = (queries[r].double() * keys[key].double()).sum(dim=1).float()
        packed[r, c] = _pack(score, key + first_index)
    unsafe = (~safe).nonzero().squeeze(1)
    if len(unsafe):
        packed[unsafe] = _pack(_exact(queries[unsafe], keys), every).topk(m, dim=1).values
    return packed


def _top_indices(queries: torch.Tensor, keys: torch.Tensor, k: int, key_chunk: int
                 ) -> torch.Tensor:
    """Indices [queries, k] of the k best keys of each query, best first."""
    best = torch.empty(len(queries), 0, dtype=torch.long, device=queries.device)
    floor = torch.full((len(queries),), float("-inf"), device=queries.device)
    for start in range(0, len(keys), key_chunk):
        block = _block_top(queries, keys[start:start + key_chunk], start, k, floor)
        merged = torch.cat([best, block], dim=1)
        best = merged.topk(min(k, merged.shape[1]), dim=1).values
        if best.shape[1] == k:
            floor = _unpack_score(best[:, -1])
    return _unpack(best)


def first_hit_ranks(queries: torch.Tensor, keys: torch.Tensor, query_label: torch.Tensor,
                    key_label: torch.Tensor, k: int, chunk: int = 1024, key_chunk: int = 4096
                    ) -> torch.Tensor:
    """For each query, the 0-based rank of its best-ranked relevant key if it lies in the top k,
    else -1. Key j is relevant to query i when ``key_label[j] == query_label[i]``."""
    k = min(k, len(keys))
    ranks = []
    for start in range(0, len(queries), chunk):
        top = _top_indices(queries[start:start + chunk], keys, k, key_chunk)
        relevant = key_label[top] == query_label[start:start + chunk, None]
        rank = relevant.int().argmax(dim=1)  # the first True
        ranks.append(torch.where(relevant.any(dim=1), rank, -1))
    return torch.cat(ranks)


def _embeddings(x: Any, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D [N, dim] array, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return F.normalize(x.float(), dim=-1)


def retrieval_recall(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                     text_to_image: Sequence[int] | torch.Tensor | np.ndarray,
                     ks: Sequence[int] = (1, 5, 10), chunk: int = 1024, *,
                     key_chunk: int = 4096) -> dict[str, float]:
    """Recall@k both ways; ``text_to_image[j]`` is the image that caption j describes (an image
    may have several captions, or none).

    Returns ``text_retrieval_recall@k`` (image -> text) and ``image_retrieval_recall@k``
    (text -> image) for each k. Embeddings need not be normalised; they are compared on the
    device they are on. ``chunk`` queries and ``key_chunk`` keys are scored at a time.
    """
    ks = list(ks)
    if not ks or any(not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    if chunk < 1 or key_chunk < 1:
        raise ValueError(f"chunk and key_chunk must be >= 1, got {chunk} and {key_chunk}")
    image = _embeddings(image_embeddings, "image embeddings")
    text = _embeddings(text_embeddings, "text embeddings").to(image.device)
    if image.shape[1] != text.shape[1]:
        raise ValueError(f"image embeddings have dimension {image.shape[1]}, text embeddings "
                         f"{text.shape[1]}")
    owner = torch.as_tensor(np.asarray(text_to_image) if not isinstance(text_to_image,
                                                                          torch.Tensor)
                            else text_to_image)
    if owner.ndim != 1 or len(owner) != len(text):
        raise ValueError(f"text_to_image must give one image per caption: {tuple(owner.shape)} "
                         f"for {len(text)} captions")
    if owner.is_floating_point() or owner.dtype == torch.bool:
        raise ValueError(f"text_to_image must hold integer image indices, got {owner.dtype}")
    if owner.min() < 0 or owner.max() >= len(image):
        raise ValueError(f"text_to_image must lie in [0, {len(image)}), got "
                         f"[{owner.min().item()}, {owner.max().item()}]")
    owner = owner.long().to(image.device)
    image_id = torch.arange(len(image), device=image.device)
    top = max(ks)
    # image -> text: caption j is relevant to image i when owner[j] == i.
    i2t = first_hit_ranks(image, text, image_id, owner, top, chunk, key_chunk)
    t2i = first_hit_ranks(text, image, owner, image_id, top, chunk, key_chunk)
    metrics = {f"text_retrieval_recall@{k}": _recall(i2t, k) for k in ks}
    metrics.update({f"image_retrieval_recall@{k}": _recall(t2i, k) for k in ks})
    return metrics


def _recall(ranks: torch.Tensor, k: int) -> float:
    return ((ranks >= 0) & (ranks < k)).double().mean().item()

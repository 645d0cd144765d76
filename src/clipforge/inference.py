"""Batched embedding of image files, PIL images and texts, skipping and reporting what cannot
be read: the one embedding path of clipforge (the command line, evaluation, plots, scoring
and search embed through it).

Images are decoded and preprocessed in DataLoader workers while the model runs; texts are
tokenized by the model's own tokenizer and sorted by token length so each batch runs only as far
as its longest text, then returned in input order.  Any :class:`~clipforge.encoder.Encoder`
runs here: the PyTorch model or an ONNX export.

:func:`embed_image_batches` is the one image loop: any dataset whose items are
``(tag, pixels or None, reason)`` goes through it (image files and PIL images here, the
evaluation sets of :mod:`clipforge.evaluation.datasets`, folders, CSV rows and webdataset
streams alike), so every caller skips and reports unreadable items the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .encoder import Encoder
from .reading import BadItem, open_image_file
from .text import ContextLengthError


@dataclass
class Embeddings:
    """Unit-norm float32 embeddings of the items that worked, and the reasons for the rest."""

    vectors: np.ndarray
    ids: list[str]
    failures: list[tuple[str, str]] = field(default_factory=list)


class ImageBatch(NamedTuple):
    """One batch through the image tower: the tags of the items that worked with their unit-norm
    float32 rows (``vectors[i]`` belongs to ``tags[i]``), and ``(tag, reason)`` for the rest."""

    tags: list[Any]
    vectors: np.ndarray
    failures: list[tuple[Any, str]]


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[Path], preprocess: Callable, fast_decode: bool = False):
        self.paths, self.preprocess = list(paths), preprocess
        self.draft = preprocess.image_size if fast_decode else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        path = self.paths[index]
        try:
            return index, self.preprocess(open_image_file(path, self.draft)), ""
        except (BadItem, ValueError, OSError) as exc:
            return index, None, f"cannot read image {path}: {exc}"


class _Pictures(Dataset):
    """Images already in memory; one the transform cannot take is reported, not raised."""

    def __init__(self, images: Sequence[Image.Image], preprocess: Callable):
        self.images, self.preprocess = list(images), preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return index, self.preprocess(self.images[index]), ""
        except (ValueError, OSError) as exc:
            return index, None, f"cannot use image {index}: {exc}"


def _collate(batch: list[tuple[int, torch.Tensor | None, str]]) -> list:
    return batch


def _unit(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy()


def embed_image_batches(model: Encoder, dataset: Dataset, batch_size: int = 32,
                        num_workers: int = 0, progress: bool = True,
                        desc: str = "images") -> Iterator[ImageBatch]:
    """Run the image tower over ``dataset``, one :class:`ImageBatch` at a time.

    The dataset (map-style or iterable) yields ``(tag, pixels, reason)``: ``pixels`` a
    preprocessed ``[3, S, S]`` tensor, or None with ``reason`` saying why the item was skipped;
    ``tag`` is anything picklable that identifies the item (an index, a name, a label), handed
    back with its vector or its reason.  Reading, decoding and preprocessing happen in the
    dataset, hence in ``num_workers`` DataLoader workers, while the model runs here.  A
    generator, so that a caller can stop at the first item it cannot accept.
    """
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate)
    try:
        total = len(dataset)  # type: ignore[arg-type]
    except TypeError:  # a stream
        total = None
    empty = np.zeros((0, model.config.embed_dim), np.float32)
    with tqdm(total=total, unit="img", disable=not progress, desc=desc) as bar:
        for batch in loader:
            good = [(tag, x) for tag, x, _ in batch if x is not None]
            failures = [(tag, reason) for tag, x, reason in batch if x is None]
            vectors = empty
            if good:
                with torch.inference_mode():
                    pixels = torch.stack([x for _, x in good]).to(model.device)
                    vectors = _unit(model.encode_image(pixels))
            bar.update(len(batch))
            yield ImageBatch([tag for tag, _ in good], vectors, failures)


def _collect(model: Encoder, dataset: Dataset, names: Sequence[str], batch_size: int,
             num_workers: int, progress: bool) -> Embeddings:
    """Every batch of :func:`embed_image_batches` over an indexed dataset, as
    :class:`Embeddings` identified by ``names[index]``."""
    vectors, ids, failures = [], [], []
    for batch in embed_image_batches(model, dataset, batch_size, num_workers, progress):
        vectors.append(batch.vectors)
        ids += [names[i] for i in batch.tags]
        failures += [(names[i], reason) for i, reason in batch.failures]
    dim = model.config.embed_dim
    return Embeddings(np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32),
                      ids, failures)


def embed_images(model: Encoder, paths: Sequence[str | Path], batch_size: int = 32,
                 num_workers: int = 0, progress: bool = True,
                 fast_decode: bool = False) -> Embeddings:
    """Embed image files; unreadable ones are listed in ``failures`` and the run goes on.

    ``fast_decode`` decodes large JPEGs at a reduced scale (PIL's draft mode, no smaller than
    the model's input): several times faster for camera-size photos, with embeddings within
    1e-5 cosine of the exact path in our measurements (docs/benchmarks.md)."""
    paths = [Path(p) for p in paths]
    dataset = _ImageFiles(paths, model.preprocess, fast_decode)
    return _collect(model, dataset, [str(p) for p in paths], batch_size, num_workers, progress)


def embed_pictures(model: Encoder, images: Sequence[Image.Image], batch_size: int = 32,
                   progress: bool = False) -> Embeddings:
    """Embed PIL images (ids ``"0"``, ``"1"``... in input order); one the model's transform
    cannot take is listed in ``failures``."""
    dataset = _Pictures(images, model.preprocess)
    return _collect(model, dataset, [str(i) for i in range(len(dataset))], batch_size, 0,
                    progress)


def _tokenize_each(tokenizer: Callable, texts: Sequence[str], truncate: bool
                   ) -> tuple[list[int], torch.Tensor | None, list[tuple[str, str]]]:
    """``tokenizer``'s ids of the texts it accepts, as (their positions, [N, context] ids or
    None if none, ``(position, reason)`` for the over-long ones)."""
    rows, ids, failures = [], [], []
    for i, text in enumerate(texts):
        try:
            rows.append(tokenizer(text, truncate=truncate)[0])
            ids.append(i)
        except ContextLengthError as exc:  # tokenized alone, the text is "text 0" there
            failures.append((str(i), str(exc).replace("text 0 ", f"text {i} ", 1)))
    return ids, torch.stack(rows) if rows else None, failures


def token_lengths(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Per row, the position after its last token that is not padding."""
    positions = torch.arange(1, tokens.shape[1] + 1)
    return ((tokens != pad_id) * positions).amax(dim=-1)


@torch.inference_mode()
def embed_texts(model: Encoder, texts: Sequence[str], batch_size: int = 256,
                truncate: bool = False, progress: bool = True) -> Embeddings:
    """Embed texts in input order with the model's tokenizer; over-long ones are skipped and
    reported unless ``truncate``."""
    tokenizer = model.tokenizer
    ids, tokens, failures = _tokenize_each(tokenizer, texts, truncate)
    if tokens is None:
        return Embeddings(np.zeros((0, model.config.embed_dim), np.float32), [], failures)
    # similar lengths batch together
    order = torch.argsort(token_lengths(tokens, tokenizer.pad_id), stable=True)
    out = torch.empty(len(ids), model.config.embed_dim)
    for start in tqdm(range(0, len(ids), batch_size), disable=not progress, desc="texts",
                      unit="batch"):
        index = order[start:start + batch_size]
        out[index] = model.encode_text(tokens[index].to(model.device)).float().cpu()
    return Embeddings(_unit(out), [str(i) for i in ids], failures)

"""Batched embedding of image files and texts, skipping and reporting what cannot be read.

Images are decoded and preprocessed in DataLoader workers while the model runs; texts are sorted
by token length so each batch runs only as far as its longest text, then returned in input order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .image import Preprocess
from .model import CLIP
from .text import ContextLengthError, get_tokenizer

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


@dataclass
class Embeddings:
    """Unit-norm float32 embeddings of the items that worked, and the reasons for the rest."""

    vectors: np.ndarray
    ids: list[str]
    failures: list[tuple[str, str]] = field(default_factory=list)


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, and image files (by suffix) found recursively in given directories."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(item)
    return paths


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[Path], preprocess: Preprocess):
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return index, self.preprocess.load(self.paths[index]), ""
        except (ValueError, OSError) as exc:
            return index, None, str(exc)


def _collate(batch: list[tuple[int, torch.Tensor | None, str]]) -> list:
    return batch


def _unit(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy()


@torch.inference_mode()
def embed_images(model: CLIP, paths: Sequence[str | Path], batch_size: int = 32,
                 num_workers: int = 0, progress: bool = True) -> Embeddings:
    """Embed image files; unreadable ones are listed in ``failures`` and the run goes on."""
    paths = [Path(p) for p in paths]
    loader = DataLoader(_ImageFiles(paths, model.preprocess), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate)
    vectors, ids, failures = [], [], []
    with tqdm(total=len(paths), unit="img", disable=not progress, desc="images") as bar:
        for batch in loader:
            good = [(i, x) for i, x, _ in batch if x is not None]
            failures += [(str(paths[i]), err) for i, x, err in batch if x is None]
            if good:
                pixels = torch.stack([x for _, x in good]).to(model.device)
                vectors.append(_unit(model.encode_image(pixels)))
                ids += [str(paths[i]) for i, _ in good]
            bar.update(len(batch))
    dim = model.config.embed_dim
    return Embeddings(np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32),
                      ids, failures)


@torch.inference_mode()
def embed_texts(model: CLIP, texts: Sequence[str], batch_size: int = 256, truncate: bool = False,
                progress: bool = True) -> Embeddings:
    """Embed texts in input order; over-long ones are skipped and reported unless ``truncate``."""
    tokenizer = get_tokenizer()
    context = model.context_length
    rows, ids, failures = [], [], []
    for i, text in enumerate(texts):
        try:
            rows.append(tokenizer(text, context_length=context, truncate=truncate)[0])
            ids.append(i)
        except ContextLengthError as exc:  # tokenized alone, the text is "text 0" there
            failures.append((str(i), str(exc).replace("text 0 ", f"text {i} ", 1)))
    if not rows:
        return Embeddings(np.zeros((0, model.config.embed_dim), np.float32), [], failures)
    tokens = torch.stack(rows)
    order = torch.argsort(tokens.argmax(dim=-1), stable=True)  # similar lengths batch together
    out = torch.empty(len(rows), model.config.embed_dim)
    for start in tqdm(range(0, len(rows), batch_size), disable=not progress, desc="texts",
                      unit="batch"):
        index = order[start:start + batch_size]
        out[index] = model.encode_text(tokens[index].to(model.device)).float().cpu()
    return Embeddings(_unit(out), [str(i) for i in ids], failures)

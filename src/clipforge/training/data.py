"""Batches for training, each a pure function of (seed, step): the key to exact resume.

Sample ``i`` of the run (counting over all steps and ranks) is read from the source, augmented
with randomness drawn from (seed, i) and tokenized by the model's own tokenizer (which DataLoader
workers receive pickled).  Step ``s`` on rank ``r`` of ``W`` takes
samples ``s*B + r*B/W ... s*B + (r+1)*B/W - 1`` of a global batch ``B``: ranks never share a
sample, DataLoader workers split batches, and resuming at step ``s`` reads exactly what an
uninterrupted run would have read.  A finite source is walked through a fresh permutation per
epoch.  An unreadable item is replaced by another (chosen deterministically) and counted, so batch
sizes stay equal across ranks, which the all-gather of features requires.

Webdataset shards stream instead (no random access): each rank and DataLoader worker reads its own
deterministic stream (its share of the shards, resampled for multi-epoch runs, through a seeded
shuffle buffer).  Every batch carries how far into its stream it reached; a checkpoint records
that position per stream, and a resumed run replays each stream to it (reading, not decoding)
and continues with exactly the samples an uninterrupted run would have read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from ..data.sources import StreamShare
from ..image.augment import TrainTransform
from ..reading import Sample

MAX_REPLACEMENTS = 16


def caption_texts(source: Dataset, limit: int) -> list[str]:
    """Up to ``limit`` captions of the training data, to learn a vocabulary from: the first
    items of the built-in data or of a stream, rows spread evenly over a table or folder.
    Unreadable items are left out."""
    if isinstance(source, IterableDataset):
        items = islice(source.stream(StreamShare(0, 1, 0, 1)), limit)
    elif getattr(source, "draws_by_index", False):
        items = (source[i] for i in range(min(limit, len(source))))
    else:
        positions = np.unique(np.linspace(0, len(source) - 1, min(limit, len(source)))
                              .astype(int)) if len(source) else []
        items = (source[int(i)] for i in positions)
    samples = (as_sample(item, "") for item in items)
    return [s.caption for s in samples if s.error is None and s.caption]


def as_sample(item: Any, key: str) -> Sample:
    """Sources yield :class:`Sample`; the built-in dataset yields (image, caption) pairs."""
    if isinstance(item, Sample):
        return item
    image, caption = item
    return Sample(image=image, caption=caption, key=key, error=None)


class TrainingSamples(Dataset):
    """Map-style: global sample index -> (pixels, tokens, skipped-item reasons)."""

    def __init__(self, source: Dataset, transform: TrainTransform, tokenizer: Callable,
                 seed: int):
        self.source, self.transform = source, transform
        self.tokenizer, self.seed = tokenizer, seed
        self._epoch_order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:  # indices are unbounded; the sampler decides how many
        return 2**62

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(len(self.source))
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def _position(self, index: int) -> int:
        if getattr(self.source, "draws_by_index", False):  # the built-in dataset
            return index % len(self.source)
        epoch, offset = divmod(index, len(self.source))
        return int(self._permutation(epoch)[offset])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, list[str], None]:
        skipped: list[str] = []
        for attempt in range(MAX_REPLACEMENTS):
            probe = index if attempt == 0 else index * 7919 + attempt * 104729
            position = self._position(probe)
            sample = as_sample(self.source[position], key=str(position))
            if sample.error is None and sample.image is not None and sample.caption:
                rng = np.random.default_rng([self.seed, index, attempt])
                pixels = self.transform(sample.image, rng)
                tokens = self.tokenizer(sample.caption, truncate=True)[0]
                return pixels, tokens, skipped, None
            skipped.append(sample.error or f"{sample.key}: empty caption")
        raise RuntimeError(f"{MAX_REPLACEMENTS} consecutive unreadable samples around index "
                           f"{index}: {skipped[:3]}")


class StepBatches(Sampler[list[int]]):
    """The sample indices of this rank's share of each step from ``start_step`` on."""

    def __init__(self, start_step: int, total_steps: int, global_batch: int, rank: int,
                 world_size: int):
        if global_batch % world_size:
            raise ValueError(f"batch size {global_batch} is not divisible by the {world_size} "
                             "processes")
        self.start, self.total = start_step, total_steps
        self.global_batch, self.local = global_batch, global_batch // world_size
        self.rank = rank

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.total):
            first = step * self.global_batch + self.rank * self.local
            yield list(range(first, first + self.local))


class StreamingSamples(IterableDataset):
    """Webdataset shards -> (pixels, tokens, skipped, (stream, position)).

    Each DataLoader worker reads one stream (``StreamShare``), from the position a checkpoint
    recorded for it; augmentation randomness comes from (seed, rank, stream, position).
    """

    def __init__(self, source: IterableDataset, transform: TrainTransform, tokenizer: Callable,
                 seed: int, rank: int, world_size: int, first_step: int = 0,
                 positions: dict[int, int] | None = None):
        self.source, self.transform = source, transform
        self.tokenizer, self.seed = tokenizer, seed
        self.rank, self.world_size = rank, world_size
        self.first_step, self.positions = first_step, dict(positions or {})

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str],
                                         tuple[int, int]]]:
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info else 1
        # The DataLoader takes batch k from worker k % workers.  Streams are numbered by the
        # steps they serve, so a run resumed at step s starts with the stream of step s.
        stream = ((info.id if info else 0) + self.first_step) % workers
        start = self.positions.get(stream, 0)
        share = StreamShare(self.rank, self.world_size, stream, workers)
        skipped: list[str] = []
        for position, sample in enumerate(self.source.stream(share, start), start + 1):
            if not sample.ok:
                skipped.append(sample.error or f"{sample.key}: empty caption")
                continue
            rng = np.random.default_rng([self.seed, self.rank, stream, position])
            tokens = self.tokenizer(sample.caption, truncate=True)[0]
            yield self.transform(sample.image, rng), tokens, skipped, (stream, position)
            skipped = []


Item = tuple[torch.Tensor, torch.Tensor, list[str], "tuple[int, int] | None"]


def collate(batch: list[Item]) -> Item:
    """Stack a batch; a streamed batch also reports the (stream, position) it reached."""
    pixels, tokens, skipped, where = zip(*batch)
    return (torch.stack(pixels), torch.stack(tokens), [s for group in skipped for s in group],
            where[-1])


def build_loader(source: Dataset, transform: TrainTransform, tokenizer: Callable, seed: int,
                 start_step: int, total_steps: int, global_batch: int, rank: int,
                 world_size: int, workers: int,
                 stream_positions: dict[int, int] | None = None) -> DataLoader:
    """This rank's batches from ``start_step`` on, captions tokenized by ``tokenizer`` (the
    model's: texts -> [N, context] ids).  ``stream_positions`` (streamed sources): how far each
    of this rank's streams had read at ``start_step``, from the checkpoint."""
    # A private generator: creating the loader must not consume the global random state, which
    # the checkpoint restores for the model (patch dropout).
    common = dict(num_workers=workers, collate_fn=collate, generator=torch.Generator(),
                  persistent_workers=False, prefetch_factor=4 if workers else None)
    if isinstance(source, IterableDataset):
        stream = StreamingSamples(source, transform, tokenizer, seed, rank, world_size,
                                  start_step, stream_positions)
        return DataLoader(stream, batch_size=global_batch // world_size, **common)
    samples = TrainingSamples(source, transform, tokenizer, seed)
    sampler = StepBatches(start_step, total_steps, global_batch, rank, world_size)
    return DataLoader(samples, batch_sampler=sampler, **common)

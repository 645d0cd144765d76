"""Videos in an index: frames sampled, embedded in batches, and pooled into segments.

A video becomes segments, each one indexed item with one embedding, so that a query finds the
moment and not only the file (results are (video, start, end, score)).  The frames are sampled
at :attr:`VideoOptions.fps` by :func:`clipforge.video.sample_frames`, preprocessed in DataLoader
workers and embedded by the image tower through
:func:`~clipforge.inference.embed_image_batches`, the same loop and model calls as images, so a
frame's embedding is the one its picture would get as an image.

A segment's embedding is the mean of its frames' unit embeddings, renormalised: CLIP4Clip's
parameter-free "meanP" (Luo et al. 2021), which found this a strong baseline for text-to-video
retrieval.  Segments are fixed windows of :attr:`VideoOptions.segment` seconds (window k covers
``[k * segment, (k + 1) * segment]``, the last cut at the video's end), or, with
:attr:`VideoOptions.shots`, shots: a new segment starts at a frame whose cosine similarity to
the frame before falls below that threshold, or once a segment has lasted ``segment`` seconds.

Streaming: a video is decoded frame by frame in one worker, frames are embedded a batch at a
time, and each video's segments keep only running sums (one vector per open segment and one per
finished segment), so memory does not grow with a video's frames.  A video is done when its
last frame is embedded; one that fails midway (corrupt, truncated) is dropped whole and reported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from ..encoder import Encoder
from ..inference import embed_image_batches
from ..reading import BadItem
from ..video import sample_frames
from .sources import Entry

_EPS = 1e-6  # seconds


@dataclass(frozen=True)
class VideoOptions:
    """How videos are cut into segments: frames sampled at ``fps`` per second; windows of
    ``segment`` seconds, or with ``shots`` (a cosine similarity, e.g. 0.85) shots no longer
    than ``segment``.  An index records the options it was built with; changing them
    re-embeds its videos."""

    fps: float = 1.0
    segment: float = 5.0
    shots: float | None = None

    def __post_init__(self) -> None:
        for name in ("fps", "segment"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"video {name} must be a positive number, not {value!r}")
        if self.fps * self.segment < 1 - _EPS:
            raise ValueError(f"a segment of {self.segment:g} s holds no frame at {self.fps:g} "
                             "frames per second: lengthen the segment or sample more frames")
        if self.shots is not None and not -1 <= self.shots <= 1:
            raise ValueError(f"the shot threshold is a cosine similarity from -1 to 1, not "
                             f"{self.shots!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_info(cls, info: dict[str, str]) -> VideoOptions | None:
        """The options an index records, None if it records none (built before videos)."""
        return cls(**json.loads(info["video"])) if info.get("video") else None


@dataclass(frozen=True)
class Segment:
    """A stretch of a video: its times in seconds, the unit mean of its frames' embeddings
    (float32) and how many frames it pooled."""

    start: float
    end: float
    vector: np.ndarray
    frames: int


@dataclass
class _Open:
    start: float
    total: np.ndarray
    frames: int = 1


class Segmenter:
    """One video's frame embeddings, in time order, pooled into :class:`Segment` s.

    Feed every frame with :meth:`add` (its time and unit embedding), then :meth:`finish` with
    the video's end.  It keeps the running sum of the open segment and the finished segments
    only."""

    def __init__(self, options: VideoOptions):
        self.options = options
        self.segments: list[Segment] = []
        self._open: _Open | None = None
        self._window = -1  # windows: the open segment's window number
        self._last: np.ndarray | None = None  # shots: the previous frame's embedding

    def add(self, time: float, vector: np.ndarray) -> None:
        vector = np.asarray(vector, np.float32)
        if self._starts_segment(time, vector):
            if self._open is not None:
                self._close(self._boundary(time))
            start = (self._window * self.options.segment if self.options.shots is None
                     else (time if self.segments else 0.0))
            self._open = _Open(start, vector.astype(np.float64))
        else:
            self._open.total += vector
            self._open.frames += 1
        self._last = vector

    def finish(self, end: float) -> list[Segment]:
        """Close the last segment at ``end`` (the video's end; a window stops at its own end
        if that comes first) and return every segment in order."""
        if self._open is not None:
            limit = ((self._window + 1) * self.options.segment if self.options.shots is None
                     else math.inf)
            self._close(min(end, limit))
        return self.segments

    def _starts_segment(self, time: float, vector: np.ndarray) -> bool:
        if self._open is None:
            self._window = math.floor(time / self.options.segment + _EPS)
            return True
        if self.options.shots is None:
            window = math.floor(time / self.options.segment + _EPS)
            if window == self._window:
                return False
            self._window = window
            return True
        cut = float(vector @ self._last) < self.options.shots
        return cut or time - self._open.start >= self.options.segment - _EPS

    def _boundary(self, time: float) -> float:
        """Where the open segment ends when the frame at ``time`` starts the next one."""
        if self.options.shots is None:
            return (math.floor(self._open.start / self.options.segment + _EPS) + 1) \
                * self.options.segment
        return time

    def _close(self, end: float) -> None:
        mean = self._open.total / self._open.frames
        unit = mean / max(float(np.linalg.norm(mean)), 1e-12)
        self.segments.append(Segment(self._open.start, max(end, self._open.start),
                                     unit.astype(np.float32), self._open.frames))
        self._open = None


def clock(seconds: float) -> str:
    """A time in a video as ``HH:MM:SS``, with milliseconds when it falls between seconds
    (``00:01:05``, ``00:00:02.5``): how results show a segment's times."""
    millis = round(seconds * 1000)
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, millis = divmod(rest, 1000)
    fraction = f".{millis:03d}".rstrip("0") if millis else ""
    return f"{hours:02d}:{minutes:02d}:{whole:02d}{fraction}"


def pool_segments(times: Sequence[float], vectors: np.ndarray, end: float,
                  options: VideoOptions) -> list[Segment]:
    """The segments of a video whose sampled frames have these times and unit embeddings."""
    segmenter = Segmenter(options)
    for time, vector in zip(times, vectors):
        segmenter.add(time, vector)
    return segmenter.finish(end)


class _VideoFrames(IterableDataset):
    """The sampled, preprocessed frames of videos, for :func:`embed_image_batches`: each
    DataLoader worker decodes whole videos of its own (every num_workers-th), one at a time.

    Items are ``((video, time, end, width, height), pixels, "")``, ``end`` set on a video's
    last frame only; a video that cannot be read (or fails midway) ends with
    ``((video, None, None, 0, 0), None, reason)``."""

    def __init__(self, videos: Sequence[Entry], preprocess: Callable, fps: float):
        self.videos, self.preprocess, self.fps = list(videos), preprocess, fps

    def __iter__(self) -> Iterator[tuple[tuple, Any, str]]:
        worker = get_worker_info()
        share = (range(len(self.videos)) if worker is None
                 else range(worker.id, len(self.videos), worker.num_workers))
        for index in share:
            yield from self._frames(index)

    def _frames(self, index: int) -> Iterator[tuple[tuple, Any, str]]:
        entry = self.videos[index]
        try:
            for frame in sample_frames(entry.path, self.fps):
                width, height = frame.image.info["original_size"]
                pixels = self.preprocess(frame.image)
                yield (index, frame.time, frame.end, width, height), pixels, ""
        except BadItem as exc:
            yield (index, None, None, 0, 0), None, f"{entry.key}: {exc}"
        except Exception as exc:  # a frame the transform cannot take
            yield (index, None, None, 0, 0), None, f"{entry.key}: unreadable video ({exc})"


@dataclass(frozen=True)
class VideoResult:
    """One video done: its segments, frame size and length, or the reason it was skipped."""

    index: int  # position in the list given to embed_videos
    segments: list[Segment]
    width: int = 0
    height: int = 0
    duration: float = 0.0
    reason: str = ""


def embed_videos(model: Encoder, videos: Sequence[Entry], options: VideoOptions,
                 batch_size: int = 32, num_workers: int = 0,
                 progress: bool = True) -> Iterator[VideoResult]:
    """Embed the sampled frames of ``videos`` in batches and pool them into segments; one
    :class:`VideoResult` per video, as each one finishes (with several workers, not in input
    order)."""
    open_videos: dict[int, Segmenter] = {}
    frames = _VideoFrames(videos, model.preprocess, options.fps)
    for batch in embed_image_batches(model, frames, batch_size, num_workers, progress,
                                     desc="video frames"):
        for (index, time, end, width, height), vector in zip(batch.tags, batch.vectors):
            segmenter = open_videos.setdefault(index, Segmenter(options))
            segmenter.add(time, vector)
            if end is not None:
                segments = open_videos.pop(index).finish(end)
                yield VideoResult(index, segments, width, height, end)
        for (index, *_), reason in batch.failures:
            open_videos.pop(index, None)  # frames embedded before it failed: dropped
            yield VideoResult(index, [], reason=reason)

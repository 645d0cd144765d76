"""Reading video files: frames sampled at a chosen rate, decoded one at a time, and the frame
shown at a given moment.

This sits beside :mod:`clipforge.reading` at the bottom of the data path (nothing here imports a
model): the index build samples frames through :func:`sample_frames`, the search side draws
thumbnails with :func:`frame_at`, and both name an unusable file the way images are named, with
:class:`~clipforge.reading.BadItem` and a reason (``unreadable video (...)``).

Decoding is PyAV's (FFmpeg's libraries, ``pip install 'clipforge[video]'``), imported only when
a video is read, so that the rest of clipforge works without it.  Frames are decoded in order
and converted to pictures only when sampled; :func:`sample_frames` is a generator holding at
most one sampled frame besides the one being decoded, so its memory does not grow with the
video's length.  Times are seconds from the start of the video stream, as a browser's
``currentTime`` counts them.

Frames are pictures as the video is displayed: a phone stores its frames sideways and records
how to show them, as the stream's display matrix (MP4's track matrix, which FFmpeg attaches to
every decoded frame) or, in older files, a ``rotate`` metadata tag; each picture is turned (and
mirrored) as ``ffmpeg``'s autorotate and browsers show it (:func:`display_transposes`), so that
embeddings, thumbnails and the sizes recorded in an index are the upright picture's.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from PIL import Image

from .image.transform import (
    ImageLoadError,
    NotRegularFileError,
    check_aspect_ratio,
    open_regular_file,
)
from .reading import BadItem

# Containers FFmpeg reads that people keep videos in (not .ts: TypeScript sources share it).
VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ogv",
                  ".wmv", ".flv", ".3gp"}
# What the server declares when it sends a video (with nosniff, a browser believes it).
VIDEO_MEDIA_TYPES = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime",
                     ".mkv": "video/x-matroska", ".webm": "video/webm", ".avi": "video/x-msvideo",
                     ".mpg": "video/mpeg", ".mpeg": "video/mpeg", ".ogv": "video/ogg",
                     ".wmv": "video/x-ms-wmv", ".flv": "video/x-flv", ".3gp": "video/3gpp"}
UNREADABLE_VIDEO = "unreadable video"
MISSING_VIDEO = "missing video"
INSTALL_HINT = "pip install 'clipforge[video]'"
_EPS = 1e-6  # seconds: timestamps are rationals printed as floats


def is_video(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a video file, by its suffix (nothing is opened)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def media_type(path: str | os.PathLike) -> str:
    """The Content-Type of a video file, by its suffix."""
    return VIDEO_MEDIA_TYPES.get(Path(path).suffix.lower(), "application/octet-stream")


def have_pyav() -> bool:
    """Whether PyAV can be imported (videos can be read)."""
    try:
        _av()
    except BadItem:
        return False
    return True


def _av() -> ModuleType:
    try:
        import av
    except ImportError:
        raise BadItem(f"{UNREADABLE_VIDEO} (PyAV is not installed: {INSTALL_HINT})") from None
    return av


@dataclass(frozen=True)
class Frame:
    """One sampled frame: its picture (RGB) and its time in seconds.  ``end`` is set on the
    last frame only: where the video ends (the end of its last decoded frame)."""

    image: Image.Image
    time: float
    end: float | None = None


@contextlib.contextmanager
def _opened(path: str | os.PathLike) -> Iterator[tuple[Any, Any]]:
    """The container and its first video stream, checked before any frame is decoded; every
    failure, the file's or FFmpeg's, as :class:`BadItem` with the reason."""
    av = _av()
    try:
        f = open_regular_file(path)
    except FileNotFoundError:
        raise BadItem(f"{MISSING_VIDEO} (no such file)") from None
    except NotRegularFileError as exc:
        raise BadItem(f"{UNREADABLE_VIDEO} (not a regular file: it is {exc.kind})") from None
    except OSError as exc:
        raise BadItem(f"{UNREADABLE_VIDEO} ({exc.strerror or exc})") from None
    with f, _reasons(av):
        with av.open(f, mode="r") as container:
            if not container.streams.video:
                raise BadItem(f"{UNREADABLE_VIDEO} (no video stream)")
            stream = container.streams.video[0]
            _check_size(stream.codec_context.width, stream.codec_context.height)
            stream.thread_type = "AUTO"  # frame threads: several frames decoded at once
            yield container, stream


@contextlib.contextmanager
def _reasons(av: ModuleType) -> Iterator[None]:
    """FFmpeg's errors, and anything else a damaged file provokes, as :class:`BadItem`."""
    try:
        yield
    except BadItem:
        raise
    except av.FFmpegError as exc:
        detail = exc.strerror or type(exc).__name__
        raise BadItem(f"{UNREADABLE_VIDEO} ({detail})") from None
    except Exception as exc:  # a malformed file may raise anything in the bindings
        raise BadItem(f"{UNREADABLE_VIDEO} ({type(exc).__name__}: {exc})") from None


def _check_size(width: int, height: int) -> None:
    """Refuse frame sizes no image would be allowed (before a frame is decoded): a header can
    declare gigapixel frames in a few bytes."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        raise BadItem(f"{UNREADABLE_VIDEO} (frames of {width}x{height} pixels, more than "
                      f"the limit of {limit})")
    try:
        check_aspect_ratio((width, height))
    except ImageLoadError as exc:
        raise BadItem(f"{UNREADABLE_VIDEO} ({str(exc).replace('image is', 'frames are')})"
                      ) from None


def _clock(stream: Any) -> tuple[float, float]:
    """(start, nominal frame duration) of a stream, in seconds; 0 where it records none."""
    base = stream.time_base
    start = float(stream.start_time * base) if stream.start_time is not None and base else 0.0
    rate = stream.average_rate or stream.guessed_rate
    return start, (1.0 / float(rate) if rate else 0.0)


def _times(frame: Any, start: float, nominal: float, previous: float | None
           ) -> tuple[float, float]:
    """A decoded frame's (time, end) in seconds from the stream's start.  A frame without a
    timestamp follows the one before it by the nominal frame duration."""
    if frame.pts is None or frame.time_base is None:
        time = 0.0 if previous is None else previous + nominal
    else:
        time = max(float(frame.pts * frame.time_base) - start, 0.0)
    length = (float(frame.duration * frame.time_base) if frame.duration and frame.time_base
              else nominal)
    return time, time + length


# ------------------------------------------------------------------------------- rotation
# A display matrix: 3x3 int32, row-major, the first two columns 16.16 fixed point, the last 2.30
# (libavutil/display.h); the identity shows a frame as it is stored.
IDENTITY = (1 << 16, 0, 0, 0, 1 << 16, 0, 0, 0, 1 << 30)
TRANSPOSE = Image.Transpose


def rotation_matrix(clockwise: float) -> tuple[int, ...]:
    """The display matrix of a pure clockwise rotation by ``clockwise`` degrees (FFmpeg's
    ``av_display_rotation_set``): what the older ``rotate`` metadata tag stands for."""
    radians = -math.radians(clockwise)
    cos, sin = round(math.cos(radians) * (1 << 16)), round(math.sin(radians) * (1 << 16))
    return (cos, -sin, 0, sin, cos, 0, 0, 0, 1 << 30)


def clockwise_degrees(matrix: tuple[int, ...]) -> float:
    """The clockwise rotation a display matrix applies, in [0, 360) (FFmpeg's
    ``get_rotation``: the negated ``av_display_rotation_get``, rounded); 0 for a degenerate
    matrix."""
    scale = (math.hypot(matrix[0], matrix[3]), math.hypot(matrix[1], matrix[4]))
    if not scale[0] or not scale[1]:
        return 0.0
    counter = -math.degrees(math.atan2(matrix[1] / scale[1], matrix[0] / scale[0]))
    theta = float(-round(counter))
    return theta - 360 * math.floor(theta / 360 + 0.9 / 360)


def display_transposes(matrix: tuple[int, ...] | None) -> tuple[Image.Transpose, ...]:
    """The PIL transposes that show a stored frame as its display matrix says, decided as
    ``ffmpeg``'s autorotate decides (fftools, FFmpeg 7): a quarter turn, with the mirror the
    matrix holds; a half turn as the flips of its diagonal's signs; a vertical flip alone.
    An angle that is no multiple of 90 degrees is left as stored (ffmpeg would rotate it and
    crop the corners); so is no matrix."""
    if matrix is None:
        return ()
    theta = clockwise_degrees(matrix)
    if abs(theta - 90) < 1:
        return (TRANSPOSE.TRANSPOSE,) if matrix[3] > 0 else (TRANSPOSE.ROTATE_270,)
    if abs(theta - 180) < 1:
        return tuple(flip for flip, applies in ((TRANSPOSE.FLIP_LEFT_RIGHT, matrix[0] < 0),
                                                (TRANSPOSE.FLIP_TOP_BOTTOM, matrix[4] < 0))
                     if applies)
    if abs(theta - 270) < 1:
        return (TRANSPOSE.TRANSVERSE,) if matrix[3] < 0 else (TRANSPOSE.ROTATE_90,)
    if abs(theta) < 1 and matrix[4] < 0:
        return (TRANSPOSE.FLIP_TOP_BOTTOM,)
    return ()


def display_matrix(frame: Any, stream: Any = None) -> tuple[int, ...] | None:
    """A decoded frame's display matrix (FFmpeg attaches the stream's to every frame: the
    MP4 track matrix, Matroska's projection), else the one the stream's older ``rotate``
    metadata tag (clockwise degrees; any letter case) stands for, else None.

    The side data are read through a container of their own, not ``frame.side_data``: that
    one is cached on the frame and refers back to it, a reference cycle that keeps each
    decoded frame, and the decoder's buffers it holds, alive until the garbage collector runs;
    a DataLoader worker forked meanwhile collected them in the child and hung there."""
    from av.sidedata.sidedata import SideDataContainer

    for data in SideDataContainer(frame):
        if data.type.name == "DISPLAYMATRIX":
            return struct.unpack("=9i", bytes(data)[:36])
    metadata = stream.metadata if stream is not None else {}
    tags = {key.lower(): value for key, value in metadata.items()}
    try:
        clockwise = float(tags.get("rotate", "0"))
    except ValueError:
        return None
    return rotation_matrix(clockwise) if clockwise % 360 and math.isfinite(clockwise) else None


def _picture(frame: Any, stream: Any = None) -> Image.Image:
    """The frame as it is displayed (RGB), rotated and mirrored as its display matrix or the
    stream's ``rotate`` tag says (:func:`display_transposes`), as ffmpeg and browsers show it."""
    image = frame.to_image()  # RGB at the stored size
    for transpose in display_transposes(display_matrix(frame, stream)):
        image = image.transpose(transpose)
    image.info["original_size"] = image.size
    return image


def sample_frames(path: str | os.PathLike, fps: float) -> Iterator[Frame]:
    """The frames of a video at ``fps`` frames per second, in order, decoded as they are
    needed.

    For each sampling time ``j / fps`` (j = 0, 1, ...) the first frame shown at or after it
    is taken, with its own timestamp; a video slower than ``fps`` gives each of its frames
    once.  The last frame carries the video's end (:attr:`Frame.end`), so the generator holds
    one sampled frame back until the next is decoded.  Raises :class:`BadItem` (``missing
    video``, ``unreadable video (...)``) when the file cannot be opened, holds no video
    stream or no decodable frame, or fails midway: a caller that already used earlier frames
    must drop them.
    """
    if not fps > 0 or not math.isfinite(fps):
        raise ValueError(f"frames per second must be a positive number, not {fps!r}")
    with _opened(path) as (container, stream):
        start, nominal = _clock(stream)
        held: Frame | None = None
        end, time, sample = 0.0, None, 0
        for frame in container.decode(stream):
            time, frame_end = _times(frame, start, nominal, time)
            end = max(end, frame_end)
            if time + _EPS < sample / fps:
                continue
            if held is not None:
                yield held
            held = Frame(_picture(frame, stream), time)
            sample = math.floor(time * fps + _EPS) + 1
        if held is None:
            raise BadItem(f"{UNREADABLE_VIDEO} (no frame could be decoded)")
    yield replace(held, end=max(end, held.time))


def frame_at(path: str | os.PathLike, time: float) -> Image.Image:
    """The frame shown at ``time`` seconds (the first at or after it; the last frame for a time
    past the end), for thumbnails: a seek to the key frame before it, then decoding forward.
    :class:`BadItem` if the video cannot be read."""
    with _opened(path) as (container, stream):
        start, nominal = _clock(stream)
        if time > 0 and stream.time_base:
            target = int((time + start) / stream.time_base)
            container.seek(target, stream=stream, backward=True, any_frame=False)
        shown, previous = None, None
        for frame in container.decode(stream):
            previous, _ = _times(frame, start, nominal, previous)
            shown = frame
            if previous + _EPS >= time:
                break
        if shown is None:
            raise BadItem(f"{UNREADABLE_VIDEO} (no frame could be decoded)")
        return _picture(shown, stream)

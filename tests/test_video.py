"""Videos in an index: frames sampled and decoded as a stream, embedded through the library's
one image path, pooled into segments (CLIP4Clip's mean, renormalised), searched by moment,
served by id with byte ranges, and rebuilt incrementally like images.

The videos are generated here with PyAV: solid-colour scenes of two seconds at 10 frames per
second, 64x48 pixels, so every frame's time and every scene's interval is known in advance.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipforge
from clipforge.inference import embed_pictures
from clipforge.reading import BadItem
from clipforge.search import SearchIndex, build_index, read_report
from clipforge.search import video as search_video
from clipforge.search.build import BuildReport
from clipforge.search.store import Store, staged_stamps
from clipforge.search.video import VideoOptions, embed_videos, pool_segments
from clipforge.video import (
    IDENTITY,
    display_transposes,
    frame_at,
    rotation_matrix,
    sample_frames,
)
from conftest import saved_tiny_vit

av = pytest.importorskip("av", reason="PyAV is not installed (pip install 'clipforge[video]')")

RATE = 10  # frames per second of the generated videos
SCENE_S = 2  # seconds each scene lasts
SIZE = (64, 48)
RED, GREEN, BLUE, WHITE = (230, 20, 20), (20, 200, 40), (30, 40, 220), (245, 245, 245)
TOKEN = "video-test-token_0123456789"


def write_video(path: Path, colours: list[tuple[int, int, int]], codec: str = "libx264",
                seconds: int = SCENE_S, rate: int = RATE, size: tuple[int, int] = SIZE, *,
                stored: Callable[[np.ndarray], np.ndarray] | None = None,
                rotation: int | None = None, hflip: bool = False,
                rotate_tag: str | None = None) -> Path:
    """A video of one solid-colour scene per colour, ``seconds`` each, with a small grey square
    moving one pixel a frame along the top, so that no two frames are the same picture.
    ``stored``: what is done to each picture before it is encoded (a turn, a mirror);
    ``rotation`` (degrees counterclockwise) and ``hflip``: the display matrix written with the
    stream; ``rotate_tag``: the older ``rotate`` metadata tag (Matroska keeps it)."""
    width, height = size
    stored = stored or (lambda pixels: pixels)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = stored(np.empty((height, width))).shape
        stream.pix_fmt = "yuv420p"
        if rotation is not None:
            stream.set_display_rotation(rotation, hflip=hflip)
        if rotate_tag is not None:
            stream.metadata["rotate"] = rotate_tag
        n = 0
        for colour in colours:
            for _ in range(seconds * rate):
                pixels = np.empty((height, width, 3), np.uint8)
                pixels[:] = colour
                x = n % (width - 8)
                pixels[4:12, x:x + 8] = 128
                n += 1
                pixels = np.ascontiguousarray(stored(pixels))
                frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A tiny model saved to a file, so that an index (and the command line) can load it."""
    return saved_tiny_vit(tmp_path_factory.mktemp("model"), seed=5)


@pytest.fixture(scope="module")
def model(model_file) -> clipforge.CLIP:
    return clipforge.create_model(model_file)


@pytest.fixture
def videos(tmp_path) -> Path:
    """A folder with two videos, a photo, and a file named .mp4 that is no video."""
    root = tmp_path / "media"
    root.mkdir()
    (root / "sub").mkdir()
    write_video(root / "rgb.mp4", [RED, GREEN, BLUE])
    write_video(root / "sub" / "wb.mp4", [WHITE, BLUE])
    Image.new("RGB", (48, 48), GREEN).save(root / "green.png")
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"junk" * 200)
    return root


def _build(source, out, model, **kw) -> BuildReport:
    return build_index(source, out, model, batch_size=4, progress=False, **kw)


def _segments(out: Path, model) -> dict[str, list[tuple[float, float]]]:
    """Video file name -> its segments' (start, end), in time order, as the index holds them."""
    index = SearchIndex.open(out, model)
    store = Store(out)
    try:
        hits = index._hits(store.ids(), np.zeros(len(store.ids())))
    finally:
        store.close()
    found: dict[str, list[tuple[float, float]]] = {}
    for hit in hits:
        if hit.start is not None:
            found.setdefault(Path(hit.path).name, []).append((hit.start, hit.end))
    return {name: sorted(times) for name, times in found.items()}


# ------------------------------------------------------------------------------- decoding


def test_frames_are_sampled_at_the_rate_with_their_times(tmp_path) -> None:
    path = write_video(tmp_path / "v.mp4", [RED, BLUE])  # 4 s at 10 frames/s
    frames = list(sample_frames(path, fps=2))
    assert [f.time for f in frames] == pytest.approx([i / 2 for i in range(8)])
    assert [f.end for f in frames] == [None] * 7 + [pytest.approx(4.0)]
    assert frames[0].image.size == SIZE and frames[0].image.mode == "RGB"
    assert frames[0].image.getpixel((40, 40)) == pytest.approx(RED, abs=12)
    assert frames[-1].image.getpixel((40, 40)) == pytest.approx(BLUE, abs=12)
    # faster than the video: each frame once
    assert len(list(sample_frames(path, fps=25))) == 40
    assert frame_at(path, 2.5).getpixel((40, 40)) == pytest.approx(BLUE, abs=12)
    assert frame_at(path, 99).getpixel((40, 40)) == pytest.approx(BLUE, abs=12)


# Display rotations as they are written, and the picture each must decode to: np.rot90 turns
# an image counterclockwise, as a positive PyAV rotation does; the older tag turns clockwise.
ROTATIONS = {
    "ccw90 (mp4)": ("mp4", {"rotation": 90}, lambda p: np.rot90(p, 1)),
    "cw90 (mp4)": ("mp4", {"rotation": -90}, lambda p: np.rot90(p, 3)),
    "180 (webm)": ("webm", {"rotation": 180}, lambda p: np.rot90(p, 2)),
    "ccw90 mirrored (mkv)": ("mkv", {"rotation": 90, "hflip": True},
                             lambda p: np.fliplr(np.rot90(p, 1))),
    "rotate tag 90 (mkv)": ("mkv", {"rotate_tag": "90"}, lambda p: np.rot90(p, 3)),
}


@pytest.mark.parametrize("case", list(ROTATIONS))
def test_frames_are_decoded_as_displayed(tmp_path, case) -> None:
    """A phone video stores its frames sideways and says how to show them (the display matrix,
    or the older ``rotate`` tag): its frames decode as a video stored already turned and
    without the metadata decodes (as ffmpeg's autorotate and browsers show it), for every
    sampled frame and for ``frame_at``."""
    suffix, metadata, shown = ROTATIONS[case]
    codec = "libvpx-vp9" if suffix == "webm" else "libx264"
    rotated = write_video(tmp_path / f"rotated.{suffix}", [RED, BLUE], codec=codec, **metadata)
    upright = write_video(tmp_path / f"upright.{suffix}", [RED, BLUE], codec=codec,
                          stored=shown)
    got, expected = list(sample_frames(rotated, fps=5)), list(sample_frames(upright, fps=5))
    assert len(got) == len(expected) == 20
    for a, b in zip(got, expected):
        assert a.image.size == b.image.size == b.image.info["original_size"]
        assert a.image.info["original_size"] == a.image.size
        difference = np.abs(np.asarray(a.image, float) - np.asarray(b.image, float))
        assert np.percentile(difference, 99) < 30  # codec noise only: the square is in place
    if metadata.get("rotation") in (90, -90):
        assert got[0].image.size == (SIZE[1], SIZE[0])
    first = np.asarray(frame_at(rotated, 0.0), float)
    assert np.percentile(np.abs(first - np.asarray(expected[0].image, float)), 99) < 30


def test_reading_the_rotation_leaves_no_frame_to_the_garbage_collector(tmp_path) -> None:
    """Decoded frames go as soon as they are converted, rotation read or not: a frame kept
    alive by a reference cycle (PyAV's cached ``frame.side_data``) holds the decoder's buffers
    until a collection, and a DataLoader worker forked meanwhile hung collecting it."""
    path = write_video(tmp_path / "phone.mp4", [RED, BLUE], rotation=90)
    gc.collect()
    gc.disable()
    try:
        frames = list(sample_frames(path, fps=RATE))
        frames.append(frame_at(path, 1.0))
        left = sum(type(o) is av.VideoFrame for o in gc.get_objects())
    finally:
        gc.enable()
    assert len(frames) == 41 and frames[0].image.size == (SIZE[1], SIZE[0])
    assert left == 0


def test_display_transposes_follow_ffmpeg() -> None:
    """Worked by hand on a 3x2 picture: each matrix's transposes against the turn and mirror
    it stands for."""
    picture = np.arange(6).reshape(2, 3)
    image = Image.fromarray(picture.astype(np.uint8))

    def shown(matrix) -> np.ndarray:
        out = image
        for transpose in display_transposes(matrix):
            out = out.transpose(transpose)
        return np.asarray(out)

    assert display_transposes(None) == display_transposes(IDENTITY) == ()
    assert np.array_equal(shown(rotation_matrix(90)), np.rot90(picture, 3))  # clockwise
    assert np.array_equal(shown(rotation_matrix(-90)), np.rot90(picture, 1))
    assert np.array_equal(shown(rotation_matrix(270)), np.rot90(picture, 1))
    assert np.array_equal(shown(rotation_matrix(180)), np.rot90(picture, 2))
    assert np.array_equal(shown(rotation_matrix(360)), picture)
    mirrored = (0, -65536, 0, -65536, 0, 0, 0, 0, 1 << 30)  # PyAV: 90 ccw, then hflip
    assert np.array_equal(shown(mirrored), np.fliplr(np.rot90(picture, 1)))
    flipped = (65536, 0, 0, 0, -65536, 0, 0, 0, 1 << 30)  # a vertical flip alone
    assert np.array_equal(shown(flipped), np.flipud(picture))
    assert display_transposes(rotation_matrix(45)) == ()  # an odd angle: as stored


def test_a_rotated_video_is_indexed_as_displayed(tmp_path, model, monkeypatch) -> None:
    """The build embeds the frames as displayed (the pictures the model's preprocessing gets
    are those of the already turned video), and the index records the displayed size."""
    def half_white(pixels: np.ndarray) -> np.ndarray:  # a picture a turn changes
        pixels = pixels.copy()
        pixels[pixels.shape[0] // 2:] = 245
        return pixels

    root = tmp_path / "one"
    root.mkdir()
    write_video(root / "phone.mp4", [RED, GREEN], rotation=90, stored=half_white)
    upright = write_video(tmp_path / "upright.mp4", [RED, GREEN],
                          stored=lambda p: np.rot90(half_white(p)))
    seen, preprocess = [], model.preprocess

    def recording(image):
        seen.append(np.asarray(image, float))
        return preprocess(image)

    monkeypatch.setattr(model, "preprocess", recording)
    out = tmp_path / "index"
    _build(root, out, model)
    expected = [np.asarray(f.image, float) for f in sample_frames(upright, fps=1)]
    assert len(seen) == len(expected) == 4
    for got, want in zip(seen, expected):
        assert got.shape == want.shape == (SIZE[0], SIZE[1], 3)  # 48 wide, 64 high
        assert np.percentile(np.abs(got - want), 99) < 30
    [hit] = SearchIndex.open(out, model).search(text="a scene", k=1)
    assert (hit.width, hit.height) == (SIZE[1], SIZE[0])


def test_decoding_streams_one_frame_at_a_time(tmp_path) -> None:
    """The generator never holds more than the frame it yields and the one it decodes next,
    however long the video: at most two pictures, and a few of PyAV's decoded frames, are
    alive at any moment."""
    path = write_video(tmp_path / "long.mp4", [RED, GREEN, BLUE, WHITE] * 3)  # 24 s, 240 frames
    alive: list[weakref.ref] = []
    most = count = 0
    decoded = []
    for frame in sample_frames(path, fps=RATE):
        alive.append(weakref.ref(frame.image))
        most = max(most, sum(ref() is not None for ref in alive))
        count += 1
        if count in (2, 60, 120, 180):  # (at the end, the decoder's delay comes out at once)
            gc.collect()
            decoded.append(sum(type(o) is av.VideoFrame for o in gc.get_objects()))
    assert count == 240 and most <= 2
    assert max(decoded) <= 3, decoded


def test_embedding_holds_a_bounded_number_of_frames(tmp_path, model, monkeypatch) -> None:
    """Through the whole pipeline (decode, preprocess, batches, pooling) the preprocessed frames
    alive at once stay within two batches, not the video's 80 frames."""
    path = write_video(tmp_path / "v.mp4", [RED, GREEN, BLUE, WHITE] * 2, seconds=1)
    alive: weakref.WeakSet = weakref.WeakSet()
    most = 0
    preprocess = model.preprocess

    def tracked(image):
        nonlocal most
        pixels = preprocess(image)
        alive.add(pixels)
        most = max(most, len(alive))
        return pixels

    monkeypatch.setattr(model, "preprocess", tracked)
    entry = _entry(path)
    [result] = list(embed_videos(model, [entry], VideoOptions(fps=RATE, segment=1),
                                 batch_size=4, progress=False))
    assert not result.reason and len(result.segments) == 8
    assert sum(s.frames for s in result.segments) == 80
    assert most <= 2 * 4


def _entry(path: Path):
    from clipforge.search.sources import scan_source

    [entry] = [e for e in scan_source(path.parent) if e.path == str(path.resolve())]
    return entry


# ------------------------------------------------------------------------------- segments


def test_windows_pool_exactly_the_frames_the_library_embeds(tmp_path, model) -> None:
    """Each indexed segment is the renormalised mean of its frames' embeddings, computed here
    by the library's own image path from the same decoded frames; its times are the windows'."""
    root = tmp_path / "one"
    root.mkdir()
    path = write_video(root / "rgb.mp4", [RED, GREEN, BLUE])  # 6 s
    out = tmp_path / "index"
    report = _build(root, out, model, video=VideoOptions(fps=2, segment=2.5))
    assert (report.videos, report.segments, report.video_seconds) == (1, 3, pytest.approx(6.0))
    assert _segments(out, model) == {"rgb.mp4": [(0.0, 2.5), (2.5, 5.0), (5.0, 6.0)]}

    frames = list(sample_frames(path, fps=2))
    times = [f.time for f in frames]
    assert times == pytest.approx([i / 2 for i in range(12)])
    vectors = embed_pictures(model, [f.image for f in frames]).vectors
    expected = []
    for window in ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]):  # frames by time
        mean = vectors[window].astype(np.float64).mean(axis=0)
        expected.append(mean / np.linalg.norm(mean))
    index = SearchIndex.open(out, model)
    store = Store(out)
    snapshot = store.snapshot()  # the rows as stored (float16), not renormalised on reading
    store.close()
    hits = sorted(index._hits(snapshot.ids, np.zeros(len(snapshot.ids))), key=lambda h: h.start)
    rows = dict(zip(snapshot.ids.tolist(), snapshot.vectors.astype(np.float32)))
    stored = np.array([rows[h.id] for h in hits])
    np.testing.assert_allclose(stored, np.array(expected), atol=2e-3)
    # the first window mixes four red frames and one green one: not any single frame
    assert np.max(np.abs(stored[0] - vectors[0])) > 2e-3


def test_pooling_windows_and_shots_on_known_vectors() -> None:
    rng = np.random.default_rng(0)
    a, b, c = (v / np.linalg.norm(v) for v in rng.normal(size=(3, 8)))
    times = [float(t) for t in range(10)]
    vectors = np.array([a] * 4 + [b] * 3 + [c] * 3, np.float32)
    windows = pool_segments(times, vectors, 10.0, VideoOptions(fps=1, segment=3))
    assert [(s.start, s.end, s.frames) for s in windows] == [
        (0, 3, 3), (3, 6, 3), (6, 9, 3), (9, 10, 1)]
    mixed = (a + 2 * b) / 3
    np.testing.assert_allclose(windows[1].vector, mixed / np.linalg.norm(mixed), atol=1e-6)
    shots = pool_segments(times, vectors, 10.0, VideoOptions(fps=1, segment=100, shots=0.9))
    assert [(s.start, s.end, s.frames) for s in shots] == [(0, 4, 4), (4, 7, 3), (7, 10, 3)]
    np.testing.assert_allclose(shots[1].vector, b, atol=1e-6)
    capped = pool_segments(times, vectors, 10.0, VideoOptions(fps=1, segment=3, shots=0.9))
    assert [(s.start, s.end) for s in capped] == [(0, 3), (3, 4), (4, 7), (7, 10)]


def test_shots_cut_where_the_scenes_change(tmp_path, model) -> None:
    root = tmp_path / "one"
    root.mkdir()
    path = write_video(root / "rgb.mp4", [RED, GREEN, BLUE])
    frames = list(sample_frames(path, fps=2))
    vectors = embed_pictures(model, [f.image for f in frames]).vectors
    similar = np.sum(vectors[1:] * vectors[:-1], axis=1)
    scene = [int(f.time // SCENE_S) for f in frames]
    changes = [i for i in range(1, len(frames)) if scene[i] != scene[i - 1]]
    across = max(similar[i - 1] for i in changes)
    within = min(s for i, s in enumerate(similar, start=1) if i not in changes)
    assert across < within  # the tiny model tells the scenes apart: the test can work
    out = tmp_path / "index"
    _build(root, out, model, video=VideoOptions(fps=2, segment=60,
                                                shots=float(across + within) / 2))
    assert _segments(out, model) == {"rgb.mp4": [(0.0, 2.0), (2.0, 4.0), (4.0, 6.0)]}


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="holds no frame"):
        VideoOptions(fps=0.1, segment=5)
    with pytest.raises(ValueError, match="positive"):
        VideoOptions(fps=0)
    with pytest.raises(ValueError, match="cosine"):
        VideoOptions(shots=1.5)


# ------------------------------------------------------------------------------- the build


def test_corrupt_videos_are_skipped_and_reported(videos, tmp_path, model, model_file,
                                                 capsys) -> None:
    from clipforge.cli import main

    (videos / "half.mp4").write_bytes((videos / "rgb.mp4").read_bytes()[:600])
    (videos / "empty.mp4").write_bytes(b"")
    out = tmp_path / "index"
    assert main(["index", "build", str(videos), "--out", str(out), "--model", str(model_file),
                 "--no-progress", "--workers", "0"]) == 0
    printed = capsys.readouterr()
    failures = {Path(f["item"]).name: f["reason"] for f in read_report(out)["failures"]}
    assert set(failures) == {"broken.mp4", "half.mp4", "empty.mp4"}
    assert all("unreadable video" in reason for reason in failures.values())
    for name in failures:
        assert f"{name}: unreadable video" in printed.err
    assert _segments(out, model) == {"rgb.mp4": [(0.0, 5.0), (5.0, 6.0)],
                                     "wb.mp4": [(0.0, 4.0)]}
    assert "videos: 5 read" in printed.out
    # the failures are remembered, as unreadable images are: not retried until they change
    again = _build(videos, out, model)
    assert again.embedded == 0 and len(again.failures) == 3


def test_decoding_workers_give_the_same_segments(tmp_path, model) -> None:
    """Each DataLoader worker decodes whole videos of its own: with two workers every video is
    there once, with the same segments and embeddings as decoded in the main process."""
    root = tmp_path / "three"
    root.mkdir()
    for name, colours in (("a", [RED, GREEN]), ("b", [BLUE]), ("c", [WHITE, RED, BLUE])):
        write_video(root / f"{name}.mp4", colours)
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    _build(root, alone, model)
    _build(root, shared, model, num_workers=2)
    assert _segments(shared, model) == _segments(alone, model) == {
        "a.mp4": [(0.0, 4.0)], "b.mp4": [(0.0, 2.0)], "c.mp4": [(0.0, 5.0), (5.0, 6.0)]}
    rows = []
    for out in (alone, shared):
        store = Store(out)
        keys = {row["key"]: i for i, row in store.items(store.ids().tolist()).items()}
        snapshot = store.snapshot()
        store.close()
        vectors = dict(zip(snapshot.ids.tolist(), snapshot.vectors))
        rows.append({key: vectors[i] for key, i in keys.items()})
    assert rows[0].keys() == rows[1].keys()
    for key, vector in rows[0].items():  # batches differ: float16 rounding apart at most
        np.testing.assert_allclose(vector.astype(np.float32), rows[1][key].astype(np.float32),
                                   atol=2e-3)


def test_a_video_failing_midway_is_dropped_whole(tmp_path, model, monkeypatch) -> None:
    root = tmp_path / "one"
    root.mkdir()
    write_video(root / "a.mp4", [RED, GREEN, BLUE])
    write_video(root / "b.mp4", [WHITE])

    def failing(path, fps):
        for n, frame in enumerate(sample_frames(path, fps)):
            if Path(path).name == "a.mp4" and n == 3:  # after 3 frames (fps 1)
                raise BadItem("unreadable video (damaged at 3 s)")
            yield frame

    monkeypatch.setattr(search_video, "sample_frames", failing)
    out = tmp_path / "index"
    report = _build(root, out, model)
    assert [Path(k).name for k, _ in report.failures] == ["a.mp4"]
    assert "damaged at 3 s" in report.failures[0][1]
    assert _segments(out, model) == {"b.mp4": [(0.0, 2.0)]}


def test_incremental_rebuilds(videos, tmp_path, model) -> None:
    out = tmp_path / "index"
    first = _build(videos, out, model)
    total = first.total
    assert first.segments == 3 and total == 4  # 2 + 1 segments, and the photo
    again = _build(videos, out, model)
    assert (again.embedded, again.added, again.removed, again.total) == (0, 0, 0, total)

    os.unlink(videos / "rgb.mp4")  # a changed video: embedded again, its old segments gone
    write_video(videos / "rgb.mp4", [RED] * 6)
    changed = _build(videos, out, model)
    assert changed.embedded == 1 and changed.videos == 1
    assert _segments(out, model)["rgb.mp4"] == [(0.0, 5.0), (5.0, 10.0), (10.0, 12.0)]
    assert changed.total == total + 1

    shutil.rmtree(videos / "sub")  # a deleted video: its segments go
    deleted = _build(videos, out, model)
    assert deleted.embedded == 0 and deleted.removed == 1
    assert set(_segments(out, model)) == {"rgb.mp4"}

    other = _build(videos, out, model, video=VideoOptions(fps=1, segment=4))
    assert other.videos == 2  # broken.mp4 is tried again too
    assert other.removed == 3 and other.added == 3
    assert _segments(out, model)["rgb.mp4"] == [(0.0, 4.0), (4.0, 8.0), (8.0, 12.0)]
    kept = _build(videos, out, model)  # the options are the index's now
    assert kept.embedded == 0 and _segments(out, model)["rgb.mp4"][0] == (0.0, 4.0)


def test_a_build_killed_inside_a_video_stages_none_of_it(tmp_path, model, monkeypatch) -> None:
    root = tmp_path / "one"
    root.mkdir()
    write_video(root / "a.mp4", [RED, GREEN])
    write_video(root / "b.mp4", [BLUE, WHITE, RED])
    out = tmp_path / "index"
    encode, calls = model.encode_image, []

    def dying(pixels):
        calls.append(len(pixels))
        if len(calls) == 3:  # a.mp4 is 4 frames at 1/s: batch 2, inside b.mp4's frames
            raise KeyboardInterrupt
        return encode(pixels)

    monkeypatch.setattr(model, "encode_image", dying)
    with pytest.raises(KeyboardInterrupt):
        build_index(root, out, model, batch_size=2, progress=False)
    monkeypatch.setattr(model, "encode_image", encode)
    staged = {Path(k).name for k in staged_stamps(out, _stage_id(out, model))}
    assert staged == {"a.mp4"}  # b.mp4 was half embedded: nothing of it is staged
    assert Store(out).count() == 0
    resumed = _build(root, out, model)
    assert (resumed.resumed, resumed.embedded) == (1, 1)
    assert _segments(out, model) == {"a.mp4": [(0.0, 4.0)], "b.mp4": [(0.0, 5.0), (5.0, 6.0)]}


def _stage_id(out: Path, model) -> str:
    from clipforge.weights.fingerprint import weights_fingerprint

    return f"{weights_fingerprint(model)} video={VideoOptions().to_json()}"


# ------------------------------------------------------------------------------- search


def test_search_json_and_lines_carry_the_moment(videos, tmp_path, model, capsys) -> None:
    from clipforge.cli import main

    out = tmp_path / "index"
    _build(videos, out, model)
    assert main(["search", str(out), "a blue scene", "-k", "10", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    moments = {(Path(r["path"]).name, r["start"], r["end"]) for r in results if "start" in r}
    assert moments == {("rgb.mp4", 0.0, 5.0), ("rgb.mp4", 5.0, 6.0), ("wb.mp4", 0.0, 4.0)}
    [photo] = [r for r in results if "start" not in r]
    assert Path(photo["path"]).name == "green.png" and "end" not in photo
    sheet = tmp_path / "sheet.html"
    assert main(["search", str(out), "a blue scene", "-k", "10", "--html", str(sheet)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.endswith("rgb.mp4\t00:00:05-00:00:06") for line in lines)
    assert any(line.endswith("green.png") for line in lines)
    page = sheet.read_text()
    assert "00:00:05&ndash;00:00:06" in page and page.count("data:image/jpeg") == 4


def test_clock() -> None:
    assert search_video.clock(65) == "00:01:05"
    assert search_video.clock(2.5) == "00:00:02.5"
    assert search_video.clock(3600 + 0.125) == "01:00:00.125"


# ------------------------------------------------------------------------------- the server


@pytest.fixture
def served(videos, tmp_path, model):
    from fastapi.testclient import TestClient

    from clipforge.search.server import create_app

    out = tmp_path / "index"
    _build(videos, out, model)
    index = SearchIndex.open(out, model)
    with TestClient(create_app(index, token=TOKEN), base_url="http://127.0.0.1") as client:
        yield client, videos


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def test_server_results_and_video_route(served, tmp_path) -> None:
    client, videos = served
    answer = client.get("/api/search", params={"q": "red", "k": 10}, headers=_auth())
    assert answer.status_code == 200
    assert str(tmp_path) not in answer.text
    results = answer.json()["results"]
    clips = [r for r in results if r["start"] is not None]
    [photo] = [r for r in results if r["start"] is None]
    assert photo["video"] is None and photo["end"] is None
    assert {(r["path"], r["start"], r["end"]) for r in clips} == {
        ("rgb.mp4", 0.0, 5.0), ("rgb.mp4", 5.0, 6.0), ("sub/wb.mp4", 0.0, 4.0)}
    first = next(r for r in clips if r["path"] == "rgb.mp4")
    assert first["video"] == f"/videos/{first['id']}"

    data = (videos / "rgb.mp4").read_bytes()
    assert client.get(first["video"]).status_code == 401  # the token is required
    whole = client.get(first["video"], headers=_auth())
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["content-type"] == "video/mp4"
    assert whole.headers["accept-ranges"] == "bytes"
    assert "private" in whole.headers["cache-control"]
    assert "media-src 'self' blob:" in whole.headers["content-security-policy"]
    part = client.get(first["video"], headers={**_auth(), "Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    past = client.get(first["video"], headers={**_auth(), "Range": f"bytes={len(data)}-"})
    assert past.status_code == 416
    assert client.get("/videos/999999", headers=_auth()).status_code == 404
    image = client.get(f"/videos/{photo['id']}", headers=_auth())
    assert image.status_code == 404 and "not a video" in image.json()["detail"]
    thumb = client.get(first["thumbnail"], headers=_auth())
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert "content-disposition" not in whole.headers  # no file name, let alone a path
    assert str(tmp_path) not in image.text


def test_knn_service_results_carry_the_moment(served) -> None:
    """clip-retrieval's ``/knn-service`` and ``/metadata``: a video segment's result has its
    ``start`` and ``end`` as ``/api/search`` gives them; the image's result has neither key
    (exactly clip_back's shape, which clip-retrieval's client reads)."""
    client, _ = served
    expected = client.get("/api/search", params={"q": "red", "k": 10},
                          headers=_auth()).json()["results"]
    answer = client.post("/knn-service", headers=_auth(), content=json.dumps(
        {"text": "red", "num_images": 10, "deduplicate": False}))
    assert answer.status_code == 200, answer.text
    results = answer.json()
    assert [(r["id"], r["path"]) for r in results] == [(r["id"], r["path"]) for r in expected]
    for result, hit in zip(results, expected):
        if hit["start"] is None:
            assert set(result) == {"id", "similarity", "url", "path"}
        else:
            assert (result["start"], result["end"]) == (hit["start"], hit["end"])
    assert sum("start" in r for r in results) == 3
    ids = [r["id"] for r in results]
    metadata = client.post("/metadata", headers=_auth(), content=json.dumps({"ids": ids}))
    by_id = {m["id"]: m["metadata"] for m in metadata.json()}
    assert {i: (m.get("start"), m.get("end")) for i, m in by_id.items()} == {
        r["id"]: (r["start"], r["end"]) for r in expected}


def test_a_video_segment_is_located_on_the_frame_at_its_start(served, model) -> None:
    """``/api/items/{id}/locate`` on a video segment locates in the frame shown at its start
    (its thumbnail's), as ``clipforge.locate`` does on that frame; peak and box in the
    frame's pixels."""
    client, videos = served
    results = client.get("/api/search", params={"q": "red", "k": 10},
                         headers=_auth()).json()["results"]
    clip = next(r for r in results if r["path"] == "rgb.mp4" and r["start"] == 5.0)
    route = f"/api/items/{clip['id']}/locate"
    assert client.get(route, params={"q": "a blue scene"}).status_code == 401
    answer = client.get(route, params={"q": "a blue scene"}, headers=_auth())
    assert answer.status_code == 200, answer.text
    got = answer.json()
    frame = frame_at(videos / "rgb.mp4", 5.0)
    assert frame.getpixel((40, 40)) == pytest.approx(BLUE, abs=12)  # the third scene's frame
    expected = clipforge.locate(model, frame, "a blue scene")
    assert got["start"] == 5.0 and got["item"] == clip["id"] and got["size"] == list(SIZE)
    assert (got["peak"], got["box"]) == (list(expected.peak), list(expected.box))
    assert got["score"] == round(expected.score, 6)


def test_a_changed_video_is_not_sent(served) -> None:
    client, videos = served
    results = client.get("/api/search", params={"q": "red", "k": 10},
                         headers=_auth()).json()["results"]
    clip = next(r for r in results if r["path"] == "rgb.mp4")
    os.utime(videos / "rgb.mp4", ns=(0, 10**9))  # the index's times may no longer fit
    answer = client.get(clip["video"], headers=_auth())
    # the index picks up the change only at its next build: until then the file is refused
    assert answer.status_code == 404 and str(videos) not in answer.text


def test_without_pyav_a_build_says_what_to_install(videos, tmp_path, model,
                                                   monkeypatch) -> None:
    from clipforge.search import build as build_module

    monkeypatch.setattr(build_module, "have_pyav", lambda: False)
    with pytest.raises(ValueError, match=r"clipforge\[video\].*--no-video"):
        _build(videos, tmp_path / "index", model)
    report = _build(videos, tmp_path / "images", model, videos=False)
    assert report.total == 1 and report.failures == []


# ------------------------------------------------------------------------------- the page


@pytest.mark.parametrize("token", [None, TOKEN], ids=["open", "token"])
def test_the_page_plays_the_moment_found(tmp_path, model, token) -> None:
    """In headless Chromium: a text search shows a video result with its times, and Play
    starts the video at the segment's start (VP9 in WebM, which every Chromium build plays):
    without a token the file is fetched by byte ranges; with one, whole with the header, and
    played from a blob: URL, which the page's Content-Security-Policy allows."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = os.environ.get("CLIPFORGE_CHROMIUM", "/usr/bin/chromium")
    if not (Path(chromium).is_file() or shutil.which(chromium)):
        pytest.skip(f"no Chromium at {chromium}")
    from clipforge.search.server import create_app, running_server

    root = tmp_path / "web"
    root.mkdir()
    write_video(root / "clip.webm", [RED, GREEN, BLUE], codec="libvpx-vp9")
    out = tmp_path / "index"
    _build(root, out, model)
    ranges = []
    app = create_app(SearchIndex.open(out, model), token=token)
    with running_server(app) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--autoplay-policy=no-user-gesture-required"])
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            page.on("response", lambda r: ranges.append(r.status)
                    if "/videos/" in r.url else None)
            refused = []
            page.on("console", lambda m: refused.append(m.text)
                    if "Content Security Policy" in m.text else None)
            page.goto(url)
            page.fill("[data-testid=search-input]", "blue")
            page.click("[data-testid=search-submit]")
            if token:
                page.fill("[data-testid=token-input]", token)
                page.click("[data-testid=token-submit]")
            card = page.locator("[data-testid=result-card]").filter(
                has_text="00:00:05–00:00:06")
            sync_api.expect(card).to_have_count(1)
            card.locator("[data-testid=play-video]").click()
            video = card.locator("[data-testid=result-video]")
            sync_api.expect(video).to_have_count(1)
            page.wait_for_function(
                "v => v.readyState >= 1 && v.currentTime >= 4.9", arg=video.element_handle())
            source = video.evaluate("v => v.src")
            assert source.endswith("#t=5,6") and source.startswith("blob:" if token else url)
        finally:
            browser.close()
    assert refused == []
    assert (200 if token else 206) in ranges

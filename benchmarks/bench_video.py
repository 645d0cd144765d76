"""Video search, measured: recall of the right moment for text queries, and indexing throughput
in seconds of video per second.

The videos are generated here with PyAV (libx264, 10 frames per second, 128x128 pixels): each is
a sequence of scenes from the built-in procedural data (``clipforge.data.synthetic.probe_set``:
one colour-shape class per scene, 40 seen classes, each class in one scene only), each held for
a random 2 to 6 seconds (in half seconds), its picture shifted a pixel or two from frame to
frame like a hand-held camera.  So the interval of every scene is known.  The videos are
indexed by ``clipforge index build``'s code (:func:`clipforge.search.build_index`), then every
scene is searched by the text ``"a photo of one {colour} {shape}."``; a hit counts when it is a
segment of the scene's video whose [start, end] overlaps the scene's interval (by more than
nothing).  R@1 and R@5 are over the 40 scenes.  Windows of ``--segment`` seconds do not follow
the scene changes, so a window may straddle two scenes; shots (``--shots``) cut where
consecutive frames differ.

The model should know the classes: by default ``runs/first-run``, the model ``clipforge train``
makes (``--model DIR`` for another).  The same architecture with random weights is measured as
the control: it finds the right moment only by chance.  As a reference, the same queries are
also run against the 40 scene pictures themselves (one still each, no video): what the model
reaches on text-to-image retrieval, which the segments can at best match.

Throughput is the build's: decode, sample, preprocess, embed and commit, in seconds of video
per second of wall time (fresh index each time), with the decoding alone beside it.  A second
figure uses a 640x360, 30 frames/s video of ``--long`` seconds and ViT-B-32 (random weights: the
cost does not depend on the values), the default model of ``index build``.

    python benchmarks/bench_video.py [--model runs/first-run] [--fps 1] [--segment 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

import clipforge
from clipforge.data.synthetic import SEEN_PAIRS, class_index, class_names, probe_set
from clipforge.inference import embed_pictures, embed_texts
from clipforge.search import SearchIndex, build_index
from clipforge.search.video import VideoOptions
from clipforge.video import sample_frames
from machine import cpu_name, machine_busy_s

RATE = 10
SIZE = 128
SCENES_PER_VIDEO = 8
TEMPLATE = "a photo of one {}."


def write_video(path: Path, pictures: list[Image.Image], durations: list[float],
                rate: int = RATE, seed: int = 0) -> None:
    """Each picture held for its duration, shifted by up to two pixels from frame to frame."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate, options={"preset": "veryfast"})
        width, height = pictures[0].size
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for picture, seconds in zip(pictures, durations):
            pixels = np.asarray(picture.convert("RGB"))
            for _ in range(round(seconds * rate)):
                dx, dy = rng.integers(-2, 3, 2)
                frame = np.roll(pixels, (int(dy), int(dx)), axis=(0, 1))
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_scene_videos(folder: Path, seed: int = 0) -> list[dict]:
    """Five videos of eight scenes, one per seen class; returns every scene's ground truth."""
    images, labels = probe_set(48, seed=seed, image_size=SIZE)
    by_class = dict(zip(labels, images))
    names = class_names("en")
    rng = np.random.default_rng(seed)
    classes = [class_index(*pair) for pair in SEEN_PAIRS]
    rng.shuffle(classes)
    truth = []
    for v in range(len(classes) // SCENES_PER_VIDEO):
        chosen = classes[v * SCENES_PER_VIDEO:(v + 1) * SCENES_PER_VIDEO]
        durations = [float(d) for d in rng.integers(4, 13, len(chosen)) / 2]  # 2 to 6 s
        path = folder / f"video{v}.mp4"
        write_video(path, [by_class[c] for c in chosen], durations, seed=v)
        start = 0.0
        for c, seconds in zip(chosen, durations):
            truth.append({"video": path.name, "start": start, "end": start + seconds,
                          "query": TEMPLATE.format(names[c]), "picture": by_class[c]})
            start += seconds
    return truth


def recall(index: SearchIndex, truth: list[dict], ks: tuple[int, ...] = (1, 5)) -> dict:
    """Share of scenes whose moment is among the top k segments, for each k."""
    found = {k: 0 for k in ks}
    for scene in truth:
        hits = index.search(text=scene["query"], k=max(ks))
        right = [Path(h.path).name == scene["video"] and h.start < scene["end"]
                 and h.end > scene["start"] for h in hits]
        for k in ks:
            found[k] += any(right[:k])
    return {f"R@{k}": round(found[k] / len(truth), 3) for k in ks}


def still_recall(model, truth: list[dict], ks: tuple[int, ...] = (1, 5)) -> dict:
    """The same queries against the scenes' own pictures, one each: what the model reaches
    without video (an upper reference for the segments)."""
    vectors = embed_pictures(model, [scene["picture"] for scene in truth]).vectors
    texts = embed_texts(model, [scene["query"] for scene in truth], progress=False).vectors
    ranks = np.argsort(-(texts @ vectors.T), axis=1)
    return {f"R@{k}": round(float(np.mean([i in ranks[i, :k] for i in range(len(truth))])), 3)
            for k in ks}


def timed_build(folder: Path, out: Path, model, options: VideoOptions, workers: int) -> dict:
    report = build_index(folder, out, model, video=options, num_workers=workers,
                         progress=False)
    return {"video_seconds": round(report.video_seconds, 1), "segments": report.segments,
            "build_s": round(report.seconds, 2),
            "video_s_per_s": round(report.video_seconds / report.seconds, 1),
            "failures": len(report.failures)}


def decode_rate(paths: list[Path], fps: float) -> float:
    """Seconds of video per second, decoding and sampling only."""
    started, seconds = time.perf_counter(), 0.0
    for path in paths:
        for frame in sample_frames(path, fps):
            if frame.end is not None:
                seconds += frame.end
    return round(seconds / (time.perf_counter() - started), 1)


def long_video(path: Path, seconds: int) -> None:
    """640x360 at 30 frames/s: a slowly moving colour field with fine noise."""
    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 256, (9, 16, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((640 + 64, 360), Image.Resampling.BICUBIC))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30, options={"preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = 640, 360, "yuv420p"
        for i in range(seconds * 30):
            shift = (i // 3) % 64
            frame = base[:, shift:shift + 640]
            for packet in stream.encode(av.VideoFrame.from_ndarray(
                    np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def random_twin(run: Path):
    """The architecture of a ``clipforge train`` run with random weights and the run's own
    vocabulary (None if ``run`` is not such a run): the control."""
    config, vocabulary = run / "train_config.json", run / "vocabulary"
    if not (config.is_file() and vocabulary.is_dir()):
        return None
    name = json.loads(config.read_text())["model"]
    return clipforge.create_model(name, tokenizer=vocabulary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/first-run", help="a model that knows the "
                        "built-in classes (default: the run `clipforge train` makes)")
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--segment", type=float, default=2.0)
    parser.add_argument("--shots", type=float, default=0.9)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--long", type=int, default=60, help="seconds of the 360p video")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    if not Path(args.model).exists():
        raise SystemExit(f"no model at {args.model}: run `clipforge train --output "
                         f"{args.model}` first (about 8 minutes on 2 cores), or pass --model")
    torch.manual_seed(0)
    trained = clipforge.create_model(args.model)
    control = random_twin(Path(args.model))
    busy_before, cpu_before = machine_busy_s(), time.process_time()
    figures: dict = {"cpu": cpu_name(), "threads": torch.get_num_threads(),
                     "model": args.model, "fps": args.fps, "segment": args.segment,
                     "pyav": av.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "videos"
        folder.mkdir()
        truth = make_scene_videos(folder)
        figures["scenes"] = len(truth)
        figures["video_seconds"] = sum(s["end"] - s["start"] for s in truth)
        figures["stills (the scenes' pictures, no video)"] = still_recall(trained, truth)
        windows = VideoOptions(fps=args.fps, segment=args.segment)
        shots = VideoOptions(fps=args.fps, segment=4 * args.segment, shots=args.shots)
        for name, model, options in (
                (f"windows of {args.segment:g} s", trained, windows),
                ("windows of 5 s (the default)", trained, VideoOptions()),
                (f"shots ({args.shots:g}, at most {4 * args.segment:g} s)", trained, shots),
                (f"random weights, windows of {args.segment:g} s", control, windows)):
            if model is None:
                continue
            out = tmp / f"index-{len(figures)}"
            build = timed_build(folder, out, model, options, args.workers)
            figures[name] = {**recall(SearchIndex.open(out, model), truth), **build}
            print(name, figures[name], flush=True)
        figures["decode_only_video_s_per_s"] = decode_rate(sorted(folder.glob("*.mp4")),
                                                           args.fps)
        big = tmp / "big"
        big.mkdir()
        long_video(big / "long.mp4", args.long)
        vit = clipforge.create_model("ViT-B-32")
        figures["360p30, ViT-B-32"] = timed_build(big, tmp / "index-big", vit, windows,
                                                  args.workers)
        figures["360p30 decode only"] = decode_rate([big / "long.mp4"], args.fps)
        print("360p30, ViT-B-32", figures["360p30, ViT-B-32"], "decode only",
              figures["360p30 decode only"], flush=True)
    busy = machine_busy_s()
    if busy is not None and busy_before is not None:
        others = (busy - busy_before) - (time.process_time() - cpu_before)
        figures["other_processes_cpu_s"] = round(max(others, 0.0), 1)
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

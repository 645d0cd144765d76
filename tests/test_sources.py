"""Training data sources (CSV/TSV, captioned folders, webdataset shards) and the train augmentation.

All data is written into ``tmp_path``: real PNG/JPEG files, a truncated JPEG, a text file named
``.jpg``, an empty caption, and img2dataset-layout tar shards (``00000.tar`` holding
``000000000.jpg`` + ``000000000.txt``, ...).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import subprocess
import sys
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from clipforge.configs import PreprocessConfig, get_config
from clipforge.data.sources import (
    BadItem,
    CsvCaptions,
    DataError,
    FolderCaptions,
    Sample,
    SkipCounter,
    StreamShare,
    WebDatasetCaptions,
    check_readable,
    open_image_bytes,
    open_image_file,
    open_source,
)
from clipforge.image import Preprocess
from clipforge.image.augment import TrainTransform, random_resized_crop_params

wds = pytest.importorskip("webdataset")

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _image(seed: int, size: tuple[int, int] = (48, 32), mode: str = "RGB") -> Image.Image:
    w, h = size
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _encoded(seed: int, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    _image(seed).save(buf, fmt)
    return buf.getvalue()


# --------------------------------------------------------------------------- augmentation


def test_train_transform_shape_dtype_and_determinism():
    t = TrainTransform(Preprocess(64, MEAN, STD))
    img = _image(0, (120, 90))
    a = t(img, np.random.default_rng([7, 3]))
    b = t(img, np.random.default_rng([7, 3]))
    assert a.shape == (3, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, b)
    boxes = {t.crop_box(img, np.random.default_rng([7, i])) for i in range(20)}
    assert len(boxes) > 10  # different seeds, different crops
    assert not torch.equal(a, t(img, np.random.default_rng([7, 4])))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_full_crop_equals_eval_preprocess(mode):
    img = _image(1, (150, 150), mode)
    train = TrainTransform(Preprocess(64, MEAN, STD), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    evaluate = Preprocess(64, MEAN, STD)
    for seed in range(3):
        assert torch.equal(train(img, np.random.default_rng(seed)), evaluate(img))


@pytest.mark.parametrize("size", [(3000, 40), (40, 3000), (1, 1), (5, 2)])
def test_crops_stay_in_bounds_for_extreme_shapes(size):
    t = TrainTransform(Preprocess(32, MEAN, STD))
    img = Image.new("RGB", size, (10, 200, 30))
    for seed in range(50):
        left, top, right, bottom = t.crop_box(img, np.random.default_rng(seed))
        assert 0 <= left < right <= size[0] and 0 <= top < bottom <= size[1]
    assert t(img, np.random.default_rng(0)).shape == (3, 32, 32)


def test_fallback_is_central_crop_with_clamped_ratio():
    # No sampled box fits (ratio 2 at full area is wider than the image): torchvision falls
    # back to a centred crop with the ratio clamped to the range.
    top, left, h, w = random_resized_crop_params(100, 100, (1.0, 1.0), (2.0, 2.0),
                                                 np.random.default_rng(0))
    assert (top, left, h, w) == (25, 0, 50, 100)
    top, left, h, w = random_resized_crop_params(3000, 40, (0.9, 1.0), (3 / 4, 4 / 3),
                                                 np.random.default_rng(0))
    assert (h, w) == (40, 53) and (top, left) == (0, (3000 - 53) // 2)


def test_train_transform_from_config():
    config = get_config("ViT-B-32")
    config = dataclasses.replace(config, preprocess=PreprocessConfig(mean=(0.5,) * 3,
                                                                     std=(0.25,) * 3))
    t = TrainTransform.from_config(config)
    assert t.eval == Preprocess(224, (0.5,) * 3, (0.25,) * 3, "bicubic")
    assert (t.scale, t.ratio) == ((0.9, 1.0), (3 / 4, 4 / 3))
    with pytest.raises(ValueError, match="scale"):
        TrainTransform(Preprocess(224, MEAN, STD), scale=(1.0, 0.5))
    with pytest.raises(ValueError, match="unknown interpolation 'nearest'"):
        Preprocess(224, MEAN, STD, "nearest")


# --------------------------------------------------------------------------- files on disk


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """imgs/: a.jpg b.png (good), trunc.jpg (truncated), fake.jpg (text), empty.png (good image,
    its caption is whitespace) and, for folders, same-name .txt captions."""
    root = tmp_path / "imgs"
    root.mkdir()
    _image(0).save(root / "a.jpg")
    _image(1).save(root / "b.png")
    _image(2, (64, 64)).save(root / "empty.png")
    data = _encoded(3)
    (root / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (root / "fake.jpg").write_text("this is not an image\n")
    return root


def test_csv_and_tsv_custom_columns_and_relative_paths(photos: Path, tmp_path: Path):
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "train.csv").write_text(
        "id,path,text\n"
        f"1,../imgs/a.jpg,\"a red, noisy square\"\n"
        f"2,{photos / 'b.png'},a blue one\n")
    source = CsvCaptions(meta / "train.csv", image_key="path", caption_key="text")
    assert len(source) == 2
    first, second = source[0], source[1]
    assert first.ok and first.caption == "a red, noisy square" and first.image.size == (48, 32)
    assert Path(first.key).resolve() == (photos / "a.jpg").resolve()
    assert second.ok and second.caption == "a blue one"

    (meta / "train.tsv").write_text("image\tcaption\nb.png\t  padded caption \t\n")
    tsv = CsvCaptions(meta / "train.tsv", image_key="image", caption_key="caption", root=photos)
    assert tsv[0].ok and tsv[0].caption == "padded caption"

    (meta / "semi.txt").write_text("image;caption\na.jpg;semicolons\n")
    semi = CsvCaptions(meta / "semi.txt", "image", "caption", separator=";", root=photos)
    assert semi[0].caption == "semicolons"


def test_csv_missing_column_names_file_columns_and_option(tmp_path: Path):
    path = tmp_path / "data.csv"
    path.write_text("url,caption\nx.jpg,hello\n")
    with pytest.raises(ValueError) as info:
        CsvCaptions(path)
    message = str(info.value)
    assert str(path) in message and "'url'" in message and "'caption'" in message
    assert "'filepath'" in message and "--csv-image-key" in message
    with pytest.raises(DataError, match="empty"):
        (tmp_path / "empty.csv").write_text("")
        CsvCaptions(tmp_path / "empty.csv")


def test_folder_pairs_and_skipped(tmp_path: Path):
    root = tmp_path / "pairs"
    (root / "sub").mkdir(parents=True)
    _image(0).save(root / "cat.jpg")
    (root / "cat.txt").write_text("a cat\n")
    _image(1).save(root / "sub" / "dog.PNG")
    (root / "sub" / "dog.txt").write_text("a dog")
    _image(2).save(root / "lonely.jpg")
    (root / "notes.txt").write_text("not a caption of anything")
    source = FolderCaptions(root)
    assert [Path(source[i].key).name for i in range(len(source))] == ["cat.jpg", "dog.PNG"]
    assert [source[i].caption for i in range(len(source))] == ["a cat", "a dog"]
    assert source.skipped == [root / "lonely.jpg"]


def test_bad_items_become_sample_errors_and_are_counted(photos: Path, tmp_path: Path):
    rows = ["a.jpg,good", "trunc.jpg,truncated", "fake.jpg,text file", "empty.png,\"   \"",
            "missing.jpg,gone", ",no path"]
    (tmp_path / "bad.csv").write_text("filepath,title\n" + "\n".join(rows) + "\n")
    source = CsvCaptions(tmp_path / "bad.csv", root=photos)
    samples = [source[i] for i in range(len(source))]  # no exception for any bad item
    assert all(isinstance(s, Sample) for s in samples)
    assert samples[0].ok
    for sample, name in zip(samples[1:5], ["trunc.jpg", "fake.jpg", "empty.png", "missing.jpg"]):
        assert not sample.ok and sample.image is None and sample.caption is None
        assert name in sample.error
    assert "truncated" in samples[1].error
    counter = SkipCounter()
    counter.update(samples)
    assert counter.as_dict() == {"unreadable image": 2, "missing image": 2, "empty caption": 1}
    assert counter.total == 5 and "unreadable image: 2" in str(counter)

    for name in ("a", "trunc", "fake", "empty"):
        (photos / f"{name}.txt").write_text("   " if name == "empty" else f"{name} caption")
    folder = FolderCaptions(photos)
    errors = {Path(s.key).name: s.error for s in (folder[i] for i in range(len(folder)))}
    assert errors["a.jpg"] is None
    assert "empty caption" in errors["empty.png"] and "unreadable image" in errors["fake.jpg"]
    assert [p.name for p in folder.skipped] == ["b.png"]


# --------------------------------------------------------------------------- webdataset


SHARDS, PER_SHARD = 5, 4


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """img2dataset layout: shards/00000.tar .. 00004.tar, keys 000000000.. (shard * 10000 + i);
    sample 1 of shard 2 has a corrupt .jpg, sample 2 of shard 3 an empty caption."""
    out = tmp_path / "shards"
    out.mkdir()
    for shard in range(SHARDS):
        with wds.TarWriter(str(out / f"{shard:05d}.tar")) as sink:
            for i in range(PER_SHARD):
                key = f"{shard * 10000 + i:09d}"
                image = b"\xff\xd8 not a jpeg" if (shard, i) == (2, 1) else _encoded(i)
                caption = " " if (shard, i) == (3, 2) else f"caption {key}"
                sink.write({"__key__": key, "jpg": image, "txt": caption,
                            "json": b'{"status": "success"}'})
    return out


def _all_keys() -> list[str]:
    return sorted(f"{s * 10000 + i:09d}" for s in range(SHARDS) for i in range(PER_SHARD))


def _identity(batch):
    return batch


def test_webdataset_reads_shards_and_reports_bad_samples(shards: Path):
    source = WebDatasetCaptions(str(shards / "{00000..00004}.tar"), shuffle_buffer=8)
    samples = list(source)
    assert sorted(s.key for s in samples) == _all_keys()
    bad = {s.key: s.error for s in samples if not s.ok}
    assert set(bad) == {"000020001", "000030002"}
    assert "unreadable image" in bad["000020001"] and "00002.tar" in bad["000020001"]
    assert "empty caption" in bad["000030002"]
    good = next(s for s in samples if s.ok)
    assert good.image.size == (48, 32) and good.caption == f"caption {good.key}"
    # Deterministic for a seed and epoch, reshuffled for another epoch.
    assert [s.key for s in WebDatasetCaptions(source.urls, shuffle_buffer=8)] == \
        [s.key for s in samples]
    source.set_epoch(1)
    assert [s.key for s in source] != [s.key for s in samples]


def test_webdataset_every_sample_once_across_ranks_and_workers(shards: Path, monkeypatch):
    seen: list[str] = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        source = WebDatasetCaptions(str(shards / "{00000..00004}.tar"), shuffle_buffer=4)
        loader = DataLoader(source, batch_size=None, num_workers=2, collate_fn=_identity,
                            multiprocessing_context="fork")
        keys = [sample.key for sample in loader]
        assert keys, f"rank {rank} read nothing"
        seen += keys
    assert sorted(seen) == _all_keys()  # every key exactly once in one pass


def test_webdataset_resampled_keeps_going(shards: Path):
    source = WebDatasetCaptions(str(shards / "*.tar"), resampled=True, shuffle_buffer=4, seed=3)
    keys = [s.key for s in islice(iter(source), 3 * SHARDS * PER_SHARD)]
    assert len(keys) == 3 * SHARDS * PER_SHARD and set(keys) <= set(_all_keys())
    again = [s.key for s in islice(iter(WebDatasetCaptions(source.urls, resampled=True,
                                                           shuffle_buffer=4, seed=3)), 20)]
    assert again == keys[:20]  # a function of the seed, not of time or pid


def test_webdataset_corrupt_shard_is_counted_not_raised(shards: Path):
    path = shards / "00001.tar"
    with tarfile.open(path) as tar:
        assert tar.getnames()[:3] == ["000010000.jpg", "000010000.json", "000010000.txt"]
        member = tar.getmember("000010001.jpg")
    # Cut inside a member's data.  (A cut exactly on a 512-byte header boundary reads as a clean
    # end of archive to Python's tarfile: nothing to report, the tail is silently missing.)
    path.write_bytes(path.read_bytes()[: member.offset_data + member.size // 2])
    samples = list(WebDatasetCaptions(str(shards / "{00000..00004}.tar"), shuffle_buffer=0))
    counter = SkipCounter()
    counter.update(samples)
    assert counter.as_dict() == {"corrupt shard": 1, "unreadable image": 1, "empty caption": 1}
    corrupt = next(s for s in samples if s.error and "corrupt shard" in s.error)
    assert corrupt.key == str(path) and "ReadError" in corrupt.error
    assert sorted(s.key for s in samples if s.ok) == sorted(
        set(_all_keys()) - {"000020001", "000030002"} - {f"{10000 + i:09d}" for i in (1, 2, 3)})


@pytest.mark.parametrize("resampled", [False, True])
def test_webdataset_stream_resumes_at_any_position(shards: Path, resampled: bool):
    """``stream(share, start)`` is the same sequence from item ``start`` on, errors included
    (a corrupt shard, an unreadable image, an empty caption), with the shuffle buffer in the
    same state: what exact resume of a streamed training run rests on."""
    path = shards / "00001.tar"
    member = tarfile.open(path).getmember("000010001.jpg")
    path.write_bytes(path.read_bytes()[: member.offset_data + member.size // 2])
    source = WebDatasetCaptions(str(shards / "*.tar"), resampled=resampled, shuffle_buffer=6,
                                seed=5)
    # Resampled: one of four readers; a single pass: one reader of every shard.
    share = StreamShare(rank=1, world_size=2, worker=0, workers=2) if resampled else StreamShare()
    length = 40 if resampled else None
    full = [(s.key, s.error) for s in islice(source.stream(share), length)]
    errors = [e for _, e in full if e]
    assert any("corrupt shard" in e for e in errors) or resampled
    assert any("unreadable image" in e for e in errors)
    for start in (1, 7, 13):
        rest = [(s.key, s.error) for s in islice(source.stream(share, start),
                                                  None if length is None else length - start)]
        assert rest == full[start:]
    other = [(s.key, s.error) for s in islice(source.stream(
        StreamShare(rank=0, world_size=2, worker=1, workers=2)), length)]
    assert other != full


# --------------------------------------------------------------------------- dispatch and checks


def test_open_source_dispatch(photos: Path, shards: Path, tmp_path: Path):
    (tmp_path / "a.csv").write_text("filepath,title\nimgs/a.jpg,x\n")
    (tmp_path / "a.tsv").write_text("filepath\ttitle\nimgs/a.jpg\tx\n")
    assert isinstance(open_source(tmp_path / "a.csv", seed=1), CsvCaptions)
    assert open_source(str(tmp_path / "a.tsv"))[0].caption == "x"
    assert isinstance(open_source(str(photos)), FolderCaptions)
    pattern = open_source(str(shards / "{00000..00002}.tar"), resampled=False, image_key="x")
    assert isinstance(pattern, WebDatasetCaptions) and len(pattern.urls) == 3
    assert isinstance(open_source(str(shards / "00000.tar")), WebDatasetCaptions)
    assert len(open_source(str(shards / "*.tar")).urls) == SHARDS
    assert len(open_source(shards).urls) == SHARDS  # an img2dataset output folder
    for bad in (tmp_path / "nothing.csv", tmp_path / "nowhere", tmp_path / "a.parquet"):
        if bad.suffix == ".parquet":
            bad.write_bytes(b"PAR1")
        with pytest.raises(ValueError, match=r"\.csv/\.tsv|no such file") as info:
            open_source(bad)
        assert str(bad) in str(info.value)
    with pytest.raises(DataError, match="do not exist"):
        open_source(str(shards / "{00000..00009}.tar"))
    with pytest.raises(TypeError, match="colour"):
        open_source(str(photos), colour="red")


def test_check_readable(photos: Path, shards: Path, tmp_path: Path):
    (tmp_path / "bad.csv").write_text("filepath,title\ntrunc.jpg,a\nfake.jpg,b\na.jpg,\n")
    with pytest.raises(DataError, match="no readable sample in .*bad.csv") as info:
        check_readable(CsvCaptions(tmp_path / "bad.csv", root=photos))
    assert "trunc.jpg" in str(info.value) and "empty caption" in str(info.value)
    (tmp_path / "ok.csv").write_text("filepath,title\ntrunc.jpg,a\nfake.jpg,b\na.jpg,c\n")
    check_readable(CsvCaptions(tmp_path / "ok.csv", root=photos))
    check_readable(open_source(str(shards / "{00000..00004}.tar")))

    empty = tmp_path / "empty"
    empty.mkdir()
    _image(0).save(empty / "uncaptioned.jpg")
    with pytest.raises(DataError, match="no .txt caption|no same-name"):
        check_readable(FolderCaptions(empty))
    (tmp_path / "junk.tar").write_bytes(b"not a tar file at all" * 100)
    with pytest.raises(DataError, match="junk.tar.*corrupt shard"):
        check_readable(WebDatasetCaptions(str(tmp_path / "junk.tar")))


# --------------------------------------------------------------------------- hostile inputs


def _in_child(code: str, *args: str) -> list[str]:
    """Run ``code`` in a fresh interpreter with a timeout and return its output lines: a read
    that blocks (a FIFO) or a stream that never ends fails the test instead of hanging it."""
    try:
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                              text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("did not return: a read blocked or a stream never ended")
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_extreme_aspect_ratio_is_skipped_at_decode(tmp_path: Path, monkeypatch):
    """A 1x400000 PNG (a few hundred bytes) is refused from its header by every reader, so
    training, evaluation and indexing skip it as preprocessing would, with the reason."""
    monkeypatch.delenv("CLIPFORGE_MAX_ASPECT_RATIO", raising=False)
    _image(0).save(tmp_path / "a.jpg")
    Image.new("L", (1, 400_000)).save(tmp_path / "strip.png")
    (tmp_path / "data.csv").write_text("filepath,title\nstrip.png,a line\na.jpg,a photo\n")
    source = CsvCaptions(tmp_path / "data.csv")
    bad, good = source[0], source[1]
    assert good.ok and not bad.ok
    assert bad.error.startswith(f"{tmp_path / 'strip.png'}: unreadable image (image is "
                                "1x400000 pixels")
    assert "100:1" in bad.error and "CLIPFORGE_MAX_ASPECT_RATIO" in bad.error
    with pytest.raises(BadItem, match=r"\.png: image is 1x400000"):
        open_image_bytes((tmp_path / "strip.png").read_bytes(), "png")
    with pytest.raises(BadItem, match="image is 1x400000"):  # the fast-decode path too
        open_image_file(tmp_path / "strip.png", draft=224)
    monkeypatch.setenv("CLIPFORGE_MAX_ASPECT_RATIO", "1000000")
    assert open_image_file(tmp_path / "strip.png").size == (1, 400_000)


def test_fifo_is_skipped_by_every_reader(tmp_path: Path):
    """A named pipe called x.jpg (or x.csv) is reported as not a regular file, never waited on:
    image files of CSV sources and index builds, tables, shard members."""
    os.mkfifo(tmp_path / "x.jpg")
    os.mkfifo(tmp_path / "pipe.csv")
    _image(0).save(tmp_path / "a.jpg")
    (tmp_path / "data.csv").write_text("filepath,title\nx.jpg,a pipe\na.jpg,a photo\n")
    code = """if True:
        import sys
        from pathlib import Path
        from clipforge.data.sources import (BadItem, CsvCaptions, DataError, check_readable,
                                            open_image_file, read_utf8)
        from clipforge.search.sources import read_entry_image
        root = Path(sys.argv[1])
        for read in (open_image_file, read_entry_image):
            try:
                read(str(root / "x.jpg"))
            except BadItem as exc:
                print(exc)
        try:
            read_entry_image(str(root / "x.jpg"), "0.jpg", 0, 10)
        except BadItem as exc:
            print(exc)
        try:
            read_utf8(root / "pipe.csv", "table")
        except DataError as exc:
            print(exc)
        source = CsvCaptions(root / "data.csv")
        print(source[0].error)
        check_readable(source)
        print("readable")
    """
    lines = _in_child(code, str(tmp_path))
    assert len(lines) == 6 and lines[-1] == "readable"
    assert lines[0] == lines[1] == "unreadable image (not a regular file: it is a named pipe " \
                                   "(FIFO))"
    assert "not a regular file" in lines[2] and "x.jpg" in lines[2]
    assert "pipe.csv" in lines[3] and "not a regular file" in lines[3]
    assert lines[4].startswith(f"{tmp_path / 'x.jpg'}: unreadable image (not a regular file")


def _barren_shards(tmp_path: Path) -> tuple[Path, Path]:
    """A shard of random bytes and a valid but empty tar."""
    noise = tmp_path / "noise.tar"
    noise.write_bytes(np.random.default_rng(0).bytes(20_000))
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    return noise, empty


def test_shards_with_nothing_to_read_stop_at_once(tmp_path: Path):
    """Resampled (as training reads shards), a source whose every shard yields nothing was
    drawn from for ever; now the check stops at once, naming the shard and the reason."""
    noise, empty = _barren_shards(tmp_path)
    code = """if True:
        import sys
        from clipforge.data.sources import DataError, WebDatasetCaptions, check_readable
        for spec in sys.argv[1:]:
            for resampled in (True, False):
                try:
                    check_readable(WebDatasetCaptions(spec, resampled=resampled))
                except DataError as exc:
                    print(exc)
    """
    lines = _in_child(code, str(noise), str(empty), f"{noise}::{empty}")
    assert len(lines) == 6
    for line in lines:
        assert line.startswith("no readable sample in ")
    for line in lines[:2]:
        assert f"{noise}: corrupt shard (ReadError: invalid header)" in line
    assert f"{empty}: no files (an empty tar)" in lines[2]
    assert "empty tar" in lines[3] and "rank" not in lines[3]
    assert str(noise) in lines[4] and str(empty) in lines[4]  # both named, both reasons
    assert "corrupt shard" in lines[4] and "empty tar" in lines[4]


def test_resampled_stream_with_some_barren_shards_keeps_going(shards: Path, tmp_path: Path):
    noise, empty = _barren_shards(tmp_path)
    source = WebDatasetCaptions([str(shards / "00000.tar"), str(noise), str(empty)],
                                resampled=True, shuffle_buffer=0, seed=1)
    check_readable(source)
    items = list(islice(iter(source), 3 * PER_SHARD))
    assert len(items) == 3 * PER_SHARD and sum(s.ok for s in items) >= 2 * PER_SHARD
    assert {s.key for s in items if s.error} <= {str(noise)}


def test_long_csv_field_is_read_up_to_the_limit_and_named_beyond_it(tmp_path: Path,
                                                                    monkeypatch):
    """Python's csv stops at 131,072 characters a field; the bound is 1 MiB (configurable),
    and beyond it the error is one line naming the file and the line."""
    monkeypatch.delenv("CLIPFORGE_CSV_FIELD_LIMIT", raising=False)
    _image(0).save(tmp_path / "a.jpg")
    path = tmp_path / "long.csv"
    path.write_text(f"filepath,title\na.jpg,short\na.jpg,{'x' * 200_000}\n")
    assert [len(c) for c in CsvCaptions(path).captions] == [5, 200_000]
    before = csv.field_size_limit()
    path.write_text(f"filepath,title\na.jpg,short\n\na.jpg,\"{'y' * (1 << 20)}z\"\n")
    with pytest.raises(DataError) as info:
        CsvCaptions(path)
    message = str(info.value)
    assert message.startswith(f"{path}, line 4: a field is longer than 1048576 characters")
    assert "CLIPFORGE_CSV_FIELD_LIMIT" in message and "\n" not in message
    assert csv.field_size_limit() == before  # the process-wide setting is put back
    monkeypatch.setenv("CLIPFORGE_CSV_FIELD_LIMIT", str(2 << 20))
    assert len(CsvCaptions(path).captions[1]) == (1 << 20) + 1
    monkeypatch.setenv("CLIPFORGE_CSV_FIELD_LIMIT", "lots")
    with pytest.raises(DataError, match="CLIPFORGE_CSV_FIELD_LIMIT='lots'"):
        CsvCaptions(path)


def test_train_transform_work_is_bounded_for_any_shape(monkeypatch):
    """No aspect check is needed in training augmentation: the crop box keeps its ratio within
    (3/4, 4/3), so even a 1x400000 strip is cropped before any resample, never resized whole."""
    resized: list[tuple[int, int]] = []
    resize = Image.Image.resize

    def spy(self, *args, **kwargs):
        resized.append(self.size)
        return resize(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    t = TrainTransform(Preprocess(224, MEAN, STD))
    for size in [(1, 400_000), (400_000, 1), (3, 1000)]:
        resized.clear()
        assert t(Image.new("L", size), np.random.default_rng(0)).shape == (3, 224, 224)
        assert resized and all(max(s) <= 4 for s in resized)

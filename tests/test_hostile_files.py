"""Files that used to hang or sink whole commands: a 1x400000 PNG (a few hundred bytes that
became gigabytes once resized), a named pipe called ``x.jpg``, a file name that is not UTF-8, and
webdataset shards with nothing in them.  Each is skipped and reported, or stops the command at
once with one line saying why; the good files around it are still embedded.

Commands that could block (a FIFO, an endless shard stream) run in a child process with a
timeout, so that a regression fails the test instead of hanging the suite."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipforge
from clipforge.cli import main


@pytest.fixture
def saved_model(tiny_vit, tmp_path) -> Path:
    path = tmp_path / "tiny"
    clipforge.save_model(tiny_vit, path)
    return path


def _clipforge(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        return subprocess.run([sys.executable, "-m", "clipforge", *args], env=env,
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"clipforge {args[0]} did not return")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:  # strict: the file must be UTF-8
        return list(csv.DictReader(f))


@pytest.fixture
def strip_folder(tmp_path, photos) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for path in photos[:2]:
        shutil.copy(path, folder / path.name)
    Image.new("L", (1, 400_000)).save(folder / "strip.png")
    return folder


def test_embed_skips_an_extreme_aspect_ratio(saved_model, strip_folder, tmp_path,
                                             monkeypatch) -> None:
    monkeypatch.delenv("CLIPFORGE_MAX_ASPECT_RATIO", raising=False)
    out = tmp_path / "out"
    assert main(["embed", "--images", str(strip_folder), "--out", str(out),
                 "--model", str(saved_model)]) == 0
    assert np.load(out / "image_embeddings.npy").shape == (2, 64)
    assert sorted(Path(r["path"]).name for r in _rows(out / "images.csv")) == \
        sorted(p.name for p in strip_folder.iterdir() if p.name != "strip.png")
    [skipped] = _rows(out / "skipped.csv")
    assert skipped["item"] == str(strip_folder / "strip.png")
    assert "image is 1x400000 pixels" in skipped["reason"]
    assert "over the limit of 100:1" in skipped["reason"]
    assert "CLIPFORGE_MAX_ASPECT_RATIO" in skipped["reason"]


def test_classify_skips_an_extreme_aspect_ratio(saved_model, strip_folder, capsys,
                                                monkeypatch) -> None:
    monkeypatch.delenv("CLIPFORGE_MAX_ASPECT_RATIO", raising=False)
    assert main(["classify", str(strip_folder), "--labels", "a cat,a dog", "--json",
                 "--model", str(saved_model)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["results"]) == 2
    [skipped] = report["skipped"]
    assert skipped["image"] == str(strip_folder / "strip.png")
    assert "1x400000" in skipped["error"] and "CLIPFORGE_MAX_ASPECT_RATIO" in skipped["error"]


def test_embed_keeps_a_name_that_is_not_utf8(saved_model, photos, tmp_path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(photos[0], folder / photos[0].name)
    odd = os.fsencode(folder) + b"/caf\xe9.png"
    shutil.copy(photos[1], odd)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "out"
    assert main(["embed", "--images", str(folder), "--out", str(out),
                 "--model", str(saved_model)]) == 0
    rows = _rows(out / "images.csv")
    assert len(rows) == 2 == len(np.load(out / "image_embeddings.npy"))
    [row] = [r for r in rows if r["path_hex"]]
    assert bytes.fromhex(row["path_hex"]) == odd  # the exact bytes, from a UTF-8 table
    assert row["path"] == f"{folder}/caf\\xe9.png"  # readable, undecodable byte escaped
    assert all(not r["path_hex"] for r in rows if r is not row)
    [skipped] = _rows(out / "skipped.csv")
    assert skipped["item"].endswith("broken.jpg") and skipped["item_hex"] == ""


def test_embed_skips_a_fifo(saved_model, photos, tmp_path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(photos[0], folder / photos[0].name)
    os.mkfifo(folder / "x.jpg")
    out = tmp_path / "out"
    done = _clipforge("embed", "--images", str(folder), "--out", str(out),
                      "--model", str(saved_model))
    assert done.returncode == 0, done.stderr
    assert len(_rows(out / "images.csv")) == 1
    [skipped] = _rows(out / "skipped.csv")
    assert skipped["item"] == str(folder / "x.jpg")
    assert "not a regular file: it is a named pipe (FIFO)" in skipped["reason"]


@pytest.mark.parametrize("kind", ["random bytes", "empty tar"])
def test_train_on_a_shard_with_nothing_to_read_stops_at_once(tmp_path, kind) -> None:
    shard = tmp_path / "shard.tar"
    if kind == "random bytes":
        shard.write_bytes(np.random.default_rng(0).bytes(50_000))
    else:
        tarfile.open(shard, "w").close()
    done = _clipforge("train", "--data", str(shard), "--steps", "1", "--model", "tiny-vit",
                      "--batch-size", "2", "--workers", "0", "--no-progress",
                      "--output", str(tmp_path / "run"))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: no readable sample in {shard}: ")
    reason = "corrupt shard (ReadError" if kind == "random bytes" else "no files (an empty tar)"
    assert f"{shard}: {reason}" in last

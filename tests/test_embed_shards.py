"""``clipforge embed --shards``: per-shard files equal to the library's embeddings, skipped and
failed items accounted for, resumed by re-running, and the same under torchrun with 2 ranks."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipforge
from clipforge.cli import main
from clipforge.inference import embed_images, embed_texts
from clipforge.weights.fingerprint import weights_fingerprint
from conftest import seeded_model

SHARDS = "{000000..000004}.tar"  # 000003 does not exist


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24 + seed % 7, 32, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))


def _sample(key: str, seed: int) -> list[tuple[str, bytes]]:
    record = json.dumps({"url": f"https://example.com/{key}.png", "key": key}).encode()
    return [(f"{key}.png", _png(seed)), (f"{key}.txt", f"a photo number {seed}".encode()),
            (f"{key}.json", record)]


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> dict:
    """Shard 0: four good samples.  Shard 1: two good, a corrupt PNG and one with no image.
    Shard 2: cut between two members, which only img2dataset's _stats.json reveals.  Shard 3:
    named by the pattern, not on disk.  Shard 4: cut inside a member."""
    root = tmp_path_factory.mktemp("shards")
    model = seeded_model("tiny-vit", seed=1)
    clipforge.save_model(model, root / "model")
    other = root / "other-model"
    clipforge.save_model(seeded_model("tiny-vit", seed=2), other)
    good = {0: [f"0000{i:05d}" for i in range(4)], 1: ["000100000", "000100002"]}
    seeds = {key: n for n, key in enumerate(good[0] + good[1])}
    _write_tar(root / "000000.tar", [m for k in good[0] for m in _sample(k, seeds[k])])
    _write_tar(root / "000001.tar", [
        *_sample("000100000", seeds["000100000"]),
        ("000100001.png", b"\x89PNG\r\n\x1a\n not really"), ("000100001.txt", b"broken"),
        *_sample("000100002", seeds["000100002"]), ("000100003.txt", b"no image here")])
    (root / "000000_stats.json").write_text('{"count": 5, "successes": 4}')
    for shard in (2, 4):
        path = root / f"{shard:06d}.tar"
        _write_tar(path, [m for k in range(3) for m in _sample(f"000{shard}{k:05d}", k)])
        with tarfile.open(path) as tar:  # where the second sample's image starts
            second = tar.getmembers()[3].offset
        path.write_bytes(path.read_bytes()[:second if shard == 2 else second + 700])
    (root / "000002_stats.json").write_text('{"count": 3, "successes": 3}')
    pictures = root / "pictures"
    pictures.mkdir()
    for key, seed in seeds.items():
        (pictures / f"{key}.png").write_bytes(_png(seed))
    return {"root": root, "model": model, "other": other, "good": good, "seeds": seeds,
            "pictures": pictures}


def _args(c: dict, out: Path, *extra: str) -> list[str]:
    return ["embed", "--shards", str(c["root"] / SHARDS), "--out", str(out), "--model",
            str(c["root"] / "model"), "--batch-size", "3", *extra]


def _table(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_shards_embed_like_the_library_and_account_for_failures(collection, tmp_path,
                                                                capsys) -> None:
    c, out = collection, tmp_path / "out"
    assert main(_args(c, out, "--workers", "2", "--captions", "--dtype", "float32")) == 0
    model = c["model"]
    for shard, keys in c["good"].items():
        stem = f"{shard:06d}"
        rows = _table(out / f"{stem}.csv")
        assert [r["key"] for r in rows] == keys  # tar order, bad samples left out
        assert rows[0]["url"] == f"https://example.com/{keys[0]}.png"
        assert json.loads(rows[0]["json"])["key"] == keys[0]
        vectors = np.load(out / f"{stem}.npy")
        assert vectors.dtype == np.float32 and vectors.shape == (len(keys), 64)
        direct = embed_images(model, [c["pictures"] / f"{k}.png" for k in keys],
                              progress=False)
        np.testing.assert_allclose(vectors, direct.vectors, atol=1e-5)
        texts = embed_texts(model, [r["caption"] for r in rows], progress=False)
        np.testing.assert_allclose(np.load(out / f"{stem}.captions.npy"), texts.vectors,
                                   atol=1e-5)
    record = json.loads((out / "000001.json").read_text())
    assert record["samples"] == 2 and record["skipped"] == 2
    assert record["skipped_by_reason"] == {"unreadable image": 1, "missing image": 1}
    assert {s["key"] for s in record["skipped_samples"]} == {"000100001", "000100003"}
    assert not any((out / f"00000{n}.npy").exists() for n in (2, 3, 4))
    failed = {Path(url).name: reason for url, reason in
              (line.split("\t") for line in (out / "failed-shards.txt").read_text().splitlines())}
    assert failed == {
        "000002.tar": "corrupt shard (truncated: 1 sample(s) read, its _stats.json lists 3)",
        "000003.tar": "corrupt shard (no such file)",
        "000004.tar": "corrupt shard (ReadError: unexpected end of data)"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["fingerprint"] == weights_fingerprint(model)
    assert {k: manifest[k] for k in ("dim", "dtype", "shards", "shards_done", "shards_failed",
                                     "samples", "skipped")} == {
        "dim": 64, "dtype": "float32", "shards": 5, "shards_done": 2, "shards_failed": 3,
        "samples": 6, "skipped": 2}
    assert "rank 0: 2 shard(s) embedded, 0 already done, 3 failed" in capsys.readouterr().out


def test_rerun_redoes_only_what_is_missing(collection, tmp_path, capsys) -> None:
    c, out = collection, tmp_path / "out"
    assert main(_args(c, out)) == 0
    assert np.load(out / "000000.npy").dtype == np.float16
    first = _files(out)
    capsys.readouterr()
    assert main(_args(c, out)) == 0
    assert "0 shard(s) embedded, 2 already done, 3 failed" in capsys.readouterr().out
    again = _files(out)
    assert {k: v for k, v in again.items() if k != "manifest.json"} == \
        {k: v for k, v in first.items() if k != "manifest.json"}
    (out / "000001.npy").unlink()
    stamp = (out / "000000.npy").stat().st_mtime_ns
    assert main(_args(c, out)) == 0
    assert "1 shard(s) embedded, 1 already done, 3 failed" in capsys.readouterr().out
    assert (out / "000001.npy").read_bytes() == first["000001.npy"]
    assert (out / "000000.npy").stat().st_mtime_ns == stamp
    # Another model's embeddings never join the folder.
    other = _args(c, out)
    other[other.index("--model") + 1] = str(c["other"])
    with pytest.raises(SystemExit, match="fingerprint"):
        main(other)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_write_what_one_process_writes(collection, tmp_path) -> None:
    c = collection
    single, double = tmp_path / "single", tmp_path / "double"
    assert main(_args(c, single)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(_free_port()), "-m", "clipforge", *_args(c, double)],
        env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1: 1 shard(s) embedded, 0 already done, 1 failed" in result.stdout  # 1, 3
    one, two = _files(single), _files(double)
    assert sorted(one) == sorted(two)
    for name in one:
        if name.endswith(".npy"):
            np.testing.assert_allclose(np.load(double / name).astype(np.float32),
                                       np.load(single / name).astype(np.float32), atol=1e-3)
        elif name == "manifest.json":
            a, b = (json.loads(x) for x in (one[name], two[name]))
            assert {**a, "updated": 0} == {**b, "updated": 0}
        else:
            assert one[name] == two[name], name

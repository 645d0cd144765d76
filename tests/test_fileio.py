"""Writes are all-or-nothing: a failure part-way leaves the previous state untouched."""

from __future__ import annotations

import pytest

from clipforge.fileio import atomic_directory, atomic_file


def test_failed_directory_write_keeps_the_old_one(tmp_path) -> None:
    target = tmp_path / "model"
    with atomic_directory(target, marker="config.json") as tmp:
        (tmp / "config.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target, marker="config.json") as tmp:
        (tmp / "config.json").write_text("new, half-written")
        raise RuntimeError("killed")
    assert (target / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_failed_file_write_keeps_the_old_one(tmp_path) -> None:
    target = tmp_path / "vectors.npy"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["vectors.npy"]
    with atomic_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"

"""Writes are all-or-nothing: a failure part-way leaves the previous state untouched."""

from __future__ import annotations

import errno
import json
import os
import stat

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


# --------------------------------------------------------------- what a directory write replaces

def _tree(root) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_directory_write_lists_its_files_and_replaces_only_them(tmp_path) -> None:
    from clipforge.fileio import DIRECTORY_MANIFEST

    target = tmp_path / "out"
    with atomic_directory(target, marker="model.json") as tmp:
        (tmp / "model.json").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "part.bin").write_text("2")
    listed = json.loads((target / DIRECTORY_MANIFEST).read_text())["files"]
    assert sorted(listed) == ["model.json", "sub/", "sub/part.bin"]
    with atomic_directory(target, marker="model.json") as tmp:  # its own files: replaced
        (tmp / "model.json").write_text("second")
    tree = _tree(target)
    assert tree.pop(DIRECTORY_MANIFEST) and tree == {"model.json": "second"}

    (target / "notes.txt").write_text("mine")
    (target / ".git").mkdir()
    (target / ".git" / "HEAD").write_text("ref")
    before = _tree(target)
    with pytest.raises(FileExistsError) as error, \
            atomic_directory(target, marker="model.json") as tmp:
        raise AssertionError("never reached")
    message = str(error.value)
    assert str(target) in message and "notes.txt" in message and ".git/" in message
    assert "choose a new or empty directory" in message and "\n" not in message
    assert _tree(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_folder_from_before_manifests_is_replaced_only_if_it_holds_just_the_writers_files(
        tmp_path) -> None:
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    (legacy / "model.safetensors").write_text("weights")
    with atomic_directory(legacy, marker="config.json",
                          writes=("config.json", "model.safetensors")) as tmp:
        (tmp / "config.json").write_text("new")
    assert (legacy / "config.json").read_text() == "new"
    assert not (legacy / "model.safetensors").exists()

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text("{}")
    (repo / "README.md").write_text("read me")
    with pytest.raises(FileExistsError, match=r"README\.md"), \
            atomic_directory(repo, marker="config.json", writes=("config.json",)):
        pass
    assert _tree(repo) == {"config.json": "{}", "README.md": "read me"}
    without_marker = tmp_path / "plain"
    without_marker.mkdir()
    (without_marker / "model.safetensors").write_text("someone's")
    with pytest.raises(FileExistsError, match="model.safetensors"), \
            atomic_directory(without_marker, marker="config.json",
                             writes=("config.json", "model.safetensors")):
        pass
    assert (without_marker / "model.safetensors").read_text() == "someone's"


# ---------------------------------------------------------------------------- modes and disk full

@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_atomic_writes_get_the_mode_a_plain_write_would(tmp_path, umask) -> None:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from clipforge.search.vectors import VectorIndex

    rows = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    index = VectorIndex.build(rows / np.linalg.norm(rows, axis=1, keepdims=True), np.arange(40),
                              "hnsw")
    tensors = {"a": torch.zeros(3)}
    old = os.umask(umask)
    try:
        with atomic_file(tmp_path / "file.txt") as tmp:
            tmp.write_text("x")
        with atomic_file(tmp_path / "one.safetensors") as tmp:
            save_file(tensors, str(tmp))  # safetensors itself creates files 0600
        with atomic_directory(tmp_path / "folder", marker="m") as tmp:
            (tmp / "m").write_text("x")
            (tmp / "sub").mkdir()
            save_file(tensors, str(tmp / "sub" / "model.safetensors"))
        index.save_ann(tmp_path / "ann.faiss")
    finally:
        os.umask(old)
    folder = tmp_path / "folder"
    files = ["file.txt", "one.safetensors", "ann.faiss", "folder/m",
             "folder/.clipforge-manifest.json", "folder/sub/model.safetensors"]
    assert {name: oct(stat.S_IMODE((tmp_path / name).stat().st_mode)) for name in files} == \
        {name: oct(0o666 & ~umask) for name in files}
    for name in (folder, folder / "sub"):
        assert stat.S_IMODE(name.stat().st_mode) == 0o777 & ~umask


def _disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_names_the_destination_and_keeps_the_old_state(tmp_path) -> None:
    from clipforge.fileio import DiskFullError

    target = tmp_path / "model"
    with atomic_directory(target, marker="config.json") as tmp:
        (tmp / "config.json").write_text("old")
    with pytest.raises(DiskFullError) as error, \
            atomic_directory(target, marker="config.json") as tmp:
        (tmp / "config.json").write_text("new, half")
        raise _disk_full()
    assert error.value.errno == errno.ENOSPC
    message = str(error.value)
    assert str(target) in message and "disk is full" in message and "\n" not in message
    assert (target / "config.json").read_text() == "old"

    file = tmp_path / "vectors.npy"
    file.write_text("old")
    # as safetensors reports it: not an OSError, the errno only in the text
    with pytest.raises(DiskFullError, match="vectors.npy.*disk is full"), \
            atomic_file(file) as tmp:
        raise RuntimeError("Error while serializing: I/O error: No space left on device "
                           "(os error 28)")
    assert file.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "vectors.npy"]
    with pytest.raises(RuntimeError, match="killed"), atomic_file(file):
        raise RuntimeError("killed")  # other errors pass unchanged

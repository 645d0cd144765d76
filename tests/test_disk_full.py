"""A full disk during an index commit: one clear line, and the index keeps its last state."""

from __future__ import annotations

import json
import shutil
import sqlite3

import clipforge
from clipforge.cli import main
from clipforge.search.store import Store
from conftest import seeded_model


def test_full_disk_at_the_index_commit_keeps_the_committed_index(tmp_path, photos, capsys,
                                                                 monkeypatch) -> None:
    model_file = tmp_path / "tiny.safetensors"
    clipforge.save_model(seeded_model("tiny-vit", seed=4), model_file)
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in photos[:3]:
        shutil.copy(path, folder / path.name)
    out = tmp_path / "index"
    build = ["index", "build", str(folder), "--out", str(out), "--model", str(model_file),
             "--workers", "0", "--no-progress"]
    assert main(build) == 0
    capsys.readouterr()

    def full(self, *args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")  # what SQLite raises

    shutil.copy(photos[3], folder / photos[3].name)
    monkeypatch.setattr(Store, "commit", full)
    assert main(build) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot write {out}: the disk is full"), err
    assert "\n" not in err and "Traceback" not in err
    monkeypatch.undo()
    assert main(["index", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["count"], info["generation"]) == ("3", "1")
    assert main(build) == 0  # once there is space again, the build finishes
    assert "4 items" in capsys.readouterr().out

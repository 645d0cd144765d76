"""Indexes larger than memory: the storage a memory budget chooses, on-disk IVF search re-ranked
exactly from memory-mapped rows, reopening, damaged files, and the build that writes them."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clipforge
from clipforge.search import SearchIndex, build_index
from clipforge.search import build as build_module
from clipforge.search.build import ondisk_files
from clipforge.search.index import IndexUnavailableError
from clipforge.search.store import IndexFormatError, Store
from clipforge.search.vectors import (
    ONDISK,
    DiskFiles,
    VectorIndex,
    memory_bytes,
    parse_memory,
    plan_storage,
    save_rows,
)
from test_vectors import brute_force, clustered, recall

N, D = 4000, 64


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, float16 rows, float32 queries): clustered unit vectors, as CLIP embeddings are;
    the queries are drawn the same way and are not in the set."""
    both = clustered(N + 50, D, 40, seed=0)
    ids = np.arange(N, dtype=np.int64) * 3 + 11
    return ids, both[:N].astype(np.float16), both[N:]


def chunks(ids: np.ndarray, rows: np.ndarray, size: int = 1500):
    for start in range(0, len(ids), size):
        yield ids[start:start + size], rows[start:start + size]


@pytest.fixture(scope="module")
def files(data, tmp_path_factory) -> DiskFiles:
    """The on-disk index of ``data`` that a budget of a tenth of the in-memory size gives."""
    ids, rows, _ = data
    plan = plan_storage("flat", N, D, memory_bytes("flat", N, D) // 10)
    assert plan["storage"] == "ondisk"
    files = DiskFiles.named(tmp_path_factory.mktemp("ondisk"), "test")
    save_rows(files, chunks(ids, rows), N, D)
    VectorIndex.build_ondisk(files, plan["params"])
    return files


# ------------------------------------------------------------------------- the budget
def test_parse_memory() -> None:
    assert parse_memory("2G") == 2 * 2**30 and parse_memory("512M") == 512 * 2**20
    assert parse_memory("1.5k") == 1536 and parse_memory("100") == 100
    assert parse_memory("3GiB") == parse_memory("3gb") == 3 * 2**30 and parse_memory(7) == 7
    for bad in ("lots", "-1G", "2X", ""):
        with pytest.raises(ValueError, match=f"memory size '{bad}' is not a size"):
            parse_memory(bad)


def test_storage_follows_the_budget(caplog) -> None:
    flat = memory_bytes("flat", N, D)
    assert flat == N * (2 * D + 8) + 2 * N * D  # rows, ids, and faiss's copy of the rows
    assert plan_storage("flat", N, D, None)["storage"] == "memory"
    assert plan_storage("flat", N, D, flat)["storage"] == "memory"
    below = plan_storage("flat", N, D, flat - 1)
    assert (below["storage"], below["kind"], below["params"]["codes"]) == ("ondisk", ONDISK, "sq8")
    assert below["memory_bytes"] <= flat - 1 and below["budget"] == flat - 1
    # A cheaper in-memory kind fits where flat does not.
    ivfpq = memory_bytes("ivfpq", 20000, D)
    assert ivfpq < memory_bytes("flat", 20000, D)
    assert plan_storage("ivfpq", 20000, D, ivfpq)["kind"] == "ivfpq"
    # Enough rows to train PQ: ever smaller codes as the budget shrinks, each one fitting.
    sizes = []
    for budget in (memory_bytes("flat", 20000, D) - 1, 20000 * 42, 20000 * 34, 20000 * 30):
        plan = plan_storage("flat", 20000, D, budget)
        assert plan["storage"] == "ondisk" and plan["memory_bytes"] <= budget
        params = plan["params"]
        sizes.append(D if params["codes"] == "sq8" else params["m"])
    assert sizes == [D, 16, 8, 4]
    # Below every choice: the smallest codes, and a warning.
    with caplog.at_level(logging.WARNING, logger="clipforge.search.vectors"):
        tiny = plan_storage("flat", 20000, D, 1000)
    assert tiny["params"]["m"] == 2 and "more than the budget of 1000" in caplog.text
    # Codes given are kept, whatever the budget.
    assert plan_storage("flat", 20000, D, 1000, {"codes": "sq8"})["params"]["codes"] == "sq8"


# ------------------------------------------------------------------------- searching
def test_ondisk_search_matches_exact_search(data, files) -> None:
    ids, rows, queries = data
    index = VectorIndex.open_ondisk(files, {"nprobe": 32})
    assert index.kind == ONDISK and len(index) == N and index.dim == D
    # The rows stay in the file: a memory map, not a copy.
    assert isinstance(index.vectors, np.memmap) and isinstance(index.ids, np.memmap)
    assert Path(index.vectors.filename).resolve() == files.rows.resolve()
    assert index.params["codes"] == "sq8" and index.params["nlist"] > 1
    scores, found = index.search(queries, 10)
    ref_scores, ref_ids = brute_force(rows, ids, queries, 10)
    assert recall(found, ref_ids) >= 0.95
    assert np.mean(found[:, 0] == ref_ids[:, 0]) >= 0.98
    # Scores are exact inner products with the stored rows.
    position = {int(i): p for p, i in enumerate(ids)}
    exact = np.einsum("qkd,qd->qk", rows[[[position[int(i)] for i in q] for q in found]]
                      .astype(np.float32), queries)
    np.testing.assert_allclose(scores, exact, atol=1e-6, rtol=0)
    same = found == ref_ids
    np.testing.assert_allclose(scores[same], ref_scores[same], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(index.rows(ids[[5, 0]]), rows[[5, 0]].astype(np.float32))
    _, without = index.search(queries[:3], 10, exclude=found[:3, 0])
    assert not np.isin(without, found[:3, 0]).any()


def test_pq_codes_on_disk_and_no_precomputed_table(tmp_path) -> None:
    """A tighter budget gives PQ codes; read back, IVF-PQ keeps its precomputed residual table
    off as built (faiss's reader would compute it: nlist x m x 256 floats, more than the codes)."""
    n, d = 12000, 32
    rows, queries = clustered(n, d, 40, seed=1).astype(np.float16), clustered(40, d, 40, seed=2)
    ids = np.arange(n, dtype=np.int64)
    plan = plan_storage("flat", n, d, n * 40)
    assert plan["params"]["codes"] == "pq"
    files = DiskFiles.named(tmp_path, "pq")
    save_rows(files, chunks(ids, rows), n, d)
    index = VectorIndex.build_ondisk(files, plan["params"])
    assert index.params["codes"] == "pq" and index._ann.precomputed_table.size() == 0
    assert recall(index.search(queries, 10)[1], brute_force(rows, ids, queries, 10)[1]) >= 0.9
    memory = VectorIndex.build(rows, ids, "ivfpq")
    memory.save_ann(tmp_path / "ann.faiss")
    loaded = VectorIndex.load(rows, ids, "ivfpq", tmp_path / "ann.faiss")
    assert loaded._ann.use_precomputed_table == -1 and loaded._ann.precomputed_table.size() == 0


def test_reopened_index_gives_the_same_answers(data, files) -> None:
    _, _, queries = data
    first = VectorIndex.open_ondisk(files)
    again = VectorIndex.open_ondisk(files)
    assert again._ann is not first._ann
    for a, b in zip(first.search(queries, 10), again.search(queries, 10)):
        np.testing.assert_array_equal(a, b)


def test_damaged_or_missing_files_are_named(data, files, tmp_path) -> None:
    for name in ("rows", "ids", "lists"):
        copy = DiskFiles.named(tmp_path, name)
        for source, target in zip(files, copy):
            shutil.copy(source, target)
        path = getattr(copy, name)
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 100)
        with pytest.raises(ValueError, match=rf"{path.name}.*(cut short|rebuild)"):
            VectorIndex.open_ondisk(copy)
        path.unlink()
        with pytest.raises(FileNotFoundError, match=rf"{path.name} is missing: rebuild"):
            VectorIndex.open_ondisk(copy)


def test_rows_are_written_whole_or_not_at_all(data, tmp_path) -> None:
    ids, rows, _ = data
    files = DiskFiles.named(tmp_path, "x")

    def failing():
        yield ids[:1000], rows[:1000]
        raise KeyboardInterrupt  # killed in the middle

    with pytest.raises(KeyboardInterrupt):
        save_rows(files, failing(), N, D)
    assert list(tmp_path.iterdir()) == []  # no half file under any name, no temporary left
    with pytest.raises(ValueError, match="ascending"):
        save_rows(files, [(ids[::-1], rows)], N, D)
    with pytest.raises(ValueError, match="1000 rows given, but 4000 announced"):
        save_rows(files, [(ids[:1000], rows[:1000])], N, D)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- end to end
@pytest.fixture
def generated_images() -> int:
    """40 generated images beside the 8 sample photos in conftest's ``folder``: the tests below
    count on its 48 rows."""
    return 40


def _ondisk_names(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(("ondisk-", ".ondisk")))


def test_build_with_a_small_budget_keeps_rows_on_disk(folder, tmp_path, model) -> None:
    out = tmp_path / "index"
    report = build_index(folder, out, model, progress=False, max_index_memory="4K")
    assert (report.total, report.storage) == (48, "ondisk")
    generation = report.generation
    assert _ondisk_names(out) == sorted(p.name for p in ondisk_files(out, generation))
    store = Store(out)
    info = store.info()
    store.close()
    plan = json.loads(info["storage_plan"])
    assert (info["storage"], info["max_index_memory"]) == ("ondisk", "4096")
    assert (plan["kind"], plan["budget"], plan["params"]["codes"]) == (ONDISK, 4096, "sq8")

    index = SearchIndex.open(out, model)
    assert (index.info["storage"], index.info["searching"]) == ("ondisk", ONDISK)
    assert isinstance(index._state.vectors.vectors, np.memmap)
    exact = SearchIndex.open(out, model, max_index_memory="none")  # reads the rows into memory
    assert exact.info["storage"] == "memory" and exact.info["searching"] == "flat"
    for text in ("a red square", "a cat", "a rocket launch"):
        got = [(h.id, round(h.score, 5)) for h in index.search(text=text, k=10)]
        assert got == [(h.id, round(h.score, 5)) for h in exact.search(text=text, k=10)]
    first = index.search(text="a cat", k=1)[0]
    assert [h.id for h in index.similar(first.id, k=3)] == \
        [h.id for h in exact.similar(first.id, k=3)]

    # An incremental build keeps the recorded budget, writes the new generation's files
    # before its commit, and removes the old ones after it; a reader picks them up.
    for i in range(5):
        Image.new("RGB", (48, 48), (0, 40 * i, 0)).save(folder / f"g{i}.png")
    again = build_index(folder, out, model, progress=False)
    assert (again.total, again.storage, again.generation) == (53, "ondisk", generation + 1)
    assert _ondisk_names(out) == sorted(p.name for p in ondisk_files(out, generation + 1))
    assert index.refresh() and len(index) == 53 and index.info["storage"] == "ondisk"
    # Without a budget the rows go back to memory and the files go away.
    back = build_index(folder, out, model, progress=False, max_index_memory="none")
    assert back.storage == "memory" and _ondisk_names(out) == []
    assert index.refresh() and index.info["storage"] == "memory"


def test_budget_at_open_and_broken_files(folder, tmp_path, model) -> None:
    out = tmp_path / "index"
    build_index(folder, out, model, progress=False)  # no budget: in memory
    with pytest.raises(IndexFormatError, match=r"over the max index memory.*--max-index-memory"):
        SearchIndex.open(out, model, max_index_memory="1K")
    assert SearchIndex.open(out, model, max_index_memory="1G").info["storage"] == "memory"
    report = build_index(folder, out, model, progress=False, max_index_memory="1K")
    files = ondisk_files(out, report.generation)
    index = SearchIndex.open(out, model, max_index_memory="1K")
    assert index.info["storage"] == "ondisk"
    files.lists.unlink()
    with pytest.raises(IndexUnavailableError, match=rf"{files.lists.name} is missing"):
        SearchIndex.open(out, model)
    cut = tmp_path / "cut"
    cut.write_bytes(files.rows.read_bytes()[:1000])
    cut.replace(files.rows)  # (truncating the mapped file itself would crash the reader)
    with pytest.raises(IndexUnavailableError, match=rf"{files.rows.name} is 1000 bytes"):
        SearchIndex.open(out, model)
    assert len(index.search(text="a cat", k=3)) == 3  # opened before: still mapped


def test_interrupted_commit_keeps_the_old_generation(folder, tmp_path, model,
                                                      monkeypatch) -> None:
    out = tmp_path / "index"
    first = build_index(folder, out, model, progress=False, max_index_memory="4K")
    reader = SearchIndex.open(out, model)
    Image.new("RGB", (48, 48), "white").save(folder / "white.png")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if killed after the rows were written, before the commit
    monkeypatch.setattr(build_module.VectorIndex, "build_ondisk", killed)
    with pytest.raises(KeyboardInterrupt):
        build_index(folder, out, model, progress=False)
    monkeypatch.undo()
    assert not reader.refresh() and len(reader) == 48
    assert len(SearchIndex.open(out, model).search(text="white", k=100)) == 48
    resumed = build_index(folder, out, model, progress=False)
    assert (resumed.generation, resumed.total, resumed.embedded) == (first.generation + 1, 49, 0)
    assert _ondisk_names(out) == sorted(p.name for p in ondisk_files(out, resumed.generation))
    assert reader.refresh() and len(reader) == 49


def test_command_line(folder, tmp_path, model, capsys) -> None:
    from clipforge.cli import main

    out, model_file = tmp_path / "index", tmp_path / "tiny.safetensors"
    clipforge.save_model(model, model_file)
    build = ["index", "build", str(folder), "--out", str(out), "--model", str(model_file),
             "--workers", "0", "--no-progress"]
    assert main(build) == 0
    assert "rows on disk" not in capsys.readouterr().out
    assert main([*build, "--max-index-memory", "2K"]) == 0
    assert "rows on disk" in capsys.readouterr().out
    assert main(["index", "info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["storage"] == "ondisk" and json.loads(info["storage_plan"])["budget"] == 2048
    with pytest.raises(SystemExit):
        main(["index", "build", str(folder), "--out", str(out), "--max-index-memory", "lots"])
    assert "memory size 'lots' is not a size" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["search", "IDX", "a cat"], ["serve", "IDX"]])
def test_search_and_serve_pass_the_budget_to_open(command, monkeypatch, capsys) -> None:
    """``clipforge search`` and ``serve`` open the index under ``--max-index-memory`` (an
    index that would hold more is refused at open, tested above); a mistyped size is a usage
    error before anything is opened."""
    from clipforge.cli import main
    from clipforge.commands import search as commands

    seen = {}

    def open_index(path, model=None, **options):
        seen.update(options)
        raise ValueError("stop here")

    monkeypatch.setattr(commands.SearchIndex, "open", open_index)
    assert main([*command, "--max-index-memory", "512M"]) == 2
    assert seen["max_index_memory"] == "512M" and "stop here" in capsys.readouterr().err
    seen.clear()
    with pytest.raises(SystemExit):
        main([*command, "--max-index-memory", "lots"])
    assert not seen and "--max-index-memory" in capsys.readouterr().err

"""clipforge.search.vectors: exact search against numpy, recall and exact re-ranking of the
approximate kinds, persistence of the trained structure, fallbacks and input errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from clipforge.search import vectors as vec
from clipforge.search.vectors import ANN_KINDS, VectorIndex


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around random cluster centres, with a decaying noise spectrum."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((clusters, d)))
    scale = 0.6 * np.arange(1, d + 1) ** -0.5 / np.linalg.norm(np.arange(1, d + 1) ** -0.5)
    noise = rng.standard_normal((n, d)) * scale @ np.linalg.qr(rng.standard_normal((d, d)))[0]
    return unit(centres[rng.integers(0, clusters, n)] + noise)


def gapped_ids(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(10 * n + 100, n, replace=False)).astype(np.int64) + 7


def brute_force(rows: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Reference top-k: numpy float32 scores, ties in row order."""
    scores = np.atleast_2d(q) @ rows.astype(np.float32).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


# --------------------------------------------------------------------------- flat
@pytest.fixture(params=["inline", "split-queries", "split-blocks"])
def block_bytes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flat scan's three ways: small scans in the calling thread; one thread per core on a
    share of the queries (few blocks) or on a run of blocks (many small blocks here)."""
    if request.param != "inline":
        monkeypatch.setattr(vec, "_PARALLEL_BYTES", 0)
    if request.param == "split-blocks":
        monkeypatch.setattr(vec, "_BLOCK_BYTES", 2048)


@pytest.mark.usefixtures("block_bytes")
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_flat_matches_numpy(dtype: type) -> None:
    rng = np.random.default_rng(1)
    n, d = 3000, 32
    rows = unit(rng.standard_normal((n, d))).astype(dtype)
    rows[2500] = rows[10]  # exact ties: the earlier row comes first
    rows[2900] = rows[10]
    ids = gapped_ids(n)
    index = VectorIndex.build(rows, ids)
    assert index.kind == "flat" and len(index) == n and index.dim == d
    assert index.ids is ids and index.vectors.dtype == dtype
    queries = unit(rng.standard_normal((25, d)))  # >= 20 queries: faiss's BLAS path
    queries[3] = rows[10].astype(np.float32)
    for q in (queries[0], queries[:1], queries[:5], queries):
        scores, found = index.search(q, 10)
        ref_scores, ref_ids = brute_force(rows, ids, q, 10)
        assert scores.dtype == np.float32 and found.dtype == np.int64
        assert scores.shape == found.shape == (len(np.atleast_2d(q)), 10)
        np.testing.assert_array_equal(found, ref_ids)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-6, rtol=0)
    _, found = index.search(queries[3], 3)
    np.testing.assert_array_equal(found[0], ids[[10, 2500, 2900]])


def test_flat_pads_when_k_exceeds_n() -> None:
    rows = unit(np.random.default_rng(2).standard_normal((5, 8))).astype(np.float16)
    ids = np.array([3, 9, 10, 40, 41])
    index = VectorIndex.build(rows, ids)
    scores, found = index.search(rows[0].astype(np.float32), 8)
    ref_scores, ref_ids = brute_force(rows, ids, rows[0].astype(np.float32), 5)
    np.testing.assert_array_equal(found[0, :5], ref_ids[0])
    np.testing.assert_allclose(scores[0, :5], ref_scores[0], atol=1e-6)
    assert np.all(found[0, 5:] == -1) and np.all(scores[0, 5:] == -np.inf)
    scores, found = index.search(rows[0], 8, exclude=np.array([3, 9, 10, 40, 41]))
    assert np.all(found == -1) and np.all(scores == -np.inf)


@pytest.mark.usefixtures("block_bytes")
def test_flat_exclude() -> None:
    rng = np.random.default_rng(3)
    rows = unit(rng.standard_normal((500, 16))).astype(np.float16)
    ids = gapped_ids(500)
    index = VectorIndex.build(rows, ids)
    q = rows[:3].astype(np.float32)
    _, top = index.search(q, 5)
    exclude = np.array([top[0, 0], top[1, 2], 123456789])  # one id is not in the index
    scores, found = index.search(q, 5, exclude=exclude)
    keep = ~np.isin(ids, exclude)
    ref_scores, ref_ids = brute_force(rows[keep], ids[keep], q, 5)
    np.testing.assert_array_equal(found, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6)


def test_rows_and_missing_id() -> None:
    rows = unit(np.random.default_rng(4).standard_normal((6, 4))).astype(np.float16)
    ids = np.array([50, 10, 30, 20, 60, 40])  # not sorted: rows() must still find them
    index = VectorIndex.build(rows, ids)
    got = index.rows(np.array([30, 50, 40]))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, rows[[2, 0, 5]].astype(np.float32))
    np.testing.assert_array_equal(index.rows(20), rows[3].astype(np.float32))
    with pytest.raises(KeyError, match="35"):
        index.rows(np.array([10, 35]))
    _, found = index.search(rows[1].astype(np.float32), 1)
    assert found[0, 0] == 10


def test_empty_index() -> None:
    index = VectorIndex.build(np.zeros((0, 8), np.float16), np.zeros(0, np.int64), "hnsw")
    assert index.kind == "flat" and len(index) == 0
    scores, found = index.search(np.ones(8, np.float32), 3)
    assert found.tolist() == [[-1, -1, -1]] and np.all(scores == -np.inf)


# --------------------------------------------------------------------------- approximate
N_ANN, D_ANN = 20_000, 64


@pytest.fixture(scope="module")
def ann_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, VectorIndex]:
    rows = clustered(N_ANN, D_ANN, 50, seed=5).astype(np.float16)
    ids = gapped_ids(N_ANN, seed=5)
    queries = clustered(200, D_ANN, 50, seed=5)  # same centres, fresh noise
    queries = unit(queries + 0.01 * np.random.default_rng(6).standard_normal(queries.shape))
    return rows, ids, queries, VectorIndex.build(rows, ids)


@pytest.fixture(scope="module")
def ann_indexes(ann_data: tuple) -> dict[str, VectorIndex]:
    rows, ids, _, _ = ann_data
    return {kind: VectorIndex.build(rows, ids, kind, seed=1) for kind in ("ivfpq", "hnsw")}


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_ann_recall_and_exact_scores(kind: str, ann_data: tuple, ann_indexes: dict) -> None:
    rows, ids, queries, flat = ann_data
    index = ann_indexes[kind]
    assert index.kind == kind
    if kind == "ivfpq":
        assert index.params["nlist"] == 512 and index.params["m"] == 8  # min(4 sqrt N, N/39)
    _, truth = flat.search(queries, 10)
    scores, found = index.search(queries, 10)
    assert recall(found, truth) >= 0.95
    # re-ranked: every returned score is the exact inner product of its stored row
    exact = np.einsum("qkd,qd->qk", index.rows(found), queries)
    np.testing.assert_allclose(scores, exact, atol=1e-6, rtol=0)
    assert np.all(np.diff(scores, axis=1) <= 0)
    # single queries give the same answers as the batch
    one_scores, one_found = index.search(queries[7], 10)
    np.testing.assert_array_equal(one_found[0], found[7])
    np.testing.assert_array_equal(one_scores[0], scores[7])
    # exclude: the query's own nearest item never comes back
    _, without = index.search(queries[:5], 10, exclude=truth[:5, 0])
    assert not np.isin(without, truth[:5, 0]).any()
    # a larger shortlist cannot lose recall
    _, wide = index.search(queries, 10, shortlist=400)
    assert recall(wide, truth) >= recall(found, truth)


def test_raw_pq_scores_are_not_exact(ann_data: tuple, ann_indexes: dict) -> None:
    """Controls for the checks above: the IVF-PQ scores themselves are approximate, so
    comparing them with exact inner products fails; and without a shortlist wider than k to
    re-rank, recall falls well below the bound."""
    rows, ids, queries, flat = ann_data
    index = ann_indexes["ivfpq"]
    dist, pos = index._ann.search(queries, 10)  # L2 on unit vectors: ip = 1 - dist / 2
    exact = np.einsum("qkd,qd->qk", rows[pos].astype(np.float32), queries)
    assert np.abs((1 - dist / 2) - exact).max() > 1e-3
    _, truth = flat.search(queries, 10)
    _, narrow = index.search(queries, 10, shortlist=10)
    assert recall(narrow, truth) < 0.8


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_save_and_load(kind: str, ann_data: tuple, ann_indexes: dict, tmp_path) -> None:
    rows, ids, queries, _ = ann_data
    index = ann_indexes[kind]
    path = tmp_path / f"{kind}.faiss"
    index.save_ann(path)
    index.save_ann(path)  # overwrites in place
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp files left
    loaded = VectorIndex.load(rows, ids, kind, path)
    assert loaded.kind == kind
    for a, b in zip(index.search(queries, 10), loaded.search(queries, 10)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=f"{path.name}.*rebuild the index"):
        VectorIndex.load(rows[:-1], ids[:-1], kind, path)
    with pytest.raises(ValueError, match=f"{path.name}.*rebuild the index"):
        VectorIndex.load(np.zeros((N_ANN, D_ANN // 2), np.float16), ids, kind, path)
    other = "hnsw" if kind == "ivfpq" else "ivfpq"
    with pytest.raises(ValueError, match=f"{path.name}.*rebuild the index"):
        VectorIndex.load(rows, ids, other, path)
    with pytest.raises(FileNotFoundError):
        VectorIndex.load(rows, ids, kind, tmp_path / "missing.faiss")


def test_flat_save_is_a_no_op(tmp_path) -> None:
    rows = unit(np.random.default_rng(7).standard_normal((20, 8))).astype(np.float16)
    index = VectorIndex.build(rows, np.arange(20))
    index.save_ann(tmp_path / "flat.faiss")
    assert not any(tmp_path.iterdir())
    loaded = VectorIndex.load(rows, np.arange(20), "flat", tmp_path / "flat.faiss")
    for a, b in zip(index.search(rows[:3], 4), loaded.search(rows[:3], 4)):
        np.testing.assert_array_equal(a, b)


def test_tiny_ivfpq_falls_back_to_flat(caplog: pytest.LogCaptureFixture, tmp_path) -> None:
    rows = unit(np.random.default_rng(8).standard_normal((10, 16))).astype(np.float16)
    ids = gapped_ids(10)
    with caplog.at_level(logging.INFO, logger="clipforge.search.vectors"):
        index = VectorIndex.build(rows, ids, "ivfpq")
    assert index.kind == "flat" and "flat" in caplog.text
    scores, found = index.search(rows[:2].astype(np.float32), 12)
    ref_scores, ref_ids = brute_force(rows, ids, rows[:2].astype(np.float32), 10)
    np.testing.assert_array_equal(found[:, :10], ref_ids)
    assert np.all(found[:, 10:] == -1)
    index.save_ann(tmp_path / "tiny.faiss")  # nothing to save; load falls back the same way
    assert VectorIndex.load(rows, ids, "ivfpq", tmp_path / "tiny.faiss").kind == "flat"


def test_too_many_lists_are_reduced(caplog: pytest.LogCaptureFixture) -> None:
    rows = clustered(10_000, 16, 20, seed=9).astype(np.float16)
    with caplog.at_level(logging.WARNING, logger="clipforge.search.vectors"):
        index = VectorIndex.build(rows, np.arange(10_000), "ivfpq", params={"nlist": 1000})
    assert index.kind == "ivfpq" and index.params["nlist"] == 10_000 // 39
    assert "nlist 1000" in caplog.text
    _, found = index.search(rows[:3].astype(np.float32), 5)
    assert found[:, 0].tolist() == [0, 1, 2]


def test_small_hnsw_and_norm_warning(caplog: pytest.LogCaptureFixture) -> None:
    rows = unit(np.random.default_rng(11).standard_normal((50, 8)))
    with caplog.at_level(logging.WARNING, logger="clipforge.search.vectors"):
        index = VectorIndex.build(2 * rows, np.arange(50), "hnsw")  # no fallback for hnsw
    assert index.kind == "hnsw" and "not unit norm" in caplog.text
    scores, found = index.search(rows[:4], 3)
    ref_scores, ref_ids = brute_force(2 * rows, np.arange(50), rows[:4], 3)
    np.testing.assert_array_equal(found, ref_ids)  # 50 rows: the shortlist holds them all
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6)


def test_bad_input() -> None:
    rows = unit(np.random.default_rng(10).standard_normal((4, 8))).astype(np.float16)
    ids = np.arange(4)
    with pytest.raises(ValueError, match="unknown index kind 'annoy'"):
        VectorIndex.build(rows, ids, "annoy")
    with pytest.raises(ValueError, match="4 vectors but 3 ids"):
        VectorIndex.build(rows, ids[:3])
    with pytest.raises(ValueError, match="2-D"):
        VectorIndex.build(rows[0], ids[:1])
    with pytest.raises(ValueError, match="float16 or float32"):
        VectorIndex.build(rows.astype(np.float64), ids)
    with pytest.raises(ValueError, match="unique"):
        VectorIndex.build(rows, np.array([1, 2, 2, 3]))
    with pytest.raises(ValueError, match="unknown index params"):
        VectorIndex.build(rows, ids, params={"nprobes": 4})
    for dtype in (np.float16, np.float32):
        bad = rows.astype(dtype)
        bad[2, 5] = np.nan
        with pytest.raises(ValueError, match="NaN or infinite.*id 2"):
            VectorIndex.build(bad, ids)
        bad[2, 5] = np.inf
        with pytest.raises(ValueError, match="NaN or infinite"):
            VectorIndex.build(bad, ids, "ivfpq")
    index = VectorIndex.build(rows, ids)
    with pytest.raises(ValueError, match=r"\(Q, 8\)"):
        index.search(np.ones(7, np.float32), 2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.search(np.full(8, np.inf, np.float32), 2)
    with pytest.raises(ValueError, match="positive integer"):
        index.search(rows[0], 0)
    assert ANN_KINDS == ("flat", "ivfpq", "hnsw")

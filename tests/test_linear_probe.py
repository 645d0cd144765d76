"""The linear probe on synthetic Gaussian clusters: separable and overlapping classes, the C
sweep on its own, few-shot curves, determinism and input checks. Small data: fast."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from clipforge.evaluation import linear_probe as lp
from clipforge.evaluation.linear_probe import few_shot_probe, linear_probe


@pytest.fixture(autouse=True)
def one_blas_thread():
    """These fits are tiny: one BLAS thread is faster, and a second one that spin-waits on a
    shared CPU made them 20 times slower."""
    with threadpool_limits(1):
        yield


def clusters(separation: float, n: int = 300, dim: int = 16, classes: int = 10, seed: int = 0
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and test sets drawn around the same class centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * separation
    y = np.arange(n) % classes
    train = centres[y] + rng.normal(size=(n, dim))
    test = centres[y] + rng.normal(size=(n, dim))
    return train.astype(np.float32), y, test.astype(np.float32), y.copy()


def interior(c: float) -> bool:
    return 10 ** lp.LOG10_C_MIN < c < 10 ** lp.LOG10_C_MAX


def test_separable_classes_reach_100_percent() -> None:
    x, y, tx, ty = clusters(3.0)
    result = linear_probe(x, y, tx, ty)
    assert result["metrics"] == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}
    # Every C is perfect on validation: the middle of that plateau, not an end of the range.
    assert result["C"] == pytest.approx(1.0)
    assert result["fits"] == len(result["sweep"]) + 1 <= 16
    assert (result["n_train"], result["n_val"], result["n_test"]) == (240, 60, 300)


def test_overlapping_classes_between_chance_and_perfect() -> None:
    x, y, tx, ty = clusters(0.5)
    result = linear_probe(x, y, tx, ty)
    assert 0.3 < result["metrics"]["acc1"] < 0.9  # chance is 0.1
    assert result["metrics"]["acc1"] < result["metrics"]["acc5"] < 1.0
    assert interior(result["C"])
    assert result["val_acc1"] == max(row["val_acc1"] for row in result["sweep"])
    # the sweep covers the range coarsely and the chosen C finely
    tried = sorted(math.log10(row["C"]) for row in result["sweep"])
    assert tried[0] == pytest.approx(-6) and tried[-1] == pytest.approx(6)
    assert min(abs(t - math.log10(result["C"])) for t in tried
               if abs(t - math.log10(result["C"])) > 1e-9) == pytest.approx(0.125)


def lattice_index(c: float) -> int:
    return round((math.log10(c) - lp.LOG10_C_MIN) * lp.STEPS_PER_DECADE)


@pytest.mark.parametrize("right_slope", [1, 7])
def test_sweep_finds_the_lattice_optimum(right_slope: int) -> None:
    for peak in range(97):
        calls = []

        def evaluate(c: float, peak: int = peak, calls: list = calls) -> tuple[float, float]:
            calls.append(c)
            i = lattice_index(c)  # strictly unimodal in log C, symmetric or not
            return 1.0 - (peak - i if i < peak else right_slope * (i - peak)) / 1000, 0.0

        chosen, table = lp._sweep(evaluate)
        assert lattice_index(chosen) == peak
        assert len(calls) == len(set(calls)) == len(table) <= 15


def test_sweep_takes_the_middle_of_a_plateau() -> None:
    def evaluate(c: float) -> tuple[float, float]:
        # perfect on [1e-1, 1e4]; the log-loss alone would pick 1e4, the plateau's edge
        return (1.0 if 1e-1 <= c <= 1e4 else 0.5), -math.log10(c)

    chosen, _ = lp._sweep(evaluate)
    assert 1e0 <= chosen <= 1e3


def test_sweep_breaks_remaining_ties_by_log_loss() -> None:
    def evaluate(c: float) -> tuple[float, float]:
        # two single-point peaks of equal accuracy, at 1e-4 and 1e4: the lower loss wins
        i = lattice_index(c)
        return (0.9 if i in (16, 80) else 0.5), (0.1 if i == 80 else 0.2)

    chosen, _ = lp._sweep(evaluate)
    assert chosen == pytest.approx(1e4)


def test_same_seed_same_result_and_torch_input() -> None:
    x, y, tx, ty = clusters(0.7, seed=3)
    first = linear_probe(x, y, tx, ty, seed=5)
    assert linear_probe(x, y, tx, ty, seed=5) == first
    assert linear_probe(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(tx),
                        torch.from_numpy(ty), seed=5) == first
    other = linear_probe(x, y, tx, ty, seed=6)
    assert other["n_val"] == first["n_val"]  # same split sizes, other members


def test_explicit_validation_set_and_fixed_c() -> None:
    x, y, tx, ty = clusters(0.7, seed=4)
    result = linear_probe(x[:200], y[:200], tx, ty, x[200:], y[200:])
    assert (result["n_train"], result["n_val"]) == (200, 100)
    fixed = linear_probe(x[:200], y[:200], tx, ty, x[200:], y[200:], C=result["C"])
    assert fixed["fits"] == 1 and "sweep" not in fixed
    assert fixed["metrics"] == result["metrics"]  # the same final refit on train + val
    whole = linear_probe(x, y, tx, ty, C=result["C"])  # no validation set: no split either
    assert (whole["n_train"], whole["n_val"], whole["metrics"]) == (300, 0, fixed["metrics"])


def test_labels_need_not_be_contiguous_and_two_classes_work() -> None:
    x, y, tx, ty = clusters(1.5, classes=2, n=120)
    codes = np.array([7, 42])
    result = linear_probe(x, codes[y], tx, codes[ty])
    assert result["metrics"]["acc1"] > 0.8
    assert math.isnan(result["metrics"]["acc5"])  # CLIP_benchmark: no acc5 under 5 classes


def test_few_shot_improves_with_k() -> None:
    x, y, tx, ty = clusters(0.5)
    result = few_shot_probe(x, y, tx, ty, shots=(1, 2, 4, 8, 16), seeds=(0, 1, 2))
    assert list(result) == [1, 2, 4, 8, 16]
    acc = [result[k]["metrics"]["acc1"] for k in result]
    assert acc[0] < acc[2] < acc[4]  # 1 < 4 < 16 shots, on average over seeds
    assert np.mean(np.diff(acc)) > 0
    assert all(0.1 < a < 0.9 for a in acc)
    for k, entry in result.items():
        runs = entry["runs"]
        assert [run["seed"] for run in runs] == [0, 1, 2]
        assert entry["metrics"]["acc1"] == pytest.approx(np.mean([r["metrics"]["acc1"]
                                                                  for r in runs]))
        assert entry["std"]["acc1"] == pytest.approx(np.std([r["metrics"]["acc1"] for r in runs],
                                                            ddof=1))
        assert all(interior(run["C"]) or k > 1 for run in runs)
        if k == 1:
            assert all(run["fits"] == 1 and run["selection"].startswith("fixed") for run in runs)
        else:
            assert all("cross-validation" in run["selection"] for run in runs)


def test_few_shot_is_deterministic_and_draws_nest() -> None:
    x, y, tx, ty = clusters(0.6, seed=2)
    first = few_shot_probe(x, y, tx, ty, shots=(1, 4), seeds=(0, 1))
    assert few_shot_probe(x, y, tx, ty, shots=(1, 4), seeds=(0, 1)) == first
    one, _ = lp._draw(y, 10, 1, seed=0)
    four, _ = lp._draw(y, 10, 4, seed=0)
    assert set(one) < set(four)
    assert np.bincount(y[four]).tolist() == [4] * 10


def test_few_shot_with_a_validation_set() -> None:
    x, y, tx, ty = clusters(0.6, seed=5)
    result = few_shot_probe(x[:200], y[:200], tx, ty, shots=(1, 2), seeds=(0,),
                            val_x=x[200:], val_y=y[200:])
    assert all(run["selection"] == "validation set" for k in result
               for run in result[k]["runs"])
    assert result[1]["std"]["acc1"] == 0.0  # one seed


def test_one_shot_c_ignores_feature_scale() -> None:
    x, y, tx, ty = clusters(0.6, seed=6)
    small = few_shot_probe(x, y, tx, ty, shots=(1,), seeds=(0,))
    large = few_shot_probe(x * 100, y, tx * 100, ty, shots=(1,), seeds=(0,))
    assert large[1]["metrics"] == pytest.approx(small[1]["metrics"])
    assert large[1]["runs"][0]["C"] == pytest.approx(small[1]["runs"][0]["C"] / 1e4)


def test_bad_input() -> None:
    x, y, tx, ty = clusters(1.0, n=60)
    with pytest.raises(ValueError, match="at least 2"):
        linear_probe(x, np.zeros(60, dtype=int), tx, ty)
    with pytest.raises(ValueError, match="59 training labels for 60"):
        linear_probe(x, y[:59], tx, ty)
    with pytest.raises(ValueError, match="dimension"):
        linear_probe(x, y, tx[:, :5], ty)
    bad = x.copy()
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite.*row 7"):
        linear_probe(bad, y, tx, ty)
    with pytest.raises(ValueError, match="integer"):
        linear_probe(x, y.astype(float), tx, ty)
    with pytest.raises(ValueError, match=r"test labels \[99\]"):
        linear_probe(x, y, tx, np.where(ty == 3, 99, ty))
    lonely = y.copy()
    lonely[0] = 77  # a class with one training sample cannot be split
    with pytest.raises(ValueError, match="class 77 has 1 training sample"):
        linear_probe(x, lonely, tx, ty)
    with pytest.raises(ValueError, match="both val_x and val_y"):
        linear_probe(x, y, tx, ty, val_x=x)
    short = np.concatenate([y[y != 4], y[y == 4][:3]])
    with pytest.raises(ValueError, match="class 4 has 3 training samples, fewer than k=6"):
        few_shot_probe(x[: len(short)], short, tx, ty, shots=(1, 6))
    with pytest.raises(ValueError, match="shots"):
        few_shot_probe(x, y, tx, ty, shots=(0,))

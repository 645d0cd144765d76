"""Effective robustness on the built-in suites: the probes, the comparison, the supervised
baseline's fairness (same images, same augmentation), and the run's report and plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clipforge.data import synthetic
from clipforge.data.captions import LANGUAGES
from clipforge.evaluation import robustness as rb
from clipforge.image.augment import TrainTransform
from clipforge.training import baseline, report
from clipforge.training.config import TrainConfig
from clipforge.training.data import TrainingSamples


def clusters(n_per_class: int, classes: int = 6, dim: int = 16, spread: float = 0.3,
             seed: int = 0) -> rb.Labelled:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    features = centres[labels] + spread * torch.randn(len(labels), dim, generator=generator)
    return rb.Labelled(features, labels)


def test_probe_learns_separable_classes_and_is_deterministic() -> None:
    pool, test = clusters(30), clusters(20, seed=1)
    first = rb.probe(pool, {"seen": test, "other": clusters(10, spread=3.0, seed=2)}, 6)
    again = rb.probe(pool, {"seen": test, "other": clusters(10, spread=3.0, seed=2)}, 6)
    assert first == again
    assert first["seen"] == 1.0 and first["other"] < first["seen"]
    assert first["decay"] in rb.PROBE_DECAYS


def test_few_shot_improves_with_k_and_draws_nested_samples() -> None:
    pool, test = clusters(16, spread=1.2), clusters(30, spread=1.2, seed=3)
    curve = rb.few_shot(pool, test, 6, 1e-3, shots=(1, 4, 16), seeds=(0, 1))
    assert curve["shots"] == [1, 4, 16] and len(curve["top1"]) == 3
    assert curve["top1"][0] < curve["top1"][2]
    assert curve == rb.few_shot(pool, test, 6, 1e-3, shots=(1, 4, 16), seeds=(0, 1))
    with pytest.raises(ValueError, match="fewer than"):
        rb.few_shot(pool, test, 6, 1e-3, shots=(32,), seeds=(0,))


def test_effective_robustness_is_the_drop_from_seen_to_the_shift_mean() -> None:
    result = rb.effective_robustness({"seen": 0.9, "a": 0.8, "b": 0.6, "heldout": 0.1},
                                     ["a", "b"])
    assert result["in_distribution"] == 0.9 and result["shift_mean"] == pytest.approx(0.7)
    assert result["drop"] == pytest.approx(0.2)
    assert result["relative_drop"] == pytest.approx(0.2 / 0.9)


def test_binding_negatives_swap_the_colours() -> None:
    pairs = [(("red", "circle"), ("blue", "star"))]
    assert report.binding_captions("en", pairs) == (["a red circle and a blue star"],
                                                    ["a blue circle and a red star"])
    assert report.binding_captions("ru", pairs) == (["красный круг и синяя звезда"],
                                                    ["синий круг и красная звезда"])
    assert report.binding_captions("zh", pairs) == (["一个红色的圆形和一颗蓝色的星星"],
                                                    ["一个蓝色的圆形和一颗红色的星星"])


def test_baseline_sees_the_images_and_crops_of_the_contrastive_run(tiny_rn) -> None:
    """Sample i of the supervised baseline is sample i of the CLIP run: same scene, same
    augmentation; only the target differs (the class of each object kind)."""
    transform = TrainTransform.from_config(tiny_rn.config)
    size = tiny_rn.config.image_size
    contrastive = TrainingSamples(synthetic.SyntheticCaptions(seed=5, image_size=size),
                                  transform, tiny_rn.tokenizer, seed=5)
    labelled = baseline.LabelledScenes(5, transform, size)
    for index in (0, 3, 257):
        pixels, _, skipped, _ = contrastive[index]
        same, target = labelled[index]
        assert not skipped and torch.equal(pixels, same)
        objects = synthetic.render_scene(index, 5, size).objects
        kinds = {synthetic.class_index(o["colour"], o["shape"]) for o in objects}
        assert set(torch.nonzero(target).flatten().tolist()) == kinds
        assert target.sum().item() == pytest.approx(1.0)


def test_baseline_trains_and_joins_the_runs_robustness_plot(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(report.EVAL_IMAGES_ENV, "40")
    config = TrainConfig(output=tmp_path / "run", model="tiny-rn", steps=3, batch_size=8,
                         warmup=1, workers=0, precision="fp32", progress=False)
    result = baseline.train_baseline(config)
    folder = tmp_path / "run" / report.BASELINE_DIR
    assert set(result["eval"]["top1"]) == set(synthetic.SUITES)
    assert json.loads((folder / "eval.json").read_text())["eval"]["top1"] == \
        result["eval"]["top1"]
    assert (folder / "classifier.safetensors").is_file()
    assert report.read_baseline(tmp_path / "run") == result["eval"]["top1"]
    assert not (tmp_path / "run" / "robustness.png").exists()  # no CLIP run there yet
    with pytest.raises(ValueError, match="built-in"):
        baseline.train_baseline(TrainConfig(output=tmp_path / "x", data="pairs.csv"))


def test_run_report_has_every_figure_per_language(tiny_vit, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(report.EVAL_IMAGES_ENV, "40")
    monkeypatch.setenv(report.PROBE_PER_CLASS_ENV, "2")
    result = report.evaluate_run(tiny_vit, seed=0, baseline={s: 0.5 for s in synthetic.SUITES})
    for language in LANGUAGES:
        assert set(result["zero_shot"][language]) == set(synthetic.SUITES)
        for scores in result["zero_shot"][language].values():
            assert {"top1", "top5", "one_prompt_top1"} <= set(scores)
        assert set(result["binding"][language]) == {"image_acc", "text_acc", "acc"}
        assert "text_retrieval_recall@1" in result["retrieval"][language]
        assert f"zero-shot ({language})" in result["robustness"]["accuracy"]
    assert result["few_shot"]["shots"] == [1, 2]
    effective = result["robustness"]["effective_robustness"]
    assert effective["supervised (same tower, cross-entropy)"]["drop"] == pytest.approx(0.0)
    text = report.format_table(result)
    assert "held-out compositions" in text and "Chinese" in text and "supervised" in text
    table = report.write_robustness(tmp_path, result, None)
    assert (tmp_path / "robustness.png").stat().st_size > 1000
    assert "supervised (same tower, cross-entropy)" not in table["accuracy"]
    rb.plot_few_shot(result["few_shot"], result["few_shot"]["zero_shot"], tmp_path / "k.png",
                     "k-shot")
    assert (tmp_path / "k.png").stat().st_size > 1000
    json.dumps(result)  # eval.json holds it as it is


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_evaluation_sizes_are_checked(monkeypatch, value) -> None:
    monkeypatch.setenv(report.EVAL_IMAGES_ENV, value)
    with pytest.raises(ValueError, match=report.EVAL_IMAGES_ENV):
        report.evaluate_run(None, 0)


def test_machine_is_recorded() -> None:
    info = report.machine()
    assert info["cpu"] and info["cores"] >= 1 and info["torch"] == torch.__version__
    assert np.datetime64(info["date"])

"""``clipforge finetune``'s other methods and options: FLYP, Tip-Adapter (training-free and -F),
layer-wise learning-rate decay, freezing a tower and fine-tuning at a new resolution."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import clipforge
import test_finetune
from clipforge.classifier import CacheClassifier, LinearClassifier
from clipforge.cli import main
from clipforge.evaluation.zeroshot import ZeroShotClassifier
from clipforge.inference import embed_images
from clipforge.model.resize import resample_positions, with_image_size
from clipforge.training.finetune.config import GENERIC_TEMPLATES
from clipforge.training.finetune.layer_decay import layer_scales, level
from clipforge.training.finetune.loop import Tuned, finetune
from clipforge.training.finetune.tip_adapter import build_cache, search
from clipforge.training.optim import build_optimizer
from test_finetune import COLOURS, config

# the same module-scoped fixtures as test_finetune: its colour folder and tiny ViT
folder, model_dir = test_finetune.folder, test_finetune.model_dir


def _paths(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*.png"))


def _vectors(model: clipforge.CLIP, paths: list[str]) -> torch.Tensor:
    return torch.from_numpy(embed_images(model, paths, progress=False).vectors)


def _text_tensors(model: clipforge.CLIP) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}


# --------------------------------------------------------------------------- FLYP


@pytest.fixture(scope="module")
def flyp_run(folder, model_dir, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("runs") / "flyp"
    return output, finetune(config(folder, output, model_dir, method="flyp",
                                   wise_ft=(0.0, 1.0)))


def test_flyp_trains_both_towers_and_beats_the_zero_shot_start(flyp_run, model_dir) -> None:
    output, record = flyp_run
    assert record["zero_shot"]["val_acc1"] < 0.9 and record["fine_tuned"]["val_acc1"] == 1.0
    tuned = clipforge.create_model(output / "wise-ft" / "alpha-1")
    start = clipforge.create_model(model_dir)
    for part in ("visual.conv1.weight", "transformer.resblocks.0.mlp.c_fc.weight",
                 "text_projection"):
        assert not torch.equal(tuned.state_dict()[part], start.state_dict()[part]), part


def test_flyp_head_is_the_zero_shot_head_of_its_towers(flyp_run) -> None:
    """No head is trained: the saved one is what the fine-tuned towers give zero-shot."""
    output, _ = flyp_run
    for path in (output / "wise-ft" / "alpha-1", output / "wise-ft" / "alpha-0"):
        model = clipforge.create_model(path)
        rebuilt = ZeroShotClassifier.build(model, list(COLOURS), list(GENERIC_TEMPLATES))
        expected = LinearClassifier.from_zeroshot(rebuilt)
        assert torch.allclose(model.classifier.weight, expected.weight, atol=1e-5), path
        assert torch.equal(model.classifier.bias, torch.zeros(len(COLOURS)))


def test_flyp_wise_ft_at_zero_is_the_whole_zero_shot_model(flyp_run, model_dir) -> None:
    output, _ = flyp_run
    at_zero = clipforge.create_model(output / "wise-ft" / "alpha-0")
    for key, value in clipforge.create_model(model_dir).state_dict().items():
        assert torch.equal(at_zero.state_dict()[key], value), key


def test_flyp_can_freeze_the_text_tower(folder, model_dir, tmp_path) -> None:
    finetune(config(folder, tmp_path / "run", model_dir, method="flyp", freeze="text",
                    epochs=1))
    tuned, start = clipforge.create_model(tmp_path / "run"), clipforge.create_model(model_dir)
    moved = {k for k, v in _text_tensors(start).items()
             if not torch.equal(_text_tensors(tuned)[k], v)}
    assert moved == {"logit_scale"}  # the temperature still learns
    assert not torch.equal(tuned.visual.conv1.weight, start.visual.conv1.weight)


def test_flyp_fine_tunes_a_sigmoid_loss_model_with_its_own_loss(folder, tmp_path) -> None:
    """A SigLIP model trains with its sigmoid loss and bias, and its temperature, above the
    softmax models' bound of 100, is not cut down."""
    from conftest import perturb

    torch.manual_seed(0)
    start = perturb(clipforge.create_model("tiny-siglip"), seed=7)
    with torch.no_grad():
        start.logit_scale.fill_(math.log(117.0))  # like a pretrained SigLIP's
    clipforge.save_model(start, tmp_path / "siglip")
    finetune(config(folder, tmp_path / "run", tmp_path / "siglip", method="flyp", epochs=1,
                    lr=1e-5, freeze="image"))
    tuned = clipforge.create_model(tmp_path / "run")
    assert float(tuned.logit_bias) != float(start.logit_bias)
    assert abs(float(tuned.logit_scale) - math.log(117.0)) < 0.01
    assert torch.equal(tuned.visual.conv1.weight, start.visual.conv1.weight)


def test_freeze_and_layer_decay_are_refused_where_they_would_be_ignored(folder, model_dir,
                                                                        tmp_path) -> None:
    with pytest.raises(ValueError, match="--freeze chooses which tower --method flyp"):
        config(folder, tmp_path, model_dir, freeze="text").validate()
    with pytest.raises(ValueError, match="--layer-decay scales the rates"):
        config(folder, tmp_path, model_dir, method="linear", layer_decay=0.5).validate()
    with pytest.raises(ValueError, match=r"--layer-decay must lie in \(0, 1\]"):
        config(folder, tmp_path, model_dir, layer_decay=1.5).validate()


# --------------------------------------------------------------------------- Tip-Adapter


@pytest.fixture(scope="module")
def tip_run(folder, model_dir, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("runs") / "tip"
    return output, finetune(config(folder, output, model_dir, method="tip-adapter", epochs=None,
                                   lr=None))


def test_tip_adapter_caches_the_training_images_and_leaves_the_model(tip_run, model_dir,
                                                                      folder) -> None:
    output, record = tip_run
    assert record["zero_shot"]["val_acc1"] < 0.9 and record["fine_tuned"]["val_acc1"] == 1.0
    model, start = clipforge.create_model(output), clipforge.create_model(model_dir)
    for key, value in start.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    cache = model.classifier
    assert isinstance(cache, CacheClassifier) and len(cache.labels) == record["n_train"] == 21
    assert record["tip_adapter"] == {"alpha": cache.alpha, "beta": cache.beta, "cache_size": 21}
    # the keys are the unit embeddings of the 21 training images, each with its folder's class
    vectors = _vectors(start, _paths(folder))
    labels = torch.tensor([list(COLOURS).index(Path(p).parent.name) for p in _paths(folder)])
    similarity = cache.keys @ vectors.t()
    match = similarity.argmax(dim=1)
    assert torch.allclose(similarity.max(dim=1).values, torch.ones(21), atol=1e-5)
    assert torch.equal(labels[match], cache.labels)


def test_a_cache_model_is_a_model_for_every_command(tip_run, folder, tmp_path, capsys) -> None:
    """eval, index build and export read the run directory as a plain CLIP; classify uses
    the cache."""
    output, _ = tip_run
    assert main(["classify", str(folder / "green" / "1.png"), "--model", str(output),
                 "--json"]) == 0
    import json

    best = json.loads(capsys.readouterr().out)["results"][0]["predictions"][0]["label"]
    assert best == "green"
    assert main(["eval", str(folder), "--model", str(output), "--output",
                 str(tmp_path / "eval.json")]) == 0
    assert main(["index", "build", str(folder), "--model", str(output), "--out",
                 str(tmp_path / "index"), "--no-progress"]) == 0
    assert main(["export", "onnx", str(output), "--out", str(tmp_path / "onnx")]) == 0


def test_tip_adapter_logits_are_the_papers_formula(tip_run, folder) -> None:
    output, _ = tip_run
    model = clipforge.create_model(output)
    cache = model.classifier
    image = F.normalize(_vectors(model, _paths(folder)), dim=-1)
    one_hot = F.one_hot(cache.labels, len(COLOURS)).float()
    expected = (image @ cache.weight.t() + cache.bias
                + cache.alpha * torch.exp(-cache.beta * (1 - image @ cache.keys.t())) @ one_hot)
    assert torch.allclose(cache.logits(image), expected, atol=1e-5)


def test_tip_adapter_search_finds_the_cache_weight_a_useless_head_needs() -> None:
    """A head that knows nothing (zero weights) classifies by the cache alone: the search must
    give the cache a weight and reach what nearest-neighbour voting reaches."""
    generator = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, 16, generator=generator), dim=-1)
    train = F.normalize(centres.repeat(4, 1) + 0.1 * torch.randn(12, 16, generator=generator),
                        dim=-1)
    val = F.normalize(centres.repeat(2, 1) + 0.1 * torch.randn(6, 16, generator=generator),
                      dim=-1)
    targets = torch.arange(3).repeat(4)
    head = LinearClassifier(torch.zeros(3, 16), torch.tensor([0.0, 0.0, 1.0]), ["a", "b", "c"])
    chosen, accuracy = search(build_cache(head, train, targets), val, torch.arange(3).repeat(2))
    assert accuracy == 1.0 and chosen.alpha > 0.5  # the bias alone would answer "c"
    assert head.predict(val).tolist() == [2] * 6


def test_tip_adapter_f_trains_the_keys_alone(folder, model_dir, tmp_path) -> None:
    record = finetune(config(folder, tmp_path / "run", model_dir, method="tip-adapter-f",
                             lr=None, epochs=5))
    free = finetune(config(folder, tmp_path / "free", model_dir, method="tip-adapter",
                           epochs=None, lr=None))
    trained = clipforge.create_model(tmp_path / "run").classifier
    plain = clipforge.create_model(tmp_path / "free").classifier
    assert torch.equal(trained.labels, plain.labels) and torch.equal(trained.weight, plain.weight)
    assert not torch.allclose(trained.keys, plain.keys)
    assert record["fine_tuned"]["val_acc1"] >= free["zero_shot"]["val_acc1"]


def test_tip_adapter_refuses_training_options(folder, model_dir, tmp_path, capsys) -> None:
    with pytest.raises(ValueError, match="tip-adapter trains nothing, so --epochs"):
        config(folder, tmp_path, model_dir, method="tip-adapter", lr=None).validate()
    assert main(["finetune", str(folder), "--model", str(model_dir), "--method",
                 "tip-adapter-f", "--wise-ft", "0,1", "--output", str(tmp_path / "r")]) == 2
    assert "--method tip-adapter-f leaves the towers as they are" in capsys.readouterr().err


# --------------------------------------------------------------------------- layer decay


def test_layer_levels_of_the_towers() -> None:
    vit = dict.fromkeys(("visual.conv1.weight", "visual.class_embedding", "visual.ln_pre.bias",
                         "visual.positional_embedding", "token_embedding.weight",
                         "positional_embedding"), 0)
    vit |= {"visual.transformer.resblocks.0.attn.in_proj_weight": 1,
            "visual.transformer.resblocks.11.mlp.c_fc.weight": 12,
            "transformer.resblocks.2.ln_1.weight": 3, "visual.proj": 13, "visual.ln_post.bias": 13,
            "head.weight": 13, "ln_final.weight": 13, "text_projection": 13, "logit_scale": 13,
            "model.visual.transformer.resblocks.4.ln_2.bias": 5}
    for name, expected in vit.items():
        assert level(name, 12, 12)[0] == expected, name
    resnet = {"visual.conv1.weight": 0, "visual.bn3.bias": 0, "visual.layer1.0.conv1.weight": 1,
              "visual.layer4.2.bn3.weight": 4, "visual.attnpool.positional_embedding": 5,
              "visual.attnpool.c_proj.weight": 5}
    for name, expected in resnet.items():
        assert level(name, 4, 12) == (expected, 4), name


def test_layer_decay_sets_each_parameters_rate(model_dir) -> None:
    model = clipforge.create_model(model_dir)
    head = LinearClassifier(torch.zeros(3, model.config.embed_dim), torch.zeros(3), list(COLOURS))
    tuned = Tuned(head, model.visual)
    depth = len(model.visual.transformer.resblocks)
    optimizer = build_optimizer(tuned, 1e-3, 0.1, lr_scale=layer_scales(tuned, 0.5))
    rate = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert math.isclose(rate[id(tuned.head.weight)], 1e-3)
    assert math.isclose(rate[id(model.visual.conv1.weight)], 1e-3 * 0.5 ** (depth + 1))
    block = model.visual.transformer.resblocks[depth - 1].mlp.c_fc.weight
    assert math.isclose(rate[id(block)], 1e-3 * 0.5)
    plain = build_optimizer(tuned, 1e-3, 0.1)
    assert {g["lr"] for g in plain.param_groups} == {1e-3}
    assert sum(len(g["params"]) for g in plain.param_groups) == len(rate)


# --------------------------------------------------------------------------- resolution


def test_position_resampling_matches_open_clip(model_dir) -> None:
    from families import open_clip

    resize_pos_embed = open_clip().model.resize_pos_embed

    class Visual:
        grid_size = (5, 5)

    class Model:
        visual = Visual()

    table = torch.randn(1 + 4 * 4, 8, generator=torch.Generator().manual_seed(0))
    state = {"visual.positional_embedding": table.clone()}
    resize_pos_embed(state, Model())
    assert torch.equal(resample_positions(table, 5, prefix=1),
                       state["visual.positional_embedding"])


def test_a_model_at_a_new_resolution(model_dir, folder) -> None:
    model = clipforge.create_model(model_dir)
    size = model.config.image_size
    assert with_image_size(model, size) is model
    patch = model.config.vision.patch_size
    larger = with_image_size(model, size + 2 * patch)
    assert larger.config.image_size == larger.preprocess.image_size == size + 2 * patch
    assert larger.visual.positional_embedding.shape[0] == ((size + 2 * patch) // patch) ** 2 + 1
    assert torch.equal(larger.visual.conv1.weight, model.visual.conv1.weight)
    vectors = _vectors(larger, _paths(folder)[:2])
    assert vectors.shape == (2, model.config.embed_dim) and torch.isfinite(vectors).all()
    with pytest.raises(ValueError, match=f"not a multiple of this model's patch size {patch}"):
        with_image_size(model, size + 1)


def test_a_resnet_at_a_new_resolution() -> None:
    from conftest import seeded_model

    model = seeded_model("tiny-rn", seed=2)
    larger = with_image_size(model, model.config.image_size + 32)
    grid = larger.config.image_size // 32
    assert larger.visual.attnpool.positional_embedding.shape[0] == grid * grid + 1
    pixels = torch.zeros(1, 3, larger.config.image_size, larger.config.image_size)
    assert larger.encode_image(pixels).shape == (1, model.config.embed_dim)


def test_fine_tuning_at_a_new_resolution_saves_that_model(folder, model_dir, tmp_path) -> None:
    start = clipforge.create_model(model_dir)
    size = start.config.image_size + 2 * start.config.vision.patch_size
    record = finetune(config(folder, tmp_path / "run", model_dir, epochs=1, image_size=size,
                             wise_ft=(0.0, 1.0)))
    assert record["image_size"] == size
    for path in (tmp_path / "run", tmp_path / "run" / "wise-ft" / "alpha-0"):
        model = clipforge.create_model(path)
        assert model.config.image_size == model.preprocess.image_size == size
    at_zero = clipforge.create_model(tmp_path / "run" / "wise-ft" / "alpha-0")
    resized = with_image_size(start, size)
    for key, value in resized.state_dict().items():
        assert torch.equal(at_zero.state_dict()[key], value), key
    with pytest.raises(ValueError, match="--image-size fine-tunes at a new resolution"):
        config(folder, tmp_path, model_dir, method="linear", image_size=size).validate()


# --------------------------------------------------------------------------- resume


class Interrupted(Exception):
    pass


def _interrupt_at_epoch(monkeypatch, epoch: int) -> None:
    """Stop the run while it validates ``epoch`` (after the previous epoch's checkpoint)."""
    from clipforge.training.loop import MetricsLog

    write = MetricsLog.write

    def failing(self, record):
        if record.get("epoch") == epoch and "val_acc1" in record:
            raise Interrupted
        write(self, record)
    monkeypatch.setattr(MetricsLog, "write", failing)


@pytest.mark.parametrize(("method", "precision"), [("full", "fp16"), ("flyp", "fp32")])
def test_a_resumed_run_ends_exactly_as_an_uninterrupted_one(method, precision, folder, model_dir,
                                                             tmp_path, monkeypatch) -> None:
    """(fp16: its loss scaler's state is resumed too.)"""
    settings = {"method": method, "epochs": 3, "precision": precision}
    finetune(config(folder, tmp_path / "whole", model_dir, **settings))
    with monkeypatch.context() as patch:
        _interrupt_at_epoch(patch, 3)
        with pytest.raises(Interrupted):
            finetune(config(folder, tmp_path / "run", model_dir, **settings))
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000006.pt"]
    record = finetune(config(folder, tmp_path / "run", model_dir, resume=True, **settings))
    whole, resumed = (clipforge.create_model(tmp_path / d) for d in ("whole", "run"))
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert torch.equal(resumed.classifier.weight, whole.classifier.weight)
    assert not (tmp_path / "run" / "checkpoints").exists()  # deleted once the model is written
    history = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert history == (tmp_path / "whole" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="is complete"):
        finetune(config(folder, tmp_path / "run", model_dir, resume=True, **settings))
    assert record["fine_tuned"]["val_acc1"] is not None


def test_resume_refuses_other_settings_and_a_missing_run(folder, model_dir, tmp_path,
                                                         monkeypatch) -> None:
    with monkeypatch.context() as patch:
        _interrupt_at_epoch(patch, 2)
        with pytest.raises(Interrupted):
            finetune(config(folder, tmp_path / "run", model_dir, epochs=2))
    with pytest.raises(ValueError, match=r"settings differ .*: lr \(was 0.001, now 0.01\)"):
        finetune(config(folder, tmp_path / "run", model_dir, epochs=2, lr=1e-2, resume=True))
    with pytest.raises(FileNotFoundError, match="holds no fine-tuning run"):
        finetune(config(folder, tmp_path / "none", model_dir, resume=True))
    with pytest.raises(SystemExit, match="--resume continues the run in --output"):
        main(["finetune", str(folder), "--resume"])


# --------------------------------------------------------------------------- torchrun


def test_rank_batches_split_each_batch_evenly() -> None:
    from clipforge.training.finetune.loop import rank_batches

    order = list(range(11))
    assert rank_batches(order, 4, 0, 1) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert rank_batches(order, 4, 0, 2) == [[0, 2], [4, 6], [8]]
    assert rank_batches(order, 4, 1, 2) == [[1, 3], [5, 7], [9]]  # 10 left out: 2 ranks


def test_two_processes_train_what_one_process_trains(folder, model_dir, tmp_path) -> None:
    """torchrun with 2 gloo processes, each with half of every batch and the gradients
    averaged: the same model as one process, to float32 round-off (18 training images in
    batches of 6, so no batch is cut)."""
    import os
    import socket
    import subprocess
    import sys

    args = ["finetune", str(folder), "--model", str(model_dir), "--epochs", "2", "--lr",
            "1e-3", "--batch-size", "6", "--val-fraction", "0.4", "--precision", "fp32",
            "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(port), "-m", "clipforge", *args, "--output", str(tmp_path / "two")],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (clipforge.create_model(tmp_path / d) for d in ("one", "two"))
    start = clipforge.create_model(model_dir)
    assert not torch.equal(one.visual.conv1.weight, start.visual.conv1.weight)
    for key, value in one.state_dict().items():
        assert torch.allclose(two.state_dict()[key], value, atol=1e-5), key
    assert torch.allclose(two.classifier.weight, one.classifier.weight, atol=1e-4)

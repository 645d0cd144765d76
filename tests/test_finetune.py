"""``clipforge finetune``: zero-shot-head initialisation, linear and end-to-end training,
WiSE-FT, the run directory as a model with its classes, and the errors users meet."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clipforge
from clipforge.cli import main
from clipforge.evaluation.zeroshot import ZeroShotClassifier
from clipforge.inference import embed_images
from clipforge.reading import DataError
from clipforge.training.finetune import FinetuneConfig
from clipforge.training.finetune.config import GENERIC_TEMPLATES
from clipforge.training.finetune.data import split_off
from clipforge.training.finetune.loop import finetune
from clipforge.training.finetune.wise_ft import interpolate

COLOURS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


def _picture(rgb: tuple[int, int, int], rng: np.random.Generator) -> Image.Image:
    """A noisy solid-colour image: classes any image tower can tell apart."""
    noise = rng.integers(-40, 40, size=(40, 40, 3))
    return Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8))


def make_folder(root: Path, per_class: int = 10, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            _picture(rgb, rng).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("colours") / "colours")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A perturbed tiny ViT saved as a model directory: every run starts from these weights."""
    from conftest import seeded_model

    path = tmp_path_factory.mktemp("model") / "tiny"
    clipforge.save_model(seeded_model("tiny-vit", seed=1), path)
    return path


def config(data: Path, output: Path, model: Path, **changes) -> FinetuneConfig:
    base = FinetuneConfig(data=str(data), output=output, model=str(model), epochs=4,
                          batch_size=8, lr=1e-3, val_fraction=0.3, progress=False)
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def full_run(folder, model_dir, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("runs") / "full"
    return output, finetune(config(folder, output, model_dir, wise_ft=(0.0, 0.5, 1.0)))


# --------------------------------------------------------------------------- learning


def test_full_fine_tuning_beats_the_zero_shot_start(full_run) -> None:
    output, record = full_run
    zero_shot, tuned = record["zero_shot"]["val_acc1"], record["fine_tuned"]["val_acc1"]
    assert zero_shot < 0.9 and tuned == 1.0
    assert record["n_val"] == 9 and record["n_train"] == 21  # 3 of 10 held out per class
    assert record["templates"] == {"source": "generic ensemble", "count": len(GENERIC_TEMPLATES)}
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 0, "epoch": 0, "val_acc1": zero_shot}
    assert [r["epoch"] for r in lines if "val_acc1" in r and "epoch" in r] == [0, 1, 2, 3, 4]
    assert any("loss" in r for r in lines)


def test_linear_probe_beats_the_zero_shot_start_with_the_tower_frozen(folder, model_dir,
                                                                     tmp_path) -> None:
    record = finetune(config(folder, tmp_path / "run", model_dir, method="linear", epochs=60))
    assert record["zero_shot"]["val_acc1"] < 0.9 and record["fine_tuned"]["val_acc1"] == 1.0
    tuned, start = clipforge.create_model(tmp_path / "run"), clipforge.create_model(model_dir)
    for key, value in start.state_dict().items():  # only the head was trained
        assert torch.equal(tuned.state_dict()[key], value), key


# --------------------------------------------------------------------------- WiSE-FT


def test_wise_ft_ends_are_the_zero_shot_and_the_fine_tuned_models(full_run, folder, model_dir,
                                                                   tmp_path) -> None:
    output, record = full_run
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    start = clipforge.create_model(model_dir)
    zeroshot = ZeroShotClassifier.build(start, list(COLOURS), list(GENERIC_TEMPLATES))
    vectors = torch.from_numpy(embed_images(start, paths, progress=False).vectors)

    at_zero = clipforge.create_model(output / "wise-ft" / "alpha-0")
    for key, value in start.state_dict().items():
        assert torch.equal(at_zero.state_dict()[key], value), key
    zero_vectors = torch.from_numpy(embed_images(at_zero, paths, progress=False).vectors)
    assert torch.equal(zero_vectors, vectors)
    assert torch.allclose(at_zero.classifier.logits(zero_vectors), zeroshot.logits(vectors),
                          atol=1e-5)
    assert torch.equal(at_zero.classifier.predict(zero_vectors), zeroshot.predict(vectors))

    # alpha 1 is the model a run without WiSE-FT ends with (which also shows runs repeat)
    plain = finetune(config(folder, tmp_path / "plain", model_dir))
    assert plain["chosen"]["alpha"] == 1.0 and not plain["wise_ft"]
    at_one, tuned = (clipforge.create_model(output / "wise-ft" / "alpha-1"),
                     clipforge.create_model(tmp_path / "plain"))
    for key, value in tuned.state_dict().items():
        assert torch.equal(at_one.state_dict()[key], value), key
    assert torch.equal(at_one.classifier.weight, tuned.classifier.weight)
    assert not torch.equal(at_one.classifier.weight, at_zero.classifier.weight)

    accuracies = {row["alpha"]: row["val_acc1"] for row in record["wise_ft"]}
    best = max(accuracies.values())
    assert record["chosen"]["alpha"] == min(a for a, v in accuracies.items() if v == best)
    chosen = clipforge.create_model(output)
    assert chosen.classifier.info["wise_ft_alpha"] == record["chosen"]["alpha"]
    mixed = clipforge.create_model(output / "wise-ft" / f"alpha-{record['chosen']['alpha']:g}")
    assert torch.equal(chosen.classifier.weight, mixed.classifier.weight)


def test_interpolation_mixes_floats_and_takes_counters_from_the_nearer_end() -> None:
    start = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    end = {"w": torch.tensor([1.0, 4.0]), "n": torch.tensor(9)}
    assert torch.equal(interpolate(start, end, 0.25)["w"], torch.tensor([0.25, 2.5]))
    assert interpolate(start, end, 0.25)["n"] == 3 and interpolate(start, end, 0.75)["n"] == 9


# --------------------------------------------------------------------------- the model it makes


def test_run_directory_is_a_model_with_its_classes(full_run, folder, capsys) -> None:
    output, _ = full_run
    model, _ = clipforge.load(output)
    assert model.classifier.classnames == list(COLOURS)
    assert model.classifier.weight.shape == (3, model.config.embed_dim)
    image = str(folder / "red" / "0.png")
    assert main(["classify", image, "--model", str(output), "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)["results"][0]["predictions"]
    assert predictions[0]["label"] == "red"
    assert {p["label"] for p in predictions} == set(COLOURS)
    assert main(["classify", image, "--model", str(output), "--labels", "a cat,a dog",
                 "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)["results"][0]["predictions"]
    assert {p["label"] for p in predictions} == {"a cat", "a dog"}  # zero-shot, as asked


def test_classify_without_labels_needs_a_fine_tuned_model(model_dir, folder) -> None:
    with pytest.raises(SystemExit, match="no classes of its own"):
        main(["classify", str(folder / "red" / "0.png"), "--model", str(model_dir)])


def test_head_without_its_class_names_is_refused(full_run, tmp_path) -> None:
    output, _ = full_run
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "model.safetensors"):
        (copy / name).write_bytes((output / name).read_bytes())
    with pytest.raises(ValueError, match="classifier.json is not beside them"):
        clipforge.create_model(copy)


# --------------------------------------------------------------------------- data and errors


def test_csv_and_shards_are_read_as_eval_reads_them(folder, model_dir, tmp_path) -> None:
    rows = [f"{p.relative_to(folder)},{p.parent.name}" for p in sorted(folder.rglob("*.png"))]
    table = folder / "labels.csv"
    table.write_text("filepath,label\n" + "\n".join(rows) + "\n")
    record = finetune(config(table, tmp_path / "csv", model_dir, method="linear", epochs=60))
    assert record["classes"] == list(COLOURS) and record["fine_tuned"]["val_acc1"] == 1.0

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "0.tar", "w") as tar:
        for i, path in enumerate(sorted(folder.rglob("*.png"))):
            for ext, data in (("png", path.read_bytes()),
                              ("cls", str(list(COLOURS).index(path.parent.name)).encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (shards / "classnames.txt").write_text("\n".join(COLOURS) + "\n")
    record = finetune(config(shards / "0.tar", tmp_path / "wds", model_dir, method="linear",
                             epochs=60))
    assert record["n_train"] + record["n_val"] == 30 and record["fine_tuned"]["val_acc1"] == 1.0


def test_unreadable_images_are_skipped_and_counted(tmp_path, model_dir) -> None:
    data = make_folder(tmp_path / "data", per_class=4)
    (data / "red" / "broken.png").write_bytes(b"not a png")
    record = finetune(config(data, tmp_path / "run", model_dir, epochs=1, val_fraction=0.25))
    assert record["skipped"]["count"] == 1
    assert record["skipped"]["items"][0]["item"].endswith("broken.png")
    assert record["skipped"]["reasons"] == {"unreadable image": 1}


def test_a_class_without_images_is_an_error(tmp_path, model_dir) -> None:
    data = make_folder(tmp_path / "data", per_class=3)
    (data / "violet").mkdir()
    with pytest.raises(DataError, match=r"1 of the 4 classes have no training image.*'violet'"):
        finetune(config(data, tmp_path / "run", model_dir))


def test_class_names_that_do_not_match_the_folders_are_an_error(tmp_path, folder, model_dir,
                                                                capsys) -> None:
    names = tmp_path / "names.txt"
    names.write_text("cobalt\nemerald\n")
    assert main(["finetune", str(folder), "--model", str(model_dir), "--classnames", str(names),
                 "--output", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "classnames gives 2 class name(s)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_wise_ft_needs_validation_data(folder, model_dir, tmp_path) -> None:
    with pytest.raises(ValueError, match="--wise-ft chooses the mixing coefficient"):
        finetune(config(folder, tmp_path / "run", model_dir, wise_ft=(0.5,), val_fraction=0))
    with pytest.raises(SystemExit):  # argparse: "--wise-ft takes comma-separated numbers"
        main(["finetune", str(folder), "--wise-ft", "0,x"])


def test_held_out_split_is_per_class_seeded_and_keeps_a_training_image() -> None:
    targets = [0] * 10 + [1] * 2 + [2]
    train, val = split_off(targets, 0.3, seed=0)
    assert sorted(train + val) == list(range(13))
    assert [targets[i] for i in val].count(0) == 3 and [targets[i] for i in val].count(1) == 1
    assert 12 in train  # a class of one image keeps it for training
    assert split_off(targets, 0.3, seed=0) == (train, val) != split_off(targets, 0.3, seed=1)


# --------------------------------------------------------------------------- LoRA


@pytest.fixture(scope="module")
def lora_run(folder, model_dir, tmp_path_factory) -> tuple[Path, dict]:
    pytest.importorskip("peft")
    output = tmp_path_factory.mktemp("runs") / "lora"
    return output, finetune(config(folder, output, model_dir, method="lora", lr=None,
                                   wise_ft=(0.0, 1.0)))


def test_lora_beats_the_zero_shot_start(lora_run) -> None:
    _, record = lora_run
    assert record["zero_shot"]["val_acc1"] < 0.9 and record["fine_tuned"]["val_acc1"] == 1.0
    assert record["lora"] == {"rank": 8, "alpha": 16.0, "dropout": 0.0, "adapter": "adapter"}


def test_lora_trains_adapters_alone_and_they_reproduce_the_merged_model(lora_run, folder,
                                                                        model_dir) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    output, _ = lora_run
    saved = load_file(output / "adapter" / "adapter_model.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)  # adapters only
    assert any("in_proj_weight" in k or ".attn.lora_" in k for k in saved)  # fused q/k/v
    merged, start = clipforge.create_model(output), clipforge.create_model(model_dir)
    for key, value in start.state_dict().items():  # the text tower and untargeted tensors
        if not key.startswith("visual.transformer.") or key.endswith(("bias", "ln_1.weight",
                                                                      "ln_2.weight")):
            assert torch.equal(merged.state_dict()[key], value), key
    assert not torch.equal(merged.visual.transformer.resblocks[0].mlp.c_fc.weight,
                           start.visual.transformer.resblocks[0].mlp.c_fc.weight)

    paths = sorted(str(p) for p in folder.rglob("*.png"))
    expected = torch.from_numpy(embed_images(merged, paths, progress=False).vectors)
    start.visual = PeftModel.from_pretrained(start.visual, output / "adapter")  # unmerged
    reapplied = torch.from_numpy(embed_images(start, paths, progress=False).vectors)
    logits = merged.classifier.logits
    assert torch.allclose(logits(reapplied), logits(expected), atol=1e-4)


def test_lora_wise_ft_mixes_the_merged_model(lora_run, model_dir) -> None:
    output, record = lora_run
    at_zero = clipforge.create_model(output / "wise-ft" / "alpha-0")
    for key, value in clipforge.create_model(model_dir).state_dict().items():
        assert torch.equal(at_zero.state_dict()[key], value), key
    assert [row["alpha"] for row in record["wise_ft"]] == [0.0, 1.0]


def test_lora_adapts_a_resnet_tower_and_refuses_dropout(folder, tmp_path) -> None:
    pytest.importorskip("peft")
    from conftest import seeded_model

    start = seeded_model("tiny-rn", seed=2)
    clipforge.save_model(start, tmp_path / "rn")
    finetune(config(folder, tmp_path / "run", tmp_path / "rn", method="lora", lr=1e-2))
    tuned = clipforge.create_model(tmp_path / "run")
    assert tuned.state_dict().keys() == start.state_dict().keys()  # merged and unwrapped
    for key, value in start.state_dict().items():
        adapted = ".conv" in key and ".layer" in key or "attnpool." in key and "_proj.w" in key
        assert torch.equal(tuned.state_dict()[key], value) != adapted, key
    # the saved adapters, applied to the pretrained tower unmerged, give the merged model
    from peft import PeftModel

    paths = sorted(str(p) for p in folder.rglob("*.png"))[:6]
    expected = torch.from_numpy(embed_images(tuned, paths, progress=False).vectors)
    base = clipforge.create_model(tmp_path / "rn")
    base.visual = PeftModel.from_pretrained(base.visual, tmp_path / "run" / "adapter")
    assert torch.allclose(torch.from_numpy(embed_images(base, paths, progress=False).vectors),
                          expected, atol=1e-4)
    with pytest.raises(ValueError, match="--lora-dropout 0.1: only 0 is supported"):
        config(folder, tmp_path / "run", tmp_path / "rn", lora_dropout=0.1).validate()

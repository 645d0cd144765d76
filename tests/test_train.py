"""`clipforge train`: exact resume after SIGKILL, two processes equal one, GradCache equals plain
batches, divergence stops cleanly, bad data is skipped and counted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import clipforge
from clipforge.cli import main
from clipforge.data.sources import DataError
from clipforge.text.vocabulary import fit_config
from clipforge.training.config import BUILTIN_WEIGHT_DECAY, WEIGHT_DECAY
from clipforge.training.loop import TrainConfig, TrainingDiverged, resolve_precision, train
from clipforge.training.objective import Objective

TINY = ["--model", "tiny-vit", "--batch-size", "16", "--warmup", "2", "--workers", "0",
        "--log-every", "1", "--no-progress", "--precision", "fp32"]


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "clipforge", "train", *args], env=env,
                          capture_output=True, text=True, timeout=300, **kwargs)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_weight_decay_defaults_by_data_and_an_explicit_one_wins(tmp_path) -> None:
    assert TrainConfig(tmp_path).decay() == BUILTIN_WEIGHT_DECAY != WEIGHT_DECAY
    assert TrainConfig(tmp_path, data="pairs.csv").decay() == WEIGHT_DECAY
    assert TrainConfig(tmp_path, weights="w.safetensors").decay() == WEIGHT_DECAY
    assert TrainConfig(tmp_path, data="pairs.csv", weight_decay=0.0).decay() == 0.0
    with pytest.raises(ValueError, match="--weight-decay -1"):
        TrainConfig(tmp_path, weight_decay=-1).validate()


def test_sigkill_and_resume_gives_the_same_weights(tmp_path) -> None:
    args = [*TINY, "--steps", "60", "--checkpoint-every", "5", "--patch-dropout", "0.25"]
    straight = tmp_path / "straight"
    assert _run([*args, "--output", str(straight)]).returncode == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "clipforge", "train", *args, "--output",
                             str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    target = killed / "checkpoints" / "step_00000020.pt"
    deadline = time.monotonic() + 240
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists(), "the run finished before the kill"
    done = sorted((killed / "checkpoints").glob("step_*.pt"))
    assert done and int(done[-1].stem.split("_")[1]) < 60

    resumed = _run([*args, "--output", str(killed), "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _losses(killed) == _losses(straight)  # metrics describe one history, no duplicates


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("data", ["builtin", "csv with bad images"])
def test_two_processes_equal_one(tmp_path, data) -> None:
    args = [*TINY, "--steps", "4", "--checkpoint-every", "100"]
    if data != "builtin":
        args += ["--data", str(_write_csv(tmp_path, good=12, bad=4)), "--batch-size", "8"]
    single = tmp_path / "single"
    assert _run([*args, "--output", str(single)]).returncode == 0
    double = tmp_path / "double"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(_free_port()), "-m", "clipforge", "train", *args,
         "--output", str(double)],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _losses(double) == pytest.approx(_losses(single), rel=1e-4, abs=1e-5)
    a, b = _weights(single), _weights(double)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=2e-5, msg=key)
    # Both ranks' skips are counted, not only rank 0's.
    assert _skipped(double) == _skipped(single)
    if data != "builtin":
        assert sum(_skipped(single).values()) > 0


def _skipped(run: Path) -> dict[str, int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["skipped"]


def _write_shards(root: Path, shards: int = 3, per_shard: int = 10) -> str:
    """img2dataset-layout shards of coloured rectangles; one sample has a corrupt JPEG."""
    import io

    import webdataset as wds

    root.mkdir(parents=True)
    colours = ["red", "green", "blue", "yellow", "white"]
    for shard in range(shards):
        with wds.TarWriter(str(root / f"{shard:05d}.tar")) as sink:
            for i in range(per_shard):
                colour = colours[(shard + i) % len(colours)]
                buffer = io.BytesIO()
                Image.new("RGB", (30 + i, 24 + shard), colour).save(buffer, format="JPEG")
                image = b"\xff\xd8 broken" if (shard, i) == (1, 3) else buffer.getvalue()
                sink.write({"__key__": f"{shard * 10000 + i:09d}", "jpg": image,
                            "txt": f"a {colour} rectangle number {i}"})
    return str(root / f"{{00000..{shards - 1:05d}}}.tar")


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_shards_resume_exactly(tmp_path, workers) -> None:
    """Shards have no random access: a resumed run replays each stream to its recorded
    position.  Resuming at an odd step with two workers also checks that the batches come
    from the right stream (worker k % 2 served step k)."""
    pattern = _write_shards(tmp_path / "shards")
    args = [*TINY, "--workers", str(workers), "--data", pattern, "--batch-size", "8",
            "--steps", "7", "--checkpoint-every", "3", "--keep-checkpoints", "3"]
    straight = tmp_path / "straight"
    assert main(["train", *args, "--output", str(straight)]) == 0
    checkpoint = straight / "checkpoints" / "step_00000003.pt"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["data"]["positions"][0], "no stream position was recorded"
    # The user's own data gets CLIP's weight decay (the built-in data has its own default).
    assert {g["weight_decay"] for g in saved["optimizer"]["param_groups"]} == {0.0, 0.2}

    def resume_from(state: dict, name: str) -> Path:
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        torch.save(state, run / "checkpoints" / checkpoint.name)
        assert main(["train", *args, "--output", str(run), "--resume", "latest"]) == 0
        return run

    resumed = resume_from(saved, "resumed")
    a, b = _weights(straight), _weights(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert _losses(resumed) == _losses(straight)[3:]
    assert _skipped(resumed) == _skipped(straight) and _skipped(straight)  # totals carried on
    # Without the positions the streams restart, and the run is not the same.
    restarted = resume_from({**saved, "data": {**saved["data"], "positions": [{}]}}, "restart")
    assert _losses(restarted) != _losses(straight)[3:]


def test_gradcache_run_equals_plain_run(tmp_path) -> None:
    args = [*TINY, "--steps", "3", "--checkpoint-every", "100"]
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    assert main(["train", *args, "--output", str(plain)]) == 0
    assert main(["train", *args, "--micro-batch", "5", "--output", str(cached)]) == 0
    assert _losses(cached) == pytest.approx(_losses(plain), rel=1e-5)
    # Float32 round-off of the two summation orders, which Adam scales up where gradients are
    # tiny; exact equality of the gradients is proven in float64 in test_loss.py.
    a, b = _weights(plain), _weights(cached)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_run_directory_is_a_model(tmp_path, photos, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "4", "--checkpoint-every", "2",
                 "--keep-checkpoints", "1", "--loss", "siglip", "--precision", "bf16",
                 "--output", str(run)]) == 0
    out = capsys.readouterr().out
    assert "held-out compositions" in out and "recall@5" in out
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000004.pt"]
    assert (run / "loss.png").stat().st_size > 1000
    report = json.loads((run / "eval.json").read_text())
    assert 0 <= report["eval"]["heldout_top1"] <= 1
    model, preprocess = clipforge.load(run)
    # built-in data from scratch: the run learnt its own vocabulary, saved with the model
    assert model.config == fit_config(clipforge.create_model("tiny-vit").config,
                                      run / "vocabulary")
    assert model.config.tokenizer.kind == "hf" and (run / "tokenizer.json").is_file()
    assert main(["classify", str(photos[0]), "--labels", "a cat,a dog", "--model",
                 str(run)]) == 0


def test_divergence_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path,
                                                                      monkeypatch) -> None:
    calls = {"n": 0}
    forward = Objective.forward

    def failing(self, images, tokens):
        calls["n"] += 1
        loss = forward(self, images, tokens)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(Objective, "forward", failing)
    config = TrainConfig(output=tmp_path / "run", model="tiny-vit", steps=10, batch_size=8,
                         workers=0, checkpoint_every=2, warmup=1, progress=False)
    with pytest.raises(TrainingDiverged, match=r"nan at step 3.*step_00000002\.pt"):
        train(config)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("*.pt")] == \
        ["step_00000002.pt"]


def _write_csv(tmp_path: Path, good: int, bad: int) -> Path:
    rows = ["filepath,title"]
    colours = ["red", "green", "blue", "yellow"]
    for i in range(good):
        Image.new("RGB", (40 + i, 36), colours[i % 4]).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,a {colours[i % 4]} square")
    for i in range(bad):
        (tmp_path / f"bad{i}.jpg").write_bytes(b"not a jpeg")
        rows.append(f"bad{i}.jpg,a broken picture")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "data.csv"


def test_csv_training_skips_and_counts_bad_images(tmp_path) -> None:
    csv = _write_csv(tmp_path, good=12, bad=4)
    run = tmp_path / "run"
    assert main(["train", *TINY, "--data", str(csv), "--steps", "3", "--batch-size", "8",
                 "--checkpoint-every", "100", "--output", str(run)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(rows[-1]["skipped"].values()) > 0
    # the architecture's own tokenizer unless asked: a CSV is not the built-in data
    assert not (run / "vocabulary").exists()
    assert clipforge.create_model(run).config.tokenizer.kind == "openai"


def test_csv_training_can_learn_its_vocabulary(tmp_path, capsys) -> None:
    """--tokenizer learn on the user's own captions (the bad rows skipped): the vocabulary
    holds their words, and a resumed run keeps it."""
    csv = _write_csv(tmp_path, good=12, bad=2)
    run = tmp_path / "run"
    args = ["train", *TINY, "--data", str(csv), "--batch-size", "8", "--checkpoint-every", "2",
            "--tokenizer", "learn", "--vocab-size", "300", "--output", str(run)]
    assert main([*args, "--steps", "2"]) == 0
    learnt = (run / "vocabulary" / "tokenizer.json").read_bytes()
    model = clipforge.create_model(run)
    assert model.config.tokenizer.kind == "hf" and model.config.text.vocab_size <= 300
    assert [model.tokenizer.decode([i]) for i in model.tokenizer.encode("a yellow square")] \
        == ["a", "yellow", "square"]
    assert main([*args, "--steps", "4", "--resume", "latest", "--resume-override",
                 "steps"]) == 0
    assert (run / "vocabulary" / "tokenizer.json").read_bytes() == learnt
    capsys.readouterr()
    assert main(["train", *TINY, "--tokenizer", "learn", "--model", str(run), "--steps", "1",
                 "--output", str(tmp_path / "again")]) == 2
    assert "--tokenizer learn gives the text tower a new vocabulary" in capsys.readouterr().err


def test_no_readable_sample_stops_at_once(tmp_path) -> None:
    csv = _write_csv(tmp_path, good=0, bad=3)
    with pytest.raises(DataError, match="no readable sample"):
        train(TrainConfig(output=tmp_path / "run", data=str(csv), model="tiny-vit", steps=3,
                          batch_size=4, workers=0, progress=False))


def _state(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file()}


def test_resume_refuses_changed_settings_unless_overridden(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    first = ["train", *TINY, "--steps", "2", "--checkpoint-every", "1", "--output", str(run)]
    assert main(first) == 0
    before = _state(run)
    capsys.readouterr()

    changed = [*first, "--resume", "latest", "--batch-size", "8", "--lr", "0.002",
               "--steps", "4", "--seed", "3"]
    assert main(changed) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "step_00000002.pt" in err, err
    for setting in ("--batch-size 16 -> 8", "--lr 0.001 -> 0.002", "--steps 2 -> 4",
                    "--seed 0 -> 3", "--resume-override steps,batch-size,lr,seed"):
        assert setting in err, err
    assert _state(run) == before  # nothing written: config, checkpoints, metrics as they were
    assert main([*changed, "--resume-override", "steps,lr"]) == 2  # batch size, seed still
    err = capsys.readouterr().err
    assert "--batch-size 16 -> 8" in err and "--lr" not in err.split("with other settings")[1]
    assert main([*changed, "--resume-override", "batchsize"]) == 2
    assert "--resume-override: unknown setting 'batchsize'" in capsys.readouterr().err
    assert _state(run) == before

    # What does not change the result may change freely; an override accepts the rest.
    assert main([*first, "--resume", "latest", "--steps", "3", "--resume-override", "steps",
                 "--log-every", "2", "--checkpoint-every", "5", "--keep-checkpoints", "4",
                 "--eval-every", "0", "--device", "cpu", "--micro-batch", "8"]) == 0
    saved = json.loads((run / "train_config.json").read_text())
    assert (saved["steps"], saved["log_every"], saved["batch_size"]) == (3, 2, 16)
    assert (run / "checkpoints" / "step_00000003.pt").is_file()


def test_failed_resume_leaves_the_run_config_alone(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    first = ["train", *TINY, "--steps", "2", "--checkpoint-every", "1", "--output", str(run)]
    assert main(first) == 0
    config = (run / "train_config.json").read_text()
    (run / "checkpoints" / "step_00000002.pt").write_bytes(b"cut short")
    capsys.readouterr()
    assert main([*first, "--resume", "latest", "--log-every", "3"]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert (run / "train_config.json").read_text() == config
    torch.save({"step": 2}, run / "checkpoints" / "step_00000002.pt")
    assert main([*first, "--resume", "latest", "--log-every", "3"]) == 2
    assert "is not a clipforge training checkpoint (no objective, optimizer" in \
        capsys.readouterr().err
    assert (run / "train_config.json").read_text() == config


def test_full_disk_while_checkpointing_names_the_checkpoint(tmp_path, monkeypatch) -> None:
    import errno

    from clipforge.fileio import DiskFullError
    from clipforge.training.checkpoint import save_checkpoint

    directory = tmp_path / "checkpoints"
    directory.mkdir()
    save_checkpoint(directory, 1, {"step": 1}, keep=2)

    torch_error = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"

    def full(obj, f) -> None:  # as torch.save fails: its own error, the OSError behind it
        try:
            f.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError(torch_error)  # noqa: B904 (the context, as torch has it)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError) as error:
        save_checkpoint(directory, 2, {"step": 2}, keep=2)
    assert str(error.value) == (
        f"cannot write {directory / 'step_00000002.pt'}: the disk is full (No space left on "
        "device); the earlier checkpoints are intact: free some space and continue the run "
        "with --resume latest")
    assert [p.name for p in directory.iterdir()] == ["step_00000001.pt"]


def test_auto_precision_follows_the_cpu(monkeypatch, caplog) -> None:
    """"auto" trains in bf16 autocast where the CPU computes bfloat16 natively and in float32
    where PyTorch would emulate it (about 100 times slower there); an explicit bf16 is obeyed
    with a warning."""
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda n=native: n,
                            raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
        assert resolve_precision(TrainConfig(Path("run"), precision="auto")).precision == expected
        caplog.clear()
        with caplog.at_level("WARNING", logger="clipforge.precision"):
            assert resolve_precision(TrainConfig(Path("run"), precision="bf16")).precision == "bf16"
            assert resolve_precision(TrainConfig(Path("run"), precision="fp32")).precision == "fp32"
        assert ("emulates bfloat16" in caplog.text) is (not native), caplog.text

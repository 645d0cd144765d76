"""The command line, run in-process on real photos and a saved tiny model."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import clipforge
from clipforge.cli import main

LABELS = ["an astronaut", "a cat", "a cup of coffee", "a horse", "a motorcycle"]


@pytest.fixture
def saved_model(tiny_vit, tmp_path):
    path = tmp_path / "tiny"
    clipforge.save_model(tiny_vit, path)
    return path


def test_models_lists_architectures_and_tags(capsys) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in clipforge.available_models():
        assert name in out
    assert "laion2b_s39b_b160k 80.1%" in out and "151.3M" in out


def test_models_lists_every_family_with_published_figures(capsys) -> None:
    assert main(["models", "--json", "--pretrained"]) == 0
    rows = {r["architecture"]: r for r in json.loads(capsys.readouterr().out)}
    families = {r["family"] for r in rows.values()}
    assert {"clip", "siglip", "siglip2", "metaclip2", "xlm-roberta", "pe-core", "eva02"} <= families
    tags = {t["tag"]: t for t in rows["ViT-H-14-378-quickgelu"]["weights"]}
    assert tags["dfn5b"]["imagenet_top1"] == 84.4
    assert tags["dfn5b"]["repository"] == "apple/DFN5B-CLIP-ViT-H-14-378"
    siglip = rows["ViT-SO400M-14-SigLIP-384"]
    assert (siglip["image_size"], siglip["embed_dim"], siglip["tokenizer"]) == (384, 1152, "hf")
    assert 870e6 < siglip["parameters"] < 890e6  # OpenCLIP's 878M
    assert main(["models", "--family", "pe-core"]) == 0
    assert "PE-Core-bigG-14-448" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="families:"):
        main(["models", "--family", "nope"])


def test_published_architecture_needs_its_tokenizer_files_for_random_init() -> None:
    """An architecture whose tokenizer comes with its weights cannot be built without them:
    the error says where they come from, before any model is built."""
    from clipforge.text.hf import TokenizerFilesError

    with pytest.raises(TokenizerFilesError, match="files come with its weights"):
        clipforge.create_model("ViT-B-16-SigLIP")


def test_classify_matches_the_model(saved_model, photos, capsys) -> None:
    assert main(["classify", *map(str, photos), "--labels", ",".join(LABELS),
                 "--model", str(saved_model), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in report["results"]] == [str(p) for p in photos]
    model = clipforge.create_model(saved_model)
    tokens = clipforge.tokenize([f"a photo of a {label}." for label in LABELS])
    pixels = torch.stack([model.preprocess.load(p) for p in photos])
    with torch.no_grad():
        expected = model(pixels, tokens)[0].softmax(dim=-1)
    for result, probs in zip(report["results"], expected):
        predictions = result["predictions"]
        got = [p["probability"] for p in predictions]
        assert got == sorted(got, reverse=True) and sum(got) == pytest.approx(1, abs=1e-4)
        for p in predictions:
            assert p["probability"] == pytest.approx(probs[LABELS.index(p["label"])].item(),
                                                     abs=1e-5)


def test_classify_skips_unreadable_images(saved_model, photos, tmp_path, capsys) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photos[-1].read_bytes()[:200] if photos[-1].suffix == ".jpg"
                       else b"not an image")
    assert main(["classify", str(photos[0]), str(broken), "--labels", "a cat,a dog",
                 "--model", str(saved_model)]) == 0
    captured = capsys.readouterr()
    assert str(photos[0]) in captured.out
    assert "broken.jpg" in captured.err and "skipped" in captured.err


def test_classify_bad_arguments(saved_model, photos, capsys) -> None:
    with pytest.raises(SystemExit, match="at least two"):
        main(["classify", str(photos[0]), "--labels", "cat", "--model", str(saved_model)])
    assert main(["classify", str(photos[0]), "--labels", "a,b", "--model", "no/such/model"]) == 2
    assert "unknown model 'no/such/model'" in capsys.readouterr().err


def test_embed_writes_unit_vectors_and_reports_skips(saved_model, photos, tmp_path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for photo in photos[:3]:
        (images / photo.name).write_bytes(photo.read_bytes())
    (images / "corrupt.png").write_bytes(b"\x89PNG broken")
    texts = tmp_path / "texts.txt"
    texts.write_text("a cat\n\na dog on a beach\n" + "word " * 100 + "\nthe end\n")
    out = tmp_path / "out"
    assert main(["embed", "--images", str(images), "--texts", str(texts), "--out", str(out),
                 "--model", str(saved_model), "--batch-size", "2"]) == 0
    image_vectors = np.load(out / "image_embeddings.npy")
    text_vectors = np.load(out / "text_embeddings.npy")
    assert image_vectors.shape == (3, 64) and text_vectors.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(text_vectors, axis=1), 1, atol=1e-5)
    with (out / "texts.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["text"] for r in rows] == ["a cat", "a dog on a beach", "the end"]
    with (out / "skipped.csv").open() as f:
        skipped = {r["item"]: r["reason"] for r in csv.DictReader(f)}
    assert any(item.endswith("corrupt.png") for item in skipped)
    assert "line 3" in skipped and "tokens long" in skipped["line 3"]
    assert skipped["line 3"].startswith("text 2 ")  # its place in the list, not "text 0"
    model = clipforge.create_model(saved_model)
    with torch.no_grad():
        direct = model.encode_text(clipforge.tokenize(["a dog on a beach"]), normalize=True)
        first = sorted(images.glob("*.png"))[0]
        image = model.encode_image(model.preprocess.load(first)[None], normalize=True)
    np.testing.assert_allclose(text_vectors[1], direct[0].numpy(), atol=1e-5)
    with (out / "images.csv").open() as f:
        image_rows = list(csv.DictReader(f))
    row = next(int(r["row"]) for r in image_rows if r["path"] == str(first))
    np.testing.assert_allclose(image_vectors[row], image[0].numpy(), atol=1e-5)


def test_convert_between_formats(saved_model, tmp_path, tiny_vit) -> None:
    assert main(["convert", str(saved_model), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back.safetensors")]) == 0
    back = clipforge.create_model(tmp_path / "back.safetensors")
    for key, value in tiny_vit.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _training_run_copy(root, saved_model):
    """What a copied `clipforge train` run directory holds, the final model included."""
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "step_00000450.pt").write_bytes(b"checkpoint" * 100)
    for name in ("config.json", "model.safetensors"):
        (root / name).write_bytes((saved_model / name).read_bytes())
    (root / "metrics.jsonl").write_text('{"step": 1, "loss": 4.1}\n')
    (root / "eval.json").write_text('{"eval": {}}\n')
    (root / "train_config.json").write_text("{}\n")
    (root / "loss.png").write_bytes(b"\x89PNG")
    return root


def _hf_clone(root):
    """A folder shaped like a cloned Hugging Face model repository."""
    (root / ".git" / "objects").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "README.md").write_text("# my model card\n")
    (root / "config.json").write_text('{"model_type": "clip"}\n')
    return root


@pytest.mark.parametrize("shape", ["training run", "hf clone"])
@pytest.mark.parametrize("to", ["clipforge", "hf"])
def test_convert_never_empties_a_folder_it_did_not_write(saved_model, tmp_path, capsys, shape,
                                                         to) -> None:
    dst = (_training_run_copy(tmp_path / "run", saved_model) if shape == "training run"
           else _hf_clone(tmp_path / "repo"))
    before = _files(dst)
    assert main(["convert", str(saved_model), str(dst), "--to", to]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(dst) in err and "choose a new or empty directory" in err
    foreign = ["checkpoints/", "metrics.jsonl", "eval.json"] if shape == "training run" else \
        [".git/", "README.md"]
    assert all(name in err for name in foreign), err
    assert _files(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["tiny", dst.name])


def test_convert_twice_into_the_same_destination(saved_model, tmp_path, tiny_vit) -> None:
    dst = tmp_path / "converted"
    assert main(["convert", str(saved_model), str(dst)]) == 0
    assert main(["convert", str(saved_model), str(dst), "--to", "hf"]) == 0  # replaces its own
    assert (dst / "preprocessor_config.json").is_file()
    assert main(["convert", str(saved_model), str(dst)]) == 0
    assert not (dst / "preprocessor_config.json").exists()
    assert clipforge.create_model(dst).config == tiny_vit.config


def test_outputs_of_an_older_clipforge_are_replaced(saved_model, photos, tmp_path,
                                                   capsys) -> None:
    """Folders written before the manifest existed hold exactly the writer's own files."""
    from clipforge.fileio import DIRECTORY_MANIFEST

    dst, out = tmp_path / "converted", tmp_path / "embedded"
    embed = ["embed", "--images", str(photos[0]), "--model", str(saved_model), "--out", str(out)]
    assert main(["convert", str(saved_model), str(dst), "--to", "hf"]) == 0
    assert main(embed) == 0
    for folder in (dst, out):
        (folder / DIRECTORY_MANIFEST).unlink()
    assert main(["convert", str(saved_model), str(dst)]) == 0
    assert main(embed) == 0
    (dst / DIRECTORY_MANIFEST).unlink()
    (dst / "README.md").write_text("mine")
    capsys.readouterr()
    assert main(["convert", str(saved_model), str(dst)]) == 2
    assert "(README.md)" in capsys.readouterr().err
    assert (dst / "README.md").read_text() == "mine"


@pytest.mark.parametrize("error", ["OSError", "safetensors"])
def test_convert_onto_a_full_disk_keeps_the_previous_output(saved_model, tmp_path, capsys,
                                                            monkeypatch, error) -> None:
    import errno

    from safetensors import SafetensorError

    from clipforge.weights import formats

    dst = tmp_path / "converted"
    assert main(["convert", str(saved_model), str(dst)]) == 0
    before = _files(dst)
    capsys.readouterr()

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        if error == "OSError":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(formats, "save_file", full)
    for target, to in ((dst, "clipforge"), (dst, "hf"), (tmp_path / "one.safetensors",
                                                         "clipforge")):
        assert main(["convert", str(saved_model), str(target), "--to", to]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: cannot write {target}: the disk is full"), err
        assert "\n" not in err and "Traceback" not in err
    assert _files(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "tiny"]


def test_module_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "clipforge", "models"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "ViT-bigG-14" in result.stdout


def test_default_model_offline_says_how_to_pass_a_file(photos, tmp_path, monkeypatch,
                                                       capsys) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["classify", str(photos[0]), "--labels", "a cat,a dog"]) == 2
    err = capsys.readouterr().err
    assert "timm/vit_base_patch32_clip_224.openai" in err and "--model /path/to" in err


def test_tiny_model_without_weights_warns(photos, caplog) -> None:
    assert main(["classify", str(photos[0]), "--labels", "a cat,a dog", "--model",
                 "tiny-rn"]) == 0
    assert "random initialisation" in caplog.text


def test_embed_never_replaces_a_foreign_folder(saved_model, photos, tmp_path, capsys) -> None:
    mine = tmp_path / "my-folder"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    args = ["embed", "--images", str(photos[0]), "--model", str(saved_model)]
    assert main([*args, "--out", str(mine)]) == 2
    assert "not written by clipforge" in capsys.readouterr().err
    assert (mine / "thesis.txt").read_text() == "precious"
    out = tmp_path / "out"
    assert main([*args, "--out", str(out)]) == 0
    assert main([*args, "--workers", "2", "--out", str(out)]) == 0  # re-run replaces its own
    assert np.load(out / "image_embeddings.npy").shape == (1, 64)


DESCRIPTIONS = ["a face of an astronaut with an American flag", "a facial photo of a tabby cat",
                "a cup of coffee on a saucer", "a black-and-white silhouette of a horse",
                "a red motorcycle standing in a garage", "a page of text about segmentation",
                "a rocket standing on a launchpad", "a person looking at a camera on a tripod"]


def test_plot_similarity_and_classify_plot(saved_model, photos, tmp_path, capsys) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(DESCRIPTIONS) + "\n", encoding="utf-8")
    out = tmp_path / "similarity.svg"
    assert main(["plot-similarity", "--images", *map(str, photos), str(broken), "--texts-file",
                 str(texts), "--out", str(out), "--model", str(saved_model)]) == 0
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and f"{len(DESCRIPTIONS)} texts x {len(photos)}" \
        in captured.out
    svg = out.read_text()
    assert all(d in svg for d in DESCRIPTIONS)
    bars = tmp_path / "top.png"
    assert main(["classify", *map(str, photos[:3]), "--labels", ",".join(LABELS), "--model",
                 str(saved_model), "--plot", str(bars), "--top", "3"]) == 0
    assert bars.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(SystemExit, match="latin1.txt is not UTF-8"):
        main(["plot-similarity", "--images", str(photos[0]), "--texts-file", str(latin1),
              "--out", str(out), "--model", str(saved_model)])


def test_rank_and_score(saved_model, photos, tmp_path, capsys) -> None:
    assert main(["rank", *map(str, photos), "--prompt", "a cup of coffee", "--json",
                 "--model", str(saved_model)]) == 0
    ranked = json.loads(capsys.readouterr().out)["results"]
    model = clipforge.create_model(saved_model)
    with torch.no_grad():
        text = model.encode_text(clipforge.tokenize(["a cup of coffee"]), normalize=True)[0]
        cosines = {str(p): float(model.encode_image(model.preprocess.load(p)[None],
                                                    normalize=True)[0] @ text)
                   for p in photos}
    assert [r["image"] for r in ranked] == sorted(cosines, key=cosines.get, reverse=True)
    for r in ranked:
        assert r["score"] == pytest.approx(cosines[r["image"]], abs=1e-5)

    captions = tmp_path / "captions.txt"
    captions.write_text("\n".join(DESCRIPTIONS[:3]) + "\n", encoding="utf-8")
    folder = tmp_path / "three"
    folder.mkdir()
    for i, photo in enumerate(photos[:3]):  # folders are listed sorted: keep the caption order
        (folder / f"{i}_{photo.name}").write_bytes(photo.read_bytes())
    assert main(["score", "--images", str(folder), "--captions", str(captions), "--json",
                 "--no-prefix", "--model", str(saved_model)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["scored"] == 3
    with torch.no_grad():
        for row, photo, caption in zip(report["rows"], photos[:3], DESCRIPTIONS[:3]):
            cos = float(model.encode_image(model.preprocess.load(photo)[None], normalize=True)[0]
                        @ model.encode_text(clipforge.tokenize([caption]), normalize=True)[0])
            assert row["score"] == pytest.approx(2.5 * max(cos, 0.0), abs=1e-5)
    assert report["mean"] == pytest.approx(np.mean([r["score"] for r in report["rows"]]))
    with pytest.raises(SystemExit, match="3 images but 2 captions"):
        captions.write_text("\n".join(DESCRIPTIONS[:2]) + "\n", encoding="utf-8")
        main(["score", "--images", str(folder), "--captions", str(captions),
              "--model", str(saved_model)])

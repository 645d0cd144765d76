"""Every family through every command: classify, embed, rank, score, eval, index build,
search and the server, with the test-size rows of each family (the families' towers with
OpenAI's packaged tokenizer) and one model that reads its own Hugging Face tokenizer files.

What is checked here is that the commands use the model's own pieces (tokenizer, pooling,
probabilities), not the families' exactness, which tests/test_families.py,
tests/test_open_clip_families.py and tests/test_pe_eva.py prove against the references."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import clipforge
import families
from clipforge.cli import main
from clipforge.search import SearchIndex, build_index
from clipforge.search.server import create_app
from conftest import perturb

FAMILIES = ["tiny-siglip", "tiny-bert", "tiny-xlmr", "tiny-pe", "tiny-eva02"]
LABELS = ["a cat", "a rocket", "a horse"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    model = perturb(clipforge.create_model(request.param), seed=7)
    path = tmp_path_factory.mktemp(request.param) / "model"
    clipforge.save_model(model, path)
    return path


@pytest.fixture(scope="module")
def siglip_with_files(tmp_path_factory):
    """A SigLIP model that reads its own SentencePiece tokenizer files (trained here)."""
    return families.small_siglip_dir(tmp_path_factory.mktemp("siglip-files"))


def _classify(model_dir, photos, capsys) -> dict:
    assert main(["classify", *map(str, photos[:3]), "--labels", ",".join(LABELS),
                 "--model", str(model_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_classify_gives_the_models_own_probabilities(family_dir, photos, capsys):
    report = _classify(family_dir, photos, capsys)
    model = clipforge.create_model(family_dir)
    assert len(report["results"]) == 3
    for result in report["results"]:
        probs = {p["label"]: p["probability"] for p in result["predictions"]}
        assert set(probs) == set(LABELS)
        total = sum(probs.values())
        if model.config.probability == "softmax":
            assert total == pytest.approx(1.0, abs=1e-4)
        else:  # independent sigmoids
            assert all(0 < p < 1 for p in probs.values())
    # the same numbers as the library gives
    image = model.encode_image(model.preprocess(
        clipforge.load_image(photos[0]))[None], normalize=True)
    text = model.encode_text(model.tokenizer([f"a photo of a {x}." for x in LABELS]),
                             normalize=True)
    expected = model.probabilities(model.logits(image, text))[0]
    got = {p["label"]: p["probability"] for p in report["results"][0]["predictions"]}
    for label, value in zip(LABELS, expected.tolist()):
        assert got[label] == pytest.approx(value, abs=1e-5)


def test_embed_rank_and_score(family_dir, photos, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("a cat\n两颗蓝色的星星\nкрасная звезда\n", encoding="utf-8")
    # (OpenAI's byte-level BPE spends 20 tokens on the Chinese line: more than tiny-siglip's
    # 16, hence --truncate)
    assert main(["embed", "--images", *map(str, photos[:2]), "--texts", str(texts),
                 "--out", str(tmp_path / "emb"), "--model", str(family_dir), "--truncate"]) == 0
    vectors = np.load(tmp_path / "emb" / "text_embeddings.npy")
    model = clipforge.create_model(family_dir)
    with torch.no_grad():
        want = model.encode_text(model.tokenizer(["a cat", "两颗蓝色的星星", "красная звезда"],
                                                 truncate=True), normalize=True).numpy()
    assert np.abs(vectors - want).max() < 1e-5
    capsys.readouterr()
    assert main(["rank", *map(str, photos[:3]), "--prompt", "a cat", "--json",
                 "--model", str(family_dir)]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 3
    captions = tmp_path / "captions.txt"
    captions.write_text("a cat\na rocket\n", encoding="utf-8")
    assert main(["score", "--images", *map(str, photos[:2]), "--captions", str(captions),
                 "--json", "--model", str(family_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["scored"] == 2


def test_eval_zero_shot(family_dir, photos, tmp_path, capsys):
    root = tmp_path / "set"
    for i, path in enumerate(photos[:4]):
        (root / ("cat" if i % 2 else "dog")).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / ("cat" if i % 2 else "dog") / path.name)
    assert main(["eval", str(root), "--model", str(family_dir), "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert 0 <= metrics["acc1"] <= 1


def test_index_search_and_server(family_dir, photo_dir, tmp_path, capsys):
    model = clipforge.create_model(family_dir)
    build_index(photo_dir, tmp_path / "idx", model=model, progress=False)
    assert main(["search", str(tmp_path / "idx"), "a rocket", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert len(hits) == 3
    index = SearchIndex.open(tmp_path / "idx")  # reloads the recorded model
    assert index.model.config == model.config
    with TestClient(create_app(index), base_url="http://127.0.0.1") as client:
        response = client.get("/api/search", params={"q": "a rocket", "k": 3})
        assert response.status_code == 200
        assert [h["id"] for h in response.json()["results"]] == [h["id"] for h in hits]


def test_a_model_with_its_own_tokenizer_files_runs_every_command(siglip_with_files, photos,
                                                                 photo_dir, tmp_path, capsys):
    report = _classify(siglip_with_files, photos, capsys)
    assert len(report["results"]) == 3
    model = clipforge.create_model(siglip_with_files)
    assert type(model.tokenizer).__name__ == "HFTokenizer"
    build_index(photo_dir, tmp_path / "idx", model=model, progress=False)
    assert main(["search", str(tmp_path / "idx"), "Красная звезда!", "-k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    with torch.no_grad():
        query = model.encode_text(model.tokenizer(["Красная звезда!"]), normalize=True)[0]
        image = model.encode_image(model.preprocess(clipforge.load_image(hits[0]["path"]))[None],
                                   normalize=True)[0]
    assert hits[0]["score"] == pytest.approx(float(query @ image), abs=2e-3)  # float16 rows

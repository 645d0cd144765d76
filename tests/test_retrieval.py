"""Blocked retrieval recall against a brute-force full-matrix reference: several captions per
image, images with none, duplicate embeddings, block sizes that divide nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipforge.evaluation import retrieval_recall
from clipforge.evaluation.retrieval import first_hit_ranks


@pytest.fixture(autouse=True)
def one_thread():
    """Hundreds of tiny blocks: a second intra-op thread only spin-waits, and on a shared CPU
    that made this file ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def brute_force(images: torch.Tensor, texts: torch.Tensor, owner: torch.Tensor,
                ks: tuple[int, ...]) -> dict[str, float]:
    """The whole score matrix, each row sorted stably (ties: lower index first); scores are
    float64 products of the float32 unit vectors, rounded to float32."""
    text = F.normalize(texts.float(), dim=-1).double()
    scores = (text @ F.normalize(images.float(), dim=-1).double().t()).float()
    positive = owner[:, None] == torch.arange(len(images))[None, :]  # [texts, images]

    def recall(matrix: torch.Tensor, relevant: torch.Tensor, k: int) -> float:
        order = matrix.sort(dim=1, descending=True, stable=True).indices
        hit = relevant.gather(1, order)[:, :k].any(dim=1)
        return hit.double().mean().item()

    out = {f"text_retrieval_recall@{k}": recall(scores.t(), positive.t(), k) for k in ks}
    out.update({f"image_retrieval_recall@{k}": recall(scores, positive, k) for k in ks})
    return out


def clip_benchmark(images: torch.Tensor, texts: torch.Tensor, owner: torch.Tensor,
                   ks: tuple[int, ...]) -> dict[str, float]:
    """CLIP_benchmark's definition: per query, (true positives in the top k) / (positives),
    then the fraction of queries where that is > 0 (0/0 = NaN counts as a miss)."""
    scores = F.normalize(texts.float(), dim=-1) @ F.normalize(images.float(), dim=-1).t()
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), owner] = True

    def recall_at_k(s: torch.Tensor, p: torch.Tensor, k: int) -> torch.Tensor:
        top = s.topk(k, dim=1)[1]
        true_positive = p.gather(1, top).sum(dim=1)
        return true_positive / p.sum(dim=1)

    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = (recall_at_k(scores, positive, k) > 0).float().mean()
        out[f"text_retrieval_recall@{k}"] = (recall_at_k(scores.t(), positive.t(), k) > 0
                                             ).float().mean()
    return {key: value.item() for key, value in out.items()}


def make_set(n_images: int, dim: int, seed: int, max_captions: int = 6
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images with 0..max_captions captions each, captions near their image, shuffled."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, dim, generator=g)
    counts = torch.randint(0, max_captions + 1, (n_images,), generator=g)
    counts[0] = 0  # at least one image with no caption
    owner = torch.repeat_interleave(torch.arange(n_images), counts)
    owner = owner[torch.randperm(len(owner), generator=g)]
    texts = images[owner] + 1.2 * torch.randn(len(owner), dim, generator=g)
    return images, texts, owner


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_for_any_block_sizes(seed: int) -> None:
    images, texts, owner = make_set(61, 16, seed)
    ks = (1, 3, 5, 10, 100)  # 100 > number of images: every image that has a caption hits
    reference = brute_force(images, texts, owner, ks)
    assert 0.1 < reference["text_retrieval_recall@1"] < 0.9  # not a trivial case
    # key blocks wider than k + 8 take the float32-candidate path, narrower ones are exact
    for chunk, key_chunk in [(1, 4096), (7, 7), (7, 23), (1000, 1), (1000, 23), (61, 4096)]:
        ours = retrieval_recall(images, texts, owner, ks, chunk, key_chunk=key_chunk)
        assert ours == reference, (chunk, key_chunk)


def test_matches_clip_benchmark_formula() -> None:
    images, texts, owner = make_set(80, 32, 7)
    ks = (1, 5, 10)
    ours = retrieval_recall(images, texts, owner, ks, chunk=9, key_chunk=23)
    reference = clip_benchmark(images, texts, owner, ks)
    assert ours.keys() == reference.keys()
    for key in ours:
        assert ours[key] == pytest.approx(reference[key], abs=1e-6)


def test_image_without_captions_is_a_miss() -> None:
    # Every caption is its image: perfect retrieval, except the caption-less image 2.
    images = torch.eye(4)
    owner = torch.tensor([0, 1, 1, 3])
    result = retrieval_recall(images, images[owner], owner, ks=(1, 4))
    assert result["text_retrieval_recall@1"] == 0.75
    assert result["text_retrieval_recall@4"] == 0.75  # even when k covers every caption
    assert result["image_retrieval_recall@1"] == 1.0


def test_duplicate_embeddings_rank_by_index() -> None:
    g = torch.Generator().manual_seed(3)
    images = torch.randn(6, 8, generator=g)
    images[4] = images[1]  # two identical images
    owner = torch.tensor([0, 1, 2, 3, 4, 5])
    texts = images.clone()  # each caption equals its image
    texts = torch.cat([texts, texts[1:2]])  # and a duplicate caption of image 1
    owner = torch.cat([owner, torch.tensor([1])])
    for chunk, key_chunk in [(1, 1), (2, 3), (7, 7), (100, 100)]:
        result = retrieval_recall(images, texts, owner, ks=(1, 2), chunk=chunk,
                                  key_chunk=key_chunk)
        assert result == brute_force(images, texts, owner, (1, 2))
        # text -> image: caption of image 4 ties with image 1, which ranks first
        assert result["image_retrieval_recall@1"] == pytest.approx(6 / 7)
        assert result["image_retrieval_recall@2"] == 1.0
        # image -> text: image 4 ties with captions 1 and 6 of image 1, ranked before its own
        assert result["text_retrieval_recall@1"] == pytest.approx(5 / 6)
        assert result["text_retrieval_recall@2"] == 1.0  # caption 4 comes second


def test_many_duplicates_across_blocks() -> None:
    # Duplicate groups spread over the set, so that copies fall into different query and key
    # blocks; wide blocks take the candidate path, and near-tie rows the full rescoring.
    images, texts, owner = make_set(90, 12, 11, max_captions=4)
    for group in ([3, 40, 41, 88], [10, 11], [25, 70]):
        images[group] = images[group[0]].clone()
    texts[5:60:9] = texts[4].clone()  # duplicate captions, of different images
    reference = brute_force(images, texts, owner, (1, 2, 5, 20))
    for chunk, key_chunk in [(1, 4096), (7, 7), (7, 23), (1000, 1), (13, 40), (1000, 4096)]:
        assert retrieval_recall(images, texts, owner, (1, 2, 5, 20), chunk,
                                key_chunk=key_chunk) == reference, (chunk, key_chunk)


def test_constant_embeddings_are_not_rewarded() -> None:
    # A collapsed model ties everything: the lower-index rule gives roughly chance, not 100%.
    images = torch.ones(50, 4)
    texts = torch.ones(100, 4)
    owner = torch.arange(100) % 50
    result = retrieval_recall(images, texts, owner, ks=(1,))
    assert result["image_retrieval_recall@1"] == pytest.approx(2 / 100)  # captions of image 0
    assert result["text_retrieval_recall@1"] == pytest.approx(1 / 50)  # image 0 owns caption 0
    # Half the images identical, half not: wide blocks whose top candidates are all tied,
    # rescored in full, against blocks that are not.
    images[25:] = torch.randn(25, 4, generator=torch.Generator().manual_seed(0))
    texts[::3] = images[owner[::3]]
    reference = brute_force(images, texts, owner, (1, 5, 30))
    for chunk, key_chunk in [(1, 4096), (7, 40), (1000, 45), (1000, 4096)]:
        assert retrieval_recall(images, texts, owner, (1, 5, 30), chunk,
                                key_chunk=key_chunk) == reference


def test_scale_and_dtype_do_not_matter() -> None:
    images, texts, owner = make_set(30, 8, 4)
    reference = retrieval_recall(images, texts, owner)
    assert retrieval_recall(images.double() * 7, texts * 0.01, owner.tolist()) == reference
    assert retrieval_recall(images.numpy(), texts.numpy(), owner.numpy()) == reference


def test_report_usage_one_caption_per_image() -> None:
    # training/report.py: captions[i] describes images[i], ks (1, 5)
    g = torch.Generator().manual_seed(5)
    images = torch.randn(40, 16, generator=g)
    texts = images + 0.8 * torch.randn(40, 16, generator=g)
    result = retrieval_recall(images, texts, list(range(40)), ks=(1, 5))
    assert set(result) == {"text_retrieval_recall@1", "text_retrieval_recall@5",
                           "image_retrieval_recall@1", "image_retrieval_recall@5"}
    assert result == brute_force(images, texts, torch.arange(40), (1, 5))


def test_first_hit_ranks() -> None:
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5]])
    key_label = torch.tensor([0, 1, 1, 2])
    ranks = first_hit_ranks(queries, keys, torch.tensor([1, 2, 5]), key_label, k=3, chunk=2,
                            key_chunk=3)
    # query 0 ranks keys 0, 1, 3: label 1 first at rank 1; query 1 ranks 2, 3, 1: label 2 at
    # rank 1; label 5 is nowhere
    assert ranks.tolist() == [1, 1, -1]


def test_bad_input() -> None:
    images, texts, owner = make_set(10, 4, 0)
    with pytest.raises(ValueError, match="one image per caption"):
        retrieval_recall(images, texts, owner[:-1])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        retrieval_recall(images, texts, torch.full_like(owner, 10))
    with pytest.raises(ValueError, match="dimension"):
        retrieval_recall(images, texts[:, :3], owner)
    bad = texts.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        retrieval_recall(images, bad, owner)
    with pytest.raises(ValueError, match="positive integers"):
        retrieval_recall(images, texts, owner, ks=(0, 5))
    with pytest.raises(ValueError, match="chunk"):
        retrieval_recall(images, texts, owner, chunk=0)
    with pytest.raises(ValueError, match="non-empty"):
        retrieval_recall(images[:0], texts, owner)
    with pytest.raises(ValueError, match="integer"):
        retrieval_recall(images, texts, owner.float())

"""The objectives against the paper's pseudocode, GradCache against a full-batch step, and two
gloo processes against one process on the same global batch."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import clipforge
from clipforge.loss import SigLipLoss, clip_loss, clip_loss_chunked
from clipforge.training.distributed import average_gradients
from clipforge.training.gradcache import gradcache_backward
from clipforge.training.objective import Objective
from conftest import perturb


def paper_loss(image: np.ndarray, text: np.ndarray, t: float) -> float:
    """The numpy pseudocode of Figure 3 in Radford et al. 2021 (features already normalised)."""
    logits = image @ text.T * np.exp(t)
    labels = np.arange(len(image))

    def cross_entropy(logits: np.ndarray, axis: int) -> float:
        log_probs = logits - np.log(np.exp(logits).sum(axis=axis, keepdims=True))
        picked = log_probs[labels, labels]
        return float(-picked.mean())

    return (cross_entropy(logits, axis=1) + cross_entropy(logits, axis=0)) / 2


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def test_clip_loss_is_the_papers() -> None:
    image, text, t = unit(7, 16, 0), unit(7, 16, 1), torch.tensor(2.3, dtype=torch.float64)
    ours = clip_loss(image, text, t).item()
    assert ours == pytest.approx(paper_loss(image.numpy(), text.numpy(), 2.3), rel=1e-6)
    perfect = clip_loss(image, image, torch.tensor(np.log(100.0)))
    assert perfect < clip_loss(image, text, torch.tensor(np.log(100.0)))


def test_siglip_loss_is_the_papers() -> None:
    image, text = unit(5, 8, 2), unit(5, 8, 3)
    loss = SigLipLoss(bias_init=-3.0).double()
    t = torch.tensor(np.log(10.0), dtype=torch.float64)
    logits = image @ text.T * 10.0 - 3.0
    z = 2 * torch.eye(5, dtype=torch.float64) - 1
    expected = -torch.log(torch.sigmoid(z * logits)).sum() / 5
    torch.testing.assert_close(loss(image, text, t), expected)


def test_chunked_clip_loss_equals_clip_loss() -> None:
    """Float64, N = 37 in chunks of 8 (a ragged last chunk): the same loss and the same
    gradients for image, text and the temperature, with a non-unit incoming gradient."""
    results = []
    for loss_fn in (clip_loss, lambda i, t, s: clip_loss_chunked(i, t, s, chunk=8)):
        image = unit(37, 16, 4).requires_grad_()
        text = unit(37, 16, 5).requires_grad_()
        t = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
        loss = loss_fn(image, text, t)
        (1.7 * loss).backward()
        results.append((loss.item(), image.grad, text.grad, t.grad))
    (full, *full_grads), (chunked, *chunked_grads) = results
    assert chunked == pytest.approx(full, rel=1e-12)
    for name, a, b in zip(("image", "text", "logit_scale"), chunked_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14, msg=name)


def _batch(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    words = ["red", "blue", "circle", "star", "small", "two", "on", "a", "striped", "background"]
    captions = [" ".join(words[int(i)] for i in torch.randint(0, 10, (int(k),), generator=g))
                for k in torch.randint(1, 9, (n,), generator=g)]
    return (torch.randn(n, 3, size, size, generator=g, dtype=torch.float64),
            clipforge.tokenize(captions))


def _grads(objective: Objective) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_gradcache_equals_full_batch(loss: str, name: str) -> None:
    """Float64: the parameter gradients of micro-batches of 3 equal one full step of 10, with
    the ordinary loss and with the chunked one that the training loop uses."""
    model = perturb(clipforge.create_model(name, dtype=torch.float64), seed=11)
    if name == "tiny-rn":
        model.eval()  # BatchNorm normalises per micro-batch in train mode (documented limit)
    objective = Objective(model, loss).double()
    images, tokens = _batch(10, model.config.image_size, seed=12)
    full_loss = objective(images, tokens)
    full_loss.backward()
    full = _grads(objective)
    for loss_fn in (objective.loss_fn, objective.chunked_loss_fn):
        objective.zero_grad(set_to_none=True)
        cached_loss = gradcache_backward(model, images, tokens, loss_fn, micro_batch=3)
        cached = _grads(objective)
        assert full.keys() == cached.keys() and len(full) == len(list(objective.parameters()))
        for key in full:
            torch.testing.assert_close(cached[key], full[key], rtol=1e-9, atol=1e-12, msg=key)
        assert cached_loss.item() == pytest.approx(full_loss.item(), rel=1e-12)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, state: dict, use_gradcache: bool, loss: str,
            out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = clipforge.create_model("tiny-vit", dtype=torch.float64)
    objective = Objective(model, loss).double()
    objective.load_state_dict(state)
    images, tokens = _batch(8, 32, seed=13)
    local = slice(rank * 4, rank * 4 + 4)
    ddp = DistributedDataParallel(objective)
    if use_gradcache:
        with ddp.no_sync():
            value = gradcache_backward(model, images[local], tokens[local], objective.loss_fn,
                                       micro_batch=3)
        average_gradients(list(objective.parameters()))
    else:
        value = ddp(images[local], tokens[local])
        value.backward()
    out[rank] = (value.item(), {n: p.grad.clone() for n, p in objective.named_parameters()})
    dist.destroy_process_group()


@pytest.mark.parametrize("use_gradcache", [False, True], ids=["ddp", "ddp+gradcache"])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_two_processes_equal_one(use_gradcache: bool, loss: str) -> None:
    """Two gloo ranks with 4 examples each compute the gradients of one process with all 8:
    features are all-gathered with gradient and each rank computes its local rows."""
    objective = Objective(perturb(clipforge.create_model("tiny-vit", dtype=torch.float64),
                                  seed=14), loss).double()
    state = {k: v.clone() for k, v in objective.state_dict().items()}
    images, tokens = _batch(8, 32, seed=13)
    full_loss = objective(images, tokens)
    full_loss.backward()
    expected = _grads(objective)

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), state, use_gradcache, loss, out), nprocs=2)
        results = dict(out)
    mean_loss = (results[0][0] + results[1][0]) / 2
    assert mean_loss == pytest.approx(full_loss.item(), rel=1e-9)
    for rank in (0, 1):
        for key, grad in expected.items():
            torch.testing.assert_close(results[rank][1][key], grad, rtol=1e-8, atol=1e-11,
                                       msg=f"rank {rank} {key}")

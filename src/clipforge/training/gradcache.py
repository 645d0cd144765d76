"""Exact large-batch contrastive steps in bounded memory (GradCache, Gao et al. 2021).

A contrastive loss couples every example with every other, so a batch of 32,768 cannot simply be
split into independent micro-batches.  But the loss depends on the parameters only through the
embeddings, so the chain rule splits the step in three:

1. embed every micro-batch without building a graph (memory: the embeddings only);
2. compute the loss on the full batch of embeddings and its gradient with respect to them;
3. re-run each micro-batch with a graph and back-propagate its slice of that gradient.

The parameter gradients equal those of one full-batch step.  Step 3 replays each micro-batch's
random state from step 1, so stochastic layers (patch dropout) see the same randomness twice.
BatchNorm (ResNet towers) is the exception: it normalises with micro-batch statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..loss import upcast
from ..model import CLIP

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class _RandomState:
    """Captures the CPU and CUDA generators now, to run a later block under the same state."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    @contextlib.contextmanager
    def replay(self):
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def _embed_without_graph(encode: Callable[[torch.Tensor], torch.Tensor],
                         chunks: tuple[torch.Tensor, ...], device: torch.device,
                         autocast: Callable[[], contextlib.AbstractContextManager]
                         ) -> tuple[torch.Tensor, list[_RandomState]]:
    states, outputs = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_RandomState(device))
            with autocast():
                outputs.append(encode(chunk))
    return torch.cat(outputs), states


def gradcache_backward(model: CLIP, images: torch.Tensor, tokens: torch.Tensor, loss_fn: LossFn,
                       micro_batch: int,
                       autocast: Callable[[], contextlib.AbstractContextManager] =
                       contextlib.nullcontext) -> torch.Tensor:
    """Accumulate into ``.grad`` the gradients of ``loss_fn(image, text, model.logit_scale)``
    over the whole batch, running the model with a graph on at most ``micro_batch`` examples at
    a time; returns the loss.

    Under DistributedDataParallel, call it inside ``ddp.no_sync()`` with the bare model, then
    all-reduce the gradients once (``distributed.average_gradients``): ``loss_fn`` all-gathers
    the embeddings, so the step stays exact across ranks.
    """
    device = images.device
    image_chunks, text_chunks = images.split(micro_batch), tokens.split(micro_batch)
    image_emb, image_states = _embed_without_graph(model.encode_image, image_chunks, device,
                                                   autocast)
    text_emb, text_states = _embed_without_graph(model.encode_text, text_chunks, device,
                                                 autocast)

    image_emb = upcast(image_emb).requires_grad_()
    text_emb = upcast(text_emb).requires_grad_()
    loss = loss_fn(F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1),
                   model.logit_scale)
    loss.backward()  # gradients for the embeddings, and for logit_scale / loss parameters

    for encode, chunks, states, grads in (
            (model.encode_image, image_chunks, image_states, image_emb.grad.split(micro_batch)),
            (model.encode_text, text_chunks, text_states, text_emb.grad.split(micro_batch))):
        for chunk, state, grad in zip(chunks, states, grads):
            with state.replay(), autocast():
                out = encode(chunk)
            upcast(out).backward(grad)
    return loss.detach()

"""torch.distributed set-up from torchrun's environment, and the helpers the loop needs.

``torchrun --nproc_per_node N -m clipforge train ...`` sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous variables; multi-node runs add ``--nnodes``/``--rdzv-endpoint``.  gloo on CPU, NCCL on
GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..ranks import all_gather_objects, barrier

__all__ = ["Dist", "all_gather_objects", "all_reduce_mean", "average_gradients", "barrier",
           "init_distributed", "leave_distributed", "sum_counts"]


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> tuple[Dist, torch.device]:
    """Join the process group when launched by torchrun; return (ranks, this process's device)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist(), torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        backend, dev = "nccl", torch.device("cuda", local_rank)
    else:
        backend, dev = "gloo", torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank), dev


def leave_distributed() -> None:
    """Wait for every rank, then leave the process group (a no-op outside torchrun).

    Why: a process that exits with the group still open can be killed by its own gloo threads
    at interpreter shutdown ("terminate called without an active exception", exit code -6),
    which torchrun reports as a failed run although the work is done and written.  The barrier
    keeps a rank that finished early from leaving while rank 0 still writes and may call a
    collective."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce and average ``.grad`` over ranks in one flat buffer (what DDP does in buckets);
    used after a GradCache step, whose many partial backwards run under ``no_sync``."""
    if not _distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if _distributed():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_counts(counts: dict[str, int], keys: tuple[str, ...]) -> dict[str, int]:
    """``counts`` summed over all ranks (every rank must call), keeping the non-zero ``keys``
    in order.  A key outside ``keys`` is an error: ranks must agree on the vector."""
    unknown = set(counts) - set(keys)
    if unknown:
        raise ValueError(f"counts for unknown keys {sorted(unknown)}")
    vector = torch.tensor([counts.get(k, 0) for k in keys], dtype=torch.int64)
    if _distributed():
        if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
            vector = vector.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(vector)
    return {k: int(n) for k, n in zip(keys, vector.tolist()) if n}

"""Which process this is in a torchrun job, and the two collective steps every multi-process
job here needs (wait for all, gather one object from each), with no process group meaning a
single process.

Kept at the bottom layer, torch.distributed only, so that training, search builds and shard
embedding share one copy; joining the process group is the caller's business
(:func:`clipforge.training.distributed.init_distributed` for the commands).
"""

from __future__ import annotations

import torch.distributed as dist


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group the caller joined; (0, 1) without one."""
    if _joined():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if _joined():
        dist.barrier()


def all_gather_objects(value: object) -> list[object]:
    """Every rank's ``value``, in rank order (``[value]`` in a single process)."""
    if not _joined() or dist.get_world_size() == 1:
        return [value]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered

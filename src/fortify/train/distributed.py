"""Process-group setup for ``torchrun``: DDP over gloo (CPU) or nccl (CUDA), no code change.

A run is distributed when ``WORLD_SIZE > 1`` is set in the environment (``torchrun`` does so).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fortify.utils.runtime import resolve_device

log = logging.getLogger("fortify.train")


@dataclass
class DistInfo:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # True if we initialised the process group (and must destroy it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> DistInfo:
    """Resolve the device and, under ``torchrun``, join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world <= 1:
        return DistInfo(device=dev)
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local, dev, owns)
    log.info("distributed: rank %d of %d on %s", info.rank, info.world_size, dev)
    return info


def teardown(info: DistInfo) -> None:
    """Leave the process group if :func:`setup` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(info: DistInfo, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (identity when not distributed)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(info: DistInfo, t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (identity when not distributed)."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t

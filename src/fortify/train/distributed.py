"""Process-group setup for ``torchrun``: DDP over gloo (CPU) or nccl (CUDA), no code change.

A run is distributed when ``WORLD_SIZE > 1`` is set in the environment (``torchrun`` does so).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fortify.errors import ConfigError
from fortify.utils.runtime import env_int, resolve_device

log = logging.getLogger(__name__)


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


def check_env() -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` from the environment, validated.

    Raises:
        ConfigError: a non-integer or out-of-range ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``, or
            ``WORLD_SIZE > 1`` without the rendezvous variables ``torchrun`` sets
            (``MASTER_ADDR``, ``MASTER_PORT``) when no process group exists yet.
    """
    world = env_int("WORLD_SIZE", 1, minimum=1)
    rank = env_int("RANK", 0, minimum=0)
    local = env_int("LOCAL_RANK", rank, minimum=0)
    if rank >= world:
        raise ConfigError(
            f"environment variable RANK={rank} must be below WORLD_SIZE={world} "
            f"(ranks 0..{world - 1}); fix or unset RANK"
        )
    if world <= 1:
        return world, rank, local
    if not dist.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise ConfigError(
                f"WORLD_SIZE={world} asks for distributed training but {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set; launch with "
                "`torchrun --nproc_per_node=N fortify ...` (it sets "
                "them), or unset WORLD_SIZE and RANK for a single process"
            )
    return world, rank, local


def setup(device: str) -> DistInfo:
    """Resolve the device and, under ``torchrun``, join the process group."""
    world, rank, local = check_env()
    dev = resolve_device(device)
    if world <= 1:
        return DistInfo(device=dev)
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


def finish(info: DistInfo, timeout: float = 5.0) -> None:
    """Wait for every rank, then for gloo's worker threads to let go of that last collective.

    :func:`fortify.train.fit` calls it after the last epoch, before leaving the process group.
    A gloo worker thread frees each finished collective after the caller has been woken up,
    and freeing a tensor that Python created needs the GIL. If the interpreter is shutting down
    by then (a rank other than 0 has nothing left to do after training), the thread cannot get
    the GIL and the process aborts (SIGABRT, "terminate called without an active exception")
    although training succeeded. So the last collective is an all-reduce of a token whose
    reference count this function watches (the pending C++ reference holds one more) while
    sleeping with the GIL released, for at most ``timeout`` seconds. An all-reduce rather than
    a barrier, because gloo's barrier keeps the collectives before it alive and frees them
    itself. No-op when not distributed.
    """
    if not info.distributed:
        return
    token = torch.zeros(1, device=info.device)
    idle = sys.getrefcount(token)
    dist.all_reduce(token)  # every rank gets here
    deadline = time.monotonic() + timeout
    while sys.getrefcount(token) > idle and time.monotonic() < deadline:
        time.sleep(0.001)


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


def broadcast_buffers(info: DistInfo, module: nn.Module) -> None:
    """Overwrite every rank's buffers (BatchNorm running statistics, ...) with rank 0's.

    DDP broadcasts buffers only at the start of each forward pass through the wrapper, so after
    an epoch the other ranks still hold statistics updated by their own last batch, while rank 0
    checkpoints its own. Calling this at the end of each epoch makes every rank continue (and
    validate) with exactly the state a resume restores. No-op when not distributed.
    """
    if not info.distributed:
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=0)


def all_reduce_sum(info: DistInfo, t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (identity when not distributed)."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t

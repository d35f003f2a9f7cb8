"""Per-epoch validation: clean and PGD robust accuracy on the validation split (never test)."""

from __future__ import annotations

import torch
from torch import nn

from fortify.config.schema import TrainConfig
from fortify.data.base import ImageSet
from fortify.train.distributed import DistInfo, all_reduce_sum


def validate(
    model: nn.Module,
    val: ImageSet,
    cfg: TrainConfig,
    info: DistInfo,
    *,
    batch_size: int = 256,
    channels_last: bool = False,
) -> dict[str, float]:
    """Clean and robust accuracy on the first ``cfg.val_points`` validation images.

    Robust accuracy uses L∞ PGD with ``cfg.val_attack_steps`` steps of ``0.1·eps`` at
    ``eps = cfg.attack.eps``, no random start, and counts a point as broken if any iterate fools
    the model (``mode="best"``). Runs in fp32 with the model in eval mode; under DDP each rank
    scores a disjoint shard and counts are summed. Returns ``{}`` when there is nothing to score.
    """
    from fortify.attacks import pgd

    n = min(cfg.val_points, len(val))
    if n == 0:
        return {}
    shard = val.subset(slice(info.rank, n, info.world_size))
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=info.device)  # n, clean, robust
    eps = cfg.attack.eps
    try:
        for start in range(0, len(shard), batch_size):
            x, y = shard.subset(slice(start, start + batch_size)).floats(info.device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                counts[1] += (model(x).argmax(1) == y).sum()
            if cfg.val_attack_steps > 0:
                x_adv = pgd(
                    model, x, y, eps=eps, steps=cfg.val_attack_steps, step_size=0.1 * eps,
                    random_start=False, mode="best",
                )  # fmt: skip
                with torch.no_grad():
                    counts[2] += (model(x_adv).argmax(1) == y).sum()
            counts[0] += len(y)
    finally:
        model.train(was_training)
    all_reduce_sum(info, counts)
    out = {"val/clean": float(counts[1] / counts[0]), "val/n": int(counts[0])}
    if cfg.val_attack_steps > 0:
        out["val/robust"] = float(counts[2] / counts[0])
    return out

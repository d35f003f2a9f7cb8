"""Optimisers and learning-rate schedules of the training loop.

The schedule sets the learning rate before every optimiser step from ``(epoch, step in epoch)``
so that it is a pure function of progress (plus, for ``plateau``, of the validation history it
stores in its state). Epochs are 0-based: with ``milestones: [75, 90]`` epochs 0–74 use ``lr``,
75–89 ``lr·γ`` and 90+ ``lr·γ²`` (the FSR recipe with γ = 0.1).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fortify.config.schema import TrainConfig
from fortify.errors import ConfigError


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam or Adamax over ``params`` with ``train.weight_decay``."""
    if not params:
        raise ConfigError(
            "no trainable parameters: train.trainable matched nothing that requires grad"
        )
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamax":
        return torch.optim.Adamax(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ConfigError(f"train.optimizer {cfg.optimizer!r} unknown; choose sgd, adam or adamax")


class LRSchedule:
    """Learning rate per step: linear warm-up × (multistep | cosine | constant | plateau).

    Call :meth:`apply` before each optimiser step and :meth:`end_epoch` with the validation
    metric after each epoch (only ``plateau`` uses it).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
        self.optimizer = optimizer
        self.cfg = cfg
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.plateau_factor = 1.0
        self.plateau_best: float | None = None
        self.plateau_bad = 0

    def factor(self, epoch: int, step: int = 0) -> float:
        """Multiplier of ``train.lr`` at ``step`` (0-based) of ``epoch`` (0-based)."""
        cfg = self.cfg
        t = epoch + step / self.steps_per_epoch  # fractional epochs done
        warm = 1.0
        if cfg.warmup_epochs > 0 and t < cfg.warmup_epochs:
            warm = (epoch * self.steps_per_epoch + step + 1) / (
                cfg.warmup_epochs * self.steps_per_epoch
            )
        floor = cfg.min_lr / cfg.lr
        if cfg.schedule == "multistep":
            main = cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)
        elif cfg.schedule == "cosine":
            span = max(cfg.epochs - cfg.warmup_epochs, 1e-12)
            progress = min(max(t - cfg.warmup_epochs, 0.0) / span, 1.0)
            main = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        elif cfg.schedule == "plateau":
            main = max(self.plateau_factor, floor)
        else:
            main = 1.0
        return warm * main

    def apply(self, epoch: int, step: int = 0) -> float:
        """Set every parameter group's learning rate for this step; return it."""
        lr = self.cfg.lr * self.factor(epoch, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def end_epoch(self, metric: float | None) -> None:
        """Feed the epoch's validation metric (higher is better) to the plateau rule."""
        if self.cfg.schedule != "plateau" or metric is None:
            return
        if self.plateau_best is None or metric > self.plateau_best:
            self.plateau_best, self.plateau_bad = metric, 0
            return
        self.plateau_bad += 1
        if self.plateau_bad > self.cfg.plateau_patience:
            self.plateau_factor *= self.cfg.gamma
            self.plateau_bad = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "plateau_factor": self.plateau_factor,
            "plateau_best": self.plateau_best,
            "plateau_bad": self.plateau_bad,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plateau_factor = float(state["plateau_factor"])
        best = state["plateau_best"]
        self.plateau_best = None if best is None else float(best)
        self.plateau_bad = int(state["plateau_bad"])

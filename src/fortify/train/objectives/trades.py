"""TRADES (Zhang et al., 2019): clean CE plus β·KL(f(x) ‖ f(x_adv)).

The inner attack maximises the same KL from a small Gaussian start (σ = ``train.options.
trades_init``, default 0.001) with L∞ signed-gradient steps of ``train.attack``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fortify.config.schema import TrainConfig
from fortify.train.objectives.base import (
    AdvBatch,
    Metrics,
    Objective,
    Scored,
    StepContext,
    accuracy,
    check_start_sigma,
    clean_and_adv,
    kl_clean_adv,
    register_objective,
    with_aux,
)


@register_objective("trades")
class Trades(Objective):
    """``L = CE(f(x), y) + β · mean_i KL(p(x_i) ‖ p(x_adv,i)) + Σ aux(x_adv)``."""

    options: dict[str, object] | None = {"trades_init": 0.001}

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.sigma = check_start_sigma(cfg.options.get("trades_init", 0.001), "trades_init")

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        def kl_from_clean(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
            with torch.no_grad():
                target = net(x).float()
            return lambda xa: kl_clean_adv(target, net(xa)).sum()

        return ctx.gaussian_ascent(x, self.sigma, kl_from_clean)

    def compute(self, model: nn.Module, b: AdvBatch, ctx: StepContext) -> Scored:
        logits_clean, logits_adv, terms = clean_and_adv(model, b)
        y = b.y
        ce = F.cross_entropy(logits_clean.float(), y)
        kl = kl_clean_adv(logits_clean, logits_adv).mean()
        metrics: Metrics = {
            "ce": ce.detach(),
            "kl": kl.detach(),
            "acc": accuracy(logits_clean, y),
            "acc_adv": accuracy(logits_adv, y),
        }
        return with_aux(ce + self.cfg.beta * kl, terms, metrics)

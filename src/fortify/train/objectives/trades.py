"""TRADES (Zhang et al., 2019): clean CE plus β·KL(f(x) ‖ f(x_adv)).

The inner attack maximises the same KL from a small Gaussian start (σ = ``train.options.
trades_init``, default 0.001) with L∞ signed-gradient steps of ``train.attack``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fortify.config.schema import TrainConfig
from fortify.errors import ConfigError
from fortify.train.objectives.base import (
    Metrics,
    Objective,
    StepContext,
    accuracy,
    forward_aux,
    forward_labelled,
    gaussian_start,
    kl_clean_adv,
    register_objective,
    signed_ascent,
    with_aux,
)


@register_objective("trades")
class Trades(Objective):
    """``L = CE(f(x), y) + β · mean_i KL(p(x_i) ‖ p(x_adv,i)) + Σ aux(x_adv)``."""

    options: dict[str, object] | None = {"trades_init": 0.001}

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        sigma = cfg.options.get("trades_init", 0.001)
        if (
            isinstance(sigma, bool)
            or not isinstance(sigma, (int, float))
            or not math.isfinite(sigma)
            or sigma < 0
        ):
            raise ConfigError(
                f"train.options.trades_init (σ of the Gaussian start, pixel units) must be a "
                f"finite number >= 0, got {sigma!r}"
            )

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        a, net = self.cfg.attack, ctx.module
        sigma = float(self.cfg.options.get("trades_init", 0.001))
        with ctx.crafting(net), ctx.autocast():
            with torch.no_grad():
                target = net(x).float()
            return signed_ascent(
                lambda xa: kl_clean_adv(target, net(xa)).sum(),
                x,
                gaussian_start(x, sigma, ctx.generator),
                eps=a.eps,
                step_size=a.step_size,
                steps=1 if a.kind == "fgsm-rs" else a.steps,
            )

    def compute(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        x_adv: torch.Tensor,
        ctx: StepContext,
    ) -> tuple[torch.Tensor, Metrics]:
        logits_clean = forward_labelled(model, x, y)
        logits_adv, terms = forward_aux(model, x_adv, y, x_clean=x)
        ce = F.cross_entropy(logits_clean.float(), y)
        kl = kl_clean_adv(logits_clean, logits_adv).mean()
        metrics: Metrics = {
            "ce": ce.detach(),
            "kl": kl.detach(),
            "acc": accuracy(logits_clean, y),
            "acc_adv": accuracy(logits_adv, y),
        }
        return with_aux(ce + self.cfg.beta * kl, terms, metrics)

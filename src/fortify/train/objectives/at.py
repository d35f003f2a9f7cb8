"""Madry et al. PGD adversarial training (and Fast-AT with ``train.attack.kind: fgsm-rs``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fortify.train.objectives.base import (
    Metrics,
    Objective,
    StepContext,
    accuracy,
    forward_aux,
    register_objective,
    with_aux,
)


@register_objective("at")
class AdversarialTraining(Objective):
    """``L = CE(f(x_adv), y) + Σ aux(x_adv)`` with ``x_adv`` from ``train.attack``."""

    options: dict[str, object] | None = {}
    metric_names: tuple[str, str] = ("ce_adv", "acc_adv")  # (loss, accuracy) in metrics

    def compute(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        x_adv: torch.Tensor,
        ctx: StepContext,
    ) -> tuple[torch.Tensor, Metrics]:
        logits, terms = forward_aux(model, x_adv, y, x_clean=x)
        ce = F.cross_entropy(logits.float(), y)
        ce_name, acc_name = self.metric_names
        return with_aux(ce, terms, {ce_name: ce.detach(), acc_name: accuracy(logits, y)})

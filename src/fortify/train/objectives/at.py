"""Madry et al. PGD adversarial training (and Fast-AT with ``train.attack.kind: fgsm-rs``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from fortify.train.objectives.base import (
    AdvBatch,
    Objective,
    Scored,
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

    def compute(self, model: nn.Module, b: AdvBatch, ctx: StepContext) -> Scored:
        logits, terms = forward_aux(model, b.x_adv, b.y, x_clean=b.x)
        ce = F.cross_entropy(logits.float(), b.y)
        ce_name, acc_name = self.metric_names
        return with_aux(ce, terms, {ce_name: ce.detach(), acc_name: accuracy(logits, b.y)})

"""Standard (clean) training: cross-entropy on clean images plus any auxiliary terms."""

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


@register_objective("standard")
class Standard(Objective):
    """``L = CE(f(x), y) + Σ aux`` — no inner attack."""

    options: dict[str, object] | None = {}

    adversarial = False

    def compute(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        x_adv: torch.Tensor,
        ctx: StepContext,
    ) -> tuple[torch.Tensor, Metrics]:
        logits, terms = forward_aux(model, x, y, x_clean=x)
        ce = F.cross_entropy(logits.float(), y)
        return with_aux(ce, terms, {"ce": ce.detach(), "acc": accuracy(logits, y)})
